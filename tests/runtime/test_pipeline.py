"""The torch pipeline against Hugging Face: unpruned tokens equal ``generate``; pruned runs equal ``generate``
over the same spliced ``inputs_embeds``; original positions equal a manual forward; errors and stop rules."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from edgeprune.api import build_pipeline
from edgeprune.errors import BudgetError, PromptError
from edgeprune.runtime.pipeline import position_ids
from edgeprune.runtime.preprocess import preprocess
from edgeprune.runtime.sampling import SamplingConfig

PROMPT = "What does the sign say?"
NEW = 10


def _hf_generate(loaded, image, result, new=NEW):
    """HF generate on the unpruned inputs: the image token expanded to T, pixels through HF's own vision path."""
    pix, size = preprocess(image, loaded.image_config)
    prefix, suffix = result.prompt_ids
    ids = torch.tensor([prefix + [loaded.image_token_id] * result.total_visual + suffix])
    kw = loaded.family.hf_image_kwargs(torch.from_numpy(pix), size)
    out = loaded.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                max_new_tokens=new, min_new_tokens=new, **kw)
    return out[0, ids.shape[1]:].tolist()


@pytest.mark.parametrize("fixture", ["tiny_llava", "tiny_llava_next"])
def test_unpruned_tokens_equal_hf_generate(fixture, request, rgb_image):
    loaded = request.getfixturevalue(fixture)
    pipe = build_pipeline("", "none", loaded=loaded)
    pipe.backend.eos_token_id = None  # generate exactly NEW tokens on both sides
    result = pipe.run(rgb_image, PROMPT, max_new_tokens=NEW)
    assert len(result.tokens) == NEW
    assert result.tokens == _hf_generate(loaded, rgb_image, result)
    assert result.kept.tolist() == list(range(result.n_visual))


@pytest.mark.parametrize("fixture,method,tokens", [("tiny_llava", "cls-topk", 64), ("tiny_llava", "uniform", 100),
                                                   ("tiny_llava_next", "cls-topk", 160)])
def test_pruned_answer_equals_hf_generate_over_spliced_embeds(fixture, method, tokens, request, rgb_image):
    loaded = request.getfixturevalue(fixture)
    pipe = build_pipeline("", method, tokens=tokens, loaded=loaded)
    pipe.backend.eos_token_id = None
    result = pipe.run(rgb_image, PROMPT, max_new_tokens=NEW)
    be = pipe.backend
    # the kept indices are the method's reference on the same visual tokens
    pix, size = preprocess(rgb_image, loaded.image_config)
    visual = be.encode_image(pix, size)
    assert result.kept.tolist() == pipe.backend.method.select(visual.tokens, tokens)[0].tolist()
    assert len(result.kept) == tokens
    embeds, _ = be.splice(*result.prompt_ids[:1], visual, result.kept, result.prompt_ids[1])
    with torch.inference_mode():
        out = loaded.model.generate(inputs_embeds=embeds, attention_mask=torch.ones(embeds.shape[:2], dtype=torch.long),
                                    do_sample=False, max_new_tokens=NEW, min_new_tokens=NEW)
    assert result.tokens == out[0, -NEW:].tolist()
    extra = 0 if fixture == "tiny_llava" else result.total_visual - result.n_visual  # NeXT newlines kept
    assert embeds.shape[1] == len(result.prompt_ids[0]) + tokens + extra + len(result.prompt_ids[1])


def test_original_positions_equal_manual_forward(tiny_llava, rgb_image):
    """With positions=original the prefill logits equal the LLM run on the same embeds with gathered positions."""
    pipe = build_pipeline("", "cls-topk", tokens=64, method_args={"positions": "original"}, loaded=tiny_llava)
    result = pipe.run(rgb_image, PROMPT, max_new_tokens=1)
    prefix, suffix = result.prompt_ids
    pos = result.position_ids
    assert pos[len(prefix) + 63] == len(prefix) + result.kept[-1]
    assert pos[-1] == len(prefix) + 576 + len(suffix) - 1
    be = pipe.backend
    pix, size = preprocess(rgb_image, tiny_llava.image_config)
    embeds, _ = be.splice(prefix, be.encode_image(pix, size), result.kept, suffix)
    with torch.inference_mode():
        h = tiny_llava.family.language_model(tiny_llava.model)(
            inputs_embeds=embeds, position_ids=torch.from_numpy(pos)[None]).last_hidden_state
        logits = tiny_llava.model.lm_head(h[:, -1])[0]
    assert result.tokens[0] == int(torch.argmax(logits))
    compact = build_pipeline("", "cls-topk", tokens=64, loaded=tiny_llava).run(rgb_image, PROMPT, max_new_tokens=1)
    assert compact.kept.tolist() == result.kept.tolist()
    assert not np.array_equal(compact.position_ids, result.position_ids)


def test_position_ids_conventions():
    kept = np.array([2, 5, 7])
    assert position_ids(3, 10, 2, kept, "compact").tolist() == [0, 1, 2, 3, 4, 5, 6, 7]
    assert position_ids(3, 10, 2, kept, "original").tolist() == [0, 1, 2, 5, 8, 10, 13, 14]
    with pytest.raises(ValueError):
        position_ids(3, 10, 2, kept, "sideways")


def test_decode_continues_after_unpruned_length_with_original_positions(tiny_llava, rgb_image):
    pipe = build_pipeline("", "uniform", tokens=16, method_args={"positions": "original"}, loaded=tiny_llava)
    pipe.backend.eos_token_id = None
    result = pipe.run(rgb_image, PROMPT, max_new_tokens=4)
    assert len(result.tokens) == 4 and result.stop_reason == "max_new_tokens"
    c = result.profile.counters
    assert c["visual_in"] == 576 and c["visual_kept"] == 16 and c["new_tokens"] == 4


def test_sampling_is_seeded(tiny_llava, rgb_image):
    pipe = build_pipeline("", "cls-topk", ratio=0.25, loaded=tiny_llava)
    pipe.backend.eos_token_id = None
    cfg = SamplingConfig(do_sample=True, temperature=1.5, top_p=0.9, seed=3)
    a = pipe.run(rgb_image, PROMPT, max_new_tokens=6, sampling=cfg).tokens
    b = pipe.run(rgb_image, PROMPT, max_new_tokens=6, sampling=cfg).tokens
    assert a == b and len(a) == 6
    assert len(pipe.run(rgb_image, PROMPT, max_new_tokens=1).kept) == 144  # round(0.25 * 576)


def test_stops_at_eos(tiny_llava, rgb_image):
    pipe = build_pipeline("", "none", loaded=tiny_llava)
    first = pipe.run(rgb_image, PROMPT, max_new_tokens=1).tokens[0]
    pipe.backend.eos_token_id = first  # pretend the first greedy token is EOS
    result = pipe.run(rgb_image, PROMPT, max_new_tokens=8)
    assert result.tokens == [first] and result.stop_reason == "eos"


def test_profile_has_every_stage(tiny_llava, rgb_image):
    result = build_pipeline("", "cls-topk", tokens=64, loaded=tiny_llava).run(rgb_image, PROMPT, max_new_tokens=3)
    prof = result.profile
    for stage in ("preprocess", "vision", "prune", "embed", "prefill"):
        assert len(prof.spans[stage]) == 1 and prof.spans[stage][0] >= 0
    assert 0 < prof.ttft <= prof.total
    assert "prefill" in prof.table() and prof.to_dict()["counters"]["visual_kept"] == 64
    trace = prof.chrome_trace()["traceEvents"]
    assert {e["name"] for e in trace} >= {"vision", "prefill"} and all(e["ph"] == "X" for e in trace)


def test_budget_larger_than_image_tokens(tiny_llava, rgb_image):
    with pytest.raises(BudgetError, match="577"):
        build_pipeline("", "cls-topk", tokens=577, loaded=tiny_llava).run(rgb_image, PROMPT)


def test_prompt_errors(tiny_llava, rgb_image):
    pipe = build_pipeline("", "none", loaded=tiny_llava)
    with pytest.raises(PromptError, match="must not contain"):
        pipe.run(rgb_image, "look at <image> please")
    with pytest.raises(PromptError, match="empty"):
        pipe.run(rgb_image, "   ")
    with pytest.raises(PromptError, match="context"):
        pipe.run(rgb_image, "word " * 4000, max_new_tokens=4)


@pytest.mark.parametrize("fixture,method,tokens", [("tiny_llava", "gridprune", 64), ("tiny_llava", "gprune", 64),
                                                   ("tiny_llava_next", "gridprune", 320),
                                                   ("tiny_llava_next", "gprune", 320)])
def test_seed_methods_run_with_their_position_convention(fixture, method, tokens, request, rgb_image):
    """GridPrune (compact) and G-Prune (original positions) keep exactly K and decode to completion."""
    loaded = request.getfixturevalue(fixture)
    pipe = build_pipeline("", method, tokens=tokens, loaded=loaded)
    pipe.backend.eos_token_id = None
    result = pipe.run(rgb_image, PROMPT, max_new_tokens=4)
    assert len(result.kept) == tokens and len(result.tokens) == 4
    assert list(result.kept) == sorted(set(result.kept.tolist()))
    prefix, suffix = result.prompt_ids
    if method == "gprune":
        assert result.position_ids[-1] == len(prefix) + result.total_visual + len(suffix) - 1
    else:
        assert result.position_ids[-1] == len(result.position_ids) - 1


def test_fastv_with_nothing_to_drop_equals_unpruned(tiny_llava, rgb_image):
    runs = []
    for method, ratio in (("none", None), ("fastv", 1.0)):
        pipe = build_pipeline("", method, ratio=ratio, loaded=tiny_llava)
        pipe.backend.eos_token_id = None
        runs.append(pipe.run(rgb_image, PROMPT, max_new_tokens=NEW))
    assert runs[0].tokens == runs[1].tokens
    assert runs[1].profile.counters["layer_tokens"] == [576] * 4


@pytest.mark.parametrize("fixture", ["tiny_llava", "tiny_llava_next"])
def test_fastv_drops_after_layer_k_and_decodes_with_ragged_cache(fixture, request, rgb_image):
    loaded = request.getfixturevalue(fixture)
    pipe = build_pipeline("", "fastv", tokens=64, loaded=loaded)
    pipe.backend.eos_token_id = None
    result = pipe.run(rgb_image, PROMPT, max_new_tokens=5)
    c = result.profile.counters
    newlines = result.total_visual - result.n_visual  # NeXT newline tokens are never dropped
    assert c["layer_tokens"] == [result.total_visual] * 2 + [64 + newlines] * 2
    assert len(result.kept) == 64 == c["visual_kept"] and len(result.tokens) == 5
    assert c["cache_lengths"][0] - c["cache_lengths"][2] == result.n_visual - 64
    assert result.position_ids[-1] == len(result.prompt_ids[0]) + result.total_visual + len(result.prompt_ids[1]) - 1


def test_fitprune_follows_its_recipe_in_the_pipeline(tiny_llava, rgb_image, tmp_path):
    from edgeprune.methods.fitprune_recipe import Recipe, save_recipe

    drops = [100, 200, 76, 50]
    path = tmp_path / "recipe.json"
    save_recipe(Recipe(budget=0.7, n_visual=576, num_layers=4, drops=tuple(drops)), str(path))
    pipe = build_pipeline("", "fitprune", method_args={"recipe": str(path)}, loaded=tiny_llava)
    pipe.backend.eos_token_id = None
    result = pipe.run(rgb_image, PROMPT, max_new_tokens=3)
    assert result.profile.counters["layer_tokens"] == [576, 476, 276, 200]
    assert len(result.kept) == 576 - sum(drops) and len(result.tokens) == 3
