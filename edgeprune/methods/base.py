"""The pruning-method interface: parameters, token layout, and the invariants every method obeys.

A pre-LLM method takes the projected visual tokens of one request and returns the indices of the K tokens to
keep, ascending, unique, exactly K (METHODS.md §6 "Project decisions"). The public :meth:`PruningMethod.select`
owns those invariants; subclasses implement ``_select`` with pure tensor functions from ``functional``.
This module imports no torch at import time so ``edgeprune methods`` works without it.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Mapping

import numpy as np

from ..errors import BudgetError, MethodArgumentError, NonFiniteError

if TYPE_CHECKING:  # pragma: no cover
    import torch

PLACEMENTS = ("pre_llm", "in_llm")
POSITIONS = ("compact", "original")


@dataclass(frozen=True)
class MethodParams:
    """Parameters shared by every method.

    Attributes:
        positions: RoPE position convention of the kept tokens, ``compact`` or ``original``; empty means the
            method's default (METHODS.md decision 3).
    """

    positions: str = field(default="", metadata={"help": "compact | original (default: the method's own)"})

    def __post_init__(self) -> None:
        if self.positions not in ("",) + POSITIONS:
            raise MethodArgumentError(f"positions must be one of {', '.join(POSITIONS)}; got {self.positions!r}")


@dataclass(frozen=True)
class Budget:
    """A token budget: an absolute count ``tokens`` or a fraction ``ratio`` of the N visual tokens.

    Exactly one of the two is set, or neither (keep everything).
    """

    tokens: int | None = None
    ratio: float | None = None

    def __post_init__(self) -> None:
        if self.tokens is not None and self.ratio is not None:
            raise BudgetError("give either --tokens or --ratio, not both")
        if self.tokens is not None and self.tokens <= 0:
            raise BudgetError(f"--tokens must be a positive integer; got {self.tokens}")
        if self.ratio is not None and not (0.0 < self.ratio <= 1.0):
            raise BudgetError(f"--ratio must be in (0, 1]; got {self.ratio}")

    @property
    def is_set(self) -> bool:
        return self.tokens is not None or self.ratio is not None

    def resolve(self, n: int) -> int:
        """Return K for N visual tokens: ``tokens``, or ``round(ratio * N)`` clamped to at least 1.

        Raises:
            BudgetError: K > N.
        """
        if self.tokens is not None:
            k = self.tokens
        elif self.ratio is not None:
            k = max(1, int(round(self.ratio * n)))
        else:
            k = n
        if k > n:
            raise BudgetError(f"--tokens {k} exceeds the {n} visual tokens of this image; use 1 <= K <= {n}")
        return k

    def describe(self) -> str:
        if self.tokens is not None:
            return f"{self.tokens} tokens"
        if self.ratio is not None:
            return f"ratio {self.ratio:g}"
        return "all tokens"


@dataclass(frozen=True)
class ModelLimits:
    """What a model allows, read from its config before any weight is built (``models.limits``).

    Method parameters and budgets are checked against it (:meth:`PruningMethod.check_limits`), so a value the
    model cannot take fails in milliseconds with the bound in the message, not after building the model.

    Attributes:
        grid: (rows, cols) of one view's patch grid, e.g. (24, 24) for CLIP 336/14.
        n_max: the most prunable visual tokens an image can have (LLaVA-1.5: rows*cols; NeXT: base + largest grid).
        t_min: the fewest visual positions an image takes in the prompt (a lower bound; NeXT: the base view).
        num_layers: decoder layers of the LLM.
        max_positions: the LLM's context length (``max_position_embeddings``).
    """

    grid: tuple[int, int]
    n_max: int
    t_min: int
    num_layers: int
    max_positions: int


@dataclass(frozen=True)
class TokenLayout:
    """Where each of the N prunable visual tokens sits (host metadata, numpy, shared by the batch).

    LLaVA-1.5: one 24x24 view. LLaVA-NeXT: the base view (view 0, group 0) followed by the unpadded tokens of
    the high-resolution grid (views 1.. = the crops, group 1); newline tokens are not prunable and are not here.

    Attributes:
        view: [N] int, 0 = base view, v >= 1 = high-resolution crop v.
        row, col: [N] int, position inside that view's patch grid.
        group: [N] int, 0 = base view, 1 = high-resolution grid (G-Prune ranks groups separately).
        grid: (rows, cols) of one view's patch grid, e.g. (24, 24).
    """

    view: np.ndarray
    row: np.ndarray
    col: np.ndarray
    group: np.ndarray
    grid: tuple[int, int]

    @classmethod
    def single_view(cls, rows: int, cols: int) -> "TokenLayout":
        """The layout of one rows x cols view in raster order (LLaVA-1.5)."""
        r, c = np.divmod(np.arange(rows * cols), cols)
        zeros = np.zeros(rows * cols, dtype=np.int64)
        return cls(view=zeros, row=r.astype(np.int64), col=c.astype(np.int64), group=zeros.copy(), grid=(rows, cols))

    @property
    def n(self) -> int:
        return int(self.view.shape[0])

    @property
    def num_views(self) -> int:
        return int(self.view.max()) + 1 if self.n else 0


@dataclass(frozen=True)
class VisualTokens:
    """The inputs of a pre-LLM method for a batch of B requests with the same layout.

    Attributes:
        features: [B, N, D] projected visual tokens (LLM embedding space).
        cls_attn: [B, N] [CLS]->patch attention of CLIP layer -2, mean over heads.
        layout: the :class:`TokenLayout` of the N tokens.
        clip_embeds: [B, N, Dc] CLIP-space patch embeddings (GridPrune with CLIP guidance), or None.
        guidance: [B, Dg] text guidance vector (CLIP text [EOS] or mean LLM embedding), or None.
    """

    features: "torch.Tensor"
    cls_attn: "torch.Tensor"
    layout: TokenLayout
    clip_embeds: "torch.Tensor | None" = None
    guidance: "torch.Tensor | None" = None

    @property
    def n(self) -> int:
        return int(self.features.shape[1])


class PruningMethod:
    """Base class of every pruning method (DESIGN.md §4).

    Class attributes a subclass sets: ``name``, ``summary``, ``paper``, ``placement`` (``pre_llm`` or
    ``in_llm``), ``default_positions`` and ``Params`` (a frozen dataclass deriving from :class:`MethodParams`).
    ``uses_budget`` is False for methods that keep every token (``none``); ``needs_guidance`` is True for
    text-conditioned methods, whose :class:`VisualTokens` then carry a ``guidance`` vector.
    """

    name: ClassVar[str] = ""
    summary: ClassVar[str] = ""
    paper: ClassVar[str] = ""
    placement: ClassVar[str] = "pre_llm"
    default_positions: ClassVar[str] = "compact"
    uses_budget: ClassVar[bool] = True
    needs_guidance: ClassVar[bool] = False  # True: the pipeline computes text guidance from the question
    fused_op: ClassVar[str] = ""  # name of the fused Triton kernel / TensorRT plugin op, if the method has one
    Params: ClassVar[type[MethodParams]] = MethodParams

    def __init__(self, params: MethodParams | None = None) -> None:
        self.params = params if params is not None else self.Params()
        if not isinstance(self.params, self.Params):
            raise TypeError(f"{type(self).__name__} takes {self.Params.__name__}, got {type(self.params).__name__}")
        self.kernels = "torch"  # "triton": run the fused kernel (``fused_op``) instead of the torch reference

    def use_kernels(self, kernels: str) -> str:
        """Choose the implementation: ``torch`` (the reference) or ``triton`` (the fused kernel, same indices).

        Returns:
            The implementation in effect: ``triton`` only for methods with a ``fused_op``; the others keep
            ``torch`` (their selection is a single sort and gains nothing from a kernel).
        Raises:
            MethodArgumentError: an unknown implementation name.
        """
        if kernels not in ("torch", "triton"):
            raise MethodArgumentError(f"--kernels must be torch or triton; got {kernels!r}")
        self.kernels = kernels if self.fused_op else "torch"
        return self.kernels

    # ----------------------------------------------------------------- parameters
    @classmethod
    def from_args(cls, args: Mapping[str, str] | None = None) -> "PruningMethod":
        """Build the method from ``--method-arg key=value`` strings, converting each to its field's type.

        Raises:
            MethodArgumentError: unknown key (lists the known ones) or a value of the wrong type.
        """
        return cls(parse_params(cls.Params, dict(args or {}), method=cls.name))

    @property
    def positions(self) -> str:
        """The position convention in effect: the user's override or the method's default."""
        return self.params.positions or self.default_positions

    def describe_params(self) -> dict[str, Any]:
        """The parameters as a JSON-able dict (recorded in profiles and manifests)."""
        out = dataclasses.asdict(self.params)
        out["positions"] = self.positions
        return out

    def check_limits(self, limits: ModelLimits) -> None:
        """Refuse parameters this model cannot take (e.g. more GridPrune zones than patch rows); the error states
        the bound. The base class checks nothing; methods with model-dependent parameters override it.

        Raises:
            MethodArgumentError: a parameter outside what ``limits`` allows.
        """

    # ----------------------------------------------------------------- selection
    def select(self, tokens: VisualTokens, k: int) -> "torch.Tensor":
        """Return the kept indices ``[B, K]`` (int64, ascending, unique) for budget K.

        Args:
            tokens: the request's :class:`VisualTokens` (features ``[B, N, D]``, ``cls_attn`` ``[B, N]``, ...).
            k: number of tokens to keep, ``1 <= k <= N``.
        Returns:
            Long tensor ``[B, K]`` of indices into N.
        Raises:
            BudgetError: k outside ``[1, N]``.
        """
        n = tokens.n
        if self.placement != "pre_llm":
            raise TypeError(f"method {self.name!r} runs inside the LLM; it has no pre-LLM select()")
        if not 1 <= k <= n:
            raise BudgetError(f"K must satisfy 1 <= K <= N = {n}; got K = {k}")
        check_finite(tokens, self.name)
        idx = self._select(tokens, k)
        b = tokens.features.shape[0]
        if tuple(idx.shape) != (b, k):  # a bug in the method, not a user error
            raise RuntimeError(f"{self.name}: expected kept indices of shape {(b, k)}, got {tuple(idx.shape)}")
        if k > 1 and not bool((idx[:, 1:] > idx[:, :-1]).all()):
            raise RuntimeError(f"{self.name}: kept indices are not strictly ascending")
        return idx

    def _select(self, tokens: VisualTokens, k: int) -> "torch.Tensor":  # pragma: no cover - abstract
        raise NotImplementedError


def check_finite(tokens: VisualTokens, method: str) -> None:
    """Refuse NaN or infinite method inputs (features, [CLS] attention, CLIP embeddings, guidance).

    A NaN would silently change every score-based selection (GridPrune's quotas would no longer sum to K), so
    the rule is: non-finite inputs are an error, for every method, never a fallback.

    Raises:
        NonFiniteError: names the first non-finite input.
    """
    import torch

    for label, t in (("visual features", tokens.features), ("[CLS] attention", tokens.cls_attn),
                     ("CLIP patch embeddings", tokens.clip_embeds), ("text guidance", tokens.guidance)):
        if t is not None and not bool(torch.isfinite(t).all()):
            bad = int((~torch.isfinite(t)).sum())
            raise NonFiniteError(f"{method}: the {label} hold {bad} NaN/inf value(s); the model produced non-finite "
                                 f"activations (often fp16 overflow): run in --dtype fp32 or check the weights")


def _field_type(params_cls: type, f: dataclasses.Field) -> Any:
    hints = typing.get_type_hints(params_cls)
    return hints.get(f.name, str)


def _convert(value: str, typ: Any, key: str, method: str) -> Any:
    origin = typing.get_origin(typ)
    if origin is typing.Literal:
        choices = typing.get_args(typ)
        if value not in choices:
            raise MethodArgumentError(f"{method}: {key} must be one of {', '.join(map(str, choices))}; got {value!r}")
        return value
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        args = [a for a in typing.get_args(typ) if a is not type(None)]
        if value.lower() in ("", "none", "null"):
            return None
        typ = args[0]
    try:
        if typ is bool:
            low = value.lower()
            if low not in ("1", "0", "true", "false", "yes", "no"):
                raise ValueError(value)
            return low in ("1", "true", "yes")
        if typ is int:
            return int(value)
        if typ is float:
            return float(value)
    except ValueError:
        raise MethodArgumentError(f"{method}: {key} expects {typ.__name__}; got {value!r}") from None
    return value


def parse_params(params_cls: type[MethodParams], args: dict[str, str], method: str = "") -> MethodParams:
    """Convert string arguments into ``params_cls``; unknown keys raise with the list of known keys."""
    fields = {f.name: f for f in dataclasses.fields(params_cls)}
    unknown = sorted(set(args) - set(fields))
    if unknown:
        raise MethodArgumentError(
            f"{method}: unknown method argument(s) {', '.join(unknown)}; known: {', '.join(sorted(fields))}"
        )
    values = {k: _convert(v, _field_type(params_cls, fields[k]), k, method) for k, v in args.items()}
    return params_cls(**values)


def parse_method_args(items: list[str] | None) -> dict[str, str]:
    """Parse ``["key=value", ...]`` from ``--method-arg`` into a dict.

    Raises:
        MethodArgumentError: an item without ``=`` or with an empty key.
    """
    out: dict[str, str] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise MethodArgumentError(f"--method-arg expects key=value; got {item!r}")
        out[key.strip()] = value.strip()
    return out


def describe_fields(params_cls: type[MethodParams]) -> list[dict[str, str]]:
    """Name, type, default and help of every parameter (for ``edgeprune methods``)."""
    rows = []
    hints = typing.get_type_hints(params_cls)
    for f in dataclasses.fields(params_cls):
        typ = hints.get(f.name, str)
        if typing.get_origin(typ) is typing.Literal:
            tname = "|".join(map(str, typing.get_args(typ)))
        else:
            tname = getattr(typ, "__name__", None) or str(typ).replace("typing.", "")
        rows.append({"name": f.name, "type": tname, "default": repr(f.default), "help": f.metadata.get("help", "")})
    return rows
