"""``mla_prefill_attention``: varlen causal flash attention with qk head dim != v head dim.

Grid ``(query tiles, heads, sequences)``; GQA maps query head ``h`` to key head
``h // (H / Hk)``. Causal aligns the last query with the last key (query ``i`` sees keys
``j <= i + sk - sq``); a query that sees no key writes out 0 and lse ``-inf``.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .common import dot, softmax_step
from .launch import interpreting, prefill_config

LOG2E = 1.4426950408889634
LN2 = tl.constexpr(0.6931471805599453)


@triton.jit
def _prefill_kernel(
    q_ptr, stride_qt, stride_qh, k_ptr, stride_kt, stride_kh, v_ptr, stride_vt, stride_vh,
    cuq_ptr, cuk_ptr, o_ptr, stride_ot, stride_oh, lse_ptr, stride_lt, stride_lh,
    qk_scale, GROUP,
    DQK: tl.constexpr, DV: tl.constexpr, BLOCK_DQK: tl.constexpr, BLOCK_DV: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr,
    WRITE_LSE: tl.constexpr, UPCAST: tl.constexpr,
):
    mt = tl.program_id(0)
    h = tl.program_id(1)
    b = tl.program_id(2)
    q0 = tl.load(cuq_ptr + b)
    sq = tl.load(cuq_ptr + b + 1) - q0
    k0 = tl.load(cuk_ptr + b)
    sk = tl.load(cuk_ptr + b + 1) - k0
    if mt * BLOCK_M >= sq:
        return
    i = mt * BLOCK_M + tl.arange(0, BLOCK_M)
    iok = i < sq
    kh = (h // GROUP).to(tl.int64)
    dq = tl.arange(0, BLOCK_DQK)
    dv = tl.arange(0, BLOCK_DV)
    qrow = (q0 + i).to(tl.int64)
    q = tl.load(q_ptr + qrow[:, None] * stride_qt + h * stride_qh + dq[None, :],
                mask=iok[:, None] & (dq < DQK)[None, :], other=0.0)
    hi = sk
    if CAUSAL:
        hi = tl.minimum(sk, mt * BLOCK_M + BLOCK_M + sk - sq)
    m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    l_i = tl.zeros((BLOCK_M,), tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_DV), tl.float32)
    for start in range(0, hi, BLOCK_N):
        j = start + tl.arange(0, BLOCK_N)
        jok = j < hi
        krow = (k0 + j).to(tl.int64)
        k = tl.load(k_ptr + krow[:, None] * stride_kt + kh * stride_kh + dq[None, :],
                    mask=jok[:, None] & (dq < DQK)[None, :], other=0.0)
        s = dot(q, tl.trans(k), tl.zeros((BLOCK_M, BLOCK_N), tl.float32), UPCAST) * qk_scale
        vis = jok[None, :]
        if CAUSAL:
            vis = vis & (j[None, :] <= (i + sk - sq)[:, None])
        p, alpha, m_new, l_i = softmax_step(s, vis, m_i, l_i)
        v = tl.load(v_ptr + krow[:, None] * stride_vt + kh * stride_vh + dv[None, :],
                    mask=jok[:, None] & (dv < DV)[None, :], other=0.0)
        acc = dot(p.to(v.dtype), v, acc * alpha[:, None], UPCAST)
        m_i = m_new
    seen = l_i > 0
    out = acc / tl.where(seen, l_i, 1.0)[:, None]
    tl.store(o_ptr + qrow[:, None] * stride_ot + h * stride_oh + dv[None, :],
             out.to(o_ptr.dtype.element_ty), mask=iok[:, None] & (dv < DV)[None, :])
    if WRITE_LSE:
        lse = tl.where(seen, (tl.where(seen, m_i, 0.0) + tl.log2(tl.where(seen, l_i, 1.0))) * LN2,
                       float("-inf"))
        tl.store(lse_ptr + qrow * stride_lt + h * stride_lh, lse, mask=iok)


def mla_prefill_attention(p, q, k, v, cu_seqlens_q, cu_seqlens_k, softmax_scale, causal, out,
                          lse) -> None:
    if p.num_seqs <= 0 or q.shape[0] == 0 or p.max_seqlen_q == 0:
        return
    cfg = prefill_config(p.platform, p.qk_head_dim, p.v_head_dim)
    grid = (triton.cdiv(p.max_seqlen_q, cfg.block_m), p.num_heads, p.num_seqs)
    lse_t = lse if lse is not None else out
    _prefill_kernel[grid](
        q, q.stride(0), q.stride(1), k, k.stride(0), k.stride(1), v, v.stride(0), v.stride(1),
        cu_seqlens_q, cu_seqlens_k, out, out.stride(0), out.stride(1),
        lse_t, lse_t.stride(0), lse_t.stride(1),
        float(softmax_scale) * LOG2E, p.num_heads // p.num_kv_heads,
        DQK=p.qk_head_dim, DV=p.v_head_dim,
        BLOCK_DQK=max(16, triton.next_power_of_2(p.qk_head_dim)),
        BLOCK_DV=max(16, triton.next_power_of_2(p.v_head_dim)),
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, CAUSAL=bool(causal), WRITE_LSE=lse is not None,
        UPCAST=interpreting(), num_warps=cfg.num_warps, num_stages=cfg.num_stages)
