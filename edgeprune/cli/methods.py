"""``edgeprune methods``: list the registered pruning methods with their parameters and papers."""

from __future__ import annotations

import argparse
import json


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("methods", help="list pruning methods, their parameters and defaults",
                       description="List every registered pruning method with placement, position convention, "
                                   "parameters (name, type, default) and the paper it comes from.")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=main)


def describe_methods() -> list[dict]:
    """One dict per registered method (name, summary, paper, placement, positions, params)."""
    from ..methods.base import describe_fields
    from ..methods.registry import METHODS

    return [{"name": cls.name, "summary": cls.summary, "paper": cls.paper, "placement": cls.placement,
             "positions": cls.default_positions, "uses_budget": cls.uses_budget,
             "params": describe_fields(cls.Params)} for cls in METHODS.values()]


def main(args: argparse.Namespace) -> int:
    rows = describe_methods()
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    for r in rows:
        print(f"{r['name']:<10} {r['placement']:<8} positions={r['positions']:<9} {r['summary']}")
        print(f"{'':<10} paper: {r['paper']}")
        for prm in r["params"]:
            print(f"{'':<12}--method-arg {prm['name']}=<{prm['type']}>  default {prm['default']}  {prm['help']}")
    return 0
