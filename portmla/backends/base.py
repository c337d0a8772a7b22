"""The backend base class: capabilities as data, ``reasons(problem)`` as checks.

A subclass states what it runs in class attributes and extends ``availability`` /
``reasons`` by calling ``super()`` and appending. It never replaces the base checks.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..platform import Platform
from ..problems import (
    OPS,
    CacheWriteProblem,
    DecodeProblem,
    GatherProblem,
    MergeProblem,
    PrefillProblem,
    Problem,
)
from ..reasons import Reason, allowed

ENGINE_BLOCK_SIZES = (1, 2, 4, 8, 16, 32, 64, 128, 256)
ALL_KV_FORMATS = ("bfloat16", "float16", "fp8", "fp8_ds_mla")


def _dtype_name(d: torch.dtype) -> str:
    return str(d).replace("torch.", "")


@dataclass(frozen=True)
class BackendInfo:
    name: str
    available: bool
    reasons: list[str]
    block_sizes: tuple[int, ...]
    kv_cache_dtypes: tuple[str, ...]
    max_query_len: int
    max_num_heads: int
    strided_kv: bool
    returns_lse: bool
    cuda_graphs: bool
    ops: tuple[str, ...] = ()
    # Which kernels serve which calls on this device (native backends), one line each.
    kernels: tuple[str, ...] = ()


class Backend:
    NAME = "base"
    PLATFORMS: tuple[str, ...] = ()
    OPS: tuple[str, ...] = OPS
    DTYPES: tuple[torch.dtype, ...] = (torch.bfloat16, torch.float16)
    KV_CACHE_DTYPES: tuple[str, ...] = ALL_KV_FORMATS
    BLOCK_SIZES: tuple[int, ...] | None = None  # None: any block size >= 1
    MAX_QUERY_LEN = 1 << 30
    MAX_NUM_HEADS = 1 << 30
    KV_LORA_RANKS: tuple[int, ...] | None = None  # None: any
    ROPE_DIMS: tuple[int, ...] | None = None
    MIN_CAPABILITY: tuple[int, int] | None = None
    STRIDED_KV = True
    RETURNS_LSE = True
    CUDA_GRAPHS = True
    PREFILL_HEAD_DIMS: tuple[int, ...] | None = None  # qk / v head dims, None: any
    # The backend's own decode tolerances against the reference, per KV format:
    # (relative error of out, max abs error of lse). Formats not listed: DEFAULT_DECODE_TOLERANCE.
    DECODE_TOLERANCE: dict[str, tuple[float, float]] = {}
    DEFAULT_DECODE_TOLERANCE = (1e-2, 1e-2)

    def decode_tolerance(self, kv_format: str) -> tuple[float, float]:
        return self.DECODE_TOLERANCE.get(kv_format, self.DEFAULT_DECODE_TOLERANCE)

    # ------------------------------------------------------------- availability

    def availability(self, platform: Platform) -> list[Reason]:
        """Why this backend cannot run at all on ``platform`` (hardware, toolchain, build)."""
        out = []
        if platform.kind not in self.PLATFORMS:
            out.append(allowed("platform", platform.kind, self.PLATFORMS))
        elif self.MIN_CAPABILITY is not None and (
                platform.capability is None or platform.capability < self.MIN_CAPABILITY):
            have = "none" if platform.capability is None else "{}.{}".format(*platform.capability)
            out.append(Reason("capability", f"capability={have} ({platform.arch}) "
                                            f"(needs >= {self.MIN_CAPABILITY[0]}.{self.MIN_CAPABILITY[1]})"))
        return out

    def reported_block_sizes(self, kv_format: str | None = None) -> tuple[int, ...]:
        sizes = self.BLOCK_SIZES
        return ENGINE_BLOCK_SIZES if sizes is None else tuple(s for s in ENGINE_BLOCK_SIZES if s in sizes)

    def kernels(self, platform: Platform) -> tuple[str, ...]:
        """Which kernels serve which calls on ``platform`` (for ``probe()`` / ``info``)."""
        return ()

    def info(self, platform: Platform) -> BackendInfo:
        why = [str(r) for r in self.availability(platform)]
        return BackendInfo(self.NAME, not why, why, self.reported_block_sizes(),
                           tuple(self.KV_CACHE_DTYPES), self.MAX_QUERY_LEN, self.MAX_NUM_HEADS,
                           self.STRIDED_KV, self.RETURNS_LSE, self.CUDA_GRAPHS, tuple(self.OPS),
                           self.kernels(platform) if not why else ())

    # ------------------------------------------------------------------ reasons

    def reasons(self, p: Problem) -> list[Reason]:
        out = self.availability(p.platform)
        if p.op not in self.OPS:
            out.append(allowed("op", p.op, self.OPS))
            return out
        if getattr(p, "capturing", False) and not self.CUDA_GRAPHS:
            out.append(Reason("cuda_graphs", "capturing=True (this backend reads tensor values "
                                             "on the host and cannot run inside graph capture "
                                             "or torch.compile tracing)"))
        if isinstance(p, DecodeProblem):
            out += self._dtype_reasons("q.dtype", p.q_dtype)
            out += self._cache_reasons(p.cache)
            if p.num_heads > self.MAX_NUM_HEADS:
                out.append(Reason("num_heads", f"num_heads={p.num_heads} (supported: 1..{self.MAX_NUM_HEADS})"))
            if p.max_query_len > self.MAX_QUERY_LEN:
                out.append(Reason("max_query_len", f"max_query_len={p.max_query_len} "
                                                   f"(supported: 1..{self.MAX_QUERY_LEN})"))
            if p.return_lse and not self.RETURNS_LSE:
                out.append(Reason("return_lse", "return_lse=True (supported: False)"))
        elif isinstance(p, CacheWriteProblem):
            out += self._dtype_reasons("kv_c.dtype", p.src_dtype)
            out += self._cache_reasons(p.cache)
        elif isinstance(p, GatherProblem):
            out += self._cache_reasons(p.cache)
            out += self._dtype_reasons("out_dtype", p.out_dtype)
        elif isinstance(p, MergeProblem):
            out += self._dtype_reasons("prefix_out.dtype", p.dtype)
        elif isinstance(p, PrefillProblem):
            out += self._dtype_reasons("q.dtype", p.dtype)
            if p.return_lse and not self.RETURNS_LSE:
                out.append(Reason("return_lse", "return_lse=True (supported: False)"))
            if self.PREFILL_HEAD_DIMS is not None:
                for name, v in (("qk_head_dim", p.qk_head_dim), ("v_head_dim", p.v_head_dim)):
                    if v not in self.PREFILL_HEAD_DIMS:
                        out.append(allowed(name, v, self.PREFILL_HEAD_DIMS))
        return out

    def supports(self, p: Problem) -> bool:
        return not self.reasons(p)

    def _dtype_reasons(self, name: str, dtype: torch.dtype) -> list[Reason]:
        return self._dtype_reasons_from(name, dtype, self.DTYPES)

    @staticmethod
    def _dtype_reasons_from(name: str, dtype: torch.dtype, supported) -> list[Reason]:
        if dtype in supported:
            return []
        return [allowed(name, _dtype_name(dtype), [_dtype_name(d) for d in supported])]

    def _cache_reasons(self, c) -> list[Reason]:
        out = []
        if c.kv_format not in self.KV_CACHE_DTYPES:
            out.append(allowed("kv_cache_dtype", c.kv_format, self.KV_CACHE_DTYPES))
        if self.BLOCK_SIZES is not None and c.block_size not in self.BLOCK_SIZES:
            out.append(allowed("block_size", c.block_size, self.BLOCK_SIZES))
        if self.KV_LORA_RANKS is not None and c.kv_lora_rank not in self.KV_LORA_RANKS:
            out.append(allowed("kv_lora_rank", c.kv_lora_rank, self.KV_LORA_RANKS))
        if self.ROPE_DIMS is not None and c.rope_dim not in self.ROPE_DIMS:
            out.append(allowed("rope_dim", c.rope_dim, self.ROPE_DIMS))
        if not self.STRIDED_KV and not c.contiguous:
            out.append(Reason("strided_kv", f"kv_cache strides=({c.page_stride}, {c.token_stride}, 1) "
                                            f"(supported: contiguous "
                                            f"({c.block_size * c.entry}, {c.entry}, 1))"))
        return out

    # ----------------------------------------------------------------- the ops
    # Each op writes its outputs into the tensors it is given; inputs were validated.

    def mla_decode(self, p: DecodeProblem, q, kv_cache, block_table, seq_lens, query_start_loc,
                   softmax_scale: float, k_scale, out, lse) -> None:
        raise NotImplementedError(f"{self.NAME}: mla_decode")

    def concat_and_cache_mla(self, p: CacheWriteProblem, kv_c, k_pe, kv_cache, slot_mapping,
                             scale) -> None:
        raise NotImplementedError(f"{self.NAME}: concat_and_cache_mla")

    def gather_cache(self, p: GatherProblem, kv_cache, block_table, seq_lens, seq_starts,
                     cu_seq_lens, scale, out) -> None:
        raise NotImplementedError(f"{self.NAME}: gather_cache")

    def merge_attn_states(self, p: MergeProblem, prefix_out, prefix_lse, suffix_out, suffix_lse,
                          out, out_lse) -> None:
        raise NotImplementedError(f"{self.NAME}: merge_attn_states")

    def mla_prefill_attention(self, p: PrefillProblem, q, k, v, cu_seqlens_q, cu_seqlens_k,
                              softmax_scale: float, causal: bool, out, lse) -> None:
        raise NotImplementedError(f"{self.NAME}: mla_prefill_attention")


class PlannedBackend(Backend):
    """A backend whose code has not landed yet: always unavailable, saying so."""

    WHY = "not implemented yet"

    def availability(self, platform: Platform) -> list[Reason]:
        return [Reason("not_implemented", f"{self.NAME}: {self.WHY}")] + super().availability(platform)
