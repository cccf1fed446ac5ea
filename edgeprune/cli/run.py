"""``edgeprune run``: answer a prompt about an image with a pruned pipeline and optionally profile it."""

from __future__ import annotations

import argparse
import json

from ._common import add_generation_args, add_method_args, add_model_args, check_positive


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("run", help="run the pruned pipeline on one image and prompt",
                       description="Run preprocess -> vision -> prune -> prefill -> decode and print the answer.")
    add_model_args(p)
    add_method_args(p)
    add_generation_args(p)
    p.add_argument("--image", help="image file (default: the bundled example image)")
    p.add_argument("--prompt", default="What is in the image?", help="the question (default: %(default)r)")
    p.add_argument("--backend", default="torch", choices=("torch",), help="runtime backend (default: %(default)s)")
    p.add_argument("--profile", action="store_true", help="print the per-stage timing table")
    p.add_argument("--trace", metavar="FILE", help="write a Chrome-trace JSON of the request")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    from ..api import run_request  # heavy imports only when the command runs

    check_positive(args.max_new_tokens, "--max-new-tokens")
    result = run_request(args)
    if args.trace:
        with open(args.trace, "w") as f:
            json.dump(result.profile.chrome_trace(), f)
    if args.json:
        print(json.dumps(result.to_dict(), indent=2))
        return 0
    c = result.profile.counters
    print(f"visual tokens: {c['visual_kept']}/{c['visual_in']} kept ({args.method}, positions={c['positions']})")
    print(f"answer: {result.text}")
    if args.profile:
        print(result.profile.table())
    return 0
