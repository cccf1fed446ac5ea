"""Family adapters against Hugging Face: layer -2 features, the recomputed [CLS] attention row, NeXT packing."""

from __future__ import annotations

import pytest
import torch

from edgeprune.runtime.preprocess import preprocess


def _pixels(loaded, image):
    pix, size = preprocess(image, loaded.image_config)
    return torch.from_numpy(pix), size


@torch.inference_mode()
def test_llava_features_equal_hf(tiny_llava, rgb_image):
    pix, size = _pixels(tiny_llava, rgb_image)
    seq = tiny_llava.family.visual_sequence(tiny_llava.model, pix, size, tiny_llava.image_config)
    hf = tiny_llava.model.get_image_features(pixel_values=pix).pooler_output[0]
    assert seq.n == seq.total == 576
    torch.testing.assert_close(seq.tokens.features[0], hf, rtol=1e-5, atol=1e-5)


@torch.inference_mode()
def test_cls_attention_equals_eager_attention_of_layer_minus_2(tiny_llava, rgb_image):
    """The recomputed row equals output_attentions of CLIP layer -2 (eager), head mean, [CLS] query, patches."""
    pix, size = _pixels(tiny_llava, rgb_image)
    seq = tiny_llava.family.visual_sequence(tiny_llava.model, pix, size, tiny_llava.image_config)
    tower = tiny_llava.model.model.vision_tower
    old = tower.config._attn_implementation
    tower.config._attn_implementation = "eager"
    try:
        out = tower(pix, output_attentions=True, return_dict=True)
    finally:
        tower.config._attn_implementation = old
    expected = out.attentions[-2].mean(dim=1)[:, 0, 1:]
    torch.testing.assert_close(seq.tokens.cls_attn, expected, rtol=1e-5, atol=1e-7)
    assert torch.all(seq.tokens.cls_attn > 0) and seq.tokens.cls_attn.sum() < 1.0  # the [CLS] column is dropped


@pytest.mark.parametrize("size", [(400, 300), (300, 700), (672, 672), (1200, 200)])
@torch.inference_mode()
def test_next_packing_equals_hf(tiny_llava_next, size):
    """Assembling every token (no pruning) reproduces HF's get_image_features packing exactly."""
    import numpy as np
    from PIL import Image

    img = Image.fromarray(np.random.default_rng(1).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))
    lm = tiny_llava_next
    pix, isz = _pixels(lm, img)
    seq = lm.family.visual_sequence(lm.model, pix, isz, lm.image_config)
    rows, pos = seq.assemble(torch.arange(seq.n))
    kw = lm.family.hf_image_kwargs(pix, isz)
    hf = lm.model.get_image_features(**kw).pooler_output[0]
    assert rows.shape == hf.shape and seq.total == hf.shape[0]
    torch.testing.assert_close(rows, hf, rtol=1e-5, atol=1e-5)
    assert (np.diff(pos) == 1).all() and pos[0] == 0
    # the prunable tokens exclude exactly the newline rows, one per row of the unpadded grid
    assert seq.total - seq.n == len(seq.extra_pos) > 0
    assert set(np.unique(seq.tokens.layout.group)) == {0, 1}
    assert (seq.tokens.layout.view[seq.tokens.layout.group == 0] == 0).all()
