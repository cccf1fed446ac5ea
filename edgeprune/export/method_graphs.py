"""The method-specific graphs of a bundle: GridPrune/G-Prune prune graphs, the CLIP guidance graph, and the
in-LLM (FastV/FitPrune) prefill + ragged decode graphs, each with its export example and validation feeds.

Split from :mod:`edgeprune.export.graphs` (which plans the bundle and builds the model graphs) along the
method seam. The validation feeds are chosen to exercise what could go wrong: exact ties (one-hot CLIP
embeddings make relevances exactly 0 or 1, so zone means, budgets and scores tie), LLaVA-NeXT layouts from
the real anyres packing (image-dependent N, zones and groups), single-token decode over ragged caches.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .._deps import require
from ..errors import MethodArgumentError
from ..runtime.anyres import pack_layout
from .job import GraphJob

# Image sizes whose anyres layouts feed the NeXT validation (two different N, one with padded rows).
_NEXT_SIZES = ((300, 400), (500, 260))


def resolve_clip(loaded: Any, method: Any, clip: Any) -> Any:
    """The CLIP guidance model of a GridPrune export (as ``build_pipeline`` resolves it), or None (``llm``).

    Args:
        loaded: the model; method: the pruning method; clip: ``--clip`` (a spec string, a loaded
            :class:`~edgeprune.models.clip_guidance.ClipGuidance`, or None for the default).
    Raises:
        MethodArgumentError: ``guidance=clip`` without any CLIP checkpoint.
        ModelLoadError: the CLIP checkpoint cannot be loaded or does not match the vision tower.
    """
    if not method.needs_guidance or getattr(method.params, "guidance", "") == "llm":
        return None
    if clip is not None and not isinstance(clip, str):
        return clip
    from ..models.clip_guidance import TINY_CLIP, load_clip

    spec = clip or loaded.default_clip or (TINY_CLIP if loaded.source == "offline-preset" else None)
    if spec is None and loaded.source != "random-weights":
        if method.params.guidance == "clip":
            raise MethodArgumentError("gridprune: guidance=clip needs the CLIP checkpoint of the vision tower; give "
                                      "--clip (e.g. openai/clip-vit-large-patch14-336) or --method-arg guidance=llm")
        return None
    dtype = next(loaded.model.parameters()).dtype
    return load_clip(spec or "", loaded.config.vision_config, random_weights=loaded.source == "random-weights",
                     dtype=dtype, device="cpu")


def next_layouts(loaded: Any) -> list[Any]:
    """Real LLaVA-NeXT packing layouts for the validation sizes (numpy ``PackLayout`` objects)."""
    vc = loaded.config.vision_config
    pins = [list(p) for p in loaded.config.image_grid_pinpoints]
    return [pack_layout(size, pins, int(vc.image_size), int(vc.patch_size)) for size in _NEXT_SIZES]


def _prunable(layout: Any) -> dict[str, np.ndarray]:
    keep = layout.source >= 0
    return {"view": layout.view[keep], "row": layout.row[keep], "col": layout.col[keep], "group": layout.group[keep]}


def _one_hot_rows(rng: Any, b: int, n: int, d: int) -> np.ndarray:
    """[b, n, d] rows that are one of the first 3 unit vectors: cosines with e_0 are exactly 0 or 1 (ties)."""
    out = np.zeros((b, n, d), np.float32)
    hot = rng.integers(0, min(3, d), (b, n))
    np.put_along_axis(out, hot[..., None], 1.0, axis=-1)
    return out


def gridprune_job(loaded: Any, plan: Any, method: Any, sdtype: str, hidden: int) -> Any:
    """The GridPrune prune graph (ZonalTopK) with tie-heavy and NeXT validation feeds."""
    from ..methods import gridprune_fn as G
    from ..methods.base import TokenLayout
    from .lower_gridprune import GridPruneReference, build_gridprune_model, gridprune_spec

    p = method.params
    clip_dim = None if plan.clip is None else int(plan.clip.model.text_projection.out_features)
    spec = gridprune_spec(plan.n, plan.k, hidden, clip_dim or hidden, clip_dim, sdtype)
    rows, cols = loaded.family.patch_grid(loaded.model)
    per_view = rows * cols
    num_zones = (plan.n_max // per_view) * p.zones * p.zones
    zone_const = None
    if plan.n is not None:
        zone_const = G.zone_ids(TokenLayout.single_view(rows, cols), p.zones).numpy()
    rng = np.random.default_rng(7)
    fdt = np.float16 if sdtype == "float16" else np.float32

    def feeds(b: int, n: int, ties: bool, zone: np.ndarray | None) -> dict[str, np.ndarray]:
        emb_dim = clip_dim or hidden
        embeds = _one_hot_rows(rng, b, n, emb_dim) if ties else rng.standard_normal((b, n, emb_dim)).astype(np.float32)
        guidance = np.zeros((b, emb_dim), np.float32)
        guidance[:, 0] = 1.0
        if not ties:
            guidance = rng.standard_normal((b, emb_dim)).astype(np.float32)
        out = {"features": (embeds if clip_dim is None else rng.standard_normal((b, n, hidden))).astype(fdt),
               "cls_attn": (rng.integers(0, 4, (b, n)) / 4).astype(np.float32), "guidance": guidance}
        if clip_dim is not None:
            out["clip_embeds"] = embeds
        if zone is not None:
            out["zone_ids"] = zone.astype(np.int64)
        return out

    if plan.n is not None:
        checks = [feeds(1, plan.n, True, None), feeds(3, plan.n, False, None)]
    else:
        zones = []
        for lay in next_layouts(loaded):
            pl = _prunable(lay)
            zones.append(G.zone_ids(TokenLayout(view=pl["view"], row=pl["row"], col=pl["col"], group=pl["group"],
                                                grid=(rows, cols)), p.zones).numpy())
        checks = [feeds(1, len(z), i == 0, z) for i, z in enumerate(zones) if len(z) >= plan.k]
    reference = GridPruneReference(plan.k, p, num_zones, zone_const, clip_dim is not None)
    example = checks[0]
    return GraphJob("prune", reference, spec, example, checks,
                    build=lambda opset: build_gridprune_model(spec, plan.k, p, num_zones, zone_const, opset),
                    meta={"num_zones": num_zones, "fused_op": "ZonalTopK"})


def gprune_job(loaded: Any, plan: Any, method: Any, sdtype: str, hidden: int) -> Any:
    """The G-Prune prune graph (GraphRank) with random and NeXT (two groups) validation feeds."""
    from .lower_gprune import GPruneReference, build_gprune_model, gprune_spec

    p = method.params
    spec = gprune_spec(plan.n, plan.k, hidden, sdtype)
    rng = np.random.default_rng(11)
    fdt = np.float16 if sdtype == "float16" else np.float32
    if plan.n is not None:
        checks = [{"features": rng.standard_normal((b, plan.n, hidden)).astype(fdt)} for b in (1, 2)]
    else:
        checks = []
        for lay in next_layouts(loaded):
            group = _prunable(lay)["group"].astype(np.int64)
            if len(group) >= plan.k:
                checks.append({"features": rng.standard_normal((1, len(group), hidden)).astype(fdt),
                               "group_ids": group})
    groups = 1 if plan.n is not None else 2
    return GraphJob("prune", GPruneReference(plan.k, p, plan.n), spec, checks[0], checks,
                    build=lambda opset: build_gprune_model(spec, plan.k, p, groups, plan.n, opset),
                    meta={"num_groups": groups, "fused_op": "GraphRank"})


def guidance_job(clip: Any, fingerprint: str) -> Any:
    """The CLIP text tower graph (``guidance.onnx``); seq is bounded by the tower's position table."""
    from .spec import guidance_spec
    from .wrappers import ClipTextGraph

    spec = guidance_spec(int(clip.model.text_projection.out_features))
    vocab, ctx = int(clip.model.config.text_config.vocab_size), clip.context
    rng = np.random.default_rng(3)
    ids = lambda b, s: {"input_ids": rng.integers(0, vocab, (b, s)).astype(np.int64)}  # noqa: E731
    return GraphJob("guidance", ClipTextGraph(clip), spec, ids(2, 5), [ids(1, 7), ids(1, ctx)], maxs={"seq": ctx},
                    meta={"clip_fingerprint": fingerprint})


def inllm_jobs(loaded: Any, plan: Any, sdtype: str, dims: dict[str, int]) -> list[Any]:
    """The in-LLM prefill graph (drops baked in) and the ragged-cache decode graph, with validation feeds."""
    from .inllm_decoder import InLLMDecodeGraph, InLLMPrefillGraph
    from .spec import inllm_decode_spec, inllm_prefill_spec

    torch = require("torch")
    layers, hkv, hd, d, v = (dims[k] for k in ("num_layers", "num_kv_heads", "head_dim", "hidden_size", "vocab_size"))
    fdt = np.float16 if sdtype == "float16" else np.float32
    rng = np.random.default_rng(5)
    embed = loaded.family.embed_tokens(loaded.model)

    def prefill_feeds(length: int, start: int, total: int, n: int) -> dict[str, np.ndarray]:
        ids = torch.from_numpy(rng.integers(0, v, (1, length)))
        with torch.no_grad():
            emb = embed(ids).cpu().numpy().astype(fdt)
        emb[0, start:start + total] = rng.standard_normal((total, d)).astype(fdt)  # visual rows: not vocabulary
        prunable = np.sort(rng.choice(total, n, replace=False)) if n < total else np.arange(total)
        return {"inputs_embeds": emb, "position_ids": np.arange(length, dtype=np.int64)[None],
                "visual_start": np.array([start], np.int64), "visual_count": np.array([total], np.int64),
                "prunable_index": prunable.astype(np.int64)}

    keep = plan.schedule.keep if plan.schedule.kind == "fastv" else 1
    if plan.n is not None:
        example, checks = prefill_feeds(plan.n + 14, 5, plan.n, plan.n), [prefill_feeds(plan.n + 24, 10, plan.n, plan.n)]
    else:
        n_ex = min(plan.n_max, max(keep + 13, 600))
        example = prefill_feeds(n_ex + 40, 5, n_ex + 20, n_ex)
        checks = [prefill_feeds(t + 30, 7, t, n) for t, n in ((n_ex + 120, n_ex + 90), (n_ex + 30, n_ex + 2))
                  if n <= plan.n_max]
    pspec = inllm_prefill_spec(layers, hkv, hd, d, v, plan.n, sdtype)
    lm = loaded.family.language_model(loaded.model)
    prefill = GraphJob("prefill", InLLMPrefillGraph(loaded, plan.schedule), pspec, example, checks,
                       mins={} if plan.n is not None else {"n": max(2, keep)}, meta={"in_llm": plan.schedule.to_dict()},
                       llm=lm)
    dspec = inllm_decode_spec(layers, hkv, hd, d, v, sdtype)

    def decode_feeds(q: int, pasts: list[int]) -> dict[str, np.ndarray]:
        out = {"inputs_embeds": rng.standard_normal((1, q, d)).astype(fdt),
               "position_ids": np.arange(700, 700 + q, dtype=np.int64)[None]}
        for i, p in enumerate(pasts):
            for kind in ("key", "value"):
                out[f"past_{kind}_{i}"] = rng.standard_normal((1, hkv, p, hd)).astype(fdt)
        return out

    decode = GraphJob("decoder", InLLMDecodeGraph(loaded), dspec, decode_feeds(3, [9 + layers - i for i in range(layers)]),
                      [decode_feeds(1, [60 - 7 * (i % 5) for i in range(layers)]), decode_feeds(4, [20] * layers)],
                      var_inputs=2 * layers, llm=lm)
    return [prefill, decode]
