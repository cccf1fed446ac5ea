"""What a bundle contains for a model and a method: the prune plan, the graph jobs and the manifest sections.

Split from :mod:`edgeprune.export.exporter` (which runs the export) so that the "what" is readable on its own:
which lowering a method gets (:func:`plan_prune`), the example and validation inputs of every graph
(:func:`graph_jobs`) and what the manifest records about the model (:func:`manifest_sections`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from .._deps import require
from ..errors import BudgetError
from ..methods.base import Budget, PruningMethod, TokenLayout, VisualTokens
from .manifest import ExportError, TOKENIZER_FILE
from .spec import decoder_spec, embed_spec, prune_spec, vision_spec

# Methods with an ONNX lowering so far; the others (GridPrune, G-Prune, FitPrune, FastV) come with their graphs.
LOWERED = ("none", "random", "uniform", "cls-topk")


@dataclass(frozen=True)
class PrunePlan:
    """How the method becomes a graph.

    Attributes:
        n: N when fixed (LLaVA-1.5), None when it depends on the image (LLaVA-NeXT).
        n_max: the largest N the model can produce (bounds K at export).
        k: the static K, None for ``none``.
        mode: :class:`~edgeprune.export.wrappers.PruneGraph` mode, None when there is no prune graph.
        const_idx: [K] int64 indices for ``mode="const"``.
    """

    n: int | None
    n_max: int
    k: int | None
    mode: str | None
    const_idx: np.ndarray | None = None


def check_lowerable(method: PruningMethod) -> None:
    """Raise :class:`ExportError` for a method that has no ONNX lowering yet (lists the ones that have)."""
    if method.name not in LOWERED:
        raise ExportError(f"method {method.name!r} has no ONNX lowering yet; exportable methods: "
                          f"{', '.join(LOWERED)}")


def _geometry(loaded: Any) -> tuple[int, int, int]:
    """(view side in px, patch side in px, patches per view)."""
    vc = loaded.config.vision_config
    return int(vc.image_size), int(vc.patch_size), (int(vc.image_size) // int(vc.patch_size)) ** 2


def plan_prune(loaded: Any, method: PruningMethod, budget: Budget) -> PrunePlan:
    """Decide K, N and the lowering of ``method`` for ``loaded``.

    Raises:
        BudgetError: no budget for a budgeted method, or K > N.
        ExportError: ``--ratio`` or ``random`` where N depends on the image (LLaVA-NeXT).
    """
    check_lowerable(method)
    view, _, per_view = _geometry(loaded)
    if loaded.family.model_type == "llava_next":
        pins = loaded.config.image_grid_pinpoints
        n_fixed, n_max = None, per_view * (1 + max((h // view) * (w // view) for h, w in pins))
    else:
        n_fixed = n_max = per_view
    if not method.uses_budget:
        return PrunePlan(n=n_fixed, n_max=n_max, k=None, mode=None)
    if not budget.is_set:
        raise BudgetError(f"a bundle has a static budget: give --tokens K or --ratio r for --method {method.name}")
    if budget.ratio is not None and n_fixed is None:
        raise ExportError(f"--ratio needs a fixed N, but {loaded.name}'s N depends on the image size "
                          "(LLaVA-NeXT); give --tokens K")
    k = budget.tokens if budget.tokens is not None else max(1, int(round(budget.ratio * n_max)))
    if k > n_max:
        raise BudgetError(f"--tokens {k} exceeds the N = {n_max} visual tokens {loaded.name} can produce; "
                          f"use 1 <= K <= {n_max}")
    if method.name == "cls-topk":
        return PrunePlan(n=n_fixed, n_max=n_max, k=k, mode="topk")
    if n_fixed is not None:  # data-independent indices: bake the reference's own answer into the graph
        torch = require("torch")
        rows, cols = loaded.family.patch_grid(loaded.model)
        tokens = VisualTokens(features=torch.zeros(1, n_fixed, 1), cls_attn=torch.zeros(1, n_fixed),
                              layout=TokenLayout.single_view(rows, cols))
        idx = method.select(tokens, k)[0].numpy().astype(np.int64)
        return PrunePlan(n=n_fixed, n_max=n_max, k=k, mode="const", const_idx=idx)
    if method.name == "uniform":
        return PrunePlan(n=None, n_max=n_max, k=k, mode="uniform")
    raise ExportError(f"--method {method.name} needs a fixed N, but {loaded.name}'s N depends on the image size; "
                      "use uniform or cls-topk")


def _text_dims(loaded: Any) -> dict[str, int]:
    tc = loaded.config.text_config
    heads = int(tc.num_attention_heads)
    return {"hidden_size": int(tc.hidden_size), "num_layers": int(tc.num_hidden_layers),
            "num_kv_heads": int(getattr(tc, "num_key_value_heads", None) or heads),
            "head_dim": int(getattr(tc, "head_dim", None) or tc.hidden_size // heads),
            "vocab_size": int(tc.vocab_size)}


def graph_jobs(loaded: Any, plan: PrunePlan, sdtype: str) -> list[Any]:
    """The graphs of the bundle in pipeline order, with export examples and validation feeds.

    Examples use batch 2, seq 5 and past 3 (0 and 1 get specialised by ``torch.export``); validation uses
    batch 1, a prefill with an empty past and a one-token decode, and tie-heavy scores for the prune graph.
    """
    from .exporter import GraphJob
    from .wrappers import DecoderGraph, EmbedGraph, PruneGraph, VisionGraph

    torch = require("torch")
    dims = _text_dims(loaded)
    d, v = dims["hidden_size"], dims["vocab_size"]
    view, _, per_view = _geometry(loaded)
    fdt = np.float16 if sdtype == "float16" else np.float32
    rng = np.random.default_rng(0)
    jobs = []

    vspec = vision_spec(view, per_view, d, sdtype)
    vchecks = [vspec.dummy_inputs({"views": 3 if plan.n is None else 1}, seed=1)]
    jobs.append(GraphJob("vision", VisionGraph(loaded), vspec, vspec.dummy_inputs({"views": 2}), vchecks))

    if plan.mode is not None:
        pspec = prune_spec(plan.n, plan.k, d, plan.mode == "topk", sdtype)
        module = PruneGraph(plan.k, plan.mode,
                            None if plan.const_idx is None else torch.from_numpy(plan.const_idx))
        n_ex = plan.n if plan.n is not None else max(plan.k + 2, min(plan.n_max, 2 * plan.k + 3))
        checks = []
        for b, n in ((1, plan.n or plan.k), (3, plan.n or plan.n_max)):
            # Scores on a coarse grid: many exact ties, the case where a plain TopK may disagree.
            scores = (rng.integers(0, 4, (b, n)) / 4).astype(np.float32)
            checks.append(pspec.dummy_inputs({"batch": b, "n": n}, seed=b, overrides={"cls_attn": scores}))
        jobs.append(GraphJob("prune", module, pspec, pspec.dummy_inputs({"batch": 2, "n": n_ex}), checks,
                             mins={} if plan.n is not None else {"n": plan.k}))

    espec = embed_spec(d, sdtype)
    ids = lambda b, s: rng.integers(0, v, (b, s))  # noqa: E731 - a local shorthand
    jobs.append(GraphJob("embed", EmbedGraph(loaded), espec, espec.dummy_inputs({}, overrides={"input_ids": ids(2, 3)}),
                         [espec.dummy_inputs({}, overrides={"input_ids": ids(1, 7)})]))

    dspec = decoder_spec(dims["num_layers"], dims["num_kv_heads"], dims["head_dim"], d, v, sdtype)
    embed = loaded.family.embed_tokens(loaded.model)

    def decoder_feeds(b: int, s: int, past: int, seed: int) -> dict[str, np.ndarray]:
        with torch.no_grad():
            emb = embed(torch.from_numpy(ids(b, s))).cpu().numpy().astype(fdt)
        return dspec.dummy_inputs({"batch": b, "seq": s, "past": past, "total": past + s}, seed=seed, overrides={
            "inputs_embeds": emb, "attention_mask": np.ones((b, past + s), np.int64),
            "position_ids": np.broadcast_to(np.arange(past, past + s), (b, s)).copy()})

    jobs.append(GraphJob("decoder", DecoderGraph(loaded), dspec, decoder_feeds(2, 5, 3, 0),
                         [decoder_feeds(1, 6, 0, 1), decoder_feeds(1, 1, 6, 2)], var_inputs=2 * dims["num_layers"]))
    return jobs


def manifest_sections(loaded: Any, method: PruningMethod, plan: PrunePlan, graphs: dict[str, Any],
                      host: dict[str, Any], fingerprint: str, dtype: str, opset: int) -> dict[str, Any]:
    """Everything the manifest records except the format fields, library versions and hashes."""
    view, patch, per_view = _geometry(loaded)
    tok = loaded.tokenizer
    pins = getattr(loaded.config, "image_grid_pinpoints", None)
    return {
        "model": {"name": loaded.name, "family": loaded.family.name, "model_type": loaded.family.model_type,
                  "source": loaded.source, "dtype": dtype, "fingerprint": fingerprint, **_text_dims(loaded)},
        "method": {"name": method.name, "params": method.describe_params(), "positions": method.positions,
                   "placement": method.placement, "uses_budget": method.uses_budget, "k": plan.k, "n": plan.n,
                   "n_max": plan.n_max, "lowering": plan.mode},
        "graphs": graphs,
        "preprocessing": loaded.image_config.to_dict(),
        "prompt": {"template": loaded.template, "image_token_id": loaded.image_token_id,
                   "bos_token_id": tok.bos_token_id, "eos_token_id": loaded.eos_token_id},
        "tokenizer": {"file": TOKENIZER_FILE, "files": host["tokenizer_files"],
                      "clean_up_tokenization_spaces": bool(getattr(tok, "clean_up_tokenization_spaces", False))},
        "vision": {"image_size": view, "patch_size": patch, "patches_per_view": per_view,
                   "patch_grid": [view // patch, view // patch],
                   "feature_layer": int(loaded.config.vision_feature_layer),
                   "grid_pinpoints": None if pins is None else [list(p) for p in pins],
                   "newline_file": host["newline_file"]},
        "max_positions": loaded.max_positions,
        "opset": opset,
    }
