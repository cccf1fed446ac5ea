"""Why ONNX Runtime's prefill trails torch eager on some CPUs: one LLM prefill, the same shapes, side by side.

    python benchmarks/ort_cpu_probe.py --bundle DIR [--seq 644] [--repeat 7] [--profile-out DIR]

``DIR`` is a bundle of the model (``edgeprune export --model mini-llava --method none --out DIR``). At one
intra-op thread (both libraries) it times, interleaved, p50 and min of ``--repeat`` runs:

* torch eager: the language model's forward on ``[1, seq, D]`` embeddings (what the torch backend's prefill
  runs), and a bare ``torch.matmul`` of the decoder's largest GEMM shape;
* ONNX Runtime: ``decoder.ort.onnx`` (fused Attention-23) and ``decoder.onnx`` (portable) under several session
  options (default; ``session.intra_op.allow_spinning`` off; graph optimisation level extended / basic), and a
  one-node ``MatMul`` graph of the same GEMM shape; numpy's ``matmul`` too;
* one causal attention of the decoder's shape: torch SDPA vs ORT's Attention-23 and ``com.microsoft``
  MultiHeadAttention (without a mask, and ``unidirectional``);
* an ORT profile of one fused-decoder prefill, aggregated by operator type (share of the node time).

It prints the CPU model and ISA flags and the library versions it ran with. A probe, not a test.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import numpy as np


def _time(fn, repeat: int) -> list[float]:
    fn()
    out = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        out.append(1e3 * (time.perf_counter() - t0))
    return out


def _ort_session(ort, path: Path, *, spin: bool | None = None, level: str = "all", profile: str | None = None):
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    opts.graph_optimization_level = {"all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
                                     "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
                                     "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC}[level]
    if spin is not None:
        opts.add_session_config_entry("session.intra_op.allow_spinning", "1" if spin else "0")
    if profile:
        opts.enable_profiling = True
        opts.profile_file_prefix = profile
    return ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])


def _decoder_feeds(session, seq: int, width: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    feeds = {}
    for i in session.get_inputs():
        if i.name == "inputs_embeds":
            feeds[i.name] = rng.standard_normal((1, seq, width), dtype=np.float32)
        elif i.name == "attention_mask":
            feeds[i.name] = np.ones((1, seq), dtype=np.int64)
        elif i.name == "position_ids":
            feeds[i.name] = np.arange(seq, dtype=np.int64)[None]
        else:
            heads, dim = i.shape[1], i.shape[3]
            feeds[i.name] = np.zeros((1, heads, 0, dim), dtype=np.float32)
    return feeds


def _gemm_graph(m: int, k: int, n: int, path: Path) -> None:
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    w = numpy_helper.from_array(np.random.default_rng(1).standard_normal((k, n), dtype=np.float32), "w")
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "gemm",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [m, k])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [m, n])], [w])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), str(path))


def _attention_runs(ort, torch, seq: int, heads: int, dim: int) -> dict[str, callable]:
    """One causal attention of ``[1, heads, seq, dim]``: torch SDPA and every ORT CPU operator that can do it."""
    from onnx import TensorProto, helper

    vi = helper.make_tensor_value_info
    flat = [1, seq, heads * dim]

    def session(node, inputs, domain_ms: bool):
        graph = helper.make_graph([node], "attn", inputs, [vi("y", TensorProto.FLOAT, None)])
        opsets = [helper.make_opsetid("", 23 if not domain_ms else 18)]
        if domain_ms:
            opsets.append(helper.make_opsetid("com.microsoft", 1))
        opts = ort.SessionOptions()
        opts.intra_op_num_threads, opts.log_severity_level = 1, 3
        return ort.InferenceSession(helper.make_model(graph, opset_imports=opsets).SerializeToString(), opts,
                                    providers=["CPUExecutionProvider"])

    rng = np.random.default_rng(0)
    q4, k4, v4 = (rng.standard_normal((1, heads, seq, dim), dtype=np.float32) for _ in range(3))
    q3, k3, v3 = (np.ascontiguousarray(x.transpose(0, 2, 1, 3).reshape(flat)) for x in (q4, k4, v4))
    ins4 = [vi(n, TensorProto.FLOAT, [1, heads, seq, dim]) for n in "qkv"]
    ins3 = [vi(n, TensorProto.FLOAT, flat) for n in "qkv"]
    a23 = session(helper.make_node("Attention", ["q", "k", "v"], ["y"], is_causal=1), ins4, False)
    mha = session(helper.make_node("MultiHeadAttention", ["q", "k", "v"], ["y"], domain="com.microsoft",
                                   num_heads=heads), ins3, True)
    mha_causal = session(helper.make_node("MultiHeadAttention", ["q", "k", "v"], ["y"], domain="com.microsoft",
                                          num_heads=heads, unidirectional=1), ins3, True)
    tq, tk, tv = (torch.from_numpy(x) for x in (q4, k4, v4))
    sdpa = torch.nn.functional.scaled_dot_product_attention
    return {f"torch SDPA causal [1,{heads},{seq},{dim}]": lambda: sdpa(tq, tk, tv, is_causal=True),
            "ORT Attention-23 causal": lambda: a23.run(None, {"q": q4, "k": k4, "v": v4}),
            "ORT com.microsoft.MultiHeadAttention, no mask (not causal)": lambda: mha.run(None, {"q": q3, "k": k3,
                                                                                               "v": v3}),
            "ORT com.microsoft.MultiHeadAttention unidirectional=1": lambda: mha_causal.run(None, {"q": q3, "k": k3,
                                                                                                  "v": v3})}


def _profile_by_op(path: str) -> dict[str, float]:
    events = json.loads(Path(path).read_text())
    by_op: dict[str, float] = defaultdict(float)
    for ev in events:
        if ev.get("cat") == "Node" and ev.get("name", "").endswith("_kernel_time"):
            by_op[ev["args"].get("op_name", "?")] += ev["dur"] / 1e3
    return dict(sorted(by_op.items(), key=lambda kv: -kv[1]))


def main() -> None:  # noqa: PLR0915 - a linear probe script
    import onnxruntime as ort
    import torch

    from edgeprune.bench.system import machine_info, versions
    from edgeprune.models.loader import load_model

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--bundle", required=True)
    p.add_argument("--model", default="mini-llava")
    p.add_argument("--seq", type=int, default=644, help="prefill tokens (576 visual + 68 text = 644)")
    p.add_argument("--repeat", type=int, default=7)
    a = p.parse_args()
    torch.set_num_threads(1)
    bundle = Path(a.bundle)
    mach = machine_info()
    print(f"CPU: {mach['cpu']} ({mach.get('isa')}); "
          + ", ".join(f"{k} {v}" for k, v in versions().items() if k in ("torch", "onnxruntime", "numpy")))
    print(f"torch: {torch.__config__.parallel_info().splitlines()[0]}; mkldnn {torch.backends.mkldnn.is_available()}")

    loaded = load_model(a.model)
    lm = loaded.model.model.language_model if hasattr(loaded.model.model, "language_model") else loaded.model
    cfg = loaded.config.text_config
    width, ffn = int(cfg.hidden_size), int(cfg.intermediate_size)
    x = torch.randn(1, a.seq, width)
    runs: dict[str, callable] = {}

    @torch.inference_mode()
    def torch_prefill():
        lm(inputs_embeds=x, use_cache=True)

    runs["torch eager prefill"] = torch_prefill
    wt = torch.randn(width, ffn)
    xt = torch.randn(a.seq, width)
    runs[f"torch matmul [{a.seq},{width}]x[{width},{ffn}]"] = lambda: torch.matmul(xt, wt)
    xn, wn = xt.numpy(), wt.numpy()
    runs[f"numpy matmul [{a.seq},{width}]x[{width},{ffn}]"] = lambda: np.matmul(xn, wn)
    tmp = Path(tempfile.mkdtemp(prefix="ort-probe-"))
    _gemm_graph(a.seq, width, ffn, tmp / "gemm.onnx")
    gemm = _ort_session(ort, tmp / "gemm.onnx")
    runs[f"ORT MatMul [{a.seq},{width}]x[{width},{ffn}]"] = lambda: gemm.run(None, {"x": xn})
    for file in ("decoder.ort.onnx", "decoder.onnx"):
        for label, kw in (("default", {}), ("no spinning", {"spin": False}), ("extended opt", {"level": "extended"}),
                          ("basic opt", {"level": "basic"})):
            sess = _ort_session(ort, bundle / file, **kw)
            feeds = _decoder_feeds(sess, a.seq, width)
            runs[f"ORT {file} prefill, {label}"] = (lambda s=sess, f=feeds: s.run(None, f))
    runs.update(_attention_runs(ort, torch, a.seq, int(cfg.num_attention_heads), width // int(cfg.num_attention_heads)))
    times: dict[str, list[float]] = {k: [] for k in runs}
    for fn in runs.values():
        fn()  # warm-up
    for _ in range(a.repeat):  # interleaved
        for name, fn in runs.items():
            times[name] += _time(fn, 1)
    print(f"\n| what (1 thread, seq {a.seq}) | p50 ms | min ms |\n|---|---:|---:|")
    for name, ts in times.items():
        print(f"| {name} | {statistics.median(ts):.1f} | {min(ts):.1f} |")
    flops = 2.0 * a.seq * width * ffn
    for name, ts in times.items():
        if "matmul" in name.lower():
            print(f"{name}: {flops / (min(ts) / 1e3) / 1e9:.1f} GFLOP/s (min)")
    sess = _ort_session(ort, bundle / "decoder.ort.onnx", profile=str(tmp / "prof"))
    feeds = _decoder_feeds(sess, a.seq, width)
    for _ in range(3):
        sess.run(None, feeds)
    by_op = _profile_by_op(sess.end_profiling())
    total = sum(by_op.values())
    print("\nORT decoder.ort.onnx prefill, node time by operator (3 runs): "
          + ", ".join(f"{op} {100 * t / total:.0f} %" for op, t in list(by_op.items())[:8]))


if __name__ == "__main__":
    main()
