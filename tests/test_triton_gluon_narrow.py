"""The Triton backend's narrow Hopper Gluon decode kernel (``backends/triton/decode_gluon_narrow.py``:
16-row tiles of fp8 / fp8_ds_mla caches, wgmma with the tokens as M) against the torch
reference, through the public API on an sm_90 GPU.

The kernel is opt-in (``PORTMLA_TRITON_GLUON_NARROW=1``, set here for every test). Skips off
Hopper; on an sm_90 device it fails (does not skip) when the kernel is not the one that runs. Caches are NaN-poisoned outside the written slots, outputs NaN-filled.
"""

from __future__ import annotations

import mla_cases
import pytest
import torch
from conftest import device_under_test

import portmla as pm

DEV = device_under_test()
if DEV.type != "cuda" or torch.cuda.get_device_capability(DEV)[0] != 9:
    pytest.skip("the Gluon decode kernels run on sm_90 GPUs only", allow_module_level=True)

from portmla.backends.triton import decode_gluon_narrow  # noqa: E402
from portmla.backends.triton import launch as tlaunch  # noqa: E402

L = 512


@pytest.fixture(autouse=True)
def narrow_opt_in(monkeypatch):
    """The narrow kernel is opt-in (slower than the Triton kernel so far, launch.use_gluon)."""
    monkeypatch.setenv("PORTMLA_TRITON_GLUON_NARROW", "1")


@pytest.fixture
def narrow_launches(monkeypatch):
    calls = []
    orig = decode_gluon_narrow.launch

    def counted(*a, **k):
        calls.append(a[2])  # ds
        return orig(*a, **k)

    monkeypatch.setattr(decode_gluon_narrow, "launch", counted)
    return calls


def test_narrow_gluon_kernel_is_active_on_this_gpu():
    plat = pm.current_platform(DEV)
    for fmt in ("fp8", "fp8_ds_mla"):
        cfg = tlaunch.decode_config(plat, 8, 16, 1, 8192, fmt, 512)
        assert cfg.gluon and cfg.block_m == 16, fmt


# fmt, block size, heads, seq lens, query lens, layout, parts (None: default), fixed, lse, q dtype
CASES = [
    ("fp8_ds_mla", 64, 16, [70, 90, 1, 64, 129], [1] * 5, "contiguous", None, None, True, torch.bfloat16),
    ("fp8_ds_mla", 64, 16, [300, 5], [1, 1], "padded", 3, 1, True, torch.bfloat16),
    ("fp8_ds_mla", 128, 8, [513, 77, 0, 200], [2, 1, 0, 2], "cross_layer", 40, 2, False, torch.bfloat16),
    ("fp8_ds_mla", 256, 4, [1000, 257, 31], [4, 3, 2], "contiguous", 5, 1, True, torch.bfloat16),
    ("fp8_ds_mla", 64, 16, [4096], [1], "padded", 132, 2, True, torch.bfloat16),  # one sequence, many pieces
    ("fp8_ds_mla", 64, 12, [100, 50, 3], [1, 1, 1], "contiguous", 4, 1, True, torch.bfloat16),  # 12 of 16 rows
    ("fp8_ds_mla", 16, 16, [70, 90, 1, 64, 129, 33], [1] * 6, "padded", None, None, True, torch.bfloat16),
    ("fp8_ds_mla", 32, 1, [300, 17, 0], [1, 1, 0], "cross_layer", 3, 1, True, torch.bfloat16),
    ("fp8_ds_mla", 8, 16, [200, 9, 64], [1, 1, 1], "contiguous", 5, 2, False, torch.bfloat16),
    ("fp8", 64, 16, [70, 300, 1, 129, 0], [1, 1, 1, 1, 0], "contiguous", None, None, True, torch.bfloat16),
    ("fp8", 16, 16, [513, 77], [1, 1], "padded", 7, 1, True, torch.bfloat16),
    ("fp8", 128, 8, [1000, 40], [2, 1], "cross_layer", 3, 2, False, torch.float16),
    ("fp8", 64, 16, [2000, 1500, 64, 700], [1, 1, 1, 1], "padded", None, None, True, torch.float16),
]


@pytest.mark.parametrize("fmt,page,heads,lens,qlens,layout,parts,fixed,lse,dtype", CASES)
def test_narrow_gluon_decode_matches_reference(fmt, page, heads, lens, qlens, layout, parts, fixed, lse, dtype,
                                               narrow_launches, monkeypatch):
    mla_cases.force_decode_config(monkeypatch, True, parts, fixed)
    case = mla_cases.make_decode_case(lens, qlens, heads=heads, block_size=page, fmt=fmt, layout=layout,
                                      device=DEV, model_dtype=dtype)
    out = torch.full((case.q.shape[0], heads, L), float("nan"), dtype=dtype, device=DEV)
    got = mla_cases.decode(case, "triton", return_lse=lse, out=out)
    ref = mla_cases.decode(case, "reference", return_lse=lse)
    assert narrow_launches == [fmt == "fp8_ds_mla"], "the narrow Gluon kernel did not run"
    o, r = (got[0], ref[0]) if lse else (got, ref)
    assert o.data_ptr() == out.data_ptr()
    assert mla_cases.rel_err(o, r) < 1e-2
    if lse:
        assert torch.allclose(got[1], ref[1], atol=2e-3, rtol=1e-3), (got[1] - ref[1]).abs().max()


@pytest.mark.parametrize("gain", [(1e-20, 1e20), (1e-3, 1e3)])
def test_narrow_gluon_ds_tile_scales_spread(gain, narrow_launches):
    """fp8_ds_mla tile scales over many decades, inside and across KV tiles (the running scale
    maxima folded into the output rescale)."""
    case = mla_cases.make_decode_case([700, 130], [1, 1], heads=16, block_size=64, fmt="fp8_ds_mla",
                                      device=DEV, tile_gain=gain)
    got = mla_cases.decode(case, "triton")
    ref = mla_cases.decode(case, "reference")
    assert narrow_launches
    assert mla_cases.rel_err(got[0], ref[0]) < 1e-2
    assert torch.allclose(got[1], ref[1], atol=2e-3, rtol=1e-3)


def test_narrow_gluon_ds_scales_fall_along_the_sequence(narrow_launches):
    """Each KV tile's scales far below the last one's (the running maxima only grow)."""
    case = mla_cases.make_decode_case([900], [1], heads=16, block_size=64, fmt="fp8_ds_mla", device=DEV,
                                      tile_gain=lambda pos, tiles: (10.0 ** (6 - pos.float() / 75)).unsqueeze(1)
                                      .repeat(1, tiles))
    got = mla_cases.decode(case, "triton")
    ref = mla_cases.decode(case, "reference")
    assert narrow_launches
    assert mla_cases.rel_err(got[0], ref[0]) < 1e-2


@pytest.mark.parametrize("fmt", ["fp8", "fp8_ds_mla"])
def test_narrow_gluon_decode_reference_is_close_to_float64(fmt):
    case = mla_cases.make_decode_case([333, 64], [1, 1], heads=16, block_size=64, fmt=fmt, device=DEV)
    out, lse = mla_cases.decode(case, "triton")
    want, want_lse = mla_cases.decode_float64(case)
    assert mla_cases.rel_err(out, want) < 1e-2
    assert torch.allclose(lse.double(), want_lse, atol=2e-3)


def test_narrow_gluon_decode_is_deterministic(narrow_launches):
    case = mla_cases.make_decode_case([3000, 1000, 4000], [1, 1, 1], heads=16, block_size=64, fmt="fp8_ds_mla",
                                      device=DEV)
    a = mla_cases.decode(case, "triton")
    b = mla_cases.decode(case, "triton")
    assert len(narrow_launches) == 2
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


@pytest.mark.parametrize("fmt,layout,pad,dtype", [("fp8_ds_mla", "padded", 8, torch.bfloat16),
                                                   ("fp8", "padded", 8, torch.bfloat16),
                                                   ("fp8_ds_mla", "contiguous", 16, torch.float16)])
def test_narrow_gluon_layouts_it_does_not_take_run_the_triton_kernel(fmt, layout, pad, dtype, narrow_launches):
    """Token strides that are not 16-byte multiples (TMA cannot address the rows), and fp16
    queries with fp8_ds_mla (its RoPE product is bf16): the Triton kernel runs, right."""
    case = mla_cases.make_decode_case([200, 70], [1, 1], heads=16, block_size=64, layout=layout,
                                      entry_pad=pad, fmt=fmt, device=DEV, model_dtype=dtype)
    got = mla_cases.decode(case, "triton")
    ref = mla_cases.decode(case, "reference")
    assert not narrow_launches
    assert mla_cases.rel_err(got[0], ref[0]) < 1e-2


@pytest.mark.parametrize("fmt", ["fp8", "fp8_ds_mla"])
def test_narrow_gluon_decode_cuda_graph_replays_new_metadata(fmt, narrow_launches):
    case = mla_cases.make_decode_case([900, 900, 900], [1, 1, 1], heads=16, block_size=64, fmt=fmt, device=DEV)
    mla_cases.check_graph_replays(case, 16, DEV)
    assert narrow_launches


@pytest.mark.large
def test_narrow_gluon_decode_cache_above_2_pow_31_elements(narrow_launches):
    cache, table, seq, q = mla_cases.far_end_case(DEV, 16, spare_blocks=40, fmt="fp8_ds_mla")
    cache[: cache.shape[0] - 40].fill_(255)  # the blocks before the last 40 (NaN bytes): never read
    out = pm.mla_decode(q, cache, table, seq, softmax_scale=0.07, kv_cache_dtype="fp8_ds_mla", backend="triton")
    ref = pm.mla_decode(q, cache, table, seq, softmax_scale=0.07, kv_cache_dtype="fp8_ds_mla",
                        backend="reference")
    assert narrow_launches
    assert mla_cases.rel_err(out, ref) < 1e-2
    del cache
    torch.cuda.empty_cache()
