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

from .errors import BackendError, BudgetError, PromptError
from .methods.base import Budget, ModelLimits, PruningMethod, parse_method_args
from .methods.registry import build_method


def build_pipeline(model: str | None, method: str | None = None, *, tokens: int | None = None,
                   ratio: float | None = None, method_args: Mapping[str, str] | None = None, backend: str = "torch",
                   random_weights: bool = False, dtype: str = "fp32", device: str = "cpu", loaded: Any = None,
                   clip: str | None = None, bundle: str | None = None, providers: Sequence[str] = ("cpu",),
                   kernels: str = "torch", ort_decoder: str = "auto") -> Any:
    """Create a :class:`~edgeprune.runtime.pipeline.Pipeline`.

    Args:
        model: preset, local directory or Hugging Face id (ignored when ``loaded`` is given).
        method: registered method name; None means ``none`` on the torch backend and the bundle's method on
            ``ort``.
        tokens / ratio: the budget (at most one).
        method_args: method parameters as strings (``--method-arg``).
        backend: ``torch`` (the reference), ``ort`` (ONNX Runtime over ``bundle``) or ``trt`` (the bundle's
            TensorRT engines, ``edgeprune build``); for ``ort``/``trt`` ``method``/``tokens``/``ratio``/
            ``method_args`` are optional and must match the bundle, None meaning "the bundle's".
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
    budget = Budget(tokens=tokens, ratio=ratio)  # validate cheap inputs before loading anything
    if backend == "trt":
        if bundle is None:
            raise BackendError("the trt backend runs a bundle's engines; pass bundle= (see `edgeprune build`)")
        from .runtime.trt_backend import build_trt_pipeline  # numpy + tensorrt + cuda-python + tokenizers only

        return build_trt_pipeline(bundle, method=method, tokens=tokens, ratio=ratio, method_args=method_args)
    if backend == "ort":
        if bundle is None:
            raise BackendError("the ort backend runs an exported bundle; pass bundle= (see `edgeprune export`)")
        from .runtime.ort_backend import build_ort_pipeline  # numpy + onnxruntime + tokenizers only

        return build_ort_pipeline(bundle, providers, method=method, tokens=tokens, ratio=ratio,
                                  method_args=method_args, decoder=ort_decoder)
    prune = build_method(method or "none", method_args)
    if budget.is_set and not prune.uses_budget:
        raise BudgetError(f"method {prune.name!r} does not take --tokens/--ratio "
                          + ("(its recipe sets the budget)" if prune.placement == "in_llm" else "(it keeps every token)")
                          + "; drop them")
    if backend != "torch":
        raise BackendError(f"unknown backend {backend!r}; available: torch, ort, trt")
    if loaded is None:
        preflight(model, prune, budget, device=device, kernels=kernels, random_weights=random_weights)
    else:
        _check_kernels(prune, kernels, device)
        _check_limits(prune, budget, _loaded_limits(loaded))
    from .models.loader import load_model
    from .runtime.pipeline import Pipeline
    from .runtime.torch_backend import TorchBackend

    if loaded is None:
        loaded = load_model(model, random_weights=random_weights, dtype=dtype, device=device)
    guide = _clip_guidance(prune, loaded, clip, device)
    return Pipeline(TorchBackend(loaded, prune, guide), budget, prune.positions, prune.uses_budget, prune.placement)


def check_device(device: str) -> None:
    """``--device`` names a device this torch can use: ``cpu``, or ``cuda``/``cuda:N`` with CUDA available.

    Raises:
        BackendError: an unparsable name, a device type edgeprune does not run on, CUDA on a CPU-only torch,
            or a CUDA index beyond the visible devices.
    """
    from ._deps import require

    torch = require("torch")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise BackendError(f"--device {device!r} is not a device name; use cpu, cuda or cuda:N") from None
    if dev.type == "cpu":
        return
    if dev.type != "cuda":
        raise BackendError(f"--device {device!r}: edgeprune runs on cpu or cuda[:N], not {dev.type}")
    if not torch.cuda.is_available():
        raise BackendError(f"--device {device} requested but this torch ({torch.__version__}) sees no CUDA device; "
                           "use --device cpu, or install a CUDA build of torch on a machine with a GPU")
    count = torch.cuda.device_count()
    if dev.index is not None and dev.index >= count:
        raise BackendError(f"--device {device}: only {count} CUDA device(s) are visible (cuda:0..cuda:{count - 1})")


def preflight(model: str | None, prune: PruningMethod, budget: Budget, *, device: str = "cpu",
              kernels: str = "torch", random_weights: bool = False,
              max_new_tokens: int | None = None) -> ModelLimits | None:
    """Check everything that can be checked before building the model, in milliseconds.

    ``--device``, ``--kernels``, and against the model's config (:func:`~edgeprune.models.limits.model_limits`:
    the presets ship theirs): the method's parameter bounds, K <= N, and that the image and ``max_new_tokens``
    fit the context.

    Returns:
        The model's limits, or None when only loading the model can tell (a hub id that is not a preset).
    Raises:
        BackendError, MethodArgumentError, BudgetError, PromptError, MissingDependencyError.
    """
    from ._deps import require

    require("torch")  # the torch backend needs torch and transformers: say which extra, not a traceback
    require("transformers")
    check_device(device)
    _check_kernels(prune, kernels, device)
    from .models.limits import model_limits

    limits = model_limits(model, random_weights) if model else None
    if limits is not None:
        _check_limits(prune, budget, limits, max_new_tokens)
    return limits


def _check_kernels(prune: PruningMethod, kernels: str, device: str) -> None:
    """Set the method's implementation; ``triton`` needs triton and CUDA, or the interpreter on the CPU."""
    if prune.use_kernels(kernels) != "triton":
        return
    from ._deps import require

    require("triton")
    from .kernels.zonal_topk import is_interpreted

    if not str(device).startswith("cuda") and not is_interpreted():
        raise BackendError(f"--kernels triton runs {prune.fused_op} as a compiled Triton kernel, which needs "
                           "--device cuda; on the CPU set TRITON_INTERPRET=1 (the Triton interpreter) or use "
                           "--kernels torch")


def _loaded_limits(loaded: Any) -> ModelLimits:
    from .models.limits import limits_from_config

    return limits_from_config(loaded.config)


def _check_limits(prune: PruningMethod, budget: Budget, limits: ModelLimits, max_new_tokens: int | None = None) -> None:
    """The method's parameter bounds, K <= the model's largest N, and room in the context (see :func:`preflight`)."""
    prune.check_limits(limits)
    if prune.uses_budget and budget.tokens is not None and budget.tokens > limits.n_max:
        raise BudgetError(f"--tokens {budget.tokens} exceeds the {limits.n_max} visual tokens this model gives an "
                          f"image at most; use 1 <= K <= {limits.n_max}")
    if max_new_tokens is not None and limits.t_min + max_new_tokens + 1 > limits.max_positions:
        raise PromptError(f"--max-new-tokens {max_new_tokens} cannot fit: the image alone takes at least "
                          f"{limits.t_min} of the model's {limits.max_positions} positions; use --max-new-tokens "
                          f"<= {limits.max_positions - limits.t_min - 1}")


def _clip_guidance(prune: Any, loaded: Any, clip: str | None, device: str) -> Any:
    """The CLIP text tower for a text-guided method, or None (then ``guidance=auto`` falls back to ``llm``).

    ``--clip`` wins; the offline presets default to ``tiny-clip`` and ``--random-weights`` builds to a random
    CLIP-L/336 text tower, so latency measurements include the guidance stage.
    """
    if not prune.needs_guidance or getattr(prune.params, "guidance", "") == "llm":
        return None
    from .models.clip_guidance import TINY_CLIP, load_clip

    spec = clip or loaded.default_clip or (TINY_CLIP if loaded.source == "offline-preset" else None)
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
    preflight(args.model, build_method(args.method or "none", parse_method_args(args.method_arg)),
              Budget(tokens=args.tokens, ratio=args.ratio), device=args.device, kernels=args.kernels,
              random_weights=args.random_weights, max_new_tokens=args.max_new_tokens)
    image = load_image(args.image) if args.image else default_image()
    pipe = build_pipeline(args.model, args.method, tokens=args.tokens, ratio=args.ratio,
                          method_args=parse_method_args(args.method_arg), backend=args.backend,
                          random_weights=args.random_weights, dtype=args.dtype, device=args.device,
                          clip=args.clip, kernels=args.kernels)
    return pipe.run(image, args.prompt, max_new_tokens=args.max_new_tokens, sampling=sampling)
