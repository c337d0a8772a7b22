"""``merge_attn_states``: LSE-weighted merge of two partial attentions over disjoint keys.

One program per (token, head tile). A side whose LSE is ``-inf`` has weight 0 and its
output is never read (it may hold NaN); both sides empty gives out 0 and lse ``-inf``.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .launch import elementwise_warps


@triton.jit
def _merge_kernel(
    po_ptr, stride_pot, stride_poh, pl_ptr, stride_plt, stride_plh,
    so_ptr, stride_sot, stride_soh, sl_ptr, stride_slt, stride_slh,
    o_ptr, stride_ot, stride_oh, ol_ptr, stride_olt, stride_olh,
    H, D: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr, WRITE_LSE: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    hm = h < H
    h64 = h.to(tl.int64)
    d = tl.arange(0, BLOCK_D)
    msk = hm[:, None] & (d < D)[None, :]
    pl = tl.load(pl_ptr + t * stride_plt + h64 * stride_plh, mask=hm, other=float("-inf"))
    sl = tl.load(sl_ptr + t * stride_slt + h64 * stride_slh, mask=hm, other=float("-inf"))
    m = tl.maximum(pl, sl)
    m = tl.where(m == float("-inf"), 0.0, m)
    wp = tl.exp(pl - m)
    ws = tl.exp(sl - m)
    total = wp + ws
    seen = total > 0
    den = tl.where(seen, total, 1.0)
    use_p = wp > 0
    use_s = ws > 0
    po = tl.load(po_ptr + t * stride_pot + h64[:, None] * stride_poh + d[None, :],
                 mask=msk & use_p[:, None], other=0.0).to(tl.float32)
    so = tl.load(so_ptr + t * stride_sot + h64[:, None] * stride_soh + d[None, :],
                 mask=msk & use_s[:, None], other=0.0).to(tl.float32)
    out = (tl.where(use_p[:, None], po * (wp / den)[:, None], 0.0)
           + tl.where(use_s[:, None], so * (ws / den)[:, None], 0.0))
    tl.store(o_ptr + t * stride_ot + h64[:, None] * stride_oh + d[None, :],
             out.to(o_ptr.dtype.element_ty), mask=msk)
    if WRITE_LSE:
        lse = m + tl.log(total)  # -inf when both sides are empty
        tl.store(ol_ptr + t * stride_olt + h64 * stride_olh, lse, mask=hm)


def merge_attn_states(p, prefix_out, prefix_lse, suffix_out, suffix_lse, out, out_lse) -> None:
    t, h, d = p.num_tokens, p.num_heads, p.head_dim
    if t == 0 or h == 0:
        return
    block_d = triton.next_power_of_2(max(d, 1))
    block_h = max(1, min(triton.next_power_of_2(h), 4096 // block_d))
    ol = out_lse if out_lse is not None else prefix_lse
    _merge_kernel[(t, triton.cdiv(h, block_h))](
        prefix_out, prefix_out.stride(0), prefix_out.stride(1),
        prefix_lse, prefix_lse.stride(0), prefix_lse.stride(1),
        suffix_out, suffix_out.stride(0), suffix_out.stride(1),
        suffix_lse, suffix_lse.stride(0), suffix_lse.stride(1),
        out, out.stride(0), out.stride(1), ol, ol.stride(0), ol.stride(1),
        h, D=d, BLOCK_H=block_h, BLOCK_D=block_d, WRITE_LSE=out_lse is not None,
        num_warps=elementwise_warps(p.platform))
