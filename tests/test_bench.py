"""The benchmark suite: spec grammar, ANCHORS.md counting, the correctness gate, and a
CPU smoke run of ``python -m portmla bench`` writing its files."""

from __future__ import annotations

import csv
import json
import math

import pytest
import torch

import portmla as pm
from portmla.bench import anchors, compare, counting, measure
from portmla.bench.cli import main
from portmla.bench.inputs import build_inputs, draw_lengths
from portmla.bench.specs import Group, parse_spec, parse_specs

# ------------------------------------------------------------------------------ specs


@pytest.mark.parametrize("text, groups", [
    ("128q1s4k", [(128, 1, 4096)]),
    ("16q4s1k", [(16, 4, 1024)]),
    ("2q2k_32q1s1k", [(2, 2048, 2048), (32, 1, 1024)]),
    ("q1s64", [(1, 1, 64)]),
    ("1q1s32k", [(1, 1, 32768)]),
    ("4Q2S300", [(4, 2, 300)]),
])
def test_spec_valid(text, groups):
    spec = parse_spec(text)
    assert [(g.count, g.q_len, g.kv_len) for g in spec.groups] == groups
    assert spec.num_seqs == sum(c for c, _, _ in groups)
    assert spec.num_tokens == sum(c * q for c, q, _ in groups)


def test_spec_mixed_properties():
    spec = parse_spec("2q2k_32q1s1k")
    assert spec.max_query_len == 2048 and spec.max_kv_len == 2048 and not spec.uniform
    assert [g.text for g in spec.groups] == ["2q2k", "32q1s1k"]
    assert Group(8, 1, 8192).text == "8q1s8k"


@pytest.mark.parametrize("text, words", [
    ("", "empty"),
    ("128x1s4k", "does not match"),
    ("128q1s4k_", "group ''"),
    ("4q8s4", "s=4 < q=8"),
    ("0q1s4", "count=0"),
    ("2q0s4", "q=0"),
    ("1q1s1kk", "does not match"),
    ("1q1s-4", "does not match"),
])
def test_spec_invalid(text, words):
    with pytest.raises(ValueError, match="grammar|s=|count=|q=") as e:
        parse_spec(text)
    assert words in str(e.value)


def test_specs_list():
    assert [s.text for s in parse_specs("128q1s4k, 2q2k_32q1s1k")] == ["128q1s4k", "2q2k_32q1s1k"]
    with pytest.raises(ValueError, match="names no batch spec"):
        parse_specs(" , ")


# --------------------------------------------------------------------------- counting


def test_counting_flop_by_hand():
    # b=128, s_q=1, S=4096, h=128: 128*128*1*4096*2*(576+512) FLOP
    flop = counting.decode_flop(1, [4096] * 128, 128)
    assert flop == 128 * 128 * 4096 * 2 * 1088 == 146_028_888_064
    # at FlashMLA's 289 us with every length = S that is 505 TFLOP/s; ANCHORS.md prints 522
    # because its varlen draw had a mean length ~3 % above S (see portmla.bench.anchors)
    assert flop / 289e-6 / 1e12 == pytest.approx(505.29, abs=0.01)
    assert 522 / (flop / 289e-6 / 1e12) == pytest.approx(1.033, abs=0.002)


def test_counting_matches_fixed_length_anchors():
    # the fixed-length rows of ANCHORS.md are reproduced exactly by the counting
    tflops = counting.decode_flop(1, [32768], 128) / 40.6e-6 / 1e12
    assert tflops == pytest.approx(225, abs=0.5)  # 1q1s32k h128: 40.6 us, 225 TFLOP/s
    nbytes = counting.decode_bytes(1, [32768] * 64, 16, "bfloat16")
    assert nbytes == 64 * (16 * 576 * 2 + 32768 * 576 * 2 + 16 * 512 * 2)
    assert nbytes / 811e-6 / 1e12 == pytest.approx(2.98, abs=0.005)  # 64q1s32k h16: 811 us
    for spec, heads, fixed, peers in anchors.ROWS:
        if not fixed:
            continue
        s = parse_spec(spec)
        lens = [s.groups[0].kv_len] * s.num_seqs
        for us, tf, tb in peers.values():
            if tf:
                assert counting.decode_flop(s.groups[0].q_len, lens, heads) / us / 1e6 == \
                    pytest.approx(tf, rel=0.01)
            if tb:
                assert counting.decode_bytes(s.groups[0].q_len, lens, heads) / us / 1e6 == \
                    pytest.approx(tb, rel=0.01)


def test_counting_kv_bytes_and_mixed():
    assert counting.kv_bytes_per_element("bfloat16") == 2
    assert counting.kv_bytes_per_element("auto") == 2
    assert counting.kv_bytes_per_element("fp8") == 1
    assert counting.kv_bytes_per_element("fp8_ds_mla") == pytest.approx(656 / 576)
    assert counting.kv_bytes_per_token("fp8_ds_mla") == 656
    # fp8 rows count the real bytes: 576 per cached token
    b = counting.decode_bytes(1, [1000], 16, "fp8")
    assert b == 16 * 576 * 2 + 1000 * 576 + 16 * 512 * 2
    # mixed batch with real per-sequence lengths: sum over sequences
    flop = counting.decode_flop([2, 1, 1], [100, 50, 70], 8)
    assert flop == 8 * 2 * 1088 * (2 * 100 + 50 + 70)
    with pytest.raises(ValueError):
        counting.decode_flop([1, 1], [5], 8)


def test_anchors_preset_is_the_table():
    assert anchors.preset() == [
        ("128q1s4k", 128), ("128q2s4k", 128), ("128q1s8k", 128), ("64q1s16k", 128),
        ("128q1s8k", 16), ("64q1s32k", 16), ("32q1s4k", 128), ("1q1s32k", 128), ("8q1s8k", 16)]
    doc = anchors.as_results()
    assert len(doc["rows"]) == 25 and doc["ceilings"]["copy_tbps"] == 2.44


# ----------------------------------------------------------------------------- inputs


def test_lengths_varlen_fixed_and_auto_fixed():
    q, s, fixed = draw_lengths(parse_spec("64q2s300"), False, 0)
    assert q == [2] * 64 and min(s) >= 2 and len(set(s)) > 10 and not fixed
    assert draw_lengths(parse_spec("64q2s300"), False, 0) == (q, s, fixed)  # seeded
    assert draw_lengths(parse_spec("4q1s300"), True, 0)[1] == [300] * 4
    q, s, fixed = draw_lengths(parse_spec("2q1s32k"), False, 0)  # > 16k: fixed
    assert s == [32768, 32768] and fixed


def test_inputs_blocks_are_a_permutation():
    inp = build_inputs(parse_spec("3q1s40_1q3s20"), 2, "fp8_ds_mla", 8, device="cpu", layers=2)
    assert inp.layers == 2 and inp.caches[0].dtype == torch.uint8
    assert inp.query_start_loc.tolist() == [0, 1, 2, 3, 6]
    used = [b for row, n in zip(inp.block_table.tolist(), inp.seq_lens_list)
            for b in row[:math.ceil(n / 8)]]
    assert sorted(used) == list(range(inp.num_blocks))


# ------------------------------------------------------------------------------- gate


def test_gate_marks_a_wrong_result_failed(monkeypatch):
    inp = build_inputs(parse_spec("2q1s32"), 2, "bfloat16", 16, device="cpu", layers=1)
    ref = measure.reference_output(inp)
    ok = measure.run_one(inp, ref, "reference", "portmla", graphs=True, warmup=0, repeats=1,
                         ceilings={})
    assert ok["status"] == "OK" and ok["rel_err"] == 0 and ok["median_us"] > 0

    real = pm.mla_decode

    def wrong(*a, **kw):  # a backend that reads only half the cache
        kw["seq_lens"] = (kw["seq_lens"] + 1) // 2  # drops half of every sequence's cache
        return real(*a, **kw)

    monkeypatch.setattr(measure.pm, "mla_decode", wrong)
    bad = measure.run_one(inp, ref, "reference", "portmla", graphs=True, warmup=0, repeats=1,
                          ceilings={})
    assert bad["status"] == "FAILED" and bad["median_us"] is None and bad["tflops"] is None
    assert "relative error" in bad["error"] and bad["rel_err"] > bad["tol"]


# -------------------------------------------------------------------------------- CLI


def test_cli_smoke_cpu(tmp_path, capsys):
    out = tmp_path / "res"
    rc = main(["--backends", "reference", "--specs", "2q1s48,1q2s40_1q1s24", "--heads", "2",
               "--block-size", "16", "--kv-lora-rank", "128", "--rope-dim", "32",
               "--warmup", "0", "--repeats", "2", "--layers", "2", "--out", str(out),
               "--compare", "anchors", "--peers"])
    assert rc == 0
    text = capsys.readouterr()
    assert "2q1s48" in text.out and "Compared with the ANCHORS.md anchors" in text.out
    assert "done" in text.err
    doc = json.loads((out / "results.json").read_text())
    meta = doc["metadata"]
    for k in ("date", "device_name", "torch", "triton", "cuda", "git_commit", "command"):
        assert k in meta
    assert doc["ceilings"]["copy_tbps"] > 0 and doc["ceilings"]["matmul_tflops"] > 0
    rows = doc["rows"]
    assert [r["spec"] for r in rows] == ["2q1s48", "1q2s40_1q1s24"]
    for r in rows:
        assert r["status"] == "OK" and r["backend"] == "reference" and r["layers"] == 2
        assert r["median_us"] > 0 and r["rel_err"] == 0 and r["kv_lora_rank"] == 128
        assert r["tflops"] == pytest.approx(r["flop"] / r["median_us"] / 1e6)
    with open(out / "results.csv") as f:
        assert len(list(csv.DictReader(f))) == 2
    md = (out / "results.md").read_text()
    assert "| reference | 2q1s48 |" in md and "## Comparison" in md
    pytest.importorskip("matplotlib")
    assert (out / "roofline.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # comparing with the file just written matches every row, per backend
    rc = main(["--backends", "reference", "--specs", "2q1s48", "--heads", "2", "--block-size",
               "16", "--kv-lora-rank", "128", "--rope-dim", "32", "--warmup", "0",
               "--repeats", "1", "--no-ceilings", "--compare", str(out / "results.json")])
    assert rc == 0
    assert "speedup" in capsys.readouterr().out


def test_compare_ratios():
    ours = [{"backend": "x", "spec": "128q1s4k", "heads": 128, "kv_cache_dtype": "bfloat16",
             "block_size": 64, "status": "OK", "median_us": 578.0, "tflops": 261.0, "tbps": 1.0}]
    cmp = compare.compare(ours, anchors.as_results(), True)
    flash = next(c for c in cmp if c["against"] == anchors.FLASHMLA)
    assert flash["speedup"] == pytest.approx(0.5) and flash["metric"] == "TFLOP/s"
    assert flash["throughput_ratio"] == pytest.approx(0.5)
    assert {c["against"] for c in cmp} == set(anchors.PEERS)
    assert compare.compare(ours, {"rows": ours}, False)[0]["speedup"] == 1


@pytest.mark.parametrize("argv, words", [
    (["--specs", "128x1"], "does not match"),
    (["--backends", "nope"], "unknown backend 'nope'"),
    (["--preset", "anchors", "--specs", "1q1s4"], "leave out --specs"),
    (["--kv-cache-dtype", "int4"], "kv_cache_dtype"),
    (["--heads", "0"], "--heads"),
    (["--compare", "/nonexistent/x.json"], "cannot read"),
])
def test_cli_errors(argv, words, capsys):
    assert main(argv) == 2
    assert words in capsys.readouterr().err


def test_preset_anchors_configs():
    from portmla.bench.cli import _configs, build_parser

    args = build_parser().parse_args(["--preset", "anchors"])
    cfgs = _configs(args, gpu=True)
    assert [(s.text, h) for s, h, _, _ in cfgs] == anchors.preset()
    assert {(f, b) for _, _, f, b in cfgs} == {("bfloat16", 64)}
