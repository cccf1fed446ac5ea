"""The ``ort`` backend: an exported bundle run with ONNX Runtime, numpy on the host, no torch, no transformers.

What runs where (DESIGN.md §2): the vision, guidance, prune, embed, prefill and decoder graphs in ONNX Runtime
sessions (created once per backend and reused); the LLaVA-NeXT packing (``runtime.anyres.pack_layout``), the
splice of kept visual rows between the prompt's text embeddings, GridPrune's guidance averaging / zone ids and
G-Prune's group ids (:mod:`~edgeprune.runtime.ort_methods`) on the host in numpy; tokenisation with the
``tokenizers`` library from the bundle's ``tokenizer.json`` (and ``clip_tokenizer/`` for CLIP guidance).
In-LLM methods (FastV, FitPrune) run their ``prefill`` graph, which drops visual tokens between layers, and then
decode over the ragged per-layer cache (:mod:`~edgeprune.runtime.ort_inllm`). The KV cache stays in ONNX Runtime
``OrtValue`` objects between decode steps: the decoder runs through IO binding, its presents are bound to the
execution device and fed back as the next step's past, so the cache never goes through numpy (on CUDA it stays
on the GPU); only the last-token logits are bound to host memory. LLM graphs with a fused-attention variant
(``decoder.ort.onnx``) run it or the portable file as :func:`choose_graph_file` decides (logged, with why).

On a Jetson this path needs numpy, Pillow, tokenizers and onnxruntime(-gpu) only (tested in a subprocess that
blocks torch and transformers).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from .._deps import require
from ..errors import BackendError
from ..bundle import Bundle, BundleError, GraphEntry, open_bundle
from ..bundle.format import ORT_DECODER_CHOICES, VARIANT, VARIANT_OPSET
from ..bundle.spec import DTYPES
from .anyres import assembly_order, pack_layout
from .backend import Backend
from .ort_inllm import RaggedSession, run_decoder_bound
from .ort_methods import Guidance, prune_feeds
from .preprocess import ImageConfig

log = logging.getLogger(__name__)

# Short names accepted by --providers -> ONNX Runtime execution providers.
PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider",
             "tensorrt": "TensorrtExecutionProvider", "trt-rtx": "NvTensorRTRTXExecutionProvider"}


def resolve_providers(names: Sequence[str]) -> list[str]:
    """Map short provider names to ONNX Runtime providers, checking that this build has them.

    The CPU provider is appended when missing: ONNX Runtime places nodes another provider cannot run on it.

    Raises:
        BackendError: an unknown name (lists the known ones) or a provider this onnxruntime build lacks
            (lists the available ones and what to install).
    """
    ort = require("onnxruntime")
    available = ort.get_available_providers()
    out: list[str] = []
    for name in names:
        full = PROVIDERS.get(name.strip().lower()) or (name if name.endswith("ExecutionProvider") else None)
        if full is None:
            raise BackendError(f"unknown execution provider {name!r}; known: {', '.join(PROVIDERS)}")
        if full not in available:
            raise BackendError(f"execution provider {name} ({full}) is not available in this onnxruntime build "
                               f"(available: {', '.join(available)}); for cuda install onnxruntime-gpu "
                               "(pip install -e '.[gpu]')")
        out.append(full)
    if "CPUExecutionProvider" not in out:
        out.append("CPUExecutionProvider")
    return out


class TokenizersCodec:
    """:class:`~edgeprune.runtime.backend.TextCodec` over ``tokenizers.Tokenizer`` (no transformers).

    ``encode(text, add_bos=True)`` applies the tokenizer's post-processor, which is what adds ``<s>`` for
    the Llama-style tokenizers, exactly as ``tokenizer(text, add_special_tokens=True)`` does in transformers.
    """

    def __init__(self, path: Path, clean_up_spaces: bool = False) -> None:
        tokenizers = require("tokenizers")
        try:
            self.tokenizer = tokenizers.Tokenizer.from_file(str(path))
        except Exception as exc:  # noqa: BLE001 - tokenizers raises plain Exception for unreadable/broken files
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
            raise BundleError(f"cannot load the tokenizer {path} ({first}); the bundle's tokenizer is broken or "
                              "unreadable: re-export it with `edgeprune export ... --force`") from None
        self.clean_up_spaces = clean_up_spaces

    def encode(self, text: str, add_bos: bool) -> list[int]:
        return list(self.tokenizer.encode(text, add_special_tokens=add_bos).ids)

    def decode(self, ids: list[int]) -> str:
        text = self.tokenizer.decode(list(map(int, ids)), skip_special_tokens=True)
        if self.clean_up_spaces:  # transformers' clean_up_tokenization, applied when the tokenizer asks for it
            for a, b in ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"),
                         (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re")):
                text = text.replace(a, b)
        return text


def choose_graph_file(entry: GraphEntry, providers: Sequence[str], choice: str = "auto") -> tuple[Path, str]:
    """The ONNX file of ``entry`` to run, its fused-attention variant or the portable graph, and why.

    ``auto`` takes the variant when the providers are CPU only: onnxruntime-gpu builds before the CUDA kernel
    of the opset-23 Attention op place it on the CPU (onnxruntime#28025), which would cost far more than it
    saves, so with an accelerator ``fused`` must be asked for. ``fused`` on a graph without a variant returns
    the portable file; :class:`OrtBackend` refuses it when no graph of the bundle has one.

    Returns:
        (path, reason): the file and a phrase for the log (house rule 7).
    Raises:
        BackendError: an unknown ``choice``.
    """
    if choice not in ORT_DECODER_CHOICES:
        raise BackendError(f"--ort-decoder must be one of {', '.join(ORT_DECODER_CHOICES)}; got {choice!r}")
    fused = entry.variants.get(VARIANT)
    if fused is None:
        return entry.path, "the only file of this graph"
    if choice != "auto":
        return (fused if choice == "fused" else entry.path), f"--ort-decoder {choice}"
    accelerators = [p for p in providers if p != "CPUExecutionProvider"]
    if not accelerators:
        return fused, "fused attention on the CPU provider"
    return entry.path, f"{accelerators[0]} may not run the opset-23 Attention op (--ort-decoder fused to try)"


class OrtRunner:
    """One graph in one ONNX Runtime session; checks every feed against the graph's spec (DESIGN.md §4 Runner).

    Args:
        entry: the bundle's graph entry (file and spec).
        providers: ONNX Runtime providers, in priority order.
        path: the ONNX file to load (default ``entry.path``; a variant of the same graph, see
            :func:`choose_graph_file`).
    Raises:
        BundleError: the ONNX file cannot be loaded, or its inputs differ from the spec in the manifest.
    """

    def __init__(self, entry: GraphEntry, providers: list[str], path: Path | None = None) -> None:
        ort = require("onnxruntime")
        options = ort.SessionOptions()
        options.log_severity_level = 3  # errors only: ORT warns about every node it leaves on the CPU
        self.spec = entry.spec
        self.path = path or entry.path
        try:
            self.session = ort.InferenceSession(str(self.path), sess_options=options, providers=providers)
        except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own exception classes per failure
            raise BundleError(f"cannot load {self.path.name} with ONNX Runtime ({exc}); re-export the bundle, or "
                              "upgrade onnxruntime if it names an unknown operator") from exc
        names = [i.name for i in self.session.get_inputs()]
        if names != self.spec.input_names:
            raise BundleError(f"{self.path.name} has inputs {names}, but the manifest says {self.spec.input_names}; "
                              "re-export the bundle")
        log.info("graph %s (%s) runs on %s", entry.name, self.path.name, ", ".join(self.session.get_providers()))

    def infer(self, feeds: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        """Run the graph; returns the outputs in spec order.

        Raises:
            BackendError: feeds that do not match the spec (name, dtype, rank, size).
        """
        self.spec.check_feeds(feeds)
        return self.session.run(self.spec.output_names, dict(feeds))


@dataclass
class OrtVisual:
    """The visual tokens of one image on the host (the ORT backend's visual handle).

    Attributes:
        features: [1, N, D] prunable tokens in LLM order; cls_attn: [1, N] float32.
        total: T visual positions before pruning (N plus NeXT newlines).
        prunable_pos: [N] positions of the prunable tokens within the T.
        extra_rows / extra_pos: [T - N, D] always-kept rows (NeXT newlines) and their positions, or None.
        clip_embeds: [1, N, Dc] CLIP-space patch embeddings (GridPrune with CLIP guidance), or None.
        layout: ``view``, ``row``, ``col``, ``group`` ([N] int64 each) of the prunable tokens (NeXT), or None.
        kept / kept_rows: the last prune graph result ([K] indices, [K, D] rows), reused by the splice.
    """

    features: np.ndarray
    cls_attn: np.ndarray
    total: int
    prunable_pos: np.ndarray
    extra_rows: np.ndarray | None = None
    extra_pos: np.ndarray | None = None
    clip_embeds: np.ndarray | None = None
    layout: dict[str, np.ndarray] | None = None
    kept: np.ndarray | None = None
    kept_rows: np.ndarray | None = None

    @property
    def n(self) -> int:
        return int(self.features.shape[1])

    def assemble(self, kept: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Rows entering the LLM and their positions within the T (numpy twin of ``VisualSequence.assemble``).

        Args:
            kept: [K] int64 ascending indices into the N prunable tokens.
        Returns:
            (rows [K', D], positions [K'] int64 ascending).
        """
        kept = np.asarray(kept, dtype=np.int64)
        same = self.kept is not None and np.array_equal(kept, self.kept)
        rows = self.kept_rows if same else self.features[0, kept]
        pos, order = assembly_order(self.prunable_pos, kept, self.extra_pos)
        if order is None:
            return rows, pos
        return np.concatenate([rows, self.extra_rows.astype(rows.dtype)], axis=0)[order], pos


class OrtBackend(Backend):
    """:class:`~edgeprune.runtime.backend.Backend` over a bundle (see module docstring).

    Args:
        bundle: the bundle directory or an opened :class:`~edgeprune.bundle.Bundle`.
        providers: short provider names (``cpu``, ``cuda``, ``tensorrt``) in priority order.
        verify: hash every file of the bundle before loading it (reads the whole bundle once: seconds for a 7B
            model; pass False only for a bundle verified moments ago).
        decoder: ``auto``, ``fused`` or ``portable``: which file of a graph with a fused-attention variant to run
            (:func:`choose_graph_file`). With ``auto``, a variant this onnxruntime cannot load falls back to the
            portable graph (logged).
    Raises:
        BundleError: see :func:`~edgeprune.bundle.open_bundle`. BackendError: unavailable providers,
            ``fused`` for a bundle without a fused-attention decoder.
    """

    name = "ort"

    def __init__(self, bundle: str | Path | Bundle, providers: Sequence[str] = ("cpu",), verify: bool = True,
                 decoder: str = "auto") -> None:
        self.bundle = bundle if isinstance(bundle, Bundle) else open_bundle(bundle, verify=verify)
        m = self.bundle.manifest
        self.providers = resolve_providers(providers)
        self.device = "cuda" if "CUDAExecutionProvider" in self.providers else "cpu"
        has_fused = int(m["opset"]) >= VARIANT_OPSET or any(e.variants for e in self.bundle.graphs.values())
        if decoder == "fused" and not has_fused:
            raise BackendError(f"the bundle {self.bundle.root} has no fused-attention decoder (exported with "
                               "--no-ort-variant); use --ort-decoder auto/portable or re-export it")
        self.runners = {name: self._runner(entry, decoder) for name, entry in self.bundle.graphs.items()}
        self._read_host_config()
        dec = self.runners["decoder"].spec
        self._past_names = [n for n in dec.input_names if n.startswith("past_")]
        self._present_names = [n for n in dec.output_names if n.startswith("present_")]
        past = dec.inputs[dec.input_names.index(self._past_names[0])]
        self._kv_shape = (1, int(past.dims[1]), 0, int(past.dims[3]))
        self._kv_dtype = DTYPES[past.dtype]
        self._kv: list[Any] = []
        self._seq_len = 0
        self._ragged = RaggedSession(self.runners["prefill"], self.runners["decoder"], self.device) \
            if "prefill" in self.runners else None
        self._spliced: tuple[OrtVisual, np.ndarray] | None = None
        self._ragged_active = False  # the last prefill was in-LLM: decode over the ragged cache
        self._guidance = self._make_guidance(m.get("guidance"))

    def _read_host_config(self) -> None:
        """The host-side state the stages read from the manifest: preprocessing, prompt, tokenizer, vision
        geometry, K (shared with :class:`~edgeprune.runtime.trt_backend.TrtBackend`)."""
        m = self.bundle.manifest
        self.image_config = ImageConfig.from_dict(m["preprocessing"])
        self.template = m["prompt"]["template"]
        self.eos_token_id = m["prompt"].get("eos_token_id")
        self.max_positions = int(m["max_positions"])
        self.codec = TokenizersCodec(self.bundle.path(m["tokenizer"]["file"]),
                                     bool(m["tokenizer"].get("clean_up_tokenization_spaces", False)))
        vis = m["vision"]
        self.view_px, self.patch_px = int(vis["image_size"]), int(vis["patch_size"])
        self.pinpoints = vis.get("grid_pinpoints")
        self.newline = None if not vis.get("newline_file") else np.load(self.bundle.path(vis["newline_file"]))
        self.k = self.bundle.k

    def _runner(self, entry: GraphEntry, choice: str) -> OrtRunner:
        path, why = choose_graph_file(entry, self.providers, choice)
        log.info("graph %s: %s (%s)", entry.name, path.name, why)
        try:
            return OrtRunner(entry, self.providers, path)
        except BundleError as exc:  # e.g. an onnxruntime without the opset-23 Attention kernel
            if choice != "auto" or path == entry.path:
                raise
            log.warning("%s; running the portable %s instead", exc, entry.path.name)
            return OrtRunner(entry, self.providers)

    @property
    def info(self) -> dict[str, Any]:
        """What the profile reports about this backend: the providers and the ONNX file of every graph."""
        return {"providers": ",".join(self.providers),
                "graph_files": ",".join(r.path.name for r in self.runners.values())}

    def _make_guidance(self, section: dict[str, Any] | None) -> Guidance | None:
        """GridPrune's guidance stage from the manifest (None for the other methods)."""
        if section is None:
            return None
        embed = lambda ids: self.runners["embed"].infer({"input_ids": ids})[0]  # noqa: E731
        if section.get("source") != "clip":
            return Guidance(section, self.codec, embed)
        if "guidance" not in self.runners:
            raise BundleError(f"{self.bundle.root}: CLIP guidance needs a guidance graph, which the manifest does not "
                              "list; re-export the bundle")
        clip_codec = TokenizersCodec(self.bundle.path(section["tokenizer"]))
        text = lambda ids: self.runners["guidance"].infer({"input_ids": ids})[0]  # noqa: E731
        return Guidance(section, self.codec, embed, clip_codec, text)

    @property
    def needs_guidance(self) -> bool:  # type: ignore[override]
        return self._guidance is not None

    def guidance(self, question: str) -> np.ndarray:
        """GridPrune's guidance vector [1, Dg] float32 (CLIP text tower or mean LLM embedding, see the manifest).

        Raises:
            BackendError: the bundle's method is not text-guided.
        """
        if self._guidance is None:
            raise BackendError(f"method {self.bundle.method['name']} takes no text guidance")
        return self._guidance(question)

    # ------------------------------------------------------------------ vision / prune / splice
    def encode_image(self, pixel_values: np.ndarray, image_size: tuple[int, int]) -> OrtVisual:
        vision = self.runners["vision"]
        px = np.ascontiguousarray(pixel_values, dtype=vision.spec.inputs[0].np_dtype)
        feats, cls_attn, *clip = vision.infer({"pixel_values": px})  # [V, P, D], [V, P] (, [V, P, Dc])
        clip_embeds = clip[0] if clip else None
        if self.pinpoints is None:
            n = feats.shape[1]
            return OrtVisual(features=feats[:1], cls_attn=cls_attn[:1], total=n,
                             prunable_pos=np.arange(n, dtype=np.int64),
                             clip_embeds=None if clip_embeds is None else clip_embeds[:1])
        layout = pack_layout(tuple(image_size), self.pinpoints, self.view_px, self.patch_px)
        prunable = np.flatnonzero(layout.source >= 0).astype(np.int64)
        src = layout.source[prunable]
        flat = feats.reshape(-1, feats.shape[-1])
        newline_pos = np.flatnonzero(layout.source < 0).astype(np.int64)
        extra = np.broadcast_to(self.newline.astype(flat.dtype), (len(newline_pos), flat.shape[-1]))
        if clip_embeds is not None:
            clip_embeds = clip_embeds.reshape(-1, clip_embeds.shape[-1])[src][None]
        lay = {key: getattr(layout, key)[prunable] for key in ("view", "row", "col", "group")}
        return OrtVisual(features=flat[src][None], cls_attn=cls_attn.reshape(-1)[src][None], total=layout.total,
                         prunable_pos=prunable, extra_rows=extra, extra_pos=newline_pos, clip_embeds=clip_embeds,
                         layout=lay)

    def select(self, visual: OrtVisual, k: int, guidance: Any = None) -> np.ndarray:
        """Kept indices [K] (int64, ascending) from the prune graph; every index for ``none``.

        Raises:
            BackendError: K differs from the bundle's static K.
        """
        prune = self.runners.get("prune")
        if prune is None:
            if k != visual.n:
                raise BackendError(f"this bundle keeps every visual token (method none); K = {k} != N = {visual.n}")
            return np.arange(visual.n, dtype=np.int64)
        if k != self.k:
            raise BackendError(f"this bundle's prune graph has a static K = {self.k}; K = {k} was asked. "
                               "Export another bundle for another budget")
        grid = (self.view_px // self.patch_px, self.view_px // self.patch_px)
        feeds = prune_feeds(prune.spec.input_names, visual, self.bundle.method, grid, guidance)
        kept_rows, kept_idx = prune.infer(feeds)
        visual.kept, visual.kept_rows = kept_idx[0].astype(np.int64), kept_rows[0]
        return visual.kept

    def splice(self, prefix: list[int], visual: OrtVisual, kept: np.ndarray,
               suffix: list[int]) -> tuple[np.ndarray, np.ndarray]:
        rows, pos = visual.assemble(kept)
        ids = np.asarray([list(prefix) + list(suffix)], dtype=np.int64)
        text = self.runners["embed"].infer({"input_ids": ids})[0][0]  # [L, D]
        embeds = np.concatenate([text[: len(prefix)], rows.astype(text.dtype), text[len(prefix):]], axis=0)
        self._spliced = (visual, pos)
        return embeds[None], pos

    # ------------------------------------------------------------------ LLM
    def _step(self, embeds: np.ndarray, position_ids: np.ndarray) -> np.ndarray:
        """Run the decoder on ``embeds [1,S,D]`` after the cached past; keep the presents as OrtValues."""
        dec = self.runners["decoder"]
        s = int(embeds.shape[1])
        host = {"inputs_embeds": np.ascontiguousarray(embeds, dtype=dec.spec.inputs[0].np_dtype),
                "attention_mask": np.ones((1, self._seq_len + s), dtype=np.int64),
                "position_ids": np.ascontiguousarray(position_ids, dtype=np.int64).reshape(1, s)}
        if "attention_mask" not in dec.spec.input_names:  # an in-LLM bundle's decoder: see prefill()
            raise BackendError("this bundle's decoder runs after an in-LLM prefill only (method "
                               f"{self.bundle.method['name']}); the pipeline must pass the in-LLM request")
        logits, self._kv = run_decoder_bound(dec, host, self._past_names, self._kv, self._kv_dtype,
                                             self._present_names, self.device)
        self._seq_len += s
        return logits

    def prefill(self, embeds: np.ndarray, position_ids: np.ndarray, in_llm: Any = None) -> np.ndarray:
        """Start a fresh KV cache and run the prompt; with ``in_llm`` (FastV/FitPrune) through the prefill graph,
        which drops visual tokens between layers and leaves a ragged cache.

        Raises:
            BackendError: an in-LLM request for a bundle without a prefill graph, or the reverse.
        """
        self._ragged_active = False
        if in_llm is not None:
            if self._ragged is None or self._spliced is None:
                raise BackendError(f"this bundle ({self.bundle.method['name']}) has no in-LLM prefill graph; export "
                                   "one with --method fastv or fitprune" if self._ragged is None else
                                   "splice() must run before an in-LLM prefill")
            visual, pos = self._spliced
            self._ragged_active = True
            return self._ragged.prefill(embeds, position_ids, int(in_llm.visual_start), pos, visual.prunable_pos)
        ort = require("onnxruntime")
        empty = np.zeros(self._kv_shape, dtype=self._kv_dtype)
        self._kv = [ort.OrtValue.ortvalue_from_numpy(empty, self.device, 0) for _ in self._past_names]
        self._seq_len = 0
        return self._step(embeds, position_ids)

    def in_llm_stats(self) -> dict[str, Any]:
        """``kept`` (indices into N), ``layer_tokens`` and ``cache_lengths`` of the last in-LLM prefill.

        Raises:
            BackendError: no in-LLM prefill ran.
        """
        if self._ragged is None:
            raise BackendError("in_llm_stats() needs an in-LLM bundle (fastv, fitprune)")
        return self._ragged.stats()

    def decode(self, token: int, position: int) -> np.ndarray:
        embeds = self.runners["embed"].infer({"input_ids": np.asarray([[token]], dtype=np.int64)})[0]
        if self._ragged_active and self._ragged is not None:
            return self._ragged.decode(embeds, position)
        return self._step(embeds, np.asarray([position], dtype=np.int64))


def build_ort_pipeline(bundle: str | Path, providers: Sequence[str] = ("cpu",), method: str | None = None,
                       tokens: int | None = None, ratio: float | None = None,
                       method_args: Mapping[str, str] | None = None, decoder: str = "auto") -> Any:
    """A :class:`~edgeprune.runtime.pipeline.Pipeline` over a bundle; method, K and positions come from it.

    Args:
        bundle: the bundle directory.
        providers: short ONNX Runtime provider names.
        decoder: ``--ort-decoder`` (:func:`choose_graph_file`).
        method, tokens, ratio, method_args: optional; when given they must match the bundle.
    Raises:
        BundleError, BackendError (a flag that contradicts the bundle, an unavailable provider).
    """
    from ..methods.base import Budget
    from .pipeline import Pipeline

    opened = open_bundle(bundle)
    opened.check_request(method, tokens, ratio, method_args)
    m = opened.method
    budget = Budget(tokens=m["k"]) if m["uses_budget"] else Budget()
    return Pipeline(OrtBackend(opened, providers, decoder=decoder), budget, m["positions"], bool(m["uses_budget"]),
                    m.get("placement", "pre_llm"))
