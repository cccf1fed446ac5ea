"""``edgeprune models``: list the model presets, or save an offline preset as a Hugging Face directory."""

from __future__ import annotations

import argparse
import json
import os

from ..errors import EdgepruneError


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("models", help="list model presets (or --save one as a model directory)",
                       description="List the presets `--model` accepts. With --save NAME --out DIR, write an "
                                   "offline preset as a Hugging Face model directory (config, weights, tokenizer, "
                                   "preprocessor config) that `--model DIR` and from_pretrained load back.")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--save", metavar="NAME", help="offline preset to write (tiny-llava, tiny-llava-next, mini-llava)")
    p.add_argument("--out", metavar="DIR", help="directory to create for --save (must not exist)")
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    from ..models.registry import PRESETS, get_preset

    if args.out and not args.save:
        raise EdgepruneError("--out only applies with --save NAME (e.g. --save tiny-llava --out DIR)")
    if args.save:
        preset = get_preset(args.save)
        if preset.builder is None:
            raise EdgepruneError(f"--save takes an offline preset; {args.save!r} has real weights at {preset.hf_id}")
        if not args.out:
            raise EdgepruneError("--save needs --out DIR")
        if os.path.exists(args.out):
            raise EdgepruneError(f"{args.out!r} already exists; choose a new directory")
        from ..models.tiny import build_tiny, save_preset_atomic

        model, tok, img = build_tiny(preset.builder)
        save_preset_atomic(model, tok, img, args.out)
        print(f"wrote {args.save} to {args.out}")
        return 0
    rows = [{"name": p.name, "family": p.family,
             "weights": p.hf_id or ("trained (packaged)" if p.weights else "random (offline)"),
             "description": p.description} for p in PRESETS.values()]
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    for r in rows:
        print(f"{r['name']:<22} {r['family']:<11} {r['weights']:<36} {r['description']}")
    print("\n--model also takes a local directory or a Hugging Face id; --random-weights builds a named preset's "
          "architecture offline.")
    return 0
