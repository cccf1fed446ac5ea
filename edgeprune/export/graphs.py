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
from ..bundle.format import TOKENIZER_FILE
from ..errors import BudgetError, ExportError
from ..methods.base import Budget, PruningMethod, TokenLayout, VisualTokens
from .job import GraphJob
from .spec import decoder_spec, embed_spec, prune_spec, vision_spec

# Methods with an ONNX lowering: the baselines (prune graph of standard ops), GridPrune / G-Prune (prune graph
# with a fused edgeprune-domain node), FastV / FitPrune (in-LLM prefill graph + ragged-cache decode graph).
LOWERED = ("none", "random", "uniform", "cls-topk", "gridprune", "gprune", "fastv", "fitprune")


@dataclass(frozen=True)
class PrunePlan:
    """How the method becomes a graph.

    Attributes:
        n: N when fixed (LLaVA-1.5), None when it depends on the image (LLaVA-NeXT).
        n_max: the largest N the model can produce (bounds K at export).
        k: the static K, None for ``none``.
        mode: the lowering: a :class:`~edgeprune.export.wrappers.PruneGraph` mode (``topk``, ``const``,
            ``uniform``), ``gridprune`` / ``gprune`` (fused-op prune graphs), ``fastv`` / ``fitprune``
            (in-LLM decoders), None when every token is kept.
        const_idx: [K] int64 indices for ``mode="const"``.
        guidance: GridPrune's text guidance, ``clip`` or ``llm`` (None for the other methods).
        clip: the :class:`~edgeprune.models.clip_guidance.ClipGuidance` when ``guidance == "clip"``.
        schedule: the :class:`~edgeprune.export.inllm_decoder.DropSchedule` of an in-LLM method.
    """

    n: int | None
    n_max: int
    k: int | None
    mode: str | None
    const_idx: np.ndarray | None = None
    guidance: str | None = None
    clip: Any = None
    schedule: Any = None


def check_lowerable(method: PruningMethod) -> None:
    """Raise :class:`ExportError` for a method that has no ONNX lowering yet (lists the ones that have)."""
    if method.name not in LOWERED:
        raise ExportError(f"method {method.name!r} has no ONNX lowering yet; exportable methods: "
                          f"{', '.join(LOWERED)}")


def _geometry(loaded: Any) -> tuple[int, int, int]:
    """(view side in px, patch side in px, patches per view)."""
    vc = loaded.config.vision_config
    return int(vc.image_size), int(vc.patch_size), (int(vc.image_size) // int(vc.patch_size)) ** 2


def plan_prune(loaded: Any, method: PruningMethod, budget: Budget, clip: Any = None) -> PrunePlan:
    """Decide K, N and the lowering of ``method`` for ``loaded``.

    Args:
        clip: GridPrune's ``--clip`` (see :func:`~edgeprune.export.method_graphs.resolve_clip`).
    Raises:
        BudgetError: no budget for a budgeted method, a budget for one without (none, fitprune), or K > N.
        ExportError: ``--ratio`` or ``random`` where N depends on the image (LLaVA-NeXT).
        MethodArgumentError: FastV's layer or FitPrune's recipe does not fit the model.
    """
    check_lowerable(method)
    if budget.is_set and not method.uses_budget:
        raise BudgetError(f"method {method.name!r} does not take --tokens/--ratio "
                          + ("(its recipe sets the budget)" if method.placement == "in_llm" else "(it keeps every token)")
                          + "; drop them")
    view, _, per_view = _geometry(loaded)
    if loaded.family.model_type == "llava_next":
        pins = loaded.config.image_grid_pinpoints
        n_fixed, n_max = None, per_view * (1 + max((h // view) * (w // view) for h, w in pins))
    else:
        n_fixed = n_max = per_view
    if method.name == "fitprune":
        return PrunePlan(n=n_fixed, n_max=n_max, k=None, mode="fitprune", schedule=_schedule(loaded, method, None))
    if not method.uses_budget:
        return PrunePlan(n=n_fixed, n_max=n_max, k=None, mode=None)
    if not budget.is_set and not (method.name == "fastv" and n_fixed is not None):
        raise BudgetError(f"a bundle has a static budget: give --tokens K or --ratio r for --method {method.name}")
    if budget.ratio is not None and n_fixed is None:
        raise ExportError(f"--ratio needs a fixed N, but {loaded.name}'s N depends on the image size "
                          "(LLaVA-NeXT); give --tokens K")
    if method.name == "fastv":  # FastV's default without a budget: 50 % of the fixed N
        k = method.keep_count(budget, n_fixed) if n_fixed is not None else budget.tokens
    else:
        k = budget.tokens if budget.tokens is not None else max(1, int(round(budget.ratio * n_max)))
    if k > n_max:
        raise BudgetError(f"--tokens {k} exceeds the N = {n_max} visual tokens {loaded.name} can produce; "
                          f"use 1 <= K <= {n_max}")
    if method.name in ("gridprune", "gprune", "fastv"):
        return _method_plan(loaded, method, PrunePlan(n=n_fixed, n_max=n_max, k=k, mode=method.name), clip)
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
                      "use uniform, cls-topk, gridprune, gprune or fastv")


def _method_plan(loaded: Any, method: PruningMethod, plan: PrunePlan, clip: Any) -> PrunePlan:
    """GridPrune's guidance (and CLIP), FastV's drop schedule."""
    from dataclasses import replace

    if method.name == "gridprune":
        from .method_graphs import resolve_clip

        guide = resolve_clip(loaded, method, clip)
        return replace(plan, guidance="llm" if guide is None else "clip", clip=guide)
    if method.name == "fastv":
        return replace(plan, schedule=_schedule(loaded, method, plan.k))
    return plan


def _schedule(loaded: Any, method: Any, keep: int | None) -> Any:
    """The in-LLM :class:`~edgeprune.export.inllm_decoder.DropSchedule` (validated by the method itself)."""
    from .inllm_decoder import DropSchedule

    layers = int(loaded.config.text_config.num_hidden_layers)
    if method.name == "fastv":
        method.layer_plan(keep, layers, Budget(tokens=keep))  # raises for a layer beyond the model's depth
        return DropSchedule("fastv", layers, fastv_layer=method.params.layer, keep=int(keep))
    method.recipe.check_layers(layers)
    return DropSchedule("fitprune", layers, drops=method.recipe.drops, n_ref=method.recipe.n_visual)


def _text_dims(loaded: Any) -> dict[str, int]:
    tc = loaded.config.text_config
    heads = int(tc.num_attention_heads)
    return {"hidden_size": int(tc.hidden_size), "num_layers": int(tc.num_hidden_layers),
            "num_kv_heads": int(getattr(tc, "num_key_value_heads", None) or heads),
            "head_dim": int(getattr(tc, "head_dim", None) or tc.hidden_size // heads),
            "vocab_size": int(tc.vocab_size)}


def graph_jobs(loaded: Any, plan: PrunePlan, sdtype: str, method: PruningMethod | None = None,
               clip_fingerprint: str | None = None) -> list[Any]:
    """The graphs of the bundle in pipeline order, with export examples and validation feeds.

    Order: vision, [guidance], [prune], embed, [prefill], decoder. Examples use batch 2, seq 5 and past 3 (0 and
    1 get specialised by ``torch.export``); validation uses batch 1, a prefill with an empty past and a
    one-token decode, and tie-heavy scores for the prune graph.
    """
    from . import method_graphs as MG
    from .wrappers import EmbedGraph, VisionGraph

    dims = _text_dims(loaded)
    d, v = dims["hidden_size"], dims["vocab_size"]
    view, _, per_view = _geometry(loaded)
    rng = np.random.default_rng(0)
    jobs = []

    clip_dim = None if plan.clip is None else int(plan.clip.model.text_projection.out_features)
    vspec = vision_spec(view, per_view, d, sdtype, clip_dim)
    vchecks = [vspec.dummy_inputs({"views": 3 if plan.n is None else 1}, seed=1)]
    meta = {} if plan.clip is None else {"clip_fingerprint": clip_fingerprint}
    jobs.append(GraphJob("vision", VisionGraph(loaded, plan.clip), vspec, vspec.dummy_inputs({"views": 2}), vchecks,
                         meta=meta))
    if plan.clip is not None:
        jobs.append(MG.guidance_job(plan.clip, clip_fingerprint))
    if plan.mode == "gridprune":
        jobs.append(MG.gridprune_job(loaded, plan, method, sdtype, d))
    elif plan.mode == "gprune":
        jobs.append(MG.gprune_job(loaded, plan, method, sdtype, d))
    elif plan.mode in ("topk", "const", "uniform"):
        jobs.append(_baseline_prune_job(plan, sdtype, d, rng))

    espec = embed_spec(d, sdtype)
    ids = lambda b, s: rng.integers(0, v, (b, s))  # noqa: E731 - a local shorthand
    jobs.append(GraphJob("embed", EmbedGraph(loaded), espec, espec.dummy_inputs({}, overrides={"input_ids": ids(2, 3)}),
                         [espec.dummy_inputs({}, overrides={"input_ids": ids(1, 7)})]))
    if plan.schedule is not None:
        return jobs + MG.inllm_jobs(loaded, plan, sdtype, dims)
    return jobs + [_decoder_job(loaded, sdtype, dims, ids)]


def _baseline_prune_job(plan: PrunePlan, sdtype: str, d: int, rng: Any) -> Any:
    """The standard-op prune graph of ``cls-topk``/``uniform``/``random`` with tie-heavy validation scores."""
    from .wrappers import PruneGraph

    torch = require("torch")
    pspec = prune_spec(plan.n, plan.k, d, plan.mode == "topk", sdtype)
    module = PruneGraph(plan.k, plan.mode, None if plan.const_idx is None else torch.from_numpy(plan.const_idx))
    n_ex = plan.n if plan.n is not None else max(plan.k + 2, min(plan.n_max, 2 * plan.k + 3))
    checks = []
    for b, n in ((1, plan.n or plan.k), (3, plan.n or plan.n_max)):
        # Scores on a coarse grid: many exact ties, the case where a plain TopK may disagree.
        scores = (rng.integers(0, 4, (b, n)) / 4).astype(np.float32)
        checks.append(pspec.dummy_inputs({"batch": b, "n": n}, seed=b, overrides={"cls_attn": scores}))
    return GraphJob("prune", module, pspec, pspec.dummy_inputs({"batch": 2, "n": n_ex}), checks,
                    mins={} if plan.n is not None else {"n": plan.k})


def _decoder_job(loaded: Any, sdtype: str, dims: dict[str, int], ids: Any) -> Any:
    """The pre-LLM methods' decoder: one graph for prefill and decode (flat KV cache, HF forward); traced with
    eager attention below opset 23, plus the fused-attention ``decoder.ort.onnx`` (:mod:`.ort_variant`)."""
    from .wrappers import DecoderGraph

    torch = require("torch")
    fdt = np.float16 if sdtype == "float16" else np.float32
    d, v = dims["hidden_size"], dims["vocab_size"]
    dspec = decoder_spec(dims["num_layers"], dims["num_kv_heads"], dims["head_dim"], d, v, sdtype)
    embed = loaded.family.embed_tokens(loaded.model)

    def decoder_feeds(b: int, s: int, past: int, seed: int) -> dict[str, np.ndarray]:
        with torch.no_grad():
            emb = embed(torch.from_numpy(ids(b, s))).cpu().numpy().astype(fdt)
        return dspec.dummy_inputs({"batch": b, "seq": s, "past": past, "total": past + s}, seed=seed, overrides={
            "inputs_embeds": emb, "attention_mask": np.ones((b, past + s), np.int64),
            "position_ids": np.broadcast_to(np.arange(past, past + s), (b, s)).copy()})

    return GraphJob("decoder", DecoderGraph(loaded), dspec, decoder_feeds(2, 5, 3, 0),
                    [decoder_feeds(1, 6, 0, 1), decoder_feeds(1, 1, 6, 2)], var_inputs=2 * dims["num_layers"],
                    llm=loaded.family.language_model(loaded.model))


def manifest_sections(loaded: Any, method: PruningMethod, plan: PrunePlan, graphs: dict[str, Any],
                      host: dict[str, Any], fingerprint: str, dtype: str, opset: int) -> dict[str, Any]:
    """Everything the manifest records except the format fields, library versions and hashes."""
    view, patch, per_view = _geometry(loaded)
    tok = loaded.tokenizer
    pins = getattr(loaded.config, "image_grid_pinpoints", None)
    method_section = {"name": method.name, "params": method.describe_params(), "positions": method.positions,
                      "placement": method.placement, "uses_budget": method.uses_budget, "k": plan.k, "n": plan.n,
                      "n_max": plan.n_max, "lowering": plan.mode, "guidance": plan.guidance,
                      "fused_op": method.fused_op or None,
                      "in_llm": None if plan.schedule is None else plan.schedule.to_dict()}
    return {
        "model": {"name": loaded.name, "family": loaded.family.name, "model_type": loaded.family.model_type,
                  "source": loaded.source, "dtype": dtype, "fingerprint": fingerprint, **_text_dims(loaded)},
        "method": method_section,
        "graphs": graphs,
        "guidance": host.get("guidance"),
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
