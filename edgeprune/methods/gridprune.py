"""GridPrune (arXiv 2511.10081): text-guided zone budgets, then local Top-K inside each zone.

The method class is a thin adapter over :mod:`edgeprune.methods.gridprune_fn` (pure torch, imported only when
the method runs so that listing methods needs no torch). No public GridPrune code exists; the concrete design
(zones, temperature, saliency term, rounding, anyres handling) is the proposal of METHODS.md §1 with the
parameters fixed by METHODS.md decision 4.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

from ..errors import MethodArgumentError
from .base import MethodParams, ModelLimits, PruningMethod, VisualTokens

if TYPE_CHECKING:  # pragma: no cover
    import torch

GUIDANCES = ("auto", "clip", "llm")
MIN_TAU = 1e-6  # below it rbar / tau overflows float64's softmax range for cosines of magnitude ~1


@dataclass(frozen=True)
class GridPruneParams(MethodParams):
    """GridPrune parameters (METHODS.md decision 4).

    Attributes:
        zones: G, each view's patch grid is cut into G x G zones.
        alpha: weight of the [CLS]-attention saliency in the local score (1 - alpha weighs the relevance).
        tau: temperature of the zone softmax; CLIP cosines are compressed (~0.1-0.35), so tau = 1 would make
            the zone budget nearly uniform.
        relevance_sign: +1 or -1; multiplies the patch-text cosine (CDPruner negates it for LLaVA).
        guidance: ``clip`` (CLIP patch embeddings vs CLIP text [EOS]), ``llm`` (projected tokens vs the mean
            LLM input embedding of the question) or ``auto`` (clip when CLIP patch embeddings are given).
    """

    zones: int = field(default=4, metadata={"help": "G: G x G zones per view, 1 <= G <= the patch grid's side "
                                                    "(24 for CLIP 336/14)"})
    alpha: float = field(default=0.5, metadata={"help": "weight of [CLS] attention in the local score, in [0, 1]"})
    tau: float = field(default=0.05, metadata={"help": "temperature of the zone-budget softmax, finite, >= 1e-6"})
    relevance_sign: int = field(default=1, metadata={"help": "+1 or -1: sign applied to the patch-text cosine"})
    guidance: Literal["auto", "clip", "llm"] = field(
        default="auto", metadata={"help": "auto | clip | llm: which text guidance drives the relevance"}
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.zones < 1:
            raise MethodArgumentError(f"gridprune: zones must be an integer >= 1; got {self.zones}")
        if not 0.0 <= self.alpha <= 1.0:
            raise MethodArgumentError(f"gridprune: alpha must be in [0, 1]; got {self.alpha}")
        if not MIN_TAU <= self.tau < float("inf"):
            raise MethodArgumentError(f"gridprune: tau must be a finite number >= {MIN_TAU:g}; got {self.tau}")
        if self.relevance_sign not in (1, -1):
            raise MethodArgumentError(f"gridprune: relevance_sign must be 1 or -1; got {self.relevance_sign}")
        if self.guidance not in GUIDANCES:
            raise MethodArgumentError(
                f"gridprune: guidance must be one of {', '.join(GUIDANCES)}; got {self.guidance!r}"
            )


class GridPrune(PruningMethod):
    """GridPrune: allocate K over G x G zones of every view by text relevance, then keep the best per zone.

    Relevance ``r_i = relevance_sign * cos(e_i, g)``; zone budgets from ``softmax(mean_zone(r) / tau)`` by
    largest remainder (capped at the zone sizes, float64, ties to the lower zone id); local score
    ``(1 - alpha) * (r + 1) / 2 + alpha * minmax(cls_attn)``; top-k_z per zone, ties to the lower index.
    On LLaVA-NeXT one softmax covers the zones of all views (padded rows are absent, so their zones are
    empty and get no budget). See :mod:`edgeprune.methods.gridprune_fn` for the exact arithmetic.
    """

    name = "gridprune"
    summary = "text-guided zone budgets (where to look) + local top-k by relevance and [CLS] attention"
    paper = "GridPrune, arXiv 2511.10081"
    placement = "pre_llm"
    default_positions = "compact"
    needs_guidance = True
    fused_op = "ZonalTopK"
    Params = GridPruneParams

    def check_limits(self, limits: ModelLimits) -> None:
        """``zones`` must not exceed the side of the model's patch grid (see :func:`check_zones`).

        Raises:
            MethodArgumentError: zones > max(rows, cols), with the bound.
        """
        check_zones(self.params.zones, limits.grid)

    def guidance_source(self, tokens: VisualTokens) -> str:
        """Which guidance this request uses, ``clip`` or ``llm`` (recorded in the manifest).

        Raises:
            MethodArgumentError: ``guidance=clip`` but no CLIP patch embeddings were supplied.
        """
        mode = self.params.guidance
        if mode == "auto":
            return "clip" if tokens.clip_embeds is not None else "llm"
        if mode == "clip" and tokens.clip_embeds is None:
            raise MethodArgumentError(
                "gridprune: guidance=clip needs CLIP patch embeddings, but none were computed; give the CLIP "
                "checkpoint of the vision tower with --clip (e.g. openai/clip-vit-large-patch14-336) "
                "or use --method-arg guidance=llm"
            )
        return mode

    def _select(self, tokens: VisualTokens, k: int) -> "torch.Tensor":
        from . import gridprune_fn as G

        source = self.guidance_source(tokens)
        if tokens.guidance is None:
            raise MethodArgumentError(
                f"gridprune needs a text guidance vector (guidance={source}: "
                + ("the CLIP text [EOS] embedding of the question" if source == "clip"
                   else "the mean LLM input embedding of the question")
                + "), but VisualTokens.guidance is None; the pipeline must compute it from the prompt"
            )
        embeds = tokens.clip_embeds if source == "clip" else tokens.features
        try:
            rel = G.relevance(embeds, tokens.guidance.to(embeds.device), self.params.relevance_sign)
        except ValueError as exc:  # a width mismatch means the guidance came from the other space
            raise MethodArgumentError(f"gridprune (guidance={source}): {exc}") from None
        zones = self.params.zones
        check_zones(zones, tokens.layout.grid)  # before the [N, Z] allocations below
        if self.kernels == "triton":  # the fused ZonalTopK kernel: same indices as the reference below
            from ..kernels.zonal_topk import zonal_topk

            scores = G.local_scores(rel, tokens.cls_attn.to(rel.device), self.params.alpha)
            zone = G.zone_ids(tokens.layout, zones).to(rel.device)
            return zonal_topk(scores, zone, k, self.params.tau, token_relevance=rel,
                              num_zones=G.num_zones(tokens.layout, zones)).long()
        return G.gridprune_select(
            rel,
            tokens.cls_attn.to(rel.device),
            G.zone_ids(tokens.layout, zones),
            G.num_zones(tokens.layout, zones),
            k,
            self.params.alpha,
            self.params.tau,
        )


def check_zones(zones: int, grid: tuple[int, int]) -> None:
    """G <= max(rows, cols) of one view's patch grid. At that G every token is its own zone, so a larger G
    selects exactly the same tokens while the [N, num_views * G^2] zone tables grow without bound (zones=1000
    needed 9 GB): it is refused rather than clamped.

    Raises:
        MethodArgumentError: zones above the bound, naming it.
    """
    side = max(grid)
    if zones > side:
        raise MethodArgumentError(f"gridprune: zones must be in [1, {side}] for this model (its patch grid is "
                                  f"{grid[0]}x{grid[1]} per view, so {side} zones per side already give one token "
                                  f"per zone); got {zones}")
