"""The public ops. Each validates its inputs, describes the call as a problem, and runs
one ``torch.library`` custom op whose body picks the backend (so the ops work under
``torch.compile(fullgraph=True)`` and inside CUDA-graph capture).
"""

from __future__ import annotations

import math

import torch

from . import validate as V
from .dispatch import select
from .kv_formats import canonical_format, value_width
from .platform import current_platform, is_capturing, is_tracing
from .problems import (
    CacheWriteProblem,
    DecodeProblem,
    GatherProblem,
    MergeProblem,
    PrefillProblem,
)

MODEL_DTYPES = (torch.bfloat16, torch.float16)
FLOAT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
Tensor = torch.Tensor


def _capturing(device) -> bool:
    return is_tracing() or is_capturing(device)


def _traced_scale(scale, kv_cache_dtype: str, device):
    """The k_scale tensor while tracing (no validation: the op body validates at run time)."""
    if scale is None or isinstance(scale, torch.Tensor):
        return None if scale is None else scale.reshape(1).to(torch.float32)
    return torch.full((1,), float(scale), dtype=torch.float32, device=device)


def _describe(**kw) -> str:
    return ", ".join(f"{k}={v}" for k, v in kw.items())


# =============================================================== concat_and_cache_mla


def _cache_write_problem(kv_c, kv_cache, kv_cache_dtype, rope_dim):
    platform = current_platform(kv_cache.device)
    layout = V.cache_layout(kv_cache, kv_cache_dtype, platform, kv_c.shape[1], rope_dim)
    return CacheWriteProblem("concat_and_cache_mla", platform, kv_c.dtype, layout, kv_c.shape[0],
                             _capturing(kv_cache.device))


@torch.library.custom_op("portmla::concat_and_cache_mla", mutates_args=("kv_cache",))
def _concat_and_cache_op(kv_c: Tensor, k_pe: Tensor, kv_cache: Tensor, slot_mapping: Tensor,
                         scale: Tensor | None, kv_cache_dtype: str, backend: str) -> None:
    p = _cache_write_problem(kv_c, kv_cache, kv_cache_dtype, k_pe.shape[-1])
    scale = V.k_scale_tensor("scale", scale, p.cache.kv_format, kv_cache.device)
    b = select(p, backend, _describe(kv_cache_dtype=p.cache.kv_format, block_size=p.cache.block_size))
    b.concat_and_cache_mla(p, kv_c, k_pe.reshape(k_pe.shape[0], -1), kv_cache, slot_mapping, scale)


@_concat_and_cache_op.register_fake
def _(kv_c, k_pe, kv_cache, slot_mapping, scale, kv_cache_dtype, backend):
    return None


def concat_and_cache_mla(kv_c, k_pe, kv_cache, slot_mapping, kv_cache_dtype="auto", scale=None,
                         *, backend="auto") -> None:
    """Write ``T`` new tokens into the paged cache.

    kv_c ``[T, L]`` and k_pe ``[T, R]`` or ``[T, 1, R]`` (bf16 / fp16 / fp32, last dim
    contiguous); slot_mapping ``[T]`` int32/int64, slot = block * block_size + offset,
    ``-1`` skips the token. ``scale``: the per-tensor k_scale for ``"fp8"``
    (stored = saturate(value / scale)); ignored for other formats (fp8_ds_mla computes
    per-tile scales itself). See the reference backend for the exact semantics.
    """
    if is_tracing():  # torch.compile: checks and dispatch run inside the op, at run time
        torch.ops.portmla.concat_and_cache_mla(kv_c, k_pe, kv_cache, slot_mapping,
                                               _traced_scale(scale, kv_cache_dtype, kv_c.device),
                                               kv_cache_dtype, backend)
        return
    V.check_tensor("kv_c", kv_c, dtypes=FLOAT_DTYPES, ndim=2, last_contiguous=True)
    dev = kv_c.device
    t = kv_c.shape[0]
    V.check_tensor("k_pe", k_pe, dtypes=FLOAT_DTYPES, ndim=(2, 3), device=dev, last_contiguous=True)
    if k_pe.shape[0] != t or (k_pe.dim() == 3 and k_pe.shape[1] != 1):
        raise ValueError(f"k_pe.shape={tuple(k_pe.shape)} (expected [{t}, R] or [{t}, 1, R])")
    V.check_tensor("kv_cache", kv_cache, device=dev)
    V.check_tensor("slot_mapping", slot_mapping, dtypes=V.SLOT_DTYPES, ndim=1, shape=(t,), device=dev)
    p = _cache_write_problem(kv_c, kv_cache, kv_cache_dtype, k_pe.shape[-1])
    scale_t = V.k_scale_tensor("scale", scale, p.cache.kv_format, dev)
    if V.values_checkable(dev) and t:
        nslots = p.cache.num_blocks * p.cache.block_size
        bad = (slot_mapping < -1) | (slot_mapping >= nslots)
        V.fail_if(bad, lambda: f"slot_mapping[{V.first_bad(bad)}]={int(slot_mapping[V.first_bad(bad)])} "
                               f"(must be -1 or in [0, {nslots - 1}] for {p.cache.num_blocks} blocks "
                               f"of {p.cache.block_size})")
    # the op picks the backend before anything is written: an unsupported call leaves the cache
    torch.ops.portmla.concat_and_cache_mla(kv_c, k_pe, kv_cache, slot_mapping, scale_t,
                                           kv_cache_dtype, backend)


# ======================================================================= gather_cache


def _gather_problem(kv_cache, block_table, kv_cache_dtype, kv_lora_rank, out_dtype, chunked):
    platform = current_platform(kv_cache.device)
    layout = V.cache_layout(kv_cache, kv_cache_dtype, platform, kv_lora_rank, None)
    return GatherProblem("gather_cache", platform, layout, out_dtype, block_table.shape[0],
                         block_table.shape[1], chunked, _capturing(kv_cache.device))


@torch.library.custom_op("portmla::gather_cache", mutates_args=("out",))
def _gather_cache_op(kv_cache: Tensor, block_table: Tensor, seq_lens: Tensor,
                     seq_starts: Tensor | None, cu_seq_lens: Tensor, scale: Tensor | None,
                     out: Tensor, kv_cache_dtype: str, kv_lora_rank: int, backend: str) -> None:
    p = _gather_problem(kv_cache, block_table, kv_cache_dtype, kv_lora_rank, out.dtype,
                        seq_starts is not None)
    scale = V.k_scale_tensor("scale", scale, p.cache.kv_format, kv_cache.device)
    b = select(p, backend, _describe(kv_cache_dtype=p.cache.kv_format, block_size=p.cache.block_size))
    b.gather_cache(p, kv_cache, block_table, seq_lens, seq_starts, cu_seq_lens, scale, out)


@_gather_cache_op.register_fake
def _(kv_cache, block_table, seq_lens, seq_starts, cu_seq_lens, scale, out, kv_cache_dtype,
      kv_lora_rank, backend):
    return None


def gather_cache(kv_cache, block_table, seq_lens, *, kv_cache_dtype="auto", scale=None,
                 out_dtype=torch.bfloat16, seq_starts=None, backend="auto", kv_lora_rank=512,
                 total_tokens=None, out=None) -> Tensor:
    """Gather (and dequantize) cached tokens into a dense ``[sum(seq_lens), L + R]`` tensor.

    Sequence ``b`` contributes its tokens ``seq_starts[b] .. seq_starts[b] + seq_lens[b] - 1``
    (``seq_starts`` None = from 0), in order, packed one sequence after another.
    block_table ``[B, max_blocks]`` int32, seq_lens / seq_starts ``[B]`` int32.
    ``total_tokens`` (= sum(seq_lens)) avoids a host read of seq_lens, as needed inside
    graph capture; ``out`` may be given instead.
    """
    if is_tracing():
        if out is None and total_tokens is None:
            raise ValueError("gather_cache under torch.compile needs total_tokens or out "
                             "(the output size cannot be read from seq_lens while tracing)")
        width = value_width(canonical_format(kv_cache_dtype), kv_cache.shape[2], kv_lora_rank)
        if out is None:
            out = torch.empty(total_tokens, width, dtype=out_dtype, device=kv_cache.device)
        cu = torch.nn.functional.pad(torch.cumsum(seq_lens, 0, dtype=torch.int32), (1, 0))
        torch.ops.portmla.gather_cache(kv_cache, block_table, seq_lens, seq_starts, cu,
                                       _traced_scale(scale, kv_cache_dtype, kv_cache.device), out,
                                       kv_cache_dtype, kv_lora_rank, backend)
        return out
    V.check_tensor("kv_cache", kv_cache, ndim=3)
    dev = kv_cache.device
    V.check_tensor("block_table", block_table, dtypes=V.INDEX_DTYPES, ndim=2, device=dev)
    nseq = block_table.shape[0]
    V.check_tensor("seq_lens", seq_lens, dtypes=V.INDEX_DTYPES, ndim=1, shape=(nseq,), device=dev)
    if seq_starts is not None:
        V.check_tensor("seq_starts", seq_starts, dtypes=V.INDEX_DTYPES, ndim=1, shape=(nseq,), device=dev)
    if out_dtype not in FLOAT_DTYPES:
        raise TypeError(f"out_dtype={out_dtype} (supported: bfloat16, float16, float32)")
    p = _gather_problem(kv_cache, block_table, kv_cache_dtype, kv_lora_rank, out_dtype,
                        seq_starts is not None)
    width = p.cache.kv_lora_rank + p.cache.rope_dim
    scale_t = V.k_scale_tensor("scale", scale, p.cache.kv_format, dev)
    if V.values_checkable(dev):
        V.check_block_table_values(block_table, seq_lens, p.cache.block_size, p.cache.num_blocks,
                                   seq_starts)
    if out is not None:
        V.check_tensor("out", out, dtypes=(out_dtype,), ndim=2, shape=(None, width), device=dev,
                       contiguous=True)
        total_tokens = out.shape[0]
    cu = torch.zeros(nseq + 1, dtype=torch.int32, device=dev)
    torch.cumsum(seq_lens, 0, out=cu[1:])
    if total_tokens is None:
        total_tokens = int(cu[-1].item())
    elif V.values_checkable(dev) and int(cu[-1].item()) != total_tokens:
        raise ValueError(f"sum(seq_lens)={int(cu[-1].item())} but the output has {total_tokens} "
                         f"rows (total_tokens / out.shape[0] must equal sum(seq_lens))")
    if out is None:
        out = torch.empty(total_tokens, width, dtype=out_dtype, device=dev)
    torch.ops.portmla.gather_cache(kv_cache, block_table, seq_lens, seq_starts, cu, scale_t, out,
                                   kv_cache_dtype, p.cache.kv_lora_rank, backend)
    return out


# ========================================================================= mla_decode


def _decode_problem(q, kv_cache, block_table, kv_cache_dtype, kv_lora_rank, num_seqs,
                    max_query_len, return_lse):
    platform = current_platform(q.device)
    layout = V.cache_layout(kv_cache, kv_cache_dtype, platform, kv_lora_rank, q.shape[2] - kv_lora_rank)
    return DecodeProblem("mla_decode", platform, q.dtype, layout, q.shape[0], num_seqs, q.shape[1],
                         block_table.shape[1], max_query_len, return_lse, _capturing(q.device))


@torch.library.custom_op("portmla::mla_decode", mutates_args=("out", "lse"))
def _mla_decode_op(q: Tensor, kv_cache: Tensor, block_table: Tensor, seq_lens: Tensor,
                   query_start_loc: Tensor | None, k_scale: Tensor | None, out: Tensor,
                   lse: Tensor | None, softmax_scale: float, kv_lora_rank: int,
                   kv_cache_dtype: str, max_query_len: int, return_lse: bool, backend: str) -> None:
    p = _decode_problem(q, kv_cache, block_table, kv_cache_dtype, kv_lora_rank, seq_lens.shape[0],
                        max_query_len, return_lse)
    k_scale = V.k_scale_tensor("k_scale", k_scale, p.cache.kv_format, q.device)
    b = select(p, backend, _decode_describe(p))
    b.mla_decode(p, q, kv_cache, block_table, seq_lens, query_start_loc, softmax_scale, k_scale,
                 out, lse)


@_mla_decode_op.register_fake
def _(q, kv_cache, block_table, seq_lens, query_start_loc, k_scale, out, lse, softmax_scale,
      kv_lora_rank, kv_cache_dtype, max_query_len, return_lse, backend):
    return None


def _decode_describe(p: DecodeProblem) -> str:
    return _describe(q=f"[{p.num_tokens}, {p.num_heads}, {p.cache.kv_lora_rank + p.cache.rope_dim}]",
                     q_dtype=str(p.q_dtype).replace("torch.", ""), kv_cache_dtype=p.cache.kv_format,
                     block_size=p.cache.block_size, num_seqs=p.num_seqs,
                     max_query_len=p.max_query_len)


def mla_decode(q, kv_cache, block_table, seq_lens, *, softmax_scale, kv_lora_rank=512,
               kv_cache_dtype="auto", k_scale=None, query_start_loc=None, out=None,
               return_lse=False, backend="auto", max_query_len=None):
    """Absorbed MLA decode (MQA over the latent cache).

    q ``[T, H, L+R]`` bf16/fp16 = cat(ql_nope, q_pe) (a tuple ``(ql_nope, q_pe)`` is accepted);
    kv_cache ``[num_blocks, block_size, entry]`` (see ``portmla.kv_formats``);
    block_table ``[B, max_blocks]`` int32; seq_lens ``[B]`` int32, the KV length including
    this step's tokens; query_start_loc ``[B+1]`` int32 (None: one query token per sequence).
    Query token ``j`` of sequence ``b`` with ``n_b`` tokens attends to KV positions
    ``0 .. seq_lens[b] - n_b + j``. Returns out ``[T, H, L]`` in q's dtype, and with
    ``return_lse`` also lse ``[T, H]`` float32 (natural log).
    ``max_query_len`` (optional) is the largest ``n_b``; without it, it is read from
    query_start_loc, or bounded by ``T - B + 1`` inside graph capture / tracing.
    """
    if isinstance(q, (tuple, list)):
        if len(q) != 2:
            raise ValueError(f"q as a sequence has {len(q)} parts (expected (ql_nope, q_pe))")
        V.check_tensor("q[0] (ql_nope)", q[0], dtypes=MODEL_DTYPES, ndim=3)
        V.check_tensor("q[1] (q_pe)", q[1], dtypes=(q[0].dtype,), ndim=3, device=q[0].device,
                       shape=q[0].shape[:2])
        q = torch.cat([q[0], q[1]], dim=-1)
    if is_tracing():
        t, h = q.shape[0], q.shape[1]
        nseq = block_table.shape[0]
        mql = max_query_len if max_query_len is not None else (
            1 if query_start_loc is None else t - nseq + 1)
        if out is None:
            out = q.new_empty(t, h, kv_lora_rank)
        lse = q.new_empty(t, h, dtype=torch.float32) if return_lse else None
        torch.ops.portmla.mla_decode(q, kv_cache, block_table, seq_lens, query_start_loc,
                                     _traced_scale(k_scale, kv_cache_dtype, q.device), out, lse,
                                     float(softmax_scale), kv_lora_rank, kv_cache_dtype, mql,
                                     return_lse, backend)
        return (out, lse) if return_lse else out
    V.check_tensor("q", q, dtypes=MODEL_DTYPES, ndim=3, last_contiguous=True)
    dev = q.device
    t, h, d = q.shape
    V.check_tensor("kv_cache", kv_cache, device=dev)
    V.check_tensor("block_table", block_table, dtypes=V.INDEX_DTYPES, ndim=2, device=dev)
    nseq = block_table.shape[0]
    V.check_tensor("seq_lens", seq_lens, dtypes=V.INDEX_DTYPES, ndim=1, shape=(nseq,), device=dev)
    if not isinstance(kv_lora_rank, int) or not 0 < kv_lora_rank < d:
        raise ValueError(f"kv_lora_rank={kv_lora_rank!r} with q.shape[2]={d} "
                         f"(q's last dim is kv_lora_rank + rope_dim)")
    if isinstance(softmax_scale, bool) or not isinstance(softmax_scale, (int, float)) \
            or not math.isfinite(softmax_scale) or softmax_scale <= 0:
        raise ValueError(f"softmax_scale={softmax_scale!r} (must be a finite float > 0)")
    if query_start_loc is None:
        if t != nseq:
            raise ValueError(f"q.shape[0]={t} but block_table has {nseq} rows; without "
                             f"query_start_loc there is one query token per sequence")
    else:
        V.check_tensor("query_start_loc", query_start_loc, dtypes=V.INDEX_DTYPES, ndim=1,
                       shape=(nseq + 1,), device=dev)
    p = _decode_problem(q, kv_cache, block_table, kv_cache_dtype, kv_lora_rank, nseq, 1, return_lse)
    scale_t = V.k_scale_tensor("k_scale", k_scale, p.cache.kv_format, dev)
    if out is not None:
        V.check_tensor("out", out, dtypes=(q.dtype,), ndim=3, shape=(t, h, kv_lora_rank), device=dev,
                       last_contiguous=True)
    mql = _max_query_len(query_start_loc, seq_lens, block_table, p, t, nseq, max_query_len)
    if out is None:
        out = torch.empty(t, h, kv_lora_rank, dtype=q.dtype, device=dev)
    lse = torch.empty(t, h, dtype=torch.float32, device=dev) if return_lse else None
    torch.ops.portmla.mla_decode(q, kv_cache, block_table, seq_lens, query_start_loc, scale_t, out,
                                 lse, float(softmax_scale), kv_lora_rank, kv_cache_dtype, mql,
                                 return_lse, backend)
    return (out, lse) if return_lse else out


def _max_query_len(query_start_loc, seq_lens, block_table, p, t, nseq, given) -> int:
    """Check query_start_loc / seq_lens values (when readable) and return max_query_len."""
    dev = seq_lens.device
    if given is not None:
        if isinstance(given, bool) or not isinstance(given, int) or given < 1:
            raise ValueError(f"max_query_len={given!r} (must be an int >= 1)")
    if query_start_loc is None:
        mql = 1
    else:
        mql = given if given is not None else max(1, t - nseq + 1)
    if not V.values_checkable(dev):  # (inside graph capture: no kernel of the checks is captured)
        return mql
    qlens = torch.ones_like(seq_lens) if query_start_loc is None else query_start_loc[1:] - query_start_loc[:-1]
    if query_start_loc is not None:
        V.fail_if(query_start_loc[:1] != 0, lambda: f"query_start_loc[0]={int(query_start_loc[0])} (must be 0)")
        V.fail_if(query_start_loc[-1:] != t, lambda: f"query_start_loc[-1]={int(query_start_loc[-1])} "
                                                     f"(must equal q.shape[0]={t})")
        V.fail_if(qlens < 0, lambda: f"query_start_loc is not non-decreasing at "
                                     f"index {V.first_bad(qlens < 0) + 1}")
        real = int(qlens.max().item()) if nseq else 1
        if given is not None and real > given:
            raise ValueError(f"max_query_len={given} but query_start_loc has a sequence of "
                             f"{real} query tokens")
        mql = max(1, real) if given is None else given
    short = seq_lens < qlens
    V.fail_if(short, lambda: f"seq_lens[{V.first_bad(short)}]={int(seq_lens[V.first_bad(short)])} is "
                             f"less than its {int(qlens[V.first_bad(short)])} query tokens "
                             f"(seq_lens include this step's tokens)")
    V.check_block_table_values(block_table, seq_lens, p.cache.block_size, p.cache.num_blocks)
    return mql


# ================================================================== merge_attn_states


@torch.library.custom_op("portmla::merge_attn_states", mutates_args=("out", "out_lse"))
def _merge_op(prefix_out: Tensor, prefix_lse: Tensor, suffix_out: Tensor, suffix_lse: Tensor,
              out: Tensor, out_lse: Tensor, backend: str) -> None:
    p = MergeProblem("merge_attn_states", current_platform(out.device), prefix_out.dtype,
                     prefix_out.shape[0], prefix_out.shape[1], prefix_out.shape[2],
                     _capturing(out.device))
    select(p, backend).merge_attn_states(p, prefix_out, prefix_lse, suffix_out, suffix_lse, out,
                                         out_lse)


@_merge_op.register_fake
def _(prefix_out, prefix_lse, suffix_out, suffix_lse, out, out_lse, backend):
    return None


def merge_attn_states(prefix_out, prefix_lse, suffix_out, suffix_lse, *, out=None, backend="auto"):
    """Merge two attention results over disjoint key sets by their LSE.

    prefix_out / suffix_out ``[T, H, D]`` (same dtype), prefix_lse / suffix_lse ``[T, H]``
    float32 natural-log LSE. A side with LSE ``-inf`` (no keys) contributes nothing, even
    if its output holds garbage; both ``-inf`` gives out 0 and lse ``-inf``.
    Returns ``(out [T, H, D] in the inputs' dtype, lse [T, H] float32)``.
    """
    if is_tracing():
        out = torch.empty_like(prefix_out) if out is None else out
        out_lse = torch.empty_like(prefix_lse)
        torch.ops.portmla.merge_attn_states(prefix_out, prefix_lse, suffix_out, suffix_lse, out,
                                            out_lse, backend)
        return out, out_lse
    V.check_tensor("prefix_out", prefix_out, dtypes=FLOAT_DTYPES, ndim=3, last_contiguous=True)
    dev = prefix_out.device
    t, h, d = prefix_out.shape
    V.check_tensor("suffix_out", suffix_out, dtypes=(prefix_out.dtype,), ndim=3, shape=(t, h, d),
                   device=dev, last_contiguous=True)
    for name, x in (("prefix_lse", prefix_lse), ("suffix_lse", suffix_lse)):
        V.check_tensor(name, x, dtypes=(torch.float32,), ndim=2, shape=(t, h), device=dev)
    if out is not None:
        V.check_tensor("out", out, dtypes=(prefix_out.dtype,), ndim=3, shape=(t, h, d), device=dev,
                       last_contiguous=True)
    else:
        out = torch.empty_like(prefix_out)
    out_lse = torch.empty(t, h, dtype=torch.float32, device=dev)
    torch.ops.portmla.merge_attn_states(prefix_out, prefix_lse, suffix_out, suffix_lse, out, out_lse,
                                        backend)
    return out, out_lse


# ============================================================== mla_prefill_attention


@torch.library.custom_op("portmla::mla_prefill_attention", mutates_args=("out", "lse"))
def _prefill_op(q: Tensor, k: Tensor, v: Tensor, cu_seqlens_q: Tensor, cu_seqlens_k: Tensor,
                out: Tensor, lse: Tensor | None, max_seqlen_q: int, max_seqlen_k: int,
                softmax_scale: float, causal: bool, backend: str) -> None:
    p = _prefill_problem(q, k, v, cu_seqlens_q, max_seqlen_q, max_seqlen_k, causal, lse is not None)
    select(p, backend).mla_prefill_attention(p, q, k, v, cu_seqlens_q, cu_seqlens_k, softmax_scale,
                                             causal, out, lse)


@_prefill_op.register_fake
def _(q, k, v, cu_seqlens_q, cu_seqlens_k, out, lse, max_seqlen_q, max_seqlen_k, softmax_scale,
      causal, backend):
    return None


def _prefill_problem(q, k, v, cu_q, max_q, max_k, causal, return_lse):
    return PrefillProblem("mla_prefill_attention", current_platform(q.device), q.dtype,
                          cu_q.shape[0] - 1, q.shape[1], k.shape[1], q.shape[2], v.shape[2],
                          max_q, max_k, causal, return_lse, _capturing(q.device))


def mla_prefill_attention(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, *,
                          softmax_scale, causal=True, return_lse=False, backend="auto", out=None):
    """Varlen MHA with qk head dim != v head dim (DeepSeek: 192 / 128).

    q ``[Tq, H, Dqk]``, k ``[Tk, Hk, Dqk]``, v ``[Tk, Hk, Dv]`` (bf16/fp16/fp32; ``H % Hk == 0``);
    cu_seqlens_q / cu_seqlens_k ``[B+1]`` int32. With ``causal``, the last query of a
    sequence is aligned with its last key (query i sees keys ``j <= i + sk - sq``); a
    query that sees no key gets out 0 and lse ``-inf``. Returns out ``[Tq, H, Dv]`` and,
    with ``return_lse``, lse ``[Tq, H]`` float32.
    """
    if is_tracing():
        out = q.new_empty(q.shape[0], q.shape[1], v.shape[2]) if out is None else out
        lse = q.new_empty(q.shape[0], q.shape[1], dtype=torch.float32) if return_lse else None
        torch.ops.portmla.mla_prefill_attention(q, k, v, cu_seqlens_q, cu_seqlens_k, out, lse,
                                                max_seqlen_q, max_seqlen_k, float(softmax_scale),
                                                bool(causal), backend)
        return (out, lse) if return_lse else out
    V.check_tensor("q", q, dtypes=FLOAT_DTYPES, ndim=3, last_contiguous=True)
    dev = q.device
    V.check_tensor("k", k, dtypes=(q.dtype,), ndim=3, shape=(None, None, q.shape[2]), device=dev,
                   last_contiguous=True)
    V.check_tensor("v", v, dtypes=(q.dtype,), ndim=3, shape=(k.shape[0], k.shape[1]), device=dev,
                   last_contiguous=True)
    if k.shape[1] < 1 or q.shape[1] % k.shape[1]:
        raise ValueError(f"q has {q.shape[1]} heads and k has {k.shape[1]} "
                         f"(q heads must be a multiple of k heads)")
    V.check_tensor("cu_seqlens_q", cu_seqlens_q, dtypes=V.INDEX_DTYPES, ndim=1, device=dev)
    nseq = cu_seqlens_q.shape[0] - 1
    V.check_tensor("cu_seqlens_k", cu_seqlens_k, dtypes=V.INDEX_DTYPES, ndim=1, shape=(nseq + 1,),
                   device=dev)
    if isinstance(softmax_scale, bool) or not isinstance(softmax_scale, (int, float)) \
            or not math.isfinite(softmax_scale) or softmax_scale <= 0:
        raise ValueError(f"softmax_scale={softmax_scale!r} (must be a finite float > 0)")
    for name, val in (("max_seqlen_q", max_seqlen_q), ("max_seqlen_k", max_seqlen_k)):
        if isinstance(val, bool) or not isinstance(val, int) or val < 0:
            raise ValueError(f"{name}={val!r} (must be an int >= 0)")
    if V.values_checkable(dev) and nseq >= 0:
        for name, cu, total, mx in (("cu_seqlens_q", cu_seqlens_q, q.shape[0], max_seqlen_q),
                                    ("cu_seqlens_k", cu_seqlens_k, k.shape[0], max_seqlen_k)):
            lens = cu[1:] - cu[:-1]
            V.fail_if(cu[:1] != 0, lambda name=name, cu=cu: f"{name}[0]={int(cu[0])} (must be 0)")
            V.fail_if(cu[-1:] != total, lambda name=name, cu=cu, total=total:
                      f"{name}[-1]={int(cu[-1])} (must equal the token count {total})")
            V.fail_if(lens < 0, lambda name=name, lens=lens:
                      f"{name} decreases at index {V.first_bad(lens < 0) + 1}")
            V.fail_if(lens > mx, lambda name=name, lens=lens, mx=mx:
                      f"a sequence of {int(lens.max())} tokens in {name} exceeds max_seqlen={mx}")
    t, h = q.shape[0], q.shape[1]
    if out is not None:
        V.check_tensor("out", out, dtypes=(q.dtype,), ndim=3, shape=(t, h, v.shape[2]), device=dev,
                       last_contiguous=True)
    else:
        out = torch.empty(t, h, v.shape[2], dtype=q.dtype, device=dev)
    lse = torch.empty(t, h, dtype=torch.float32, device=dev) if return_lse else None
    torch.ops.portmla.mla_prefill_attention(q, k, v, cu_seqlens_q, cu_seqlens_k, out, lse,
                                            max_seqlen_q, max_seqlen_k, float(softmax_scale),
                                            bool(causal), backend)
    return (out, lse) if return_lse else out
