"""Native CUDA backend (csrc_cuda). Placeholder until the native module lands."""

from __future__ import annotations

from .base import PlannedBackend


class CudaBackend(PlannedBackend):
    NAME = "cuda"
    PLATFORMS = ("cuda",)
    MIN_CAPABILITY = (8, 0)
    WHY = "not implemented yet (portmla._cuda is not built in this release)"
