"""``edgeprune demo``: the one-command tour: a tiny offline model, unpruned vs pruned, answers and profiles."""

from __future__ import annotations

import argparse

from ._common import check_positive


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="run a tiny offline model unpruned and pruned and print both profiles",
                       description="Builds the random-weight tiny-llava preset offline, answers a prompt about the "
                                   "bundled example image with all 576 visual tokens and with a pruned budget, and "
                                   "prints both answers and stage profiles.")
    p.add_argument("--model", default="tiny-llava", help="preset (default: %(default)s)")
    p.add_argument("--method", default="cls-topk", help="pruning method (default: %(default)s)")
    p.add_argument("--tokens", type=int, default=64, help="kept visual tokens (default: %(default)s)")
    p.add_argument("--prompt", default="What does the sign say?")
    p.add_argument("--max-new-tokens", type=int, default=16)
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    from ..api import build_pipeline
    from ..methods.base import Budget
    from ..methods.registry import build_method
    from ..models.loader import load_model
    from ..runtime.preprocess import default_image

    check_positive(args.max_new_tokens, "--max-new-tokens")
    Budget(tokens=args.tokens)  # validate cheap inputs before building the model
    build_method(args.method)
    image = default_image()
    loaded = load_model(args.model)
    print(f"model {args.model} (random weights, built offline); prompt: {args.prompt!r}\n")
    for method, tokens in (("none", None), (args.method, args.tokens)):
        pipe = build_pipeline(args.model, method, tokens=tokens, loaded=loaded)
        pipe.run(image, args.prompt, max_new_tokens=2)  # warm-up so the profile shows steady-state timings
        result = pipe.run(image, args.prompt, max_new_tokens=args.max_new_tokens)
        c = result.profile.counters
        print(f"== {method}: {c['visual_kept']}/{c['visual_in']} visual tokens, positions={c['positions']}")
        print(f"answer: {result.text!r}")
        print(result.profile.table() + "\n")
    return 0
