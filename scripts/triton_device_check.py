"""Triton backend on a GPU: correctness vs the reference, a > 2^31-element cache, CUDA-graph
capture + replay with new lengths / tables, and mla_decode timings at the ANCHORS.md rows.

    PYTHONPATH=. python scripts/triton_device_check.py [--tune] [--out DIR]

Timings are the median of CUDA-graph replays of one whole ``pm.mla_decode`` call (decode
and split combine). ``--tune`` also times a few launch-config variants on two rows.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback

os.environ.setdefault("TRITON_INTERPRET", "0")

import torch  # noqa: E402

import portmla as pm  # noqa: E402
from portmla.backends.triton import decode as tdec  # noqa: E402
from portmla.backends.triton import launch as tlaunch  # noqa: E402
from portmla.bench import anchors  # noqa: E402
from portmla.bench.specs import parse_spec  # noqa: E402
from portmla.bench.timing import measure, prepare  # noqa: E402

DEV = os.environ.get("PORTMLA_DEV", "cuda")
L, R = 512, 64
LOG: list[str] = []


LOG_PATH: list[str] = []


def say(*a):
    s = " ".join(str(x) for x in a)
    print(s, flush=True)
    LOG.append(s)
    if LOG_PATH:
        with open(LOG_PATH[0], "a") as f:
            f.write(s + "\n")


def rel(a, b):
    a, b = a.float(), b.float()
    if not torch.isfinite(a).all():
        return float("inf")
    return float((a - b).norm() / b.norm().clamp_min(1e-6))


def build(b, s_q, S, h, fmt, page=64, fixed=False, seed=0, num_blocks=None, high=False):
    g = torch.Generator(device="cpu").manual_seed(seed)
    if fixed:
        lens = torch.full((b,), S, dtype=torch.int64)
    else:
        lens = (torch.randn(b, generator=g) * (S / 2) + S).round().clamp(min=s_q).long()
    need = (lens + page - 1) // page
    total = int(need.sum())
    cols = int(need.max())
    nb = num_blocks or total
    ids = torch.randperm(nb, generator=g)[:total] if not high else torch.arange(nb - total, nb)
    bt = torch.zeros(b, cols, dtype=torch.int32)
    i = 0
    for r in range(b):
        k = int(need[r])
        bt[r, :k] = ids[i:i + k].int()
        i += k
    shape = pm.kv_cache_shape(nb, page, fmt)
    scale = None
    if fmt in ("bfloat16", "auto"):
        cache = torch.randn(shape, dtype=torch.bfloat16, device=DEV) if not high else \
            torch.empty(shape, dtype=torch.bfloat16, device=DEV)
        if high:
            cache.fill_(float("nan"))
            used = ids.to(DEV)
            cache[used] = torch.randn(len(ids), page, shape[2], dtype=torch.bfloat16, device=DEV)
    elif fmt == "fp8":
        scale = 0.05
        cache = (torch.randn(shape, device=DEV) * 4).to(torch.float8_e4m3fn)
    else:  # fp8_ds_mla: quantize random values with the reference writer, block by block
        cache = torch.empty(shape, dtype=torch.uint8, device=DEV)
        chunk = 4096
        for s0 in range(0, nb, chunk):
            n = min(chunk, nb - s0) * page
            kv_c = torch.randn(n, L, device=DEV, dtype=torch.bfloat16)
            k_pe = torch.randn(n, R, device=DEV, dtype=torch.bfloat16)
            slots = torch.arange(s0 * page, s0 * page + n, device=DEV)
            pm.concat_and_cache_mla(kv_c, k_pe, cache, slots, "fp8_ds_mla", backend="triton")
    q = torch.randn(b * s_q, h, L + R, dtype=torch.bfloat16, device=DEV)
    qsl = None if s_q == 1 else torch.arange(0, b * s_q + 1, s_q, dtype=torch.int32, device=DEV)
    return dict(q=q, cache=cache, bt=bt.to(DEV), sl=lens.int().to(DEV), qsl=qsl, scale=scale,
                fmt=fmt, mean_S=float(lens.float().mean()), lens=lens, s_q=s_q)


def call(d, backend, out=None):
    return pm.mla_decode(d["q"], d["cache"], d["bt"], d["sl"], softmax_scale=576 ** -0.5,
                         kv_cache_dtype=d["fmt"], k_scale=d["scale"], query_start_loc=d["qsl"],
                         out=out, backend=backend, max_query_len=d["s_q"])


def graph_time(d, reps=20):
    out = torch.empty(d["q"].shape[0], d["q"].shape[1], L, dtype=torch.bfloat16, device=DEV)
    prepared = prepare([lambda: call(d, "triton", out)], out.device, use_graphs=True)  # compiles
    if not prepared.graphs:
        raise RuntimeError(prepared.note)
    t = measure(prepared, out.device, warmup=3, repeats=reps)
    return t.median_us, t.min_us, t.max_us


def figures(d, b, s_q, h, us):
    S = d["mean_S"]
    kvb = {"bfloat16": 2.0, "fp8": 1.0, "fp8_ds_mla": 656 / 576}[d["fmt"]]
    flop = b * h * s_q * S * 2 * (576 + 512)
    byts = b * (s_q * h * 576 * 2 + S * 576 * kvb + s_q * h * 512 * 2)
    return flop / us / 1e6, byts / us / 1e6  # TFLOP/s, TB/s


# ------------------------------------------------------------------ correctness


def check_correctness(res):
    say("== correctness vs reference (cuda)")
    cases = [(4, 1, 300, 128, "bfloat16", 64), (4, 1, 300, 16, "bfloat16", 64),
             (3, 3, 200, 16, "bfloat16", 48), (4, 1, 300, 16, "fp8", 64),
             (4, 1, 300, 16, "fp8_ds_mla", 64), (2, 2, 150, 128, "fp8_ds_mla", 16),
             (5, 1, 100, 1, "bfloat16", 1)]
    for (b, s_q, S, h, fmt, page) in cases:
        d = build(b, s_q, S, h, fmt, page=page, seed=b + h)
        o_t, l_t = pm.mla_decode(d["q"], d["cache"], d["bt"], d["sl"], softmax_scale=0.04,
                                 kv_cache_dtype=fmt, k_scale=d["scale"], query_start_loc=d["qsl"],
                                 return_lse=True, backend="triton")
        o_r, l_r = pm.mla_decode(d["q"], d["cache"], d["bt"], d["sl"], softmax_scale=0.04,
                                 kv_cache_dtype=fmt, k_scale=d["scale"], query_start_loc=d["qsl"],
                                 return_lse=True, backend="reference")
        e, le = rel(o_t, o_r), float((l_t - l_r).abs().max())
        ok = e < (2e-2 if fmt == "fp8_ds_mla" else 1e-2) and le < 3e-2
        res.append(dict(check=f"decode b={b} s_q={s_q} h={h} {fmt} page={page}", rel=e, lse=le, ok=ok))
        say(f"  decode b={b} s_q={s_q} h={h} {fmt:10s} page={page:3d}: rel={e:.2e} lse={le:.2e} "
            f"{'OK' if ok else 'FAIL'}")
    # cache write / gather bytes
    for fmt in ("bfloat16", "fp8", "fp8_ds_mla"):
        nb, page, t = 64, 16, 500
        shape = pm.kv_cache_shape(nb, page, fmt)
        dt = {"bfloat16": torch.bfloat16, "fp8": torch.float8_e4m3fn, "fp8_ds_mla": torch.uint8}[fmt]
        a = torch.zeros(shape, dtype=dt, device=DEV)
        bb = torch.zeros(shape, dtype=dt, device=DEV)
        kv_c = torch.randn(t, L, device=DEV) * 3
        k_pe = torch.randn(t, R, device=DEV)
        slots = torch.randperm(nb * page, device=DEV)[:t]
        slots[::7] = -1
        sc = 0.02 if fmt == "fp8" else None
        pm.concat_and_cache_mla(kv_c, k_pe, a, slots, fmt, sc, backend="triton")
        pm.concat_and_cache_mla(kv_c, k_pe, bb, slots, fmt, sc, backend="reference")
        diff = int((a.view(torch.uint8) != bb.view(torch.uint8)).sum())
        bt = torch.randperm(nb, device=DEV).int().view(4, 16)
        lens = torch.tensor([100, 0, 256, 33], dtype=torch.int32, device=DEV)
        ga = pm.gather_cache(a, bt, lens, kv_cache_dtype=fmt, scale=sc, backend="triton")
        gb = pm.gather_cache(a, bt, lens, kv_cache_dtype=fmt, scale=sc, backend="reference")
        ok = diff == 0 and torch.equal(ga, gb)
        res.append(dict(check=f"concat+gather {fmt}", bytes_differ=diff, ok=ok))
        say(f"  concat/gather {fmt}: bytes differ={diff} gather equal={torch.equal(ga, gb)}")
    # merge, prefill
    po, so = torch.randn(64, 16, 512, device=DEV, dtype=torch.bfloat16), torch.randn(
        64, 16, 512, device=DEV, dtype=torch.bfloat16)
    pl, sl = torch.randn(64, 16, device=DEV), torch.randn(64, 16, device=DEV)
    pl[0] = float("-inf")
    po[0] = float("nan")
    ma, mal = pm.merge_attn_states(po, pl, so, sl, backend="triton")
    mb, mbl = pm.merge_attn_states(po, pl, so, sl, backend="reference")
    e = rel(ma, mb)
    res.append(dict(check="merge", rel=e, ok=e < 5e-3))
    say(f"  merge: rel={e:.2e}")
    cq = torch.tensor([0, 100, 350, 357], dtype=torch.int32, device=DEV)
    ck = torch.tensor([0, 300, 550, 600], dtype=torch.int32, device=DEV)
    q = torch.randn(357, 16, 192, device=DEV, dtype=torch.bfloat16)
    k = torch.randn(600, 16, 192, device=DEV, dtype=torch.bfloat16)
    v = torch.randn(600, 16, 128, device=DEV, dtype=torch.bfloat16)
    pa, pal = pm.mla_prefill_attention(q, k, v, cq, ck, 250, 300, softmax_scale=192 ** -0.5,
                                       return_lse=True, backend="triton")
    pb, pbl = pm.mla_prefill_attention(q, k, v, cq, ck, 250, 300, softmax_scale=192 ** -0.5,
                                       return_lse=True, backend="reference")
    e = rel(pa, pb)
    res.append(dict(check="prefill 192/128", rel=e, ok=e < 1e-2))
    say(f"  prefill 192/128 causal: rel={e:.2e} lse={float((pal - pbl).abs().max()):.2e}")


def check_big_cache(res):
    say("== cache > 2^31 elements (bf16, blocks at the top end)")
    per_block = 64 * 576
    nb = (1 << 31) // per_block + 200
    d = build(4, 1, 3000, 16, "bfloat16", page=64, num_blocks=nb, high=True, seed=3)
    say(f"  cache numel={d['cache'].numel()} (> 2^31: {d['cache'].numel() > 2 ** 31}), "
        f"max block id={int(d['bt'].max())}")
    o_t = call(d, "triton")
    o_r = call(d, "reference")
    e = rel(o_t, o_r)
    res.append(dict(check="cache > 2^31", rel=e, ok=e < 1e-2))
    say(f"  rel={e:.2e} {'OK' if e < 1e-2 else 'FAIL'}")
    del d
    torch.cuda.empty_cache()


def check_graph(res):
    say("== CUDA graph capture + replay with new seq_lens / block_table contents")
    d = build(8, 1, 1000, 128, "bfloat16", page=64, seed=5)
    out = torch.empty(8, 128, L, dtype=torch.bfloat16, device=DEV)
    call(d, "triton", out)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        call(d, "triton", out)
    torch.cuda.current_stream().wait_stream(s)
    with torch.cuda.graph(g):
        call(d, "triton", out)
    worst = 0.0
    for _ in range(3):
        cols = d["bt"].shape[1]
        lens = torch.randint(1, cols * 64 + 1, (8,), dtype=torch.int32, device=DEV)  # new lengths
        d["sl"].copy_(lens)
        nb = d["cache"].shape[0]
        d["bt"].copy_(torch.randint(0, nb, (8, cols), device=DEV, dtype=torch.int32))
        d["q"].copy_(torch.randn_like(d["q"]))
        out.fill_(float("nan"))
        g.replay()
        torch.cuda.synchronize()
        ref = call(d, "reference")
        worst = max(worst, rel(out, ref))
    res.append(dict(check="graph replay", rel=worst, ok=worst < 1e-2))
    say(f"  3 replays, worst rel={worst:.2e} {'OK' if worst < 1e-2 else 'FAIL'}")


# ------------------------------------------------------------------------ timings

def _anchor(spec, h, fixed, peers):
    g = parse_spec(spec).groups[0]
    vllm = [peers[p][0] for p in (anchors.VLLM4, anchors.VLLM16) if p in peers]
    return (g.count, g.q_len, g.kv_len, h, fixed, peers[anchors.FLASHMLA][0],
            peers.get(anchors.VLLM4, (None,))[0], min(vllm) if vllm else None)


# b, s_q, S, h, fixed, anchor (FlashMLA us, vLLM 4-split us, vLLM best us): ANCHORS.md's table
# (portmla.bench.anchors)
ROWS = [_anchor(*row) for row in anchors.ROWS]


def time_rows(res, fmts=("bfloat16",)):
    say("== mla_decode timings (CUDA-graph replay median, us)")
    for fmt in fmts:
        for (b, s_q, S, h, fixed, fm, v4, vbest) in ROWS:
            if fmt != "bfloat16" and h != 16:
                continue
            try:
                d = build(b, s_q, S, h, fmt, fixed=fixed, seed=b * 7 + S)
                p = tlaunch.decode_config(pm.current_platform(), b, h, s_q, d["bt"].shape[1] * 64,
                                          fmt, L)
                med, lo, hi = graph_time(d)
                tf, tb = figures(d, b, s_q, h, med)
                row = dict(fmt=fmt, b=b, s_q=s_q, S=S, h=h, us=med, us_min=lo, tflops=tf, tbs=tb,
                           splits=p.num_splits, block_m=p.block_m, block_n=p.block_n,
                           flashmla_us=fm, vllm4_us=v4, vllm_best_us=vbest,
                           speedup_vs_vllm4=(v4 / med) if v4 else None,
                           speedup_vs_vllm_best=(vbest / med) if vbest else None)
                res.append(row)
                say(f"  {fmt:10s} b={b:3d} s_q={s_q} S={S:5d} h={h:3d}: {med:8.1f} us "
                    f"{tf:6.1f} TFLOP/s {tb:5.2f} TB/s splits={p.num_splits} "
                    f"vs vLLM4 {v4 / med if v4 else float('nan'):.2f}x "
                    f"vs vLLMbest {vbest / med if vbest else float('nan'):.2f}x")
                del d
            except Exception:  # noqa: BLE001 - report and go on with the other rows
                say(f"  {fmt} b={b} S={S} h={h}: FAILED\n" + traceback.format_exc())


def _fixed_cfg(bm, bn, w, st):
    """decode_config with the tile fixed to (bm, bn, warps, stages), same split rule."""
    def cfg(plat, ns, nh, mql, mkv, fmt, lora):
        rt = tlaunch.cdiv(mql * nh, bm)
        tiles = tlaunch.cdiv(mkv, bn)
        units = plat.num_compute_units
        min_tiles = max(1, (256 if bm >= 32 else 128) // bn)
        want = min(tlaunch.cdiv(4 * units, ns * rt), max(1, tiles // min_tiles), 64)
        per = tlaunch.cdiv(tiles, max(1, want)) * bn
        return tlaunch.DecodeConfig(bm, bn, w, st, tlaunch.cdiv(mkv, per), per, rt)
    return cfg


TUNE = {  # (h, b, S, formats): [(block_m, block_n, warps, stages)]
    # session 5: the quantized 16-row tile, 8 warps x 64 tokens (one program per SM) against
    # 4 warps x 32 tokens (two per SM), on the same data
    (16, 128, 8192, ("fp8", "fp8_ds_mla")): [(16, 64, 8, 5), (16, 32, 4, 5)],
}


def tune(res):
    say("== tuning variants (block_m, block_n, warps, stages)")
    orig = tdec.decode_config
    for (h, b, S, fmts), variants in TUNE.items():
        for fmt in fmts:
            d = build(b, 1, S, h, fmt, seed=b * 7 + S)
            for (bm, bn, w, st) in variants:
                tdec.decode_config = _fixed_cfg(bm, bn, w, st)
                try:
                    med, lo, hi = graph_time(d, reps=15)
                    tf, tb = figures(d, b, 1, h, med)
                    res.append(dict(tune=True, fmt=fmt, h=h, b=b, S=S, bm=bm, bn=bn, warps=w,
                                    stages=st, us=med))
                    say(f"  {fmt:10s} h={h} b={b} S={S} bm={bm} bn={bn} w={w} st={st}: "
                        f"{med:8.1f} us {tf:6.1f} TFLOP/s {tb:5.2f} TB/s")
                except Exception as e:  # noqa: BLE001
                    say(f"  {fmt} h={h} bm={bm} bn={bn} w={w} st={st}: FAILED "
                        f"{type(e).__name__}: {str(e)[:200]}")
                finally:
                    tdec.decode_config = orig
            del d
            torch.cuda.empty_cache()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tune", action="store_true")
    ap.add_argument("--skip", default="")
    ap.add_argument("--order", default="correct,graph,big,time,time8,tune",
                    help="steps in the order to run them (a timed-out run keeps the first ones)")
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    a = ap.parse_args()
    LOG_PATH.append(os.path.join(a.out, "triton_device_check.log"))
    res: list[dict] = []
    t0 = time.time()
    say(f"device: {pm.current_platform(DEV).device_name} torch {torch.__version__} "
        f"triton {__import__('triton').__version__}")
    steps = dict([("correct", check_correctness), ("graph", check_graph), ("big", check_big_cache),
                  ("time", lambda r: time_rows(r, ("bfloat16",))),
                  ("time8", lambda r: time_rows(r, ("fp8", "fp8_ds_mla"))),
                  ("tune", tune if a.tune else None)])
    for name in a.order.split(","):
        fn = steps[name]
        if fn is None or name in a.skip.split(","):
            continue
        try:
            fn(res)
        except Exception:  # noqa: BLE001
            say(f"{name}: FAILED\n" + traceback.format_exc())
        say(f"[{name} done at {time.time() - t0:.0f}s]")
        with open(os.path.join(a.out, "triton_device_check.json"), "w") as f:
            json.dump(res, f, indent=1, default=str)
    bad = [r for r in res if r.get("ok") is False]
    say(f"correctness failures: {len(bad)}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
