"""``nn.Module`` wrappers that cut a Hugging Face LLaVA model into exportable graphs.

Each wrapper takes and returns plain tensors in the order of its :class:`~edgeprune.export.spec.GraphSpec` and
reaches the model only through the family adapter's public seams (``vision_tower``, ``multi_modal_projector``,
``language_model``, ``get_input_embeddings()``, ``lm_head``), so transformers is never patched:

- :class:`VisionGraph`: pixels ``[V,3,S,S]`` -> projected features ``[V,P,D]``, [CLS] attention ``[V,P]`` and,
  for GridPrune with CLIP guidance, CLIP-space patch embeddings ``[V,P,Dc]``.
- :class:`ClipTextGraph`: the CLIP text tower, ``input_ids [B,S]`` -> unit ``text_embeds [B,Dc]`` (guidance).
- :class:`EmbedGraph`: ``input_ids [B,S]`` -> ``inputs_embeds [B,S,D]``.
- :class:`DecoderGraph`: one graph for prefill and decode over flat per-layer past keys/values.
- :class:`PruneGraph`: the simple pre-LLM methods with a static K (``cls-topk``, ``uniform``, ``random``).

This module imports torch; it is used by the exporter only.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..models.family import clip_features_and_cls_attn


class VisionGraph(nn.Module):
    """CLIP vision tower (feature layer, [CLS] dropped) + projector, and the [CLS]->patch attention row.

    Args:
        loaded: a :class:`~edgeprune.models.loader.LoadedModel`.
        clip: a :class:`~edgeprune.models.clip_guidance.ClipGuidance` to also return CLIP-space patch
            embeddings (``post_layernorm`` of the tower + the CLIP checkpoint's ``visual_projection`` on the
            feature-layer states, normalised), or None.
    """

    def __init__(self, loaded: Any, clip: Any = None) -> None:
        super().__init__()
        inner = loaded.family.inner(loaded.model)
        self.tower = inner.vision_tower
        self.projector = inner.multi_modal_projector
        self.feature_layer = int(loaded.config.vision_feature_layer)
        self.visual_projection = None if clip is None else clip.model.visual_projection

    def forward(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """pixel_values [V,3,S,S] -> (features [V,P,D], cls_attn [V,P] float32[, clip_embeds [V,P,Dc] float32])."""
        feats, cls_attn, hidden = clip_features_and_cls_attn(self.tower, self.projector, pixel_values,
                                                             self.feature_layer)
        if self.visual_projection is None:
            return feats, cls_attn
        # ClipGuidance.patch_embeds, inlined: that method runs under inference_mode, which torch.export refuses
        proj = self.visual_projection
        clip = proj(self.tower.post_layernorm(hidden.to(proj.weight.dtype)))
        return feats, cls_attn, torch.nn.functional.normalize(clip.float(), dim=-1)


class ClipTextGraph(nn.Module):
    """The CLIP text tower for GridPrune's guidance: ``input_ids [B,S]`` -> ``text_embeds [B,Dc]`` float32.

    The [EOS] state is pooled at the last position (the runtime builds every chunk as ``[BOS] ... [EOS]``,
    as :meth:`~edgeprune.models.clip_guidance.ClipGuidance.text_embed` does), projected with the checkpoint's
    ``text_projection`` and L2-normalised. Chunking of long questions and the average over chunks are host code.
    """

    def __init__(self, clip: Any) -> None:
        super().__init__()
        self.text = clip.model.text_model
        self.projection = clip.model.text_projection

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        hidden = self.text(input_ids=input_ids).last_hidden_state  # after the final LayerNorm
        return torch.nn.functional.normalize(self.projection(hidden[:, -1]).float(), dim=-1)


class EmbedGraph(nn.Module):
    """The LLM's input embedding table: input_ids [B,S] int64 -> inputs_embeds [B,S,D]."""

    def __init__(self, loaded: Any) -> None:
        super().__init__()
        self.embed = loaded.family.embed_tokens(loaded.model)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.embed(input_ids)


class DecoderGraph(nn.Module):
    """The LLM with a KV cache passed as flat tensors, returning the last token's logits and the new cache.

    ``forward(inputs_embeds [B,S,D], attention_mask [B,T] int64, position_ids [B,S] int64, *past)`` where
    ``past`` is ``key_0, value_0, key_1, value_1, ...`` each ``[B,Hkv,P,hd]`` (P = 0 for prefill) and
    ``T = P + S``. Returns ``(logits [B,V], key_0', value_0', ...)`` with presents ``[B,Hkv,T,hd]``.

    A ``DynamicCache`` is built inside from the flat tensors (``ddp_cache_data``), the documented way to seed
    one, so the exported graph has plain tensor inputs and outputs. Only last-token logits are returned:
    full-prompt logits would double the prefill time of the graph (DESIGN.md §6).
    """

    def __init__(self, loaded: Any) -> None:
        super().__init__()
        self.lm = loaded.family.language_model(loaded.model)
        self.head = loaded.family.lm_head(loaded.model)
        self.num_layers = int(loaded.config.text_config.num_hidden_layers)

    def forward(self, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor,
                *past: torch.Tensor) -> tuple[torch.Tensor, ...]:
        from transformers import DynamicCache

        if len(past) != 2 * self.num_layers:  # a bug in the caller: the spec fixes the count
            raise ValueError(f"expected {2 * self.num_layers} past tensors, got {len(past)}")
        cache = DynamicCache(ddp_cache_data=[(past[2 * i], past[2 * i + 1]) for i in range(self.num_layers)])
        out = self.lm(inputs_embeds=inputs_embeds, attention_mask=attention_mask, position_ids=position_ids,
                      cache=cache, use_cache=True)
        logits = self.head(out.last_hidden_state[:, -1])
        presents: list[torch.Tensor] = []
        for layer in cache.layers:
            presents += [layer.keys, layer.values]
        return (logits, *presents)


def stable_topk_lowering(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Exact lowering of :func:`edgeprune.methods.functional.stable_topk` to standard ONNX ops.

    ONNX ``TopK`` does not specify which of several equal values it returns, so the indices of a plain TopK may
    break ties differently from the reference. Its *values* are well defined, though, so: the K-th largest value
    ``t`` is taken from TopK; every score ``> t`` is kept, and of the scores ``== t`` the first ``K - #(> t)``
    in index order (a CumSum over the equality mask). Exactly K entries are selected, for any float input
    (no epsilon tie-break, so no loss of exactness). A second TopK over the distinct keys ``N - i`` of the
    selected entries (0 elsewhere) returns them in ascending index order; those keys are exact in float32
    for N < 2**24 and never tie among the selected entries.

    Args:
        scores: [B, N] float32 scores (no NaN).
        k: static 1 <= K <= N.
    Returns:
        [B, K] int64 indices, ascending, equal to ``stable_topk(scores, k)``.
    """
    n = scores.shape[-1]
    kth = torch.topk(scores, k, dim=-1, largest=True, sorted=True).values[:, k - 1:k]  # [B, 1]
    above = scores > kth
    equal = scores == kth
    need = k - above.to(torch.int64).sum(dim=-1, keepdim=True)  # >= 1 by definition of the K-th value
    first_equal = torch.cumsum(equal.to(torch.int64), dim=-1) <= need
    take = above | (equal & first_equal)
    key = n - torch.arange(n, device=scores.device, dtype=torch.float32)  # N..1, distinct
    key = torch.where(take, key.unsqueeze(0), torch.zeros_like(scores, dtype=torch.float32))
    return torch.topk(key, k, dim=-1, largest=True, sorted=True).indices


def uniform_indices_lowering(n: torch.SymInt | int, k: int, device: Any = None) -> torch.Tensor:
    """``floor((i + 0.5) * N / K)`` for i < K in exact integer arithmetic: ``((2i + 1) * N) // (2K)``.

    Equal to :func:`edgeprune.methods.functional.uniform_indices` (float64 there): when the true quotient is an
    integer the float64 division is exact, otherwise it is at least 1/(2K) away from the next integer, far more
    than float64 rounding. Works with a symbolic N (LLaVA-NeXT, where N depends on the image).

    Returns:
        [K] int64, ascending.
    """
    i = torch.arange(k, dtype=torch.int64, device=device)
    return torch.div((2 * i + 1) * n, 2 * k, rounding_mode="floor")


class PruneGraph(nn.Module):
    """A pre-LLM pruning method with a static K: kept rows and their indices.

    Args:
        k: the static budget.
        mode: ``topk`` (by ``cls_attn``, stable), ``const`` (data-independent indices for a fixed N, e.g.
            ``uniform``/``random`` on LLaVA-1.5) or ``uniform`` (the 1-D uniform formula for a symbolic N).
        const_idx: [K] int64 indices for ``mode="const"``.

    ``forward(features [B,N,D][, cls_attn [B,N]])`` -> ``(kept [B,K,D], kept_idx [B,K] int32 ascending)``;
    ``cls_attn`` is an input in ``topk`` mode only.
    """

    MODES = ("topk", "const", "uniform")

    def __init__(self, k: int, mode: str, const_idx: torch.Tensor | None = None) -> None:
        super().__init__()
        if mode not in self.MODES or (mode == "const") != (const_idx is not None):
            raise ValueError(f"mode must be one of {self.MODES} (const_idx exactly for 'const'); got {mode!r}")
        self.k, self.mode = int(k), mode
        if const_idx is not None:
            self.register_buffer("const_idx", const_idx.to(torch.int64).reshape(1, -1), persistent=False)

    def forward(self, features: torch.Tensor, cls_attn: torch.Tensor | None = None) -> tuple[torch.Tensor, ...]:
        b = features.shape[0]
        if self.mode == "topk":
            idx = stable_topk_lowering(cls_attn.float(), self.k)
        elif self.mode == "const":
            idx = self.const_idx.expand(b, -1)
        else:
            idx = uniform_indices_lowering(features.shape[1], self.k, features.device).unsqueeze(0).expand(b, -1)
        kept = torch.gather(features, 1, idx.unsqueeze(-1).expand(-1, -1, features.shape[-1]))
        return kept, idx.to(torch.int32)
