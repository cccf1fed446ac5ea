"""FitPrune's calibration driver: run the model over a calibration set and fit a recipe (``edgeprune fit-recipe``).

It runs the torch reference backend (preprocess, encode, splice) and the decoder stack layer by layer, so it
sits above ``methods/`` and ``runtime/``: the method's pure parts (statistics, plans, the α search, the recipe
format) stay in :mod:`edgeprune.methods.fitprune_fn` and :mod:`edgeprune.methods.fitprune_recipe`.
Specification: METHODS.md §3 (offline search).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np
import torch

from .errors import EdgepruneError
from .methods import inllm
from .methods.fitprune_fn import MassPlan, MassRecorder
from .methods.fitprune_recipe import (ALPHA_TOL, CalibItem, FlopsModel, Recipe, check_budget, counts_after_drops,
                                      mean_drops, scale_drops, search_alpha)

Report = Callable[[str], None]


def _report(report: Report | None, msg: str) -> None:
    if report is not None:
        report(msg)


def search_steps(tol: float = ALPHA_TOL) -> int:
    """How many α the binary search of :func:`~edgeprune.methods.fitprune_recipe.search_alpha` simulates
    (one more, α = 1, when no α reaches the budget)."""
    steps, width = 0, 1.0
    while width > tol + 1e-9:
        width /= 2.0
        steps += 1
    return steps


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


def encode_calibration(loaded: Any, items: Sequence[CalibItem], report: Report | None = None) -> list[CalibSample]:
    """Preprocess, encode and splice every calibration item with the torch reference backend.

    Args:
        loaded: a :class:`~edgeprune.models.loader.LoadedModel`.
        items: items whose ``image`` is loaded (see ``load_calib_images``).
        report: called once per encoded item (progress).
    Raises:
        PromptError: a prompt that is empty, contains ``<image>`` or does not fit the context.
    """
    from .runtime.pipeline import position_ids
    from .runtime.preprocess import preprocess
    from .runtime.prompt import check_context, split_prompt
    from .runtime.torch_backend import TorchBackend
    from .methods.registry import build_method

    be = TorchBackend(loaded, build_method("none"))
    out = []
    for i, it in enumerate(items, 1):
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
        _report(report, f"encoded sample {i}/{len(items)}")
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
               tol: float = ALPHA_TOL, report: Report | None = None) -> Recipe:
    """Fit a FitPrune recipe for FLOPs budget R on a calibration set (METHODS.md §3, offline search).

    Args:
        lm: the decoder stack (``family.language_model(model)``).
        samples: calibration samples from :func:`encode_calibration`.
        budget: R in (0, 1), fraction of visual-token FLOPs to remove.
        model: model name recorded in the recipe.
        tol: stop the α search when the interval is below this.
        report: called after the reference forward and after each α simulated (progress; at most
            ``1 + search_steps(tol) + 1`` calls).
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
    _report(report, "reference attention masses")

    def step(alpha: float) -> tuple[bool, np.ndarray]:
        reached, drops = simulate(lm, samples, alpha, budget, flops, refs)
        _report(report, f"alpha {alpha:.4f}: budget {'reached' if reached else 'not reached'}")
        return reached, drops

    alpha, _, per_sample = search_alpha(step, tol)
    n_prunable = [s.n_prunable for s in samples]
    n_ref = max(n_prunable)
    drops = mean_drops(per_sample, n_prunable, n_ref)
    return Recipe(budget=float(budget), n_visual=n_ref, num_layers=flops.num_layers, drops=tuple(drops),
                  alpha=float(alpha), flops_model=flops.to_dict(),
                  flops_ratio=recipe_flops_ratio(drops, n_ref, samples, flops), model=model, samples=len(samples))
