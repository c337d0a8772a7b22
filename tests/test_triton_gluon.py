"""The Triton backend's Hopper Gluon decode kernel (``backends/triton/decode_gluon.py``) against
the torch reference, through the public API on an sm_90 GPU.

The kernel runs only on Hopper: elsewhere the module skips. On an sm_90 device it fails (does
not skip) when the kernel is not the one that runs. Every case checks that the Gluon launch
happened (or, for a layout it does not take, that the Triton kernel ran instead); caches are
NaN-poisoned outside the written slots, outputs NaN-filled.
"""

from __future__ import annotations

import mla_cases
import pytest
import torch
from conftest import device_under_test

import portmla as pm

DEV = device_under_test()
if DEV.type != "cuda" or torch.cuda.get_device_capability(DEV)[0] != 9:
    pytest.skip("the Gluon decode kernel runs on sm_90 GPUs only", allow_module_level=True)

from portmla.backends.triton import decode_gluon  # noqa: E402
from portmla.backends.triton import launch as tlaunch  # noqa: E402

L = 512


@pytest.fixture
def gluon_launches(monkeypatch):
    """Counts launches of the Gluon kernel; ``set(parts=, fixed=)`` forces the schedule."""
    calls = []
    orig = decode_gluon.launch

    def counted(*a, **k):
        calls.append(1)
        return orig(*a, **k)

    monkeypatch.setattr(decode_gluon, "launch", counted)
    return calls


def test_gluon_kernel_is_active_on_this_gpu():
    assert decode_gluon.HAVE_GLUON, "triton.experimental.gluon did not import"
    plat = pm.current_platform(DEV)
    assert tlaunch.decode_config(plat, 8, 128, 1, 4096, "bfloat16", 512).gluon


# fmt, block size, heads, seq lens, query lens, layout, parts (None: default), fixed, lse
CASES = [
    ("bfloat16", 64, 128, [70, 90, 1, 64, 129], [1] * 5, "contiguous", None, None, True),
    ("bfloat16", 64, 128, [300, 5], [2, 1], "padded", 3, 1, True),
    ("float16", 128, 64, [513, 77, 0, 200], [1, 3, 0, 2], "cross_layer", 40, 2, False),
    ("bfloat16", 256, 16, [1000, 257, 31], [4, 4, 2], "contiguous", 5, 1, True),
    ("bfloat16", 64, 32, [4096], [2], "padded", 132, 2, True),  # one sequence cut into many pieces
    ("bfloat16", 64, 48, [100, 50, 3], [1, 1, 1], "contiguous", 4, 1, True),  # 48 of 64 rows used
    # 32 of 64 rows used (17..32 rows with more than 8 sequences take this kernel)
    ("bfloat16", 64, 32, [700, 64, 1, 2000, 90, 5, 333, 64, 129, 1000], [1] * 10, "contiguous", None, None, True),
    ("fp8", 64, 16, [900, 33, 300, 2, 64, 65, 700, 128, 5], [2, 2, 1, 2, 2, 1, 2, 2, 2], "padded", 5, 1, True),
    ("bfloat16", 64, 128, [2000, 1500, 64, 700], [3, 1, 2, 1], "cross_layer", None, None, True),
    ("float16", 64, 128, [4097, 33], [1, 1], "contiguous", 7, 1, True),
    ("bfloat16", 16, 128, [70, 90, 1, 64, 129, 33], [1] * 6, "padded", None, None, True),  # 4 pages a tile
    ("float16", 32, 64, [300, 17, 0], [2, 1, 0], "cross_layer", 3, 1, True),
    ("bfloat16", 8, 128, [200, 9, 64], [1, 2, 1], "contiguous", 5, 2, False),
    ("fp8", 64, 128, [70, 300, 1, 129, 0], [1, 2, 1, 1, 0], "contiguous", None, None, True),
    ("fp8", 16, 128, [513, 77], [1, 1], "padded", 7, 1, True),  # bf16 queries, 4 pages a tile
    ("fp8", 128, 64, [1000, 40], [2, 1], "cross_layer", 3, 2, False),
]


@pytest.mark.parametrize("fmt,page,heads,lens,qlens,layout,parts,fixed,lse", CASES)
def test_gluon_decode_matches_reference(fmt, page, heads, lens, qlens, layout, parts, fixed, lse,
                                        gluon_launches, monkeypatch):
    mla_cases.force_decode_config(monkeypatch, True, parts, fixed)
    dtype = torch.float16 if fmt == "float16" or (fmt == "fp8" and page == 128) else torch.bfloat16
    case = mla_cases.make_decode_case(lens, qlens, heads=heads, block_size=page, fmt=fmt, layout=layout,
                                      device=DEV, model_dtype=dtype)
    out = torch.full((case.q.shape[0], heads, L), float("nan"), dtype=dtype, device=DEV)
    got = mla_cases.decode(case, "triton", return_lse=lse, out=out)
    ref = mla_cases.decode(case, "reference", return_lse=lse)
    assert gluon_launches, "the Gluon kernel did not run"
    o, r = (got[0], ref[0]) if lse else (got, ref)
    assert o.data_ptr() == out.data_ptr()
    assert mla_cases.rel_err(o, r) < 1e-2
    if lse:
        assert torch.allclose(got[1], ref[1], atol=2e-3, rtol=1e-3), (got[1] - ref[1]).abs().max()


def test_gluon_decode_reference_is_close_to_float64():
    case = mla_cases.make_decode_case([333, 64], [1, 2], heads=128, block_size=64, device=DEV)
    out, lse = mla_cases.decode(case, "triton")
    want, want_lse = mla_cases.decode_float64(case)
    assert mla_cases.rel_err(out, want) < 1e-2
    assert torch.allclose(lse.double(), want_lse, atol=2e-3)


def test_gluon_decode_is_deterministic(gluon_launches):
    case = mla_cases.make_decode_case([3000, 1000, 4000], [1, 1, 1], heads=128, block_size=64, device=DEV)
    a = mla_cases.decode(case, "triton")
    b = mla_cases.decode(case, "triton")
    assert len(gluon_launches) == 2
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


@pytest.mark.parametrize("fmt,pad", [("bfloat16", 3), ("fp8", 8)])
def test_gluon_decode_unaligned_tokens_run_the_triton_kernel(fmt, pad, gluon_launches):
    """Token strides that are not 16-byte multiples: rows TMA cannot address; the Triton kernel
    runs (with its own tile: fp8's is 32 tokens), right."""
    case = mla_cases.make_decode_case([200, 70], [1, 1], heads=128, block_size=64, layout="padded",
                                      entry_pad=pad, fmt=fmt, device=DEV)
    got = mla_cases.decode(case, "triton")
    ref = mla_cases.decode(case, "reference")
    assert not gluon_launches
    assert mla_cases.rel_err(got[0], ref[0]) < 1e-2


def test_gluon_decode_cuda_graph_replays_new_metadata(gluon_launches):
    case = mla_cases.make_decode_case([900, 900, 900], [1, 1, 1], heads=128, block_size=64, device=DEV)
    mla_cases.check_graph_replays(case, 128, DEV)
    assert gluon_launches


@pytest.mark.large
def test_gluon_decode_cache_above_2_pow_31_elements(gluon_launches):
    """Pages at the far end of a cache of > 2^31 elements (TMA rows stay 32-bit, offsets not)."""
    cache, table, seq, q = mla_cases.far_end_case(DEV, 128, spare_blocks=40)
    cache[: cache.shape[0] - 40].fill_(float("nan"))  # the blocks before the last 40: never read
    out = pm.mla_decode(q, cache, table, seq, softmax_scale=0.07, backend="triton")
    ref = pm.mla_decode(q, cache, table, seq, softmax_scale=0.07, backend="reference")
    assert gluon_launches
    assert mla_cases.rel_err(out, ref) < 1e-2
    del cache
    torch.cuda.empty_cache()
