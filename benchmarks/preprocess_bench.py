"""Preprocessing micro-benchmark: ``edgeprune.runtime.preprocess`` against the implementation it replaced.

    python benchmarks/preprocess_bench.py [--repeat 30]

The previous implementation (numpy round trips around every Pillow call, float64 rescale then float32
normalise over the whole view, per-view stacking) is kept here, verbatim apart from names, only so the two can
be measured side by side in one run (interleaved, min and median of ``--repeat`` calls each) and checked
bit-identical on the same inputs; the package does not use it. Inputs: a 336² image (the CLIP/LLaVA view
size, no resize needed), the bundled 640x480 example (a real bicubic resize) for LLaVA-1.5 and CLIP
(shortest-edge + centre crop) and for LLaVA-NeXT anyres (base view + 4 crops). Benchmarks are not tests.
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
from typing import Callable

import numpy as np
from PIL import Image

from edgeprune.runtime.anyres import select_best_resolution
from edgeprune.runtime.preprocess import ImageConfig, _to_rgb, default_image, preprocess

PINPOINTS = ((336, 672), (672, 336), (672, 672), (1008, 336), (336, 1008))


# ---- the previous implementation (edgeprune before the Pillow/look-up-table rewrite), benchmark only ----
def _legacy_resize(pixels: np.ndarray, height: int, width: int, resample: int) -> np.ndarray:
    return np.asarray(Image.fromarray(pixels).resize((width, height), resample=resample))


def _legacy_resize_shortest(pixels: np.ndarray, cfg: ImageConfig) -> np.ndarray:
    h, w = pixels.shape[:2]
    if cfg.resize_square:
        return _legacy_resize(pixels, cfg.size, cfg.size, cfg.resample)
    short, long = (w, h) if w <= h else (h, w)
    new_long = int(cfg.size * long / short)
    new_h, new_w = (new_long, cfg.size) if w <= h else (cfg.size, new_long)
    return _legacy_resize(pixels, new_h, new_w, cfg.resample)


def _legacy_center_crop(pixels: np.ndarray, side: int) -> np.ndarray:
    h, w = pixels.shape[:2]
    top, left = (h - side) // 2, (w - side) // 2
    if top >= 0 and left >= 0:
        return pixels[top : top + side, left : left + side]
    new_h, new_w = max(side, h), max(side, w)
    canvas = np.zeros((new_h, new_w) + pixels.shape[2:], dtype=pixels.dtype)
    top_pad, left_pad = math.ceil((new_h - h) / 2), math.ceil((new_w - w) / 2)
    canvas[top_pad : top_pad + h, left_pad : left_pad + w] = pixels
    top, left = top + top_pad, left + left_pad
    return canvas[max(0, top) : min(new_h, top + side), max(0, left) : min(new_w, left + side)]


def _legacy_finish_view(pixels: np.ndarray, cfg: ImageConfig) -> np.ndarray:
    view = _legacy_center_crop(_legacy_resize_shortest(pixels, cfg), cfg.crop)
    scaled = (view.astype(np.float64) * cfg.rescale).astype(np.float32)
    normed = (scaled - np.asarray(cfg.mean, dtype=np.float32)) / np.asarray(cfg.std, dtype=np.float32)
    return np.ascontiguousarray(normed.transpose(2, 0, 1))


def _legacy_pad_to_square(pixels: np.ndarray, mean) -> np.ndarray:
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


def _legacy_anyres_views(pixels: np.ndarray, cfg: ImageConfig) -> list[np.ndarray]:
    h, w = pixels.shape[:2]
    target_h, target_w = select_best_resolution((h, w), cfg.grid_pinpoints)
    if target_w / w < target_h / h:
        new_h, new_w = min(math.ceil(h * (target_w / w)), target_h), target_w
    else:
        new_h, new_w = target_h, min(math.ceil(w * (target_h / h)), target_w)
    resized = _legacy_resize(pixels, new_h, new_w, cfg.resample)
    pad_y, rem_y = divmod(target_h - new_h, 2)
    pad_x, rem_x = divmod(target_w - new_w, 2)
    canvas = np.pad(resized, ((pad_y, pad_y + rem_y), (pad_x, pad_x + rem_x), (0, 0)))
    tiles = [canvas[i : i + cfg.crop, j : j + cfg.crop]
             for i in range(0, target_h, cfg.crop) for j in range(0, target_w, cfg.crop)]
    base = _legacy_resize(pixels, cfg.size, cfg.size, cfg.resample)
    return [base, *tiles]


def legacy_preprocess(image: Image.Image, cfg: ImageConfig) -> tuple[np.ndarray, tuple[int, int]]:
    """The previous ``preprocess`` (same contract)."""
    pixels = np.asarray(_to_rgb(image, copy=True))
    image_size = (int(pixels.shape[0]), int(pixels.shape[1]))
    if cfg.anyres:
        views = _legacy_anyres_views(pixels, cfg)
    else:
        views = [_legacy_pad_to_square(pixels, cfg.mean) if cfg.do_pad else pixels]
    return np.stack([_legacy_finish_view(v, cfg) for v in views]), image_size


# ---- measurement ----
def _time(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return 1e3 * (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=30, help="timed calls per implementation and case")
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    square = Image.fromarray(rng.integers(0, 256, (336, 336, 3), dtype=np.uint8))
    photo = default_image()
    cases = [("336x336, LLaVA-1.5 / CLIP", square, ImageConfig()),
             ("640x480, LLaVA-1.5 / CLIP", photo, ImageConfig()),
             ("640x480, LLaVA-1.5 pad-to-square", photo, ImageConfig(do_pad=True)),
             ("640x480, LLaVA-NeXT anyres (5 views)", photo, ImageConfig(grid_pinpoints=PINPOINTS))]
    print("| input | previous min (p50) ms | now min (p50) ms | speedup (min) | bit-identical |")
    print("|---|---:|---:|---:|---|")
    for name, image, cfg in cases:
        old, new = legacy_preprocess(image, cfg)[0], preprocess(image, cfg)[0]
        same = old.dtype == new.dtype and old.shape == new.shape and np.array_equal(old, new)
        t_old, t_new = [], []
        for _ in range(args.repeat):  # interleaved: a load spike hits both alike
            t_old.append(_time(lambda: legacy_preprocess(image, cfg)))
            t_new.append(_time(lambda: preprocess(image, cfg)))
        print(f"| {name} | {min(t_old):.2f} ({statistics.median(t_old):.2f}) | {min(t_new):.2f} "
              f"({statistics.median(t_new):.2f}) | {min(t_old) / min(t_new):.1f}x | {'yes' if same else 'NO'} |")


if __name__ == "__main__":
    main()
