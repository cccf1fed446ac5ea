"""The ``shapes-llava`` preset: a tiny LLaVA-1.5 trained on the synthetic shapes VQA, weights in the package.

Architecture (HF ``LlavaForConditionalGeneration``): CLIP vision 336 px / patch 14 -> 576 tokens, width 64,
3 layers, 4 heads, MLP 256, ``vision_feature_layer=-2``; Llama width 64, 2 layers, 4 heads, MLP 176; a
word-level vocabulary of 48 built with the ``tokenizers`` library. Its CLIP guidance ``shapes-clip`` (a
2-layer CLIP text tower, width 64, and the visual/text projections to 32 dims) was trained contrastively
against the frozen tower's layer -2 patch states, so GridPrune's text relevance means something.

The weights live in ``edgeprune/assets/shapes-llava/`` (``config.json``, ``model.safetensors``, tokenizer and
``preprocessor_config.json``; ``clip/`` holds the ``CLIPModel`` of the guidance) and are produced by the
deterministic script ``benchmarks/train_shapes.py`` (recipe, seed and accuracy: ``docs/eval.md``).
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Any

from .._deps import require
from ..errors import ModelLoadError
from .registry import SHAPES as TEMPLATE  # noqa: F401 - the template the preset was trained with

PRESET = "shapes-llava"
SHAPES_CLIP = "shapes-clip"
VOCAB_SIZE = 48
UNK, BOS, EOS, IMAGE, PAD = "<unk>", "<s>", "</s>", "<image>", "<pad>"
IMAGE_ID, PAD_ID = VOCAB_SIZE - 2, VOCAB_SIZE - 1
VISION = dict(hidden_size=64, intermediate_size=256, num_hidden_layers=3, num_attention_heads=4, image_size=336,
              patch_size=14, projection_dim=32)
TEXT = dict(hidden_size=64, intermediate_size=176, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
            vocab_size=VOCAB_SIZE, max_position_embeddings=1024)
CLIP_TEXT = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 max_position_embeddings=32, vocab_size=VOCAB_SIZE)
CLIP_PROJECTION = 32
# every word of the template, the generated questions and answers (edgeprune.eval.shapes), then the colours/shapes
WORDS = ("user", "assistant", ":", "?", "what", "color", "is", "the", "shape", "object", "there", "a", "on", "left",
         "or", "right", "yes", "no", "how", "many", "objects", "are", "in", "image", "of", "and",
         "red", "green", "blue", "yellow", "circle", "square", "triangle")


def asset_dir() -> Path:
    """``edgeprune/assets/shapes-llava`` inside the installed package."""
    return Path(str(resources.files("edgeprune").joinpath("assets", PRESET)))


def shapes_config() -> Any:
    """The preset's ``LlavaConfig`` (untrained architecture; the training script starts from it)."""
    transformers = require("transformers")
    text = transformers.LlamaConfig(**TEXT, bos_token_id=1, eos_token_id=2, pad_token_id=PAD_ID,
                                    tie_word_embeddings=False)
    vision = transformers.CLIPVisionConfig(**VISION)
    return transformers.LlavaConfig(vision_config=vision, text_config=text, image_token_id=IMAGE_ID,
                                    vision_feature_layer=-2, vision_feature_select_strategy="default",
                                    projector_hidden_act="gelu", tie_word_embeddings=False)


def build_shapes_tokenizer() -> Any:
    """The word-level ``PreTrainedTokenizerFast`` (lower-cases; splits on spaces and punctuation; adds ``<s>``).

    Ids: ``<unk>`` 0, ``<s>`` 1, ``</s>`` 2, the words of :data:`WORDS`, reserved
    entries up to ``<image>`` (46) and ``<pad>`` (47). Unknown words map to ``<unk>``.
    """
    tokenizers = require("tokenizers")
    transformers = require("transformers")
    words = [UNK, BOS, EOS, *WORDS]
    words += [f"<reserved{i}>" for i in range(IMAGE_ID - len(words))] + [IMAGE, PAD]
    if len(words) != VOCAB_SIZE:
        raise ValueError(f"the shapes vocabulary has {len(words)} entries; expected {VOCAB_SIZE}")
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel({w: i for i, w in enumerate(words)}, unk_token=UNK))
    tok.normalizer = tokenizers.normalizers.Lowercase()
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tok.add_special_tokens([UNK, BOS, EOS, IMAGE, PAD])
    tok.post_processor = tokenizers.processors.TemplateProcessing(single=f"{BOS} $A", pair=f"{BOS} $A $B",
                                                                  special_tokens=[(BOS, 1)])
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token=EOS, unk_token=UNK,
                                                pad_token=PAD, extra_special_tokens={"image_token": IMAGE},
                                                model_max_length=1024)


def shipped(path: Path) -> Path:
    """``path`` if the package ships it, else a :class:`ModelLoadError` that says how to produce it."""
    if not (path / "config.json").is_file():
        raise ModelLoadError(f"the {PRESET} weights are missing from the installed package ({path}); reinstall "
                             f"edgeprune or run `python benchmarks/train_shapes.py --out {asset_dir()}`")
    return path


def load_shapes_clip(dtype: Any = None, device: str = "cpu") -> Any:
    """The preset's trained CLIP guidance as a :class:`~edgeprune.models.clip_guidance.ClipGuidance`."""
    transformers = require("transformers")
    from .clip_guidance import ClipGuidance

    path = shipped(asset_dir() / "clip")
    model = transformers.CLIPModel.from_pretrained(str(path)).eval()
    tok = transformers.AutoTokenizer.from_pretrained(str(path))
    return ClipGuidance(model=model.to(device=device, dtype=dtype), tokenizer=tok, name=SHAPES_CLIP)
