"""Every user mistake of issue 11: one ``error:`` line, exit code 2, no traceback, nothing written, and (for the
cases that can be checked from the model's config) before any model is built.

Each case runs in an empty working directory with the model builders replaced by a function that fails the
test, so "before the expensive work" is checked, not timed.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from edgeprune.cli import main


def _no_cuda() -> bool:
    import torch

    return not torch.cuda.is_available()


# (argv, a phrase the error must contain, whether the model may be built first)
CASES = {
    "seed -1": (["run", "--seed", "-1"], "--seed must be in [0, 2^64 - 1]"),
    "temperature nan": (["run", "--do-sample", "--temperature", "nan"], "--temperature must be a finite number"),
    "temperature 1e-320": (["run", "--do-sample", "--temperature", "1e-320"], ">= 1e-06"),
    "random seed 2^64": (["run", "--method", "random", "--tokens", "8", "--method-arg", f"seed={2**64}"],
                         "seed must be in [0, 2^64 - 1"),
    "device bogus": (["run", "--device", "bogus"], "not a device name"),
    "trace missing dir": (["run", "--trace", "no/such/dir/t.json"], "does not exist"),
    "trace is a dir": (["run", "--trace", "."], "is a directory"),
    "gridprune zones 1000": (["run", "--method", "gridprune", "--tokens", "64", "--method-arg", "zones=1000"],
                             "zones must be in [1, 24]"),
    "gridprune zones 100000 on NeXT": (["run", "--model", "tiny-llava-next", "--method", "gridprune",
                                        "--method-arg", "zones=100000"], "zones must be in [1, 24]"),
    "gridprune tau 1e-320": (["run", "--method", "gridprune", "--method-arg", "tau=1e-320"], "tau must be a finite"),
    "gprune steps": (["run", "--method", "gprune", "--tokens", "64", "--method-arg", "steps=100000"],
                     "steps must be an integer in [0, 64]"),
    "gprune temperature": (["run", "--method", "gprune", "--method-arg", "temperature=1e-320"], ">= 0.001"),
    "fastv layer": (["run", "--method", "fastv", "--method-arg", "layer=9"], "exceeds the model's 4 layers"),
    "tokens > N": (["run", "--method", "cls-topk", "--tokens", "1000"], "use 1 <= K <= 576"),
    "tokens > N on NeXT": (["run", "--model", "tiny-llava-next", "--method", "cls-topk", "--tokens", "5000"],
                           "use 1 <= K <= 2880"),
    "tokens > N from a shipped config": (["run", "--model", "llava-1.5-7b", "--random-weights", "--method",
                                          "cls-topk", "--tokens", "1000"], "use 1 <= K <= 576"),
    "max-new-tokens beyond the context": (["run", "--max-new-tokens", "5000"], "use --max-new-tokens <= 3519"),
    "bundle --device": (["run", "--bundle", "b", "--device", "cpu"], "--device does not apply to --bundle"),
    "bundle --dtype": (["run", "--bundle", "b", "--dtype", "fp16"], "--dtype does not apply"),
    "bundle --random-weights": (["run", "--bundle", "b", "--random-weights"], "--random-weights does not apply"),
    "bundle --clip": (["run", "--bundle", "b", "--clip", "tiny-clip"], "--clip does not apply"),
    "bundle --kernels": (["run", "--bundle", "b", "--kernels", "torch"], "--kernels does not apply"),
    "bundle two flags": (["run", "--bundle", "b", "--device", "cuda", "--dtype", "fp16"], "--device and --dtype do"),
    "viz device bogus": (["viz", "--method", "uniform", "--device", "bogus"], "not a device name"),
    "viz zones": (["viz", "--method", "gridprune", "--method-arg", "zones=1000"], "zones must be in [1, 24]"),
    "demo tokens > N": (["demo", "--tokens", "1000"], "use 1 <= K <= 576"),
    "demo repeat 0": (["demo", "--repeat", "0"], "--repeat must be a positive integer"),
    "export zones 1000": (["export", "--method", "gridprune", "--tokens", "8", "--method-arg", "zones=1000",
                           "--out", "b"], "zones must be in [1, 24]"),
    "bench device bogus": (["bench", "--device", "bogus", "--out", "r.json"], "not a device name"),
    "bench zones": (["bench", "--methods", "gridprune", "--method-arg", "zones=99", "--out", "r.json"],
                    "zones must be in [1, 24]"),
    "models --out without --save": (["models", "--out", "x"], "--out only applies with --save"),
}
if _no_cuda():
    CASES["device cuda without CUDA"] = (["run", "--device", "cuda"], "sees no CUDA device")
    CASES["viz device cuda without CUDA"] = (["viz", "--method", "uniform", "--device", "cuda:0"],
                                             "sees no CUDA device")


@pytest.fixture
def no_model_build(monkeypatch):
    """Building any model fails the test: the errors above must come first."""
    import edgeprune.models.loader as loader
    import edgeprune.models.tiny as tiny

    def refuse(*args, **kwargs):
        raise AssertionError("a model was built before the bad input was reported")

    monkeypatch.setattr(loader, "load_model", refuse)
    monkeypatch.setattr(loader, "build_tiny", refuse)
    monkeypatch.setattr(tiny, "build_random_model", refuse)


@pytest.mark.parametrize("name", sorted(CASES))
def test_bad_input_is_one_error_line_exit_2_before_any_model(name, tmp_path, monkeypatch, capsys, no_model_build):
    argv, needle = CASES[name]
    monkeypatch.chdir(tmp_path)
    code = main(argv)
    out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith(f"edgeprune {argv[0]}: error: "), err
    assert needle in lines[0], lines[0]
    assert "Traceback" not in err and out == ""
    assert list(tmp_path.iterdir()) == []  # nothing written


def test_kernels_triton_on_the_cpu_without_the_interpreter(tmp_path):
    """--kernels triton on a CPU-only machine without TRITON_INTERPRET: one error line before any model. In a
    child process, because this test session runs Triton's interpreter (tests/conftest.py)."""
    pytest.importorskip("triton")
    if not _no_cuda():
        pytest.skip("a CUDA device is visible: --kernels triton is valid here")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-m", "edgeprune", "run", "--method", "gridprune", "--kernels", "triton"],
                          capture_output=True, text=True, timeout=300, cwd=tmp_path, env=env)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert lines[0].startswith("edgeprune run: error: ") and "--kernels" in lines[0], lines[0]
    assert proc.stdout == "" and list(tmp_path.iterdir()) == []


def test_trace_is_checked_before_the_request_runs(tmp_path, monkeypatch, capsys):
    """--trace into a directory fails before the pipeline is even built (not after the whole request)."""
    import edgeprune.api as api

    def refuse(*args, **kwargs):
        raise AssertionError("the request ran before --trace was checked")

    monkeypatch.setattr(api, "run_request", refuse)
    assert main(["run", "--trace", str(tmp_path)]) == 2
    assert "is a directory" in capsys.readouterr().err


def test_trace_is_written_whole(tmp_path, capsys):
    import json

    out = tmp_path / "t.json"
    assert main(["run", "--max-new-tokens", "2", "--trace", str(out)]) == 0
    assert json.loads(out.read_text())["traceEvents"] and [p.name for p in tmp_path.iterdir()] == ["t.json"]


def test_methods_into_a_closed_pipe_is_quiet():
    """`edgeprune methods | head -1`: the reader leaves early; no BrokenPipeError traceback, no 'Exception ignored'."""
    cmd = f"{sys.executable} -m edgeprune methods | head -1"
    proc = subprocess.run(["bash", "-o", "pipefail", "-c", cmd], capture_output=True, text=True, timeout=120)
    assert proc.stdout.startswith("none "), proc.stdout
    assert proc.stderr == "", proc.stderr
    assert proc.returncode in (0, 1)  # 1: edgeprune saw the closed pipe (the Python docs' convention)


def test_build_pipeline_ort_takes_the_bundles_method(monkeypatch):
    """`build_pipeline(None, backend="ort", bundle=...)`: method None reaches the ORT builder as None (the
    bundle's), not "none" (which the bundle would refuse as a contradiction)."""
    import edgeprune.runtime.ort_backend as ort_backend
    from edgeprune.api import build_pipeline

    seen = {}
    monkeypatch.setattr(ort_backend, "build_ort_pipeline", lambda bundle, providers, **kw: seen.update(kw) or "pipe")
    assert build_pipeline(None, backend="ort", bundle="b") == "pipe"
    assert seen["method"] is None
