"""FastV (arXiv 2403.06764, ECCV 2024): drop visual tokens inside the LLM after layer K-1's attention.

At layer K-1 the attention of the **last prompt token**, averaged over heads and restricted to the visual
columns, scores the visual tokens; the top ones are kept (stable, ties to the lower index, ascending) and the
rest are absent from layer K on (METHODS.md §4, decision 7). How many survive comes from the normal budget
(``--tokens K`` / ``--ratio r``); without a budget FastV's default R = 50 % applies.

The class is torch-free at import time; its plan imports :mod:`edgeprune.methods.inllm` when it runs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Optional

from ..errors import MethodArgumentError
from .base import Budget, MethodParams, ModelLimits, PruningMethod

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from .inllm import LayerProbe

DEFAULT_KEEP_RATIO = 0.5  # FastV's R = 50 %


@dataclass(frozen=True)
class FastVParams(MethodParams):
    """FastV parameters.

    Attributes:
        layer: K; scores come from layer K-1's attention and dropped tokens are absent from layer K on.
    """

    layer: int = field(default=2, metadata={"help": "K: score with layer K-1's attention, drop from layer K on (>= 1)"})

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.layer < 1:
            raise MethodArgumentError(f"fastv: layer (K) must be an integer >= 1; got {self.layer}")


class FastVPlan:
    """The in-LLM plan: at layer ``at_layer`` keep the ``keep`` prunable tokens the last token attends most.

    Args:
        at_layer: K - 1.
        keep: prunable visual tokens that survive (protected tokens, e.g. NeXT newlines, always survive).
    """

    def __init__(self, at_layer: int, keep: int) -> None:
        self.at_layer, self.keep = int(at_layer), int(keep)

    def __call__(self, probe: "LayerProbe") -> Optional["torch.Tensor"]:
        if probe.layer != self.at_layer:
            return None
        from . import inllm

        n_drop = int(probe.prunable.sum()) - self.keep
        if n_drop <= 0:
            return None  # nothing to drop: identical to the unpruned model
        return inllm.keep_top_visual(inllm.last_row_visual_attention(probe), probe.prunable, n_drop)

    def __repr__(self) -> str:
        return f"fastv.FastVPlan(at_layer={self.at_layer}, keep={self.keep})"


class FastV(PruningMethod):
    """FastV: one-shot in-LLM pruning by the last prompt token's head-mean attention at layer K-1.

    In-LLM interface: :meth:`keep_count` resolves the budget (default 50 % of N), :meth:`layer_plan` builds
    the plan that :func:`edgeprune.methods.inllm.prefill` calls at every layer.
    """

    name = "fastv"
    summary = "in-LLM: keep the visual tokens the last prompt token attends most at layer K-1 (default K=2, 50 %)"
    paper = "FastV, arXiv 2403.06764 (ECCV 2024)"
    placement = "in_llm"
    default_positions = "original"
    uses_budget = True
    Params = FastVParams

    def check_limits(self, limits: ModelLimits) -> None:
        """``layer`` (K) must be one of the model's decoder layers, 1 <= K <= num_layers."""
        self._check_layer(limits.num_layers)

    def _check_layer(self, num_layers: int) -> None:
        if self.params.layer > num_layers:
            raise MethodArgumentError(
                f"fastv: layer (K) = {self.params.layer} exceeds the model's {num_layers} layers; use 1 <= K <= "
                f"{num_layers}")

    def keep_count(self, budget: Budget, n: int) -> int:
        """Prunable visual tokens that survive: the budget's K, or ``round(0.5 · N)`` when none is given.

        Raises:
            BudgetError: K > N.
        """
        return budget.resolve(n) if budget.is_set else Budget(ratio=DEFAULT_KEEP_RATIO).resolve(n)

    def layer_plan(self, n: int, num_layers: int, budget: Budget | None = None) -> FastVPlan:
        """The plan for an image with n prunable visual tokens in a ``num_layers``-layer LLM.

        Raises:
            MethodArgumentError: K exceeds the number of layers.
            BudgetError: K (tokens) > N.
        """
        self._check_layer(num_layers)
        return FastVPlan(self.params.layer - 1, self.keep_count(budget or Budget(), n))
