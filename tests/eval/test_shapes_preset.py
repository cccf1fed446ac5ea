"""The trained ``shapes-llava`` preset: loads offline, its accuracy stays at the committed numbers, and its ORT
bundle answers exactly as torch does (accuracy parity). Deterministic computations, no timing."""

from __future__ import annotations

import pytest

from edgeprune.eval import accuracy as A
from edgeprune.eval.datasets import load_data

# Committed results on the first 40 items of the held-out split (benchmarks/results/eval_shapes_torch.json, the
# "Accuracy" section of benchmarks/RESULTS.md): the number of correct answers. A change in the weights, the pipeline, a method or the scorers moves them.
SLICE = 40
EXPECTED_CORRECT = {"none@all/torch": 30, "uniform@64/torch": 32}


@pytest.fixture(scope="module")
def slice_items():
    return load_data("shapes:200", limit=SLICE)[0]


def evaluate(tmp_path, items, methods, tokens, backends=("torch",)):
    opts = A.EvalOptions(model="shapes-llava", methods=methods, tokens=tokens, backends=backends,
                         max_new_tokens=3, bundle_dir=str(tmp_path / "bundles"), ort_variant=False)
    combos = A.plan(methods, tokens, backends, {})
    data = {"kind": "shapes", "n": len(items), "seed": 1, "spec": f"shapes:{len(items)}"}
    doc = A.new_document(opts, data, items)
    return A.run_eval(opts, items, combos, doc, tmp_path / "eval.json", log=lambda m: None)


def correct(doc, items, label):
    preds = doc["predictions"][label]
    return int(sum(it.score(preds[it.id]) for it in items))


def test_preset_loads_offline_with_its_clip():
    from edgeprune.api import build_pipeline

    pipe = build_pipeline("shapes-llava", "gridprune", tokens=64)
    assert pipe.backend.clip is not None and pipe.backend.clip.name == "shapes-clip"
    assert pipe.backend.loaded.source == "packaged"


def test_accuracy_regression_guard(tmp_path, slice_items):
    doc = evaluate(tmp_path, slice_items, ["none", "uniform"], [64])
    got = {label: correct(doc, slice_items, label) for label in EXPECTED_CORRECT}
    assert got == EXPECTED_CORRECT


@pytest.mark.slow  # exports a bundle: ~30 s of CPU on an idle 2-core machine, minutes on a shared one
def test_ort_bundle_answers_as_torch(tmp_path, slice_items):
    pytest.importorskip("onnxruntime")
    items = slice_items[:16]
    doc = evaluate(tmp_path, items, ["uniform"], [64], backends=("torch", "ort"))
    torch_preds = doc["predictions"]["uniform@64/torch"]
    ort_preds = doc["predictions"]["uniform@64/ort"]
    assert ort_preds == torch_preds  # same answer text on every item: exact accuracy parity
    ort_row = next(r for r in doc["results"] if r["label"] == "uniform@64/ort")
    assert ort_row["agree_torch"] == 1.0
    # the exported bundle evaluates on its own (method and K from its manifest), with its torch twin
    from edgeprune.cli import main

    out = tmp_path / "bundle.json"
    assert main(["eval", "--bundle", str(tmp_path / "bundles" / "uniform-64"), "--backends", "ort,torch",
                 "--data", "shapes:4", "--max-new-tokens", "3", "--out", str(out)]) == 0
    import json

    doc = json.loads(out.read_text())
    assert [r["label"] for r in doc["results"]] == ["uniform@64/ort", "uniform@64/torch"]
    assert doc["predictions"]["uniform@64/ort"] == {k: torch_preds[k] for k in doc["predictions"]["uniform@64/ort"]}
