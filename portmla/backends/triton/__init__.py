"""Portable Triton backend: one set of kernels for NVIDIA, AMD and Intel GPUs.

Capabilities: any block size (a KV tile may span pages; reported: every engine size),
every KV format (bf16 / fp16 / per-tensor fp8 / fp8_ds_mla, dequantized in the kernel),
1..128 query heads, any number of causal query tokens per sequence, padded and
cross-layer caches (arbitrary page / token strides, 64-bit offsets), LSE output, and
CUDA-graph capture (no host reads: split counts and scratch sizes come from shapes).

On Hopper (sm_90) the 64-row tiles of 16-bit and per-tensor fp8 caches run a Gluon kernel
(``decode_gluon.py``: explicit warpgroup layouts, TMA, a warp-specialized loader) where the
layout allows it; ``kernels()`` (``probe()`` / ``info``) says which kernel serves what.

On the CPU it runs only under Triton's interpreter (``TRITON_INTERPRET=1``), which is
how it is tested there. Importing portmla never fails because Triton is missing: the
backend then reports ``not installed: ...``. Kernel modules are imported lazily.
"""

from __future__ import annotations

import functools
import os

import torch

from ...platform import Platform
from ...reasons import Reason
from ..base import Backend


def _triton_version() -> str:
    import triton

    return triton.__version__


@functools.cache
def _triton_import_error() -> str | None:
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception as e:  # noqa: BLE001 - recorded as a reason, never raised
        return f"{type(e).__name__}: {e}"
    return None


class TritonBackend(Backend):
    NAME = "triton"
    PLATFORMS = ("cuda", "rocm", "xpu", "cpu")
    DTYPES = (torch.bfloat16, torch.float16, torch.float32)  # q / prefill: 16-bit only
    DOT_DTYPES = (torch.bfloat16, torch.float16)
    KV_CACHE_DTYPES = ("bfloat16", "float16", "fp8", "fp8_ds_mla")
    BLOCK_SIZES = None  # any block size >= 1
    MAX_NUM_HEADS = 128
    MAX_QUERY_LEN = 1 << 30
    STRIDED_KV = True
    RETURNS_LSE = True
    CUDA_GRAPHS = True
    # fp8_ds_mla: fp8 * tile scale is rounded to bf16 before the tensor-core dot
    DECODE_TOLERANCE = {"fp8_ds_mla": (2e-2, 3e-2)}

    def availability(self, platform: Platform) -> list[Reason]:
        out = super().availability(platform)
        if out:
            return out
        err = _triton_import_error()
        if err is not None:
            return [Reason("not_installed", f"not installed: triton ({err})")]
        if platform.kind == "cpu":
            from .launch import interpreting

            if not interpreting():
                return [Reason("platform", "platform=cpu needs TRITON_INTERPRET=1 (Triton runs on "
                                           "the CPU only through its interpreter)")]
        return out

    def kernels(self, platform: Platform) -> tuple[str, ...]:
        """The decode kernels this device runs (``probe()`` / ``info``), then how the scheduled
        decode's kernels are launched where that differs from plain stream order."""
        from .launch import use_pdl

        pdl = ("mla_decode launch: schedule -> decode -> pieces combine with programmatic dependent "
               "launch (each kernel starts while the one before finishes; PORTMLA_TRITON_PDL=0 turns it off)",)
        return self._decode_kernels(platform) + (pdl if use_pdl(platform) else ())

    def _decode_kernels(self, platform: Platform) -> tuple[str, ...]:
        """On sm_90 the Gluon kernel where ``launch.use_gluon`` allows it, the Triton kernels for
        everything else."""
        from .launch import use_gluon

        triton_k = "mla_decode: Triton kernels (tl.dot tiles of 16-64 query rows)"
        if platform.kind != "cuda" or platform.capability is None or platform.capability[0] != 9:
            return (triton_k + " for every call",)
        if not use_gluon(platform, 64, "bfloat16", 512):
            from .decode_gluon import HAVE_GLUON, TESTED_TRITON

            why = ("PORTMLA_TRITON_GLUON=0" if os.environ.get("PORTMLA_TRITON_GLUON") == "0" else
                   "no triton.experimental.gluon" if not HAVE_GLUON else
                   f"Triton {_triton_version()} is not a tested release ({', '.join(TESTED_TRITON)}; "
                   f"PORTMLA_TRITON_GLUON=1 allows it)")
            return (triton_k + f" for every call (the Hopper Gluon kernel is off: {why})",)
        fmts = "bfloat16/float16/fp8" if use_gluon(platform, 64, "fp8", 512) else "bfloat16/float16"
        wide = (f"mla_decode: Hopper Gluon kernel (TMA, wgmma, a warp-specialized loader) for {fmts} caches "
                f"with more than 32 (token, head) rows per sequence, DeepSeek dims (512 + 64), block sizes "
                f"8, 16, 32 or multiples of 64 and 16-byte strides")
        if not use_gluon(platform, 16, "fp8_ds_mla", 512):
            return (wide, triton_k + " for the other calls (fp8_ds_mla, fewer rows, other layouts; the narrow "
                                     "Gluon kernel for 16 rows of fp8 / fp8_ds_mla is opt-in: "
                                     "PORTMLA_TRITON_GLUON_NARROW=1)")
        narrow = "fp8/fp8_ds_mla" if use_gluon(platform, 16, "fp8", 512) else "fp8_ds_mla"
        return (wide,
                f"mla_decode: Hopper Gluon kernel for {narrow} caches with at most 16 (token, head) rows per "
                f"sequence (wgmma with the tokens as M; PORTMLA_TRITON_GLUON_NARROW=1), same dims, block "
                f"sizes and strides",
                triton_k + " for the other calls (fp8_ds_mla with 17-32 or more than 64 rows, 16-bit caches "
                           "with at most 32 rows, other layouts)")

    def reasons(self, p):
        out = super().reasons(p)
        if p.op == "mla_decode":
            out += self._dtype_reasons_from("q.dtype", p.q_dtype, self.DOT_DTYPES)
            if p.cache.kv_lora_rank > 1024:
                out.append(Reason("kv_lora_rank", f"kv_lora_rank={p.cache.kv_lora_rank} "
                                                  f"(supported: 1..1024)"))
        if p.op == "mla_prefill_attention":
            out += self._dtype_reasons_from("q.dtype", p.dtype, self.DOT_DTYPES)
            for name, v in (("qk_head_dim", p.qk_head_dim), ("v_head_dim", p.v_head_dim)):
                if v > 256:
                    out.append(Reason(name, f"{name}={v} (supported: 1..256)"))
        return out

    # ------------------------------------------------------------------ ops

    def mla_decode(self, p, q, kv_cache, block_table, seq_lens, query_start_loc, softmax_scale,
                   k_scale, out, lse) -> None:
        from .decode import mla_decode

        mla_decode(p, q, kv_cache, block_table, seq_lens, query_start_loc, softmax_scale, k_scale,
                   out, lse)

    def concat_and_cache_mla(self, p, kv_c, k_pe, kv_cache, slot_mapping, scale) -> None:
        from .cache import concat_and_cache_mla

        concat_and_cache_mla(p, kv_c, k_pe, kv_cache, slot_mapping, scale)

    def gather_cache(self, p, kv_cache, block_table, seq_lens, seq_starts, cu_seq_lens, scale,
                     out) -> None:
        from .cache import gather_cache

        gather_cache(p, kv_cache, block_table, seq_lens, seq_starts, cu_seq_lens, scale, out)

    def merge_attn_states(self, p, prefix_out, prefix_lse, suffix_out, suffix_lse, out,
                          out_lse) -> None:
        from .merge import merge_attn_states

        merge_attn_states(p, prefix_out, prefix_lse, suffix_out, suffix_lse, out, out_lse)

    def mla_prefill_attention(self, p, q, k, v, cu_seqlens_q, cu_seqlens_k, softmax_scale, causal,
                              out, lse) -> None:
        from .prefill import mla_prefill_attention

        mla_prefill_attention(p, q, k, v, cu_seqlens_q, cu_seqlens_k, softmax_scale, causal, out,
                              lse)
