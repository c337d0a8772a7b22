"""Per-platform launch parameters for the Triton kernels, kept in one place.

Everything here is derived from ``Platform`` facts (vendor, warp / wavefront /
sub-group width, shared-memory limit, compute-unit count, fp8 flavour) and from
problem *shapes*, never from tensor values: the choices are host-side integer
arithmetic, so the ops stay CUDA-graph capturable.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from ...kv_formats import QUANT_FORMATS
from ...platform import Platform


def interpreting() -> bool:
    """True when Triton runs kernels through its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def next_pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


# Kernel-side format codes (constexpr ``FMT``).
FMT_16BIT = 0
FMT_FP8 = 1
FMT_DS_MLA = 2


def format_code(kv_format: str) -> int:
    return {"bfloat16": FMT_16BIT, "float16": FMT_16BIT, "fp8": FMT_FP8,
            "fp8_ds_mla": FMT_DS_MLA}[kv_format]


def fp8_is_fnuz(platform: Platform) -> bool:
    """The per-tensor fp8 format uses e4m3fnuz (bias 8, max 240) on gfx94x, else e4m3fn."""
    return platform.fp8_dtype == torch.float8_e4m3fnuz


def fp8_max(platform: Platform) -> float:
    return float(torch.finfo(platform.fp8_dtype).max)


# How a decode program reads the quantized KV tile (``DecodeConfig.quant_read``; per-tensor fp8
# and the exact fp8_ds_mla path, 16-bit caches ignore it). "twice": the e4m3 bytes once per GEMM
# (QK^T: evict_last, P @ V: evict_first, an L2 hit), each load pipelined; P @ V reads its
# token-major operand from shared memory byte by byte (128 LDS.U8 per thread per 32-token tile
# at 16 x 32 / 4 warps). "once": one read converted once for both GEMMs (sm_90: not pipelined).
# "pairs": P @ V through the cache's 16-bit view (ldmatrix.trans, even / odd columns split in
# registers, two half-width accumulators). "pairs_once": both GEMMs from one 16-bit read (Q split
# into even / odd columns too). "pairs_once_fold": "pairs_once" with fp8_ds_mla's per-KV-tile
# P @ V normaliser folded into the accumulators' softmax rescale (``decode._ds_pairs`` FOLD:
# one multiply per accumulator element, not two; fp8 per-tensor reads as "pairs_once"; H100:
# no faster, 311.7 vs 309.2 us at b=128 S=8192 h=16, so opt-in only). The
# "pairs" reads need the aligned cache (``decode.ds_aligned``);
# other caches read "twice".
QUANT_READS = ("twice", "once", "pairs", "pairs_once", "pairs_once_fold")


@dataclass(frozen=True)
class DecodeConfig:
    block_m: int  # query rows (token x head pairs) per program; all share one KV tile read
    block_n: int  # KV tokens per inner iteration (a tile may span several pages)
    num_warps: int
    num_stages: int
    num_splits: int  # split-KV programs per (sequence, row tile)
    kv_per_split: int  # KV positions per split, a multiple of block_n
    row_tiles: int
    # fp8_ds_mla with kv_lora_rank <= 512: fp16 dots of the raw e4m3 tiles, scales on the fp32
    # scores / P (``decode._ds_exact``); else the tile is dequantized to bf16 before the dots
    exact_ds: bool = True
    # Device-side balanced schedule (``schedule.py``, ``decode._decode_sched_kernel``) instead of
    # the host-planned splits above (``num_splits`` / ``kv_per_split`` then unused): ``parts``
    # persistent programs per row tile, each taking the same number of KV tiles (``block_n``
    # positions each) plus ``sched_fixed`` tiles of fixed cost per sequence it starts.
    scheduled: bool = False
    parts: int = 1
    sched_fixed: int = 4
    # The quantized tile's read (``QUANT_READS``; ``decode_config`` picks "pairs_once" for the
    # 16-row tile on CUDA) and a register cap per thread for the decode kernel (Triton's
    # ``maxnreg``; 0: the compiler's choice; an experiment of ``scripts/triton_tune.py``).
    quant_read: str = "twice"
    maxnreg: int = 0
    # The Hopper Gluon kernel (``decode_gluon``) for the scheduled 64-row tile of a 16-bit or fp8
    # cache, where the call's shapes and strides allow it (``decode_gluon.eligible``; else the
    # Triton kernel with its own tile, ``triton_tile``).
    gluon: bool = False


# Hand-set per vendor. CUDA: from the H100 tuning runs (benchmarks/results/triton_h100_notes.md).
# Wide (>= 32 rows, wgmma): 64 x 64 tokens, 8 warps, 2 stages (749 us vs 1030 us for 64 x 32 at
# b=128, S=4096, h=128; 221 KB of shared memory). Narrow (16 rows, mma.sync): 64 tokens,
# 8 warps, 5 stages, which double-buffers the KV tile behind the block-table read (stages 3-4
# give one buffer): 484 vs 569 us bf16, 685 vs 739 fp8, 1052 vs 1154 fp8_ds_mla at b=128,
# S=8192, h=16 (170 KB). Smaller shared memory falls back to the earlier tiles.
# The 64 x 64 wide tile is for 16-bit caches at 64 rows only (measured there); quantized
# caches keep 64 x 32 (their second, converted tile copy needs 280+ KB at 64 x 64).
# Narrow quantized (fp8, fp8_ds_mla): 32 tokens, 4 warps, 5 stages (255 registers x 128
# threads and 89-94 KB: two programs per SM, where 8 warps x 64 tokens fit one). Session 5 of
# the notes: 3-12 % faster on the fixed-length 16-head rows, 6-9 % slower at b=128, S=8192
# varlen (the long sequences' splits run alone at the end).
# key: (rows >= 32, tile class) -> (block_n, num_warps, num_stages, smem need); the class is
# "16bit64" for 64 rows of a 16-bit cache, "quant" for fp8 / fp8_ds_mla, else "16bit".
_CUDA_DECODE = {(True, "16bit64"): (64, 8, 2, 224 * 1024), (True, "16bit"): (32, 8, 2, 184 * 1024),
                (True, "quant"): (32, 8, 2, 184 * 1024), (False, "16bit"): (64, 8, 5, 176 * 1024),
                (False, "quant"): (32, 4, 5, 96 * 1024)}
_CUDA_DECODE_SMALL_SMEM = {True: (32, 8, 2), False: (64, 8, 3)}
_CUDA_MAX_ROWS = 64
# AMD CDNA: wavefront 64, so 4 "warps" are 256 lanes; LDS is 64 KiB, keep tiles small.
_ROCM_DECODE = (32, 4, 1)
# Intel Xe: sub-group 16/32; modest tiles, single-buffered (the XPU backend pipelines little).
_XPU_DECODE = (32, 8, 1)


def forced_max_rows() -> int | None:
    """``PORTMLA_TRITON_MAX_ROWS`` (16, 32 or 64): the CUDA row tile's bound forced, for A/Bs of
    the row tiles (it also turns off ``decode_config``'s choice for 17..32 rows); None unset."""
    forced = os.environ.get("PORTMLA_TRITON_MAX_ROWS", "")
    if not forced:
        return None
    if forced not in ("16", "32", "64"):
        raise ValueError(f"PORTMLA_TRITON_MAX_ROWS={forced!r}: expected 16, 32 or 64")
    return int(forced)


def max_rows_per_program(platform: Platform) -> int:
    """Upper bound on query rows a decode program holds (its fp32 accumulator is rows x L)."""
    if platform.kind == "cpu":
        return 64
    if platform.kind == "cuda":
        return forced_max_rows() or _CUDA_MAX_ROWS
    if platform.kind == "rocm":
        return 32 if platform.shared_memory_per_block and platform.shared_memory_per_block <= 65536 else 64
    return 64


def triton_tile(platform: Platform, block_m: int, kv_format: str, kv_lora_rank: int) -> tuple[int, int, int]:
    """``(block_n, num_warps, num_stages)`` of the Triton decode kernel's tile (also what a call the
    Gluon kernel does not take falls back to, ``decode.mla_decode``)."""
    if platform.kind == "cuda":
        wide = block_m >= 32
        if kv_format in QUANT_FORMATS:
            tile = "quant"
        else:
            tile = "16bit64" if wide and block_m >= 64 else "16bit"
        block_n, warps, stages, need = _CUDA_DECODE[(wide, tile)]
        smem = platform.shared_memory_per_block or 232448
        if smem < need:
            block_n, warps, stages = _CUDA_DECODE_SMALL_SMEM[block_m >= 32]
        if next_pow2(kv_lora_rank) > 512 or smem < 160 * 1024:
            block_n, stages = 16, 1
        return block_n, warps, stages
    if platform.kind == "rocm":
        return _ROCM_DECODE
    if platform.kind == "xpu":
        return _XPU_DECODE
    return 16, 4, 1  # the interpreter: small tiles keep numpy fast


def decode_config(platform: Platform, num_seqs: int, num_heads: int, max_query_len: int,
                  max_kv_len: int, kv_format: str, kv_lora_rank: int) -> DecodeConfig:
    """Tile sizes, warps and the split count of one decode call, from shapes only."""
    rows = max(1, max_query_len) * num_heads
    block_m = min(max_rows_per_program(platform), max(16, next_pow2(rows)))
    if block_m == 32 and platform.kind == "cuda" and forced_max_rows() is None:
        # 17..32 rows: the Hopper Gluon kernel's 64-row tile where it takes the cache and the
        # batch has more than 8 sequences (its unused rows cost what 64 rows cost), else two
        # 16-row tiles (each KV tile read by both through L2), which keep more programs per SM
        # for small batches; the 32-row Triton tile is the slowest of the three. H100, same call,
        # graph-replay medians, us, 32-row tile / 16-row tiles (at edbf8e9): 128q1s8k h32 fp8
        # 881.8 / 490.1, fp8_ds_mla 1514.1 / 607.3, bf16 911.7 / 630.8; 128q2s8k h16 fp8 876.1
        # / 490.7, fp8_ds_mla 1514.5 / 609.1; 32q1s8k h32 fp8 233.0 / 137.4; 8q1s8k h32 fp8
        # 69.4 / 45.2, fp8_ds_mla 110.0 / 50.9; 64 rows on the 64-row tile (f42ca15): 128q1s8k
        # h64 fp8 443.3, bf16 477.2, fp8_ds_mla (Triton tile, not Gluon) 1083.0; 32 rows, 64-row
        # Gluon tile / 16-row tiles (at aba4323): 128q1s8k h32 fp8 432.6 / 490.1, bf16 457.6 /
        # 625.8; 128q2s8k h16 fp8 425.6 / 486.7, bf16 456.4 / 626.3; 32q1s8k h32 bf16 131.7 /
        # 172.1; but 8q1s8k h32 fp8 46.8 / 45.2, 1q1s32k h32 bf16 41.5 / 34.8. ROCm / XPU and
        # the interpreter keep the 32-row tile (not measured there; the tests cover both).
        block_m = 64 if num_seqs > 8 and use_gluon(platform, 64, kv_format, kv_lora_rank) else 16
    row_tiles = cdiv(rows, block_m)
    per_unit = 1  # programs resident per compute unit at once (shared memory / registers)
    sched_fixed = 2  # the device schedule's fixed cost per sequence, in KV tiles (see below)
    gluon = use_gluon(platform, block_m, kv_format, kv_lora_rank, rows)
    if gluon:  # decode_gluon(_narrow): 64-token tiles (the grid's schedule unit), one CTA an SM
        block_n, warps, stages = (64, 8, 2) if block_m == 64 else (64, 4, NARROW_STAGES)
    else:
        block_n, warps, stages = triton_tile(platform, block_m, kv_format, kv_lora_rank)
    if platform.kind == "cuda" and block_m < 32:
        sched_fixed = 4  # the narrow tiles, 16-bit and quantized (see below)
        if kv_format in QUANT_FORMATS and not gluon:
            per_unit = 2  # 4 warps x 32 tokens: two programs per SM (89-94 KB, 255 registers)
    max_kv_len = max(1, max_kv_len)
    tiles = cdiv(max_kv_len, block_n)
    programs = max(1, num_seqs * row_tiles)
    units = max(1, platform.num_compute_units)
    if platform.kind == "cpu":
        want = 1 if tiles <= 4 else min(4, tiles)  # exercise the combine path on small shapes
    else:
        # Split finely enough that ~4 programs per resident program slot exist (balances
        # varlen batches: short sequences leave their late splits empty), but keep each split
        # long enough that its partial-output write stays small next to its KV read. The
        # narrow quantized CUDA tile fits two programs per SM, so 8 per SM: 1.03-1.19x on the
        # fp8 / fp8_ds_mla h=16 rows (session 6 of the notes; most on varlen). The bf16 narrow
        # tile (one per SM) stays at 4: at 8 it was 3 % faster on b=128 S=8192 varlen and 2 %
        # on b=64 S=32768, but 6 % slower on b=128 S=8192 fixed.
        min_tiles = max(1, (256 if block_m >= 32 else 128) // block_n)
        want = min(cdiv(4 * per_unit * units, programs), max(1, tiles // min_tiles), 64)
    splits = max(1, want)
    per = cdiv(tiles, splits) * block_n
    splits = cdiv(max_kv_len, per)
    # Device schedule: one persistent program per resident program slot and row tile, each
    # taking an equal run of KV tiles (+ a fixed cost per sequence) of the whole batch, so the
    # longest varlen sequences' splits no longer run as a tail. H100 same-data A/B (session 7
    # of benchmarks/results/triton_h100_notes.md), split -> schedule: 16-head b=128 S=8192
    # varlen bf16 481 -> 427 us (2.81 TB/s), fp8 464 -> 395, fp8_ds_mla 566 -> 449; b=64
    # S=32768 fixed 901 -> 819; b=8 S=8192 fixed 59 -> 48; 128 heads b=128 S=4096 varlen
    # 737 -> 603, s_q=2 1335 -> 1112, S=8192 1381 -> 1126, b=64 S=16384 1665 -> 1283, b=32
    # 210 -> 183; b=1 S=32768 65.0 -> 66.5 (a wash). Fixed cost: 4 tiles for the 16-bit narrow
    # tile (b=8: 48.0 vs 52.9 us at 2) and the quantized one (session 9, `--plan qsched`, 2 ->
    # 4: b=8 S=8192 fp8 fixed 41.0 -> 39.0 us, varlen 42.0 -> 40.9, fp8_ds_mla 41.5 -> 40.9 /
    # 44.2 -> 43.2, b=128 varlen fp8 263.6 -> 260.6, ds 308.1 / 309.0; 1 and 8 no better), 2
    # elsewhere (wide b=32: 183 vs 192 at 8). On by default
    # on CUDA (measured) and the interpreter (so the conformance suite covers it); ROCm / XPU
    # keep the split kernel until measured there. The interpreter: 4 parts, so the tests'
    # short sequences get cut into pieces.
    resident = 4 if platform.kind == "cpu" else per_unit * units
    parts = max(1, resident // row_tiles)
    scheduled = platform.kind in ("cuda", "cpu")
    # The exact fp8_ds_mla path wins on narrow tiles (1.5-1.6x at h=16 on the H100) and loses
    # on the 64-row wgmma tile (1762 vs 1232 us at b=128, S=4096, h=128: its four 128-wide dots
    # and four accumulators spill). Same rule everywhere, so the interpreter tests cover both.
    exact_ds = block_m < 32
    # The 16-row quantized tile reads the cache once through its 16-bit view for both GEMMs
    # ("pairs_once"). H100 same-data A/B (session 8 of the notes), fp8 / fp8_ds_mla vs "twice":
    # b=128 S=8192 h=16 fixed 398.9 -> 260.6 / 454.2 -> 310.0 us, varlen 409.1 -> 262.1 /
    # 449.8 -> 311.3, b=64 S=32768 776.7 -> 481.3 / 873.5 -> 580.8, b=8 50.7 -> 40.4 /
    # 51.6 -> 40.8. CUDA (measured) and the interpreter (so the conformance suite runs the
    # default); ROCm / XPU keep "twice" until measured there.
    quant_read = "pairs_once" if kv_format in QUANT_FORMATS and block_m < 32 and \
        platform.kind in ("cuda", "cpu") else "twice"
    # The Gluon kernel (Hopper, 64 rows): fixed cost 4 (H100 sweep on bf16, `triton_tune.py --plan
    # gluon`, benchmarks/results/h100_gluon: 1 / 2 / 4 / 8 -> 128q1s4k 352.5 / 347.8 / 346.8 /
    # 347.6 us, 128q1s8k 639.7 / 629.4 / 625.1 / 634.2, b=32 116.2 / 112.1 / 108.4 / 113.3,
    # s_q=2 648.4 / 641.3 / 636.5 / 639.6; b=1 48.6 / 48.3 / 48.2 / 44.9).
    if gluon:
        sched_fixed = 4
    return DecodeConfig(block_m, block_n, warps, stages, splits, per, row_tiles, exact_ds, scheduled, parts,
                        sched_fixed, quant_read, gluon=gluon)


# Raw KV tiles in flight in the narrow Gluon kernel (``decode_gluon_narrow``; ~37-41 KB each).
NARROW_STAGES = 4


def use_pdl(platform: Platform) -> bool:
    """Programmatic dependent launch of the device-schedule chain (schedule -> decode -> pieces
    combine): each kernel is launched while the one before still runs and waits for its writes
    with ``griddepcontrol.wait`` (sm_90+, CUDA only; the interpreter and ROCm launch normally).
    H100, bench medians (benchmarks/results/triton_h100_notes.md, session 13): b=8 S=8192 h=16
    bf16 / fp8 / fp8_ds_mla 47.3 / 37.7 / 40.4 -> 46.0 / 36.0 / 39.0 us, b=1 S=32768 h=128 48.5
    -> 46.9 us, the large rows unchanged. ``PORTMLA_TRITON_PDL=0`` turns it off (A/B timing)."""
    return (os.environ.get("PORTMLA_TRITON_PDL", "") != "0" and platform.kind == "cuda" and not interpreting()
            and platform.capability is not None and platform.capability[0] >= 9)


def use_gluon(platform: Platform, block_m: int, kv_format: str, kv_lora_rank: int, rows: int = 16) -> bool:
    """A Gluon kernel for this call's tile: Hopper (sm_90), L = 512, a Triton release it was tested
    with (``decode_gluon.TESTED_TRITON``), and either 64 rows of a 16-bit or per-tensor fp8
    (e4m3fn) cache (``decode_gluon``) or, opted in, at most 16 rows a sequence (``rows``) of a
    per-tensor fp8 (e4m3fn) or fp8_ds_mla cache (``decode_gluon_narrow``). ``PORTMLA_TRITON_GLUON=0`` turns both off (A/B
    timing), ``=1`` allows other Triton releases."""
    from .decode_gluon import HAVE_GLUON, triton_tested

    env = os.environ.get("PORTMLA_TRITON_GLUON", "")
    if not (HAVE_GLUON and env != "0" and (env == "1" or triton_tested()) and platform.kind == "cuda"
            and not interpreting() and platform.capability is not None and platform.capability[0] == 9
            and kv_lora_rank == 512):
        return False
    fp8 = kv_format == "fp8" and not fp8_is_fnuz(platform)
    if block_m == 64:
        return kv_format in ("bfloat16", "float16") or fp8
    # The narrow kernel is opt-in (``PORTMLA_TRITON_GLUON_NARROW=1``): on the H100 it is still
    # slower than the Triton kernel's 16-row tile (b=128 S=8192 h=16: fp8 284 vs 265 us,
    # fp8_ds_mla 454 vs 324; benchmarks/results/triton_h100_notes.md, session 12).
    return (block_m == 16 and rows <= 16 and (fp8 or kv_format == "fp8_ds_mla")
            and os.environ.get("PORTMLA_TRITON_GLUON_NARROW", "") == "1")


@dataclass(frozen=True)
class PrefillConfig:
    block_m: int
    block_n: int
    num_warps: int
    num_stages: int


def prefill_config(platform: Platform, qk_dim: int, v_dim: int) -> PrefillConfig:
    big = next_pow2(qk_dim) + next_pow2(v_dim) > 384
    if platform.kind == "cuda":
        return PrefillConfig(128 if not big else 64, 64, 8 if big else 4, 2)
    if platform.kind == "rocm":
        return PrefillConfig(64, 32, 4, 1)
    if platform.kind == "xpu":
        return PrefillConfig(64, 32, 8, 1)
    return PrefillConfig(16, 16, 4, 1)


def elementwise_warps(platform: Platform) -> int:
    """Warps for the small copy / merge kernels (a warp is 64 lanes on CDNA)."""
    return 2 if platform.warp_size >= 64 else 4
