"""Random inputs for one benchmark configuration: q, paged caches, block table, lengths.

* KV lengths: normal(S, S/2) per sequence, rounded, clamped below at the query length;
  every length equal to S with ``fixed`` or when S > 16k (ANCHORS.md: so the cache fits).
* Blocks: a random permutation of the cache's blocks is dealt out to the sequences, so
  neighbours in a sequence are not neighbours in memory (as in a serving engine).
* Layers: ``layers`` independent cache copies (same block table), used in rotation by
  the timer so a small cache is not served from L2.
Lengths and the permutation come from a CPU generator seeded with ``seed``: the same
on every device. Values are standard normal (bf16), quantized for the fp8 formats.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from ..kv_formats import FORMATS, canonical_format, quantize_entries
from ..platform import current_platform
from .counting import kv_bytes_per_token
from .specs import BatchSpec

FIXED_ABOVE = 16 * 1024  # ANCHORS.md: fixed lengths above 16k
FP8_K_SCALE = 0.02  # standard normal values / 0.02 stay inside e4m3's +-448
_FILL_CHUNK_TOKENS = 1 << 17


@dataclass
class DecodeInputs:
    spec: BatchSpec
    heads: int
    kv_cache_dtype: str  # canonical, never "auto"
    block_size: int
    kv_lora_rank: int
    rope_dim: int
    fixed: bool  # every group had fixed lengths
    q_lens: list[int]
    seq_lens_list: list[int]
    q: torch.Tensor  # [T, H, L+R] model dtype
    caches: list[torch.Tensor]  # one per layer, [num_blocks, block_size, entry]
    block_table: torch.Tensor  # [B, max_blocks] int32
    seq_lens: torch.Tensor  # [B] int32
    query_start_loc: torch.Tensor | None  # [B+1] int32, None when every q_len is 1
    k_scale: torch.Tensor | None  # [1] float32 on the device for "fp8" (no per-call upload)
    softmax_scale: float
    num_blocks: int
    extras: dict = field(default_factory=dict)  # peers keep their derived tensors here

    @property
    def layers(self) -> int:
        return len(self.caches)

    @property
    def max_query_len(self) -> int:
        return max(self.q_lens)

    @property
    def mean_seq_len(self) -> float:
        return sum(self.seq_lens_list) / len(self.seq_lens_list)

    def decode_kwargs(self, layer: int) -> dict:
        """Keyword arguments of ``portmla.mla_decode`` for cache copy ``layer``."""
        return dict(q=self.q, kv_cache=self.caches[layer], block_table=self.block_table,
                    seq_lens=self.seq_lens, softmax_scale=self.softmax_scale,
                    kv_lora_rank=self.kv_lora_rank, kv_cache_dtype=self.kv_cache_dtype,
                    k_scale=self.k_scale, query_start_loc=self.query_start_loc,
                    max_query_len=self.max_query_len)


def draw_lengths(spec: BatchSpec, fixed: bool, seed: int) -> tuple[list[int], list[int], bool]:
    """(query lengths, KV lengths, all fixed) per sequence, groups in spec order."""
    gen = torch.Generator().manual_seed(seed)
    q_lens, seq_lens, all_fixed = [], [], True
    for g in spec.groups:
        q_lens += [g.q_len] * g.count
        if fixed or g.kv_len > FIXED_ABOVE:
            seq_lens += [g.kv_len] * g.count
            continue
        all_fixed = False
        draw = torch.normal(float(g.kv_len), g.kv_len / 2.0, (g.count,), generator=gen)
        seq_lens += [max(g.q_len, int(round(x))) for x in draw.tolist()]
    return q_lens, seq_lens, all_fixed


def cache_bytes(seq_lens: list[int], block_size: int, kv_cache_dtype: str, kv_lora_rank: int,
                rope_dim: int) -> int:
    """Bytes of one cache copy holding these sequences (whole blocks)."""
    blocks = sum(math.ceil(s / block_size) for s in seq_lens)
    return blocks * block_size * kv_bytes_per_token(kv_cache_dtype, kv_lora_rank, rope_dim)


def auto_layers(one_copy_bytes: int, device: torch.device, target_bytes: int = 256 << 20) -> int:
    """Enough copies to touch ``target_bytes`` per rotation (several times an L2), within
    half of the free memory; 1..16 on GPUs, 1..4 on CPU."""
    cap = 4 if device.type == "cpu" else 16
    n = max(1, min(cap, math.ceil(target_bytes / max(one_copy_bytes, 1))))
    free = _free_bytes(device)
    if free is not None:
        n = max(1, min(n, int(0.5 * free) // max(one_copy_bytes, 1)))
    return n


def _free_bytes(device: torch.device) -> int | None:
    try:
        if device.type == "cuda":
            return torch.cuda.mem_get_info(device)[0]
        if device.type == "xpu" and hasattr(torch.xpu, "mem_get_info"):
            return torch.xpu.mem_get_info(device)[0]
    except Exception:  # noqa: BLE001 - unknown free memory: no cap
        return None
    return None


def build_inputs(spec: BatchSpec, heads: int, kv_cache_dtype: str, block_size: int, *,
                 device, kv_lora_rank: int = 512, rope_dim: int = 64, fixed: bool = False,
                 layers: int | None = None, seed: int = 0,
                 model_dtype: torch.dtype = torch.bfloat16) -> DecodeInputs:
    """Inputs for ``mla_decode`` on ``device``; ``layers`` None chooses ``auto_layers``."""
    device = torch.device(device)
    fmt = canonical_format(kv_cache_dtype)
    if fmt == "auto":
        fmt = {torch.bfloat16: "bfloat16", torch.float16: "float16"}[model_dtype]
    if block_size < 1:
        raise ValueError(f"block_size={block_size} (must be >= 1)")
    q_lens, seq_lens, all_fixed = draw_lengths(spec, fixed, seed)
    blocks_per_seq = [math.ceil(s / block_size) for s in seq_lens]
    num_blocks = sum(blocks_per_seq)
    one = cache_bytes(seq_lens, block_size, fmt, kv_lora_rank, rope_dim)
    if layers is None:
        layers = auto_layers(one, device)
    gen = torch.Generator().manual_seed(seed + 1)
    perm = torch.randperm(num_blocks, generator=gen).to(torch.int32)
    table = torch.zeros(len(seq_lens), max(blocks_per_seq), dtype=torch.int32)
    start = 0
    for b, n in enumerate(blocks_per_seq):
        table[b, :n] = perm[start:start + n]
        start += n
    torch.manual_seed(seed)
    d = kv_lora_rank + rope_dim
    q = torch.randn(len(q_lens) and sum(q_lens), heads, d, device=device, dtype=model_dtype)
    caches = [_random_cache(num_blocks, block_size, fmt, kv_lora_rank, rope_dim, model_dtype,
                            device) for _ in range(layers)]
    qsl = None
    if max(q_lens) > 1:
        qsl = torch.zeros(len(q_lens) + 1, dtype=torch.int32)
        torch.cumsum(torch.tensor(q_lens, dtype=torch.int32), 0, out=qsl[1:])
        qsl = qsl.to(device)
    return DecodeInputs(
        spec=spec, heads=heads, kv_cache_dtype=fmt, block_size=block_size,
        kv_lora_rank=kv_lora_rank, rope_dim=rope_dim, fixed=all_fixed, q_lens=q_lens,
        seq_lens_list=seq_lens, q=q, caches=caches, block_table=table.to(device),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=device), query_start_loc=qsl,
        k_scale=(torch.full((1,), FP8_K_SCALE, dtype=torch.float32, device=device)
                 if fmt == "fp8" else None),
        # DeepSeek's qk head dim is 128 + 64: the scale the absorbed decode keeps
        softmax_scale=1.0 / math.sqrt(128 + rope_dim), num_blocks=num_blocks)


def _random_cache(num_blocks, block_size, fmt, kv_lora_rank, rope_dim, model_dtype, device):
    from ..kv_formats import allocate_kv_cache

    cache = allocate_kv_cache(num_blocks, block_size, fmt, model_dtype, device,
                              kv_lora_rank=kv_lora_rank, rope_dim=rope_dim)
    if not FORMATS[fmt].quantized:
        cache.normal_()
        return cache
    flat = cache.view(num_blocks * block_size, cache.shape[-1])
    fp8 = current_platform(device).fp8_dtype
    for i in range(0, flat.shape[0], _FILL_CHUNK_TOKENS):
        n = min(_FILL_CHUNK_TOKENS, flat.shape[0] - i)
        vals = torch.randn(n, kv_lora_rank + rope_dim, device=device)
        flat[i:i + n] = quantize_entries(vals, fmt, kv_lora_rank, FP8_K_SCALE, cache.dtype, fp8)
    return cache
