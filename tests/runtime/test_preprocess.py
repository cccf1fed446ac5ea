"""Tests for edgeprune.runtime.preprocess: bit-exact with the HF Pil image processors, typed load errors.

The HF processors are built from constructor arguments (no hub access). transformers is needed only as the
reference here; the module under test must not import it (checked in a subprocess).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from edgeprune.errors import ImageError, ModelLoadError
from edgeprune.runtime.preprocess import ImageConfig, default_image, load_image, preprocess

llava_pil = pytest.importorskip("transformers.models.llava.image_processing_pil_llava")
clip_pil = pytest.importorskip("transformers.models.clip.image_processing_pil_clip")
next_pil = pytest.importorskip("transformers.models.llava_next.image_processing_pil_llava_next")

REPO = Path(__file__).resolve().parents[2]
PINPOINTS = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]
# (width, height): square, landscape, portrait, extreme strips, a single pixel, a photo-like size.
SIZES = [(336, 336), (500, 300), (300, 700), (50, 1000), (1000, 50), (1, 1), (1200, 900), (1000, 20)]
SQ336 = {"height": 336, "width": 336}


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    """Processors are built from arguments; make any accidental hub access fail fast (restored after)."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def json_dict(processor) -> dict:
    """The processor as its preprocessor_config.json dict."""
    return json.loads(processor.to_json_string())


def _random_image(width: int, height: int, seed: int, mode: str = "RGB") -> Image.Image:
    rng = np.random.default_rng(seed)
    channels = {"RGB": 3, "RGBA": 4}.get(mode, 1)
    data = rng.integers(0, 256, (height, width, channels), dtype=np.uint8)
    return Image.fromarray(data.squeeze(-1) if channels == 1 else data, mode=None).convert(mode)


def _hf(processor, image: Image.Image) -> np.ndarray:
    """HF pixel values for one image, without the batch axis."""
    out = processor(images=[image], return_tensors="np")["pixel_values"]
    return np.asarray(out)[0]


def _check_equal(hf_pixels: np.ndarray, ours: np.ndarray) -> None:
    assert ours.dtype == np.float32
    assert ours.shape == hf_pixels.shape
    assert np.abs(ours - hf_pixels).max() <= 1e-5
    np.testing.assert_array_equal(ours, hf_pixels)  # in practice bit-exact: same ops, same dtypes


@pytest.mark.parametrize("do_pad", [False, True])
@pytest.mark.parametrize("wh", SIZES)
def test_llava15_matches_hf(wh, do_pad):
    image = _random_image(*wh, seed=wh[0] * 7 + wh[1])
    hf = llava_pil.LlavaImageProcessorPil(size={"shortest_edge": 336}, crop_size=SQ336, do_pad=do_pad)
    pixels, size = preprocess(image, ImageConfig(do_pad=do_pad))
    _check_equal(_hf(hf, image)[None], pixels)
    assert size == (wh[1], wh[0])


@pytest.mark.parametrize("wh", [(500, 300), (300, 700), (1, 1), (150, 90)])
def test_clip_matches_hf_including_crop_larger_than_resize(wh):
    image = _random_image(*wh, seed=3)
    hf = clip_pil.CLIPImageProcessorPil(size={"shortest_edge": 336}, crop_size=SQ336)
    _check_equal(_hf(hf, image)[None], preprocess(image, ImageConfig())[0])
    # size < crop exercises HF's zero-padding branch of center_crop.
    hf = clip_pil.CLIPImageProcessorPil(size={"shortest_edge": 200}, crop_size={"height": 224, "width": 224})
    _check_equal(_hf(hf, image)[None], preprocess(image, ImageConfig(size=200, crop=224))[0])


@pytest.mark.parametrize("wh", SIZES + [(337, 673), (2000, 400), (1000, 1)])
def test_llava_next_matches_hf(wh):
    image = _random_image(*wh, seed=wh[0] + 13 * wh[1])
    hf = next_pil.LlavaNextImageProcessorPil(
        size={"shortest_edge": 336}, crop_size=SQ336, image_grid_pinpoints=PINPOINTS
    )
    pixels, size = preprocess(image, ImageConfig(grid_pinpoints=tuple(map(tuple, PINPOINTS))))
    _check_equal(_hf(hf, image), pixels)
    assert size == (wh[1], wh[0])


def test_llava_next_odd_pinpoints_and_square_size():
    """Pinpoints that are not crop multiples (partial tiles) and size given as height/width."""
    image = _random_image(640, 410, seed=5)
    pins = [[336, 336], [500, 700], [700, 500]]
    hf = next_pil.LlavaNextImageProcessorPil(size=SQ336, crop_size=SQ336, image_grid_pinpoints=pins)
    cfg = ImageConfig.from_hf_preprocessor_config(json_dict(hf))
    assert cfg.resize_square and cfg.grid_pinpoints == ((336, 336), (500, 700), (700, 500))
    _check_equal(_hf(hf, image), preprocess(image, cfg)[0])


@pytest.mark.parametrize("mode", ["RGBA", "L", "P", "LA"])
def test_modes_and_transparency_match_hf(mode):
    image = _random_image(123, 77, seed=11, mode="RGBA" if mode in ("RGBA", "LA") else "RGB").convert(mode)
    if mode == "P":
        image.info["transparency"] = 0  # palette transparency must be composited onto white, as in HF
    for hf, cfg in [
        (llava_pil.LlavaImageProcessorPil(size={"shortest_edge": 336}, crop_size=SQ336, do_pad=True),
         ImageConfig(do_pad=True)),
        (next_pil.LlavaNextImageProcessorPil(size={"shortest_edge": 336}, crop_size=SQ336,
                                             image_grid_pinpoints=PINPOINTS),
         ImageConfig(grid_pinpoints=tuple(map(tuple, PINPOINTS)))),
    ]:
        expected = _hf(hf, image)
        _check_equal(expected if cfg.anyres else expected[None], preprocess(image, cfg)[0])


def test_from_hf_preprocessor_config():
    llava = llava_pil.LlavaImageProcessorPil(size={"shortest_edge": 336}, crop_size=SQ336, do_pad=True)
    assert ImageConfig.from_hf_preprocessor_config(json_dict(llava)) == ImageConfig(do_pad=True)
    nxt = next_pil.LlavaNextImageProcessorPil(size={"shortest_edge": 336}, crop_size=SQ336)
    cfg = ImageConfig.from_hf_preprocessor_config(json_dict(nxt))
    # LLaVA-NeXT's do_pad pads the view count of a batch; it must not become pad-to-square.
    assert cfg == ImageConfig(grid_pinpoints=tuple(map(tuple, PINPOINTS))) and not cfg.do_pad
    clip = json_dict(clip_pil.CLIPImageProcessorPil(do_pad=True))
    assert ImageConfig.from_hf_preprocessor_config(clip) == ImageConfig(size=224, crop=224)
    with pytest.raises(ModelLoadError, match="size"):
        ImageConfig.from_hf_preprocessor_config({"size": {"height": 336, "width": 500}})


def test_config_dict_round_trip_and_validation():
    cfg = ImageConfig(grid_pinpoints=((336, 672), (672, 336)), size=224, crop=224)
    d = cfg.to_dict()
    assert d["grid_pinpoints"] == [[336, 672], [672, 336]] and isinstance(d["mean"], list)
    assert ImageConfig.from_dict(d) == cfg
    with pytest.raises(ModelLoadError, match="unknown image preprocessing keys"):
        ImageConfig.from_dict({**d, "bogus": 1})
    with pytest.raises(ValueError, match="do_pad"):
        ImageConfig(do_pad=True, grid_pinpoints=((336, 336),))


def test_load_image_round_trip(tmp_path):
    image = _random_image(40, 30, seed=1, mode="RGBA")
    path = tmp_path / "x.png"
    image.save(path)
    loaded = load_image(path)
    assert loaded.mode == "RGB" and loaded.size == (40, 30)
    hf = llava_pil.LlavaImageProcessorPil(size={"shortest_edge": 336}, crop_size=SQ336)
    # preprocess(load_image(p)) equals HF on the raw file (alpha handled the same way).
    _check_equal(_hf(hf, Image.open(path))[None], preprocess(loaded, ImageConfig())[0])


def test_load_image_errors(tmp_path):
    missing = tmp_path / "nope.png"
    with pytest.raises(ImageError, match="nope.png"):
        load_image(missing)
    with pytest.raises(ImageError, match="directory"):
        load_image(tmp_path)
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(np.random.default_rng(0).integers(0, 256, 2048, dtype=np.uint8).tobytes())
    with pytest.raises(ImageError, match="corrupt.png"):
        load_image(corrupt)
    good = tmp_path / "good.png"
    _random_image(200, 200, seed=2).save(good)
    truncated = tmp_path / "truncated.png"
    data = good.read_bytes()
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageError, match="truncated.png"):
        load_image(truncated)


def test_default_image_missing_or_present():
    asset = REPO / "edgeprune" / "assets" / "example.png"
    if asset.is_file():
        assert default_image().mode == "RGB"
    else:
        with pytest.raises(ImageError, match="example image"):
            default_image()


def test_runtime_modules_import_without_torch_or_transformers():
    code = (
        "import sys; import edgeprune.runtime.preprocess, edgeprune.runtime.anyres; "
        "bad = [m for m in ('torch', 'transformers') if m in sys.modules]; print(bad); sys.exit(1 if bad else 0)"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr


# ---------------------------------------------------------------- more sizes, NeXT views, the size limit
MORE_SIZES = [(337, 336), (336, 337), (335, 500), (672, 672), (448, 336), (1344, 1008), (2, 3), (4000, 30)]


@pytest.mark.parametrize("wh", MORE_SIZES)
def test_llava15_and_clip_more_sizes(wh):
    image = _random_image(*wh, seed=wh[0] * 3 + wh[1])
    for hf, cfg in [
        (llava_pil.LlavaImageProcessorPil(size={"shortest_edge": 336}, crop_size=SQ336, do_pad=True),
         ImageConfig(do_pad=True)),
        (clip_pil.CLIPImageProcessorPil(size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224}),
         ImageConfig(size=224, crop=224)),
        (clip_pil.CLIPImageProcessorPil(size={"height": 336, "width": 336}, crop_size=SQ336),
         ImageConfig(resize_square=True)),
    ]:
        _check_equal(_hf(hf, image)[None], preprocess(image, cfg)[0])


@pytest.mark.parametrize("wh", MORE_SIZES + [(900, 1600), (1008, 336)])
def test_llava_next_views_more_sizes(wh):
    """Whole-crop canvases take the one-reshape tiling path; every view must equal HF's."""
    image = _random_image(*wh, seed=wh[0] + 5 * wh[1])
    hf = next_pil.LlavaNextImageProcessorPil(
        size={"shortest_edge": 336}, crop_size=SQ336, image_grid_pinpoints=PINPOINTS
    )
    pixels, _ = preprocess(image, ImageConfig(grid_pinpoints=tuple(map(tuple, PINPOINTS))))
    expected = _hf(hf, image)
    assert pixels.shape[0] == expected.shape[0] >= 3  # base view + at least two crops
    _check_equal(expected, pixels)


def test_llava_next_per_tile_path_when_size_differs_from_crop():
    """size != crop: every tile is resized on its own (the fallback path), still bit-exact."""
    image = _random_image(700, 500, seed=9)
    pins = [[448, 448], [448, 896], [896, 448]]
    hf = next_pil.LlavaNextImageProcessorPil(size={"shortest_edge": 240}, crop_size={"height": 224, "width": 224},
                                              image_grid_pinpoints=pins)
    cfg = ImageConfig.from_hf_preprocessor_config(json_dict(hf))
    assert cfg.size == 240 and cfg.crop == 224
    _check_equal(_hf(hf, image), preprocess(image, cfg)[0])


def test_preprocess_output_is_fresh_float32_and_input_untouched():
    image = _random_image(336, 336, seed=4)
    before = np.asarray(image).copy()
    a, _ = preprocess(image, ImageConfig())
    b, _ = preprocess(image, ImageConfig())
    assert a.flags.c_contiguous and a.flags.writeable and not np.shares_memory(a, b)
    np.testing.assert_array_equal(np.asarray(image), before)


def _png_header_only(path: Path, width: int, height: int) -> None:
    """A PNG whose header claims ``width x height`` and that has no pixel data (tiny on disk)."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b""))


@pytest.mark.parametrize("side", [8500, 10_000, 40_000])
def test_image_size_limit_refused_before_decoding(tmp_path, side):
    """Above MAX_IMAGE_PIXELS (ours, 8500²) or Pillow's bomb limits (10,000², 40,000²): one clean ImageError,
    read from the header alone (the files hold no pixel data, so decoding would fail differently)."""
    from edgeprune.runtime.preprocess import MAX_IMAGE_PIXELS

    path = tmp_path / f"huge{side}.png"
    _png_header_only(path, side, side)
    assert side * side > MAX_IMAGE_PIXELS
    with pytest.raises(ImageError, match="megapixels") as info:
        load_image(path)
    assert str(path.name) in str(info.value) and "downscale" in str(info.value)
    assert "\n" not in str(info.value)


def test_image_size_limit_in_memory_and_at_the_limit(tmp_path, monkeypatch):
    import edgeprune.runtime.preprocess as P

    monkeypatch.setattr(P, "MAX_IMAGE_PIXELS", 100 * 100)
    with pytest.raises(ImageError, match="megapixels"):
        preprocess(_random_image(101, 100, seed=0), ImageConfig())
    assert preprocess(_random_image(100, 100, seed=0), ImageConfig())[0].shape == (1, 3, 336, 336)
    # A truncated file above the limit fails on the limit, i.e. before its pixels are decoded.
    good = tmp_path / "big.png"
    _random_image(200, 200, seed=2).save(good)
    cut = tmp_path / "big-truncated.png"
    cut.write_bytes(good.read_bytes()[:300])
    with pytest.raises(ImageError, match="megapixels"):
        load_image(cut)


def test_decompression_bomb_warning_is_an_error(tmp_path, monkeypatch):
    """Pillow's DecompressionBombWarning (between its two limits) becomes an ImageError, not a warning."""
    import warnings

    path = tmp_path / "bomb.png"
    _random_image(64, 64, seed=1).save(path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 64 * 64 - 1)  # warn, below 2x: no DecompressionBombError
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the test must not depend on the caller's warning filters
        with pytest.raises(ImageError, match="too large"):
            load_image(path)
