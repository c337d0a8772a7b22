"""Native CUDA backend: ``portmla._cuda`` (built from ``csrc_cuda/`` by ``csrc_cuda/build.py``).

Kernels (see ``csrc_cuda/NOTES.md``):

* ``mla_decode`` on sm_90 (H100 / H200), bf16 / fp16 caches with block size 16, 32 or a
  multiple of 64: the Hopper kernels (TMA tile loads, wgmma for both products, 64 rows per
  CTA): the pair kernel (a producer warpgroup; each consumer warpgroup takes the scores of
  one of two KV tiles) above ``HOPPER_TILE_MAX_ROWS`` rows per sequence, the single-tile
  kernel at or below, the narrow kernel (16 rows per CTA, both products transposed so the KV
  tile is wgmma's M side) at or below ``HOPPER_NARROW_MAX_ROWS``;
  ``PORTMLA_CUDA_HOPPER=pair`` / ``tile`` / ``narrow`` forces one, ``0`` uses the generic
  kernels instead.
* ``mla_decode`` on sm_90 with an fp8 / fp8_ds_mla cache and more than 16 (token, head) rows
  per sequence with block size 32 or a multiple of 64, more than 32 with any other
  (``hopper_quant_min_rows``): the pair kernel, its producer warpgroup loading the raw entries
  into the stages (TMA, or cp.async copies where the block size or strides do not tile) and the
  consumer warpgroups expanding them in place to fp16 before their wgmma: fp8 e4m3 exactly,
  fp8_ds_mla values over a power of two a warp's tokens share (its bf16 RoPE on bf16 wgmma);
  bf16 or fp16 queries (fp8_ds_mla: bf16) scaled per row into fp16 by a power of two.
* ``mla_decode`` on sm_90 with an fp8 / fp8_ds_mla cache, at most ``HOPPER_NARROW_MAX_ROWS``
  rows per sequence and block size 16, 32 or a multiple of 64: the narrow kernel's quantized form
  (raw e4m3 entries through TMA, both KV operands converted to fp16 in registers for wgmma, two
  CTAs per SM; fp8 with bf16 / fp16 queries, fp8_ds_mla with bf16);
  ``PORTMLA_CUDA_HOPPER=narrow`` forces it for any row count.
* ``mla_decode`` with an fp8 / fp8_ds_mla cache and at most ``QUANT_MAX_ROWS`` (token, head)
  rows per sequence on sm_89+ (the calls the kernels above do not take): the quantized-cache kernel (raw e4m3 bytes in shared memory,
  converted to fp16 in registers at the mma fragment load; 16 rows per CTA, two CTAs per SM);
  ``PORTMLA_CUDA_QUANT=0`` uses the generic kernels instead.
* ``mla_decode`` elsewhere: generic sm80+ kernels (mma.sync m16n8k16 + cp.async), 16 or 64
  (token, head) rows per CTA so a KV tile is read once for all of them; every KV format, any
  block size and cache strides (16-byte aligned), varlen causal query tokens.
* Split-KV: the Hopper and quantized-cache kernels are persistent and split the work by a
  schedule computed on the device from ``seq_lens`` each call; the generic kernels by a
  host plan from shapes only. Both merge pieces by LSE; deterministic; no host reads
  (CUDA-graph safe). The persistent kernels merge them themselves: the narrow Hopper kernels
  with more than 32 sequences each cut sequence by the CTA that stores its last piece (piece
  counters, no barrier); otherwise a cooperative launch with a grid-wide barrier when the rows
  to merge come to at most 16 a CTA, else a merge kernel runs. ``PORTMLA_CUDA_TAIL_MERGE=0``:
  always the merge kernel; ``=barrier``: never the last-piece merge.
* ``concat_and_cache_mla`` / ``gather_cache``: every format, any block size.

The module is a table of launch functions taking plain structs; this file validates what
the kernels need beyond the public checks and fills those structs. A missing or broken
build is a reason, never an import error.
"""

from __future__ import annotations

import functools
import importlib
import os
from pathlib import Path

import torch

from ..kv_formats import QUANT_FORMATS
from ..platform import Platform
from ..problems import CacheWriteProblem, DecodeProblem, GatherProblem, Problem
from ..reasons import Reason
from .base import ALL_KV_FORMATS, Backend, _dtype_name

_STATUS_FILE = Path(__file__).resolve().parent.parent / "_cuda_build_status.txt"

# codes of csrc_cuda/common/params.h
_DTYPE_CODE = {torch.bfloat16: 0, torch.float16: 1, torch.float32: 2,
               torch.float8_e4m3fn: 3, torch.uint8: 4, torch.int32: 5, torch.int64: 6}
_FORMAT_CODE = {"bfloat16": 0, "float16": 0, "fp8": 1, "fp8_ds_mla": 2}
_FORMAT_TORCH = {"bfloat16": torch.bfloat16, "float16": torch.float16}
HOPPER_FORMATS = tuple(_FORMAT_TORCH)  # the 16-bit caches; fp8 formats: the generic kernels

MAX_SPLITS = 256
MIN_SPLIT_CHUNK = 512  # KV positions: below that the partial outputs cost more than they save
SPLIT_GRANULE = 64     # chunks are whole KV tiles of every variant
SPLIT_WAVES = 16       # CTAs per resident slot for the upper bound of the work
NARROW_MAX_ROWS = 32   # rows per sequence (query tokens x heads) served by 16-row tiles
MAX_GRID_Y = 65535
# Hopper kernels: the device schedule (csrc_cuda/common/schedule.cuh) gives each of
# num_parts CTAs per row tile the same share of all sequences' KV tiles, plus this fixed cost
# per sequence (Q load, epilogue) in tiles, per kernel (``sched_fixed_key``); fitted to H100
# sweeps (scripts/cuda_split_sweep.py). "hopper_quant": the pair kernel expanding an
# fp8_ds_mla cache, whose tiles cost more (3; 6 at 128 heads: 128q1s4k 406.4 vs 407.9 us,
# 64q1s16k 770.5 vs 745.0 at 08759cd). Per-tensor fp8 takes the 16-bit caches' value since its
# raw entries come through TMA (08759cd sweep, 3 vs 6: 128q1s4k 369.5 vs 362.0, 128q1s8k 654.3
# vs 645.8, 64q1s16k 646.9 vs 640.8, 32q1s4k 111.4 vs 109.8; it was 3 while copied).
# "hopper_narrow_quant": 4 (H100 sweep at 9bbb840, fixed cost 2 / 3 / 4 / 6: fp8_ds_mla 128q1s8k
# fixed 277.5 / 277.2 / 273.5 / 274.2 us, 64q1s32k fixed 511.2 / 507.4 / 506.1 / 507.3, fp8 8q1s8k
# 34.0 / 32.8 / 33.5 / 33.4, 128q1s8k varlen 250.8 / 249.1 / 249.3 / 252.5).
# "hopper_narrow_ds": that kernel with an fp8_ds_mla cache, 5 (H100 at 04c8821, four alternating
# rounds of 4 / 6 / 5, means: 128q1s8k varlen 276.6 / 274.5 / 273.6 us, fixed 265.7 / 266.2 /
# 266.2, 64q1s32k fixed 502.5 / 500.6 / 502.1, 8q1s8k 33.4 / 33.5 / 33.4; fp8 stays at 4:
# 128q1s8k varlen 4 / 5 / 6 240.9 / 241.4 / 243.3).
SCHED_FIXED = {"hopper": 6, "hopper_tile": 3, "hopper_narrow": 3, "quant": 2, "hopper_quant": 3,
               "hopper_narrow_quant": 4, "hopper_narrow_ds": 5}
# The kernels with an fp8_ds_mla entry of their own in SCHED_FIXED (sched_fixed_key).
_SCHED_FIXED_DS = {"hopper": "hopper_quant", "hopper_narrow_quant": "hopper_narrow_ds"}
MAX_GRID_PARTS = 65535
# Rows per sequence (query tokens x heads) served by the quantized kernel (16 a CTA): up to 32 it
# is 1.6-1.8x faster than bf16 on the 16-head rows; at 64-128 rows it is compute-bound there
# too, but still beats the generic wide kernel (H100, fp8 / fp8_ds_mla us, quant vs wide:
# b=128 s_q=4 S=8192 h=16 918 / 1172 vs 1075 / 1249, h=64 b=64 S=8192 488 / 611 vs 624 / 703,
# h=128 b=128 S=4096 943 / 1184 vs 1029 / 1195; b=8 s_q=4 h=16 74 / 93 vs 75 / 90).
QUANT_MAX_ROWS = 128
QUANT_MIN_CAPABILITY = (8, 9)  # e4m3 -> fp16 in one instruction (sm_80 / 86 would emulate it)


def hopper_unusable(mod, platform: Platform) -> str | None:
    """Why the Hopper kernel serves no call on ``platform`` (None: it serves the calls it takes)."""
    if platform.capability != (9, 0):
        return f"capability {platform.capability} (sm_90a code)"
    if "hopper" not in mod.DECODE_VARIANTS:
        return f"not built: {getattr(mod, 'HOPPER_NOT_BUILT', None) or 'not in this build'}"
    if os.environ.get("PORTMLA_CUDA_HOPPER", "1") == "0":
        return "off: PORTMLA_CUDA_HOPPER=0"
    return None


# Rows per sequence up to which the single-tile kernel is faster than the pair kernel (16-bit
# caches; one row tile, where few heads leave the call closer to the HBM bound). H100, same
# call, graph-replay medians, us, pair / tile (at 4b55086): 48 rows 128q3s8k h16 504.6 / 462.1,
# 128q1s8k h48 496.4 / 463.2; 64 rows 128q1s8k h64 502.0 / 470.5, 32q1s8k 142.8 / 122.6, 8q1s8k
# 51.1 / 42.8; 32 rows 128q1s8k 493.2 / 444.9, 128q2s8k h16 496.6 / 445.5. Above one row tile
# (128 heads) the pair kernel wins (the anchors' rows).
HOPPER_TILE_MAX_ROWS = 64
HOPPER_NARROW_MAX_ROWS = 16  # rows per sequence up to which the narrow kernel is faster
_HOPPER_FORCE = {"pair": "hopper", "tile": "hopper_tile", "narrow": "hopper_narrow"}


def hopper_kernel_name(mod, rows: int) -> str:
    """``DECODE_VARIANTS`` key of the Hopper kernel for ``rows`` (query tokens x heads) per
    sequence: ``hopper`` (KV tiles in pairs, one per consumer warpgroup, a TMA producer
    warpgroup; compute-bound shapes), ``hopper_tile`` (one tile at a time, both warpgroups
    on it) or ``hopper_narrow`` (16 rows a CTA, the products transposed: a quarter of the
    tensor work where few rows make the call memory-bound), H100-measured.
    ``PORTMLA_CUDA_HOPPER=pair`` / ``tile`` / ``narrow`` forces one (where built)."""
    have = mod.DECODE_VARIANTS
    forced = _HOPPER_FORCE.get(os.environ.get("PORTMLA_CUDA_HOPPER", ""))
    if forced in have:
        return forced
    if "hopper_narrow" in have and rows <= HOPPER_NARROW_MAX_ROWS:
        return "hopper_narrow"
    if "hopper_tile" not in have:
        return "hopper"
    return "hopper_tile" if rows <= HOPPER_TILE_MAX_ROWS else "hopper"


def hopper_block_size_ok(block_size: int) -> bool:
    """Block sizes the Hopper kernel's TMA boxes take (csrc_cuda/sm90/decode/decode_hopper.cu)."""
    return block_size >= 16 and (64 % block_size == 0 or block_size % 64 == 0)


def sched_fixed_key(kernel: str, kv_format: str) -> str:
    """The ``SCHED_FIXED`` entry of ``kernel`` with a ``kv_format`` cache."""
    return _SCHED_FIXED_DS.get(kernel, kernel) if kv_format == "fp8_ds_mla" else kernel


def tail_merge_wanted() -> int:
    """1: the scheduled kernels merge the cut sequences' pieces themselves (the launcher picks
    how: csrc_cuda/common/params.h ``TailMerge``; where none applies the merge kernel runs).
    ``PORTMLA_CUDA_TAIL_MERGE=0``: always the merge kernel."""
    return 0 if os.environ.get("PORTMLA_CUDA_TAIL_MERGE") == "0" else 1


# PORTMLA_CUDA_KV_L2 -> DecodeParams::kv_l2_hint (csrc_cuda/common/params.h: KvL2Hint).
KV_L2_HINTS = {"auto": 0, "none": 1, "first": 2, "last": 3}


def kv_l2_hint() -> int:
    """The L2 eviction priority of the Hopper kernels' KV tile loads. ``auto`` (the default):
    evict_first where the grid has one row tile (each KV tile read by one CTA), the plain load
    where several row tiles read each tile (they meet in L2). ``none``, ``first`` and ``last``
    force one form for every call (A/Bs; ``none`` where sequences of a batch share prefix pages,
    which the plain load may keep in L2 between their readers)."""
    v = os.environ.get("PORTMLA_CUDA_KV_L2", "auto")
    if v not in KV_L2_HINTS:
        raise ValueError(f"PORTMLA_CUDA_KV_L2={v!r}: expected one of {', '.join(KV_L2_HINTS)}")
    return KV_L2_HINTS[v]


# The variants whose launcher takes the last-piece merge (csrc_cuda/sm90/decode/launch_kernel.cuh:
# run_narrow / run_narrow_quant pass kTakesArrive).
TAIL_ARRIVE_VARIANTS = ("hopper_narrow", "hopper_narrow_quant")


def tail_arrive_wanted() -> bool:
    """Whether the call passes the piece counters of the last-piece merge (the narrow Hopper
    kernels with the schedule kernel: each cut sequence merged by the CTA that stores its last
    piece, no grid barrier). ``PORTMLA_CUDA_TAIL_MERGE=barrier``: not (the grid-barrier merge)."""
    return os.environ.get("PORTMLA_CUDA_TAIL_MERGE") not in ("0", "barrier")


def tail_count_wanted() -> bool:
    """Whether the 16-bit pair kernel counts the pieces it stores, so that the merge kernel can
    launch at its start and merge each cut sequence once its pieces are in (csrc_cuda/common/
    params.h ``kTailCount``; only with the schedule kernel and many rows to merge). Off with
    ``PORTMLA_CUDA_TAIL_MERGE`` = 0 / barrier, or ``PORTMLA_CUDA_PIECE_COUNT=0``."""
    return tail_arrive_wanted() and os.environ.get("PORTMLA_CUDA_PIECE_COUNT", "1") != "0"


def sched_parts(m_tiles: int, sms: int, per_sm: int = 1) -> int:
    """Persistent parts of the scheduled kernels: ``per_sm`` CTAs per SM over all row tiles."""
    return max(1, min(MAX_GRID_PARTS, sms * per_sm // max(1, m_tiles)))


# Rows per sequence above which an fp8 / fp8_ds_mla cache with queries the pair kernel takes
# (``hopper_quant_query_dtypes``) goes there (raw entries expanded to 16-bit in its stages)
# rather than to the quantized-cache kernel, whose 16-row mma.sync tiles are compute-bound there.
# With block size 32 or a multiple of 64 (raw entries through TMA, ``hopper_block_size_ok``)
# the pair kernel is faster from HOPPER_NARROW_MAX_ROWS + 1 rows on: at 32 rows it beat both the
# quantized kernel and the narrow one (H100, same call, graph-replay medians, us, quantized /
# narrow / pair; fp8, then fp8_ds_mla): 128q1s8k h32 455.6 / 386.7 / 349.5, 559.8 / 448.9 /
# 415.3; 32q1s8k h32 122.9 / 111.3 / 104.1, 148.3 / 127.3 / 122.0; 8q1s8k h32 42.2 / 40.4 /
# 39.9, 48.7 / 45.8 / 43.5; 128q2s8k h16 458.4 / 389.7 / 350.2, 567.3 / 455.7 / 416.6; 8q2s8k
# h16 fp8 42.4 / 40.8 / 40.0; 64q1s32k h32 fixed fp8 854.4 / 715.5 / 627.0. The pair kernel's
# 64-row tile costs the same for any 17..64 rows, the narrow kernel's two 16-row tiles the same
# for 17..32 (24 rows, quantized / pair: 128q1s8k fp8 460.1 / 351.0, fp8_ds_mla 563.6 / 414.1,
# 32q1s8k fp8 122.1 / 104.0). Block 32 too (128q1s8k h32 fp8 454.7 / 384.6), not block 16, where
# a tile takes four boxes a part (fp8 458.9 / 511.6; fp8_ds_mla 563.2 / 541.0), nor block sizes
# TMA does not tile (the producer copies the entries): those keep the older bound.
HOPPER_QUANT_MIN_ROWS = 32
HOPPER_QUANT_MIN_ROWS_TMA = HOPPER_NARROW_MAX_ROWS


def hopper_quant_min_rows(block_size: int) -> int:
    """Rows per sequence above which the pair kernel takes a quantized cache of ``block_size``."""
    if block_size >= 32 and hopper_block_size_ok(block_size):
        return HOPPER_QUANT_MIN_ROWS_TMA
    return HOPPER_QUANT_MIN_ROWS


def hopper_quant_query_dtypes(mod, kv_format: str) -> tuple[str, ...]:
    """Query dtypes the pair kernel takes with a quantized cache (``HOPPER_QUANT_QUERY_DTYPES``;
    bf16 only for a module built before it had fp16 operands for fp8)."""
    if kv_format not in getattr(mod, "HOPPER_QUANT_FORMATS", ()):
        return ()
    return tuple(getattr(mod, "HOPPER_QUANT_QUERY_DTYPES", {}).get(kv_format, ("bfloat16",)))


def hopper_quant_kernel_name(mod, p: DecodeProblem) -> str | None:
    """``hopper`` where the pair kernel serves a quantized cache: sm_90, the pair kernel built
    with quantized-cache support (``HOPPER_QUANT_FORMATS``) for these queries (bf16; fp16 too
    for fp8), more than ``hopper_quant_min_rows`` rows per sequence (16 with block size 32 or a
    multiple of 64, else 32; any count with ``PORTMLA_CUDA_HOPPER=pair``)."""
    if _dtype_name(p.q_dtype) not in hopper_quant_query_dtypes(mod, p.cache.kv_format) \
            or hopper_unusable(mod, p.platform) is not None:
        return None
    force = os.environ.get("PORTMLA_CUDA_HOPPER")
    if force == "tile":
        return None
    if force != "pair" and p.max_query_len * p.num_heads <= hopper_quant_min_rows(p.cache.block_size):
        return None
    have = p.platform.shared_memory_per_block
    return "hopper" if not have or have >= mod.DECODE_VARIANTS["hopper"][3] else None


def hopper_narrow_quant_name(mod, p: DecodeProblem) -> str | None:
    """``hopper_narrow_quant`` where the narrow kernel's quantized-cache form serves ``p``: sm_90
    with the Hopper kernels usable, a module that has it, an fp8 cache with bf16 / fp16 queries
    or fp8_ds_mla with bf16, a block size its TMA boxes take (16, 32, 64 k), at most
    ``HOPPER_NARROW_MAX_ROWS`` rows per sequence (any count with ``PORTMLA_CUDA_HOPPER=narrow``)."""
    if "hopper_narrow_quant" not in mod.DECODE_VARIANTS or p.cache.kv_format not in QUANT_FORMATS \
            or hopper_unusable(mod, p.platform) is not None \
            or not hopper_block_size_ok(p.cache.block_size):
        return None
    if p.q_dtype != torch.bfloat16 and not (p.q_dtype == torch.float16 and p.cache.kv_format == "fp8"):
        return None
    force = os.environ.get("PORTMLA_CUDA_HOPPER")
    if force in ("pair", "tile") or \
            (force != "narrow" and p.max_query_len * p.num_heads > HOPPER_NARROW_MAX_ROWS):
        return None
    have = p.platform.shared_memory_per_block
    return "hopper_narrow_quant" if not have or have >= mod.DECODE_VARIANTS["hopper_narrow_quant"][4] else None


def quant_kernel_name(mod, p: DecodeProblem) -> str | None:
    """``quant`` where the quantized-cache kernel serves ``p``, else None (16-bit cache, more
    than ``QUANT_MAX_ROWS`` rows, an older GPU, too little shared memory,
    ``PORTMLA_CUDA_QUANT=0``)."""
    if os.environ.get("PORTMLA_CUDA_QUANT") == "0" or "quant" not in mod.DECODE_VARIANTS \
            or p.cache.kv_format not in QUANT_FORMATS or p.max_query_len * p.num_heads > QUANT_MAX_ROWS \
            or p.platform.capability is None or p.platform.capability < QUANT_MIN_CAPABILITY:
        return None
    have = p.platform.shared_memory_per_block
    if have and have < mod.DECODE_QUANT_SMEM[p.cache.kv_format]:
        return None
    return "quant"


@functools.lru_cache(maxsize=1)
def load_module():
    """``(module, None)`` or ``(None, why)``; never raises."""
    try:
        mod = importlib.import_module("portmla._cuda")
    except ModuleNotFoundError as e:
        if e.name != "portmla._cuda":
            return None, f"portmla._cuda fails to load: {type(e).__name__}: {e}"
        if _STATUS_FILE.exists():
            return None, f"not built: {_STATUS_FILE.read_text().strip()}"
        return None, "not built: portmla._cuda is missing (build it with python csrc_cuda/build.py)"
    except Exception as e:  # noqa: BLE001 - recorded as the reason, not swallowed
        return None, f"portmla._cuda fails to load: {type(e).__name__}: {e}"
    return mod, None


def _arch_covered(built: str, cap: tuple[int, int]) -> bool:
    """SASS for sm_XY runs on sm_XZ with Z >= Y; an 'a' target only on its own chip."""
    for a in built.replace(",", ";").split(";"):
        a = a.strip()
        if not a:
            continue
        exact = a.endswith("a")
        n = int(a.rstrip("a"))
        major, minor = divmod(n, 10)
        if exact and (major, minor) == cap:
            return True
        if not exact and major == cap[0] and minor <= cap[1]:
            return True
    return False


class CudaBackend(Backend):
    NAME = "cuda"
    PLATFORMS = ("cuda",)
    MIN_CAPABILITY = (8, 0)
    OPS = ("mla_decode", "concat_and_cache_mla", "gather_cache")
    DTYPES = (torch.bfloat16, torch.float16, torch.float32)
    DECODE_DTYPES = (torch.bfloat16, torch.float16)
    KV_CACHE_DTYPES = ALL_KV_FORMATS
    BLOCK_SIZES = None  # any block size: the kernels look every token up in the block table
    KV_LORA_RANKS = (512,)
    ROPE_DIMS = (64,)
    MAX_NUM_HEADS = 128  # the kernel takes more; 1..128 is what is tested
    MAX_QUERY_LEN = 1024
    CACHE_ALIGN_BYTES = 16  # cp.async / 16-byte loads of cache rows
    STRIDED_KV = True
    RETURNS_LSE = True
    CUDA_GRAPHS = True

    # ------------------------------------------------------------- availability

    def availability(self, platform: Platform) -> list[Reason]:
        out = super().availability(platform)
        mod, why = load_module()
        if mod is None:
            out.append(Reason("not_built", f"cuda: {why}"))
        elif platform.kind == "cuda" and platform.capability is not None and \
                not _arch_covered(mod.BUILT_ARCHS, platform.capability):
            out.append(Reason("arch_not_built",
                              f"arch={platform.arch} (portmla._cuda was built for "
                              f"PORTMLA_CUDA_ARCHS={mod.BUILT_ARCHS}; rebuild with this arch)"))
        return out

    def kernels(self, platform: Platform) -> tuple[str, ...]:
        mod, _ = load_module()
        if mod is None or platform.kind != "cuda":
            return ()
        generic = "mla_decode: generic sm80+ kernels (mma.sync, cp.async)"
        cache_ops = "concat_and_cache_mla, gather_cache: one kernel each, every format"
        quant = ()
        if "quant" in mod.DECODE_VARIANTS and platform.capability is not None and \
                platform.capability >= QUANT_MIN_CAPABILITY and os.environ.get("PORTMLA_CUDA_QUANT") != "0":
            quant = (f"mla_decode: quantized-cache kernel (raw e4m3 in shared memory, fp16 mma.sync) for "
                     f"{'/'.join(QUANT_FORMATS)} caches with at most {QUANT_MAX_ROWS} (token, head) rows "
                     f"per sequence, any block size",)
        others = " for the other calls" if quant else " for every format and block size"
        if platform.capability != (9, 0):
            return quant + (generic + others, cache_ops)
        why = hopper_unusable(mod, platform)
        if why is not None:
            return quant + (generic + f" for every other call (sm_90a Hopper kernel {why})", cache_ops)
        fmts = "/".join(HOPPER_FORMATS)
        qfmts = getattr(mod, "HOPPER_QUANT_FORMATS", ())
        with_q = ", ".join(f"{f} with {'/'.join(hopper_quant_query_dtypes(mod, f))} queries" for f in qfmts)
        nq = (f"mla_decode: sm_90a narrow kernel for fp8 (bf16/fp16 queries) / fp8_ds_mla (bf16 "
              f"queries) caches with at most {HOPPER_NARROW_MAX_ROWS} (token, head) rows per sequence "
              f"and block size 16, 32 or a multiple of 64 (raw e4m3 through TMA, converted in "
              f"registers for wgmma)",) if "hopper_narrow_quant" in mod.DECODE_VARIANTS else ()
        hq = (f"mla_decode: sm_90a pair kernel for {'/'.join(qfmts)} caches ({with_q}) and more than "
              f"{HOPPER_QUANT_MIN_ROWS_TMA} (token, head) rows per sequence with block size 32 or a "
              f"multiple of 64, more than {HOPPER_QUANT_MIN_ROWS} with any other (raw entries through "
              f"TMA where the block size allows, else copied in; expanded to 16-bit for wgmma; the "
              f"quantized-cache kernel takes the fewer rows)",) if qfmts else ()
        return (f"mla_decode: sm_90a Hopper kernels (TMA + wgmma) for {fmts} caches with block "
                f"size 16, 32 or a multiple of 64: tile pairs with a producer warpgroup above "
                f"{HOPPER_TILE_MAX_ROWS} (token, head) rows per sequence, single tiles at or below"
                + (f", 16-row transposed tiles at or below {HOPPER_NARROW_MAX_ROWS}"
                   if "hopper_narrow" in mod.DECODE_VARIANTS else ""),
                *nq, *hq, *quant, generic + " for the other formats and block sizes", cache_ops)

    def reasons(self, p: Problem) -> list[Reason]:
        out = super().reasons(p)
        if p.op not in self.OPS:
            return out
        c = getattr(p, "cache", None)
        if c is not None:
            esize = 2 if c.kv_format in _FORMAT_TORCH else 1
            for name, v in (("page_stride", c.page_stride), ("token_stride", c.token_stride)):
                if (v * esize) % self.CACHE_ALIGN_BYTES:
                    out.append(Reason("alignment", f"kv_cache {name}={v} elements "
                                                   f"(must be a multiple of {self.CACHE_ALIGN_BYTES} bytes)"))
        if isinstance(p, DecodeProblem):
            if p.q_dtype not in self.DECODE_DTYPES:
                out += self._dtype_reasons_from("q.dtype", p.q_dtype, self.DECODE_DTYPES)
            want = _FORMAT_TORCH.get(c.kv_format)
            if want is not None and want != p.q_dtype:
                out.append(Reason("kv_cache_dtype",
                                  f"kv_cache_dtype={c.kv_format} with q.dtype="
                                  f"{str(p.q_dtype).replace('torch.', '')} (a 16-bit cache must "
                                  f"have q's dtype)"))
            mod, _ = load_module()
            smem_need = mod.DECODE_SMEM_BYTES if mod is not None else 0  # the smallest variant
            have = p.platform.shared_memory_per_block
            if mod is not None and have and have < smem_need:
                out.append(Reason("shared_memory",
                                  f"shared_memory_per_block={have} bytes (the decode kernel "
                                  f"needs {smem_need})"))
            if mod is not None and \
                    -(-p.max_query_len * p.num_heads // mod.DECODE_TILE_ROWS) > MAX_GRID_Y:
                out.append(Reason("max_query_len", f"max_query_len={p.max_query_len} with "
                                                   f"num_heads={p.num_heads} (too many rows)"))
        return out

    # ----------------------------------------------------------------- helpers

    @staticmethod
    def _stream(device: torch.device) -> int:
        return torch.cuda.current_stream(device).cuda_stream

    @staticmethod
    def _ptr(t: torch.Tensor | None) -> int:
        return 0 if t is None else t.data_ptr()

    @staticmethod
    def _rows(t: torch.Tensor, align_elems: int) -> torch.Tensor:
        """``t`` if its row strides and base suit 16-byte loads, else a contiguous copy."""
        ok = t.stride(-1) == 1 and all(s % align_elems == 0 for s in t.stride()[:-1]) \
            and t.data_ptr() % 16 == 0
        return t if ok else t.contiguous()

    @staticmethod
    def _check_cache_ptr(kv_cache: torch.Tensor) -> None:
        if kv_cache.data_ptr() % 16:
            raise ValueError(f"kv_cache.data_ptr()={kv_cache.data_ptr():#x} is not 16-byte "
                             f"aligned (the cuda backend loads cache rows in 16-byte pieces)")

    @staticmethod
    def decode_variant(p: DecodeProblem, mod) -> tuple[str, int, int, int]:
        """``(name, code, rows per CTA, shared memory)`` of the kernel that runs ``p``.

        sm_90 with an fp8 / fp8_ds_mla cache, queries it takes (bf16; fp16 too with fp8), a
        block size its TMA boxes take and at most ``HOPPER_NARROW_MAX_ROWS`` rows: the narrow
        kernel's quantized form.
        sm_90 with an fp8 / fp8_ds_mla cache, queries it takes (bf16; fp16 too with fp8) and
        more than ``hopper_quant_min_rows`` rows (16 with block size 32 or a multiple of 64, else
        32): the pair kernel (raw entries expanded in place, any block size).
        sm_89+ with an fp8 / fp8_ds_mla cache and at most ``QUANT_MAX_ROWS`` rows: the
        quantized-cache kernel.
        sm_90 with a 16-bit cache and a block size its TMA boxes take: the Hopper kernel.
        Otherwise few rows per sequence (<= ``NARROW_MAX_ROWS``): 16-row tiles (memory-bound);
        more: 64-row tiles (compute-bound); the 32-row legacy kernel where the device's
        per-block shared memory is too small for those (e.g. A100 for the narrow one).
        """
        fp8 = p.cache.kv_format not in _FORMAT_TORCH
        have = p.platform.shared_memory_per_block
        rows = p.max_query_len * p.num_heads
        if hopper_narrow_quant_name(mod, p) is not None:
            code, bm, _, _, smem, _ = mod.DECODE_VARIANTS["hopper_narrow_quant"]
            return "hopper_narrow_quant", code, bm, smem
        if hopper_quant_kernel_name(mod, p) is not None:
            hopper = mod.DECODE_VARIANTS["hopper"]
            return "hopper", hopper[0], hopper[1], hopper[3]
        if quant_kernel_name(mod, p) is not None:
            code, bm = mod.DECODE_VARIANTS["quant"][:2]
            return "quant", code, bm, mod.DECODE_QUANT_SMEM[p.cache.kv_format]
        if p.cache.kv_format in HOPPER_FORMATS and hopper_block_size_ok(p.cache.block_size) \
                and hopper_unusable(mod, p.platform) is None:
            name = hopper_kernel_name(mod, rows)
            hopper = mod.DECODE_VARIANTS[name]
            if not have or have >= hopper[3]:
                return name, hopper[0], hopper[1], hopper[3]
        want = "narrow" if rows <= NARROW_MAX_ROWS else "wide"
        code, bm, _, smem16, smem8, _ = mod.DECODE_VARIANTS[want]
        smem = smem8 if fp8 else smem16
        if have and have < smem:
            want = "legacy"
            code, bm, _, smem16, smem8, _ = mod.DECODE_VARIANTS[want]
            smem = smem8 if fp8 else smem16
        return want, code, bm, smem

    def plan_decode(self, p: DecodeProblem, mod) -> tuple[str, int, int, int, int]:
        """``(variant name, code, num_splits, split_chunk, num_parts)`` from host-side upper
        bounds only (graph-safe).

        Hopper / quantized kernels: ``num_parts`` persistent CTAs per row tile (``quant``: two
        per SM where they fit); the split of the work
        among them is computed on the device from ``seq_lens`` (``num_splits`` = 1).
        Generic kernels: split s covers KV positions [s * chunk, (s + 1) * chunk): every CTA
        does at most one chunk of work whatever the lengths, so CTAs balance over the SMs. The
        chunk aims at ``SPLIT_WAVES`` CTAs per resident slot for the upper bound of the work
        (the real work of a varlen batch is often 2-3x below it), never below
        ``MIN_SPLIT_CHUNK``.
        """
        name, code, bm, smem = self.decode_variant(p, mod)
        rows_tiles = -(-p.max_query_len * p.num_heads // bm)
        have = p.platform.shared_memory_per_block or smem
        per_sm = max(1, min(2, (have + 1024) // (smem + 1024)))
        if name in SCHED_FIXED:  # the Hopper kernels: one CTA per SM (the quantized-cache ones two)
            per_sm = per_sm if name in ("quant", "hopper_narrow_quant") else 1
            return name, code, 1, 0, sched_parts(rows_tiles, max(1, p.platform.num_compute_units), per_sm)
        slots = per_sm * max(1, p.platform.num_compute_units)
        max_kv = p.max_blocks_per_seq * p.cache.block_size
        work = max(1, p.num_seqs * rows_tiles * max_kv)
        chunk = -(-work // (slots * SPLIT_WAVES))
        chunk = max(MIN_SPLIT_CHUNK, -(-chunk // SPLIT_GRANULE) * SPLIT_GRANULE)
        splits = max(1, -(-max_kv // chunk))
        if splits > MAX_SPLITS:
            chunk = -(-max_kv // MAX_SPLITS)
            chunk = -(-chunk // SPLIT_GRANULE) * SPLIT_GRANULE
            splits = max(1, -(-max_kv // chunk))
        return name, code, splits, (chunk if splits > 1 else 0), 0

    # ------------------------------------------------------------------- ops

    def mla_decode(self, p, q, kv_cache, block_table, seq_lens, query_start_loc, softmax_scale,
                   k_scale, out, lse):
        mod, why = load_module()
        if mod is None:
            raise RuntimeError(f"cuda backend: {why}")
        t, h, _ = q.shape
        if t == 0 or p.num_seqs == 0:
            return
        self._check_cache_ptr(kv_cache)
        c = p.cache
        q = self._rows(q, 8)
        out_k = out if (out.stride(-1) == 1 and out.stride(0) % 2 == 0 and out.stride(1) % 2 == 0
                        and out.data_ptr() % 8 == 0) else torch.empty_like(out, memory_format=torch.contiguous_format)
        block_table = block_table if block_table.stride(1) == 1 else block_table.contiguous()
        seq_lens = seq_lens.contiguous()
        qsl = None if query_start_loc is None else query_start_loc.contiguous()

        par = mod.DecodeParams()
        par.q, par.q_stride_t, par.q_stride_h = q.data_ptr(), q.stride(0), q.stride(1)
        par.kv_cache, par.page_stride, par.token_stride = kv_cache.data_ptr(), c.page_stride, c.token_stride
        par.block_size, par.num_blocks = c.block_size, kv_cache.shape[0]
        par.block_table, par.bt_stride = block_table.data_ptr(), block_table.stride(0)
        par.seq_lens = seq_lens.data_ptr()
        par.query_start_loc = self._ptr(qsl)
        par.k_scale = self._ptr(k_scale) if c.kv_format == "fp8" else 0
        par.out, par.out_stride_t, par.out_stride_h = out_k.data_ptr(), out_k.stride(0), out_k.stride(1)
        if lse is not None:
            par.lse, par.lse_stride_t, par.lse_stride_h = lse.data_ptr(), lse.stride(0), lse.stride(1)
        name, variant, splits, chunk, parts = self.plan_decode(p, mod)
        partial_rows = 0  # partial rows of 512 in q's dtype (+ an fp32 LSE each) the merge reads
        if parts:  # the device schedule's scratch: sizes from host bounds only (graph-safe)
            b = p.num_seqs
            rows = p.max_query_len * h
            partial_rows = max(1, 2 * (parts - 1)) * rows
            cuts = 1 + min(b, parts - 1)  # count + cut sequences (int32)
            # the last-piece merge's counters (int32): a sequence's 16-row tiles, zeroed by the
            # schedule kernel (csrc_cuda/common/params.h: sched_arrive); only the kernels that
            # take that merge get them (no zeroing work in the other kernels' calls)
            counts = (name == "hopper" and p.cache.kv_format not in QUANT_FORMATS
                      and hasattr(par, "tail_count") and tail_count_wanted())
            arrive = b * -(-rows // 16) if ((name in TAIL_ARRIVE_VARIANTS and tail_arrive_wanted()
                                             or counts) and hasattr(par, "sched_arrive")) else 0
            head = 2 * b + 2 + (cuts + 1) // 2
            sched = torch.empty(head + (arrive + 1) // 2, dtype=torch.int64, device=q.device)
            par.sched_cum, par.sched_piece = sched.data_ptr(), sched[b + 2:].data_ptr()
            par.sched_cut = sched[2 * b + 2:].data_ptr()
            if arrive:
                par.sched_arrive = sched[head:].data_ptr()
                par.tail_count = int(counts)
            par.num_parts, par.part_rows = parts, rows
            par.sched_fixed = SCHED_FIXED[sched_fixed_key(name, p.cache.kv_format)]
            if hasattr(par, "tail_merge"):  # a module built before it merges in-kernel: no field
                par.tail_merge = tail_merge_wanted()
        elif splits > 1:
            partial_rows = splits * t * h
        if partial_rows:
            part_out = torch.empty(partial_rows * c.kv_lora_rank, dtype=q.dtype, device=q.device)
            part_lse = torch.empty(partial_rows, dtype=torch.float32, device=q.device)
            par.part_out, par.part_lse = part_out.data_ptr(), part_lse.data_ptr()
        par.num_tokens, par.num_seqs, par.num_heads = t, p.num_seqs, h
        par.max_query_len, par.num_splits = p.max_query_len, splits
        par.split_chunk, par.variant = chunk, variant
        par.kv_lora_rank, par.rope_dim = c.kv_lora_rank, c.rope_dim
        par.softmax_scale = float(softmax_scale)
        par.q_dtype, par.kv_format = _DTYPE_CODE[q.dtype], _FORMAT_CODE[c.kv_format]
        if hasattr(par, "kv_l2_hint"):  # a module built before the hint: no field
            par.kv_l2_hint = kv_l2_hint()
        with torch.cuda.device(q.device):
            mod.mla_decode(par, self._stream(q.device))
        if out_k is not out:
            out.copy_(out_k)

    def concat_and_cache_mla(self, p: CacheWriteProblem, kv_c, k_pe, kv_cache, slot_mapping, scale):
        mod, why = load_module()
        if mod is None:
            raise RuntimeError(f"cuda backend: {why}")
        if p.num_tokens == 0:
            return
        self._check_cache_ptr(kv_cache)
        c = p.cache
        slot_mapping = slot_mapping.contiguous()
        par = mod.CacheWriteParams()
        par.kv_c, par.kv_c_stride, par.kv_c_dtype = kv_c.data_ptr(), kv_c.stride(0), _DTYPE_CODE[kv_c.dtype]
        par.k_pe, par.k_pe_stride, par.k_pe_dtype = k_pe.data_ptr(), k_pe.stride(0), _DTYPE_CODE[k_pe.dtype]
        par.cache, par.page_stride, par.token_stride = kv_cache.data_ptr(), c.page_stride, c.token_stride
        par.block_size = c.block_size
        par.slot_mapping, par.slot_dtype = slot_mapping.data_ptr(), _DTYPE_CODE[slot_mapping.dtype]
        par.scale = self._ptr(scale) if c.kv_format == "fp8" else 0
        par.num_tokens, par.kv_lora_rank, par.rope_dim = p.num_tokens, c.kv_lora_rank, c.rope_dim
        par.kv_format = _FORMAT_CODE[c.kv_format]
        par.cache_dtype = _DTYPE_CODE[kv_cache.dtype]
        with torch.cuda.device(kv_c.device):
            mod.concat_and_cache_mla(par, self._stream(kv_c.device))

    def gather_cache(self, p: GatherProblem, kv_cache, block_table, seq_lens, seq_starts,
                     cu_seq_lens, scale, out):
        mod, why = load_module()
        if mod is None:
            raise RuntimeError(f"cuda backend: {why}")
        if p.num_seqs == 0 or out.shape[0] == 0:
            return
        self._check_cache_ptr(kv_cache)
        c = p.cache
        block_table = block_table if block_table.stride(1) == 1 else block_table.contiguous()
        seq_lens = seq_lens.contiguous()
        seq_starts = None if seq_starts is None else seq_starts.contiguous()
        cu_seq_lens = cu_seq_lens.contiguous()
        par = mod.GatherParams()
        par.cache, par.page_stride, par.token_stride = kv_cache.data_ptr(), c.page_stride, c.token_stride
        par.block_size = c.block_size
        par.block_table, par.bt_stride = block_table.data_ptr(), block_table.stride(0)
        par.seq_lens, par.seq_starts = seq_lens.data_ptr(), self._ptr(seq_starts)
        par.cu_seq_lens = cu_seq_lens.data_ptr()
        par.scale = self._ptr(scale) if c.kv_format == "fp8" else 0
        par.out, par.out_stride, par.out_dtype = out.data_ptr(), out.stride(0), _DTYPE_CODE[out.dtype]
        par.num_seqs = p.num_seqs
        par.max_seq_tokens = min(p.max_blocks_per_seq * c.block_size, out.shape[0])
        par.kv_lora_rank, par.rope_dim = c.kv_lora_rank, c.rope_dim
        par.kv_format = _FORMAT_CODE[c.kv_format]
        par.cache_dtype = _DTYPE_CODE[kv_cache.dtype]
        with torch.cuda.device(out.device):
            mod.gather_cache(par, self._stream(out.device))
