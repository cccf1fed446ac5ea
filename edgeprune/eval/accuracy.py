"""Accuracy of pruning methods x budgets x backends on a VQA set (``edgeprune eval``).

Every combination answers every item greedily through the normal :class:`~edgeprune.runtime.pipeline.Pipeline`
(``torch``: the reference backend; ``ort``: an exported bundle on ONNX Runtime). Items are the outer loop and
combinations the inner one, so each image is decoded from disk and preprocessed once, and its vision stage runs
once per (backend, with/without CLIP guidance) and is shared by the combinations that need the same one (the
memo is keyed on the pixels: a method's selection, splice, prefill and decode still run per combination).

The results file is written incrementally (every few seconds and at the end, atomically) and holds every
prediction, so an interrupted run resumes where it stopped: combinations whose predictions are complete are
skipped (their ORT bundles are not even exported), and partly done ones answer only the missing items. A file
written for other data or another model is refused rather than mixed in.

Reported per combination: accuracy (mean item score) overall and per question type, POPE-style yes/no
precision/recall/F1 when there are yes/no items, **accuracy kept** (accuracy / the accuracy of ``none`` on the
same backend), **agreement with the unpruned answer** (the share of items whose normalised answer equals
``none``'s on the same backend) and **agreement between backends** (the share of items where ``ort`` gave the
same answer text as ``torch`` for the same method and budget: accuracy parity when it is 1).
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import numpy as np

from ..errors import EdgepruneError
from . import scorers
from .datasets import EvalItem

FORMAT = "edgeprune-eval/1"
SAVE_EVERY_S = 10.0


@dataclass
class Combo:
    """One method x budget x backend.

    Attributes:
        method: registered method name; k: the budget (None for methods that keep all tokens or carry a recipe).
        backend: ``torch`` or ``ort``; method_args: ``--method-arg`` strings for this method.
        bundle: the ORT bundle directory (``ort`` only, once exported); pipe: the built pipeline.
    """

    method: str
    k: int | None
    backend: str
    method_args: dict[str, str] = field(default_factory=dict)
    bundle: str | None = None
    pipe: Any = None

    @property
    def label(self) -> str:
        return f"{self.method}@{self.k if self.k is not None else 'all'}/{self.backend}"


@dataclass
class EvalOptions:
    """What ``edgeprune eval`` runs (see its ``--help``)."""

    model: str | None
    methods: Sequence[str]
    tokens: Sequence[int]
    backends: Sequence[str] = ("torch",)
    method_args: Mapping[str, Mapping[str, str]] = field(default_factory=dict)
    bundle: str | None = None
    bundle_dir: str | None = None
    providers: Sequence[str] = ("cpu",)
    opset: int = 18
    dtype: str = "fp32"
    device: str = "cpu"
    clip: str | None = None
    max_new_tokens: int = 16
    ort_variant: bool = True
    command: str = "edgeprune eval"


def plan(methods: Sequence[str], tokens: Sequence[int], backends: Sequence[str],
         method_args: Mapping[str, Mapping[str, str]]) -> list[Combo]:
    """Every combination, methods that take no budget once per backend (raises on unknown methods/args)."""
    from ..methods.registry import build_method

    combos = []
    for backend in backends:
        for m in methods:
            args = dict(method_args.get(m, {}))
            uses_budget = build_method(m, args or None).uses_budget
            for k in (tokens if uses_budget else (None,)):
                combos.append(Combo(m, k, backend, args))
    return combos


def new_document(opts: EvalOptions, data: Mapping[str, Any], items: Sequence[EvalItem]) -> dict[str, Any]:
    return {"format": FORMAT, "command": opts.command, "model": opts.model, "bundle": opts.bundle, "data": dict(data),
            "items": {it.id: {"type": it.type, "scorer": it.scorer, "answers": it.answers} for it in items},
            "max_new_tokens": opts.max_new_tokens, "predictions": {}, "combinations": {}, "results": []}


def resume_document(path: Path, fresh: dict[str, Any]) -> dict[str, Any]:
    """The existing results at ``path`` to resume, or ``fresh`` when there are none.

    Raises:
        EdgepruneError: the file is not an eval results file, or it was written for other data / model /
            generation length (say --out another file).
    """
    if not path.exists():
        return fresh
    try:
        old = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise EdgepruneError(f"--out {str(path)!r} exists but is not readable JSON ({exc}); remove it or choose "
                             "another --out") from None
    if not isinstance(old, dict) or old.get("format") != FORMAT:
        raise EdgepruneError(f"--out {str(path)!r} exists and is not an edgeprune eval results file; choose "
                             "another --out")
    for key in ("model", "bundle", "max_new_tokens"):
        if old.get(key) != fresh[key]:
            raise EdgepruneError(f"--out {str(path)!r} holds results for {key} {old.get(key)!r}, not "
                                 f"{fresh[key]!r}; choose another --out to start afresh")
    known = old.get("items", {})
    if old.get("data", {}).get("spec") != fresh["data"]["spec"] or any(
            known.get(i, {}).get("answers") not in (None, v["answers"]) for i, v in fresh["items"].items()):
        raise EdgepruneError(f"--out {str(path)!r} holds results for other data ({old.get('data', {}).get('spec')!r});"
                             " choose another --out to start afresh")
    old["items"] = {**old.get("items", {}), **fresh["items"]}
    old["command"] = fresh["command"]
    return old


class _MemoVision:
    """A backend whose ``encode_image`` result is shared through ``cache`` (keyed on the pixels, the backend kind
    and whether the method needs guidance, which decides if CLIP patch embeddings are part of the output)."""

    def __init__(self, inner: Any, cache: dict) -> None:
        object.__setattr__(self, "inner", inner)
        object.__setattr__(self, "cache", cache)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def __setattr__(self, name: str, value: Any) -> None:
        setattr(self.inner, name, value)

    def encode_image(self, pixel_values: Any, image_size: Any) -> Any:
        arr = np.ascontiguousarray(pixel_values)
        key = (self.inner.name, bool(self.inner.needs_guidance), getattr(self.inner, "clip", None) is not None,
               arr.shape, hashlib.blake2b(arr.tobytes(), digest_size=16).hexdigest())
        if key not in self.cache:
            self.cache[key] = self.inner.encode_image(pixel_values, image_size)
        return self.cache[key]


def export_bundles(combos: Sequence[Combo], loaded: Any, opts: EvalOptions, root: Path,
                   log: Callable[[str], None]) -> None:
    """One bundle per ORT combination under ``root`` (model graphs shared through ``reuse_from``); an existing
    bundle of the same method and budget there (``--bundle-dir`` of an earlier run) is used as it is."""
    from ..export.exporter import export_bundle, model_fingerprint

    first: str | None = None
    fingerprint = model_fingerprint(loaded.model)
    for c in combos:
        if c.backend != "ort" or c.bundle is not None:
            continue
        out = root / f"{c.method}-{c.k if c.k is not None else 'all'}"
        if not _matching_bundle(out, c, fingerprint, opts):
            log(f"export {c.label} -> {out}")
            export_bundle(loaded, c.method, out_dir=out, tokens=c.k, method_args=c.method_args or None,
                          dtype=opts.dtype, opset=opts.opset, reuse_from=first, clip=opts.clip, force=out.exists(),
                          ort_variant=opts.ort_variant, log=lambda m: None)
        c.bundle, first = str(out), first or str(out)


def _matching_bundle(path: Path, c: Combo, fingerprint: str, opts: EvalOptions) -> bool:
    """True when ``path`` holds a bundle of these weights (fingerprint), dtype, opset, method, budget and
    arguments: a stale bundle of other weights in ``--bundle-dir`` is re-exported, never reused."""
    manifest = path / "manifest.json"
    if not manifest.is_file():
        return False
    try:
        doc = json.loads(manifest.read_text())
    except (OSError, json.JSONDecodeError):
        return False
    m, model = doc.get("method", {}), doc.get("model", {})
    params = {k: str(v).lower() if isinstance(v, bool) else str(v) for k, v in (m.get("params") or {}).items()}
    return (model.get("fingerprint") == fingerprint and model.get("dtype") == opts.dtype
            and doc.get("opset") == opts.opset and m.get("name") == c.method
            and (m.get("k") if m.get("uses_budget") else None) == c.k
            and all(params.get(k) == v for k, v in c.method_args.items()))


def build_pipelines(combos: Sequence[Combo], loaded: Any, opts: EvalOptions, cache: dict) -> None:
    """Build each combination's pipeline (torch over the loaded model, ort over its bundle), vision memoised."""
    from ..api import build_pipeline

    for c in combos:
        if c.backend == "ort":
            c.pipe = build_pipeline(None, None, backend="ort", bundle=c.bundle, providers=list(opts.providers))
        elif opts.bundle is not None:  # the torch twin of --bundle, rebuilt from its manifest
            from ..bundle import open_bundle
            from ..runtime.pipeline import Pipeline
            from .compare import torch_backend

            opened = open_bundle(opts.bundle)
            m = opened.method
            from ..methods.base import Budget

            c.pipe = Pipeline(torch_backend(opened), Budget(tokens=m["k"]) if m["uses_budget"] else Budget(),
                              m["positions"], bool(m["uses_budget"]), m.get("placement", "pre_llm"))
        else:
            c.pipe = build_pipeline(opts.model, c.method, tokens=c.k, method_args=c.method_args or None,
                                    loaded=loaded, dtype=opts.dtype, device=opts.device, clip=opts.clip)
        c.pipe.backend = _MemoVision(c.pipe.backend, cache)


def run_eval(opts: EvalOptions, items: Sequence[EvalItem], combos: list[Combo], doc: dict[str, Any], out: Path,
             log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Answer every missing (combination, item), saving ``doc`` to ``out`` as it goes; returns the summarised doc."""
    log = log or (lambda m: print(m, file=sys.stderr))
    preds = doc.setdefault("predictions", {})
    for c in combos:
        preds.setdefault(c.label, {})
        doc["combinations"][c.label] = {"method": c.method, "k": c.k, "backend": c.backend,
                                        "method_args": c.method_args}
    todo = [c for c in combos if any(it.id not in preds[c.label] for it in items)]
    skipped = len(combos) - len(todo)
    if skipped:
        log(f"resuming {out}: {skipped} of {len(combos)} combinations already complete")
    if todo:
        _answer(opts, items, todo, preds, doc, out, log)
    summarize(doc, items, combos)
    save(doc, out)
    return doc


def _answer(opts: EvalOptions, items: Sequence[EvalItem], todo: list[Combo], preds: dict, doc: dict, out: Path,
            log: Callable[[str], None]) -> None:
    import tempfile

    loaded = None
    if opts.bundle is None:
        from ..models.loader import load_model

        loaded = load_model(opts.model, dtype=opts.dtype, device=opts.device)
    cache: dict = {}
    with tempfile.TemporaryDirectory(prefix="edgeprune-eval-") as tmp:
        if opts.bundle is None:
            export_bundles(todo, loaded, opts, Path(opts.bundle_dir or tmp), log)
        else:
            for c in todo:
                c.bundle = opts.bundle if c.backend == "ort" else None
        build_pipelines(todo, loaded, opts, cache)
        total = sum(1 for c in todo for it in items if it.id not in preds[c.label])
        last = time.monotonic()
        with progress(total, log) as tick:
            for it in items:
                need = [c for c in todo if it.id not in preds[c.label]]
                if not need:
                    continue
                image = it.load_image()
                cache.clear()
                for c in need:
                    res = c.pipe.run(image, it.question, max_new_tokens=opts.max_new_tokens)
                    preds[c.label][it.id] = res.text.strip()
                    tick(c.label)
                if time.monotonic() - last > SAVE_EVERY_S:
                    save(doc, out)
                    last = time.monotonic()


@contextmanager
def progress(total: int, log: Callable[[str], None]) -> Iterator[Callable[[str], None]]:
    """tqdm on stderr when installed, else a line every 5 % through ``log``."""
    try:
        from tqdm import tqdm
    except ImportError:
        done = [0]

        def line(msg: str) -> None:
            done[0] += 1
            if done[0] == total or done[0] % max(1, total // 20) == 0:
                log(f"[{done[0]}/{total}] {msg}")

        yield line
        return
    with tqdm(total=total, desc="eval", unit="answer", file=sys.stderr, leave=False) as bar:
        def tick(msg: str) -> None:
            bar.set_postfix_str(msg, refresh=False)
            bar.update(1)

        yield tick


def save(doc: dict[str, Any], out: Path) -> None:
    """Write ``doc`` to ``out`` through a temporary sibling and a rename."""
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    try:
        tmp.write_text(json.dumps(doc, indent=1) + "\n")
        os.replace(tmp, out)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise EdgepruneError(f"cannot write --out {str(out)!r}: {exc.strerror or exc}") from None


def _mean(values: Sequence[float]) -> float | None:
    return float(sum(values) / len(values)) if values else None


def summarize(doc: dict[str, Any], items: Sequence[EvalItem], combos: Sequence[Combo]) -> None:
    """Fill ``doc["results"]``: one row per combination (see the module docstring for the metrics)."""
    preds = doc["predictions"]
    by_label = {c.label: c for c in combos}
    rows = []
    for c in combos:
        p = preds.get(c.label, {})
        done = [it for it in items if it.id in p]
        scores = {it.id: it.score(p[it.id]) for it in done}
        types: dict[str, list[float]] = {}
        for it in done:
            types.setdefault(it.type, []).append(scores[it.id])
        row: dict[str, Any] = {"label": c.label, "method": c.method, "k": c.k, "backend": c.backend,
                               "n": len(done), "accuracy": _mean(list(scores.values())),
                               "per_type": {t: _mean(v) for t, v in sorted(types.items())}}
        yn = [it for it in done if it.scorer == "yesno"]
        if yn:
            row["yes_no"] = scorers.yes_no_metrics([p[it.id] for it in yn], [it.answers[0] for it in yn])
        rows.append(row)
    acc = {r["label"]: r for r in rows}
    for r in rows:
        c = by_label[r["label"]]
        base = next((x for x in rows if x["method"] == "none" and x["backend"] == c.backend), None)
        r["accuracy_kept"] = (r["accuracy"] / base["accuracy"] if base and r["accuracy"] is not None
                              and base["accuracy"] else None)
        r["agree_unpruned"] = _agreement(preds.get(c.label, {}), preds.get(base["label"], {}) if base else {},
                                         normalize=True)
        twin = Combo(c.method, c.k, "torch").label
        r["agree_torch"] = (_agreement(preds.get(c.label, {}), preds.get(twin, {}), normalize=False)
                            if c.backend != "torch" and twin in acc else None)
    doc["results"] = rows


def _agreement(a: Mapping[str, str], b: Mapping[str, str], normalize: bool) -> float | None:
    common = [k for k in a if k in b]
    if not common:
        return None
    f = scorers.normalize_answer if normalize else (lambda s: s)
    return sum(f(a[k]) == f(b[k]) for k in common) / len(common)


# ---------------------------------------------------------------------------------------------- reports
def _pct(v: float | None) -> str:
    return "-" if v is None else f"{100 * v:.1f}"


def markdown(doc: dict[str, Any]) -> str:
    """Accuracy-vs-tokens tables (one per backend: accuracy %, kept % in brackets), then per-type accuracy and
    backend agreement."""
    rows = doc["results"]
    ks = sorted({r["k"] for r in rows if r["k"] is not None}, reverse=True)
    lines = [f"Data: `{doc['data'].get('spec')}` ({doc['data'].get('n')} items); model: "
             f"`{doc.get('model') or doc.get('bundle')}`; command: `{doc.get('command')}`", ""]
    for backend in dict.fromkeys(r["backend"] for r in rows):
        sub = [r for r in rows if r["backend"] == backend]
        lines += [f"**{backend}**: accuracy % (accuracy kept vs `none`, %)", "",
                  "| " + " | ".join(["method", *(f"K={k}" for k in ks), "all tokens"]) + " |",
                  "|---|" + "---|" * (len(ks) + 1)]
        for method in dict.fromkeys(r["method"] for r in sub):
            cells = []
            for k in [*ks, None]:
                r = next((x for x in sub if x["method"] == method and x["k"] == k), None)
                cells.append("" if r is None else f"{_pct(r['accuracy'])} ({_pct(r['accuracy_kept'])})")
            lines.append(f"| {method} | " + " | ".join(cells) + " |")
        lines.append("")
    types = sorted({t for r in rows for t in r["per_type"]})
    lines += ["Per question type, accuracy % (agreement with the unpruned answer %; ORT rows: same answers as "
              "torch %)", "", "| combination | " + " | ".join(types) + " | agree unpruned | agree torch |",
              "|---|" + "---|" * (len(types) + 2)]
    for r in rows:
        lines.append(f"| {r['label']} | " + " | ".join(_pct(r["per_type"].get(t)) for t in types)
                     + f" | {_pct(r['agree_unpruned'])} | {_pct(r['agree_torch'])} |")
    return "\n".join(lines) + "\n"


def plot(doc: dict[str, Any], path: Path, dpi: int = 100) -> None:
    """Accuracy vs kept visual tokens, one line per method (torch solid, ORT dashed); ``none`` as a level."""
    from .._deps import require

    require("matplotlib")
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    rows = doc["results"]
    fig = Figure(figsize=(7.5, 4.2), dpi=dpi, layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    colors: dict[str, Any] = {}
    for (method, backend) in dict.fromkeys((r["method"], r["backend"]) for r in rows):
        sub = sorted((r for r in rows if r["method"] == method and r["backend"] == backend and r["accuracy"]
                      is not None), key=lambda r: r["k"] or 0)
        style = "-" if backend == "torch" else "--"
        color = colors.setdefault(method, f"C{len(colors)}")
        label = method if backend == "torch" or "torch" not in {r["backend"] for r in rows} else None
        if sub and sub[0]["k"] is None:
            ax.axhline(100 * sub[0]["accuracy"], color=color, linestyle=style, linewidth=1, label=label and
                       f"{method} (all tokens)")
            continue
        ax.plot([r["k"] for r in sub], [100 * r["accuracy"] for r in sub], style, marker="o", markersize=3,
                color=color, label=label)
    ax.set_xscale("log", base=2)
    ks = sorted({r["k"] for r in rows if r["k"] is not None})
    ax.set_xticks(ks, [str(k) for k in ks])
    ax.set_xlabel("visual tokens kept (of 576)")
    ax.set_ylabel("accuracy %")
    backends = ", ".join(dict.fromkeys(r["backend"] for r in rows))
    ax.set_title(f"{doc.get('model') or doc.get('bundle')} on {doc['data'].get('spec')} ({backends}; ORT dashed)",
                 fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncols=2)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}.png")
    fig.savefig(tmp)
    os.replace(tmp, path)
