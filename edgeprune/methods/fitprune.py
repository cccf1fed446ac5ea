"""FitPrune (arXiv 2409.10197, AAAI 2025): recipe-driven in-LLM pruning by attention statistics.

A recipe (``edgeprune fit-recipe``, :mod:`edgeprune.methods.fitprune_recipe`) says how many visual tokens to
drop at each layer for a FLOPs budget. Online, at every layer l with ``n_l > 0``, the head-max attention gives
``cross_j`` (mean over the text rows after the image) and ``self_j`` (mean over the visual rows) for each
visual token, and the ``n_l`` lowest ``cross·self`` scores are dropped after layer l's attention (ties: the
higher index first, decision 1). Survivors keep their original positions; the KV cache is ragged per layer.
A recipe fitted for N tokens is rescaled to an image's N by integer truncation, as the authors do.

The budget comes from the recipe, so ``--tokens``/``--ratio`` do not apply (``uses_budget = False``). The class
is torch-free at import time; the plan lives in :mod:`edgeprune.methods.fitprune_fn`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ..errors import MethodArgumentError
from .base import Budget, MethodParams, PruningMethod
from .fitprune_recipe import Recipe, load_recipe

if TYPE_CHECKING:  # pragma: no cover
    from .fitprune_fn import OnlinePlan


@dataclass(frozen=True)
class FitPruneParams(MethodParams):
    """FitPrune parameters.

    Attributes:
        recipe: path to a recipe JSON written by ``edgeprune fit-recipe`` (required).
    """

    recipe: str = field(default="", metadata={"help": "path to a recipe JSON from `edgeprune fit-recipe` (required)"})


class FitPrune(PruningMethod):
    """FitPrune: drop ``n_l`` visual tokens at layer l by ``cross·self`` attention score, per a fitted recipe.

    Args:
        params: :class:`FitPruneParams`; ``recipe`` is read and validated here, so a bad file fails before
            any model loads.
        recipe: an in-memory :class:`Recipe` instead of a file (tests, the Python API).
    Raises:
        MethodArgumentError: no recipe given, or the recipe file is missing or invalid.
    """

    name = "fitprune"
    summary = "in-LLM: per-layer drops from a fitted recipe, lowest cross x self attention (edgeprune fit-recipe)"
    paper = "FitPrune, arXiv 2409.10197 (AAAI 2025)"
    placement = "in_llm"
    default_positions = "original"
    uses_budget = False
    Params = FitPruneParams

    def __init__(self, params: FitPruneParams | None = None, recipe: Recipe | None = None) -> None:
        super().__init__(params)
        if recipe is None:
            if not self.params.recipe:
                raise MethodArgumentError(
                    "fitprune needs a recipe: pass --method-arg recipe=PATH.json, or create one with "
                    "`edgeprune fit-recipe --model M --budget 0.7 --calib FILE.jsonl --out PATH.json`")
            recipe = load_recipe(self.params.recipe)
        self.recipe = recipe

    def describe_params(self) -> dict[str, Any]:
        out = super().describe_params()
        out.update(recipe_budget=self.recipe.budget, recipe_n_visual=self.recipe.n_visual,
                   recipe_drops=list(self.recipe.drops))
        return out

    def drops_for(self, n: int, num_layers: int) -> list[int]:
        """Per-layer drops for an image with n prunable tokens (rescaled when n differs from the recipe's N).

        Raises:
            MethodArgumentError: the model's depth differs from the recipe's.
        """
        self.recipe.check_layers(num_layers)
        return self.recipe.scaled_drops(n)

    def layer_plan(self, n: int, num_layers: int, budget: Budget | None = None) -> "OnlinePlan":
        """The plan :func:`edgeprune.methods.inllm.prefill` calls at every layer (``budget`` is ignored).

        Raises:
            MethodArgumentError: the model's depth differs from the recipe's.
        """
        from .fitprune_fn import OnlinePlan

        return OnlinePlan(self.drops_for(n, num_layers))
