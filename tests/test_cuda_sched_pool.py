"""The device schedule's pool (csrc_cuda/common/schedule.cuh): the narrow Hopper kernels' parts
keep back a share of their units, cut into chunks that the CTAs done first claim with an atomic.
Forced on through ``PORTMLA_CUDA_SCHED_POOL`` and checked against the torch reference (NaN-poisoned
outputs and unused cache slots), bitwise from run to run (which CTA runs a chunk changes from run
to run; the pieces and their merge order do not), and in CUDA-graph replays (the claim counters
zeroed by each replay's schedule kernel). A spy on the module's launch asserts the pool reached
the kernel.

Runs on an sm_90 GPU with a module that has the narrow kernels; skips elsewhere, except when
PORTMLA_REQUIRE_HOPPER=1: then a missing kernel FAILS. The settings' parsing runs everywhere.
"""

from __future__ import annotations

import pytest
import torch
from test_cuda_backend import (
    TAILS,
    check_decode,
    check_deterministic_and_graph,
    check_merge_path,
    force_schedule,
    make_decode_case,
    run_both,
)
from test_cuda_hopper import _need_hopper
from test_cuda_hopper_narrow_quant import _need_narrow_quant

from portmla.backends import cuda as cuda_backend

# (cache format, query dtype, kernel)
KERNELS = [("bfloat16", torch.bfloat16, "hopper_narrow"), ("float16", torch.float16, "hopper_narrow"),
           ("fp8", torch.bfloat16, "hopper_narrow_quant"), ("fp8", torch.float16, "hopper_narrow_quant"),
           ("fp8_ds_mla", torch.bfloat16, "hopper_narrow_quant")]
KIDS = ["bf16", "fp16", "fp8-bf16", "fp8-fp16", "ds-bf16"]
POOLS = ["60:2", "500:8", "999:32", "1:1"]  # per mille kept back : chunks per part
TOL = {"bfloat16": 2e-2, "float16": 2e-2, "fp8": 1e-2, "fp8_ds_mla": 1e-2}


def _need(kernel):
    if kernel == "hopper_narrow_quant":
        _need_narrow_quant()
    else:
        _need_hopper()


@pytest.fixture
def pool_launches(monkeypatch):
    """(sched_items, num_parts) of every decode launch of the test."""
    seen = []
    mod, _ = cuda_backend.load_module()

    class Spy:
        def __getattr__(self, name):
            return getattr(mod, name)

        def mla_decode(self, par, stream):
            seen.append((par.sched_items, par.num_parts))
            return mod.mla_decode(par, stream)

    monkeypatch.setattr(cuda_backend, "load_module", lambda: (Spy(), None))
    return seen


def _pooled(seen, chunks):
    assert seen and all(items == parts * (1 + chunks) for items, parts in seen), seen


def _varlen(n, hi, qmax=0, low=1):
    """n lengths in [low, hi); qmax > 0: query lengths 1..qmax (within each length) and an empty
    sequence without query tokens among them."""
    lens = [int(x) for x in torch.randint(low, hi, (n,))]
    if qmax:
        lens[5] = 0
    qlens = [min(n_, int(q)) for n_, q in zip(lens, torch.randint(1, max(qmax, 1) + 1, (n,)))]
    return lens, qlens


@pytest.mark.gpu
@pytest.mark.parametrize("fmt,dtype,kernel", KERNELS, ids=KIDS)
@pytest.mark.parametrize("pool", POOLS)
def test_pool_decode(monkeypatch, ran, pool_launches, fmt, dtype, kernel, pool):
    """150 varlen sequences at 16 heads (one row tile), and 60 at 8 heads with 1-2 query tokens
    and strided pages, at the planner's part count and at 7 parts (chunks cut every sequence)."""
    _need(kernel)
    monkeypatch.setenv("PORTMLA_CUDA_HOPPER", "narrow")
    monkeypatch.setenv("PORTMLA_CUDA_SCHED_POOL", pool)
    for parts in (0, 7):
        force_schedule(monkeypatch, parts, 0)
        lens, _ = _varlen(150, 3000)
        check_decode(*run_both(make_decode_case(lens, [1] * 150, 16, 64, fmt, dtype, "cuda"),
                               single_token=True), tol=TOL[fmt])
        lens, qlens = _varlen(60, 2000, qmax=2)
        case = make_decode_case(lens, qlens, 8, 32, fmt, dtype, "cuda", strided=True)
        check_decode(*run_both(case, single_token=False), tol=TOL[fmt])
    assert set(ran) == {kernel}
    _pooled(pool_launches, int(pool.split(":")[1]))


@pytest.mark.gpu
@pytest.mark.parametrize("fmt,dtype,kernel", KERNELS[::2], ids=KIDS[::2])
def test_pool_row_tiles(monkeypatch, ran, pool_launches, fmt, dtype, kernel):
    """40 heads x up to 3 query tokens forced onto the narrow kernels: 8 row tiles, each with its
    own claim counter."""
    _need(kernel)
    monkeypatch.setenv("PORTMLA_CUDA_HOPPER", "narrow")
    monkeypatch.setenv("PORTMLA_CUDA_SCHED_POOL", "300:4")
    lens, qlens = _varlen(40, 1500, qmax=3)
    case = make_decode_case(lens, qlens, 40, 64, fmt, dtype, "cuda", strided=True)
    check_decode(*run_both(case, single_token=False), tol=TOL[fmt])
    assert set(ran) == {kernel}
    _pooled(pool_launches, 4)


@pytest.mark.gpu
@pytest.mark.parametrize("fmt,dtype,kernel", KERNELS, ids=KIDS)
def test_pool_claim_stop(monkeypatch, ran, pool_launches, fmt, dtype, kernel):
    """Two parts and 64 chunks holding nearly all the work of 120 short sequences: a CTA can be
    the last piece of more sequences than its merge list holds before it stops claiming
    (narrow_kernel.cuh: kClaimStop); the other CTA then claims the rest."""
    _need(kernel)
    monkeypatch.setenv("PORTMLA_CUDA_HOPPER", "narrow")
    monkeypatch.setenv("PORTMLA_CUDA_SCHED_POOL", "999:32")
    force_schedule(monkeypatch, 2, 0)
    lens, _ = _varlen(120, 400, low=65)
    case = make_decode_case(lens, [1] * 120, 16, 16, fmt, dtype, "cuda")
    check_decode(*run_both(case, single_token=True), tol=TOL[fmt])
    assert set(ran) == {kernel}
    _pooled(pool_launches, 32)


@pytest.mark.gpu
@pytest.mark.parametrize("fmt,dtype,kernel", KERNELS[::2], ids=KIDS[::2])
@pytest.mark.parametrize("tail", TAILS)
def test_pool_merge_paths(monkeypatch, ran, pool_launches, fmt, dtype, kernel, tail):
    """The pieces of the pool's chunks merged by the last piece (in-kernel), after a grid barrier
    or by the merge kernel."""
    _need(kernel)
    monkeypatch.setenv("PORTMLA_CUDA_HOPPER", "narrow")
    monkeypatch.setenv("PORTMLA_CUDA_SCHED_POOL", "120:3")
    lens, _ = _varlen(100, 3000)
    case = make_decode_case(lens, [1] * 100, 16, 64, fmt, dtype, "cuda")
    check_merge_path(monkeypatch, case, tail, single_token=True, tol=TOL[fmt], arrive=True)
    assert set(ran) == {kernel}
    _pooled(pool_launches, 3)


@pytest.mark.gpu
@pytest.mark.parametrize("fmt,dtype,kernel", KERNELS[::2], ids=KIDS[::2])
def test_pool_deterministic_and_graph_capture(monkeypatch, pool_launches, fmt, dtype, kernel):
    """Bitwise equal runs whichever CTAs claim the chunks; a captured graph replayed over changed
    seq_lens (its schedule, chunk size and claim counters from each replay)."""
    _need(kernel)
    monkeypatch.setenv("PORTMLA_CUDA_SCHED_POOL", "200:4")
    lens, _ = _varlen(64, 4000)
    case = make_decode_case(lens, [1] * 64, 16, 64, fmt, dtype, "cuda")
    check_deterministic_and_graph(case, tol=TOL[fmt])
    _pooled(pool_launches, 4)


@pytest.mark.gpu
def test_pool_not_for_small_batches_or_other_kernels(monkeypatch, ran, pool_launches):
    """Up to 32 sequences (the in-kernel schedule: no counters zeroed) and the 128-head pair
    kernel run without the pool whatever the setting."""
    _need_hopper()
    monkeypatch.setenv("PORTMLA_CUDA_SCHED_POOL", "200:4")
    lens, _ = _varlen(32, 3000)
    check_decode(*run_both(make_decode_case(lens, [1] * 32, 16, 64, "bfloat16", torch.bfloat16,
                                            "cuda"), single_token=True))
    lens, _ = _varlen(40, 3000)
    check_decode(*run_both(make_decode_case(lens, [1] * 40, 128, 64, "bfloat16", torch.bfloat16,
                                            "cuda"), single_token=True))
    assert ran == ["hopper_narrow", "hopper"], ran
    assert all(items <= parts for items, parts in pool_launches), pool_launches


@pytest.mark.parametrize("value,want", [("0", (0, 0)), ("60:2", (60, 2)), ("999:32", (999, 32))])
def test_pool_setting(monkeypatch, value, want):
    monkeypatch.setenv("PORTMLA_CUDA_SCHED_POOL", value)
    assert cuda_backend.sched_pool() == want


@pytest.mark.parametrize("value", ["1000:2", "60", "60:33", "-1:2", "a:b", "60:2:1"])
def test_pool_setting_rejected(monkeypatch, value):
    monkeypatch.setenv("PORTMLA_CUDA_SCHED_POOL", value)
    with pytest.raises(ValueError, match=r"PORTMLA_CUDA_SCHED_POOL=.*PM:CHUNKS"):
        cuda_backend.sched_pool()
