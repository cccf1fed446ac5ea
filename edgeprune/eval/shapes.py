"""Synthetic "shapes" VQA: coloured shapes on a noisy background, one-word answers (numpy + PIL only).

Every sample is a 336 x 336 RGB image with 1-4 non-overlapping objects (circle / square / triangle x red /
green / blue / yellow, 30-80 px, at most one object per colour x shape pair) on a grey background drawn from
a pre-generated bank of noise images (a fresh ``rng.normal`` per image costs ~24 ms, a bank lookup with a
random flip and roll ~1 ms). Questions, each answered by one word that lives in the patches of one object:

- ``color``: "what color is the circle?" (asked only about a shape present exactly once) -> red/green/blue/yellow
- ``shape``: "what shape is the red object?" (a colour present exactly once) -> circle/square/triangle
- ``exist``: "is there a green triangle?" -> yes/no (half the negatives share a colour or a shape with an object)
- ``position``: "is the blue square on the left or the right?" -> left/right (objects whose centre is at least
  16 px off the vertical midline)

Everything is a pure function of ``(seed, index)``: :func:`make_sample` gives the same image, objects and
questions on every machine, so the held-out split ``shapes:N:seed`` of ``edgeprune eval`` is reproducible.
The training script (``benchmarks/train_shapes.py``) draws its images from seed 0 and evaluation defaults
to seed 1, so held-out images are never trained on.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache

import numpy as np

SIZE = 336
PATCH = 14
GRID = SIZE // PATCH  # 24 x 24 = 576 patches
COLORS = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (50, 80, 225), "yellow": (230, 210, 40)}
SHAPES = ("circle", "square", "triangle")
COLOR_NAMES = tuple(COLORS)
QUESTION_TYPES = ("color", "shape", "exist", "position")
# index of a (colour, shape) class in per-patch labels: 0 = background, 1 + colour * 3 + shape
N_CLASSES = 1 + len(COLORS) * len(SHAPES)
EVAL_SEED = 1
_BANK = 48


@dataclass
class ShapeObject:
    """One object: its colour, shape, centre (x, y) and size (side of its bounding box) in pixels."""

    color: str
    shape: str
    cx: int
    cy: int
    size: int

    @property
    def label(self) -> int:
        """Class index 1..12 (see :data:`N_CLASSES`)."""
        return 1 + COLOR_NAMES.index(self.color) * len(SHAPES) + SHAPES.index(self.shape)


@dataclass
class ShapesSample:
    """A generated image with its objects, an object-id map and its questions.

    Attributes:
        image: [336, 336, 3] uint8 RGB.
        objects: the objects, in drawing order.
        id_map: [336, 336] int8, 1 + index of the object covering each pixel, 0 for background.
        questions: (question, answer, type) triples, one per answerable type in random order.
    """

    image: np.ndarray
    objects: list[ShapeObject]
    id_map: np.ndarray
    questions: list[tuple[str, str, str]] = field(default_factory=list)

    def pil(self):
        """The image as a PIL image."""
        from PIL import Image

        return Image.fromarray(self.image)

    def patch_labels(self, min_cover: float = 0.25) -> np.ndarray:
        """[576] int64 class per patch (row-major): the object covering > ``min_cover`` of it, else 0."""
        cover = np.zeros((len(self.objects) + 1, GRID * GRID), dtype=np.float32)
        blocks = self.id_map.reshape(GRID, PATCH, GRID, PATCH).transpose(0, 2, 1, 3).reshape(GRID * GRID, -1)
        for i in range(1, len(self.objects) + 1):
            cover[i] = (blocks == i).mean(axis=1)
        best = cover.argmax(axis=0)
        ok = cover.max(axis=0) > min_cover
        labels = np.zeros(GRID * GRID, dtype=np.int64)
        for i, obj in enumerate(self.objects, start=1):
            labels[(best == i) & ok] = obj.label
        return labels

    def present(self) -> np.ndarray:
        """[12] float32 multi-hot of the (colour, shape) classes present (the [CLS] task of training)."""
        out = np.zeros(N_CLASSES - 1, dtype=np.float32)
        for obj in self.objects:
            out[obj.label - 1] = 1.0
        return out


@lru_cache(maxsize=2)
def noise_bank(n: int = _BANK, seed: int = 12345) -> np.ndarray:
    """[n, 336, 336, 3] uint8 noisy grey backgrounds (pixel noise plus a smooth low-frequency tint)."""
    rng = np.random.default_rng(seed)
    base = rng.normal(0.0, 18.0, size=(n, SIZE, SIZE, 3)).astype(np.float32)
    low = rng.normal(0.0, 14.0, size=(n, 6, 6, 3)).astype(np.float32)
    low = np.repeat(np.repeat(low, SIZE // 6, axis=1), SIZE // 6, axis=2)
    grey = rng.uniform(95, 150, size=(n, 1, 1, 1)).astype(np.float32)
    return np.clip(grey + base + low, 0, 255).astype(np.uint8)


def _shape_mask(shape: str, size: int) -> np.ndarray:
    """[size, size] bool mask of ``shape`` filling a ``size``-pixel box."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
    if shape == "circle":
        r = size / 2.0
        return (xx - r) ** 2 + (yy - r) ** 2 <= r * r
    if shape == "square":
        return np.ones((size, size), dtype=bool)
    # upright isosceles triangle: apex at the top centre, base along the bottom edge
    half = (yy / size) * (size / 2.0)
    return np.abs(xx - size / 2.0) <= half


def _place(rng: np.random.Generator, n: int) -> list[tuple[int, int, int]]:
    """Up to ``n`` non-overlapping boxes (x0, y0, size) with a 4 px gap, by rejection sampling."""
    boxes: list[tuple[int, int, int]] = []
    for _ in range(200):
        if len(boxes) == n:
            break
        s = int(rng.integers(30, 81))
        x0, y0 = int(rng.integers(2, SIZE - s - 2)), int(rng.integers(2, SIZE - s - 2))
        if all(x0 + s + 4 <= bx or bx + bs + 4 <= x0 or y0 + s + 4 <= by or by + bs + 4 <= y0
               for bx, by, bs in boxes):
            boxes.append((x0, y0, s))
    return boxes


def render(rng: np.random.Generator) -> tuple[np.ndarray, list[ShapeObject], np.ndarray]:
    """Draw one image: (image [336,336,3] uint8, objects, id map [336,336] int8)."""
    bank = noise_bank()
    img = bank[int(rng.integers(len(bank)))]
    if rng.integers(2):
        img = img[:, ::-1]
    img = np.roll(img, (int(rng.integers(SIZE)), int(rng.integers(SIZE))), axis=(0, 1)).copy()
    id_map = np.zeros((SIZE, SIZE), dtype=np.int8)
    combos = rng.permutation(len(COLORS) * len(SHAPES))
    objects: list[ShapeObject] = []
    for (x0, y0, s), combo in zip(_place(rng, int(rng.integers(1, 5))), combos):
        color, shape = COLOR_NAMES[combo // len(SHAPES)], SHAPES[combo % len(SHAPES)]
        mask = _shape_mask(shape, s)
        rgb = np.clip(np.array(COLORS[color]) + rng.integers(-20, 21, size=3), 0, 255).astype(np.uint8)
        region = img[y0:y0 + s, x0:x0 + s]
        region[mask] = rgb
        id_map[y0:y0 + s, x0:x0 + s][mask] = len(objects) + 1
        objects.append(ShapeObject(color, shape, x0 + s // 2, y0 + s // 2, s))
    return img, objects, id_map


def questions_for(objects: list[ShapeObject], rng: np.random.Generator) -> list[tuple[str, str, str]]:
    """One question per answerable type (see the module docstring), shuffled: (question, answer, type)."""
    out: list[tuple[str, str, str]] = []
    shapes = [o.shape for o in objects]
    colors = [o.color for o in objects]
    uniq_shape = [o for o in objects if shapes.count(o.shape) == 1]
    if uniq_shape:
        o = uniq_shape[int(rng.integers(len(uniq_shape)))]
        out.append((f"what color is the {o.shape}?", o.color, "color"))
    uniq_color = [o for o in objects if colors.count(o.color) == 1]
    if uniq_color:
        o = uniq_color[int(rng.integers(len(uniq_color)))]
        out.append((f"what shape is the {o.color} object?", o.shape, "shape"))
    present = {(o.color, o.shape) for o in objects}
    if rng.integers(2):
        c, s = sorted(present)[int(rng.integers(len(present)))]
        out.append((f"is there a {c} {s}?", "yes", "exist"))
    else:
        absent = [(c, s) for c in COLOR_NAMES for s in SHAPES if (c, s) not in present]
        hard = [(c, s) for c, s in absent if c in colors or s in shapes]
        pool = hard if hard and rng.integers(2) else absent
        c, s = pool[int(rng.integers(len(pool)))]
        out.append((f"is there a {c} {s}?", "no", "exist"))
    sided = [o for o in objects if abs(o.cx - SIZE // 2) >= 16]
    if sided:
        o = sided[int(rng.integers(len(sided)))]
        out.append((f"is the {o.color} {o.shape} on the left or the right?", "left" if o.cx < SIZE // 2 else "right",
                    "position"))
    order = rng.permutation(len(out))
    return [out[i] for i in order]


def make_sample(seed: int, index: int) -> ShapesSample:
    """Sample ``index`` of split ``seed`` (deterministic)."""
    rng = np.random.default_rng([seed, index])
    img, objects, id_map = render(rng)
    return ShapesSample(img, objects, id_map, questions_for(objects, rng))


def caption(obj: ShapeObject, rng: np.random.Generator) -> tuple[str, str | None, str | None]:
    """A short text naming ``obj`` in one of the forms the questions use, for the CLIP-style text tower.

    Returns:
        (text, colour or None, shape or None): the attributes the text names; every object that has them
        matches it.
    """
    c, s = obj.color, obj.shape
    forms = ((f"a {c} {s}", c, s), (f"the {s}", None, s), (f"the {c} object", c, None),
             (f"is there a {c} {s}?", c, s), (f"what color is the {s}?", None, s),
             (f"what shape is the {c} object?", c, None), (f"is the {c} {s} on the left or the right?", c, s))
    return forms[int(rng.integers(len(forms)))]
