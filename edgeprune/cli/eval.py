"""``edgeprune eval``: accuracy of methods x budgets x backends on a VQA set (JSON, markdown, plot).

Cheap inputs (methods and their arguments, budgets, backends, the data file and every line of it, output
paths) are checked before the model loads. The results JSON is written as the run goes and resumed on a rerun
(:mod:`edgeprune.eval.accuracy`); markdown and plot are written at the end, atomically.
"""

from __future__ import annotations

import argparse
import shlex
import sys

from ..errors import EdgepruneError
from ._common import add_model_args, add_ort_args


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "eval", help="accuracy of pruning methods x budgets x backends on a VQA set (shapes:N or your JSONL)",
        description="Answer every item of --data with every combination of --methods, --tokens and --backends; "
                    "report accuracy overall and per question type, accuracy kept relative to `none`, agreement "
                    "with the unpruned answer and agreement between backends. --data is shapes:N[:SEED] (the "
                    "generated held-out split of the shapes-llava preset) or a JSONL of {image, question, answer "
                    "| answers | choices+answer, type?} with image paths relative to the file. Scoring: VQA-"
                    "normalised exact match, the VQA soft score over several answers, POPE yes/no, or the "
                    "option letter.")
    add_model_args(p, default="shapes-llava")
    p.add_argument("--bundle", metavar="DIR", help="evaluate this exported bundle (its method and K) instead of "
                   "--model; --backends ort,torch adds the torch twin rebuilt from its manifest")
    g = p.add_argument_group("sweep")
    g.add_argument("--methods", default="none,random,uniform,cls-topk,gridprune,gprune,fastv",
                   help="comma-separated methods (default: %(default)s)")
    g.add_argument("--tokens", default="576,192,128,64,32", help="comma-separated budgets K (default: %(default)s)")
    g.add_argument("--method-arg", action="append", default=[], metavar="KEY=VALUE",
                   help="method parameter, repeatable; key=value goes to every listed method with that parameter, "
                        "method.key=value to one (e.g. fitprune.recipe=r.json)")
    g.add_argument("--backends", default="torch", help="comma-separated: torch, ort (ORT exports one bundle per "
                   "method and K, sharing the model graphs; default: %(default)s)")
    g.add_argument("--bundle-dir", metavar="DIR", help="keep the ORT bundles here (reused on a rerun; default: a "
                   "temporary directory)")
    g.add_argument("--opset", type=int, default=18, help="ONNX opset of the exported bundles (default: %(default)s)")
    g.add_argument("--clip", metavar="CLIP", help="CLIP checkpoint for gridprune's guidance (default: the preset's, "
                   "shapes-clip for shapes-llava)")
    add_ort_args(p)
    d = p.add_argument_group("data")
    d.add_argument("--data", default="shapes:200", help="shapes:N[:SEED] or a .jsonl file (default: %(default)s)")
    d.add_argument("--limit", type=int, help="evaluate only the first N items")
    d.add_argument("--max-new-tokens", type=int, default=16, help="greedy tokens per answer (default: %(default)s)")
    o = p.add_argument_group("outputs")
    o.add_argument("--out", default="eval.json", help="results JSON, written incrementally and resumed when it "
                   "exists (default: %(default)s)")
    o.add_argument("--markdown", help="the accuracy tables as markdown")
    o.add_argument("--plot", help="PNG: accuracy vs kept tokens per method")
    p.set_defaults(func=main)


def options(args: argparse.Namespace):
    """Check every cheap input and build :class:`~edgeprune.eval.accuracy.EvalOptions` and the combinations."""
    from ..eval.accuracy import EvalOptions, plan
    from .bench import split_list
    from .viz import parse_method_list, route_method_args

    backends = split_list(args.backends, "--backends", str)
    bad = [b for b in backends if b not in ("torch", "ort")]
    if not backends or bad:
        raise EdgepruneError(f"--backends takes torch and/or ort; got {args.backends!r}")
    if args.max_new_tokens <= 0:
        raise EdgepruneError(f"--max-new-tokens must be positive; got {args.max_new_tokens}")
    command = "edgeprune " + shlex.join(sys.argv[1:]) if sys.argv[1:2] == ["eval"] else "edgeprune eval"
    common = dict(backends=backends, bundle_dir=args.bundle_dir, providers=split_list(args.providers, "--providers",
                  str), opset=args.opset, dtype=args.dtype, device=args.device, clip=args.clip,
                  max_new_tokens=args.max_new_tokens, command=command)
    if args.bundle:
        return _bundle_options(args, common)
    methods = parse_method_list(args.methods)
    tokens = split_list(args.tokens, "--tokens", int)
    if any(k <= 0 for k in tokens):
        raise EdgepruneError(f"--tokens must be positive integers; got {args.tokens!r}")
    routed = route_method_args(methods, args.method_arg)
    opts = EvalOptions(model=args.model, methods=methods, tokens=tokens, method_args=routed, **common)
    return opts, plan(methods, tokens, backends, routed)


def _bundle_options(args: argparse.Namespace, common: dict):
    from ..bundle import open_bundle
    from ..eval.accuracy import Combo, EvalOptions

    opened = open_bundle(args.bundle)
    m = opened.method
    k = m["k"] if m["uses_budget"] else None
    model = str(opened.manifest["model"].get("name"))
    opts = EvalOptions(model=model, methods=[m["name"]], tokens=[k] if k else [], bundle=args.bundle, **common)
    return opts, [Combo(m["name"], k, b) for b in opts.backends]


def main(args: argparse.Namespace) -> int:
    from ..bench.report import check_writable, write_atomic
    from ..eval import accuracy as A
    from ..eval.datasets import load_data

    opts, combos = options(args)
    items, data = load_data(args.data, args.limit)
    out = check_writable(args.out, "--out")
    md = check_writable(args.markdown, "--markdown") if args.markdown else None
    png = check_writable(args.plot, "--plot", ".png") if args.plot else None
    if png is not None:
        from .._deps import require

        require("matplotlib")  # fail before the run, not after it
    doc = A.resume_document(out, A.new_document(opts, data, items))
    doc = A.run_eval(opts, items, combos, doc, out)
    if md is not None:
        write_atomic(md, lambda f: f.write(A.markdown(doc)))
    if png is not None:
        A.plot(doc, png)
    print(A.markdown(doc))
    print("wrote " + ", ".join(str(p) for p in (out, md, png) if p is not None))
    return 0
