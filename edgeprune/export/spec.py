"""The spec of every exported graph (DESIGN.md §4 ``GraphSpec``, house rule 6) and its torch-facing helper.

The :class:`~edgeprune.bundle.spec.GraphSpec` data type is part of the bundle format (:mod:`edgeprune.bundle`),
read back by the torch-free runtime; this module builds the specs of the graphs the exporter writes and turns a
spec into ``torch.export`` dynamic shapes.
"""

from __future__ import annotations

from typing import Any, Mapping

from ..bundle.spec import Dim, GraphSpec, TensorSpec


def dynamic_shapes(spec: GraphSpec, var_inputs: int = 0, mins: Mapping[str, int] | None = None,
                   maxs: Mapping[str, int] | None = None) -> tuple[Any, ...]:
    """``dynamic_shapes`` for ``torch.onnx.export(dynamo=True)``: one ``torch.export.Dim`` per symbol of ``spec``.

    Args:
        var_inputs: how many trailing inputs the wrapper takes as ``*args`` (the decoder's flat past
            keys/values); their entries are grouped into one tuple, as ``torch.export`` expects.
        mins: lower bounds of some symbols (e.g. ``{"n": K}``: a top-K graph needs N >= K).
        maxs: upper bounds (e.g. ``{"seq": 77}``: the CLIP text tower's position table).
    Returns:
        A tuple with one ``{axis: Dim}`` dict per positional argument.
    """
    import torch

    mins, maxs = dict(mins or {}), dict(maxs or {})
    dims = {s: torch.export.Dim(s, **({"min": mins[s]} if s in mins else {}),
                                **({"max": maxs[s]} if s in maxs else {})) for s in spec.symbols()}
    per_input = [{i: dims[d] for i, d in enumerate(t.dims) if isinstance(d, str)} for t in spec.inputs]
    if var_inputs:
        return (*per_input[:-var_inputs], tuple(per_input[-var_inputs:]))
    return tuple(per_input)


def vision_spec(image_px: int, patches: int, hidden: int, dtype: str = "float32",
                clip_dim: int | None = None) -> GraphSpec:
    """CLIP + projector over V views: pixels [V,3,S,S] -> features [V,P,D] and [CLS] attention [V,P] (fp32),
    plus CLIP-space patch embeddings [V,P,Dc] (fp32, unit norm) when ``clip_dim`` is given (GridPrune, CLIP)."""
    outputs = [TensorSpec("features", dtype, ("views", patches, hidden)),
               TensorSpec("cls_attn", "float32", ("views", patches))]
    if clip_dim is not None:
        outputs.append(TensorSpec("clip_embeds", "float32", ("views", patches, clip_dim)))
    return GraphSpec("vision", inputs=(TensorSpec("pixel_values", dtype, ("views", 3, image_px, image_px)),),
                     outputs=tuple(outputs))


def guidance_spec(clip_dim: int) -> GraphSpec:
    """The CLIP text tower: input_ids [B,S] int64 (one ``[BOS] ... [EOS]`` chunk per row) -> text_embeds [B,Dc]."""
    return GraphSpec("guidance", inputs=(TensorSpec("input_ids", "int64", ("batch", "seq")),),
                     outputs=(TensorSpec("text_embeds", "float32", ("batch", clip_dim)),))


def embed_spec(hidden: int, dtype: str = "float32") -> GraphSpec:
    """Token embedding: input_ids [B,S] int64 -> inputs_embeds [B,S,D]."""
    return GraphSpec("embed", inputs=(TensorSpec("input_ids", "int64", ("batch", "seq")),),
                     outputs=(TensorSpec("inputs_embeds", dtype, ("batch", "seq", hidden)),))


def decoder_spec(layers: int, kv_heads: int, head_dim: int, hidden: int, vocab: int,
                 dtype: str = "float32") -> GraphSpec:
    """The LLM for prefill and decode: embeds, mask [B,total], positions, flat past -> last logits, flat presents.

    ``total`` (= past + seq) has its own symbol because ``torch.export`` cannot express a sum of symbols for an
    input; the presents have length ``total``.
    """
    kv = [(f"past_{kind}_{i}", "past") for i in range(layers) for kind in ("key", "value")]
    pres = [(f"present_{kind}_{i}", "total") for i in range(layers) for kind in ("key", "value")]
    return GraphSpec(
        "decoder",
        inputs=(TensorSpec("inputs_embeds", dtype, ("batch", "seq", hidden)),
                TensorSpec("attention_mask", "int64", ("batch", "total")),
                TensorSpec("position_ids", "int64", ("batch", "seq")),
                *(TensorSpec(n, dtype, ("batch", kv_heads, length, head_dim)) for n, length in kv)),
        outputs=(TensorSpec("logits", dtype, ("batch", vocab)),
                 *(TensorSpec(n, dtype, ("batch", kv_heads, length, head_dim)) for n, length in pres)),
    )


def prune_spec(n: int | None, k: int, hidden: int, uses_scores: bool, dtype: str = "float32") -> GraphSpec:
    """A pre-LLM pruning graph with static K: features [B,N,D] (+ cls_attn [B,N]) -> kept [B,K,D], kept_idx [B,K].

    Args:
        n: N when it is fixed (LLaVA-1.5: 576), None when it depends on the image (LLaVA-NeXT: symbol ``n``).
        k: the static budget K.
        uses_scores: whether the method reads the [CLS] attention (``cls-topk``).
    """
    n_dim: Dim = "n" if n is None else n
    inputs = [TensorSpec("features", dtype, ("batch", n_dim, hidden))]
    if uses_scores:
        inputs.append(TensorSpec("cls_attn", "float32", ("batch", n_dim)))
    return GraphSpec("prune", inputs=tuple(inputs),
                     outputs=(TensorSpec("kept", dtype, ("batch", k, hidden)),
                              TensorSpec("kept_idx", "int32", ("batch", k))))


def inllm_prefill_spec(layers: int, kv_heads: int, head_dim: int, hidden: int, vocab: int, n: int | None,
                       dtype: str = "float32") -> GraphSpec:
    """In-LLM prefill (FastV/FitPrune, batch 1): embeds, positions, the visual block and its prunable tokens
    -> last logits, per-layer presents of per-layer lengths ``len_l`` and the surviving sequence indices.

    Args:
        n: N prunable visual tokens when fixed (LLaVA-1.5), None for an image-dependent N (symbol ``n``).
    """
    pres = [(f"present_{kind}_{i}", f"len_{i}") for i in range(layers) for kind in ("key", "value")]
    return GraphSpec(
        "prefill",
        inputs=(TensorSpec("inputs_embeds", dtype, (1, "seq", hidden)),
                TensorSpec("position_ids", "int64", (1, "seq")),
                TensorSpec("visual_start", "int64", (1,)),
                TensorSpec("visual_count", "int64", (1,)),
                TensorSpec("prunable_index", "int64", ("n" if n is None else n,))),
        outputs=(TensorSpec("logits", dtype, (1, vocab)),
                 *(TensorSpec(name, dtype, (1, kv_heads, length, head_dim)) for name, length in pres),
                 TensorSpec("kept_positions", "int64", (1, "kept"))),
    )


def inllm_decode_spec(layers: int, kv_heads: int, head_dim: int, hidden: int, vocab: int,
                      dtype: str = "float32") -> GraphSpec:
    """In-LLM decode over a ragged cache (batch 1): every layer has its own past length ``past_l``."""
    kv = [(f"past_{kind}_{i}", f"past_{i}") for i in range(layers) for kind in ("key", "value")]
    pres = [(f"present_{kind}_{i}", f"total_{i}") for i in range(layers) for kind in ("key", "value")]
    return GraphSpec(
        "decoder",
        inputs=(TensorSpec("inputs_embeds", dtype, (1, "seq", hidden)),
                TensorSpec("position_ids", "int64", (1, "seq")),
                *(TensorSpec(name, dtype, (1, kv_heads, length, head_dim)) for name, length in kv)),
        outputs=(TensorSpec("logits", dtype, (1, vocab)),
                 *(TensorSpec(name, dtype, (1, kv_heads, length, head_dim)) for name, length in pres)),
    )
