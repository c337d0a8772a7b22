"""Where the time of one mla_decode call goes, kernel by kernel (GPU machine).

For each row: the median of CUDA-graph replays of the whole call (as the benchmark times
it) and, from torch.profiler, every kernel's mean duration and the gaps between kernels
inside one eager call.

    PYTHONPATH=. python scripts/kernel_times.py 1q1s32k:128:fixed 8q1s8k:16 32q1s4k:128 [--timeline]
"""

from __future__ import annotations

import argparse
import statistics

import torch
from torch.profiler import ProfilerActivity, profile

import portmla as pm
from portmla.bench.inputs import build_inputs
from portmla.bench.specs import parse_spec


def graph_median(g, replays: int = 30) -> float:
    """Median of ``replays`` replays of the captured call ``g``, each timed alone."""
    times = []
    for _ in range(replays):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        g.replay()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) * 1e3)
    return statistics.median(times)


def kernel_table(fn, calls: int = 20) -> list[tuple[str, float, int]]:
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    evs = sorted((e for e in prof.events() if e.device_type.name == "CUDA"),
                 key=lambda e: e.time_range.start)
    per: dict[str, list[float]] = {}
    for e in evs:
        per.setdefault(e.name[:70], []).append(e.time_range.elapsed_us())
    rows = [(k, statistics.mean(v), len(v)) for k, v in per.items()]
    # gaps inside one call: kernel start minus previous kernel end, per call position
    n = len(evs) // calls if calls else 0
    gaps = []
    for c in range(calls):
        one = evs[c * n:(c + 1) * n]
        gaps.append([one[i].time_range.start - one[i - 1].time_range.end for i in range(1, len(one))])
    if gaps and gaps[0]:
        med = [statistics.median(g[i] for g in gaps) for i in range(len(gaps[0]))]
        rows.append(("gaps between kernels (median per position, us)", sum(med), len(med)))
    return rows


def capture(fn):
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    return g


def graph_timeline(g, replays: int = 40) -> list[str]:
    """Replays of the captured call ``g`` enqueued back to back as the benchmark times them: the
    median period between replays' first kernels, and per kernel of a replay its median start
    and end (us after the replay's first kernel started; with programmatic dependent launch a
    kernel starts before the one it waits for ends)."""
    for _ in range(5):
        g.replay()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(replays):
            g.replay()
        torch.cuda.synchronize()
    evs = sorted((e for e in prof.events() if e.device_type.name == "CUDA"), key=lambda e: e.time_range.start)
    n = len(evs) // replays
    if n == 0:
        return ["   (no kernel records inside graph replays)"]
    runs = [evs[r * n:(r + 1) * n] for r in range(replays)]
    period = statistics.median(b[0].time_range.start - a[0].time_range.start for a, b in zip(runs, runs[1:]))
    out = [f"   period between replays {period:.1f} us, {n} kernels a replay"]
    for i in range(n):
        st = statistics.median(r[i].time_range.start - r[0].time_range.start for r in runs)
        en = statistics.median(r[i].time_range.end - r[0].time_range.start for r in runs)
        out.append(f"   {st:7.1f} -> {en:7.1f} us  {runs[0][i].name[:60]}")
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("rows", nargs="+", help="spec:heads[:fixed]")
    ap.add_argument("--backend", default="cuda")
    ap.add_argument("--kv-cache-dtype", default="bfloat16")
    ap.add_argument("--timeline", action="store_true", help="also each kernel's place inside back-to-back replays")
    a = ap.parse_args()
    if a.timeline:  # the floor: a graph of one empty kernel, timed as the rows are
        z = torch.zeros(1, device="cuda")
        g = capture(lambda: z.add_(0))
        print(f"== empty kernel: graph replay median {graph_median(g):.1f} us")
        print("\n".join(graph_timeline(g)))
    for row in a.rows:
        spec, heads, *rest = row.split(":")
        inp = build_inputs(parse_spec(spec), int(heads), a.kv_cache_dtype, 64, device="cuda",
                           fixed=bool(rest), layers=1)
        kw = inp.decode_kwargs(0)

        def call(kw=kw):
            return pm.mla_decode(backend=a.backend, **kw)

        g = capture(call)
        med = graph_median(g)
        print(f"== {row} ({'fixed' if inp.fixed else 'varlen'}): graph replay median {med:.1f} us")
        for name, us, n in kernel_table(call):
            print(f"   {us:8.1f} us  x{n:<3d} {name}")
        if a.timeline:
            print("\n".join(graph_timeline(g)))
        del inp, kw, g
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
