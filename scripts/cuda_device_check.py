#!/usr/bin/env python3
"""Device checks of the native CUDA backend (run on a GPU machine after csrc_cuda/build.py).

    python scripts/cuda_device_check.py sanitize   # small cases of every op and format (run it
                                                   # under compute-sanitizer --tool memcheck)
    python scripts/cuda_device_check.py bench      # mla_decode at ANCHORS.md configs, CUDA-graph
                                                   # replay medians, vs FlashMLA's numbers there

Timing follows shared/ANCHORS.md: varlen lengths from normal(S, S/2) clamped at s_q (fixed
above 16k), block size 64, FLOP = b*h*s_q*S*2*(576+512), bytes = b*(s_q*h*576*2 +
S*576*kv_bytes + s_q*h*512*2). Results are printed and, when $OUT is set, written there.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

import portmla as pm  # noqa: E402
from portmla.bench import anchors  # noqa: E402
from portmla.bench.specs import parse_spec  # noqa: E402
from portmla.bench.timing import measure, prepare  # noqa: E402

L, R, D = 512, 64, 576


def _anchor(spec, h, fixed, peers):
    g = parse_spec(spec).groups[0]
    return g.count, g.q_len, g.kv_len, h, fixed, peers[anchors.FLASHMLA][0]


# (b, s_q, S, h, fixed, FlashMLA µs on H100) of the ANCHORS.md table (portmla.bench.anchors)
ANCHORS = [_anchor(*row) for row in anchors.ROWS]


def sanitize() -> None:
    from test_cuda_backend import check_decode, make_decode_case, run_both

    from portmla.backends import cuda as cuda_backend

    # bf16 / fp8 / fp8_ds_mla with bf16 queries and fp8 with fp16 queries: the first two cases
    # (72 and 128 rows a sequence) run the pair kernel (fp8 formats: raw copies expanded by the consumers),
    # fp16 fp8_ds_mla the quantized kernel throughout.
    for fmt, dtype in (("bfloat16", torch.bfloat16), ("fp8", torch.bfloat16), ("fp8", torch.float16),
                       ("fp8_ds_mla", torch.bfloat16), ("fp8_ds_mla", torch.float16)):
        case = make_decode_case([3, 700, 0, 50], [1, 2, 0, 3], 24, 16, fmt, dtype, "cuda", strided=True)
        check_decode(*run_both(case, single_token=False))
        case = make_decode_case([900], [1], 128, 64, fmt, dtype, "cuda")
        check_decode(*run_both(case, single_token=True))
        if dtype == torch.bfloat16:
            # 40 sequences of 64 / 128 rows: the schedule kernel, the wide pieces' merge, and
            # several segments a CTA (the quantized forms' per-row query scales change between
            # them)
            lens = [int(x) for x in torch.randint(64, 400, (40,))]
            qlens = [1 + (i % 2) for i in range(40)]
            case = make_decode_case(lens, qlens, 64, 64, fmt, dtype, "cuda", strided=True)
            check_decode(*run_both(case, single_token=False))
        # 16 heads: the single-tile Hopper kernel for bf16 (32 rows a sequence), the quantized-cache
        # kernel for fp8 formats
        case = make_decode_case([500, 64, 3], [1, 2, 1], 16, 16, fmt, dtype, "cuda", strided=True)
        check_decode(*run_both(case, single_token=False))
        # 8 heads x 2 tokens (16 rows a sequence): the narrow Hopper kernel for bf16, its quantized
        # form for fp8 (bf16 / fp16 queries) and fp8_ds_mla (bf16; fp16 queries: the quantized kernel)
        case = make_decode_case([500, 64, 3, 2000], [2, 1, 2, 1], 8, 64, fmt, dtype, "cuda",
                                strided=True)
        check_decode(*run_both(case, single_token=False))
        # the same kernels with 40 sequences: the schedule kernel and the merge of each cut
        # sequence by the CTA that stores its last piece (piece counters, no grid barrier), on
        # 24 parts (racecheck's time grows with the CTAs)
        lens = [int(x) for x in torch.randint(2, 400, (40,))]
        case = make_decode_case(lens, [1 + (i % 2) for i in range(40)], 8, 64, fmt, dtype, "cuda")
        parts = cuda_backend.sched_parts
        cuda_backend.sched_parts = lambda *a: 24
        try:
            check_decode(*run_both(case, single_token=False))
        finally:
            cuda_backend.sched_parts = parts
        kv_c = torch.randn(9, L, device="cuda", dtype=dtype)
        k_pe = torch.randn(9, R, device="cuda", dtype=dtype)
        cache = pm.allocate_kv_cache(4, 16, fmt, dtype, "cuda")
        slots = torch.tensor([0, 5, -1, 17, 63, 30, 31, 32, 1], device="cuda")
        pm.concat_and_cache_mla(kv_c, k_pe, cache, slots, fmt, 0.05 if fmt == "fp8" else None,
                                backend="cuda")
        table = torch.tensor([[0, 1, 2, 3]], dtype=torch.int32, device="cuda")
        lens = torch.tensor([33], dtype=torch.int32, device="cuda")
        pm.gather_cache(cache, table, lens, kv_cache_dtype=fmt, scale=0.05 if fmt == "fp8" else None,
                        backend="cuda")
        torch.cuda.synchronize()
        print(f"sanitize case ok: {fmt} / {dtype}", flush=True)


def _lengths(b, s_q, S, fixed, gen):
    if fixed:
        return [S] * b
    x = torch.normal(float(S), S / 2, (b,), generator=gen).round().clamp_min(s_q)
    return [int(v) for v in x]


def _bench_one(b, s_q, S, h, fixed, fmt, gen, block_size=64, reps=30):
    lens = _lengths(b, s_q, S, fixed, gen)
    need = [-(-n // block_size) for n in lens]
    nblocks = sum(need)
    shape = pm.kv_cache_shape(nblocks, block_size, fmt)
    if fmt == "bfloat16":
        cache = torch.randn(shape, dtype=torch.bfloat16, device="cuda")
    elif fmt == "fp8":
        cache = torch.randn(shape, device="cuda").to(torch.float8_e4m3fn)
    else:
        cache = torch.randint(0, 0x7E, shape, dtype=torch.uint8, device="cuda")
        tiles = cache[..., L:L + 16].view(torch.float32)
        tiles.copy_(torch.rand(tiles.shape, device="cuda") * 0.01 + 1e-3)
        cache[..., L + 16:].view(torch.bfloat16).copy_(
            torch.randn(*shape[:2], R, device="cuda").to(torch.bfloat16))
    perm = torch.randperm(nblocks, device="cuda").to(torch.int32)
    table = torch.zeros(b, max(need), dtype=torch.int32, device="cuda")
    o = 0
    for i, n in enumerate(need):
        table[i, :n] = perm[o:o + n]
        o += n
    seq_lens = torch.tensor(lens, dtype=torch.int32, device="cuda")
    q = torch.randn(b * s_q, h, D, dtype=torch.bfloat16, device="cuda")
    qsl = None if s_q == 1 else torch.arange(0, b * s_q + 1, s_q, dtype=torch.int32, device="cuda")
    kw = dict(softmax_scale=D ** -0.5, kv_cache_dtype=fmt, query_start_loc=qsl, backend="cuda",
              k_scale=0.02 if fmt == "fp8" else None, max_query_len=s_q)
    out = torch.empty(b * s_q, h, L, dtype=torch.bfloat16, device="cuda")
    prepared = prepare([lambda: pm.mla_decode(q, cache, table, seq_lens, out=out, **kw)],
                       out.device, use_graphs=True)
    if not prepared.graphs:
        raise RuntimeError(prepared.note)
    t = measure(prepared, out.device, warmup=3, repeats=reps)
    mean_s = sum(lens) / b
    kv_bytes = {"bfloat16": 2, "fp8": 1, "fp8_ds_mla": 656 / 576}[fmt]
    flop = b * h * s_q * mean_s * 2 * (D + L)
    nbytes = b * (s_q * h * D * 2 + mean_s * D * kv_bytes + s_q * h * L * 2)
    assert not torch.isnan(out).any(), "NaN in the benchmark output"
    us = t.median_us
    return us, flop / us / 1e6, nbytes / us / 1e6, t.min_us, t.max_us


def bench() -> None:
    gen = torch.Generator().manual_seed(0)
    p = pm.current_platform("cuda")
    print(f"device: {p.device_name} ({p.arch}, {p.num_compute_units} SMs)", flush=True)
    rows = []
    configs = [(c, "bfloat16") for c in ANCHORS] + [(ANCHORS[4], "fp8"), (ANCHORS[4], "fp8_ds_mla"),
                                                    (ANCHORS[0], "fp8")]
    for (b, s_q, S, h, fixed, fm), fmt in configs:
        try:
            us, tf, tb, lo, hi = _bench_one(b, s_q, S, h, fixed, fmt, gen)
            rows.append(dict(b=b, s_q=s_q, S=S, h=h, fmt=fmt, us=us, tflops=tf, tbps=tb,
                             min_us=lo, max_us=hi, flashmla_us=fm if fmt == "bfloat16" else None))
            print(f"b={b:4d} s_q={s_q} S={S:6d} h={h:4d} {fmt:10s} {us:9.1f} us  "
                  f"{tf:6.1f} TFLOP/s  {tb:5.2f} TB/s  (min {lo:.1f}, max {hi:.1f}; "
                  f"FlashMLA bf16 {fm} us)", flush=True)
        except Exception as e:  # noqa: BLE001 - keep timing the other configs
            print(f"b={b} s_q={s_q} S={S} h={h} {fmt}: FAILED {type(e).__name__}: {e}", flush=True)
        torch.cuda.empty_cache()
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], "bench.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    what = sys.argv[1] if len(sys.argv) > 1 else "bench"
    info = pm.probe("cuda")["cuda"]
    if not info.available:
        raise SystemExit(f"cuda backend unavailable: {info.reasons}")
    {"sanitize": sanitize, "bench": bench}[what]()
