"""The ``torch`` backend: the reference, running the Hugging Face model through its public seams.

Vision and projector come from the family adapter, pruning is the method's reference, the LLM runs on
``inputs_embeds`` with explicit ``position_ids`` and a ``DynamicCache``; transformers is not patched.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import torch

from .._deps import require
from ..methods.base import PruningMethod
from ..models.family import VisualSequence
from ..models.loader import LoadedModel
from .backend import Backend, InLLMRequest


class HFTextCodec:
    """:class:`~edgeprune.runtime.backend.TextCodec` over a Hugging Face tokenizer."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer

    def encode(self, text: str, add_bos: bool) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=add_bos).input_ids)

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)


class TorchBackend(Backend):
    """Reference backend over a :class:`~edgeprune.models.loader.LoadedModel` and a pruning method."""

    name = "torch"

    def __init__(self, loaded: LoadedModel, method: PruningMethod, clip: Any = None) -> None:
        """``clip``: a :class:`~edgeprune.models.clip_guidance.ClipGuidance` for ``guidance=clip`` methods."""
        self.loaded = loaded
        self.method = method
        self.clip = clip if method.needs_guidance and getattr(method.params, "guidance", "") != "llm" else None
        self.model = loaded.model
        self.family = loaded.family
        self.image_config = loaded.image_config
        self.template = loaded.template
        self.codec = HFTextCodec(loaded.tokenizer)
        self.eos_token_id = loaded.eos_token_id
        self.max_positions = loaded.max_positions
        self.device = next(self.model.parameters()).device
        self.dtype = next(self.model.parameters()).dtype
        self._cache: Any = None  # HF DynamicCache (pre-LLM methods)
        self._state: Any = None  # methods.inllm.InLLMState: the ragged cache of in-LLM methods
        self._seq_len = 0
        self._spliced: tuple[VisualSequence, np.ndarray] | None = None

    @property
    def info(self) -> dict[str, Any]:
        """Device, dtype and the LLM's attention implementation, for the profile's counters."""
        lm = self.family.language_model(self.model)
        return {"device": str(self.device), "dtype": str(self.dtype).removeprefix("torch."),
                "attention": lm.config._attn_implementation}

    def synchronize(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    @torch.inference_mode()
    def encode_image(self, pixel_values: np.ndarray, image_size: tuple[int, int]) -> VisualSequence:
        pixels = torch.from_numpy(pixel_values).to(self.device)
        return self.family.visual_sequence(self.model, pixels, image_size, self.image_config, self.clip)

    @property
    def needs_guidance(self) -> bool:  # type: ignore[override]
        return self.method.needs_guidance

    @torch.inference_mode()
    def guidance(self, question: str) -> torch.Tensor:
        """The question's guidance vector: the CLIP text [EOS] embedding [1, Dc] when a CLIP is loaded, else
        (``guidance=llm``) the mean LLM input embedding of the question's tokens (no BOS, no template), [1, D]."""
        if self.clip is not None:
            return self.clip.text_embed(question).to(self.device)
        ids = self.codec.encode(question, add_bos=False) or [self.loaded.tokenizer.unk_token_id or 0]
        emb = self.family.embed_tokens(self.model)(torch.tensor([ids], dtype=torch.long, device=self.device))
        return emb.float().mean(dim=1)

    @torch.inference_mode()
    def select(self, visual: VisualSequence, k: int, guidance: torch.Tensor | None = None) -> np.ndarray:
        tokens = visual.tokens if guidance is None else dataclasses.replace(visual.tokens, guidance=guidance)
        return self.method.select(tokens, k)[0].cpu().numpy().astype(np.int64)

    @torch.inference_mode()
    def splice(self, prefix: list[int], visual: VisualSequence, kept: np.ndarray,
               suffix: list[int]) -> tuple[torch.Tensor, np.ndarray]:
        embed = self.family.embed_tokens(self.model)
        rows, pos = visual.assemble(torch.from_numpy(kept))
        ids = torch.tensor([prefix + suffix], dtype=torch.long, device=self.device)
        text = embed(ids)[0]
        embeds = torch.cat([text[: len(prefix)], rows.to(text.dtype), text[len(prefix):]], dim=0)
        self._spliced = (visual, pos)
        return embeds.unsqueeze(0), pos

    def _step(self, embeds: torch.Tensor, position_ids: torch.Tensor) -> np.ndarray:
        lm = self.family.language_model(self.model)
        self._seq_len += embeds.shape[1]
        mask = torch.ones(1, self._seq_len, dtype=torch.long, device=self.device)
        out = lm(inputs_embeds=embeds, attention_mask=mask, position_ids=position_ids.to(self.device).unsqueeze(0),
                 cache=self._cache, use_cache=True)  # ``cache``: transformers >= 5.24 (past_key_values deprecated)
        self._cache = out.cache
        logits = self.family.lm_head(self.model)(out.last_hidden_state[:, -1])
        return logits[0].float().cpu().numpy()

    @torch.inference_mode()
    def prefill(self, embeds: torch.Tensor, position_ids: np.ndarray, in_llm: InLLMRequest | None = None) -> np.ndarray:
        self._state = None
        if in_llm is not None:
            return self._prefill_in_llm(embeds, position_ids, in_llm)
        transformers = require("transformers")
        self._cache = transformers.DynamicCache(config=self.model.config.text_config)
        self._seq_len = 0
        return self._step(embeds, torch.from_numpy(position_ids))

    def _prefill_in_llm(self, embeds: torch.Tensor, position_ids: np.ndarray, req: InLLMRequest) -> np.ndarray:
        """Our own layer loop (methods.inllm): drops visual tokens between layers, leaves a ragged cache."""
        from ..methods import inllm

        if self._spliced is None:
            raise RuntimeError("splice() must run before an in-LLM prefill")
        visual, pos = self._spliced
        lm = self.family.language_model(self.model)
        prunable = torch.from_numpy(np.isin(pos, visual.prunable_pos))
        plan = self.method.layer_plan(visual.n, len(lm.layers), req.budget)
        self._state = inllm.prefill(lm, embeds, torch.from_numpy(position_ids).to(self.device), req.visual_start,
                                    len(pos), plan, prunable)
        return self.family.lm_head(self.model)(self._state.last_hidden)[0].float().cpu().numpy()

    def in_llm_stats(self) -> dict[str, Any]:
        if self._state is None or self._spliced is None:
            raise RuntimeError("in_llm_stats() needs an in-LLM prefill first")
        visual, pos = self._spliced
        survivors = pos[self._state.visual_kept.cpu().numpy()]  # positions within the T visual tokens
        kept = np.flatnonzero(np.isin(visual.prunable_pos, survivors)).astype(np.int64)  # indices into N
        return {"kept": kept, "layer_tokens": [int(c) for c in self._state.visual_counts],
                "cache_lengths": self._state.cache_lengths}

    @torch.inference_mode()
    def decode(self, token: int, position: int) -> np.ndarray:
        ids = torch.tensor([[token]], dtype=torch.long, device=self.device)
        embeds = self.family.embed_tokens(self.model)(ids)
        if self._state is not None:
            from ..methods import inllm

            h = inllm.decode_step(self.family.language_model(self.model), self._state, embeds, position)
            return self.family.lm_head(self.model)(h)[0].float().cpu().numpy()
        return self._step(embeds, torch.tensor([position], dtype=torch.long))
