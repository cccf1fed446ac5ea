"""``edgeprune compare``: stage-by-stage parity of one request through two backends (torch vs ort).

Exit codes: 0 every stage within tolerance, 1 outside tolerance (the report says where), 2 a user mistake
(missing bundle, unknown backend, a model the torch side cannot rebuild). Library code:
:mod:`edgeprune.eval.compare`, whose docstring states and justifies the tolerances.
"""

from __future__ import annotations

import argparse
import json

from ._common import add_ort_args, check_positive


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "compare", help="parity report: one request through two backends, stage by stage",
        description="Run the same request through a reference and a candidate backend (torch,ort: the PyTorch "
                    "model rebuilt from the bundle's manifest vs the bundle on ONNX Runtime) and compare every "
                    "stage: vision features and [CLS] attention, kept indices (exact), spliced embeddings, logits at "
                    "prefill and each decode step, greedy tokens (equal where the reference's top-2 margin exceeds "
                    "twice the tolerance). Tolerances: fp32 1e-4, fp16 2e-2, times max(1, max|reference|). "
                    "Exit 0 within tolerance, 1 outside, 2 on bad input.")
    p.add_argument("--bundle", required=True, metavar="DIR", help="an exported bundle (`edgeprune export`)")
    p.add_argument("--backends", default="torch,ort", metavar="REF,CAND",
                   help="reference and candidate backends among torch, ort and trt (the bundle's TensorRT "
                        "engines, `edgeprune build`), e.g. ort,trt (default: %(default)s)")
    p.add_argument("--image", help="image file (default: the bundled example image)")
    p.add_argument("--prompt", default="What is in the image?", help="the question (default: %(default)r)")
    p.add_argument("--max-new-tokens", type=int, default=8, help="greedy steps to compare (default: %(default)s)")
    add_ort_args(p)
    p.add_argument("--json", action="store_true", help="print the full report as JSON")
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    from ..eval.compare import compare_bundle, parse_backends
    from ..runtime.preprocess import load_image

    check_positive(args.max_new_tokens, "--max-new-tokens")
    parse_backends(args.backends)  # a typo fails before any model is loaded
    image = load_image(args.image) if args.image else None
    report = compare_bundle(args.bundle, args.backends, image=image, prompt=args.prompt,
                            max_new_tokens=args.max_new_tokens,
                            providers=[x for x in args.providers.split(",") if x.strip()],
                            ort_decoder=args.ort_decoder)
    if args.json:
        print(json.dumps(report.to_dict(), indent=2))
    else:
        print(report.table())
    return 0 if report.passed else 1
