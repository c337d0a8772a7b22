"""The Gluon decode kernel under Triton's concurrency sanitizer (ConSan), on an sm_90 GPU.

    TRITON_INSTRUMENTATION_MODE=consan PYTHONPATH=. python scripts/gluon_consan.py

ConSan instruments the kernel's TMA copies, mbarrier waits / arrives and wgmma reads of shared
memory and fails the launch (device assert) on an access that no barrier orders: the check
compute-sanitizer's racecheck cannot make for the async proxy. A few cases (block sizes 64 /
16, query tokens 1-2, cut sequences, a partial last tile) are run through the public API and
compared with the reference backend.
"""

from __future__ import annotations

import os
import sys

import torch
import triton

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))

import mla_cases  # noqa: E402

from portmla.backends.triton import decode_gluon  # noqa: E402

CASES = [  # seq lens, query lens, heads, block size
    ([70, 300, 1, 129], [1, 1, 1, 1], 128, 64),
    ([300, 5], [2, 1], 128, 16),
    ([1000], [1], 64, 64),
]


def main() -> int:
    mode = os.environ.get("TRITON_INSTRUMENTATION_MODE", "")
    triton.set_allocator(lambda size, align, stream: torch.empty(size, dtype=torch.int8, device="cuda"))
    calls = []
    orig = decode_gluon.launch

    def counted(*a, **k):
        calls.append(1)
        return orig(*a, **k)

    decode_gluon.launch = counted
    bad = 0
    for lens, qlens, heads, page in CASES:
        case = mla_cases.make_decode_case(lens, qlens, heads=heads, block_size=page, device="cuda")
        out, _ = mla_cases.decode(case, "triton")
        torch.cuda.synchronize()
        ref, _ = mla_cases.decode(case, "reference")
        err = mla_cases.rel_err(out, ref)
        ok = err < 1e-2
        bad += not ok
        print(f"lens {lens} q {qlens} h {heads} block {page}: rel err {err:.2e} {'ok' if ok else 'WRONG'}")
    print(f"mode {mode or 'none'}: {len(calls)} Gluon launches, {bad} wrong")
    return 1 if bad or len(calls) != len(CASES) else 0


if __name__ == "__main__":
    sys.exit(main())
