"""Everything only a GPU can show, in one prepared run of under 8 minutes: kernels, plugin launch path, 7B bench.

    python benchmarks/gpu.py --out DIR            # on a CUDA GPU (default DIR: $OUT, else benchmarks/results/gpu)
    python benchmarks/gpu.py --out DIR --dry-run  # on this CPU: every step, with tiny-llava and recorded launches

Steps (each one's command, exit code, seconds and log are recorded in ``DIR/steps.json``; a failing step does not
stop the others):

1. ``system``: the GPU name, driver, CUDA and library versions (``nvidia-smi`` when present, the bench's machine
   record otherwise) into ``DIR/system.json`` / ``DIR/nvidia-smi.txt``;
2. ``kernels``: ``benchmarks/kernels.py`` (the fused Triton kernels vs the torch reference: kept indices equal
   and CUDA-event µs at N = 576 and 2,880) into ``DIR/kernels.txt``;
3. ``plugin``: ``benchmarks/plugin_launch.py --out DIR/plugin`` (the AOT PTX launched through the CUDA driver
   with the plugins' documented argument contract, exactness and µs) into ``DIR/plugin/plugin_launch.json``;
4. ``recipe``: a FitPrune recipe for the bench model's depth (``DIR/fitprune-recipe.json``): equal drops at
   every layer from layer 2 on, the smallest that remove ``--fitprune-budget`` of the visual-token FLOPs under
   FitPrune's own FLOPs model. It is a latency recipe, not one fitted on attention statistics: with random
   weights there are none worth fitting, and its FLOPs are what the latency depends on;
5. ``bench``: ``edgeprune bench --model llava-1.5-7b --random-weights --dtype fp16 --device cuda --backends
   torch`` for none, cls-topk, gridprune, gprune, fastv and fitprune at 576/192/128/64 kept tokens, with the
   roofline ceilings (CUDA-event GEMM and copy) and so the decode bandwidth bound, into ``DIR/bench.*``;
6. ``DIR/summary.md``: the GPU, driver and versions, the kernel and plugin tables, the bench table with its
   roofline lines and target checks, ready to paste into ``benchmarks/RESULTS.md``.

``--dry-run`` runs the same steps on the CPU: kernels.py's argument parsing only (it needs a GPU to time
anything; the kernels' exactness runs in the test suite under the Triton interpreter), plugin_launch.py with
its recording driver, and the bench on tiny-llava (fp32, one repeat, two new tokens, quick ceilings) with the
same method list at 576 and 64 kept tokens. Exit code: 0 when every step succeeded, 1 otherwise.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
METHODS = "none,cls-topk,gridprune,gprune,fastv,fitprune"
TOKENS = "576,192,128,64"
BUDGET_S = 480  # the whole run's wall-clock budget: under 8 minutes of GPU time
DRY_RUN_BUDGET_S = 900  # a dry run compiles PTX and runs the bench on a (possibly busy) CPU


def bench_command(out: Path, recipe: Path, dry_run: bool, warmup: int, repeat: int) -> list[str]:
    """The ``edgeprune bench`` command line of step 5 (tiny-llava on the CPU for a dry run)."""
    common = ["--methods", METHODS, "--tokens", "576,64" if dry_run else TOKENS,
              "--method-arg", f"fitprune.recipe={recipe}",
              "--backends", "torch", "--prompt-tokens", "32", "--out", str(out / "bench.json"),
              "--markdown", str(out / "bench.md"), "--plot", str(out / "bench.png")]
    if dry_run:
        return [sys.executable, "-m", "edgeprune", "bench", "--model", "tiny-llava", "--device", "cpu",
                "--dtype", "fp32", "--warmup", "0", "--repeat", "1", "--new-tokens", "2", "--ceilings", "quick",
                *common]
    return [sys.executable, "-m", "edgeprune", "bench", "--model", "llava-1.5-7b", "--random-weights",
            "--dtype", "fp16", "--device", "cuda", "--warmup", str(warmup), "--repeat", str(repeat),
            "--new-tokens", "32", "--trace", str(out / "trace.json"), *common]


def latency_recipe(model: str, budget: float, out: Path, first_layer: int = 2) -> dict:
    """Write a FitPrune recipe for ``model``'s depth: ``d`` tokens dropped at each layer from ``first_layer`` on,
    ``d`` the smallest meeting ``budget`` (fraction of visual-token FLOPs removed) under FitPrune's FLOPs model.

    Returns:
        The recipe's JSON dict (also written to ``out``).
    """
    from edgeprune.bench.flops import dims_from_config
    from edgeprune.methods.fitprune_recipe import FlopsModel, Recipe, counts_after_drops, save_recipe
    from edgeprune.models.registry import get_preset

    preset = get_preset(model)
    dims = dims_from_config(preset.shipped_config()) if preset.builder is None else _tiny_dims(model)
    t, n = dims.text, dims.vision.patches
    fm = FlopsModel(d=t.hidden, d_ff=t.ffn, num_layers=t.layers)
    full = fm.full(n)
    for d in range(1, n + 1):
        entering, final = counts_after_drops(n, n, [0] * first_layer + [d] * (t.layers - first_layer))
        ratio = fm.of_counts(entering, final) / full
        if ratio <= 1 - budget:
            break
    drops = [a - b for a, b in zip(entering, entering[1:] + [final])]  # what each layer really drops (sum <= N)
    recipe = Recipe(budget=budget, n_visual=n, num_layers=t.layers, drops=tuple(drops), alpha=0.0,
                    flops_model=fm.to_dict(), flops_ratio=ratio, model=f"{model} (latency recipe, not fitted)",
                    samples=0)
    save_recipe(recipe, out)
    return recipe.to_json()


def _tiny_dims(model: str):
    """Dimensions of an offline tiny preset (built, not shipped as a config)."""
    from edgeprune.bench.flops import dims_from_config
    from edgeprune.models.loader import load_model

    return dims_from_config(load_model(model).config)


def run_step(name: str, cmd: list[str], out: Path, timeout: float, env: dict | None = None) -> dict:
    """Run one step's command with a timeout, its stdout+stderr into ``out/<name>.log``; its record."""
    log = out / f"{name}.log"
    start = time.monotonic()
    with open(log, "w") as f:
        try:
            rc = subprocess.run(cmd, cwd=REPO, stdout=f, stderr=subprocess.STDOUT, timeout=max(1.0, timeout),
                                env={**os.environ, **(env or {})}).returncode
        except subprocess.TimeoutExpired:
            rc = 124
    return {"step": name, "command": shlex.join(cmd), "rc": rc, "seconds": round(time.monotonic() - start, 1),
            "log": log.name}


def system_info(out: Path, dry_run: bool) -> dict:
    """GPU name, driver, CUDA and library versions (and ``nvidia-smi -q`` when present)."""
    from edgeprune.bench.system import machine_info, versions

    smi = shutil.which("nvidia-smi")
    info: dict = {"dry_run": dry_run, "versions": versions(), "nvidia_smi": None}
    if smi:
        q = subprocess.run([smi, "--query-gpu=name,driver_version,memory.total,clocks.max.sm",
                            "--format=csv,noheader"], capture_output=True, text=True, timeout=30)
        info["nvidia_smi"] = q.stdout.strip() or q.stderr.strip()
        full = subprocess.run([smi, "-q"], capture_output=True, text=True, timeout=30)
        (out / "nvidia-smi.txt").write_text(full.stdout)
    try:
        import torch

        info["machine"] = machine_info("cpu" if dry_run or not torch.cuda.is_available() else "cuda")
        info["torch_cuda"] = torch.version.cuda
    except ImportError:
        info["machine"] = machine_info("cpu")
    (out / "system.json").write_text(json.dumps(info, indent=1))
    return info


def summary(out: Path, steps: list[dict], info: dict, recipe: dict | None) -> str:
    """``summary.md``: where it ran, each step's outcome, the kernel/plugin output and the bench report."""
    m = info.get("machine") or {}
    gpu = m.get("gpu") or {}
    v = info.get("versions") or {}
    lines = ["# GPU run" + (" (dry run on the CPU: nothing here is a GPU number)" if info.get("dry_run") else ""),
             "", f"- GPU: {gpu.get('name', 'none')}, driver {gpu.get('driver') or '-'}, CUDA {gpu.get('cuda') or '-'}, "
             f"capability {gpu.get('capability', '-')}; nvidia-smi: {info.get('nvidia_smi') or '-'}",
             f"- CPU: {m.get('cpu')}; " + ", ".join(f"{k} {v[k]}" for k in ("torch", "triton", "onnxruntime",
                                                                            "cuda-python", "transformers") if v.get(k)),
             "", "| step | rc | seconds | command |", "|---|---:|---:|---|"]
    lines += [f"| {s['step']} | {s['rc']} | {s['seconds']} | `{s['command']}` |" for s in steps]
    for name, title in (("kernels", "Triton kernels vs torch reference"), ("plugin", "AOT PTX through the driver")):
        log = out / f"{name}.log"
        if log.exists():
            lines += ["", f"## {title}", "", "```", log.read_text().strip()[-6000:], "```"]
    if recipe:
        lines += ["", f"FitPrune latency recipe: drops {recipe['drops']} (FLOPs ratio {recipe['flops_ratio']:.3f}, "
                  f"budget {recipe['budget']})"]
    md = out / "bench.md"
    if md.exists():
        lines += ["", "## edgeprune bench", "", md.read_text().strip()]
    text = "\n".join(lines) + "\n"
    (out / "summary.md").write_text(text)
    return text


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=os.environ.get("OUT") or str(REPO / "benchmarks" / "results" / "gpu"))
    ap.add_argument("--dry-run", action="store_true", help="run every step on the CPU (tiny-llava, no launches)")
    ap.add_argument("--warmup", type=int, default=2, help="bench warm-up requests per combination")
    ap.add_argument("--repeat", type=int, default=5, help="bench measured requests per combination")
    ap.add_argument("--fitprune-budget", type=float, default=0.7, help="FLOPs fraction the recipe removes")
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    deadline = time.monotonic() + (DRY_RUN_BUDGET_S if args.dry_run else BUDGET_S)
    left = lambda: deadline - time.monotonic()  # noqa: E731
    env = {"HF_HUB_OFFLINE": "1"}
    info = system_info(out, args.dry_run)
    steps = [{"step": "system", "command": "nvidia-smi + machine record", "rc": 0, "seconds": 0, "log": "system.json"}]
    kernels = [sys.executable, "benchmarks/kernels.py"] + (["--help"] if args.dry_run else ["--sizes", "576,2880"])
    steps.append(run_step("kernels", kernels, out, min(90, left()), env))
    plugin = [sys.executable, "benchmarks/plugin_launch.py", "--out", str(out / "plugin")]
    steps.append(run_step("plugin", plugin + (["--dry-run"] if args.dry_run else []), out,
                          min(300 if args.dry_run else 150, left()), env))
    recipe_path, recipe = out / "fitprune-recipe.json", None
    model = "tiny-llava" if args.dry_run else "llava-1.5-7b"
    start = time.monotonic()
    try:
        recipe = latency_recipe(model, args.fitprune_budget, recipe_path)
        steps.append({"step": "recipe", "command": f"latency_recipe({model!r})", "rc": 0,
                      "seconds": round(time.monotonic() - start, 1), "log": recipe_path.name})
    except Exception as exc:  # noqa: BLE001 - recorded in steps.json; the other steps still run
        steps.append({"step": "recipe", "command": f"latency_recipe({model!r})", "rc": 1,
                      "seconds": round(time.monotonic() - start, 1), "log": f"{type(exc).__name__}: {exc}"})
    steps.append(run_step("bench", bench_command(out, recipe_path, args.dry_run, args.warmup, args.repeat), out,
                          left() - 5, env))
    (out / "steps.json").write_text(json.dumps(steps, indent=1))
    print(summary(out, steps, info, recipe))
    failed = [s["step"] for s in steps if s["rc"] != 0]
    if failed:
        print(f"failed steps: {', '.join(failed)} (logs in {out})", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
