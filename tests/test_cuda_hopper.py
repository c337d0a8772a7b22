"""The Hopper (sm_90a) decode kernel of the cuda backend against the torch reference.

Runs on an sm_90 GPU with a module built with the kernel; skips elsewhere, except when
PORTMLA_REQUIRE_HOPPER=1 (the H100 device script sets it): then a missing kernel FAILS.
Every case asserts that the Hopper kernel is the one that ran.
"""

from __future__ import annotations

import os

import pytest
import torch
from test_cuda_backend import (
    SCHEDULES,
    TAILS,
    _need_cuda,
    boundary_case,
    check_decode,
    check_deterministic_and_graph,
    check_merge_path,
    force_schedule,
    make_decode_case,
    run_both,
)

import portmla as pm
from portmla.backends import cuda as cuda_backend

REQUIRED = os.environ.get("PORTMLA_REQUIRE_HOPPER") == "1"
KERNELS = {"pair": "hopper", "tile": "hopper_tile", "narrow": "hopper_narrow"}  # env -> variant


def _need_hopper():
    _need_cuda()
    mod, why = cuda_backend.load_module()
    cap = torch.cuda.get_device_capability()
    missing = None
    if cap != (9, 0):
        missing = f"device capability {cap} (the Hopper kernel is sm_90a code)"
    elif not set(KERNELS.values()) <= set(mod.DECODE_VARIANTS):
        missing = f"portmla._cuda built without it: {getattr(mod, 'HOPPER_NOT_BUILT', None) or 'an older build'}"
    if missing:
        if REQUIRED:
            pytest.fail(f"PORTMLA_REQUIRE_HOPPER=1 but {missing}")
        pytest.skip(missing)


CASES = [  # heads, seq lens, query lens, strided cache
    (128, [700, 5, 0, 1300, 64], [2, 1, 0, 1, 3], False),
    (16, [2000, 33, 64, 1], [1, 3, 1, 1], True),
    (1, [129, 640, 4100], [1, 2, 1], False),
    (40, [300, 77], [4, 1], True),
]


@pytest.mark.gpu
@pytest.mark.parametrize("block_size", [16, 32, 64, 128, 256])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("schedule", SCHEDULES, ids=lambda s: f"parts{s[0] or 'auto'}-fixed{s[1] or 'auto'}")
@pytest.mark.parametrize("kernel", list(KERNELS))
def test_hopper_decode(monkeypatch, ran, block_size, dtype, schedule, kernel):
    _need_hopper()
    want = KERNELS[kernel]
    monkeypatch.setenv("PORTMLA_CUDA_HOPPER", kernel)
    force_schedule(monkeypatch, *schedule)
    fmt = "bfloat16" if dtype == torch.bfloat16 else "float16"
    for heads, lens, qlens, strided in CASES:
        case = make_decode_case(lens, qlens, heads, block_size, fmt, dtype, "cuda", strided=strided)
        check_decode(*run_both(case, single_token=False), tol=1e-2)
    assert ran and set(ran) == {want}, f"variants that ran: {sorted(set(ran))}"


@pytest.mark.gpu
@pytest.mark.parametrize("kernel", list(KERNELS))
def test_hopper_one_long_sequence(monkeypatch, ran, kernel):
    """b = 1: the planner's parts (66 on an H100 at 128 heads) all take a piece of it."""
    _need_hopper()
    monkeypatch.setenv("PORTMLA_CUDA_HOPPER", kernel)
    case = make_decode_case([20000], [1], 128, 64, "bfloat16", torch.bfloat16, "cuda")
    check_decode(*run_both(case, single_token=True), tol=1e-2)
    assert set(ran) == {KERNELS[kernel]}


@pytest.mark.gpu
@pytest.mark.parametrize("kernel", list(KERNELS))
@pytest.mark.parametrize("heads", [32, 64, 96])
def test_hopper_query_layouts(monkeypatch, ran, kernel, heads):
    """Q tiles through TMA (32 heads: boxes of 2 tokens x 32 heads; 64: one token's heads) or
    cp.async (96 heads), read from a padded query tensor (head stride 584, the padding NaN),
    multi-token queries, the last box running past the tensor's tokens."""
    _need_hopper()
    monkeypatch.setenv("PORTMLA_CUDA_HOPPER", kernel)
    case = make_decode_case([700, 65, 5], [2, 1, 3], heads, 64, "bfloat16", torch.bfloat16, "cuda")
    q = case["q"]
    padded = torch.full((q.shape[0], heads, 584), float("nan"), dtype=q.dtype, device=q.device)
    padded[..., :576] = q
    case["q"] = padded[..., :576]
    assert case["q"].stride(1) == 584
    check_decode(*run_both(case, single_token=False), tol=1e-2)
    assert set(ran) == {KERNELS[kernel]}


@pytest.mark.gpu
@pytest.mark.parametrize("kernel", list(KERNELS))
@pytest.mark.parametrize("seqs", [32, 33])
def test_hopper_schedule_either_side_of_inline(monkeypatch, ran, kernel, seqs):
    """40 parts cut sequences into pieces on both sides of the in-kernel schedule's bound (the
    pieces' merge then reads the schedule CTA (0, 0) wrote, or the schedule kernel's)."""
    _need_hopper()
    monkeypatch.setenv("PORTMLA_CUDA_HOPPER", kernel)
    force_schedule(monkeypatch, 40, 3)
    check_decode(*run_both(boundary_case(seqs, 64, "bfloat16"), single_token=False), tol=1e-2)
    assert set(ran) == {KERNELS[kernel]}


@pytest.mark.gpu
def test_hopper_single_token_large_batch(ran):
    _need_hopper()
    lens = [int(x) for x in torch.randint(1, 3000, (150,))]
    case = make_decode_case(lens, [1] * 150, 128, 64, "bfloat16", torch.bfloat16, "cuda")
    check_decode(*run_both(case, single_token=True), tol=1e-2)
    assert set(ran) == {"hopper"}


@pytest.mark.gpu
def test_hopper_not_taken_where_it_cannot_run(ran):
    """Block sizes the TMA boxes do not take go to the generic kernels (16-bit caches) or the
    quantized-cache kernel (fp8 formats; block 64 goes to the narrow kernel's quantized form,
    tests/test_cuda_hopper_narrow_quant.py)."""
    _need_hopper()
    for fmt, bs in (("fp8", 48), ("fp8_ds_mla", 1), ("bfloat16", 48), ("bfloat16", 1)):
        case = make_decode_case([100, 7], [1, 1], 16, bs, fmt, torch.bfloat16, "cuda")
        check_decode(*run_both(case, single_token=True))
    assert not any(r.startswith("hopper") for r in ran) and len(ran) == 4


@pytest.mark.gpu
@pytest.mark.parametrize("kernel", list(KERNELS))
@pytest.mark.parametrize("hint", list(cuda_backend.KV_L2_HINTS))
def test_hopper_kv_l2_hints(monkeypatch, ran, kernel, hint):
    """Every L2 eviction priority of the KV tile loads (PORTMLA_CUDA_KV_L2) gives the reference's
    result: grids of one row tile (16 heads x 1 token, evict_first under ``auto``) and of several
    (128 heads, 16 heads x 1-3 tokens), 40 sequences (the schedule kernel, the last-piece merge)."""
    _need_hopper()
    monkeypatch.setenv("PORTMLA_CUDA_HOPPER", kernel)
    monkeypatch.setenv("PORTMLA_CUDA_KV_L2", hint)
    lens = [int(x) for x in torch.randint(1, 3000, (40,))]
    for heads, lens_, qlens, strided in CASES[:2] + [(16, lens, [1] * 40, True)]:
        case = make_decode_case(lens_, qlens, heads, 64, "bfloat16", torch.bfloat16, "cuda", strided=strided)
        check_decode(*run_both(case, single_token=False), tol=1e-2)
    assert set(ran) == {KERNELS[kernel]}


@pytest.mark.gpu
@pytest.mark.parametrize("kernel", list(KERNELS))
@pytest.mark.parametrize("tail", TAILS)
def test_hopper_pieces_merge_paths(monkeypatch, ran, kernel, tail):
    """The merges of the cut sequences' pieces: b=1 (128 rows of 66 pieces: a row a CTA, its
    pieces split over the warps), 3 rows a CTA (warps in pairs), multi-token queries of 4
    sequences, 150 sequences of 16 heads (up to 16 rows a CTA: each warp two rows); 150 of 128
    heads have too many rows a CTA for the 64-row kernels: the merge kernel runs there. With
    more than 32 sequences the narrow kernel merges each cut sequence by its last piece: also
    40 sequences of 1-3 tokens (row tiles 1-2 of the one-token sequences have no piece)."""
    _need_hopper()
    monkeypatch.setenv("PORTMLA_CUDA_HOPPER", kernel)
    narrow = kernel == "narrow"
    lens = [int(x) for x in torch.randint(1, 3000, (150,))]
    qlens = [int(x) for x in torch.randint(1, 4, (40,))]
    lens40 = [max(n, k) for n, k in zip(lens, qlens)]  # a sequence holds its query tokens
    cases = [
        (make_decode_case([20000], [1], 128, 64, "bfloat16", torch.bfloat16, "cuda"), True, True, False),
        (make_decode_case([9000, 7000, 3], [1, 1, 1], 128, 64, "float16", torch.float16, "cuda",
                          strided=True), True, True, False),
        (make_decode_case([3000, 40, 900, 1], [1, 2, 3, 1], 16, 32, "bfloat16", torch.bfloat16,
                          "cuda"), False, True, False),
        (make_decode_case(lens, [1] * 150, 16, 64, "bfloat16", torch.bfloat16, "cuda"), True, True, narrow),
        # 15 rows a CTA for the narrow kernel (128 CTAs of 16 rows, 15 cut sequences)
        (make_decode_case(lens, [1] * 150, 128, 64, "bfloat16", torch.bfloat16, "cuda"), True,
         narrow, narrow),
        (make_decode_case(lens40, qlens, 16, 64, "float16", torch.float16, "cuda", strided=True),
         False, True, narrow),
    ]
    for i, (case, single, eligible, arrive) in enumerate(cases):
        check_merge_path(monkeypatch, case, tail, single_token=single, eligible=eligible,
                         arrive=arrive, counted=kernel == "pair" and i == 4)
    assert set(ran) == {KERNELS[kernel]}


@pytest.mark.gpu
@pytest.mark.parametrize("fmt,dtype", [("bfloat16", torch.bfloat16), ("float16", torch.float16)],
                         ids=["bf16", "fp16"])
def test_hopper_counted_pieces_merge(monkeypatch, ran, fmt, dtype):
    """The pair kernel counts the pieces it stores and the merge kernel, launched as its
    programmatic dependent, merges each 64-row tile of a cut sequence once its count is full
    (kTailCount, one query token a sequence): 128 heads over 40 sequences (empty ones too) with
    the planner's parts and with 120 forced parts (a grid of 240 CTAs, more than the GPU holds
    at once: the merge grid launches only once every decode CTA has started); against the
    reference, bitwise equal to the plain merge kernel (PORTMLA_CUDA_PIECE_COUNT=0) and run to
    run; a graph replayed over shorter lengths (the counters zeroed again by each replay's
    schedule). 1-3 tokens a sequence (up to 720 CTAs): the plain merge kernel."""
    _need_hopper()
    monkeypatch.setenv("PORTMLA_CUDA_HOPPER", "pair")
    lens = [int(x) for x in torch.randint(1, 3000, (40,))]
    lens[::7] = [0] * len(lens[::7])
    qlens = [min(n, int(k)) for n, k in zip(lens, torch.randint(1, 4, (40,)))]
    lens = [max(n, k) for n, k in zip(lens, qlens)]
    multi = make_decode_case(lens, qlens, 128, 64, fmt, dtype, "cuda", strided=True)
    case = make_decode_case(lens, [min(n, 1) for n in lens], 128, 64, fmt, dtype, "cuda", strided=True)
    for parts in (None, 120):
        if parts:
            force_schedule(monkeypatch, parts, 1)
        check_merge_path(monkeypatch, multi, "in-kernel", single_token=False, eligible=False)
        got = []
        for count in ("1", "0"):
            monkeypatch.setenv("PORTMLA_CUDA_PIECE_COUNT", count)
            check_merge_path(monkeypatch, case, "in-kernel", single_token=False, eligible=False,
                             counted=count == "1")
            scale = 576 ** -0.5
            got.append(pm.mla_decode(softmax_scale=scale, return_lse=True, backend="cuda", **case))
        assert torch.equal(got[0][0], got[1][0]) and torch.equal(got[0][1], got[1][1]), \
            "counted and plain merges differ"
    monkeypatch.setenv("PORTMLA_CUDA_PIECE_COUNT", "1")
    single = make_decode_case([max(n, 1) for n in lens], [1] * 40, 128, 64, fmt, dtype, "cuda")
    check_deterministic_and_graph(single, tol=2e-2)
    assert set(ran) == {"hopper"}


@pytest.mark.gpu
@pytest.mark.parametrize("stride", [516, 520], ids=["4-byte-rows", "16-byte-rows"])
@pytest.mark.parametrize("kernel,heads", [("narrow", 8), ("pair", 128), ("tile", 32)])
def test_hopper_output_layouts(monkeypatch, ran, stride, kernel, heads):
    """Each 16-bit Hopper kernel's output rows into a padded output tensor: a head stride of 516
    elements (rows 8-byte but not 16-byte aligned: the narrow kernel's 4-byte stores) or 520
    (16-byte rows); the padding stays NaN, multi-token queries cut over several parts (their
    pieces merged into the same padded rows)."""
    _need_hopper()
    monkeypatch.setenv("PORTMLA_CUDA_HOPPER", kernel)
    force_schedule(monkeypatch, 40, 3)
    kw = dict(make_decode_case([2000, 33, 640, 1], [1, 3, 2, 1], heads, 32, "bfloat16",
                               torch.bfloat16, "cuda"))
    scale = 576 ** -0.5
    ref_out, ref_lse = pm.mla_decode(softmax_scale=scale, return_lse=True, backend="reference", **kw)
    buf = torch.full((ref_out.shape[0], heads, stride), float("nan"), dtype=ref_out.dtype,
                     device=ref_out.device)
    got_out, got_lse = pm.mla_decode(softmax_scale=scale, return_lse=True, backend="cuda",
                                     out=buf[..., :512], **kw)
    check_decode(ref_out, ref_lse, got_out, got_lse, tol=1e-2)
    assert torch.isnan(buf[..., 512:]).all()
    assert set(ran) == {KERNELS[kernel]}
