"""GridPrune's CLIP guidance: the text [EOS] embedding, chunking, CLIP-space patch embeddings, --clip errors."""

from __future__ import annotations

import pytest
import torch

from edgeprune.api import build_pipeline
from edgeprune.errors import MethodArgumentError, ModelLoadError
from edgeprune.models.clip_guidance import TINY_CLIP, load_clip


@pytest.fixture(scope="module")
def clip(tiny_llava):
    return load_clip(TINY_CLIP, tiny_llava.config.vision_config)


def test_text_embed_is_eos_state_projected_and_normalised(clip):
    emb = clip.text_embed("What does the sign say?")
    assert emb.shape == (1, clip.model.config.projection_dim)
    assert torch.allclose(emb.norm(dim=-1), torch.ones(1), atol=1e-5)
    ids = clip._chunks("What does the sign say?")[0]
    assert ids[0] == clip.tokenizer.bos_token_id and ids[-1] == clip.tokenizer.eos_token_id
    # HF's own pooler takes argmax(input_ids) when eos_token_id == 2 (a legacy rule): pool [EOS] explicitly
    with torch.inference_mode():
        states = clip.model.text_model(input_ids=torch.tensor([ids])).last_hidden_state
        expected = clip.model.text_projection(states[:, ids.index(clip.tokenizer.eos_token_id)])
    assert torch.allclose(emb, torch.nn.functional.normalize(expected, dim=-1), atol=1e-5)
    assert not torch.allclose(emb, clip.text_embed("A completely different question about cats"))


def test_long_questions_are_chunked(clip):
    long_q = "describe the red car and the sign " * 40
    chunks = clip._chunks(long_q)
    assert len(chunks) > 1 and all(len(c) <= clip.context for c in chunks)
    parts = [clip.text_embed(clip.tokenizer.decode(c[1:-1])) for c in chunks]
    expected = torch.nn.functional.normalize(torch.stack(parts).mean(dim=0), dim=-1)
    assert torch.allclose(clip.text_embed(long_q), expected, atol=1e-4)


def test_patch_embeds_use_post_layernorm_and_visual_projection(clip, tiny_llava, rgb_image):
    from edgeprune.runtime.preprocess import preprocess

    pix, size = preprocess(rgb_image, tiny_llava.image_config)
    seq = tiny_llava.family.visual_sequence(tiny_llava.model, torch.from_numpy(pix), size,
                                            tiny_llava.image_config, clip)
    tower = tiny_llava.model.model.vision_tower
    with torch.inference_mode():
        h = tower(torch.from_numpy(pix), output_hidden_states=True).hidden_states[-2][:, 1:]
        expected = torch.nn.functional.normalize(clip.model.visual_projection(tower.post_layernorm(h)), dim=-1)
    torch.testing.assert_close(seq.tokens.clip_embeds, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("fixture,k", [("tiny_llava", 64), ("tiny_llava_next", 320)])
def test_gridprune_guidance_modes_in_the_pipeline(fixture, k, request, rgb_image):
    loaded = request.getfixturevalue(fixture)
    kept = {}
    for mode in ("auto", "clip", "llm"):
        pipe = build_pipeline("", "gridprune", tokens=k, method_args={"guidance": mode}, loaded=loaded)
        result = pipe.run(rgb_image, "What does the sign say?", max_new_tokens=1)
        assert len(result.kept) == k and "guidance" in result.profile.spans
        kept[mode] = result.kept.tolist()
    assert kept["auto"] == kept["clip"]  # the offline presets come with tiny-clip
    assert kept["llm"] != kept["clip"]


def test_clip_guidance_without_clip_is_a_clear_error(tiny_llava, rgb_image):
    from dataclasses import replace

    not_offline = replace(tiny_llava, source="directory")  # a checkpoint without a CLIP: no default CLIP
    pipe = build_pipeline("", "gridprune", tokens=64, method_args={"guidance": "clip"}, loaded=not_offline)
    with pytest.raises(MethodArgumentError, match="--clip"):
        pipe.run(rgb_image, "What does the sign say?", max_new_tokens=1)
    auto = build_pipeline("", "gridprune", tokens=64, loaded=not_offline)  # auto falls back to llm
    assert len(auto.run(rgb_image, "What does the sign say?", max_new_tokens=1).kept) == 64


def test_bad_clip_checkpoint(tiny_llava, tmp_path):
    with pytest.raises(ModelLoadError, match="--clip"):
        load_clip(str(tmp_path / "missing"), tiny_llava.config.vision_config)
