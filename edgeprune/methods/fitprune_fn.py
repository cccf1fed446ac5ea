"""FitPrune tensor functions: attention statistics, drop rules, the online plan and the recipe fit (torch).

Specification: METHODS.md §3 and decision 6. At layer l, ``A`` is the causal attention probability matrix
maximised over heads; for each current visual token j, ``cross_j`` is the mean of ``A[t, j]`` over the text
rows after the image and ``self_j`` the mean of ``A[i, j]`` over the visual rows.

* Online: drop the ``n_l`` lowest ``cross·self`` scores (ties: the higher index goes first, so the lower index
  is kept, decision 1); tokens go after layer l's attention (see :mod:`edgeprune.methods.inllm`).
* Recipe fit: a pruned forward of the calibration set, layer by layer over all samples, for each α of the
  binary search (:func:`edgeprune.methods.fitprune_recipe.search_alpha`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Sequence

import numpy as np
import torch

from ..errors import EdgepruneError
from . import inllm
from .fitprune_recipe import (ALPHA_TOL, CalibItem, FlopsModel, Recipe, check_budget, counts_after_drops,
                              mean_drops, scale_drops, search_alpha)

# ---------------------------------------------------------------------------------------------- statistics


def cross_self(probs: torch.Tensor, visual_start: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """FitPrune's per-token statistics from head-wise probabilities of the rows from the image on.

    Args:
        probs: [H, n + t, S] causal attention probabilities of rows ``visual_start .. S-1`` (the n visual
            rows, then the t text rows after the image).
        visual_start: column of the first visual token.
        n: current visual tokens.
    Returns:
        (cross [n], self [n]) float32: mean over text rows / over visual rows of the head-max attention
        to each visual column; cross is zeros when no text follows the image.
    """
    a = probs.amax(dim=0)[:, visual_start: visual_start + n]  # [n + t, n]
    self_ = a[:n].mean(dim=0)
    cross = a[n:].mean(dim=0) if a.shape[0] > n else torch.zeros_like(self_)
    return cross, self_


def probe_cross_self(probe: inllm.LayerProbe) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`cross_self` of a layer probe (computes only the rows from the image on)."""
    rows = torch.arange(probe.visual_start, probe.seq_len)
    return cross_self(probe.attention(rows), probe.visual_start, probe.visual_count)


def fitprune_scores(cross: torch.Tensor, self_: torch.Tensor) -> torch.Tensor:
    """``cross · self`` per visual token ([n] -> [n])."""
    return cross * self_


def lowest_first(values: torch.Tensor) -> torch.Tensor:
    """Order of ``values`` ascending; ties put the higher index first (it is dropped first). [n] -> [n]."""
    n = values.shape[0]
    return (n - 1) - torch.sort(values.flip(0), stable=True).indices


def mass_drop_count(values: torch.Tensor, keep_mass: float) -> int:
    """The largest m such that removing the m lowest values leaves a sum ``>= keep_mass`` (0 if none).

    Args:
        values: [n] non-negative.
        keep_mass: the attention mass that must remain, ``(1 - α) · reference mass``.
    Returns:
        m in [0, n].
    """
    v = torch.sort(values.double()).values
    tail = torch.flip(torch.cumsum(torch.flip(v, [0]), 0), [0])  # tail[m] = sum of v[m:]
    tail = torch.cat([tail, tail.new_zeros(1)])  # tail[n] = 0: removing everything leaves exactly nothing
    return int((tail[1:] >= keep_mass).sum())


def mass_drop_mask(values: torch.Tensor, prunable: torch.Tensor, keep_mass: float) -> torch.Tensor:
    """Tokens in D (the lowest-value prunable tokens whose removal keeps ``keep_mass``), as a bool [n] mask."""
    idx = torch.nonzero(prunable).flatten()
    sub = values[idx]
    m = mass_drop_count(sub, keep_mass)
    mask = torch.zeros_like(prunable)
    mask[idx[lowest_first(sub)[:m]]] = True
    return mask


# ---------------------------------------------------------------------------------------------- plans


class OnlinePlan:
    """Online FitPrune: at every layer with ``drops[l] > 0`` drop that many lowest-``cross·self`` tokens.

    Args:
        drops: per-layer drop counts, already rescaled to this image's N.
    """

    def __init__(self, drops: Sequence[int]) -> None:
        self.drops = [int(d) for d in drops]

    def __call__(self, probe: inllm.LayerProbe) -> Optional[torch.Tensor]:
        m = self.drops[probe.layer]
        if m <= 0 or not bool(probe.prunable.any()):
            return None  # no statistics needed: this layer keeps FlashAttention-style fused attention
        cross, self_ = probe_cross_self(probe)
        return inllm.keep_top_visual(fitprune_scores(cross, self_), probe.prunable, m)

    def __repr__(self) -> str:
        return f"fitprune.OnlinePlan({self.drops})"


class MassRecorder:
    """A plan that drops nothing and records the reference masses C^l = Σ cross, S^l = Σ self (prunable)."""

    def __init__(self, num_layers: int) -> None:
        self.masses = np.zeros((num_layers, 2), dtype=np.float64)

    def __call__(self, probe: inllm.LayerProbe) -> None:
        cross, self_ = probe_cross_self(probe)
        p = probe.prunable
        self.masses[probe.layer] = (float(cross[p].double().sum()), float(self_[p].double().sum()))
        return None


class MassPlan:
    """Recipe-search plan for one sample at one layer: drop ``D_cross ∩ D_self`` for tolerance α.

    Args:
        alpha: tolerated fraction of attention mass lost.
        ref_cross, ref_self: the unpruned model's masses C^l, S^l of this sample and layer.
    """

    def __init__(self, alpha: float, ref_cross: float, ref_self: float) -> None:
        self.alpha, self.ref_cross, self.ref_self = alpha, ref_cross, ref_self

    def __call__(self, probe: inllm.LayerProbe) -> Optional[torch.Tensor]:
        cross, self_ = probe_cross_self(probe)
        keep_frac = 1.0 - self.alpha
        drop = (mass_drop_mask(cross, probe.prunable, keep_frac * self.ref_cross)
                & mass_drop_mask(self_, probe.prunable, keep_frac * self.ref_self))
        if not bool(drop.any()):
            return None
        return torch.nonzero(~drop).flatten()


# ---------------------------------------------------------------------------------------------- calibration


@dataclass
class CalibSample:
    """One calibration request as the LLM sees it (no pre-LLM pruning).

    Attributes:
        embeds: [1, L, D]; position_ids: [1, L]; visual_start: first visual index; visual_count: T;
        prunable: [T] bool (False for NeXT newline tokens).
    """

    embeds: torch.Tensor
    position_ids: torch.Tensor
    visual_start: int
    visual_count: int
    prunable: torch.Tensor

    @property
    def n_prunable(self) -> int:
        return int(self.prunable.sum())


def encode_calibration(loaded: Any, items: Sequence[CalibItem]) -> list[CalibSample]:
    """Preprocess, encode and splice every calibration item with the torch reference backend.

    Args:
        loaded: a :class:`~edgeprune.models.loader.LoadedModel`.
        items: items whose ``image`` is loaded (see ``load_calib_images``).
    Raises:
        PromptError: a prompt that is empty, contains ``<image>`` or does not fit the context.
    """
    from ..runtime.pipeline import position_ids
    from ..runtime.preprocess import preprocess
    from ..runtime.prompt import check_context, split_prompt
    from ..runtime.torch_backend import TorchBackend
    from .registry import build_method

    be = TorchBackend(loaded, build_method("none"))
    out = []
    for it in items:
        before, after = split_prompt(be.template, it.prompt)
        prefix, suffix = be.codec.encode(before, add_bos=True), be.codec.encode(after, add_bos=False)
        pixels, size = preprocess(it.image, be.image_config)
        visual = be.encode_image(pixels, size)
        check_context(len(prefix), visual.total, len(suffix), 1, be.max_positions)
        embeds, kept_pos = be.splice(prefix, visual, np.arange(visual.n, dtype=np.int64), suffix)
        pos = position_ids(len(prefix), visual.total, len(suffix), kept_pos, "original")
        prunable = torch.zeros(visual.total, dtype=torch.bool)
        prunable[torch.from_numpy(visual.prunable_pos)] = True
        out.append(CalibSample(embeds=embeds.clone(), position_ids=torch.from_numpy(pos).unsqueeze(0),
                               visual_start=len(prefix), visual_count=int(visual.total), prunable=prunable))
    return out


# ---------------------------------------------------------------------------------------------- recipe fit


@torch.no_grad()
def reference_masses(lm: Any, samples: Sequence[CalibSample]) -> np.ndarray:
    """C^l and S^l of every sample from an unpruned forward: [S, L, 2] float64."""
    out = []
    for s in samples:
        rec = MassRecorder(len(lm.layers))
        inllm.prefill(lm, s.embeds, s.position_ids, s.visual_start, s.visual_count, rec, s.prunable)
        out.append(rec.masses)
    return np.stack(out)


@torch.no_grad()
def simulate(lm: Any, samples: Sequence[CalibSample], alpha: float, budget: float, flops: FlopsModel,
             refs: np.ndarray) -> tuple[bool, np.ndarray]:
    """One step of the binary search: prune the calibration set with tolerance α, layer-synchronously.

    At the start of each layer the budget test averages over samples: FLOPs already spent plus the FLOPs of
    the remaining layers at the current token counts; once it is ``<= (1 - R)`` of the unpruned FLOPs the
    budget is reached and pruning stops. After the last layer the spent FLOPs are tested once more (the
    authors' loop has no test there; with 32 layers it never matters, with 4 it does).

    Args:
        lm: the decoder stack; samples: the calibration set; alpha: tolerance; budget: R.
        flops: the FLOPs model; refs: [S, L, 2] from :func:`reference_masses`.
    Returns:
        (reached, drops [S, L] int64 per sample and layer).
    """
    num_layers = len(lm.layers)
    streams = [inllm.start_stream(lm, s.embeds, s.position_ids, s.visual_start, s.visual_count, s.prunable)
               for s in samples]
    target = (1.0 - budget) * float(np.mean([flops.full(s.visual_count) for s in samples]))
    spent = np.zeros(len(samples))
    drops = np.zeros((len(samples), num_layers), dtype=np.int64)
    for layer in range(num_layers):
        counts = [st.visual_count for st in streams]
        projected = spent + np.array([(num_layers - layer) * flops.layer(n) for n in counts])
        if float(projected.mean()) <= target:
            return True, drops
        for i, st in enumerate(streams):
            plan = MassPlan(alpha, float(refs[i, layer, 0]), float(refs[i, layer, 1]))
            streams[i], _, _, dropped = inllm.run_layer(lm, layer, st, plan)
            drops[i, layer] = int(dropped.numel())
            spent[i] += flops.attention(counts[i]) + flops.post(streams[i].visual_count)
    return bool(spent.mean() <= target), drops


def recipe_flops_ratio(recipe_drops: Sequence[int], n_ref: int, samples: Sequence[CalibSample],
                       flops: FlopsModel) -> float:
    """FLOPs of a recipe applied to the samples (rescaled to each N) over their unpruned FLOPs."""
    used = full = 0.0
    for s in samples:
        scaled = scale_drops(recipe_drops, n_ref, s.n_prunable)
        entering, final = counts_after_drops(s.visual_count, s.n_prunable, scaled)
        used += flops.of_counts(entering, final)
        full += flops.full(s.visual_count)
    return used / full


def fit_recipe(lm: Any, samples: Sequence[CalibSample], budget: float, model: str = "",
               tol: float = ALPHA_TOL) -> Recipe:
    """Fit a FitPrune recipe for FLOPs budget R on a calibration set (METHODS.md §3, offline search).

    Args:
        lm: the decoder stack (``family.language_model(model)``).
        samples: calibration samples from :func:`encode_calibration`.
        budget: R in (0, 1), fraction of visual-token FLOPs to remove.
        model: model name recorded in the recipe.
        tol: stop the α search when the interval is below this.
    Returns:
        The :class:`Recipe` (drops = floor of the mean per-sample drops at the smallest α reaching R).
    Raises:
        BudgetError: R outside (0, 1).
        EdgepruneError: no samples.
    """
    check_budget(budget)
    if not samples:
        raise EdgepruneError("fit-recipe needs at least one calibration sample")
    cfg = lm.config
    flops = FlopsModel(d=int(cfg.hidden_size), d_ff=int(cfg.intermediate_size), num_layers=len(lm.layers))
    refs = reference_masses(lm, samples)
    alpha, _, per_sample = search_alpha(lambda a: simulate(lm, samples, a, budget, flops, refs), tol)
    n_prunable = [s.n_prunable for s in samples]
    n_ref = max(n_prunable)
    drops = mean_drops(per_sample, n_prunable, n_ref)
    return Recipe(budget=float(budget), n_visual=n_ref, num_layers=flops.num_layers, drops=tuple(drops),
                  alpha=float(alpha), flops_model=flops.to_dict(),
                  flops_ratio=recipe_flops_ratio(drops, n_ref, samples, flops), model=model, samples=len(samples))
