"""Build hook: the normal install also builds the native CUDA module when it can.

``pip install .`` (or ``-e .``) runs ``csrc_cuda/build.py`` before the Python files are
collected, when ``PORTMLA_BUILD_CUDA`` is ``auto`` (default) and nvcc is found, or when
it is ``1``. Without nvcc, or with ``PORTMLA_BUILD_CUDA=0``, nothing is compiled and
``portmla/_cuda_build_status.txt`` records why, which the ``cuda`` backend reports.
A failed native build never fails the install (``PORTMLA_BUILD_CUDA=1`` makes it fail).
Archs: ``PORTMLA_CUDA_ARCHS`` (default ``80;90a``).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent
STATUS = ROOT / "portmla" / "_cuda_build_status.txt"


def build_native() -> None:
    mode = os.environ.get("PORTMLA_BUILD_CUDA", "auto").lower()
    if mode in ("0", "off", "no", "false"):
        STATUS.write_text("not built: PORTMLA_BUILD_CUDA=0 at install time "
                          "(build it with python csrc_cuda/build.py)\n")
        return
    script = ROOT / "csrc_cuda" / "build.py"
    if not script.exists():  # an sdist without the sources
        return
    rc = subprocess.call([sys.executable, str(script)], cwd=str(ROOT))
    if rc and mode in ("1", "on", "yes", "true"):
        raise SystemExit(f"PORTMLA_BUILD_CUDA={mode}: csrc_cuda/build.py failed (exit {rc})")


class BuildPyWithNative(build_py):
    def run(self):
        build_native()
        super().run()


setup(cmdclass={"build_py": BuildPyWithNative})
