#!/usr/bin/env python3
"""Same-process A/B of a backend's environment settings (GPU machine; cuda unless --backend).

    python scripts/cuda_env_ab.py --env PORTMLA_CUDA_SCHED_PREFETCH=0 \\
        --env PORTMLA_CUDA_SCHED_PREFETCH=147456 [--rounds 3] \\
        128q1s8k:16 128q1s8k:16:fixed 128q1s4k:128 128q1s8k:16:varlen:fp8 128q1s8k:32:varlen:fp8:16

Each row (spec:heads[:fixed|varlen][:format][:block size], block 64 unless given) gets the bench's inputs once (same lengths,
seed 0); every round times each setting in turn (the order reversed every other round), the
call's CUDA graph captured under that setting. A setting is one or more NAME=VALUE joined by
commas; NAME= unsets NAME. Prints the medians of graph replays in us, a round each, and their
median. One process and one set of inputs for all settings: differences between the settings
are not differences between draws of lengths or between processes.
"""

from __future__ import annotations

import argparse
import os
import statistics

from portmla.bench.inputs import build_inputs
from portmla.bench.measure import portmla_calls
from portmla.bench.specs import parse_spec
from portmla.bench.timing import measure, prepare


def parse_setting(text: str) -> dict[str, str | None]:
    env: dict[str, str | None] = {}
    for item in text.split(","):
        name, eq, value = item.partition("=")
        if not name or not eq:
            raise SystemExit(f"--env {text!r}: expected NAME=VALUE[,NAME=VALUE...]")
        env[name] = value or None
    return env


def apply(env: dict[str, str | None]) -> dict[str, str | None]:
    """Sets ``env``; returns what it replaced (to undo with the same call)."""
    old = {k: os.environ.get(k) for k in env}
    for k, v in env.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    return old


def time_row(item: str, settings: list[dict[str, str | None]], rounds: int,
             backend: str = "cuda") -> list[list[float]]:
    spec, heads, *rest = item.split(":")
    fixed = bool(rest) and rest[0] == "fixed"
    fmt = rest[1] if len(rest) > 1 else "bfloat16"
    block = int(rest[2]) if len(rest) > 2 else 64
    inp = build_inputs(parse_spec(spec), int(heads), fmt, block, device="cuda", fixed=fixed, layers=2)
    calls, out = portmla_calls(inp, backend)
    times: list[list[float]] = [[] for _ in settings]
    for r in range(rounds):
        order = range(len(settings)) if r % 2 == 0 else reversed(range(len(settings)))
        for k in order:
            old = apply(settings[k])
            try:
                times[k].append(measure(prepare(calls, out.device, use_graphs=True),
                                        out.device, 3, 20).median_us)
            finally:
                apply(old)
    return times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--env", action="append", required=True, help="NAME=VALUE[,NAME=VALUE...]")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--backend", default="cuda", help="the portmla backend timed (cuda, triton)")
    ap.add_argument("rows", nargs="+", help="spec:heads[:fixed|varlen][:format][:block size]")
    args = ap.parse_args()
    settings = [parse_setting(e) for e in args.env]
    for item in args.rows:
        times = time_row(item, settings, args.rounds, args.backend)
        cells = [f"{e}: {' '.join(f'{t:.1f}' for t in ts)} ({statistics.median(ts):.1f})"
                 for e, ts in zip(args.env, times)]
        print(f"{item} | " + " | ".join(cells), flush=True)


if __name__ == "__main__":
    main()
