"""Tests of G-Prune (edgeprune/methods/gprune.py, gprune_fn.py): hand-computed case, numpy reference, properties."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch

from edgeprune.errors import MethodArgumentError
from edgeprune.methods.base import TokenLayout, VisualTokens
from edgeprune.methods.functional import stable_topk
from edgeprune.methods.gprune import GPrune, GPruneParams
from edgeprune.methods import gprune_fn as G


# ----------------------------------------------------------------------------------------------- helpers
def numpy_reference(x: np.ndarray, threshold: float, temperature: float, steps: int) -> np.ndarray:
    """Straightforward float64 G-Prune for one group: matrix power, as in the authors' code. x: [N, D] -> [N]."""
    xn = x / np.linalg.norm(x, axis=1, keepdims=True)
    s = xn @ xn.T
    s[s < threshold] = 0.0
    logits = s / temperature
    logits[logits == 0] = -5000.0
    a = np.exp(logits - logits.max(axis=1, keepdims=True))
    a /= a.sum(axis=1, keepdims=True)
    degree = (a > 0).sum(axis=1)
    return np.linalg.norm(x, axis=1) @ np.linalg.matrix_power(a, steps) / degree


def tokens_for(x: torch.Tensor, layout: TokenLayout | None = None) -> VisualTokens:
    b, n, _ = x.shape
    layout = layout or TokenLayout.single_view(1, n)
    return VisualTokens(features=x, cls_attn=torch.zeros(b, n), layout=layout)


def next_layout(side: int = 24, crops: tuple[int, int] = (2, 2), rows_kept: tuple[int, int] = (8, 40)) -> TokenLayout:
    """LLaVA-NeXT-like layout: base view (group 0) + unpadded high-res grid (group 1), see test_gridprune."""
    base = TokenLayout.single_view(side, side)
    rr, cc = np.meshgrid(np.arange(*rows_kept), np.arange(crops[1] * side), indexing="ij")
    rr, cc = rr.ravel(), cc.ravel()
    return TokenLayout(
        view=np.concatenate([base.view, 1 + (rr // side) * crops[1] + cc // side]).astype(np.int64),
        row=np.concatenate([base.row, rr % side]).astype(np.int64),
        col=np.concatenate([base.col, cc % side]).astype(np.int64),
        group=np.concatenate([base.group, np.ones_like(rr)]).astype(np.int64),
        grid=(side, side),
    )


# ---------------------------------------------------------------------------------------- hand-computed case
# x0 = (2, 0), x1 = (0.8, 0.6), x2 = (0, 1), x3 = (-3, 0); norms w = 2, 1, 1, 3.
# Cosines: c01 = 0.8, c12 = 0.6, c02 = 0, c03 = -1, c13 = -0.8, c23 = 0.
# theta = 0.5 keeps S = [[1, .8, 0, 0], [.8, 1, .6, 0], [0, .6, 1, 0], [0, 0, 0, 1]]; T = 1 so L = S with the
# zeros set to -5000 (exp(-5000) = 0 exactly):
#   row 0: e^1, e^.8 = 2.71828, 2.22554 (sum 4.94382)            -> A0 = [.549834, .450166, 0, 0]
#   row 1: e^.8, e^1, e^.6 = 2.22554, 2.71828, 1.82212 (6.76594) -> A1 = [.328933, .401760, .269308, 0]
#   row 2: e^.6, e^1 (4.54040)                                    -> A2 = [0, .401312, .598688, 0]
#   row 3: isolated                                               -> A3 = [0, 0, 0, 1]
# deg = 2, 3, 2, 1.  One step: w A = [2(.549834) + .328933, 2(.450166) + .401760 + .401312, .269308 + .598688, 3]
#                                  = [1.428601, 1.703404, 0.867996, 3.0]
# score = w A / deg = [0.714300, 0.567801, 0.433998, 3.0] -> the isolated outlier ranks first, then x0.
HAND_X = torch.tensor([[[2.0, 0.0], [0.8, 0.6], [0.0, 1.0], [-3.0, 0.0]]])


def test_hand_case_one_step():
    a = G.transition_matrix(HAND_X, 0.5, 1.0)[0]
    expected_a = [[0.549834, 0.450166, 0, 0], [0.328933, 0.401760, 0.269308, 0], [0, 0.401312, 0.598688, 0],
                  [0, 0, 0, 1]]
    assert a.numpy() == pytest.approx(np.array(expected_a), abs=1e-6)
    assert ((a > 0).sum(-1)).tolist() == [2, 3, 2, 1]
    scores = G.gprune_scores(HAND_X, threshold=0.5, temperature=1.0, steps=1)
    assert scores.dtype == torch.float32
    assert scores[0].numpy() == pytest.approx([0.714300, 0.567801, 0.433998, 3.0], abs=1e-6)
    # K = 2 keeps the outlier 3 and x0.
    method = GPrune(GPruneParams(threshold=0.5, temperature=1.0, steps=1))
    assert method.select(tokens_for(HAND_X), 2).tolist() == [[0, 3]]


def test_hand_case_five_steps_matches_matrix_power():
    scores = G.gprune_scores(HAND_X, threshold=0.5, temperature=1.0, steps=5)
    ref = numpy_reference(HAND_X[0].double().numpy(), 0.5, 1.0, 5)
    assert scores[0].numpy() == pytest.approx(ref, rel=1e-5)
    assert ref == pytest.approx([0.620857, 0.555848, 0.545371, 3.0], abs=1e-6)  # values of the reference


@pytest.mark.parametrize("seed", range(4))
def test_default_params_match_numpy_reference(seed):
    gen = torch.Generator().manual_seed(seed)
    # Low-dimensional clustered features so the graph has real edges at theta = 0.5.
    centers = torch.randn(4, 6, generator=gen)
    x = centers[torch.randint(0, 4, (40,), generator=gen)] + 0.6 * torch.randn(40, 6, generator=gen)
    ref = numpy_reference(x.double().numpy(), 0.5, 0.03, 5)
    got = G.gprune_scores(x[None])[0].numpy()
    assert got == pytest.approx(ref, rel=1e-4)


def test_steps_zero_is_norm_over_degree():
    scores = G.gprune_scores(HAND_X, 0.5, 1.0, steps=0)
    assert scores[0].tolist() == pytest.approx([2 / 2, 1 / 3, 1 / 2, 3 / 1])


def test_fp16_input_is_computed_in_fp32():
    x = torch.randn(2, 30, 16, generator=torch.Generator().manual_seed(1)).half()
    got = G.gprune_scores(x)
    assert got.dtype == torch.float32
    assert torch.equal(got, G.gprune_scores(x.float()))


def test_zero_feature_gives_finite_scores():
    x = HAND_X.clone()
    x[0, 1] = 0.0
    assert bool(torch.isfinite(G.gprune_scores(x)).all())


# ---------------------------------------------------------------------------------------------- properties
def test_select_properties_exact_k_ascending_deterministic():
    method = GPrune()
    for seed, (n, k) in enumerate([(1, 1), (7, 1), (7, 7), (30, 11), (64, 63), (50, 25)]):
        x = torch.randn(2, n, 8, generator=torch.Generator().manual_seed(seed))
        idx = method.select(tokens_for(x), k)
        assert idx.shape == (2, k) and idx.dtype == torch.int64
        if k > 1:
            assert bool((idx[:, 1:] > idx[:, :-1]).all())
        assert torch.equal(idx, method.select(tokens_for(x), k))
        if k == n:
            assert idx.tolist() == [list(range(n))] * 2


def test_identical_tokens_tie_to_the_lowest_indices():
    # All cosines 1: A = 1/N everywhere, deg = N, every score equal -> the first K indices.
    x = torch.ones(1, 9, 4)
    assert GPrune().select(tokens_for(x), 4).tolist() == [[0, 1, 2, 3]]


def test_permutation_invariance():
    checked = 0
    for seed in range(6):
        gen = torch.Generator().manual_seed(100 + seed)
        centers = torch.randn(5, 8, generator=gen)
        x = centers[torch.randint(0, 5, (48,), generator=gen)] + 0.5 * torch.randn(48, 8, generator=gen)
        perm = torch.randperm(48, generator=gen)
        scores = G.gprune_scores(x[None])[0]
        scores_p = G.gprune_scores(x[perm][None])[0]
        assert scores_p.numpy() == pytest.approx(scores[perm].numpy(), rel=1e-5)  # scores permute with tokens
        k = 20
        ordered = torch.sort(scores, descending=True).values
        if (ordered[k - 1] - ordered[k]).abs() <= 1e-4 * ordered[k - 1].abs():
            continue  # near-tie at the cut: float summation order may legitimately swap it
        kept = set(GPrune().select(tokens_for(x[None]), k)[0].tolist())
        kept_p = GPrune().select(tokens_for(x[perm][None]), k)[0]
        assert {int(perm[i]) for i in kept_p} == kept  # kept set maps through the permutation
        checked += 1
    assert checked >= 3


# ------------------------------------------------------------------------------------------------ groups
def test_split_budget_by_hand():
    # 320 * 576 / 2112 = 87.27 and 320 * 1536 / 2112 = 232.73: floors 87 + 232 = 319, the last token goes to
    # the larger remainder (group 1).
    assert G.split_budget([576, 1536], 320) == [87, 233]
    assert G.split_budget([2, 2], 1) == [1, 0]  # equal remainders: the lower group
    assert G.split_budget([3, 3, 3], 2) == [1, 1, 0]
    assert G.split_budget([576, 1536], 2112) == [576, 1536]
    assert G.split_budget([576, 0], 10) == [10, 0]
    assert G.split_budget([576, 1536], 1) == [0, 1]
    for bad in (([5], 6), ([5], -1), ([-1, 3], 1)):
        with pytest.raises(ValueError):
            G.split_budget(*bad)


def test_split_budget_properties():
    rng = np.random.default_rng(0)
    for _ in range(200):
        sizes = rng.integers(0, 50, size=int(rng.integers(1, 5))).tolist()
        if sum(sizes) == 0:
            continue
        k = int(rng.integers(0, sum(sizes) + 1))
        shares = G.split_budget(sizes, k)
        assert sum(shares) == k and all(0 <= s <= n for s, n in zip(shares, sizes))
        assert all(abs(s - k * n / sum(sizes)) < 1 for s, n in zip(shares, sizes))


def test_next_layout_groups_get_proportional_shares_and_are_ranked_separately():
    layout = next_layout()  # group 0: 576 base tokens, group 1: 1536 unpadded high-res tokens
    n = layout.n
    x = torch.randn(1, n, 16, generator=torch.Generator().manual_seed(7))
    for k in (1, 160, 320, n):
        idx = GPrune().select(tokens_for(x, layout), k)[0]
        assert idx.shape == (k,) and bool((idx[1:] > idx[:-1]).all())
        group = torch.as_tensor(layout.group)[idx]
        assert [int((group == g).sum()) for g in (0, 1)] == G.split_budget([576, 1536], k)
    # Each group is its own graph: its kept tokens are its own top-share, independent of the other group.
    idx = GPrune().select(tokens_for(x, layout), 320)[0]
    base_share, grid_share = G.split_budget([576, 1536], 320)
    assert idx[:base_share].tolist() == stable_topk(G.gprune_scores(x[:, :576]), base_share)[0].tolist()
    grid = stable_topk(G.gprune_scores(x[:, 576:]), grid_share)[0] + 576
    assert idx[base_share:].tolist() == grid.tolist()


# ------------------------------------------------------------------------------------------- params & import
def test_params_validation_and_from_args():
    m = GPrune.from_args({"threshold": "0.6", "temperature": "0.05", "steps": "3"})
    assert m.params == GPruneParams(threshold=0.6, temperature=0.05, steps=3)
    assert m.positions == "original" and m.name == "gprune"
    for bad in ({"threshold": "1.5"}, {"temperature": "0"}, {"steps": "-1"}, {"steps": "x"}, {"theta": "1"}):
        with pytest.raises(MethodArgumentError):
            GPrune.from_args(bad)


def test_module_import_does_not_import_torch():
    code = "import sys, edgeprune.methods.gprune; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)
