"""Timing: the median of repeats, one launch per repeat, cache copies in rotation.

* cuda / rocm: device events around each launch; the launch is a CUDA-graph replay when
  graphs are on and the callable can be captured (one graph per cache copy, sharing a
  memory pool), else the eager call (host overhead included).
* cpu / xpu: wall clock around each call, with a synchronize before and after.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

GRAPH_KINDS = ("cuda",)  # torch device types with CUDA/HIP graphs (ROCm reports "cuda")


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "xpu":
        torch.xpu.synchronize(device)


def graphs_possible(device: torch.device) -> bool:
    return device.type in GRAPH_KINDS


@dataclass
class Launcher:
    """One launch of one cache copy: ``run()`` returns the output tensor."""

    run: Callable[[], torch.Tensor]
    output: torch.Tensor | None = None  # the static output of a captured graph
    graph: object = None


@dataclass
class Prepared:
    launchers: list[Launcher]
    graphs: bool
    note: str = ""


@dataclass
class Timing:
    times_us: list[float]
    method: str
    graphs: bool
    note: str = ""
    extra: dict = field(default_factory=dict)

    @property
    def median_us(self) -> float:
        return statistics.median(self.times_us)

    @property
    def min_us(self) -> float:
        return min(self.times_us)

    @property
    def max_us(self) -> float:
        return max(self.times_us)


def prepare(calls: list[Callable[[], torch.Tensor]], device: torch.device,
            use_graphs: bool) -> Prepared:
    """Launchers for ``calls`` (one per cache copy): captured graphs when asked and
    possible. A failed capture falls back to eager calls and says why in ``note``."""
    eager = Prepared([Launcher(c) for c in calls], False)
    if not (use_graphs and graphs_possible(device)):
        return eager
    try:
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):  # warm up off the capture (compiles, workspaces)
            for c in calls:
                c()
        torch.cuda.current_stream(device).wait_stream(side)
        synchronize(device)
        launchers, pool = [], None
        for c in calls:
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g, pool=pool):
                out = c()
            pool = g.pool() if pool is None else pool
            launchers.append(Launcher(_replayer(g, out), out, g))
        synchronize(device)
        return Prepared(launchers, True)
    except Exception as e:  # noqa: BLE001 - reported in the row, timed eagerly instead
        synchronize(device)
        eager.note = f"graph capture failed ({type(e).__name__}: {_short(e)}); timed eager calls"
        return eager


def _replayer(g, out):
    def run():
        g.replay()
        return out
    return run


def _short(e: Exception, n: int = 160) -> str:
    s = " ".join(str(e).split())
    return s if len(s) <= n else s[:n - 3] + "..."


def measure(prepared: Prepared, device: torch.device, warmup: int, repeats: int) -> Timing:
    """Median over ``repeats`` launches after ``warmup``; launch ``i`` uses copy ``i % n``."""
    if repeats < 1:
        raise ValueError(f"repeats={repeats} (must be >= 1)")
    ls = prepared.launchers
    for i in range(max(warmup, 0)):
        ls[i % len(ls)].run()
    synchronize(device)
    if device.type == "cuda":
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(repeats)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(repeats)]
        for i in range(repeats):
            starts[i].record()
            ls[i % len(ls)].run()
            ends[i].record()
        synchronize(device)
        times = [s.elapsed_time(e) * 1e3 for s, e in zip(starts, ends)]
        method = "device events around " + ("CUDA-graph replays" if prepared.graphs
                                            else "eager calls")
    else:
        times = []
        for i in range(repeats):
            synchronize(device)
            t0 = time.perf_counter()
            ls[i % len(ls)].run()
            synchronize(device)
            times.append((time.perf_counter() - t0) * 1e6)
        method = "wall clock with synchronize"
    return Timing(times, method, prepared.graphs, prepared.note)


def time_callable(fn: Callable[[], object], device: torch.device, warmup: int,
                  repeats: int) -> Timing:
    """Median time of an eager callable (used by the ceilings)."""
    return measure(Prepared([Launcher(fn)], False), device, warmup, repeats)
