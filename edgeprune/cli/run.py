"""``edgeprune run``: answer a prompt about an image with a pruned pipeline and optionally profile it."""

from __future__ import annotations

import argparse
import json

from ._common import (Default, add_generation_args, add_method_args, add_model_args, add_ort_args, check_output_file,
                      check_positive, refuse_with_bundle, write_json_atomic)

# Flags of the torch backend that a bundle fixes at export time: refused with --bundle, not ignored.
BUNDLE_FIXES = {"device": "--device", "dtype": "--dtype", "random_weights": "--random-weights", "clip": "--clip",
                "kernels": "--kernels"}


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("run", help="run the pruned pipeline on one image and prompt",
                       description="Run preprocess -> vision -> prune -> prefill -> decode and print the answer.")
    add_model_args(p)
    add_method_args(p)
    add_generation_args(p)
    p.add_argument("--image", help="image file (default: the bundled example image)")
    p.add_argument("--prompt", default="What is in the image?", help="the question (default: %(default)r)")
    p.add_argument("--backend", choices=("torch", "ort", "trt"),
                   help="runtime backend: torch (the PyTorch reference, default), ort (ONNX Runtime over --bundle) or "
                        "trt (the bundle's TensorRT engines, `edgeprune build`; needs TensorRT and an NVIDIA GPU)")
    p.add_argument("--bundle", metavar="DIR", help="run an exported bundle (`edgeprune export`); model, method and "
                   "K come from its manifest (implies --backend ort)")
    add_ort_args(p)
    # Sentinel defaults: with --bundle a flag the user actually typed must match the manifest, a default must not.
    p.set_defaults(method=Default("none"), model=Default("tiny-llava"), device=Default("cpu"), dtype=Default("fp32"),
                   kernels=Default("torch"))
    p.add_argument("--profile", action="store_true", help="print the per-stage timing table")
    p.add_argument("--trace", metavar="FILE", help="write a Chrome-trace JSON of the request")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    from ..api import run_request  # heavy imports only when the command runs

    check_positive(args.max_new_tokens, "--max-new-tokens")
    trace = check_output_file(args.trace, "--trace") if args.trace else None  # before the request, not after
    if args.bundle is not None or args.backend in ("ort", "trt"):
        result = _run_bundle(args)
    else:
        args.backend = args.backend or "torch"
        result = run_request(args)
    if trace is not None:
        write_json_atomic(trace, result.profile.chrome_trace(), "--trace")
    if args.json:
        print(json.dumps(result.to_dict(), indent=2))
        return 0
    c = result.profile.counters
    print(f"visual tokens: {c['visual_kept']}/{c['visual_in']} kept ({args.method}, positions={c['positions']})")
    print(f"answer: {result.text}")
    if args.profile:
        print(result.profile.table())
    return 0


def _run_bundle(args: argparse.Namespace):
    """``--bundle DIR [--backend ort]``: the ONNX Runtime pipeline; flags the user gave must match the bundle."""
    from ..api import build_pipeline
    from ..errors import BackendError
    from ..methods.base import parse_method_args
    from ..runtime.preprocess import default_image, load_image
    from ..runtime.sampling import SamplingConfig

    if args.bundle is None:
        raise BackendError(f"--backend {args.backend} runs an exported bundle: pass --bundle DIR (create one with "
                           "`edgeprune export --model M --method X --tokens K --out DIR`)")
    if args.backend not in (None, "ort", "trt"):
        raise BackendError(f"--bundle runs on --backend ort or trt, not {args.backend}; drop --backend or --bundle")
    if not isinstance(args.model, Default):
        raise BackendError("--model and --bundle exclude each other: the bundle fixes the model")
    refuse_with_bundle(args, BUNDLE_FIXES)
    sampling = SamplingConfig(do_sample=args.do_sample, temperature=args.temperature, top_k=args.top_k,
                              top_p=args.top_p, seed=args.seed)
    image = load_image(args.image) if args.image else default_image()
    pipe = build_pipeline(None, None if isinstance(args.method, Default) else args.method, tokens=args.tokens,
                          ratio=args.ratio, method_args=parse_method_args(args.method_arg), backend=args.backend or "ort",
                          bundle=args.bundle, providers=[x for x in args.providers.split(",") if x.strip()],
                          ort_decoder=args.ort_decoder)
    args.method = pipe.backend.bundle.method["name"]  # for the summary line
    return pipe.run(image, args.prompt, max_new_tokens=args.max_new_tokens, sampling=sampling)
