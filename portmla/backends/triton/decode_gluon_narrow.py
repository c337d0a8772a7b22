"""Hopper (sm_90) MLA decode of 16-row tiles of quantized caches (per-tensor fp8, fp8_ds_mla)
in Gluon.

Why: with 16 query rows (16 heads, one token) decode is bound by the cache read, and the
Triton kernel's 16-row tile runs out of instruction issue first (mma.sync m16n8k16, its
loads, conversions and layout moves: ~2.3 TB/s of fp8 bytes on the H100, where bf16 reaches
2.8; benchmarks/results/triton_h100_notes.md, sessions 8-9). Here both products are wgmma
with the *tokens* (or the output columns) as M and the 16 query rows as N ("swap AB"):

* S^T [64 tokens, 16 rows] = K Q^T: K (the A operand) comes from registers, converted from
  the raw e4m3 bytes (one packed instruction per two values): each thread reads 32
  contiguous bytes of a token with two 16-byte loads, and the latent columns are taken in a
  permuted order that makes those bytes exactly the thread's A fragment (Q is stored in
  shared memory in the same order, so the sum over columns is unchanged). Q^T (B) is fp16 in
  shared memory (bf16 rows scaled by a power of two into fp16: exact, ``common.pow2_row_scale``).
* O^T [512, 16 rows] += V^T P^T: V^T (A) again from registers, 16 contiguous bytes of a
  token per load; here the permutation is of the output columns, undone by the epilogue's
  store addresses. P^T (B) is fp16 in shared memory (64 tokens x 16 rows, 2 KB).

No shared-memory copy of a converted tile exists; the raw TMA ring (a one-warp loader
partition walking the device schedule, ``schedule.py``, as ``decode_gluon``) is read twice
by the one compute warpgroup. fp8_ds_mla: the QK^T of each 128-wide scale tile goes to its
own accumulator and is multiplied by the tokens' tile scales in fp32; for P V the values are
multiplied in fp16 by ``scale / running max`` of their tile (<= 1; the running max of each
tile's scales is folded into the output's softmax rescale, as the softmax max is), RoPE
(bf16) is a third product with both operands in shared memory. Partial outputs and LSEs go
to the slots ``decode._decode_sched_kernel`` uses, merged by ``combine._combine_pieces_kernel``.

Takes (``eligible``): 16-row tiles (``decode_config`` block_m 16) of fp8 (e4m3fn, q bf16 or
fp16) or fp8_ds_mla (q bf16) caches, L = 512, R = 64, block sizes 8, 16, 32 or multiples of
64, token / page strides TMA can address (16-byte multiples, the page stride a multiple of the
token stride, 16-byte aligned base). Everything else runs the Triton kernel.
"""

from __future__ import annotations

import torch

from .decode_gluon import BN, HAVE_GLUON, NOPE, ROPE, kv_rows, tma_pages

if HAVE_GLUON:
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.hopper import (
        fence_async_shared,
        mbarrier,
        warpgroup_mma,
        warpgroup_mma_wait,
    )
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

    from .common import pow2_row_scale
    from .decode_gluon import (
        _BN,
        _LOADER_REGS,
        _NOPE,
        _ROPE,
        _kv_tile,
        _lse_inv,
        _part_start,
        _segment,
        _store_segment,
        grid_dependency,
    )

BR = 16  # query rows a CTA: the wgmma's N
DS_SCALES = 16  # bytes of the four float32 tile scales of an fp8_ds_mla entry


def entry_bytes(ds: bool) -> int:
    return NOPE + DS_SCALES + 2 * ROPE if ds else NOPE + ROPE


def eligible(q: torch.Tensor, kv_cache: torch.Tensor, ds: bool, block_size: int, lora: int, rope: int) -> bool:
    """Shapes, dtypes and strides this kernel takes; ``kv_cache`` as stored (uint8 for
    fp8_ds_mla, e4m3fn or uint8 for fp8). Host-only checks (graph-capturable)."""
    if not HAVE_GLUON or lora != NOPE or rope != ROPE or kv_cache.element_size() != 1:
        return False
    if q.dtype not in ((torch.bfloat16,) if ds else (torch.bfloat16, torch.float16)) or q.stride(2) != 1:
        return False
    if kv_cache.dtype not in (torch.uint8, torch.float8_e4m3fn) or kv_cache.shape[2] != entry_bytes(ds):
        return False
    return tma_pages(kv_cache, block_size, entry_bytes(ds))


if HAVE_GLUON:

    _BR = gl.constexpr(BR)
    _DS_SCALES = gl.constexpr(DS_SCALES)

    # The accumulators (S^T [64, 16] and O^T [512, 16]): one warpgroup, wgmma m64n16k16.
    _ACC = gl.constexpr(gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, 16, 16]))
    _A = gl.constexpr(gl.DotOperandLayout(operand_index=0, parent=_ACC.value, k_width=2))
    # Raw loads for QK^T, [64 tokens, 128 latent columns] of e4m3: a thread's 32 contiguous bytes
    # (registers: column bits 0-4, token bit 3), lanes: column bits 5-6, token bits 0-2; warps:
    # token bits 4-5 - the token distribution of the A fragment / the accumulator rows.
    _LQK = gl.constexpr(gl.DistributedLinearLayout(
        reg_bases=[[0, 1], [0, 2], [0, 4], [0, 8], [0, 16], [8, 0]],
        lane_bases=[[0, 32], [0, 64], [1, 0], [2, 0], [4, 0]],
        warp_bases=[[16, 0], [32, 0]], block_bases=[], shape=[64, 128]))
    # The same for the 64 RoPE bytes of a per-tensor fp8 entry (16 contiguous bytes a thread).
    _LQR = gl.constexpr(gl.DistributedLinearLayout(
        reg_bases=[[0, 1], [0, 2], [0, 4], [0, 8], [8, 0]],
        lane_bases=[[0, 16], [0, 32], [1, 0], [2, 0], [4, 0]],
        warp_bases=[[16, 0], [32, 0]], block_bases=[], shape=[64, 64]))
    # Raw loads for P V, [16 tokens, 4 scale tiles, 128 columns]: 16 contiguous bytes a thread
    # (registers: column bits 0-3, token bits 0 and 3), lanes: token bits 1-2, column bits 4-6,
    # warps: the scale tile (so a warp's output rows lie in one fp8_ds_mla tile).
    _LPV = gl.constexpr(gl.DistributedLinearLayout(
        reg_bases=[[0, 0, 1], [0, 0, 2], [0, 0, 4], [0, 0, 8], [1, 0, 0], [8, 0, 0]],
        lane_bases=[[2, 0, 0], [4, 0, 0], [0, 0, 16], [0, 0, 32], [0, 0, 64]],
        warp_bases=[[0, 1, 0], [0, 2, 0]], block_bases=[], shape=[16, 4, 128]))
    # The same distribution as a 2D load of the stage's ``[16, 512]`` rows.
    _LPV2 = gl.constexpr(gl.DistributedLinearLayout(
        reg_bases=[[0, 1], [0, 2], [0, 4], [0, 8], [1, 0], [8, 0]],
        lane_bases=[[2, 0], [4, 0], [0, 16], [0, 32], [0, 64]],
        warp_bases=[[0, 128], [0, 256]], block_bases=[], shape=[16, 512]))
    # fp8_ds_mla tile scales ([64 tokens, 4] float32) with the accumulator rows' distribution.
    _LSC = gl.constexpr(gl.DistributedLinearLayout(
        reg_bases=[[0, 1], [0, 2], [8, 0]],
        lane_bases=[[0, 0], [0, 0], [1, 0], [2, 0], [4, 0]],
        warp_bases=[[16, 0], [32, 0]], block_bases=[], shape=[64, 4]))

    @gluon.constexpr_function
    def _plain(rank):
        return gl.SwizzledSharedLayout(1, 1, 1, list(range(rank - 1, -1, -1)))

    @gluon.jit
    def _perm128(x):
        """Columns of a ``[n, 128]`` chunk in the order the A fragment takes them: logical
        column ``16 s + 8 h + 2 c + l`` is physical ``32 c + 4 s + 2 h + l``."""
        n: gl.constexpr = x.shape[0]
        return gl.reshape(gl.permute(gl.reshape(x, [n, 4, 8, 2, 2]), (0, 2, 3, 1, 4)), [n, 128])

    @gluon.jit
    def _perm64(x):
        """``_perm128`` for a 64-column chunk: logical ``16 s + 8 h + 2 c + l`` is physical
        ``16 c + 4 s + 2 h + l``."""
        n: gl.constexpr = x.shape[0]
        return gl.reshape(gl.permute(gl.reshape(x, [n, 4, 4, 2, 2]), (0, 2, 3, 1, 4)), [n, 64])

    @gluon.jit
    def _out_column(m):
        """The latent column of output row ``m`` of O^T (the order ``_pv_operand`` makes)."""
        return ((m & 7) * 16 + ((m >> 3) & 1) + ((m >> 4) & 3) * 128 + ((m >> 6) & 1) * 2 + ((m >> 7) & 1) * 4
                + ((m >> 8) & 1) * 8)

    @gluon.jit
    def _pv_operand(raw, sc, c, valid, inv_mx, DS: gl.constexpr):
        """V^T's A fragment for tokens ``[16 c, 16 c + 16)`` of a raw stage: ``[512, 16]`` fp16
        in registers (output rows in ``_out_column`` order); tokens ``>= valid`` are zero;
        fp8_ds_mla: times ``scale / running max`` of each token's tile (``inv_mx``: the four
        reciprocals, a ``[4]`` tensor)."""
        x = gl.reshape(raw.slice(16 * c, 16, dim=0).load(_LPV2), [16, 4, 128])
        x = gl.convert_layout(x, _LPV).to(gl.float16)
        tl2: gl.constexpr = gl.SliceLayout(2, _LPV)
        tok = 16 * c + gl.arange(0, 16, gl.SliceLayout(1, tl2))
        if DS:
            r = sc.slice(16 * c, 16, dim=0).load(tl2) * gl.expand_dims(gl.convert_layout(inv_mx, gl.SliceLayout(0, tl2)), 0)
            r = gl.where(gl.expand_dims(tok < valid, 1), r, 0.0).to(gl.float16)
            x = x * gl.expand_dims(r, 2)
        if valid < _BN:  # cache slots past the sequence may hold NaN (0 * NaN is NaN in P V)
            x = gl.where(gl.expand_dims(gl.expand_dims(tok < valid, 1), 2), x, gl.zeros_like(x))
        xt = gl.permute(gl.reshape(x, [16, 512]), (1, 0))  # [512 columns, 16 tokens]
        xp = gl.permute(gl.reshape(xt, [4, 8, 2, 2, 2, 2, 16]), (2, 3, 4, 0, 5, 1, 6))
        return gl.convert_layout(gl.reshape(xp, [512, 16]), _A)

    @gluon.jit
    def _qk_operand(raw, t):
        """K's A fragment for latent columns ``[128 t, 128 t + 128)`` (``_perm128`` order)."""
        x = raw.slice(128 * t, 128, dim=1).load(_LQK).to(gl.float16)
        return gl.convert_layout(_perm128(x), _A)

    @gluon.jit
    def _load_q(q_ptr, stride_qt, stride_qh, q_smem, qr_smem, t0, n_q, H, tile, DS: gl.constexpr):
        """The segment's 16 query rows into shared memory in the A fragment's column order:
        the latent part (and per-tensor fp8's RoPE part) as fp16 scaled by a power of two per
        row; fp8_ds_mla's RoPE part as is (bf16). Returns the rows' inverse scales."""
        ql: gl.constexpr = gl.BlockedLayout([1, 8], [2, 16], [4, 1], [1, 0])
        rows = tile * _BR + gl.arange(0, _BR, gl.SliceLayout(1, ql))
        ok = gl.expand_dims(rows < n_q * H, 1)
        base = gl.expand_dims((t0 + rows // H).to(gl.int64) * stride_qt + (rows % H).to(gl.int64) * stride_qh, 1)
        cols = gl.expand_dims(gl.arange(0, 128, gl.SliceLayout(0, ql)), 0)
        colr = gl.expand_dims(gl.arange(0, _ROPE, gl.SliceLayout(0, ql)), 0)
        x0 = gl.load(q_ptr + base + cols, mask=ok, other=0.0).to(gl.float32)
        x1 = gl.load(q_ptr + base + 128 + cols, mask=ok, other=0.0).to(gl.float32)
        x2 = gl.load(q_ptr + base + 256 + cols, mask=ok, other=0.0).to(gl.float32)
        x3 = gl.load(q_ptr + base + 384 + cols, mask=ok, other=0.0).to(gl.float32)
        xr = gl.load(q_ptr + base + _NOPE + colr, mask=ok, other=0.0)
        amax = gl.maximum(gl.maximum(gl.max(gl.abs(x0), axis=1), gl.max(gl.abs(x1), axis=1)),
                          gl.maximum(gl.max(gl.abs(x2), axis=1), gl.max(gl.abs(x3), axis=1)))
        if not DS:
            amax = gl.maximum(amax, gl.max(gl.abs(xr.to(gl.float32)), axis=1))
        qs, q_inv = pow2_row_scale(amax)
        qs2 = gl.expand_dims(qs, 1)
        q_smem.slice(0, 128, dim=1).store(_perm128((x0 * qs2).to(gl.float16)))
        q_smem.slice(128, 128, dim=1).store(_perm128((x1 * qs2).to(gl.float16)))
        q_smem.slice(256, 128, dim=1).store(_perm128((x2 * qs2).to(gl.float16)))
        q_smem.slice(384, 128, dim=1).store(_perm128((x3 * qs2).to(gl.float16)))
        if DS:
            qr_smem.store(xr)
        else:
            qr_smem.store(_perm64((xr.to(gl.float32) * qs2).to(gl.float16)))
        fence_async_shared()
        gl.thread_barrier()
        return gl.convert_layout(q_inv, gl.SliceLayout(0, _ACC))

    @gluon.jit
    def _scores(raw, raw_rope, sc, q_smem, qr_smem, q_inv, sl2, DS: gl.constexpr):
        """S^T of a raw stage, float32 ``[64 tokens, 16 rows]`` in base-2 units (unmasked).
        While a product is in flight only its A registers are waited on (reading an in-flight
        accumulator makes ptxas serialize every wgmma of the kernel)."""
        z = gl.zeros([_BN, _BR], gl.float32, _ACC)
        a0 = _qk_operand(raw, 0)
        s0 = warpgroup_mma(a0, q_smem.slice(0, 128, dim=1).permute((1, 0)), z, is_async=True)
        a1 = _qk_operand(raw, 1)
        s1 = warpgroup_mma(a1, q_smem.slice(128, 128, dim=1).permute((1, 0)), z if DS else s0, is_async=True)
        a0 = warpgroup_mma_wait(num_outstanding=1, deps=[a0])
        a2 = _qk_operand(raw, 2)
        s2 = warpgroup_mma(a2, q_smem.slice(256, 128, dim=1).permute((1, 0)), z if DS else s1, is_async=True)
        a1 = warpgroup_mma_wait(num_outstanding=1, deps=[a1])
        a3 = _qk_operand(raw, 3)
        if DS:
            s3 = warpgroup_mma(a3, q_smem.slice(384, 128, dim=1).permute((1, 0)), z, is_async=True)
            sr = warpgroup_mma(raw_rope, qr_smem.permute((1, 0)), z, is_async=True)
            s0, s1, s2, s3, sr, a2, a3 = warpgroup_mma_wait(num_outstanding=0, deps=[s0, s1, s2, s3, sr, a2, a3])
            x = sc.load(_LSC)
            col = gl.expand_dims(gl.arange(0, 4, gl.SliceLayout(0, _LSC)), 0)
            row: gl.constexpr = gl.SliceLayout(1, _ACC)
            nope = (s0 * gl.expand_dims(gl.convert_layout(gl.sum(gl.where(col == 0, x, 0.0), axis=1), row), 1)
                    + s1 * gl.expand_dims(gl.convert_layout(gl.sum(gl.where(col == 1, x, 0.0), axis=1), row), 1)
                    + s2 * gl.expand_dims(gl.convert_layout(gl.sum(gl.where(col == 2, x, 0.0), axis=1), row), 1)
                    + s3 * gl.expand_dims(gl.convert_layout(gl.sum(gl.where(col == 3, x, 0.0), axis=1), row), 1))
            return (nope * gl.expand_dims(q_inv, 0) + sr) * sl2
        else:
            s3 = warpgroup_mma(a3, q_smem.slice(384, 128, dim=1).permute((1, 0)), s2, is_async=True)
            a2 = warpgroup_mma_wait(num_outstanding=1, deps=[a2])
            ar = gl.convert_layout(_perm64(raw_rope.load(_LQR).to(gl.float16)), _A)
            sr = warpgroup_mma(ar, qr_smem.permute((1, 0)), s3, is_async=True)
            sr, ar, a3 = warpgroup_mma_wait(num_outstanding=0, deps=[sr, ar, a3])
            return sr * (gl.expand_dims(q_inv, 0) * sl2)

    @gluon.jit
    def _per_tile(v, tiles, t_out):
        """``v[t_out]`` for every output row: ``v`` the four scale tiles' values (a ``[4]``
        tensor each thread holds whole, indexed by ``tiles``), ``t_out`` the rows' tiles."""
        v0 = gl.sum(gl.where(tiles == 0, v, 0.0), axis=0)
        v1 = gl.sum(gl.where(tiles == 1, v, 0.0), axis=0)
        v2 = gl.sum(gl.where(tiles == 2, v, 0.0), axis=0)
        v3 = gl.sum(gl.where(tiles == 3, v, 0.0), axis=0)
        return gl.where(t_out == 0, v0, gl.where(t_out == 1, v1, gl.where(t_out == 2, v2, v3)))

    @gluon.jit
    def _narrow_loader(kv_desc, ks_desc, kr_desc, raw, raw_sc, raw_rope, ready, empty,
                       bt_ptr, stride_bt, seq_lens_ptr, qsl_ptr, cum_ptr, num_seqs, sched_fixed, H, rows_per_page,
                       PAGE: gl.constexpr, HAS_QSL: gl.constexpr, DS: gl.constexpr, NSTAGE: gl.constexpr):
        """The one-warp TMA partition: the part's KV tiles in order into the ring."""
        NBYTES: gl.constexpr = _BN * (_NOPE + _DS_SCALES + 2 * _ROPE) if DS else _BN * (_NOPE + _ROPE)
        # fp8_ds_mla's RoPE box: bf16 columns of the entry, past its 512 + 16 bytes
        ROPE_COL: gl.constexpr = (_NOPE + _DS_SCALES) // 2 if DS else _NOPE
        tile = gl.program_id(0)
        per_part, lo, hi, b, c = _part_start(cum_ptr, num_seqs)
        g = 0
        while (b < num_seqs) & (c < hi):
            c_next = gl.load(cum_ptr + b + 1)
            run, t0, n_q, seq_len, kv_lo, kv_hi = _segment(cum_ptr, seq_lens_ptr, qsl_ptr, b, c, c_next, lo, hi,
                                                           tile, H, sched_fixed, HAS_QSL, _BR)
            if run & (kv_lo < kv_hi):
                bt_row = bt_ptr + b.to(gl.int64) * stride_bt
                for start in range(kv_lo, kv_hi, _BN):
                    _kv_tile(kv_desc, ks_desc, kr_desc, raw, raw_sc, raw_rope, ready, empty, g, bt_row, start,
                             kv_hi, rows_per_page, NBYTES, NSTAGE, PAGE, DS, ROPE_COL)
                    g += 1
            b += 1
            c = c_next

    @gluon.jit
    def _narrow_compute(raw, raw_sc, raw_rope, q_smem, qr_smem, p_smem, ready, empty,
                        q_ptr, stride_qt, stride_qh, seq_lens_ptr, qsl_ptr, cum_ptr, num_seqs, sched_fixed,
                        piece_ptr, o_ptr, stride_ot, stride_oh, lse_ptr, stride_lt, po_ptr, pl_ptr, slot_rows,
                        H, qk_scale, kscale_ptr, HAS_QSL: gl.constexpr, WRITE_LSE: gl.constexpr,
                        DS: gl.constexpr, NSTAGE: gl.constexpr):
        """The compute warpgroup: every segment's attention and its epilogue."""
        col_l: gl.constexpr = gl.SliceLayout(0, _ACC)  # query rows
        row_l: gl.constexpr = gl.SliceLayout(1, _ACC)  # tokens / output rows
        tile = gl.program_id(0)
        part = gl.program_id(1)
        per_part, lo, hi, b, c = _part_start(cum_ptr, num_seqs)
        g = 0
        if DS:
            k_scale = 1.0
        else:
            k_scale = gl.load(kscale_ptr)
        sl2 = qk_scale * k_scale
        cols = tile * _BR + gl.arange(0, _BR, col_l)
        toks = gl.arange(0, _BN, row_l)
        m_out = gl.arange(0, _NOPE, row_l)
        d_out = _out_column(m_out)
        t_out = (m_out >> 4) & 3  # the output row's fp8_ds_mla tile (= the warp holding it)
        sc_t = gl.arange(0, 4, gl.SliceLayout(0, _LSC))
        while (b < num_seqs) & (c < hi):
            c_next = gl.load(cum_ptr + b + 1)
            run, t0, n_q, seq_len, kv_lo, kv_hi = _segment(cum_ptr, seq_lens_ptr, qsl_ptr, b, c, c_next, lo, hi,
                                                           tile, H, sched_fixed, HAS_QSL, _BR)
            if run:
                limit = seq_len - n_q + cols // H  # the last KV position each row sees (causal)
                m_i = gl.full([_BR], float("-inf"), gl.float32, col_l)
                l_part = gl.zeros([_BN, _BR], gl.float32, _ACC)  # sums per element, reduced once
                o = gl.zeros([_NOPE, _BR], gl.float32, _ACC)
                mx = gl.zeros([4], gl.float32, gl.SliceLayout(0, _LSC))  # running max of each tile's scales
                if kv_lo < kv_hi:
                    gl.thread_barrier()  # the previous segment's products are done with Q
                    q_inv = _load_q(q_ptr, stride_qt, stride_qh, q_smem, qr_smem, t0, n_q, H, tile, DS)
                    n_tiles = (kv_hi - kv_lo + _BN - 1) // _BN
                    for j in range(n_tiles):
                        st = g % NSTAGE
                        mbarrier.wait(ready.index(st), (g // NSTAGE) & 1)
                        start = kv_lo + j * _BN
                        valid = kv_hi - start
                        pos = start + toks
                        sc = raw_sc.index(st)
                        s = _scores(raw.index(st), raw_rope.index(st), sc, q_smem, qr_smem, q_inv, sl2, DS)
                        keep = (gl.expand_dims(pos, 1) < kv_hi) & (gl.expand_dims(pos, 1) <= gl.expand_dims(limit, 0))
                        s = gl.where(keep, s, float("-inf"))
                        m_new = gl.maximum(m_i, gl.max(s, axis=0))
                        m_use = gl.where(m_new == float("-inf"), 0.0, m_new)
                        alpha = gl.exp2(m_i - m_use)
                        p = gl.exp2(s - gl.expand_dims(m_use, 0))
                        l_part = l_part * gl.expand_dims(alpha, 0) + p
                        m_i = m_new
                        if DS:  # the tiles' running scale maxima, folded into the rescale
                            xs = sc.load(_LSC)
                            tok_ok = gl.expand_dims(gl.arange(0, _BN, gl.SliceLayout(1, _LSC)) < valid, 1)
                            mx_new = gl.maximum(mx, gl.max(gl.where(tok_ok, xs, 0.0), axis=0))
                            f = gl.where(mx_new > 0, mx / gl.where(mx_new > 0, mx_new, 1.0), 1.0)
                            o = o * (gl.expand_dims(_per_tile(f, sc_t, t_out), 1) * gl.expand_dims(alpha, 0))
                            mx = mx_new
                            inv_mx = 1.0 / gl.where(mx > 0, mx, 1.0)
                        else:
                            o = o * gl.expand_dims(alpha, 0)
                            inv_mx = mx
                        p_smem.store(gl.permute(p, (1, 0)).to(gl.float16))
                        fence_async_shared()
                        gl.thread_barrier()
                        v0 = _pv_operand(raw.index(st), sc, 0, valid, inv_mx, DS)
                        o = warpgroup_mma(v0, p_smem.slice(0, 16, dim=1).permute((1, 0)), o, is_async=True)
                        v1 = _pv_operand(raw.index(st), sc, 1, valid, inv_mx, DS)
                        o = warpgroup_mma(v1, p_smem.slice(16, 16, dim=1).permute((1, 0)), o, is_async=True)
                        v0 = warpgroup_mma_wait(num_outstanding=1, deps=[v0])
                        v2 = _pv_operand(raw.index(st), sc, 2, valid, inv_mx, DS)
                        o = warpgroup_mma(v2, p_smem.slice(32, 16, dim=1).permute((1, 0)), o, is_async=True)
                        v1 = warpgroup_mma_wait(num_outstanding=1, deps=[v1])
                        v3 = _pv_operand(raw.index(st), sc, 3, valid, inv_mx, DS)
                        o = warpgroup_mma(v3, p_smem.slice(48, 16, dim=1).permute((1, 0)), o, is_async=True)
                        o, v2, v3 = warpgroup_mma_wait(num_outstanding=0, deps=[o, v2, v3])
                        gl.thread_barrier()  # every thread done with the stage and with P
                        mbarrier.arrive(empty.index(st), count=1)
                        g += 1
                # epilogue: o / l (0 where nothing was seen) + natural-log LSE
                l_i = gl.sum(l_part, axis=0)
                lse, inv = _lse_inv(m_i, l_i)
                out = o * gl.expand_dims(inv, 0)
                if DS:
                    out = out * gl.expand_dims(_per_tile(mx, sc_t, t_out), 1)
                else:
                    out = out * k_scale
                _store_segment(out, lse, cols, cols, d_out, 0, t0, n_q, H, b, c, part, per_part, sched_fixed,
                               piece_ptr, po_ptr, pl_ptr, slot_rows, o_ptr, stride_ot, stride_oh, lse_ptr, stride_lt,
                               WRITE_LSE)
            b += 1
            c = c_next

    @gluon.jit
    def _decode_narrow_kernel(kv_desc, ks_desc, kr_desc, q_ptr, stride_qt, stride_qh, bt_ptr, stride_bt,
                              seq_lens_ptr, qsl_ptr, cum_ptr, piece_ptr, num_seqs, sched_fixed, rows_per_page,
                              o_ptr, stride_ot, stride_oh, lse_ptr, stride_lt, po_ptr, pl_ptr, slot_rows,
                              H, qk_scale, kscale_ptr, PAGE: gl.constexpr, HAS_QSL: gl.constexpr,
                              WRITE_LSE: gl.constexpr, DS: gl.constexpr, NSTAGE: gl.constexpr,
                              PDL: gl.constexpr = False):
        raw = gl.allocate_shared_memory(kv_desc.dtype, [NSTAGE, _BN, _NOPE], kv_desc.layout)
        raw_rope = gl.allocate_shared_memory(kr_desc.dtype, [NSTAGE, _BN, _ROPE], kr_desc.layout)
        if DS:
            raw_sc = gl.allocate_shared_memory(ks_desc.dtype, [NSTAGE, _BN, _DS_SCALES], ks_desc.layout)
            scales = raw_sc._reinterpret(gl.float32, [NSTAGE, _BN, 4], _plain(2))
        else:
            raw_sc = gl.allocate_shared_memory(gl.float32, [NSTAGE, _BN, 4], _plain(2))  # unused
            scales = raw_sc
        qsl: gl.constexpr = gl.NVMMASharedLayout(swizzle_byte_width=128, element_bitwidth=16, rank=2)
        q_smem = gl.allocate_shared_memory(gl.float16, [_BR, _NOPE], qsl)
        qr_smem = gl.allocate_shared_memory(gl.bfloat16 if DS else gl.float16, [_BR, _ROPE], qsl)
        p_smem = gl.allocate_shared_memory(gl.float16, [_BR, _BN], qsl)
        ready = gl.allocate_shared_memory(gl.int64, [NSTAGE, 1], mbarrier.MBarrierLayout())
        empty = gl.allocate_shared_memory(gl.int64, [NSTAGE, 1], mbarrier.MBarrierLayout())
        for i in gl.static_range(NSTAGE):
            mbarrier.init(ready.index(i), count=1)
            mbarrier.init(empty.index(i), count=1)
        grid_dependency(PDL)
        gl.warp_specialize([
            (_narrow_compute, (raw, scales, raw_rope, q_smem, qr_smem, p_smem, ready, empty,
                               q_ptr, stride_qt, stride_qh, seq_lens_ptr, qsl_ptr, cum_ptr, num_seqs, sched_fixed,
                               piece_ptr, o_ptr, stride_ot, stride_oh, lse_ptr, stride_lt, po_ptr, pl_ptr, slot_rows,
                               H, qk_scale, kscale_ptr, HAS_QSL, WRITE_LSE, DS, NSTAGE)),
            (_narrow_loader, (kv_desc, ks_desc, kr_desc, raw, raw_sc, raw_rope, ready, empty,
                              bt_ptr, stride_bt, seq_lens_ptr, qsl_ptr, cum_ptr, num_seqs, sched_fixed, H,
                              rows_per_page, PAGE, HAS_QSL, DS, NSTAGE)),
        ], [1], [_LOADER_REGS])


def descriptors(kv_cache: torch.Tensor, ds: bool):
    """TMA descriptors of the raw cache: the latent part in 128-byte boxes (128-byte swizzle),
    fp8_ds_mla's scales (16-byte boxes) and RoPE (bf16 view), or per-tensor fp8's RoPE bytes."""
    kv = kv_cache.view(torch.float8_e4m3fn)
    sub = min(BN, kv.shape[1])
    rows, tok = kv_rows(kv), kv.stride(1)
    width = kv.shape[2]
    kv_desc = TensorDescriptor(kv, [rows, width], [tok, 1], [sub, 128],
                               gl.NVMMASharedLayout.get_default_for([sub, 128], gl.float8e4nv))
    if ds:
        ks_desc = TensorDescriptor(kv, [rows, width], [tok, 1], [sub, DS_SCALES],
                                   gl.NVMMASharedLayout(swizzle_byte_width=0, element_bitwidth=8, rank=2))
        kb = kv_cache.view(torch.bfloat16)
        kr_desc = TensorDescriptor(kb, [rows, width // 2], [tok // 2, 1], [sub, ROPE],
                                   gl.NVMMASharedLayout.get_default_for([sub, ROPE], gl.bfloat16))
    else:
        ks_desc = kv_desc
        kr_desc = TensorDescriptor(kv, [rows, width], [tok, 1], [sub, ROPE],
                                   gl.NVMMASharedLayout.get_default_for([sub, ROPE], gl.float8e4nv))
    return kv_desc, ks_desc, kr_desc


def launch(q, kv_cache, ds, block_table, seq_lens, qsl, cum, piece, num_seqs, sched_fixed, out, lse, part_o,
           part_l, slot_rows, scale, row_tiles, parts, k_scale, stages, pdl=False) -> None:
    """One launch over the device schedule (``cum`` / ``piece`` from ``launch_schedule``);
    ``qsl`` is None for one query token per sequence; ``scale`` is base 2; ``k_scale`` (a
    device scalar) for per-tensor fp8; ``stages`` raw KV tiles in flight (``launch.NARROW_STAGES``)."""
    kv_desc, ks_desc, kr_desc = descriptors(kv_cache, ds)
    _decode_narrow_kernel[(row_tiles, parts)](
        kv_desc, ks_desc, kr_desc, q, q.stride(0), q.stride(1), block_table, block_table.stride(0),
        seq_lens, qsl if qsl is not None else seq_lens, cum, piece, num_seqs, sched_fixed,
        kv_cache.stride(0) // kv_cache.stride(1),
        out, out.stride(0), out.stride(1), lse if lse is not None else part_l, lse.stride(0) if lse is not None else 0,
        part_o, part_l, slot_rows, q.shape[1], scale, k_scale if not ds else seq_lens,
        PAGE=kv_cache.shape[1], HAS_QSL=qsl is not None, WRITE_LSE=lse is not None, DS=ds, NSTAGE=stages, PDL=pdl,
        num_warps=4, **({"launch_pdl": True} if pdl else {}))
