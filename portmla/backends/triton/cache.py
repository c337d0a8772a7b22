"""Cache writes (``concat_and_cache_mla``) and reads (``gather_cache``) for every KV format.

One program writes one token (slot ``-1`` is skipped); fp8_ds_mla computes the four
per-128-tile scales ``max(amax / 448, FLT_MIN)`` in the program. ``gather_cache`` runs a
program per (sequence, chunk of tokens), dequantizes to float32 and stores the output
dtype, packing sequence ``b`` at rows ``cu_seq_lens[b] ..``. Divisions round to nearest
(``div_rn``) so the bytes written match the torch reference exactly.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .common import DS_TILE, load_nope, load_rope, store_rn
from .decode import ds_aligned, ds_views, kv_view
from .launch import FMT_FP8, elementwise_warps, format_code, fp8_is_fnuz, fp8_max

FLT_MIN = tl.constexpr(1.1754943508222875e-38)


@triton.jit
def _to_fp8_bits(x, FNUZ: tl.constexpr):
    """float32 (already clamped to the fp8 range) -> e4m3 bits, round-to-nearest-even.

    Integer arithmetic on the float32 bits, so every vendor (and the CPU interpreter, whose
    fp8 cast rounds wrongly across exponent boundaries) writes the same bytes as torch.
    e4m3fn: bias 7, subnormal unit 2^-9; e4m3fnuz (gfx94x): bias 8, unit 2^-10, no -0.
    """
    BIAS: tl.constexpr = 8 if FNUZ else 7
    u = x.to(tl.uint32, bitcast=True)
    sign = (u >> 31) << 7
    e = ((u >> 23) & 255).to(tl.int32) - 127
    mant = u & 0x7FFFFF
    normal = e >= 1 - BIAS
    # normal: keep 3 mantissa bits, round on the 20 below
    nbase = ((e + BIAS).to(tl.uint32) << 3) | (mant >> 20)
    nrem = mant & 0xFFFFF
    nup = (nrem > 0x80000) | ((nrem == 0x80000) & ((nbase & 1) == 1))
    # subnormal: units of 2^(1 - BIAS - 3) of the 24-bit significand
    full = mant | 0x800000
    sh = tl.minimum(21 - BIAS - e, 31).to(tl.uint32)
    sh = tl.where(normal, 1, sh)
    sbase = full >> sh
    srem = full & ((1 << sh) - 1)
    half = 1 << (sh - 1)
    sup = (srem > half) | ((srem == half) & ((sbase & 1) == 1))
    mag = tl.where(normal, nbase + nup.to(tl.uint32), sbase + sup.to(tl.uint32))
    if FNUZ:
        sign = tl.where(mag == 0, 0, sign)
    return (sign | mag).to(tl.uint8)


@triton.jit
def _concat_kernel(
    kvc_ptr, stride_ct, kpe_ptr, stride_pt, cache_ptr, stride_page, stride_tok, slot_ptr, scale_ptr,
    PAGE: tl.constexpr, FMT: tl.constexpr, FNUZ: tl.constexpr, FP8_MAX: tl.constexpr,
    L: tl.constexpr, R: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_R: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)
    slot = tl.load(slot_ptr + t).to(tl.int64)
    if slot < 0:
        return
    base = cache_ptr + (slot // PAGE) * stride_page + (slot % PAGE) * stride_tok
    dl = tl.arange(0, BLOCK_L)
    dr = tl.arange(0, BLOCK_R)
    lm = dl < L
    rm = dr < R
    c = tl.load(kvc_ptr + t * stride_ct + dl, mask=lm, other=0.0).to(tl.float32)
    r = tl.load(kpe_ptr + t * stride_pt + dr, mask=rm, other=0.0).to(tl.float32)
    if FMT == 0:
        store_rn(base + dl, c, lm)
        store_rn(base + L + dr, r, rm)
    elif FMT == 1:
        s = tl.load(scale_ptr)
        qc = tl.minimum(tl.maximum(tl.div_rn(c, s), -FP8_MAX), FP8_MAX)
        qr = tl.minimum(tl.maximum(tl.div_rn(r, s), -FP8_MAX), FP8_MAX)
        tl.store(base + dl, _to_fp8_bits(qc, FNUZ), mask=lm)
        tl.store(base + L + dr, _to_fp8_bits(qr, FNUZ), mask=rm)
    else:
        NT: tl.constexpr = BLOCK_L // DS_TILE
        x = tl.reshape(c, (NT, DS_TILE))
        amax = tl.max(tl.abs(x), 1)
        sc = tl.maximum(tl.div_rn(amax, tl.full((NT,), 448.0, tl.float32)), FLT_MIN)
        qx = tl.div_rn(x, tl.broadcast_to(sc[:, None], (NT, DS_TILE)))
        qx = tl.minimum(tl.maximum(qx, -448.0), 448.0)
        tl.store(base + dl, tl.reshape(_to_fp8_bits(qx, False), (BLOCK_L,)), mask=lm)
        ti = tl.arange(0, NT)
        tm = ti < L // DS_TILE
        bits = sc.to(tl.uint32, bitcast=True)
        sp = base + L + 4 * ti
        tl.store(sp, (bits & 255).to(tl.uint8), mask=tm)
        tl.store(sp + 1, ((bits >> 8) & 255).to(tl.uint8), mask=tm)
        tl.store(sp + 2, ((bits >> 16) & 255).to(tl.uint8), mask=tm)
        tl.store(sp + 3, ((bits >> 24) & 255).to(tl.uint8), mask=tm)
        rb = r.to(tl.uint32, bitcast=True)
        rb = (rb + (0x7FFF + ((rb >> 16) & 1))) >> 16  # bfloat16 bits, round to nearest even
        rp = base + (L + 4 * (L // DS_TILE)) + 2 * dr
        tl.store(rp, (rb & 255).to(tl.uint8), mask=rm)
        tl.store(rp + 1, ((rb >> 8) & 255).to(tl.uint8), mask=rm)


@triton.jit
def _gather_kernel(
    cache_ptr, cache32_ptr, cache16_ptr, stride_page, stride_tok, bt_ptr, stride_bt, seq_lens_ptr,
    starts_ptr, cu_ptr,
    scale_ptr, out_ptr, stride_out,
    PAGE: tl.constexpr, FMT: tl.constexpr, FNUZ: tl.constexpr, ALIGNED: tl.constexpr,
    L: tl.constexpr, R: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_R: tl.constexpr,
    BLOCK_T: tl.constexpr, HAS_STARTS: tl.constexpr,
):
    b = tl.program_id(0)
    chunk = tl.program_id(1)
    n = tl.load(seq_lens_ptr + b)
    if chunk * BLOCK_T >= n:
        return
    start = 0
    if HAS_STARTS:
        start = tl.load(starts_ptr + b)
    row0 = tl.load(cu_ptr + b).to(tl.int64)
    i = chunk * BLOCK_T + tl.arange(0, BLOCK_T)
    ok = i < n
    pos = start + i
    page = tl.load(bt_ptr + b.to(tl.int64) * stride_bt + pos // PAGE, mask=ok, other=0).to(tl.int64)
    off = page * stride_page + (pos % PAGE).to(tl.int64) * stride_tok
    nope = load_nope(cache_ptr, cache32_ptr, off, ok, FMT, FNUZ, ALIGNED, L, BLOCK_L, BLOCK_T, tl.float32, "")
    rope = load_rope(cache_ptr, cache16_ptr, off, ok, FMT, FNUZ, ALIGNED, L, R, BLOCK_R, tl.float32)
    if FMT == 1:
        s = tl.load(scale_ptr)
        nope = nope * s
        rope = rope * s
    dl = tl.arange(0, BLOCK_L)
    dr = tl.arange(0, BLOCK_R)
    rows = out_ptr + (row0 + i.to(tl.int64)) * stride_out
    store_rn(rows[:, None] + dl[None, :], nope, ok[:, None] & (dl < L)[None, :])
    store_rn(rows[:, None] + L + dr[None, :], rope, ok[:, None] & (dr < R)[None, :])


def concat_and_cache_mla(p, kv_c, k_pe, kv_cache, slot_mapping, scale) -> None:
    c = p.cache
    if p.num_tokens == 0:
        return
    fmt = format_code(c.kv_format)
    kv = kv_view(kv_cache)
    k_pe = k_pe.reshape(k_pe.shape[0], -1)
    lora, rope = c.kv_lora_rank, c.rope_dim
    _concat_kernel[(p.num_tokens,)](
        kv_c, kv_c.stride(0), k_pe, k_pe.stride(0), kv, kv.stride(0), kv.stride(1), slot_mapping,
        scale if fmt == FMT_FP8 else slot_mapping,
        PAGE=c.block_size, FMT=fmt, FNUZ=fp8_is_fnuz(p.platform), FP8_MAX=fp8_max(p.platform),
        L=lora, R=rope, BLOCK_L=triton.next_power_of_2(lora), BLOCK_R=triton.next_power_of_2(rope),
        num_warps=elementwise_warps(p.platform))


def gather_cache(p, kv_cache, block_table, seq_lens, seq_starts, cu_seq_lens, scale, out) -> None:
    c = p.cache
    if p.num_seqs == 0 or out.shape[0] == 0:
        return
    fmt = format_code(c.kv_format)
    kv = kv_view(kv_cache)
    lora, rope = c.kv_lora_rank, c.rope_dim
    block_t = 16
    max_tokens = p.max_blocks_per_seq * c.block_size  # shape bound on tokens per sequence
    grid = (p.num_seqs, triton.cdiv(max_tokens, block_t))
    kv32, kv16 = ds_views(kv_cache, fmt)
    _gather_kernel[grid](
        kv, kv32, kv16, kv.stride(0), kv.stride(1), block_table, block_table.stride(0), seq_lens,
        seq_starts if seq_starts is not None else seq_lens, cu_seq_lens,
        scale if fmt == FMT_FP8 else seq_lens, out, out.stride(0),
        PAGE=c.block_size, FMT=fmt, FNUZ=fp8_is_fnuz(p.platform), ALIGNED=ds_aligned(kv_cache),
        L=lora, R=rope, BLOCK_L=triton.next_power_of_2(lora),
        BLOCK_R=max(16, triton.next_power_of_2(rope)), BLOCK_T=block_t,
        HAS_STARTS=seq_starts is not None, num_warps=elementwise_warps(p.platform))

