"""Bad inputs raise a clear error naming the argument, before any kernel, cache untouched."""

from __future__ import annotations

import pytest
import torch
from mla_cases import make_decode_case

import portmla as pm


@pytest.fixture
def case(device):
    return make_decode_case([40, 17], [1, 1], heads=4, block_size=16, device=device)


def _decode(case, **over):
    kw = dict(softmax_scale=0.1, kv_cache_dtype="auto", backend="reference")
    args = dict(q=case.q, kv_cache=case.cache, block_table=case.block_table, seq_lens=case.seq_lens)
    for k in list(over):
        if k in args:
            args[k] = over.pop(k)
    kw.update(over)
    return pm.mla_decode(args["q"], args["kv_cache"], args["block_table"], args["seq_lens"], **kw)


@pytest.mark.parametrize("mutate,exc,needle", [
    (lambda c: dict(q=c.q.float()), TypeError, "q.dtype=float32"),
    (lambda c: dict(q=c.q[:, :, :500]), ValueError, "kv_lora_rank=512 with q.shape[2]=500"),
    (lambda c: dict(q=c.q[:, :, :544]), ValueError, "kv_cache.shape[2]=576 gives rope_dim=64, but the inputs have rope_dim=32"),
    (lambda c: dict(q=c.q.transpose(1, 2).contiguous().transpose(1, 2)), ValueError, "q.stride(-1)"),
    (lambda c: dict(block_table=c.block_table.long()), TypeError, "block_table.dtype=int64"),
    (lambda c: dict(seq_lens=c.seq_lens[:1]), ValueError, "seq_lens.shape"),
    (lambda c: dict(seq_lens=torch.tensor([40, 1000], dtype=torch.int32, device=c.q.device)),
     ValueError, "seq_lens[1]=1000 needs 63 blocks of 16"),
    (lambda c: dict(block_table=c.block_table.clone().index_fill_(1, torch.tensor([0], device=c.q.device), 999)),
     ValueError, "block_table[0, 0]=999"),
    (lambda c: dict(block_table=c.block_table.clone().index_fill_(1, torch.tensor([0], device=c.q.device), -3)),
     ValueError, "block_table[0, 0]=-3"),
    (lambda c: dict(kv_cache_dtype="int4"), ValueError, "kv_cache_dtype='int4'"),
    (lambda c: dict(kv_cache_dtype="fp8"), TypeError, "kv_cache.dtype=bfloat16 does not hold kv_cache_dtype='fp8'"),
    (lambda c: dict(softmax_scale=-1.0), ValueError, "softmax_scale=-1.0"),
    (lambda c: dict(kv_lora_rank=600), ValueError, "kv_lora_rank=600"),
    (lambda c: dict(backend="cudnn"), ValueError, "backend='cudnn'"),
    (lambda c: dict(query_start_loc=torch.tensor([0, 2, 3], dtype=torch.int32, device=c.q.device)),
     ValueError, "query_start_loc[-1]=3 (must equal q.shape[0]=2)"),
    (lambda c: dict(query_start_loc=torch.tensor([0, 3, 2], dtype=torch.int32, device=c.q.device)),
     ValueError, "query_start_loc is not non-decreasing at index 2"),
    (lambda c: dict(query_start_loc=torch.tensor([1, 1, 2], dtype=torch.int32, device=c.q.device)),
     ValueError, "query_start_loc[0]=1 (must be 0)"),
    (lambda c: dict(out=torch.empty(2, 4, 512, device=c.q.device)), TypeError, "out.dtype=float32"),
    (lambda c: dict(q=c.q.to("meta")), ValueError, "kv_cache.device"),
])
def test_decode_bad_inputs(case, mutate, exc, needle):
    before = case.cache.clone()
    with pytest.raises(exc) as info:
        _decode(case, **mutate(case))
    assert needle in str(info.value)
    assert torch.equal(case.cache.view(torch.int16), before.view(torch.int16))


def test_decode_query_longer_than_sequence(device):
    case = make_decode_case([3, 17], [1, 1], heads=2, block_size=16, device=device)
    q = torch.randn(5, 2, 576, device=device, dtype=torch.bfloat16)
    qsl = torch.tensor([0, 4, 5], dtype=torch.int32, device=device)
    with pytest.raises(ValueError, match=r"seq_lens\[0\]=3 is less than its 4 query tokens"):
        pm.mla_decode(q, case.cache, case.block_table, case.seq_lens, softmax_scale=0.1,
                      query_start_loc=qsl)


def test_k_scale_required_for_fp8(device):
    case = make_decode_case([20], [1], heads=2, fmt="fp8", device=device)
    with pytest.raises(ValueError, match="k_scale=None with kv_cache_dtype='fp8'"):
        pm.mla_decode(case.q, case.cache, case.block_table, case.seq_lens, softmax_scale=0.1,
                      kv_cache_dtype="fp8")


def test_float_k_scale_kept_as_one_tensor(device, monkeypatch):
    """A python-float k_scale becomes one kept device tensor per value (so a captured call reads
    it instead of capturing a fill kernel); under capture an unkept value is made and not kept."""
    from portmla import validate as V

    a = V.k_scale_tensor("k_scale", 0.37, "fp8", torch.device(device))
    assert a.dtype == torch.float32 and a.shape == (1,) and float(a) == pytest.approx(0.37)
    assert V.k_scale_tensor("k_scale", 0.37, "fp8", torch.device(device)) is a
    assert float(V.k_scale_tensor("k_scale", 0.5, "fp8", torch.device(device))) == 0.5
    assert V.k_scale_tensor("k_scale", 0.37, "bfloat16", torch.device(device)) is None
    monkeypatch.setattr(V, "values_checkable", lambda dev: False)  # as inside graph capture
    c = V.k_scale_tensor("k_scale", 0.123, "fp8", torch.device(device))
    assert float(c) == pytest.approx(0.123) and V.k_scale_tensor("k_scale", 0.123, "fp8", torch.device(device)) is not c
    assert V.k_scale_tensor("k_scale", 0.37, "fp8", torch.device(device)) is a


def _write_args(device, fmt="auto", t=6, nb=4, bs=16):
    cache = torch.full((nb, bs, 576), float("nan"), dtype=torch.bfloat16, device=device)
    return (torch.randn(t, 512, device=device, dtype=torch.bfloat16),
            torch.randn(t, 64, device=device, dtype=torch.bfloat16), cache,
            torch.arange(t, device=device))


@pytest.mark.parametrize("mutate,exc,needle", [
    (lambda a: (a[0], a[1], a[2], torch.tensor([0, 1, 2, 3, 4, 64], device=a[0].device)), ValueError,
     "slot_mapping[5]=64 (must be -1 or in [0, 63]"),
    (lambda a: (a[0], a[1], a[2], torch.tensor([0, 1, -2, 3, 4, 5], device=a[0].device)), ValueError,
     "slot_mapping[2]=-2"),
    (lambda a: (a[0], a[1], a[2], a[3].float()), TypeError, "slot_mapping.dtype=float32"),
    (lambda a: (a[0], a[1][:5], a[2], a[3]), ValueError, "k_pe.shape=(5, 64)"),
    (lambda a: (a[0][:, :256], a[1], a[2], a[3]), ValueError, "kv_cache.shape[2]=576 gives rope_dim=320"),
    (lambda a: (a[0], a[1], a[2].transpose(0, 2), a[3]), ValueError, "kv_cache.stride(-1)"),
])
def test_concat_bad_inputs(device, mutate, exc, needle):
    args = mutate(_write_args(device))
    before = args[2].clone()
    with pytest.raises(exc) as info:
        pm.concat_and_cache_mla(*args)
    assert needle in str(info.value)
    assert torch.equal(args[2].view(torch.int16), before.view(torch.int16))


def test_concat_format_cache_mismatch_leaves_cache(device):
    kv_c, k_pe, cache, slots = _write_args(device)
    before = cache.clone()
    with pytest.raises(TypeError, match="does not hold kv_cache_dtype='fp8_ds_mla'"):
        pm.concat_and_cache_mla(kv_c, k_pe, cache, slots, "fp8_ds_mla")
    u8 = torch.zeros(4, 16, 576, dtype=torch.uint8, device=device)
    with pytest.raises(ValueError, match=r"kv_cache.shape\[2\]=576 gives rope_dim=24, but the inputs have rope_dim=64"):
        pm.concat_and_cache_mla(kv_c, k_pe, u8, slots, "fp8_ds_mla")
    with pytest.raises(ValueError, match="scale=None with kv_cache_dtype='fp8'"):
        pm.concat_and_cache_mla(kv_c, k_pe, torch.zeros(4, 16, 576, dtype=torch.float8_e4m3fn,
                                                        device=device), slots, "fp8")
    assert torch.equal(cache.view(torch.int16), before.view(torch.int16))


def test_unsupported_forced_backend_lists_reasons(device):
    case = make_decode_case([20], [1], heads=2, device=device)
    with pytest.raises(pm.UnsupportedError) as info:
        pm.mla_decode(case.q, case.cache, case.block_table, case.seq_lens, softmax_scale=0.1,
                      backend="sycl")
    msg = str(info.value)
    assert "backend='sycl' cannot run mla_decode" in msg and "q=[1, 2, 576]" in msg
    assert "platform=" in msg and "sycl" in info.value.reasons
    assert isinstance(info.value, ValueError)


def test_gather_bad_inputs(device):
    case = make_decode_case([40], [1], heads=1, block_size=16, device=device)
    with pytest.raises(ValueError, match=r"seq_lens\[0\]=40 from seq_starts=30 needs 5 blocks"):
        pm.gather_cache(case.cache, case.block_table, case.seq_lens,
                        seq_starts=torch.tensor([30], dtype=torch.int32, device=device))
    with pytest.raises(ValueError, match="total_tokens / out.shape"):
        pm.gather_cache(case.cache, case.block_table, case.seq_lens, total_tokens=41)
    with pytest.raises(TypeError, match="out_dtype"):
        pm.gather_cache(case.cache, case.block_table, case.seq_lens, out_dtype=torch.int8)


def test_prefill_bad_inputs(device):
    q = torch.randn(4, 4, 192, device=device, dtype=torch.bfloat16)
    k = torch.randn(4, 3, 192, device=device, dtype=torch.bfloat16)
    v = torch.randn(4, 3, 128, device=device, dtype=torch.bfloat16)
    cu = torch.tensor([0, 4], dtype=torch.int32, device=device)
    with pytest.raises(ValueError, match="q heads must be a multiple of k heads"):
        pm.mla_prefill_attention(q, k, v, cu, cu, 4, 4, softmax_scale=0.1)
    k, v = k[:, :2], v[:, :2]
    with pytest.raises(ValueError, match="exceeds max_seqlen=3"):
        pm.mla_prefill_attention(q, k.contiguous(), v.contiguous(), cu, cu, 3, 4, softmax_scale=0.1)
    with pytest.raises(ValueError, match=r"cu_seqlens_k\[0\]=1 \(must be 0\)"):
        pm.mla_prefill_attention(q, k.contiguous(), v.contiguous(), cu, cu + 1, 4, 5,
                                 softmax_scale=0.1)
    with pytest.raises(ValueError, match=r"cu_seqlens_k\[-1\]=5 \(must equal the token count 4\)"):
        pm.mla_prefill_attention(q, k.contiguous(), v.contiguous(), cu, cu * 5 // 4, 4, 5,
                                 softmax_scale=0.1)


def test_kv_cache_shape_and_allocate_errors():
    assert pm.kv_cache_shape(10, 64) == (10, 64, 576)
    assert pm.kv_cache_shape(10, 64, "fp8_ds_mla") == (10, 64, 656)
    assert pm.kv_cache_shape(3, 16, "fp8_e4m3", kv_lora_rank=256, rope_dim=32) == (3, 16, 288)
    with pytest.raises(ValueError, match="block_size=0"):
        pm.kv_cache_shape(1, 0)
    with pytest.raises(ValueError, match="kv_cache_dtype='fp4'"):
        pm.kv_cache_shape(1, 16, "fp4")
    with pytest.raises(ValueError, match="model_dtype"):
        pm.allocate_kv_cache(1, 16, "auto", torch.float32, "cpu")
    c = pm.allocate_kv_cache(2, 16, "fp8", torch.bfloat16, "cpu")
    assert c.dtype == pm.current_platform("cpu").fp8_dtype and c.shape == (2, 16, 576)
    assert pm.allocate_kv_cache(2, 16, "fp8_ds_mla", torch.bfloat16, "cpu").dtype == torch.uint8
