"""Native HIP backend for AMD Instinct (csrc_hip). Registered so probe() can say why it is off."""

from __future__ import annotations

from .base import PlannedBackend


class HipBackend(PlannedBackend):
    NAME = "hip"
    PLATFORMS = ("rocm",)
    WHY = "not implemented yet (csrc_hip has no kernels in this release)"
