"""``edgeprune eval`` end to end on a few shapes items (seconds): outputs, resume, and the error paths."""

from __future__ import annotations

import json

import pytest

from edgeprune.cli import main


def run_eval(tmp_path, *extra):
    out = tmp_path / "eval.json"
    argv = ["eval", "--model", "shapes-llava", "--data", "shapes:4", "--methods", "none,uniform,cls-topk",
            "--tokens", "64,32", "--max-new-tokens", "3", "--out", str(out), *extra]
    return main(argv), out


def test_eval_small_slice_writes_json_markdown_plot(tmp_path, capsys):
    md, png = tmp_path / "eval.md", tmp_path / "eval.png"
    code, out = run_eval(tmp_path, "--markdown", str(md), "--plot", str(png))
    assert code == 0
    doc = json.loads(out.read_text())
    labels = [r["label"] for r in doc["results"]]
    assert labels == ["none@all/torch", "uniform@64/torch", "uniform@32/torch", "cls-topk@64/torch",
                      "cls-topk@32/torch"]
    none = doc["results"][0]
    assert none["n"] == 4 and none["accuracy_kept"] == 1.0 and none["agree_unpruned"] == 1.0
    assert set(none["per_type"]) == {"color", "shape", "exist", "position"}
    assert all(len(doc["predictions"][lab]) == 4 for lab in labels)
    assert "| uniform |" in md.read_text() and png.read_bytes()[:4] == b"\x89PNG"
    assert "wrote" in capsys.readouterr().out


def test_eval_resumes_and_skips_complete_combinations(tmp_path, capsys):
    code, out = run_eval(tmp_path)
    assert code == 0
    first = json.loads(out.read_text())
    doc = json.loads(out.read_text())
    del doc["predictions"]["uniform@32/torch"]["shapes-1-3"]  # as if interrupted before the last answer
    doc["predictions"]["uniform@64/torch"]["shapes-1-0"] = "sentinel"  # a done answer is kept, not recomputed
    out.write_text(json.dumps(doc))
    capsys.readouterr()
    assert run_eval(tmp_path)[0] == 0
    assert "4 of 5 combinations already complete" in capsys.readouterr().err
    again = json.loads(out.read_text())
    assert again["predictions"]["uniform@32/torch"] == first["predictions"]["uniform@32/torch"]
    assert again["predictions"]["uniform@64/torch"]["shapes-1-0"] == "sentinel"


def test_eval_refuses_results_of_other_data(tmp_path, capsys):
    code, out = run_eval(tmp_path)
    assert code == 0
    capsys.readouterr()
    code = main(["eval", "--data", "shapes:3:7", "--methods", "none", "--out", str(out)])
    assert code == 2
    assert "error:" in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["--methods", "none,nope"], "nope"),
    (["--backends", "torch,trt"], "--backends"),
    (["--tokens", "64,x"], "--tokens"),
    (["--data", "shapes:0"], "shapes:0"),
    (["--plot", "x.jpg"], ".png"),
])
def test_eval_user_errors_exit_2_before_loading(tmp_path, capsys, argv, message):
    code = main(["eval", "--out", str(tmp_path / "e.json"), *argv])
    err = capsys.readouterr().err
    assert code == 2 and "error:" in err and message in err and "Traceback" not in err
    assert not (tmp_path / "e.json").exists()


def test_eval_malformed_jsonl_line_is_one_error_line(tmp_path, capsys):
    bad = tmp_path / "d.jsonl"
    bad.write_text('{"image": "a.png", "question": "q", "answer": "x"}\n{broken\n')
    (tmp_path / "a.png").write_bytes(b"")
    code = main(["eval", "--data", str(bad), "--out", str(tmp_path / "e.json")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "d.jsonl:2: not valid JSON" in err[0]


def test_bundle_dir_reuses_only_matching_bundles(tmp_path):
    from edgeprune.eval.accuracy import Combo, EvalOptions, _matching_bundle

    manifest = {"opset": 18, "model": {"fingerprint": "abc", "dtype": "fp32"},
                "method": {"name": "uniform", "uses_budget": True, "k": 64, "params": {"positions": "compact"}}}
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    opts = EvalOptions(model="shapes-llava", methods=["uniform"], tokens=[64])
    assert _matching_bundle(tmp_path, Combo("uniform", 64, "ort"), "abc", opts)
    assert not _matching_bundle(tmp_path, Combo("uniform", 64, "ort"), "other-weights", opts)
    assert not _matching_bundle(tmp_path, Combo("uniform", 32, "ort"), "abc", opts)
    assert not _matching_bundle(tmp_path, Combo("uniform", 64, "ort", {"positions": "original"}), "abc", opts)
    assert not _matching_bundle(tmp_path, Combo("uniform", 64, "ort"), "abc", EvalOptions(
        model="shapes-llava", methods=["uniform"], tokens=[64], opset=23))
    assert not _matching_bundle(tmp_path / "missing", Combo("uniform", 64, "ort"), "abc", opts)


@pytest.mark.parametrize("ks", [[64, 32], []])
def test_markdown_tables_have_as_many_cells_as_their_header(ks):
    """Budgets or none at all (FitPrune carries its recipe, so its rows have no K): header, separator and rows agree."""
    from edgeprune.eval.accuracy import markdown

    rows = [{"backend": "torch", "method": m, "k": k, "label": f"{m}@{k}", "accuracy": 0.5, "accuracy_kept": 1.0,
             "per_type": {"color": 0.5}, "agree_unpruned": 1.0, "agree_torch": None}
            for m, k in [("none", None), *(("uniform", k) for k in ks), ("fitprune", None)]]
    text = markdown({"results": rows, "data": {"spec": "shapes:4", "n": 4}, "model": "shapes-llava", "command": "x"})
    for table in text.split("\n\n"):
        cells = [line.count("|") for line in table.splitlines() if line.startswith("|")]
        assert len(set(cells)) <= 1, table
