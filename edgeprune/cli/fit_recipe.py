"""``edgeprune fit-recipe``: fit a FitPrune recipe (per-layer visual-token drops) for a FLOPs budget.

Reads a calibration set (``--calib FILE.jsonl`` of ``{"image": path, "prompt": text}`` lines, or
``--calib generated:N`` for N synthetic offline samples), runs the binary search over α of METHODS.md §3 on
the model (:mod:`edgeprune.calibrate`, with a progress bar on stderr: one step per sample encoded and per α
simulated), and writes the recipe JSON atomically. Cheap inputs (budget, output path, calibration file and
images) are checked before the model loads.
"""

from __future__ import annotations

import argparse
import os
import sys

from ..errors import EdgepruneError
from ._common import add_model_args, check_positive


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("fit-recipe", help="fit a FitPrune recipe for a FLOPs budget on a calibration set",
                       description="Fit a FitPrune recipe: the per-layer number of visual tokens to drop so that "
                                   "the visual-token FLOPs shrink by --budget on the calibration set. Use the "
                                   "result with --method fitprune --method-arg recipe=FILE.")
    add_model_args(p)
    p.add_argument("--budget", type=float, required=True,
                   help="fraction of visual-token FLOPs to remove, in (0, 1), e.g. 0.7")
    p.add_argument("--calib", required=True, metavar="FILE|generated:N",
                   help='JSONL of {"image": path, "prompt": text} lines (relative image paths are relative to '
                        "the file), or generated:N for N synthetic offline samples")
    p.add_argument("--out", required=True, metavar="FILE", help="recipe JSON to write")
    p.add_argument("--samples", type=int, help="use only the first N calibration samples")
    p.add_argument("--seed", type=int, default=0, help="seed of --calib generated:N (default: %(default)s)")
    p.add_argument("--force", action="store_true", help="overwrite an existing --out file")
    p.set_defaults(func=main)


def _check_out(path: str, force: bool) -> None:
    if os.path.isdir(path):
        raise EdgepruneError(f"--out {path!r} is a directory; give a file name such as recipe.json")
    if os.path.exists(path) and not force:
        raise EdgepruneError(f"--out {path!r} already exists; pass --force to overwrite it")
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        raise EdgepruneError(f"--out {path!r}: directory {parent!r} does not exist")


def main(args: argparse.Namespace) -> int:
    from ..methods import fitprune_recipe as R

    R.check_budget(args.budget)
    if args.samples is not None:
        check_positive(args.samples, "--samples")
    _check_out(args.out, args.force)
    generated = R.parse_calib_spec(args.calib)
    items = R.generated_items(generated, seed=args.seed) if generated else R.read_calib_jsonl(args.calib)
    items = R.load_calib_images(items[: args.samples] if args.samples else items)  # fail before loading

    from .._deps import require

    require("torch")
    require("transformers")
    from .. import calibrate as C
    from ..models.loader import load_model
    from ..progress import progress

    loaded = load_model(args.model, random_weights=args.random_weights, dtype=args.dtype, device=args.device)
    steps = len(items) + 1 + C.search_steps()  # encode each sample, reference forward, one per alpha tried
    with progress(steps, "fit-recipe", "step", lines=False) as report:
        samples = C.encode_calibration(loaded, items, report)
        recipe = C.fit_recipe(loaded.family.language_model(loaded.model), samples, args.budget, model=args.model,
                              report=report)
    R.save_recipe(recipe, args.out)
    print(f"recipe for {args.model}: budget {args.budget:g}, {len(samples)} samples, N = {recipe.n_visual}, "
          f"alpha = {recipe.alpha:.4f}")
    print(f"drops per layer: {list(recipe.drops)} (sum {sum(recipe.drops)})")
    print(f"FLOPs: {recipe.flops_ratio:.3f} of unpruned (target <= {1 - args.budget:.3f}); wrote {args.out}")
    if recipe.flops_ratio > 1.0 - args.budget + 1e-9:
        print(f"warning: the budget {args.budget:g} was not reached on this calibration set (FitPrune's criterion "
              "cannot drop more tokens); the recipe prunes as much as it allows", file=sys.stderr)
    return 0
