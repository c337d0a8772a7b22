"""One configuration, one backend: first call, correctness gate, then timing.

The gate: the output of the first timed launch (a graph replay when graphs are on) of
cache copy 0, with its output buffer poisoned with NaN beforehand, is compared with
``backend="reference"`` on the same inputs. A relative error above the format's
tolerance (or any NaN/inf) marks the row FAILED and no time is reported.
"""

from __future__ import annotations

import math
import traceback

import torch

import portmla as pm

from . import counting, peers
from .inputs import DecodeInputs
from .timing import measure, prepare

# Relative L2 error vs the reference allowed per cache format. A bf16 kernel (bf16 P and
# output) lands near 5e-3; one missing 64-token block of 4096 gives ~1e-1. The fp8 formats
# allow more because kernels may also round q / P to 8 bits while the reference stays fp32.
TOLERANCES = {"bfloat16": 2e-2, "float16": 2e-2, "fp8": 6e-2, "fp8_ds_mla": 6e-2}

OK, FAILED, UNSUPPORTED, ERROR = "OK", "FAILED", "UNSUPPORTED", "ERROR"


def reference_output(inp: DecodeInputs) -> torch.Tensor:
    """The reference backend's output for cache copy 0 (float32)."""
    return pm.mla_decode(**inp.decode_kwargs(0), backend="reference").float()


def rel_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    o = out.float()
    if not bool(torch.isfinite(o).all()):
        return math.inf
    return float((o - ref).norm() / ref.norm().clamp_min(1e-30))


def base_row(inp: DecodeInputs, backend: str, kind: str) -> dict:
    flop = counting.decode_flop(inp.q_lens, inp.seq_lens_list, inp.heads, inp.kv_lora_rank,
                                inp.rope_dim)
    nbytes = counting.decode_bytes(inp.q_lens, inp.seq_lens_list, inp.heads, inp.kv_cache_dtype,
                                   inp.kv_lora_rank, inp.rope_dim,
                                   q_bytes=inp.q.element_size(), out_bytes=inp.q.element_size())
    return {"backend": backend, "kind": kind, "spec": inp.spec.text, "num_seqs": len(inp.q_lens),
            "num_tokens": sum(inp.q_lens), "max_query_len": inp.max_query_len,
            "heads": inp.heads, "kv_cache_dtype": inp.kv_cache_dtype,
            "block_size": inp.block_size, "kv_lora_rank": inp.kv_lora_rank,
            "rope_dim": inp.rope_dim, "fixed": inp.fixed, "mean_seq_len": inp.mean_seq_len,
            "total_kv_tokens": sum(inp.seq_lens_list), "layers": inp.layers,
            "flop": flop, "bytes": nbytes, "intensity": counting.intensity(flop, nbytes),
            "status": None, "error": "", "rel_err": None, "tol": None, "graphs": False,
            "method": "", "note": "", "median_us": None, "min_us": None, "max_us": None,
            "repeats": 0, "tflops": None, "tbps": None, "pct_matmul": None, "pct_copy": None}


def portmla_calls(inp: DecodeInputs, backend: str):
    """One callable per cache copy, all writing into one output buffer; and that buffer."""
    out = torch.empty(len(inp.q_lens) and sum(inp.q_lens), inp.heads, inp.kv_lora_rank,
                      dtype=inp.q.dtype, device=inp.q.device)

    def call(layer: int):
        return pm.mla_decode(**inp.decode_kwargs(layer), out=out, backend=backend)

    return [lambda i=i: call(i) for i in range(inp.layers)], out


def run_one(inp: DecodeInputs, ref: torch.Tensor, backend: str, kind: str, *, graphs: bool,
            warmup: int, repeats: int, ceilings: dict, rtol: float | None = None) -> dict:
    """A result row for ``backend`` (kind "portmla" or "peer") on ``inp``."""
    row = base_row(inp, backend, kind)
    dev = inp.q.device
    tol = rtol if rtol is not None else TOLERANCES[inp.kv_cache_dtype]
    row["tol"] = tol
    try:
        if kind == "peer":
            calls, buffer = peers.make_calls(backend, inp), None  # fresh output per call
            use_graphs = graphs
        else:
            calls, buffer = portmla_calls(inp, backend)
            use_graphs = graphs and pm.probe(dev)[backend].cuda_graphs
        calls[0]()  # eager first call: raises UnsupportedError before anything is captured
        prepared = prepare(calls, dev, use_graphs)
        first = prepared.launchers[0]
        poison = first.output if first.output is not None else buffer
        if poison is not None:  # so an output the kernel never wrote shows as NaN
            poison.fill_(float("nan"))
        out = first.run()
        err = rel_error(out, ref)
        row["rel_err"] = err
        if not err <= tol:
            row.update(status=FAILED, error=f"relative error {err:.3g} > tolerance {tol:g} vs "
                                            f"the reference backend")
            return row
        t = measure(prepared, dev, warmup, repeats)
    except pm.UnsupportedError as e:
        why = "; ".join(r for rs in e.reasons.values() for r in rs) or str(e)
        row.update(status=UNSUPPORTED, error=why)
        return row
    except peers.PeerUnsupported as e:
        row.update(status=UNSUPPORTED, error=str(e))
        return row
    except torch.cuda.OutOfMemoryError as e:
        row.update(status=ERROR, error=f"out of memory: {' '.join(str(e).split())[:200]}")
        return row
    except Exception as e:  # noqa: BLE001 - one backend's crash must not end the sweep
        tb = traceback.extract_tb(e.__traceback__)[-1]
        row.update(status=ERROR, error=f"{type(e).__name__}: {' '.join(str(e).split())[:300]} "
                                       f"({tb.filename.rsplit('/', 1)[-1]}:{tb.lineno})")
        return row
    med = t.median_us
    tflops = row["flop"] / (med * 1e-6) / 1e12
    tbps = row["bytes"] / (med * 1e-6) / 1e12
    row.update(status=OK, graphs=t.graphs, method=t.method, note=t.note, median_us=med,
               min_us=t.min_us, max_us=t.max_us, repeats=len(t.times_us), tflops=tflops,
               tbps=tbps)
    if ceilings.get("matmul_tflops"):
        row["pct_matmul"] = 100.0 * tflops / ceilings["matmul_tflops"]
    if ceilings.get("copy_tbps"):
        row["pct_copy"] = 100.0 * tbps / ceilings["copy_tbps"]
    return row
