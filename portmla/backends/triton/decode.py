"""Absorbed MLA decode: split-KV flash decoding over the paged latent cache + LSE combine.

All query heads share the one latent KV head, so a program takes a tile of up to
``BLOCK_M`` query *rows* (a row is one (query token, head) pair of one sequence, row
``i`` = token ``i // H``, head ``i % H``) and streams each KV tile once for all of them:
``S = Q[:, :L] K_c^T + Q[:, L:] K_pe^T`` (576-wide for DeepSeek) and ``O += P K_c``
(512-wide) on the tensor cores. A tile of ``BLOCK_N`` tokens may span several pages:
each token's page comes from the block table.

Grid ``(row_tiles, num_splits, num_seqs)``: the row tiles of one KV split are adjacent in
launch order so they run together and share the KV tile through L2. With one split the
kernel writes the final output; otherwise it writes float32 partials + LSE and
``_combine_kernel`` merges them in a fixed order (deterministic).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import (
    DS_TILE,
    dot,
    load_ds_chunk,
    load_ds_scales,
    load_nope,
    load_rope,
    pow2_row_scale,
    softmax_step,
)
from .launch import FMT_DS_MLA, FMT_FP8, decode_config, format_code, fp8_is_fnuz, interpreting

LOG2E = 1.4426950408889634
LN2 = tl.constexpr(0.6931471805599453)


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
):
    tile = tl.program_id(0)
    split = tl.program_id(1)
    b = tl.program_id(2)
    seq_len = tl.load(seq_lens_ptr + b)
    if HAS_QSL:
        t0 = tl.load(qsl_ptr + b)
        n_q = tl.load(qsl_ptr + b + 1) - t0
    else:
        t0 = b
        n_q = 1
    if tile * BLOCK_M >= n_q * H:
        return
    rows = tile * BLOCK_M + tl.arange(0, BLOCK_M)
    tok = rows // H
    head = rows % H
    row_ok = tok < n_q
    t = (t0 + tok).to(tl.int64)
    limit = seq_len - n_q + tok  # last KV position each row sees (causal over new tokens)
    tok_last = tl.minimum(n_q - 1, (tile * BLOCK_M + BLOCK_M - 1) // H)
    kv_lo = split * kv_per_split
    kv_hi = tl.minimum(tl.minimum(seq_len, kv_lo + kv_per_split), seq_len - n_q + tok_last + 1)

    dl = tl.arange(0, BLOCK_L)
    o_rows = o_ptr + split.to(tl.int64) * stride_os + t * stride_ot + head.to(tl.int64) * stride_oh
    l_rows = lse_ptr + split.to(tl.int64) * stride_ls + t * stride_lt + head
    if kv_lo >= kv_hi:  # nothing to see in this split: only the LSE says so
        if WRITE_LSE:
            tl.store(l_rows, tl.full((BLOCK_M,), float("-inf"), tl.float32), mask=row_ok)
        return

    dr = tl.arange(0, BLOCK_R)
    q_rows = q_ptr + t * stride_qt + head.to(tl.int64) * stride_qh
    if EXACT_DS:
        _ds_exact(q_rows, row_ok, kv_ptr, kv32_ptr, kv16_ptr, stride_page, stride_tok, bt_ptr, stride_bt, b,
                  o_rows, l_rows, kv_lo, kv_hi, limit, qk_scale, ALIGNED, PAGE, L, R, BLOCK_R, BLOCK_M,
                  BLOCK_N, WRITE_LSE, UPCAST)
        return
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

    m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    l_i = tl.zeros((BLOCK_M,), tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_L), tl.float32)
    bt_row = bt_ptr + b.to(tl.int64) * stride_bt
    for start in range(kv_lo, kv_hi, BLOCK_N):
        pos, ok, off = _tile_offsets(bt_row, start, kv_hi, stride_page, stride_tok, PAGE, BLOCK_N)
        kr = load_rope(kv_ptr, kv16_ptr, off, ok, FMT, FNUZ, ALIGNED, L, R, BLOCK_R, qn.dtype)
        if FMT == 0:
            kn = load_nope(kv_ptr, kv32_ptr, off, ok, FMT, FNUZ, ALIGNED, L, BLOCK_L, BLOCK_N, qn.dtype, "")
            kv = kn
        else:
            # Quantized tiles are read twice (once per GEMM, the second read hits L2): a
            # single read converted for both operands keeps Triton from pipelining it.
            kn = load_nope(kv_ptr, kv32_ptr, off, ok, FMT, FNUZ, ALIGNED, L, BLOCK_L, BLOCK_N, qn.dtype,
                           "evict_last")
            kv = load_nope(kv_ptr, kv32_ptr, off, ok, FMT, FNUZ, ALIGNED, L, BLOCK_L, BLOCK_N, qn.dtype,
                           "evict_first")
        s = dot(qn, tl.trans(kn), tl.zeros((BLOCK_M, BLOCK_N), tl.float32), UPCAST)
        s = dot(qr, tl.trans(kr), s, UPCAST) * scale
        if FMT == 1:
            s = s * q_inv[:, None]  # undo Q's fp16 row scaling
        p, alpha, m_new, l_i = softmax_step(s, ok[None, :] & (pos[None, :] <= limit[:, None]),
                                            m_i, l_i)
        acc = dot(p.to(kv.dtype), kv, acc * alpha[:, None], UPCAST)
        m_i = m_new

    seen = l_i > 0
    out = acc / tl.where(seen, l_i, 1.0)[:, None]
    if FMT == 1:
        out = out * ks
    tl.store(o_rows[:, None] + dl[None, :], out.to(o_ptr.dtype.element_ty),
             mask=row_ok[:, None] & (dl < L)[None, :])
    if WRITE_LSE:
        lse = tl.where(seen, (tl.where(seen, m_i, 0.0) + tl.log2(tl.where(seen, l_i, 1.0))) * LN2,
                       float("-inf"))
        tl.store(l_rows, lse, mask=row_ok)


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
def _ds_exact(q_rows, row_ok, kv_ptr, kv32_ptr, kv16_ptr, stride_page, stride_tok, bt_ptr, stride_bt, b,
              o_rows, l_rows, kv_lo, kv_hi, limit, qk_scale, ALIGNED: tl.constexpr, PAGE: tl.constexpr,
              L: tl.constexpr, R: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_M: tl.constexpr,
              BLOCK_N: tl.constexpr, WRITE_LSE: tl.constexpr, UPCAST: tl.constexpr):
    """fp8_ds_mla decode of one row tile and split (``L <= 512``) without dequantizing the tile:
    fp16 dots of the raw e4m3 values, one per 128-wide scale tile. QK^T: the four partial
    scores times the per-token tile scales (fp32), Q rows scaled by a power of two into fp16
    range (exact); RoPE dot in the query's dtype. PV: ``P * scale / max_scale`` (<= 1, fp16)
    per tile, the fp32 result times ``max_scale`` of the KV tile."""
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

    m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    l_i = tl.zeros((BLOCK_M,), tl.float32)
    acc0 = tl.zeros((BLOCK_M, DS_TILE), tl.float32)
    acc1 = tl.zeros((BLOCK_M, DS_TILE), tl.float32)
    acc2 = tl.zeros((BLOCK_M, DS_TILE), tl.float32)
    acc3 = tl.zeros((BLOCK_M, DS_TILE), tl.float32)
    zs = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    zo = tl.zeros((BLOCK_M, DS_TILE), tl.float32)
    bt_row = bt_ptr + b.to(tl.int64) * stride_bt
    for start in range(kv_lo, kv_hi, BLOCK_N):
        pos, ok, off = _tile_offsets(bt_row, start, kv_hi, stride_page, stride_tok, PAGE, BLOCK_N)
        kr = load_rope(kv_ptr, kv16_ptr, off, ok, 2, False, ALIGNED, L, R, BLOCK_R, qr.dtype)
        sc = load_ds_scales(kv_ptr, kv32_ptr, off, ok, ALIGNED, L)  # [BLOCK_N, 4]
        sc02, sc13 = tl.split(tl.reshape(sc, (BLOCK_N, 2, 2)))
        sc0, sc2 = tl.split(sc02)
        sc1, sc3 = tl.split(sc13)
        # each tile is read twice, once per GEMM (the second read hits L2), so both are pipelined
        s = dot(q0, tl.trans(load_ds_chunk(kv_ptr, off, ok, 0, L, "evict_last")), zs, UPCAST) * sc0[None, :]
        s += dot(q1, tl.trans(load_ds_chunk(kv_ptr, off, ok, 1, L, "evict_last")), zs, UPCAST) * sc1[None, :]
        s += dot(q2, tl.trans(load_ds_chunk(kv_ptr, off, ok, 2, L, "evict_last")), zs, UPCAST) * sc2[None, :]
        s += dot(q3, tl.trans(load_ds_chunk(kv_ptr, off, ok, 3, L, "evict_last")), zs, UPCAST) * sc3[None, :]
        s = (s * q_inv[:, None] + dot(qr, tl.trans(kr), zs, UPCAST)) * qk_scale
        p, alpha, m_new, l_i = softmax_step(s, ok[None, :] & (pos[None, :] <= limit[:, None]),
                                            m_i, l_i)
        # a tile scale is >= FLT_MIN for every written token; 0 only for masked rows / absent tiles
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

    seen = l_i > 0
    inv_l = 1.0 / tl.where(seen, l_i, 1.0)
    o_ty = o_rows.dtype.element_ty
    om = row_ok[:, None]
    tl.store(o_rows[:, None] + dt[None, :], (acc0 * inv_l[:, None]).to(o_ty), mask=om & (dt < L)[None, :])
    tl.store(o_rows[:, None] + DS_TILE + dt[None, :], (acc1 * inv_l[:, None]).to(o_ty),
             mask=om & (dt + DS_TILE < L)[None, :])
    tl.store(o_rows[:, None] + 2 * DS_TILE + dt[None, :], (acc2 * inv_l[:, None]).to(o_ty),
             mask=om & (dt + 2 * DS_TILE < L)[None, :])
    tl.store(o_rows[:, None] + 3 * DS_TILE + dt[None, :], (acc3 * inv_l[:, None]).to(o_ty),
             mask=om & (dt + 3 * DS_TILE < L)[None, :])
    if WRITE_LSE:
        lse = tl.where(seen, (tl.where(seen, m_i, 0.0) + tl.log2(tl.where(seen, l_i, 1.0))) * LN2,
                       float("-inf"))
        tl.store(l_rows, lse, mask=row_ok)


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
    """One program per (token, BLOCK_H heads, BLOCK_D columns). ``BLOCK_S`` splits are read
    as one tile per step (the LSEs as one vector, the partial outputs as one
    ``[BLOCK_H, BLOCK_S, BLOCK_D]`` tile), so a call with many splits waits for two memory
    round trips per ``BLOCK_S`` splits, not two per split. Fixed reduction order:
    deterministic."""
    t = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    d = tl.program_id(2) * BLOCK_D + tl.arange(0, BLOCK_D)
    sp = tl.arange(0, BLOCK_S)
    h_ok = h < H
    d_ok = d < L
    l_base = pl_ptr + t * stride_plt + h[:, None]
    m = tl.full((BLOCK_H,), float("-inf"), tl.float32)
    for s0 in range(0, NUM_SPLITS, BLOCK_S):
        s = s0 + sp
        s_ok = h_ok[:, None] & (s < NUM_SPLITS)[None, :]
        ls = tl.load(l_base + s.to(tl.int64)[None, :] * stride_pls, mask=s_ok, other=float("-inf"))
        m = tl.maximum(m, tl.max(ls, 1))
    m_use = tl.where(m == float("-inf"), 0.0, m)
    den = tl.zeros((BLOCK_H,), tl.float32)
    acc = tl.zeros((BLOCK_H, BLOCK_D), tl.float32)
    o_base = po_ptr + t * stride_pt + h.to(tl.int64)[:, None, None] * stride_ph + d[None, None, :]
    for s0 in range(0, NUM_SPLITS, BLOCK_S):
        s = s0 + sp
        s_ok = h_ok[:, None] & (s < NUM_SPLITS)[None, :]
        s64 = s.to(tl.int64)
        ls = tl.load(l_base + s64[None, :] * stride_pls, mask=s_ok, other=float("-inf"))
        w = tl.exp(ls - m_use[:, None])  # [BLOCK_H, BLOCK_S]; 0 for empty splits
        used = w > 0
        po = tl.load(o_base + s64[None, :, None] * stride_ps,
                     mask=used[:, :, None] & d_ok[None, None, :], other=0.0)
        acc += tl.sum(tl.where(used[:, :, None], po * w[:, :, None], 0.0), 1)
        den += tl.sum(w, 1)
    seen = den > 0
    out = acc / tl.where(seen, den, 1.0)[:, None]
    tl.store(o_ptr + t * stride_ot + h.to(tl.int64)[:, None] * stride_oh + d[None, :],
             out.to(o_ptr.dtype.element_ty), mask=h_ok[:, None] & d_ok[None, :])
    if WRITE_LSE:
        if tl.program_id(2) == 0:
            lse = tl.where(seen, m_use + tl.log(tl.where(seen, den, 1.0)), float("-inf"))
            tl.store(lse_ptr + t * stride_lt + h, lse, mask=h_ok)


def combine_blocks(num_splits: int, num_heads: int, block_l: int):
    """(BLOCK_H, BLOCK_S, BLOCK_D) of the combine. Up to 8 splits: one split per step over
    4096-value head tiles (the earlier combine's tiles; reading all splits at once measured
    0.3-2 % slower on the 128-head rows, which have 2-8 splits). More splits: a tile of at
    most 8192 float32 values (64 registers a thread at 4 warps) holding up to 64 of them."""
    if num_splits <= 8:
        return min(triton.next_power_of_2(num_heads), max(1, 4096 // block_l)), 1, block_l
    block_s = min(triton.next_power_of_2(num_splits), 64)
    block_d = min(block_l, max(64, 8192 // block_s))
    block_h = max(1, min(triton.next_power_of_2(num_heads), 8192 // (block_s * block_d)))
    return block_h, block_s, block_d


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
    return kv, kv


def mla_decode(p, q, kv_cache, block_table, seq_lens, query_start_loc, softmax_scale, k_scale,
               out, lse, config=None) -> None:
    """Launch decode (+ combine when split). ``config`` overrides the launch choice (tuning)."""
    c = p.cache
    plat = p.platform
    cfg = config or decode_config(plat, p.num_seqs, p.num_heads, p.max_query_len,
                                  p.max_blocks_per_seq * c.block_size, c.kv_format, c.kv_lora_rank)
    if p.num_tokens == 0 or p.num_seqs == 0:
        return
    fmt = format_code(c.kv_format)
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
        num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    grid = (cfg.row_tiles, cfg.num_splits, p.num_seqs)
    if cfg.num_splits == 1:
        lse_t = lse if lse is not None else out  # dummy pointer when WRITE_LSE is off
        _decode_kernel[grid](
            q, q.stride(0), q.stride(1), kv, kv32, kv16, kv.stride(0), kv.stride(1),
            block_table, block_table.stride(0), seq_lens, qsl, ks,
            out, 0, out.stride(0), out.stride(1),
            lse_t, 0, lse.stride(0) if lse is not None else 0,
            h, cfg.kv_per_split, scale, WRITE_LSE=lse is not None, **common)
        return
    part_o = torch.empty(cfg.num_splits, t, h, lora, dtype=torch.float32, device=q.device)
    part_l = torch.empty(cfg.num_splits, t, h, dtype=torch.float32, device=q.device)
    _decode_kernel[grid](
        q, q.stride(0), q.stride(1), kv, kv32, kv16, kv.stride(0), kv.stride(1),
        block_table, block_table.stride(0), seq_lens, qsl, ks,
        part_o, part_o.stride(0), part_o.stride(1), part_o.stride(2),
        part_l, part_l.stride(0), part_l.stride(1),
        h, cfg.kv_per_split, scale, WRITE_LSE=True, **common)
    block_h, block_s, block_d = combine_blocks(cfg.num_splits, h, block_l)
    lse_t = lse if lse is not None else part_l
    _combine_kernel[(t, triton.cdiv(h, block_h), triton.cdiv(lora, block_d))](
        part_o, part_o.stride(0), part_o.stride(1), part_o.stride(2),
        part_l, part_l.stride(0), part_l.stride(1),
        out, out.stride(0), out.stride(1),
        lse_t, lse.stride(0) if lse is not None else 0,
        h, cfg.num_splits, L=lora, BLOCK_H=block_h, BLOCK_S=block_s, BLOCK_D=block_d,
        WRITE_LSE=lse is not None, num_warps=4)
