"""The simple methods shipped with the seeds (METHODS.md decision 7): none, random, uniform, cls-topk.

Each is a thin adapter over ``functional``; torch is imported when a method runs, not when it is listed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from ..errors import MethodArgumentError
from .base import MethodParams, PruningMethod, VisualTokens

if TYPE_CHECKING:  # pragma: no cover
    import torch


class NoPrune(PruningMethod):
    """Keep every visual token: the unpruned reference."""

    name = "none"
    summary = "no pruning: all N visual tokens reach the LLM (the reference)"
    paper = "-"
    uses_budget = False

    def _select(self, tokens: VisualTokens, k: int) -> "torch.Tensor":
        import torch

        b, n = tokens.features.shape[:2]
        return torch.arange(n, dtype=torch.int64).expand(b, n).clone()


MAX_SEED = 2**64 - 1  # torch.Generator.manual_seed takes a 64-bit seed


@dataclass(frozen=True)
class RandomParams(MethodParams):
    seed: int = field(default=0, metadata={"help": "seed of the private generator, in [0, 2^64 - 1]"})

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0 <= self.seed <= MAX_SEED:
            raise MethodArgumentError(f"random: seed must be in [0, 2^64 - 1 = {MAX_SEED}]; got {self.seed}")


class RandomPrune(PruningMethod):
    """K tokens drawn uniformly at random with a fixed seed (a sanity baseline)."""

    name = "random"
    summary = "K tokens drawn at random with a fixed seed"
    paper = "baseline"
    Params = RandomParams

    def _select(self, tokens: VisualTokens, k: int) -> "torch.Tensor":
        from . import functional as F

        b, n = tokens.features.shape[:2]
        return F.random_indices(b, n, k, self.params.seed).to(tokens.features.device)


class UniformPrune(PruningMethod):
    """K tokens on a spatially uniform lattice.

    One full view (LLaVA-1.5): a near-square 2-D lattice over the patch grid. Other layouts (LLaVA-NeXT's base
    view + unpadded crops): K tokens evenly strided over the raster order of the prunable tokens.
    """

    name = "uniform"
    summary = "K tokens on a spatially uniform lattice (strided rows and columns)"
    paper = "baseline"

    def _select(self, tokens: VisualTokens, k: int) -> "torch.Tensor":
        from . import functional as F

        b, n = tokens.features.shape[:2]
        rows, cols = tokens.layout.grid
        if tokens.layout.num_views == 1 and n == rows * cols:
            idx = F.uniform_grid_indices(rows, cols, k)
        else:
            idx = F.uniform_indices(n, k)
        return idx.to(tokens.features.device).expand(b, k).clone()


class ClsTopK(PruningMethod):
    """FasterVLM: the K tokens with the highest [CLS] attention of CLIP layer -2 (head mean)."""

    name = "cls-topk"
    summary = "top-K by [CLS] attention of CLIP layer -2 (the global Top-K that GridPrune replaces)"
    paper = "FasterVLM, arXiv 2412.01818"

    def _select(self, tokens: VisualTokens, k: int) -> "torch.Tensor":
        from . import functional as F

        return F.stable_topk(tokens.cls_attn.float(), k)
