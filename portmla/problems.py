"""Frozen descriptions of one call, the only thing backends look at to accept or refuse it.

Every field is a plain int / str / dtype / bool so shape checks are pure functions of
integers: tests and callers can build problems without tensors or a GPU.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .platform import Platform


@dataclass(frozen=True)
class Problem:
    op: str
    platform: Platform


@dataclass(frozen=True)
class CacheLayout:
    """A paged cache: ``[num_blocks, block_size, entry]`` with element strides."""

    kv_format: str  # canonical: bfloat16 | float16 | fp8 | fp8_ds_mla
    cache_dtype: torch.dtype  # storage dtype of the tensor
    num_blocks: int
    block_size: int
    entry: int
    page_stride: int  # elements between blocks
    token_stride: int  # elements between tokens of one block
    kv_lora_rank: int = 512
    rope_dim: int = 64

    @property
    def contiguous(self) -> bool:
        return self.token_stride == self.entry and self.page_stride == self.block_size * self.entry


@dataclass(frozen=True)
class DecodeProblem(Problem):
    q_dtype: torch.dtype
    cache: CacheLayout
    num_tokens: int
    num_seqs: int
    num_heads: int
    max_blocks_per_seq: int
    max_query_len: int  # exact when known on the host, else an upper bound from shapes
    return_lse: bool
    capturing: bool  # inside CUDA-graph capture or torch.compile tracing


@dataclass(frozen=True)
class CacheWriteProblem(Problem):
    src_dtype: torch.dtype
    cache: CacheLayout
    num_tokens: int
    capturing: bool


@dataclass(frozen=True)
class GatherProblem(Problem):
    cache: CacheLayout
    out_dtype: torch.dtype
    num_seqs: int
    max_blocks_per_seq: int
    chunked: bool  # seq_starts given
    capturing: bool


@dataclass(frozen=True)
class MergeProblem(Problem):
    dtype: torch.dtype
    num_tokens: int
    num_heads: int
    head_dim: int
    capturing: bool


@dataclass(frozen=True)
class PrefillProblem(Problem):
    dtype: torch.dtype
    num_seqs: int
    num_heads: int
    num_kv_heads: int
    qk_head_dim: int
    v_head_dim: int
    max_seqlen_q: int
    max_seqlen_k: int
    causal: bool
    return_lse: bool
    capturing: bool


OPS = ("mla_decode", "concat_and_cache_mla", "gather_cache", "merge_attn_states",
       "mla_prefill_attention")
