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

Tolerances (:data:`TOLERANCES`), norm-wise: ``max |cand - ref| <= tol * scale`` with ``scale = max(1, max |ref|)``
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
import logging
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from .._deps import available, require
from ..errors import EdgepruneError

log = logging.getLogger(__name__)

BACKENDS = ("torch", "ort", "trt")


class CompareError(EdgepruneError):
    """A comparison cannot be set up: bad backend list, or a bundle whose model the torch side cannot rebuild."""


@dataclass(frozen=True)
class Tolerance:
    """Norm-wise tolerances of one dtype (see the module docstring for the justification).

    Attributes:
        dtype: ``fp32`` or ``fp16`` (the bundle's graph precision).
        value: ``tol`` for features, embeddings, logits (scale ``max(1, max |ref|)``) and pixels.
        attention: ``tol`` for ``cls_attn`` (scale ``max |ref|``).
        margin_factor: tokens are decided where the top-2 margin exceeds ``margin_factor * atol``.
        logits: ``tol`` for the prefill/decode logits when it differs from ``value`` (quantized LLM weights).
        min_agreement: the least share of greedy steps whose token must equal the reference's argmax (None: no
            rate, the margin rule only); weights: the quantization scheme the bounds are for (``int4``/``int8``).
    """

    dtype: str
    value: float
    attention: float
    margin_factor: float = 2.0
    logits: float | None = None
    min_agreement: float | None = None
    weights: str | None = None

    @property
    def logits_value(self) -> float:
        return self.value if self.logits is None else self.logits

    def to_dict(self) -> dict[str, Any]:
        return {"dtype": self.dtype, "value": self.value, "attention": self.attention,
                "margin_factor": self.margin_factor, "logits": self.logits_value,
                "min_agreement": self.min_agreement, "weights": self.weights,
                "rule": "max|cand-ref| <= tol * max(1, max|ref|); cls_attn: tol * max|ref|; tokens must match "
                        "where the reference's top-2 margin > margin_factor * atol"}


TOLERANCES: dict[str, Tolerance] = {"fp32": Tolerance("fp32", 1e-4, 1e-4), "fp16": Tolerance("fp16", 2e-2, 2e-2)}


def quantized_tolerance(weights: Any, dtype: str) -> Tolerance | None:
    """The tolerance of a bundle whose manifest has a ``weights`` section (None without one): the dtype's bounds
    for every stage, the export's bound for the scheme on the logits, tokens by agreement (module docstring)."""
    if not weights or dtype not in TOLERANCES:
        return None
    from ..export.quantize import EXPORT_BOUNDS  # numpy-only module

    scheme = str(weights.get("scheme"))
    if scheme not in EXPORT_BOUNDS:
        raise CompareError(f"the bundle's weights scheme {scheme!r} is unknown; known: {', '.join(EXPORT_BOUNDS)}")
    return replace(TOLERANCES[dtype], logits=EXPORT_BOUNDS[scheme], weights=scheme)


@dataclass
class Check:
    """One compared output.

    Attributes:
        stage, output: where (``vision``/``features``, ``decode``/``logits``, ...); step: decode step or None.
        kind: ``close`` (float, tolerance) or ``exact`` (integers).
        shape: the reference shape (candidate's when they differ: see ``detail``).
        max_abs / max_rel: largest elementwise |cand - ref| and |cand - ref| / |ref| (``close`` only).
        atol: the bound ``tol * scale`` that ``max_abs`` is checked against (``close`` only).
        mismatches: differing elements (``exact`` only).
    """

    stage: str
    output: str
    kind: str
    passed: bool
    shape: list[int]
    step: int | None = None
    max_abs: float | None = None
    max_rel: float | None = None
    atol: float | None = None
    mismatches: int | None = None
    detail: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items()}


@dataclass
class TokenCheck:
    """The greedy tokens: the candidate's choices and whether the reference agrees where the margin decides."""

    candidate: list[int] = field(default_factory=list)
    reference_argmax: list[int] = field(default_factory=list)
    decided: list[int] = field(default_factory=list)  # steps where the margin rule applies
    mismatched: list[int] = field(default_factory=list)
    min_agreement: float | None = None  # quantized bundles: the least share of steps equal to the reference

    @property
    def agreement(self) -> float:
        """Share of steps where the candidate's token equals the reference's argmax."""
        pairs = list(zip(self.candidate, self.reference_argmax))
        return sum(a == b for a, b in pairs) / len(pairs) if pairs else 1.0

    @property
    def passed(self) -> bool:
        return not self.mismatched and (self.min_agreement is None or self.agreement >= self.min_agreement)

    def to_dict(self) -> dict[str, Any]:
        return {"candidate": self.candidate, "reference_argmax": self.reference_argmax, "decided": self.decided,
                "mismatched": self.mismatched, "agreement": self.agreement, "min_agreement": self.min_agreement,
                "passed": self.passed}


@dataclass
class CompareReport:
    """Everything ``edgeprune compare`` reports; ``passed`` decides the exit code (0 or 1)."""

    bundle: str
    reference: str
    candidate: str
    model: str
    method: str
    k: int | None
    prompt: str
    tolerance: Tolerance
    comparator: str
    checks: list[Check] = field(default_factory=list)
    tokens: TokenCheck = field(default_factory=TokenCheck)
    backend_info: dict[str, dict[str, Any]] = field(default_factory=dict)  # per backend: providers, graph files

    @property
    def passed(self) -> bool:
        return all(c.passed for c in self.checks) and self.tokens.passed

    def to_dict(self) -> dict[str, Any]:
        return {"bundle": self.bundle, "backends": {"reference": self.reference, "candidate": self.candidate},
                "model": self.model, "method": self.method, "k": self.k, "prompt": self.prompt,
                "tolerance": self.tolerance.to_dict(), "comparator": self.comparator,
                "checks": [c.to_dict() for c in self.checks], "tokens": self.tokens.to_dict(),
                "backend_info": self.backend_info, "passed": self.passed}

    def table(self) -> str:
        """A human-readable report: one line per check, then the tokens and the verdict."""
        head = (f"{self.candidate} vs {self.reference} (reference) on {self.model} / {self.method}"
                f"{'' if self.k is None else f' K={self.k}'}; {self.tolerance.dtype} tol {self.tolerance.value:g} "
                f"(cls_attn {self.tolerance.attention:g}); comparator: {self.comparator}")
        if self.tolerance.weights:
            gate = (f"tokens also need >= {self.tolerance.min_agreement:.0%} agreement"
                    if self.tolerance.min_agreement is not None else "the token agreement rate is reported, not gated")
            head += (f"\n{self.tolerance.weights} LLM weights: logits tol {self.tolerance.logits_value:g} (the "
                     f"export's bound for {self.tolerance.weights}; other stages {self.tolerance.value:g}); {gate}")
        lines = [head] + [f"{name}: " + ", ".join(f"{k} {v}" for k, v in info.items())
                          for name, info in self.backend_info.items() if info]
        # The check is on the absolute error: "max abs" sits beside its bound; the relative error is informative
        # only (it exceeds the bound wherever the reference is near zero) and comes last, labelled so.
        lines.append("checked: max abs <= abs bound (tol x max(1, max|ref|)); indices exact; 'max rel' is not checked")
        lines += [f"{'stage':<10} {'output':<16} {'step':>4} {'shape':<16} {'max abs':>10} {'abs bound':>10}  "
                  f"{'result':<6} {'max rel (info)':>14}"]
        for c in self.checks:
            close = c.kind == "close" and c.max_abs is not None
            num = f"{c.max_abs:10.3g} {c.atol:10.3g}" if close else f"{'':>10} {c.kind:>10}"
            rel = f"{c.max_rel:14.3g}" if close and c.max_rel is not None else f"{'':>14}"
            shown = c.detail and (not c.passed or c.kind == "overlap")
            res = ("ok" if c.passed else "FAIL") + (f" ({c.detail})" if shown else "")
            step = "" if c.step is None else str(c.step)
            lines.append(f"{c.stage:<10} {c.output:<16} {step:>4} {str(c.shape):<16} {num}  {res:<6} {rel}".rstrip())
        t = self.tokens
        lines.append(f"tokens: {t.candidate} ({len(t.decided)}/{len(t.candidate)} decided by the margin rule; "
                     f"{f'mismatch at steps {t.mismatched}' if t.mismatched else 'all equal'}"
                     + (f"; agreement {t.agreement:.0%}" if self.tolerance.weights or t.min_agreement is not None
                        else "") + ("" if t.min_agreement is None else f", need >= {t.min_agreement:.0%}") + ")")
        lines.append("PASS: within tolerance" if self.passed else "FAIL: outside tolerance")
        return "\n".join(lines)


def to_numpy(x: Any) -> np.ndarray:
    """A host numpy array from a numpy array or a torch tensor (without importing torch)."""
    if hasattr(x, "detach"):
        x = x.detach().cpu()
        if str(x.dtype) == "torch.bfloat16":  # numpy has no bfloat16
            x = x.float()
        x = x.numpy()
    return np.asarray(x)


class Checker:
    """Runs the comparisons with Polygraphy's compare functions when installed, else with numpy (same rules).

    Args:
        tolerance: the :class:`Tolerance` in force.
        names: (reference, candidate) runner names, for Polygraphy's ``IterationResult``.
    """

    def __init__(self, tolerance: Tolerance, names: tuple[str, str]) -> None:
        self.tolerance = tolerance
        self.names = names
        self.checks: list[Check] = []
        self.polygraphy = available("polygraphy.comparator")
        if self.polygraphy:
            import polygraphy

            self.comparator = f"polygraphy {polygraphy.__version__}"
        else:
            self.comparator = "numpy (polygraphy not installed: pip install polygraphy)"
        log.info("compare functions: %s", self.comparator)

    def close(self, stage: str, output: str, cand: Any, ref: Any, *, attention: bool = False,
              step: int | None = None, tol: float | None = None) -> Check:
        """Float comparison: pass iff ``max |cand - ref| <= tol * scale`` (module docstring). Returns the check."""
        c, r = to_numpy(cand).astype(np.float64), to_numpy(ref).astype(np.float64)
        if c.shape != r.shape:
            return self._add(Check(stage, output, "close", False, list(r.shape), step,
                                   detail=f"shape {list(c.shape)} vs reference {list(r.shape)}"))
        peak = float(np.abs(r).max()) if r.size else 0.0
        tol = tol if tol is not None else self.tolerance.attention if attention else self.tolerance.value
        atol = tol * (max(peak, np.finfo(np.float32).tiny) if attention else max(1.0, peak))
        if self.polygraphy:
            passed, max_abs, max_rel = self._poly_close(output, c, r, atol)
        else:
            diff = np.abs(c - r)
            max_abs = float(diff.max()) if diff.size else 0.0
            max_rel = float((diff / np.where(r == 0, np.finfo(np.float64).eps, np.abs(r))).max()) if diff.size else 0.0
            passed = bool(np.all(diff <= atol))  # NaN compares False: a NaN fails
        return self._add(Check(stage, output, "close", passed, list(r.shape), step, max_abs, max_rel, atol))

    def exact(self, stage: str, output: str, cand: Any, ref: Any, step: int | None = None) -> Check:
        """Integer comparison: equal shapes and equal values."""
        c, r = np.asarray(cand), np.asarray(ref)
        if c.shape != r.shape:
            return self._add(Check(stage, output, "exact", False, list(r.shape), step,
                                   detail=f"shape {list(c.shape)} vs reference {list(r.shape)}"))
        mismatches = int(np.count_nonzero(c != r))
        passed = self._poly_exact(output, c, r) if self.polygraphy and c.ndim else mismatches == 0
        detail = "" if passed else f"{mismatches} of {c.size} differ"
        return self._add(Check(stage, output, "exact", passed, list(r.shape), step, mismatches=mismatches,
                               detail=detail))

    def overlap(self, stage: str, output: str, cand: Any, ref: Any) -> Check:
        """Kept indices of an in-LLM selection in a quantized bundle: the shared share is reported, not gated
        (the selection ranks attention scores computed from quantized weights, so near-ties may swap); the
        number of kept tokens must still match."""
        c, r = np.asarray(cand).reshape(-1), np.asarray(ref).reshape(-1)
        shared = len(np.intersect1d(c, r))
        return self._add(Check(stage, output, "overlap", c.shape == r.shape, list(r.shape), mismatches=r.size - shared,
                               detail=f"{shared}/{r.size} shared; quantized weights: reported, not gated"))

    def _add(self, check: Check) -> Check:
        self.checks.append(check)
        return check

    def _results(self, output: str, cand: np.ndarray, ref: np.ndarray) -> tuple[Any, Any]:
        from polygraphy.comparator import IterationResult

        ref_name, cand_name = self.names
        # Polygraphy computes the relative error against the *second* result: pass (candidate, reference).
        return (IterationResult({output: cand}, runner_name=cand_name),
                IterationResult({output: ref}, runner_name=ref_name))

    def _poly_close(self, output: str, cand: np.ndarray, ref: np.ndarray, atol: float) -> tuple[bool, float, float]:
        from polygraphy import comparator
        from polygraphy.logger import G_LOGGER

        simple = getattr(comparator, "SimpleCompareFunc", None) or comparator.CompareFunc.simple  # < 0.53
        # elemwise with rtol = 0: an element fails iff |cand - ref| > atol (the norm-wise bound; NaN fails).
        func = simple(atol={output: atol}, rtol={output: 0.0}, check_error_stat="elemwise")
        with G_LOGGER.verbosity(G_LOGGER.CRITICAL):  # Polygraphy logs every comparison; the report says it all
            result = func(*self._results(output, cand, ref))[output]
        return bool(result), float(result.max_absdiff), float(result.max_reldiff)

    def _poly_exact(self, output: str, cand: np.ndarray, ref: np.ndarray) -> bool:
        from polygraphy import comparator
        from polygraphy.logger import G_LOGGER

        indices = getattr(comparator, "IndicesCompareFunc", None) or comparator.CompareFunc.indices
        with G_LOGGER.verbosity(G_LOGGER.CRITICAL):
            # index_tolerance 0: every value must sit at the same position, i.e. exact equality.
            return bool(indices(index_tolerance=0)(*self._results(output, cand, ref))[output])


# ---------------------------------------------------------------------------------------------------- backends
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


def with_tolerance(tol: Tolerance, value: float | None = None, attention: float | None = None) -> Tolerance:
    """A copy of ``tol`` with other bounds (``--tol``-style overrides; tests use it to force failures)."""
    return replace(tol, value=tol.value if value is None else value,
                   attention=tol.attention if attention is None else attention)
