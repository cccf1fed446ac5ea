"""FastV: parameters and budget, nothing-to-drop equals unpruned, kept tokens equal the stable top-K of the
last token's head-mean attention at layer K-1 (from eager HF), original positions, NeXT newlines kept,
generation to completion."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from edgeprune.errors import BudgetError, MethodArgumentError
from edgeprune.methods import Budget, TokenLayout, VisualTokens, inllm
from edgeprune.methods.fastv import FastV, FastVParams
from edgeprune.methods.functional import stable_topk

from _inllm_inputs import eager_attentions, unpruned_inputs  # noqa: E402  (shared test helper)


def _run(loaded, image, method, budget=Budget()):
    embeds, pos, vs, t, prunable, n = unpruned_inputs(loaded, image)
    lm = loaded.family.language_model(loaded.model)
    plan = method.layer_plan(n, len(lm.layers), budget)
    return lm, inllm.prefill(lm, embeds, pos, vs, t, plan, prunable)


def test_class_and_params():
    assert (FastV.name, FastV.placement, FastV.default_positions, FastV.uses_budget) == ("fastv", "in_llm",
                                                                                         "original", True)
    assert "2403.06764" in FastV.paper
    m = FastV.from_args({"layer": "3"})
    assert m.params.layer == 3 and m.positions == "original"
    assert FastV.from_args({"positions": "compact"}).positions == "compact"
    with pytest.raises(MethodArgumentError, match="layer"):
        FastV.from_args({"layer": "0"})
    with pytest.raises(MethodArgumentError, match="exceeds"):
        FastV(FastVParams(layer=5)).layer_plan(576, 4)
    with pytest.raises(TypeError, match="inside the LLM"):
        FastV().select(VisualTokens(torch.zeros(1, 4, 8), torch.zeros(1, 4), TokenLayout.single_view(2, 2)), 1)


def test_keep_count_default_half_and_budget():
    m = FastV()
    assert m.keep_count(Budget(), 576) == 288
    assert m.keep_count(Budget(), 7) == 4  # round(3.5) = 4 (banker's rounding of Budget.resolve)
    assert m.keep_count(Budget(tokens=64), 576) == 64
    assert m.keep_count(Budget(ratio=0.25), 576) == 144
    with pytest.raises(BudgetError):
        m.keep_count(Budget(tokens=600), 576)


@pytest.mark.parametrize("fixture", ["tiny_llava", "tiny_llava_next"])
def test_nothing_to_drop_equals_unpruned(fixture, request, rgb_image):
    loaded = request.getfixturevalue(fixture)
    embeds, pos, vs, t, prunable, n = unpruned_inputs(loaded, rgb_image)
    lm, state = _run(loaded, rgb_image, FastV(), Budget(tokens=n))
    ref = inllm.prefill(lm, embeds, pos, vs, t, None, prunable)
    assert torch.equal(state.last_hidden, ref.last_hidden)
    assert state.visual_counts == [t] * 4 and state.visual_kept.tolist() == list(range(t))


@pytest.mark.parametrize("layer", [1, 2])
def test_kept_tokens_are_top_last_token_attention_at_layer_k_minus_1(layer, tiny_llava, rgb_image):
    embeds, pos, vs, t, _, n = unpruned_inputs(tiny_llava, rgb_image)
    k = 64
    lm, state = _run(tiny_llava, rgb_image, FastV(FastVParams(layer=layer)), Budget(tokens=k))
    assert state.visual_counts == [576] * layer + [k] * (4 - layer)
    # reference: eager HF attention of the unpruned model (layers < K are unaffected by the pruning)
    attentions = eager_attentions(tiny_llava, lm, embeds, pos)
    scores = attentions[layer - 1][0, :, -1, vs:vs + t].mean(0)
    expected = stable_topk(scores.unsqueeze(0), k)[0]
    assert state.visual_kept.tolist() == expected.tolist()
    assert state.position_ids[0, vs:vs + k].tolist() == (vs + expected).tolist()  # original positions
    assert int(state.position_ids[0, -1]) == int(pos[-1])
    assert state.visual_depth[expected].eq(4).all() and int((state.visual_depth == layer).sum()) == 576 - k


def test_next_newlines_are_kept_and_budget_counts_prunable_only(tiny_llava_next, rgb_image):
    _, _, _, t, prunable, n = unpruned_inputs(tiny_llava_next, rgb_image)
    lm, state = _run(tiny_llava_next, rgb_image, FastV(), Budget(ratio=0.1))
    k = Budget(ratio=0.1).resolve(n)
    newlines = t - n
    assert newlines > 0 and state.visual_counts == [t, t, k + newlines, k + newlines]
    kept = set(state.visual_kept.tolist())
    assert set(np.flatnonzero(~prunable.numpy()).tolist()) <= kept


@pytest.mark.parametrize("fixture", ["tiny_llava", "tiny_llava_next"])
def test_generation_runs_to_completion(fixture, request, rgb_image):
    loaded = request.getfixturevalue(fixture)
    embeds, pos, *_ = unpruned_inputs(loaded, rgb_image)
    lm, state = _run(loaded, rgb_image, FastV())
    head, embed = loaded.family.lm_head(loaded.model), loaded.family.embed_tokens(loaded.model)
    before = state.cache_lengths
    tokens, p = [], int(pos[-1]) + 1
    with torch.no_grad():
        hidden = state.last_hidden
        for step in range(8):
            tokens.append(int(head(hidden).argmax()))
            hidden = inllm.decode_step(lm, state, embed(torch.tensor([[tokens[-1]]])), p + step)
    assert len(tokens) == 8 and all(0 <= x < loaded.model.config.text_config.vocab_size for x in tokens)
    assert state.cache_lengths == [c + 8 for c in before] and before[1] > before[2]
    assert torch.isfinite(hidden).all()
