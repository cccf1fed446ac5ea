"""Torch-free image preprocessing for LLaVA-1.5 and LLaVA-NeXT, bit-exact with the HF "Pil" processors.

The runtime must run on a Jetson with numpy and Pillow only, so this module re-implements what
``LlavaImageProcessorPil``, ``CLIPImageProcessorPil`` and ``LlavaNextImageProcessorPil`` (transformers 5.23,
``PilBackend``) do for one image, step by step and with the same dtypes, so the output is identical:

1. RGB conversion that composites transparency onto white (HF ``convert_to_rgb``, not a plain
   ``Image.convert("RGB")``, which would drop alpha and expose the hidden colour).
2. Optional LLaVA-1.5 pad-to-square with the mean colour truncated to ints (``int(m * 255)``), centred with
   floor offsets, before resizing.
3. Resize with Pillow on uint8 data: shortest edge to ``size`` with the long edge *truncated*
   (``int(size * long / short)``, no rounding), then a centre crop with floor offsets (zero padding when the
   image is smaller than the crop).
4. Rescale in float64 then cast to float32; normalise in float32.

Speed: steps 1-3 stay in Pillow on uint8 images (no numpy round trips), and step 4 is one table look-up per
channel into a preallocated ``[V, 3, crop, crop]`` float32 buffer: every output element depends only on its
uint8 level and channel, so a ``[3, 256]`` table built with HF's exact float64/float32 expressions gives the
same bits while fusing rescale, normalise and the HWC -> CHW transpose (``benchmarks/preprocess_bench.py``
measures it against the previous numpy implementation).

Size limit: images above :data:`MAX_IMAGE_PIXELS` (8192 x 8192, 67 megapixels) are refused with an
:class:`~edgeprune.errors.ImageError` before they are decoded (``Image.open`` reads only the header), and
Pillow's decompression-bomb warning is an error: a 10,000² image used to take 11 s and 1.8 GB to end in a few
336-pixel views.

LLaVA-NeXT (``grid_pinpoints`` set) produces a base view (the whole image squashed to ``size x size``,
ignoring its aspect ratio) followed by the crops of the best canvas: the image is resized to fit that canvas
(ceil on the fitted side), letterboxed with black (zeros, not the mean colour) and cut into ``crop``-sized
tiles in raster order (one reshape of the canvas, no per-view loop, when the tiles are whole crops); each
view then goes through steps 3-4, all views normalised in one pass.

This module imports neither torch nor transformers (tested in a subprocess).
"""

from __future__ import annotations

import functools
import math
import os
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from ..errors import ImageError, ModelLoadError
from .anyres import select_best_resolution

__all__ = ["CLIP_MEAN", "CLIP_STD", "MAX_IMAGE_PIXELS", "ImageConfig", "check_image_size", "default_image",
           "load_image", "preprocess"]

CLIP_MEAN: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)

_MAX_SIDE = 8192
#: Largest image accepted (width x height), checked from the file header before decoding.
MAX_IMAGE_PIXELS = _MAX_SIDE * _MAX_SIDE

# Where the bundled example image lives (added to the package by the lead; checked at call time).
_EXAMPLE_IMAGE = Path(__file__).resolve().parent.parent / "assets" / "example.png"


@dataclass(frozen=True)
class ImageConfig:
    """Preprocessing parameters (recorded in bundle manifests as a dict).

    Attributes:
        size: target of the resize: the shortest edge (or the square side if ``resize_square``).
        crop: centre-crop side; also the side of one LLaVA-NeXT crop (view).
        mean, std: per-channel normalisation, RGB order.
        resample: Pillow resampling filter id (3 = BICUBIC).
        do_pad: LLaVA-1.5 "pad to square with the mean colour" before resizing (single view only).
        grid_pinpoints: LLaVA-NeXT anyres canvases as ``(height, width)``; ``None`` = single view.
        rescale: factor applied to uint8 pixels before normalising.
        resize_square: resize to exactly ``size x size`` (HF ``size={"height": s, "width": s}``) instead of
            matching the shortest edge.
    """

    size: int = 336
    crop: int = 336
    mean: tuple[float, float, float] = CLIP_MEAN
    std: tuple[float, float, float] = CLIP_STD
    resample: int = 3
    do_pad: bool = False
    grid_pinpoints: tuple[tuple[int, int], ...] | None = None
    rescale: float = 1 / 255
    resize_square: bool = False

    def __post_init__(self) -> None:
        # Normalise list inputs (e.g. from JSON) so the frozen config stays hashable and comparable.
        object.__setattr__(self, "mean", tuple(float(x) for x in self.mean))
        object.__setattr__(self, "std", tuple(float(x) for x in self.std))
        if self.grid_pinpoints is not None:
            pins = tuple((int(p[0]), int(p[1])) for p in self.grid_pinpoints)
            object.__setattr__(self, "grid_pinpoints", pins)
        problems = []
        if int(self.size) <= 0 or int(self.crop) <= 0:
            problems.append(f"size and crop must be positive (got size={self.size}, crop={self.crop})")
        if len(self.mean) != 3 or len(self.std) != 3 or any(s == 0 for s in self.std):
            problems.append(f"mean and std need 3 values and std no zero (got {self.mean}, {self.std})")
        if self.grid_pinpoints is not None and (
            not self.grid_pinpoints or any(h <= 0 or w <= 0 for h, w in self.grid_pinpoints)
        ):
            problems.append(f"grid_pinpoints must be positive (height, width) pairs (got {self.grid_pinpoints})")
        if self.do_pad and self.grid_pinpoints is not None:
            problems.append("do_pad (LLaVA-1.5 pad-to-square) cannot be combined with anyres grid_pinpoints")
        if problems:
            raise ValueError("invalid ImageConfig: " + "; ".join(problems))

    @property
    def anyres(self) -> bool:
        """True for LLaVA-NeXT multi-view preprocessing."""
        return self.grid_pinpoints is not None

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready dict (tuples become lists)."""
        d = asdict(self)
        d["mean"], d["std"] = list(self.mean), list(self.std)
        d["grid_pinpoints"] = None if self.grid_pinpoints is None else [list(p) for p in self.grid_pinpoints]
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ImageConfig:
        """Inverse of :meth:`to_dict`.

        Raises:
            ModelLoadError: unknown keys or invalid values (names the offending keys).
        """
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ModelLoadError(
                f"unknown image preprocessing keys {unknown}; known: {sorted(known)}. "
                "The bundle was probably written by a newer edgeprune: upgrade or re-export it."
            )
        try:
            return cls(**dict(d))
        except (TypeError, ValueError) as exc:
            raise ModelLoadError(f"invalid image preprocessing parameters {dict(d)}: {exc}") from exc

    @classmethod
    def from_hf_preprocessor_config(cls, d: Mapping[str, Any]) -> ImageConfig:
        """Build from a Hugging Face ``preprocessor_config.json`` dict (CLIP, LLaVA or LLaVA-NeXT processor).

        Args:
            d: the parsed JSON. Reads ``size`` (``{"shortest_edge": s}``, ``{"height": s, "width": s}`` or
                an int), ``crop_size``, ``image_mean``, ``image_std``, ``resample``, ``rescale_factor``,
                ``do_rescale``, ``do_normalize``, ``do_pad``, ``image_grid_pinpoints``.

        Returns:
            The equivalent :class:`ImageConfig`. ``do_pad`` is honoured only for single-view LLaVA
            processors: in ``LlavaNextImageProcessor`` it means "pad the view count of a batch", which
            does not change one image's views, and CLIP processors have no pad-to-square.

        Raises:
            ModelLoadError: settings this runtime does not reproduce (non-square resize or crop, disabled
                resize or centre crop).
        """
        size, square = _hf_size(d.get("size", {"shortest_edge": 224}))
        crop = _hf_crop(d.get("crop_size", size))
        for flag in ("do_resize", "do_center_crop"):
            if d.get(flag, True) is False:
                raise ModelLoadError(f"preprocessor config sets {flag}=false, which edgeprune does not support")
        pins = d.get("image_grid_pinpoints")
        kind = str(d.get("image_processor_type", ""))
        honour_pad = pins is None and not kind.startswith("CLIP")
        return cls.from_dict(
            {
                "size": size,
                "crop": crop,
                # Disabled steps are identities with these values (uint8 -> float32 is exact either way).
                "mean": d.get("image_mean", CLIP_MEAN) if d.get("do_normalize", True) else (0.0, 0.0, 0.0),
                "std": d.get("image_std", CLIP_STD) if d.get("do_normalize", True) else (1.0, 1.0, 1.0),
                "resample": int(d.get("resample", 3)),
                "do_pad": bool(d.get("do_pad", False)) and honour_pad,
                "grid_pinpoints": pins,
                "rescale": float(d.get("rescale_factor", 1 / 255)) if d.get("do_rescale", True) else 1.0,
                "resize_square": square,
            }
        )


def _hf_size(size: Any) -> tuple[int, bool]:
    """``(side, resize_square)`` from an HF ``size`` entry."""
    if isinstance(size, int):
        return size, False
    if isinstance(size, Mapping):
        if "shortest_edge" in size and "longest_edge" not in size:
            return int(size["shortest_edge"]), False
        if size.get("height") is not None and size.get("height") == size.get("width"):
            return int(size["height"]), True
    raise ModelLoadError(
        f"unsupported preprocessor size {size!r}; "
        "expected {'shortest_edge': s} or a square {'height': s, 'width': s}"
    )


def _hf_crop(crop: Any) -> int:
    """Square crop side from an HF ``crop_size`` entry."""
    if isinstance(crop, int):
        return crop
    if isinstance(crop, Mapping) and crop.get("height") is not None and crop.get("height") == crop.get("width"):
        return int(crop["height"])
    if isinstance(crop, Mapping) and "shortest_edge" in crop:
        return int(crop["shortest_edge"])
    raise ModelLoadError(
        f"unsupported preprocessor crop_size {crop!r}; expected a square {{'height': s, 'width': s}}"
    )


def check_image_size(width: int, height: int, what: str) -> None:
    """Refuse an image above :data:`MAX_IMAGE_PIXELS` (one ``error:`` line, before any pixel is decoded).

    Raises:
        ImageError: ``width * height > MAX_IMAGE_PIXELS``; says the size, the limit and what to do.
    """
    if width * height > MAX_IMAGE_PIXELS:
        raise ImageError(f"{what} is {width}x{height} ({width * height / 1e6:.1f} megapixels), {_LIMIT_ADVICE}")


_LIMIT_ADVICE = (f"above edgeprune's limit of {MAX_IMAGE_PIXELS / 1e6:.1f} megapixels ({_MAX_SIDE}x{_MAX_SIDE}); "
                 "the model sees at most a few 336-pixel views, so downscale it first (e.g. to 4096 pixels on the "
                 "long side)")


def load_image(path: str | os.PathLike[str]) -> Image.Image:
    """Open and fully decode an image file as RGB (transparency composited onto white, as HF does).

    The size is read from the header first (``Image.open`` is lazy) and an image above
    :data:`MAX_IMAGE_PIXELS` is refused before it is decoded; Pillow's decompression-bomb warning is an error.

    Args:
        path: image file path.

    Returns:
        A decoded ``PIL.Image.Image`` in mode ``"RGB"``.

    Raises:
        ImageError: the path is missing or a directory, the data is not a readable image (unknown format,
            corrupt or truncated), the image is above the size limit, or it has zero width or height. The
            message names the path.
    """
    p = Path(path)
    if not p.exists():
        raise ImageError(f"image file not found: {str(p)!r}; check the path (expected a PNG/JPEG file)")
    if p.is_dir():
        raise ImageError(f"image path {str(p)!r} is a directory, expected an image file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(p) as img:
                check_image_size(img.width, img.height, f"image {str(p)!r}")
                img.load()  # Image.open is lazy: force decoding so truncated data fails here, not later.
                rgb = _to_rgb(img, copy=True)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        # Pillow's own check in Image.open (above 89.5 megapixels) fires before ours can.
        raise ImageError(f"image {str(p)!r} is too large: Pillow refuses it as a possible decompression bomb "
                         f"({str(exc).rstrip('.')}), {_LIMIT_ADVICE}") from exc
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        # Pillow reports bad data through all of these (UnidentifiedImageError is an OSError).
        raise ImageError(
            f"cannot read image {str(p)!r}: {exc}. The file is corrupt, truncated or not an image; "
            "re-save it as PNG or JPEG"
        ) from exc
    if rgb.width == 0 or rgb.height == 0:
        raise ImageError(f"image {str(p)!r} is empty (size {rgb.width}x{rgb.height})")
    return rgb


def default_image() -> Image.Image:
    """The bundled example image ``edgeprune/assets/example.png``, loaded as RGB.

    Raises:
        ImageError: the asset is missing from this installation or unreadable.
    """
    if not _EXAMPLE_IMAGE.is_file():
        raise ImageError(
            f"the bundled example image is missing ({_EXAMPLE_IMAGE}); reinstall edgeprune or pass --image"
        )
    return load_image(_EXAMPLE_IMAGE)


def _to_rgb(image: Image.Image, copy: bool = False) -> Image.Image:
    """HF ``convert_to_rgb``: composite any alpha/transparency onto white, then convert to RGB.

    An RGB image without transparency is returned as is unless ``copy`` (nothing here mutates it).
    """
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if image.mode == "RGB" and not copy:
        return image
    return image.convert("RGB")


def _resize_shortest(image: Image.Image, cfg: ImageConfig) -> Image.Image:
    """Resize so the shortest edge is ``cfg.size`` (long edge truncated, as HF/torchvision), in Pillow (uint8).

    Pillow's resize to the same size is a copy (what HF's resize of the same array gives), so it is skipped.
    """
    w, h = image.size
    if cfg.resize_square:
        new_w = new_h = cfg.size
    else:
        short, long = (w, h) if w <= h else (h, w)
        new_long = int(cfg.size * long / short)
        new_w, new_h = (cfg.size, new_long) if w <= h else (new_long, cfg.size)
    if (new_w, new_h) == (w, h):
        return image  # what Pillow's resize would copy
    return image.resize((new_w, new_h), resample=cfg.resample)


def _center_crop(image: Image.Image, side: int) -> Image.Image:
    """HF ``center_crop`` to ``side x side``: floor offsets, zero padding when the image is smaller.

    HF pads a too-small side with ceil offsets and then crops with the shifted floor offsets; both reduce to
    the offset ``(h - side) // 2`` per axis (negative when padding), which is what Pillow's ``crop`` does
    with a box partly outside the image (filled with zeros).
    """
    w, h = image.size
    if w == side and h == side:
        return image
    left, top = (w - side) // 2, (h - side) // 2
    return image.crop((left, top, left + side, top + side))


def _pad_to_square(image: Image.Image, mean: Sequence[float]) -> Image.Image:
    """LLaVA-1.5 pad-to-square: centre the image on a square of the mean colour (truncated to uint8)."""
    w, h = image.size
    if h == w:
        return image
    side = max(h, w)
    out = Image.new("RGB", (side, side), tuple(int(m * 255) for m in mean))
    out.paste(image, (0, (side - h) // 2) if w > h else ((side - w) // 2, 0))
    return out


@functools.lru_cache(maxsize=16)
def _lut(rescale: float, mean: tuple[float, ...], std: tuple[float, ...]) -> np.ndarray:
    """``[3, 256]`` float32: the normalised value of every uint8 level per channel, with HF's precision path.

    HF rescales in float64, casts to float32 and normalises in float32; each output element depends only on
    its uint8 input and channel, so a table of the same expressions over the 256 levels is bit-exact.
    """
    scaled = (np.arange(256, dtype=np.float64) * rescale).astype(np.float32)
    table = (scaled[None, :] - np.asarray(mean, dtype=np.float32)[:, None]) / np.asarray(std, dtype=np.float32)[:, None]
    table = np.ascontiguousarray(table, dtype=np.float32)
    table.setflags(write=False)
    return table


def _normalise(views: np.ndarray, cfg: ImageConfig) -> np.ndarray:
    """``[V, H, W, 3]`` uint8 -> ``[V, 3, H, W]`` float32 in one preallocated buffer (a table look-up per
    channel: rescale, normalise and the HWC -> CHW transpose fused)."""
    lut = _lut(float(cfg.rescale), cfg.mean, cfg.std)
    out = np.empty((views.shape[0], 3, views.shape[1], views.shape[2]), dtype=np.float32)
    for c in range(3):
        np.take(lut[c], views[..., c], out=out[:, c], mode="clip")  # uint8 indices are always in range
    return out


def _view(image: Image.Image, cfg: ImageConfig) -> np.ndarray:
    """Resize + centre-crop one view in Pillow: ``[crop, crop, 3]`` uint8."""
    return np.asarray(_center_crop(_resize_shortest(image, cfg), cfg.crop))


def _anyres_views(image: Image.Image, cfg: ImageConfig) -> np.ndarray:
    """LLaVA-NeXT views ``[V, crop, crop, 3]`` uint8: the squashed base view, then canvas crops in raster order.

    The canvas is cut into tiles with one reshape when they are whole crops that the per-view resize leaves
    unchanged (every LLaVA-NeXT config); other pinpoints (partial tiles) resize each tile in Pillow.
    """
    w, h = image.size
    try:
        target_h, target_w = select_best_resolution((h, w), cfg.grid_pinpoints)
    except ValueError as exc:
        raise ImageError(f"image of size {w}x{h} (WxH) cannot be tiled for anyres: {exc}") from exc
    # Fit inside the canvas keeping the aspect ratio; the fitted side is rounded up, capped at the canvas.
    if target_w / w < target_h / h:
        new_h, new_w = min(math.ceil(h * (target_w / w)), target_h), target_w
    else:
        new_h, new_w = target_h, min(math.ceil(w * (target_h / h)), target_w)
    resized = image.resize((new_w, new_h), resample=cfg.resample)
    pad_x, pad_y = (target_w - new_w) // 2, (target_h - new_h) // 2  # the remainder goes right / bottom
    canvas = resized.crop((-pad_x, -pad_y, target_w - pad_x, target_h - pad_y))  # black letterbox
    c = cfg.crop
    rows, cols = -(-target_h // c), -(-target_w // c)
    views = np.empty((1 + rows * cols, c, c, 3), dtype=np.uint8)
    views[0] = _view(image.resize((cfg.size, cfg.size), resample=cfg.resample), cfg)
    if target_h % c == 0 and target_w % c == 0 and cfg.size == c:
        grid = np.asarray(canvas).reshape(rows, c, cols, c, 3)
        views[1:] = grid.transpose(0, 2, 1, 3, 4).reshape(rows * cols, c, c, 3)
        return views
    for t, (i, j) in enumerate((i, j) for i in range(0, target_h, c) for j in range(0, target_w, c)):
        tile = canvas.crop((j, i, min(j + c, target_w), min(i + c, target_h)))  # edge tiles are partial
        views[1 + t] = _view(tile, cfg)
    return views


def preprocess(image: Image.Image, cfg: ImageConfig) -> tuple[np.ndarray, tuple[int, int]]:
    """Turn one PIL image into the vision encoder's pixel values, exactly as the HF Pil processors.

    Args:
        image: any-mode PIL image (converted to RGB with transparency composited onto white).
        cfg: preprocessing parameters.

    Returns:
        ``(pixel_values, image_size)``: pixel values float32 ``[V, 3, crop, crop]`` (``V = 1`` single view;
        ``V = 1 + number of crops`` for anyres: view 0 is the whole image squashed to ``size x size``, then
        the crops in raster order, as ``LlavaNextImageProcessorPil`` for one image without batch padding),
        and the original ``(height, width)``.

    Raises:
        ImageError: the image has zero width or height, is above :data:`MAX_IMAGE_PIXELS`, or cannot be tiled
            onto any anyres canvas.
    """
    if image.width == 0 or image.height == 0:
        raise ImageError(f"cannot preprocess an empty image (size {image.width}x{image.height})")
    check_image_size(image.width, image.height, "the image")
    rgb = _to_rgb(image)
    image_size = (int(rgb.height), int(rgb.width))
    if cfg.anyres:
        views = _anyres_views(rgb, cfg)
    else:
        views = _view(_pad_to_square(rgb, cfg.mean) if cfg.do_pad else rgb, cfg)[None]
    return _normalise(views, cfg), image_size
