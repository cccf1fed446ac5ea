"""``edgeprune viz``: a PNG of the visual tokens each pruning method keeps, one panel per method.

The model is loaded once and every method runs one request on it (one generated token is enough: the kept
tokens are chosen before decoding). Every cheap input (method names and arguments, budget, output path, image)
is checked before the model loads, and the PNG is written atomically, so a mistake leaves nothing behind.
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path
from typing import Any

from ..errors import EdgepruneError, MethodArgumentError
from ._common import add_method_args, add_model_args, check_output_file

DEFAULT_METHODS = "cls-topk,uniform,gridprune,gprune"


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "viz", help="draw which visual tokens each method keeps (one PNG, a panel per method)",
        description="Run each method of a comma-separated --method list on one image and prompt and draw the "
                    "kept patches at full brightness and the pruned ones dimmed, side by side. --method-arg "
                    "key=value goes to every listed method that has that parameter; method.key=value to one.",
    )
    add_model_args(p)
    add_method_args(p, default=DEFAULT_METHODS)
    p.add_argument("--image", help="image file (default: the bundled example image)")
    p.add_argument("--prompt", default="What is in the image?", help="the question (default: %(default)r)")
    p.add_argument("--out", default="kept.png", help="output PNG path; a missing directory is created "
                   "(default: %(default)s)")
    p.add_argument("--size", type=int, default=400, help="longer side of each panel's image in pixels "
                   "(default: %(default)s)")
    p.set_defaults(func=main)


def parse_method_list(spec: str) -> list[str]:
    """Split ``"a,b,c"`` into registered method names.

    Raises:
        UnknownMethodError: a name is not registered (lists the known ones).
        EdgepruneError: an empty list or an empty entry (``"a,,b"``).
    """
    from ..methods.registry import get_method_class

    names = [s.strip() for s in spec.split(",")]
    if not spec.strip() or any(not n for n in names):
        raise EdgepruneError(f"--method expects a comma-separated list of method names, e.g. {DEFAULT_METHODS}; "
                             f"got {spec!r}")
    for name in names:
        get_method_class(name)
    return names


def route_method_args(names: list[str], items: list[str]) -> dict[str, dict[str, str]]:
    """Give each method the ``--method-arg`` values it accepts.

    ``key=value`` goes to every listed method whose parameters include ``key``; ``method.key=value`` goes to
    that method only.

    Returns:
        method name -> {key: value}.
    Raises:
        MethodArgumentError: malformed item, a key no listed method accepts, or a prefix that is not listed.
    """
    from ..methods.base import parse_method_args
    from ..methods.registry import get_method_class

    routed: dict[str, dict[str, str]] = {n: {} for n in names}
    for key, value in parse_method_args(items).items():
        target, dot, field = key.rpartition(".")
        if dot and target not in routed:
            raise MethodArgumentError(f"--method-arg {key}: {target!r} is not in --method ({', '.join(names)})")
        candidates = [target] if dot else names
        takers = [n for n in candidates
                  if field in {f.name for f in dataclasses.fields(get_method_class(n).Params)}]
        if not takers:
            raise MethodArgumentError(f"--method-arg {key}: no method in {', '.join(candidates)} has a parameter "
                                      f"{field!r}; see `edgeprune methods`")
        for n in takers:
            routed[n][field] = value
    return routed


def check_out_path(out: str) -> Path:
    """The output path, validated before any work: a ``.png`` file that is not a directory; its missing parent
    directories are created when the picture is written (only then, so a failed run leaves nothing).

    Raises:
        EdgepruneError: wrong suffix, the path is a directory, or a parent is a file.
    """
    return check_output_file(out, "--out", suffix=".png", create_parent=True)


def _run_methods(args: argparse.Namespace, names: list[str], method_args: dict[str, dict[str, str]],
                 image: Any) -> tuple[Any, Any, list[Any], str]:
    """Load the model once and run every method on it.

    Returns:
        (the model's ``ImageConfig``, the image's ``TokenLayout``, one ``Result`` per name in order, a caption
        naming the model and prompt).
    Raises:
        EdgepruneError: model loading or a request failed on user input (e.g. BudgetError for K > N).
    """
    from ..api import build_pipeline
    from ..methods.registry import get_method_class
    from ..models.loader import load_model
    from ..runtime.preprocess import preprocess

    loaded = load_model(args.model, random_weights=args.random_weights, dtype=args.dtype, device=args.device)
    clip = {"clip": args.clip} if getattr(args, "clip", None) else {}
    results, backend = [], None
    for name in names:
        budget = dict(tokens=args.tokens, ratio=args.ratio) if get_method_class(name).uses_budget else {}
        pipe = build_pipeline(args.model, name, method_args=method_args[name], loaded=loaded, device=args.device,
                              kernels=args.kernels, **budget, **clip)
        results.append(pipe.run(image, args.prompt, max_new_tokens=1))
        backend = backend or pipe.backend
    # Results carry indices, not the layout; it depends on the image only, so one more vision pass gives it.
    pixels, image_size = preprocess(image, backend.image_config)
    layout = backend.encode_image(pixels, image_size).tokens.layout
    weights = " (random weights)" if loaded.source in ("offline-preset", "random-weights") else ""
    caption = f"{args.model}{weights} · {args.prompt!r}"
    return backend.image_config, layout, results, caption


def main(args: argparse.Namespace) -> int:
    """Run ``edgeprune viz``: validate, run every method on one loaded model, write the PNG; returns 0.

    Raises:
        EdgepruneError: any user mistake (see the module docstring), before anything is written.
    """
    from .._deps import require
    from ..api import preflight
    from ..methods.base import Budget
    from ..methods.registry import build_method
    from ..runtime.preprocess import default_image, load_image
    from ..viz.kept import MethodPanel, compose, render_method_panel, save_png

    names = parse_method_list(args.method)
    budget = Budget(tokens=args.tokens, ratio=args.ratio)
    method_args = route_method_args(names, args.method_arg)
    methods = {n: build_method(n, method_args[n]) for n in names}  # bad values fail before the model loads
    out = check_out_path(args.out)
    if any(m.placement == "in_llm" for m in methods.values()):
        require("matplotlib")  # in-LLM methods get a per-layer plot: fail before the model loads, not after
    if args.size < 64:
        raise EdgepruneError(f"--size must be at least 64 pixels; got {args.size}")
    image = load_image(args.image) if args.image else default_image()
    for method in methods.values():  # --device, --kernels and the model's bounds, before the model is built
        preflight(args.model, method, budget if method.uses_budget else Budget(), device=args.device,
                  kernels=args.kernels, random_weights=args.random_weights)

    cfg, layout, results, caption = _run_methods(args, names, method_args, image)
    data = []
    for name, res in zip(names, results):
        layer_tokens = res.profile.counters.get("layer_tokens")  # present for in-LLM methods only
        data.append(MethodPanel(method=name, kept=res.kept, n_visual=res.n_visual,
                                zones=getattr(methods[name].params, "zones", None),
                                layer_tokens=list(layer_tokens) if layer_tokens else None))
    panels = [render_method_panel(image, layout, cfg, d, size=args.size) for d in data]
    picture = compose(panels, caption=caption, legend_zones=any(d.zones for d in data))
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        save_png(picture, out)
    except OSError as exc:  # e.g. the directory is read-only or the disk is full; nothing is left behind
        raise EdgepruneError(f"cannot write {str(out)!r}: {exc.strerror or exc}; choose a writable --out") from exc
    summary = ", ".join(f"{n} {len(r.kept)}/{r.n_visual}" for n, r in zip(names, results))
    print(f"wrote {out} ({picture.width}x{picture.height}): {summary}")
    return 0
