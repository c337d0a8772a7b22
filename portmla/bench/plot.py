"""Roofline PNG: achieved FLOP/s vs arithmetic intensity, one marker per backend, under
the ceilings measured in the same run (min(matmul peak, intensity x copy bandwidth)).
matplotlib is optional (``pip install 'portmla[bench]'``); without it, a message."""

from __future__ import annotations

MISSING = ("roofline.png not written: matplotlib is not installed "
           "(pip install 'portmla[bench]' or pip install matplotlib)")


def have_matplotlib() -> bool:
    try:
        import matplotlib  # noqa: F401
        return True
    except ImportError:
        return False


def roofline(path: str, rows: list[dict], ceilings: dict, title: str) -> str:
    """Write the PNG; returns a one-line note of what was written (or why not)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return MISSING
    ok = [r for r in rows if r["status"] == "OK" and r.get("tflops")]
    if not ok:
        return "roofline.png not written: no row has a time"
    fig, ax = plt.subplots(figsize=(8, 5.5), dpi=120)
    xs = [r["intensity"] for r in ok]
    lo, hi = min(xs) / 2, max(xs) * 2
    peak, bw = ceilings.get("matmul_tflops"), ceilings.get("copy_tbps")
    if peak and bw:
        knee = peak / bw  # TFLOP/s / TB/s = FLOP/byte
        lo, hi = min(lo, knee / 4), max(hi, knee * 4)
        pts = [lo, knee, hi]
        ax.plot(pts, [min(peak, x * bw) for x in pts], "k-", lw=1.5,
                label=f"measured: copy {bw:.3g} TB/s, bf16 matmul {peak:.3g} TFLOP/s")
    markers = "osD^v<>p*hX"
    for i, name in enumerate(sorted({r["backend"] for r in ok})):
        mine = [r for r in ok if r["backend"] == name]
        ax.scatter([r["intensity"] for r in mine], [r["tflops"] for r in mine],
                   marker=markers[i % len(markers)], s=40, label=name, zorder=3)
        for r in mine:
            kv = "" if r["kv_cache_dtype"] == "bfloat16" else f" {r['kv_cache_dtype']}"
            ax.annotate(f"{r['spec']} h{r['heads']}{kv}", (r["intensity"], r["tflops"]), fontsize=6,
                        xytext=(3, 3), textcoords="offset points")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlim(lo, hi)
    ax.set_xlabel("arithmetic intensity (FLOP / byte, ANCHORS.md counting)")
    ax.set_ylabel("achieved TFLOP/s")
    ax.set_title(title, fontsize=9)
    ax.grid(True, which="both", lw=0.3, alpha=0.5)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return f"roofline: {path}"
