"""FitPrune recipes: the JSON format, its validation and rescaling, the FLOPs model, the α binary search, and
the calibration inputs of ``edgeprune fit-recipe`` (METHODS.md §3, decision 6).

A recipe is the per-layer number of visual tokens to drop, fitted offline for a FLOPs budget R (the fraction
of visual-token FLOPs to remove). This module is torch-free (numpy and Pillow only): loading a recipe, listing
methods and validating CLI inputs never import torch. The model-dependent part of the search (simulating the
pruned forward) lives in :mod:`edgeprune.calibrate`.

Recipe JSON (``format`` = ``edgeprune-fitprune-recipe/1``)::

    {"format": ..., "budget": R, "n_visual": N, "num_layers": L, "drops": [L ints], "alpha": a,
     "flops_model": {"d": .., "d_ff": .., "num_layers": L, "formula": ..}, "flops_ratio": f,
     "model": name, "samples": S}

``flops_ratio`` is the FLOPs of the recipe over the unpruned FLOPs (visual tokens only, on the calibration
set), so the budget is met when ``flops_ratio <= 1 - budget``.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence, TypeVar

import numpy as np

from ..errors import BudgetError, EdgepruneError, MethodArgumentError

FORMAT = "edgeprune-fitprune-recipe/1"
FORMULA = "per layer: 3*n_in*d^2 + 2*n_in^2*d + n_out*d^2 + 3*n_out*d*d_ff (= 4nd^2 + 2n^2d + 3n*d*d_ff unpruned)"
ALPHA_TOL = 0.01  # the authors stop the binary search when the α interval is below 0.01

T = TypeVar("T")


# ---------------------------------------------------------------------------------------------- FLOPs model


@dataclass(frozen=True)
class FlopsModel:
    """Visual-token multiply-adds of a decoder stack (METHODS.md §3 FLOPs model, generalised to any d).

    Per layer with ``n_in`` tokens entering and ``n_out`` surviving it: q/k/v projections ``3·n_in·d²`` and
    the two attention products ``2·n_in²·d`` run on every entering token; ``o_proj`` (``n_out·d²``) and the
    FFN (``3·n_out·d·d_ff``) only on survivors (dropped tokens leave before ``o_proj``). Unpruned this is
    ``4nd² + 2n²d + 3n·d·d_ff``.

    Attributes:
        d: hidden size; d_ff: FFN intermediate size; num_layers: decoder layers.
    """

    d: int
    d_ff: int
    num_layers: int

    def attention(self, n_in: int) -> float:
        """FLOPs of layer work done on every entering token."""
        return 3.0 * n_in * self.d ** 2 + 2.0 * n_in ** 2 * self.d

    def post(self, n_out: int) -> float:
        """FLOPs of ``o_proj`` + FFN on the survivors of a layer."""
        return 1.0 * n_out * self.d ** 2 + 3.0 * n_out * self.d * self.d_ff

    def layer(self, n: int) -> float:
        """One unpruned layer with n tokens: ``4nd² + 2n²d + 3n·d·d_ff``."""
        return self.attention(n) + self.post(n)

    def full(self, n: int) -> float:
        """The whole unpruned stack with n visual tokens."""
        return self.num_layers * self.layer(n)

    def of_counts(self, entering: Sequence[int], final: int) -> float:
        """FLOPs of a pruned run: ``entering[l]`` tokens enter layer l, ``final`` leave the last layer."""
        outs = list(entering[1:]) + [final]
        return float(sum(self.attention(a) + self.post(b) for a, b in zip(entering, outs)))

    def to_dict(self) -> dict[str, Any]:
        return {"d": self.d, "d_ff": self.d_ff, "num_layers": self.num_layers, "formula": FORMULA}


def counts_after_drops(n_visual: int, n_prunable: int, drops: Sequence[int]) -> tuple[list[int], int]:
    """Visual tokens entering each layer when ``drops[l]`` prunable tokens are removed at layer l.

    Args:
        n_visual: T, all visual tokens (prunable and protected).
        n_prunable: N, the prunable ones; a layer never drops more than remain.
        drops: per-layer drop counts.
    Returns:
        (entering [L], surviving after the last layer).
    """
    entering, n, left = [], n_visual, n_prunable
    for d in drops:
        entering.append(n)
        cut = min(int(d), left)
        n, left = n - cut, left - cut
    return entering, n


# ---------------------------------------------------------------------------------------------- recipe


@dataclass(frozen=True)
class Recipe:
    """A fitted FitPrune recipe (see module docstring for the JSON form).

    Attributes:
        budget: R, fraction of visual-token FLOPs to remove, in (0, 1).
        n_visual: N, prunable visual tokens the recipe was fitted for.
        num_layers: L.
        drops: L non-negative ints, visual tokens dropped at each layer, sum <= N.
        alpha: the attention-mass loss tolerance the search settled on.
        flops_model: the FLOPs model's parameters.
        flops_ratio: achieved FLOPs / unpruned FLOPs on the calibration set.
        model: the model the recipe was fitted on.
        samples: number of calibration samples.
    """

    budget: float
    n_visual: int
    num_layers: int
    drops: tuple[int, ...]
    alpha: float = 0.0
    flops_model: dict[str, Any] = field(default_factory=dict)
    flops_ratio: float = 1.0
    model: str = ""
    samples: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "drops", tuple(self.drops))
        validate_fields(self.budget, self.n_visual, self.num_layers, self.drops, where="recipe")

    def to_json(self) -> dict[str, Any]:
        out = {"format": FORMAT, **asdict(self)}
        out["drops"] = list(self.drops)
        return out

    def scaled_drops(self, n: int) -> list[int]:
        """Drops for an image with n prunable tokens (see :func:`scale_drops`)."""
        return scale_drops(self.drops, self.n_visual, n)

    def check_layers(self, num_layers: int) -> None:
        """Raise :class:`MethodArgumentError` when the model depth differs from the recipe's."""
        if num_layers != self.num_layers:
            raise MethodArgumentError(
                f"fitprune: the recipe has {self.num_layers} layers but the model has {num_layers}; fit a recipe "
                f"for this model with `edgeprune fit-recipe --model ...`")


def scale_drops(drops: Sequence[int], n_from: int, n_to: int) -> list[int]:
    """Rescale drop counts fitted for ``n_from`` tokens to ``n_to``: ``floor(d · n_to / n_from)``, the authors'
    integer truncation (their LLaVA-NeXT recipes are fitted at 2880 and scaled by N_img / 2880).

    LLaVA-NeXT newline tokens: the authors count them as prunable (N includes them, and they can be dropped);
    we keep every newline token and count N without them, as every other method here does (and as G-Prune's
    authors do; METHODS.md decision 5), so that one K or one recipe means the same image-token budget across
    methods, and the row structure the LLM was trained on survives pruning. Our recipes therefore drop
    slightly fewer tokens per layer than the authors' on NeXT (the ~N/24 newline tokens are never dropped);
    LLaVA-1.5 has none."""
    return [int(d) * int(n_to) // int(n_from) for d in drops]


def validate_fields(budget: Any, n_visual: Any, num_layers: Any, drops: Any, where: str) -> None:
    """Check the fields a recipe cannot work without.

    Raises:
        MethodArgumentError: what is wrong, with the expected range.
    """
    def bad(msg: str) -> MethodArgumentError:
        return MethodArgumentError(f"fitprune: {where}: {msg}; re-create it with `edgeprune fit-recipe`")

    if isinstance(budget, bool) or not isinstance(budget, (int, float)) or not 0.0 < float(budget) < 1.0:
        raise bad(f"budget must be a number in (0, 1); got {budget!r}")
    for name, value in (("n_visual", n_visual), ("num_layers", num_layers)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise bad(f"{name} must be a positive integer; got {value!r}")
    if not isinstance(drops, (list, tuple)) or len(drops) != num_layers:
        raise bad(f"drops must be a list of num_layers = {num_layers} integers; got {drops!r}")
    if any(isinstance(d, bool) or not isinstance(d, int) for d in drops):
        raise bad(f"drops must be integers; got {list(drops)!r}")
    if any(d < 0 for d in drops):
        raise bad(f"drops must be >= 0; got {list(drops)!r}")
    if sum(drops) > n_visual:
        raise bad(f"drops sum to {sum(drops)}, more than the n_visual = {n_visual} visual tokens")


def load_recipe(path: str | os.PathLike[str]) -> Recipe:
    """Read and validate a recipe JSON file.

    Raises:
        MethodArgumentError: missing or unreadable file, not JSON, wrong format tag, bad or missing fields.
    """
    p = Path(path)
    if not p.is_file():
        raise MethodArgumentError(f"fitprune: recipe file not found: {str(p)!r}; create one with "
                                  f"`edgeprune fit-recipe --model M --budget R --calib FILE --out {p.name}`")
    try:
        data = json.loads(p.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise MethodArgumentError(f"fitprune: recipe {str(p)!r} is not valid JSON ({exc}); re-create it with "
                                  "`edgeprune fit-recipe`") from None
    return recipe_from_json(data, where=str(p))


def recipe_from_json(data: Any, where: str = "recipe") -> Recipe:
    """Build a :class:`Recipe` from its parsed JSON.

    Raises:
        MethodArgumentError: see :func:`load_recipe`.
    """
    if not isinstance(data, dict):
        raise MethodArgumentError(f"fitprune: {where}: expected a JSON object")
    if data.get("format") != FORMAT:
        raise MethodArgumentError(f"fitprune: {where}: format is {data.get('format')!r}, expected {FORMAT!r}")
    missing = [k for k in ("budget", "n_visual", "num_layers", "drops") if k not in data]
    if missing:
        raise MethodArgumentError(f"fitprune: {where}: missing field(s) {', '.join(missing)}")
    validate_fields(data["budget"], data["n_visual"], data["num_layers"], data["drops"], where)
    try:
        return Recipe(budget=float(data["budget"]), n_visual=data["n_visual"], num_layers=data["num_layers"],
                      drops=tuple(data["drops"]), alpha=float(data.get("alpha", 0.0)),
                      flops_model=dict(data.get("flops_model") or {}),
                      flops_ratio=float(data.get("flops_ratio", 1.0)), model=str(data.get("model", "")),
                      samples=int(data.get("samples", 0)))
    except (TypeError, ValueError) as exc:
        raise MethodArgumentError(f"fitprune: {where}: bad optional field ({exc})") from None


def save_recipe(recipe: Recipe, path: str | os.PathLike[str]) -> None:
    """Write the recipe JSON atomically (temporary file in the same directory, then rename).

    Raises:
        EdgepruneError: the directory does not exist or is not writable.
    """
    p = Path(path)
    parent = p.resolve().parent
    if not parent.is_dir():
        raise EdgepruneError(f"cannot write {str(p)!r}: directory {str(parent)!r} does not exist")
    try:
        fd, tmp = tempfile.mkstemp(prefix=".recipe-", suffix=".json", dir=parent)
    except OSError as exc:
        raise EdgepruneError(f"cannot write into {str(parent)!r}: {exc}") from None
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(recipe.to_json(), f, indent=2)
            f.write("\n")
        os.replace(tmp, p)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


# ---------------------------------------------------------------------------------------------- search


def search_alpha(simulate: Callable[[float], tuple[bool, T]], tol: float = ALPHA_TOL) -> tuple[float, bool, T]:
    """The FitPrune binary search over α ∈ [0, 1] (METHODS.md §3 step 2).

    ``simulate(α)`` prunes the calibration set with attention-mass loss tolerance α and says whether the
    FLOPs budget was reached. Reached → α_hi = α, else α_lo = α, until ``α_hi - α_lo < tol``. The result is
    the smallest tested α that reached the budget; when none did, α = 1 (prune as much as the criterion
    allows) is simulated and returned with ``reached = False``.

    Deliberate difference from the authors' code, which returns the *last* α it evaluated: that α is the final
    ``hi`` (budget met) or the final ``lo`` (budget missed), so their recipe can miss the budget it was fitted
    for by up to one bisection step (running both side by side, the recipes differed in 2 of 6
    configurations). We keep the smallest tested α that met the budget: the recipe always meets its budget
    when any tested α did, and among those it prunes least (the two rules agree whenever the last tested α
    met the budget).

    Args:
        simulate: α -> (reached, result).
        tol: stop when the interval is below this.
    Returns:
        (α, reached, result of ``simulate(α)``).
    """
    lo, hi = 0.0, 1.0
    best: tuple[float, T] | None = None
    while hi - lo > tol + 1e-9:  # 1e-9: do not take one more step because of float rounding
        mid = (lo + hi) / 2.0
        reached, result = simulate(mid)
        if reached:
            hi, best = mid, (mid, result)
        else:
            lo = mid
    if best is not None:
        return best[0], True, best[1]
    reached, result = simulate(1.0)
    return 1.0, reached, result


def mean_drops(per_sample: np.ndarray, n_prunable: Sequence[int], n_ref: int) -> list[int]:
    """Recipe drops: ``floor(mean over samples)`` of the per-sample drops, each rescaled to ``n_ref`` tokens.

    Args:
        per_sample: [S, L] drops per sample and layer.
        n_prunable: [S] prunable tokens of each sample (rescaling is the identity when all equal n_ref).
        n_ref: the recipe's N.
    Returns:
        L ints.
    """
    scale = n_ref / np.asarray(n_prunable, dtype=np.float64)
    mean = (np.asarray(per_sample, dtype=np.float64) * scale[:, None]).mean(axis=0)
    drops = [int(math.floor(x + 1e-9)) for x in mean]  # 1e-9: a mean like 2.9999999 is 3
    excess = sum(drops) - n_ref
    for i in range(len(drops) - 1, -1, -1):  # floors of rescaled means can overshoot N by rounding only
        if excess <= 0:
            break
        cut = min(drops[i], excess)
        drops[i] -= cut
        excess -= cut
    return drops


# ---------------------------------------------------------------------------------------------- calibration

_PROMPTS = ("What is in the image?", "Describe the picture in detail.", "What colour is the largest shape?",
            "How many objects are there?", "What does the sign say?", "Where is the red square?")


@dataclass(frozen=True)
class CalibItem:
    """One calibration request: an image (path or in-memory picture) and a prompt."""

    prompt: str
    image_path: str = ""
    image: Any = None  # a PIL image for generated items


def parse_calib_spec(spec: str) -> int | None:
    """``generated:N`` -> N, anything else -> None (a file path).

    Raises:
        EdgepruneError: ``generated:`` with a count that is not a positive integer.
    """
    if not spec.startswith("generated:"):
        return None
    text = spec.split(":", 1)[1]
    if not text.isdigit() or int(text) < 1:
        raise EdgepruneError(f"--calib generated:N needs a positive integer N; got {spec!r}")
    return int(text)


def read_calib_jsonl(path: str | os.PathLike[str]) -> list[CalibItem]:
    """Read ``{"image": path, "prompt": text}`` lines; relative image paths are relative to the file.

    Blank lines are skipped. Images are not opened here (see :func:`load_calib_images`).

    Raises:
        EdgepruneError: missing file, a line that is not a JSON object with string ``image`` and non-empty
            string ``prompt`` (the message gives the line number), or no samples at all.
    """
    p = Path(path)
    if not p.is_file():
        raise EdgepruneError(f"calibration file not found: {str(p)!r}; expected a JSONL file of "
                             '{"image": path, "prompt": text} lines, or use --calib generated:N')
    try:
        lines = p.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise EdgepruneError(f"cannot read calibration file {str(p)!r}: {exc}") from None
    items = []
    for no, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise EdgepruneError(f"{p}:{no}: not valid JSON ({exc.msg}); expected "
                                 '{"image": path, "prompt": text}') from None
        if not isinstance(row, dict) or not isinstance(row.get("image"), str) or not row["image"]:
            raise EdgepruneError(f'{p}:{no}: expected an object with a string "image" path; got {line.strip()!r}')
        if not isinstance(row.get("prompt"), str) or not row["prompt"].strip():
            raise EdgepruneError(f'{p}:{no}: expected a non-empty string "prompt"; got {line.strip()!r}')
        img = Path(row["image"])
        items.append(CalibItem(prompt=row["prompt"], image_path=str(img if img.is_absolute() else p.parent / img)))
    if not items:
        raise EdgepruneError(f"calibration file {str(p)!r} has no samples")
    return items


def generated_items(n: int, seed: int = 0, size: tuple[int, int] = (336, 336)) -> list[CalibItem]:
    """N synthetic calibration samples (offline): coloured rectangles on noise, prompts from a fixed list.

    All images have the same ``size`` (width, height), so every sample has the same number of visual
    tokens also on LLaVA-NeXT.
    """
    from PIL import Image

    rng = np.random.default_rng(seed)
    items = []
    for i in range(n):
        w, h = size
        pixels = rng.integers(0, 64, (h, w, 3), dtype=np.uint8)
        for _ in range(int(rng.integers(2, 6))):
            x0, y0 = int(rng.integers(0, w - 16)), int(rng.integers(0, h - 16))
            x1, y1 = int(rng.integers(x0 + 8, w)), int(rng.integers(y0 + 8, h))
            pixels[y0:y1, x0:x1] = rng.integers(64, 256, 3, dtype=np.uint8)
        items.append(CalibItem(prompt=_PROMPTS[i % len(_PROMPTS)], image=Image.fromarray(pixels)))
    return items


def load_calib_images(items: Sequence[CalibItem]) -> list[CalibItem]:
    """Open every image (fail before the model loads).

    Raises:
        ImageError: a missing or unreadable image (the message names the path).
    """
    from ..runtime.preprocess import load_image

    return [it if it.image is not None else CalibItem(it.prompt, it.image_path, load_image(it.image_path))
            for it in items]


def check_budget(budget: float) -> None:
    """Raise :class:`BudgetError` unless ``0 < budget < 1``."""
    if not (isinstance(budget, (int, float)) and 0.0 < float(budget) < 1.0):
        raise BudgetError(f"--budget is the fraction of visual-token FLOPs to remove and must be in (0, 1); "
                          f"got {budget}")
