"""Host-side method inputs of the ONNX Runtime backend (numpy only): GridPrune's text guidance and the feeds
of the prune graphs (zone and group ids from the LLaVA-NeXT layout).

Guidance (``manifest["guidance"]``):

* ``clip``: the question is tokenised with the bundle's CLIP tokenizer (``clip_tokenizer/``) without special
  tokens, split into chunks of at most ``context - 2`` tokens, each sent as ``[BOS] chunk [EOS]`` through
  ``guidance.onnx`` (which pools [EOS] at the last position, projects and normalises); the unit embeddings
  are averaged and renormalised, as :meth:`~edgeprune.models.clip_guidance.ClipGuidance.text_embed` does.
* ``llm``: the mean of ``embed.onnx`` over the question's tokens (no BOS, no template), in float32, as the
  torch backend does; no extra graph is needed.

Zone ids (GridPrune on LLaVA-NeXT) are ``view*G^2 + (row*G // rows)*G + (col*G // cols)`` of every prunable
token, the numpy twin of :func:`~edgeprune.methods.gridprune_fn.zone_ids`; group ids (G-Prune) are the
layout's 0 (base view) / 1 (high-resolution grid).
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np

from ..errors import BackendError

EPS = 1e-12  # torch.nn.functional.normalize's eps


def l2_normalize(x: np.ndarray) -> np.ndarray:
    """``x / max(||x||, 1e-12)`` over the last axis, float32."""
    x = np.asarray(x, dtype=np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), np.float32(EPS))


def clip_chunks(ids: list[int], context: int, bos: int | None, eos: int) -> list[list[int]]:
    """Split token ids into ``[BOS] piece [EOS]`` chunks that fit the CLIP text context (one chunk if empty).

    Args:
        ids: the question's tokens without special tokens.
        context: the text tower's positions (77 for CLIP).
        bos, eos: special token ids (no BOS when None).
    Returns:
        The chunks, each at most ``context`` long.
    """
    room = context - 1 - (bos is not None)
    pieces = [ids[i:i + room] for i in range(0, len(ids), room)] or [[]]
    return [([bos] if bos is not None else []) + p + [eos] for p in pieces]


class Guidance:
    """Computes GridPrune's guidance vector ``[1, Dg]`` float32 from the question (see module docstring).

    Args:
        section: ``manifest["guidance"]``.
        codec: the bundle's LLM text codec (``llm`` guidance).
        embed: ``ids [1,S] -> embeds [1,S,D]`` (the embed graph).
        clip_codec: a codec over the CLIP tokenizer (``clip`` guidance).
        text_graph: ``ids [1,S] -> text_embeds [1,Dc]`` (the guidance graph).
    Raises:
        BackendError: an unknown guidance source (a bundle from a newer edgeprune).
    """

    def __init__(self, section: dict[str, Any], codec: Any, embed: Callable[[np.ndarray], np.ndarray],
                 clip_codec: Any = None, text_graph: Callable[[np.ndarray], np.ndarray] | None = None) -> None:
        if section.get("source") not in ("clip", "llm"):
            raise BackendError(f"unknown guidance source {section.get('source')!r} in the bundle; re-export it")
        self.section, self.codec, self.embed = section, codec, embed
        self.clip_codec, self.text_graph = clip_codec, text_graph

    @property
    def source(self) -> str:
        return str(self.section["source"])

    def __call__(self, question: str) -> np.ndarray:
        s = self.section
        if self.source == "llm":
            ids = self.codec.encode(question, add_bos=False) or [int(s["empty_token_id"])]
            emb = self.embed(np.asarray([ids], dtype=np.int64))
            return emb.astype(np.float32).mean(axis=1)  # [1, D]
        ids = self.clip_codec.encode(question, add_bos=False)
        chunks = clip_chunks(ids, int(s["context"]), s.get("bos_token_id"), int(s["eos_token_id"]))
        embs = [self.text_graph(np.asarray([c], dtype=np.int64)) for c in chunks]  # each [1, Dc], unit norm
        return l2_normalize(np.stack(embs).mean(axis=0))


def zone_ids(view: np.ndarray, row: np.ndarray, col: np.ndarray, grid: tuple[int, int], zones: int) -> np.ndarray:
    """GridPrune's zone of every token (numpy twin of ``gridprune_fn.zone_ids``): [N] int64."""
    rows, cols = grid
    view, row, col = (np.asarray(a, dtype=np.int64) for a in (view, row, col))
    return view * zones * zones + (row * zones // rows) * zones + (col * zones // cols)


def prune_feeds(spec_inputs: list[str], visual: Any, method: dict[str, Any], grid: tuple[int, int],
                guidance: np.ndarray | None) -> dict[str, np.ndarray]:
    """The prune graph's feeds for one image.

    Args:
        spec_inputs: the prune graph's input names.
        visual: the backend's :class:`~edgeprune.runtime.ort_backend.OrtVisual`.
        method: ``manifest["method"]`` (GridPrune's zones come from its params).
        grid: one view's patch grid.
        guidance: [1, Dg] for GridPrune.
    Raises:
        BackendError: the graph needs guidance or CLIP embeddings that were not computed.
    """
    feeds = {"features": visual.features}
    if "cls_attn" in spec_inputs:
        feeds["cls_attn"] = np.ascontiguousarray(visual.cls_attn, dtype=np.float32)
    if "guidance" in spec_inputs:
        if guidance is None:
            raise BackendError("this bundle's prune graph is text-guided (gridprune): pass the guidance vector")
        feeds["guidance"] = np.ascontiguousarray(guidance, dtype=np.float32).reshape(1, -1)
    if "clip_embeds" in spec_inputs:
        if visual.clip_embeds is None:
            raise BackendError("the prune graph needs CLIP patch embeddings, but the vision graph gave none; "
                               "re-export the bundle")
        feeds["clip_embeds"] = visual.clip_embeds
    if "zone_ids" in spec_inputs:
        lay = visual.layout
        feeds["zone_ids"] = zone_ids(lay["view"], lay["row"], lay["col"], grid, int(method["params"]["zones"]))
    if "group_ids" in spec_inputs:
        feeds["group_ids"] = np.asarray(visual.layout["group"], dtype=np.int64)
    return feeds
