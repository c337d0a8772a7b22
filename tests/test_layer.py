"""MLAAttention against a float64 MHA ground truth built independently of the implementation.

The ground truth up-projects every token's latent with kv_b_proj in float64 and runs plain
causal multi-head attention; it never uses the absorbed form, the cache or any portmla op.
"""

from __future__ import annotations

import math

import pytest
import torch
from conftest import backends_under_test, device_under_test
from mla_cases import make_cache, rel_err

import portmla as pm

DEVICE = device_under_test()
ON_GPU = DEVICE.type != "cpu"


def _mha_float64(q, latents, pes, weight, h, nope, vdim, query_lens, seq_lens, scale):
    """Plain MHA: token j of request r (n_r new tokens) sees positions <= seq_len - n_r + j."""
    lora = latents[0].shape[1]
    w = weight.double().view(h, nope + vdim, lora)
    outs, t0 = [], 0
    for c, p, n, s in zip(latents, pes, query_lens, seq_lens):
        k_nope = torch.einsum("sl,hnl->shn", c.double(), w[:, :nope])
        v = torch.einsum("sl,hvl->shv", c.double(), w[:, nope:])
        k = torch.cat([k_nope, p.double().unsqueeze(1).expand(-1, h, -1)], dim=-1)
        qr = q[t0:t0 + n].double()
        sc = torch.einsum("qhd,shd->hqs", qr, k) * scale
        mask = torch.arange(s, device=sc.device).view(1, -1) > \
            (torch.arange(n, device=sc.device).view(-1, 1) + s - n)
        probs = sc.masked_fill(mask.unsqueeze(0), float("-inf")).softmax(-1)
        outs.append(torch.einsum("hqs,shv->qhv", probs, v).reshape(n, h * vdim))
        t0 += n
    return torch.cat(outs)


def _run_layer(backend, fmt, query_lens, seq_lens, *, heads=8, block_size=16, chunk=None,
               decode_threshold=1, layout="contiguous", lora=128, rope=32, nope=64, vdim=64):
    dtype = torch.bfloat16
    nreq = len(query_lens)
    blocks = [math.ceil(s / block_size) for s in seq_lens]
    num_blocks = 1 + sum(blocks) + 2
    cache = make_cache(num_blocks, block_size, fmt, dtype, DEVICE, layout, lora, rope)
    perm = (torch.randperm(num_blocks - 1) + 1).tolist()
    table = torch.zeros(nreq, max(blocks), dtype=torch.int32)
    k = 0
    for r, n in enumerate(blocks):
        table[r, :n] = torch.tensor(perm[k:k + n])
        k += n
    table = table.to(DEVICE)
    latents = [torch.randn(s, lora, device=DEVICE).to(dtype) for s in seq_lens]
    pes = [torch.randn(s, rope, device=DEVICE).to(dtype) for s in seq_lens]
    k_scale = 0.02 if fmt == "fp8" else None
    weight = (torch.randn(heads * (nope + vdim), lora, device=DEVICE) / math.sqrt(lora)).to(dtype)
    layer = pm.MLAAttention(heads, lora, nope, rope, vdim, weight, kv_cache_dtype=fmt,
                            backend=backend, decode_threshold=decode_threshold,
                            context_chunk_tokens=chunk)
    ctx = [s - n for n, s in zip(query_lens, seq_lens)]
    if sum(ctx):  # earlier steps wrote the context
        before = pm.MLABatch.build(ctx, ctx, table, block_size, DEVICE)
        pm.concat_and_cache_mla(torch.cat([c[:n] for c, n in zip(latents, ctx)]),
                                torch.cat([p[:n] for p, n in zip(pes, ctx)]), cache,
                                before.slot_mapping, fmt, k_scale)
    batch = pm.MLABatch.build(query_lens, seq_lens, table, block_size, DEVICE)
    q = torch.randn(sum(query_lens), heads, nope + rope, device=DEVICE).to(dtype)
    new_c = torch.cat([c[n:] for c, n in zip(latents, ctx)])
    new_pe = torch.cat([p[n:] for p, n in zip(pes, ctx)]).unsqueeze(1)
    out = layer.forward(q, new_c, new_pe, cache, batch, k_scale=k_scale)
    want = _mha_float64(q, latents, pes, weight, heads, nope, vdim, query_lens, seq_lens,
                        layer.softmax_scale)
    return out, want


@pytest.mark.parametrize("chunk", [None, 16, 5])
def test_layer_mixed_batch_any_order_matches_float64(chunk):
    # decode, prefill with context, spec-decode-sized, pure prefill, decode: interleaved
    out, want = _run_layer("auto", "auto", [1, 9, 3, 12, 1], [40, 30, 19, 12, 7], chunk=chunk,
                           decode_threshold=3)
    assert rel_err(out, want) < 2e-2


@pytest.mark.parametrize("fmt,tol", [("bfloat16", 2e-2), ("float16", 2e-2), ("fp8", 8e-2),
                                     ("fp8_ds_mla", 8e-2)])
@pytest.mark.parametrize("layout", ["contiguous", "cross_layer"])
def test_layer_formats(fmt, tol, layout):
    out, want = _run_layer("auto", fmt, [1, 4, 1], [33, 20, 64], chunk=8, layout=layout,
                           lora=128 if fmt != "fp8_ds_mla" else 256)
    assert rel_err(out, want) < tol


@pytest.mark.parametrize("backend", [b for b in backends_under_test() if b != "reference"])
def test_layer_backend_end_to_end(backend):
    query_lens, seq_lens = [1, 6, 2, 1], [50, 26, 9, 70]
    out, want = _run_layer(backend, "auto", query_lens, seq_lens, chunk=16, decode_threshold=2,
                           lora=512, rope=64, nope=128, vdim=128, block_size=16,
                           heads=16 if ON_GPU else 4)
    assert rel_err(out, want) < 2e-2


def test_batch_rejects_bad_metadata():
    table = torch.zeros(2, 2, dtype=torch.int32)
    with pytest.raises(ValueError, match="query_len=5, seq_len=4"):
        pm.MLABatch.build([5, 1], [4, 3], table, 16, "cpu")
    with pytest.raises(ValueError, match="seq_len=40 needs 3 blocks"):
        pm.MLABatch.build([1, 1], [40, 3], table, 16, "cpu")
    with pytest.raises(ValueError, match="query_lens has 1 entries"):
        pm.MLABatch.build([1], [4, 3], table, 16, "cpu")
