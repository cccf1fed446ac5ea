"""The explicit registry of model presets (house rule 5).

A preset maps a short name to a model family and either a Hugging Face id (with its architecture config
shipped in ``models/configs/`` so ``--random-weights`` builds it offline) or an offline builder of a small
random-weight model (``tiny-llava``, ``tiny-llava-next``, ``mini-llava``). Importing this module is cheap.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from importlib import resources
from typing import Any

from ..errors import UnknownModelError

# Prompt templates: "<image>" marks where the visual tokens go, "{prompt}" the user's question.
VICUNA_V1 = (
    "A chat between a curious human and an artificial intelligence assistant. The assistant gives helpful, "
    "detailed, and polite answers to the human's questions. USER: <image>\n{prompt} ASSISTANT:"
)
MISTRAL_INST = "[INST] <image>\n{prompt} [/INST]"
SHAPES = "USER: <image>\n{prompt} ASSISTANT:"  # the trained shapes-llava preset (models/shapes.py)
TEMPLATES = {"vicuna_v1": VICUNA_V1, "mistral_instruct": MISTRAL_INST, "shapes": SHAPES}


@dataclass(frozen=True)
class Preset:
    """A named model.

    Attributes:
        name: the ``--model`` name.
        family: ``llava`` (LLaVA-1.5) or ``llava_next`` (LLaVA-NeXT anyres).
        description: one line for ``edgeprune models``.
        hf_id: the Hugging Face id loaded with real weights, or None for offline-only presets.
        builder: key of the offline builder in ``models.tiny`` (random weights, synthetic tokenizer), or None.
        template: key in :data:`TEMPLATES`.
        weights: trained weights shipped in the package (``edgeprune/assets/<weights>/``), or None.
        clip: the CLIP guidance that goes with ``weights`` (a ``--clip`` name such as ``shapes-clip``), or None.
    """

    name: str
    family: str
    description: str
    hf_id: str | None = None
    builder: str | None = None
    template: str = "vicuna_v1"
    weights: str | None = None
    clip: str | None = None

    @property
    def offline(self) -> bool:
        """True when the preset is always built offline (no weights to download)."""
        return self.hf_id is None

    def shipped_config(self) -> dict[str, Any] | None:
        """The architecture config shipped with the package: ``models/configs/<name>.json`` for hub presets (what
        ``--random-weights`` builds), the trained model's ``config.json`` for presets with ``weights``, None for
        the random offline builders."""
        if self.weights is not None:
            return json.loads(resources.files("edgeprune").joinpath("assets", self.weights, "config.json").read_text())
        if self.hf_id is None:
            return None
        text = resources.files("edgeprune.models").joinpath("configs", f"{self.name}.json").read_text()
        return json.loads(text)


PRESETS: dict[str, Preset] = {
    p.name: p
    for p in (
        Preset("tiny-llava", "llava", "tiny random LLaVA-1.5 (CLIP 336px/14 -> 576 tokens, Llama MHA), for tests "
               "and demos", builder="tiny-llava"),
        Preset("tiny-llava-next", "llava_next", "tiny random LLaVA-NeXT (anyres up to 5 views, Mistral GQA), "
               "for tests", builder="tiny-llava-next"),
        Preset("mini-llava", "llava", "~60M-parameter random LLaVA-1.5 (CLIP 512x4, Llama 512x4, vocab 32000) "
               "for CPU benchmarks", builder="mini-llava"),
        Preset("shapes-llava", "llava", "tiny LLaVA-1.5 (576 tokens) trained on synthetic shapes VQA, weights "
               "shipped: accuracy of pruning methods offline (docs/eval.md)", template="shapes",
               weights="shapes-llava", clip="shapes-clip"),
        Preset("llava-1.5-7b", "llava", "LLaVA-1.5 7B (Vicuna-7B)", hf_id="llava-hf/llava-1.5-7b-hf"),
        Preset("llava-1.5-13b", "llava", "LLaVA-1.5 13B (Vicuna-13B)", hf_id="llava-hf/llava-1.5-13b-hf"),
        Preset("llava-next-7b", "llava_next", "LLaVA-NeXT 7B (v1.6, Vicuna-7B)",
               hf_id="llava-hf/llava-v1.6-vicuna-7b-hf"),
        Preset("llava-next-mistral-7b", "llava_next", "LLaVA-NeXT 7B (v1.6, Mistral-7B)",
               hf_id="llava-hf/llava-v1.6-mistral-7b-hf", template="mistral_instruct"),
    )
}


def get_preset(name: str) -> Preset:
    """Return the preset ``name``.

    Raises:
        UnknownModelError: lists the known presets.
    """
    try:
        return PRESETS[name]
    except KeyError:
        raise UnknownModelError(
            "model", name, sorted(PRESETS),
            hint="--model also takes a local LLaVA directory or a Hugging Face id such as llava-hf/llava-1.5-7b-hf",
        ) from None
