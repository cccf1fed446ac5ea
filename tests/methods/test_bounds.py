"""Method parameters bounded by what the model allows, and the non-finite-input rule (issue 11).

Rule: NaN or inf in any input a pre-LLM method reads (features, [CLS] attention, CLIP embeddings, guidance) is an
error (:class:`~edgeprune.errors.NonFiniteError`), for every method; the pure GridPrune functions raise
``ValueError`` instead of returning quotas that do not sum to K.
"""

from __future__ import annotations

import math

import pytest
import torch

from edgeprune.errors import MethodArgumentError, NonFiniteError
from edgeprune.methods import gridprune_fn as G
from edgeprune.methods.base import ModelLimits, TokenLayout, VisualTokens
from edgeprune.methods.registry import METHODS, build_method
from edgeprune.models.limits import limits_from_config, model_limits

PRE_LLM = sorted(n for n, cls in METHODS.items() if cls.placement == "pre_llm")


def _tokens(n_side: int = 4, d: int = 8, seed: int = 0) -> VisualTokens:
    g = torch.Generator().manual_seed(seed)
    n = n_side * n_side
    return VisualTokens(features=torch.randn(1, n, d, generator=g), cls_attn=torch.rand(1, n, generator=g),
                        layout=TokenLayout.single_view(n_side, n_side), guidance=torch.randn(1, d, generator=g))


@pytest.mark.parametrize("method", PRE_LLM)
@pytest.mark.parametrize("field,value", [("features", math.nan), ("cls_attn", math.nan), ("features", math.inf),
                                         ("guidance", math.nan)])
def test_non_finite_inputs_are_an_error_for_every_method(method, field, value):
    tokens = _tokens()
    t = getattr(tokens, field).clone()
    t.view(-1)[3] = value
    bad = VisualTokens(**{**tokens.__dict__, field: t})
    m = build_method(method, {"guidance": "llm"} if method == "gridprune" else None)
    k = 4 if m.uses_budget else tokens.n
    with pytest.raises(NonFiniteError, match="NaN/inf"):
        m.select(bad, k)
    m.select(tokens, k)  # the same request with finite inputs is fine


def test_gridprune_quotas_refuse_nan_instead_of_summing_to_n():
    rel = torch.tensor([[0.1, float("nan"), 0.3, 0.2]])
    sizes = torch.tensor([4, 4, 4, 4])
    with pytest.raises(ValueError, match="NaN or inf"):
        G.allocate_quotas(rel, sizes, 5, 0.05)
    # an empty zone's value is ignored (documented): NaN there is harmless
    rel_empty = torch.tensor([[0.1, float("nan"), 0.3, 0.2]])
    assert G.allocate_quotas(rel_empty, torch.tensor([4, 0, 4, 4]), 5, 0.05).sum().item() == 5


def test_zonal_topk_refuses_quotas_that_do_not_keep_k():
    zone = torch.tensor([0, 0, 1, 1])
    scores = torch.tensor([[0.4, 0.3, 0.2, 0.1]])
    with pytest.raises(ValueError, match="not K = 3"):
        G.zonal_topk(scores, zone, torch.tensor([[2, 2]]), 3)  # quotas sum to 4: no silent slice to 3
    with pytest.raises(ValueError, match="finite"):
        G.zonal_topk(torch.tensor([[0.4, float("nan"), 0.2, 0.1]]), zone, torch.tensor([[1, 1]]), 2)


LIMITS = ModelLimits(grid=(24, 24), n_max=576, t_min=576, num_layers=4, max_positions=4096)


@pytest.mark.parametrize("method,args,needle", [
    ("gridprune", {"zones": "25"}, "zones must be in [1, 24]"),
    ("fastv", {"layer": "5"}, "use 1 <= K <= 4"),
])
def test_model_bounds_are_stated(method, args, needle):
    with pytest.raises(MethodArgumentError) as exc:
        build_method(method, args).check_limits(LIMITS)
    assert needle in str(exc.value)
    build_method(method, {k: "4" for k in args}).check_limits(LIMITS)  # at the bound: fine


def test_gridprune_select_checks_zones_against_the_layout():
    # zones larger than the grid's side select nothing new (one token per zone already) and are refused
    m = build_method("gridprune", {"zones": "5", "guidance": "llm"})
    with pytest.raises(MethodArgumentError, match=r"\[1, 4\]"):
        m.select(_tokens(4), 4)


@pytest.mark.parametrize("method,key,value,needle", [
    ("gridprune", "tau", "1e-320", "tau must be a finite number >= 1e-06"),
    ("gridprune", "tau", "inf", "tau must be a finite"),
    ("gridprune", "alpha", "nan", "alpha"),
    ("gprune", "temperature", "1e-320", "temperature must be a finite number >= 0.001"),
    ("gprune", "temperature", "nan", "temperature"),
    ("gprune", "steps", "65", "[0, 64]"),
    ("gprune", "threshold", "nan", "threshold"),
    ("random", "seed", str(2**64), "[0, 2^64 - 1"),
    ("random", "seed", "-1", "[0, 2^64 - 1"),
])
def test_parameter_bounds(method, key, value, needle):
    with pytest.raises(MethodArgumentError) as exc:
        build_method(method, {key: value})
    assert needle in str(exc.value)


def test_random_seed_at_the_bound_runs():
    m = build_method("random", {"seed": str(2**64 - 1)})
    assert m.select(_tokens(), 3).shape == (1, 3)


def test_preset_limits_match_the_built_models(tiny_llava, tiny_llava_next):
    for name, loaded in (("tiny-llava", tiny_llava), ("tiny-llava-next", tiny_llava_next)):
        assert model_limits(name) == limits_from_config(loaded.config)
    assert model_limits("tiny-llava") == LIMITS
    nxt = model_limits("tiny-llava-next")
    assert (nxt.n_max, nxt.t_min, nxt.max_positions) == (576 + 48 * 48, 576, 8192)
    assert model_limits("llava-1.5-13b").num_layers == 40  # from the shipped config, nothing built
    assert model_limits("some/hub-id") is None  # only loading can tell


def test_next_n_max_is_reached_by_a_square_image(tiny_llava_next):
    from PIL import Image

    from edgeprune.api import build_pipeline

    pipe = build_pipeline("tiny-llava-next", "none", loaded=tiny_llava_next)
    res = pipe.run(Image.new("RGB", (672, 672), (90, 120, 30)), "x", max_new_tokens=1)
    assert res.n_visual == model_limits("tiny-llava-next").n_max
