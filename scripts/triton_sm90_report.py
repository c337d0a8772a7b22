"""sm_90 compile report of the Triton decode kernels, on a machine without a GPU.

    PYTHONPATH=<dir of a Triton wheel, e.g. 3.6>:. TRITON_INTERPRET=0 python scripts/triton_sm90_report.py [names]

``names`` picks tables / tiles by substring ("quant": only the quantized-tile variants of
``scripts/triton_tune.py``'s ``QUANT``, scheduled kernel, fp8 and fp8_ds_mla, with the loop's
byte-wise shared loads (``loop_lds_u8``) and ``ldmatrix`` counts).

Compiles the split kernel (``decode._decode_kernel``, writing float32 partials as at
b=128 S=8192) and the scheduled kernel (``decode._decode_sched_kernel``, without LSE) for
``GPUTarget("cuda", 90, 32)`` at the H100 default tiles, and prints per kernel: registers,
stack (spills), shared memory, and the SASS counts of LDGSTS (cp.async: the pipelined KV
loads), HMMA / HGMMA, LDL / STL (cuobjdump of the Triton wheel), and the same inside the
tile loop (``loop_*``: the shortest backward branch around the first tensor-core op). The launch-time
divisibility facts are passed (``tt.divisibility`` 16 on pointers, strides, H, ...: what a
launch with 16-byte aligned tensors and strides gets); without them every load looks
unaligned and unpipelined and the report misleads.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile

os.environ["TRITON_INTERPRET"] = "0"

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from portmla.backends.triton import combine as C  # noqa: E402
from portmla.backends.triton import decode as D  # noqa: E402
from portmla.backends.triton import schedule as S  # noqa: E402

TARGET = GPUTarget("cuda", 90, 32)
BIN = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
# ints a launch at the benchmark shapes sees as multiples of 16 (sched_fixed is not)
DIVISIBLE_INTS = {"stride_qt", "stride_qh", "stride_page", "stride_tok", "stride_bt", "stride_os",
                  "stride_ot", "stride_oh", "stride_ls", "stride_lt", "H", "kv_per_split", "num_seqs",
                  "slot_rows"}
FLOATS = {"qk_scale"}
# the schedule and the pieces combine (b=128 h=16 bf16 shapes): compiled too, resources only
AUX = {"schedule": (S._schedule_kernel, dict(UNIT=64, CHUNK=128), 4, 1),
       "pieces combine": (C._combine_pieces_kernel, dict(L=512, BLOCK_R=8, BLOCK_S=1, BLOCK_D=512,
                                                         HAS_QSL=False, WRITE_LSE=True), 4, 1)}
# tile name -> (FMT, BLOCK_M, BLOCK_N, warps, stages, EXACT_DS): launch.py's CUDA defaults
TILES = {"narrow bf16": (0, 16, 64, 8, 5, False), "narrow fp8": (1, 16, 32, 4, 5, False),
         "narrow fp8_ds_mla": (2, 16, 32, 4, 5, True), "wide bf16": (0, 64, 64, 8, 2, False)}


def pointer_types(fmt: int, sched: bool) -> dict:
    kv = "*bf16" if fmt == 0 else "*u8"
    return dict(q_ptr="*bf16", kv_ptr=kv, kv32_ptr="*fp32" if fmt == 2 else kv,
                kv16_ptr="*bf16" if fmt in (1, 2) else kv, bt_ptr="*i32", seq_lens_ptr="*i32", qsl_ptr="*i32",
                kscale_ptr="*fp32" if fmt == 1 else "*i32", o_ptr="*bf16" if sched else "*fp32",
                lse_ptr="*fp32", cum_ptr="*i64", piece_ptr="*i32", cut_ptr="*i32", po_ptr="*fp32",
                pl_ptr="*fp32")


def compile_kernel(fn, constexprs: dict, fmt: int, sched: bool, warps: int, stages: int, maxnreg: int = 0):
    ptrs = pointer_types(fmt, sched)
    sig, attrs = {}, {}
    for i, name in enumerate(fn.arg_names):
        if name in constexprs:
            sig[name] = "constexpr"
            continue
        sig[name] = ptrs.get(name) or ("fp32" if name in FLOATS else "i32")
        if name in ptrs or name in DIVISIBLE_INTS:
            attrs[(i,)] = [["tt.divisibility", 16]]
    src = ASTSource(fn=fn, signature=sig, constexprs=constexprs, attrs=attrs)
    options = dict(num_warps=warps, num_stages=stages, **({"maxnreg": maxnreg} if maxnreg else {}))
    return triton.compile(src, target=TARGET, options=options)


def report(k) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(k.asm["cubin"])
    try:
        res = subprocess.run([os.path.join(BIN, "cuobjdump"), "--dump-resource-usage", f.name],
                             capture_output=True, text=True, check=True).stdout
        sass = subprocess.run([os.path.join(BIN, "cuobjdump"), "--dump-sass", f.name],
                              capture_output=True, text=True, check=True).stdout
    finally:
        os.unlink(f.name)
    field = {m.group(1): int(m.group(2)) for m in re.finditer(r"(REG|STACK|LOCAL):(\d+)", res)}
    ops = [(int(m.group(1), 16), m.group(2)) for m in
           re.finditer(r"^\s+/\*([0-9a-f]{4,})\*/\s+(.*?);", sass, re.M)]

    def count(op, lo=0, hi=1 << 62):
        return sum(1 for a, t in ops if lo <= a <= hi and re.search(rf"\b{op}\b", t))

    # the tile loop: the shortest backward branch around the first tensor-core instruction
    mma = next((a for a, t in ops if "MMA" in t), -1)
    back = [(int(m.group(1), 16), a) for a, t in ops if (m := re.search(r"BRA.*0x([0-9a-f]+)", t))]
    lo, hi = min(((t, a) for t, a in back if t <= mma <= a), key=lambda r: r[1] - r[0], default=(-1, -2))
    return dict(regs=field.get("REG"), stack=field.get("STACK"), smem=k.metadata.shared,
                ldgsts=count("LDGSTS"), async_copies=k.asm["ttgir"].count("async_copy_global_to_local"),
                hmma=count("HMMA"), hgmma=count("HGMMA"), ldl=count("LDL"), stl=count("STL"),
                loop_ldgsts=count("LDGSTS", lo, hi), loop_spill=count("LDL", lo, hi) + count("STL", lo, hi),
                loop_lds_u8=count(r"LDS\.U8", lo, hi), loop_ldsm=count("LDSM", lo, hi),
                loop_sass=sum(1 for a, _ in ops if lo <= a <= hi), sass=len(ops))


def tile_constexprs(fmt: int, bm: int, bn: int, exact: bool, quant_read: str = "twice") -> dict:
    return dict(PAGE=64, FMT=fmt, FNUZ=False, ALIGNED=True, L=512, R=64, BLOCK_L=512, BLOCK_R=64, BLOCK_M=bm,
                BLOCK_N=bn, HAS_QSL=False, UPCAST=False, EXACT_DS=exact, QREAD=quant_read, NV_PTX=True)


def quant_report() -> None:
    """The quantized 16-row tile's variants (triton_tune.QUANT) on the scheduled kernel."""
    from triton_tune import QUANT  # scripts/ is on sys.path when this runs as a script

    cols = ("regs", "stack", "smem", "ldgsts", "async_copies", "loop_ldgsts", "loop_spill", "loop_lds_u8",
            "loop_ldsm", "loop_sass")
    print(f"\n| format | variant | {' | '.join(cols)} |\n|---|---|{'---|' * len(cols)}")
    for fmt, fname in ((1, "fp8"), (2, "fp8_ds_mla")):
        for v in [None, *QUANT.values()]:
            bn, warps, stages = (v.block_n or 32, v.warps or 4, v.stages or 5) if v else (32, 4, 5)
            name = f"{v.name if v else 'default'} ({bn}x{warps}w{stages}st{f' r{v.maxnreg}' if v and v.maxnreg else ''})"
            try:
                k = compile_kernel(D._decode_sched_kernel,
                                   dict(tile_constexprs(fmt, 16, bn, fmt == 2, v.quant_read if v else "twice"),
                                        WRITE_LSE=False), fmt, True, warps, stages, v.maxnreg if v else 0)
                r = report(k)
                print(f"| {fname} | {name} | {' | '.join(str(r[c]) for c in cols)} |", flush=True)
            except Exception as e:  # noqa: BLE001 - report and go on
                print(f"| {fname} | {name} | FAILED: {type(e).__name__}: {str(e)[:800]} |", flush=True)


def main() -> None:
    only = sys.argv[1:]
    print(f"triton {triton.__version__}, target {TARGET}")
    cols = ("regs", "stack", "smem", "ldgsts", "async_copies", "hmma", "hgmma", "ldl", "stl", "loop_ldgsts",
            "loop_spill", "loop_sass", "sass")
    print(f"| tile | kernel | {' | '.join(cols)} |\n|---|---|{'---|' * len(cols)}")
    for name, (fmt, bm, bn, warps, stages, exact) in TILES.items():
        if only and not any(o in name for o in only):
            continue
        common = tile_constexprs(fmt, bm, bn, exact)
        for kname, fn, sched, lse in (("split", D._decode_kernel, False, True),
                                      ("sched", D._decode_sched_kernel, True, False)):
            try:
                r = report(compile_kernel(fn, dict(common, WRITE_LSE=lse), fmt, sched, warps, stages))
                print(f"| {name} {bm}x{bn} {warps}w {stages}st | {kname} | "
                      f"{' | '.join(str(r[c]) for c in cols)} |", flush=True)
            except Exception as e:  # noqa: BLE001 - report and go on
                print(f"| {name} | {kname} | FAILED: {type(e).__name__}: {str(e)[:800]} |", flush=True)
    for name, (fn, constexprs, warps, stages) in AUX.items():
        if not only or any(o in name for o in only):
            r = report(compile_kernel(fn, constexprs, 0, True, warps, stages))
            print(f"| {name} | {warps}w | {' | '.join(str(r[c]) for c in cols)} |", flush=True)
    if not only or "quant" in only:
        quant_report()


if __name__ == "__main__":
    main()
