"""fp8 / fp8_ds_mla caches through the narrow Hopper kernel's quantized form (16 rows a CTA, the
products transposed, raw e4m3 bytes in the stages and both KV operands converted to fp16 in
registers; csrc_cuda/sm90/decode/narrow_quant_kernel.cuh) against the torch reference.

Runs on an sm_90 GPU with a module that has the kernel; skips elsewhere, except when
PORTMLA_REQUIRE_HOPPER=1: then a missing kernel FAILS. Every case asserts which kernel ran.
"""

from __future__ import annotations

import pytest
import torch
from test_cuda_backend import (
    SCHEDULES,
    TAILS,
    boundary_case,
    check_decode,
    check_deterministic_and_graph,
    check_merge_path,
    force_schedule,
    make_decode_case,
    run_both,
)
from test_cuda_hopper import REQUIRED, _need_hopper
from test_cuda_hopper_quant import _pages_to_far_end

from portmla.backends import cuda as cuda_backend

NQ = "hopper_narrow_quant"
# (format, query dtype) pairs the kernel takes.
FORMAT_QUERIES = [("fp8", torch.bfloat16), ("fp8", torch.float16), ("fp8_ds_mla", torch.bfloat16)]
IDS = ["fp8-bf16", "fp8-fp16", "ds-bf16"]
CASES = [  # heads, seq lens, query lens, strided cache (forced: more than 16 rows too)
    (16, [2000, 33, 64, 1, 0], [1, 3, 1, 1, 0], True),
    (1, [129, 640, 4100], [1, 2, 1], False),
    (3, [300, 77, 5], [4, 1, 5], True),
    (128, [700, 5, 1300], [2, 1, 1], False),  # 256 rows: 16 row tiles
    (40, [900, 3], [3, 1], True),             # 120 rows: the last row tile partly empty
]


def _need_narrow_quant():
    _need_hopper()
    mod, _ = cuda_backend.load_module()
    if NQ not in mod.DECODE_VARIANTS:
        msg = "portmla._cuda built without the narrow quantized-cache kernel"
        if REQUIRED:
            pytest.fail(msg)
        pytest.skip(msg)


@pytest.mark.gpu
@pytest.mark.parametrize("block_size", [16, 32, 64, 128, 256])
@pytest.mark.parametrize("fmt,dtype", FORMAT_QUERIES, ids=IDS)
@pytest.mark.parametrize("schedule", SCHEDULES, ids=lambda s: f"parts{s[0] or 'auto'}-fixed{s[1] or 'auto'}")
def test_narrow_quant_decode(monkeypatch, ran, block_size, fmt, dtype, schedule):
    """Forced whatever the rows: varlen causal queries, strided pages, empty sequences, partial
    last tiles (their unused slots NaN-poisoned), sequences cut into many pieces."""
    _need_narrow_quant()
    monkeypatch.setenv("PORTMLA_CUDA_HOPPER", "narrow")
    force_schedule(monkeypatch, *schedule)
    for heads, lens, qlens, strided in CASES:
        case = make_decode_case(lens, qlens, heads, block_size, fmt, dtype, "cuda", strided=strided)
        check_decode(*run_both(case, single_token=False), tol=1e-2)
    assert ran and set(ran) == {NQ}, f"variants that ran: {sorted(set(ran))}"


@pytest.mark.gpu
@pytest.mark.parametrize("fmt,dtype", FORMAT_QUERIES, ids=IDS)
@pytest.mark.parametrize("hint", list(cuda_backend.KV_L2_HINTS))
def test_narrow_quant_kv_l2_hints(monkeypatch, ran, fmt, dtype, hint):
    """Every L2 eviction priority of the KV tile loads (PORTMLA_CUDA_KV_L2): one row tile (16
    heads x 1 token, 40 sequences: the schedule kernel and the last-piece merge) and several."""
    _need_narrow_quant()
    monkeypatch.setenv("PORTMLA_CUDA_HOPPER", "narrow")
    monkeypatch.setenv("PORTMLA_CUDA_KV_L2", hint)
    lens = [int(x) for x in torch.randint(1, 3000, (40,))]
    for heads, lens_, qlens, strided in [(16, lens, [1] * 40, True), CASES[0]]:
        case = make_decode_case(lens_, qlens, heads, 64, fmt, dtype, "cuda", strided=strided)
        check_decode(*run_both(case, single_token=False), tol=1e-2)
    assert set(ran) == {NQ}


@pytest.mark.gpu
def test_narrow_quant_ds_scales_spread(ran):
    """fp8_ds_mla tile scales spread over 4 decades between tokens (inside every KV tile): the
    scores take each position's scale in fp32, the V fragments it in fp16 times a power of two
    that brings the tile's largest into [0.5, 1), O rescaled exactly when that changes."""
    _need_narrow_quant()
    for gain in ((1e-3, 30.0), (1e-2, 1e2)):
        case = make_decode_case([3000, 200, 64], [1, 2, 1], 8, 64, "fp8_ds_mla", torch.bfloat16, "cuda",
                                token_gain=gain)
        check_decode(*run_both(case, single_token=False), tol=1e-2)
    assert set(ran) == {NQ}, ran


@pytest.mark.gpu
@pytest.mark.parametrize("dtype,gains", [(torch.bfloat16, (1e-5, 1e5)), (torch.float16, (1e-3, 1e3))],
                         ids=["bfloat16", "float16"])
def test_narrow_quant_fp8_query_range(ran, dtype, gains):
    """Query rows spanning 10 decades (bf16 values past fp16's range): each row is scaled by a
    power of two into fp16 and the scores by its inverse."""
    _need_narrow_quant()
    case = make_decode_case([3000, 700, 65], [1, 3, 2], 4, 64, "fp8", dtype, "cuda")
    q = case["q"]
    lo, hi = torch.log(torch.tensor(gains, dtype=torch.float64))
    gain = torch.exp(lo + (hi - lo) * torch.rand(q.shape[0], q.shape[1], 1, dtype=torch.float64))
    case["q"] = (q.double() * gain.to(q.device)).to(dtype)
    check_decode(*run_both(case, single_token=False), tol=1e-2)
    assert set(ran) == {NQ}, ran


@pytest.mark.gpu
@pytest.mark.large
@pytest.mark.parametrize("fmt", ["fp8", "fp8_ds_mla"])
def test_narrow_quant_cache_above_2_pow_31_bytes(ran, fmt):
    """Pages at the far end of a cache of more than 2^31 bytes (TMA coordinates: page, position;
    32-bit byte offsets would wrap)."""
    _need_narrow_quant()
    entry = 656 if fmt == "fp8_ds_mla" else 576
    case = make_decode_case([1000, 777], [1, 2], 8, 64, fmt, torch.bfloat16, "cuda",
                            extra_blocks=2**31 // (64 * entry) + 8)
    case = _pages_to_far_end(case)
    assert case["kv_cache"].numel() * case["kv_cache"].element_size() > 2**31
    assert int(case["block_table"][0, 0]) * 64 * entry > 2**31
    check_decode(*run_both(case, single_token=False), tol=1e-2)
    assert set(ran) == {NQ}, ran


@pytest.mark.gpu
@pytest.mark.parametrize("fmt", ["fp8", "fp8_ds_mla"])
def test_narrow_quant_one_long_sequence(ran, fmt):
    """b = 1, S = 40000 at 16 heads: every part (two an SM) takes a piece of it."""
    _need_narrow_quant()
    case = make_decode_case([40000], [1], 16, 64, fmt, torch.bfloat16, "cuda")
    check_decode(*run_both(case, single_token=True), tol=1e-2)
    assert set(ran) == {NQ}


@pytest.mark.gpu
@pytest.mark.parametrize("fmt", ["fp8", "fp8_ds_mla"])
@pytest.mark.parametrize("seqs", [32, 33])
def test_narrow_quant_schedule_either_side_of_inline(monkeypatch, ran, fmt, seqs):
    """The in-kernel schedule (up to 32 sequences) and the schedule kernel's, 40 parts."""
    _need_narrow_quant()
    force_schedule(monkeypatch, 40, 3)
    check_decode(*run_both(boundary_case(seqs, 8, fmt), single_token=False), tol=1e-2)
    assert set(ran) == {NQ}


@pytest.mark.gpu
def test_narrow_quant_default_route(ran):
    """The planner's own choices with 16 heads: this kernel for fp8 (bf16 / fp16 queries) and
    fp8_ds_mla (bf16); the mma.sync quantized kernel for fp8_ds_mla with fp16 queries and for a
    block size the TMA boxes do not tile (48)."""
    _need_narrow_quant()
    lens = [int(x) for x in torch.randint(1, 3000, (40,))]
    want = []
    for fmt, dtype, bs, kernel in (("fp8", torch.bfloat16, 64, NQ), ("fp8", torch.float16, 16, NQ),
                                   ("fp8_ds_mla", torch.bfloat16, 256, NQ),
                                   ("fp8_ds_mla", torch.float16, 64, "quant"),
                                   ("fp8", torch.bfloat16, 48, "quant")):
        case = make_decode_case(lens, [1] * 40, 16, bs, fmt, dtype, "cuda")
        check_decode(*run_both(case, single_token=True), tol=1e-2)
        want.append(kernel)
    assert ran == want, ran


@pytest.mark.gpu
@pytest.mark.parametrize("fmt,dtype", FORMAT_QUERIES, ids=IDS)
@pytest.mark.parametrize("seqs", [3, 40])
def test_narrow_quant_deterministic_and_graph_capture(fmt, dtype, seqs):
    """Bitwise equal runs; a captured graph replayed over changed seq_lens (40 sequences: the
    last-piece merge's counters zeroed by each replay's schedule kernel)."""
    _need_narrow_quant()
    lens = [700, 1500, 40] if seqs == 3 else [int(x) for x in torch.randint(1, 3000, (seqs,))]
    case = make_decode_case(lens, [1] * seqs, 16, 64, fmt, dtype, "cuda")
    check_deterministic_and_graph(case, tol=1e-2)


@pytest.mark.gpu
@pytest.mark.parametrize("fmt,dtype", FORMAT_QUERIES, ids=IDS)
@pytest.mark.parametrize("tail", TAILS)
def test_narrow_quant_pieces_merge_paths(monkeypatch, ran, fmt, dtype, tail):
    """The kernel merging the pieces itself (cooperative launch: b=1 and 8 long sequences, rows
    cut into many pieces; by each cut sequence's last piece: 150 varlen sequences, 40 of 1-3
    tokens at 8 heads, forced here past HOPPER_NARROW_MAX_ROWS: row tile 1 of the one-token
    sequences has no piece) or through the merge kernel."""
    _need_narrow_quant()
    monkeypatch.setenv("PORTMLA_CUDA_HOPPER", "narrow")
    lens = [int(x) for x in torch.randint(1, 3000, (150,))]
    qlens = [int(x) for x in torch.randint(1, 4, (40,))]
    lens40 = [max(n, k) for n, k in zip(lens, qlens)]  # a sequence holds its query tokens
    for case, single, arrive in (
            (make_decode_case([20000], [1], 16, 64, fmt, dtype, "cuda"), True, False),
            (make_decode_case([8192] * 8, [1] * 8, 16, 64, fmt, dtype, "cuda"), True, False),
            (make_decode_case(lens, [1] * 150, 16, 64, fmt, dtype, "cuda"), True, True),
            (make_decode_case(lens40, qlens, 8, 64, fmt, dtype, "cuda", strided=True), False, True)):
        check_merge_path(monkeypatch, case, tail, single_token=single, arrive=arrive)
    assert set(ran) == {NQ}
