"""FitPrune tensor functions: attention statistics, drop rules, the online plan and the recipe-search plans.

Specification: METHODS.md §3 and decision 6. At layer l, ``A`` is the causal attention probability matrix
maximised over heads; for each current visual token j, ``cross_j`` is the mean of ``A[t, j]`` over the text
rows after the image and ``self_j`` the mean of ``A[i, j]`` over the visual rows.

* Online: drop the ``n_l`` lowest ``cross·self`` scores (ties: the higher index goes first, so the lower index
  is kept, decision 1); tokens go after layer l's attention (see :mod:`edgeprune.methods.inllm`).
* Recipe fit: :class:`MassRecorder` and :class:`MassPlan` are the plans of the calibration forward; the driver
  that runs the model over the calibration set (:mod:`edgeprune.calibrate`) lives above ``methods/`` and
  ``runtime/``, so the methods stay pure.
"""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import torch

from . import inllm

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
