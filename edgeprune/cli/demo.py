"""``edgeprune demo``: the one-command tour: a tiny offline model, unpruned vs pruned, answers and profiles.

Both pipelines are built on one loaded model and warmed up, then run ``--repeat`` times each, alternating, so
that a busy machine slows both alike; the run with the median TTFT of each is shown, and the last line is the
speedup a user should expect from pruning on this machine.
"""

from __future__ import annotations

import argparse
from typing import Any, Sequence

from ._common import check_positive


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="run a tiny offline model unpruned and pruned and print both profiles",
                       description="Builds the random-weight tiny-llava preset offline, answers a prompt about the "
                                   "bundled example image with all 576 visual tokens and with a pruned budget "
                                   "(after a warm-up, the median of --repeat runs each), and prints both answers, "
                                   "stage profiles and the measured speedup.")
    p.add_argument("--model", default="tiny-llava", help="preset (default: %(default)s)")
    p.add_argument("--method", default="cls-topk", help="pruning method (default: %(default)s)")
    p.add_argument("--tokens", type=int, default=64, help="kept visual tokens (default: %(default)s)")
    p.add_argument("--prompt", default="What does the sign say?")
    p.add_argument("--max-new-tokens", type=int, default=16)
    p.add_argument("--repeat", type=int, default=5, help="timed runs per pipeline after one warm-up; the median "
                   "is reported (default: %(default)s)")
    p.set_defaults(func=main)


def median_run(results: Sequence[Any]) -> Any:
    """The result with the median TTFT (the lower middle one for an even count)."""
    ordered = sorted(results, key=lambda r: r.profile.ttft)
    return ordered[(len(ordered) - 1) // 2]


def speedup_line(full: Any, pruned: Any, method: str, repeat: int) -> str:
    """One line comparing the median full and pruned runs: TTFT and prefill, and their ratios."""
    f, p = full.profile, pruned.profile
    pre_f, pre_p = f.stage_total("prefill"), p.stage_total("prefill")
    return (f"speedup with {method} ({pruned.profile.counters['visual_kept']}/{full.profile.counters['visual_in']} "
            f"tokens, median of {repeat} after a warm-up): TTFT {1e3 * f.ttft:.1f} -> {1e3 * p.ttft:.1f} ms "
            f"({f.ttft / max(p.ttft, 1e-12):.2f}x), prefill {1e3 * pre_f:.1f} -> {1e3 * pre_p:.1f} ms "
            f"({pre_f / max(pre_p, 1e-12):.2f}x)")


def main(args: argparse.Namespace) -> int:
    from ..api import build_pipeline, preflight
    from ..methods.base import Budget
    from ..methods.registry import build_method
    from ..models.loader import load_model
    from ..runtime.preprocess import default_image

    check_positive(args.max_new_tokens, "--max-new-tokens")
    check_positive(args.repeat, "--repeat")
    method = build_method(args.method)
    tokens = args.tokens if method.uses_budget else None  # `--method none` keeps everything: no default budget
    preflight(args.model, method, Budget(tokens=tokens), max_new_tokens=args.max_new_tokens)  # before building
    image = default_image()
    loaded = load_model(args.model)
    print(f"model {args.model} (random weights, built offline); prompt: {args.prompt!r}\n")
    runs = (("none", None), (args.method, tokens))
    pipes = [build_pipeline(args.model, method, tokens=tokens, loaded=loaded) for method, tokens in runs]
    for pipe in pipes:  # warm-up: first-call allocations and caches are not what a user's next request pays
        pipe.run(image, args.prompt, max_new_tokens=2)
    timed: list[list[Any]] = [[], []]
    for _ in range(args.repeat):  # alternate so that background load hits both alike
        for i, pipe in enumerate(pipes):
            timed[i].append(pipe.run(image, args.prompt, max_new_tokens=args.max_new_tokens))
    medians = [median_run(t) for t in timed]
    for (method, _), result in zip(runs, medians):
        c = result.profile.counters
        print(f"== {method}: {c['visual_kept']}/{c['visual_in']} visual tokens, positions={c['positions']}")
        print(f"answer: {result.text!r}")
        print(result.profile.table() + "\n")
    print(speedup_line(medians[0], medians[1], args.method, args.repeat))
    return 0
