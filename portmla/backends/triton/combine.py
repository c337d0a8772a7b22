"""Merging the float32 partial outputs of a split decode by their LSE (fixed order: deterministic).

Two layouts, one merge (``merge_partials``):

* ``_combine_kernel``: the host-planned splits, ``[num_splits, T, H, L]`` partials and
  ``[num_splits, T, H]`` LSEs; every (token, head) row has ``num_splits`` of them.
* ``_combine_pieces_kernel``: the device schedule's pieces (``schedule.py``), slots of
  ``slot_rows`` rows (``[slots, slot_rows, L]`` / ``[slots, slot_rows]``, row ``i`` of a
  sequence = its token ``i // H``, head ``i % H``); sequence ``b`` has ``piece[2 b + 1]``
  consecutive slots from ``piece[2 b]``. Only the sequences of the schedule's cut list are
  visited (its grid is ``max_cuts(B, parts)`` entries, not ``B`` sequences); one-piece
  sequences were written by the decode kernel.

A partial whose LSE is ``-inf`` (a split or piece that saw no position of that row) is not
read, so its output rows may hold anything.
"""

from __future__ import annotations

import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_wait

from .common import seq_tokens


@triton.jit
def merge_partials(l_base, o_base, stride_l, stride_o, n, r_ok, d_ok,
                   BLOCK_R: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr):
    """``(out, lse)`` of ``n`` partials: row ``r``'s LSE of partial ``s`` at
    ``l_base[r] + s stride_l``, its outputs at ``o_base[r, :] + s stride_o``. ``BLOCK_S``
    partials are read as one tile per step (the LSEs as one ``[BLOCK_R, BLOCK_S]`` load, the
    outputs as one ``[BLOCK_R, BLOCK_S, BLOCK_D]`` tile), so many partials cost two memory
    round trips per ``BLOCK_S`` of them, not two per partial."""
    sp = tl.arange(0, BLOCK_S)
    m = tl.full((BLOCK_R,), float("-inf"), tl.float32)
    for s0 in range(0, n, BLOCK_S):
        s = s0 + sp
        s_ok = r_ok[:, None] & (s < n)[None, :]
        ls = tl.load(l_base[:, None] + s.to(tl.int64)[None, :] * stride_l, mask=s_ok, other=float("-inf"))
        m = tl.maximum(m, tl.max(ls, 1))
    m_use = tl.where(m == float("-inf"), 0.0, m)
    den = tl.zeros((BLOCK_R,), tl.float32)
    acc = tl.zeros((BLOCK_R, BLOCK_D), tl.float32)
    for s0 in range(0, n, BLOCK_S):
        s = s0 + sp
        s_ok = r_ok[:, None] & (s < n)[None, :]
        s64 = s.to(tl.int64)
        ls = tl.load(l_base[:, None] + s64[None, :] * stride_l, mask=s_ok, other=float("-inf"))
        w = tl.exp(ls - m_use[:, None])  # [BLOCK_R, BLOCK_S]; 0 for empty partials
        used = w > 0
        po = tl.load(o_base[:, None, :] + s64[None, :, None] * stride_o,
                     mask=used[:, :, None] & d_ok[None, None, :], other=0.0)
        acc += tl.sum(tl.where(used[:, :, None], po * w[:, :, None], 0.0), 1)
        den += tl.sum(w, 1)
    seen = den > 0
    out = acc / tl.where(seen, den, 1.0)[:, None]
    return out, tl.where(seen, m_use + tl.log(tl.where(seen, den, 1.0)), float("-inf"))


@triton.jit
def _combine_kernel(
    po_ptr, stride_ps, stride_pt, stride_ph,
    pl_ptr, stride_pls, stride_plt,
    o_ptr, stride_ot, stride_oh,
    lse_ptr, stride_lt,
    H, NUM_SPLITS,
    L: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr,
    WRITE_LSE: tl.constexpr,
):
    """One program per (token, BLOCK_H heads, BLOCK_D columns) of the host-planned splits."""
    t = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    d = tl.program_id(2) * BLOCK_D + tl.arange(0, BLOCK_D)
    h_ok = h < H
    d_ok = d < L
    out, lse = merge_partials(pl_ptr + t * stride_plt + h,
                              po_ptr + t * stride_pt + h.to(tl.int64)[:, None] * stride_ph + d[None, :],
                              stride_pls, stride_ps, NUM_SPLITS, h_ok, d_ok, BLOCK_H, BLOCK_S, BLOCK_D)
    tl.store(o_ptr + t * stride_ot + h.to(tl.int64)[:, None] * stride_oh + d[None, :],
             out.to(o_ptr.dtype.element_ty), mask=h_ok[:, None] & d_ok[None, :])
    if WRITE_LSE:
        if tl.program_id(2) == 0:
            tl.store(lse_ptr + t * stride_lt + h, lse, mask=h_ok)


@triton.jit
def _combine_pieces_kernel(
    po_ptr, pl_ptr, slot_rows, piece_ptr, cut_ptr, qsl_ptr,
    o_ptr, stride_ot, stride_oh,
    lse_ptr, stride_lt,
    H,
    L: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr,
    HAS_QSL: tl.constexpr, WRITE_LSE: tl.constexpr, PDL: tl.constexpr = False,
):
    """One program per (BLOCK_R rows, cut-list entry, BLOCK_D columns); entries past the
    list's count (``cut[0]``) exit at once. Entry ``k`` merges sequence ``cut[1 + k]``, whose
    pieces sit in consecutive slots, in slot order. (The row blocks, a host bound of
    ``max_query_len * H / BLOCK_R``, go on the grid axis without the 65535 limit.)

    With ``PDL`` the program reads the schedule (``cut``, ``piece``) and ``query_start_loc``
    before it waits for the decode grid: the schedule kernel finished before this grid could
    launch (every decode program waits for it before it lets this grid launch), so only the
    partials need the wait. Those reads skip L1 (``.cg``)."""
    k = tl.program_id(1)
    if k < tl.load(cut_ptr, cache_modifier=".cg"):
        b = tl.load(cut_ptr + 1 + k, cache_modifier=".cg")
        pieces = tl.load(piece_ptr + 2 * b.to(tl.int64) + 1, cache_modifier=".cg")
        first = tl.load(piece_ptr + 2 * b.to(tl.int64), cache_modifier=".cg")
        t0, n_q = seq_tokens(qsl_ptr, b, HAS_QSL)
        if PDL:  # launched early (programmatic dependent launch): the decode grid's partials from here
            gdc_wait()
        rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
        d = tl.program_id(2) * BLOCK_D + tl.arange(0, BLOCK_D)
        r_ok = rows < n_q * H
        d_ok = d < L
        stride_l = first.to(tl.int64) * 0 + slot_rows  # int64 even when slot_rows is specialised
        srow = first * stride_l + rows
        out, lse = merge_partials(pl_ptr + srow, po_ptr + srow[:, None] * L + d[None, :], stride_l,
                                  stride_l * L, pieces, r_ok, d_ok, BLOCK_R, BLOCK_S, BLOCK_D)
        t = (t0 + rows // H).to(tl.int64)
        head = (rows % H).to(tl.int64)
        tl.store(o_ptr + t[:, None] * stride_ot + head[:, None] * stride_oh + d[None, :],
                 out.to(o_ptr.dtype.element_ty), mask=r_ok[:, None] & d_ok[None, :])
        if WRITE_LSE:
            if tl.program_id(2) == 0:
                tl.store(lse_ptr + t * stride_lt + head, lse, mask=r_ok)


def combine_blocks(num_splits: int, num_heads: int, block_l: int):
    """(BLOCK_H, BLOCK_S, BLOCK_D) of the split combine. Up to 8 splits: one split per step
    over 4096-value head tiles (the earlier combine's tiles; reading all splits at once measured
    0.3-2 % slower on the 128-head rows, which have 2-8 splits). More splits: a tile of at most
    8192 float32 values (64 registers a thread at 4 warps) holding up to 64 of them."""
    if num_splits <= 8:
        return min(triton.next_power_of_2(num_heads), max(1, 4096 // block_l)), 1, block_l
    block_s = min(triton.next_power_of_2(num_splits), 64)
    block_d = min(block_l, max(64, 8192 // block_s))
    block_h = max(1, min(triton.next_power_of_2(num_heads), 8192 // (block_s * block_d)))
    return block_h, block_s, block_d


def pieces_combine_blocks(num_parts: int, num_seqs: int, slot_rows: int, block_l: int):
    """(BLOCK_R, BLOCK_S, BLOCK_D) of the pieces combine. The piece counts are device values;
    the host bound is about ``parts / seqs + 1`` pieces for a cut sequence when there are
    fewer sequences than parts.

    A batch of at most ``parts / 8`` sequences: a step as wide as that bound (up to 128
    pieces), so the merge takes one memory round trip, with the columns making up ~8192 values
    a program. H100 tile sweep (benchmarks/results/triton_h100_notes.md, session 14), bench
    medians, fixed lengths, bf16 / fp8, us: b=1 S=32768 h=128 (66 pieces) 45.7 / 51.1 at
    (1, 64, 128) -> 44.8 / 50.1 at (1, 128, 64); h=16 (132 / 264 pieces) 31.5 / 35.8 -> 28.0 /
    27.2; b=8 S=8192 h=128 (9-10 pieces) 68.8 / 81.6 at (1, 32, 256) -> 64.3 / 77.5 at
    (1, 16, 512); h=16 fp8 (34 pieces) stays at (1, 64, 128).

    More sequences: each cut sequence spans one or two part boundaries, so the tile is sized
    for ``2 cdiv(parts, seqs)`` pieces per step, in the split combine's tile shapes."""
    per_seq = triton.cdiv(num_parts, max(1, num_seqs))
    if num_seqs * 8 <= num_parts:
        block_s = min(128, triton.next_power_of_2(per_seq + 1))
        block_d = min(block_l, max(32, 8192 // block_s))
        return 1, block_s, block_d  # (2 rows of a 128-piece step hit a Triton 3.6 compiler assertion)
    return combine_blocks(max(2, min(num_parts, 2 * per_seq)), slot_rows, block_l)
