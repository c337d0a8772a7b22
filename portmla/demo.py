"""``python -m portmla demo``: one DeepSeek-shaped decode and one layer step, checked."""

from __future__ import annotations

import math
import time

import torch

from . import ops
from .dispatch import select
from .kv_formats import allocate_kv_cache
from .layer import MLAAttention, MLABatch
from .platform import current_platform


def _rel(a, b) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


def run_demo(device=None, backend="auto") -> int:
    p = current_platform(device)
    dev = p.torch_device
    on_gpu = p.kind != "cpu"
    torch.manual_seed(0)
    heads, lora, rope, nope, vdim = 128, 512, 64, 128, 128
    block = 64
    batch, ctx = (32, 2048) if on_gpu else (4, 256)
    dtype = torch.bfloat16
    blocks_per_seq = -(-ctx // block)
    num_blocks = batch * blocks_per_seq + 1
    cache = allocate_kv_cache(num_blocks, block, "auto", dtype, dev)
    cache.view(torch.int16).fill_(-1)  # NaN bits: an unwritten slot that is read shows up
    table = (torch.randperm(num_blocks - 1, device=dev)[:batch * blocks_per_seq] + 1)
    table = table.view(batch, blocks_per_seq).int()
    lens = torch.full((batch,), ctx, dtype=torch.int32, device=dev)
    kv_c = torch.randn(batch * ctx, lora, dtype=dtype, device=dev)
    k_pe = torch.randn(batch * ctx, rope, dtype=dtype, device=dev)
    prefill = MLABatch.build([ctx] * batch, [ctx] * batch, table, block, dev)
    ops.concat_and_cache_mla(kv_c, k_pe, cache, prefill.slot_mapping, backend=backend)

    q = torch.randn(batch, heads, lora + rope, dtype=dtype, device=dev)
    scale = 1.0 / math.sqrt(nope + rope)
    from .ops import _decode_problem

    chosen = select(_decode_problem(q, cache, table, "auto", lora, batch, 1, True), backend).NAME
    t0 = time.perf_counter()
    out, lse = ops.mla_decode(q, cache, table, lens, softmax_scale=scale, return_lse=True,
                              backend=backend)
    if on_gpu:
        torch.cuda.synchronize() if p.kind in ("cuda", "rocm") else torch.xpu.synchronize()
    dt = time.perf_counter() - t0
    ref, ref_lse = ops.mla_decode(q, cache, table, lens, softmax_scale=scale, return_lse=True,
                                  backend="reference")
    err = _rel(out, ref)
    print(f"mla_decode: batch {batch}, heads {heads}, context {ctx}, bf16 cache, block {block} "
          f"on {p.device_name}: backend '{chosen}', {dt * 1e3:.2f} ms (first call), "
          f"rel. error vs reference {err:.2e}, lse max diff {float((lse - ref_lse).abs().max()):.2e}")

    weight = torch.randn(heads * (nope + vdim), lora, dtype=dtype, device=dev) / math.sqrt(lora)
    layer = MLAAttention(heads, lora, nope, rope, vdim, weight, backend=backend,
                         context_chunk_tokens=512)
    ref_layer = MLAAttention(heads, lora, nope, rope, vdim, weight, backend="reference",
                             context_chunk_tokens=512)
    qlens = [1] * (batch // 2) + [16] * (batch - batch // 2)
    seq = [ctx - 32 + ql for ql in qlens]
    step = MLABatch.build(qlens, seq, table, block, dev)
    t = step.num_tokens
    qs = torch.randn(t, heads, nope + rope, dtype=dtype, device=dev)
    new_c = torch.randn(t, lora, dtype=dtype, device=dev)
    new_pe = torch.randn(t, 1, rope, dtype=dtype, device=dev)
    cache_ref = cache.clone()
    y = layer.forward(qs, new_c, new_pe, cache, step)
    y_ref = ref_layer.forward(qs, new_c, new_pe, cache_ref, step)
    lerr = _rel(y, y_ref)
    print(f"MLAAttention step: {batch // 2} decode + {batch - batch // 2} prefill requests "
          f"({t} tokens), backend '{backend}': rel. error vs reference {lerr:.2e}")
    ok = err < 2e-2 and lerr < 2e-2 and not bool(torch.isnan(y).any())
    print("demo:", "OK" if ok else "MISMATCH")
    return 0 if ok else 1
