"""The simple methods (none, random, uniform, cls-topk), budgets, method arguments and the registry."""

from __future__ import annotations

import pytest
import torch

from edgeprune.errors import BudgetError, MethodArgumentError, UnknownMethodError
from edgeprune.methods import Budget, TokenLayout, VisualTokens, build_method
from edgeprune.methods.base import parse_method_args
from edgeprune.methods.registry import METHODS


def _tokens(b=2, n=576, d=16, seed=0, cls=None):
    g = torch.Generator().manual_seed(seed)
    feats = torch.randn(b, n, d, generator=g)
    attn = torch.rand(b, n, generator=g) if cls is None else cls
    side = int(n ** 0.5)
    return VisualTokens(features=feats, cls_attn=attn, layout=TokenLayout.single_view(side, n // side))


@pytest.mark.parametrize("name", ["random", "uniform", "cls-topk"])
@pytest.mark.parametrize("k", [1, 7, 64, 192, 575, 576])
def test_exact_k_ascending_unique_deterministic(name, k):
    m = build_method(name)
    t = _tokens()
    idx = m.select(t, k)
    assert idx.shape == (2, k) and idx.dtype == torch.int64
    assert bool((idx[:, 1:] > idx[:, :-1]).all()) and int(idx.min()) >= 0 and int(idx.max()) < 576
    assert torch.equal(idx, m.select(t, k))


def test_none_keeps_everything():
    idx = build_method("none").select(_tokens(b=1), 576)
    assert torch.equal(idx[0], torch.arange(576))
    assert build_method("none").uses_budget is False


def test_cls_topk_picks_largest_and_breaks_ties_to_lower_index():
    attn = torch.zeros(1, 16)
    attn[0, [3, 9, 12]] = torch.tensor([0.5, 0.9, 0.7])
    t = _tokens(b=1, n=16, cls=attn)
    assert build_method("cls-topk").select(t, 2).tolist() == [[9, 12]]
    assert build_method("cls-topk").select(t, 5).tolist() == [[0, 1, 3, 9, 12]]  # ties -> lowest indices
    flat = _tokens(b=1, n=16, cls=torch.full((1, 16), 0.25))
    assert build_method("cls-topk").select(flat, 4).tolist() == [[0, 1, 2, 3]]


def test_random_depends_on_seed_only():
    t = _tokens()
    a = build_method("random", {"seed": "1"}).select(t, 64)
    b = build_method("random", {"seed": "1"}).select(_tokens(seed=5), 64)
    c = build_method("random", {"seed": "2"}).select(t, 64)
    assert torch.equal(a, b) and not torch.equal(a, c)
    torch.manual_seed(0)
    before = torch.rand(1)
    torch.manual_seed(0)
    build_method("random").select(t, 8)
    assert torch.equal(torch.rand(1), before)  # private generator


def test_uniform_is_spatially_spread():
    idx = build_method("uniform").select(_tokens(b=1), 64)[0]
    rows, cols = idx // 24, idx % 24
    lattice = [1, 4, 7, 10, 13, 16, 19, 22]
    assert sorted(set(rows.tolist())) == lattice and sorted(set(cols.tolist())) == lattice  # the 8 x 8 lattice
    for k in (1, 5, 23, 25, 100, 191, 500, 576):  # exact K for awkward K too, every quadrant covered
        idx = build_method("uniform").select(_tokens(b=1), k)[0]
        assert idx.shape == (k,) and len(set(idx.tolist())) == k
        if k >= 4:
            quads = {(int(i) // 24 >= 12, int(i) % 24 >= 12) for i in idx}
            assert len(quads) == 4, k


def test_k_outside_range_raises():
    m = build_method("cls-topk")
    for k in (0, 577):
        with pytest.raises(BudgetError):
            m.select(_tokens(), k)


def test_budget_resolution_and_errors():
    assert Budget(tokens=64).resolve(576) == 64
    assert Budget(ratio=1 / 9).resolve(576) == 64
    assert Budget(ratio=0.0001).resolve(576) == 1
    assert Budget().resolve(576) == 576
    assert Budget(ratio=1.0).resolve(576) == 576
    with pytest.raises(BudgetError, match="exceeds"):
        Budget(tokens=577).resolve(576)
    for bad in (dict(tokens=0), dict(tokens=-3), dict(ratio=0.0), dict(ratio=1.5), dict(ratio=-0.1),
                dict(tokens=3, ratio=0.5)):
        with pytest.raises(BudgetError):
            Budget(**bad)


def test_method_args():
    assert parse_method_args(["seed=3", "positions = original"]) == {"seed": "3", "positions": "original"}
    m = build_method("random", {"seed": "3", "positions": "original"})
    assert m.params.seed == 3 and m.positions == "original"
    assert build_method("cls-topk").positions == "compact"
    with pytest.raises(MethodArgumentError, match="key=value"):
        parse_method_args(["seed"])
    with pytest.raises(MethodArgumentError, match="known: positions, seed"):
        build_method("random", {"sed": "3"})
    with pytest.raises(MethodArgumentError, match="expects int"):
        build_method("random", {"seed": "x"})
    with pytest.raises(MethodArgumentError, match="positions"):
        build_method("cls-topk", {"positions": "sideways"})


def test_unknown_method_lists_known():
    with pytest.raises(UnknownMethodError) as err:
        build_method("grid-prune")
    for name in METHODS:
        assert name in str(err.value)
