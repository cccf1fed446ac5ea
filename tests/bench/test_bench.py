"""``edgeprune bench``: one small sweep on tiny-llava (schema, stages, percentiles, outputs), the FLOPs model
against hand-computed arithmetic and the DEPLOYMENT.md anchors, and the bad-input paths (exit 2, nothing
written). No test asserts on wall-clock time (DESIGN.md §7)."""

from __future__ import annotations

import json

import pytest

from edgeprune.bench import flops as F
from edgeprune.cli import main
from edgeprune.runtime.profiler import STAGES

SWEEP = ["bench", "--model", "tiny-llava", "--methods", "none,cls-topk", "--tokens", "576,64",
         "--backends", "torch,ort", "--warmup", "1", "--repeat", "2", "--new-tokens", "4", "--prompt-tokens", "12",
         "--ceilings", "quick"]


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("matplotlib")
    d = tmp_path_factory.mktemp("bench")
    paths = {"out": d / "r.json", "plot": d / "p.png", "markdown": d / "t.md", "trace": d / "tr.json"}
    args = SWEEP + [x for k, p in paths.items() for x in (f"--{k}", str(p))]
    assert main(args) == 0
    return json.loads(paths["out"].read_text()), paths


def test_sweep_schema(sweep):
    doc, _ = sweep
    assert doc["format"] == "edgeprune-bench" and doc["format_version"] == 1
    for key in ("created", "config", "machine", "versions", "threads", "model", "prompt", "results", "checks"):
        assert key in doc
    assert doc["machine"]["cpu"] and doc["machine"]["cores_logical"] >= 1
    assert doc["versions"]["torch"] and doc["versions"]["onnxruntime"]
    assert doc["threads"]["torch_intra_op"] >= 1
    assert doc["model"]["n_visual"] == 576 and doc["model"]["params"] > 0
    assert doc["prompt"]["question_tokens"] == 12
    combos = [(r["backend"], r["method"], r["kept_tokens"]) for r in doc["results"]]
    assert combos == [("torch", "none", 576), ("torch", "cls-topk", 576), ("torch", "cls-topk", 64),
                      ("ort", "none", 576), ("ort", "cls-topk", 576), ("ort", "cls-topk", 64)]
    assert {c["target"] for c in doc["checks"]} >= {"prune_share", "ttft_efficiency", "ort_prefill_speedup"}


def test_sweep_roofline_isa_and_a_table_that_fits(sweep, capsys):
    from edgeprune.bench.report import markdown_table, text_table

    doc, _ = sweep
    assert doc["machine"]["isa"]["arch"] and "flags" in doc["machine"]["isa"]
    assert set(doc["ceilings"]) == {"torch", "ort"}
    for r in doc["results"]:
        for stage in ("vision", "prefill", "decode_step"):
            fig = r["roofline"][stage]
            assert fig["flops_per_s"] > 0 and fig["bytes_per_s"] > 0 and fig["efficiency"] > 0
        assert r["roofline"]["decode_step"]["bound_tokens_per_s"] > 0
    far = doc["roofline_furthest"]
    assert far["stage"] in ("vision", "prefill", "decode_step")
    assert far["efficiency"] == min(f["efficiency"] for r in doc["results"] for f in r["roofline"].values())
    assert {"roofline_vision", "roofline_prefill", "roofline_decode_step"} <= {c["target"] for c in doc["checks"]}
    text = text_table(doc)
    assert [line for line in text.splitlines() if len(line) > 120] == [] and "furthest from its limit" in text
    assert "decode %BW" in markdown_table(doc)


def test_sweep_rows_complete_and_ordered(sweep):
    doc, _ = sweep
    for r in doc["results"]:
        assert r["status"] == "ok" and r["repeats"] == 2
        assert set(r["stages"]) == set(STAGES)  # every stage present, even those that did not run
        assert r["stages"]["guidance"]["calls"] == 0 and r["stages"]["guidance"]["p50_ms"] == 0.0
        assert r["stages"]["decode"]["calls"] == 3 and r["decode_step"]["steps"] == 6  # 4 tokens, 2 repeats
        for s in r["stages"].values():
            assert 0.0 <= s["min_ms"] <= s["p50_ms"] <= s["p90_ms"]
        for key in ("ttft_ms", "total_ms", "decode_tokens_per_s"):
            assert 0.0 < r[key]["p50"] <= r[key]["p90"]
        assert r["decode_step"]["p50_ms"] <= r["decode_step"]["p90_ms"]
        assert r["ttft_ms"]["p50"] < r["total_ms"]["p90"]
        t = r["tokens"]
        assert t["new"] == 4 and t["question"] == 12 and t["visual_in"] == 576
        assert t["prompt"] == t["prefix"] + t["visual_to_llm"] + t["suffix"] and t["visual_to_llm"] == r["kept_tokens"]
        assert r["memory"]["peak_rss_mb"] > 0 and r["memory"]["device_peak_mb"] is None
        assert r["flops"]["prefill"] > 0 and r["flops"]["layer_visual_tokens"] == [r["kept_tokens"]] * 4
        assert len(r["samples"]["ttft_ms"]) == 2
    pruned = [r for r in doc["results"] if r["kept_tokens"] == 64]
    for r in pruned:
        assert r["vs_none"]["prefill_flops_ratio"] > 1 and r["vs_none"]["ideal_ttft_speedup"] > 1
    assert "ort_vs_torch" in doc["results"][5] and "ort_vs_torch" not in doc["results"][2]


def test_sweep_outputs(sweep):
    _, paths = sweep
    assert paths["plot"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = paths["markdown"].read_text()
    assert "| backend | method | K |" in md and md.count("\n| ort ") == 3
    trace = json.loads(paths["trace"].read_text())["traceEvents"]
    assert sum(e["ph"] == "M" for e in trace) == 6
    assert {e["name"] for e in trace if e["ph"] == "X"} >= {"preprocess", "vision", "prune", "prefill", "decode"}


# ---------------------------------------------------------------------------------------------- FLOPs model
# A config small enough to do by hand: CLIP 28 px / patch 14 (P = 4 patches, S = 5 with [CLS]), Dv = 8,
# Fv = 16, 3 layers, features of layer -2 (2 layers run); LLM D = 12, F = 20, 2 layers, 3 heads, 1 KV head
# (head_dim 4, kv = 4), V = 50; projector 8 -> 12 -> 12.
SMALL = {"vision_feature_layer": -2,
         "vision_config": {"hidden_size": 8, "intermediate_size": 16, "num_hidden_layers": 3,
                           "num_attention_heads": 2, "image_size": 28, "patch_size": 14},
         "text_config": {"hidden_size": 12, "intermediate_size": 20, "num_hidden_layers": 2,
                         "num_attention_heads": 3, "num_key_value_heads": 1, "vocab_size": 50}}
# Request: prefix 2 + suffix 4 = 6 text tokens, N = 4, K = 2, 3 new tokens.
SHAPE_FULL = F.RequestShape(n=4, total_visual=4, visual_to_llm=4, prefix=2, suffix=4, question=3, new_tokens=3)
SHAPE_K2 = F.RequestShape(n=4, total_visual=4, visual_to_llm=2, prefix=2, suffix=4, question=3, new_tokens=3)


def test_flops_small_config_by_hand():
    d = F.dims_from_config(SMALL)
    assert d.vision.feature_layers == 2 and d.text.kv == 4 and d.text.layer_params == 2 * 144 + 2 * 12 * 4 + 3 * 12 * 20
    # vision: patch conv 2*4*(3*14*14)*8 = 37632; per layer 2*5*(4*64 + 2*8*16) + 4*25*8 = 5120 + 800 = 5920;
    # [CLS] row 2*5*64 + 2*5*8 = 720 -> 37632 + 2*5920 + 720
    assert F.vision_flops(d.vision) == 37632 + 2 * 5920 + 720 == 50192
    assert F.vision_flops(d.vision, layers=3) == 37632 + 3 * 5920 + 720
    assert F.projector_flops(d, 4) == 2 * 4 * (8 * 12 + 12 * 12) == 1920
    # prefill, K = 2 -> s = 8 per layer: qkv 2*8*(144 + 2*12*4) = 3840, attention 4*64*12 = 3072,
    # o + FFN 2*8*(144 + 3*12*20) = 13824 -> 20736 per layer, 2 layers + LM head 2*12*50 = 1200
    full = F.request_flops(d, F.MethodCost("none", 4), SHAPE_FULL, weight_bytes=4)
    k2 = F.request_flops(d, F.MethodCost("cls-topk", 2), SHAPE_K2, weight_bytes=4)
    assert k2["prefill"] == 2 * (3840 + 3072 + 13824) + 1200 == 42672
    # unpruned, s = 10: 2*10*240 + 4*100*12 + 2*10*864 = 26880 per layer
    assert full["prefill"] == 2 * 26880 + 1200 == 54960
    # first decode step at KV length 8 + 1 = 9: per layer 2*1104 + 4*9*12 = 2640; 2 layers + LM head
    assert k2["decode_first_step"] == 2 * 2640 + 1200 == 6480
    # second (last) step at 10: 2*(2208 + 480) + 1200 = 6576
    assert k2["decode_total"] == 6480 + 6576
    # bytes (fp32): weights 2*1104 + (2*2+1)*12 norms + 12*50 head + 12 embedding row = 2880 elements,
    # KV 2 layers * 2 * 9 * 4 = 144 elements
    assert k2["decode_bytes_first_step"] == (2880 + 144) * 4 == 12096
    # cls-topk: top-2 of 4 = 4 * ceil(log2 2) comparisons
    assert (k2["guidance"], k2["prune"]) == (0.0, 4.0)
    assert k2["ttft"] == 50192 + 1920 + 4 + 42672
    assert F.ideal_ttft_speedup(full, k2) == pytest.approx((50192 + 1920 + 54960) / (50192 + 1920 + 4 + 42672))


def test_flops_methods_by_hand():
    d = F.dims_from_config(SMALL)
    # gprune, N = 4, D = 12, 5 steps, K = 2: 4ND + 2N²D + 6N² + 5*2N² + N + topk = 192 + 384 + 96 + 160 + 4 + 4
    assert F.prune_flops(F.MethodCost("gprune", 2, steps=5), d, SHAPE_K2) == (0.0, 840.0)
    # gridprune, llm guidance (Dg = D = 12), G = 2 -> Z = 4: guidance Q*D = 36; 4*N*12 = 192, + N = 4,
    # + 5Z = 20, + Z*ceil(log2 Z) = 8, + 8N = 32, + topk 4 -> 260
    assert F.prune_flops(F.MethodCost("gridprune", 2, guidance="llm", zones=2), d, SHAPE_K2) == (36.0, 260.0)
    # FitPrune recipe (1, 0): layer 0 entering 4 visual (s_in 10), 3 survive (s_out 9); layer 1: 9 / 9
    fit = F.MethodCost("fitprune", 3, drops=(1, 0))
    entering, final = F.layer_visual_tokens(fit, SHAPE_FULL, 2)
    assert (entering, final) == ([4, 3], 3)
    layer0 = 2 * 10 * 240 + 4 * 100 * 12 + 2 * 9 * 864
    layer1 = 2 * 9 * 240 + 4 * 81 * 12 + 2 * 9 * 864
    assert F.prefill_flops(d.text, 6, entering, final) == layer0 + layer1 + 1200 == 50112
    # statistics at layer 0: R = 4 + 4 rows, S = 10 keys, H = 3: 2RSD + 3HRS + HRS + 2RN + 2N + topk(4, 3)
    assert F.prune_flops(fit, d, SHAPE_FULL) == (0.0, 1920 + 720 + 240 + 64 + 8 + 8)
    # FastV layer 1 keeping 2: the last row only, 2SD + 3HS + HN + topk(4, 2) = 240 + 90 + 12 + 4
    fastv = F.MethodCost("fastv", 2, drops=F.fastv_drops(4, 2, 1, 2))
    assert fastv.drops == (2, 0) and F.prune_flops(fastv, d, SHAPE_FULL) == (0.0, 346.0)


def test_flops_deployment_anchors():
    """DEPLOYMENT.md §4: CLIP-L/336 to layer -2 + projector ≈ 0.39 TFLOP; Vicuna-7B prefill 8.5 / 2.5 / 1.67
    TFLOP at 640 / 192 / 128 tokens; FP16 weights + LM head 13.2 GB; KV 0.5 MiB per token."""
    from edgeprune.models.registry import get_preset

    d = F.dims_from_config(get_preset("llava-1.5-7b").shipped_config())
    assert (F.vision_flops(d.vision) + F.projector_flops(d, 576)) / 1e12 == pytest.approx(0.39, abs=0.005)
    for tokens, tflop in ((640, 8.5), (192, 2.5), (128, 1.67)):
        got = F.prefill_flops(d.text, 64, [tokens - 64] * 32, tokens - 64) / 1e12
        assert got == pytest.approx(tflop, rel=0.01)
    base = F.decode_bytes(d.text, [0] * 32, 2)
    assert base / 1e9 == pytest.approx(13.2, rel=0.005)
    assert F.decode_bytes(d.text, [1] * 32, 2) - base == 2 ** 19


# ---------------------------------------------------------------------------------------------- helpers
def test_synth_question_exact_length(tiny_llava):
    from edgeprune.bench.system import synth_question

    enc = lambda t: tiny_llava.tokenizer(t, add_special_tokens=False).input_ids  # noqa: E731
    for n in (1, 5, 32, 100):
        text, count = synth_question(enc, n)
        assert count == n == len(enc(text))


def test_export_refusal_is_recorded_not_fatal(monkeypatch, tmp_path, tiny_llava):
    from edgeprune.bench import runner
    from edgeprune.export import exporter
    from edgeprune.errors import ExportError
    from edgeprune.methods.base import Budget

    def refuse(*args, **kwargs):
        raise ExportError("method 'gprune' has no ONNX lowering yet; exportable methods: none")

    monkeypatch.setattr(exporter, "export_bundle", refuse)
    combos = [runner.Combo("ort", "gprune", Budget(tokens=64)), runner.Combo("ort", "gprune", Budget(tokens=32))]
    runner._export_bundles(combos, tiny_llava, runner.BenchOptions(), tmp_path, lambda m: None)
    assert all(c.skipped and "no ONNX lowering" in c.skipped and c.bundle is None for c in combos)


# ---------------------------------------------------------------------------------------------- bad inputs
@pytest.mark.parametrize("extra, message", [
    (["--methods", "none,nope"], "unknown method 'nope'"),
    (["--methods", ""], "--methods"),
    (["--backends", "torch,tpu"], "unknown backend 'tpu'"),
    (["--backends", ""], "--backends is empty"),
    (["--tokens", "", "--methods", "cls-topk"], "both empty"),
    (["--tokens", "64,,32"], "comma-separated list of int"),
    (["--tokens", "0"], "--tokens must be a positive integer"),
    (["--ratios", "1.5"], "--ratio must be in (0, 1]"),
    (["--repeat", "0"], "--repeat must be >= 1"),
    (["--method-arg", "nope=1"], "no method"),
    (["--plot", "x.jpg"], "--plot must be a .png file"),
    (["--out", "/nonexistent-dir/r.json"], "does not exist"),
    (["--tokens", "577"], "exceeds the 576 visual tokens"),  # found after the model loads
])
def test_bad_inputs_exit_2_and_write_nothing(tmp_path, capsys, monkeypatch, extra, message):
    monkeypatch.chdir(tmp_path)
    argv = ["bench", "--model", "tiny-llava", "--warmup", "0", "--repeat", "1", "--new-tokens", "1",
            "--out", str(tmp_path / "r.json"), "--markdown", str(tmp_path / "t.md")]
    code = main(argv + extra)
    err = capsys.readouterr().err
    assert code == 2 and message in err and err.count("\n") == 1
    assert list(tmp_path.iterdir()) == []


def test_out_is_a_directory(tmp_path, capsys):
    code = main(["bench", "--out", str(tmp_path)])
    assert code == 2 and "is a directory" in capsys.readouterr().err


def test_report_from_recomputes_with_another_statistic(sweep, tmp_path, capsys):
    doc, paths = sweep
    md = tmp_path / "min.md"
    assert main(["bench", "--report-from", str(paths["out"]), "--statistic", "min", "--markdown", str(md)]) == 0
    assert "ratios from min" in md.read_text() and list(tmp_path.iterdir()) == [md]  # no JSON unless --out
    assert "ttft_efficiency" in capsys.readouterr().out
    bad = tmp_path / "bad.json"
    bad.write_text("{}")
    assert main(["bench", "--report-from", str(bad), "--markdown", str(tmp_path / "x.md")]) == 2
    assert "not an edgeprune-bench" in capsys.readouterr().err and not (tmp_path / "x.md").exists()
