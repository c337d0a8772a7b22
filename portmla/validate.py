"""Input checks shared by every op. They run before any kernel and before any write.

Shape / dtype / device / stride checks always run. Checks of tensor *values* (block ids,
slots, lengths) read the device once; they are skipped inside CUDA-graph capture and
torch.compile tracing, where a host read is impossible.
"""

from __future__ import annotations

import torch

from .kv_formats import expected_cache_dtypes, resolve_format
from .platform import Platform, is_capturing, is_tracing
from .problems import CacheLayout

INDEX_DTYPES = (torch.int32,)
SLOT_DTYPES = (torch.int32, torch.int64)


def _names(dtypes) -> str:
    return ", ".join(str(d).replace("torch.", "") for d in dtypes)


def check_tensor(name: str, t, *, dtypes=None, ndim=None, device=None, shape=None,
                 last_contiguous=False, contiguous=False) -> None:
    """Raise TypeError / ValueError naming ``name``, the value and what is allowed."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if dtypes is not None and t.dtype not in dtypes:
        raise TypeError(f"{name}.dtype={str(t.dtype).replace('torch.', '')} (supported: {_names(dtypes)})")
    if ndim is not None and t.dim() not in ((ndim,) if isinstance(ndim, int) else ndim):
        raise ValueError(f"{name} has {t.dim()} dims, shape {tuple(t.shape)} (expected {ndim} dims)")
    if shape is not None:
        for i, want in enumerate(shape):
            if want is not None and t.shape[i] != want:
                raise ValueError(f"{name}.shape={tuple(t.shape)} (expected "
                                 f"{tuple('*' if w is None else w for w in shape)})")
    if device is not None and t.device != device:
        raise ValueError(f"{name}.device={t.device} (expected {device}, the device of the other inputs)")
    if contiguous and not t.is_contiguous():
        raise ValueError(f"{name} must be contiguous (strides {tuple(t.stride())})")
    if last_contiguous and t.dim() and t.shape[-1] > 1 and t.stride(-1) != 1:
        raise ValueError(f"{name}.stride(-1)={t.stride(-1)} (the last dim must be contiguous, stride 1)")


def cache_layout(kv_cache, kv_cache_dtype: str, platform: Platform, kv_lora_rank: int,
                 rope_dim: int | None) -> CacheLayout:
    """Validate a paged cache tensor against its format and return its layout."""
    check_tensor("kv_cache", kv_cache, ndim=3, last_contiguous=True)
    fmt = resolve_format(kv_cache_dtype, kv_cache.dtype)
    ok = expected_cache_dtypes(fmt, platform.fp8_dtype)
    if kv_cache.dtype not in ok:
        raise TypeError(f"kv_cache.dtype={str(kv_cache.dtype).replace('torch.', '')} does not hold "
                        f"kv_cache_dtype={kv_cache_dtype!r} (expected: {_names(ok)})")
    entry = kv_cache.shape[2]
    if not isinstance(kv_lora_rank, int) or kv_lora_rank < 1:
        raise ValueError(f"kv_lora_rank={kv_lora_rank!r} (must be a positive int)")
    if fmt == "fp8_ds_mla":
        if kv_lora_rank % 128:
            raise ValueError(f"kv_lora_rank={kv_lora_rank} with kv_cache_dtype='fp8_ds_mla' "
                             f"(must be a multiple of 128)")
        rest = entry - kv_lora_rank - 4 * (kv_lora_rank // 128)
        if rest < 2 or rest % 2:
            raise ValueError(f"kv_cache.shape[2]={entry} with kv_lora_rank={kv_lora_rank} and "
                             f"'fp8_ds_mla' (expected {kv_lora_rank} + {kv_lora_rank // 32} + 2 * rope_dim)")
        rope = rest // 2
    else:
        rope = entry - kv_lora_rank
        if rope < 1:
            raise ValueError(f"kv_cache.shape[2]={entry} with kv_lora_rank={kv_lora_rank} "
                             f"(expected kv_lora_rank + rope_dim)")
    if rope_dim is not None and rope != rope_dim:
        raise ValueError(f"kv_cache.shape[2]={entry} gives rope_dim={rope}, but the inputs have "
                         f"rope_dim={rope_dim}")
    if kv_cache.shape[0] < 1 or kv_cache.shape[1] < 1:
        raise ValueError(f"kv_cache.shape={tuple(kv_cache.shape)} (num_blocks and block_size must be >= 1)")
    return CacheLayout(fmt, kv_cache.dtype, kv_cache.shape[0], kv_cache.shape[1], entry,
                       kv_cache.stride(0), kv_cache.stride(1), kv_lora_rank, rope)


def k_scale_tensor(name: str, scale, fmt: str, device: torch.device):
    """A float32 one-element tensor on ``device`` for 'fp8', None for the other formats."""
    if fmt != "fp8":
        return None
    if scale is None:
        raise ValueError(f"{name}=None with kv_cache_dtype='fp8' (a python float or a "
                         f"one-element tensor is required)")
    if isinstance(scale, torch.Tensor):
        if scale.numel() != 1:
            raise ValueError(f"{name} has {scale.numel()} elements (expected 1)")
        if scale.device != device:
            raise ValueError(f"{name}.device={scale.device} (expected {device})")
        return scale.reshape(1).to(torch.float32)
    if isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise TypeError(f"{name}={scale!r} (expected a python float or a one-element tensor)")
    if not (scale > 0 and scale < float("inf")):
        raise ValueError(f"{name}={scale} (must be finite and > 0)")
    return _scale_tensor(float(scale), torch.device(device))


_SCALES: dict[tuple[str, int | None, float], torch.Tensor] = {}
_MAX_SCALES = 1024


def _scale_tensor(value: float, device: torch.device) -> torch.Tensor:
    """A python-float scale as a one-element float32 tensor on ``device``, made once per
    (device, value) outside graph capture and kept (read only by the kernels), so a call
    captured after an eager one reads it instead of capturing a fill kernel into every replay;
    inside capture or tracing an unkept value is made anew (and not kept: its memory belongs
    to the graph)."""
    index = device.index
    if device.type == "cuda" and index is None:
        index = torch.cuda.current_device()
    key = (device.type, index, value)
    t = _SCALES.get(key)
    if t is None:
        t = torch.full((1,), value, dtype=torch.float32, device=device)
        if values_checkable(device) and len(_SCALES) < _MAX_SCALES:
            _SCALES[key] = t
    return t


def values_checkable(device: torch.device) -> bool:
    return not (is_tracing() or is_capturing(device))


def fail_if(cond: torch.Tensor, message) -> None:
    """Raise ValueError(message()) if any element of ``cond`` is true (one host read)."""
    if bool(cond.any().item()):
        raise ValueError(message())


def first_bad(mask: torch.Tensor) -> int:
    return int(torch.nonzero(mask.reshape(-1))[0].item())


def check_block_table_values(block_table, seq_lens, block_size, num_blocks, starts=None) -> None:
    """Used entries of ``block_table`` are valid block ids; lengths fit the table."""
    max_blocks = block_table.shape[1]
    s = seq_lens.long()
    begin = starts.long() if starts is not None else torch.zeros_like(s)
    end = begin + s
    fail_if(s < 0, lambda: f"seq_lens[{first_bad(s < 0)}]={int(s[first_bad(s < 0)])} (must be >= 0)")
    if starts is not None:
        fail_if(begin < 0, lambda: f"seq_starts[{first_bad(begin < 0)}]="
                                   f"{int(begin[first_bad(begin < 0)])} (must be >= 0)")
    need = (end + block_size - 1) // block_size
    over = need > max_blocks
    fail_if(over, lambda: (
        f"seq_lens[{first_bad(over)}]={int(s[first_bad(over)])}"
        + (f" from seq_starts={int(begin[first_bad(over)])}" if starts is not None else "")
        + f" needs {int(need[first_bad(over)])} blocks of {block_size}, but block_table has "
        f"{max_blocks} columns"))
    cols = torch.arange(max_blocks, device=block_table.device).view(1, -1)
    used = (cols >= (begin // block_size).view(-1, 1)) & (cols < need.view(-1, 1)) & (s > 0).view(-1, 1)
    bad = used & ((block_table < 0) | (block_table >= num_blocks))
    def msg():
        i = first_bad(bad)
        b, c = divmod(i, max_blocks)
        return (f"block_table[{b}, {c}]={int(block_table[b, c])} (block ids must be in "
                f"[0, {num_blocks - 1}], kv_cache has {num_blocks} blocks)")
    fail_if(bad, msg)
