#!/usr/bin/env python3
"""Time the scheduled decode kernels (Hopper, quantized-cache) over the device schedule's
knobs (GPU machine), to fit them.

    python scripts/cuda_split_sweep.py [spec:heads[:fixed|varlen][:format] ...]

For each row: the per-sequence fixed cost (``SCHED_FIXED``, in KV tiles) at the
planner's part count, then a few part counts at the planner's fixed cost. Inputs are the
bench's (same lengths, seed 0); CUDA-graph replay medians in us.
"""

from __future__ import annotations

import os
import sys

from portmla.backends import cuda as cuda_backend
from portmla.bench.inputs import build_inputs
from portmla.bench.measure import portmla_calls
from portmla.bench.specs import parse_spec
from portmla.bench.timing import measure, prepare

DEFAULT = ["128q1s4k:128", "64q1s16k:128", "32q1s4k:128", "1q1s32k:128:fixed",
           "128q1s8k:16", "64q1s32k:16:fixed", "8q1s8k:16"]
# SWEEP_FIXED="4,5,6,7,8": other fixed costs
FIXED = [int(x) for x in os.environ.get("SWEEP_FIXED", "1,2,3,4,6,8,12").split(",")]
PARTS_SCALE = [0.5, 1.0]  # times the planner's part count (its own one included)


def sweep(spec: str, heads: int, fixed_len: bool, fmt: str = "bfloat16") -> str:
    inp = build_inputs(parse_spec(spec), heads, fmt, 64, device="cuda", fixed=fixed_len,
                       layers=2)
    calls, out = portmla_calls(inp, "cuda")
    orig_parts, orig_fixed = cuda_backend.sched_parts, dict(cuda_backend.SCHED_FIXED)
    orig_variant = cuda_backend.CudaBackend.decode_variant
    seen, kernels = [], []

    def spy(*a):
        seen.append(orig_parts(*a))
        return seen[-1]

    def variant_spy(p, mod):
        out = orig_variant(p, mod)
        kernels.append(out[0])
        return out

    def time_it() -> float:
        return measure(prepare(calls, out.device, use_graphs=True), out.device, 3, 20).median_us

    try:
        cuda_backend.sched_parts = spy
        cuda_backend.CudaBackend.decode_variant = staticmethod(variant_spy)
        calls[0]()  # the planner's part count and kernel, through the spies
        cuda_backend.CudaBackend.decode_variant = staticmethod(orig_variant)
        parts, kernel = seen[0], kernels[0]
        key = cuda_backend.sched_fixed_key(kernel, fmt)
        row = [f"{spec} h{heads} {fmt} {'fixed' if inp.fixed else 'varlen'} {key} "
               f"parts={parts} fixed={orig_fixed[key]}: fixed cost"]
        for f in FIXED:
            cuda_backend.SCHED_FIXED = {**orig_fixed, key: f}
            row.append(f"{f}={time_it():.1f}")
        cuda_backend.SCHED_FIXED = orig_fixed
        row.append("| parts")
        for sc in PARTS_SCALE:
            n = max(1, int(parts * sc))
            cuda_backend.sched_parts = lambda *a, n=n: n
            row.append(f"{n}={time_it():.1f}")
    finally:
        cuda_backend.CudaBackend.decode_variant = staticmethod(orig_variant)
        cuda_backend.sched_parts = orig_parts
        cuda_backend.SCHED_FIXED = orig_fixed
    return " ".join(row)


def main() -> None:
    for item in sys.argv[1:] or DEFAULT:
        spec, heads, *rest = item.split(":")
        fixed = bool(rest) and rest[0] == "fixed"
        print(sweep(spec, int(heads), fixed, *rest[1:2]), flush=True)


if __name__ == "__main__":
    main()
