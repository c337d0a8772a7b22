#!/usr/bin/env python3
"""Build portmla._cuda without torch: nvcc + pybind11, one object per source, in parallel.

    python csrc_cuda/build.py            # build portmla/_cuda<EXT_SUFFIX> for PORTMLA_CUDA_ARCHS
    python csrc_cuda/build.py --check    # compile every source for sm_80 and sm_90a, no link
    python csrc_cuda/build.py --verbose-ptxas   # also print ptxas resource usage (-Xptxas -v)

Environment: PORTMLA_CUDA_ARCHS (default "80;90a"; "90a" is built as
-gencode=arch=compute_90a,code=sm_90a), CUDA_HOME / CUDA_PATH, NVCC, PORTMLA_BUILD_JOBS,
PORTMLA_CUTLASS_INCLUDE (CuTe / CUTLASS headers; default: those of the installed
``nvidia-cutlass`` package, ``pip install --no-deps nvidia-cutlass``).
The Hopper kernel (``csrc_cuda/sm90/``, CuTe GMMA atoms) is built when the archs include 90a
and the headers are found; otherwise the module records why and the generic kernels serve
sm_90 too (``--check`` insists on the headers).
Without nvcc (or pybind11) the build writes why to portmla/_cuda_build_status.txt, and the
cuda backend reports that reason ("not built: nvcc not found at install time").
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
PKG = ROOT / "portmla"
STATUS = PKG / "_cuda_build_status.txt"
BUILD = ROOT / "build" / "csrc_cuda"
CHECK_ARCHS = "80;90a"


def find_nvcc() -> str | None:
    cand = [os.environ.get("NVCC")]
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var):
            cand.append(os.path.join(os.environ[var], "bin", "nvcc"))
    cand += [shutil.which("nvcc"), "/usr/local/cuda/bin/nvcc"]
    for c in cand:
        if c and os.path.isfile(c) and os.access(c, os.X_OK):
            return c
    return None


def gencode(archs: str) -> list[str]:
    flags = []
    for a in [x.strip() for x in archs.replace(",", ";").split(";") if x.strip()]:
        if not a.rstrip("a").isdigit():
            raise SystemExit(f"PORTMLA_CUDA_ARCHS entry {a!r} (expected e.g. 80, 86, 89, 90a)")
        flags.append(f"-gencode=arch=compute_{a},code=sm_{a}")
    if not flags:
        raise SystemExit("PORTMLA_CUDA_ARCHS is empty (expected e.g. '80;90a')")
    return flags


def cutlass_include() -> Path | None:
    """CuTe / CUTLASS headers: PORTMLA_CUTLASS_INCLUDE, else the nvidia-cutlass package's."""
    env = os.environ.get("PORTMLA_CUTLASS_INCLUDE")
    cands = [Path(env)] if env else []
    try:
        import importlib.util

        spec = importlib.util.find_spec("cutlass_library")
        if spec is not None and spec.submodule_search_locations:
            for loc in spec.submodule_search_locations:
                cands.append(Path(loc) / "source" / "include")
    except (ImportError, ValueError):
        pass
    for c in cands:
        if (c / "cute" / "arch" / "mma_sm90_gmma.hpp").is_file():
            return c
    return None


def hopper_plan(archs: str) -> tuple[Path | None, str]:
    """``(cutlass include dir, "")`` when the sm_90a kernel is built, else ``(None, why)``."""
    if "90a" not in [a.strip() for a in archs.replace(",", ";").split(";")]:
        return None, f"PORTMLA_CUDA_ARCHS={archs} has no 90a"
    inc = cutlass_include()
    if inc is None:
        return None, ("CuTe headers not found at build time (pip install --no-deps "
                      "nvidia-cutlass; or set PORTMLA_CUTLASS_INCLUDE)")
    return inc, ""


def sources(with_hopper: bool) -> list[Path]:
    return sorted(s for s in HERE.rglob("*.cu")
                  if with_hopper or "sm90" not in s.relative_to(HERE).parts)


def common_flags(archs: str, ptxas_verbose: bool) -> list[str]:
    f = ["-O3", "-std=c++17", "--expt-relaxed-constexpr", "-Xcompiler", "-fPIC",
         "-Xcompiler", "-fvisibility=hidden", f"-I{HERE}", "-lineinfo"]
    f += gencode(archs)
    if ptxas_verbose:
        f += ["-Xptxas", "-v"]
    return f


def run(cmd: list[str]) -> tuple[int, str]:
    r = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    return r.returncode, r.stdout


def compile_all(nvcc: str, archs: str, outdir: Path, extra: list[str], ptxas_verbose: bool,
                with_binding: bool) -> list[Path]:
    outdir.mkdir(parents=True, exist_ok=True)
    inc, why = hopper_plan(archs)
    if inc is not None:
        extra = extra + [f"-I{inc}", "-DPORTMLA_HAVE_SM90A=1"]
    else:
        # nvcc splits -D values at commas
        extra = extra + [f'-DPORTMLA_SM90A_WHY="{why.replace(",", ";")}"']
    print(f"hopper kernel: {'built with CuTe from ' + str(inc) if inc else 'not built: ' + why}",
          flush=True)
    jobs = []
    for src in sources(inc is not None):
        obj = outdir / (str(src.relative_to(HERE)).replace("/", "__") + ".o")
        jobs.append((src, obj, [nvcc, "-c", str(src), "-o", str(obj)]
                     + common_flags(archs, ptxas_verbose) + extra))
    if with_binding:
        import pybind11

        src = HERE / "binding.cpp"
        obj = outdir / "binding.cpp.o"
        py_inc = sysconfig.get_paths()["include"]
        jobs.append((src, obj, [nvcc, "-c", str(src), "-o", str(obj), "-O2", "-std=c++17",
                                "-Xcompiler", "-fPIC", "-Xcompiler", "-fvisibility=hidden",
                                f"-I{HERE}", f"-I{pybind11.get_include()}", f"-I{py_inc}",
                                f'-DPORTMLA_ARCHS="{archs}"'] + extra))
    n = int(os.environ.get("PORTMLA_BUILD_JOBS", "0")) or min(len(jobs), os.cpu_count() or 1)
    failed = []
    with cf.ThreadPoolExecutor(max_workers=n) as ex:
        futs = {ex.submit(run, cmd): (src, obj) for src, obj, cmd in jobs}
        for fut in cf.as_completed(futs):
            src, obj = futs[fut]
            rc, log = fut.result()
            rel = src.relative_to(ROOT)
            print(f"[{'ok' if rc == 0 else 'FAILED'}] {rel}", flush=True)
            if log.strip():
                print(log, flush=True)
            if rc:
                failed.append(str(rel))
    if failed:
        raise SystemExit(f"nvcc failed for: {', '.join(failed)}")
    return [obj for _, obj, _ in jobs]


def write_status(text: str) -> None:
    STATUS.write_text(text + "\n")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true",
                    help=f"compile every .cu for {CHECK_ARCHS} (and the binding), no link")
    ap.add_argument("--verbose-ptxas", action="store_true", help="print ptxas resource usage")
    args = ap.parse_args()

    nvcc = find_nvcc()
    if nvcc is None:
        msg = "nvcc not found at install time (set CUDA_HOME or NVCC and rerun csrc_cuda/build.py)"
        if not args.check:
            write_status(msg)
        print(f"portmla._cuda: not built: {msg}", file=sys.stderr)
        return 1
    try:
        import pybind11  # noqa: F401
    except ImportError:
        msg = "pybind11 not installed at build time (pip install pybind11)"
        if not args.check:
            write_status(msg)
        print(f"portmla._cuda: not built: {msg}", file=sys.stderr)
        return 1

    if args.check:
        inc, why = hopper_plan(CHECK_ARCHS)
        if inc is None:
            print(f"portmla._cuda: check failed: {why}", file=sys.stderr)
            return 1
        compile_all(nvcc, CHECK_ARCHS, BUILD / "check", [], args.verbose_ptxas, with_binding=True)
        print(f"check ok: every source compiled for {CHECK_ARCHS} with {nvcc}")
        return 0

    archs = os.environ.get("PORTMLA_CUDA_ARCHS", "80;90a")
    try:
        objs = compile_all(nvcc, archs, BUILD / "objs", [], args.verbose_ptxas, with_binding=True)
        suffix = sysconfig.get_config_var("EXT_SUFFIX") or ".so"
        target = PKG / f"_cuda{suffix}"
        cmd = [nvcc, "-shared", "-o", str(target)] + [str(o) for o in objs] + gencode(archs) \
            + ["-cudart", "static"]
        rc, log = run(cmd)
        if rc:
            print(log)
            raise SystemExit(f"link failed: {' '.join(cmd)}")
    except SystemExit as e:
        write_status(f"build failed: {e}")
        raise
    if STATUS.exists():
        STATUS.unlink()
    print(f"built {target.relative_to(ROOT)} for {archs}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
