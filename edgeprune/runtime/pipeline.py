"""The pipeline: preprocess -> vision -> prune -> splice -> prefill -> decode, over any :class:`Backend`.

Host logic only (numpy): budgets, prompt splitting, position ids, the decoding loop, stop conditions and
profiling. Heavy tensors stay inside the backend. The same class serves the torch reference and, later, the
ONNX Runtime and TensorRT backends, so decoding is identical across them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
from PIL import Image

from ..methods.base import Budget
from .backend import Backend, InLLMRequest
from .preprocess import preprocess
from .profiler import Profile, Profiler
from .prompt import check_context, split_prompt
from .sampling import Sampler, SamplingConfig


def position_ids(prefix: int, n_visual: int, suffix: int, kept_pos: np.ndarray, convention: str) -> np.ndarray:
    """RoPE positions of ``prefix text | kept visual tokens | suffix text`` (METHODS.md decision 3).

    ``compact`` numbers the spliced sequence contiguously. ``original`` gives each kept visual token the
    position it had in the unpruned sequence and continues the suffix after the unpruned length.

    Args:
        prefix, suffix: text token counts before / after the image.
        n_visual: T, visual positions of the unpruned image (N plus NeXT newlines).
        kept_pos: [K'] ascending positions of the kept visual tokens within the T.
        convention: ``compact`` or ``original``.
    Returns:
        [prefix + K' + suffix] int64.
    """
    k = int(kept_pos.shape[0])
    if convention == "compact":
        return np.arange(prefix + k + suffix, dtype=np.int64)
    if convention != "original":
        raise ValueError(f"unknown position convention {convention!r}")
    return np.concatenate([np.arange(prefix), prefix + kept_pos.astype(np.int64),
                           np.arange(prefix + n_visual, prefix + n_visual + suffix)]).astype(np.int64)


@dataclass
class Result:
    """The outcome of one request.

    Attributes:
        text: decoded answer (special tokens skipped).
        tokens: generated token ids (EOS included when it stopped the generation).
        kept: [K] indices of the kept tokens among the N prunable visual tokens.
        kept_positions: [K'] positions of every visual token that reached the LLM among the T.
        n_visual: N prunable visual tokens; total_visual: T visual positions before pruning.
        prompt_ids: (prefix ids, suffix ids) around the image.
        profile: timings and counters.
    """

    text: str
    tokens: list[int]
    kept: np.ndarray
    kept_positions: np.ndarray
    n_visual: int
    total_visual: int
    prompt_ids: tuple[list[int], list[int]]
    position_ids: np.ndarray
    stop_reason: str
    profile: Profile = field(repr=False, default_factory=Profile)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able result (kept indices as lists)."""
        return {"text": self.text, "tokens": list(map(int, self.tokens)), "kept": self.kept.tolist(),
                "n_visual": self.n_visual, "total_visual": self.total_visual,
                "visual_tokens_to_llm": int(self.kept_positions.shape[0]), "stop_reason": self.stop_reason,
                "profile": self.profile.to_dict()}


class Pipeline:
    """Runs requests through a backend with a pruning budget.

    Args:
        backend: the stage implementation (e.g. :class:`~edgeprune.runtime.torch_backend.TorchBackend`).
        budget: how many visual tokens to keep.
        positions: ``compact`` or ``original`` (the method's convention).
        uses_budget: False for methods that keep every token (``none``) or carry their own budget (FitPrune).
        placement: ``pre_llm`` (select K before the LLM) or ``in_llm`` (all tokens spliced; the backend's
            decoder drops visual tokens between layers during prefill).
    """

    def __init__(self, backend: Backend, budget: Budget, positions: str, uses_budget: bool = True,
                 placement: str = "pre_llm") -> None:
        self.backend = backend
        self.budget = budget
        self.positions = positions
        self.uses_budget = uses_budget
        self.placement = placement

    def run(self, image: Image.Image, prompt: str, max_new_tokens: int = 32,
            sampling: SamplingConfig | None = None) -> Result:
        """Answer ``prompt`` about ``image``.

        Raises:
            BudgetError: K > N for this image.
            PromptError: empty prompt, or prompt + image + new tokens exceed the context.
        """
        be = self.backend
        prof = Profiler(sync=be.synchronize)
        with prof.span("preprocess"):
            pixels, image_size = preprocess(image, be.image_config)
            before, after = split_prompt(be.template, prompt)
            prefix, suffix = be.codec.encode(before, add_bos=True), be.codec.encode(after, add_bos=False)
        with prof.span("vision"):
            visual = be.encode_image(pixels, image_size)
        n, total = int(visual.n), int(visual.total)
        k = self.budget.resolve(n) if self.uses_budget else n
        check_context(len(prefix), total, len(suffix), max_new_tokens, be.max_positions)
        in_llm = InLLMRequest(self.budget, len(prefix)) if self.placement == "in_llm" else None
        kept = np.arange(n, dtype=np.int64) if in_llm else self._select(prof, visual, k, prompt)
        with prof.span("embed"):
            embeds, kept_pos = be.splice(prefix, visual, kept, suffix)
        pos = position_ids(len(prefix), total, len(suffix), kept_pos, self.positions)
        with prof.span("prefill"):
            logits = be.prefill(embeds, pos, in_llm)
        layer_stats: dict[str, Any] = {}
        if in_llm is not None:  # every token entered the LLM; its layers dropped some
            stats = be.in_llm_stats()
            kept, k = stats["kept"], len(stats["kept"])
            layer_stats = {"layer_tokens": stats["layer_tokens"], "cache_lengths": stats["cache_lengths"]}
        tokens, stop = self._generate(prof, logits, int(pos[-1]) + 1, max_new_tokens, sampling)
        prof.profile.total = prof.now()
        prof.profile.counters.update(
            backend=be.name, kernels=getattr(getattr(be, "method", None), "kernels", "-"), visual_in=n,
            visual_kept=int(k), visual_to_llm=int(kept_pos.shape[0]), prompt_tokens=int(pos.shape[0]),
            new_tokens=len(tokens), positions=self.positions, **layer_stats, **be.info,
        )
        text = be.codec.decode([t for t in tokens if t != be.eos_token_id])
        return Result(text=text, tokens=tokens, kept=kept, kept_positions=kept_pos, n_visual=n,
                      total_visual=total, prompt_ids=(prefix, suffix), position_ids=pos, stop_reason=stop,
                      profile=prof.profile)

    def _select(self, prof: Profiler, visual: Any, k: int, prompt: str) -> np.ndarray:
        """Guidance (text-conditioned methods) and prune stages of a pre-LLM method: kept indices [K]."""
        be = self.backend
        guidance = None
        if be.needs_guidance:
            with prof.span("guidance"):
                guidance = be.guidance(prompt)
        with prof.span("prune"):
            return be.select(visual, k, guidance)

    def _generate(self, prof: Profiler, logits: np.ndarray, next_pos: int, max_new_tokens: int,
                  sampling: SamplingConfig | None) -> tuple[list[int], str]:
        """The decoding loop from the prefill logits: (tokens, stop reason); records TTFT and decode spans."""
        be = self.backend
        sampler = Sampler(sampling)
        tokens: list[int] = []
        while True:
            token = sampler(logits)
            if not tokens:
                prof.profile.ttft = prof.now()
            tokens.append(token)
            if be.eos_token_id is not None and token == be.eos_token_id:
                return tokens, "eos"
            if len(tokens) >= max_new_tokens:
                return tokens, "max_new_tokens"
            with prof.span("decode"):
                logits = be.decode(token, next_pos)
            next_pos += 1
