"""The Triton decode's programmatic dependent launch (``launch.use_pdl``: schedule -> decode ->
pieces combine, each kernel started while the one before finishes and waiting on
``griddepcontrol.wait``) on an sm_90+ GPU: the same bits as plain stream order, right against
the reference, inside CUDA graphs too.

Skips off CUDA or below sm_90; on such a device it fails (does not skip) when PDL is not on.
Caches are NaN-poisoned outside the written slots, outputs NaN-filled.
"""

from __future__ import annotations

import mla_cases
import pytest
import torch
from conftest import device_under_test

import portmla as pm

DEV = device_under_test()
if DEV.type != "cuda" or torch.cuda.get_device_capability(DEV)[0] < 9:
    pytest.skip("programmatic dependent launch needs an sm_90+ GPU", allow_module_level=True)

from portmla.backends.triton import launch as tlaunch  # noqa: E402

L = 512


def test_pdl_is_on_for_this_gpu(monkeypatch):
    monkeypatch.delenv("PORTMLA_TRITON_PDL", raising=False)
    assert tlaunch.use_pdl(pm.current_platform(DEV))
    monkeypatch.setenv("PORTMLA_TRITON_PDL", "0")
    assert not tlaunch.use_pdl(pm.current_platform(DEV))


# fmt, heads, seq lens, query lens, parts (None: default): the 16-row Triton tile (many pieces a
# sequence), the 64-row tile (the Gluon kernel on sm_90), varlen causal queries, an empty sequence
CASES = [
    ("fp8", 16, [3000, 40, 1, 2500], [1, 1, 1, 1], None),
    ("fp8_ds_mla", 16, [700, 0, 1300], [1, 0, 1], 40),
    ("bfloat16", 16, [5000, 64], [1, 1], None),
    ("bfloat16", 128, [900, 3, 2000], [1, 2, 1], None),
    ("fp8", 128, [1500, 700], [2, 1], 17),
]


@pytest.mark.parametrize("fmt,heads,lens,qlens,parts", CASES)
def test_pdl_chain_matches_stream_order(fmt, heads, lens, qlens, parts, monkeypatch):
    launches = mla_cases.force_decode_config(monkeypatch, True, parts)
    case = mla_cases.make_decode_case(lens, qlens, heads=heads, block_size=64, fmt=fmt, device=DEV)
    outs = []
    for env in ("1", "0"):
        monkeypatch.setenv("PORTMLA_TRITON_PDL", env)
        out = torch.full((case.q.shape[0], heads, L), float("nan"), dtype=case.q.dtype, device=DEV)
        outs.append(mla_cases.decode(case, "triton", out=out))
    assert len(launches) == 2, "the device schedule did not run"
    (a, la), (b, lb) = outs
    assert torch.equal(a, b) and torch.equal(la, lb)
    ref, ref_lse = mla_cases.decode(case, "reference")
    assert mla_cases.rel_err(a, ref) < (3e-2 if fmt == "fp8_ds_mla" else 1e-2)
    fin = torch.isfinite(ref_lse)
    assert torch.equal(fin, torch.isfinite(la))
    assert torch.allclose(la[fin], ref_lse[fin], atol=2e-3 if fmt != "fp8_ds_mla" else 3e-2, rtol=1e-3)


@pytest.mark.parametrize("fmt,heads", [("fp8", 16), ("bfloat16", 128)])
def test_pdl_chain_in_cuda_graph_replays(fmt, heads, monkeypatch):
    monkeypatch.delenv("PORTMLA_TRITON_PDL", raising=False)
    case = mla_cases.make_decode_case([900, 900, 900], [1, 1, 1], heads=heads, block_size=64, fmt=fmt, device=DEV)
    mla_cases.check_graph_replays(case, heads, DEV)
