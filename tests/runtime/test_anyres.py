"""Tests for edgeprune.runtime.anyres against transformers' LLaVA-NeXT code (the reference).

``pack_layout`` is checked against the real ``LlavaNextModel.pack_image_features`` of a tiny randomly
initialised model: per-view features encode (view, patch) in their values, so gathering with
``PackLayout.source`` must reproduce HF's packed tensor exactly.
"""

from __future__ import annotations

import numpy as np
import pytest

from edgeprune.runtime.anyres import grid_shape, num_views, pack_layout, select_best_resolution

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
from transformers.image_processing_utils import select_best_resolution as hf_select  # noqa: E402
from transformers.models.llava_next import modeling_llava_next as hf_next  # noqa: E402

PINPOINTS = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]
VIEW_PX, PATCH_PX = 336, 14
N = VIEW_PX // PATCH_PX  # 24 patches per side
P = N * N  # 576 patches per view
# (height, width): square, both orientations, strips whose unpadding removes many (or all) rows, odd sizes.
SIZES = [
    (336, 336), (300, 500), (700, 300), (1000, 50), (50, 1000), (1, 1), (900, 1200),
    (337, 673), (1008, 336), (1, 1000), (1000, 1), (480, 640), (333, 1000), (720, 1280),
]


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    """Everything is built from configs; make any accidental hub access fail fast (restored after)."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def _tiny_model(pinpoints) -> "hf_next.LlavaNextModel":
    """A tiny random LlavaNextModel: CLIP vision 336/14 (hidden 32), llama text (hidden 32), 2 layers each."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaNextConfig

    vision = CLIPVisionConfig(
        image_size=VIEW_PX, patch_size=PATCH_PX, hidden_size=32, intermediate_size=64,
        num_hidden_layers=2, num_attention_heads=2,
    )
    text = LlamaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=2, vocab_size=100,
    )
    config = LlavaNextConfig(vision_config=vision, text_config=text, image_grid_pinpoints=pinpoints)
    torch.manual_seed(0)
    return hf_next.LlavaNextModel(config).eval()


@pytest.fixture(scope="module")
def model():
    return _tiny_model(PINPOINTS)


def _check_against_hf(model, size, pinpoints) -> None:
    views = hf_next.image_size_to_num_patches(list(size), pinpoints, VIEW_PX)
    # features[v, p, :] = v * 1000 + p, in float64 so every value is exact; a 2-wide embedding suffices.
    codes = (np.arange(views)[:, None] * 1000 + np.arange(P)[None, :]).astype(np.float64)
    feats = torch.from_numpy(np.repeat(codes[..., None], 2, axis=-1))
    newline = torch.tensor([-7.0, -7.0], dtype=torch.float64)
    packed, lens = model.pack_image_features(
        [feats], torch.tensor([list(size)]), vision_feature_select_strategy="default", image_newline=newline
    )
    hf_packed = packed[0].numpy()

    layout = pack_layout(size, pinpoints, VIEW_PX, PATCH_PX)
    assert layout.total == int(lens[0]) == hf_packed.shape[0]
    flat = feats.numpy().reshape(views * P, 2)
    ours = np.where((layout.source >= 0)[:, None], flat[np.maximum(layout.source, 0)], newline.numpy())
    np.testing.assert_array_equal(ours, hf_packed)

    # The other index arrays agree with source and with each other.
    hit = layout.source >= 0
    np.testing.assert_array_equal(layout.source[hit], layout.view[hit] * P + layout.row[hit] * N + layout.col[hit])
    assert np.all(layout.view[~hit] == -1) and np.all(layout.group[~hit] == -1)
    assert np.all(layout.row[~hit] == -1) and np.all(layout.col[~hit] == -1)
    np.testing.assert_array_equal(layout.group[hit], (layout.view[hit] > 0).astype(np.int64))
    np.testing.assert_array_equal(layout.prunable, np.flatnonzero(hit))
    assert int((~hit).sum()) == layout.grid_rows
    assert layout.total == P + layout.grid_rows * (layout.grid_cols + 1)
    for arr in (layout.source, layout.view, layout.row, layout.col, layout.group):
        assert arr.dtype == np.int64 and arr.shape == (layout.total,)


@pytest.mark.parametrize("size", SIZES)
def test_pack_layout_matches_hf(model, size):
    _check_against_hf(model, size, PINPOINTS)


@pytest.mark.parametrize("size", [(336, 336), (200, 900), (900, 200)])
def test_pack_layout_single_crop_pinpoint(size):
    """A pinpoint equal to one view: two views (base + one crop), still HF's multi-view branch."""
    pins = [[336, 336], [336, 1008]]
    _check_against_hf(_tiny_model(pins), size, pins)


def test_pack_layout_single_view_branch(model):
    """pinpoints=None mirrors HF's else branch: base tokens then one newline."""
    feats = torch.arange(P, dtype=torch.float64)[None, :, None].repeat(1, 1, 2)
    newline = torch.tensor([-7.0, -7.0], dtype=torch.float64)
    packed, _ = model.pack_image_features([feats], torch.tensor([[336, 336]]), "default", image_newline=newline)
    layout = pack_layout((336, 336), None, VIEW_PX, PATCH_PX)
    assert layout.total == packed[0].shape[0] == P + 1
    np.testing.assert_array_equal(layout.source, np.r_[np.arange(P), -1])


def test_geometry_matches_hf():
    rng = np.random.default_rng(0)
    sizes = [tuple(int(x) for x in rng.integers(1, 3000, 2)) for _ in range(300)] + SIZES
    for size in sizes:
        assert select_best_resolution(size, PINPOINTS) == tuple(hf_select(size, PINPOINTS))
        assert grid_shape(size, PINPOINTS, VIEW_PX) == tuple(
            hf_next.get_anyres_image_grid_shape(list(size), PINPOINTS, VIEW_PX)
        )
        assert num_views(size, PINPOINTS, VIEW_PX) == hf_next.image_size_to_num_patches(
            list(size), PINPOINTS, VIEW_PX
        )
    odd = [[500, 700], [336, 336]]  # non-multiple canvases: HF counts partial crops
    assert num_views((400, 600), odd, VIEW_PX) == hf_next.image_size_to_num_patches([400, 600], odd, VIEW_PX)


def test_invalid_arguments():
    with pytest.raises(ValueError, match="pinpoint"):
        select_best_resolution((10, 10), [])
    with pytest.raises(ValueError, match="positive"):
        select_best_resolution((0, 10), PINPOINTS)
    with pytest.raises(ValueError, match="multiple"):
        pack_layout((10, 10), [[500, 700]], VIEW_PX, PATCH_PX)
    with pytest.raises(ValueError, match="multiple of patch_px"):
        pack_layout((10, 10), PINPOINTS, 336, 15)
