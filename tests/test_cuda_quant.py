"""The quantized-cache decode kernel of the cuda backend (fp8 / fp8_ds_mla caches, few rows per
sequence; csrc_cuda/sm80/decode/quant_kernel.cuh) against the torch reference.

Runs on an sm_89+ GPU; skips elsewhere, except when PORTMLA_REQUIRE_BACKEND=cuda on such a GPU:
then a module built without the kernel FAILS. Every case asserts that the kernel ran.
"""

from __future__ import annotations

import os

import pytest
import torch
from test_cuda_backend import (
    REQUIRED,
    SCHEDULES,
    _need_cuda,
    boundary_case,
    check_decode,
    check_merge_path,
    force_schedule,
    make_decode_case,
    run_both,
)

from portmla.backends import cuda as cuda_backend


def _need_quant():
    _need_cuda()
    mod, _ = cuda_backend.load_module()
    cap = torch.cuda.get_device_capability()
    if cap < cuda_backend.QUANT_MIN_CAPABILITY:
        pytest.skip(f"device capability {cap} (the quantized kernel serves sm_89+)")
    if "quant" not in mod.DECODE_VARIANTS:
        msg = "portmla._cuda built without the quantized-cache kernel"
        if REQUIRED:
            pytest.fail(msg)
        pytest.skip(msg)


CASES = [  # heads, seq lens, query lens (rows <= 128 a sequence), strided cache
    (16, [2000, 33, 64, 1, 0], [1, 2, 1, 1, 0], True),
    (1, [129, 640, 4100], [1, 2, 1], False),
    (3, [300, 77, 5], [4, 1, 5], True),
    (32, [700, 5], [1, 1], False),
    (40, [900, 3], [3, 1], True),      # 120 rows: 8 row tiles, the last partly empty
    (128, [600, 70], [1, 1], False),
]
def force(monkeypatch, parts, fixed):
    """This kernel for every case (on sm_90 the pair kernel takes bf16 queries with > 32 rows)."""
    monkeypatch.delenv("PORTMLA_CUDA_QUANT", raising=False)
    monkeypatch.setenv("PORTMLA_CUDA_HOPPER", "0")
    force_schedule(monkeypatch, parts, fixed)


@pytest.mark.gpu
@pytest.mark.parametrize("block_size", [1, 16, 48, 64, 256])
@pytest.mark.parametrize("fmt,dtype", [("fp8", torch.bfloat16), ("fp8", torch.float16),
                                       ("fp8_ds_mla", torch.bfloat16), ("fp8_ds_mla", torch.float16)],
                         ids=["fp8-bf16", "fp8-fp16", "ds-bf16", "ds-fp16"])
@pytest.mark.parametrize("schedule", SCHEDULES, ids=lambda s: f"parts{s[0] or 'auto'}-fixed{s[1] or 'auto'}")
def test_quant_decode(monkeypatch, ran, block_size, fmt, dtype, schedule):
    _need_quant()
    force(monkeypatch, *schedule)
    for heads, lens, qlens, strided in CASES:
        case = make_decode_case(lens, qlens, heads, block_size, fmt, dtype, "cuda", strided=strided)
        check_decode(*run_both(case, single_token=False), tol=1e-2)
    assert ran and set(ran) == {"quant"}, f"variants that ran: {sorted(set(ran))}"


@pytest.mark.gpu
def test_quant_ds_scales_spread(monkeypatch, ran):
    """fp8_ds_mla tile scales spread over 4 decades inside each KV tile: P of each scale tile is
    normalised by the KV tile's largest scale, O rescaled exactly when that changes."""
    _need_quant()
    force(monkeypatch, 0, 0)
    for gain in ((1e-3, 30.0), (1e-2, 1e2)):
        case = make_decode_case([3000, 200], [1, 2], 16, 64, "fp8_ds_mla", torch.bfloat16, "cuda",
                                token_gain=gain)
        check_decode(*run_both(case, single_token=False), tol=1e-2)
    assert set(ran) == {"quant"}


@pytest.mark.gpu
@pytest.mark.parametrize("fmt", ["fp8", "fp8_ds_mla"])
def test_quant_one_long_sequence(monkeypatch, ran, fmt):
    """b = 1: every part takes a piece of it (the pieces' merge over ~264 partials)."""
    _need_quant()
    force(monkeypatch, 0, 0)
    case = make_decode_case([40000], [1], 16, 64, fmt, torch.bfloat16, "cuda")
    check_decode(*run_both(case, single_token=True), tol=1e-2)
    assert set(ran) == {"quant"}


@pytest.mark.gpu
@pytest.mark.parametrize("fmt", ["fp8", "fp8_ds_mla"])
@pytest.mark.parametrize("seqs", [32, 33])
def test_quant_schedule_either_side_of_inline(monkeypatch, ran, fmt, seqs):
    """The in-kernel schedule (up to 32 sequences) and the schedule kernel's, 40 parts."""
    _need_quant()
    force(monkeypatch, 40, 3)
    check_decode(*run_both(boundary_case(seqs, 16, fmt), single_token=False), tol=1e-2)
    assert set(ran) == {"quant"}


@pytest.mark.gpu
def test_quant_large_batch_default_route(ran):
    """The planner's own choice for 16-head fp8 decode is the quantized kernel, except on sm_90
    where the narrow Hopper kernel's quantized form takes it (tests/test_cuda_hopper_narrow_quant.py)."""
    _need_quant()
    mod, _ = cuda_backend.load_module()
    hopper = torch.cuda.get_device_capability() == (9, 0) and "hopper_narrow_quant" in mod.DECODE_VARIANTS \
        and os.environ.get("PORTMLA_CUDA_HOPPER") != "0"
    lens = [int(x) for x in torch.randint(1, 3000, (150,))]
    for fmt in ("fp8", "fp8_ds_mla"):
        case = make_decode_case(lens, [1] * 150, 16, 64, fmt, torch.bfloat16, "cuda")
        check_decode(*run_both(case, single_token=True), tol=1e-2)
    assert set(ran) == {"hopper_narrow_quant" if hopper else "quant"}


@pytest.mark.gpu
def test_quant_not_taken_for_many_rows_or_when_off(monkeypatch, ran):
    _need_quant()
    case = make_decode_case([100, 7], [2, 1], 128, 64, "fp8", torch.bfloat16, "cuda")  # 256 rows
    check_decode(*run_both(case, single_token=False))
    monkeypatch.setenv("PORTMLA_CUDA_QUANT", "0")
    case = make_decode_case([100, 7], [1, 1], 16, 64, "fp8", torch.bfloat16, "cuda")
    check_decode(*run_both(case, single_token=True))
    assert len(ran) == 2 and not any(r.startswith("quant") for r in ran), ran


@pytest.mark.gpu
@pytest.mark.parametrize("fmt,dtype", [("fp8", torch.bfloat16), ("fp8", torch.float16),
                                       ("fp8_ds_mla", torch.bfloat16)],
                         ids=["fp8-bf16", "fp8-fp16", "ds-bf16"])
@pytest.mark.parametrize("tail", ["in-kernel", "merge-kernel"])
def test_quant_pieces_merge_paths(monkeypatch, ran, fmt, dtype, tail):
    """The quantized-cache kernel merging the pieces itself (two CTAs an SM, all resident) or
    through the merge kernel: 8 long sequences (rows cut into ~33 pieces), multi-token queries,
    150 sequences (runs of many rows)."""
    _need_quant()
    force(monkeypatch, 0, 0)
    lens = [int(x) for x in torch.randint(1, 3000, (150,))]
    cases = [
        (make_decode_case([8192] * 8, [1] * 8, 16, 64, fmt, dtype, "cuda"), True),
        (make_decode_case([5000, 3, 700], [2, 1, 3], 16, 16, fmt, dtype, "cuda", strided=True),
         False),
        (make_decode_case(lens, [1] * 150, 16, 64, fmt, dtype, "cuda"), True),
    ]
    for case, single in cases:
        check_merge_path(monkeypatch, case, tail, single_token=single)
    assert set(ran) == {"quant"}
