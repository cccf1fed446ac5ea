"""The in-LLM loop against Hugging Face: unpruned logits and decoding equal the HF decoder, attention statistics
equal eager HF attentions, and drops follow the spec (keys at layer l, gone from l + 1, ragged cache)."""

from __future__ import annotations

import contextlib
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from edgeprune.errors import EdgepruneError
from edgeprune.methods import build_method, inllm
from edgeprune.runtime.pipeline import position_ids
from edgeprune.runtime.preprocess import preprocess
from edgeprune.runtime.prompt import split_prompt
from edgeprune.runtime.torch_backend import TorchBackend

PROMPT = "What does the sign say?"




_CACHE: dict = {}


def _inputs(loaded, image, kept=None):
    """(backend, embeds [1,L,D], positions [L] original, visual_start, T, prunable [T]) for one request (cached)."""
    key = (id(loaded), None if kept is None else tuple(kept))
    if key not in _CACHE:
        _CACHE[key] = _encode(loaded, image, kept)
    return _CACHE[key]


def _encode(loaded, image, kept):
    be = TorchBackend(loaded, build_method("none"))
    pix, size = preprocess(image, loaded.image_config)
    visual = be.encode_image(pix, size)
    before, after = split_prompt(loaded.template, PROMPT)
    prefix, suffix = be.codec.encode(before, add_bos=True), be.codec.encode(after, add_bos=False)
    kept = np.arange(visual.n) if kept is None else kept
    embeds, kept_pos = be.splice(prefix, visual, kept, suffix)
    pos = position_ids(len(prefix), visual.total, len(suffix), kept_pos, "original")
    prunable = np.isin(kept_pos, visual.prunable_pos)
    return be, embeds.clone(), pos, len(prefix), len(kept_pos), torch.from_numpy(prunable)


def _logits(loaded, hidden):
    with torch.no_grad():
        return loaded.family.lm_head(loaded.model)(hidden)[0].float().numpy()


@contextlib.contextmanager
def _eager(loaded):
    """Switch the shared model to eager attention (HF returns attentions only then) and restore it."""
    before = loaded.model.config._attn_implementation
    loaded.model.set_attn_implementation("eager")
    try:
        yield loaded.family.language_model(loaded.model)
    finally:
        loaded.model.set_attn_implementation(before)


class DropAt:
    """A fixed plan: drop the given original visual indices at the given layers (for exact references)."""

    def __init__(self, drops: dict[int, list[int]]) -> None:
        self.drops = drops

    def __call__(self, probe):
        gone = set(self.drops.get(probe.layer, []))
        if not gone:
            return None
        return torch.tensor([i for i, v in enumerate(probe.visual_index.tolist()) if v not in gone])


@pytest.mark.parametrize("fixture", ["tiny_llava", "tiny_llava_next"])
def test_empty_plan_equals_hf_logits_and_decoding(fixture, request, rgb_image):
    loaded = request.getfixturevalue(fixture)
    be, embeds, pos, vs, t, prunable = _inputs(loaded, rgb_image)
    lm = loaded.family.language_model(loaded.model)
    ref = be.prefill(embeds, pos)  # HF LlamaModel/MistralModel with a DynamicCache
    state = inllm.prefill(lm, embeds, torch.from_numpy(pos), vs, t, None, prunable)
    np.testing.assert_allclose(_logits(loaded, state.last_hidden), ref, atol=1e-5)
    assert state.visual_counts == [t] * len(lm.layers) and state.cache_lengths == [embeds.shape[1]] * len(lm.layers)
    token, p = int(ref.argmax()), int(pos[-1]) + 1
    for _ in range(6):  # greedy decoding with the ragged-cache code path equals HF's own cache
        ref = be.decode(token, p)
        emb = loaded.family.embed_tokens(loaded.model)(torch.tensor([[token]]))
        mine = _logits(loaded, inllm.decode_step(lm, state, emb, p))
        np.testing.assert_allclose(mine, ref, atol=1e-5)
        assert int(mine.argmax()) == int(ref.argmax())
        token, p = int(ref.argmax()), p + 1
    assert state.cache_lengths == [embeds.shape[1] + 6] * len(lm.layers)


def test_gapped_original_positions_equal_hf(tiny_llava, rgb_image):
    """Pre-LLM pruned input with original (gapped) positions: HF with a mask and a cache does no packing."""
    kept = np.arange(0, 576, 5)
    be, embeds, pos, vs, t, _ = _inputs(tiny_llava, rgb_image, kept)
    assert t == len(kept) and pos[-1] > embeds.shape[1]
    lm = tiny_llava.family.language_model(tiny_llava.model)
    state = inllm.prefill(lm, embeds, torch.from_numpy(pos), vs, t)
    np.testing.assert_allclose(_logits(tiny_llava, state.last_hidden), be.prefill(embeds, pos), atol=1e-5)


@pytest.mark.parametrize("fixture", ["tiny_llava", "tiny_llava_next"])
def test_attention_statistics_equal_eager_hf(fixture, request, rgb_image):
    loaded = request.getfixturevalue(fixture)
    _, embeds, pos, vs, t, _ = _inputs(loaded, rgb_image)
    seen = {}

    def record(probe):
        seen[probe.layer] = (probe.attention(torch.arange(probe.seq_len)), inllm.last_row_visual_attention(probe))

    with _eager(loaded) as lm, torch.no_grad():
        out = lm(inputs_embeds=embeds, position_ids=torch.from_numpy(pos).unsqueeze(0), output_attentions=True,
                 attention_mask=torch.ones(embeds.shape[:2], dtype=torch.long))
        inllm.prefill(lm, embeds, torch.from_numpy(pos), vs, t, record)
    for layer, hf in enumerate(out.attentions):
        probs, last = seen[layer]
        torch.testing.assert_close(probs, hf[0], atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(probs.amax(0), hf[0].amax(0), atol=1e-6, rtol=1e-5)  # FitPrune's head max
        torch.testing.assert_close(last, hf[0, :, -1, vs:vs + t].mean(0), atol=1e-6, rtol=1e-5)  # FastV's row


def _masked_hf_reference(lm, embeds, pos, vs, drops):
    """Run HF's own decoder layers on the full sequence; a token dropped at layer l is masked out as a key from
    layer l + 1 on. Kept rows never see dropped rows, so the last token equals the pruned loop exactly."""
    s = embeds.shape[1]
    pos_t = torch.from_numpy(pos).unsqueeze(0)
    cos_sin = lm.rotary_emb(embeds, position_ids=pos_t)
    visible = torch.ones(s, dtype=torch.bool)
    hidden = embeds
    for layer_idx, layer in enumerate(lm.layers):
        mask = torch.tril(torch.ones(s, s, dtype=torch.bool)) & visible.unsqueeze(0)
        mask |= torch.eye(s, dtype=torch.bool)  # dropped rows keep a valid softmax; they never reach kept rows
        hidden = layer(hidden, attention_mask=mask[None, None], position_embeddings=cos_sin, position_ids=pos_t)
        for v in drops.get(layer_idx, []):
            visible[vs + v] = False
    return lm.norm(hidden[:, -1])


def test_drops_match_masked_hf_layers_and_keep_positions(tiny_llava, rgb_image):
    _, embeds, pos, vs, t, _ = _inputs(tiny_llava, rgb_image)
    lm = tiny_llava.family.language_model(tiny_llava.model)
    drops = {0: list(range(0, 576, 3)), 2: list(range(1, 400, 3))}
    state = inllm.prefill(lm, embeds, torch.from_numpy(pos), vs, t, DropAt(drops))
    with torch.no_grad():
        ref = _masked_hf_reference(lm, embeds, pos, vs, drops)
    torch.testing.assert_close(state.last_hidden, ref, atol=1e-5, rtol=1e-5)
    n0, n2 = len(drops[0]), len(drops[2])
    assert state.visual_counts == [576, 576 - n0, 576 - n0, 576 - n0 - n2]
    text = embeds.shape[1] - t
    assert state.cache_lengths == [text + c for c in state.visual_counts]  # layer l holds what entered it
    survivors = sorted(set(range(576)) - set(drops[0]) - set(drops[2]))
    assert state.visual_kept.tolist() == survivors
    assert state.position_ids[0, vs:vs + len(survivors)].tolist() == (vs + np.array(survivors)).tolist()
    assert state.position_ids[0, -1] == pos[-1]  # text after the image keeps its unpruned position
    depth = state.visual_depth.tolist()
    assert depth[0] == 1 and depth[1] == 3 and depth[2] == 4  # 0 dropped at layer 0, 1 at layer 2, 2 survives


def test_drop_at_last_layer_changes_nothing(tiny_llava_next, rgb_image):
    _, embeds, pos, vs, t, prunable = _inputs(tiny_llava_next, rgb_image)
    lm = tiny_llava_next.family.language_model(tiny_llava_next.model)
    full = inllm.prefill(lm, embeds, torch.from_numpy(pos), vs, t, None, prunable)
    cut = np.flatnonzero(prunable.numpy())[::2].tolist()
    late = inllm.prefill(lm, embeds, torch.from_numpy(pos), vs, t, DropAt({len(lm.layers) - 1: cut}), prunable)
    torch.testing.assert_close(late.last_hidden, full.last_hidden, atol=1e-6, rtol=1e-6)
    assert late.visual_counts[-1] == t and late.visual_kept.numel() == t - len(cut)


def test_decode_with_ragged_cache_equals_prefill_of_longer_prompt(tiny_llava_next, rgb_image):
    """A decoded token at layer l attends exactly the tokens that entered layer l: same as prefilling it."""
    _, embeds, pos, vs, t, prunable = _inputs(tiny_llava_next, rgb_image)
    lm = tiny_llava_next.family.language_model(tiny_llava_next.model)
    cand = np.flatnonzero(prunable.numpy())
    plan = DropAt({1: cand[::2].tolist(), 2: cand[1::4].tolist()})
    state = inllm.prefill(lm, embeds, torch.from_numpy(pos), vs, t, plan, prunable)
    with torch.no_grad():
        new = tiny_llava_next.family.embed_tokens(tiny_llava_next.model)(torch.tensor([[5, 17]]))
    p = int(pos[-1]) + 1
    h1 = inllm.decode_step(lm, state, new[:, :1], p)
    h2 = inllm.decode_step(lm, state, new[:, 1:], p + 1)
    for n_new, h in ((1, h1), (2, h2)):
        longer = inllm.prefill(lm, torch.cat([embeds, new[:, :n_new]], 1),
                               torch.from_numpy(np.append(pos, np.arange(p, p + n_new))), vs, t, plan, prunable)
        torch.testing.assert_close(h, longer.last_hidden, atol=1e-5, rtol=1e-5)
    base = inllm.prefill(lm, embeds, torch.from_numpy(pos), vs, t, plan, prunable)
    assert state.cache_lengths == [c + 2 for c in base.cache_lengths]
    assert base.cache_lengths[0] == base.cache_lengths[1] > base.cache_lengths[2] > base.cache_lengths[3]  # ragged


def test_multi_token_decode_chunk_equals_single_steps(tiny_llava, rgb_image):
    _, embeds, pos, vs, t, _ = _inputs(tiny_llava, rgb_image)
    lm = tiny_llava.family.language_model(tiny_llava.model)
    with torch.no_grad():
        new = tiny_llava.family.embed_tokens(tiny_llava.model)(torch.tensor([[7, 9, 11]]))
    a = inllm.prefill(lm, embeds, torch.from_numpy(pos), vs, t, DropAt({0: list(range(100))}))
    b = inllm.prefill(lm, embeds, torch.from_numpy(pos), vs, t, DropAt({0: list(range(100))}))
    p = int(pos[-1]) + 1
    for i in range(3):
        last = inllm.decode_step(lm, a, new[:, i:i + 1], p + i)
    torch.testing.assert_close(inllm.decode_step(lm, b, new, p), last, atol=1e-5, rtol=1e-5)
    assert a.cache_lengths == b.cache_lengths


def test_keep_top_visual_ties_and_protection():
    scores = torch.tensor([0.5, 0.1, 0.5, 0.1, 0.9, 0.0])
    prunable = torch.tensor([True, True, True, True, True, False])
    assert inllm.keep_top_visual(scores, prunable, 2).tolist() == [0, 2, 4, 5]  # 0.1 tie: index 3 then 1 go
    assert inllm.keep_top_visual(scores, prunable, 1).tolist() == [0, 1, 2, 4, 5]  # higher index 3 goes first
    assert inllm.keep_top_visual(scores, prunable, 0) is None
    assert inllm.keep_top_visual(scores, prunable, 99).tolist() == [5]  # protected token always survives
    assert inllm.causal_mask(2, 4).tolist() == [[True, True, True, False], [True, True, True, True]]


def test_bad_plans_and_inputs_are_errors(tiny_llava):
    lm = tiny_llava.family.language_model(tiny_llava.model)
    embeds = torch.randn(1, 12, lm.config.hidden_size, generator=torch.Generator().manual_seed(0))
    pos = torch.arange(12)
    with pytest.raises(RuntimeError, match="ascending"):
        inllm.prefill(lm, embeds, pos, 2, 6, lambda p: torch.tensor([3, 1]))
    with pytest.raises(RuntimeError, match="protected"):
        inllm.prefill(lm, embeds, pos, 2, 6, lambda p: torch.tensor([1, 2, 3]),
                      prunable=torch.tensor([False, True, True, True, True, True]))
    with pytest.raises(RuntimeError, match="outside"):
        inllm.prefill(lm, embeds, pos, 2, 6, lambda p: torch.tensor([0, 6]))
    with pytest.raises(ValueError):
        inllm.prefill(lm, embeds, pos[:5], 2, 6)
    with pytest.raises(ValueError):
        inllm.prefill(lm, embeds, pos, 8, 6)
    sliding = SimpleNamespace(config=SimpleNamespace(sliding_window=8), layers=lm.layers, norm=lm.norm,
                              rotary_emb=lm.rotary_emb)
    with pytest.raises(EdgepruneError, match="sliding"):
        inllm.prefill(sliding, embeds, pos, 2, 6)


@pytest.mark.parametrize("heads,kv_heads,q_len,kv_len", [(4, 4, 7, 7), (4, 2, 3, 11), (4, 1, 1, 9)])
def test_eager_attention_equals_sdpa(heads, kv_heads, q_len, kv_len):
    """The export formulation (below opset 23) equals SDPA: GQA, bottom-right causal masks, no mask."""
    gen = torch.Generator().manual_seed(heads + q_len)
    q = torch.randn(1, heads, q_len, 16, generator=gen)
    k, v = (torch.randn(1, kv_heads, kv_len, 16, generator=gen) for _ in range(2))
    for mask in (inllm.causal_mask(q_len, kv_len), None):
        want = inllm.attend(q, k, v, 0.25, mask)
        got = inllm.attend(q, k, v, 0.25, mask, eager=True)
        assert got.shape == (1, q_len, heads * 16) and torch.allclose(got, want, atol=1e-6)
