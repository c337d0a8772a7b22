"""Hypothesis property tests over random shapes: reference vs float64, backends vs reference."""

from __future__ import annotations

import os

import pytest
import torch
from conftest import backends_under_test, device_under_test
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from mla_cases import decode, decode_float64, make_decode_case, rel_err

from portmla.dispatch import get_backend

DEVICE = device_under_test()
BACKENDS = [b for b in backends_under_test() if b != "reference"
            and "mla_decode" in get_backend(b).OPS]


@st.composite
def decode_shapes(draw):
    nseq = draw(st.integers(1, 4))
    qlens = draw(st.lists(st.integers(0, 4), min_size=nseq, max_size=nseq))
    if sum(qlens) == 0:
        qlens[0] = 1
    seqs = [q + draw(st.integers(0 if q else 1, 90)) for q in qlens]
    return dict(seq_lens=seqs, query_lens=qlens, heads=draw(st.sampled_from([1, 3, 8, 16])),
                block_size=draw(st.sampled_from([1, 2, 16, 48, 64])),
                fmt=draw(st.sampled_from(["bfloat16", "float16", "fp8", "fp8_ds_mla"])),
                layout=draw(st.sampled_from(["contiguous", "padded", "cross_layer"])),
                lora=draw(st.sampled_from([128, 256, 512])), rope=draw(st.sampled_from([16, 64])))


def _case(s):
    dtype = torch.float16 if s["fmt"] == "float16" else torch.bfloat16
    return make_decode_case(s["seq_lens"], s["query_lens"], heads=s["heads"],
                            block_size=s["block_size"], fmt=s["fmt"], layout=s["layout"],
                            device=DEVICE, model_dtype=dtype, lora=s["lora"], rope=s["rope"])


@settings(max_examples=int(os.environ.get("PORTMLA_PROPERTY_EXAMPLES", 25)), deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(decode_shapes())
def test_reference_decode_property(shape):
    case = _case(shape)
    out, lse = decode(case, "reference")
    want, want_lse = decode_float64(case)
    # beyond the unavoidable rounding of the output to bf16/fp16, at most 5e-4 may be lost
    # (a bare 2e-3 bound flakes on outputs of a few dozen values: bf16's unit roundoff is 3.9e-3)
    assert rel_err(out, want) <= rel_err(want.to(out.dtype), want) + 5e-4
    assert float((lse.double() - want_lse).abs().max()) < 1e-3


@pytest.mark.parametrize("backend", BACKENDS)
@settings(max_examples=10 if DEVICE.type == "cpu" else 60, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(shape=decode_shapes())
def test_backend_decode_property(backend, shape):
    b = get_backend(backend)
    if (b.BLOCK_SIZES is not None and shape["block_size"] not in b.BLOCK_SIZES) or \
            shape["fmt"] not in b.KV_CACHE_DTYPES or shape["heads"] > b.MAX_NUM_HEADS or \
            (b.KV_LORA_RANKS is not None and shape["lora"] not in b.KV_LORA_RANKS) or \
            (b.ROPE_DIMS is not None and shape["rope"] not in b.ROPE_DIMS):
        shape = dict(shape, block_size=(b.BLOCK_SIZES or (16,))[-1] if b.BLOCK_SIZES else 16,
                     fmt="bfloat16", heads=min(shape["heads"], b.MAX_NUM_HEADS),
                     lora=(b.KV_LORA_RANKS or (512,))[-1], rope=(b.ROPE_DIMS or (64,))[-1])
    case = _case(shape)
    out, lse = decode(case, backend)
    ref, ref_lse = decode(case, "reference")
    out_rtol, lse_atol = b.decode_tolerance(case.fmt)
    assert rel_err(out, ref) < out_rtol
    assert float((lse - ref_lse).abs().max()) < lse_atol
