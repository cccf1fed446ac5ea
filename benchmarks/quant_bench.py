"""Weight-only INT4/INT8 LLM graphs vs fp32 on ONNX Runtime (CPU): decode step, TTFT, bytes per step, agreement.

Exports one fp32 bundle of ``--model`` and one per quantization scheme (``edgeprune export --weights``, the
vision/embed graphs reused from the fp32 bundle), then, in one process and interleaved (each repeat runs every
bundle once, in turn, so that drift in clock or load hits all alike), at ``--threads`` intra-op threads:

- TTFT (preprocess + vision + embed + prefill) and the p50 decode step of ``--new-tokens`` greedy tokens;
- bytes read per decode step: the decoder file's initializers (quantized weights + scales + zero points, as
  stored) plus the KV cache at the measured length, and the achieved bytes/s;
- the decoder graph alone at each MatMulNBits ``accuracy_level`` (``--levels``), the kernel choice;
- greedy-token agreement with the fp32 bundle on ``--prompts`` synthetic images and questions, teacher-forced
  (the quantized decoder is fed the fp32 greedy tokens, and each step's argmax is compared: the rate a
  sequence-level comparison cannot hide behind one early divergence), plus the first-token and the
  whole-sequence (free-running) match rates.

Usage (the RESULTS.md table)::

    python benchmarks/quant_bench.py --model mini-llava --random-weights --threads 1 \\
        --json benchmarks/results/quant_mini_llava.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

SCHEMES = ("int8:32", "int4:32", "int4:128")
QUESTIONS = ["What is in the image?", "Describe the picture.", "What colour is the largest shape?",
             "How many shapes are there?", "Is there a circle?", "What is on the left?", "What is at the top?",
             "Name the colours you see.", "Is the background dark or light?", "Where is the red object?",
             "What shape is in the centre?", "Describe the scene in one sentence.", "Are the shapes overlapping?",
             "Which object is the smallest?", "What is on the right side?", "Is there a square?",
             "What would you call this picture?", "Count the circles.", "What colour is the background?",
             "Is anything blue?", "What is at the bottom?", "Give a short caption."]


def synthetic_image(seed: int) -> Any:
    """A 336x336 RGB image of random rectangles and ellipses on a random background (seeded)."""
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(seed)
    img = Image.new("RGB", (336, 336), tuple(int(c) for c in rng.integers(0, 256, 3)))
    draw = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(2, 6))):
        x0, y0 = (int(v) for v in rng.integers(0, 250, 2))
        x1, y1 = x0 + int(rng.integers(20, 86)), y0 + int(rng.integers(20, 86))
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)([x0, y0, x1, y1], fill=colour)
    return img


def export_all(args: argparse.Namespace) -> dict[str, Path]:
    """The fp32 bundle and one per scheme under ``args.out_dir`` (kept when present and ``--reexport`` is off)."""
    from edgeprune.export.exporter import export_bundle
    from edgeprune.export.quantize import weight_config

    root = Path(args.out_dir)
    bundles = {"fp32": root / "fp32"}
    common = dict(method="none", random_weights=args.random_weights, force=True, log=lambda m: None)
    if args.reexport or not (bundles["fp32"] / "manifest.json").is_file():
        print(f"exporting {args.model} fp32 ...", file=sys.stderr, flush=True)
        export_bundle(args.model, out_dir=bundles["fp32"], **common)
    for s in args.schemes:
        scheme, block = s.split(":")
        name = f"{scheme}-b{block}"
        bundles[name] = root / name
        if args.reexport or not (bundles[name] / "manifest.json").is_file():
            print(f"exporting {args.model} {name} ...", file=sys.stderr, flush=True)
            cfg = weight_config(scheme, int(block), "rtn", "fp32", args.accuracy_level)
            export_bundle(args.model, out_dir=bundles[name], reuse_from=bundles["fp32"], weights=cfg, **common)
    return bundles


def pipelines(bundles: dict[str, Path], threads: int) -> dict[str, Any]:
    """An ORT pipeline per bundle, every session rebuilt at ``threads`` intra-op threads."""
    import onnxruntime as ort

    from edgeprune.runtime.ort_backend import build_ort_pipeline

    out = {}
    for name, path in bundles.items():
        pipe = build_ort_pipeline(path)
        for runner in pipe.backend.runners.values():
            opts = ort.SessionOptions()
            opts.log_severity_level = 3
            opts.intra_op_num_threads = threads
            opts.inter_op_num_threads = 1
            runner.session = ort.InferenceSession(str(runner.path), sess_options=opts,
                                                  providers=runner.session.get_providers())
        out[name] = pipe
    return out


def timing(pipes: dict[str, Any], repeats: int, new_tokens: int) -> dict[str, dict[str, float]]:
    """Interleaved runs on the bundled example image: p50 TTFT, decode step and prefill (ms)."""
    from edgeprune.runtime.preprocess import default_image

    image = default_image()
    samples: dict[str, dict[str, list[float]]] = {n: {"ttft": [], "decode": [], "prefill": []} for n in pipes}
    for name, pipe in pipes.items():  # warm-up: first-run allocations and kernel selection
        pipe.run(image, QUESTIONS[0], max_new_tokens=4)
    for _ in range(repeats):
        for name, pipe in pipes.items():
            prof = pipe.run(image, QUESTIONS[0], max_new_tokens=new_tokens).profile
            samples[name]["ttft"].append(prof.ttft)
            samples[name]["prefill"].append(prof.stage_total("prefill"))
            samples[name]["decode"].extend(prof.spans.get("decode", []))
    return {n: {k + "_ms": 1e3 * float(np.median(v)) for k, v in s.items()} | {"decode_steps": len(s["decode"])}
            for n, s in samples.items()}


def greedy(be: Any, image: Any, prompt: str, steps: int, forced: list[int] | None = None) -> list[int]:
    """Greedy argmax tokens of ``steps`` positions; with ``forced``, the argmax at each step while feeding
    ``forced`` (teacher forcing). Pre-LLM method ``none``: every visual token is kept."""
    from edgeprune.runtime.pipeline import position_ids
    from edgeprune.runtime.preprocess import preprocess
    from edgeprune.runtime.prompt import split_prompt

    pixels, size = preprocess(image, be.image_config)
    before, after = split_prompt(be.template, prompt)
    prefix, suffix = be.codec.encode(before, add_bos=True), be.codec.encode(after, add_bos=False)
    visual = be.encode_image(pixels, size)
    embeds, kept_pos = be.splice(prefix, visual, np.arange(visual.n, dtype=np.int64), suffix)
    pos = position_ids(len(prefix), int(visual.total), len(suffix), kept_pos, "compact")
    logits, nxt, out = be.prefill(embeds, pos), int(pos[-1]) + 1, []
    for step in range(steps):
        out.append(int(np.argmax(logits)))
        if step + 1 < steps:
            logits = be.decode(forced[step] if forced else out[-1], nxt)
            nxt += 1
    return out


def agreement(pipes: dict[str, Any], prompts: int, steps: int) -> dict[str, dict[str, float]]:
    """Per quantized bundle: teacher-forced, first-token and whole-sequence agreement with fp32."""
    ref = pipes["fp32"].backend
    cases = [(synthetic_image(i), QUESTIONS[i % len(QUESTIONS)]) for i in range(prompts)]
    refs = [greedy(ref, img, q, steps) for img, q in cases]
    out = {}
    for name, pipe in pipes.items():
        if name == "fp32":
            continue
        be = pipe.backend
        forced = [greedy(be, img, q, steps, forced=r) for (img, q), r in zip(cases, refs)]
        free = [greedy(be, img, q, steps) for img, q in cases]
        same = sum(int(a == b) for f, r in zip(forced, refs) for a, b in zip(f, r))
        out[name] = {"teacher_forced": same / (prompts * steps), "decisions": prompts * steps,
                     "first_token": float(np.mean([f[0] == r[0] for f, r in zip(forced, refs)])),
                     "sequence": float(np.mean([f == r for f, r in zip(free, refs)]))}
    return out


def step_bytes(bundles: dict[str, Path], pipes: dict[str, Any], cache: int) -> dict[str, dict[str, float]]:
    """Weights (as stored) of the decoder file each backend runs, and the KV cache read at length ``cache``."""
    from edgeprune.export.quantize import weight_bytes

    out = {}
    for name, pipe in pipes.items():
        m = json.loads((bundles[name] / "manifest.json").read_text())["model"]
        kv = 2 * m["num_layers"] * m["num_kv_heads"] * m["head_dim"] * cache * 4
        w = weight_bytes(pipe.backend.runners["decoder"].path)
        out[name] = {"weight_bytes": w, "kv_bytes": kv, "step_bytes": w + kv,
                     "file": pipe.backend.runners["decoder"].path.name}
    return out


def kernel_levels(bundles: dict[str, Path], levels: list[int], repeats: int, cache: int,
                  threads: int) -> dict[str, dict[str, float]]:
    """The decoder graph alone (``decoder.ort.onnx``): p50 of one decode step over a ``cache``-token past, for
    each quantized bundle at each MatMulNBits ``accuracy_level`` (rewritten in memory), interleaved with fp32."""
    import onnx
    import onnxruntime as ort

    def session(proto_or_path: Any) -> Any:
        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        opts.intra_op_num_threads, opts.inter_op_num_threads = threads, 1
        src = proto_or_path.SerializeToString() if hasattr(proto_or_path, "SerializeToString") else str(proto_or_path)
        return ort.InferenceSession(src, sess_options=opts, providers=["CPUExecutionProvider"])

    sessions = {"fp32": session(bundles["fp32"] / "decoder.ort.onnx")}
    for name, root in bundles.items():
        if name == "fp32":
            continue
        for level in levels:
            proto = onnx.load(str(root / "decoder.ort.onnx"))  # weights loaded: the session is built from bytes
            for node in proto.graph.node:
                for attr in node.attribute:
                    if node.op_type == "MatMulNBits" and attr.name == "accuracy_level":
                        attr.i = level
            sessions[f"{name} level {level}"] = session(proto)
    m = json.loads((bundles["fp32"] / "manifest.json").read_text())["model"]
    rng = np.random.default_rng(0)
    feeds = {"inputs_embeds": (0.02 * rng.standard_normal((1, 1, m["hidden_size"]))).astype(np.float32),
             "attention_mask": np.ones((1, cache + 1), np.int64), "position_ids": np.array([[cache]], np.int64)}
    for i in range(m["num_layers"]):
        for kind in ("key", "value"):
            feeds[f"past_{kind}_{i}"] = rng.standard_normal((1, m["num_kv_heads"], cache, m["head_dim"])).astype(
                np.float32)
    times: dict[str, list[float]] = {n: [] for n in sessions}
    for s in sessions.values():
        s.run(["logits"], feeds)
    for _ in range(repeats):
        for n, s in sessions.items():
            t0 = time.perf_counter()
            s.run(["logits"], feeds)
            times[n].append(time.perf_counter() - t0)
    base = float(np.median(times["fp32"]))
    return {n: {"step_ms": 1e3 * float(np.median(v)), "speedup": base / float(np.median(v))} for n, v in times.items()}


def machine() -> dict[str, Any]:
    import onnxruntime as ort

    flags = ""
    if os.path.exists("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as f:
            info = f.read()
        model = next((ln.split(":", 1)[1].strip() for ln in info.splitlines() if ln.startswith("model name")), "")
        flags = next((ln.split(":", 1)[1] for ln in info.splitlines() if ln.startswith("flags")), "")
    else:
        model = platform.processor()
    isa = [f for f in ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8", "amx_bf16", "asimddp", "sve")
           if f in flags.split()]
    return {"cpu": model, "isa": isa, "cores": os.cpu_count(), "onnxruntime": ort.__version__,
            "python": platform.python_version()}


def table(res: dict[str, Any]) -> str:
    t, b, a = res["timing"], res["bytes"], res["agreement"]
    base = t["fp32"]
    lines = ["| bundle | decode step p50 (ms) | speed-up | TTFT p50 (ms) | TTFT ratio | weights read/step (MB) "
             "| achieved GB/s | teacher-forced agreement | first token | whole sequence |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for name in t:
        ag = a.get(name)
        gbs = b[name]["step_bytes"] / (t[name]["decode_ms"] * 1e-3) / 1e9
        lines.append(f"| {name} | {t[name]['decode_ms']:.2f} | {base['decode_ms'] / t[name]['decode_ms']:.2f}x | "
                     f"{t[name]['ttft_ms']:.1f} | {base['ttft_ms'] / t[name]['ttft_ms']:.2f}x | "
                     f"{b[name]['weight_bytes'] / 1e6:.1f} | {gbs:.1f} | "
                     + (f"{ag['teacher_forced']:.1%} of {ag['decisions']} | {ag['first_token']:.0%} | "
                        f"{ag['sequence']:.0%} |" if ag else "(reference) | | |"))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="mini-llava")
    p.add_argument("--random-weights", action="store_true")
    p.add_argument("--schemes", default=",".join(SCHEMES), help="SCHEME:BLOCK list (default: %(default)s)")
    p.add_argument("--accuracy-level", type=int, default=None, help="MatMulNBits accuracy_level (default: 4)")
    p.add_argument("--out-dir", default="/tmp/edgeprune-quant-bench")
    p.add_argument("--reexport", action="store_true")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--new-tokens", type=int, default=16)
    p.add_argument("--prompts", type=int, default=20)
    p.add_argument("--agree-steps", type=int, default=8)
    p.add_argument("--levels", default="0,1,4", help="MatMulNBits accuracy_level values for the decoder-graph "
                   "kernel sweep ('' to skip; default: %(default)s)")
    p.add_argument("--json", help="write the results here")
    args = p.parse_args(argv)
    args.schemes = [s for s in args.schemes.split(",") if s]
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    bundles = export_all(args)
    pipes = pipelines(bundles, args.threads)
    res: dict[str, Any] = {"command": " ".join(["python", "benchmarks/quant_bench.py", *(argv or sys.argv[1:])]),
                           "machine": machine(), "threads": args.threads, "model": args.model,
                           "schemes": {n: json.loads((bundles[n] / "manifest.json").read_text()).get("weights")
                                       for n in bundles}}
    start = time.perf_counter()
    res["timing"] = timing(pipes, args.repeats, args.new_tokens)
    res["bytes"] = step_bytes(bundles, pipes, cache=600)
    res["agreement"] = agreement(pipes, args.prompts, args.agree_steps)
    if args.levels:
        res["kernel_levels"] = kernel_levels(bundles, [int(x) for x in args.levels.split(",")], 5 * args.repeats,
                                             600, args.threads)
    res["seconds"] = round(time.perf_counter() - start, 1)
    print(json.dumps(res["machine"]))
    print(table(res))
    for n, r in res.get("kernel_levels", {}).items():
        print(f"decoder graph, {n}: {r['step_ms']:.2f} ms ({r['speedup']:.2f}x)")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(res, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
