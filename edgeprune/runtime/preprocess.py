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

LLaVA-NeXT (``grid_pinpoints`` set) produces a base view (the whole image squashed to ``size x size``,
ignoring its aspect ratio) followed by the crops of the best canvas: the image is resized to fit that canvas
(ceil on the fitted side), letterboxed with black (zeros, not the mean colour) and cut into ``crop``-sized
tiles in raster order; each view then goes through steps 3-4.

This module imports neither torch nor transformers (tested in a subprocess).
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from ..errors import ImageError, ModelLoadError
from .anyres import select_best_resolution

__all__ = ["CLIP_MEAN", "CLIP_STD", "ImageConfig", "default_image", "load_image", "preprocess"]

CLIP_MEAN: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)

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


def load_image(path: str | os.PathLike[str]) -> Image.Image:
    """Open and fully decode an image file as RGB (transparency composited onto white, as HF does).

    Args:
        path: image file path.

    Returns:
        A decoded ``PIL.Image.Image`` in mode ``"RGB"``.

    Raises:
        ImageError: the path is missing or a directory, the data is not a readable image (unknown format,
            corrupt or truncated), or the image has zero width or height. The message names the path.
    """
    p = Path(path)
    if not p.exists():
        raise ImageError(f"image file not found: {str(p)!r}; check the path (expected a PNG/JPEG file)")
    if p.is_dir():
        raise ImageError(f"image path {str(p)!r} is a directory, expected an image file")
    try:
        with Image.open(p) as img:
            img.load()  # Image.open is lazy: force decoding so truncated data fails here, not later.
            rgb = _to_rgb(img)
    except (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError) as exc:
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


def _to_rgb(image: Image.Image) -> Image.Image:
    """HF ``convert_to_rgb``: composite any alpha/transparency onto white, then convert to RGB."""
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def _resize(pixels: np.ndarray, height: int, width: int, resample: int) -> np.ndarray:
    """Pillow resize of an ``[H, W, 3]`` uint8 array to ``[height, width, 3]`` uint8."""
    return np.asarray(Image.fromarray(pixels).resize((width, height), resample=resample))


def _resize_shortest(pixels: np.ndarray, cfg: ImageConfig) -> np.ndarray:
    """Resize ``[H, W, 3]`` so the shortest edge is ``cfg.size`` (long edge truncated, as HF/torchvision)."""
    h, w = pixels.shape[:2]
    if cfg.resize_square:
        return _resize(pixels, cfg.size, cfg.size, cfg.resample)
    short, long = (w, h) if w <= h else (h, w)
    new_long = int(cfg.size * long / short)
    new_h, new_w = (new_long, cfg.size) if w <= h else (cfg.size, new_long)
    return _resize(pixels, new_h, new_w, cfg.resample)


def _center_crop(pixels: np.ndarray, side: int) -> np.ndarray:
    """HF ``center_crop`` of ``[H, W, C]`` to ``[side, side, C]``: floor offsets, zero-pad if too small."""
    h, w = pixels.shape[:2]
    top, left = (h - side) // 2, (w - side) // 2
    if top >= 0 and left >= 0:
        return pixels[top : top + side, left : left + side]
    new_h, new_w = max(side, h), max(side, w)
    canvas = np.zeros((new_h, new_w) + pixels.shape[2:], dtype=pixels.dtype)
    # HF centres the image in the padded canvas with ceil offsets, then crops with the shifted floor offsets.
    top_pad, left_pad = math.ceil((new_h - h) / 2), math.ceil((new_w - w) / 2)
    canvas[top_pad : top_pad + h, left_pad : left_pad + w] = pixels
    top, left = top + top_pad, left + left_pad
    return canvas[max(0, top) : min(new_h, top + side), max(0, left) : min(new_w, left + side)]


def _finish_view(pixels: np.ndarray, cfg: ImageConfig) -> np.ndarray:
    """Resize, crop, rescale, normalise one ``[H, W, 3]`` uint8 view into ``[3, crop, crop]`` float32."""
    view = _center_crop(_resize_shortest(pixels, cfg), cfg.crop)
    # Same precision path as HF: float64 multiply, cast to float32, then float32 normalisation.
    scaled = (view.astype(np.float64) * cfg.rescale).astype(np.float32)
    normed = (scaled - np.asarray(cfg.mean, dtype=np.float32)) / np.asarray(cfg.std, dtype=np.float32)
    return np.ascontiguousarray(normed.transpose(2, 0, 1))


def _pad_to_square(pixels: np.ndarray, mean: Sequence[float]) -> np.ndarray:
    """LLaVA-1.5 pad-to-square: centre ``[H, W, 3]`` on a square of the mean colour (truncated to uint8)."""
    h, w = pixels.shape[:2]
    if h == w:
        return pixels
    side = max(h, w)
    out = np.empty((side, side, 3), dtype=pixels.dtype)
    out[...] = np.asarray([int(m * 255) for m in mean], dtype=pixels.dtype)
    if w > h:
        start = (side - h) // 2
        out[start : start + h] = pixels
    else:
        start = (side - w) // 2
        out[:, start : start + w] = pixels
    return out


def _anyres_views(pixels: np.ndarray, cfg: ImageConfig) -> list[np.ndarray]:
    """LLaVA-NeXT views of ``[H, W, 3]`` uint8: the squashed base view, then canvas crops in raster order."""
    h, w = pixels.shape[:2]
    try:
        target_h, target_w = select_best_resolution((h, w), cfg.grid_pinpoints)
    except ValueError as exc:
        raise ImageError(f"image of size {w}x{h} (WxH) cannot be tiled for anyres: {exc}") from exc
    # Fit inside the canvas keeping the aspect ratio; the fitted side is rounded up, capped at the canvas.
    if target_w / w < target_h / h:
        new_h, new_w = min(math.ceil(h * (target_w / w)), target_h), target_w
    else:
        new_h, new_w = target_h, min(math.ceil(w * (target_h / h)), target_w)
    resized = _resize(pixels, new_h, new_w, cfg.resample)
    pad_y, rem_y = divmod(target_h - new_h, 2)
    pad_x, rem_x = divmod(target_w - new_w, 2)
    canvas = np.pad(resized, ((pad_y, pad_y + rem_y), (pad_x, pad_x + rem_x), (0, 0)))
    tiles = [
        canvas[i : i + cfg.crop, j : j + cfg.crop]
        for i in range(0, target_h, cfg.crop)
        for j in range(0, target_w, cfg.crop)
    ]
    base = _resize(pixels, cfg.size, cfg.size, cfg.resample)
    return [base, *tiles]


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
        ImageError: the image has zero width or height, or cannot be tiled onto any anyres canvas.
    """
    if image.width == 0 or image.height == 0:
        raise ImageError(f"cannot preprocess an empty image (size {image.width}x{image.height})")
    pixels = np.asarray(_to_rgb(image))
    image_size = (int(pixels.shape[0]), int(pixels.shape[1]))
    if cfg.anyres:
        views = _anyres_views(pixels, cfg)
    else:
        views = [_pad_to_square(pixels, cfg.mean) if cfg.do_pad else pixels]
    return np.stack([_finish_view(v, cfg) for v in views]), image_size
