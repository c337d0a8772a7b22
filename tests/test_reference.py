"""The reference backend against float64 math: it is the spec, so it is checked first."""

from __future__ import annotations

import math

import pytest
import torch
from mla_cases import (
    BATCH_SPECS,
    LARGE_SPECS,
    decode,
    decode_float64,
    make_decode_case,
    rel_err,
)

import portmla as pm

CPU_SPECS = [s for s in BATCH_SPECS if s not in LARGE_SPECS]


@pytest.mark.parametrize("spec", CPU_SPECS)
def test_reference_decode_matches_float64(spec, device):
    seq_lens, query_lens = BATCH_SPECS[spec]
    case = make_decode_case(seq_lens, query_lens, heads=16, block_size=16, device=device)
    out, lse = decode(case, "reference")
    want, want_lse = decode_float64(case)
    assert rel_err(out, want) < 2e-3
    assert float((lse.double() - want_lse).abs().max()) < 1e-3


@pytest.mark.parametrize("fmt", ["float16", "fp8", "fp8_ds_mla"])
@pytest.mark.parametrize("layout", ["padded", "cross_layer"])
def test_reference_decode_formats_layouts(fmt, layout, device):
    dtype = torch.float16 if fmt == "float16" else torch.bfloat16
    case = make_decode_case([37, 5, 64], [1, 2, 3], heads=8, block_size=16, fmt=fmt, layout=layout,
                            device=device, model_dtype=dtype)
    out, _ = decode(case, "reference")
    want, _ = decode_float64(case)
    assert rel_err(out, want) < 2e-3


def test_reference_decode_block_size_one_and_odd(device):
    for bs in (1, 48, 256):
        case = make_decode_case([70, 3], [2, 1], heads=4, block_size=bs, device=device)
        out, _ = decode(case, "reference")
        assert rel_err(out, decode_float64(case)[0]) < 2e-3


def test_fp8_ds_mla_byte_layout():
    """Bytes [0,512) e4m3fn values, [512,528) four fp32 tile scales, [528,656) bf16 rope."""
    torch.manual_seed(1)
    kv_c = torch.randn(3, 512) * torch.tensor([1.0, 10.0, 0.01]).view(3, 1)
    kv_c[2, :128] = 0.0  # an all-zero tile gets scale FLT_MIN, not 0
    k_pe = torch.randn(3, 64)
    cache = torch.full((1, 4, 656), 0x7F, dtype=torch.uint8)
    pm.concat_and_cache_mla(kv_c, k_pe, cache, torch.tensor([3, 0, 1]), "fp8_ds_mla")
    assert bool((cache[0, 2] == 0x7F).all())  # unwritten slot untouched
    for row, slot in zip(range(3), (3, 0, 1)):
        e = cache[0, slot]
        scales = e[512:528].clone().view(torch.float32)
        tiles = kv_c[row].view(4, 128)
        want = (tiles.abs().amax(1) / 448.0).clamp_min(torch.finfo(torch.float32).tiny)
        torch.testing.assert_close(scales, want, rtol=0, atol=0)
        vals = e[:512].clone().view(torch.float8_e4m3fn).float().view(4, 128) * scales.view(4, 1)
        assert float((vals - tiles).abs().max()) <= float(tiles.abs().max()) * 0.07 + 1e-30
        pe = e[528:].clone().view(torch.bfloat16)
        torch.testing.assert_close(pe, k_pe[row].to(torch.bfloat16), rtol=0, atol=0)


def _prefill_float64(q, k, v, cu_q, cu_k, scale, causal):
    outs, lses = [], []
    cq, ck = cu_q.tolist(), cu_k.tolist()
    group = q.shape[1] // k.shape[1]
    for b in range(len(cq) - 1):
        qb = q[cq[b]:cq[b + 1]].double()
        kb = k[ck[b]:ck[b + 1]].double().repeat_interleave(group, 1)
        vb = v[ck[b]:ck[b + 1]].double().repeat_interleave(group, 1)
        sq, sk = qb.shape[0], kb.shape[0]
        sc = torch.einsum("qhd,khd->qhk", qb, kb) * scale
        if causal:
            m = torch.arange(sk).view(1, -1) > (torch.arange(sq).view(-1, 1) + sk - sq)
            sc = sc.masked_fill(m.unsqueeze(1).to(sc.device), float("-inf"))
        lse = torch.logsumexp(sc, -1)
        p = torch.where(torch.isinf(lse).unsqueeze(-1), torch.zeros_like(sc),
                        torch.exp(sc - lse.unsqueeze(-1)))
        outs.append(torch.einsum("qhk,khd->qhd", p, vb))
        lses.append(lse)
    return torch.cat(outs), torch.cat(lses)


@pytest.mark.parametrize("causal", [True, False])
def test_reference_prefill_matches_float64(causal, device):
    qlens, klens = [5, 17, 1, 8], [5, 40, 9, 3]  # last: more queries than keys
    cu_q = torch.tensor([0] + qlens).cumsum(0).int().to(device)
    cu_k = torch.tensor([0] + klens).cumsum(0).int().to(device)
    q = torch.randn(sum(qlens), 8, 192, device=device, dtype=torch.bfloat16)
    k = torch.randn(sum(klens), 2, 192, device=device, dtype=torch.bfloat16)
    v = torch.randn(sum(klens), 2, 128, device=device, dtype=torch.bfloat16)
    scale = 1 / math.sqrt(192)
    out, lse = pm.mla_prefill_attention(q, k, v, cu_q, cu_k, max(qlens), max(klens),
                                        softmax_scale=scale, causal=causal, return_lse=True,
                                        backend="reference")
    want, want_lse = _prefill_float64(q, k, v, cu_q, cu_k, scale, causal)
    assert rel_err(out, want) < 5e-3
    finite = torch.isfinite(want_lse)
    assert torch.equal(torch.isfinite(lse), finite)
    assert float((lse[finite].double() - want_lse[finite]).abs().max()) < 1e-3
    assert not bool(torch.isnan(out).any())


def test_merge_attn_states_math_and_empty_prefix(device):
    t, h, d = 6, 3, 32
    a, b = torch.randn(t, h, d, device=device), torch.randn(t, h, d, device=device)
    la, lb = torch.randn(t, h, device=device), torch.randn(t, h, device=device)
    la[0] = float("-inf")
    a[0] = float("nan")  # garbage under an empty prefix must not leak
    lb[1] = float("-inf")
    la[2], lb[2] = float("-inf"), float("-inf")
    out, lse = pm.merge_attn_states(a, la, b, lb, backend="reference")
    w = torch.stack([la, lb]).double().softmax(0)
    want = torch.nan_to_num(a.double()) * w[0].nan_to_num(0).unsqueeze(-1) + \
        b.double() * w[1].nan_to_num(0).unsqueeze(-1)
    assert not bool(torch.isnan(out).any())
    torch.testing.assert_close(out[3:].double(), want[3:], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out[0], b[0])
    torch.testing.assert_close(out[1], a[1])
    assert bool((out[2] == 0).all()) and bool(torch.isneginf(lse[2]).all())
    torch.testing.assert_close(lse[3:].double(), torch.logaddexp(la[3:], lb[3:]).double(),
                               rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("fmt", ["bfloat16", "fp8", "fp8_ds_mla"])
def test_gather_cache_chunks_round_trip(fmt, device):
    case = make_decode_case([40, 7, 33], [1, 1, 1], heads=1, block_size=16, fmt=fmt,
                            layout="padded", device=device)
    lens = torch.tensor([10, 7, 0], dtype=torch.int32, device=device)
    starts = torch.tensor([25, 0, 33], dtype=torch.int32, device=device)
    got = pm.gather_cache(case.cache, case.block_table, lens, kv_cache_dtype=fmt, scale=case.k_scale,
                          out_dtype=torch.float32, seq_starts=starts, backend="reference")
    want = torch.cat([torch.cat([case.kv_c[0], case.k_pe[0]], 1)[25:35],
                      torch.cat([case.kv_c[1], case.k_pe[1]], 1)[0:7]])
    tol = {"bfloat16": 1e-2, "fp8": 7e-2, "fp8_ds_mla": 7e-2}[fmt]
    assert got.shape == (17, 576)
    assert rel_err(got, want) < tol
