"""Resolve ``--model`` (preset, ``--random-weights`` architecture, local directory, Hugging Face id) to a
:class:`LoadedModel`: the HF model, its tokenizer, the preprocessing config, the prompt template and family.

Every failure a user can cause becomes a typed error with what to do; nothing is written anywhere (never into a
model directory or the HF cache).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any

from .._deps import require
from ..errors import ModelLoadError, UnknownModelError
from ..runtime.preprocess import CLIP_MEAN, CLIP_STD, ImageConfig
from .family import LlavaFamily, ModelFamily
from .llava_next import LlavaNextFamily
from .registry import PRESETS, TEMPLATES, Preset, get_preset
from .tiny import TINY_SEED, build_random_model, build_tiny
from .tokenizer import build_tokenizer

FAMILIES: dict[str, ModelFamily] = {f.model_type: f for f in (LlavaFamily(), LlavaNextFamily())}
DTYPES = ("fp32", "fp16", "bf16")


@dataclass
class LoadedModel:
    """Everything the torch backend and the exporter need about one model.

    Attributes:
        name: the preset name, directory or hub id given to ``--model``.
        family: the :class:`ModelFamily` adapter.
        model: ``LlavaForConditionalGeneration`` or ``LlavaNextForConditionalGeneration`` (eval mode).
        tokenizer: a fast tokenizer that adds BOS.
        image_config: preprocessing parameters.
        template: prompt template with ``<image>`` and ``{prompt}``.
        source: ``offline-preset``, ``packaged`` (trained weights shipped in the package), ``random-weights``,
            ``directory`` or ``hub``.
        default_clip: the ``--clip`` that goes with these weights when none is given (``shapes-clip``), or None.
    """

    name: str
    family: ModelFamily
    model: Any
    tokenizer: Any
    image_config: ImageConfig
    template: str
    source: str
    default_clip: str | None = None

    @property
    def config(self) -> Any:
        return self.model.config

    @property
    def image_token_id(self) -> int:
        return int(self.model.config.image_token_id)

    @property
    def eos_token_id(self) -> int | None:
        eos = self.tokenizer.eos_token_id
        return None if eos is None else int(eos)

    @property
    def max_positions(self) -> int:
        return int(self.model.config.text_config.max_position_embeddings)


def torch_dtype(name: str) -> Any:
    """Map ``fp32``/``fp16``/``bf16`` to a torch dtype (``ModelLoadError`` for anything else)."""
    torch = require("torch")
    table = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
    if name not in table:
        raise ModelLoadError(f"--dtype must be one of {', '.join(DTYPES)}; got {name!r}")
    return table[name]


def load_model(model: str, *, random_weights: bool = False, dtype: str = "fp32", device: str = "cpu",
               seed: int = TINY_SEED) -> LoadedModel:
    """Load ``model`` (see module docstring) onto ``device`` in ``dtype``.

    Raises:
        UnknownModelError: not a preset, directory or hub id (lists the presets).
        ModelLoadError: a directory/id that is not a loadable LLaVA checkpoint, or offline without weights.
    """
    tdtype = torch_dtype(dtype)
    if model in PRESETS:
        preset = get_preset(model)
        if preset.weights is not None:
            return _load_packaged(preset, tdtype, device)
        if preset.builder is not None:
            m, tok, img = build_tiny(preset.builder)
            return LoadedModel(model, FAMILIES[preset.family], m.to(device=device, dtype=tdtype), tok, img,
                               TEMPLATES[preset.template], "offline-preset")
        if random_weights:
            return _random_from_preset(preset, tdtype, device, seed)
        return _load_pretrained(preset.hf_id or model, model, tdtype, device, "hub", TEMPLATES[preset.template])
    if os.path.isdir(model):
        return _load_pretrained(model, model, tdtype, device, "directory", None)
    if "/" in model and not os.path.exists(model) and not model.startswith((".", "/")):
        if random_weights:
            raise ModelLoadError(f"--random-weights needs a preset with a shipped config; {model!r} is not one "
                                 f"(presets: {', '.join(sorted(PRESETS))})")
        return _load_pretrained(model, model, tdtype, device, "hub", None)
    if os.path.exists(model):
        raise ModelLoadError(f"--model {model!r} is a file; expected a model directory, a preset or a hub id")
    raise UnknownModelError("model", model, sorted(PRESETS),
                            hint="--model also takes a local LLaVA directory or a Hugging Face id")


def _random_from_preset(preset: Preset, tdtype: Any, device: str, seed: int) -> LoadedModel:
    transformers = require("transformers")
    cfg_dict = dict(preset.shipped_config() or {})
    model_type = cfg_dict.pop("model_type")
    cfg_dict.pop("architectures", None)
    config = transformers.AutoConfig.for_model(model_type, **cfg_dict)
    _check_memory(config, tdtype, device)
    model = build_random_model(config, seed=seed, dtype=tdtype, device=device)
    tok = build_tokenizer(config.text_config.vocab_size, config.image_token_id, config.text_config.pad_token_id)
    pins = tuple(tuple(p) for p in getattr(config, "image_grid_pinpoints", None) or ()) or None
    vc = config.vision_config
    img = ImageConfig(size=vc.image_size, crop=vc.image_size, grid_pinpoints=pins)
    return LoadedModel(preset.name, FAMILIES[model_type], model, tok, img, TEMPLATES[preset.template],
                       "random-weights")


def _load_packaged(preset: Preset, tdtype: Any, device: str) -> LoadedModel:
    """A preset whose trained weights ship in ``edgeprune/assets/<weights>/`` (``shapes-llava``)."""
    from importlib import resources

    path = str(resources.files("edgeprune").joinpath("assets", preset.weights or ""))
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise ModelLoadError(f"the weights of {preset.name!r} are missing from the installed package ({path}); "
                             f"reinstall edgeprune")
    loaded = _load_pretrained(path, preset.name, tdtype, device, "directory", TEMPLATES[preset.template])
    loaded.source, loaded.default_clip = "packaged", preset.clip
    return loaded


def available_memory(device: str) -> int | None:
    """Free bytes on ``device`` (CUDA: ``mem_get_info``; CPU: ``MemAvailable`` of /proc/meminfo), None if unknown."""
    torch = require("torch")
    if str(device).startswith("cuda"):
        if not torch.cuda.is_available():
            raise ModelLoadError(f"--device {device} requested but torch sees no CUDA device; use --device cpu")
        return int(torch.cuda.mem_get_info(torch.device(device))[0])
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def _check_memory(config: Any, tdtype: Any, device: str) -> None:
    """Refuse a random-weight build that cannot fit, instead of being killed by the OOM killer halfway."""
    torch = require("torch")
    meta = build_random_model(config, device="meta")
    need = sum(p.numel() for p in meta.parameters()) * torch.empty((), dtype=tdtype).element_size()
    free = available_memory(device)
    if free is not None and need > 0.9 * free:
        raise ModelLoadError(f"the {need / 2**30:.1f} GiB of weights do not fit the {free / 2**30:.1f} GiB free on "
                             f"{device}; use --dtype fp16 and/or a larger --device (e.g. cuda)")


def _read_config(path: str) -> dict[str, Any]:
    cfg_path = os.path.join(path, "config.json")
    if not os.path.isfile(cfg_path):
        raise ModelLoadError(f"{path!r} is not a LLaVA checkpoint: it has no config.json")
    try:
        with open(cfg_path) as f:
            cfg = json.load(f)
    except (OSError, json.JSONDecodeError) as exc:
        raise ModelLoadError(f"{cfg_path} is not valid JSON ({exc}); re-save the model directory") from None
    if not isinstance(cfg, dict):
        raise ModelLoadError(f"{cfg_path} must hold a JSON object")
    return cfg


def _load_pretrained(source: str, name: str, tdtype: Any, device: str, kind: str,
                     template: str | None) -> LoadedModel:
    transformers = require("transformers")
    if kind == "directory":
        model_type = _read_config(source).get("model_type")
        if model_type not in FAMILIES:
            raise ModelLoadError(f"{source!r} holds a {model_type!r} model; edgeprune supports the LLaVA families "
                                 f"{', '.join(FAMILIES)}")
    try:
        config = transformers.AutoConfig.from_pretrained(source)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ModelLoadError(_hub_hint(source, kind, exc)) from None
    if config.model_type not in FAMILIES:
        raise ModelLoadError(f"{source!r} is a {config.model_type!r} model; supported: {', '.join(FAMILIES)}")
    family = FAMILIES[config.model_type]
    cls = (transformers.LlavaNextForConditionalGeneration if config.model_type == "llava_next"
           else transformers.LlavaForConditionalGeneration)
    try:
        model = cls.from_pretrained(source, dtype=tdtype, attn_implementation="sdpa").to(device).eval()
        tok = transformers.AutoTokenizer.from_pretrained(source)
    except Exception as exc:  # noqa: BLE001 - loaders raise many types (SafetensorError, HFValidationError, ...)
        raise ModelLoadError(_hub_hint(source, kind, exc)) from None
    img = _image_config(source, config)
    if template is None:
        text_type = getattr(config.text_config, "model_type", "llama")
        template = TEMPLATES["mistral_instruct" if text_type == "mistral" else "vicuna_v1"]
    return LoadedModel(name, family, model, tok, img, template, kind)


def _image_config(source: str, config: Any) -> ImageConfig:
    """Preprocessing from ``preprocessor_config.json`` when the directory has one, else from the model config."""
    path = os.path.join(source, "preprocessor_config.json")
    if os.path.isfile(path):
        try:
            with open(path) as f:
                return ImageConfig.from_hf_preprocessor_config(json.load(f))
        except (OSError, json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
            raise ModelLoadError(f"{path} is unreadable ({exc}); fix or delete it") from None
    vc = config.vision_config
    pins = tuple(tuple(p) for p in getattr(config, "image_grid_pinpoints", None) or ()) or None
    return ImageConfig(size=vc.image_size, crop=vc.image_size, mean=CLIP_MEAN, std=CLIP_STD, grid_pinpoints=pins)


def _hub_hint(source: str, kind: str, exc: Exception) -> str:
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    if kind == "directory":
        return f"cannot load the model directory {source!r}: {first}"
    return (f"cannot load {source!r} from the Hugging Face hub ({first}). Without network access download it "
            f"elsewhere and pass the local directory, or use --random-weights with a preset to measure latency")
