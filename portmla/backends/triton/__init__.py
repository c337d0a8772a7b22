"""Portable Triton backend. Placeholder until its kernels land."""

from __future__ import annotations

from ..base import PlannedBackend


class TritonBackend(PlannedBackend):
    NAME = "triton"
    PLATFORMS = ("cuda", "rocm", "xpu", "cpu")
    WHY = "not implemented yet"
