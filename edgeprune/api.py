"""High-level Python API: build a pipeline from names, run one request.

```python
from edgeprune.api import build_pipeline
pipe = build_pipeline("tiny-llava", "cls-topk", tokens=64)
result = pipe.run(image, "What is in the image?")
```
Heavy libraries are imported when a function is called, never at import time.
"""

from __future__ import annotations

import argparse
from typing import Any, Mapping, Sequence

from .errors import BudgetError
from .methods.base import Budget, parse_method_args
from .methods.registry import build_method


def build_pipeline(model: str | None, method: str | None = "none", *, tokens: int | None = None,
                   ratio: float | None = None, method_args: Mapping[str, str] | None = None, backend: str = "torch",
                   random_weights: bool = False, dtype: str = "fp32", device: str = "cpu", loaded: Any = None,
                   clip: str | None = None, bundle: str | None = None, providers: Sequence[str] = ("cpu",),
                   kernels: str = "torch", ort_decoder: str = "auto") -> Any:
    """Create a :class:`~edgeprune.runtime.pipeline.Pipeline`.

    Args:
        model: preset, local directory or Hugging Face id (ignored when ``loaded`` is given).
        method: registered method name.
        tokens / ratio: the budget (at most one).
        method_args: method parameters as strings (``--method-arg``).
        backend: ``torch`` (the reference) or ``ort`` (ONNX Runtime over ``bundle``; ``method``/``tokens``/
            ``ratio``/``method_args`` are then optional and must match the bundle, None meaning "the bundle's").
        random_weights, dtype, device: see ``edgeprune run --help``.
        loaded: an already loaded :class:`~edgeprune.models.loader.LoadedModel` to reuse.
        clip: CLIP checkpoint for text guidance (``--clip``); text-guided methods default to ``tiny-clip`` on the
            offline presets and to a random CLIP-L/336 with ``--random-weights``, else to ``guidance=llm``.
        bundle, providers: the exported bundle directory and ONNX Runtime providers (``ort`` backend).
        ort_decoder: ``auto``, ``fused`` or ``portable``: which decoder file of the bundle ONNX Runtime runs
            (:func:`~edgeprune.runtime.ort_backend.choose_graph_file`).
        kernels: ``torch`` (reference) or ``triton`` (fused ZonalTopK / GraphRank kernels; CUDA tensors, or the
            Triton interpreter on CPU).
    Raises:
        UnknownMethodError, MethodArgumentError, BudgetError, UnknownModelError, ModelLoadError, BackendError.
    """
    from .errors import BackendError

    budget = Budget(tokens=tokens, ratio=ratio)  # validate cheap inputs before loading anything
    if backend == "ort":
        if bundle is None:
            raise BackendError("the ort backend runs an exported bundle; pass bundle= (see `edgeprune export`)")
        from .runtime.ort_backend import build_ort_pipeline  # numpy + onnxruntime + tokenizers only

        return build_ort_pipeline(bundle, providers, method=method, tokens=tokens, ratio=ratio,
                                  method_args=method_args, decoder=ort_decoder)
    prune = build_method(method or "none", method_args)
    if kernels == "triton" and prune.use_kernels(kernels) == "triton":
        from ._deps import require as _require

        _require("triton")
    if budget.is_set and not prune.uses_budget:
        raise BudgetError(f"method {prune.name!r} does not take --tokens/--ratio "
                          + ("(its recipe sets the budget)" if prune.placement == "in_llm" else "(it keeps every token)")
                          + "; drop them")
    if backend != "torch":
        raise BackendError(f"unknown backend {backend!r}; available: torch, ort")
    from ._deps import require

    require("torch")  # the torch backend needs torch and transformers: say which extra, not a traceback
    require("transformers")
    from .models.loader import load_model
    from .runtime.pipeline import Pipeline
    from .runtime.torch_backend import TorchBackend

    if loaded is None:
        loaded = load_model(model, random_weights=random_weights, dtype=dtype, device=device)
    guide = _clip_guidance(prune, loaded, clip, device)
    return Pipeline(TorchBackend(loaded, prune, guide), budget, prune.positions, prune.uses_budget, prune.placement)


def _clip_guidance(prune: Any, loaded: Any, clip: str | None, device: str) -> Any:
    """The CLIP text tower for a text-guided method, or None (then ``guidance=auto`` falls back to ``llm``).

    ``--clip`` wins; the offline presets default to ``tiny-clip`` and ``--random-weights`` builds to a random
    CLIP-L/336 text tower, so latency measurements include the guidance stage.
    """
    if not prune.needs_guidance or getattr(prune.params, "guidance", "") == "llm":
        return None
    from .models.clip_guidance import TINY_CLIP, load_clip

    spec = clip or (TINY_CLIP if loaded.source == "offline-preset" else None)
    if spec is None and loaded.source != "random-weights":
        return None
    return load_clip(spec or "", loaded.config.vision_config, random_weights=loaded.source == "random-weights",
                     dtype=next(loaded.model.parameters()).dtype, device=device)


def run_request(args: argparse.Namespace) -> Any:
    """Run ``edgeprune run`` arguments: load the image first (fail fast), then the model, then the request."""
    from .runtime.preprocess import default_image, load_image
    from .runtime.sampling import SamplingConfig

    sampling = SamplingConfig(do_sample=args.do_sample, temperature=args.temperature, top_k=args.top_k,
                              top_p=args.top_p, seed=args.seed)
    image = load_image(args.image) if args.image else default_image()
    pipe = build_pipeline(args.model, args.method, tokens=args.tokens, ratio=args.ratio,
                          method_args=parse_method_args(args.method_arg), backend=args.backend,
                          random_weights=args.random_weights, dtype=args.dtype, device=args.device,
                          clip=args.clip, kernels=args.kernels)
    return pipe.run(image, args.prompt, max_new_tokens=args.max_new_tokens, sampling=sampling)
