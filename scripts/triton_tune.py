"""Same-data A/B of Triton decode launch variants on a GPU (one call, one table).

    PYTHONPATH=. python scripts/triton_tune.py [--plan final|sched|qsched|quant|dsq|gluon|ds,fp8,bf16,h128] [--reps 15]
        [--budget-s S]

Each data set (the ANCHORS.md row shapes, fixed or varlen lengths) is built once and every
variant of the plan is timed on it: median of CUDA-graph replays of one whole
``pm.mla_decode`` (decode + split combine), after a reference check of the variant's output.
A variant is ``(block_m, block_n, warps, stages, m, exact_ds[, scheduled, sched_fixed])``
(splits: ~4 m programs per SM; ``m`` None: the committed split rule); ``None`` means the
committed default (``launch.decode_config``) for that field. ``scheduled`` picks the device
schedule (True) or the host-planned splits (False); ``sched_fixed`` its fixed cost per
sequence in KV tiles.

``--plan sched``: split kernel vs device schedule with fixed cost 2 / 4 / 8, on the 16-head
rows (bf16 fixed + varlen, fp8 / fp8_ds_mla at b=128 S=8192) and two 128-head rows.

``--plan quant``: the quantized 16-head tile's variants (``QUANT``: ``DecodeConfig.quant_read``,
tile, register cap, programs per SM for the schedule's parts) against the default, fp8 and
fp8_ds_mla, with bf16's default on the same shape as the reference speed. Rows whose reference
is skipped for memory are checked against the default variant's output (``rel`` then says
``vs default``). ``--budget-s`` stops starting new data sets past that many seconds.

``--plan dsq``: fp8_ds_mla only, the default ("pairs_once") against "pairs_once_fold" (the P @ V
normaliser folded into the accumulator rescale) on the four 16-head rows.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
import traceback

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
os.environ.setdefault("TRITON_INTERPRET", "0")

from typing import NamedTuple  # noqa: E402

import torch  # noqa: E402
from triton_device_check import build, call, figures, graph_time, rel  # noqa: E402

import portmla as pm  # noqa: E402
from portmla.backends.triton import decode as tdec  # noqa: E402
from portmla.backends.triton import launch as tlaunch  # noqa: E402

DEFAULT = (None, None, None, None, 1, None)

OLD = (None, None, None, None, 1, False)  # session-5 narrow default: 4 programs / SM, ds dequantized
M12 = (None, None, None, None, 3, None)  # 12 programs / SM for narrow tiles
W8 = (None, None, None, None, 2, None)  # 8 programs / SM for wide tiles

SPLIT = (None, None, None, None, None, None, False, None)  # host-planned splits, committed rule
SCHED = {f: (None, None, None, None, None, None, True, f) for f in (1, 2, 4, 8)}  # device schedule
AB = [SPLIT, SCHED[2], SCHED[4], SCHED[8]]



class QuantVariant(NamedTuple):
    """A quantized-tile variant on the device schedule (None / 0: the committed default)."""

    name: str
    quant_read: str = "twice"  # launch.QUANT_READS
    block_n: int | None = None
    warps: int | None = None
    stages: int | None = None
    maxnreg: int = 0  # register cap per thread (0: the compiler's choice)
    per_sm: int | None = None  # programs per SM the schedule's parts assume (default tile: 2)


# sm_90 compile of each (scripts/triton_sm90_report.py quant) in the report of the commit that
# added them; 16 x 32 / 4 warps / 5 stages unless named.
QUANT = {
    "pairs": QuantVariant("pairs", "pairs"),
    "pairs1": QuantVariant("pairs1", "pairs_once"),
    "pairs1 st7": QuantVariant("pairs1 st7", "pairs_once", stages=7),  # 3 KV buffers, not 2
    "pairs1 r168": QuantVariant("pairs1 r168", "pairs_once", maxnreg=168, per_sm=3),  # 3 programs / SM
    "pairs1 64x8w": QuantVariant("pairs1 64x8w", "pairs_once", 64, 8, 5, per_sm=1),
    "twice 64x8w3st": QuantVariant("twice 64x8w3st", "twice", 64, 8, 3, per_sm=1),
    "once": QuantVariant("once", "once"),
    "twice": QuantVariant("twice", "twice"),  # the read before session 8 (the default is pairs1 since)
    "pairs1 p1": QuantVariant("pairs1 p1", "pairs_once", per_sm=1),  # parts for one program / SM
    # fp8_ds_mla: the P @ V normaliser folded into the accumulator rescale (fp8 reads as pairs1);
    # sm_90: 245 registers, no spills, 748 loop SASS vs pairs1's 246 / 811
    "pairs1 fold": QuantVariant("pairs1 fold", "pairs_once_fold"),
}
_Q = [DEFAULT] + [QUANT[k] for k in ("twice", "pairs", "pairs1 st7", "pairs1 r168", "pairs1 64x8w")]

# data set (b, S, h, fixed[, s_q]) -> formats -> variants. Session 6: "ds", "fp8", "bf16", "h128"
# were the first call (split multiplier 1 = 4 programs / SM then); "final" the second.
PLANS = {
    "ds": [((128, 8192, 16, True), ("fp8_ds_mla",),
            [DEFAULT, (16, 32, 4, 5, 1, False), (16, 64, 8, 5, 1, True), (16, 64, 8, 5, 1, False)]),
           ((128, 8192, 16, False), ("fp8_ds_mla",),
            [DEFAULT, (16, 32, 4, 5, 1, False), (16, 64, 8, 5, 1, True), (16, 32, 4, 5, 2, True)]),
           ((64, 32768, 16, True), ("fp8_ds_mla",), [DEFAULT, (16, 32, 4, 5, 1, False), (16, 64, 8, 5, 1, True)]),
           ((8, 8192, 16, True), ("fp8_ds_mla",), [DEFAULT, (16, 32, 4, 5, 1, False)])],
    "fp8": [((128, 8192, 16, False), ("fp8",), [DEFAULT, (16, 64, 8, 5, 1, None), (16, 32, 4, 5, 2, None)]),
            ((128, 8192, 16, True), ("fp8",), [DEFAULT, (16, 64, 8, 5, 1, None), (16, 32, 4, 5, 2, None)]),
            ((64, 32768, 16, True), ("fp8",), [DEFAULT]),
            ((8, 8192, 16, True), ("fp8",), [DEFAULT])],
    "bf16": [((128, 8192, 16, False), ("bfloat16",), [DEFAULT, (16, 64, 8, 5, 2, None)]),
             ((128, 8192, 16, True), ("bfloat16",), [DEFAULT]),
             ((64, 32768, 16, True), ("bfloat16",), [DEFAULT, (16, 64, 8, 5, 2, None)]),
             ((8, 8192, 16, True), ("bfloat16",), [DEFAULT])],
    "h128": [((128, 4096, 128, False), ("bfloat16",), [DEFAULT]),
             ((128, 4096, 128, False), ("fp8_ds_mla",), [DEFAULT, (64, 32, 8, 2, 1, False)])],
    "final": [((128, 8192, 16, False), ("bfloat16", "fp8", "fp8_ds_mla"), [DEFAULT, OLD, M12]),
              ((128, 8192, 16, True), ("bfloat16", "fp8", "fp8_ds_mla"), [DEFAULT, OLD]),
              ((64, 32768, 16, True), ("bfloat16",), [DEFAULT, OLD, M12]),
              ((64, 32768, 16, True), ("fp8", "fp8_ds_mla"), [DEFAULT, OLD]),
              ((8, 8192, 16, True), ("bfloat16", "fp8", "fp8_ds_mla"), [DEFAULT]),
              ((8, 8192, 16, False), ("bfloat16",), [DEFAULT]),
              ((128, 4096, 128, False), ("bfloat16",), [DEFAULT, W8]),
              ((128, 4096, 128, False), ("fp8_ds_mla",), [DEFAULT]),
              ((128, 4096, 128, False, 2), ("bfloat16",), [DEFAULT]),
              ((128, 8192, 128, False), ("bfloat16",), [DEFAULT]),
              ((64, 16384, 128, False), ("bfloat16",), [DEFAULT]),
              ((32, 4096, 128, False), ("bfloat16",), [DEFAULT]),
              ((1, 32768, 128, True), ("bfloat16",), [DEFAULT])],
    # session 7, call 2: the rows "sched" left out (wide tiles, quantized 8 / 64-sequence rows)
    "wide": [((128, 4096, 128, False, 2), ("bfloat16",), AB[:3]),
             ((128, 8192, 128, False), ("bfloat16",), AB[:2]),
             ((64, 16384, 128, False), ("bfloat16",), AB[:2]),
             ((32, 4096, 128, False), ("bfloat16",), AB),
             ((1, 32768, 128, True), ("bfloat16",), AB),
             ((128, 4096, 128, False), ("fp8", "fp8_ds_mla"), AB[:2]),
             ((8, 8192, 16, True), ("bfloat16", "fp8", "fp8_ds_mla"), AB[:3]),
             ((64, 32768, 16, True), ("fp8", "fp8_ds_mla"), AB[:3])],
    # session 11: the Gluon 64-row kernel's schedule fixed cost (1 / 2 / 4 / 8 KV tiles)
    "gluon": [(shape, ("bfloat16",), [SCHED[f] for f in (1, 2, 4, 8)])
              for shape in ((128, 4096, 128, False), (128, 4096, 128, False, 2), (128, 8192, 128, False),
                            (64, 16384, 128, False), (32, 4096, 128, False), (1, 32768, 128, True))],
    "quant": [((128, 8192, 16, True), ("fp8",), _Q + [QUANT["twice 64x8w3st"], QUANT["once"]]),
              ((128, 8192, 16, True), ("fp8_ds_mla",), _Q + [QUANT["twice 64x8w3st"]]),
              ((128, 8192, 16, True), ("bfloat16",), [DEFAULT]),
              ((128, 8192, 16, False), ("fp8", "fp8_ds_mla"), _Q + [QUANT["twice 64x8w3st"]]),
              ((128, 8192, 16, False), ("bfloat16",), [DEFAULT]),
              ((64, 32768, 16, True), ("fp8", "fp8_ds_mla"), _Q),
              ((64, 32768, 16, True), ("bfloat16",), [DEFAULT]),
              ((8, 8192, 16, True), ("fp8", "fp8_ds_mla"), [DEFAULT, QUANT["twice"], QUANT["pairs1 r168"]]),
              ((8, 8192, 16, True), ("bfloat16",), [DEFAULT])],
    # fp8_ds_mla's folded normaliser ("pairs_once_fold") vs the default, the four 16-head rows
    "dsq": [((128, 8192, 16, True), ("fp8_ds_mla",), [DEFAULT, QUANT["pairs1 fold"]]),
            ((128, 8192, 16, False), ("fp8_ds_mla",), [DEFAULT, QUANT["pairs1 fold"]]),
            ((64, 32768, 16, True), ("fp8_ds_mla",), [DEFAULT, QUANT["pairs1 fold"]]),
            ((8, 8192, 16, True), ("fp8_ds_mla",), [DEFAULT, QUANT["pairs1 fold"]])],
    # the quantized 16-row tile's schedule: fixed cost per sequence 1 / 2 / 4 / 8 tiles, and
    # parts for one program per SM, on the b=8 rows (and b=128 as a check)
    "qsched": [((8, 8192, 16, True), ("fp8", "fp8_ds_mla"),
                [SCHED[2], SCHED[1], SCHED[4], SCHED[8], QUANT["pairs1 p1"]]),
               ((8, 8192, 16, False), ("fp8", "fp8_ds_mla"),
                [SCHED[2], SCHED[1], SCHED[4], SCHED[8], QUANT["pairs1 p1"]]),
               ((128, 8192, 16, False), ("fp8", "fp8_ds_mla"), [SCHED[2], SCHED[4]]),
               ((8, 8192, 16, True), ("bfloat16",), [DEFAULT])],
    "sched": [((128, 8192, 16, False), ("bfloat16", "fp8", "fp8_ds_mla"), AB),
              ((128, 8192, 16, True), ("bfloat16", "fp8", "fp8_ds_mla"), AB),
              ((64, 32768, 16, True), ("bfloat16",), AB),
              ((8, 8192, 16, False), ("bfloat16",), AB),
              ((128, 4096, 128, False), ("bfloat16",), AB),
              ((1, 32768, 128, True), ("bfloat16",), AB)],
}


def quant_config(v: QuantVariant):
    """decode_config with a ``QuantVariant``'s fields; the schedule's parts from its programs
    per SM."""
    def cfg(plat, ns, nh, mql, mkv, fmt, lora):
        d = tlaunch.decode_config(plat, ns, nh, mql, mkv, fmt, lora)
        parts = d.parts if v.per_sm is None else max(1, v.per_sm * plat.num_compute_units // d.row_tiles)
        return dataclasses.replace(d, block_n=v.block_n or d.block_n, num_warps=v.warps or d.num_warps,
                                   num_stages=v.stages or d.num_stages, quant_read=v.quant_read,
                                   maxnreg=v.maxnreg, parts=parts)
    return cfg


def variant_config(v):
    """decode_config with the fields of ``v`` that are not None replaced; splits by the
    4-programs-per-compute-unit rule times the multiplier (when any tile field or the
    multiplier is given)."""
    if isinstance(v, QuantVariant):
        return quant_config(v)
    bm_, bn_, w_, st_, mult, exact, sched, fixed = (tuple(v) + (None, None))[:8]
    if v == DEFAULT:
        return tlaunch.decode_config

    def cfg(plat, ns, nh, mql, mkv, fmt, lora):
        d = tlaunch.decode_config(plat, ns, nh, mql, mkv, fmt, lora)
        if any(x is not None for x in (bm_, bn_, w_, st_, mult)):
            bm = bm_ or d.block_m
            bn = bn_ or d.block_n
            rt = tlaunch.cdiv(max(1, mql) * nh, bm)
            tiles = tlaunch.cdiv(max(1, mkv), bn)
            min_tiles = max(1, (256 if bm >= 32 else 128) // bn)
            want = min(tlaunch.cdiv(int(4 * (mult or 1) * plat.num_compute_units), ns * rt),
                       max(1, tiles // min_tiles), 64)
            per = tlaunch.cdiv(tiles, max(1, want)) * bn
            d = dataclasses.replace(d, block_m=bm, block_n=bn, num_warps=w_ or d.num_warps,
                                    num_stages=st_ or d.num_stages, num_splits=tlaunch.cdiv(mkv, per),
                                    kv_per_split=per, row_tiles=rt, parts=max(1, d.parts * d.row_tiles // rt))
        return dataclasses.replace(d, exact_ds=d.exact_ds if exact is None else exact,
                                   scheduled=d.scheduled if sched is None else sched,
                                   sched_fixed=fixed or d.sched_fixed)
    return cfg


def variant_name(v) -> str:
    if isinstance(v, QuantVariant):
        return v.name
    if v == DEFAULT:
        return "default"
    if v == SPLIT:
        return "split"
    if v in SCHED.values():
        return f"sched F={v[7]}"
    return "x".join("-" if x is None else f"{x:g}" for x in v)


REL_OK = 1e-2  # a variant's output further than this from the reference is flagged BAD
REF_MAX_KV = 128 * 8192  # larger rows (b x S) skip the reference (memory): checked vs their first variant


def run(plans, reps, out_dir, budget_s=None):
    res = []
    orig = tdec.decode_config
    plat = pm.current_platform()
    t0 = time.time()
    for plan in plans:
        for shape, fmts, variants in PLANS[plan]:
            b, S, h, fixed = shape[:4]
            s_q = shape[4] if len(shape) > 4 else 1
            for fmt in fmts:
                if budget_s is not None and time.time() - t0 > budget_s:
                    print(f"{plan} {fmt} b={b} S={S} h={h}: skipped (past --budget-s {budget_s:g})", flush=True)
                    continue
                d = build(b, s_q, S, h, fmt, fixed=fixed, seed=b * 7 + S)
                ref, ref_is = None, "reference"
                for v in variants:
                    tdec.decode_config = variant_config(v)
                    name = variant_name(v)
                    try:
                        c = tdec.decode_config(plat, b, h, s_q, d["bt"].shape[1] * 64, fmt, 512)
                        o = call(d, "triton")
                        if ref is None:
                            tdec.decode_config = orig
                            if b * S <= REF_MAX_KV:
                                ref = call(d, "reference")
                            else:
                                ref, ref_is = o.clone(), f"vs {name}"
                            tdec.decode_config = variant_config(v)
                        err = rel(o, ref)
                        med, lo, hi = graph_time(d, reps=reps)
                        tf, tb = figures(d, b, s_q, h, med)
                        row = dict(plan=plan, b=b, s_q=s_q, S=S, h=h, fixed=fixed, fmt=fmt, variant=name, us=med,
                                   us_min=lo, us_max=hi, tflops=tf, tbs=tb, splits=c.num_splits, rel=err,
                                   rel_to=ref_is, scheduled=c.scheduled, parts=c.parts, sched_fixed=c.sched_fixed,
                                   block_n=c.block_n, warps=c.num_warps, stages=c.num_stages,
                                   quant_read=c.quant_read, maxnreg=c.maxnreg)
                        res.append(row)
                        print(f"{plan:5s} {fmt:10s} b={b:3d} q{s_q} S={S:5d} h={h:3d} {'fix' if fixed else 'var'} "
                              f"{name:16s} {med:8.1f} us [{lo:7.1f},{hi:7.1f}] {tf:6.1f} TF {tb:5.2f} TB/s "
                              f"{f'parts={c.parts:3d}' if c.scheduled else f'splits={c.num_splits:2d}'} "
                              f"rel={err:.1e}{'' if ref_is == 'reference' else f' ({ref_is})'}"
                              f"{'' if err < REL_OK else ' BAD'}", flush=True)
                    except Exception:  # noqa: BLE001 - report and go on
                        print(f"{plan} {fmt} b={b} S={S} h={h} {name}: FAILED\n{traceback.format_exc()[-1500:]}")
                    finally:
                        tdec.decode_config = orig
                del d, ref
                torch.cuda.empty_cache()
                with open(os.path.join(out_dir, "triton_tune.json"), "w") as f:
                    json.dump(res, f, indent=1)
    return res


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--plan", default="final")
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--budget-s", type=float, default=None, help="start no data set past this many seconds")
    a = ap.parse_args()
    t0 = time.time()
    print(f"device: {pm.current_platform().device_name} torch {torch.__version__} "
          f"triton {__import__('triton').__version__} portmla from {os.path.dirname(pm.__file__)}", flush=True)
    run(a.plan.split(","), a.reps, a.out, a.budget_s)
    print(f"[done in {time.time() - t0:.0f}s]")


if __name__ == "__main__":
    main()
