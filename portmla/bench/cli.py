"""``python -m portmla bench``: time ``mla_decode`` per backend on vLLM-style batch specs.

Example (what the H100 table in benchmarks/results comes from)::

    python -m portmla bench --preset anchors --backends all --peers \\
        --out benchmarks/results/h100 --compare anchors

Every configuration is checked against the reference backend before it is timed; a
wrong result is reported as FAILED with its error, never with a time.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

import portmla as pm

from . import anchors, compare, peers, plot, report
from .ceilings import measure_ceilings
from .inputs import build_inputs
from .measure import ERROR, FAILED, UNSUPPORTED, base_row, reference_output, run_one
from .specs import GRAMMAR, parse_spec, parse_specs

PRESETS = ("anchors",)
GPU_DEFAULTS = {"specs": "32q1s4k,128q1s4k,128q2s4k,128q1s8k", "heads": "128,16",
                "warmup": 20, "repeats": 100}
CPU_DEFAULTS = {"specs": "2q1s256,2q2s256", "heads": "16", "warmup": 1, "repeats": 3}
# Backends that loop over sequences on the host are timed with few repeats: their time is
# informative, and the full count would make a GPU sweep take many minutes.
SLOW_BACKENDS = {"reference": (1, 3)}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m portmla bench", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backends", default="all",
                   help="comma list of backends, or 'all' (every backend probe() reports "
                        "available); registered: " + ", ".join(pm.list_backends()))
    p.add_argument("--specs", default=None,
                   help=f"comma list of batch specs, {GRAMMAR}; default: "
                        f"{GPU_DEFAULTS['specs']} on GPUs, {CPU_DEFAULTS['specs']} on CPU")
    p.add_argument("--heads", default=None, help="comma list of query head counts (default "
                                                 "128,16 on GPUs, 16 on CPU)")
    p.add_argument("--preset", choices=PRESETS, default=None,
                   help="'anchors': exactly the (spec, heads) rows of ANCHORS.md, bf16 block 64")
    p.add_argument("--kv-cache-dtype", default="bfloat16",
                   help="comma list of KV formats: auto, bfloat16, float16, fp8, fp8_ds_mla")
    p.add_argument("--block-size", default="64", help="comma list of block sizes (default 64)")
    p.add_argument("--kv-lora-rank", type=int, default=512)
    p.add_argument("--rope-dim", type=int, default=64)
    p.add_argument("--fixed", action="store_true",
                   help="every KV length = S (default: normal(S, S/2) clamped at the query "
                        "length, fixed only above 16k)")
    p.add_argument("--layers", default="auto",
                   help="cache copies used in rotation to defeat L2 (default auto: ~256 MiB "
                        "touched per rotation, at most 16 on GPUs, 4 on CPU)")
    p.add_argument("--graphs", action=argparse.BooleanOptionalAction, default=True,
                   help="time CUDA-graph replays on cuda/rocm where the backend can be "
                        "captured (default on)")
    p.add_argument("--warmup", type=int, default=None, help="warmup launches (20 GPU, 1 CPU)")
    p.add_argument("--repeats", type=int, default=None, help="timed launches (100 GPU, 3 CPU)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--rtol", type=float, default=None,
                   help="relative-error tolerance of the correctness gate (default per format: "
                        "2e-2 for 16-bit caches, 6e-2 for fp8 ones)")
    p.add_argument("--peers", action="store_true",
                   help="also time flash_mla / flashinfer on the same inputs when importable")
    p.add_argument("--compare", default=None, metavar="FILE|anchors",
                   help="print ratios against a previous results.json, or the ANCHORS.md table")
    p.add_argument("--no-ceilings", dest="ceilings", action="store_false",
                   help="skip measuring copy bandwidth and matmul throughput")
    p.add_argument("--out", default=None, metavar="DIR",
                   help="write results.json, results.csv, results.md, roofline.png there")
    p.add_argument("--device", default=None, help="torch device (default: the current GPU, "
                                                  "else cpu)")
    return p


def _ints(name: str, text: str) -> list[int]:
    try:
        vals = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"--{name} {text!r}: expected a comma list of integers") from None
    if not vals or any(v < 1 for v in vals):
        raise ValueError(f"--{name} {text!r}: expected integers >= 1")
    return vals


def _configs(args, gpu: bool) -> list[tuple]:
    d = GPU_DEFAULTS if gpu else CPU_DEFAULTS
    if args.preset == "anchors":
        if args.specs or args.heads:
            raise ValueError("--preset anchors fixes the specs and heads; leave out --specs/--heads")
        pairs = [(parse_spec(s), h) for s, h in anchors.preset()]
    else:
        specs = parse_specs(args.specs or d["specs"])
        pairs = [(s, h) for s in specs for h in _ints("heads", args.heads or d["heads"])]
    fmts = [f.strip() for f in args.kv_cache_dtype.split(",") if f.strip()]
    for f in fmts:
        pm.kv_formats.canonical_format(f)  # raises with the allowed names
    sizes = _ints("block-size", args.block_size)
    return [(s, h, f, b) for s, h in pairs for f in fmts for b in sizes]


def _backends(text: str, device) -> tuple[list[str], dict]:
    info = pm.probe(device)
    if text.strip() == "all":
        return [n for n, i in info.items() if i.available], info
    names = [n.strip() for n in text.split(",") if n.strip()]
    for n in names:
        if n not in info:
            raise ValueError(f"--backends: unknown backend {n!r} (registered: "
                             f"{', '.join(info)}, or 'all')")
    if not names:
        raise ValueError("--backends names no backend")
    return names, info


def _layers(text: str) -> int | None:
    if text == "auto":
        return None
    return _ints("layers", text)[0]


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["bench"]:
        argv = argv[1:]
    args = build_parser().parse_args(argv)
    try:
        device = torch.device(args.device) if args.device else pm.current_platform().torch_device
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"--device {args.device}: this torch has no usable CUDA/HIP device")
        if device.type == "xpu" and not (hasattr(torch, "xpu") and torch.xpu.is_available()):
            raise ValueError(f"--device {args.device}: this torch has no usable XPU device")
        if device.type in ("cuda", "xpu") and device.index is None:
            device = pm.current_platform(device).torch_device  # the current device's index
        if device.type == "cuda":
            torch.cuda.set_device(device)
        gpu = device.type != "cpu"
        configs = _configs(args, gpu)
        backends, info = _backends(args.backends, device)
        layers = _layers(args.layers)
        cmp_doc = compare.load(args.compare) if args.compare else None
    except ValueError as e:
        print(f"portmla bench: error: {e}", file=sys.stderr)
        return 2
    d = GPU_DEFAULTS if gpu else CPU_DEFAULTS
    warmup = d["warmup"] if args.warmup is None else args.warmup
    repeats = d["repeats"] if args.repeats is None else args.repeats

    peer_names: list[str] = []
    peer_status: dict[str, str | None] = {}
    if args.peers:
        for name, why in peers.availability().items():
            if why is None:
                peer_names.append(name)
                peer_status[name] = peers.version(name)
            else:
                peer_status[name] = why
                print(f"peer {name}: {why}; no {name} rows", file=sys.stderr)
    print(f"portmla bench on {pm.current_platform(device).device_name} ({device}); backends: "
          f"{', '.join(backends) or 'none'}"
          + (f"; peers: {', '.join(peer_names)}" if peer_names else ""), file=sys.stderr)

    ceilings = measure_ceilings(device) if args.ceilings else {}
    if ceilings:
        print(f"ceilings: {report.ceilings_text(ceilings)}", file=sys.stderr)
    rows = sweep(configs, backends, info, peer_names, device, args, layers, warmup, repeats,
                 ceilings)

    print(report.terminal_report(rows, ceilings))
    cmp_rows, cmp_md = None, None
    if cmp_doc is not None:
        doc, cross = cmp_doc
        cmp_rows = compare.compare(rows, doc, cross)
        print()
        print(compare.text_report(args.compare, doc, cmp_rows))
        cmp_md = compare.markdown_report(args.compare, doc, cmp_rows)
    if args.out:
        settings = {"warmup": warmup, "repeats": repeats, "graphs": args.graphs, "seed": args.seed,
                    "layers": args.layers, "fixed": args.fixed, "preset": args.preset,
                    "peers": peer_status}
        write_outputs(args.out, report.metadata(device, argv, settings), ceilings, rows,
                      args.compare, cmp_rows, cmp_md)
    bad = [r for r in rows if r["status"] in (FAILED, ERROR)]
    return 1 if bad else 0


def sweep(configs, backends, info, peer_names, device, args, layers, warmup, repeats,
          ceilings) -> list[dict]:
    rows: list[dict] = []
    progress = report.Progress(len(configs) * (len(backends) + len(peer_names)))
    for spec, heads, fmt, bs in configs:
        label = f"{spec.text} h={heads} {fmt} bs={bs}"
        try:
            inp = build_inputs(spec, heads, fmt, bs, device=device, kv_lora_rank=args.kv_lora_rank,
                               rope_dim=args.rope_dim, fixed=args.fixed, layers=layers,
                               seed=args.seed)
            ref = reference_output(inp)
        except Exception as e:  # noqa: BLE001 - the configuration is reported, the sweep goes on
            for name in backends + peer_names:
                progress.step(f"{name} {label}")
                rows.append(_config_error_row(spec, heads, fmt, bs, name, e))
            _free(device)
            continue
        for name in backends:
            progress.step(f"{name} {label}")
            if not info[name].available:
                row = base_row(inp, name, "portmla")
                row.update(status=UNSUPPORTED, error="unavailable: " + "; ".join(info[name].reasons))
            else:
                w, r = SLOW_BACKENDS.get(name, (warmup, repeats))
                row = run_one(inp, ref, name, "portmla", graphs=args.graphs,
                              warmup=min(w, warmup), repeats=min(r, repeats), ceilings=ceilings,
                              rtol=args.rtol)
            rows.append(row)
        for name in peer_names:
            progress.step(f"{name} {label}")
            rows.append(run_one(inp, ref, name, "peer", graphs=args.graphs, warmup=warmup,
                                repeats=repeats, ceilings=ceilings, rtol=args.rtol))
        del inp, ref
        _free(device)
    progress.close()
    return rows


def _config_error_row(spec, heads, fmt, bs, name, e) -> dict:
    msg = " ".join(str(e).split())[:300]
    status = ERROR
    if isinstance(e, torch.cuda.OutOfMemoryError):
        msg = "out of memory building the inputs / reference: " + msg[:200]
    return {"backend": name, "kind": "peer" if name in peers.PEERS else "portmla",
            "spec": spec.text, "num_seqs": spec.num_seqs, "num_tokens": spec.num_tokens,
            "max_query_len": spec.max_query_len, "heads": heads, "kv_cache_dtype": fmt,
            "block_size": bs, "status": status, "error": f"{type(e).__name__}: {msg}",
            **{k: None for k in ("median_us", "min_us", "max_us", "tflops", "tbps", "pct_matmul",
                                 "pct_copy", "rel_err", "tol", "flop", "bytes", "intensity",
                                 "mean_seq_len", "total_kv_tokens", "layers", "fixed")},
            "graphs": False, "repeats": 0, "method": "", "note": ""}


def _free(device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()


def write_outputs(out_dir, meta, ceilings, rows, cmp_source, cmp_rows, cmp_md) -> None:
    os.makedirs(out_dir, exist_ok=True)
    png = os.path.join(out_dir, "roofline.png")
    plot_note = plot.roofline(png, rows, ceilings,
                              f"portmla mla_decode on {meta['device_name']} ({meta['date']})")
    extra = {}
    if cmp_rows is not None:
        extra["compare"] = {"against": cmp_source, "rows": cmp_rows}
    report.write_json(os.path.join(out_dir, "results.json"), meta, ceilings, rows, extra)
    report.write_csv(os.path.join(out_dir, "results.csv"), rows)
    report.write_markdown(os.path.join(out_dir, "results.md"), meta, ceilings, rows, cmp_md,
                          None if plot_note.startswith("roofline:") else plot_note)
    written = ["results.json", "results.csv", "results.md"]
    if plot_note.startswith("roofline:"):
        written.append("roofline.png")
    print(f"wrote {', '.join(written)} to {out_dir}", file=sys.stderr)
    if not plot_note.startswith("roofline:"):
        print(plot_note, file=sys.stderr)
