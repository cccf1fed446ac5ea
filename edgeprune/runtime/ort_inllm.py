"""In-LLM pruning (FastV, FitPrune) on ONNX Runtime: the prefill graph drops visual tokens between layers, the
decode graph runs over the resulting ragged cache (one length per layer). numpy + onnxruntime only.

The presents stay in ``OrtValue`` objects on the execution device between steps (IO binding, as the pre-LLM
decoder), each layer with its own length; only logits and the surviving sequence indices come to the host.
The host-side statistics mirror :meth:`~edgeprune.runtime.torch_backend.TorchBackend.in_llm_stats`:

* ``kept``: the surviving prunable visual tokens (indices into N), from the prefill's ``kept_positions``;
* ``cache_lengths``: each layer's present length;
* ``layer_tokens``: visual tokens entering layer l = T - (L - cache_length_l), since only visual tokens are
  ever dropped and layer l's cache holds exactly the tokens that entered it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from ..errors import BackendError



def run_decoder_bound(runner: Any, host: dict[str, np.ndarray], past_names: list[str], past: list[Any],
                      past_dtype: Any, present_names: list[str], device: str) -> tuple[np.ndarray, list[Any]]:
    """Run a decoder graph with IO binding: host inputs, the KV cache as OrtValues, logits back on the host and
    the new cache left on ``device`` (so decode steps never copy the cache through Python).

    Shared by the pre-LLM decoder (:class:`~edgeprune.runtime.ort_backend.OrtBackend`) and the ragged in-LLM one.

    Args:
        runner: the decoder's runner (``.spec`` GraphSpec, ``.session`` InferenceSession).
        host: numpy inputs by name; past_names/past: the cache inputs and their OrtValues; past_dtype: their
            numpy dtype (for the spec check); present_names: the cache outputs; device: where they stay.
    Returns:
        (last-token logits [V] float32, the presents as OrtValues in ``present_names`` order).
    Raises:
        BackendError: inputs that do not match the graph's spec.
    """
    shapes = {k: v.shape for k, v in host.items()} | {n: tuple(v.shape()) for n, v in zip(past_names, past)}
    dtypes = {k: v.dtype for k, v in host.items()} | {n: past_dtype for n in past_names}
    runner.spec.check_inputs(shapes, dtypes)
    binding = runner.session.io_binding()
    for name, arr in host.items():
        binding.bind_cpu_input(name, arr)
    for name, value in zip(past_names, past):
        binding.bind_ortvalue_input(name, value)
    binding.bind_output("logits", "cpu")
    for name in present_names:
        binding.bind_output(name, device)
    runner.session.run_with_iobinding(binding)
    outputs = binding.get_outputs()
    return outputs[0].numpy()[0].astype(np.float32), list(outputs[1:])

@dataclass
class RaggedPrefill:
    """What the host keeps after an in-LLM prefill.

    Attributes:
        visual_start: index of the first visual token; total: T visual tokens spliced; length: L prompt tokens.
        visual_pos: [T] positions of the spliced visual tokens within the T (all of them for in-LLM).
        prunable_pos: [N] positions of the prunable tokens within the T.
        kept_positions: [L_out] sequence indices of the tokens that left the last layer.
        cache_lengths: per-layer present length after the prefill.
    """

    visual_start: int
    total: int
    length: int
    visual_pos: np.ndarray
    prunable_pos: np.ndarray
    kept_positions: np.ndarray
    cache_lengths: list[int]

    def stats(self) -> dict[str, Any]:
        """``kept`` [K] indices into N, ``layer_tokens`` and ``cache_lengths`` (see module docstring)."""
        kp = self.kept_positions
        in_block = kp[(kp >= self.visual_start) & (kp < self.visual_start + self.total)] - self.visual_start
        survivors = self.visual_pos[in_block]
        kept = np.flatnonzero(np.isin(self.prunable_pos, survivors)).astype(np.int64)
        tokens = [self.total - (self.length - c) for c in self.cache_lengths]
        return {"kept": kept, "layer_tokens": tokens, "cache_lengths": list(self.cache_lengths)}


class RaggedSession:
    """Runs the ``prefill`` and the in-LLM ``decoder`` runners of a bundle over one ragged cache.

    Args:
        prefill: the prefill :class:`~edgeprune.runtime.ort_backend.OrtRunner`.
        decoder: the decode runner (per-layer ``past_*`` inputs, no attention mask).
        device: ``cpu`` or ``cuda`` (where the presents live).
    """

    def __init__(self, prefill: Any, decoder: Any, device: str) -> None:
        self.prefill_runner, self.decoder, self.device = prefill, decoder, device
        self.past_names = [n for n in decoder.spec.input_names if n.startswith("past_")]
        self.present_names = [n for n in prefill.spec.output_names if n.startswith("present_")]
        self.kv: list[Any] = []
        self.state: RaggedPrefill | None = None

    def prefill(self, embeds: np.ndarray, position_ids: np.ndarray, visual_start: int, visual_pos: np.ndarray,
                prunable_pos: np.ndarray) -> np.ndarray:
        """Run the prompt with in-graph drops; returns last-token logits [V] float32.

        Args:
            embeds: [1, L, D] with all T visual tokens spliced at ``visual_start``.
            position_ids: [L] int64.
            visual_start: first visual index; visual_pos: [T] their positions within the T;
            prunable_pos: [N] positions of the prunable tokens within the T.
        Raises:
            BackendError: feeds that do not match the graph (e.g. a visual block outside the sequence).
        """
        runner = self.prefill_runner
        total, length = int(len(visual_pos)), int(embeds.shape[1])
        if visual_start < 0 or visual_start + total > length:
            raise BackendError(f"visual block [{visual_start}, {visual_start + total}) is outside the {length}-token "
                               "prompt")
        host = {"inputs_embeds": np.ascontiguousarray(embeds, dtype=runner.spec.inputs[0].np_dtype),
                "position_ids": np.ascontiguousarray(position_ids, dtype=np.int64).reshape(1, length),
                "visual_start": np.asarray([visual_start], dtype=np.int64),
                "visual_count": np.asarray([total], dtype=np.int64),
                "prunable_index": np.flatnonzero(np.isin(visual_pos, prunable_pos)).astype(np.int64)}
        runner.spec.check_feeds(host)
        binding = runner.session.io_binding()
        for name, arr in host.items():
            binding.bind_cpu_input(name, arr)
        binding.bind_output("logits", "cpu")
        for name in self.present_names:
            binding.bind_output(name, self.device)
        binding.bind_output("kept_positions", "cpu")
        runner.session.run_with_iobinding(binding)
        out = binding.get_outputs()
        self.kv = list(out[1:-1])
        lengths = [int(v.shape()[2]) for v in self.kv[::2]]
        self.state = RaggedPrefill(visual_start=int(visual_start), total=total, length=length,
                                   visual_pos=np.asarray(visual_pos), prunable_pos=np.asarray(prunable_pos),
                                   kept_positions=out[-1].numpy()[0], cache_lengths=lengths)
        return out[0].numpy()[0].astype(np.float32)

    def decode(self, embeds: np.ndarray, position: int) -> np.ndarray:
        """One step over the ragged cache (appends to every layer); returns logits [V] float32.

        Raises:
            BackendError: no prefill ran first.
        """
        if self.state is None:
            raise BackendError("decode() needs an in-LLM prefill first")
        dec = self.decoder
        q = int(embeds.shape[1])
        host = {"inputs_embeds": np.ascontiguousarray(embeds, dtype=dec.spec.inputs[0].np_dtype),
                "position_ids": np.arange(position, position + q, dtype=np.int64).reshape(1, q)}
        logits, self.kv = run_decoder_bound(dec, host, self.past_names, self.kv, dec.spec.inputs[2].np_dtype,
                                            dec.spec.output_names[1:], self.device)
        return logits

    def stats(self) -> dict[str, Any]:
        """See :meth:`RaggedPrefill.stats`.

        Raises:
            BackendError: no prefill ran first.
        """
        if self.state is None:
            raise BackendError("in_llm_stats() needs an in-LLM prefill first")
        return self.state.stats()
