"""Every subcommand: --help, a happy path on the tiny preset, and its bad inputs (one line, exit 2)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from edgeprune.cli import COMMANDS, main


def _run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("cmd", [m.__name__.rsplit(".", 1)[-1].replace("_", "-") for m in COMMANDS])
def test_help(cmd, capsys):
    with pytest.raises(SystemExit) as exc:
        main([cmd, "--help"])
    assert exc.value.code == 0
    assert f"usage: edgeprune {cmd}" in capsys.readouterr().out


def test_no_command_prints_help(capsys):
    code, out, _ = _run(capsys)
    assert code == 0 and "COMMAND" in out


def test_methods_and_models_listing(capsys):
    code, out, _ = _run(capsys, "methods", "--json")
    rows = json.loads(out)
    names = {r["name"] for r in rows}
    assert {"none", "random", "uniform", "cls-topk"} <= names
    assert all(r["paper"] for r in rows)
    random = next(r for r in rows if r["name"] == "random")
    assert {"name": "seed", "type": "int", "default": "0"}.items() <= random["params"][1].items()
    code, out, _ = _run(capsys, "methods")
    assert code == 0 and "--method-arg seed=<int>" in out
    code, out, _ = _run(capsys, "models")
    assert code == 0 and "tiny-llava-next" in out and "llava-hf/llava-1.5-7b-hf" in out


def test_run_json_happy_path(capsys, tmp_path):
    trace = tmp_path / "trace.json"
    code, out, err = _run(capsys, "run", "--model", "tiny-llava", "--method", "cls-topk", "--tokens", "64",
                          "--prompt", "What does the sign say?", "--max-new-tokens", "4", "--json",
                          "--trace", str(trace))
    assert code == 0, err
    res = json.loads(out)
    assert len(res["kept"]) == 64 and res["n_visual"] == 576 and res["visual_tokens_to_llm"] == 64
    assert res["kept"] == sorted(res["kept"]) and 1 <= len(res["tokens"]) <= 4
    assert res["profile"]["counters"]["visual_kept"] == 64
    assert json.loads(trace.read_text())["traceEvents"]


def test_run_profile_table_with_image(capsys, tmp_path, rgb_image):
    path = tmp_path / "x.png"
    rgb_image.save(path)
    code, out, err = _run(capsys, "run", "--image", str(path), "--method", "uniform", "--ratio", "0.25",
                          "--max-new-tokens", "2", "--profile")
    assert code == 0, err
    assert "144/576 kept" in out and "prefill" in out and "TTFT" in out


def test_models_save_round_trip(capsys, tmp_path):
    out_dir = tmp_path / "tiny"
    code, _, err = _run(capsys, "models", "--save", "tiny-llava", "--out", str(out_dir))
    assert code == 0, err and (out_dir / "config.json").exists()
    code, out, err = _run(capsys, "run", "--model", str(out_dir), "--max-new-tokens", "2", "--json")
    assert code == 0, err and json.loads(out)["n_visual"] == 576
    code, _, err = _run(capsys, "models", "--save", "tiny-llava", "--out", str(out_dir))
    assert code == 2 and "already exists" in err


def _corrupt(tmp_path):
    p = tmp_path / "corrupt.png"
    p.write_bytes(os.urandom(300))
    return str(p)


def _not_llava(tmp_path):
    d = tmp_path / "bert"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"model_type": "bert"}))
    return str(d)


def _broken_config(tmp_path):
    d = tmp_path / "broken"
    d.mkdir()
    (d / "config.json").write_text("{ not json")
    return str(d)


BAD = {
    "missing image": (lambda t: ["run", "--image", str(t / "nope.jpg")], "nope.jpg"),
    "corrupt image": (lambda t: ["run", "--image", _corrupt(t)], "corrupt.png"),
    "unknown model": (lambda t: ["run", "--model", "tiny-lava"], "known: "),
    "unknown method": (lambda t: ["run", "--method", "gridprunee"], "known: "),
    "bad method arg": (lambda t: ["run", "--method", "random", "--method-arg", "sed=1"], "known: positions, seed"),
    "K <= 0": (lambda t: ["run", "--method", "cls-topk", "--tokens", "0"], "positive"),
    "K > N": (lambda t: ["run", "--method", "cls-topk", "--tokens", "577"], "exceeds the 576"),
    "ratio 0": (lambda t: ["run", "--method", "cls-topk", "--ratio", "0"], "(0, 1]"),
    "ratio > 1": (lambda t: ["run", "--method", "cls-topk", "--ratio", "1.5"], "(0, 1]"),
    "prompt with image": (lambda t: ["run", "--prompt", "see <image>"], "must not contain"),
    "prompt too long": (lambda t: ["run", "--prompt", "word " * 5000], "context"),
    "not a llava dir": (lambda t: ["run", "--model", _not_llava(t)], "LLaVA"),
    "broken config": (lambda t: ["run", "--model", _broken_config(t)], "not valid JSON"),
    "new tokens 0": (lambda t: ["run", "--max-new-tokens", "0"], "positive"),
    "demo bad method": (lambda t: ["demo", "--method", "nope"], "known: "),
    "save real preset": (lambda t: ["models", "--save", "llava-1.5-7b", "--out", str(t / "x")], "offline preset"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_inputs_exit_2_with_one_line(case, capsys, tmp_path):
    argv_fn, needle = BAD[case]
    before = set(os.listdir(tmp_path))
    argv = argv_fn(tmp_path)
    created = set(os.listdir(tmp_path)) - before
    code, out, err = _run(capsys, *argv)
    assert code == 2, (case, out, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "error:" in lines[0] and needle in lines[0], lines
    assert "Traceback" not in err and out == ""
    assert set(os.listdir(tmp_path)) - before == created  # nothing written


def test_console_script_exit_code_in_subprocess(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "edgeprune", "run", "--image", str(tmp_path / "missing.png")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and "missing.png" in proc.stderr


def test_budget_for_a_method_without_one_is_refused(capsys, tmp_path):
    from edgeprune.methods.fitprune_recipe import Recipe, save_recipe

    recipe = tmp_path / "r.json"
    save_recipe(Recipe(budget=0.5, n_visual=576, num_layers=4, drops=(100, 100, 100, 0)), str(recipe))
    for argv, why in ((["run", "--method", "none", "--tokens", "64"], "keeps every token"),
                      (["run", "--method", "fitprune", "--method-arg", f"recipe={recipe}", "--ratio", "0.5"],
                       "its recipe sets the budget")):
        code, out, err = _run(capsys, *argv)
        assert code == 2 and "does not take --tokens/--ratio" in err and why in err, err
