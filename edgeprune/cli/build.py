"""``edgeprune build``: build a bundle's TensorRT engines into ``DIR/engines/<flavour>-<version>-sm<cc>/``.

Every flag is checked before TensorRT is imported; a bad one prints one ``error:`` line and exits 2. Library
code: :mod:`edgeprune.engines.build` (its docstring says what ``--precision`` does with a strongly typed network
and how the compute capability is chosen).
"""

from __future__ import annotations

import argparse
from pathlib import Path


def add_parser(sub: argparse._SubParsersAction) -> None:
    from ..engines.build import PLUGIN_MODES, PRECISIONS  # numpy-free constants, no TensorRT import

    p = sub.add_parser("build", help="build TensorRT engines for an exported bundle",
                       description="Build every graph of a bundle into a TensorRT engine (strongly typed; the decoder "
                                   "with prefill and decode profiles), write them under DIR/engines/<flavour>-<version>-"
                                   "sm<cc>/ and record them in the manifest. Works with full TensorRT on the target "
                                   "GPU and with TensorRT for RTX (which also builds on a CPU-only machine).")
    p.add_argument("--bundle", required=True, metavar="DIR", help="an exported bundle (`edgeprune export`)")
    p.add_argument("--precision", choices=PRECISIONS, help="engine precision (default: the bundle's dtype; another "
                   "one only where TensorRT still has weak typing, full TensorRT 10.x)")
    p.add_argument("--plugins", default="auto", choices=PLUGIN_MODES, help="how fused ops (ZonalTopK, GraphRank) "
                   "build: auto (the best this TensorRT can do, logged with why), ipluginv3, aot, or none (their "
                   "standard-op ONNX bodies); default: %(default)s")
    p.add_argument("--timing-cache", metavar="PATH", help="timing-cache file, read if present and updated")
    p.add_argument("--workspace-mb", type=int, metavar="N", help="builder workspace limit in MiB")
    p.add_argument("--opt-level", type=int, metavar="0-5", help="builder optimisation level (0 builds fastest; "
                   "default: TensorRT's, 3)")
    p.add_argument("--flavour", choices=("tensorrt", "tensorrt-rtx"), help="which TensorRT to build with "
                   "(default: full TensorRT when importable, else TensorRT-RTX)")
    p.add_argument("--sm", type=int, metavar="CC", help="TensorRT-RTX target compute capability, e.g. 86 for sm_86 "
                   "(default: the visible GPU's, else 86); full TensorRT builds for its GPU")
    p.add_argument("--force", action="store_true", help="replace an existing engine set of the same key")
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    import logging

    from ..engines.build import BuildRequest, build_bundle, check_request

    request = BuildRequest(bundle=Path(args.bundle), precision=args.precision, plugins=args.plugins,
                           timing_cache=Path(args.timing_cache) if args.timing_cache else None,
                           workspace_mb=args.workspace_mb, opt_level=args.opt_level, flavour=args.flavour,
                           sm=args.sm, force=args.force)
    check_request(request)  # every flag before TensorRT is imported
    if not logging.getLogger().handlers:  # the builder's warnings and the chosen paths reach stderr
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    record = build_bundle(request)
    print(f"engines: {record['dir']} ({len(record['graphs'])} graphs, {record['build_seconds']:.1f} s, "
          f"{record['flavour']} {record['version']}, sm_{record['compute_capability']}, {record['precision']})")
    for op, entry in record["plugins"]["ops"].items():
        print(f"  {op}: {entry['mode']} ({entry['reason']})")
    return 0
