"""The native CUDA backend against the torch reference, through the public ops.

Skips on machines without CUDA or without the built module, except when
PORTMLA_REQUIRE_BACKEND=cuda: then an unavailable backend FAILS.
Cache slots and block-table columns that no sequence uses are poisoned (NaN bytes,
out-of-range block ids) so a kernel that reads them shows.
"""

from __future__ import annotations

import os

import pytest
import torch

import portmla as pm

L, R = 512, 64
REQUIRED = os.environ.get("PORTMLA_REQUIRE_BACKEND") == "cuda"


def _cuda_info():
    if not torch.cuda.is_available():
        return None, "no CUDA device"
    info = pm.probe("cuda")["cuda"]
    return info, "; ".join(info.reasons)


def _need_cuda():
    info, why = _cuda_info()
    if info is None or not info.available:
        if REQUIRED:
            pytest.fail(f"PORTMLA_REQUIRE_BACKEND=cuda but the cuda backend is unavailable: {why}")
        pytest.skip(f"cuda backend unavailable: {why}")


def test_cuda_backend_available_when_required():
    _need_cuda()


# ------------------------------------------------------------------------ cases


def make_cache(num_blocks, block_size, fmt, dtype, device, strided):
    """A NaN-poisoned cache; ``strided``: padded tokens and pages (a view of a bigger buffer)."""
    shape = pm.kv_cache_shape(num_blocks, block_size, fmt)
    storage = pm.allocate_kv_cache(1, 1, fmt, dtype, device).dtype
    if strided:
        pad = 16 if storage.itemsize == 1 else 8
        buf = torch.empty(num_blocks, 2, block_size, shape[2] + pad, dtype=storage, device=device)
        cache = buf[:, 1, :, : shape[2]]
    else:
        buf = torch.empty(shape, dtype=storage, device=device)
        cache = buf
    buf.view(torch.uint8).fill_(0xFF)  # NaN in bf16/fp16/e4m3fn/float32
    return cache


def make_decode_case(seq_lens, q_lens, num_heads, block_size, fmt, dtype, device, *,
                     strided=False, k_scale=0.02, extra_blocks=3, generator=None, token_gain=None,
                     tile_gain=None):
    """Cache filled through the reference write path; block table shuffled, unused columns poisoned.
    ``token_gain=(lo, hi)``: each token's values times a log-uniform factor in [lo, hi] (wide
    spreads of fp8_ds_mla tile scales inside one KV tile); ``tile_gain``: the same for each
    128-channel latent tile of each token (spreads between a token's four tile scales)."""
    b = len(seq_lens)
    need = [-(-s // block_size) for s in seq_lens]
    num_blocks = sum(need) + extra_blocks
    cache = make_cache(num_blocks, block_size, fmt, dtype, device, strided)
    max_blocks = max(need + [1]) + 1
    perm = torch.randperm(num_blocks, device=device).to(torch.int32)
    table = torch.full((b, max_blocks), 1 << 30, dtype=torch.int32, device=device)
    used = 0
    for i, n in enumerate(need):
        table[i, :n] = perm[used:used + n]
        used += n
    scale = k_scale if fmt == "fp8" else None
    for i, s in enumerate(seq_lens):
        if s == 0:
            continue
        pos = torch.arange(s, device=device)
        slots = (table[i, pos // block_size].long() * block_size + pos % block_size)
        kv_c = torch.randn(s, L, device=device, dtype=dtype)
        k_pe = torch.randn(s, R, device=device, dtype=dtype)
        if token_gain is not None:
            lo, hi = torch.log(torch.tensor(token_gain, dtype=torch.float64))
            gain = torch.exp(lo + (hi - lo) * torch.rand(s, 1, dtype=torch.float64)).to(device)
            kv_c = (kv_c.double() * gain).to(dtype)
            k_pe = (k_pe.double() * gain).to(dtype)
        if tile_gain is not None:
            lo, hi = torch.log(torch.tensor(tile_gain, dtype=torch.float64))
            gain = torch.exp(lo + (hi - lo) * torch.rand(s, L // 128, 1, dtype=torch.float64))
            kv_c = (kv_c.double().view(s, L // 128, 128) * gain.to(device)).view(s, L).to(dtype)
        pm.concat_and_cache_mla(kv_c, k_pe, cache, slots, fmt, scale, backend="reference")
    t = sum(q_lens)
    q = torch.randn(t, num_heads, L + R, device=device, dtype=dtype)
    qsl = torch.zeros(b + 1, dtype=torch.int32, device=device)
    qsl[1:] = torch.tensor(q_lens, device=device).cumsum(0)
    return dict(q=q, kv_cache=cache, block_table=table,
                seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=device),
                query_start_loc=qsl, kv_cache_dtype=fmt, k_scale=scale)


# (parts, fixed cost) of the device schedule of the scheduled kernels (Hopper, quantized):
# 0 = the planner's; 1 part never cuts a sequence; many parts with a small fixed cost cut every
# sequence into pieces, some of them empty for the row tiles of the earlier query tokens.
SCHEDULES = [(0, 0), (1, 0), (3, 1), (40, 7)]


def boundary_case(seqs: int, heads: int, fmt: str):
    """`seqs` sequences (0 to 1500 positions, one empty, up to 2 query tokens) for the
    schedule's two paths: up to 32 sequences each CTA computes it, from 33 a kernel does."""
    lens = [int(x) for x in torch.randint(0, 1500, (seqs,))]
    lens[3] = 0
    qlens = [min(n, int(q)) for n, q in zip(lens, torch.randint(1, 3, (seqs,)))]
    return make_decode_case(lens, qlens, heads, 64, fmt, torch.bfloat16, "cuda", strided=True)


def force_schedule(monkeypatch, parts, fixed):
    from portmla.backends import cuda as cuda_backend

    if parts:
        monkeypatch.setattr(cuda_backend, "sched_parts", lambda *a: parts)
    if fixed:
        monkeypatch.setattr(cuda_backend, "SCHED_FIXED", dict.fromkeys(cuda_backend.SCHED_FIXED, fixed))


# How check_merge_path asks for the pieces' merge (PORTMLA_CUDA_TAIL_MERGE): the default (in the
# decode kernel, the launcher's pick), the grid-barrier merge only, the merge kernel.
TAILS = ["in-kernel", "barrier", "merge-kernel"]
_TAIL_ENV = {"in-kernel": None, "barrier": "barrier", "merge-kernel": "0"}
_TAIL_MODES = {0: "merge kernel", 1: "grid barrier", 2: "last piece",  # params.h TailMerge
               3: "counted pieces' merge kernel"}


def check_merge_path(monkeypatch, case, tail, single_token=True, tol=1e-2, eligible=True,
                     arrive=False, counted=False):
    """``case`` against the reference with the cut sequences' pieces merged the way ``tail``
    (TAILS) asks, and the module's record of the launch says the merge that ran: ``arrive``
    (a narrow Hopper kernel with the schedule kernel) takes the last-piece merge by default;
    otherwise the grid-barrier merge where the rows to merge come to at most 16 a CTA
    (``eligible``), else the merge kernel (which the profile of the call must show), polling
    the pieces' counts of the 16-bit pair kernel by default where ``counted``."""
    from torch.profiler import ProfilerActivity, profile

    from portmla.backends.cuda import load_module

    env = _TAIL_ENV[tail]
    if env is None:
        monkeypatch.delenv("PORTMLA_CUDA_TAIL_MERGE", raising=False)
    else:
        monkeypatch.setenv("PORTMLA_CUDA_TAIL_MERGE", env)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        got = run_both(case, single_token=single_token)
        torch.cuda.synchronize()
    merges = [e.name for e in prof.events()
              if e.device_type.name == "CUDA" and "combine_pieces" in e.name]
    check_decode(*got, tol=tol)
    if tail == "merge-kernel":
        want = 0
    else:
        want = 2 if arrive and tail == "in-kernel" else (1 if eligible else 0)
        want = 3 if want == 0 and counted and tail == "in-kernel" else want
    took = load_module()[0].last_tail_merge()
    assert took == want, f"merged by the {_TAIL_MODES[took]}, expected the {_TAIL_MODES[want]}"
    if want in (1, 2):
        assert not merges, f"a merge kernel ran: {merges[:2]}"
    else:
        assert merges, "no merge kernel ran (does the case cut any sequence?)"


def rel_err(a, b):
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def run_both(case, single_token):
    kw = dict(case)
    if single_token:
        kw["query_start_loc"] = None
    scale = (L + R) ** -0.5
    ref_out, ref_lse = pm.mla_decode(softmax_scale=scale, return_lse=True, backend="reference", **kw)
    out = torch.full_like(ref_out, float("nan"))
    got_out, got_lse = pm.mla_decode(softmax_scale=scale, return_lse=True, backend="cuda", out=out, **kw)
    return ref_out, ref_lse, got_out, got_lse


def check_output(ref_out, got_out, tol=2e-2):
    assert not torch.isnan(got_out).any(), "NaN in the cuda output"
    assert rel_err(got_out, ref_out) < tol, f"rel err {rel_err(got_out, ref_out):.3e}"


def check_decode(ref_out, ref_lse, got_out, got_lse, tol=2e-2):
    check_output(ref_out, got_out, tol)
    fin = torch.isfinite(ref_lse)
    assert torch.equal(fin, torch.isfinite(got_lse))
    torch.testing.assert_close(got_lse[fin], ref_lse[fin], atol=2e-2, rtol=1e-3)


def _check_ds_mla_close(a, b):
    """fp8_ds_mla caches written by two backends.

    The kernel computes the tile scale as the format states, amax / 448 (IEEE division).
    The torch reference on CUDA gets amax * (1/448) (torch divides by a python scalar through
    its reciprocal on CUDA, not on CPU), which can differ by one ulp; values next to an fp8
    rounding boundary then round the other way. So: k_pe bytes exact, scales within one ulp,
    and fp8 bytes equal except a few one-step neighbours.
    """
    tiles = L // 128
    sa = a[..., L:L + 4 * tiles].contiguous().view(torch.float32)
    sb = b[..., L:L + 4 * tiles].contiguous().view(torch.float32)
    torch.testing.assert_close(sa, sb, rtol=2.5e-7, atol=0, equal_nan=True)
    assert torch.equal(a[..., L + 4 * tiles:], b[..., L + 4 * tiles:]), "k_pe bytes differ"
    qa, qb = a[..., :L], b[..., :L]
    diff = qa != qb
    assert diff.float().mean().item() < 0.01, f"{diff.sum().item()} fp8 bytes differ"
    step = (qa[diff].int() - qb[diff].int()).abs()
    assert bool((step == 1).all()), "fp8 bytes differ by more than one step"


FORMATS = [("bfloat16", torch.bfloat16), ("float16", torch.float16), ("fp8", torch.bfloat16),
           ("fp8_ds_mla", torch.bfloat16), ("fp8", torch.float16), ("fp8_ds_mla", torch.float16)]


@pytest.mark.gpu
@pytest.mark.parametrize("fmt,dtype", FORMATS, ids=[f"{f}-{str(d)[6:]}" for f, d in FORMATS])
@pytest.mark.parametrize("block_size", [16, 64])
@pytest.mark.parametrize("num_heads", [16, 128])
def test_decode_single_token(fmt, dtype, block_size, num_heads):
    _need_cuda()
    case = make_decode_case([1, 77, 300, 33], [1, 1, 1, 1], num_heads, block_size, fmt, dtype, "cuda")
    check_decode(*run_both(case, single_token=True))


@pytest.mark.gpu
@pytest.mark.parametrize("fmt,dtype", FORMATS, ids=[f"{f}-{str(d)[6:]}" for f, d in FORMATS])
@pytest.mark.parametrize("num_heads,block_size", [(8, 32), (16, 128), (3, 1), (128, 64)])
def test_decode_varlen_causal(fmt, dtype, num_heads, block_size):
    _need_cuda()
    case = make_decode_case([5, 130, 0, 64, 9], [1, 3, 0, 4, 2], num_heads, block_size, fmt,
                            dtype, "cuda", strided=True)
    check_decode(*run_both(case, single_token=False))


@pytest.mark.gpu
@pytest.mark.parametrize("fmt", ["bfloat16", "fp8", "fp8_ds_mla"])
def test_decode_many_splits_and_one_head(fmt):
    _need_cuda()
    case = make_decode_case([5000, 17], [1, 1], 1, 64, fmt, torch.bfloat16, "cuda")
    check_decode(*run_both(case, single_token=True))


@pytest.mark.gpu
@pytest.mark.parametrize("variant", ["legacy", "narrow", "wide"])
@pytest.mark.parametrize("fmt,dtype", [("bfloat16", torch.bfloat16), ("fp8", torch.bfloat16),
                                       ("fp8_ds_mla", torch.float16)])
@pytest.mark.parametrize("min_chunk", [64, 512])
def test_decode_every_variant_and_chunking(monkeypatch, variant, fmt, dtype, min_chunk):
    """Each kernel variant, whatever the heads, with small split chunks (many splits, empty ones)."""
    _need_cuda()
    from portmla.backends import cuda as cuda_backend

    def forced(p, mod):
        code, bm, _, s16, s8, _ = mod.DECODE_VARIANTS[variant]
        fp8 = p.cache.kv_format not in ("bfloat16", "float16")
        return variant, code, bm, s8 if fp8 else s16

    monkeypatch.setattr(cuda_backend.CudaBackend, "decode_variant", staticmethod(forced))
    monkeypatch.setattr(cuda_backend, "MIN_SPLIT_CHUNK", min_chunk)
    monkeypatch.setattr(cuda_backend, "SPLIT_WAVES", 64)
    for heads, lens, qlens in ((128, [700, 5, 0, 1300], [2, 1, 0, 1]), (16, [2000, 33, 64], [1, 3, 1]),
                               (3, [129, 640], [1, 2])):
        case = make_decode_case(lens, qlens, heads, 64 if heads != 3 else 16, fmt, dtype, "cuda",
                                strided=heads == 16)
        check_decode(*run_both(case, single_token=False))


@pytest.mark.gpu
def test_decode_no_split_large_batch():
    _need_cuda()
    lens = [int(x) for x in torch.randint(1, 200, (70,))]
    case = make_decode_case(lens, [1] * 70, 128, 64, "bfloat16", torch.bfloat16, "cuda")
    check_decode(*run_both(case, single_token=True))


@pytest.mark.gpu
@pytest.mark.parametrize("seqs", [3, 40])
def test_decode_deterministic_and_graph_capture(seqs):
    """16 heads: on an H100 the narrow kernel, its schedule in the kernel (3 sequences) or from
    the schedule kernel with the last-piece merge's counters (40)."""
    _need_cuda()
    lens = [700, 1500, 40] if seqs == 3 else [int(x) for x in torch.randint(1, 3000, (seqs,))]
    case = make_decode_case(lens, [1] * seqs, 16, 64, "bfloat16", torch.bfloat16, "cuda")
    check_deterministic_and_graph(case, tol=2e-2)


def check_deterministic_and_graph(case, tol):
    """Two runs of ``case`` (single-token) bitwise equal; a graph captured once and replayed
    twice over shorter seq_lens (its schedule, split and counters from each replay's lengths)
    matches the reference within ``tol`` each time."""
    kw = dict(case, query_start_loc=None, softmax_scale=0.04, backend="cuda")
    a = pm.mla_decode(**kw)
    b = pm.mla_decode(**kw)
    assert torch.equal(a, b), "two runs differ"
    out = torch.empty_like(a)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        pm.mla_decode(out=out, **kw)  # warm-up outside capture
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        pm.mla_decode(out=out, **kw)
    lens = case["seq_lens"].clone()
    for cut in (8, 3):  # positions dropped: lens - lens / cut - (b % 5), at least 1
        new = lens - lens // cut - torch.arange(len(lens), dtype=lens.dtype, device=lens.device) % 5
        case["seq_lens"].copy_(new.clamp_min(1))
        out.fill_(float("nan"))
        g.replay()
        torch.cuda.synchronize()
        ref = pm.mla_decode(**dict(kw, backend="reference"))
        assert rel_err(out, ref) < tol, f"replay with lens - lens / {cut}"


@pytest.mark.gpu
@pytest.mark.parametrize("fmt,dtype", FORMATS + [("bfloat16", torch.float32)],
                         ids=[f"{f}-{str(d)[6:]}" for f, d in FORMATS + [("bfloat16", torch.float32)]])
@pytest.mark.parametrize("block_size", [1, 16, 64])
def test_cache_write_and_gather(fmt, dtype, block_size):
    _need_cuda()
    t, nb = 50, -(-60 // block_size) + 2
    kv_c = torch.randn(t, L, device="cuda", dtype=dtype) * 3
    k_pe = torch.randn(t, 1, R, device="cuda", dtype=dtype)
    slots = torch.randperm(nb * block_size, device="cuda")[:t]
    slots[3] = -1
    scale = 0.03 if fmt == "fp8" else None
    model = dtype if dtype != torch.float32 else torch.bfloat16
    caches = {}
    for backend in ("reference", "cuda"):
        c = make_cache(nb, block_size, fmt, model, "cuda", strided=block_size == 16)
        pm.concat_and_cache_mla(kv_c, k_pe, c, slots, fmt, scale, backend=backend)
        caches[backend] = c
    a = caches["cuda"].contiguous().view(torch.uint8)
    b = caches["reference"].contiguous().view(torch.uint8)
    if fmt != "fp8_ds_mla":
        assert torch.equal(a, b), f"{(a != b).sum().item()} cache bytes differ"
    else:
        _check_ds_mla_close(a, b)
    lens = torch.tensor([7, 0, 30], dtype=torch.int32, device="cuda")
    starts = torch.tensor([2, 0, 1], dtype=torch.int32, device="cuda")
    max_blocks = nb
    table = torch.stack([torch.randperm(nb, device="cuda")[:max_blocks] for _ in range(3)]).to(torch.int32)
    for st in (None, starts):
        for out_dtype in (torch.bfloat16, torch.float32):
            ref = pm.gather_cache(caches["cuda"], table, lens, kv_cache_dtype=fmt, scale=scale,
                                  out_dtype=out_dtype, seq_starts=st, backend="reference")
            got = pm.gather_cache(caches["cuda"], table, lens, kv_cache_dtype=fmt, scale=scale,
                                  out_dtype=out_dtype, seq_starts=st, backend="cuda")
            assert torch.equal(torch.isnan(got), torch.isnan(ref))
            torch.testing.assert_close(got, ref, atol=0, rtol=0, equal_nan=True)
