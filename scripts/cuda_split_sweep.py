#!/usr/bin/env python3
"""Time the Hopper decode kernel at forced split counts (GPU machine), to check the planner.

    python scripts/cuda_split_sweep.py [spec:heads[:fixed] ...]

Inputs are the bench's (same lengths, seed 0); CUDA-graph replay medians; the planner's own
choice is printed beside the sweep.
"""

from __future__ import annotations

import sys

import torch

import portmla as pm
from portmla.backends import cuda as cuda_backend
from portmla.bench.inputs import build_inputs
from portmla.bench.specs import parse_spec
from portmla.bench.timing import measure, prepare

DEFAULT = ["128q1s4k:128", "64q1s16k:128", "128q1s8k:16", "64q1s32k:16", "8q1s8k:16"]
SPLITS = [1, 2, 3, 4, 6, 8, 12, 16, 24, 32]


def sweep(spec: str, heads: int, fixed: bool) -> str:
    orig = cuda_backend.hopper_splits
    inp = build_inputs(parse_spec(spec), heads, "bfloat16", 64, device="cuda", fixed=fixed,
                       layers=2)
    out = torch.empty(inp.q.shape[0], heads, 512, dtype=torch.bfloat16, device="cuda")
    chosen = []

    def spy(*a):
        chosen.append(orig(*a))
        return chosen[-1]

    def call(i):
        return lambda: pm.mla_decode(backend="cuda", out=out, **inp.decode_kwargs(i))

    try:
        cuda_backend.hopper_splits = spy
        call(0)()
        row = [f"{spec} h{heads} {'fixed' if inp.fixed else 'varlen'} planner={chosen[0]}:"]
        for s in sorted(set(SPLITS + chosen[:1])):
            cuda_backend.hopper_splits = lambda *a, s=s: s
            prepared = prepare([call(i) for i in range(len(inp.caches))], out.device,
                               use_graphs=True)
            row.append(f"{s}={measure(prepared, out.device, 3, 20).median_us:.1f}")
    finally:
        cuda_backend.hopper_splits = orig
    return " ".join(row)


def main() -> None:
    for item in sys.argv[1:] or DEFAULT:
        spec, heads, *rest = item.split(":")
        print(sweep(spec, int(heads), bool(rest)), flush=True)


if __name__ == "__main__":
    main()
