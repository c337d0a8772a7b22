"""One mla_decode call on bench inputs, for a profiler to catch (GPU machine).

    ncu --kernel-name regex:hopper --launch-skip 2 --launch-count 1 \\
        python scripts/ncu_decode.py 128q1s4k 128 [--fixed] [--backend cuda]
"""

from __future__ import annotations

import argparse

import torch

import portmla as pm
from portmla.bench.inputs import build_inputs
from portmla.bench.specs import parse_spec


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("spec")
    ap.add_argument("heads", type=int)
    ap.add_argument("--fixed", action="store_true")
    ap.add_argument("--backend", default="cuda")
    ap.add_argument("--kv-cache-dtype", default="bfloat16")
    ap.add_argument("--calls", type=int, default=3)
    a = ap.parse_args()
    inp = build_inputs(parse_spec(a.spec), a.heads, a.kv_cache_dtype, 64, device="cuda",
                       fixed=a.fixed, layers=1)
    kw = inp.decode_kwargs(0)
    for _ in range(a.calls):
        pm.mla_decode(backend=a.backend, **kw)
    torch.cuda.synchronize()
    print("ok", a.spec, a.heads, "fixed" if inp.fixed else "varlen")


if __name__ == "__main__":
    main()
