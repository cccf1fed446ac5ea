"""``edgeprune export``: write a bundle (ONNX graphs, tokenizer, manifest) for a model and a pruning method."""

from __future__ import annotations

import argparse

from ._common import add_method_args


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "export", help="export a model and a pruning method to an ONNX bundle",
        description="Export the vision, prune, embed and decoder graphs of a LLaVA model with a static budget K, "
                    "validate each against PyTorch with ONNX Runtime, and write them with the tokenizer and a "
                    "manifest.json (hashes of every file) into --out. Run it with "
                    "`edgeprune run --bundle DIR --backend ort`.")
    g = p.add_argument_group("model")
    g.add_argument("--model", default="tiny-llava", help="preset name (see `edgeprune models`), a local LLaVA "
                   "directory or a Hugging Face id (default: %(default)s)")
    g.add_argument("--random-weights", action="store_true",
                   help="build a named preset's architecture with random weights and a synthetic tokenizer")
    add_method_args(p, kernels=False)
    o = p.add_argument_group("output")
    o.add_argument("--out", required=True, metavar="DIR", help="bundle directory to create")
    o.add_argument("--opset", type=int, default=18,
                   help="ONNX opset, 18 (TensorRT-portable, default) to 23 (fused attention in ONNX Runtime)")
    o.add_argument("--no-ort-variant", dest="ort_variant", action="store_false",
                   help="below opset 23, skip decoder.ort.onnx (and FastV/FitPrune's prefill.ort.onnx): the LLM "
                        "graphs with the fused opset-23 Attention op that ONNX Runtime runs 1.1-1.3x faster on CPU "
                        "(they share the portable graphs' weights; TensorRT builds the portable graphs either way)")
    o.add_argument("--dtype", default="fp32", choices=("fp32", "fp16"), help="graph precision (default: %(default)s)")
    o.add_argument("--force", action="store_true", help="replace an existing bundle at --out")
    o.add_argument("--reuse", metavar="DIR", help="copy the vision/embed/decoder graphs of a bundle of the same "
                   "model, dtype and opset instead of exporting them again (budget sweeps)")
    q = p.add_argument_group("weight-only quantization (LLM graphs; see docs/quantization.md)")
    q.add_argument("--weights", metavar="int4|int8",
                   help="store the decoder's (and FastV/FitPrune prefill's) weights in 4 or 8 bits with ONNX "
                        "Runtime's MatMulNBits (for TensorRT see --weights-format qdq); vision/prune/embed stay "
                        "--dtype")
    q.add_argument("--block-size", type=int, metavar="32|64|128", help="weights per scale (default: 32)")
    q.add_argument("--quant-method", metavar="rtn|hqq",
                   help="rtn: round-to-nearest (default); hqq: half-quadratic, int4 only; awq is not available")
    q.add_argument("--quant-accuracy-level", type=int, metavar="0-4",
                   help="MatMulNBits compute type: 4 int8 (default, the fast CPU kernels), 1 fp32, 0 unset")
    q.add_argument("--weights-format", metavar="matmulnbits|qdq",
                   help="matmulnbits (default): MatMulNBits in every LLM file (ONNX Runtime); qdq: decoder.onnx gets "
                        "symmetric block-wise DequantizeLinear + MatMul at opset 21 (the form TensorRT builds), "
                        "decoder.ort.onnx keeps MatMulNBits")
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    from ..export.exporter import export_bundle  # torch and transformers only when the command runs
    from ..export.quantize import weight_config
    from ..methods.base import parse_method_args

    weights = weight_config(args.weights, args.block_size, args.quant_method, args.dtype, args.quant_accuracy_level,
                            args.weights_format)

    manifest = export_bundle(args.model, args.method, out_dir=args.out, tokens=args.tokens, ratio=args.ratio,
                             method_args=parse_method_args(args.method_arg), opset=args.opset, dtype=args.dtype,
                             force=args.force, reuse_from=args.reuse, random_weights=args.random_weights,
                             clip=args.clip, ort_variant=args.ort_variant, weights=weights)
    m = manifest["method"]
    budget = "the recipe's budget" if m["name"] == "fitprune" else ("all tokens" if m["k"] is None else f"K = {m['k']}")
    graphs = ", ".join(f"{name} ({e['max_abs_err']:.1e})" + "".join(
        f", {v['file']} ({v['max_abs_err']:.1e})" for v in (e.get("variants") or {}).values())
        for name, e in manifest["graphs"].items())
    print(f"wrote {args.out}: {manifest['model']['name']} {m['name']} {budget}, opset {manifest['opset']}, "
          f"{manifest['model']['dtype']}")
    print(f"graphs (max |ORT - torch|): {graphs}")
    for name, e in manifest["graphs"].items():
        if e.get("weights"):  # quantized: not exact; the error and agreement against fp32 PyTorch
            w = e["weights"]
            for file, c in w["check"].items():
                print(f"{file}: {w['scheme']} weights ({w['method']}, block {w['block_size']}, "
                      f"{w['per_file'][file]['format']}), "
                      f"{w['fp32_weight_bytes'] / 1e6:.1f} -> {w['weight_bytes'] / 1e6:.1f} MB; logits vs fp32 "
                      f"torch: max err {c['logits_max_abs_err']:.2e} ({c['logits_rel_err']:.1%} of max(1, |ref|), "
                      f"bound {c['bound']:.0%}), next-token agreement {c['agree']}/{c['positions']}")
    print(f"run it: edgeprune run --bundle {args.out} --backend ort --image IMAGE --prompt '...'")
    return 0
