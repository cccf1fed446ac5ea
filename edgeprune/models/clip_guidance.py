"""CLIP text guidance for GridPrune (METHODS.md §1 and decision 4, ``guidance=clip``).

Relevance of patch i to the question Q is ``cos(normalize(W_vproj · LN_post(h_i)), t_Q)`` where ``h_i`` is the
CLIP layer -2 state of the patch (the LLaVA vision tower's own post-LayerNorm), ``W_vproj`` the CLIP
checkpoint's visual projection and ``t_Q`` the projected, L2-normalised text-tower state at [EOS]. Questions
longer than the text tower's context are split into chunks whose normalised embeddings are averaged and
renormalised (as CDPruner does).

The CLIP checkpoint comes from ``--clip`` (a local directory or hub id of a ``CLIPModel``); ``tiny-clip`` is a
small random CLIP built offline for the tiny presets, and ``--random-weights`` builds CLIP ViT-L/14-336's text
tower and projections with random weights.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from .._deps import require
from ..errors import ModelLoadError
from .shapes import SHAPES_CLIP
from .tokenizer import build_tokenizer

TINY_CLIP = "tiny-clip"
# CLIP ViT-L/14-336's text tower and projections (openai/clip-vit-large-patch14-336), for --random-weights.
CLIP_L336_TEXT = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                      max_position_embeddings=77, vocab_size=49408, hidden_act="quick_gelu")
CLIP_L336_PROJECTION = 768


@dataclass
class ClipGuidance:
    """A CLIP text tower with its projections, and the tokenizer that feeds it.

    Attributes:
        model: ``CLIPModel`` (only ``text_model``, ``text_projection`` and ``visual_projection`` are used).
        tokenizer: its tokenizer; an [EOS] is appended when the tokenizer does not add one.
        name: where it came from (recorded in profiles and manifests).
    """

    model: Any
    tokenizer: Any
    name: str

    @property
    def context(self) -> int:
        return int(self.model.config.text_config.max_position_embeddings)

    def _chunks(self, question: str) -> list[list[int]]:
        tok = self.tokenizer
        body = list(tok(question, add_special_tokens=False).input_ids)
        bos, eos = tok.bos_token_id, tok.eos_token_id
        if eos is None:
            raise ModelLoadError(f"the CLIP tokenizer of {self.name!r} has no EOS token; it cannot pool [EOS]")
        room = self.context - 1 - (bos is not None)
        pieces = [body[i:i + room] for i in range(0, len(body), room)] or [[]]
        return [([bos] if bos is not None else []) + p + [eos] for p in pieces]

    @torch.inference_mode()
    def text_embed(self, question: str) -> torch.Tensor:
        """The question's guidance vector ``[1, Dc]`` (unit norm), chunked past the text context."""
        param = next(self.model.parameters())
        embs = []
        for ids in self._chunks(question):
            t = torch.tensor([ids], dtype=torch.long, device=param.device)
            hidden = self.model.text_model(input_ids=t).last_hidden_state  # after the final LayerNorm
            pooled = hidden[:, -1]  # the [EOS] position: the last token of every chunk by construction
            embs.append(torch.nn.functional.normalize(self.model.text_projection(pooled).float(), dim=-1))
        return torch.nn.functional.normalize(torch.stack(embs).mean(dim=0), dim=-1)

    @torch.inference_mode()
    def patch_embeds(self, post_layernorm: Any, hidden: torch.Tensor) -> torch.Tensor:
        """CLIP-space patch embeddings ``[V, P, Dc]`` (unit norm) from layer -2 states ``[V, P, Dv]``."""
        proj = self.model.visual_projection
        x = post_layernorm(hidden.to(proj.weight.dtype))
        return torch.nn.functional.normalize(proj(x).float(), dim=-1)


def build_tiny_clip(vision_config: Any, seed: int = 4321) -> ClipGuidance:
    """A small random CLIP whose vision width matches ``vision_config`` (offline, deterministic)."""
    transformers = require("transformers")
    tok = build_tokenizer(512, image_token_id=510, pad_token_id=511, bpe_size=400)
    text = transformers.CLIPTextConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                       num_attention_heads=4, max_position_embeddings=77, vocab_size=len(tok),
                                       bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                                       pad_token_id=tok.pad_token_id)
    return _random_clip(transformers, text, vision_config, 32, tok, TINY_CLIP, seed)


def build_random_clip_l336(vision_config: Any, seed: int = 4321) -> ClipGuidance:
    """CLIP ViT-L/14-336's text tower and projections with random weights and a synthetic tokenizer."""
    transformers = require("transformers")
    tok = build_tokenizer(CLIP_L336_TEXT["vocab_size"], image_token_id=49406, pad_token_id=49407)
    text = transformers.CLIPTextConfig(**CLIP_L336_TEXT, bos_token_id=tok.bos_token_id,
                                       eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    return _random_clip(transformers, text, vision_config, CLIP_L336_PROJECTION, tok, "random clip-vit-l/14-336",
                        seed)


def _random_clip(transformers: Any, text: Any, vision_config: Any, proj: int, tok: Any, name: str,
                 seed: int) -> ClipGuidance:
    vision = transformers.CLIPVisionConfig(**{k: getattr(vision_config, k) for k in (
        "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "image_size", "patch_size")})
    vision.num_hidden_layers = 1  # the CLIP vision tower is unused: LLaVA's own tower provides the states
    cfg = transformers.CLIPConfig(text_config=text.to_dict(), vision_config=vision.to_dict(), projection_dim=proj)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = transformers.CLIPModel(cfg).eval()
    return ClipGuidance(model=model, tokenizer=tok, name=name)


def load_clip(spec: str, vision_config: Any, random_weights: bool = False, dtype: Any = None,
              device: str = "cpu") -> ClipGuidance:
    """Resolve ``--clip``: ``tiny-clip``, ``shapes-clip`` (shipped with ``shapes-llava``), a ``CLIPModel`` directory / hub id, or (empty ``spec`` with random
    weights) CLIP-L/336's text tower with random weights.

    Raises:
        ModelLoadError: the checkpoint cannot be loaded, or its vision width does not match the LLaVA tower.
    """
    transformers = require("transformers")
    if spec == TINY_CLIP:
        guide = build_tiny_clip(vision_config)
    elif spec == SHAPES_CLIP:  # trained with the shapes-llava preset, shipped in the package
        from .shapes import load_shapes_clip

        guide = load_shapes_clip()
    elif not spec:  # no checkpoint named: only a random-weights build may invent one
        if not random_weights:
            raise ModelLoadError("no CLIP checkpoint given for guidance=clip; pass --clip DIR|hub-id")
        guide = build_random_clip_l336(vision_config)
    else:
        try:
            model = transformers.CLIPModel.from_pretrained(spec).eval()
            tok = transformers.AutoTokenizer.from_pretrained(spec)
        except Exception as exc:  # noqa: BLE001 - hub/loader errors come in many types
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ModelLoadError(f"cannot load the CLIP checkpoint {spec!r} for --clip: {first}") from None
        guide = ClipGuidance(model=model, tokenizer=tok, name=spec)
    width = guide.model.visual_projection.in_features
    if width != vision_config.hidden_size:
        raise ModelLoadError(f"--clip {spec!r} has vision width {width} but the LLaVA vision tower has "
                             f"{vision_config.hidden_size}; give the CLIP checkpoint the tower came from")
    guide.model.to(device=device, dtype=dtype or torch.float32)
    return guide
