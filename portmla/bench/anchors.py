"""The measured anchors of ANCHORS.md, as data, so ``--compare anchors`` can print ratios.

Source: portmla's ANCHORS.md ("Performance anchors (measured) and how they are
counted"), measured on one NVIDIA H100 80GB HBM3 (132 SMs) on 2026-11-21, one run,
bf16 cache, block size 64, median of CUDA-graph replays, varlen lengths drawn from
normal(S, S/2) clamped at s_q (fixed above 16k). Peers measured there:
FlashMLA's sm90 dense decode kernel (https://github.com/deepseek-ai/FlashMLA) and
vLLM's TRITON_MLA decode kernel (https://github.com/vllm-project/vllm), run with
4 KV splits as vLLM runs it, and with 16 splits.

Throughput numbers are the ones printed in the table (None where the table gives only
a time). They were counted with that run's random lengths, which is why the varlen
rows sit ~3 % above a count with every length equal to S (e.g. 128q1s4k h128 at
289 us is 505 TFLOP/s with fixed lengths; the table says 522).
"""

from __future__ import annotations

SOURCE = ("portmla ANCHORS.md: one NVIDIA H100 80GB HBM3 (132 SMs), 2026-11-21, bf16 cache, "
          "block 64, median of CUDA-graph replays")
DEVICE = "NVIDIA H100 80GB HBM3"
DATE = "2026-11-21"
KV_CACHE_DTYPE = "bfloat16"
BLOCK_SIZE = 64
CEILINGS = {"copy_tbps": 2.44, "matmul_tflops": 769.0, "matmul_n": 8192,
            "datasheet_bf16_tflops": 989.0, "datasheet_hbm_tbps": 3.35}

FLASHMLA = "FlashMLA (sm90 dense)"
VLLM4 = "vLLM TRITON_MLA (4 splits)"
VLLM16 = "vLLM TRITON_MLA (16 splits)"
PEERS = (FLASHMLA, VLLM4, VLLM16)

# (spec, heads, fixed lengths, {peer: (time_us, TFLOP/s or None, TB/s or None)})
ROWS: tuple[tuple[str, int, bool, dict[str, tuple[float, float | None, float | None]]], ...] = (
    ("128q1s4k", 128, False, {FLASHMLA: (289.0, 522.0, None), VLLM4: (2144.0, 70.0, None),
                              VLLM16: (2354.0, None, None)}),
    ("128q2s4k", 128, False, {FLASHMLA: (484.0, 622.0, None)}),
    ("128q1s8k", 128, False, {FLASHMLA: (530.0, 568.0, None), VLLM4: (4054.0, 74.0, None),
                              VLLM16: (4377.0, None, None)}),
    ("64q1s16k", 128, False, {FLASHMLA: (526.0, 582.0, None), VLLM4: (4283.0, 71.0, None),
                              VLLM16: (4185.0, None, None)}),
    ("128q1s8k", 16, False, {FLASHMLA: (428.0, None, 2.92), VLLM4: (760.0, None, 1.64),
                             VLLM16: (608.0, None, 2.06)}),
    ("64q1s32k", 16, True, {FLASHMLA: (811.0, None, 2.98), VLLM4: (892.0, None, 2.71),
                            VLLM16: (925.0, None, None)}),
    ("32q1s4k", 128, False, {FLASHMLA: (81.5, 450.0, None), VLLM4: (534.0, None, None),
                             VLLM16: (548.0, None, None)}),
    ("1q1s32k", 128, True, {FLASHMLA: (40.6, 225.0, None), VLLM4: (668.0, None, None),
                            VLLM16: (177.0, None, None)}),
    ("8q1s8k", 16, False, {FLASHMLA: (37.0, None, 1.87), VLLM4: (300.0, None, None),
                           VLLM16: (89.6, None, None)}),
)


def preset() -> list[tuple[str, int]]:
    """The (spec, heads) configurations of the anchor table, in its order."""
    return [(spec, heads) for spec, heads, _, _ in ROWS]


def as_results() -> dict:
    """The anchor table in the bench JSON format (``rows`` with backend = the peer)."""
    rows = []
    for spec, heads, fixed, peers in ROWS:
        for peer, (us, tflops, tbps) in peers.items():
            rows.append({"backend": peer, "spec": spec, "heads": heads,
                         "kv_cache_dtype": KV_CACHE_DTYPE, "block_size": BLOCK_SIZE,
                         "fixed": fixed, "status": "OK", "median_us": us,
                         "tflops": tflops, "tbps": tbps})
    return {"metadata": {"source": SOURCE, "device": DEVICE, "date": DATE},
            "ceilings": dict(CEILINGS), "rows": rows}
