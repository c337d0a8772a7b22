"""Test configuration: which device, which backends, and the required-backend gate.

Environment:
  PORTMLA_TEST_DEVICE     torch device for the tests (default: the current GPU, else cpu)
  PORTMLA_REQUIRE_BACKEND backend that must be available on that device; the session
                          fails (not skips) when it is not, before any test runs.
  PORTMLA_TEST_BACKENDS   comma list of backends to run the conformance suite on
                          (default: every backend available on the device)
  PORTMLA_TEST_SEED       session seed (default: fresh each run, printed in the header);
                          each test is seeded from it and its node id
"""

from __future__ import annotations

import os
import random
import zlib

import pytest
import torch

# On a machine without a GPU the Triton kernels run under the Triton interpreter; the
# variable must be set before any @triton.jit function is defined.
if not torch.cuda.is_available() and not (getattr(torch, "xpu", None) and torch.xpu.is_available()):
    os.environ.setdefault("TRITON_INTERPRET", "1")

SESSION_SEED = int(os.environ.get("PORTMLA_TEST_SEED") or random.SystemRandom().randrange(2**31))


def device_under_test() -> torch.device:
    env = os.environ.get("PORTMLA_TEST_DEVICE")
    if env:
        return torch.device(env)
    if torch.cuda.is_available():
        return torch.device("cuda")
    xpu = getattr(torch, "xpu", None)
    if xpu is not None and xpu.is_available():
        return torch.device("xpu")
    return torch.device("cpu")


def backends_under_test() -> list[str]:
    import portmla as pm

    env = os.environ.get("PORTMLA_TEST_BACKENDS")
    if env:
        return [b.strip() for b in env.split(",") if b.strip()]
    infos = pm.probe(device_under_test())
    return [n for n, info in infos.items() if info.available]


def pytest_sessionstart(session):
    required = os.environ.get("PORTMLA_REQUIRE_BACKEND")
    if not required:
        return
    import portmla as pm

    dev = device_under_test()
    info = pm.probe(dev).get(required)
    if info is None or not info.available:
        why = "not registered" if info is None else "; ".join(info.reasons)
        raise pytest.UsageError(
            f"PORTMLA_REQUIRE_BACKEND={required} but that backend is not available on {dev}: {why}")


def pytest_report_header(config):
    import portmla as pm

    dev = device_under_test()
    p = pm.current_platform(dev)
    return [f"portmla: PORTMLA_TEST_SEED={SESSION_SEED}",
            f"portmla: device {dev} ({p.kind}, {p.device_name}, {p.arch}); "
            f"backends under test: {', '.join(backends_under_test())}"]


@pytest.fixture(scope="session")
def device() -> torch.device:
    return device_under_test()


@pytest.fixture
def ran(monkeypatch):
    """Names of the cuda backend's decode variants chosen during the test."""
    from portmla.backends import cuda as cuda_backend

    seen = []
    orig = cuda_backend.CudaBackend.decode_variant

    def spy(p, mod):
        out = orig(p, mod)
        seen.append(out[0])
        return out

    monkeypatch.setattr(cuda_backend.CudaBackend, "decode_variant", staticmethod(spy))
    return seen


@pytest.fixture(autouse=True)
def _seed(request):
    torch.manual_seed((SESSION_SEED + zlib.crc32(request.node.nodeid.encode())) % (2**31))
