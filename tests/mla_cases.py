"""Builders for test inputs: batch specs, paged caches in every layout, poisoned slots."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch

import portmla as pm
from portmla.kv_formats import FORMATS, canonical_format

# vLLM's MLA backend test batch specs (tests/v1/attention/test_mla_backends.py): seq / query lengths
BATCH_SPECS = {
    "small_decode": ([32, 40], [1, 1]),
    "small_prefill": ([32, 40], [8, 8]),
    "mixed_small": ([32, 40, 48, 56], [1, 1, 5, 5]),
    "medium_decode": ([128, 256, 512, 1024, 128, 256, 512, 1024], [1] * 8),
    "medium_prefill": ([256, 512, 1024, 2048], [16, 16, 16, 16]),
    "mixed_medium": ([512, 1024, 2048, 512, 1024, 2048], [1, 1, 1, 7, 7, 7]),
    "large_decode": ([2048] * 32, [1] * 32),
    "large_prefill": ([4096] * 8, [32] * 8),
    "single_decode": ([1024], [1]),
    "single_prefill": ([1024], [64]),
    "spec_decode_small": ([128, 256, 512, 1024], [4, 4, 4, 4]),
    "spec_decode_medium": ([512, 1024, 2048, 512, 1024, 2048], [8, 8, 8, 8, 8, 8]),
}
LARGE_SPECS = ("large_decode", "large_prefill")
LAYOUTS = ("contiguous", "padded", "cross_layer")
FORMATS_ALL = ("bfloat16", "float16", "fp8", "fp8_ds_mla")


def nan_bits(dtype: torch.dtype) -> int:
    """A byte / element pattern that reads as NaN in ``dtype``'s cache storage."""
    return {torch.float8_e4m3fn: 0x7F, torch.float8_e4m3fnuz: 0x80}.get(dtype, 0)


def poison_cache(cache: torch.Tensor, fmt: str, platform) -> None:
    """Fill every element with NaN (for fp8_ds_mla: NaN fp8 values and NaN tile scales)."""
    if cache.dtype in (torch.bfloat16, torch.float16, torch.float32):
        cache.fill_(float("nan"))
    elif fmt == "fp8_ds_mla":
        cache.fill_(0x7F)  # e4m3fn NaN in the value bytes; 0x7F7F7F7F is a float32 NaN too
    else:
        raw = cache.view(torch.uint8) if cache.dtype != torch.uint8 else cache
        raw.fill_(nan_bits(platform.fp8_dtype))


def make_cache(num_blocks, block_size, fmt, model_dtype, device, layout, lora=512, rope=64,
               entry_pad=16):
    """A poisoned cache view of ``layout``: contiguous, padded, or one layer of a 3-layer buffer.

    ``padded``: one spare token per page and ``entry_pad`` spare elements per token (16 keeps
    rows 16-byte aligned; an odd pad gives unaligned fp8_ds_mla scales / RoPE).
    """
    shape = pm.kv_cache_shape(num_blocks, block_size, fmt, lora, rope)
    platform = pm.current_platform(device)
    dtype = FORMATS[canonical_format(fmt)].storage_dtype(model_dtype, platform.fp8_dtype)
    entry = shape[2]
    if layout == "contiguous":
        cache = torch.empty(shape, dtype=dtype, device=device)
    elif layout == "padded":  # page stride > block_size * entry and token stride > entry
        buf = torch.empty(num_blocks, block_size + 1, entry + entry_pad, dtype=dtype, device=device)
        cache = buf[:, :block_size, :entry]
    elif layout == "cross_layer":
        buf = torch.empty(num_blocks, 3, block_size, entry, dtype=dtype, device=device)
        cache = buf[:, 1]
    else:
        raise ValueError(layout)
    poison_cache(cache if layout == "contiguous" else buf, canonical_format(fmt)
                 if fmt != "auto" else "auto", platform)
    return cache


@dataclass
class DecodeCase:
    q: torch.Tensor
    cache: torch.Tensor
    block_table: torch.Tensor
    seq_lens: torch.Tensor
    query_start_loc: torch.Tensor | None
    fmt: str
    k_scale: float | None
    softmax_scale: float
    kv_c: list  # per sequence [S, L] float32 values written (before quantization)
    k_pe: list
    query_lens: list
    lora: int = 512


def make_decode_case(seq_lens, query_lens, *, heads=16, block_size=16, fmt="bfloat16",
                     layout="contiguous", device="cpu", model_dtype=torch.bfloat16, lora=512,
                     rope=64, extra_blocks=3, spread=1.0, entry_pad=16, tile_gain=None):
    """Random paged cache (block 0 = null block, random block permutation), random q.

    Unused cache slots and unused block-table entries are poisoned. ``entry_pad``: the
    ``padded`` layout's spare elements per token (see ``make_cache``). ``tile_gain=(lo, hi)``
    multiplies each token's each 128-wide kv_c tile by a log-uniform gain in ``[lo, hi]`` (the
    fp8_ds_mla tile scales then spread over those decades, inside and across KV tiles); a
    callable ``tile_gain(positions [S], tiles) -> [S, tiles]`` gives the gains itself.
    """
    device = torch.device(device)
    nseq = len(seq_lens)
    blocks = [max(1, math.ceil(s / block_size)) for s in seq_lens]
    max_blocks = max(blocks) + 1
    num_blocks = 1 + sum(blocks) + extra_blocks
    cache = make_cache(num_blocks, block_size, fmt, model_dtype, device, layout, lora, rope, entry_pad)
    perm = (torch.randperm(num_blocks - 1) + 1).tolist()
    table = torch.zeros(nseq, max_blocks, dtype=torch.int32)  # unused entries: null block 0
    k = 0
    for b, n in enumerate(blocks):
        table[b, :n] = torch.tensor(perm[k:k + n], dtype=torch.int32)
        k += n
    table = table.to(device)
    k_scale = None
    canon = canonical_format(fmt)
    kv_c, k_pe, slots = [], [], []
    for b, s in enumerate(seq_lens):
        c = torch.randn(s, lora, device=device) * spread
        if callable(tile_gain):
            gain = tile_gain(torch.arange(s, device=device), math.ceil(lora / 128))
        elif tile_gain is not None:
            lo, hi = math.log(tile_gain[0]), math.log(tile_gain[1])
            gain = torch.exp(lo + (hi - lo) * torch.rand(s, math.ceil(lora / 128), device=device))
        if tile_gain is not None:
            c = c * gain.repeat_interleave(128, dim=1)[:, :lora]
        kv_c.append(c)
        k_pe.append(torch.randn(s, rope, device=device) * spread)
        pos = torch.arange(s, device=device)
        slots.append(table[b, pos // block_size].long() * block_size + pos % block_size)
    if canon == "fp8":
        amax = max(float(torch.cat([c.abs().max().view(1), p.abs().max().view(1)]).max())
                   for c, p in zip(kv_c, k_pe) if c.numel()) if sum(seq_lens) else 1.0
        k_scale = amax / 200.0
    if sum(seq_lens):
        pm.concat_and_cache_mla(torch.cat(kv_c).to(model_dtype), torch.cat(k_pe).to(model_dtype),
                                cache, torch.cat(slots), fmt, k_scale, backend="reference")
    t = sum(query_lens)
    q = torch.randn(t, heads, lora + rope, device=device).to(model_dtype)
    qsl = None
    if any(n != 1 for n in query_lens):
        qsl = torch.tensor([0] + list(query_lens), dtype=torch.int64).cumsum(0).to(torch.int32).to(device)
    return DecodeCase(q, cache, table, torch.tensor(seq_lens, dtype=torch.int32, device=device), qsl,
                      fmt, k_scale, 1.0 / math.sqrt(128 + rope), kv_c, k_pe, list(query_lens), lora)


def force_decode_config(monkeypatch, scheduled, parts=None, fixed=None, block_m=None, **fields):
    """Make the Triton decode use the split kernel or the device schedule (with ``parts`` /
    ``fixed`` / ``block_m`` and any other ``DecodeConfig`` ``fields`` where given; the rest
    from ``decode_config``). Returns the list of schedule launches, so a test can check the
    path it asked for ran."""
    from portmla.backends.triton import decode as tdec
    from portmla.backends.triton import launch as tlaunch

    orig_cfg, orig_sched = tdec.decode_config, tdec.launch_schedule
    launches = []

    def cfg(plat, num_seqs, num_heads, max_query_len, max_kv_len, fmt, lora):
        d = orig_cfg(plat, num_seqs, num_heads, max_query_len, max_kv_len, fmt, lora)
        bm = block_m or d.block_m
        return dataclasses.replace(d, scheduled=scheduled, block_m=bm, exact_ds=bm < 32,
                                   row_tiles=tlaunch.cdiv(max(1, max_query_len) * num_heads, bm),
                                   parts=parts or d.parts, sched_fixed=fixed or d.sched_fixed, **fields)

    def sched(*a, **k):
        launches.append(a[4:6])  # (parts, fixed)
        return orig_sched(*a, **k)

    monkeypatch.setattr(tdec, "decode_config", cfg)
    monkeypatch.setattr(tdec, "launch_schedule", sched)
    return launches


def far_end_case(device, heads, spare_blocks=64, lens=(1000, 777), block_size=64, fmt="bfloat16"):
    """``(cache, block_table, seq_lens, q)``: a bf16 (or fp8_ds_mla) cache of more than 2^31
    elements whose used blocks are its last ones (32-bit offsets would wrap), written with the
    reference writer."""
    ds = fmt == "fp8_ds_mla"
    entry = 656 if ds else 576
    num_blocks = (2**31) // (block_size * entry) + spare_blocks
    cache = torch.empty(num_blocks, block_size, entry, dtype=torch.uint8 if ds else torch.bfloat16, device=device)
    assert cache.numel() > 2**31
    nblk = [math.ceil(s / block_size) for s in lens]
    table = torch.zeros(len(lens), max(nblk), dtype=torch.int32)
    ids = list(range(num_blocks - sum(nblk), num_blocks))
    k = 0
    for b, n in enumerate(nblk):
        table[b, :n] = torch.tensor(ids[k:k + n])
        k += n
    table = table.to(device)
    for b, s in enumerate(lens):
        pos = torch.arange(s, device=device)
        slots = table[b, pos // block_size].long() * block_size + pos % block_size
        pm.concat_and_cache_mla(torch.randn(s, 512, device=device, dtype=torch.bfloat16),
                                torch.randn(s, 64, device=device, dtype=torch.bfloat16), cache, slots,
                                fmt, backend="reference")
    q = torch.randn(len(lens), heads, 576, device=device, dtype=torch.bfloat16)
    return cache, table, torch.tensor(list(lens), dtype=torch.int32, device=device), q


def decode(case: DecodeCase, backend: str, return_lse=True, out=None):
    return pm.mla_decode(case.q, case.cache, case.block_table, case.seq_lens,
                         softmax_scale=case.softmax_scale, kv_lora_rank=case.lora,
                         kv_cache_dtype=case.fmt, k_scale=case.k_scale,
                         query_start_loc=case.query_start_loc, return_lse=return_lse,
                         backend=backend, out=out)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """‖a − b‖ / ‖b‖ in float64; NaN anywhere gives inf (NaN never passes)."""
    a64, b64 = a.double(), b.double()
    if torch.isnan(a64).any() or torch.isnan(b64).any():
        return float("inf")
    return float((a64 - b64).norm() / b64.norm().clamp_min(1e-300))


def seq_float64(cache, table_row, s, n, fmt, lora, k_scale):
    """``(kv, mask)`` of one sequence for float64 ground truths: its ``s`` entries read back from
    the cache and dequantized (``[s, entry]`` float64), and the causal mask of its ``n`` query
    tokens (``[n, s]``, True where a position is past the token)."""
    from portmla.backends.reference import gather_entries
    from portmla.kv_formats import dequantize_entries

    pos = torch.arange(s, device=cache.device)
    entries = gather_entries(cache, table_row, pos, cache.shape[1])
    kv = dequantize_entries(entries, fmt, lora, k_scale,
                            pm.current_platform(cache.device).fp8_dtype).double()
    return kv, pos.view(1, -1) > (s - n + torch.arange(n, device=pos.device)).view(-1, 1)


def decode_float64(case: DecodeCase):
    """Float64 MQA ground truth from the values read back from the cache (dequantized)."""
    lora = case.lora
    outs, lses = [], []
    t0 = 0
    fmt = canonical_format(case.fmt) if case.fmt != "auto" else "bfloat16"
    for b, (s, n) in enumerate(zip(case.seq_lens.tolist(), case.query_lens)):
        kv, mask = seq_float64(case.cache, case.block_table[b], s, n, fmt, lora, case.k_scale)
        qb = case.q[t0:t0 + n].double()
        sc = torch.einsum("nhd,sd->nhs", qb, kv) * case.softmax_scale
        sc = sc.masked_fill(mask.unsqueeze(1), float("-inf"))
        lse = torch.logsumexp(sc, -1)
        outs.append(torch.einsum("nhs,sd->nhd", torch.exp(sc - lse.unsqueeze(-1)), kv[:, :lora]))
        lses.append(lse)
        t0 += n
    return torch.cat(outs), torch.cat(lses)


def check_graph_replays(case, heads, device, lora=512):
    """Capture one decode of ``case`` (3 sequences) into a CUDA graph, then replay it over new
    ``seq_lens`` / ``block_table`` contents; each replay must match the reference."""
    out = torch.full((3, heads, lora), float("nan"), dtype=torch.bfloat16, device=device)
    decode(case, "triton", return_lse=False, out=out)  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        decode(case, "triton", return_lse=False, out=out)
    for lens, perm in (([900, 3, 450], False), ([10, 900, 1], True), ([64, 65, 899], False)):
        case.seq_lens.copy_(torch.tensor(lens, dtype=torch.int32))
        if perm:
            case.block_table.copy_(case.block_table.flip(0))
        graph.replay()
        torch.cuda.synchronize()
        want = decode(case, "reference", return_lse=False)
        assert rel_err(out, want) < 1e-2, lens
