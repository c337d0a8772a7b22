"""Backend registry, per-platform priority lists, and the one selection loop."""

from __future__ import annotations

import functools

from .backends.base import Backend, BackendInfo
from .platform import current_platform
from .problems import Problem
from .reasons import UnsupportedError

# First backend with no reasons wins. The reference is last everywhere: it always runs.
PRIORITY: dict[str, tuple[str, ...]] = {
    "cuda": ("cuda", "triton", "reference"),
    "rocm": ("hip", "triton", "reference"),
    "xpu": ("sycl", "triton", "reference"),
    "cpu": ("reference", "triton"),
}


@functools.lru_cache(maxsize=1)
def registry() -> dict[str, Backend]:
    """Every backend by name. Importing a backend module never fails for a missing build."""
    from .backends.cuda import CudaBackend
    from .backends.hip import HipBackend
    from .backends.reference import ReferenceBackend
    from .backends.sycl import SyclBackend
    from .backends.triton import TritonBackend

    backends = [CudaBackend(), HipBackend(), SyclBackend(), TritonBackend(), ReferenceBackend()]
    return {b.NAME: b for b in backends}


def list_backends() -> list[str]:
    """Every registered backend name, available on this machine or not."""
    return list(registry())


def get_backend(name: str) -> Backend:
    reg = registry()
    if name not in reg:
        raise ValueError(f"backend={name!r} (registered: {', '.join(reg)}, or 'auto')")
    return reg[name]


def order_for(platform_kind: str) -> tuple[str, ...]:
    return PRIORITY[platform_kind]


def select(problem: Problem, backend: str = "auto", describe: str = "") -> Backend:
    """The backend that runs ``problem``: the forced one, or the first of the priority list.

    Raises ``UnsupportedError`` listing the inputs and every backend's reasons.
    """
    if not isinstance(backend, str):
        raise TypeError(f"backend={backend!r} must be a str ('auto' or one of {list_backends()})")
    if backend != "auto":
        chosen = get_backend(backend)
        why = chosen.reasons(problem)
        if not why:
            return chosen
        raise _unsupported(problem, {backend: [str(r) for r in why]}, describe, forced=True)
    collected: dict[str, list[str]] = {}
    for name in order_for(problem.platform.kind):
        b = registry()[name]
        why = b.reasons(problem)
        if not why:
            return b
        collected[name] = [str(r) for r in why]
    raise _unsupported(problem, collected, describe, forced=False)


def _unsupported(problem, reasons: dict[str, list[str]], describe: str, forced: bool):
    head = f"No backend can run {problem.op}" if not forced else \
        f"backend={next(iter(reasons))!r} cannot run {problem.op}"
    lines = [head + (f" with {describe}" if describe else "") + f" on {problem.platform.kind} "
             f"({problem.platform.device_name}, {problem.platform.arch}):"]
    for name, why in reasons.items():
        lines.append(f"  `{name}` is not supported because:")
        lines.extend(f"    {w}" for w in why)
    return UnsupportedError("\n".join(lines), reasons)


def probe(device=None) -> dict[str, BackendInfo]:
    """Every backend's availability and declared capabilities on ``device``."""
    platform = current_platform(device)
    return {name: b.info(platform) for name, b in registry().items()}


def _auto_backends(device, backend: str) -> list[Backend]:
    platform = current_platform(device)
    if backend != "auto":
        return [get_backend(backend)]
    return [registry()[n] for n in order_for(platform.kind)
            if not registry()[n].availability(platform)]


def supported_block_sizes(kv_cache_dtype: str = "auto", backend: str = "auto", device=None) -> tuple[int, ...]:
    """Block sizes (of 1, 2, 4, ..., 256) that some available backend (or ``backend``) takes."""
    from .kv_formats import canonical_format

    fmt = canonical_format(kv_cache_dtype)
    sizes: set[int] = set()
    for b in _auto_backends(device, backend):
        if fmt == "auto" or fmt in b.KV_CACHE_DTYPES:
            sizes.update(b.reported_block_sizes(fmt))
    return tuple(sorted(sizes))


def supported_kv_cache_dtypes(backend: str = "auto", device=None) -> tuple[str, ...]:
    """KV-cache formats that some available backend (or ``backend``) takes, plus 'auto'."""
    names: list[str] = ["auto"]
    for b in _auto_backends(device, backend):
        for f in b.KV_CACHE_DTYPES:
            if f not in names:
                names.append(f)
    return tuple(names)
