"""Platform facts: which vendor, which architecture, which fp8 dtype, which toolchains.

The vendor is read off the torch build (``torch.version.hip``, ``torch.xpu``), never off
``device.type`` alone: ROCm builds report CUDA devices as ``"cuda"``.
Probes run lazily, are cached per device, and record why they failed.
"""

from __future__ import annotations

import functools
import os
import shutil
from dataclasses import dataclass, field

import torch

KINDS = ("cuda", "rocm", "xpu", "cpu")


@dataclass(frozen=True)
class Platform:
    """Facts about one device. Frozen; ``current_platform()`` caches one per device."""

    kind: str  # "cuda" | "rocm" | "xpu" | "cpu"
    device: str  # torch device string, e.g. "cuda:0"
    device_name: str
    arch: str  # "sm_90", "gfx942", "xe2" / "pvc" / the reported name, "cpu"
    capability: tuple[int, int] | None  # CUDA only
    fp8_dtype: torch.dtype
    warp_size: int  # warp (CUDA 32), wavefront (CDNA 64), sub-group (Intel), 1 on CPU
    num_compute_units: int  # SMs, CUs, Xe cores (EUs / 8 when only EUs are known), CPU threads
    shared_memory_per_block: int = 0  # bytes a block may opt in to; 0 when unknown
    probe_errors: tuple[str, ...] = field(default=())

    @property
    def torch_device(self) -> torch.device:
        return torch.device(self.device)


def torch_vendor() -> str:
    """The GPU vendor this torch build targets: "rocm", "cuda", "xpu" or "cpu"."""
    if getattr(torch.version, "hip", None):
        return "rocm"
    if getattr(torch.version, "cuda", None) and torch.cuda.is_available():
        return "cuda"
    xpu = getattr(torch, "xpu", None)
    if xpu is not None and xpu.is_available():
        return "xpu"
    return "cpu"


def _resolve_device(device) -> torch.device:
    if device is None:
        vendor = torch_vendor()
        if vendor in ("cuda", "rocm") and torch.cuda.is_available():
            return torch.device("cuda", torch.cuda.current_device())
        if vendor == "xpu":
            return torch.device("xpu", torch.xpu.current_device())
        return torch.device("cpu")
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    if device.type == "xpu" and device.index is None:
        device = torch.device("xpu", torch.xpu.current_device())
    return device


def current_platform(device=None) -> Platform:
    """The platform of ``device`` (default: the current GPU if any, else CPU). Cached."""
    return _platform_for(str(_resolve_device(device)))


@functools.cache
def _platform_for(device: str) -> Platform:
    dev = torch.device(device)
    errors: list[str] = []
    if dev.type == "cuda":
        props = torch.cuda.get_device_properties(dev)
        smem = int(getattr(props, "shared_memory_per_block_optin", 0) or 0)
        if getattr(torch.version, "hip", None):
            arch = str(getattr(props, "gcnArchName", "") or "").split(":")[0] or "gfx-unknown"
            fp8 = torch.float8_e4m3fnuz if arch.startswith("gfx94") else torch.float8_e4m3fn
            warp = int(getattr(props, "warp_size", 64) or 64)
            return Platform("rocm", device, props.name, arch, None, fp8, warp,
                            props.multi_processor_count, smem, tuple(errors))
        cap = (props.major, props.minor)
        arch = f"sm_{props.major}{props.minor}"
        warp = int(getattr(props, "warp_size", 32) or 32)
        return Platform("cuda", device, props.name, arch, cap, torch.float8_e4m3fn, warp,
                        props.multi_processor_count, smem, tuple(errors))
    if dev.type == "xpu":
        props = torch.xpu.get_device_properties(dev)
        name = str(getattr(props, "name", "xpu"))
        arch = _xpu_arch(name, props)
        sub_groups = tuple(getattr(props, "sub_group_sizes", ()) or ())
        warp = 16 if 16 in sub_groups else (max(sub_groups) if sub_groups else 16)
        eus = int(getattr(props, "gpu_eu_count", 0) or 0)
        units = int(getattr(props, "gpu_subslice_count", 0) or 0) or (eus // 8 if eus else 0)
        if not units:
            errors.append("xpu: neither gpu_subslice_count nor gpu_eu_count reported")
        return Platform("xpu", device, name, arch, None, torch.float8_e4m3fn, warp, units,
                        0, tuple(errors))
    return Platform("cpu", "cpu", _cpu_name(), "cpu", None, torch.float8_e4m3fn, 1,
                    torch.get_num_threads(), 0, tuple(errors))


def _xpu_arch(name: str, props) -> str:
    arch = getattr(props, "architecture", None)
    if arch is not None:
        return str(arch).split(".")[-1].lower()
    low = name.lower()
    if "max" in low or "1550" in low or "1100" in low:
        return "pvc"
    if "b580" in low or "b570" in low or "lunar" in low or "arc 1" in low:
        return "xe2"
    return low.replace(" ", "_") or "xpu"


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform as _p

    return _p.processor() or "cpu"


@dataclass(frozen=True)
class Toolchain:
    name: str
    path: str | None
    note: str = ""


def toolchains() -> list[Toolchain]:
    """Compilers found on PATH (or CUDA_HOME / ROCM_PATH) and the Triton package."""
    found = []
    cuda_home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    nvcc = shutil.which("nvcc") or (
        os.path.join(cuda_home, "bin", "nvcc") if cuda_home and os.path.exists(
            os.path.join(cuda_home, "bin", "nvcc")) else None)
    found.append(Toolchain("nvcc", nvcc))
    rocm = os.environ.get("ROCM_PATH", "/opt/rocm")
    hipcc = shutil.which("hipcc") or (
        os.path.join(rocm, "bin", "hipcc") if os.path.exists(os.path.join(rocm, "bin", "hipcc"))
        else None)
    found.append(Toolchain("hipcc", hipcc))
    found.append(Toolchain("icpx", shutil.which("icpx")))
    found.append(Toolchain("acpp", shutil.which("acpp")))
    try:
        import triton

        found.append(Toolchain("triton", os.path.dirname(triton.__file__), triton.__version__))
    except Exception as e:  # noqa: BLE001 - recorded, not swallowed
        found.append(Toolchain("triton", None, f"import failed: {type(e).__name__}: {e}"))
    return found


def is_capturing(device: torch.device) -> bool:
    """True while a CUDA/HIP graph is being captured on the current stream of ``device``."""
    if device.type == "cuda":
        try:
            return bool(torch.cuda.is_current_stream_capturing())
        except RuntimeError:
            return False
    return False


def is_tracing() -> bool:
    """True under torch.compile / export tracing (no host reads of tensor values then)."""
    compiler = getattr(torch, "compiler", None)
    if compiler is not None and hasattr(compiler, "is_compiling"):
        return bool(compiler.is_compiling())
    return False
