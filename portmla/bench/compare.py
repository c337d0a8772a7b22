"""``--compare FILE|anchors``: ratios of this run against a previous bench JSON, or against
the measured anchors of ANCHORS.md (``anchors``, data in ``portmla.bench.anchors``).

Rows match on (spec, heads, kv_cache_dtype, block_size); against a file also on the
backend, against the anchors every anchor peer is listed. ``speedup`` = their time /
our time (> 1: this run is faster). ``throughput ratio`` = our TFLOP/s (or TB/s, where
the other side states only that) / theirs: it corrects for a different random draw of
lengths, which the times do not.
"""

from __future__ import annotations

import json

from . import anchors
from .report import md_table, text_table


def load(source: str) -> tuple[dict, bool]:
    """(results document, cross-backend matching) for a path or ``anchors``."""
    if source == "anchors":
        return anchors.as_results(), True
    try:
        with open(source) as f:
            doc = json.load(f)
    except OSError as e:
        raise ValueError(f"--compare {source!r}: cannot read ({e.strerror}); give a results.json "
                         f"written by 'python -m portmla bench --out DIR', or 'anchors'") from e
    except json.JSONDecodeError as e:
        raise ValueError(f"--compare {source!r}: not JSON ({e})") from e
    if not isinstance(doc, dict) or not isinstance(doc.get("rows"), list):
        raise ValueError(f"--compare {source!r}: no 'rows' list (not a portmla bench JSON)")
    return doc, False


def _key(r: dict) -> tuple:
    return (r.get("spec"), r.get("heads"), r.get("kv_cache_dtype"), r.get("block_size"))


def compare(rows: list[dict], doc: dict, cross_backend: bool) -> list[dict]:
    theirs: dict[tuple, list[dict]] = {}
    for r in doc["rows"]:
        if r.get("status") == "OK" and r.get("median_us"):
            theirs.setdefault(_key(r), []).append(r)
    out = []
    for r in rows:
        if r["status"] != "OK":
            continue
        for t in theirs.get(_key(r), []):
            if not cross_backend and t.get("backend") != r["backend"]:
                continue
            ratio, metric = None, None
            if t.get("tflops") and r.get("tflops"):
                ratio, metric = r["tflops"] / t["tflops"], "TFLOP/s"
            elif t.get("tbps") and r.get("tbps"):
                ratio, metric = r["tbps"] / t["tbps"], "TB/s"
            out.append({"backend": r["backend"], "spec": r["spec"], "heads": r["heads"],
                        "kv_cache_dtype": r["kv_cache_dtype"], "block_size": r["block_size"],
                        "ours_us": r["median_us"], "against": t.get("backend"),
                        "their_us": t["median_us"], "speedup": t["median_us"] / r["median_us"],
                        "throughput_ratio": ratio, "metric": metric})
    return out


def _table(cmp: list[dict]) -> tuple[list[str], list[list[str]]]:
    head = ["backend", "spec", "h", "kv", "bs", "ours us", "against", "their us", "speedup",
            "throughput ratio"]
    body = [[c["backend"], c["spec"], str(c["heads"]), c["kv_cache_dtype"], str(c["block_size"]),
             f"{c['ours_us']:.1f}", str(c["against"]), f"{c['their_us']:.1f}",
             f"{c['speedup']:.3f}",
             "-" if c["throughput_ratio"] is None else f"{c['throughput_ratio']:.3f} ({c['metric']})"]
            for c in cmp]
    return head, body


def header(source: str, doc: dict) -> str:
    m = doc.get("metadata", {})
    what = "the ANCHORS.md anchors" if source == "anchors" else source
    dev = m.get("device_name") or m.get("device")
    return (f"Compared with {what} ({dev or 'unknown device'}, {m.get('date', 'unknown date')}); "
            f"speedup = their time / our time (> 1: this run is faster)")


def text_report(source: str, doc: dict, cmp: list[dict]) -> str:
    if not cmp:
        return header(source, doc) + "\n(no matching OK rows: same spec, heads, kv_cache_dtype, " \
                                     "block_size" + ("" if source == "anchors" else ", backend") + ")"
    return header(source, doc) + "\n" + text_table(*_table(cmp))


def markdown_report(source: str, doc: dict, cmp: list[dict]) -> str:
    body = md_table(*_table(cmp)) if cmp else "(no matching rows)"
    return f"## Comparison\n\n{header(source, doc)}.\n\n{body}"
