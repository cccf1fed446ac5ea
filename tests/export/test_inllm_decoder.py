"""The exportable in-LLM graphs (FastV / FitPrune prefill, ragged decode) against ``methods.inllm`` in PyTorch:
same logits, same ragged cache, same survivors, with protected (newline) tokens, texts before and after the
image, and the drop counts written as functions of N (what becomes shape arithmetic in the ONNX graph)."""

from __future__ import annotations

import pytest
import torch

from edgeprune.export.inllm_decoder import DropSchedule, InLLMDecodeGraph, InLLMPrefillGraph
from edgeprune.methods import inllm
from edgeprune.methods.base import Budget
from edgeprune.methods.fastv import FastV, FastVParams
from edgeprune.methods.fitprune import FitPrune
from edgeprune.methods.fitprune_recipe import Recipe

DROPS = (100, 200, 0, 50)


def plans(kind, n, keep=64):
    """(schedule, reference plan) for an image with n prunable tokens."""
    if kind == "fastv":
        return (DropSchedule("fastv", 4, fastv_layer=2, keep=keep),
                FastV(FastVParams(layer=2)).layer_plan(n, 4, Budget(tokens=keep)))
    recipe = Recipe(budget=0.5, n_visual=576, num_layers=4, drops=DROPS)
    return DropSchedule("fitprune", 4, drops=DROPS, n_ref=576), FitPrune(recipe=recipe).layer_plan(n, 4)


@pytest.mark.parametrize("kind", ["fastv", "fitprune"])
@pytest.mark.parametrize("layout", ["llava", "next"])
def test_prefill_graph_equals_reference(kind, layout, tiny_llava, tiny_llava_next):
    loaded = tiny_llava if layout == "llava" else tiny_llava_next
    lm = loaded.family.language_model(loaded.model)
    head = loaded.family.lm_head(loaded.model)
    gen = torch.Generator().manual_seed(0)
    start, total = 9, 576 if layout == "llava" else 700
    length = start + total + 12
    protected = torch.zeros(total, dtype=torch.bool)
    if layout == "next":
        protected[torch.arange(600, total, 5)] = True  # newline-like tokens are never dropped
    prunable = ~protected
    n = int(prunable.sum())
    embeds = torch.randn(1, length, 64, generator=gen)
    pos = torch.arange(length).unsqueeze(0) * 2  # any increasing positions
    schedule, plan = plans(kind, n)
    graph = InLLMPrefillGraph(loaded, schedule).eval()
    with torch.no_grad():
        out = graph(embeds, pos, torch.tensor([start]), torch.tensor([total]), torch.nonzero(prunable).flatten())
        state = inllm.prefill(lm, embeds, pos, start, total, plan, prunable)
        want_logits = head(state.last_hidden)
    assert torch.allclose(out[0], want_logits, atol=1e-5)
    assert [k.shape[2] for k in out[1:-1:2]] == state.cache_lengths
    for got, want in zip(out[1:-1], [t for kv in zip(state.keys, state.values) for t in kv]):
        assert torch.allclose(got, want, atol=1e-5)
    kept = out[-1][0]
    visual = kept[(kept >= start) & (kept < start + total)] - start
    assert torch.equal(visual, state.visual_kept)
    assert bool(protected[visual].sum() == protected.sum())  # every protected token survives


def test_decode_graph_continues_the_ragged_cache(tiny_llava):
    lm = tiny_llava.family.language_model(tiny_llava.model)
    head = tiny_llava.family.lm_head(tiny_llava.model)
    gen = torch.Generator().manual_seed(1)
    embeds = torch.randn(1, 600, 64, generator=gen)
    pos = torch.arange(600).unsqueeze(0)
    schedule, plan = plans("fitprune", 576)
    with torch.no_grad():
        state = inllm.prefill(lm, embeds, pos, 10, 576, plan)
        past = [t for kv in zip(state.keys, state.values) for t in kv]
        for q in (1, 3):
            new = torch.randn(1, q, 64, generator=gen)
            out = InLLMDecodeGraph(tiny_llava).eval()(new, torch.arange(600, 600 + q).unsqueeze(0), *past)
            want = head(inllm.decode_step(lm, state, new, 600))
            assert torch.allclose(out[0], want, atol=1e-5)
            assert [k.shape[2] for k in out[1::2]] == state.cache_lengths
            past = list(out[1:])


def test_schedule_drop_counts_follow_the_recipe_rescaling():
    fit = DropSchedule("fitprune", 4, drops=DROPS, n_ref=576)
    for n in (576, 1344, 2000):
        want = [d * n // 576 for d in DROPS]
        assert [fit.at(layer, n) or 0 for layer in range(4)] == want
    assert fit.at(2, 1000) is None  # a layer with no recipe drop computes no statistics
    fast = DropSchedule("fastv", 4, fastv_layer=2, keep=64)
    assert [fast.at(layer, 576) for layer in range(4)] == [None, 512, None, None]
    assert fast.to_dict() == {"kind": "fastv", "layer": 2, "keep": 64}
    with pytest.raises(ValueError):
        DropSchedule("pdrop", 4)
