"""``benchmarks/gpu.py``: the prepared GPU run. Its dry run must pass on the CPU, so the GPU minutes measure
instead of debugging; its pieces (the bench command, the FitPrune latency recipe) are checked on their own."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def _gpu_module():
    spec = importlib.util.spec_from_file_location("gpu_script", REPO / "benchmarks" / "gpu.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_gpu_bench_command_is_the_issue_sweep(tmp_path):
    gpu = _gpu_module()
    cmd = gpu.bench_command(tmp_path, tmp_path / "r.json", dry_run=False, warmup=2, repeat=5)
    line = " ".join(cmd)
    for part in ("--model llava-1.5-7b", "--random-weights", "--dtype fp16", "--device cuda", "--backends torch",
                 "--methods none,cls-topk,gridprune,gprune,fastv,fitprune", "--tokens 576,192,128,64",
                 f"fitprune.recipe={tmp_path / 'r.json'}"):
        assert part in line
    assert "--ceilings" not in line  # the GPU run measures the real ceilings (CUDA events)
    dry = " ".join(gpu.bench_command(tmp_path, tmp_path / "r.json", dry_run=True, warmup=2, repeat=5))
    assert "--model tiny-llava" in dry and "--device cpu" in dry and "--ceilings quick" in dry


def test_latency_recipe_for_llava_7b_meets_its_budget(tmp_path):
    from edgeprune.methods.fitprune_recipe import load_recipe

    gpu = _gpu_module()
    data = gpu.latency_recipe("llava-1.5-7b", 0.7, tmp_path / "r.json")
    recipe = load_recipe(tmp_path / "r.json")  # the method's own loader accepts it
    assert recipe.num_layers == 32 and recipe.n_visual == 576 and sum(recipe.drops) <= 576
    assert recipe.drops[:2] == (0, 0) and data["flops_ratio"] <= 0.3


@pytest.mark.slow
def test_gpu_script_dry_run_passes(tmp_path):
    out = tmp_path / "gpu"
    proc = subprocess.run([sys.executable, "benchmarks/gpu.py", "--dry-run", "--out", str(out)], cwd=REPO,
                          capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    steps = {s["step"]: s for s in json.loads((out / "steps.json").read_text())}
    assert set(steps) == {"system", "kernels", "plugin", "recipe", "bench"}
    assert all(s["rc"] == 0 for s in steps.values())
    doc = json.loads((out / "bench.json").read_text())
    assert {r["method"] for r in doc["results"] if r["status"] == "ok"} == {
        "none", "cls-topk", "gridprune", "gprune", "fastv", "fitprune"}
    assert all(r["roofline"]["decode_step"]["bound_tokens_per_s"] > 0 for r in doc["results"] if r["status"] == "ok")
    text = (out / "summary.md").read_text()
    assert "dry run" in text and "## edgeprune bench" in text and "furthest from its limit" in text
    assert (out / "plugin" / "plugin_launch.json").exists() and (out / "system.json").exists()
