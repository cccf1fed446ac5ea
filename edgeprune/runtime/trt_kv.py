"""The ``trt`` backend's KV cache: preallocated device buffers, two sets used in turn (ping-pong), per-layer
lengths on the host; and the LLM stages over it (pre-LLM decoder with prefill/decode profiles, in-LLM prefill +
decode over the ragged cache). numpy on the host only.

Layout: every cache tensor (``past_key_l`` / ``past_value_l``) has two device buffers of capacity
``[1, H, max_positions, Dh]``. A step binds set ``a`` as the past with its current length ``[1, H, len_l, Dh]``
(contiguous, so the first ``H * len_l * Dh`` elements) and points the presents at set ``b``; after the step the
sets swap and ``len_l`` becomes the present's length. Nothing of the cache crosses to the host; a prefill starts
from length 0. The in-LLM prefill's presents have data-dependent lengths (its graph drops visual tokens): the
runner's output allocator receives set ``b``'s buffers as targets and reports each layer's length.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from ..errors import BackendError
from .ort_inllm import RaggedPrefill


class KvCache:
    """Ping-pong device buffers for the cache tensors of a decoder (module docstring).

    Args:
        device: the :class:`~edgeprune.runtime.cuda_mem.CudaDevice` (or its double).
        past_names / present_names: the decoder's cache inputs and the matching outputs (same order).
        heads, head_dim, dtype: each tensor's ``[1, heads, length, head_dim]`` and numpy dtype.
        capacity: the longest sequence (the bundle's ``max_positions``).
    """

    def __init__(self, device: Any, past_names: list[str], present_names: list[str], heads: int, head_dim: int,
                 dtype: Any, capacity: int) -> None:
        self.device, self.past_names, self.present_names = device, past_names, present_names
        self.heads, self.head_dim, self.dtype, self.capacity = heads, head_dim, np.dtype(dtype), capacity
        nbytes = heads * capacity * head_dim * self.dtype.itemsize
        self.sets = [[device.alloc(nbytes) for _ in past_names] for _ in range(2)]
        self.current = 0
        self.lengths = [0] * len(past_names)

    @property
    def nbytes(self) -> int:
        """Device bytes held (both sets)."""
        return sum(b.nbytes for s in self.sets for b in s)

    def reset(self) -> None:
        """An empty cache (a new prefill)."""
        self.lengths = [0] * len(self.past_names)

    def past(self) -> dict[str, Any]:
        """The current set as the decoder's past inputs (:class:`~edgeprune.runtime.trt_backend.DeviceTensor`)."""
        from .trt_backend import DeviceTensor

        return {n: DeviceTensor(b, (1, self.heads, length, self.head_dim), self.dtype)
                for n, b, length in zip(self.past_names, self.sets[self.current], self.lengths)}

    def targets(self, grow: int) -> dict[str, Any]:
        """The other set as output buffers for presents ``grow`` tokens longer than the past (at most).

        Raises:
            BackendError: the cache would exceed its capacity.
        """
        if max(self.lengths, default=0) + grow > self.capacity:
            raise BackendError(f"the KV cache holds {self.capacity} positions (max_positions); "
                               f"{max(self.lengths) + grow} were asked")
        return dict(zip(self.present_names, self.sets[1 - self.current]))

    def commit(self, outputs: dict[str, Any]) -> None:
        """Swap sets after a step; take each layer's length from its present's shape (axis 2).

        Raises:
            BackendError: a present that TensorRT wrote elsewhere than its cache buffer.
        """
        nxt = self.sets[1 - self.current]
        for i, name in enumerate(self.present_names):
            t = outputs[name]
            if t.buf is not nxt[i]:
                raise BackendError(f"{name}: the engine wrote the present outside the KV cache buffer")
            self.lengths[i] = int(t.shape[2])
        self.current = 1 - self.current


class TrtLlm:
    """Prefill and decode on the decoder engine(s) over one :class:`KvCache`.

    Args:
        decoder: the decoder :class:`~edgeprune.runtime.trt_backend.TrtRunner`; embed: the embed runner;
        prefill: the in-LLM prefill runner (FastV, FitPrune) or None; cache: the :class:`KvCache`.
    """

    def __init__(self, decoder: Any, embed: Any, prefill: Any, cache: KvCache) -> None:
        self.decoder, self.embed, self.prefill_runner, self.cache = decoder, embed, prefill, cache
        self.in_llm = prefill is not None
        self.state: RaggedPrefill | None = None
        dt = decoder.spec.inputs[0].np_dtype
        self.embed_dtype = np.dtype(dt)

    def _logits(self, out: dict[str, Any], runner: Any) -> np.ndarray:
        return runner.download(out["logits"])[0].astype(np.float32)

    def prefill(self, embeds: np.ndarray, position_ids: np.ndarray) -> np.ndarray:
        """Pre-LLM prefill (profile 0): an empty cache, the prompt's embeddings; returns logits [V] float32."""
        dec, s = self.decoder, int(embeds.shape[1])
        self.cache.reset()
        dec.set_profile(0)
        feeds = {"inputs_embeds": np.ascontiguousarray(embeds, dtype=self.embed_dtype),
                 "attention_mask": np.ones((1, s), dtype=np.int64),
                 "position_ids": np.ascontiguousarray(position_ids, dtype=np.int64).reshape(1, s)}
        return self._step(feeds, s, "prefill")

    def _step(self, feeds: dict[str, Any], grow: int, stage: str) -> np.ndarray:
        out = self.decoder.run(feeds | self.cache.past(), stage, self.cache.targets(grow))
        self.cache.commit(out)
        return self._logits(out, self.decoder)

    def decode(self, token: int, position: int) -> np.ndarray:
        """One step: the token's embedding stays on the device; returns logits [V] float32.

        Raises:
            BackendError: an in-LLM decoder before its prefill.
        """
        if self.in_llm and self.state is None:
            raise BackendError("decode() needs an in-LLM prefill first")
        embeds = self.embed.run({"input_ids": np.asarray([[token]], dtype=np.int64)}, "decode")["inputs_embeds"]
        feeds: dict[str, Any] = {"inputs_embeds": embeds,
                                 "position_ids": np.asarray([[position]], dtype=np.int64)}
        if not self.in_llm:
            self.decoder.set_profile(min(1, self.decoder.profiles - 1))
            feeds["attention_mask"] = np.ones((1, max(self.cache.lengths) + 1), dtype=np.int64)
        return self._step(feeds, 1, "decode")

    def prefill_in_llm(self, embeds: np.ndarray, position_ids: np.ndarray, visual_start: int,
                       visual_pos: np.ndarray, prunable_pos: np.ndarray) -> np.ndarray:
        """In-LLM prefill: drops inside the graph, a ragged cache after it (mirrors ``RaggedSession.prefill``).

        Raises:
            BackendError: a visual block outside the prompt, or feeds that do not match the graph.
        """
        runner = self.prefill_runner
        total, length = int(len(visual_pos)), int(embeds.shape[1])
        if visual_start < 0 or visual_start + total > length:
            raise BackendError(f"visual block [{visual_start}, {visual_start + total}) is outside the {length}-token "
                               "prompt")
        feeds = {"inputs_embeds": np.ascontiguousarray(embeds, dtype=self.embed_dtype),
                 "position_ids": np.ascontiguousarray(position_ids, dtype=np.int64).reshape(1, length),
                 "visual_start": np.asarray([visual_start], dtype=np.int64),
                 "visual_count": np.asarray([total], dtype=np.int64),
                 "prunable_index": np.flatnonzero(np.isin(visual_pos, prunable_pos)).astype(np.int64)}
        runner.spec.check_feeds(feeds)
        self.cache.reset()
        out = runner.run(feeds, "prefill", self.cache.targets(length))
        self.cache.commit(out)
        kept = runner.download(out["kept_positions"])[0]
        self.state = RaggedPrefill(visual_start=int(visual_start), total=total, length=length,
                                   visual_pos=np.asarray(visual_pos), prunable_pos=np.asarray(prunable_pos),
                                   kept_positions=kept, cache_lengths=list(self.cache.lengths[::2]))
        return self._logits(out, runner)

    def stats(self) -> dict[str, Any]:
        """``kept``, ``layer_tokens``, ``cache_lengths`` of the last in-LLM prefill.

        Raises:
            BackendError: no in-LLM prefill ran.
        """
        if self.state is None:
            raise BackendError("in_llm_stats() needs an in-LLM prefill first")
        return self.state.stats()


@dataclass(frozen=True)
class CacheShape:
    """Heads, head dim and dtype of a decoder's cache tensors (from its spec)."""

    heads: int
    head_dim: int
    dtype: Any

    @classmethod
    def of(cls, spec: Any) -> "CacheShape":
        past = next(t for t in spec.inputs if t.name.startswith("past_"))
        return cls(int(past.dims[1]), int(past.dims[3]), past.np_dtype)
