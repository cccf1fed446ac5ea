"""LLaVA-NeXT "anyres" geometry and token packing, in numpy only.

LLaVA-NeXT encodes one image as several views: a base view (the whole image squashed to one view) and the
crops of a high-resolution canvas chosen among ``image_grid_pinpoints``. The language model does not see the
views side by side: ``LlavaNextModel.pack_image_features`` (transformers) lays the crops out as one big patch
grid, removes the rows or columns that only cover the letterbox padding (``unpad_image``) and appends an
``image_newline`` token after every remaining row. The runtime needs that layout without torch, both to
splice features into the prompt and to tell pruning methods where each token sits, so this module
re-derives it from the same arithmetic as transformers 5.23 (checked against the real code in
``tests/runtime/test_anyres.py``).

Conventions: sizes are ``(height, width)`` in pixels; pinpoints are ``(height, width)`` pairs.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

__all__ = ["PackLayout", "grid_shape", "num_views", "pack_layout", "select_best_resolution"]


def _check_size(image_size: Sequence[int]) -> tuple[int, int]:
    """Return ``image_size`` as two positive ints, or raise ``ValueError``."""
    if len(image_size) != 2:
        raise ValueError(f"image_size must be (height, width), got {tuple(image_size)!r}")
    height, width = int(image_size[0]), int(image_size[1])
    if height <= 0 or width <= 0:
        raise ValueError(f"image_size must be positive, got (height={height}, width={width})")
    return height, width


def _check_pinpoints(pinpoints: Sequence[Sequence[int]] | None) -> list[tuple[int, int]]:
    """Return pinpoints as a list of ``(height, width)`` int pairs, or raise ``ValueError``."""
    if not pinpoints:
        raise ValueError("grid pinpoints must be a non-empty list of (height, width) pairs, got none")
    checked = []
    for point in pinpoints:
        if len(point) != 2 or int(point[0]) <= 0 or int(point[1]) <= 0:
            raise ValueError(f"each grid pinpoint must be a positive (height, width) pair, got {point!r}")
        checked.append((int(point[0]), int(point[1])))
    return checked


def select_best_resolution(
    image_size: Sequence[int], pinpoints: Sequence[Sequence[int]]
) -> tuple[int, int]:
    """Pick the anyres canvas for an image, exactly as transformers' ``select_best_resolution``.

    The winner keeps the most original pixels after an aspect-preserving fit (capped at the original pixel
    count, so upscaling earns nothing) and, among ties, wastes the fewest canvas pixels; on a full tie the
    first pinpoint in list order wins.

    Args:
        image_size: ``(height, width)`` of the original image in pixels.
        pinpoints: candidate canvases, ``(height, width)`` pairs.

    Returns:
        The chosen ``(height, width)``.

    Raises:
        ValueError: an empty or malformed pinpoint list, or a non-positive image size.
    """
    orig_h, orig_w = _check_size(image_size)
    best_fit = None
    max_effective, min_wasted = 0, float("inf")
    for height, width in _check_pinpoints(pinpoints):
        # Same float expressions and int() truncation as HF, so ties break identically.
        scale = min(width / orig_w, height / orig_h)
        down_w, down_h = int(orig_w * scale), int(orig_h * scale)
        effective = min(down_w * down_h, orig_w * orig_h)
        wasted = width * height - effective
        if effective > max_effective or (effective == max_effective and wasted < min_wasted):
            max_effective, min_wasted, best_fit = effective, wasted, (height, width)
    if best_fit is None:
        # Only reachable when every candidate fits zero pixels (a tiny canvas for a huge image).
        raise ValueError(f"no grid pinpoint can hold any pixel of an image of size {tuple(image_size)}")
    return best_fit


def grid_shape(image_size: Sequence[int], pinpoints: Sequence[Sequence[int]], view_px: int) -> tuple[int, int]:
    """Crop grid of the high-resolution canvas, as HF ``get_anyres_image_grid_shape``.

    Args:
        image_size: ``(height, width)`` of the original image.
        pinpoints: candidate canvases, ``(height, width)`` pairs.
        view_px: side of one view (crop) in pixels, e.g. 336.

    Returns:
        ``(rows, cols)`` of crops (floor division, as HF).

    Raises:
        ValueError: malformed sizes or pinpoints, or ``view_px <= 0``.
    """
    if view_px <= 0:
        raise ValueError(f"view_px must be positive, got {view_px}")
    height, width = select_best_resolution(image_size, pinpoints)
    return height // view_px, width // view_px


def num_views(image_size: Sequence[int], pinpoints: Sequence[Sequence[int]], view_px: int) -> int:
    """Number of views the processor produces for one image, as HF ``image_size_to_num_patches``.

    Args:
        image_size: ``(height, width)`` of the original image.
        pinpoints: candidate canvases, ``(height, width)`` pairs.
        view_px: side of one view (crop) in pixels.

    Returns:
        ``1 + ceil(H / view_px) * ceil(W / view_px)`` for the chosen canvas ``(H, W)`` (base view + crops).

    Raises:
        ValueError: malformed sizes or pinpoints, or ``view_px <= 0``.
    """
    if view_px <= 0:
        raise ValueError(f"view_px must be positive, got {view_px}")
    height, width = select_best_resolution(image_size, pinpoints)
    # HF counts crops with range(0, H, view_px): a partial last crop still counts, hence ceil.
    return 1 + (-(-height // view_px)) * (-(-width // view_px))


@dataclass(frozen=True, eq=False)
class PackLayout:
    """How LLaVA-NeXT packs per-view features into the LLM sequence for one image.

    Every array has shape ``[T]`` (``T = total``), int64, indexed by packed position ``t``.

    Attributes:
        source: flat index ``v * P + p`` into per-view features ``[V, P]`` (``P`` patches per view), or -1
            where the position holds the ``image_newline`` embedding.
        view: view id (0 base, 1.. crops in raster order), -1 for newline.
        row: row inside its view's patch grid, -1 for newline.
        col: column inside its view's patch grid, -1 for newline.
        group: 0 base view, 1 high-resolution grid, -1 newline.
        grid_rows: rows of the unpadded high-resolution patch grid (= number of newline tokens in the
            multi-view case).
        grid_cols: columns of the unpadded high-resolution patch grid.
    """

    source: np.ndarray
    view: np.ndarray
    row: np.ndarray
    col: np.ndarray
    group: np.ndarray
    grid_rows: int
    grid_cols: int

    @property
    def total(self) -> int:
        """Number of packed positions ``T`` (visual tokens + newlines)."""
        return int(self.source.shape[0])

    @property
    def prunable(self) -> np.ndarray:
        """Positions ``t`` (int64, ascending) that hold a visual feature, i.e. ``source >= 0``."""
        return np.flatnonzero(self.source >= 0).astype(np.int64)


def _unpadded_range(current: tuple[int, int], original: tuple[int, int]) -> tuple[slice, slice]:
    """Row and column slices that HF ``unpad_image`` keeps of a ``current`` grid for an ``original`` image."""
    cur_h, cur_w = current
    orig_h, orig_w = original
    if orig_w / orig_h > cur_w / cur_h:
        # round(..., 7) guards float noise like 335.99999999; the same padding is cut from both ends, so
        # the kept size is new_h + 1 when the difference is odd (HF behaviour, kept on purpose).
        new_h = int(round(orig_h * (cur_w / orig_w), 7))
        pad = (cur_h - new_h) // 2
        return slice(pad, cur_h - pad), slice(0, cur_w)
    new_w = int(round(orig_w * (cur_h / orig_h), 7))
    pad = (cur_w - new_w) // 2
    return slice(0, cur_h), slice(pad, cur_w - pad)


def _layout(parts: list[tuple[np.ndarray, ...]], grid_rows: int, grid_cols: int) -> PackLayout:
    """Concatenate ``(source, view, row, col, group)`` parts into a :class:`PackLayout`."""
    arrays = [np.concatenate([p[i] for p in parts]).astype(np.int64) for i in range(5)]
    return PackLayout(*arrays, grid_rows=grid_rows, grid_cols=grid_cols)


def pack_layout(
    image_size: Sequence[int],
    pinpoints: Sequence[Sequence[int]] | None,
    view_px: int,
    patch_px: int,
) -> PackLayout:
    """Reproduce ``LlavaNextModel.pack_image_features`` for one image as an index map.

    Multi-view (the normal anyres case): the ``P = (view_px // patch_px) ** 2`` base-view tokens first, then
    the crops' patch grids tiled into one ``[rows * n, cols * n]`` grid (``n = view_px // patch_px``),
    cropped by ``unpad_image`` to ``[grid_rows, grid_cols]`` and read row by row with one newline after each
    row. With ``pinpoints=None`` (a single view, HF's ``else`` branch): the base tokens then one newline.

    Args:
        image_size: ``(height, width)`` of the original image in pixels.
        pinpoints: ``(height, width)`` canvases; every one must be a multiple of ``view_px`` (HF's packing
            reshapes the crops into a whole grid). ``None`` for a single-view model.
        view_px: side of one view in pixels (vision ``image_size``, e.g. 336).
        patch_px: vision patch side in pixels (e.g. 14).

    Returns:
        The :class:`PackLayout`; gathering per-view features ``[V * P, D]`` with ``source`` (and the newline
        vector where ``source == -1``) gives HF's packed ``[T, D]``.

    Raises:
        ValueError: non-positive or non-divisible ``view_px``/``patch_px``, malformed sizes, or a pinpoint
            that is not a multiple of ``view_px``.
    """
    if patch_px <= 0 or view_px <= 0 or view_px % patch_px:
        raise ValueError(f"view_px ({view_px}) must be a positive multiple of patch_px ({patch_px})")
    orig = _check_size(image_size)
    n = view_px // patch_px
    per_view = n * n
    p = np.arange(per_view)
    base = (p, np.zeros_like(p), p // n, p % n, np.zeros_like(p))
    newline = tuple(np.full(1, -1) for _ in range(5))
    if pinpoints is None:
        return _layout([base, newline], grid_rows=0, grid_cols=0)

    for point in _check_pinpoints(pinpoints):
        if point[0] % view_px or point[1] % view_px:
            raise ValueError(
                f"grid pinpoint {list(point)} is not a multiple of the view size {view_px}; "
                "LLaVA-NeXT packing needs whole crops"
            )
    rows, cols = grid_shape(orig, pinpoints, view_px)
    keep_r, keep_c = _unpadded_range((rows * n, cols * n), orig)
    grid_r = np.arange(rows * n)[keep_r]
    grid_c = np.arange(cols * n)[keep_c]
    big_r, big_c = np.meshgrid(grid_r, grid_c, indexing="ij")
    view = 1 + (big_r // n) * cols + big_c // n
    src = view * per_view + (big_r % n) * n + big_c % n
    # One extra column of -1 per row is the newline appended after that row.
    pad = np.full((len(grid_r), 1), -1)

    def with_newlines(a: np.ndarray) -> np.ndarray:
        return np.concatenate([a, pad], axis=1).reshape(-1)

    high = (
        with_newlines(src),
        with_newlines(view),
        with_newlines(big_r % n),
        with_newlines(big_c % n),
        with_newlines(np.ones_like(src)),
    )
    return _layout([base, high], grid_rows=len(grid_r), grid_cols=len(grid_c))


def assembly_order(prunable_pos: np.ndarray, kept: np.ndarray,
                   extra_pos: np.ndarray | None) -> tuple[np.ndarray, np.ndarray | None]:
    """Where the kept visual rows and the always-kept rows (NeXT newlines) go in the LLM sequence.

    Shared by the torch and ONNX Runtime backends, which apply the order to their own row arrays.

    Args:
        prunable_pos: [N] position of each prunable token within the T visual tokens.
        kept: [K] int64 ascending indices into the N prunable tokens.
        extra_pos: [E] positions of the always-kept rows, or None.
    Returns:
        (positions [K + E] ascending, order [K + E] to apply to ``concat(kept rows, extra rows)``, or None when
        there are no extra rows and the kept rows are already in order).
    """
    pos = prunable_pos[np.asarray(kept, dtype=np.int64)]
    if extra_pos is None or len(extra_pos) == 0:
        return pos, None
    pos = np.concatenate([pos, extra_pos])
    order = np.argsort(pos, kind="stable")
    return pos[order], order
