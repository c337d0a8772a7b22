"""Triton kernels vs the torch reference, on the CPU through Triton's interpreter.

Every op of the Triton backend is called through the public API with
``backend="triton"`` and compared with ``backend="reference"`` on small shapes: every KV
format, block sizes 1 / 16 / 48 / 64, padded and cross-layer caches, varlen query tokens,
NaN-poisoned unused cache slots and output buffers. On a GPU the same tests run on the
device (``PORTMLA_TEST_DEVICE=cuda``).
"""

from __future__ import annotations

import dataclasses
import itertools
import os

# conftest.py turns on TRITON_INTERPRET=1 on machines without a GPU (and only there)
import pytest  # noqa: E402
import torch  # noqa: E402

triton = pytest.importorskip("triton", reason="triton is not importable")

import mla_cases  # noqa: E402
from conftest import device_under_test  # noqa: E402
from mla_cases import force_decode_config  # noqa: E402

import portmla as pm  # noqa: E402
from portmla.dispatch import get_backend  # noqa: E402
from portmla.kv_formats import quantize_entries  # noqa: E402

DEV = str(device_under_test())
L, R = 512, 64
FMTS = ("bfloat16", "float16", "fp8", "fp8_ds_mla")
PLAT = pm.current_platform(DEV)

if DEV == "cpu" and os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
    pytest.skip("TRITON_INTERPRET=0 on a CPU machine: the Triton backend cannot run",
                allow_module_level=True)


def _gen(seed):
    g = torch.Generator(device="cpu")
    g.manual_seed(seed)
    return g


def _entry(fmt):
    return pm.kv_cache_shape(1, 1, fmt)[2]


def make_cache(num_blocks, page, fmt, layout):
    """A poisoned cache of ``layout``; ``padded`` pads tokens by 3 elements (unaligned rows)."""
    return mla_cases.make_cache(num_blocks, page, fmt, torch.bfloat16, DEV, layout, L, R,
                                entry_pad=3)


def fill_cache(cache, fmt, block_table, seq_lens, scale, g):
    """Write random values for every used position with the reference writer."""
    page = cache.shape[1]
    n = int(sum(seq_lens))
    kv_c = torch.randn(n, L, generator=g).to(DEV, torch.bfloat16)
    k_pe = torch.randn(n, R, generator=g).to(DEV, torch.bfloat16)
    slots = []
    for b, s in enumerate(seq_lens):
        for pos in range(s):
            slots.append(int(block_table[b, pos // page]) * page + pos % page)
    slots = torch.tensor(slots, dtype=torch.int64, device=DEV)
    pm.concat_and_cache_mla(kv_c, k_pe, cache, slots, fmt, scale, backend="reference")


def make_table(num_seqs, seq_lens, page, extra_cols, g):
    need = [(s + page - 1) // page for s in seq_lens]
    cols = max(need) + extra_cols
    total = sum(need)
    num_blocks = total + 3
    perm = torch.randperm(num_blocks, generator=g)[:total].tolist()
    bt = torch.full((num_seqs, cols), -1, dtype=torch.int32)  # unused entries: invalid ids
    i = 0
    for b, k in enumerate(need):
        bt[b, :k] = torch.tensor(perm[i:i + k], dtype=torch.int32)
        i += k
    return bt.to(DEV), num_blocks


def _close(a, b, tol, what):
    err = mla_cases.rel_err(a, b)  # inf when anything is NaN
    assert err < tol, f"{what}: relative error {err:.3g} >= {tol}"


# ------------------------------------------------------------------------------ probe


def test_backend_is_available_and_declares_capabilities():
    info = pm.probe(DEV)["triton"]
    assert info.available, info.reasons
    assert info.block_sizes == (1, 2, 4, 8, 16, 32, 64, 128, 256)
    assert set(info.kv_cache_dtypes) == set(FMTS)
    assert info.returns_lse and info.strided_kv and info.cuda_graphs


def test_cpu_without_interpreter_gives_a_reason(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    why = get_backend("triton").availability(pm.current_platform("cpu"))
    assert why and why[0].code == "platform" and "TRITON_INTERPRET=1" in why[0].message


# ----------------------------------------------------------------------------- decode

DECODE_CASES = [
    # fmt, page, heads, query lens (None = one token each), layout
    ("bfloat16", 16, 16, None, "contiguous"),
    ("bfloat16", 1, 4, None, "padded"),
    ("bfloat16", 48, 16, [1, 3, 0, 2], "cross_layer"),
    ("bfloat16", 64, 128, [1, 2], "contiguous"),
    ("float16", 16, 8, [2, 1, 4], "padded"),
    ("fp8", 16, 16, None, "cross_layer"),
    ("fp8", 48, 16, [3, 1], "contiguous"),
    ("fp8_ds_mla", 16, 16, None, "padded"),
    ("fp8_ds_mla", 64, 16, [1, 2, 1], "contiguous"),
    ("fp8_ds_mla", 1, 2, [2, 1], "cross_layer"),
]


@pytest.mark.parametrize("path", ["split", "sched"])
@pytest.mark.parametrize("fmt,page,heads,qlens,layout", DECODE_CASES)
def test_mla_decode(fmt, page, heads, qlens, layout, path, monkeypatch):
    launches = force_decode_config(monkeypatch, path == "sched")
    g = _gen(hash((fmt, page, heads, layout)) % 1000)
    nseq = len(qlens) if qlens else 3
    qlens_ = qlens or [1] * nseq
    seq_lens = [int(x) for x in torch.randint(1, 90, (nseq,), generator=g)]
    seq_lens = [max(s, q) for s, q in zip(seq_lens, qlens_)]
    seq_lens[0] = max(seq_lens[0], 70)  # several KV splits
    bt, nb = make_table(nseq, seq_lens, page, 2, g)
    cache = make_cache(nb, page, fmt, layout)
    scale = 0.05 if fmt == "fp8" else None
    fill_cache(cache, fmt, bt, seq_lens, scale, g)
    t = sum(qlens_)
    dtype = torch.float16 if fmt == "float16" else torch.bfloat16
    q = torch.randn(t, heads, L + R, generator=g).to(DEV, dtype)
    qsl = None
    if qlens:
        qsl = torch.tensor([0] + torch.tensor(qlens).cumsum(0).tolist(), dtype=torch.int32,
                           device=DEV)
    sl = torch.tensor(seq_lens, dtype=torch.int32, device=DEV)
    kw = dict(softmax_scale=0.07, kv_cache_dtype=fmt, k_scale=scale, query_start_loc=qsl,
              return_lse=True)
    out = torch.full((t, heads, L), float("nan"), dtype=dtype, device=DEV)
    o_tri, l_tri = pm.mla_decode(q, cache, bt, sl, out=out, backend="triton", **kw)
    o_ref, l_ref = pm.mla_decode(q, cache, bt, sl, backend="reference", **kw)
    assert o_tri.data_ptr() == out.data_ptr()
    assert len(launches) == (path == "sched")
    # fp8_ds_mla on >= 32-row tiles: the kernel rounds fp8 * tile-scale to bf16 before the dot
    _close(o_tri, o_ref, 2e-2 if fmt == "fp8_ds_mla" else 1e-2, "out")
    atol = 3e-2 if fmt == "fp8_ds_mla" else 2e-3
    assert torch.allclose(l_tri, l_ref, atol=atol, rtol=1e-3), (l_tri - l_ref).abs().max()


@pytest.mark.parametrize("spread", [1e-3, 1.0, 30.0])
def test_mla_decode_ds_exact_path(spread):
    """fp8_ds_mla on 16-row tiles runs fp16 dots of the raw e4m3 values with the tile scales
    on the fp32 scores / P: as close to the reference as the 16-bit formats, for tiny and
    large tile scales (P * scale is normalised per KV tile, so it never underflows fp16)."""
    torch.manual_seed(5)
    case = mla_cases.make_decode_case([70, 33, 1], [1, 2, 1], heads=4, block_size=16, fmt="fp8_ds_mla",
                                      layout="padded", device=DEV, spread=spread)
    o_tri, l_tri = mla_cases.decode(case, "triton")
    o_ref, l_ref = mla_cases.decode(case, "reference")
    _close(o_tri, o_ref, 1e-2, "out")
    assert torch.allclose(l_tri, l_ref, atol=2e-3, rtol=1e-3), (l_tri - l_ref).abs().max()


@pytest.mark.parametrize("gain", [(1e-3, 30.0), (1e-6, 1e2), (1e-20, 1e20)])
@pytest.mark.parametrize("quant_read", ["pairs_once", "pairs_once_fold"])
def test_mla_decode_ds_tile_scales_spread(gain, quant_read, monkeypatch):
    """fp8_ds_mla tile scales spread over many decades, per token and 128-wide tile (inside
    each KV tile and from one KV tile to the next, 40 decades in the last case): the 16-row
    tile's P @ V normalisers ("pairs_once": the KV tile's largest scale on the fp32 dot;
    "pairs_once_fold": a power of two folded into the accumulators' rescale) keep the output
    at the 16-bit formats' tolerance."""
    force_decode_config(monkeypatch, True, 3, 1, quant_read=quant_read)
    torch.manual_seed(11)
    case = mla_cases.make_decode_case([70, 33, 1, 50], [1, 2, 1, 1], heads=4, block_size=16, fmt="fp8_ds_mla",
                                      layout="contiguous", device=DEV, tile_gain=gain)
    o_tri, l_tri = mla_cases.decode(case, "triton")
    o_ref, l_ref = mla_cases.decode(case, "reference")
    _close(o_tri, o_ref, 1e-2, "out")
    assert torch.allclose(l_tri, l_ref, atol=2e-3, rtol=1e-3), (l_tri - l_ref).abs().max()


@pytest.mark.parametrize("quant_read", ["pairs_once", "pairs_once_fold"])
def test_mla_decode_ds_tile_scales_fall(quant_read, monkeypatch):
    """A sequence's tile scales falling by 40 decades after its first KV tiles (10^15 -> 10^-25):
    "pairs_once_fold" keeps each KV tile's normaliser within 2^-64 of the largest scale seen, so
    the accumulator (in units of that normaliser) does not overflow float32."""
    force_decode_config(monkeypatch, True, 3, 1, quant_read=quant_read)

    def gain(pos, tiles):
        return torch.where(pos < 20, 1e15, 1e-25)[:, None].expand(-1, tiles)

    torch.manual_seed(12)
    case = mla_cases.make_decode_case([70, 90], [1, 1], heads=4, block_size=16, fmt="fp8_ds_mla",
                                      layout="contiguous", device=DEV, tile_gain=gain)
    o_tri, l_tri = mla_cases.decode(case, "triton")
    o_ref, l_ref = mla_cases.decode(case, "reference")
    _close(o_tri, o_ref, 1e-2, "out")
    assert torch.allclose(l_tri, l_ref, atol=2e-3, rtol=1e-3), (l_tri - l_ref).abs().max()


def test_mla_decode_capture_bound_max_query_len_and_no_lse():
    """A loose max_query_len (as inside graph capture) only adds empty row tiles."""
    g = _gen(7)
    page, heads = 16, 16
    seq_lens = [37, 5]
    bt, nb = make_table(2, seq_lens, page, 1, g)
    cache = make_cache(nb, page, "bfloat16", "contiguous")
    fill_cache(cache, "bfloat16", bt, seq_lens, None, g)
    q = torch.randn(3, heads, L + R, generator=g).to(DEV, torch.bfloat16)
    qsl = torch.tensor([0, 2, 3], dtype=torch.int32, device=DEV)
    sl = torch.tensor(seq_lens, dtype=torch.int32, device=DEV)
    kw = dict(softmax_scale=0.1, query_start_loc=qsl)
    o_tri = pm.mla_decode(q, cache, bt, sl, backend="triton", max_query_len=5, **kw)
    o_ref = pm.mla_decode(q, cache, bt, sl, backend="reference", **kw)
    _close(o_tri, o_ref, 1e-2, "out")


def test_mla_decode_tuple_q_matches_concatenated():
    g = _gen(11)
    seq_lens = [20, 33]
    bt, nb = make_table(2, seq_lens, 16, 0, g)
    cache = make_cache(nb, 16, "bfloat16", "contiguous")
    fill_cache(cache, "bfloat16", bt, seq_lens, None, g)
    q = torch.randn(2, 4, L + R, generator=g).to(DEV, torch.bfloat16)
    sl = torch.tensor(seq_lens, dtype=torch.int32, device=DEV)
    a = pm.mla_decode((q[..., :L], q[..., L:]), cache, bt, sl, softmax_scale=0.1, backend="triton")
    b = pm.mla_decode(q, cache, bt, sl, softmax_scale=0.1, backend="triton")
    assert torch.equal(a, b)


# ------------------------------------------------------------ device split schedule


def schedule_model(lens, parts, fixed, unit):
    """The schedule of ``portmla/backends/triton/schedule.py`` in Python: (cum + [T], first
    slot per sequence, pieces per sequence, slots used). The cut list is the sequences with
    more than one piece, in order."""
    units = [-(-max(s, 0) // unit) + fixed for s in lens]
    cum = [0, *itertools.accumulate(units)]
    per = max(1, -(-cum[-1] // parts))
    first_slot, pieces, used = [], [], 0
    for b, u in enumerate(units):
        f, n = cum[b] + fixed, u - fixed
        k = (f + n - 1) // per - f // per + 1 if n > 0 else 1
        pieces.append(k)
        first_slot.append(used if k > 1 else -1)
        used += k if k > 1 else 0
    return cum + [per], first_slot, pieces, used


@pytest.mark.parametrize("lens,parts,fixed,unit,want_cuts", [
    ([70, 0, 33, 1, 50], 3, 1, 16, None),
    ([3, 17], 40, 2, 16, 1),  # more parts than units: empty parts, every multi-tile sequence cut
    ([16] * 4, 4, 1, 16, 0),  # boundaries only between sequences: parts > 1, no cut
    ([90], 1, 1, 16, 0),  # one part: nothing cut, a count-only list
    ([40, 36, 44, 64], 5, 1, 4, 4),  # every sequence cut, the list full (B = parts - 1)
    ([5] * 3000, 7, 4, 64, None),  # three chunks of the scan (carry across chunks)
    ([9] * 3000, 2000, 1, 1, None),  # > 1024 sequences, cuts in every chunk (the count's carry)
    ([2**31 - 1] * 5 + [0, 9], 132, 4, 1, None),  # unit prefix beyond 2^31 (int64)
])
def test_schedule_kernel_matches_model(lens, parts, fixed, unit, want_cuts):
    from portmla.backends.triton import schedule as tsched

    g = _gen(len(lens))
    if len(lens) > 1000:  # a varlen mix for the long cases
        lens = [int(x) for x in torch.randint(0, 2 * lens[0] * unit, (len(lens),), generator=g)]
    sl = torch.tensor(lens, dtype=torch.int32, device=DEV)
    cum, piece, cut = tsched.sched_scratch(len(lens), parts, DEV)
    piece.fill_(-7)
    cut.fill_(-7)
    tsched.launch_schedule(sl, cum, piece, cut, parts, fixed, unit, 4)
    want_cum, want_first, want_pieces, used = schedule_model(lens, parts, fixed, unit)
    assert cum.tolist() == want_cum
    assert piece[0::2].tolist() == want_first
    assert piece[1::2].tolist() == want_pieces
    assert used <= tsched.num_slots(parts)
    want_list = [b for b, k in enumerate(want_pieces) if k > 1]
    assert want_cuts is None or len(want_list) == want_cuts
    assert len(cut) == 1 + tsched.max_cuts(len(lens), parts) >= 1 + len(want_list)
    n = int(cut[0])
    assert n == len(want_list)
    assert cut[1:1 + n].tolist() == want_list
    assert (cut[1 + n:] == -7).all()  # entries past the count are not written


# fmt, page, heads, seq lens, query lens (None: one each), parts, fixed, block_m (None: default),
# return_lse. Pages 1 / 24 / 40 do not hold whole 16-token tiles; block_m 16 with several query
# tokens gives one row tile per token, so with many parts some pieces see no position of
# their rows (empty pieces); 0-length sequences have no query token.
SCHED_CASES = [
    ("bfloat16", 16, 16, [70, 33, 1, 50], None, 3, 1, None, True),
    ("bfloat16", 24, 16, [49, 33, 65], [3, 2, 3], 40, 1, 16, True),
    ("bfloat16", 16, 4, [0, 45, 0, 30, 7], [0, 2, 0, 1, 0], 3, 1, None, True),
    ("bfloat16", 16, 16, [300], None, 40, 2, None, True),  # b=1: one sequence in 40 pieces
    ("bfloat16", 64, 128, [70, 90], [1, 2], 3, 1, None, False),  # 64-row tiles, 4 row tiles
    ("float16", 24, 8, [90, 5, 41], [2, 1, 3], 1, 2, None, False),
    ("float16", 1, 8, [90, 5, 41], [2, 1, 3], 3, 1, None, True),
    ("fp8", 16, 16, [70, 20, 64, 3], None, 40, 2, None, True),
    ("fp8", 1, 4, [37, 12], [2, 3], 3, 1, None, False),
    ("fp8_ds_mla", 16, 16, [70, 33, 1], None, 3, 1, None, True),  # exact path
    ("fp8_ds_mla", 40, 8, [60, 45, 9], [2, 1, 2], 40, 1, 16, True),  # exact path, 2 row tiles
    ("fp8_ds_mla", 64, 32, [70, 33], [1, 2], 1, 3, None, False),  # dequantized (64-row) path
]


@pytest.mark.parametrize("fmt,page,heads,lens,qlens,parts,fixed,block_m,lse", SCHED_CASES)
def test_mla_decode_scheduled(fmt, page, heads, lens, qlens, parts, fixed, block_m, lse, monkeypatch):
    launches = force_decode_config(monkeypatch, True, parts, fixed, block_m)
    case = mla_cases.make_decode_case(lens, qlens or [1] * len(lens), heads=heads, block_size=page,
                                      fmt=fmt, layout="padded" if page % 2 else "contiguous",
                                      device=DEV, model_dtype=torch.float16 if fmt == "float16"
                                      else torch.bfloat16)
    out = torch.full((case.q.shape[0], heads, L), float("nan"), dtype=case.q.dtype, device=DEV)
    got = mla_cases.decode(case, "triton", return_lse=lse, out=out)
    ref = mla_cases.decode(case, "reference", return_lse=lse)
    assert launches == [(parts, fixed)]
    rows = max(qlens or [1]) * heads
    exact = fmt != "fp8_ds_mla" or (block_m or min(64, max(16, triton.next_power_of_2(rows)))) < 32
    o_tri, o_ref = (got[0], ref[0]) if lse else (got, ref)
    _close(o_tri, o_ref, 1e-2 if exact else 2e-2, "out")
    if lse:
        atol = 2e-3 if exact else 3e-2
        assert torch.allclose(got[1], ref[1], atol=atol, rtol=1e-3), (got[1] - ref[1]).abs().max()


# fmt, layout, lora, block_m (None: default), scheduled. Contiguous, cross-layer and padded
# caches are aligned (the "pairs" reads run); "padded3" pads tokens by 3 elements, unaligned
# (it reads "twice"); lora 384 leaves columns of the 512-wide tile (and one fp8_ds_mla scale
# tile) empty; block_m 64 is the dequantizing fp8_ds_mla path ("once" applies, "pairs" does not).
QUANT_CASES = [
    ("fp8", "contiguous", 512, None, True),
    ("fp8", "cross_layer", 384, None, False),
    ("fp8", "padded", 512, None, True),
    ("fp8", "padded3", 512, None, True),
    ("fp8_ds_mla", "contiguous", 512, None, True),
    ("fp8_ds_mla", "cross_layer", 384, None, False),
    ("fp8_ds_mla", "padded", 512, None, False),
    ("fp8_ds_mla", "padded3", 512, None, True),
    ("fp8_ds_mla", "contiguous", 512, 64, True),
]


@pytest.mark.parametrize("quant_read", ["twice", "once", "pairs", "pairs_once", "pairs_once_fold"])
@pytest.mark.parametrize("fmt,layout,lora,block_m,scheduled", QUANT_CASES)
def test_mla_decode_quant_read_variants(fmt, layout, lora, block_m, scheduled, quant_read, monkeypatch):
    """Every ``DecodeConfig.quant_read`` (and a register cap) forced on the quantized tiles:
    the same results as the reference at each path's tolerance."""
    from portmla.backends.triton.launch import QUANT_READS

    assert quant_read in QUANT_READS
    launches = force_decode_config(monkeypatch, scheduled, 3 if scheduled else None, 1 if scheduled else None,
                                   block_m, quant_read=quant_read, maxnreg=168)
    case = mla_cases.make_decode_case([70, 33, 1, 50], [1, 2, 1, 1], heads=8, block_size=16, fmt=fmt,
                                      layout=layout.removesuffix("3"), device=DEV, lora=lora,
                                      entry_pad=3 if layout == "padded3" else 16)
    out = torch.full((case.q.shape[0], 8, lora), float("nan"), dtype=case.q.dtype, device=DEV)
    got_o, got_l = mla_cases.decode(case, "triton", out=out)
    ref_o, ref_l = mla_cases.decode(case, "reference")
    assert len(launches) == scheduled
    exact = fmt != "fp8_ds_mla" or block_m is None
    _close(got_o, ref_o, 1e-2 if exact else 2e-2, "out")
    atol = 2e-3 if exact else 3e-2
    assert torch.allclose(got_l, ref_l, atol=atol, rtol=1e-3), (got_l - ref_l).abs().max()


def test_mla_decode_quant_read_rejects_unknown(monkeypatch):
    force_decode_config(monkeypatch, True, quant_read="thrice")
    case = mla_cases.make_decode_case([20], [1], heads=4, fmt="fp8", device=DEV)
    with pytest.raises(ValueError, match="quant_read='thrice' \\(supported: twice, once, pairs, pairs_once, pairs_once_fold\\)"):
        mla_cases.decode(case, "triton")


def test_gluon_kernel_choice(monkeypatch):
    """Where ``decode_config`` picks the Hopper Gluon kernel (decode_gluon.py; its GPU tests are
    tests/test_triton_gluon.py): sm_90, 64-row tiles of a 16-bit cache with L = 512, a tested
    Triton release (or PORTMLA_TRITON_GLUON=1), never under the interpreter or with =0."""
    from portmla.backends.triton import decode_gluon
    from portmla.backends.triton import launch as tlaunch

    if not decode_gluon.HAVE_GLUON:
        pytest.skip("this Triton has no Gluon")
    hopper = dataclasses.replace(PLAT, kind="cuda", capability=(9, 0), num_compute_units=132,
                                 shared_memory_per_block=232448)
    monkeypatch.setattr(tlaunch, "interpreting", lambda: False)
    monkeypatch.setattr(decode_gluon, "triton_tested", lambda: True)
    monkeypatch.delenv("PORTMLA_TRITON_GLUON", raising=False)

    def pick(plat=hopper, heads=128, fmt="bfloat16", lora=512):
        return tlaunch.decode_config(plat, 8, heads, 1, 4096, fmt, lora)

    assert pick().gluon and pick().sched_fixed == 4 and pick(fmt="float16").gluon
    assert pick(fmt="fp8").gluon and pick(fmt="fp8").block_n == 64  # the quantized Triton tile is 32
    assert not pick(dataclasses.replace(hopper, fp8_dtype=torch.float8_e4m3fnuz), fmt="fp8").gluon
    assert not pick(heads=16).gluon and not pick(fmt="fp8_ds_mla").gluon
    kernels = get_backend("triton").kernels(hopper)  # probe() / info say so
    assert "Gluon kernel (TMA" in kernels[0] and "fp8" in kernels[0] and "other calls" in kernels[1]
    assert "PORTMLA_TRITON_GLUON_NARROW=1" in kernels[1]
    # 16 rows of a quantized cache, opted in: the narrow Gluon kernel (decode_gluon_narrow), one CTA an SM
    assert not pick(heads=16, fmt="fp8_ds_mla").gluon and not pick(heads=16, fmt="fp8").gluon
    monkeypatch.setenv("PORTMLA_TRITON_GLUON_NARROW", "1")
    narrow = pick(heads=16, fmt="fp8_ds_mla")
    assert narrow.gluon and narrow.block_m == 16 and narrow.block_n == 64 and narrow.num_warps == 4
    assert narrow.parts == hopper.num_compute_units and pick(heads=16, fmt="fp8").gluon
    assert not pick(dataclasses.replace(hopper, fp8_dtype=torch.float8_e4m3fnuz), heads=16, fmt="fp8").gluon
    assert not pick(heads=32, fmt="fp8_ds_mla").gluon and not pick(heads=16, fmt="fp8_ds_mla", lora=256).gluon
    # 17..32 rows: the Gluon kernel's 64-row tile where it takes the cache and the batch has more
    # than 8 sequences, else 16-row tiles
    wide = tlaunch.decode_config(hopper, 9, 32, 1, 4096, "fp8", 512)
    assert wide.block_m == 64 and wide.gluon and tlaunch.decode_config(hopper, 64, 16, 2, 4096, "bfloat16", 512).gluon
    assert pick(heads=32, fmt="fp8").block_m == 16 and pick(heads=32).block_m == 16  # 8 sequences
    assert tlaunch.decode_config(hopper, 64, 32, 1, 4096, "fp8_ds_mla", 512).row_tiles == 2
    assert tlaunch.decode_config(hopper, 64, 24, 1, 4096, "bfloat16", 256).block_m == 16
    assert pick(heads=64).block_m == 64
    assert not pick(lora=256).gluon
    assert not pick(dataclasses.replace(hopper, capability=(8, 0))).gluon
    assert not pick(dataclasses.replace(hopper, capability=(10, 0))).gluon
    kernels = get_backend("triton").kernels(hopper)  # probe() / info say so
    assert "Gluon kernel (TMA" in kernels[0] and "fp8" in kernels[0] and "fp8_ds_mla" in kernels[1]
    assert "other calls" in kernels[2]
    monkeypatch.delenv("PORTMLA_TRITON_GLUON_NARROW")
    assert "Gluon" not in " ".join(get_backend("triton").kernels(dataclasses.replace(hopper, capability=(8, 0))))
    monkeypatch.setenv("PORTMLA_TRITON_GLUON", "0")
    assert not pick().gluon
    assert "Gluon kernel is off: PORTMLA_TRITON_GLUON=0" in get_backend("triton").kernels(hopper)[0]
    monkeypatch.setattr(decode_gluon, "triton_tested", lambda: False)
    monkeypatch.delenv("PORTMLA_TRITON_GLUON")
    assert not pick().gluon
    assert "not a tested release" in get_backend("triton").kernels(hopper)[0]
    monkeypatch.setenv("PORTMLA_TRITON_GLUON", "1")
    assert pick().gluon


def test_pdl_choice(monkeypatch):
    """Programmatic dependent launch of the scheduled decode's kernels (GPU tests:
    tests/test_triton_pdl.py): CUDA sm_90+ only, never under the interpreter or with
    PORTMLA_TRITON_PDL=0; probe() / info say so."""
    from portmla.backends.triton import launch as tlaunch

    hopper = dataclasses.replace(PLAT, kind="cuda", capability=(9, 0), num_compute_units=132,
                                 shared_memory_per_block=232448)
    monkeypatch.delenv("PORTMLA_TRITON_PDL", raising=False)
    monkeypatch.setattr(tlaunch, "interpreting", lambda: True)
    assert not tlaunch.use_pdl(hopper)
    monkeypatch.setattr(tlaunch, "interpreting", lambda: False)
    assert tlaunch.use_pdl(hopper) and tlaunch.use_pdl(dataclasses.replace(hopper, capability=(10, 0)))
    assert not tlaunch.use_pdl(dataclasses.replace(hopper, capability=(8, 9)))
    assert not tlaunch.use_pdl(dataclasses.replace(hopper, kind="rocm"))
    assert "programmatic dependent launch" in get_backend("triton").kernels(hopper)[-1]
    monkeypatch.setenv("PORTMLA_TRITON_PDL", "0")
    assert not tlaunch.use_pdl(hopper)
    assert "programmatic" not in " ".join(get_backend("triton").kernels(hopper))


def test_gluon_kernel_eligible_layouts():
    """The layouts the Gluon kernel takes (TMA: 16-byte strides and bases, the page stride a
    multiple of the token stride), host-side checks only."""
    from portmla.backends.triton import decode_gluon as dg

    if not dg.HAVE_GLUON:
        pytest.skip("this Triton has no Gluon")
    q = torch.zeros(3, 128, 576, dtype=torch.bfloat16)
    kv = torch.zeros(10, 64, 576, dtype=torch.bfloat16)
    assert dg.eligible(q, kv, 64, 512, 64)
    assert dg.eligible(q, kv[:, :, :], 64, 512, 64) and dg.kv_rows(kv) == 640
    padded = torch.zeros(10, 65, 592, dtype=torch.bfloat16)[:, :64, :576]
    assert dg.eligible(q, padded, 64, 512, 64) and dg.kv_rows(padded) == 9 * 65 + 64
    cross = torch.zeros(10, 3, 64, 576, dtype=torch.bfloat16)[:, 1]
    assert dg.eligible(q, cross, 64, 512, 64) and dg.kv_rows(cross) == 9 * 192 + 64
    for bs in (8, 16, 32, 128, 256):
        assert dg.eligible(q, torch.zeros(4, bs, 576, dtype=torch.bfloat16), bs, 512, 64)
    odd = torch.zeros(10, 64, 579, dtype=torch.bfloat16)[:, :, :576]  # token stride 579: not 16 B
    assert not dg.eligible(q, odd, 64, 512, 64)
    assert not dg.eligible(q, torch.zeros(4, 48, 576, dtype=torch.bfloat16), 48, 512, 64)  # block 48
    assert not dg.eligible(q, torch.zeros(4, 4, 576, dtype=torch.bfloat16), 4, 512, 64)
    assert not dg.eligible(q.half(), kv, 64, 512, 64)  # q and cache dtypes differ
    assert dg.eligible(torch.zeros(2, 48, 576, dtype=torch.bfloat16), kv, 64, 512, 64)
    assert not dg.eligible(torch.zeros(1, 48, 576, dtype=torch.bfloat16), kv, 64, 512, 64)  # < 64 rows in all
    assert not dg.eligible(q[:, :, :544], torch.zeros(10, 64, 544, dtype=torch.bfloat16), 64, 512, 32)
    assert not dg.eligible(torch.zeros(3, 128, 600, dtype=torch.bfloat16)[:, :, :576], kv, 64, 512, 64)
    fp8 = torch.zeros(10, 64, 576, dtype=torch.float8_e4m3fn)
    assert dg.eligible(q, fp8, 64, 512, 64) and dg.eligible(q.half(), fp8, 64, 512, 64)
    assert dg.eligible(q, torch.zeros(10, 65, 592, dtype=torch.float8_e4m3fn)[:, :64, :576], 64, 512, 64)
    assert not dg.eligible(q, torch.zeros(10, 64, 584, dtype=torch.float8_e4m3fn)[:, :, :576], 64, 512, 64)
    assert not dg.eligible(q, torch.zeros(10, 64, 656, dtype=torch.uint8), 64, 512, 64)  # fp8_ds_mla bytes
    shifted = torch.zeros(10 * 64 * 576 + 4, dtype=torch.bfloat16)[4:].view(10, 64, 576)  # base 8 B off
    assert not dg.eligible(q, shifted, 64, 512, 64)


def test_narrow_gluon_kernel_eligible_layouts():
    """The narrow Gluon kernel's host-side checks (fp8 / fp8_ds_mla caches of 16-row tiles)."""
    from portmla.backends.triton import decode_gluon_narrow as dn

    if not dn.HAVE_GLUON:
        pytest.skip("this Triton has no Gluon")
    q = torch.zeros(3, 16, 576, dtype=torch.bfloat16)
    ds = torch.zeros(10, 64, 656, dtype=torch.uint8)
    assert dn.eligible(q, ds, True, 64, 512, 64) and not dn.eligible(q.half(), ds, True, 64, 512, 64)
    assert dn.eligible(q[:, :, :], torch.zeros(10, 65, 672, dtype=torch.uint8)[:, :64, :656], True, 64, 512, 64)
    assert not dn.eligible(q, torch.zeros(10, 65, 664, dtype=torch.uint8)[:, :64, :656], True, 64, 512, 64)
    assert dn.eligible(q, torch.zeros(10, 3, 16, 656, dtype=torch.uint8)[:, 1], True, 16, 512, 64)
    assert not dn.eligible(q, torch.zeros(10, 48, 656, dtype=torch.uint8), True, 48, 512, 64)  # block 48
    assert not dn.eligible(q, ds, False, 64, 512, 64)  # a 656-byte entry is not per-tensor fp8's
    fp8 = torch.zeros(10, 64, 576, dtype=torch.float8_e4m3fn)
    assert dn.eligible(q, fp8, False, 64, 512, 64) and dn.eligible(q.half(), fp8, False, 64, 512, 64)
    assert dn.eligible(q, fp8.view(torch.uint8), False, 64, 512, 64)
    assert not dn.eligible(q, torch.zeros(10, 64, 576, dtype=torch.bfloat16), False, 64, 512, 64)
    assert not dn.eligible(q, torch.zeros(10, 64, 528, dtype=torch.uint8), True, 64, 384, 64)  # L = 384


@pytest.mark.parametrize("pieces,block_r,block_s,block_d", [(5, 2, 8, 32), (37, 2, 8, 32), (70, 1, 64, 128),
                                                             (130, 1, 128, 64)])
def test_pieces_combine_matches_float64(pieces, block_r, block_s, block_d):
    """The pieces combine against float64 math on one cut sequence (sequence 1 of 3, two query
    tokens, 4 heads): pieces in one or several steps of BLOCK_S (both the max pass and the
    weighted sum), pieces with LSE -inf NaN-poisoned and not read, a row no piece saw giving
    0 and -inf; the other sequences' output rows are left as they were."""
    from portmla.backends.triton.combine import _combine_pieces_kernel

    g = _gen(pieces)
    h, rows, lc, first = 4, 8, 64, 2
    pl = torch.randn(first + pieces + 1, rows, generator=g, dtype=torch.float64) * 4
    pl[first + torch.randint(0, pieces, (rows,), generator=g), torch.arange(rows)] = float("-inf")
    pl[first:first + pieces, 5] = float("-inf")  # row 5: no piece saw a position
    po = torch.randn(first + pieces + 1, rows, lc, generator=g, dtype=torch.float64)
    po[torch.isinf(pl)] = float("nan")
    piece = torch.tensor([-1, 1, first, pieces, -1, 1], dtype=torch.int32, device=DEV)
    cut = torch.tensor([1, 1], dtype=torch.int32, device=DEV)
    qsl = torch.tensor([0, 1, 3, 4], dtype=torch.int32, device=DEV)
    out = torch.full((4, h, lc), float("nan"), dtype=torch.float32, device=DEV)
    lse = torch.full((4, h), float("nan"), dtype=torch.float32, device=DEV)
    _combine_pieces_kernel[(rows // block_r, 1, -(-lc // block_d))](
        po.float().to(DEV), pl.float().to(DEV), rows, piece, cut, qsl, out, out.stride(0), out.stride(1), lse,
        lse.stride(0), h, L=lc, BLOCK_R=block_r, BLOCK_S=block_s, BLOCK_D=block_d, HAS_QSL=True, WRITE_LSE=True)
    ls, os_ = pl[first:first + pieces].float().double(), po[first:first + pieces].float().double()
    want_lse = torch.logsumexp(ls, 0)  # [rows]
    w = torch.exp(ls - want_lse).nan_to_num(0.0)
    want = (w[:, :, None] * os_.nan_to_num(0.0)).sum(0)
    want[5] = 0.0
    got, got_lse = out.cpu().double()[1:3].reshape(rows, lc), lse.cpu().double()[1:3].reshape(rows)
    assert torch.allclose(got, want, atol=1e-5, rtol=1e-5), (got - want).abs().max()
    assert torch.equal(torch.isinf(got_lse), torch.isinf(want_lse)) and got_lse[5] == float("-inf")
    fin = torch.isfinite(want_lse)
    assert torch.allclose(got_lse[fin], want_lse[fin], atol=1e-5, rtol=1e-6)
    assert torch.isnan(out[0]).all() and torch.isnan(out[3]).all() and torch.isnan(lse[[0, 3]]).all()


def test_pieces_combine_tiles():
    """The pieces combine's tile: at most ~8192 values a program; a few sequences in many pieces
    get one step covering their pieces (up to 128); more sequences keep the split combine's
    shapes."""
    from portmla.backends.triton.combine import combine_blocks, pieces_combine_blocks

    for parts, seqs, rows in itertools.product((4, 66, 132, 264), (1, 3, 8, 33, 64, 128), (16, 128, 256)):
        r, s, d = pieces_combine_blocks(parts, seqs, rows, 512)
        assert r * s * d <= 8192 and d <= 512 and r <= rows, (parts, seqs, rows)
        if seqs * 8 <= parts:
            assert r == 1 and s >= min(128, -(-parts // seqs) + 1) and s & (s - 1) == 0
        else:
            assert (r, s, d) == combine_blocks(max(2, min(parts, 2 * -(-parts // seqs))), rows, 512)
    assert pieces_combine_blocks(66, 8, 128, 512) == (1, 16, 512)
    assert pieces_combine_blocks(66, 1, 128, 512) == (1, 128, 64)


def test_mla_decode_scheduled_same_shapes_new_lengths(monkeypatch):
    """What a CUDA graph replay does: the same call (shapes, out buffer) with new seq_lens
    contents; the schedule is recomputed on the device, so both results are right. On a GPU
    the call is captured once and replayed."""
    force_decode_config(monkeypatch, True, 3, 1)
    case = mla_cases.make_decode_case([80] * 4, [1] * 4, heads=16, block_size=16, device=DEV)
    out = torch.full((4, 16, L), float("nan"), dtype=torch.bfloat16, device=DEV)
    graph = None
    for lens in ([80, 3, 45, 1], [10, 80, 1, 64], [80, 80, 80, 80]):
        case.seq_lens.copy_(torch.tensor(lens, dtype=torch.int32))
        if DEV.startswith("cuda"):
            if graph is None:
                mla_cases.decode(case, "triton", return_lse=False, out=out)  # compile outside capture
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph):
                    mla_cases.decode(case, "triton", return_lse=False, out=out)
            graph.replay()
        else:
            mla_cases.decode(case, "triton", return_lse=False, out=out)
        _close(out, mla_cases.decode(case, "reference", return_lse=False), 1e-2, f"lens {lens}")


# ----------------------------------------------------------------------- cache writes


@pytest.mark.parametrize("fmt,page,layout", [
    ("bfloat16", 16, "padded"), ("float16", 1, "contiguous"), ("fp8", 48, "cross_layer"),
    ("fp8", 16, "contiguous"), ("fp8_ds_mla", 16, "padded"), ("fp8_ds_mla", 64, "cross_layer"),
])
@pytest.mark.parametrize("src_dtype", [torch.bfloat16, torch.float32])
def test_concat_and_cache_mla_bytes_match_reference(fmt, page, layout, src_dtype):
    g = _gen(3)
    t = 12
    nb = max(5, 2 * t // page)
    cache_a = make_cache(nb, page, fmt, layout)
    cache_b = make_cache(nb, page, fmt, layout)
    kv_c = (torch.randn(t, L, generator=g) * 3).to(DEV, src_dtype)
    kv_c[1, :128] = 0.0  # an all-zero tile: scale FLT_MIN
    k_pe = torch.randn(t, 1, R, generator=g).to(DEV, src_dtype)
    slots = torch.randperm(nb * page, generator=g)[:t].to(DEV)
    slots[3] = -1
    slots[7] = -1
    scale = 0.02 if fmt == "fp8" else None
    pm.concat_and_cache_mla(kv_c, k_pe, cache_a, slots, fmt, scale, backend="triton")
    pm.concat_and_cache_mla(kv_c, k_pe, cache_b, slots, fmt, scale, backend="reference")
    a, b = cache_a.contiguous().view(torch.uint8), cache_b.contiguous().view(torch.uint8)
    assert torch.equal(a, b), f"{int((a != b).sum())} bytes differ"


# ---------------------------------------------------------------------- gather_cache


@pytest.mark.parametrize("fmt,page,layout,out_dtype,chunked", [
    ("bfloat16", 16, "cross_layer", torch.bfloat16, False),
    ("float16", 48, "padded", torch.float32, True),
    ("fp8", 1, "contiguous", torch.bfloat16, True),
    ("fp8", 64, "padded", torch.float16, False),
    ("fp8_ds_mla", 16, "padded", torch.bfloat16, True),
    ("fp8_ds_mla", 48, "contiguous", torch.float32, False),
])
def test_gather_cache(fmt, page, layout, out_dtype, chunked):
    g = _gen(5)
    seq_lens = [40, 0, 17, 66]
    bt, nb = make_table(4, seq_lens, page, 1, g)
    cache = make_cache(nb, page, fmt, layout)
    scale = 0.03 if fmt == "fp8" else None
    fill_cache(cache, fmt, bt, seq_lens, scale, g)
    if chunked:
        starts = torch.tensor([5, 0, 16, 30], dtype=torch.int32, device=DEV)
        lens = torch.tensor([20, 0, 1, 36], dtype=torch.int32, device=DEV)
    else:
        starts, lens = None, torch.tensor(seq_lens, dtype=torch.int32, device=DEV)
    total = int(lens.sum())
    out = torch.full((total, L + R), float("nan"), dtype=out_dtype, device=DEV)
    kw = dict(kv_cache_dtype=fmt, scale=scale, out_dtype=out_dtype, seq_starts=starts)
    a = pm.gather_cache(cache, bt, lens, backend="triton", out=out, **kw)
    b = pm.gather_cache(cache, bt, lens, backend="reference", **kw)
    assert torch.equal(a, b)


# ----------------------------------------------------------------- merge_attn_states


@pytest.mark.parametrize("dtype,d", [(torch.bfloat16, 512), (torch.float16, 128),
                                     (torch.bfloat16, 96)])
def test_merge_attn_states(dtype, d):
    g = _gen(9)
    t, h = 6, 5
    po = torch.randn(t, h, d, generator=g).to(DEV, dtype)
    so = torch.randn(t, h, d, generator=g).to(DEV, dtype)
    pl = torch.randn(t, h, generator=g).to(DEV) * 3
    sl = torch.randn(t, h, generator=g).to(DEV) * 3
    pl[0, :] = float("-inf")
    po[0, :] = float("nan")  # empty side: its garbage must not leak
    sl[1, 2] = float("-inf")
    so[1, 2] = float("nan")
    pl[2, 3] = sl[2, 3] = float("-inf")  # both empty: 0 and -inf
    out = torch.full_like(po, float("nan"))
    a, al = pm.merge_attn_states(po, pl, so, sl, out=out, backend="triton")
    b, bl = pm.merge_attn_states(po, pl, so, sl, backend="reference")
    assert torch.isfinite(a).all()
    assert (a[2, 3] == 0).all() and al[2, 3] == float("-inf")
    _close(a, b, 5e-3, "out")
    assert torch.allclose(al, bl, atol=1e-5, equal_nan=False)


# ------------------------------------------------------------- mla_prefill_attention


@pytest.mark.parametrize("dqk,dv,h,hk,causal,lens", [
    (192, 128, 4, 4, True, [(5, 5), (9, 20), (0, 3), (17, 17)]),
    (192, 128, 4, 2, False, [(7, 11), (3, 3)]),
    (64, 32, 2, 1, True, [(12, 4), (6, 6)]),  # queries that see no key: 0 and -inf
])
def test_mla_prefill_attention(dqk, dv, h, hk, causal, lens):
    g = _gen(13)
    sq = [a for a, _ in lens]
    sk = [b for _, b in lens]
    cq = torch.tensor([0] + torch.tensor(sq).cumsum(0).tolist(), dtype=torch.int32, device=DEV)
    ck = torch.tensor([0] + torch.tensor(sk).cumsum(0).tolist(), dtype=torch.int32, device=DEV)
    q = torch.randn(sum(sq), h, dqk, generator=g).to(DEV, torch.bfloat16)
    k = torch.randn(sum(sk), hk, dqk, generator=g).to(DEV, torch.bfloat16)
    v = torch.randn(sum(sk), hk, dv, generator=g).to(DEV, torch.bfloat16)
    kw = dict(softmax_scale=dqk ** -0.5, causal=causal, return_lse=True)
    out = torch.full((sum(sq), h, dv), float("nan"), dtype=torch.bfloat16, device=DEV)
    a, al = pm.mla_prefill_attention(q, k, v, cq, ck, max(sq), max(sk), backend="triton", out=out,
                                     **kw)
    b, bl = pm.mla_prefill_attention(q, k, v, cq, ck, max(sq), max(sk), backend="reference", **kw)
    _close(a, b, 1e-2, "out")
    fin = torch.isfinite(bl)
    assert torch.equal(fin, torch.isfinite(al))
    assert torch.allclose(al[fin], bl[fin], atol=2e-3)


def test_quantize_helper_roundtrip_is_the_reference():
    """The cache filler uses the reference quantizer; keep that link explicit."""
    x = torch.randn(2, L + R)
    e = quantize_entries(x, "fp8_ds_mla", L, None, torch.uint8, PLAT.fp8_dtype)
    assert e.shape == (2, _entry("fp8_ds_mla"))
