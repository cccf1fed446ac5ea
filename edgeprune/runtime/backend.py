"""The backend interface the :class:`~edgeprune.runtime.pipeline.Pipeline` drives.

A backend owns the heavy tensors (visual features, embeddings, KV cache) in its own array type and exposes the
stages the pipeline times: ``encode_image`` (vision), ``select`` (prune), ``splice`` (embed + host splice),
``prefill`` and ``decode``. The pipeline itself handles only small host data: token ids, kept indices,
position ids and last-token logits as numpy arrays, so the torch reference, ONNX Runtime and TensorRT backends
share one decoding loop. Graph backends (ONNX Runtime, TensorRT) implement the stages with one Runner per
exported graph.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from ..methods.base import Budget
from ..runtime.preprocess import ImageConfig


@dataclass(frozen=True)
class InLLMRequest:
    """What an in-LLM method (FastV, FitPrune) needs at prefill besides the embeddings.

    Attributes:
        budget: the user's budget (FastV distinguishes "none given" from "keep all").
        visual_start: index of the first visual token in the spliced sequence (all T visual tokens are spliced).
    """

    budget: Budget
    visual_start: int


class TextCodec(Protocol):
    """The two tokenizer operations the pipeline needs."""

    def encode(self, text: str, add_bos: bool) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...


class Backend:
    """Base class of pipeline backends (see module docstring). Subclasses set the attributes below."""

    name = ""
    image_config: ImageConfig
    template: str
    codec: TextCodec
    eos_token_id: int | None
    max_positions: int

    def synchronize(self) -> None:
        """Wait for queued device work (profiling); CPU backends do nothing."""

    @property
    def info(self) -> dict[str, Any]:
        """Facts about the backend the profile's counters report (ORT: providers and graph files)."""
        return {}

    def encode_image(self, pixel_values: np.ndarray, image_size: tuple[int, int]) -> Any:
        """Vision stage: return an opaque visual handle with attributes ``n`` (prunable) and ``total``."""
        raise NotImplementedError

    needs_guidance = False  # True when the method is text-conditioned (a "guidance" stage runs)

    def guidance(self, question: str) -> Any:
        """Guidance stage: the text guidance vector of the question (opaque), for text-conditioned methods."""
        raise NotImplementedError

    def select(self, visual: Any, k: int, guidance: Any = None) -> np.ndarray:
        """Prune stage: kept indices ``[K]`` (int64, ascending) into the N prunable tokens."""
        raise NotImplementedError

    def splice(self, prefix: list[int], visual: Any, kept: np.ndarray, suffix: list[int]) -> tuple[Any, np.ndarray]:
        """Embed stage: the prompt embeddings with the kept visual rows spliced in.

        Returns:
            (opaque embeddings ``[1, L, D]``, visual positions ``[K']`` within the T visual tokens).
        """
        raise NotImplementedError

    def prefill(self, embeds: Any, position_ids: np.ndarray, in_llm: InLLMRequest | None = None) -> np.ndarray:
        """Prefill stage: start a fresh KV cache, return last-token logits ``[V]`` (float32).

        With ``in_llm`` the method drops visual tokens between decoder layers and the cache becomes ragged.
        """
        raise NotImplementedError

    def in_llm_stats(self) -> dict[str, Any]:
        """After an in-LLM prefill: ``kept`` ([K] surviving prunable indices into N), ``layer_tokens`` (visual
        tokens entering each layer) and ``cache_lengths`` (per-layer KV length)."""
        raise NotImplementedError

    def decode(self, token: int, position: int) -> np.ndarray:
        """One decode step with the KV cache, return logits ``[V]``."""
        raise NotImplementedError
