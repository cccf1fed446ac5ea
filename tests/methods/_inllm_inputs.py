"""Shared by the in-LLM method tests: the spliced inputs of one unpruned request, cached per model."""

from __future__ import annotations

import numpy as np
import torch

from edgeprune.methods import build_method
from edgeprune.runtime.pipeline import position_ids
from edgeprune.runtime.preprocess import preprocess
from edgeprune.runtime.prompt import split_prompt
from edgeprune.runtime.torch_backend import TorchBackend

PROMPT = "What does the sign say?"
_CACHE: dict = {}


def unpruned_inputs(loaded, image):
    """(embeds [1,L,D], positions [L], visual_start, T, prunable [T] bool, N) of one unpruned request (cached)."""
    key = id(loaded)
    if key not in _CACHE:
        be = TorchBackend(loaded, build_method("none"))
        pix, size = preprocess(image, loaded.image_config)
        visual = be.encode_image(pix, size)
        before, after = split_prompt(loaded.template, PROMPT)
        prefix, suffix = be.codec.encode(before, add_bos=True), be.codec.encode(after, add_bos=False)
        embeds, kept_pos = be.splice(prefix, visual, np.arange(visual.n), suffix)
        pos = position_ids(len(prefix), visual.total, len(suffix), kept_pos, "original")
        prunable = torch.from_numpy(np.isin(np.arange(visual.total), visual.prunable_pos))
        _CACHE[key] = (embeds.clone(), torch.from_numpy(pos), len(prefix), visual.total, prunable, visual.n)
    return _CACHE[key]


def eager_attentions(loaded, lm, embeds, pos):
    """Per-layer attention probabilities of the unpruned LLM (eager HF, ``output_attentions``): the reference."""
    before = loaded.model.config._attn_implementation
    loaded.model.set_attn_implementation("eager")
    try:
        with torch.no_grad():
            return lm(inputs_embeds=embeds, position_ids=pos.unsqueeze(0), output_attentions=True,
                      attention_mask=torch.ones(embeds.shape[:2], dtype=torch.long)).attentions
    finally:
        loaded.model.set_attn_implementation(before)
