"""Output: a progress line per configuration, the terminal table, and JSON / CSV /
Markdown files with the run's metadata (date, device, versions, git commit)."""

from __future__ import annotations

import csv
import datetime as _dt
import io
import json
import os
import platform as _pyplatform
import subprocess
import sys

import torch

CSV_COLUMNS = (
    "backend", "kind", "spec", "num_seqs", "num_tokens", "max_query_len", "heads",
    "kv_cache_dtype", "block_size", "kv_lora_rank", "rope_dim", "fixed", "mean_seq_len",
    "total_kv_tokens", "layers", "status", "median_us", "min_us", "max_us", "repeats", "tflops",
    "tbps", "pct_matmul", "pct_copy", "flop", "bytes", "intensity", "rel_err", "tol", "graphs",
    "method", "note", "error",
)


# ---------------------------------------------------------------------------- metadata


def git_commit() -> str | None:
    """``<sha>`` (``-dirty`` when the work tree has changes) of the checkout portmla runs from.

    A copy without ``.git`` (e.g. a tree shipped to a GPU machine) can name its commit in
    ``PORTMLA_GIT_COMMIT``.
    """
    if os.environ.get("PORTMLA_GIT_COMMIT"):
        return os.environ["PORTMLA_GIT_COMMIT"]
    here = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    try:
        sha = subprocess.run(["git", "-C", here, "rev-parse", "HEAD"], capture_output=True,
                             text=True, timeout=10)
        if sha.returncode != 0:
            return None
        dirty = subprocess.run(["git", "-C", here, "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10)
        return sha.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return None


def _version(mod: str) -> str | None:
    try:
        m = __import__(mod)
        return str(getattr(m, "__version__", "unknown"))
    except Exception:  # noqa: BLE001 - not installed or broken: recorded as None
        return None


def metadata(device: torch.device, argv: list[str], settings: dict) -> dict:
    import portmla as pm

    p = pm.current_platform(device)
    return {
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "device": str(device), "device_name": p.device_name, "platform": p.kind,
        "arch": p.arch, "compute_units": p.num_compute_units,
        "portmla": pm.__version__, "git_commit": git_commit(),
        "torch": torch.__version__, "cuda": getattr(torch.version, "cuda", None),
        "hip": getattr(torch.version, "hip", None), "triton": _version("triton"),
        "python": _pyplatform.python_version(), "host_cpu": _pyplatform.processor() or None,
        "command": "python -m portmla bench " + " ".join(argv),
        "counting": "ANCHORS.md: FLOP = sum_b h*s_q*S_b*2*(d+dv); bytes = sum_b (s_q*h*d*2 + "
                    "S_b*bytes_per_token + s_q*h*dv*2)",
        **settings,
    }


# ---------------------------------------------------------------------------- progress


class Progress:
    """A plain-text progress bar on stderr (one line per step when not a terminal)."""

    def __init__(self, total: int, stream=None, width: int = 24):
        self.total, self.done, self.width = max(total, 1), 0, width
        self.stream = stream or sys.stderr
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())

    def step(self, label: str) -> None:
        filled = int(self.width * self.done / self.total)
        bar = "#" * filled + "-" * (self.width - filled)
        line = f"[{bar}] {self.done}/{self.total} {label}"
        if self.tty:
            self.stream.write("\r\033[K" + line)
        else:
            self.stream.write(line + "\n")
        self.stream.flush()
        self.done += 1

    def close(self) -> None:
        if self.tty:
            self.stream.write("\r\033[K")
        self.stream.write(f"[{'#' * self.width}] {self.total}/{self.total} done\n")
        self.stream.flush()


# ------------------------------------------------------------------------------ tables


def _f(v, fmt: str) -> str:
    if v is None or v == "":
        return "-"
    try:
        return format(v, fmt)
    except (TypeError, ValueError):
        return str(v)


def table_rows(rows: list[dict]) -> tuple[list[str], list[list[str]]]:
    head = ["backend", "spec", "h", "kv", "bs", "len", "mean S", "status", "median us", "TFLOP/s", "TB/s",
            "%mm", "%copy", "rel err", "graphs"]
    body = []
    for r in rows:
        body.append([
            r["backend"], r["spec"], str(r["heads"]), r["kv_cache_dtype"], str(r["block_size"]),
            "fixed" if r.get("fixed") else "varlen", _f(r.get("mean_seq_len"), ".0f"), r["status"], _f(r["median_us"], ".1f"),
            _f(r["tflops"], ".4g"), _f(r["tbps"], ".3g"), _f(r["pct_matmul"], ".3g"),
            _f(r["pct_copy"], ".3g"), _f(r["rel_err"], ".1e"), "yes" if r.get("graphs") else "no"])
    return head, body


def text_table(head: list[str], body: list[list[str]]) -> str:
    widths = [max([len(h)] + [len(b[i]) for b in body]) for i, h in enumerate(head)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(head, widths)),
             "  ".join("-" * w for w in widths)]
    lines += ["  ".join(c.ljust(w) for c, w in zip(b, widths)) for b in body]
    return "\n".join(lines)


def md_table(head: list[str], body: list[list[str]]) -> str:
    esc = [[c.replace("|", "\\|") for c in b] for b in body]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    lines += ["| " + " | ".join(b) + " |" for b in esc]
    return "\n".join(lines)


def problems(rows: list[dict]) -> list[str]:
    return [f"{r['backend']} {r['spec']} h={r['heads']} {r['kv_cache_dtype']} bs={r['block_size']}: "
            f"{r['status']}: {r['error']}" for r in rows if r["status"] != "OK"]


def ceilings_text(c: dict) -> str:
    parts = []
    if c.get("copy_tbps") is not None:
        parts.append(f"device copy {c['copy_tbps']:.3g} TB/s (read+write, "
                     f"{c['copy_bytes'] / 2**20:.0f} MiB)")
    if c.get("matmul_tflops") is not None:
        n = c["matmul_n"]
        parts.append(f"bf16 {n}x{n}x{n} matmul {c['matmul_tflops']:.3g} TFLOP/s")
    for k in ("copy_error", "matmul_error"):
        if c.get(k):
            parts.append(f"{k}: {c[k]}")
    return "; ".join(parts) if parts else "not measured"


def terminal_report(rows: list[dict], ceilings: dict) -> str:
    out = [f"ceilings: {ceilings_text(ceilings)}", text_table(*table_rows(rows))]
    bad = problems(rows)
    if bad:
        out.append("not OK:")
        out += [f"  {b}" for b in bad]
    return "\n".join(out)


# ------------------------------------------------------------------------------ files


def write_json(path: str, meta: dict, ceilings: dict, rows: list[dict], extra: dict | None = None):
    doc = {"metadata": meta, "ceilings": ceilings, "rows": rows, **(extra or {})}
    with open(path, "w") as f:
        json.dump(doc, f, indent=1, default=_json_default, allow_nan=True)
        f.write("\n")


def _json_default(o):
    if isinstance(o, (torch.dtype, torch.device)):
        return str(o)
    raise TypeError(f"not JSON serializable: {type(o).__name__}")


def write_csv(path: str, rows: list[dict]) -> None:
    with open(path, "w", newline="") as f:
        f.write(csv_text(rows))


def csv_text(rows: list[dict]) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(CSV_COLUMNS), extrasaction="ignore")
    w.writeheader()
    for r in rows:
        w.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in CSV_COLUMNS})
    return buf.getvalue()


def write_markdown(path: str, meta: dict, ceilings: dict, rows: list[dict],
                   compare_md: str | None = None, plot_note: str | None = None) -> None:
    lines = [f"# portmla bench: {meta.get('device_name')} ({meta.get('arch')})", ""]
    for k in ("date", "platform", "device", "portmla", "git_commit", "torch", "cuda", "hip",
              "triton", "python", "command", "warmup", "repeats", "graphs", "seed", "layers",
              "peers"):
        if k in meta:
            lines.append(f"- {k}: `{meta[k]}`")
    lines += ["", f"Ceilings (same run): {ceilings_text(ceilings)}.", "",
              "Counting (ANCHORS.md): FLOP = Σ_b h·s_q·S_b·2·(d+dv), bytes = Σ_b (s_q·h·d·2 + "
              "S_b·bytes/token + s_q·h·dv·2), with the real per-sequence lengths. "
              "Time: median of repeats; `graphs` says whether they were CUDA-graph replays. "
              "%mm / %copy: achieved vs the measured matmul / copy ceiling.", "",
              md_table(*table_rows(rows)), ""]
    bad = problems(rows)
    if bad:
        lines += ["## Rows without a time", ""] + [f"- {b}" for b in bad] + [""]
    notes = sorted({r["note"] for r in rows if r.get("note")})
    if notes:
        lines += ["## Notes", ""] + [f"- {n}" for n in notes] + [""]
    if compare_md:
        lines += [compare_md, ""]
    if plot_note:
        lines += [plot_note, ""]
    with open(path, "w") as f:
        f.write("\n".join(lines))
