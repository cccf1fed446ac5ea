"""Kept-token pictures: which visual tokens a pruning method kept, drawn on the image the model saw.

Two layers, both free of torch:

* **Geometry** (numpy): :func:`view_maps` gives, for every view the preprocessing produced, the affine map
  from that view's pixel coordinates back to the original image (LLaVA-1.5: pad-to-square, shortest-edge
  resize and centre crop; LLaVA-NeXT: the squashed base view, and the crops of the letterboxed anyres canvas).
  :func:`token_boxes` turns a :class:`~edgeprune.methods.base.TokenLayout` into one rectangle per prunable
  token in original-image pixels, and :func:`zone_segments` gives the GridPrune zone boundaries.
  The arithmetic mirrors ``runtime/preprocess.py`` step by step (tested by sampling views against the
  original), so a patch is drawn where its pixels came from.
* **Rendering** (Pillow; matplotlib only for the per-layer plot, imported when one is drawn):
  :func:`render_method_panel` draws one method's panel (kept patches at full brightness, pruned ones dimmed,
  regions the model never saw greyed out, zone lines, the title ``"method: K/N kept"``; for LLaVA-NeXT a
  second row with the base view), :func:`compose` puts panels side by side, :func:`save_png` writes the PNG
  atomically.
"""

from __future__ import annotations

import math
import os
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from ..methods.base import TokenLayout
from ..runtime.anyres import select_best_resolution
from ..runtime.preprocess import ImageConfig

__all__ = ["MethodPanel", "ViewMap", "compose", "render_method_panel", "save_png", "token_boxes", "view_maps",
           "zone_segments"]

# Colours (RGB) and brightness factors shared by panels and legend.
BACKGROUND = (255, 255, 255)
TEXT = (30, 30, 30)
MUTED = (110, 110, 110)
ZONE = (255, 200, 0)
OUTLINE = (255, 255, 255)
DIM = 0.3  # brightness of pruned patches
UNSEEN = 0.12  # brightness of image regions no visual token covers (outside the crop, cut by unpad)


@dataclass(frozen=True)
class ViewMap:
    """Affine map of one view's pixel coordinates to original-image pixels: ``x_img = sx * x + ox`` (same in y).

    Attributes:
        sx, ox, sy, oy: scale and offset per axis (floats, pixels).
    """

    sx: float
    ox: float
    sy: float
    oy: float

    def then(self, sx: float, ox: float, sy: float, oy: float) -> ViewMap:
        """This map followed by ``x -> sx * x + ox`` (and y): maps one preprocessing step further back."""
        return ViewMap(self.sx * sx, self.ox * sx + ox, self.sy * sy, self.oy * sy + oy)


@dataclass(frozen=True)
class MethodPanel:
    """What one method's panel shows.

    Attributes:
        method: method name (the title).
        kept: [K] int indices of the kept tokens among the N prunable tokens.
        n_visual: N, the number of prunable tokens.
        zones: G to draw GridPrune's G x G zone grid per view, or None.
        layer_tokens: visual tokens per decoder layer (in-LLM methods), one int per layer, or None.
    """

    method: str
    kept: np.ndarray
    n_visual: int
    zones: int | None = None
    layer_tokens: Sequence[int] | None = None


def _finish_map(height: int, width: int, cfg: ImageConfig) -> ViewMap:
    """View pixels -> pixels of the ``[height, width]`` input of ``preprocess._finish_view`` (resize, crop)."""
    if cfg.resize_square:
        new_h = new_w = cfg.size
    elif width <= height:  # same truncation of the long edge as preprocess._resize_shortest
        new_h, new_w = int(cfg.size * height / width), cfg.size
    else:
        new_h, new_w = cfg.size, int(cfg.size * width / height)

    def shift(new: int) -> int:
        # preprocess._center_crop: floor offset when the crop fits; otherwise the view starts at zero padding
        # of ceil((crop - new) / 2) pixels, i.e. a negative offset into the resized image.
        top = (new - cfg.crop) // 2
        return top if top >= 0 else -math.ceil((cfg.crop - new) / 2)

    sy, sx = height / new_h, width / new_w
    return ViewMap(sx, shift(new_w) * sx, sy, shift(new_h) * sy)


def _anyres_fit(height: int, width: int, target_h: int, target_w: int) -> tuple[int, int, int, int]:
    """``(new_h, new_w, pad_y, pad_x)`` of the image fitted into the anyres canvas (as ``_anyres_views``)."""
    if target_w / width < target_h / height:
        new_h, new_w = min(math.ceil(height * (target_w / width)), target_h), target_w
    else:
        new_h, new_w = target_h, min(math.ceil(width * (target_h / height)), target_w)
    return new_h, new_w, (target_h - new_h) // 2, (target_w - new_w) // 2


def view_maps(image_size: Sequence[int], cfg: ImageConfig) -> list[ViewMap]:
    """Where every view of an image comes from in the original image.

    Args:
        image_size: ``(height, width)`` of the original image in pixels.
        cfg: the model's preprocessing (``ImageConfig``).
    Returns:
        One :class:`ViewMap` per view in preprocessing order: a single view for LLaVA-1.5; for anyres the
        base view (the whole image squashed) and then the canvas crops in raster order.
    Raises:
        ValueError: a non-positive image size, or an image that cannot be tiled onto any anyres canvas.
    """
    h, w = int(image_size[0]), int(image_size[1])
    if h <= 0 or w <= 0:
        raise ValueError(f"image_size must be positive (height, width); got {tuple(image_size)}")
    if not cfg.anyres:
        side = max(h, w) if cfg.do_pad else None
        ph, pw = (side, side) if side else (h, w)
        view = _finish_map(ph, pw, cfg)
        # Pad-to-square centres the image with floor offsets along its short side only.
        pad_y = (side - h) // 2 if side and w > h else 0
        pad_x = (side - w) // 2 if side and h > w else 0
        return [view.then(1.0, -pad_x, 1.0, -pad_y)]
    base = _finish_map(cfg.size, cfg.size, cfg).then(w / cfg.size, 0.0, h / cfg.size, 0.0)
    target_h, target_w = select_best_resolution((h, w), cfg.grid_pinpoints)
    new_h, new_w, pad_y, pad_x = _anyres_fit(h, w, target_h, target_w)
    sy, sx = h / new_h, w / new_w
    maps = [base]
    for top in range(0, target_h, cfg.crop):
        for left in range(0, target_w, cfg.crop):
            maps.append(ViewMap(sx, (left - pad_x) * sx, sy, (top - pad_y) * sy))
    return maps


def token_boxes(layout: TokenLayout, image_size: Sequence[int], cfg: ImageConfig) -> np.ndarray:
    """The original-image rectangle of every prunable token.

    Args:
        layout: the N tokens' ``view``, ``row``, ``col`` and the per-view patch ``grid``.
        image_size: ``(height, width)`` of the original image.
        cfg: the preprocessing that produced the views (``cfg.crop`` is the view side in pixels).
    Returns:
        [N, 4] float64 ``(x0, y0, x1, y1)`` in original-image pixels. Boxes may reach past the image where a
        view covers padding (LLaVA-NeXT letterbox rows that unpad keeps, a crop larger than the image).
    Raises:
        ValueError: the layout references a view the preprocessing does not produce.
    """
    maps = view_maps(image_size, cfg)
    if layout.n and int(layout.view.max()) >= len(maps):
        raise ValueError(f"layout has view {int(layout.view.max())} but the image has {len(maps)} views")
    table = np.array([[m.sx, m.ox, m.sy, m.oy] for m in maps], dtype=np.float64)[layout.view]
    ph, pw = cfg.crop / layout.grid[0], cfg.crop / layout.grid[1]
    x0 = table[:, 0] * layout.col * pw + table[:, 1]
    y0 = table[:, 2] * layout.row * ph + table[:, 3]
    return np.stack([x0, y0, x0 + table[:, 0] * pw, y0 + table[:, 2] * ph], axis=1)


def zone_segments(views: Sequence[int], image_size: Sequence[int], cfg: ImageConfig, grid: tuple[int, int],
                  zones: int) -> list[tuple[float, float, float, float]]:
    """Interior boundaries of GridPrune's G x G zones of the given views, clipped to the image.

    Zone ``j`` of a ``rows``-row grid starts at row ``ceil(j * rows / G)`` (the rows ``r`` with
    ``r * G // rows == j``, as ``gridprune_fn.zone_ids``); the same holds for columns.

    Args:
        views: view ids whose zones to draw.
        image_size: ``(height, width)`` of the original image.
        cfg: the preprocessing; grid: ``(rows, cols)`` of one view's patch grid; zones: G >= 1.
    Returns:
        Segments ``(x0, y0, x1, y1)`` in original-image pixels (empty for G = 1).
    """
    maps = view_maps(image_size, cfg)
    h, w = float(image_size[0]), float(image_size[1])
    rows, cols = grid
    ph, pw = cfg.crop / rows, cfg.crop / cols
    cuts_y = sorted({math.ceil(j * rows / zones) for j in range(1, zones)} - {0, rows})
    cuts_x = sorted({math.ceil(j * cols / zones) for j in range(1, zones)} - {0, cols})
    out = []
    for v in views:
        m = maps[v]
        x_lo, x_hi = max(m.ox, 0.0), min(m.sx * cfg.crop + m.ox, w)
        y_lo, y_hi = max(m.oy, 0.0), min(m.sy * cfg.crop + m.oy, h)
        for r in cuts_y:
            y = m.sy * r * ph + m.oy
            if 0.0 <= y <= h and x_lo < x_hi:
                out.append((x_lo, y, x_hi, y))
        for c in cuts_x:
            x = m.sx * c * pw + m.ox
            if 0.0 <= x <= w and y_lo < y_hi:
                out.append((x, y_lo, x, y_hi))
    return out


# ----------------------------------------------------------------------------------------------- rendering
def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    """Pillow's bundled scalable font; the fixed-size bitmap font on Pillow < 10.1 (no ``size`` argument)."""
    try:
        return ImageFont.load_default(size=size)
    except TypeError:
        return ImageFont.load_default()


def _shade(image: Image.Image, boxes: np.ndarray, kept: np.ndarray, scale: tuple[float, float]) -> Image.Image:
    """``image`` with kept boxes at full brightness, the other boxes at :data:`DIM`, the rest at :data:`UNSEEN`.

    Args:
        image: the RGB image already resized for the panel.
        boxes: [M, 4] token boxes in original-image pixels; kept: [M] bool.
        scale: ``(sx, sy)`` original pixels -> panel pixels.
    """
    pixels = np.asarray(image, dtype=np.float32)
    factor = np.full(pixels.shape[:2], UNSEEN, dtype=np.float32)
    px = np.rint(boxes * np.array([scale[0], scale[1], scale[0], scale[1]])).astype(np.int64)
    px[:, 0::2] = px[:, 0::2].clip(0, pixels.shape[1])
    px[:, 1::2] = px[:, 1::2].clip(0, pixels.shape[0])
    covered = np.zeros(pixels.shape[:2], dtype=bool)
    # Pruned first, kept last: a kept patch wins the one-pixel overlaps that rounding can create.
    for flag, value in ((False, DIM), (True, 1.0)):
        for x0, y0, x1, y1 in px[kept == flag]:
            factor[y0:y1, x0:x1] = value
            covered[y0:y1, x0:x1] = True
    # Regions no token covers are shown grey as well as dark so they do not read as "pruned".
    pixels[~covered] = pixels[~covered].mean(axis=1, keepdims=True)
    return Image.fromarray(np.clip(pixels * factor[..., None], 0, 255).astype(np.uint8))


def _draw_lines(img: Image.Image, segments: Sequence[tuple[float, float, float, float]],
                scale: tuple[float, float], colour: tuple[int, int, int], width: int) -> None:
    """Draw original-image segments on a panel image scaled by ``scale = (sx, sy)``."""
    draw = ImageDraw.Draw(img)
    sx, sy = scale
    for x0, y0, x1, y1 in segments:
        draw.line([(x0 * sx, y0 * sy), (x1 * sx, y1 * sy)], fill=colour, width=width)


def _view_outlines(views: Sequence[int], image_size: Sequence[int], cfg: ImageConfig) -> list[tuple]:
    """The edges of each view's square inside the image, in original-image pixels (clipped to the image)."""
    maps = view_maps(image_size, cfg)
    h, w = float(image_size[0]), float(image_size[1])
    out = []
    for v in views:
        m = maps[v]
        x0, x1 = max(m.ox, 0.0), min(m.sx * cfg.crop + m.ox, w)
        y0, y1 = max(m.oy, 0.0), min(m.sy * cfg.crop + m.oy, h)
        edges = [(x0, y0, x1, y0), (x0, y1, x1, y1), (x0, y0, x0, y1), (x1, y0, x1, y1)]
        # Edges on the image border carry no information (the picture ends there anyway).
        out += [e for e in edges if not (e[0] == e[2] in (0.0, w) or e[1] == e[3] in (0.0, h))]
    return out


def _image_view(image: Image.Image, layout: TokenLayout, cfg: ImageConfig, panel: MethodPanel, boxes: np.ndarray,
                group: int, size: tuple[int, int]) -> Image.Image:
    """Shade and annotate the tokens of one group (0 base / single view, 1 NeXT high-res) at panel ``size``."""
    sel = layout.group == group
    kept = np.zeros(layout.n, dtype=bool)
    kept[np.asarray(panel.kept, dtype=np.int64)] = True
    scale = (size[0] / image.width, size[1] / image.height)
    img = _shade(image.resize(size, Image.Resampling.LANCZOS), boxes[sel], kept[sel], scale)
    views = sorted(set(layout.view[sel].tolist()))
    image_hw = (image.height, image.width)
    if group == 1 or not cfg.anyres:
        # Outline the crops (NeXT) or the centre crop (LLaVA-1.5): where the encoder actually looked.
        _draw_lines(img, _view_outlines(views, image_hw, cfg), scale, OUTLINE, 1)
    if panel.zones and panel.zones > 1:
        _draw_lines(img, zone_segments(views, image_hw, cfg, layout.grid, panel.zones), scale, ZONE, 2)
    return img


def _layer_plot(counts: Sequence[int], width: int, height: int = 150) -> Image.Image:
    """A small line plot of visual tokens per decoder layer, rendered off-screen with matplotlib's Agg."""
    from .._deps import require

    require("matplotlib")
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    # A bare Figure (no pyplot) keeps no global state and needs no display.
    fig = Figure(figsize=(width / 100, height / 100), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.plot(range(len(counts)), list(counts), marker="o", markersize=3, linewidth=1.5, color="#1f77b4")
    ax.set_xlabel("decoder layer", fontsize=8)
    ax.set_ylabel("visual tokens", fontsize=8)
    ax.set_ylim(0, max(max(counts), 1) * 1.08)
    ax.tick_params(labelsize=7)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # layers are whole numbers
    ax.grid(alpha=0.3)
    fig.tight_layout(pad=0.4)
    fig.canvas.draw()
    return Image.fromarray(np.asarray(fig.canvas.buffer_rgba())[..., :3].copy())


def _fit(width: int, height: int, box: int) -> tuple[int, int]:
    """``(w, h)`` scaled so the longer side is ``box`` pixels."""
    s = box / max(width, height)
    return max(1, round(width * s)), max(1, round(height * s))


def _stack(parts: Sequence[Image.Image | tuple[str, int, tuple[int, int, int]]], width: int, gap: int = 6) -> Image.Image:
    """Stack images and ``(text, font size, colour)`` lines vertically, centred, on a white column."""
    rendered = []
    for part in parts:
        if isinstance(part, Image.Image):
            rendered.append(part)
            continue
        text, size, colour = part
        probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
        font = _font(size)
        x0, _, x1, _ = probe.textbbox((0, 0), text, font=font)
        while x1 - x0 > width - 4 and size > 8:  # shrink a line that does not fit a narrow (small) panel
            size -= 1
            font = _font(size)
            x0, _, x1, _ = probe.textbbox((0, 0), text, font=font)
        # Line height from a fixed probe string, so panels with and without a subtitle line up.
        line = Image.new("RGB", (width, probe.textbbox((0, 0), "Ag", font=font)[3] + 4), BACKGROUND)
        ImageDraw.Draw(line).text(((width - (x1 - x0)) / 2 - x0, 2), text, fill=colour, font=font)
        rendered.append(line)
    out = Image.new("RGB", (width, sum(p.height for p in rendered) + gap * (len(rendered) - 1)), BACKGROUND)
    y = 0
    for p in rendered:
        out.paste(p, ((width - p.width) // 2, y))
        y += p.height + gap
    return out


def render_method_panel(image: Image.Image, layout: TokenLayout, cfg: ImageConfig, panel: MethodPanel,
                        size: int = 400) -> Image.Image:
    """One method's panel: title, the image with kept/pruned patches, NeXT base view, per-layer plot.

    Args:
        image: the original RGB image the request used.
        layout: the N prunable tokens' layout (``VisualSequence.tokens.layout``).
        cfg: the model's preprocessing config.
        panel: the method's result (kept indices ``[K]``, N, optional zones and per-layer counts).
        size: longer side of the main image in pixels (the panel is ``size + 20`` wide).
    Returns:
        An RGB ``PIL.Image``.
    Raises:
        ValueError: kept indices outside ``[0, N)``, or a layout that does not match the image's views.
    """
    kept = np.asarray(panel.kept, dtype=np.int64)
    if kept.size and (kept.min() < 0 or kept.max() >= layout.n):
        raise ValueError(f"kept indices must lie in [0, {layout.n}); got range [{kept.min()}, {kept.max()}]")
    boxes = token_boxes(layout, (image.height, image.width), cfg)
    width = size + 20
    parts: list = [(f"{panel.method}: {kept.size}/{panel.n_visual} kept", 20, TEXT)]
    extra = [f"{panel.zones}x{panel.zones} zones per view"] if panel.zones else []
    if cfg.anyres:
        in_group = np.bincount(layout.group[kept], minlength=2)
        group_n = np.bincount(layout.group, minlength=2)
        extra.insert(0, f"high-res {in_group[1]}/{group_n[1]} · base {in_group[0]}/{group_n[0]}")
    parts.append((" · ".join(extra) if extra else " ", 13, MUTED))
    main_group = 1 if cfg.anyres else 0
    parts.append(_image_view(image, layout, cfg, panel, boxes, main_group, _fit(image.width, image.height, size)))
    if cfg.anyres:
        side = size // 2  # the base view is a square: the whole image squashed, as the encoder saw it
        parts.append(("base view (whole image squashed)", 13, MUTED))
        parts.append(_image_view(image, layout, cfg, panel, boxes, 0, (side, side)))
    if panel.layer_tokens:
        parts.append(_layer_plot(panel.layer_tokens, size))
    return _stack(parts, width)


def _legend_item(swatch: tuple[int, ...] | str, label: str, font: ImageFont.ImageFont) -> Image.Image:
    """One legend entry: a 16 px swatch (a filled square, or a line for ``"edge"``/``"zone"``) and its label."""
    width = 22 + int(ImageDraw.Draw(Image.new("RGB", (1, 1))).textlength(label, font=font)) + 18
    item = Image.new("RGB", (width, 24), BACKGROUND)
    draw = ImageDraw.Draw(item)
    if isinstance(swatch, str):
        # Lines are drawn on a dark patch, as they appear on the dimmed image (white would vanish here).
        draw.rectangle([0, 5, 16, 19], fill=(60, 60, 60))
        draw.line([(0, 12), (16, 12)], fill=ZONE if swatch == "zone" else OUTLINE, width=2)
    else:
        draw.rectangle([0, 5, 16, 19], fill=swatch, outline=(90, 90, 90))
    draw.text((22, 4), label, fill=TEXT, font=font)
    return item


def _legend(width: int, zones: bool) -> Image.Image:
    """The legend (kept, pruned, unseen, view edge, zone line when drawn), wrapped to ``width`` pixels."""
    font = _font(13)
    sample = np.array([90, 150, 230])  # a mid sky-blue, shaded the way the panels shade patches
    grey = int(sample.mean() * UNSEEN)
    entries = [(tuple(int(v) for v in sample), "kept"), (tuple(int(v * DIM) for v in sample), "pruned"),
               ((grey, grey, grey), "not seen by the encoder"), ("edge", "view / crop edge")]
    if zones:
        entries.append(("zone", "GridPrune zone boundary"))
    rows: list[list[Image.Image]] = [[]]
    for item in (_legend_item(swatch, label, font) for swatch, label in entries):
        if rows[-1] and sum(i.width for i in rows[-1]) + item.width > width:
            rows.append([])  # wrap: narrow pictures (one small panel) still show the whole legend
        rows[-1].append(item)
    out = Image.new("RGB", (max(sum(i.width for i in r) for r in rows), 24 * len(rows)), BACKGROUND)
    for y, row in enumerate(rows):
        x = 0
        for item in row:
            out.paste(item, (x, 24 * y))
            x += item.width
    return out  # as wide as its longest row, so compose() centres it


def compose(panels: Sequence[Image.Image], caption: str | None = None, legend_zones: bool = False,
            gap: int = 12) -> Image.Image:
    """Put method panels side by side (top-aligned) with an optional caption above and a legend below.

    Args:
        panels: RGB panels from :func:`render_method_panel`, left to right.
        caption: one line above the panels (e.g. model and prompt), or None.
        legend_zones: include the zone-line entry in the legend.
        gap: pixels between panels and around the edge.
    Returns:
        RGB image of width ``sum(panel widths) + gap * (len(panels) + 1)``.
    Raises:
        ValueError: no panels.
    """
    if not panels:
        raise ValueError("compose needs at least one panel")
    width = sum(p.width for p in panels) + gap * (len(panels) + 1)
    row = Image.new("RGB", (width, max(p.height for p in panels)), BACKGROUND)
    x = gap
    for p in panels:
        row.paste(p, (x, 0))
        x += p.width + gap
    parts: list = [(caption, 15, TEXT)] if caption else []
    parts += [row, _legend(width, legend_zones)]
    framed = _stack(parts, width, gap=8)
    out = Image.new("RGB", (width, framed.height + 2 * gap), BACKGROUND)
    out.paste(framed, (0, gap))
    return out


def save_png(image: Image.Image, path: str | os.PathLike[str]) -> Path:
    """Write ``image`` as PNG atomically: a temporary file in the same directory, then ``os.replace``.

    A crash or a full disk never leaves a half-written picture at ``path``.

    Args:
        image: the picture; path: destination (its directory must exist).
    Returns:
        The destination path.
    Raises:
        OSError: the directory is missing or not writable (the temporary file is removed).
    """
    dest = Path(path)
    # Not tempfile.mkstemp: its 0600 mode would survive the rename; "x" mode honours the umask and never
    # clobbers another writer's temporary file.
    tmp = dest.parent / f".{dest.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp"
    try:
        with open(tmp, "xb") as f:
            image.save(f, format="PNG", optimize=True)
        os.replace(tmp, dest)
    except BaseException:
        # Clean up on any failure (including KeyboardInterrupt), then let the error propagate unchanged.
        tmp.unlink(missing_ok=True)
        raise
    return dest
