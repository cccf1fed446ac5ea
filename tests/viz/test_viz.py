"""``edgeprune.viz.kept`` and ``edgeprune viz``: geometry against the preprocessing, rendering, CLI and errors.

Geometry tests are numpy-only; the end-to-end ones run the tiny presets (one vision + one-token request per
method) and read the PNG back.
"""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from edgeprune.cli import main
from edgeprune.methods.base import TokenLayout
from edgeprune.models.tiny import NEXT_PINPOINTS
from edgeprune.runtime.anyres import pack_layout
from edgeprune.runtime.preprocess import ImageConfig, preprocess
from edgeprune.viz.kept import (DIM, ZONE, MethodPanel, compose, render_method_panel, save_png, token_boxes,
                                view_maps, zone_segments)

LLAVA = ImageConfig()
NEXT = ImageConfig(grid_pinpoints=NEXT_PINPOINTS)
GAP, PAD = 12, 20  # compose() gap between panels; render_method_panel() width = size + PAD


def _gradient(height: int, width: int) -> Image.Image:
    """R encodes x and G encodes y linearly, so a pixel's colour says where in the original it came from."""
    x = np.linspace(0, 255, width)[None, :].repeat(height, 0)
    y = np.linspace(0, 255, height)[:, None].repeat(width, 1)
    return Image.fromarray(np.stack([x, y, np.full_like(x, 128)], -1).round().astype(np.uint8))


def _next_layout(image_size: tuple[int, int]) -> TokenLayout:
    """The LLaVA-NeXT prunable-token layout, built as ``LlavaNextFamily`` builds it (numpy only)."""
    lay = pack_layout(image_size, NEXT_PINPOINTS, 336, 14)
    p = lay.source >= 0
    return TokenLayout(view=lay.view[p], row=lay.row[p], col=lay.col[p], group=lay.group[p], grid=(24, 24))


@pytest.mark.parametrize("cfg,size", [(LLAVA, (300, 500)), (LLAVA, (500, 300)),
                                      (ImageConfig(do_pad=True), (300, 500)), (NEXT, (480, 640)), (NEXT, (300, 900))])
def test_view_maps_point_where_the_view_pixels_came_from(cfg, size):
    h, w = size
    pixels, _ = preprocess(_gradient(h, w), cfg)
    views = pixels.transpose(0, 2, 3, 1) * np.asarray(cfg.std) + np.asarray(cfg.mean)  # de-normalise to [0, 1]
    maps = view_maps(size, cfg)
    assert len(maps) == len(views)
    ys, xs = np.meshgrid(np.arange(7, 336, 14), np.arange(7, 336, 14), indexing="ij")
    for m, view in zip(maps, views):
        ox, oy = m.sx * (xs + 0.5) + m.ox, m.sy * (ys + 0.5) + m.oy  # pixel centres, original coordinates
        inside = (ox > 2) & (ox < w - 2) & (oy > 2) & (oy < h - 2)  # skip letterbox/pad and edge ringing
        assert inside.sum() > 20
        got_x = view[ys, xs, 0][inside] * (w - 1)
        got_y = view[ys, xs, 1][inside] * (h - 1)
        # One colour level is (size / 255) pixels; allow 2 levels plus half a pixel of centre convention.
        np.testing.assert_allclose(got_x, ox[inside] - 0.5, atol=2 * w / 255 + 0.6)
        np.testing.assert_allclose(got_y, oy[inside] - 0.5, atol=2 * h / 255 + 0.6)


@pytest.mark.parametrize("size", [(480, 640), (300, 1000), (1000, 300), (333, 777), (336, 336), (1200, 700)])
def test_next_high_res_tokens_map_inside_the_image(size):
    h, w = size
    layout = _next_layout(size)
    boxes = token_boxes(layout, size, NEXT)
    hi = boxes[layout.group == 1]
    cx, cy = (hi[:, 0] + hi[:, 2]) / 2, (hi[:, 1] + hi[:, 3]) / 2
    eps = 1e-6
    assert ((cx >= -eps) & (cx <= w + eps) & (cy >= -eps) & (cy <= h + eps)).all()
    # Unpad keeps at most half a token of letterbox at each edge: every token is mostly image.
    ox = np.clip(np.minimum(hi[:, 2], w) - np.maximum(hi[:, 0], 0), 0, None)
    oy = np.clip(np.minimum(hi[:, 3], h) - np.maximum(hi[:, 1], 0), 0, None)
    assert (ox * oy / ((hi[:, 2] - hi[:, 0]) * (hi[:, 3] - hi[:, 1])) >= 0.5 - 1e-9).all()
    base = boxes[layout.group == 0]  # the base view is the whole image squashed
    np.testing.assert_allclose([base[:, 0].min(), base[:, 1].min(), base[:, 2].max(), base[:, 3].max()],
                               [0, 0, w, h])


def test_single_view_boxes_and_zone_segments():
    layout = TokenLayout.single_view(24, 24)
    boxes = token_boxes(layout, (336, 336), LLAVA)
    np.testing.assert_allclose(boxes[25], [14, 14, 28, 28])  # token 25 = row 1, col 1
    # 640x480: shortest edge 480 -> 336, width 448, centre crop starts at 56 resized = 80 original pixels.
    boxes = token_boxes(layout, (480, 640), LLAVA)
    np.testing.assert_allclose(boxes[0], [80, 0, 100, 20])
    segs = zone_segments([0], (336, 336), LLAVA, (24, 24), 4)
    assert sorted(segs) == sorted([(0, y, 336, y) for y in (84, 168, 252)] + [(x, 0, x, 336) for x in (84, 168, 252)])
    assert zone_segments([0], (336, 336), LLAVA, (24, 24), 1) == []


def _solid(tmp_path, colour=(0, 200, 0), side=336):
    path = tmp_path / "solid.png"
    Image.new("RGB", (side, side), colour).save(path)
    return path


def _image_region(panel: np.ndarray) -> tuple[int, int, int, int]:
    """Bounding box (x0, y0, x1, y1) of the green image area of a panel rendered from a solid green image."""
    green = (panel[..., 1].astype(int) > panel[..., 0].astype(int) + 30) & (panel[..., 2] < 80)
    ys, xs = np.nonzero(green)
    return xs.min(), ys.min(), xs.max() + 1, ys.max() + 1


def _uniform_kept(k: int) -> np.ndarray:
    """uniform's selection depends on the layout only, so it is computed without a model."""
    torch = pytest.importorskip("torch")
    from edgeprune.methods.base import VisualTokens
    from edgeprune.methods.registry import build_method

    tokens = VisualTokens(features=torch.zeros(1, 576, 8), cls_attn=torch.zeros(1, 576),
                          layout=TokenLayout.single_view(24, 24))
    return build_method("uniform").select(tokens, k)[0].numpy()


def test_cli_llava_kept_brighter_than_pruned_and_zone_lines(tmp_path, capsys):
    img_path, out, size = _solid(tmp_path), tmp_path / "kept.png", 240
    code = main(["viz", "--model", "tiny-llava", "--method", "uniform,gridprune", "--tokens", "64", "--image",
                 str(img_path), "--prompt", "What is it?", "--size", str(size), "--out", str(out)])
    assert code == 0, capsys.readouterr().err
    pic = np.asarray(Image.open(out).convert("RGB"))
    assert pic.shape[1] == 2 * (size + PAD) + 3 * GAP
    left = pic[:, GAP:GAP + size + PAD]
    right = pic[:, 2 * GAP + size + PAD:2 * GAP + 2 * (size + PAD)]
    x0, y0, x1, y1 = _image_region(left)
    assert (x1 - x0, y1 - y0) == (size, size)
    patch = size / 24
    kept = _uniform_kept(64)
    pruned = np.setdiff1d(np.arange(576), kept)

    def patch_mean(i: int) -> float:
        r, c = divmod(int(i), 24)
        ya, xa = int(y0 + r * patch + 3), int(x0 + c * patch + 3)
        return float(left[ya:ya + int(patch) - 5, xa:xa + int(patch) - 5, 1].mean())

    bright, dim = np.mean([patch_mean(i) for i in kept[:10]]), np.mean([patch_mean(i) for i in pruned[:10]])
    assert bright == pytest.approx(200, abs=3) and dim == pytest.approx(200 * DIM, abs=3)
    # GridPrune draws its 4x4 zones: a yellow vertical line at column 6 (of 24), none in the uniform panel.
    is_zone = np.all(np.abs(right.astype(int) - ZONE) < 40, axis=-1)
    rx0, ry0, _, ry1 = _image_region(right)
    xz = rx0 + round(6 * patch)
    assert is_zone[ry0 + 2:ry1 - 2, xz - 1:xz + 2].any(axis=1).mean() > 0.9
    assert not np.all(np.abs(left[y0:y1, x0:x1].astype(int) - ZONE) < 40, axis=-1).any()
    assert "uniform 64/576" in capsys.readouterr().out


def test_cli_llava_next_two_rows(tmp_path, capsys):
    out, size = tmp_path / "next.png", 160
    code = main(["viz", "--model", "tiny-llava-next", "--method", "cls-topk", "--tokens", "100", "--size",
                 str(size), "--out", str(out)])
    assert code == 0, capsys.readouterr().err
    pic = Image.open(out)
    # one panel; the main view is 160x120 (4:3 example image), the base view below it is 80x80
    assert pic.width == size + PAD + 2 * GAP and pic.height > 120 + 80 + 60
    assert "cls-topk 100/" in capsys.readouterr().out


def test_layer_plot_panel():
    pytest.importorskip("matplotlib")
    image, layout = Image.new("RGB", (336, 336), (0, 200, 0)), TokenLayout.single_view(24, 24)
    plain = render_method_panel(image, layout, LLAVA, MethodPanel("fastv", np.arange(576), 576), size=200)
    plotted = render_method_panel(image, layout, LLAVA,
                                  MethodPanel("fastv", np.arange(576), 576, layer_tokens=[576, 576, 288, 288]),
                                  size=200)
    assert plotted.width == plain.width and plotted.height > plain.height + 100
    below = np.asarray(plotted)[plain.height:]
    assert (np.abs(below.astype(int) - (31, 119, 180)) < 30).all(axis=-1).sum() > 50  # the line is drawn
    assert compose([plain, plotted]).width == 2 * plain.width + 3 * GAP


def test_render_rejects_out_of_range_indices():
    with pytest.raises(ValueError, match="kept indices"):
        render_method_panel(Image.new("RGB", (50, 50)), TokenLayout.single_view(24, 24), LLAVA,
                            MethodPanel("x", np.array([576]), 576))


def test_save_png_is_atomic(tmp_path):
    dest = tmp_path / "a.png"
    dest.write_bytes(b"old")
    save_png(Image.new("RGB", (4, 4)), dest)
    assert Image.open(dest).size == (4, 4) and [p.name for p in tmp_path.iterdir()] == ["a.png"]
    with pytest.raises(OSError):
        save_png(Image.new("RGB", (4, 4)), tmp_path / "missing" / "b.png")


@pytest.mark.parametrize("argv,needle", [
    (["--method", "uniform,nope"], "unknown method 'nope'"),
    (["--method", "uniform,,cls-topk"], "comma-separated"),
    (["--method", "uniform", "--tokens", "600"], "exceeds the 576"),
    (["--method", "uniform", "--image", "MISSING.png"], "not found"),
    (["--method", "uniform", "--out", "{tmp}/k.png/"], "is a directory"),
    (["--method", "uniform", "--out", "{tmp}/k.jpg"], ".png"),
    (["--method", "uniform,gridprune", "--method-arg", "seed=1"], "no method"),
    (["--method", "uniform", "--method-arg", "gridprune.zones=2"], "not in --method"),
    (["--method", "gridprune", "--method-arg", "zones=0"], "zones"),
    (["--method", "uniform", "--size", "10"], "--size"),
])
def test_cli_bad_inputs_exit_2_and_write_nothing(tmp_path, capsys, argv, needle):
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    if "--out" not in argv:
        argv += ["--out", str(tmp_path / "k.png")]
    code = main(["viz", "--model", "tiny-llava", *argv])
    err = capsys.readouterr().err
    assert code == 2 and needle in err and len(err.strip().splitlines()) == 1, err
    assert list(tmp_path.iterdir()) == []
