"""fp8 / fp8_ds_mla caches through the Hopper pair kernel (its producer warpgroup loads the raw
entries into the stages, through TMA boxes of bytes for block sizes 16 / 64 / 256 here, else
16-byte copies (block sizes 1 and 48); its consumer warpgroups expand them to fp16, with the
queries scaled per row into fp16: fp8 exactly, fp8_ds_mla as value x (tile scale / M), M a power
of two that 16 tokens share; csrc_cuda/sm90/decode/pair_fp8_fill.cuh) against the torch
reference.

Runs on an sm_90 GPU with a module that has the kernel; skips elsewhere, except when
PORTMLA_REQUIRE_HOPPER=1: then a missing kernel FAILS. Every case asserts which kernel ran.
"""

from __future__ import annotations

import pytest
import torch
from mla_cases import seq_float64
from test_cuda_backend import (
    SCHEDULES,
    L,
    R,
    check_decode,
    check_deterministic_and_graph,
    check_merge_path,
    check_output,
    force_schedule,
    make_decode_case,
    run_both,
)
from test_cuda_hopper import CASES, REQUIRED, _need_hopper  # the 16-bit Hopper tests' cases

from portmla.backends import cuda as cuda_backend

FORMATS = ["fp8", "fp8_ds_mla"]
# (format, query dtype) pairs the pair kernel takes.
FORMAT_QUERIES = [("fp8", torch.bfloat16), ("fp8", torch.float16), ("fp8_ds_mla", torch.bfloat16)]


def _need_hopper_quant():
    _need_hopper()
    mod, _ = cuda_backend.load_module()
    if "fp8" not in getattr(mod, "HOPPER_QUANT_FORMATS", ()):
        msg = "portmla._cuda built without the pair kernel's fp8 producer"
        if REQUIRED:
            pytest.fail(msg)
        pytest.skip(msg)


@pytest.mark.gpu
@pytest.mark.parametrize("block_size", [1, 16, 48, 64, 256])
@pytest.mark.parametrize("fmt,dtype", FORMAT_QUERIES, ids=lambda v: str(v).removeprefix("torch."))
@pytest.mark.parametrize("schedule", SCHEDULES, ids=lambda s: f"parts{s[0] or 'auto'}-fixed{s[1] or 'auto'}")
def test_hopper_quant_decode(monkeypatch, ran, block_size, fmt, dtype, schedule):
    """Forced onto the pair kernel whatever the rows: block sizes its TMA path does not take
    too (the copying producer looks every token up), varlen causal queries, strided pages,
    empty sequences, partial last tiles."""
    _need_hopper_quant()
    monkeypatch.setenv("PORTMLA_CUDA_HOPPER", "pair")
    force_schedule(monkeypatch, *schedule)
    for heads, lens, qlens, strided in CASES:
        case = make_decode_case(lens, qlens, heads, block_size, fmt, dtype, "cuda",
                                strided=strided)
        check_decode(*run_both(case, single_token=False), tol=1e-2)
    assert ran and set(ran) == {"hopper"}, f"variants that ran: {sorted(set(ran))}"


@pytest.mark.gpu
@pytest.mark.parametrize("dtype,gains", [(torch.bfloat16, (1e-5, 1e5)), (torch.float16, (1e-3, 1e3))],
                         ids=["bfloat16", "float16"])
def test_hopper_quant_fp8_query_range(ran, dtype, gains):
    """fp8 runs on fp16 operands, each query row scaled by a power of two: rows whose values
    span 10 decades (bf16 values far past fp16's 65504, tiny ones in its subnormals unscaled)
    must match the reference, logits up to ~1e5 included."""
    _need_hopper_quant()
    case = make_decode_case([3000, 700, 65], [1, 3, 2], 64, 64, "fp8", dtype, "cuda")
    q = case["q"]
    lo, hi = torch.log(torch.tensor(gains, dtype=torch.float64))
    gain = torch.exp(lo + (hi - lo) * torch.rand(q.shape[0], q.shape[1], 1, dtype=torch.float64))
    case["q"] = (q.double() * gain.to(q.device)).to(dtype)
    if dtype == torch.bfloat16:
        assert case["q"].abs().max().item() > 65504  # past fp16's range without the row scale
    check_decode(*run_both(case, single_token=False), tol=1e-2)
    assert set(ran) == {"hopper"}, ran


@pytest.mark.gpu
@pytest.mark.parametrize("gains", [dict(token_gain=(1e-3, 30.0)), dict(token_gain=(1e-2, 1e2)),
                                   dict(tile_gain=(1e-3, 10.0)),
                                   dict(token_gain=(1e-2, 10.0), tile_gain=(1e-2, 10.0))],
                         ids=["tokens-4-decades", "tokens-logits-100", "tiles", "both"])
def test_hopper_quant_ds_scales_spread(ran, gains):
    """fp8_ds_mla tile scales spread over up to 4 decades between the 16 tokens that share a power
    of two in the kernel, and between a token's four tiles (logits up to a few hundred): the
    output against the exact dequantized values at the usual tolerance. The values' fp16 form over
    that power of two loses bits (fp16's subnormals) only for tiles 2^8 below the group's largest
    scale, by at most 2^-25 of it. The LSE within ``_ds_lse_bound`` of float64 math (its absolute
    error grows with the logits: 0.08-0.11 at logits ~50-400 in 5 of 60 draws, H100)."""
    _need_hopper_quant()
    case = make_decode_case([3000, 200, 77], [1, 2, 1], 128, 64, "fp8_ds_mla", torch.bfloat16,
                            "cuda", **gains)
    ref_out, ref_lse, got_out, got_lse = run_both(case, single_token=False)
    check_output(ref_out, got_out, tol=1e-2)
    want, bound = _ds_lse_bound(case)
    fin = torch.isfinite(want)
    assert torch.equal(fin, torch.isfinite(got_lse)) and torch.equal(fin, torch.isfinite(ref_lse))
    torch.testing.assert_close(ref_lse[fin].double(), want[fin], atol=1e-3, rtol=1e-5)
    over = (got_lse.double() - want).abs() - bound
    assert (over[fin] <= 0).all(), f"LSE off by {over[fin].max().item():.4f} past its bound"
    assert set(ran) == {"hopper"}, ran


def _ds_lse_bound(case):
    """``(LSE in float64, bound)`` per (token, head) of an fp8_ds_mla case (``run_both``'s scale).
    The pair kernel's fp16 operands carry each tile scale rounded to fp16 (2^-12 relative) and
    round each value's product again (2^-12), so a score is off by at most 2^-11 of the sum over
    its four tiles (and its RoPE part) of |q . kv|: the bound is that (2^-10, a factor 2 of margin)
    at the row's largest such sum among the positions it sees, plus the usual 2e-2 (an LSE moves
    by at most its scores' largest error)."""
    scale = (L + R) ** -0.5
    qsl = case["query_start_loc"].tolist()
    lses, bounds = [], []
    for b, s in enumerate(case["seq_lens"].tolist()):
        n = qsl[b + 1] - qsl[b]
        kv, mask = seq_float64(case["kv_cache"], case["block_table"][b], s, n, "fp8_ds_mla", L, None)
        mask = mask.unsqueeze(1)
        q = case["q"][qsl[b]:qsl[b + 1]].double()
        tiles = torch.einsum("nhtd,std->nhst", q[..., :L].unflatten(-1, (4, 128)),
                             kv[:, :L].unflatten(-1, (4, 128)))
        rope = torch.einsum("nhd,sd->nhs", q[..., L:], kv[:, L:])
        sc = ((tiles.sum(-1) + rope) * scale).masked_fill(mask, float("-inf"))
        mag = ((tiles.abs().sum(-1) + rope.abs()) * scale).masked_fill(mask, 0.0)
        lses.append(torch.logsumexp(sc, -1))
        bounds.append(2.0 ** -10 * mag.amax(-1) + 2e-2)
    return torch.cat(lses), torch.cat(bounds)


def _pages_to_far_end(case):
    """Moves the case's pages to the last blocks of its cache (the block table follows)."""
    cache, table = case["kv_cache"], case["block_table"].clone()
    valid = table < cache.shape[0]  # unused columns hold a poison index
    old = table[valid].long()
    new = torch.arange(cache.shape[0] - old.numel(), cache.shape[0], device=cache.device)
    raw = cache.view(torch.uint8)  # fp8 / fp8_ds_mla bytes (no indexing kernels for float8)
    raw[new] = raw[old].clone()
    table[valid] = new.to(torch.int32)
    return dict(case, block_table=table)


@pytest.mark.gpu
@pytest.mark.large
@pytest.mark.parametrize("fmt", FORMATS)
def test_hopper_quant_cache_above_2_pow_31_bytes(monkeypatch, ran, fmt):
    """Pages at the far end of a cache of more than 2^31 bytes, for both producers: block 64
    (TMA boxes of raw bytes) and 48 (16-byte copies). 32-bit byte offsets would wrap."""
    _need_hopper_quant()
    monkeypatch.setenv("PORTMLA_CUDA_HOPPER", "pair")
    entry = 656 if fmt == "fp8_ds_mla" else 576
    for bs in (64, 48):
        case = make_decode_case([1000, 777], [1, 2], 128, bs, fmt, torch.bfloat16, "cuda",
                                extra_blocks=2**31 // (bs * entry) + 8)
        case = _pages_to_far_end(case)
        cache = case["kv_cache"]
        assert cache.numel() * cache.element_size() > 2**31
        assert int(case["block_table"][0, 0]) * bs * entry > 2**31
        check_decode(*run_both(case, single_token=False), tol=1e-2)
        del case, cache
        torch.cuda.empty_cache()
    assert ran and set(ran) == {"hopper"}, ran


@pytest.mark.gpu
@pytest.mark.parametrize("fmt", FORMATS)
def test_hopper_quant_one_long_sequence(ran, fmt):
    """b = 1, S = 20000 at 128 heads: every part takes a piece (the pieces' merge)."""
    _need_hopper_quant()
    case = make_decode_case([20000], [1], 128, 64, fmt, torch.bfloat16, "cuda")
    check_decode(*run_both(case, single_token=True), tol=1e-2)
    assert set(ran) == {"hopper"}


@pytest.mark.gpu
def test_hopper_quant_default_route(ran):
    """The planner's own choices: more than 16 rows -> the pair kernel (fp8: bf16 or fp16
    queries; fp8_ds_mla: bf16); 16 rows -> the narrow kernel's quantized form; fp16 queries with
    fp8_ds_mla -> the quantized-cache kernel; 17..32 rows with block size 16 or one TMA does not
    take (48) -> the quantized-cache kernel."""
    _need_hopper_quant()
    lens = [int(x) for x in torch.randint(2, 3000, (40,))]  # 2: the two-token queries
    want = []
    for fmt in FORMATS:
        for heads, s_q, bs, dtype, kernel in (
                (128, 1, 64, torch.bfloat16, "hopper"), (64, 1, 64, torch.bfloat16, "hopper"),
                (32, 1, 64, torch.bfloat16, "hopper"), (16, 2, 32, torch.bfloat16, "hopper"),
                (16, 1, 64, torch.bfloat16, "hopper_narrow_quant"),
                (32, 1, 48, torch.bfloat16, "quant"), (16, 2, 16, torch.bfloat16, "quant"),
                (128, 1, 64, torch.float16, "hopper" if fmt == "fp8" else "quant")):
            case = make_decode_case(lens, [s_q] * 40, heads, bs, fmt, dtype, "cuda")
            check_decode(*run_both(case, single_token=s_q == 1), tol=1e-2)
            want.append(kernel)
    assert ran == want, ran


@pytest.mark.gpu
@pytest.mark.parametrize("fmt,dtype", FORMAT_QUERIES, ids=lambda v: str(v).removeprefix("torch."))
def test_hopper_quant_deterministic_and_graph_capture(fmt, dtype):
    """Bitwise equal runs; a captured graph replayed over changed seq_lens."""
    _need_hopper_quant()
    case = make_decode_case([700, 1500, 40], [1, 1, 1], 128, 64, fmt, dtype, "cuda")
    check_deterministic_and_graph(case, tol=1e-2)


@pytest.mark.gpu
@pytest.mark.parametrize("fmt,dtype", FORMAT_QUERIES, ids=lambda v: str(v).removeprefix("torch."))
@pytest.mark.parametrize("tail", ["in-kernel", "merge-kernel"])
def test_hopper_quant_pieces_merge_paths(monkeypatch, ran, fmt, dtype, tail):
    """The pair kernel's fp8 instantiations merging the pieces themselves or through the merge
    kernel: b=1 (a row a CTA), 30 sequences of 40 heads (~9 rows a CTA: each warp two rows)."""
    _need_hopper_quant()
    lens = [int(x) for x in torch.randint(1, 3000, (30,))]
    for case in (make_decode_case([20000], [1], 128, 64, fmt, dtype, "cuda"),
                 make_decode_case(lens, [1] * 30, 40, 64, fmt, dtype, "cuda")):
        check_merge_path(monkeypatch, case, tail)
    assert set(ran) == {"hopper"}
