"""``python -m portmla info``: what this machine has and what each backend says."""

from __future__ import annotations

import importlib

import torch

from . import __version__
from .dispatch import probe
from .platform import current_platform, toolchains

NATIVE_MODULES = ("portmla._cuda", "portmla._hip", "portmla._sycl")


def native_modules() -> list[tuple[str, str]]:
    """(module, 'loaded from PATH' or the import error) for each native module."""
    out = []
    for name in NATIVE_MODULES:
        try:
            mod = importlib.import_module(name)
            archs = getattr(mod, "BUILT_ARCHS", None)  # which kernels serve what: probe().kernels
            out.append((name, f"loaded from {mod.__file__}" + (f" (archs {archs})" if archs else "")))
        except Exception as e:  # noqa: BLE001 - reported, not swallowed
            out.append((name, f"not loaded: {type(e).__name__}: {e}"))
    return out


def _limit(n: int) -> str:
    """A declared maximum; the base class's 2^30 means no limit."""
    return "any" if n >= 1 << 30 else str(n)


def print_info(device=None) -> None:
    p = current_platform(device)
    print(f"portmla {__version__}, torch {torch.__version__}"
          f" (cuda {torch.version.cuda}, hip {getattr(torch.version, 'hip', None)})")
    cap = "" if p.capability is None else f", capability {p.capability[0]}.{p.capability[1]}"
    print(f"platform: {p.kind} on {p.device}: {p.device_name} ({p.arch}{cap}), "
          f"{p.num_compute_units} compute units, warp/sub-group {p.warp_size}, "
          f"fp8 {str(p.fp8_dtype).replace('torch.', '')}")
    for err in p.probe_errors:
        print(f"  probe: {err}")
    print("toolchains:")
    for t in toolchains():
        print(f"  {t.name:7s} {t.path or 'not found'}{'  ' + t.note if t.note else ''}")
    print("native modules:")
    for name, state in native_modules():
        print(f"  {name:15s} {state}")
    print("backends (priority order for this platform first):")
    from .dispatch import order_for

    infos = probe(device)
    order = list(order_for(p.kind)) + [n for n in infos if n not in order_for(p.kind)]
    for name in order:
        b = infos[name]
        state = "available" if b.available else "unavailable"
        print(f"  {name:9s} {state}")
        for r in b.reasons:
            print(f"      because {r}")
        if b.available:
            print(f"      block sizes {', '.join(map(str, b.block_sizes))}; formats "
                  f"{', '.join(b.kv_cache_dtypes)}; max heads {_limit(b.max_num_heads)}; "
                  f"max query len {_limit(b.max_query_len)}; strided kv {b.strided_kv}; "
                  f"lse {b.returns_lse}; cuda graphs {b.cuda_graphs}")
            print(f"      ops {', '.join(b.ops)}")
            for k in b.kernels:
                print(f"      kernel: {k}")
