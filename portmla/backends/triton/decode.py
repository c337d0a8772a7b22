"""Absorbed MLA decode: flash decoding over the paged latent cache, split two ways.

All query heads share the one latent KV head, so a program takes a tile of up to
``BLOCK_M`` query *rows* (a row is one (query token, head) pair of one sequence, row
``i`` = token ``i // H``, head ``i % H``) and streams each KV tile once for all of them:
``S = Q[:, :L] K_c^T + Q[:, L:] K_pe^T`` (576-wide for DeepSeek) and ``O += P K_c``
(512-wide) on the tensor cores. A tile of ``BLOCK_N`` tokens may span several pages:
each token's page comes from the block table. The attention of one row tile over one KV
range is shared code (``_attend`` / ``_ds_exact`` + ``_finish``); two kernels call it:

* ``_decode_kernel``, grid ``(row_tiles, num_splits, num_seqs)``: host-planned splits of
  ``kv_per_split`` positions (a shape-only bound from the longest sequence). The row tiles of
  one KV split are adjacent in launch order so they share the KV tile through L2. With one
  split it writes the final output; otherwise float32 partials + LSE that
  ``combine._combine_kernel`` merges in a fixed order (deterministic).
* ``_decode_sched_kernel``, grid ``(row_tiles, parts)``: persistent programs over the
  device-side balanced schedule of ``schedule.py`` (every part gets the same number of KV
  tiles whatever the lengths); a sequence that a part boundary cuts writes partials to its
  slots, merged by ``combine._combine_pieces_kernel``. ``DecodeConfig.scheduled`` picks it.

Quantized tiles (per-tensor fp8, the exact fp8_ds_mla path) are read twice by default, once
per GEMM; ``DecodeConfig.quant_read`` selects opt-in reads to time (``launch.QUANT_READS``):
one converted read, or the P @ V operand (and with "pairs_once" the QK^T one too) through the
cache's 16-bit view (``common.load_fp8_pairs``; ``_ds_pairs`` for fp8_ds_mla, where
"pairs_once_fold" also folds the per-KV-tile P @ V normaliser into the accumulator rescale).
"""

from __future__ import annotations

import dataclasses

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

from . import decode_gluon, decode_gluon_narrow
from .combine import _combine_kernel, _combine_pieces_kernel, combine_blocks, pieces_combine_blocks
from .common import (
    DS_TILE,
    dot,
    interleave_cols,
    load_ds_chunk,
    load_ds_scales,
    load_fp8_pairs,
    load_nope,
    load_rope,
    pow2_row_scale,
    seq_tokens,
    softmax_step,
    split_cols,
)
from .launch import (
    FMT_DS_MLA,
    FMT_FP8,
    QUANT_READS,
    decode_config,
    elementwise_warps,
    format_code,
    fp8_is_fnuz,
    interpreting,
    triton_tile,
    use_pdl,
)
from .schedule import first_seq, launch_schedule, max_cuts, num_slots, sched_scratch

LOG2E = 1.4426950408889634
LN2 = tl.constexpr(0.6931471805599453)


@triton.jit
def _seq_rows(seq_lens_ptr, qsl_ptr, b, tile, H, HAS_QSL: tl.constexpr, BLOCK_M: tl.constexpr):
    """Sequence ``b``'s rows in row tile ``tile``: ``(n_q, rows, t, head, row_ok, limit, kv_end)``
    with ``t`` the rows' query tokens (int64), ``limit`` the last KV position each row sees
    (causal over the new tokens) and ``kv_end`` the end of the KV range the tile needs."""
    seq_len = tl.load(seq_lens_ptr + b)
    t0, n_q = seq_tokens(qsl_ptr, b, HAS_QSL)
    rows = tile * BLOCK_M + tl.arange(0, BLOCK_M)
    tok = rows // H
    head = rows % H
    limit = seq_len - n_q + tok
    tok_last = tl.minimum(n_q - 1, (tile * BLOCK_M + BLOCK_M - 1) // H)
    return n_q, rows, (t0 + tok).to(tl.int64), head, tok < n_q, limit, seq_len - n_q + tok_last + 1


@triton.jit
def _decode_kernel(
    q_ptr, stride_qt, stride_qh,
    kv_ptr, kv32_ptr, kv16_ptr, stride_page, stride_tok,
    bt_ptr, stride_bt,
    seq_lens_ptr, qsl_ptr, kscale_ptr,
    o_ptr, stride_os, stride_ot, stride_oh,
    lse_ptr, stride_ls, stride_lt,
    H, kv_per_split, qk_scale,
    PAGE: tl.constexpr, FMT: tl.constexpr, FNUZ: tl.constexpr, ALIGNED: tl.constexpr,
    L: tl.constexpr, R: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_R: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_QSL: tl.constexpr, WRITE_LSE: tl.constexpr, UPCAST: tl.constexpr, EXACT_DS: tl.constexpr,
    QREAD: tl.constexpr, NV_PTX: tl.constexpr,
):
    tile = tl.program_id(0)
    split = tl.program_id(1)
    b = tl.program_id(2)
    n_q, rows, t, head, row_ok, limit, kv_end = _seq_rows(seq_lens_ptr, qsl_ptr, b, tile, H, HAS_QSL,
                                                          BLOCK_M)
    if tile * BLOCK_M >= n_q * H:
        return
    kv_lo = split * kv_per_split
    kv_hi = tl.minimum(kv_end, kv_lo + kv_per_split)
    o_rows = o_ptr + split.to(tl.int64) * stride_os + t * stride_ot + head.to(tl.int64) * stride_oh
    l_rows = lse_ptr + split.to(tl.int64) * stride_ls + t * stride_lt + head
    if kv_lo >= kv_hi:  # nothing to see in this split: only the LSE says so
        if WRITE_LSE:
            tl.store(l_rows, tl.full((BLOCK_M,), float("-inf"), tl.float32), mask=row_ok)
        return
    a0, a1, a2, a3, m_i, l_i = _attend_tile(
        q_ptr + t * stride_qt + head.to(tl.int64) * stride_qh, row_ok, kv_ptr, kv32_ptr, kv16_ptr, stride_page,
        stride_tok, bt_ptr + b.to(tl.int64) * stride_bt, kscale_ptr, kv_lo, kv_hi, limit, qk_scale, PAGE, FMT,
        FNUZ, ALIGNED, L, R, BLOCK_L, BLOCK_R, BLOCK_M, BLOCK_N, UPCAST, EXACT_DS, QREAD, NV_PTX)
    _finish(o_rows, l_rows, row_ok, a0, a1, a2, a3, m_i, l_i, L, BLOCK_L, WRITE_LSE, EXACT_DS)


@triton.jit
def _decode_sched_kernel(
    q_ptr, stride_qt, stride_qh,
    kv_ptr, kv32_ptr, kv16_ptr, stride_page, stride_tok,
    bt_ptr, stride_bt,
    seq_lens_ptr, qsl_ptr, kscale_ptr,
    cum_ptr, piece_ptr, num_seqs, sched_fixed,
    o_ptr, stride_ot, stride_oh,
    lse_ptr, stride_lt,
    po_ptr, pl_ptr, slot_rows,
    H, qk_scale,
    PAGE: tl.constexpr, FMT: tl.constexpr, FNUZ: tl.constexpr, ALIGNED: tl.constexpr,
    L: tl.constexpr, R: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_R: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_QSL: tl.constexpr, WRITE_LSE: tl.constexpr, UPCAST: tl.constexpr, EXACT_DS: tl.constexpr,
    QREAD: tl.constexpr, NV_PTX: tl.constexpr, PDL: tl.constexpr = False,
):
    """Program (row tile, part) computes units ``[part T, (part + 1) T)`` of the schedule
    (one unit = ``BLOCK_N`` KV positions): segment by segment, each a sequence and a range of
    its KV tiles. A one-piece sequence's segment writes the output (+ LSE); a piece of a cut
    sequence writes float32 partials + LSE (always) to its slot, rows ``[slot * slot_rows +
    i]`` for the sequence's row ``i``. The outer loop is a ``while`` over segments; the tile
    loop inside ``_attend`` / ``_ds_exact`` stays the one Triton software-pipelines."""
    if PDL:  # launched before the schedule kernel finished: wait for its writes; let the
        gdc_wait()  # pieces combine launch (it waits for this grid's writes in turn)
        gdc_launch_dependents()
    tile = tl.program_id(0)
    part = tl.program_id(1)
    per_part = tl.load(cum_ptr + num_seqs + 1)
    lo = part.to(tl.int64) * per_part
    hi = lo + per_part
    b = first_seq(cum_ptr, num_seqs, lo)
    c = tl.load(cum_ptr + b)
    while (b < num_seqs) & (c < hi):
        c_next = tl.load(cum_ptr + b + 1)
        first = c + sched_fixed  # unit of the sequence's KV tile 0
        u_lo = tl.maximum(lo - first, 0)
        u_hi = tl.minimum(hi - first, c_next - first)
        # a sequence with no KV tiles belongs to the part its fixed units start in
        if (u_lo < u_hi) | ((c_next == first) & (c >= lo)):
            n_q, rows, t, head, row_ok, limit, kv_end = _seq_rows(seq_lens_ptr, qsl_ptr, b, tile, H,
                                                                  HAS_QSL, BLOCK_M)
            if tile * BLOCK_M < n_q * H:
                a0, a1, a2, a3, m_i, l_i = _attend_tile(
                    q_ptr + t * stride_qt + head.to(tl.int64) * stride_qh, row_ok, kv_ptr, kv32_ptr, kv16_ptr,
                    stride_page, stride_tok, bt_ptr + b.to(tl.int64) * stride_bt, kscale_ptr,
                    (u_lo * BLOCK_N).to(tl.int32), tl.minimum(u_hi * BLOCK_N, kv_end).to(tl.int32), limit,
                    qk_scale, PAGE, FMT, FNUZ, ALIGNED, L, R, BLOCK_L, BLOCK_R, BLOCK_M, BLOCK_N, UPCAST, EXACT_DS,
                    QREAD, NV_PTX)
                base = tl.load(piece_ptr + 2 * b.to(tl.int64))
                if base >= 0:  # a piece of a cut sequence: float32 partials + LSE in its slot
                    srow = (base + part - (first // per_part).to(tl.int32)).to(tl.int64) * slot_rows + rows
                    _finish(po_ptr + srow * L, pl_ptr + srow, row_ok, a0, a1, a2, a3, m_i, l_i, L, BLOCK_L,
                            True, EXACT_DS)
                else:
                    _finish(o_ptr + t * stride_ot + head.to(tl.int64) * stride_oh, lse_ptr + t * stride_lt + head,
                            row_ok, a0, a1, a2, a3, m_i, l_i, L, BLOCK_L, WRITE_LSE, EXACT_DS)
        b += 1
        c = c_next


@triton.jit
def _attend_tile(q_rows, row_ok, kv_ptr, kv32_ptr, kv16_ptr, stride_page, stride_tok, bt_row, kscale_ptr,
                 kv_lo, kv_hi, limit, qk_scale, PAGE: tl.constexpr, FMT: tl.constexpr, FNUZ: tl.constexpr,
                 ALIGNED: tl.constexpr, L: tl.constexpr, R: tl.constexpr, BLOCK_L: tl.constexpr,
                 BLOCK_R: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, UPCAST: tl.constexpr,
                 EXACT_DS: tl.constexpr, QREAD: tl.constexpr, NV_PTX: tl.constexpr):
    """One row tile over KV positions ``[kv_lo, kv_hi)``: ``(a0, a1, a2, a3, m, l)`` for
    ``_finish`` (the exact fp8_ds_mla path's four 128-wide accumulators, or the one
    ``BLOCK_L``-wide accumulator of ``_attend`` in ``a0``, repeated). The callers store it
    after the loop (the scheduled kernel picks output or partial slot only then, so the
    store pointers are not live across the tile loop)."""
    if EXACT_DS and ALIGNED and (QREAD == "pairs" or QREAD == "pairs_once" or QREAD == "pairs_once_fold"):
        a0, a1, a2, a3, m_i, l_i = _ds_pairs(q_rows, row_ok, kv_ptr, kv32_ptr, kv16_ptr, stride_page, stride_tok,
                                             bt_row, kv_lo, kv_hi, limit, qk_scale, PAGE, L, R, BLOCK_R, BLOCK_M,
                                             BLOCK_N, UPCAST, QREAD != "pairs", QREAD == "pairs_once_fold", NV_PTX)
    elif EXACT_DS and QREAD == "once":
        a0, a1, a2, a3, m_i, l_i = _ds_once(q_rows, row_ok, kv_ptr, kv32_ptr, kv16_ptr, stride_page, stride_tok,
                                            bt_row, kv_lo, kv_hi, limit, qk_scale, ALIGNED, PAGE, L, R, BLOCK_R,
                                            BLOCK_M, BLOCK_N, UPCAST)
    elif EXACT_DS:
        a0, a1, a2, a3, m_i, l_i = _ds_exact(q_rows, row_ok, kv_ptr, kv32_ptr, kv16_ptr, stride_page, stride_tok,
                                             bt_row, kv_lo, kv_hi, limit, qk_scale, ALIGNED, PAGE, L, R, BLOCK_R,
                                             BLOCK_M, BLOCK_N, UPCAST)
    else:
        a0, m_i, l_i = _attend(q_rows, row_ok, kv_ptr, kv32_ptr, kv16_ptr, stride_page, stride_tok, bt_row,
                               kscale_ptr, kv_lo, kv_hi, limit, qk_scale, PAGE, FMT, FNUZ, ALIGNED, L, R,
                               BLOCK_L, BLOCK_R, BLOCK_M, BLOCK_N, UPCAST, QREAD, NV_PTX)
        a1 = a0
        a2 = a0
        a3 = a0
    return a0, a1, a2, a3, m_i, l_i


@triton.jit
def _attend(q_rows, row_ok, kv_ptr, kv32_ptr, kv16_ptr, stride_page, stride_tok, bt_row, kscale_ptr,
            kv_lo, kv_hi, limit, qk_scale, PAGE: tl.constexpr, FMT: tl.constexpr, FNUZ: tl.constexpr,
            ALIGNED: tl.constexpr, L: tl.constexpr, R: tl.constexpr, BLOCK_L: tl.constexpr,
            BLOCK_R: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, UPCAST: tl.constexpr,
            QREAD: tl.constexpr, NV_PTX: tl.constexpr):
    """Online softmax of one row tile over ``[kv_lo, kv_hi)`` for 16-bit, per-tensor fp8 and
    (dequantized) fp8_ds_mla caches: ``(acc, m, l)``, ``acc`` the unnormalised ``[BLOCK_M,
    BLOCK_L]`` output (times ``k_scale`` for fp8), ``m`` / ``l`` the base-2 running max / sum."""
    dl = tl.arange(0, BLOCK_L)
    dr = tl.arange(0, BLOCK_R)
    qn = tl.load(q_rows[:, None] + dl[None, :], mask=row_ok[:, None] & (dl < L)[None, :], other=0.0)
    qr = tl.load(q_rows[:, None] + L + dr[None, :], mask=row_ok[:, None] & (dr < R)[None, :],
                 other=0.0)
    scale = qk_scale
    if FMT == 1:
        # per-tensor fp8: fp16 dots (e4m3 -> fp16 is exact and one packed cvt per two values;
        # e4m3 -> bf16 needs a quarter-rate F2F per value on sm_90). Q rows are scaled by a
        # power of two into fp16 range (exact); 1/qs goes into the scores.
        amax = tl.maximum(tl.max(tl.abs(qn.to(tl.float32)), 1), tl.max(tl.abs(qr.to(tl.float32)), 1))
        qs, q_inv = pow2_row_scale(amax)
        qn = (qn.to(tl.float32) * qs[:, None]).to(tl.float16)
        qr = (qr.to(tl.float32) * qs[:, None]).to(tl.float16)
        ks = tl.load(kscale_ptr)
        scale = scale * ks

    # QREAD (fp8, aligned cache; ``DecodeConfig.quant_read``): "pairs" reads the P @ V operand
    # through the tile's 16-bit view, "pairs_once" (and "pairs_once_fold", which only changes
    # fp8_ds_mla) both operands from one such read; the even and odd columns go to two
    # half-width accumulators (interleaved after the loop)
    PAIRS: tl.constexpr = FMT == 1 and ALIGNED and (QREAD == "pairs" or QREAD == "pairs_once"
                                                    or QREAD == "pairs_once_fold")
    PAIRS_QK: tl.constexpr = PAIRS and QREAD != "pairs"
    if PAIRS_QK:
        q_e, q_o = split_cols(qn)
    m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    l_i = tl.zeros((BLOCK_M,), tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_L), tl.float32)
    acc_e = tl.zeros((BLOCK_M, BLOCK_L // 2), tl.float32)
    acc_o = tl.zeros((BLOCK_M, BLOCK_L // 2), tl.float32)
    for start in range(kv_lo, kv_hi, BLOCK_N):
        pos, ok, off = _tile_offsets(bt_row, start, kv_hi, stride_page, stride_tok, PAGE, BLOCK_N)
        kr = load_rope(kv_ptr, kv16_ptr, off, ok, FMT, FNUZ, ALIGNED, L, R, BLOCK_R, qn.dtype)
        if PAIRS_QK:
            v_e, v_o = load_fp8_pairs(kv16_ptr, off, ok, 0, BLOCK_L, L, FNUZ, "", NV_PTX)
            s = dot(q_e, tl.trans(v_e), tl.zeros((BLOCK_M, BLOCK_N), tl.float32), UPCAST)
            s = dot(q_o, tl.trans(v_o), s, UPCAST)
        else:
            if FMT == 0 or QREAD == "once":
                kn = load_nope(kv_ptr, kv32_ptr, off, ok, FMT, FNUZ, ALIGNED, L, BLOCK_L, BLOCK_N, qn.dtype, "")
                kv = kn
            else:
                # Quantized tiles are read twice (once per GEMM, the second read hits L2): a
                # single read converted for both operands keeps Triton from pipelining it.
                kn = load_nope(kv_ptr, kv32_ptr, off, ok, FMT, FNUZ, ALIGNED, L, BLOCK_L, BLOCK_N, qn.dtype,
                               "evict_last")
                if not PAIRS:
                    kv = load_nope(kv_ptr, kv32_ptr, off, ok, FMT, FNUZ, ALIGNED, L, BLOCK_L, BLOCK_N, qn.dtype,
                                   "evict_first")
            s = dot(qn, tl.trans(kn), tl.zeros((BLOCK_M, BLOCK_N), tl.float32), UPCAST)
        s = dot(qr, tl.trans(kr), s, UPCAST) * scale
        if FMT == 1:
            s = s * q_inv[:, None]  # undo Q's fp16 row scaling
        p, alpha, m_new, l_i = softmax_step(s, ok[None, :] & (pos[None, :] <= limit[:, None]),
                                            m_i, l_i)
        if PAIRS:
            if not PAIRS_QK:
                v_e, v_o = load_fp8_pairs(kv16_ptr, off, ok, 0, BLOCK_L, L, FNUZ, "evict_first", NV_PTX)
            acc_e = dot(p.to(tl.float16), v_e, acc_e * alpha[:, None], UPCAST)
            acc_o = dot(p.to(tl.float16), v_o, acc_o * alpha[:, None], UPCAST)
        else:
            acc = dot(p.to(kv.dtype), kv, acc * alpha[:, None], UPCAST)
        m_i = m_new
    if PAIRS:
        acc = interleave_cols(acc_e, acc_o)
    if FMT == 1:
        acc = acc * ks
    return acc, m_i, l_i


@triton.jit
def _finish(o_rows, l_rows, row_ok, a0, a1, a2, a3, m_i, l_i, L: tl.constexpr, BLOCK_L: tl.constexpr,
            WRITE_LSE: tl.constexpr, EXACT_DS: tl.constexpr):
    """Store ``acc / l`` of one row tile in ``o_rows``' dtype (``a0`` holds all ``BLOCK_L``
    columns, or, for the exact fp8_ds_mla path, ``a0 .. a3`` the four 128-wide tiles) and, if
    ``WRITE_LSE``, the natural-log LSE (``-inf`` for rows that saw nothing; their output 0)."""
    seen = l_i > 0
    inv_l = 1.0 / tl.where(seen, l_i, 1.0)
    if EXACT_DS:
        _store_cols(o_rows, a0, inv_l, row_ok, 0, DS_TILE, L)
        _store_cols(o_rows, a1, inv_l, row_ok, DS_TILE, DS_TILE, L)
        _store_cols(o_rows, a2, inv_l, row_ok, 2 * DS_TILE, DS_TILE, L)
        _store_cols(o_rows, a3, inv_l, row_ok, 3 * DS_TILE, DS_TILE, L)
    else:
        _store_cols(o_rows, a0, inv_l, row_ok, 0, BLOCK_L, L)
    if WRITE_LSE:
        lse = tl.where(seen, (tl.where(seen, m_i, 0.0) + tl.log2(tl.where(seen, l_i, 1.0))) * LN2,
                       float("-inf"))
        tl.store(l_rows, lse, mask=row_ok)


@triton.jit
def _store_cols(o_rows, acc, inv_l, row_ok, COL0: tl.constexpr, W: tl.constexpr, L: tl.constexpr):
    """Columns ``COL0 .. COL0 + W - 1`` (those below ``L``) of ``acc * inv_l`` to the rows."""
    d = COL0 + tl.arange(0, W)
    tl.store(o_rows[:, None] + d[None, :], (acc * inv_l[:, None]).to(o_rows.dtype.element_ty),
             mask=row_ok[:, None] & (d < L)[None, :])


@triton.jit
def _tile_offsets(bt_row, start, kv_hi, stride_page, stride_tok, PAGE: tl.constexpr, BLOCK_N: tl.constexpr):
    """(positions, in-range mask, 64-bit element offsets) of the KV tile at ``start``."""
    pos = start + tl.arange(0, BLOCK_N)
    ok = pos < kv_hi
    if PAGE % BLOCK_N == 0:  # the tile lies in one page: one table read, one base offset
        page = tl.load(bt_row + start // PAGE).to(tl.int64)
        off = page * stride_page + (start % PAGE + tl.arange(0, BLOCK_N)).to(tl.int64) * stride_tok
    else:
        page = tl.load(bt_row + pos // PAGE, mask=ok, other=0).to(tl.int64)
        off = page * stride_page + (pos % PAGE).to(tl.int64) * stride_tok
    return pos, ok, off


@triton.jit
def _ds_exact(q_rows, row_ok, kv_ptr, kv32_ptr, kv16_ptr, stride_page, stride_tok, bt_row, kv_lo, kv_hi, limit,
              qk_scale, ALIGNED: tl.constexpr, PAGE: tl.constexpr, L: tl.constexpr, R: tl.constexpr,
              BLOCK_R: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, UPCAST: tl.constexpr):
    """fp8_ds_mla attention of one row tile over ``[kv_lo, kv_hi)`` (``L <= 512``) without
    dequantizing the tile, ``(acc0, acc1, acc2, acc3, m, l)`` (one accumulator per scale tile):
    fp16 dots of the raw e4m3 values, one per 128-wide scale tile. QK^T: the four partial
    scores times the per-token tile scales (fp32), Q rows scaled by a power of two into fp16
    range (exact); RoPE dot in the query's dtype. PV: ``P * scale / max_scale`` (<= 1, fp16)
    per tile, the fp32 result times ``max_scale`` of the KV tile."""
    q0, q1, q2, q3, qr, q_inv = _ds_q(q_rows, row_ok, L, R, BLOCK_R)

    m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    l_i = tl.zeros((BLOCK_M,), tl.float32)
    acc0 = tl.zeros((BLOCK_M, DS_TILE), tl.float32)
    acc1 = tl.zeros((BLOCK_M, DS_TILE), tl.float32)
    acc2 = tl.zeros((BLOCK_M, DS_TILE), tl.float32)
    acc3 = tl.zeros((BLOCK_M, DS_TILE), tl.float32)
    zs = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    zo = tl.zeros((BLOCK_M, DS_TILE), tl.float32)
    for start in range(kv_lo, kv_hi, BLOCK_N):
        pos, ok, off = _tile_offsets(bt_row, start, kv_hi, stride_page, stride_tok, PAGE, BLOCK_N)
        kr = load_rope(kv_ptr, kv16_ptr, off, ok, 2, False, ALIGNED, L, R, BLOCK_R, qr.dtype)
        sc0, sc1, sc2, sc3 = _ds_scales(kv_ptr, kv32_ptr, off, ok, ALIGNED, L, BLOCK_N)
        # each tile is read twice, once per GEMM (the second read hits L2), so both are pipelined
        s = dot(q0, tl.trans(load_ds_chunk(kv_ptr, off, ok, 0, L, "evict_last")), zs, UPCAST) * sc0[None, :]
        s += dot(q1, tl.trans(load_ds_chunk(kv_ptr, off, ok, 1, L, "evict_last")), zs, UPCAST) * sc1[None, :]
        s += dot(q2, tl.trans(load_ds_chunk(kv_ptr, off, ok, 2, L, "evict_last")), zs, UPCAST) * sc2[None, :]
        s += dot(q3, tl.trans(load_ds_chunk(kv_ptr, off, ok, 3, L, "evict_last")), zs, UPCAST) * sc3[None, :]
        s = (s * q_inv[:, None] + dot(qr, tl.trans(kr), zs, UPCAST)) * qk_scale
        p, alpha, m_new, l_i = softmax_step(s, ok[None, :] & (pos[None, :] <= limit[:, None]),
                                            m_i, l_i)
        # a tile scale is >= FLT_MIN for every written token; 0 only for masked rows / absent tiles
        # (``_ds_pv_weight``'s math, written out: through the helper Triton 3.6 gives this loop
        # 3 KB more shared memory on sm_90)
        mx0 = tl.max(sc0, 0)
        mx1 = tl.max(sc1, 0)
        mx2 = tl.max(sc2, 0)
        mx3 = tl.max(sc3, 0)
        w0 = sc0 / tl.where(mx0 > 0, mx0, 1.0)
        w1 = sc1 / tl.where(mx1 > 0, mx1, 1.0)
        w2 = sc2 / tl.where(mx2 > 0, mx2, 1.0)
        w3 = sc3 / tl.where(mx3 > 0, mx3, 1.0)
        acc0 = acc0 * alpha[:, None] + dot((p * w0[None, :]).to(tl.float16),
                                           load_ds_chunk(kv_ptr, off, ok, 0, L, "evict_first"), zo, UPCAST) * mx0
        acc1 = acc1 * alpha[:, None] + dot((p * w1[None, :]).to(tl.float16),
                                           load_ds_chunk(kv_ptr, off, ok, 1, L, "evict_first"), zo, UPCAST) * mx1
        acc2 = acc2 * alpha[:, None] + dot((p * w2[None, :]).to(tl.float16),
                                           load_ds_chunk(kv_ptr, off, ok, 2, L, "evict_first"), zo, UPCAST) * mx2
        acc3 = acc3 * alpha[:, None] + dot((p * w3[None, :]).to(tl.float16),
                                           load_ds_chunk(kv_ptr, off, ok, 3, L, "evict_first"), zo, UPCAST) * mx3
        m_i = m_new

    return acc0, acc1, acc2, acc3, m_i, l_i


@triton.jit
def _ds_once(q_rows, row_ok, kv_ptr, kv32_ptr, kv16_ptr, stride_page, stride_tok, bt_row, kv_lo, kv_hi, limit,
             qk_scale, ALIGNED: tl.constexpr, PAGE: tl.constexpr, L: tl.constexpr, R: tl.constexpr,
             BLOCK_R: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, UPCAST: tl.constexpr):
    """``_ds_exact`` with one read of each 128-wide tile, converted once and used by both GEMMs
    (``DecodeConfig.quant_read = "once"``)."""
    q0, q1, q2, q3, qr, q_inv = _ds_q(q_rows, row_ok, L, R, BLOCK_R)
    m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    l_i = tl.zeros((BLOCK_M,), tl.float32)
    acc0 = tl.zeros((BLOCK_M, DS_TILE), tl.float32)
    acc1 = tl.zeros((BLOCK_M, DS_TILE), tl.float32)
    acc2 = tl.zeros((BLOCK_M, DS_TILE), tl.float32)
    acc3 = tl.zeros((BLOCK_M, DS_TILE), tl.float32)
    zs = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    zo = tl.zeros((BLOCK_M, DS_TILE), tl.float32)
    for start in range(kv_lo, kv_hi, BLOCK_N):
        pos, ok, off = _tile_offsets(bt_row, start, kv_hi, stride_page, stride_tok, PAGE, BLOCK_N)
        kr = load_rope(kv_ptr, kv16_ptr, off, ok, 2, False, ALIGNED, L, R, BLOCK_R, qr.dtype)
        sc0, sc1, sc2, sc3 = _ds_scales(kv_ptr, kv32_ptr, off, ok, ALIGNED, L, BLOCK_N)
        k0 = load_ds_chunk(kv_ptr, off, ok, 0, L, "")
        k1 = load_ds_chunk(kv_ptr, off, ok, 1, L, "")
        k2 = load_ds_chunk(kv_ptr, off, ok, 2, L, "")
        k3 = load_ds_chunk(kv_ptr, off, ok, 3, L, "")
        s = dot(q0, tl.trans(k0), zs, UPCAST) * sc0[None, :]
        s += dot(q1, tl.trans(k1), zs, UPCAST) * sc1[None, :]
        s += dot(q2, tl.trans(k2), zs, UPCAST) * sc2[None, :]
        s += dot(q3, tl.trans(k3), zs, UPCAST) * sc3[None, :]
        s = (s * q_inv[:, None] + dot(qr, tl.trans(kr), zs, UPCAST)) * qk_scale
        p, alpha, m_new, l_i = softmax_step(s, ok[None, :] & (pos[None, :] <= limit[:, None]), m_i, l_i)
        p0, mx0 = _ds_pv_weight(p, sc0)
        p1, mx1 = _ds_pv_weight(p, sc1)
        p2, mx2 = _ds_pv_weight(p, sc2)
        p3, mx3 = _ds_pv_weight(p, sc3)
        acc0 = acc0 * alpha[:, None] + dot(p0, k0, zo, UPCAST) * mx0
        acc1 = acc1 * alpha[:, None] + dot(p1, k1, zo, UPCAST) * mx1
        acc2 = acc2 * alpha[:, None] + dot(p2, k2, zo, UPCAST) * mx2
        acc3 = acc3 * alpha[:, None] + dot(p3, k3, zo, UPCAST) * mx3
        m_i = m_new
    return acc0, acc1, acc2, acc3, m_i, l_i


@triton.jit
def _ds_q(q_rows, row_ok, L: tl.constexpr, R: tl.constexpr, BLOCK_R: tl.constexpr):
    """The exact fp8_ds_mla paths' query: ``(q0, q1, q2, q3, qr, q_inv)``, the four 128-wide
    kv_c chunks as float16 scaled per row by a power of two into fp16 range (exact), the RoPE
    part as loaded, and ``1 / scale`` per row."""
    dt = tl.arange(0, DS_TILE)
    dr = tl.arange(0, BLOCK_R)
    q0 = tl.load(q_rows[:, None] + dt[None, :], mask=row_ok[:, None] & (dt < L)[None, :], other=0.0)
    q1 = tl.load(q_rows[:, None] + DS_TILE + dt[None, :],
                 mask=row_ok[:, None] & (dt + DS_TILE < L)[None, :], other=0.0)
    q2 = tl.load(q_rows[:, None] + 2 * DS_TILE + dt[None, :],
                 mask=row_ok[:, None] & (dt + 2 * DS_TILE < L)[None, :], other=0.0)
    q3 = tl.load(q_rows[:, None] + 3 * DS_TILE + dt[None, :],
                 mask=row_ok[:, None] & (dt + 3 * DS_TILE < L)[None, :], other=0.0)
    qr = tl.load(q_rows[:, None] + L + dr[None, :], mask=row_ok[:, None] & (dr < R)[None, :], other=0.0)
    amax = tl.maximum(tl.maximum(tl.max(tl.abs(q0.to(tl.float32)), 1), tl.max(tl.abs(q1.to(tl.float32)), 1)),
                      tl.maximum(tl.max(tl.abs(q2.to(tl.float32)), 1), tl.max(tl.abs(q3.to(tl.float32)), 1)))
    qs, q_inv = pow2_row_scale(amax)
    q0 = (q0.to(tl.float32) * qs[:, None]).to(tl.float16)
    q1 = (q1.to(tl.float32) * qs[:, None]).to(tl.float16)
    q2 = (q2.to(tl.float32) * qs[:, None]).to(tl.float16)
    q3 = (q3.to(tl.float32) * qs[:, None]).to(tl.float16)
    return q0, q1, q2, q3, qr, q_inv


@triton.jit
def _ds_scales(kv_ptr, kv32_ptr, off, ok, ALIGNED: tl.constexpr, L: tl.constexpr, BLOCK_N: tl.constexpr):
    """The four tile scales of each entry, ``[BLOCK_N]`` each."""
    return _ds_split4(load_ds_scales(kv_ptr, kv32_ptr, off, ok, ALIGNED, L))  # [BLOCK_N, 4] -> 4 x [BLOCK_N]


@triton.jit
def _ds_pv_weight(p, sc):
    """``(P * sc / max(sc) as float16, max(sc))`` of one scale tile: the P @ V operand <= 1 and
    its factor. A tile scale is >= FLT_MIN for every written token; 0 only for masked rows /
    absent tiles."""
    mx = tl.max(sc, 0)
    return (p * (sc / tl.where(mx > 0, mx, 1.0))[None, :]).to(tl.float16), mx


@triton.jit
def _ds_split4(x):
    """The four columns of ``[N, 4]`` ``x``, ``[N]`` each."""
    x02, x13 = tl.split(tl.reshape(x, (x.shape[0], 2, 2)))
    x0, x2 = tl.split(x02)
    x1, x3 = tl.split(x13)
    return x0, x1, x2, x3


@triton.jit
def _ds_fold(sc, g, top):
    """One scale tile's "pairs_once_fold" step over a KV tile with scales ``sc`` ``[BLOCK_N]``:
    ``(sc / g_new, g / g_new, g_new, top_new)``, ``g_new`` the tile's normaliser (see
    ``_ds_pairs``), ``top_new`` the largest scale seen."""
    mx = tl.max(sc, 0)
    top = tl.maximum(top, mx)
    g_new = _pow2_at_least(tl.maximum(mx, top * DS_FOLD_RANGE))
    inv = ((254 << 23) - g_new.to(tl.int32, bitcast=True)).to(tl.float32, bitcast=True)  # 1 / g_new
    return sc * inv, g * inv, g_new, top  # powers of two: exact


@triton.jit
def _pow2_at_least(x):
    """The smallest power of two ``>= x`` for ``x`` in ``[FLT_MIN, 2^127]``; 1 for ``x <= 0``."""
    g = ((x.to(tl.uint32, bitcast=True) + 0x7FFFFF) & 0x7F800000).to(tl.float32, bitcast=True)
    return tl.where(x > 0, g, 1.0)


# "pairs_once_fold": a KV tile's P @ V normaliser ``g`` (per scale tile) may fall below the
# largest tile scale seen so far by at most this factor, so an accumulator held in units of
# ``g`` stays below 2^64 * 448 * tokens (no float32 overflow). Only a KV tile whose largest
# scale is more than 2^64 below an earlier one's gets a smaller P @ V operand than "pairs_once".
DS_FOLD_RANGE = tl.constexpr(2.0 ** -64)


@triton.jit
def _ds_pairs(q_rows, row_ok, kv_ptr, kv32_ptr, kv16_ptr, stride_page, stride_tok, bt_row, kv_lo, kv_hi, limit,
              qk_scale, PAGE: tl.constexpr, L: tl.constexpr, R: tl.constexpr, BLOCK_R: tl.constexpr,
              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, UPCAST: tl.constexpr, QK_PAIRS: tl.constexpr,
              FOLD: tl.constexpr, NV_PTX: tl.constexpr):
    """``_ds_exact`` (aligned caches) with the P @ V operands read through the cache's 16-bit
    view (``load_fp8_pairs``: no byte-wise shared loads for the token-major operand) and, with
    ``QK_PAIRS``, the QK^T operands from the same one read (Q split into even / odd columns).
    Eight 64-wide accumulators, the even and odd columns of each scale tile, interleaved at
    the end: ``(acc0, acc1, acc2, acc3, m, l)`` as ``_ds_exact``.

    ``FOLD`` ("pairs_once_fold"): each scale tile's accumulator is held in units of ``g``, a
    power of two per scale tile set anew every KV tile (``_pow2_at_least`` of the tile's
    largest scale, kept within ``DS_FOLD_RANGE`` of the largest seen). The P @ V operand is
    ``P * scale / g`` (as "pairs_once" up to the power of two) and the change of ``g``
    (``g_old / g``, exact) joins the softmax rescale ``alpha``: one multiply per accumulator
    element and the dot accumulating in place, not ``acc * alpha + dot * max_scale``; ``acc * g``
    at the end. (One reduction of the ``[BLOCK_N, 4]`` scales for the four maxima compiled worse
    on sm_90: the ``[4]`` result's splits went through shared memory, 23 barriers a tile, not 9.)"""
    q0, q1, q2, q3, qr, q_inv = _ds_q(q_rows, row_ok, L, R, BLOCK_R)
    if QK_PAIRS:
        q0e, q0o = split_cols(q0)
        q1e, q1o = split_cols(q1)
        q2e, q2o = split_cols(q2)
        q3e, q3o = split_cols(q3)
    m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    l_i = tl.zeros((BLOCK_M,), tl.float32)
    HALF: tl.constexpr = DS_TILE // 2
    acc0e = tl.zeros((BLOCK_M, HALF), tl.float32)
    acc0o = tl.zeros((BLOCK_M, HALF), tl.float32)
    acc1e = tl.zeros((BLOCK_M, HALF), tl.float32)
    acc1o = tl.zeros((BLOCK_M, HALF), tl.float32)
    acc2e = tl.zeros((BLOCK_M, HALF), tl.float32)
    acc2o = tl.zeros((BLOCK_M, HALF), tl.float32)
    acc3e = tl.zeros((BLOCK_M, HALF), tl.float32)
    acc3o = tl.zeros((BLOCK_M, HALF), tl.float32)
    g0, g1, g2, g3 = 1.0, 1.0, 1.0, 1.0  # FOLD: the accumulators' units, per scale tile
    top0, top1, top2, top3 = 0.0, 0.0, 0.0, 0.0  # FOLD: the largest scale seen, per scale tile
    zs = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    zo = tl.zeros((BLOCK_M, HALF), tl.float32)
    for start in range(kv_lo, kv_hi, BLOCK_N):
        pos, ok, off = _tile_offsets(bt_row, start, kv_hi, stride_page, stride_tok, PAGE, BLOCK_N)
        kr = load_rope(kv_ptr, kv16_ptr, off, ok, 2, False, True, L, R, BLOCK_R, qr.dtype)
        sc = load_ds_scales(kv_ptr, kv32_ptr, off, ok, True, L)  # [BLOCK_N, 4]
        sc0, sc1, sc2, sc3 = _ds_split4(sc)
        if QK_PAIRS:
            k0e, k0o = load_fp8_pairs(kv16_ptr, off, ok, 0, DS_TILE, L, False, "", NV_PTX)
            k1e, k1o = load_fp8_pairs(kv16_ptr, off, ok, DS_TILE, DS_TILE, L, False, "", NV_PTX)
            k2e, k2o = load_fp8_pairs(kv16_ptr, off, ok, 2 * DS_TILE, DS_TILE, L, False, "", NV_PTX)
            k3e, k3o = load_fp8_pairs(kv16_ptr, off, ok, 3 * DS_TILE, DS_TILE, L, False, "", NV_PTX)
            s = dot(q0o, tl.trans(k0o), dot(q0e, tl.trans(k0e), zs, UPCAST), UPCAST) * sc0[None, :]
            s += dot(q1o, tl.trans(k1o), dot(q1e, tl.trans(k1e), zs, UPCAST), UPCAST) * sc1[None, :]
            s += dot(q2o, tl.trans(k2o), dot(q2e, tl.trans(k2e), zs, UPCAST), UPCAST) * sc2[None, :]
            s += dot(q3o, tl.trans(k3o), dot(q3e, tl.trans(k3e), zs, UPCAST), UPCAST) * sc3[None, :]
        else:
            s = dot(q0, tl.trans(load_ds_chunk(kv_ptr, off, ok, 0, L, "evict_last")), zs, UPCAST) * sc0[None, :]
            s += dot(q1, tl.trans(load_ds_chunk(kv_ptr, off, ok, 1, L, "evict_last")), zs, UPCAST) * sc1[None, :]
            s += dot(q2, tl.trans(load_ds_chunk(kv_ptr, off, ok, 2, L, "evict_last")), zs, UPCAST) * sc2[None, :]
            s += dot(q3, tl.trans(load_ds_chunk(kv_ptr, off, ok, 3, L, "evict_last")), zs, UPCAST) * sc3[None, :]
        s = (s * q_inv[:, None] + dot(qr, tl.trans(kr), zs, UPCAST)) * qk_scale
        p, alpha, m_new, l_i = softmax_step(s, ok[None, :] & (pos[None, :] <= limit[:, None]), m_i, l_i)
        if not QK_PAIRS:
            k0e, k0o = load_fp8_pairs(kv16_ptr, off, ok, 0, DS_TILE, L, False, "evict_first", NV_PTX)
            k1e, k1o = load_fp8_pairs(kv16_ptr, off, ok, DS_TILE, DS_TILE, L, False, "evict_first", NV_PTX)
            k2e, k2o = load_fp8_pairs(kv16_ptr, off, ok, 2 * DS_TILE, DS_TILE, L, False, "evict_first", NV_PTX)
            k3e, k3o = load_fp8_pairs(kv16_ptr, off, ok, 3 * DS_TILE, DS_TILE, L, False, "evict_first", NV_PTX)
        if FOLD:
            w0, f0, g0, top0 = _ds_fold(sc0, g0, top0)
            w1, f1, g1, top1 = _ds_fold(sc1, g1, top1)
            w2, f2, g2, top2 = _ds_fold(sc2, g2, top2)
            w3, f3, g3, top3 = _ds_fold(sc3, g3, top3)
            p0 = (p * w0[None, :]).to(tl.float16)
            p1 = (p * w1[None, :]).to(tl.float16)
            p2 = (p * w2[None, :]).to(tl.float16)
            p3 = (p * w3[None, :]).to(tl.float16)
            acc0e = dot(p0, k0e, acc0e * (alpha * f0)[:, None], UPCAST)
            acc0o = dot(p0, k0o, acc0o * (alpha * f0)[:, None], UPCAST)
            acc1e = dot(p1, k1e, acc1e * (alpha * f1)[:, None], UPCAST)
            acc1o = dot(p1, k1o, acc1o * (alpha * f1)[:, None], UPCAST)
            acc2e = dot(p2, k2e, acc2e * (alpha * f2)[:, None], UPCAST)
            acc2o = dot(p2, k2o, acc2o * (alpha * f2)[:, None], UPCAST)
            acc3e = dot(p3, k3e, acc3e * (alpha * f3)[:, None], UPCAST)
            acc3o = dot(p3, k3o, acc3o * (alpha * f3)[:, None], UPCAST)
        else:
            p0, mx0 = _ds_pv_weight(p, sc0)
            p1, mx1 = _ds_pv_weight(p, sc1)
            p2, mx2 = _ds_pv_weight(p, sc2)
            p3, mx3 = _ds_pv_weight(p, sc3)
            acc0e = acc0e * alpha[:, None] + dot(p0, k0e, zo, UPCAST) * mx0
            acc0o = acc0o * alpha[:, None] + dot(p0, k0o, zo, UPCAST) * mx0
            acc1e = acc1e * alpha[:, None] + dot(p1, k1e, zo, UPCAST) * mx1
            acc1o = acc1o * alpha[:, None] + dot(p1, k1o, zo, UPCAST) * mx1
            acc2e = acc2e * alpha[:, None] + dot(p2, k2e, zo, UPCAST) * mx2
            acc2o = acc2o * alpha[:, None] + dot(p2, k2o, zo, UPCAST) * mx2
            acc3e = acc3e * alpha[:, None] + dot(p3, k3e, zo, UPCAST) * mx3
            acc3o = acc3o * alpha[:, None] + dot(p3, k3o, zo, UPCAST) * mx3
        m_i = m_new
    return (interleave_cols(acc0e, acc0o) * g0, interleave_cols(acc1e, acc1o) * g1,
            interleave_cols(acc2e, acc2o) * g2, interleave_cols(acc3e, acc3o) * g3, m_i, l_i)


def kv_view(kv_cache: torch.Tensor) -> torch.Tensor:
    """The cache as the kernels read it: 16-bit as is, quantized formats as raw bytes."""
    if kv_cache.dtype in (torch.bfloat16, torch.float16, torch.float32, torch.uint8):
        return kv_cache
    return kv_cache.view(torch.uint8)


def ds_aligned(kv_cache: torch.Tensor) -> bool:
    """fp8_ds_mla scales / RoPE values are aligned when the base and both strides are."""
    return kv_cache.data_ptr() % 16 == 0 and kv_cache.stride(0) % 4 == 0 and kv_cache.stride(1) % 4 == 0


def ds_views(kv_cache: torch.Tensor, fmt: int):
    """float32 / bfloat16 views of an aligned fp8_ds_mla cache (scales, RoPE values); else the
    byte view twice (the kernels then assemble bytes and never touch these pointers)."""
    kv = kv_view(kv_cache)
    if fmt == FMT_DS_MLA and ds_aligned(kv_cache):
        return kv.view(torch.float32), kv.view(torch.bfloat16)
    if fmt == FMT_FP8 and ds_aligned(kv_cache):  # the 16-bit view of the fp8 "pairs" read
        return kv, kv.view(torch.bfloat16)
    return kv, kv


def mla_decode(p, q, kv_cache, block_table, seq_lens, query_start_loc, softmax_scale, k_scale,
               out, lse, config=None) -> None:
    """Launch decode (+ combine when split). ``config`` overrides the launch choice (tuning,
    tests: ``DecodeConfig.scheduled`` selects the device schedule or the host-planned splits)."""
    c = p.cache
    plat = p.platform
    cfg = config or decode_config(plat, p.num_seqs, p.num_heads, p.max_query_len,
                                  p.max_blocks_per_seq * c.block_size, c.kv_format, c.kv_lora_rank)
    if p.num_tokens == 0 or p.num_seqs == 0:
        return
    fmt = format_code(c.kv_format)
    kv_gl = kv_cache.view(torch.float8_e4m3fn) if fmt == FMT_FP8 and kv_cache.dtype == torch.uint8 else kv_cache
    narrow = cfg.block_m == decode_gluon_narrow.BR
    use_gluon = cfg.gluon and cfg.scheduled and cfg.block_n == decode_gluon.BN and (
        decode_gluon_narrow.eligible(q, kv_cache, fmt == FMT_DS_MLA, c.block_size, c.kv_lora_rank, c.rope_dim)
        if narrow else decode_gluon.eligible(q, kv_gl, c.block_size, c.kv_lora_rank, c.rope_dim))
    if cfg.gluon and not use_gluon:  # a layout the Gluon kernel does not take: the Triton tile
        bn, warps, stages = triton_tile(plat, cfg.block_m, c.kv_format, c.kv_lora_rank)
        cfg = dataclasses.replace(cfg, gluon=False, block_n=bn, num_warps=warps, num_stages=stages)
    if cfg.quant_read not in QUANT_READS or cfg.maxnreg < 0:
        raise ValueError(f"DecodeConfig quant_read={cfg.quant_read!r} (supported: {', '.join(QUANT_READS)}), "
                         f"maxnreg={cfg.maxnreg} (>= 0; 0: the compiler's choice)")
    kv = kv_view(kv_cache)
    kv32, kv16 = ds_views(kv_cache, fmt)
    lora, rope = c.kv_lora_rank, c.rope_dim
    block_l, block_r = triton.next_power_of_2(lora), max(16, triton.next_power_of_2(rope))
    t, h = p.num_tokens, p.num_heads
    scale = float(softmax_scale) * LOG2E
    ks = k_scale if fmt == FMT_FP8 else seq_lens  # any tensor: unused unless FMT_FP8
    qsl = query_start_loc if query_start_loc is not None else seq_lens
    common = dict(
        PAGE=c.block_size, FMT=fmt, FNUZ=fp8_is_fnuz(plat), ALIGNED=ds_aligned(kv_cache),
        L=lora, R=rope, BLOCK_L=block_l, BLOCK_R=block_r, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
        HAS_QSL=query_start_loc is not None, UPCAST=interpreting(),
        EXACT_DS=fmt == FMT_DS_MLA and lora <= 4 * 128 and cfg.exact_ds,
        QREAD=cfg.quant_read, NV_PTX=plat.kind == "cuda" and not interpreting(),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages, **({"maxnreg": cfg.maxnreg} if cfg.maxnreg else {}))
    head = (q, q.stride(0), q.stride(1), kv, kv32, kv16, kv.stride(0), kv.stride(1),
            block_table, block_table.stride(0), seq_lens, qsl, ks)
    lse_stride = lse.stride(0) if lse is not None else 0
    if cfg.scheduled:
        if cfg.parts < 1 or cfg.sched_fixed < 1:
            raise ValueError(f"DecodeConfig parts={cfg.parts}, sched_fixed={cfg.sched_fixed} "
                             f"(both must be >= 1)")
        b = p.num_seqs
        rows = p.max_query_len * h  # rows of one sequence: a slot's size (host bound)
        cum, piece, cut = sched_scratch(b, cfg.parts, q.device)
        part_o = torch.empty(num_slots(cfg.parts), rows, lora, dtype=torch.float32, device=q.device)
        part_l = torch.empty(num_slots(cfg.parts), rows, dtype=torch.float32, device=q.device)
        pdl = use_pdl(plat)
        launch_schedule(seq_lens, cum, piece, cut, cfg.parts, cfg.sched_fixed, cfg.block_n,
                        elementwise_warps(plat), pdl)
        pdl_kw = {"launch_pdl": True} if pdl else {}
        if use_gluon and narrow:
            decode_gluon_narrow.launch(q, kv_cache, fmt == FMT_DS_MLA, block_table, seq_lens, query_start_loc, cum,
                                       piece, b, cfg.sched_fixed, out, lse, part_o, part_l, rows, scale,
                                       cfg.row_tiles, cfg.parts, ks, cfg.num_stages, pdl)
        elif use_gluon:
            decode_gluon.launch(q, kv_gl, block_table, seq_lens, query_start_loc, cum, piece, b,
                                cfg.sched_fixed, out, lse, part_o, part_l, rows, scale, cfg.row_tiles, cfg.parts, ks,
                                pdl)
        else:
            _decode_sched_kernel[(cfg.row_tiles, cfg.parts)](
                *head, cum, piece, b, cfg.sched_fixed,
                out, out.stride(0), out.stride(1), lse if lse is not None else part_l, lse_stride,
                part_o, part_l, rows, h, scale, WRITE_LSE=lse is not None, PDL=pdl, **common, **pdl_kw)
        if max_cuts(b, cfg.parts) > 0:
            block_r, block_s, block_d = pieces_combine_blocks(cfg.parts, b, rows, block_l)
            grid = (triton.cdiv(rows, block_r), max_cuts(b, cfg.parts), triton.cdiv(lora, block_d))
            _combine_pieces_kernel[grid](
                part_o, part_l, rows, piece, cut, qsl, out, out.stride(0), out.stride(1),
                lse if lse is not None else part_l, lse_stride, h, L=lora, BLOCK_R=block_r,
                BLOCK_S=block_s, BLOCK_D=block_d, HAS_QSL=query_start_loc is not None,
                WRITE_LSE=lse is not None, PDL=pdl, num_warps=4, **pdl_kw)
        return
    grid = (cfg.row_tiles, cfg.num_splits, p.num_seqs)
    if cfg.num_splits == 1:
        _decode_kernel[grid](
            *head, out, 0, out.stride(0), out.stride(1),
            lse if lse is not None else out, 0, lse_stride,  # out: a dummy pointer without LSE
            h, cfg.kv_per_split, scale, WRITE_LSE=lse is not None, **common)
        return
    part_o = torch.empty(cfg.num_splits, t, h, lora, dtype=torch.float32, device=q.device)
    part_l = torch.empty(cfg.num_splits, t, h, dtype=torch.float32, device=q.device)
    _decode_kernel[grid](
        *head, part_o, part_o.stride(0), part_o.stride(1), part_o.stride(2),
        part_l, part_l.stride(0), part_l.stride(1),
        h, cfg.kv_per_split, scale, WRITE_LSE=True, **common)
    block_h, block_s, block_d = combine_blocks(cfg.num_splits, h, block_l)
    _combine_kernel[(t, triton.cdiv(h, block_h), triton.cdiv(lora, block_d))](
        part_o, part_o.stride(0), part_o.stride(1), part_o.stride(2),
        part_l, part_l.stride(0), part_l.stride(1),
        out, out.stride(0), out.stride(1),
        lse if lse is not None else part_l, lse_stride,
        h, cfg.num_splits, L=lora, BLOCK_H=block_h, BLOCK_S=block_s, BLOCK_D=block_d,
        WRITE_LSE=lse is not None, num_warps=4)
