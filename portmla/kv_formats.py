"""KV-cache formats: names, byte layouts, shapes, allocation, (de)quantization.

A paged MLA cache has shape ``[num_blocks, block_size, entry]``; any strides work as
long as the last dim is contiguous (padded pages, ``buf[:, layer]`` cross-layer views).
Slot ``s`` is token ``s % block_size`` of block ``s // block_size``.

Formats (``L`` = kv_lora_rank, ``R`` = rope_dim; DeepSeek: 512 / 64):

* ``auto`` / ``bfloat16`` / ``float16``: ``entry = L + R`` values of the 16-bit dtype,
  ``[kv_c (L) | k_pe (R)]``. ``auto`` means the model dtype.
* ``fp8`` (alias ``fp8_e4m3``): ``entry = L + R`` values of the platform fp8 dtype
  (``float8_e4m3fn``; ``float8_e4m3fnuz`` on gfx94x); one per-tensor scale ``k_scale``:
  value = fp8 * k_scale. Writing divides by k_scale and saturates at the fp8 max.
  A ``uint8`` cache tensor is accepted and read as the platform fp8 bits.
* ``fp8_ds_mla``: ``entry = L + 4 * L/128 + 2 * R`` bytes (656), ``uint8``:
  bytes ``[0, L)``: kv_c as e4m3fn, in tiles of 128 values;
  bytes ``[L, L + 4*L/128)``: one float32 scale per tile (little-endian),
  ``scale = max(amax(tile) / 448, FLT_MIN)``, value = fp8 * scale;
  bytes ``[L + 4*L/128, entry)``: k_pe as R bfloat16 values (little-endian).
  This byte layout is a wire format: the same on every vendor (always e4m3fn).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .reasons import allowed

DS_MLA_TILE = 128
FP32_MIN_NORMAL = torch.finfo(torch.float32).tiny  # FLT_MIN


@dataclass(frozen=True)
class KVFormat:
    name: str
    bits: int  # bits per stored kv_c value
    quantized: bool
    description: str

    def entry_size(self, kv_lora_rank: int = 512, rope_dim: int = 64) -> int:
        """Elements (of the storage dtype) per cached token."""
        if self.name == "fp8_ds_mla":
            return kv_lora_rank + 4 * (kv_lora_rank // DS_MLA_TILE) + 2 * rope_dim
        return kv_lora_rank + rope_dim

    def bytes_per_token(self, kv_lora_rank: int = 512, rope_dim: int = 64) -> int:
        if self.name == "fp8_ds_mla":
            return self.entry_size(kv_lora_rank, rope_dim)
        return (kv_lora_rank + rope_dim) * self.bits // 8

    def storage_dtype(self, model_dtype: torch.dtype, fp8_dtype: torch.dtype) -> torch.dtype:
        if self.name == "auto":
            return model_dtype
        if self.name == "bfloat16":
            return torch.bfloat16
        if self.name == "float16":
            return torch.float16
        if self.name == "fp8":
            return fp8_dtype
        return torch.uint8


FORMATS: dict[str, KVFormat] = {
    f.name: f
    for f in (
        KVFormat("auto", 16, False, "model dtype (bf16/fp16), [kv_c | k_pe]"),
        KVFormat("bfloat16", 16, False, "bfloat16, [kv_c | k_pe]"),
        KVFormat("float16", 16, False, "float16, [kv_c | k_pe]"),
        KVFormat("fp8", 8, True, "platform fp8 e4m3, per-tensor k_scale"),
        KVFormat("fp8_ds_mla", 8, True, "e4m3fn kv_c in 128-tiles + fp32 tile scales + bf16 k_pe"),
    )
}
# The formats whose kv_c values are stored quantized (fp8 values, dequantized in the kernels).
QUANT_FORMATS = tuple(name for name, f in FORMATS.items() if f.quantized)
ALIASES = {"fp8_e4m3": "fp8"}
FORMAT_NAMES = tuple(FORMATS) + tuple(ALIASES)
MODEL_DTYPES = (torch.bfloat16, torch.float16)


def canonical_format(kv_cache_dtype: str) -> str:
    """The canonical format name; ``ValueError`` naming the argument for unknown names."""
    if not isinstance(kv_cache_dtype, str):
        raise TypeError(f"kv_cache_dtype={kv_cache_dtype!r} must be a str "
                        f"(supported: {', '.join(FORMAT_NAMES)})")
    name = ALIASES.get(kv_cache_dtype, kv_cache_dtype)
    if name not in FORMATS:
        raise ValueError(str(allowed("kv_cache_dtype", repr(kv_cache_dtype), FORMAT_NAMES)))
    return name


def resolve_format(kv_cache_dtype: str, cache_dtype: torch.dtype) -> str:
    """Canonical name with ``auto`` resolved from the cache tensor's dtype."""
    name = canonical_format(kv_cache_dtype)
    if name == "auto":
        if cache_dtype == torch.bfloat16:
            return "bfloat16"
        if cache_dtype == torch.float16:
            return "float16"
        raise ValueError(
            f"kv_cache.dtype={cache_dtype} with kv_cache_dtype='auto' "
            f"(auto needs a bfloat16 or float16 cache; name the quantized format instead)")
    return name


def expected_cache_dtypes(fmt: str, fp8_dtype: torch.dtype) -> tuple[torch.dtype, ...]:
    """Cache tensor dtypes accepted for a canonical format."""
    if fmt == "auto":
        return MODEL_DTYPES
    if fmt == "bfloat16":
        return (torch.bfloat16,)
    if fmt == "float16":
        return (torch.float16,)
    if fmt == "fp8":
        return (fp8_dtype, torch.uint8)
    return (torch.uint8,)


def kv_cache_shape(num_blocks: int, block_size: int, kv_cache_dtype: str = "auto",
                   kv_lora_rank: int = 512, rope_dim: int = 64) -> tuple[int, int, int]:
    """``(num_blocks, block_size, entry)`` for a format (entry counted in storage elements)."""
    fmt = FORMATS[canonical_format(kv_cache_dtype)]
    for name, v in (("num_blocks", num_blocks), ("block_size", block_size),
                    ("kv_lora_rank", kv_lora_rank), ("rope_dim", rope_dim)):
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise ValueError(f"{name}={v!r} (must be a positive int)")
    if fmt.name == "fp8_ds_mla" and kv_lora_rank % DS_MLA_TILE:
        raise ValueError(f"kv_lora_rank={kv_lora_rank} with kv_cache_dtype='fp8_ds_mla' "
                         f"(must be a multiple of {DS_MLA_TILE})")
    return (num_blocks, block_size, fmt.entry_size(kv_lora_rank, rope_dim))


def value_width(fmt: str, entry: int, kv_lora_rank: int) -> int:
    """``L + R``: values per token after dequantization, from a cache entry size."""
    if fmt == "fp8_ds_mla":
        return kv_lora_rank + (entry - kv_lora_rank - 4 * (kv_lora_rank // DS_MLA_TILE)) // 2
    return entry


def allocate_kv_cache(num_blocks: int, block_size: int, kv_cache_dtype: str,
                      model_dtype: torch.dtype, device, kv_lora_rank: int = 512,
                      rope_dim: int = 64) -> torch.Tensor:
    """An uninitialised cache of ``kv_cache_shape(...)`` in the format's storage dtype."""
    from .platform import current_platform

    if model_dtype not in MODEL_DTYPES:
        raise ValueError(str(allowed("model_dtype", model_dtype, MODEL_DTYPES)))
    shape = kv_cache_shape(num_blocks, block_size, kv_cache_dtype, kv_lora_rank, rope_dim)
    fmt = FORMATS[canonical_format(kv_cache_dtype)]
    dtype = fmt.storage_dtype(model_dtype, current_platform(device).fp8_dtype)
    return torch.empty(shape, dtype=dtype, device=device)


# ---------------------------------------------------------------- quantization helpers


def fp8_max(fp8_dtype: torch.dtype) -> float:
    return float(torch.finfo(fp8_dtype).max)


def quantize_fp8(x: torch.Tensor, scale: torch.Tensor | float, fp8_dtype: torch.dtype) -> torch.Tensor:
    """``x / scale`` saturated to the fp8 range, as ``fp8_dtype`` (per-tensor format)."""
    m = fp8_max(fp8_dtype)
    return (x.float() / scale).clamp_(-m, m).to(fp8_dtype)


def dequantize_fp8(q: torch.Tensor, scale: torch.Tensor | float, fp8_dtype: torch.dtype) -> torch.Tensor:
    """float32 values of fp8 storage (``uint8`` storage is read as ``fp8_dtype`` bits)."""
    if q.dtype == torch.uint8:
        q = q.view(fp8_dtype)
    return q.float() * scale


def ds_mla_pack(kv_c: torch.Tensor, k_pe: torch.Tensor) -> torch.Tensor:
    """``[T, L]``, ``[T, R]`` -> ``[T, L + 4*L/128 + 2*R]`` uint8 in the fp8_ds_mla layout."""
    t, lora = kv_c.shape
    tiles = lora // DS_MLA_TILE
    x = kv_c.float().reshape(t, tiles, DS_MLA_TILE)
    amax = x.abs().amax(dim=-1)
    # divide by a device tensor: CUDA turns division by a python scalar into a multiply by
    # its reciprocal, which is one ulp off amax / 448 for some values
    scale = (amax / torch.full_like(amax, 448.0)).clamp_min(FP32_MIN_NORMAL)  # [T, tiles]
    q = (x / scale.unsqueeze(-1)).clamp(-448.0, 448.0).to(torch.float8_e4m3fn)
    return torch.cat(
        [q.reshape(t, lora).view(torch.uint8),
         scale.contiguous().view(torch.uint8).reshape(t, 4 * tiles),
         k_pe.to(torch.bfloat16).contiguous().view(torch.uint8).reshape(t, -1)], dim=1)


def ds_mla_unpack(entry: torch.Tensor, kv_lora_rank: int) -> torch.Tensor:
    """``[..., entry]`` uint8 -> ``[..., L + R]`` float32 (kv_c dequantized, k_pe bf16 widened)."""
    tiles = kv_lora_rank // DS_MLA_TILE
    lead = entry.shape[:-1]
    flat = entry.reshape(-1, entry.shape[-1])
    n = flat.shape[0]
    q = flat[:, :kv_lora_rank].contiguous().view(torch.float8_e4m3fn).float()
    scale = flat[:, kv_lora_rank:kv_lora_rank + 4 * tiles].contiguous().view(torch.float32)
    pe = flat[:, kv_lora_rank + 4 * tiles:].contiguous().view(torch.bfloat16).float()
    c = (q.reshape(n, tiles, DS_MLA_TILE) * scale.reshape(n, tiles, 1)).reshape(n, kv_lora_rank)
    return torch.cat([c, pe], dim=1).reshape(*lead, kv_lora_rank + pe.shape[1])


def quantize_entries(kv: torch.Tensor, fmt: str, kv_lora_rank: int, scale, storage_dtype,
                     fp8_dtype: torch.dtype) -> torch.Tensor:
    """``[T, L+R]`` values -> ``[T, entry]`` of ``storage_dtype`` for a canonical format."""
    if fmt == "fp8_ds_mla":
        return ds_mla_pack(kv[:, :kv_lora_rank], kv[:, kv_lora_rank:])
    if fmt == "fp8":
        q = quantize_fp8(kv, scale, fp8_dtype)
        return q.view(torch.uint8) if storage_dtype == torch.uint8 else q
    return kv.to(storage_dtype)


def dequantize_entries(entries: torch.Tensor, fmt: str, kv_lora_rank: int, scale,
                       fp8_dtype: torch.dtype) -> torch.Tensor:
    """``[..., entry]`` storage -> ``[..., L+R]`` float32 for a canonical format."""
    if fmt == "fp8_ds_mla":
        return ds_mla_unpack(entries, kv_lora_rank)
    if fmt == "fp8":
        return dequantize_fp8(entries, scale, fp8_dtype)
    return entries.float()
