"""Stage-by-stage parity of one request through two backends (``edgeprune compare``).

The first backend is the reference (``torch`` by default: the PyTorch model rebuilt from the bundle's manifest),
the second the candidate (``ort``: the bundle on ONNX Runtime). The stages are driven directly
(``encode_image``, ``select``, ``splice``, ``prefill``, ``decode``), not through ``Pipeline.run``, so that every
stage output can be compared, and each stage gets identical host inputs: both backends receive the candidate's
pixels, prompt ids, kept indices and greedy tokens (the reference is teacher-forced). A failure is therefore
reported at the stage that causes it instead of propagating. Tensors that never leave a backend (visual
features, embeddings) are compared but cannot be fed across.

What is compared:
- ``preprocess``: pixel values; ``tokenize``: prompt ids (exact).
- ``vision``: ``features`` [1,N,D] and ``cls_attn`` [1,N]; ``guidance``: GridPrune's text guidance vector;
  ``prune``: kept indices [K] (exact, Polygraphy's ``IndicesCompareFunc``); ``embed``: the spliced
  ``inputs_embeds`` [1,L,D] and the kept positions (exact).
- ``prefill`` / ``decode``: last-token logits [V] at every step; the greedy tokens (the margin rule below). For
  in-LLM methods (FastV, FitPrune: no prune stage, every token spliced) also the tokens that survive the layers,
  the visual tokens entering each layer and the per-layer cache lengths (exact).

Tolerances (:data:`edgeprune.eval.checks.TOLERANCES`), norm-wise: ``max |cand - ref| <= tol * scale`` with ``scale = max(1, max |ref|)``
for features, embeddings and logits, the rule of the exporter's validation and the ONNX Runtime parity tests
(an error bound that scales with the magnitudes summed into each element, so a small logit that comes out of a
cancellation is not held to a tighter absolute bound than its neighbours). ``cls_attn`` holds softmax
probabilities (all below 1, typically ~1/N), so its scale is its own peak ``max |ref|``.

- fp32, ``tol = 1e-4``: both backends run the same fp32 graph and differ only in summation order and fused
  kernels; observed errors on the tiny presets are ~1e-7 relative. A real lowering bug (mask, positions,
  splice, cache, layer choice) moves values by > 1e-2, two orders of magnitude above the bound.
- fp16, ``tol = 2e-2``: fp16 keeps 11 significant bits (unit roundoff 2^-11 ~ 4.9e-4); the two backends round
  at different points (ONNX Runtime fuses and accumulates some ops in fp32, PyTorch rounds every op's output),
  and the difference grows through LayerNorm, softmax and the residual stream to tens of roundoffs, ~1e-2 of
  the largest magnitude. 2e-2 is also the export validation bound for fp16 graphs, so compare is not stricter
  than what ``edgeprune export`` accepted. Real bugs still show as O(1) relative errors.
- Greedy tokens: both logits may move by up to ``atol = tol * scale``, so the argmax is only decided when the
  reference's top-2 margin exceeds ``2 * atol``; there the candidate's token must equal the reference's argmax.
  Steps below the margin are reported as undecided, not as failures.
- Weight-only INT4/INT8 bundles (manifest ``weights``, ``edgeprune export --weights``; :func:`quantized_tolerance`):
  only the LLM graphs are quantized, so every stage before the LLM keeps the fp32 bounds, while the prefill and
  decode logits get the bound the export accepted for that scheme (``edgeprune.export.quantize.EXPORT_BOUNDS``:
  int8 5e-2, int4 6e-1 of ``max(1, max |ref|)``). Tokens follow the margin rule with that looser bound (a step is
  decided only where the reference's top-2 margin exceeds twice it), and the report states the agreement rate
  (steps whose candidate token equals the teacher-forced reference's argmax). The rate is not a per-request gate
  by default: on the random-weight presets the top-2 margins are smaller than int4's logit error, so one request's
  rate measures noise (tiny-llava int4: 17-100 % over three prompts); ``benchmarks/quant_bench.py`` measures it
  over many prompts. A caller can gate on it with ``replace(tolerance, min_agreement=...)``. FastV / FitPrune's
  in-graph selection ranks attention scores computed from the quantized weights, so its ``kept`` tokens are
  compared by overlap (reported, not gated; the count must match), the per-layer counts stay exact.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from .._deps import require
from ..errors import EdgepruneError
from .checks import (TOLERANCES, Checker, CompareError, CompareReport, TokenCheck, Tolerance, quantized_tolerance,
                     to_numpy)

BACKENDS = ("torch", "ort", "trt")


def parse_backends(spec: str | Sequence[str]) -> tuple[str, str]:
    """``"torch,ort"`` -> ("torch", "ort"): the reference first, then the candidate.

    Raises:
        CompareError: not exactly two names, or an unknown name (lists the known ones).
    """
    names = [s.strip().lower() for s in (spec.split(",") if isinstance(spec, str) else spec) if s.strip()]
    if len(names) != 2:
        raise CompareError(f"--backends takes two names, REFERENCE,CANDIDATE (e.g. torch,ort); got {names}")
    unknown = [n for n in names if n not in BACKENDS]
    if unknown:
        raise CompareError(f"unknown backend {unknown[0]!r} in --backends; known: {', '.join(BACKENDS)}")
    return names[0], names[1]


def torch_backend(bundle: Any) -> Any:
    """The torch reference backend for an opened bundle: its model, dtype, method, parameters and K.

    Raises:
        CompareError: the model cannot be rebuilt (not a preset/directory/id here, missing dependency) or the
            rebuilt weights or method parameters differ from what was exported (fingerprint mismatch).
    """
    from ..api import build_pipeline

    m, method = bundle.manifest["model"], bundle.method
    what = f"the torch reference of bundle {bundle.root} ({m.get('name')!r}, {m.get('source')})"
    try:
        require("torch")  # a MissingDependencyError that names the extra, not an ImportError from a deep import
        require("transformers")
        from ..export.exporter import model_fingerprint
        from ..models.loader import load_model

        loaded = load_model(str(m["name"]), random_weights=m.get("source") == "random-weights",
                            dtype=str(m.get("dtype", "fp32")))
        args = {k: str(v).lower() if isinstance(v, bool) else str(v) for k, v in method["params"].items()
                if v is not None}
        guidance = bundle.manifest.get("guidance") or {}
        pipe = build_pipeline("", method["name"], tokens=method.get("k") if method["uses_budget"] else None,
                              method_args=args, loaded=loaded, clip=guidance.get("clip"))  # the exported CLIP
    except EdgepruneError as exc:
        raise CompareError(f"cannot rebuild {what}: {exc}") from exc
    if model_fingerprint(loaded.model) != m.get("fingerprint"):
        raise CompareError(f"cannot rebuild {what}: the loaded weights differ from the exported ones (fingerprint "
                           "mismatch); compare on the machine and model directory the bundle was exported from")
    got = json.loads(json.dumps(pipe.backend.method.describe_params()))  # the manifest's JSON types
    if got != method["params"]:
        raise CompareError(f"cannot rebuild {what}: method parameters {got} differ from the exported "
                           f"{method['params']}")
    return pipe.backend


def make_backend(name: str, bundle: Any, providers: Sequence[str], ort_decoder: str = "auto") -> Any:
    """Build backend ``name`` (``torch``, ``ort`` or ``trt``: the bundle's engines) for an opened bundle."""
    if name == "torch":
        return torch_backend(bundle)
    if name == "trt":
        from ..runtime.trt_backend import TrtBackend

        return TrtBackend(bundle, verify=False)
    from ..runtime.ort_backend import OrtBackend

    return OrtBackend(bundle, providers, decoder=ort_decoder)


# ---------------------------------------------------------------------------------------------------- stages
def _front(ck: Checker, ref: Any, cand: Any, image: Any, prompt: str) -> tuple[Any, Any, list[int], list[int]]:
    """Preprocess and tokenize on both backends; return the candidate's (pixels, size, prefix, suffix)."""
    from ..runtime.preprocess import preprocess
    from ..runtime.prompt import split_prompt

    out = []
    for be in (cand, ref):
        pixels, size = preprocess(image, be.image_config)
        before, after = split_prompt(be.template, prompt)
        out.append((pixels, size, be.codec.encode(before, add_bos=True), be.codec.encode(after, add_bos=False)))
    (cp, cs, cpre, csuf), (rp, rs, rpre, rsuf) = out
    ck.close("preprocess", "pixel_values", cp, rp)
    ck.exact("tokenize", "prompt_ids", np.asarray(cpre + [-1] + csuf), np.asarray(rpre + [-1] + rsuf))
    return cp, cs, cpre, csuf


def _visual_arrays(visual: Any) -> tuple[Any, Any]:
    """(features [1,N,D], cls_attn [1,N]) of a backend's visual handle (torch: ``.tokens``; ort: direct)."""
    src = getattr(visual, "tokens", visual)
    return src.features, src.cls_attn


def _visual_stages(ck: Checker, ref: Any, cand: Any, pixels: Any, size: Any, prompt: str, k: int | None,
                   in_llm: bool) -> tuple[Any, Any, np.ndarray]:
    """vision (+ guidance) + prune on both; return (candidate visual, reference visual, candidate's kept indices).

    In-LLM methods have no prune stage: every visual token is spliced (their layers drop tokens in prefill).
    """
    visuals = [be.encode_image(pixels, size) for be in (cand, ref)]
    for name, c, r in zip(("features", "cls_attn"), _visual_arrays(visuals[0]), _visual_arrays(visuals[1])):
        ck.close("vision", name, c, r, attention=name == "cls_attn")
    if in_llm:
        return visuals[0], visuals[1], np.arange(visuals[0].n, dtype=np.int64)
    guides = [be.guidance(prompt) if be.needs_guidance else None for be in (cand, ref)]
    if guides[0] is not None and guides[1] is not None:  # GridPrune: the question's text guidance vector
        ck.close("guidance", "guidance", guides[0], guides[1])
    kept = [np.asarray(be.select(visual, k if k is not None else visual.n, g), dtype=np.int64)
            for be, visual, g in zip((cand, ref), visuals, guides)]
    ck.exact("prune", "kept_idx", kept[0], kept[1])
    return visuals[0], visuals[1], kept[0]


def _prefill(ck: Checker, ref: Any, cand: Any, embeds: tuple[Any, Any], pos: np.ndarray,
             in_llm: Any) -> list[np.ndarray]:
    """Prefill on both; for in-LLM methods also compare what survived each layer (exact)."""
    logits = [to_numpy(cand.prefill(embeds[0], pos, in_llm)), to_numpy(ref.prefill(embeds[1], pos, in_llm))]
    if in_llm is not None:
        stats = [be.in_llm_stats() for be in (cand, ref)]
        for key in ("kept", "layer_tokens", "cache_lengths"):
            if key == "kept" and ck.tolerance.weights:  # quantized scores may rank near-ties differently
                ck.overlap("prefill", key, np.asarray(stats[0][key]), np.asarray(stats[1][key]))
                continue
            ck.exact("prefill", key, np.asarray(stats[0][key]), np.asarray(stats[1][key]))
    return logits


def _llm_stages(ck: Checker, ref: Any, cand: Any, embeds: tuple[Any, Any], pos: np.ndarray, max_new_tokens: int,
                tokens: TokenCheck, in_llm: Any = None) -> None:
    """Prefill and greedy decode: the candidate picks the tokens, the reference is teacher-forced on them."""
    logits = _prefill(ck, ref, cand, embeds, pos, in_llm)
    next_pos = int(pos[-1]) + 1
    for step in range(max_new_tokens):
        check = ck.close("prefill" if step == 0 else "decode", "logits", logits[0], logits[1], step=step,
                         tol=ck.tolerance.logits_value)
        token, ref_top = int(np.argmax(logits[0])), int(np.argmax(logits[1]))
        tokens.candidate.append(token)
        tokens.reference_argmax.append(ref_top)
        top2 = np.sort(logits[1].astype(np.float64))[-2:]
        if check.atol is not None and top2.size == 2 and top2[1] - top2[0] > ck.tolerance.margin_factor * check.atol:
            tokens.decided.append(step)
            if token != ref_top:
                tokens.mismatched.append(step)
        if step + 1 == max_new_tokens or (cand.eos_token_id is not None and token == cand.eos_token_id):
            break
        logits = [to_numpy(cand.decode(token, next_pos)), to_numpy(ref.decode(token, next_pos))]
        next_pos += 1


def compare_bundle(bundle: str | Path, backends: str | Sequence[str] = "torch,ort", *, image: Any = None,
                   prompt: str = "What is in the image?", max_new_tokens: int = 8,
                   providers: Sequence[str] = ("cpu",), tolerance: Tolerance | None = None,
                   ort_decoder: str = "auto") -> CompareReport:
    """Run one request through two backends stage by stage and compare every stage (module docstring).

    Args:
        bundle: the bundle directory.
        backends: ``"REFERENCE,CANDIDATE"`` or a pair of names from :data:`BACKENDS`.
        image: a PIL image (default: the bundled example image).
        prompt: the question.
        max_new_tokens: greedy steps (prefill counts as the first); stops early at the candidate's EOS.
        providers: ONNX Runtime providers for an ``ort`` backend.
        ort_decoder: which decoder file an ``ort`` backend runs (``auto``, ``fused``, ``portable``).
        tolerance: override the bundle dtype's :data:`TOLERANCES` entry.
    Returns:
        The :class:`CompareReport` (``passed`` tells whether every check is within tolerance).
    Raises:
        BundleError: missing/corrupt bundle. CompareError: bad backends, model cannot be rebuilt.
        BackendError, PromptError, BudgetError: the request does not fit the bundle.
    """
    from ..methods.base import Budget
    from ..runtime.backend import InLLMRequest
    from ..bundle import open_bundle
    from ..runtime.pipeline import position_ids
    from ..runtime.preprocess import default_image
    from ..runtime.prompt import check_context

    if max_new_tokens < 1:
        raise CompareError(f"--max-new-tokens must be a positive integer; got {max_new_tokens}")
    names = parse_backends(backends)
    opened = open_bundle(bundle)
    m, method = opened.manifest, opened.method
    dtype = str(m["model"].get("dtype", "fp32"))
    tol = tolerance or quantized_tolerance(m.get("weights"), dtype) or TOLERANCES.get(dtype)
    if tol is None:
        raise CompareError(f"no tolerances are defined for dtype {dtype!r}; known: {', '.join(TOLERANCES)}")
    ref, cand = (make_backend(n, opened, providers, ort_decoder) for n in names)
    ck = Checker(tol, names)
    report = CompareReport(bundle=str(opened.root), reference=names[0], candidate=names[1], model=m["model"]["name"],
                           method=method["name"], k=method.get("k"), prompt=prompt, tolerance=tol,
                           comparator=ck.comparator, checks=ck.checks,
                           backend_info={names[0]: ref.info, names[1]: cand.info})
    pixels, size, prefix, suffix = _front(ck, ref, cand, image if image is not None else default_image(), prompt)
    in_llm = method.get("placement", "pre_llm") == "in_llm"
    cvis, rvis, kept = _visual_stages(ck, ref, cand, pixels, size, prompt, method.get("k"), in_llm)
    check_context(len(prefix), int(cvis.total), len(suffix), max_new_tokens, int(cand.max_positions))
    (cemb, cpos), (remb, rpos) = (be.splice(prefix, vis, kept, suffix) for be, vis in ((cand, cvis), (ref, rvis)))
    ck.close("embed", "inputs_embeds", cemb, remb)
    ck.exact("embed", "kept_positions", cpos, rpos)
    pos = position_ids(len(prefix), int(cvis.total), len(suffix), np.asarray(cpos), method["positions"])
    request = None
    if in_llm:  # the pipeline's request: the bundle's budget, the visual block after the prefix
        budget = Budget(tokens=method["k"]) if method["uses_budget"] and method.get("k") else Budget()
        request = InLLMRequest(budget, len(prefix))
    report.tokens.min_agreement = tol.min_agreement  # quantized bundles: tokens also pass on their agreement
    _llm_stages(ck, ref, cand, (cemb, remb), pos, max_new_tokens, report.tokens, request)
    return report
