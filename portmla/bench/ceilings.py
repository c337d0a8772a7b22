"""Ceilings measured in the same run: device copy bandwidth and bf16 matmul throughput.

Copy bandwidth counts read + write (``2 * bytes / time``), as ANCHORS.md does
(H100: 2.44 TB/s). The matmul is ``n x n @ n x n`` in bf16, ``2 n^3`` FLOP
(H100, n = 8192: 769 TFLOP/s). On CPU the sizes are small so this takes a second.
"""

from __future__ import annotations

import torch

from .timing import time_callable

GPU_COPY_BYTES = 1 << 30
GPU_MATMUL_N = 8192
CPU_COPY_BYTES = 64 << 20
CPU_MATMUL_N = 512


def measure_ceilings(device: torch.device, warmup: int | None = None,
                     repeats: int | None = None) -> dict:
    """``{"copy_bytes", "copy_tbps", "matmul_n", "matmul_dtype", "matmul_tflops", ...}``."""
    device = torch.device(device)
    gpu = device.type != "cpu"
    warmup = (5 if gpu else 1) if warmup is None else warmup
    repeats = (20 if gpu else 5) if repeats is None else repeats
    out: dict = {"method": "median of repeats; copy counts read + write"}
    try:
        out.update(_copy(device, gpu, warmup, repeats))
    except Exception as e:  # noqa: BLE001 - a missing ceiling is reported, not fatal
        out["copy_error"] = f"{type(e).__name__}: {e}"
    try:
        out.update(_matmul(device, gpu, warmup, repeats))
    except Exception as e:  # noqa: BLE001
        out["matmul_error"] = f"{type(e).__name__}: {e}"
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return out


def _copy(device, gpu, warmup, repeats) -> dict:
    nbytes = GPU_COPY_BYTES if gpu else CPU_COPY_BYTES
    if device.type == "cuda":
        nbytes = min(nbytes, torch.cuda.mem_get_info(device)[0] // 4)
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    t = time_callable(lambda: dst.copy_(src), device, warmup, repeats)
    moved = src.numel() * src.element_size()
    return {"copy_bytes": moved, "copy_us": t.median_us,
            "copy_tbps": 2 * moved / (t.median_us * 1e-6) / 1e12}


def _matmul(device, gpu, warmup, repeats) -> dict:
    n = GPU_MATMUL_N if gpu else CPU_MATMUL_N
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    c = torch.empty(n, n, device=device, dtype=torch.bfloat16)
    t = time_callable(lambda: torch.matmul(a, b, out=c), device, warmup, repeats)
    return {"matmul_n": n, "matmul_dtype": "bfloat16", "matmul_us": t.median_us,
            "matmul_tflops": 2 * n ** 3 / (t.median_us * 1e-6) / 1e12}
