"""Model families: the only code that knows Hugging Face attribute paths (DESIGN.md §4 ``ModelFamily``).

A family turns pixel values into a :class:`VisualSequence` (the visual tokens as the LLM will see them, with
the prunable subset exposed as :class:`~edgeprune.methods.base.VisualTokens`), and gives access to the
embedding table, the decoder stack and the LM head through HF public seams (``vision_tower``,
``multi_modal_projector``, ``language_model``, ``get_input_embeddings()``, ``lm_head``). No monkey-patching.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ..methods.base import TokenLayout, VisualTokens
from ..runtime.anyres import assembly_order
from ..runtime.preprocess import ImageConfig


@dataclass
class VisualSequence:
    """The visual tokens of one image in LLM order, before pruning.

    Attributes:
        tokens: the prunable tokens (``features [1, N, D]``, ``cls_attn [1, N]``, layout).
        total: T, the number of visual tokens the unpruned sequence has (N plus NeXT newline tokens).
        prunable_pos: [N] int64, position of each prunable token within the T visual tokens.
        extra_rows: [T - N, D] tokens that are always kept (NeXT ``image_newline``), or None.
        extra_pos: [T - N] int64 positions of ``extra_rows``.
    """

    tokens: VisualTokens
    total: int
    prunable_pos: np.ndarray
    extra_rows: torch.Tensor | None = None
    extra_pos: np.ndarray | None = None

    @property
    def n(self) -> int:
        """N, the number of prunable visual tokens."""
        return self.tokens.n

    def assemble(self, kept: torch.Tensor) -> tuple[torch.Tensor, np.ndarray]:
        """Rows that enter the LLM after pruning and their positions within the T visual tokens.

        Args:
            kept: [K] int64 ascending indices into the N prunable tokens.
        Returns:
            (rows [K', D], positions [K'] int64 ascending), K' = K + number of always-kept tokens.
        """
        rows = self.tokens.features[0, kept.to(self.tokens.features.device)]
        pos, order = assembly_order(self.prunable_pos, kept.detach().cpu().numpy(), self.extra_pos)
        if order is None:
            return rows, pos
        rows = torch.cat([rows, self.extra_rows.to(rows.dtype)], dim=0)
        return rows[torch.from_numpy(order).to(rows.device)], pos


def clip_features_and_cls_attn(vision_tower: Any, projector: Any, pixel_values: torch.Tensor,
                               feature_layer: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Projected patch features of CLIP layer ``feature_layer`` and the [CLS]->patch attention of that layer.

    The attention row is recomputed from that layer's q/k (softmax(q_cls kᵀ · scale), mean over heads) so the
    vision tower can keep its fused attention (METHODS.md decision 8). The tower runs only up to the feature
    layer (its public submodules in order: embeddings, pre-LayerNorm, encoder layers): LLaVA never reads the
    layers after it, which HF's own ``get_image_features`` still computes (one of 24 layers for CLIP-L, a
    quarter of a 4-layer tiny tower).

    Args:
        vision_tower: a ``CLIPVisionModel``.
        projector: the multimodal projector.
        pixel_values: [V, 3, H, W].
        feature_layer: negative index into the hidden states (LLaVA: -2).
    Returns:
        (features [V, P, D] projected, cls_attn [V, P] float32, hidden [V, P, Dv] the layer's patch states
        before the projector), P = patches per view ([CLS] dropped).
    """
    # transformers 5.x flattened CLIPVisionModel; 4.x nests it under .vision_model
    tower = getattr(vision_tower, "vision_model", vision_tower)
    layers = tower.encoder.layers
    stop = len(layers) + feature_layer + 1 if feature_layer < 0 else feature_layer  # layers to run
    if not 1 <= stop <= len(layers):
        raise ValueError(f"vision_feature_layer {feature_layer} is outside the tower's {len(layers)} layers")
    state = tower.pre_layrnorm(tower.embeddings(pixel_values))
    for layer in layers[: stop - 1]:
        state = _layer_out(layer(state, None))
    layer = layers[stop - 1]  # the feature layer: its input gives the [CLS] attention row
    before = state
    patches = _layer_out(layer(state, None))[:, 1:]
    feats = projector(patches)
    attn = layer.self_attn
    h = layer.layer_norm1(before)
    v, t, _ = h.shape
    q = attn.q_proj(h[:, :1]).view(v, 1, attn.num_heads, attn.head_dim).transpose(1, 2).float()
    k = attn.k_proj(h).view(v, t, attn.num_heads, attn.head_dim).transpose(1, 2).float()
    probs = torch.softmax((q @ k.transpose(-1, -2)) * attn.scale, dim=-1)  # [V, H, 1, T]
    cls_attn = probs.mean(dim=1)[:, 0, 1:]
    return feats, cls_attn, patches


def _layer_out(out: Any) -> torch.Tensor:
    """A CLIP encoder layer returns a tensor (transformers 5.x) or a tuple whose first entry it is (4.x)."""
    return out[0] if isinstance(out, tuple) else out


class ModelFamily:
    """Base adapter; subclasses implement :meth:`visual_sequence` for their packing."""

    name = ""
    model_type = ""

    # --- HF public seams -------------------------------------------------------------------------
    @staticmethod
    def inner(model: Any) -> Any:
        """The ``LlavaModel``/``LlavaNextModel`` inside the ``...ForConditionalGeneration`` wrapper."""
        return model.model

    def language_model(self, model: Any) -> Any:
        """The decoder stack (``LlamaModel``/``MistralModel``) that takes ``inputs_embeds``."""
        return self.inner(model).language_model

    def embed_tokens(self, model: Any) -> Any:
        return model.get_input_embeddings()

    def lm_head(self, model: Any) -> Any:
        return model.lm_head

    def patch_grid(self, model: Any) -> tuple[int, int]:
        vc = model.config.vision_config
        side = vc.image_size // vc.patch_size
        return side, side

    def image_features(self, model: Any, pixel_values: torch.Tensor,
                       clip: Any = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Per-view projected features [V, P, D], [CLS] attention [V, P] and, when ``clip`` (a
        :class:`~edgeprune.models.clip_guidance.ClipGuidance`) is given, CLIP-space patch embeddings [V, P, Dc]."""
        inner = self.inner(model)
        tower = inner.vision_tower
        dtype = next(tower.parameters()).dtype
        feats, cls_attn, hidden = clip_features_and_cls_attn(tower, inner.multi_modal_projector,
                                                             pixel_values.to(dtype), model.config.vision_feature_layer)
        clip_embeds = None if clip is None else clip.patch_embeds(tower.post_layernorm, hidden)
        return feats, cls_attn, clip_embeds

    def visual_sequence(self, model: Any, pixel_values: torch.Tensor, image_size: tuple[int, int],
                        image_config: ImageConfig, clip: Any = None) -> VisualSequence:  # pragma: no cover
        """The image's visual tokens in LLM order (abstract); ``clip`` adds CLIP-space patch embeddings."""
        raise NotImplementedError

    def hf_image_kwargs(self, pixel_values: torch.Tensor, image_size: tuple[int, int]) -> dict[str, Any]:
        """Keyword arguments that feed the same image to the HF model's own forward/generate (for parity tests)."""
        return {"pixel_values": pixel_values}


class LlavaFamily(ModelFamily):
    """LLaVA-1.5: one 336 px view, 576 tokens, no newline tokens."""

    name = "llava"
    model_type = "llava"

    def visual_sequence(self, model: Any, pixel_values: torch.Tensor, image_size: tuple[int, int],
                        image_config: ImageConfig, clip: Any = None) -> VisualSequence:
        feats, cls_attn, clip_embeds = self.image_features(model, pixel_values[:1], clip)
        rows, cols = self.patch_grid(model)
        tokens = VisualTokens(features=feats, cls_attn=cls_attn, layout=TokenLayout.single_view(rows, cols),
                              clip_embeds=clip_embeds)
        n = feats.shape[1]
        return VisualSequence(tokens=tokens, total=n, prunable_pos=np.arange(n, dtype=np.int64))
