"""LLaVA-NeXT (anyres): base view + high-resolution crops, unpadded, one ``image_newline`` per grid row.

The packing layout is host code shared with the torch-free runtime (``runtime.anyres.pack_layout``); here it
is applied to torch features. Newline tokens are never pruned and are not counted in the budget (CDPruner /
G-Prune convention, METHODS.md decision 5).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from ..methods.base import TokenLayout, VisualTokens
from ..runtime.anyres import pack_layout
from ..runtime.preprocess import ImageConfig
from .family import ModelFamily, VisualSequence


class LlavaNextFamily(ModelFamily):
    """LLaVA-NeXT / v1.6 with ``spatial_unpad`` packing."""

    name = "llava_next"
    model_type = "llava_next"

    def visual_sequence(self, model: Any, pixel_values: torch.Tensor, image_size: tuple[int, int],
                        image_config: ImageConfig, clip: Any = None) -> VisualSequence:
        vc = model.config.vision_config
        pins = [list(p) for p in model.config.image_grid_pinpoints]
        layout = pack_layout(tuple(image_size), pins, vc.image_size, vc.patch_size)
        feats, cls_attn, clip_embeds = self.image_features(model, pixel_values, clip)  # [V, P, *]
        flat = feats.reshape(-1, feats.shape[-1])
        flat_attn = cls_attn.reshape(-1)
        prunable = np.flatnonzero(layout.source >= 0)
        src = torch.from_numpy(layout.source[prunable]).to(flat.device)
        tokens = VisualTokens(
            features=flat[src].unsqueeze(0),
            cls_attn=flat_attn[src].unsqueeze(0),
            clip_embeds=None if clip_embeds is None else clip_embeds.reshape(-1, clip_embeds.shape[-1])[src][None],
            layout=TokenLayout(view=layout.view[prunable], row=layout.row[prunable], col=layout.col[prunable],
                               group=layout.group[prunable], grid=self.patch_grid(model)),
        )
        newline_pos = np.flatnonzero(layout.source < 0).astype(np.int64)
        newline = self.inner(model).image_newline
        extra = newline.to(flat.dtype).unsqueeze(0).expand(len(newline_pos), -1)
        return VisualSequence(tokens=tokens, total=int(layout.total), prunable_pos=prunable.astype(np.int64),
                              extra_rows=extra, extra_pos=newline_pos)

    def hf_image_kwargs(self, pixel_values: torch.Tensor, image_size: tuple[int, int]) -> dict[str, Any]:
        return {"pixel_values": pixel_values.unsqueeze(0), "image_sizes": torch.tensor([list(image_size)])}
