"""What a model allows, from its config alone: :class:`~edgeprune.methods.base.ModelLimits` before any weight.

``edgeprune run --tokens 1000`` used to fail after the whole model was built; the preset registry ships every
architecture (the offline builders' configs, ``models/configs/*.json`` for the hub presets), so the patch grid,
the largest visual-token count, the depth and the context length are known in milliseconds. A local directory
is read from its ``config.json``; a hub id that is not a preset is not fetched here (None: checked after load).
"""

from __future__ import annotations

import os
from typing import Any

from .._deps import require
from ..methods.base import ModelLimits
from .registry import PRESETS


def limits_from_config(config: Any) -> ModelLimits:
    """The limits of a ``LlavaConfig`` / ``LlavaNextConfig`` (or an equivalent object with the same fields).

    LLaVA-1.5: N = T = (image_size / patch_size)^2. LLaVA-NeXT: the base view plus the largest unpadded
    high-resolution grid over ``image_grid_pinpoints`` (unpadding only removes rows or columns), and at least the
    base view's positions.
    """
    vc, tc = config.vision_config, config.text_config
    side = int(vc.image_size) // int(vc.patch_size)
    base = side * side
    n_max = base
    pins = getattr(config, "image_grid_pinpoints", None) if config.model_type == "llava_next" else None
    if pins:
        n_max = base + max((int(h) // int(vc.image_size) * side) * (int(w) // int(vc.image_size) * side)
                           for h, w in pins)
    return ModelLimits(grid=(side, side), n_max=n_max, t_min=base, num_layers=int(tc.num_hidden_layers),
                       max_positions=int(tc.max_position_embeddings))


def model_limits(model: str, random_weights: bool = False) -> ModelLimits | None:
    """The limits of ``--model`` without building it: a preset, or a local directory's ``config.json``.

    Returns:
        None when only loading can tell (a hub id, or a directory whose config does not parse; the loader then
        raises the precise error).
    """
    transformers = require("transformers")
    if model in PRESETS:
        preset = PRESETS[model]
        if preset.builder is not None:
            from .tiny import tiny_config

            return limits_from_config(tiny_config(preset.builder))
        cfg = dict(preset.shipped_config() or {})
        cfg.pop("architectures", None)
        return limits_from_config(transformers.AutoConfig.for_model(cfg.pop("model_type"), **cfg))
    if os.path.isfile(os.path.join(model, "config.json")):
        try:
            config = transformers.AutoConfig.from_pretrained(model)
            return limits_from_config(config)
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            return None
    return None
