"""Native SYCL backend for Intel Xe2 / PVC (csrc_sycl). Registered so probe() can say why it is off."""

from __future__ import annotations

from .base import PlannedBackend


class SyclBackend(PlannedBackend):
    NAME = "sycl"
    PLATFORMS = ("xpu",)
    WHY = "not implemented yet (csrc_sycl has no kernels in this release)"
