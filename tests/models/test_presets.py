"""Model presets: offline tiny builders, shipped configs of the named presets, loading paths and their errors."""

from __future__ import annotations

import json
import os

import pytest
import torch

from edgeprune.errors import ModelLoadError, UnknownModelError
from edgeprune.models.loader import load_model
from edgeprune.models.registry import PRESETS, get_preset
from edgeprune.models.tiny import build_random_model, tiny_config


def _checksum(model) -> float:
    return float(sum(p.detach().double().sum() for p in model.parameters()))


def test_tiny_presets_are_real_and_deterministic(tiny_llava, tiny_llava_next):
    cfg = tiny_llava.config
    assert cfg.vision_config.image_size // cfg.vision_config.patch_size == 24  # 576 tokens
    assert cfg.vision_config.num_hidden_layers >= 2 and cfg.text_config.num_hidden_layers >= 2
    assert cfg.text_config.num_key_value_heads == cfg.text_config.num_attention_heads  # MHA like Vicuna
    ncfg = tiny_llava_next.config
    assert ncfg.text_config.model_type == "mistral"
    assert ncfg.text_config.num_key_value_heads < ncfg.text_config.num_attention_heads  # GQA like Mistral
    assert ncfg.image_grid_pinpoints and tiny_llava_next.image_config.anyres
    again = load_model("tiny-llava")
    assert _checksum(again.model) == _checksum(tiny_llava.model)


def test_building_does_not_touch_global_rng():
    torch.manual_seed(7)
    expected = torch.rand(3)
    torch.manual_seed(7)
    build_random_model(tiny_config("tiny-llava"))
    assert torch.equal(torch.rand(3), expected)


def test_mini_llava_is_about_60m_parameters():
    model = build_random_model(tiny_config("mini-llava"), device="meta")
    n = sum(p.numel() for p in model.parameters())
    assert 50e6 < n < 70e6, n
    assert model.config.text_config.vocab_size == 32000


@pytest.mark.parametrize("name,billions", [("llava-1.5-7b", 7.06), ("llava-1.5-13b", 13.35),
                                           ("llava-next-7b", 7.06), ("llava-next-mistral-7b", 7.57)])
def test_named_presets_build_their_architecture_offline(name, billions):
    """--random-weights builds the exact architecture from the shipped config (on the meta device here)."""
    import transformers

    cfg = dict(get_preset(name).shipped_config())
    model_type = cfg.pop("model_type")
    cfg.pop("architectures")
    config = transformers.AutoConfig.for_model(model_type, **cfg)
    model = build_random_model(config, device="meta")
    n = sum(p.numel() for p in model.parameters()) / 1e9
    assert abs(n - billions) < 0.05, n
    assert config.image_token_id == 32000 and config.text_config.vocab_size == 32064
    assert config.vision_config.image_size == 336 and config.vision_feature_layer == -2


def test_random_weights_tokenizer_matches_vocab():
    from edgeprune.models.tokenizer import build_tokenizer

    tok = build_tokenizer(32064, 32000, 32001)
    assert len(tok) == 32064
    assert tok.convert_tokens_to_ids("<image>") == 32000 and tok.pad_token_id == 32001
    ids = tok("USER: <image>\nWhat does the sign say?").input_ids
    assert ids[0] == tok.bos_token_id and 32000 in ids
    assert tok.decode(ids, skip_special_tokens=True).endswith("What does the sign say?")


def test_save_and_load_round_trip(tmp_path, tiny_llava_next):
    """Offline presets save through save_pretrained and load back through --model DIR unchanged."""
    from edgeprune.models.tiny import save_preset_atomic

    out = str(tmp_path / "next")
    save_preset_atomic(tiny_llava_next.model, tiny_llava_next.tokenizer, tiny_llava_next.image_config, out)
    assert {"config.json", "preprocessor_config.json", "tokenizer.json"} <= set(os.listdir(out))
    loaded = load_model(out)
    assert loaded.source == "directory" and loaded.family.name == "llava_next"
    assert loaded.image_config == tiny_llava_next.image_config
    assert _checksum(loaded.model) == pytest.approx(_checksum(tiny_llava_next.model), rel=1e-9)
    assert loaded.tokenizer("hello <image>").input_ids == tiny_llava_next.tokenizer("hello <image>").input_ids
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".edgeprune-save-")]


def test_unknown_preset_lists_known_ones():
    with pytest.raises(UnknownModelError) as err:
        load_model("tiny-lava")
    for name in PRESETS:
        assert name in str(err.value)


def test_not_a_llava_directory(tmp_path):
    with pytest.raises(ModelLoadError, match="no config.json"):
        load_model(str(tmp_path))
    (tmp_path / "config.json").write_text("{ broken")
    with pytest.raises(ModelLoadError, match="not valid JSON"):
        load_model(str(tmp_path))
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(ModelLoadError, match="LLaVA"):
        load_model(str(tmp_path))


def test_llava_directory_with_broken_weights(tmp_path, tiny_llava):
    from edgeprune.models.tiny import save_preset_atomic

    out = tmp_path / "m"
    save_preset_atomic(tiny_llava.model, tiny_llava.tokenizer, tiny_llava.image_config, str(out))
    for f in out.iterdir():
        if f.suffix == ".safetensors":
            f.write_bytes(b"not a safetensors file")
    with pytest.raises(ModelLoadError, match="cannot load the model directory"):
        load_model(str(out))


def test_hub_id_offline_is_a_clear_error():
    with pytest.raises(ModelLoadError, match="--random-weights"):
        load_model("llava-hf/not-a-real-model-xyz")


def test_bad_dtype():
    with pytest.raises(ModelLoadError, match="--dtype"):
        load_model("tiny-llava", dtype="int3")


def _shrunk(cfg: dict) -> dict:
    """A named preset's config with every width/depth cut down (vocabulary, ids and geometry kept)."""
    cfg = json.loads(json.dumps(cfg))
    cfg["vision_config"].update(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)
    t = cfg["text_config"]
    t.update(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2 if t.get("num_key_value_heads", 32) < t.get("num_attention_heads", 32) else 4)
    return cfg


@pytest.mark.parametrize("name", ["llava-1.5-7b", "llava-next-mistral-7b"])
def test_random_weights_path_end_to_end(name, monkeypatch, rgb_image):
    """--random-weights: shipped config -> random model + synthetic tokenizer of the full vocabulary -> a run."""
    from edgeprune.api import build_pipeline
    from edgeprune.models import registry

    preset = get_preset(name)
    full = preset.shipped_config()
    monkeypatch.setattr(registry.Preset, "shipped_config", lambda self: _shrunk(full))
    loaded = load_model(name, random_weights=True)
    assert loaded.source == "random-weights" and len(loaded.tokenizer) == 32064
    assert loaded.image_token_id == 32000 and loaded.config.model_type == full["model_type"]
    assert ("[INST]" in loaded.template) == (name == "llava-next-mistral-7b")
    result = build_pipeline("", "cls-topk", tokens=32, loaded=loaded).run(rgb_image, "What?", max_new_tokens=2)
    assert len(result.kept) == 32


def test_random_weights_refuses_what_does_not_fit(monkeypatch):
    from edgeprune.models import loader

    monkeypatch.setattr(loader, "available_memory", lambda device: 2**30)
    with pytest.raises(ModelLoadError, match="do not fit"):
        load_model("llava-1.5-7b", random_weights=True)
