"""The checks of ``edgeprune compare``: tolerances per dtype (and per weights scheme), one compared output, the
greedy-token rule, the report, and the :class:`Checker` that fills it.

Pure numpy; :mod:`edgeprune.eval.compare` drives the stages and its module docstring states and justifies the
tolerances used here.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from .._deps import available
from ..errors import EdgepruneError

log = logging.getLogger(__name__)


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


def with_tolerance(tol: Tolerance, value: float | None = None, attention: float | None = None) -> Tolerance:
    """A copy of ``tol`` with other bounds (``--tol``-style overrides; tests use it to force failures)."""
    return replace(tol, value=tol.value if value is None else value,
                   attention=tol.attention if attention is None else attention)
