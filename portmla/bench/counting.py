"""FLOP and bytes of one ``mla_decode`` call, counted as ANCHORS.md says (FlashMLA's
convention), with the real per-sequence KV lengths:

    FLOP  = sum_b  h · s_q,b · S_b · 2 · (d + dv)
    bytes = sum_b (s_q,b · h · d · q_bytes  +  S_b · d · kv_bytes  +  s_q,b · h · dv · out_bytes)

``d`` = kv_lora_rank + rope_dim (576), ``dv`` = kv_lora_rank (512); one shared KV head.
``S_b · d · kv_bytes`` is the cache's real bytes per token (1152 bf16/fp16, 576 fp8,
656 fp8_ds_mla), so the fp8 rows count what is really read. The causal mask of
multi-token queries is not subtracted (the convention counts s_q · S).
"""

from __future__ import annotations

from collections.abc import Sequence

from ..kv_formats import FORMATS, canonical_format

DEEPSEEK_KV_LORA_RANK = 512
DEEPSEEK_ROPE_DIM = 64


def kv_bytes_per_token(kv_cache_dtype: str, kv_lora_rank: int = DEEPSEEK_KV_LORA_RANK,
                       rope_dim: int = DEEPSEEK_ROPE_DIM) -> int:
    """Cache bytes per token: 1152 (16-bit), 576 (fp8), 656 (fp8_ds_mla) at DeepSeek dims."""
    fmt = canonical_format(kv_cache_dtype)
    if fmt == "auto":
        fmt = "bfloat16"
    return FORMATS[fmt].bytes_per_token(kv_lora_rank, rope_dim)


def kv_bytes_per_element(kv_cache_dtype: str, kv_lora_rank: int = DEEPSEEK_KV_LORA_RANK,
                         rope_dim: int = DEEPSEEK_ROPE_DIM) -> float:
    """ANCHORS.md's ``kv_bytes``: 2 for 16-bit, 1 for fp8, 656/576 for fp8_ds_mla."""
    return kv_bytes_per_token(kv_cache_dtype, kv_lora_rank, rope_dim) / (kv_lora_rank + rope_dim)


def _pairs(q_lens: Sequence[int] | int, seq_lens: Sequence[int]) -> list[tuple[int, int]]:
    seq_lens = [int(s) for s in seq_lens]
    if isinstance(q_lens, int):
        q_lens = [q_lens] * len(seq_lens)
    q_lens = [int(q) for q in q_lens]
    if len(q_lens) != len(seq_lens):
        raise ValueError(f"{len(q_lens)} query lengths for {len(seq_lens)} sequences")
    return list(zip(q_lens, seq_lens))


def decode_flop(q_lens: Sequence[int] | int, seq_lens: Sequence[int], num_heads: int,
                kv_lora_rank: int = DEEPSEEK_KV_LORA_RANK, rope_dim: int = DEEPSEEK_ROPE_DIM) -> int:
    """FLOP of one decode call: sum over sequences of h · s_q · S · 2 · (d + dv)."""
    d, dv = kv_lora_rank + rope_dim, kv_lora_rank
    return sum(num_heads * q * s * 2 * (d + dv) for q, s in _pairs(q_lens, seq_lens))


def decode_bytes(q_lens: Sequence[int] | int, seq_lens: Sequence[int], num_heads: int,
                 kv_cache_dtype: str = "bfloat16", kv_lora_rank: int = DEEPSEEK_KV_LORA_RANK,
                 rope_dim: int = DEEPSEEK_ROPE_DIM, q_bytes: int = 2, out_bytes: int = 2) -> int:
    """Bytes moved by one decode call: q read, cache read once, output written."""
    d, dv = kv_lora_rank + rope_dim, kv_lora_rank
    per_token = kv_bytes_per_token(kv_cache_dtype, kv_lora_rank, rope_dim)
    return sum(q * num_heads * d * q_bytes + s * per_token + q * num_heads * dv * out_bytes
               for q, s in _pairs(q_lens, seq_lens))


def intensity(flop: float, nbytes: float) -> float:
    """Arithmetic intensity, FLOP per byte."""
    return flop / nbytes if nbytes else float("nan")
