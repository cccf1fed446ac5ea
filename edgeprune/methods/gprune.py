"""G-Prune (arXiv 2501.02268, AAAI 2025): information propagation on a token similarity graph.

The method class is a thin adapter over :mod:`edgeprune.methods.gprune_fn` (pure torch, imported only when
the method runs). It follows the authors' code (``jytmelon/G-Prune``) as restated in METHODS.md §2, with the
project decisions of METHODS.md decision 5: fp32 always, 5 vector-matrix propagation steps, groups (LLaVA-NeXT
base view / high-res grid) ranked separately with K split in proportion to the group sizes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from ..errors import MethodArgumentError
from .base import MethodParams, PruningMethod, VisualTokens

if TYPE_CHECKING:  # pragma: no cover
    import torch


MIN_TEMPERATURE = 1e-3  # keeps theta / T above the masked logit (-5000) for any theta in [-1, 1]
MAX_STEPS = 64  # the propagation converges in a few steps (the authors use 5); more only costs time


@dataclass(frozen=True)
class GPruneParams(MethodParams):
    """G-Prune parameters (the authors' hard-coded values are the defaults).

    Attributes:
        threshold: theta, cosine similarities below it are not graph edges.
        temperature: T, softmax temperature of the transition matrix.
        steps: n, number of propagation steps (``x <- x A``).
    """

    threshold: float = field(default=0.5, metadata={"help": "cosine threshold of the similarity graph, in [-1, 1]"})
    temperature: float = field(default=0.03, metadata={"help": "softmax temperature of the transition matrix, finite, >= 1e-3"})
    steps: int = field(default=5, metadata={"help": "number of propagation steps, in [0, 64]"})

    def __post_init__(self) -> None:
        super().__post_init__()
        if not -1.0 <= self.threshold <= 1.0:
            raise MethodArgumentError(f"gprune: threshold must be in [-1, 1]; got {self.threshold}")
        if not MIN_TEMPERATURE <= self.temperature < float("inf"):
            raise MethodArgumentError(f"gprune: temperature must be a finite number >= {MIN_TEMPERATURE:g}; "
                                      f"got {self.temperature}")
        if not 0 <= self.steps <= MAX_STEPS:
            raise MethodArgumentError(f"gprune: steps must be an integer in [0, {MAX_STEPS}]; got {self.steps}")


class GPrune(PruningMethod):
    """G-Prune: keep the tokens that receive the most feature-norm "information" after n hops, per degree.

    Graph on the projected tokens: cosine >= threshold edges (self-loops included), row-softmax at
    temperature T, n propagation steps of the feature norms, scores divided by the node degree; top-K per
    group (``layout.group``), ties to the lower index, kept indices ascending. Survivors keep their original
    RoPE positions by default, as in the authors' code.
    """

    name = "gprune"
    summary = "graph propagation of feature norms over a cosine-similarity graph; keep the best-informed tokens"
    paper = "G-Prune, arXiv 2501.02268 (AAAI 2025)"
    placement = "pre_llm"
    default_positions = "original"
    fused_op = "GraphRank"
    Params = GPruneParams

    def _select(self, tokens: VisualTokens, k: int) -> "torch.Tensor":
        import torch

        from . import gprune_fn as G

        group = torch.as_tensor(tokens.layout.group, dtype=torch.int64)
        p = self.params
        if self.kernels == "triton":  # the fused GraphRank kernels: same kept indices as the reference
            from ..kernels.graph_rank import graph_rank_select

            return graph_rank_select(tokens.features, group.to(tokens.features.device), k, p.threshold,
                                     p.temperature, p.steps).long()
        return G.gprune_select(tokens.features, group, k, p.threshold, p.temperature, p.steps)
