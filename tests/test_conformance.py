"""Every available non-reference backend against the reference backend.

Parameters are generated from each backend's declared capabilities (block sizes, KV
formats, head counts, query lengths), so a new backend gets this suite for free.
On CPU (Triton under TRITON_INTERPRET=1) a covering subset of small cases runs; on a GPU
the full product, the large batch specs, a cache above 2^31 elements, CUDA-graph replay
over changing metadata, and run-to-run determinism.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from conftest import backends_under_test, device_under_test
from mla_cases import (
    BATCH_SPECS,
    FORMATS_ALL,
    LARGE_SPECS,
    LAYOUTS,
    decode,
    far_end_case,
    make_decode_case,
    rel_err,
)

import portmla as pm
from portmla.dispatch import get_backend

DEVICE = device_under_test()
ON_GPU = DEVICE.type != "cpu"
BACKENDS = [b for b in backends_under_test() if b != "reference"]
TEST_BLOCK_SIZES = (1, 16, 48, 64, 128)
OUT_RTOL = 1e-2  # bf16 output rounding dominates (formats with other needs: DECODE_TOLERANCE)


def _block_sizes(backend) -> list[int]:
    b = get_backend(backend)
    return [s for s in TEST_BLOCK_SIZES if b.BLOCK_SIZES is None or s in b.BLOCK_SIZES]


def _formats(backend) -> list[str]:
    return [f for f in FORMATS_ALL if f in get_backend(backend).KV_CACHE_DTYPES]


def _specs(backend) -> list[str]:
    b = get_backend(backend)
    names = list(BATCH_SPECS) if ON_GPU else ["small_decode", "small_prefill", "mixed_small"]
    return [s for s in names if max(BATCH_SPECS[s][1]) <= b.MAX_QUERY_LEN]


def _decode_params():
    params = []
    for backend in BACKENDS:
        if "mla_decode" not in get_backend(backend).OPS:
            continue
        specs, fmts, sizes = _specs(backend), _formats(backend), _block_sizes(backend)
        # every format x block size x layout once, specs round-robin; on a GPU also every
        # batch spec x format, with block sizes and layouts round-robin
        combos = [(specs[i % len(specs)], f, s, lay) for i, (f, s, lay)
                  in enumerate(itertools.product(fmts, sizes, LAYOUTS))]
        if ON_GPU:
            combos += [(spec, f, sizes[i % len(sizes)], LAYOUTS[i % len(LAYOUTS)])
                       for i, (spec, f) in enumerate(itertools.product(specs, fmts))]
        for spec, fmt, bs, layout in combos:
            marks = [pytest.mark.large] if spec in LARGE_SPECS else []
            params.append(pytest.param(backend, spec, fmt, bs, layout, marks=marks,
                                       id=f"{backend}-{spec}-{fmt}-bs{bs}-{layout}"))
    return params


def _check_decode(backend, case):
    out, lse = decode(case, backend)
    ref, ref_lse = decode(case, "reference")
    out_rtol, lse_atol = get_backend(backend).decode_tolerance(case.fmt)
    err = rel_err(out, ref)
    assert err < out_rtol, f"relative error {err:.3e} vs reference (tolerance {out_rtol})"
    lse_err = float((lse - ref_lse).abs().max())
    assert lse_err < lse_atol, f"lse max abs diff {lse_err:.3e} (tolerance {lse_atol})"
    return out


@pytest.mark.parametrize("backend,spec,fmt,block_size,layout", _decode_params())
def test_decode_conformance(backend, spec, fmt, block_size, layout):
    seq_lens, query_lens = BATCH_SPECS[spec]
    dtype = torch.float16 if fmt == "float16" else torch.bfloat16
    heads = 16 if ON_GPU else 4
    case = make_decode_case(seq_lens, query_lens, heads=heads, block_size=block_size, fmt=fmt,
                            layout=layout, device=DEVICE, model_dtype=dtype)
    _check_decode(backend, case)


def _head_counts(backend):
    m = get_backend(backend).MAX_NUM_HEADS
    return [h for h in (1, 5, 16, 64, 128) if h <= m and (ON_GPU or h <= 16)]


@pytest.mark.parametrize("backend,heads", [(b, h) for b in BACKENDS
                                           if "mla_decode" in get_backend(b).OPS
                                           for h in _head_counts(b)])
def test_decode_head_counts(backend, heads):
    bs = _block_sizes(backend)[-1]
    case = make_decode_case([37, 130, 1], [1, 3, 1], heads=heads, block_size=bs, device=DEVICE)
    _check_decode(backend, case)


@pytest.mark.parametrize("backend", [b for b in BACKENDS if "mla_decode" in get_backend(b).OPS])
def test_decode_into_poisoned_out_and_deterministic(backend):
    case = make_decode_case([300, 17, 64], [1, 2, 4], heads=16, block_size=_block_sizes(backend)[-1],
                            device=DEVICE)
    t, h = case.q.shape[:2]
    out = torch.full((t, h, 512), float("nan"), dtype=case.q.dtype, device=DEVICE)
    first, _ = decode(case, backend, out=out)
    assert first.data_ptr() == out.data_ptr()
    assert not bool(torch.isnan(out).any())
    again, _ = decode(case, backend)
    assert torch.equal(first, again), "results differ run to run"


def _cache_params():
    return [pytest.param(b, f, s, lay, id=f"{b}-{f}-bs{s}-{lay}")
            for b in BACKENDS if "concat_and_cache_mla" in get_backend(b).OPS
            for f in _formats(b) for s in _block_sizes(b)[:3] for lay in LAYOUTS]


@pytest.mark.parametrize("backend,fmt,block_size,layout", _cache_params())
def test_concat_and_gather_conformance(backend, fmt, block_size, layout):
    from mla_cases import make_cache

    dtype = torch.float16 if fmt == "float16" else torch.bfloat16
    nb, t = max(9, -(-48 // block_size)), 37
    caches = [make_cache(nb, block_size, fmt, dtype, DEVICE, layout) for _ in range(2)]
    slots = torch.randperm(nb * block_size, device=DEVICE)[:t]
    slots[3] = -1
    kv_c = torch.randn(t, 512, device=DEVICE, dtype=dtype)
    k_pe = torch.randn(t, 1, 64, device=DEVICE, dtype=dtype)
    scale = 0.02 if fmt == "fp8" else None
    pm.concat_and_cache_mla(kv_c, k_pe, caches[0], slots, fmt, scale, backend=backend)
    pm.concat_and_cache_mla(kv_c, k_pe, caches[1], slots, fmt, scale, backend="reference")
    a, b = caches[0].contiguous().view(torch.uint8), caches[1].contiguous().view(torch.uint8)
    diff = (a != b).float().mean().item()
    assert diff <= (0.002 if fmt in ("fp8", "fp8_ds_mla") else 0.0), f"{diff:.4%} bytes differ"
    if block_size * nb >= 40:
        table = torch.arange(nb, device=DEVICE, dtype=torch.int32).view(1, nb).repeat(2, 1)
        lens = torch.tensor([block_size * nb - 5, 11], dtype=torch.int32, device=DEVICE)
        starts = torch.tensor([3, 0], dtype=torch.int32, device=DEVICE)
        full = torch.arange(nb * block_size, device=DEVICE)
        pm.concat_and_cache_mla(torch.randn(len(full), 512, device=DEVICE, dtype=dtype),
                                torch.randn(len(full), 64, device=DEVICE, dtype=dtype),
                                caches[1], full, fmt, scale, backend="reference")
        got = pm.gather_cache(caches[1], table, lens, kv_cache_dtype=fmt, scale=scale,
                              out_dtype=torch.float32, seq_starts=starts, backend=backend)
        want = pm.gather_cache(caches[1], table, lens, kv_cache_dtype=fmt, scale=scale,
                               out_dtype=torch.float32, seq_starts=starts, backend="reference")
        assert rel_err(got, want) < 1e-6


@pytest.mark.parametrize("backend", [b for b in BACKENDS if "merge_attn_states" in get_backend(b).OPS])
def test_merge_conformance(backend):
    t, h, d = 33, 16, 128
    a = torch.randn(t, h, d, device=DEVICE, dtype=torch.bfloat16)
    b = torch.randn(t, h, d, device=DEVICE, dtype=torch.bfloat16)
    la, lb = torch.randn(t, h, device=DEVICE) * 4, torch.randn(t, h, device=DEVICE) * 4
    la[0], a[0] = float("-inf"), float("nan")
    la[1], lb[1] = float("-inf"), float("-inf")
    out, lse = pm.merge_attn_states(a, la, b, lb, backend=backend)
    ref, ref_lse = pm.merge_attn_states(a, la, b, lb, backend="reference")
    assert rel_err(out, ref) < 1e-2
    torch.testing.assert_close(lse, ref_lse, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", [b for b in BACKENDS if "mla_prefill_attention" in get_backend(b).OPS])
@pytest.mark.parametrize("causal", [True, False])
def test_prefill_conformance(backend, causal):
    qlens, klens = ([3, 70, 1, 16], [3, 100, 9, 5]) if ON_GPU else ([3, 20, 1, 6], [3, 33, 9, 2])
    heads = 16 if ON_GPU else 2
    cu_q = torch.tensor([0] + qlens).cumsum(0).int().to(DEVICE)
    cu_k = torch.tensor([0] + klens).cumsum(0).int().to(DEVICE)
    q = torch.randn(sum(qlens), heads, 192, device=DEVICE, dtype=torch.bfloat16)
    k = torch.randn(sum(klens), heads, 192, device=DEVICE, dtype=torch.bfloat16)
    v = torch.randn(sum(klens), heads, 128, device=DEVICE, dtype=torch.bfloat16)
    args = (q, k, v, cu_q, cu_k, max(qlens), max(klens))
    out, lse = pm.mla_prefill_attention(*args, softmax_scale=1 / math.sqrt(192), causal=causal,
                                        return_lse=True, backend=backend)
    ref, ref_lse = pm.mla_prefill_attention(*args, softmax_scale=1 / math.sqrt(192), causal=causal,
                                            return_lse=True, backend="reference")
    assert rel_err(out, ref) < 1e-2
    fin = torch.isfinite(ref_lse)
    assert torch.equal(torch.isfinite(lse), fin)
    assert float((lse[fin] - ref_lse[fin]).abs().max()) < 1e-2


# ------------------------------------------------------------------------- GPU only

gpu = pytest.mark.skipif(not ON_GPU, reason="needs a GPU device (runs in the GPU sessions)")


@gpu
@pytest.mark.large
@pytest.mark.parametrize("backend", [b for b in BACKENDS if "mla_decode" in get_backend(b).OPS])
def test_decode_cache_above_2_pow_31_elements(backend):
    """Blocks at the far end of a cache of > 2^31 elements: 32-bit offsets would wrap."""
    cache, table, seq, q = far_end_case(DEVICE, 16)
    out = pm.mla_decode(q, cache, table, seq, softmax_scale=0.07, backend=backend)
    ref = pm.mla_decode(q, cache, table, seq, softmax_scale=0.07, backend="reference")
    assert rel_err(out, ref) < OUT_RTOL
    del cache
    torch.cuda.empty_cache()


@gpu
@pytest.mark.parametrize("backend", [b for b in BACKENDS if get_backend(b).CUDA_GRAPHS
                                     and "mla_decode" in get_backend(b).OPS])
def test_decode_cuda_graph_replay_with_changing_metadata(backend):
    if DEVICE.type != "cuda":
        pytest.skip("CUDA graphs need a cuda device")
    case = make_decode_case([500, 20, 260], [1, 1, 1], heads=16, block_size=64, device=DEVICE)
    q, table, lens = case.q.clone(), case.block_table.clone(), case.seq_lens.clone()
    out = torch.empty(3, 16, 512, dtype=q.dtype, device=DEVICE)
    kw = dict(softmax_scale=case.softmax_scale, out=out, backend=backend)
    pm.mla_decode(q, case.cache, table, lens, **kw)  # warm up (compiles / loads) outside capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        pm.mla_decode(q, case.cache, table, lens, **kw)
    for step in range(3):
        new_lens = torch.tensor([500 - 7 * step, 20 + step, 260 - 100 * step], dtype=torch.int32)
        lens.copy_(new_lens)
        table.copy_(case.block_table[[step % 3, (step + 1) % 3, (step + 2) % 3]]
                    if step else case.block_table)
        if step:
            # a permuted table must still cover each row's length
            lens.copy_(torch.minimum(new_lens, torch.tensor([500, 20, 260])[[step % 3, (step + 1) % 3,
                                                                              (step + 2) % 3]]))
        q.copy_(torch.randn_like(q))
        out.fill_(float("nan"))
        graph.replay()
        ref = pm.mla_decode(q, case.cache, table, lens, softmax_scale=case.softmax_scale,
                            backend="reference")
        assert rel_err(out, ref) < OUT_RTOL, f"replay {step}"


def test_required_backend_is_selected():
    """With PORTMLA_REQUIRE_BACKEND, auto dispatch on a GPU must pick that backend."""
    import os

    required = os.environ.get("PORTMLA_REQUIRE_BACKEND")
    if not required:
        pytest.skip("PORTMLA_REQUIRE_BACKEND not set (CPU session)")
    case = make_decode_case([64], [1], heads=16, block_size=64, device=DEVICE)
    from portmla.dispatch import select
    from portmla.ops import _decode_problem

    p = _decode_problem(case.q, case.cache, case.block_table, "auto", 512, 1, 1, False)
    # on CPU the reference comes first in the priority list; the required backend must
    # still accept the call when forced
    auto = DEVICE.type != "cpu"
    assert select(p, "auto" if auto else required).NAME == required
