"""``edgeprune compare``: torch vs ort parity report on a tiny-llava cls-topk bundle (exit 0), its JSON schema,
perturbed comparisons that must fail (exit 1), the numpy fallback without Polygraphy, and bad inputs (exit 2)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from edgeprune._deps import available
from edgeprune.cli import main
from edgeprune.eval import checks as K
from edgeprune.eval import compare as C
from edgeprune.bundle.format import MANIFEST
from edgeprune.runtime.ort_backend import OrtBackend

PROMPT = "What does the sign say?"


@pytest.fixture(scope="module")
def bundle(exported_bundle, tiny_llava):
    """One cls-topk K=64 bundle, shared by the session (tests/conftest.py)."""
    return exported_bundle(tiny_llava, "cls-topk", 64)


@pytest.fixture(scope="module")
def method_bundle(exported_bundle, tiny_llava):
    """Bundles of other methods (the session's, reusing cls-topk's model graphs)."""
    return lambda method, k, args: exported_bundle(tiny_llava, method, k, args)


def _cli(capsys, *argv):
    code = main(["compare", *map(str, argv)])
    out, err = capsys.readouterr()
    return code, out, err


def test_happy_path_json_schema(bundle, capsys):
    code, out, err = _cli(capsys, "--bundle", bundle, "--prompt", PROMPT, "--max-new-tokens", 4, "--json")
    assert code == 0, err
    rep = json.loads(out)
    assert set(rep) == {"bundle", "backends", "model", "method", "k", "prompt", "tolerance", "comparator", "checks",
                        "tokens", "backend_info", "passed"}
    assert rep["passed"] is True and rep["backends"] == {"reference": "torch", "candidate": "ort"}
    assert rep["backend_info"]["ort"] == {"providers": "CPUExecutionProvider",  # the fused decoder on the CPU
                                          "graph_files": "vision.onnx,prune.onnx,embed.onnx,decoder.ort.onnx"}
    assert (rep["model"], rep["method"], rep["k"]) == ("tiny-llava", "cls-topk", 64)
    assert rep["tolerance"]["dtype"] == "fp32" and rep["tolerance"]["value"] == 1e-4
    stages = [(c["stage"], c["output"], c["step"]) for c in rep["checks"]]
    assert stages == [("preprocess", "pixel_values", None), ("tokenize", "prompt_ids", None),
                      ("vision", "features", None), ("vision", "cls_attn", None), ("prune", "kept_idx", None),
                      ("embed", "inputs_embeds", None), ("embed", "kept_positions", None),
                      ("prefill", "logits", 0), ("decode", "logits", 1), ("decode", "logits", 2),
                      ("decode", "logits", 3)]
    for c in rep["checks"]:
        assert c["passed"] is True
        if c["kind"] == "close":
            assert 0 <= c["max_abs"] <= c["atol"] and c["max_rel"] >= 0
        else:
            assert c["mismatches"] == 0
    logits = [c for c in rep["checks"] if c["output"] == "logits"]
    assert all(c["shape"] == [1024] and c["max_abs"] < 1e-5 for c in logits)  # fp32: orders below the bound
    tok = rep["tokens"]
    assert len(tok["candidate"]) == 4 and tok["candidate"] == tok["reference_argmax"] and tok["passed"]
    assert len(tok["decided"]) >= 2  # the margin rule is not vacuous on this model


def test_happy_path_table(bundle, capsys):
    code, out, err = _cli(capsys, "--bundle", bundle, "--max-new-tokens", 2)
    assert code == 0, err
    assert "ort vs torch (reference)" in out and out.rstrip().endswith("PASS: within tolerance")
    assert "kept_idx" in out and "cls_attn" in out


@pytest.mark.parametrize("method,args,extra", [
    ("gprune", {}, set()), ("gridprune", {"guidance": "llm"}, {("guidance", "guidance")}),
    pytest.param("fastv", {}, {("prefill", "kept"), ("prefill", "layer_tokens"), ("prefill", "cache_lengths")},
                 marks=pytest.mark.slow)])  # fastv: in-LLM prefill + ragged decoder graphs, ~20 s of export
def test_other_methods_pass(method, args, extra, method_bundle):
    rep = C.compare_bundle(method_bundle(method, 64, args), max_new_tokens=3)
    assert rep.passed, rep.table()
    outputs = {(c.stage, c.output) for c in rep.checks}
    assert extra <= outputs and (("prune", "kept_idx") in outputs) == (method != "fastv")


def test_zero_tolerance_fails_with_exit_1(bundle, capsys, monkeypatch):
    strict = {k: K.with_tolerance(t, value=0.0, attention=0.0) for k, t in K.TOLERANCES.items()}
    monkeypatch.setattr(C, "TOLERANCES", strict)
    code, out, _ = _cli(capsys, "--bundle", bundle, "--max-new-tokens", 2, "--json")
    assert code == 1
    rep = json.loads(out)
    assert rep["passed"] is False
    failed = {(c["stage"], c["output"]) for c in rep["checks"] if not c["passed"]}
    assert ("prefill", "logits") in failed  # fp32 backends never agree to the last bit on logits
    assert all(c["passed"] for c in rep["checks"] if c["kind"] == "exact")  # indices stay exact


def test_perturbed_logits_fail_logits_and_tokens(bundle, capsys, monkeypatch):
    decode = OrtBackend.decode

    def perturbed(self, token, position):
        logits = decode(self, token, position).copy()
        logits[(int(np.argmax(logits)) + 1) % logits.size] += 100.0  # a new, clear winner
        return logits

    monkeypatch.setattr(OrtBackend, "decode", perturbed)
    code, out, _ = _cli(capsys, "--bundle", bundle, "--max-new-tokens", 3)
    assert code == 1 and "FAIL: outside tolerance" in out
    rep = C.compare_bundle(bundle, max_new_tokens=3)
    bad = [c for c in rep.checks if not c.passed]
    assert {(c.stage, c.step) for c in bad} == {("decode", 1), ("decode", 2)}
    assert all(c.max_abs > 50 for c in bad)
    assert rep.tokens.mismatched == [1, 2] and not rep.tokens.passed


def test_numpy_fallback_gives_the_same_verdicts(bundle, monkeypatch):
    """Polygraphy is optional: without it numpy applies the same rules (CI may run either path)."""
    with_poly = C.compare_bundle(bundle, max_new_tokens=2)  # Polygraphy when installed, else numpy
    monkeypatch.setattr(K, "available", lambda name: False)
    plain = C.compare_bundle(bundle, max_new_tokens=2)
    assert plain.comparator.startswith("numpy") and plain.passed
    assert with_poly.comparator.startswith("polygraphy" if available("polygraphy.comparator") else "numpy")
    assert [(c.output, c.passed) for c in plain.checks] == [(c.output, c.passed) for c in with_poly.checks]
    for a, b in zip(plain.checks, with_poly.checks):
        if a.kind == "close":
            assert a.max_abs == pytest.approx(b.max_abs, rel=1e-6, abs=1e-12) and a.atol == b.atol
    monkeypatch.undo()
    # ... and on failures: the checker itself, both ways
    for poly in (True, False):
        ck = K.Checker(K.TOLERANCES["fp32"], ("torch", "ort"))
        ck.polygraphy = poly and ck.polygraphy
        ref = np.linspace(-3, 3, 11)
        assert ck.close("s", "x", ref + 2e-4, ref).passed  # scale max(1, 3): bound 3e-4
        assert not ck.close("s", "x", ref + 4e-4, ref).passed
        assert not ck.close("s", "x", np.full(11, np.nan), ref).passed
        assert not ck.exact("s", "i", np.array([1, 2, 4]), np.array([1, 2, 3])).passed
        assert not ck.exact("s", "i", np.array([1, 2]), np.array([1, 2, 3])).passed


# ----------------------------------------------------------------------------------- bad inputs: exit 2
def _edited(bundle, tmp_path, **model):
    root = tmp_path / "b"
    shutil.copytree(bundle, root)
    m = json.loads((root / MANIFEST).read_text())
    m["model"].update(model)
    (root / MANIFEST).write_text(json.dumps(m))  # the manifest holds the hashes; it is not hashed itself
    return root


@pytest.mark.parametrize("case,match", [
    ("missing", "does not exist"), ("backend", "unknown backend 'tpu'"), ("one-backend", "takes two names"),
    ("model", "cannot rebuild the torch reference"), ("weights", "fingerprint mismatch"),
    ("image", "image"), ("tokens", "--max-new-tokens must be a positive integer")])
def test_bad_inputs_exit_2(case, match, bundle, tmp_path, capsys):
    argv = ["--bundle", bundle, "--max-new-tokens", 1]
    if case == "missing":
        argv[1] = tmp_path / "nope"
    elif case == "backend":
        argv += ["--backends", "torch,tpu"]
    elif case == "one-backend":
        argv += ["--backends", "ort"]
    elif case == "model":
        argv[1] = _edited(bundle, tmp_path, name="no-such-model")
    elif case == "weights":
        argv[1] = _edited(bundle, tmp_path, fingerprint="0" * 64)
    elif case == "image":
        argv += ["--image", tmp_path / "missing.png"]
    else:
        argv[3] = 0
    code, out, err = _cli(capsys, *argv)
    assert code == 2 and out == ""
    assert match in err and err.startswith("edgeprune compare: error:") and err.count("\n") == 1


def test_without_torch_ort_vs_ort_runs_and_torch_is_a_clear_error(bundle):
    """The ort side needs no torch (Jetson); asking for the torch reference there names the extra, exit 2."""
    import os
    import subprocess
    import sys

    code = ("import sys\nfor m in ('torch', 'transformers'):\n    sys.modules[m] = None\n"
            "from edgeprune.cli import main\n"
            f"a = main(['compare', '--bundle', {str(bundle)!r}, '--backends', 'ort,ort', '--max-new-tokens', '2'])\n"
            f"b = main(['compare', '--bundle', {str(bundle)!r}, '--max-new-tokens', '2'])\n"
            "sys.exit(10 * a + b)\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, HF_HUB_OFFLINE="1"))
    assert proc.returncode == 2, proc.stderr  # a = 0 (ort,ort passes), b = 2
    assert "PASS" in proc.stdout and "torch is not installed" in proc.stderr and "Traceback" not in proc.stderr
