"""``edgeprune bench``: per-stage latency of methods x budgets x backends on one model, with FLOPs ratios.

Every cheap input (method names and arguments, budgets, backends, counts, output paths) is checked before the
model loads; outputs are written only after the sweep finished, each atomically, so a mistake or an interrupted
sweep leaves nothing behind.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys

from ..errors import EdgepruneError
from ._common import add_model_args, add_ort_args

# Environment variables that change the numbers; recorded in the JSON (read here only, house rule 12).
_RECORDED_ENV = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "CUDA_VISIBLE_DEVICES", "TRITON_INTERPRET", "HF_HUB_OFFLINE")


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "bench", help="benchmark stage latency of pruning methods x budgets x backends (JSON, table, plot)",
        description="Run every combination of --methods, --tokens/--ratios and --backends on one model: warm-up, "
                    "then --repeat measured requests; report p50/p90 per stage (preprocess, vision, guidance, "
                    "prune, embed, prefill, decode step), TTFT, decode tokens/s, end-to-end time, peak memory and "
                    "the analytic FLOPs (ideal TTFT speedup) beside the measured ratios, and the roofline: each stage's "
                    "achieved FLOP/s and bytes/s against the GEMM and copy ceilings measured on this machine, and the "
                    "stage furthest from its limit (docs/performance.md).")
    add_model_args(p)
    g = p.add_argument_group("sweep")
    g.add_argument("--methods", default="none,cls-topk", help="comma-separated methods (default: %(default)s)")
    g.add_argument("--tokens", default="576,192,128,64", help="comma-separated budgets K (default: %(default)s; "
                   "'' for none)")
    g.add_argument("--ratios", default="", help="comma-separated budgets as fractions of N, e.g. 0.25,0.1")
    g.add_argument("--method-arg", action="append", default=[], metavar="KEY=VALUE",
                   help="method parameter, repeatable; key=value goes to every listed method with that parameter, "
                        "method.key=value to one (e.g. fitprune.recipe=r.json)")
    g.add_argument("--backends", default="torch", help="comma-separated: torch, ort, trt (ORT exports a bundle per "
                   "method and K into a temporary directory; trt also builds its engines there, which needs "
                   "TensorRT and an NVIDIA GPU; default: %(default)s)")
    g.add_argument("--opset", type=int, default=18, help="ONNX opset of the ORT bundles (18 TensorRT-portable, 23 "
                   "has fused Attention/RMSNorm; default: %(default)s)")
    g.add_argument("--clip", metavar="CLIP", help="CLIP checkpoint for gridprune's guidance=clip (as in run)")
    g.add_argument("--kernels", default="torch", choices=("torch", "triton"), help="pruning kernels (torch backend)")
    add_ort_args(p, None, "default: cuda,cpu with --device cuda, else cpu")
    m = p.add_argument_group("measurement")
    m.add_argument("--warmup", type=int, default=3, help="unmeasured requests per combination (default: %(default)s)")
    m.add_argument("--repeat", type=int, default=10, help="measured requests per combination (default: %(default)s)")
    m.add_argument("--prompt-tokens", type=int, default=32, help="tokens of the synthetic question "
                   "(default: %(default)s)")
    m.add_argument("--new-tokens", type=int, default=32, help="tokens generated per request, EOS ignored "
                   "(default: %(default)s)")
    m.add_argument("--image", help="image file (default: the bundled example image)")
    m.add_argument("--threads", type=int, help="intra-op threads for torch and ONNX Runtime (default: each "
                   "library's default)")
    m.add_argument("--schedule", default="sequential", choices=("sequential", "interleaved"),
                   help="sequential: one combination after the other; interleaved: repeats round-robin over all "
                        "combinations (fairer ratios on a busy machine, every pipeline kept in memory)")
    m.add_argument("--ceilings", default="measure", choices=("measure", "quick", "skip"),
                   help="roofline ceilings: measure a large GEMM and copy once per backend (default), quick (small "
                        "sizes, for dry runs; not the machine's limits) or skip (no roofline figures)")
    m.add_argument("--statistic", default="p50", choices=("p50", "min", "mean", "p90"),
                   help="which statistic of the repeats the ratios and target checks use (default: %(default)s; "
                        "min, the quietest repeat, is robust on a machine shared with other work)")
    o = p.add_argument_group("outputs")
    o.add_argument("--out", help="results JSON (default: bench.json; with --report-from only when given)")
    o.add_argument("--plot", help="PNG: TTFT and decode tokens/s vs kept tokens, TTFT stage breakdown")
    o.add_argument("--markdown", help="the results table as markdown")
    o.add_argument("--trace", help="Chrome-trace JSON with the median run of every combination")
    o.add_argument("--report-from", metavar="JSON", help="skip the sweep: re-derive ratios and checks of an "
                   "existing results file with --statistic and write --out/--plot/--markdown from it")
    o.add_argument("--dpi", type=int, default=80, help="plot resolution (default: %(default)s)")
    p.set_defaults(func=main)


def split_list(value: str, flag: str, kind: type) -> tuple:
    """``"a,b"`` -> ``(kind(a), kind(b))``; ``""`` -> ``()``.

    Raises:
        EdgepruneError: an empty entry or a value that is not a ``kind``.
    """
    if not value.strip():
        return ()
    items = [s.strip() for s in value.split(",")]
    try:
        if any(not s for s in items):
            raise ValueError("empty entry")
        return tuple(kind(s) for s in items)
    except ValueError:
        raise EdgepruneError(f"{flag} expects a comma-separated list of {kind.__name__} values; "
                             f"got {value!r}") from None


def options_from_args(args: argparse.Namespace):
    """Build :class:`~edgeprune.bench.runner.BenchOptions` from the parsed arguments (no heavy imports).

    Raises:
        EdgepruneError subclasses for any malformed list, method, method argument or count.
    """
    from ..bench.runner import BenchOptions
    from .viz import parse_method_list, route_method_args

    if not args.methods.strip():
        raise EdgepruneError("--methods is empty; give a comma-separated list such as none,cls-topk")
    methods = parse_method_list(args.methods)
    backends = split_list(args.backends, "--backends", str)
    default_providers = "cuda,cpu" if args.device.startswith("cuda") else "cpu"
    return BenchOptions(
        model=args.model, methods=tuple(methods), tokens=split_list(args.tokens, "--tokens", int),
        ratios=split_list(args.ratios, "--ratios", float),
        method_args=route_method_args(methods, args.method_arg), backends=backends,
        providers=split_list(args.providers or default_providers, "--providers", str),
        random_weights=args.random_weights, dtype=args.dtype, device=args.device, clip=args.clip,
        kernels=args.kernels, warmup=args.warmup, repeat=args.repeat, prompt_tokens=args.prompt_tokens,
        new_tokens=args.new_tokens, image=args.image, threads=args.threads, schedule=args.schedule,
        opset=args.opset, statistic=args.statistic, ort_decoder=args.ort_decoder, ceilings=args.ceilings,
        env={k: os.environ[k] for k in _RECORDED_ENV if k in os.environ},
        command="edgeprune " + shlex.join(sys.argv[1:]) if sys.argv[1:2] == ["bench"] else "edgeprune bench")


def main(args: argparse.Namespace) -> int:
    from ..bench.report import check_writable, save_outputs, text_table

    if args.dpi <= 0:
        raise EdgepruneError(f"--dpi must be positive; got {args.dpi}")
    if args.report_from:
        if args.trace:
            raise EdgepruneError("--trace needs a sweep; drop it with --report-from")
        doc = _load_results(args.report_from, args.statistic)
    else:
        from ..bench.runner import check_options

        opts = options_from_args(args)
        check_options(opts)
    out_path = args.out or (None if args.report_from else "bench.json")
    out = check_writable(out_path, "--out") if out_path else None
    plot = check_writable(args.plot, "--plot", ".png") if args.plot else None
    markdown = check_writable(args.markdown, "--markdown") if args.markdown else None
    trace = check_writable(args.trace, "--trace") if args.trace else None
    if plot is not None:
        from .._deps import require

        require("matplotlib")  # fail before the sweep, not after it
    if args.report_from:
        save_outputs(doc, {}, out, plot=plot, markdown=markdown, dpi=args.dpi)
    else:
        from ..bench.runner import run_bench

        run = run_bench(opts)
        doc = run.doc
        save_outputs(doc, run.trace, out, plot=plot, markdown=markdown, trace_path=trace, dpi=args.dpi)
    print(text_table(doc))
    written = [str(p) for p in (out, plot, markdown, trace) if p is not None]
    if written:
        print("wrote " + ", ".join(written))
    return 0


def _load_results(path: str, statistic: str) -> dict:
    """An existing results JSON, its ratios and checks re-derived from ``statistic``.

    Raises:
        EdgepruneError: unreadable, not JSON, or not an edgeprune-bench document.
    """
    import json

    from ..bench.results import recompute

    try:
        with open(path) as f:
            doc = json.load(f)
    except (OSError, json.JSONDecodeError) as exc:
        raise EdgepruneError(f"--report-from {path!r}: cannot read it as JSON ({exc})") from None
    return recompute(doc, statistic)
