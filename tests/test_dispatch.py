"""Platform facts, probe(), reasons as data, and the dispatch loop."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import portmla as pm
from portmla.backends.base import Backend
from portmla.dispatch import PRIORITY, get_backend, select
from portmla.problems import CacheLayout, DecodeProblem


def _problem(**over) -> DecodeProblem:
    platform = over.pop("platform", pm.current_platform("cpu"))
    cache = CacheLayout("bfloat16", torch.bfloat16, 10, over.pop("block_size", 64), 576, 64 * 576, 576)
    base = dict(op="mla_decode", platform=platform, q_dtype=torch.bfloat16, cache=cache,
                num_tokens=4, num_seqs=4, num_heads=16, max_blocks_per_seq=3, max_query_len=1,
                return_lse=False, capturing=False)
    base.update(over)
    return DecodeProblem(**base)


def test_public_names_exist():
    for name in ("current_platform", "list_backends", "probe", "supported_block_sizes",
                 "supported_kv_cache_dtypes", "UnsupportedError", "kv_cache_shape",
                 "allocate_kv_cache", "concat_and_cache_mla", "gather_cache", "mla_decode",
                 "merge_attn_states", "mla_prefill_attention", "MLAAttention", "MLABatch"):
        assert hasattr(pm, name), name
    assert isinstance(pm.__version__, str)
    assert issubclass(pm.UnsupportedError, ValueError)


def test_platform_cpu_facts():
    p = pm.current_platform("cpu")
    assert p.kind == "cpu" and p.arch == "cpu" and p.capability is None
    assert p.fp8_dtype == torch.float8_e4m3fn and p.num_compute_units >= 1
    assert pm.current_platform("cpu") is p  # cached
    with pytest.raises(dataclasses.FrozenInstanceError):
        p.kind = "cuda"


def test_probe_lists_every_backend_with_reasons():
    infos = pm.probe("cpu")
    assert set(infos) == set(pm.list_backends()) >= {"reference", "triton", "cuda", "hip", "sycl"}
    assert infos["reference"].available and not infos["reference"].reasons
    for name in ("cuda", "hip", "sycl"):
        assert not infos[name].available
        assert any("platform=cpu" in r for r in infos[name].reasons), infos[name].reasons
    for info in infos.values():
        assert info.available == (not info.reasons)
        assert set(info.block_sizes) <= {1, 2, 4, 8, 16, 32, 64, 128, 256}


def test_supported_queries_on_cpu():
    assert pm.supported_block_sizes(device="cpu") == (1, 2, 4, 8, 16, 32, 64, 128, 256)
    assert pm.supported_kv_cache_dtypes(device="cpu")[0] == "auto"
    assert "fp8_ds_mla" in pm.supported_kv_cache_dtypes(backend="reference", device="cpu")
    with pytest.raises(ValueError, match="kv_cache_dtype='nope'"):
        pm.supported_block_sizes("nope")


def test_reasons_name_value_and_allowed():
    class Narrow(Backend):
        NAME = "narrow"
        PLATFORMS = ("cpu",)
        BLOCK_SIZES = (16, 32, 64, 128)
        KV_CACHE_DTYPES = ("bfloat16",)
        MAX_NUM_HEADS = 64
        STRIDED_KV = False

    p = _problem(block_size=48, num_heads=128)
    why = Narrow().reasons(p)
    codes = {r.code for r in why}
    assert {"block_size", "num_heads", "strided_kv"} <= codes
    assert "block_size=48 (supported: 16, 32, 64, 128)" in [str(r) for r in why]
    assert "num_heads=128 (supported: 1..64)" in [str(r) for r in why]
    assert Narrow().supports(_problem(block_size=64, num_heads=16,
                                      cache=CacheLayout("bfloat16", torch.bfloat16, 10, 64, 576,
                                                        64 * 576, 576)))


def test_auto_dispatch_message_lists_every_backend():
    p = _problem(q_dtype=torch.int8)
    with pytest.raises(pm.UnsupportedError) as info:
        select(p, describe="q_dtype=int8")
    msg = str(info.value)
    assert msg.startswith("No backend can run mla_decode with q_dtype=int8 on cpu")
    assert set(info.value.reasons) == set(PRIORITY["cpu"])
    for name in PRIORITY["cpu"]:
        assert f"`{name}` is not supported because:" in msg
    assert "q.dtype=int8 (supported: bfloat16, float16, float32)" in msg
    assert select(_problem()).NAME == "reference"


def test_capture_makes_host_reading_backends_refuse():
    why = get_backend("reference").reasons(_problem(capturing=True))
    assert [r.code for r in why] == ["cuda_graphs"]


def test_priority_lists_cover_every_platform():
    assert set(PRIORITY) == {"cuda", "rocm", "xpu", "cpu"}
    for order in PRIORITY.values():
        assert "reference" in order
        for name in order:
            get_backend(name)


def test_info_cli_runs(capsys):
    from portmla.__main__ import main

    assert main(["info"]) == 0
    text = capsys.readouterr().out
    kind = pm.current_platform().kind
    assert f"platform: {kind}" in text and "reference available" in text
    assert f"because platform={kind} (supported: xpu)" in text  # sycl, never on this machine


class _FakeCudaModule:
    """What the built portmla._cuda exports, without a GPU (for the Hopper routing logic)."""

    BUILT_ARCHS = "80;90a"
    HOPPER_NOT_BUILT = None
    DECODE_VARIANTS = {"legacy": (0, 32, 32, 115200, 115200, 256),
                       "narrow": (1, 16, 64, 171000, 100000, 256),
                       "wide": (2, 64, 32, 193000, 120000, 256),
                       "hopper": (3, 64, 64, 231424, 231424, 256)}


def _h100() -> pm.Platform:
    return dataclasses.replace(pm.current_platform("cpu"), kind="cuda", device="cuda:0",
                               device_name="H100", arch="sm_90", capability=(9, 0),
                               num_compute_units=132, shared_memory_per_block=232448)


@pytest.mark.parametrize("fmt,block_size,hopper", [
    ("bfloat16", 64, True), ("float16", 16, True), ("bfloat16", 32, True), ("bfloat16", 256, True),
    ("bfloat16", 48, False), ("bfloat16", 1, False), ("fp8", 64, False), ("fp8_ds_mla", 64, False)])
def test_cuda_hopper_routing_and_kernels_report(monkeypatch, fmt, block_size, hopper):
    """sm_90: the Hopper kernel takes bf16 / fp16 caches with block 16, 32, 64k; probe says so."""
    from portmla.backends import cuda as cuda_backend

    monkeypatch.setattr(cuda_backend, "load_module", lambda: (_FakeCudaModule, None))
    p = _problem(platform=_h100(), block_size=block_size)
    p = dataclasses.replace(p, cache=dataclasses.replace(p.cache, kv_format=fmt))
    name = cuda_backend.CudaBackend.decode_variant(p, _FakeCudaModule)[0]
    assert (name == "hopper") == hopper, name
    kernels = cuda_backend.CudaBackend().kernels(_h100())
    assert kernels[0].startswith("mla_decode: sm_90a Hopper kernel") and len(kernels) == 3
    monkeypatch.setenv("PORTMLA_CUDA_HOPPER", "0")
    assert cuda_backend.CudaBackend.decode_variant(p, _FakeCudaModule)[0] != "hopper"
    assert "PORTMLA_CUDA_HOPPER=0" in cuda_backend.CudaBackend().kernels(_h100())[0]


class _FakeThreeHopperModule(_FakeCudaModule):
    DECODE_VARIANTS = {**_FakeCudaModule.DECODE_VARIANTS,
                       "hopper_tile": (3, 64, 64, 231424, 0, 256),
                       "hopper_narrow": (6, 16, 64, 168960, 0, 128)}


@pytest.mark.parametrize("heads,s_q,env,want", [
    (16, 1, None, "hopper_narrow"), (8, 2, None, "hopper_narrow"),  # <= 16 rows a sequence
    (32, 1, None, "hopper_tile"), (16, 2, None, "hopper_tile"),    # 17..64 rows
    (64, 1, None, "hopper_tile"), (16, 3, None, "hopper_tile"),
    (128, 1, None, "hopper"), (64, 2, None, "hopper"), (40, 2, None, "hopper"),  # > 64 rows
    (16, 1, "tile", "hopper_tile"), (16, 1, "pair", "hopper"), (128, 1, "narrow", "hopper_narrow")])
def test_cuda_hopper_kernel_by_rows(monkeypatch, heads, s_q, env, want):
    """The three 16-bit Hopper kernels by rows per sequence (query tokens x heads), the env
    forcing one; the narrow kernel's 16-row tiles give 132 / row tiles parts; probe names it."""
    from portmla.backends import cuda as cuda_backend

    if env is None:
        monkeypatch.delenv("PORTMLA_CUDA_HOPPER", raising=False)
    else:
        monkeypatch.setenv("PORTMLA_CUDA_HOPPER", env)
    p = _problem(platform=_h100(), block_size=64)
    p = dataclasses.replace(p, num_heads=heads, max_query_len=s_q)
    assert cuda_backend.CudaBackend.decode_variant(p, _FakeThreeHopperModule)[0] == want
    plan = cuda_backend.CudaBackend().plan_decode(p, _FakeThreeHopperModule)
    bm = _FakeThreeHopperModule.DECODE_VARIANTS[want][1]
    assert plan[0] == want and plan[2:] == (1, 0, 132 // -(-heads * s_q // bm))
    # an older build without the narrow kernel: the single-tile one
    assert cuda_backend.CudaBackend.decode_variant(p, _FakeCudaModule)[0] == "hopper"
    monkeypatch.setattr(cuda_backend, "load_module", lambda: (_FakeThreeHopperModule, None))
    assert "16-row transposed tiles at or below 16" in cuda_backend.CudaBackend().kernels(_h100())[0]


class _FakeQuantModule(_FakeCudaModule):
    DECODE_VARIANTS = {**_FakeCudaModule.DECODE_VARIANTS, "quant": (5, 16, 64, 0, 113600, 256)}
    DECODE_QUANT_SMEM = {"fp8": 96448, "fp8_ds_mla": 113600}


@pytest.mark.parametrize("fmt,heads,s_q,cap,smem,env,want", [
    ("fp8", 16, 1, (9, 0), 232448, None, "quant"),
    ("fp8_ds_mla", 16, 2, (9, 0), 232448, None, "quant"),
    ("fp8", 16, 1, (9, 0), 232448, "0", "narrow"),
    ("fp8", 16, 3, (9, 0), 232448, None, "quant"),         # 48 rows a sequence: 3 row tiles
    ("fp8", 128, 1, (9, 0), 232448, None, "quant"),
    ("fp8", 128, 2, (9, 0), 232448, None, "wide"),         # 256 rows a sequence
    ("bfloat16", 16, 1, (9, 0), 232448, None, "hopper"),   # 16-bit: not the quantized kernel
    ("fp8", 16, 1, (8, 0), 166912, None, "narrow"),        # sm_80 would emulate e4m3 -> fp16
    ("fp8", 16, 1, (8, 9), 101376, None, "quant"),         # 96 KB fits an sm_89 block
    ("fp8_ds_mla", 16, 1, (8, 9), 101376, None, "narrow")])  # 114 KB does not
def test_cuda_quant_routing(monkeypatch, fmt, heads, s_q, cap, smem, env, want):
    from portmla.backends import cuda as cuda_backend

    if env is None:
        monkeypatch.delenv("PORTMLA_CUDA_QUANT", raising=False)
    else:
        monkeypatch.setenv("PORTMLA_CUDA_QUANT", env)
    plat = dataclasses.replace(_h100(), capability=cap, arch=f"sm_{cap[0]}{cap[1]}",
                               shared_memory_per_block=smem)
    p = _problem(platform=plat, block_size=64)
    p = dataclasses.replace(p, num_heads=heads, max_query_len=s_q,
                            cache=dataclasses.replace(p.cache, kv_format=fmt))
    name = cuda_backend.CudaBackend.decode_variant(p, _FakeQuantModule)[0]
    assert name == want
    if name == "quant":  # two CTAs per SM where they fit, on the device schedule
        plan = cuda_backend.CudaBackend().plan_decode(p, _FakeQuantModule)
        tiles = -(-heads * s_q // 16)
        per_sm = 2 if smem > 2 * 113600 else 1
        assert plan[2:] == (1, 0, 132 * per_sm // tiles)
    monkeypatch.setattr(cuda_backend, "load_module", lambda: (_FakeQuantModule, None))
    report = cuda_backend.CudaBackend().kernels(plat)
    assert any("quantized-cache kernel" in k for k in report) == (cap >= (8, 9) and env != "0")


class _FakeHopperQuantModule(_FakeQuantModule):
    HOPPER_QUANT_FORMATS = ("fp8", "fp8_ds_mla")
    HOPPER_QUANT_QUERY_DTYPES = {"fp8": ("bfloat16", "float16"), "fp8_ds_mla": ("bfloat16",)}


class _FakeOlderHopperQuantModule(_FakeQuantModule):  # built before fp8 ran on fp16 operands
    HOPPER_QUANT_FORMATS = ("fp8", "fp8_ds_mla")


# 17..32 rows a sequence: the pair kernel with block size 32 or a multiple of 64, the quantized
# kernel with others (1, 48: no TMA boxes; 16: four boxes a part, slower).
_PAIR_IF_TMA = {1: "quant", 16: "quant", 32: "hopper", 48: "quant", 64: "hopper", 128: "hopper"}


@pytest.mark.parametrize("fmt,heads,s_q,dtype,env,want", [
    ("fp8", 128, 1, torch.bfloat16, None, "hopper"),
    ("fp8_ds_mla", 16, 4, torch.bfloat16, None, "hopper"),   # 64 rows a sequence
    ("fp8", 32, 1, torch.bfloat16, None, _PAIR_IF_TMA),      # 32 rows: the pair kernel where
    ("fp8_ds_mla", 16, 2, torch.bfloat16, None, _PAIR_IF_TMA),  # TMA takes the block size, else
    ("fp8", 1, 17, torch.float16, None, _PAIR_IF_TMA),        # the quantized kernel
    ("fp8", 8, 5, torch.bfloat16, None, "hopper"),            # 40 rows: the pair kernel, any block
    ("fp8", 16, 1, torch.bfloat16, "pair", "hopper"),        # forced
    ("fp8", 128, 1, torch.float16, None, "hopper"),          # fp16 queries: fp8 on fp16 operands
    ("fp8_ds_mla", 128, 1, torch.float16, None, "quant"),    # ds runs on bf16 operands only
    ("fp8", 128, 1, torch.bfloat16, "0", "quant"),           # Hopper kernels off
    ("fp8", 128, 1, torch.bfloat16, "tile", "quant"),        # no single-tile fp8 kernel
    ("fp8", 128, 4, torch.bfloat16, None, "hopper")])        # 512 rows: 8 row tiles
def test_cuda_hopper_quant_routing(monkeypatch, fmt, heads, s_q, dtype, env, want):
    """sm_90 with a module whose pair kernel takes quantized caches: queries it takes (bf16;
    fp16 with fp8) with more than 16 rows and block size 32 or a multiple of 64, or more than 32
    rows and any block size, go there; the probe lists it. A module without HOPPER_QUANT_QUERY_DTYPES
    gets bf16 queries only."""
    from portmla.backends import cuda as cuda_backend

    monkeypatch.delenv("PORTMLA_CUDA_QUANT", raising=False)
    if env is None:
        monkeypatch.delenv("PORTMLA_CUDA_HOPPER", raising=False)
    else:
        monkeypatch.setenv("PORTMLA_CUDA_HOPPER", env)
    for bs in (1, 16, 32, 48, 64, 128):
        p = _problem(platform=_h100(), block_size=bs)
        p = dataclasses.replace(p, num_heads=heads, max_query_len=s_q, q_dtype=dtype,
                                cache=dataclasses.replace(p.cache, kv_format=fmt))
        want_bs = want[bs] if isinstance(want, dict) else want
        name = cuda_backend.CudaBackend.decode_variant(p, _FakeHopperQuantModule)[0]
        assert name == want_bs, (bs, name)
        older = cuda_backend.CudaBackend.decode_variant(p, _FakeOlderHopperQuantModule)[0]
        assert older == (want_bs if dtype == torch.bfloat16 else "quant"), (bs, older)
        if name == "hopper":  # one CTA per SM per row tile, on the device schedule
            plan = cuda_backend.CudaBackend().plan_decode(p, _FakeHopperQuantModule)
            assert plan[2:] == (1, 0, 132 // -(-heads * s_q // 64))
    monkeypatch.setattr(cuda_backend, "load_module", lambda: (_FakeHopperQuantModule, None))
    report = cuda_backend.CudaBackend().kernels(_h100())
    assert any("pair kernel for fp8/fp8_ds_mla caches (fp8 with bfloat16/float16 queries, "
               "fp8_ds_mla with bfloat16 queries)" in k for k in report) == (env != "0")


def test_cuda_kernels_report_without_hopper_build(monkeypatch):
    from portmla.backends import cuda as cuda_backend

    class NoHopper(_FakeCudaModule):
        HOPPER_NOT_BUILT = "CuTe headers not found at build time"
        DECODE_VARIANTS = {k: v for k, v in _FakeCudaModule.DECODE_VARIANTS.items() if k != "hopper"}

    monkeypatch.setattr(cuda_backend, "load_module", lambda: (NoHopper, None))
    assert "CuTe headers not found" in cuda_backend.CudaBackend().kernels(_h100())[0]
    a100 = dataclasses.replace(_h100(), arch="sm_80", capability=(8, 0))
    assert "every format" in cuda_backend.CudaBackend().kernels(a100)[0]
    assert cuda_backend.CudaBackend().kernels(pm.current_platform("cpu")) == ()


def test_cuda_sched_fixed_per_kernel_and_format():
    """The device schedule's fixed cost: the pair kernel's own for 16-bit and per-tensor fp8
    caches, a smaller one when it expands fp8_ds_mla (its tiles cost more); the narrow
    quantized kernel one for each format; other kernels by name."""
    from portmla.backends import cuda as cuda_backend

    key = cuda_backend.sched_fixed_key
    assert key("hopper", "bfloat16") == key("hopper", "auto") == "hopper"
    assert key("hopper", "fp8") == "hopper" and key("hopper", "fp8_ds_mla") == "hopper_quant"
    assert key("hopper_tile", "fp8") == "hopper_tile" and key("quant", "fp8") == "quant"
    assert key("hopper_narrow_quant", "fp8") == "hopper_narrow_quant"
    assert key("hopper_narrow_quant", "fp8_ds_mla") == "hopper_narrow_ds"
    assert key("quant", "fp8_ds_mla") == "quant" and key("hopper_narrow", "bfloat16") == "hopper_narrow"
    fixed = cuda_backend.SCHED_FIXED
    assert {key(k, f) for k in ("hopper", "hopper_tile", "hopper_narrow", "quant", "hopper_narrow_quant")
            for f in ("bfloat16", "fp8", "fp8_ds_mla")} == set(fixed)
    assert fixed["hopper_quant"] < fixed["hopper"] and all(v >= 1 for v in fixed.values())


def test_cuda_kv_l2_hint_env(monkeypatch):
    """PORTMLA_CUDA_KV_L2 maps to csrc_cuda/common/params.h's KvL2Hint (auto = 0 by default);
    a value outside the set is refused with the name, the value and the allowed ones."""
    from portmla.backends import cuda as cuda_backend

    monkeypatch.delenv("PORTMLA_CUDA_KV_L2", raising=False)
    assert cuda_backend.kv_l2_hint() == 0
    for name, code in (("auto", 0), ("none", 1), ("first", 2), ("last", 3)):
        monkeypatch.setenv("PORTMLA_CUDA_KV_L2", name)
        assert cuda_backend.kv_l2_hint() == code
    monkeypatch.setenv("PORTMLA_CUDA_KV_L2", "evict_first")
    with pytest.raises(ValueError, match=r"PORTMLA_CUDA_KV_L2='evict_first'.*auto, none, first"):
        cuda_backend.kv_l2_hint()
