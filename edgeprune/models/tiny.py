"""Offline builders of small random-weight LLaVA models (tiny-llava, tiny-llava-next, mini-llava).

Weights are drawn from a fixed seed inside ``torch.random.fork_rng`` so building a preset never disturbs the
caller's RNG and always gives the same model. Each builder returns a model, a tokenizer and the preprocessing
configuration; :func:`save_preset` writes them through ``save_pretrained`` so they load back like any
Hugging Face checkpoint directory.
"""

from __future__ import annotations

from typing import Any

from .._deps import require
from ..runtime.preprocess import ImageConfig
from .tokenizer import build_tokenizer

NEXT_PINPOINTS = ((336, 672), (672, 336), (672, 672), (1008, 336), (336, 1008))

# name -> (vision, text, extra llava kwargs); sizes chosen to be real (>= 2 layers, multi-head, GQA for NeXT)
# yet small enough that the test suite stays fast on 2 CPU cores.
_SPECS: dict[str, dict[str, Any]] = {
    "tiny-llava": {
        "family": "llava",
        "vision": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
                       image_size=336, patch_size=14, projection_dim=32),
        "text": dict(model_type="llama", hidden_size=64, intermediate_size=176, num_hidden_layers=4,
                     num_attention_heads=4, num_key_value_heads=4, vocab_size=1024, max_position_embeddings=4096),
        "image_token_id": 1000,
    },
    "tiny-llava-next": {
        "family": "llava_next",
        "vision": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
                       image_size=336, patch_size=14, projection_dim=32),
        "text": dict(model_type="mistral", hidden_size=64, intermediate_size=176, num_hidden_layers=4,
                     num_attention_heads=4, num_key_value_heads=2, vocab_size=1024, max_position_embeddings=8192,
                     sliding_window=None),
        "image_token_id": 1000,
    },
    "mini-llava": {
        "family": "llava",
        "vision": dict(hidden_size=512, intermediate_size=2048, num_hidden_layers=4, num_attention_heads=8,
                       image_size=336, patch_size=14, projection_dim=256),
        "text": dict(model_type="llama", hidden_size=512, intermediate_size=1376, num_hidden_layers=4,
                     num_attention_heads=8, num_key_value_heads=8, vocab_size=32000, max_position_embeddings=4096),
        "image_token_id": 31998,
    },
}

TINY_SEED = 1234


def tiny_config(name: str) -> Any:
    """The ``LlavaConfig``/``LlavaNextConfig`` of an offline preset.

    Raises:
        KeyError: ``name`` is not an offline builder (callers go through the preset registry).
    """
    transformers = require("transformers")
    spec = _SPECS[name]
    text = dict(spec["text"])
    text_cls = transformers.MistralConfig if text.pop("model_type") == "mistral" else transformers.LlamaConfig
    img = spec["image_token_id"]
    text_cfg = text_cls(**text, bos_token_id=1, eos_token_id=2, pad_token_id=img + 1, tie_word_embeddings=False)
    vision_cfg = transformers.CLIPVisionConfig(**spec["vision"])
    common = dict(vision_config=vision_cfg, text_config=text_cfg, image_token_id=img, vision_feature_layer=-2,
                  vision_feature_select_strategy="default", projector_hidden_act="gelu", tie_word_embeddings=False)
    if spec["family"] == "llava_next":
        return transformers.LlavaNextConfig(image_grid_pinpoints=[list(p) for p in NEXT_PINPOINTS], **common)
    return transformers.LlavaConfig(**common)


def tiny_image_config(name: str) -> ImageConfig:
    """Preprocessing of an offline preset (CLIP 336 px; anyres pinpoints for NeXT)."""
    pins = NEXT_PINPOINTS if _SPECS[name]["family"] == "llava_next" else None
    return ImageConfig(size=336, crop=336, grid_pinpoints=pins)


def build_random_model(config: Any, seed: int = TINY_SEED, dtype: Any = None, device: Any = None) -> Any:
    """Instantiate a LLaVA model from ``config`` with seeded random weights, without touching global RNG state.

    Args:
        config: a ``LlavaConfig`` or ``LlavaNextConfig``.
        seed: weight seed.
        dtype: torch dtype of the parameters (default float32).
        device: where to build (``"meta"`` counts parameters without allocating).
    Returns:
        ``LlavaForConditionalGeneration`` or ``LlavaNextForConditionalGeneration`` in eval mode.
    """
    torch = require("torch")
    transformers = require("transformers")
    cls = (transformers.LlavaNextForConditionalGeneration if config.model_type == "llava_next"
           else transformers.LlavaForConditionalGeneration)
    config._attn_implementation = "sdpa"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        with torch.device(device or "cpu"):
            model = cls._from_config(config, dtype=dtype or torch.float32)
    return model.eval()


def build_tiny(name: str) -> tuple[Any, Any, ImageConfig]:
    """Build the offline preset ``name``: (model, tokenizer, image config), deterministic."""
    cfg = tiny_config(name)
    model = build_random_model(cfg)
    tok = build_tokenizer(cfg.text_config.vocab_size, cfg.image_token_id, cfg.text_config.pad_token_id)
    return model, tok, tiny_image_config(name)


def hf_preprocessor_config(image_config: ImageConfig) -> dict[str, Any]:
    """``image_config`` in the Hugging Face ``preprocessor_config.json`` format of the family's processor."""
    d: dict[str, Any] = {
        "image_processor_type": "LlavaNextImageProcessor" if image_config.anyres else "CLIPImageProcessor",
        "do_resize": True, "size": {"shortest_edge": image_config.size}, "resample": image_config.resample,
        "do_center_crop": True, "crop_size": {"height": image_config.crop, "width": image_config.crop},
        "do_rescale": True, "rescale_factor": image_config.rescale, "do_normalize": True,
        "image_mean": list(image_config.mean), "image_std": list(image_config.std), "do_convert_rgb": True,
    }
    if image_config.anyres:
        d["image_grid_pinpoints"] = [list(p) for p in image_config.grid_pinpoints or ()]
    return d


def save_preset_atomic(model: Any, tokenizer: Any, image_config: ImageConfig, out_dir: str) -> None:
    """Write a model directory that ``--model DIR`` (and ``from_pretrained``) loads back.

    Writes ``config.json`` + safetensors weights, the tokenizer files and ``preprocessor_config.json`` into a
    temporary sibling directory and renames it into place, so an interrupted save leaves nothing behind.
    """
    import json
    import os
    import shutil
    import tempfile

    parent = os.path.dirname(os.path.abspath(out_dir))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".edgeprune-save-", dir=parent)
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        with open(os.path.join(tmp, "preprocessor_config.json"), "w") as f:
            json.dump(hf_preprocessor_config(image_config), f, indent=2)
        os.rename(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
