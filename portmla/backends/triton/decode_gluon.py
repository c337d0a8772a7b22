"""Hopper (sm_90) MLA decode of 64-row tiles in Gluon, Triton's explicit-layout language.

Why a second kernel: Triton lays the 64 x 64 scores of the 8-warp ``_decode_sched_kernel``
out as ``warpsPerCTA = [8, 1]``, so both warpgroups compute the whole QK^T (576 of the
1088 multiply-adds per score-and-output element done twice; benchmarks/results/
triton_h100_notes.md, session 6). Here the layouts are explicit: scores ``[4, 2]`` (each
warpgroup 32 of the tile's 64 tokens, wgmma m64n32k16), output ``[4, 2]`` (each warpgroup
256 of the 512 columns, m64n256k16, 128 fp32 registers a thread).

Per CTA (one 64-row tile of one part of the device schedule, ``schedule.py``): a one-warp
loader partition walks the part's segments and issues TMA boxes (64 columns, 128-byte
swizzle) of each segment's Q rows and of each 64-token KV tile (one run of boxes per page
for pages of 8 / 16 / 32 tokens) into a two-stage ring (``ready`` / ``empty`` mbarriers, a Q
buffer with its own pair); the eight-warp default partition computes S = Q K^T (two async
wgmma groups: the 512 latent columns, the 64 RoPE columns, both operands in shared memory),
the online softmax (the row max crosses the warpgroups through shared memory, by the
compiler; row sums are kept per element and reduced once a segment), P (bf16 / fp16) to
shared memory, O += P V (V = the tile's first 512 columns) and the segment's epilogue: the
output (+ LSE), or float32 partials + LSE of a cut sequence, exactly what
``decode._decode_sched_kernel`` writes, so ``combine._combine_pieces_kernel`` merges both.
H100 (Triton 3.6): 352 us = 427 TFLOP/s at b=128 S=4096 h=128 against 617 us for the Triton
kernel; the A/Bs and what was tried are in benchmarks/results/triton_h100_notes.md, session 11.

Per-tensor fp8 (e4m3fn) caches: the loader brings the raw entries (the latent part in 128-byte
boxes, RoPE in one of 64 bytes) into a two-stage raw ring; the consumers convert a slot into
the one fp16 tile buffer (exact), release the slot and run the same pipeline on fp16 operands
(bf16 query rows scaled in place into fp16 by a power of two per row, its inverse on the
scores); k_scale multiplies the scores and the output (H100: 454 us at the row above, 1.27x
the bf16 time: the conversion is not overlapped with the tensor cores yet).

Takes (``eligible``): 16-bit caches with q of the same dtype, or fp8 caches with bf16 / fp16 q;
DeepSeek dims (L = 512, R = 64), q heads x 576 contiguous, at least 64 and fewer than 2^31
(token, head) rows, block sizes 8, 16, 32 or multiples of 64, and strides TMA takes (the cache
viewed as rows of ``token stride`` elements: the page stride a multiple of it, both 16-byte
multiples, 16-byte aligned bases). Everything else runs the Triton kernel.
"""

from __future__ import annotations

import torch

try:  # Gluon ships with Triton >= 3.5; the CPU interpreter cannot run it
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.hopper import (
        fence_async_shared,
        mbarrier,
        tma,
        warpgroup_mma,
        warpgroup_mma_wait,
    )
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

    from .common import pow2_row_scale, seq_tokens  # @triton.jit helpers, callable from Gluon
    from .schedule import first_seq

    HAVE_GLUON = True
except Exception:  # pragma: no cover - Triton without Gluon (or a different API): the Triton kernel runs
    HAVE_GLUON = False

# Gluon's API still changes between Triton releases (3.9 renamed warp_specialize's arguments):
# the kernel runs by default only on the releases it was built and measured with.
TESTED_TRITON = ("3.6",)


def triton_tested() -> bool:
    import triton

    return ".".join(triton.__version__.split(".")[:2]) in TESTED_TRITON


BM = 64  # query rows a CTA
BN = 64  # KV tokens a tile
BOX = 64  # TMA box columns (128 bytes of a 16-bit value: one swizzle atom)
NOPE = 512
ROPE = 64
ENTRY = NOPE + ROPE
LOADER_REGS = 32  # the loader warp's register budget (setmaxnreg)


def eligible(q: torch.Tensor, kv_cache: torch.Tensor, block_size: int, lora: int, rope: int) -> bool:
    """Shapes, dtypes and strides this kernel takes (``mla_decode`` runs the Triton kernel
    otherwise). Host-only checks: the call stays graph-capturable."""
    fp8 = kv_cache.dtype == torch.float8_e4m3fn
    if not HAVE_GLUON or lora != NOPE or rope != ROPE or kv_cache.dtype not in (torch.bfloat16, torch.float16,
                                                                                 torch.float8_e4m3fn):
        return False
    if q.dtype not in (torch.bfloat16, torch.float16) or (q.dtype != kv_cache.dtype and not fp8):
        return False
    if q.stride(2) != 1 or q.stride(1) != ENTRY or q.stride(0) != q.shape[1] * ENTRY or q.data_ptr() % 16:
        return False
    if not BM <= q.shape[0] * q.shape[1] < 2**31:  # Q's TMA box (64 rows) fits; 32-bit row coordinates
        return False
    return tma_pages(kv_cache, block_size, ENTRY)


def tma_pages(kv_cache: torch.Tensor, block_size: int, entry: int) -> bool:
    """The cache's pages as the Gluon kernels' loaders read them: block sizes 8, 16, 32 (one run
    of boxes a page) or multiples of 64, and the cache viewed as rows of ``token stride``
    elements (``kv_rows``) that TMA can address: entries of ``entry`` elements, the token stride
    a 16-byte multiple, the page stride a multiple of it, a 16-byte aligned base, 32-bit rows."""
    if not (block_size % BN == 0 or block_size in (8, 16, 32)):
        return False
    page, tok = kv_cache.stride(0), kv_cache.stride(1)
    return (kv_cache.stride(2) == 1 and tok >= entry and tok * kv_cache.element_size() % 16 == 0 and page % tok == 0
            and kv_cache.data_ptr() % 16 == 0 and kv_rows(kv_cache) < 2**31)


def kv_rows(kv_cache: torch.Tensor) -> int:
    """Rows of the cache's 2D view ``[rows, 576]`` (row stride = the token stride): page ``p``
    token ``i`` is row ``p * rows_per_page + i``."""
    rows_per_page = kv_cache.stride(0) // kv_cache.stride(1)
    return (kv_cache.shape[0] - 1) * rows_per_page + kv_cache.shape[1]


if HAVE_GLUON:

    _BM = gl.constexpr(BM)
    _BN = gl.constexpr(BN)
    _BOX = gl.constexpr(BOX)
    _NOPE = gl.constexpr(NOPE)
    _ROPE = gl.constexpr(ROPE)
    _ENTRY = gl.constexpr(ENTRY)
    _LOADER_REGS = gl.constexpr(LOADER_REGS)

    @gluon.jit
    def _part_start(cum_ptr, num_seqs):
        """Where this CTA's part of the schedule starts: ``(per_part, lo, hi, b, cum[b])``, units
        ``[lo, hi)``, ``b`` the first sequence whose units reach past ``lo``."""
        per_part = gl.load(cum_ptr + num_seqs + 1)
        lo = gl.program_id(1).to(gl.int64) * per_part
        b = first_seq(cum_ptr, num_seqs, lo)
        return per_part, lo, lo + per_part, b, gl.load(cum_ptr + b)

    @gluon.jit
    def _segment(cum_ptr, seq_lens_ptr, qsl_ptr, b, c, c_next, lo, hi, tile, H, sched_fixed,
                 HAS_QSL: gl.constexpr, BM: gl.constexpr = _BM):
        """Sequence ``b``'s segment in part ``[lo, hi)`` for row tile ``tile`` (``BM`` rows a tile):
        ``(run, t0, n_q,
        seq_len, kv_lo, kv_hi)``; ``run``: the part computes (and writes) the segment, whose KV
        range ``[kv_lo, kv_hi)`` may be empty (a sequence with no KV tiles)."""
        first = c + sched_fixed
        u_lo = gl.maximum(lo - first, 0)
        u_hi = gl.minimum(hi - first, c_next - first)
        seq_len = gl.load(seq_lens_ptr + b)
        t0, n_q = seq_tokens(qsl_ptr, b, HAS_QSL)
        tok_last = gl.minimum(n_q - 1, (tile * BM + BM - 1) // H)
        kv_end = seq_len - n_q + tok_last + 1
        run = ((u_lo < u_hi) | ((c_next == first) & (c >= lo))) & (tile * BM < n_q * H)
        kv_lo = (u_lo * _BN).to(gl.int32)
        kv_hi = gl.minimum(u_hi * _BN, kv_end).to(gl.int32)
        return run, t0, n_q, seq_len, kv_lo, kv_hi

    @gluon.jit
    def _latent_run(kv_desc, bt_row, start, i: gl.constexpr, kv_hi, rows_per_page, bar, dst, PAGE: gl.constexpr):
        """Run ``i`` of the KV tile at ``start`` (the ``SUB`` tokens from ``start + i * SUB``, one
        page or part of one): the latent part's boxes into rows ``[i * SUB, (i + 1) * SUB)`` of
        ``dst``; returns the run's cache row for the caller's other boxes. A run past ``kv_hi``
        reads rows ``-SUB..`` (outside the tensor: TMA fills zeros) and no block-table entry."""
        SUB: gl.constexpr = kv_desc.block_type.shape[0]  # rows a box: min(PAGE, BN)
        W: gl.constexpr = kv_desc.block_type.shape[1]  # columns a latent-part box
        pos = start + i * SUB
        ok = pos < kv_hi
        page = gl.load(bt_row + pos // PAGE, mask=ok, other=0)
        row = gl.where(ok, page * rows_per_page + pos % PAGE, -SUB)
        for j in gl.static_range(_NOPE // W):
            tma.async_copy_global_to_shared(kv_desc, [row, j * W], bar,
                                            dst.slice(j * W, W, dim=1).slice(i * SUB, SUB, dim=0))
        return row

    @gluon.jit
    def _kv_tile(kv_desc, ks_desc, kr_desc, raw, raw_sc, raw_rope, ready, empty, g, bt_row, start, kv_hi,
                 rows_per_page, NBYTES: gl.constexpr, NSTAGE: gl.constexpr, PAGE: gl.constexpr, DS: gl.constexpr,
                 ROPE_COL: gl.constexpr):
        """Both loaders' KV tile: ring slot ``g % NSTAGE``, once its consumer released it, gets the
        tile at ``start`` (``NBYTES`` expected): per page run the latent boxes (``_latent_run``),
        fp8_ds_mla's scale box (``DS``, column ``NOPE`` of ``ks_desc``) and the RoPE box (column
        ``ROPE_COL`` of ``kr_desc``)."""
        SUB: gl.constexpr = kv_desc.block_type.shape[0]  # rows a box: min(PAGE, BN)
        s = g % NSTAGE
        mbarrier.wait(empty.index(s), ((g // NSTAGE) & 1) ^ 1)
        mbarrier.expect(ready.index(s), NBYTES)
        for i in gl.static_range(_BN // SUB):
            row = _latent_run(kv_desc, bt_row, start, i, kv_hi, rows_per_page, ready.index(s), raw.index(s), PAGE)
            if DS:
                tma.async_copy_global_to_shared(ks_desc, [row, _NOPE], ready.index(s),
                                                raw_sc.index(s).slice(i * SUB, SUB, dim=0))
            tma.async_copy_global_to_shared(kr_desc, [row, ROPE_COL], ready.index(s),
                                            raw_rope.index(s).slice(i * SUB, SUB, dim=0))

    @gluon.jit
    def _loader(q_desc, kv_desc, kr_desc, q_nope, q_rope, raw, raw_rope, q_ready, q_empty, ready, empty,
                bt_ptr, stride_bt, seq_lens_ptr, qsl_ptr, cum_ptr, num_seqs, sched_fixed, H, rows_per_page,
                PAGE: gl.constexpr, HAS_QSL: gl.constexpr):
        """The one-warp TMA partition: the part's segments in order, Q rows then KV tiles."""
        tile = gl.program_id(0)
        per_part, lo, hi, b, c = _part_start(cum_ptr, num_seqs)
        g = 0  # KV tiles issued so far (ring slot g % 2, its use g // 2)
        qi = 0  # Q loads issued so far
        box_bytes: gl.constexpr = _BM * _BOX * 2  # a Q box
        while (b < num_seqs) & (c < hi):
            c_next = gl.load(cum_ptr + b + 1)
            run, t0, n_q, seq_len, kv_lo, kv_hi = _segment(cum_ptr, seq_lens_ptr, qsl_ptr, b, c, c_next, lo, hi,
                                                           tile, H, sched_fixed, HAS_QSL)
            if run & (kv_lo < kv_hi):
                mbarrier.wait(q_empty, (qi & 1) ^ 1)
                mbarrier.expect(q_ready, 9 * box_bytes)
                qrow = (t0 * H + tile * _BM).to(gl.int32)
                for j in gl.static_range(_NOPE // _BOX):
                    tma.async_copy_global_to_shared(q_desc, [qrow, j * _BOX], q_ready,
                                                    q_nope.slice(j * _BOX, _BOX, dim=1))
                tma.async_copy_global_to_shared(q_desc, [qrow, _NOPE], q_ready, q_rope)
                qi += 1
                bt_row = bt_ptr + b.to(gl.int64) * stride_bt
                for start in range(kv_lo, kv_hi, _BN):
                    # the latent part in boxes of 64 columns (16-bit) or 128 bytes (fp8), RoPE in one
                    # box of kr_desc, into ``raw`` (the 16-bit ring itself for 16-bit caches)
                    _kv_tile(kv_desc, kv_desc, kr_desc, raw, raw_rope, raw_rope, ready, empty, g, bt_row, start,
                             kv_hi, rows_per_page, _BN * _ENTRY * kv_desc.dtype.primitive_bitwidth // 8, 2, PAGE,
                             False, _NOPE)
                    g += 1
            b += 1
            c = c_next

    @gluon.jit
    def _zero_tail(kv_nope, valid):
        """Rows ``>= valid`` of a KV stage's first 512 columns set to 0 (cache slots past the
        sequence may hold NaN, and 0 * NaN is NaN in P V). Generic-proxy writes: fenced."""
        zl: gl.constexpr = gl.BlockedLayout([1, 8], [4, 8], [gl.num_warps(), 1], [1, 0])
        for j in gl.static_range(_NOPE // _BOX):
            box = kv_nope.slice(j * _BOX, _BOX, dim=1)
            x = box.load(zl)
            r = gl.arange(0, _BN, gl.SliceLayout(1, zl))
            box.store(gl.where(gl.expand_dims(r < valid, 1), x, gl.zeros_like(x)))
        fence_async_shared()
        gl.thread_barrier()

    @gluon.jit
    def _q_to_fp16(q_nope, q_rope, row_layout: gl.constexpr):
        """bf16 query rows in shared memory -> fp16 in place, each row times a power of two that
        puts its largest value in [2^14, 2^15) (exact: ``common.pow2_row_scale``); returns the
        rows' inverse scales in ``row_layout`` (for the scores)."""
        ql: gl.constexpr = gl.BlockedLayout([1, 16], [8, 4], [gl.num_warps(), 1], [1, 0])
        amax = gl.max(gl.abs(q_rope.load(ql).to(gl.float32)), axis=1)
        for j in gl.static_range(_NOPE // _BOX):
            amax = gl.maximum(amax, gl.max(gl.abs(q_nope.slice(j * _BOX, _BOX, dim=1).load(ql).to(gl.float32)), axis=1))
        qs, q_inv = pow2_row_scale(amax)
        gl.thread_barrier()  # every row's values read before any is overwritten
        q16 = q_nope._reinterpret(gl.float16, [_BM, _NOPE], q_nope.layout)
        for j in gl.static_range(_NOPE // _BOX):
            x = q_nope.slice(j * _BOX, _BOX, dim=1).load(ql).to(gl.float32) * gl.expand_dims(qs, 1)
            gl.thread_barrier()
            q16.slice(j * _BOX, _BOX, dim=1).store(x.to(gl.float16))
        x = q_rope.load(ql).to(gl.float32) * gl.expand_dims(qs, 1)
        gl.thread_barrier()
        q_rope._reinterpret(gl.float16, [_BM, _ROPE], q_rope.layout).store(x.to(gl.float16))
        fence_async_shared()
        gl.thread_barrier()
        return gl.convert_layout(q_inv, row_layout)

    @gluon.jit
    def _convert(raw, raw_rope, kvh_nope, kvh_rope):
        """An fp8 (e4m3) stage of raw entries -> the 16-bit tile (exact: every e4m3 value is a
        bf16 / fp16 value); k_scale is applied to the scores and the output. Every load before
        any store (one barrier between them, not one a chunk)."""
        cl: gl.constexpr = gl.BlockedLayout([1, 16], [8, 4], [gl.num_warps(), 1], [1, 0])  # a row per swizzle phase
        x0 = raw.slice(0 * _BOX, _BOX, dim=1).load(cl)
        x1 = raw.slice(1 * _BOX, _BOX, dim=1).load(cl)
        x2 = raw.slice(2 * _BOX, _BOX, dim=1).load(cl)
        x3 = raw.slice(3 * _BOX, _BOX, dim=1).load(cl)
        x4 = raw.slice(4 * _BOX, _BOX, dim=1).load(cl)
        x5 = raw.slice(5 * _BOX, _BOX, dim=1).load(cl)
        x6 = raw.slice(6 * _BOX, _BOX, dim=1).load(cl)
        x7 = raw.slice(7 * _BOX, _BOX, dim=1).load(cl)
        xr = raw_rope.load(cl)
        dt: gl.constexpr = kvh_nope.dtype
        kvh_nope.slice(0 * _BOX, _BOX, dim=1).store(x0.to(dt))
        kvh_nope.slice(1 * _BOX, _BOX, dim=1).store(x1.to(dt))
        kvh_nope.slice(2 * _BOX, _BOX, dim=1).store(x2.to(dt))
        kvh_nope.slice(3 * _BOX, _BOX, dim=1).store(x3.to(dt))
        kvh_nope.slice(4 * _BOX, _BOX, dim=1).store(x4.to(dt))
        kvh_nope.slice(5 * _BOX, _BOX, dim=1).store(x5.to(dt))
        kvh_nope.slice(6 * _BOX, _BOX, dim=1).store(x6.to(dt))
        kvh_nope.slice(7 * _BOX, _BOX, dim=1).store(x7.to(dt))
        kvh_rope.store(xr.to(dt))

    @gluon.jit
    def _qk(q_nope, q_rope, kv_nope, kv_rope, raw, raw_rope, ready, empty, g, valid, s_layout: gl.constexpr,
            FP8: gl.constexpr):
        """Waits for KV tile ``g`` (ring slot ``g % 2``), zeroes its rows past ``valid`` and issues
        S = Q K^T on it (two async wgmma groups: 512 then 64 columns); returns the pending S.
        fp8: the raw slot is converted into the one 16-bit tile buffer and released."""
        r = g % 2
        mbarrier.wait(ready.index(r), (g // 2) & 1)
        if FP8:
            s = 0
            _convert(raw.index(r), raw_rope.index(r), kv_nope.index(0), kv_rope.index(0))
            fence_async_shared()
            gl.thread_barrier()
            mbarrier.arrive(empty.index(r), count=1)
        else:
            s = r
        kvs = kv_nope.index(s)
        if valid < _BN:
            _zero_tail(kvs, valid)
        acc = gl.zeros([_BM, _BN], gl.float32, s_layout)
        acc = warpgroup_mma(q_nope, kvs.permute((1, 0)), acc, is_async=True)
        return warpgroup_mma(q_rope, kv_rope.index(s).permute((1, 0)), acc, is_async=True)

    @gluon.jit
    def _compute(q_nope, q_rope, kv_nope, kv_rope, raw, raw_rope, p_smem, q_ready, q_empty, ready, empty,
                 seq_lens_ptr, qsl_ptr, cum_ptr, num_seqs, sched_fixed, piece_ptr,
                 o_ptr, stride_ot, stride_oh, lse_ptr, stride_lt, po_ptr, pl_ptr, slot_rows, H, qk_scale, kscale_ptr,
                 HAS_QSL: gl.constexpr, WRITE_LSE: gl.constexpr, FP8: gl.constexpr):
        """The eight-warp partition: every segment's attention and its epilogue."""
        s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 2],
                                                           instr_shape=[16, _BN // 2, 16])
        o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 2],
                                                           instr_shape=[16, _NOPE // 2, 16])
        row_s: gl.constexpr = gl.SliceLayout(1, s_layout)
        row_o: gl.constexpr = gl.SliceLayout(1, o_layout)
        tile = gl.program_id(0)
        part = gl.program_id(1)
        per_part, lo, hi, b, c = _part_start(cum_ptr, num_seqs)
        g = 0
        qi = 0
        if FP8:
            k_scale = gl.load(kscale_ptr)
        else:
            k_scale = 1.0
        sl2 = qk_scale * k_scale
        Q_SCALE: gl.constexpr = FP8 and q_nope.dtype == gl.bfloat16
        if Q_SCALE:  # the wgmma's view of the rows converted in place
            qa_nope = q_nope._reinterpret(gl.float16, [_BM, _NOPE], q_nope.layout)
            qa_rope = q_rope._reinterpret(gl.float16, [_BM, _ROPE], q_rope.layout)
        else:
            qa_nope = q_nope
            qa_rope = q_rope
        rows_s = tile * _BM + gl.arange(0, _BM, row_s)
        cols_s = gl.arange(0, _BN, gl.SliceLayout(0, s_layout))
        rows_o = tile * _BM + gl.arange(0, _BM, row_o)
        cols_o = gl.arange(0, _NOPE, gl.SliceLayout(0, o_layout))
        while (b < num_seqs) & (c < hi):
            c_next = gl.load(cum_ptr + b + 1)
            run, t0, n_q, seq_len, kv_lo, kv_hi = _segment(cum_ptr, seq_lens_ptr, qsl_ptr, b, c, c_next, lo, hi,
                                                           tile, H, sched_fixed, HAS_QSL)
            if run:
                limit = seq_len - n_q + rows_s // H  # the last KV position each row sees (causal)
                m_i = gl.full([_BM], float("-inf"), gl.float32, row_s)
                l_part = gl.zeros([_BM, _BN], gl.float32, s_layout)  # row sums, reduced once
                o = gl.zeros([_BM, _NOPE], gl.float32, o_layout)
                if kv_lo < kv_hi:
                    mbarrier.wait(q_ready, qi & 1)
                    if Q_SCALE:
                        q_inv = _q_to_fp16(q_nope, q_rope, row_s)
                    else:
                        q_inv = gl.full([_BM], 1.0, gl.float32, row_s)
                    n_tiles = (kv_hi - kv_lo + _BN - 1) // _BN
                    acc = _qk(qa_nope, qa_rope, kv_nope, kv_rope, raw, raw_rope, ready, empty, g, kv_hi - kv_lo, s_layout, FP8)
                    acc = warpgroup_mma_wait(num_outstanding=0, deps=[acc])
                    for j in range(n_tiles):
                        if FP8:
                            s = 0
                        else:
                            s = g % 2
                        start = kv_lo + j * _BN
                        if j == n_tiles - 1:  # the segment's Q is no longer read
                            gl.thread_barrier()
                            mbarrier.arrive(q_empty, count=1)
                        pos = start + cols_s
                        keep = (gl.expand_dims(pos, 0) < kv_hi) & (gl.expand_dims(pos, 0) <= gl.expand_dims(limit, 1))
                        sc = gl.where(keep, acc * (sl2 * gl.expand_dims(q_inv, 1)), float("-inf"))
                        m_new = gl.maximum(m_i, gl.max(sc, axis=1))
                        m_use = gl.where(m_new == float("-inf"), 0.0, m_new)
                        alpha = gl.exp2(m_i - m_use)
                        p = gl.exp2(sc - gl.expand_dims(m_use, 1))
                        l_part = l_part * gl.expand_dims(alpha, 1) + p
                        m_i = m_new
                        p_smem.store(p.to(p_smem.dtype))
                        fence_async_shared()
                        gl.thread_barrier()
                        o = o * gl.expand_dims(gl.convert_layout(alpha, row_o), 1)
                        o = warpgroup_mma(p_smem, kv_nope.index(s), o, is_async=True)
                        o = warpgroup_mma_wait(num_outstanding=0, deps=[o])
                        gl.thread_barrier()  # both warpgroups done with the stage and with P
                        if not FP8:  # (fp8: the raw slot was released when converted)
                            mbarrier.arrive(empty.index(s), count=1)
                        if j + 1 < n_tiles:
                            acc = _qk(qa_nope, qa_rope, kv_nope, kv_rope, raw, raw_rope, ready, empty, g + 1, kv_hi - start - _BN,
                                      s_layout, FP8)
                            acc = warpgroup_mma_wait(num_outstanding=0, deps=[acc])
                        g += 1
                    qi += 1
                # epilogue: o / l in the output's dtype (0 where nothing was seen) + natural-log LSE
                l_i = gl.sum(l_part, axis=1)
                lse, inv = _lse_inv(m_i, l_i)
                inv = gl.convert_layout(inv, row_o)
                out = o * gl.expand_dims(inv * k_scale, 1)
                _store_segment(out, lse, rows_o, rows_s, cols_o, 1, t0, n_q, H, b, c, part, per_part, sched_fixed,
                               piece_ptr, po_ptr, pl_ptr, slot_rows, o_ptr, stride_ot, stride_oh, lse_ptr, stride_lt,
                               WRITE_LSE)
            b += 1
            c = c_next

    @gluon.jit
    def _lse_inv(m_i, l_i):
        """A segment's natural-log LSE (``-inf`` for rows that saw nothing) and ``1 / l`` (1 there)
        from its base-2 running max ``m_i`` and sum ``l_i``."""
        seen = l_i > 0
        lse = gl.where(seen, (gl.where(seen, m_i, 0.0) + gl.log2(gl.where(seen, l_i, 1.0))) * 0.6931471805599453,
                       float("-inf"))
        return lse, 1.0 / gl.where(seen, l_i, 1.0)

    @gluon.jit
    def _store_segment(out, lse, rows_o, rows_l, cols_o, ROW_AXIS: gl.constexpr, t0, n_q, H, b, c, part, per_part,
                       sched_fixed, piece_ptr, po_ptr, pl_ptr, slot_rows, o_ptr, stride_ot, stride_oh, lse_ptr,
                       stride_lt, WRITE_LSE: gl.constexpr):
        """A segment's result: float32 partials + LSE in its slot (a piece of a cut sequence) or
        the output in its dtype (+ LSE). ``rows_o`` / ``cols_o``: the query rows (token x head)
        / latent columns along ``out``'s axis ``ROW_AXIS`` / the other one; ``rows_l``: the
        query rows of ``lse``."""
        cols = gl.expand_dims(cols_o, 1 - ROW_AXIS)
        ok_o = gl.expand_dims(rows_o < n_q * H, ROW_AXIS)
        ok_l = rows_l < n_q * H
        base = gl.load(piece_ptr + 2 * b.to(gl.int64))
        if base >= 0:
            slot = (base + part - (c + sched_fixed) // per_part).to(gl.int64) * slot_rows
            gl.store(po_ptr + (slot + gl.expand_dims(rows_o, ROW_AXIS)) * _NOPE + cols, out, mask=ok_o)
            gl.store(pl_ptr + slot + rows_l, lse, mask=ok_l)
        else:
            t_o = (t0 + rows_o // H).to(gl.int64)
            h_o = (rows_o % H).to(gl.int64)
            optr = o_ptr + gl.expand_dims(t_o * stride_ot + h_o * stride_oh, ROW_AXIS) + cols
            gl.store(optr, out.to(o_ptr.dtype.element_ty), mask=ok_o)
            if WRITE_LSE:
                gl.store(lse_ptr + (t0 + rows_l // H).to(gl.int64) * stride_lt + rows_l % H, lse, mask=ok_l)

    @gluon.jit
    def grid_dependency(PDL: gl.constexpr):
        """Programmatic dependent launch (``PDL``, sm_90): wait for the schedule kernel's writes,
        then let the next grid (the pieces combine, which waits in turn) launch."""
        if PDL:
            gl.inline_asm_elementwise("griddepcontrol.wait; // $0", "=r", [], dtype=gl.int32, is_pure=False, pack=1)
            gl.inline_asm_elementwise("griddepcontrol.launch_dependents; // $0", "=r", [], dtype=gl.int32,
                                      is_pure=False, pack=1)

    @gluon.jit
    def _decode_gluon_kernel(q_desc, kv_desc, kr_desc, bt_ptr, stride_bt, seq_lens_ptr, qsl_ptr,
                             cum_ptr, piece_ptr, num_seqs, sched_fixed, rows_per_page,
                             o_ptr, stride_ot, stride_oh, lse_ptr, stride_lt, po_ptr, pl_ptr, slot_rows,
                             H, qk_scale, kscale_ptr, PAGE: gl.constexpr, HAS_QSL: gl.constexpr,
                             WRITE_LSE: gl.constexpr, FP8: gl.constexpr, PDL: gl.constexpr = False):
        # 16-bit caches: a two-stage ring of 16-bit tiles. fp8: a two-stage ring of raw entries
        # (576 bytes a token) and one fp16 tile the consumers convert into.
        sl: gl.constexpr = q_desc.layout
        KV_STAGES: gl.constexpr = 1 if FP8 else 2
        q_nope = gl.allocate_shared_memory(q_desc.dtype, [_BM, _NOPE], sl)
        q_rope = gl.allocate_shared_memory(q_desc.dtype, [_BM, _ROPE], sl)
        # fp8: fp16 operands (e4m3 -> f16 is one instruction per two values; bf16 queries are
        # scaled per row into fp16 in place, ``_q_to_fp16``)
        dt: gl.constexpr = gl.float16 if FP8 else q_desc.dtype
        kv_nope = gl.allocate_shared_memory(dt, [KV_STAGES, _BN, _NOPE], sl)
        kv_rope = gl.allocate_shared_memory(dt, [KV_STAGES, _BN, _ROPE], sl)
        if FP8:
            raw = gl.allocate_shared_memory(kv_desc.dtype, [2, _BN, _NOPE], kv_desc.layout)
            raw_rope = gl.allocate_shared_memory(kr_desc.dtype, [2, _BN, _ROPE], kr_desc.layout)
        else:  # the loader's destination: the 16-bit ring itself
            raw = kv_nope
            raw_rope = kv_rope
        p_smem = gl.allocate_shared_memory(dt, [_BM, _BN], sl)
        q_ready = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
        q_empty = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
        ready = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
        empty = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
        mbarrier.init(q_ready, count=1)
        mbarrier.init(q_empty, count=1)
        for i in gl.static_range(2):
            mbarrier.init(ready.index(i), count=1)
            mbarrier.init(empty.index(i), count=1)
        grid_dependency(PDL)
        gl.warp_specialize([
            (_compute, (q_nope, q_rope, kv_nope, kv_rope, raw, raw_rope, p_smem, q_ready, q_empty, ready, empty,
                        seq_lens_ptr, qsl_ptr, cum_ptr, num_seqs, sched_fixed, piece_ptr,
                        o_ptr, stride_ot, stride_oh, lse_ptr, stride_lt, po_ptr, pl_ptr, slot_rows, H, qk_scale,
                        kscale_ptr, HAS_QSL, WRITE_LSE, FP8)),
            (_loader, (q_desc, kv_desc, kr_desc, q_nope, q_rope, raw, raw_rope, q_ready, q_empty, ready, empty,
                       bt_ptr, stride_bt, seq_lens_ptr, qsl_ptr, cum_ptr, num_seqs, sched_fixed, H, rows_per_page,
                       PAGE, HAS_QSL)),
        ], [1], [_LOADER_REGS])


def launch(q, kv_cache, block_table, seq_lens, qsl, cum, piece, num_seqs, sched_fixed, out, lse, part_o, part_l,
           slot_rows, scale, row_tiles, parts, k_scale=None, pdl=False) -> None:
    """One launch over the device schedule (``cum`` / ``piece`` from ``launch_schedule``);
    ``qsl`` is None for one query token per sequence. ``scale`` is base 2; ``k_scale`` (a
    device scalar) for fp8 caches."""
    fp8 = kv_cache.dtype == torch.float8_e4m3fn
    gdt = gl.bfloat16 if q.dtype == torch.bfloat16 else gl.float16
    layout = gl.NVMMASharedLayout.get_default_for([BOX, BOX], gdt)
    t, h = q.shape[0], q.shape[1]
    q_desc = TensorDescriptor(q, [t * h, ENTRY], [ENTRY, 1], [BOX, BOX], layout)
    sub = min(BN, kv_cache.shape[1])
    rows, tok = kv_rows(kv_cache), kv_cache.stride(1)
    if fp8:  # e4m3 entries: the latent part in 128-byte boxes (128-byte swizzle), RoPE in one of 64
        kv_desc = TensorDescriptor(kv_cache, [rows, ENTRY], [tok, 1], [sub, 2 * BOX],
                                   gl.NVMMASharedLayout.get_default_for([sub, 2 * BOX], gl.float8e4nv))
        kr_desc = TensorDescriptor(kv_cache, [rows, ENTRY], [tok, 1], [sub, BOX],
                                   gl.NVMMASharedLayout.get_default_for([sub, BOX], gl.float8e4nv))
    else:
        kv_desc = kr_desc = TensorDescriptor(kv_cache, [rows, ENTRY], [tok, 1], [sub, BOX], layout)
    _decode_gluon_kernel[(row_tiles, parts)](
        q_desc, kv_desc, kr_desc, block_table, block_table.stride(0), seq_lens, qsl if qsl is not None else seq_lens,
        cum, piece, num_seqs, sched_fixed, kv_cache.stride(0) // kv_cache.stride(1),
        out, out.stride(0), out.stride(1), lse if lse is not None else part_l, lse.stride(0) if lse is not None else 0,
        part_o, part_l, slot_rows, h, scale, k_scale if fp8 else seq_lens,
        PAGE=kv_cache.shape[1], HAS_QSL=qsl is not None, WRITE_LSE=lse is not None, FP8=fp8, PDL=pdl,
        num_warps=8, **({"launch_pdl": True} if pdl else {}))
