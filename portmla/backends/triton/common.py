"""Device helpers shared by the Triton kernels: reading cache entries of every format.

A cache entry is addressed by a 64-bit element offset (block id and in-block position
are widened to int64 before they are multiplied by the strides). Quantized caches are
passed as ``uint8`` views, so the kernels see raw bytes and decode them here:

* ``FMT_FP8``: one e4m3 byte per value (e4m3fnuz on gfx94x, ``FNUZ``).
* ``FMT_DS_MLA``: ``[L bytes e4m3fn | L/128 float32 scales | R bfloat16]``. The scales and
  RoPE values sit at byte offsets that are only aligned when every stride is; the
  ``ALIGNED`` path reads them through float32 / bfloat16 views of the same memory
  (``kv32_ptr`` / ``kv16_ptr``, indexed by byte offset // 4 or // 2, so the compiler knows
  their alignment and can pipeline the loads), the other one assembles bytes.
"""

from __future__ import annotations

import triton
import triton.language as tl

DS_TILE = tl.constexpr(128)


@triton.jit
def dot(a, b, acc, UPCAST: tl.constexpr):
    """``acc + a @ b``; ``UPCAST`` works around the CPU interpreter's 16-bit dot."""
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc)
    else:
        return tl.dot(a, b, acc)


@triton.jit
def fp8_bits_to(x, OUT: tl.constexpr, FNUZ: tl.constexpr):
    """uint8 fp8 bits -> ``OUT`` values."""
    if FNUZ:
        return x.to(tl.float8e4b8, bitcast=True).to(OUT)
    else:
        return x.to(tl.float8e4nv, bitcast=True).to(OUT)


@triton.jit
def load_nope(kv_ptr, kv32_ptr, off, ok, FMT: tl.constexpr, FNUZ: tl.constexpr, ALIGNED: tl.constexpr,
              L: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_N: tl.constexpr, OUT: tl.constexpr,
              EVICT: tl.constexpr):
    """kv_c part ``[BLOCK_N, BLOCK_L]`` as ``OUT`` of the entries at ``off`` (rows ``~ok`` and
    columns ``>= L`` read as 0). fp8 per-tensor values come back *unscaled*. ``EVICT``: the
    quantized reads' L2 eviction policy ("", "evict_first", "evict_last")."""
    dl = tl.arange(0, BLOCK_L)
    msk = ok[:, None] & (dl < L)[None, :]
    ptrs = kv_ptr + off[:, None] + dl[None, :]
    if FMT == 0:
        x = tl.load(ptrs, mask=msk, other=0.0)
        return x.to(OUT)
    elif FMT == 1:
        return fp8_bits_to(tl.load(ptrs, mask=msk, other=0, eviction_policy=EVICT), OUT, FNUZ)
    else:
        # [BLOCK_N, NT, 128]: each 128-wide tile times its scale without a relayout
        NT: tl.constexpr = BLOCK_L // DS_TILE
        ti = tl.arange(0, NT)
        dt = tl.arange(0, DS_TILE)
        col = ti[None, :, None] * DS_TILE + dt[None, None, :]
        x = tl.load(kv_ptr + off[:, None, None] + col, mask=ok[:, None, None] & (col < L), other=0,
                    eviction_policy=EVICT)
        x = fp8_bits_to(x, tl.float32, False)
        smsk = ok[:, None] & (ti < L // DS_TILE)[None, :]
        if ALIGNED:  # 4-byte aligned: index the float32 view, so the compiler sees the alignment
            sp = kv32_ptr + (off // 4)[:, None] + L // 4 + ti[None, :]
            sc = tl.load(sp, mask=smsk, other=0.0)
        else:
            sc = tl.where(smsk, _u8_f32_masked(kv_ptr + off[:, None] + L + 4 * ti[None, :], smsk), 0.0)
        return tl.reshape(x * sc[:, :, None], (BLOCK_N, BLOCK_L)).to(OUT)


@triton.jit
def load_ds_chunk(kv_ptr, off, ok, T: tl.constexpr, L: tl.constexpr, EVICT: tl.constexpr):
    """fp8_ds_mla kv_c tile ``T`` (columns ``128 T .. 128 T + 127``) ``[BLOCK_N, 128]`` as
    *unscaled* float16 (e4m3 -> fp16 is exact and one packed convert per two values); rows
    ``~ok`` and tiles at or beyond ``L`` read as 0."""
    dt = tl.arange(0, DS_TILE)
    col = dt + T * DS_TILE
    x = tl.load(kv_ptr + off[:, None] + col[None, :], mask=ok[:, None] & (col < L)[None, :], other=0,
                eviction_policy=EVICT)
    return fp8_bits_to(x, tl.float16, False)


@triton.jit
def load_fp8_pairs(kv16_ptr, off, ok, COL0: tl.constexpr, W: tl.constexpr, L: tl.constexpr,
                   FNUZ: tl.constexpr, EVICT: tl.constexpr, PTX: tl.constexpr):
    """e4m3 columns ``COL0 .. COL0 + W - 1`` of the entries at byte offsets ``off`` (even;
    ``kv16_ptr`` a 16-bit view of the same cache) read as ``W / 2`` 16-bit pairs: ``(even,
    odd)``, ``[BLOCK_N, W / 2]`` float16 each, ``even[:, c]`` = column ``COL0 + 2 c``,
    ``odd[:, c]`` = column ``COL0 + 2 c + 1`` (rows ``~ok`` and pairs from column ``L`` on
    read as 0; for an odd ``L``, ``odd`` column ``L`` holds the next byte: only for outputs that
    are never stored). A 16-bit tile in shared memory is what ``ldmatrix.trans`` reads, so a
    GEMM whose K is the token axis (``P @ V``) takes it without byte-wise shared loads. Both
    halves are plain elementwise functions of the one load, so the compiler converts after its
    shared-memory stage and the load stays pipelined."""
    c = tl.arange(0, W // 2)
    # the mask on c itself (not on 2 c): the compiler then sees it constant over whole vectors
    w = tl.load(kv16_ptr + (off // 2)[:, None] + COL0 // 2 + c[None, :],
                mask=ok[:, None] & (c < (L - COL0 + 1) // 2)[None, :], other=0.0,
                eviction_policy=EVICT).to(tl.uint16, bitcast=True)
    if PTX:
        return split_e4m3_pairs(w)
    return (fp8_bits_to((w & 0xFF).to(tl.uint8), tl.float16, FNUZ),
            fp8_bits_to((w >> 8).to(tl.uint8), tl.float16, FNUZ))


@triton.jit
def split_e4m3_pairs(w):
    """``(low bytes, high bytes)`` of uint16 ``w`` as e4m3fn -> float16, in PTX: per two
    elements one ``prmt`` (low bytes to one half-word, high to the other) and two packed
    converts. Elementwise (element ``i`` of each result depends on ``w[i]`` only), so any
    layout's pairing of elements gives the same values."""
    return tl.inline_asm_elementwise(
        """{
        .reg .b32 t;
        .reg .b16 lo, hi;
        prmt.b32 t, $2, 0, 0x3120;
        mov.b32 {lo, hi}, t;
        cvt.rn.f16x2.e4m3x2 $0, lo;
        cvt.rn.f16x2.e4m3x2 $1, hi;
        }""",
        "=r,=r,r", [w], dtype=(tl.float16, tl.float16), is_pure=True, pack=2)


@triton.jit
def split_cols(x):
    """``(even, odd)`` columns of ``[M, 2 W]`` ``x``, ``[M, W]`` each (``interleave_cols`` undoes it)."""
    return tl.split(tl.reshape(x, (x.shape[0], x.shape[1] // 2, 2)))


@triton.jit
def interleave_cols(even, odd):
    """``[M, 2 W]`` with ``even`` in the even and ``odd`` in the odd columns (both ``[M, W]``)."""
    return tl.reshape(tl.join(even, odd), (even.shape[0], 2 * even.shape[1]))


@triton.jit
def load_ds_scales(kv_ptr, kv32_ptr, off, ok, ALIGNED: tl.constexpr, L: tl.constexpr):
    """The first four fp8_ds_mla tile scales of each entry, ``[BLOCK_N, 4]`` float32 (0 for rows
    ``~ok`` and for tiles at or beyond ``L``)."""
    ti = tl.arange(0, 4)
    smsk = ok[:, None] & (ti < L // DS_TILE)[None, :]
    if ALIGNED:
        return tl.load(kv32_ptr + (off // 4)[:, None] + L // 4 + ti[None, :], mask=smsk, other=0.0)
    else:
        return tl.where(smsk, _u8_f32_masked(kv_ptr + off[:, None] + L + 4 * ti[None, :], smsk), 0.0)


@triton.jit
def softmax_step(s, keep, m_i, l_i):
    """One tile of online softmax over base-2 scores ``s`` ([M, N]; ``keep`` masks them):
    ``(p, alpha, m_new, l_new)``; rows with nothing seen yet stay at 0 (no NaN)."""
    s = tl.where(keep, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp2(m_i - m_use)
    p = tl.exp2(s - m_use[:, None])
    return p, alpha, m_new, l_i * alpha + tl.sum(p, 1)


@triton.jit
def pow2_row_scale(amax):
    """Per-row powers of two ``(s, 1/s)`` with ``amax * s`` in ``[2^14, 2^15)`` (fits fp16).

    A 16-bit row times ``s`` is exact in fp16 (only values below ``2^-24 * s`` of the row's
    largest one lose bits), so fp8 caches can run fp16 tensor-core dots, whose e4m3 -> fp16
    conversion is one packed instruction per two values (e4m3 -> bf16 is not on sm_90).
    """
    e = ((amax.to(tl.uint32, bitcast=True) >> 23) & 0xFF).to(tl.int32)
    k = tl.minimum(tl.maximum(141 - e, -126), 126)
    s = ((k + 127) << 23).to(tl.float32, bitcast=True)
    inv = ((127 - k) << 23).to(tl.float32, bitcast=True)
    return s, inv


@triton.jit
def _u8_f32_masked(p, m):
    w = (tl.load(p, mask=m, other=0).to(tl.uint32)
         | (tl.load(p + 1, mask=m, other=0).to(tl.uint32) << 8)
         | (tl.load(p + 2, mask=m, other=0).to(tl.uint32) << 16)
         | (tl.load(p + 3, mask=m, other=0).to(tl.uint32) << 24))
    return w.to(tl.float32, bitcast=True)


@triton.jit
def load_rope(kv_ptr, kv16_ptr, off, ok, FMT: tl.constexpr, FNUZ: tl.constexpr, ALIGNED: tl.constexpr,
              L: tl.constexpr, R: tl.constexpr, BLOCK_R: tl.constexpr, OUT: tl.constexpr):
    """k_pe part ``[BLOCK_N, BLOCK_R]`` as ``OUT`` (fp8 per-tensor values unscaled)."""
    dr = tl.arange(0, BLOCK_R)
    msk = ok[:, None] & (dr < R)[None, :]
    if FMT == 0:
        return tl.load(kv_ptr + off[:, None] + L + dr[None, :], mask=msk, other=0.0).to(OUT)
    elif FMT == 1:
        return fp8_bits_to(tl.load(kv_ptr + off[:, None] + L + dr[None, :], mask=msk, other=0),
                           OUT, FNUZ)
    else:
        if ALIGNED:  # 2-byte aligned: index the bfloat16 view (the compiler sees the alignment)
            x = tl.load(kv16_ptr + (off // 2)[:, None]
                        + (L + 4 * (L // DS_TILE)) // 2 + dr[None, :], mask=msk, other=0.0)
        else:
            base = kv_ptr + off[:, None] + (L + 4 * (L // DS_TILE)) + 2 * dr[None, :]
            u = (tl.load(base, mask=msk, other=0).to(tl.uint16)
                 | (tl.load(base + 1, mask=msk, other=0).to(tl.uint16) << 8))
            x = u.to(tl.bfloat16, bitcast=True)
        return x.to(OUT)


@triton.jit
def store_rn(ptrs, x, mask):
    """Store float32 ``x`` in the pointee dtype, rounding to nearest even.

    bfloat16 is rounded on the bits (the CPU interpreter's cast truncates), so the stored
    values equal torch's ``.to(torch.bfloat16)`` on every platform.
    """
    if ptrs.dtype.element_ty == tl.bfloat16:
        u = x.to(tl.uint32, bitcast=True)
        u = u + (0x7FFF + ((u >> 16) & 1))
        tl.store(ptrs, (u >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True), mask=mask)
    else:
        tl.store(ptrs, x.to(ptrs.dtype.element_ty), mask=mask)


@triton.jit
def seq_tokens(qsl_ptr, b, HAS_QSL: tl.constexpr):
    """``(first query token, query tokens)`` of sequence ``b``: from ``query_start_loc``, or
    token ``b`` alone when there is none (one query token per sequence)."""
    if HAS_QSL:
        t0 = tl.load(qsl_ptr + b)
        n_q = tl.load(qsl_ptr + b + 1) - t0
    else:
        t0 = b
        n_q = 1
    return t0, n_q
