"""A small ONNX graph builder for the hand-written lowerings (GridPrune ``ZonalTopK``, G-Prune ``GraphRank``).

The pruning graphs are written op by op instead of being traced from PyTorch, because their exactness depends
on the precise op sequence (float64 budget arithmetic, comparison-based ranks instead of sorts whose tie
order is unspecified) and because the fused ops must appear as ``edgeprune``-domain nodes defined by
model-local ONNX functions (DESIGN.md §5, DEPLOYMENT.md §1): ONNX Runtime and any TensorRT without the
plugin run the function body; TensorRT with the plugin registered maps the node to it through the
``plugin_namespace`` / ``plugin_version`` attributes.

:class:`Builder` accumulates nodes with hierarchical names (``/prune/relevance/Div``, house rule 6) and
returns value names; :func:`make_function` and :func:`make_model` assemble the protos. Constants are
``Constant`` nodes (a function body cannot hold initializers). This module needs ``onnx`` (the export extra).
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator, Sequence

import numpy as np

from .._deps import require

DOMAIN = "edgeprune"  # the custom-op domain; also the TensorRT plugin namespace
PLUGIN_VERSION = "1"  # TensorRT Python-defined plugins always register version "1" (DEPLOYMENT.md §1)
IR_VERSION = 10  # onnxruntime 1.31 reads IR <= 13; onnx.helper would default to 14 (DESIGN.md §6)

_NP_TO_ONNX = {np.dtype(np.float32): 1, np.dtype(np.int32): 6, np.dtype(np.int64): 7, np.dtype(np.bool_): 9,
               np.dtype(np.float16): 10, np.dtype(np.float64): 11}
ONNX_DTYPES = {"float32": 1, "int32": 6, "int64": 7, "bool": 9, "float16": 10, "float64": 11}


class Builder:
    """Collects the nodes of one graph or function body.

    Args:
        scope: the node-name prefix, e.g. ``/prune`` or ``/ZonalTopK``.

    Every :meth:`op` returns the name(s) of its output value(s); value names repeat the node name, so a
    profiler or a TensorRT layer name points back at the lowering step that produced it.
    """

    def __init__(self, scope: str) -> None:
        self._scopes = [scope.rstrip("/")]
        self.nodes: list[Any] = []
        self._used: dict[str, int] = {}

    @contextlib.contextmanager
    def scope(self, name: str) -> Iterator[None]:
        """Nest node names under ``name`` for the duration of the block."""
        self._scopes.append(f"{self._scopes[-1]}/{name}")
        try:
            yield
        finally:
            self._scopes.pop()

    def _unique(self, base: str) -> str:
        name = f"{self._scopes[-1]}/{base}"
        count = self._used[name] = self._used.get(name, 0) + 1
        return name if count == 1 else f"{name}:{count - 1}"

    def op(self, op_type: str, *inputs: str, outputs: int = 1, name: str | None = None, domain: str = "",
           out_names: Sequence[str] | None = None, **attrs: Any) -> Any:
        """Append a node.

        Args:
            op_type: the ONNX op (or the custom op name with ``domain``).
            inputs: input value names ("" for an omitted optional input).
            outputs: number of outputs.
            name: node name relative to the current scope (default: ``op_type``).
            domain: "" for standard ops, :data:`DOMAIN` for the fused ops.
            out_names: explicit output value names (graph outputs), else derived from the node name.
            attrs: node attributes (ints, floats, strings, lists, tensors).
        Returns:
            The output name (one output) or a list of names.
        """
        helper = require("onnx").helper
        node_name = self._unique(name or op_type)
        outs = list(out_names) if out_names is not None else (
            [node_name] if outputs == 1 else [f"{node_name}#{i}" for i in range(outputs)])
        self.nodes.append(helper.make_node(op_type, list(inputs), outs, name=node_name, domain=domain, **attrs))
        return outs[0] if len(outs) == 1 else outs

    def const(self, value: Any, dtype: Any, name: str = "const") -> str:
        """A ``Constant`` node holding ``np.asarray(value, dtype)``; returns its output name."""
        numpy_helper = require("onnx").numpy_helper
        arr = np.asarray(value, dtype=dtype)
        return self.op("Constant", name=name, value=numpy_helper.from_array(arr, name=self._unique(name) + "/value"))

    # ---------------------------------------------------------------- shorthands used by several lowerings
    def cast(self, x: str, dtype: str, name: str = "Cast") -> str:
        return self.op("Cast", x, to=ONNX_DTYPES[dtype], name=name)

    def axes(self, *axes: int) -> str:
        return self.const(list(axes), np.int64, name="axes")

    def reduce(self, op_type: str, x: str, *axes: int, keepdims: int = 1, name: str | None = None) -> str:
        """``ReduceSum``/``ReduceMax``/... over ``axes`` (opset 18 takes the axes as an input)."""
        return self.op(op_type, x, self.axes(*axes), keepdims=keepdims, name=name or op_type)

    def unsqueeze(self, x: str, *axes: int, name: str = "Unsqueeze") -> str:
        return self.op("Unsqueeze", x, self.axes(*axes), name=name)

    def squeeze(self, x: str, *axes: int, name: str = "Squeeze") -> str:
        return self.op("Squeeze", x, self.axes(*axes), name=name)

    def dim(self, x: str, axis: int, name: str = "dim") -> str:
        """The size of ``x`` along ``axis`` (>= 0) as an int64 tensor of shape [1]."""
        return self.op("Shape", x, start=axis, end=axis + 1, name=name)

    def arange(self, n: str, dtype: Any = np.int64, name: str = "arange") -> str:
        """``[0, n)`` for an int64 [1] size tensor ``n``."""
        with self.scope(name):
            zero, one = self.const(0, np.int64, "zero"), self.const(1, np.int64, "one")
            out = self.op("Range", zero, self.squeeze(n, 0), one)
            return out if np.dtype(dtype) == np.int64 else self.op("Cast", out, to=_NP_TO_ONNX[np.dtype(dtype)])

    def precedes(self, x: str, lower: str, same: str | None = None, name: str = "precedes") -> str:
        """[B, M, M] bool: ``out[b, i, j]`` is True when entry j comes before entry i under (value descending,
        index ascending), i.e. ``x_j > x_i or (x_j == x_i and j < i)``, and (optionally) ``same[i, j]``.

        Exact for any float input (+0 and -0 compare equal, as in a stable sort), and it needs no sort, whose
        tie order ONNX TopK leaves to the implementation (TensorRT's differs from ONNX Runtime's).

        Args:
            x: [B, M] values.
            lower: [M, M] bool, ``lower[i, j] = j < i``.
            same: optional [M, M] bool, True where i and j are in the same group.
        """
        with self.scope(name):
            xi = self.unsqueeze(x, 2, name="row")  # [B, M, 1]
            xj = self.unsqueeze(x, 1, name="col")  # [B, 1, M]
            tie = self.op("And", self.op("Equal", xj, xi), lower, name="tie_lower")
            before = self.op("Or", self.op("Greater", xj, xi), tie, name="before")
            return before if same is None else self.op("And", before, same, name="same_group")

    def rank_descending(self, x: str, lower: str, same: str | None = None, name: str = "rank") -> str:
        """Rank of every entry under (value descending, index ascending), optionally within groups:
        ``rank_i = #{j : precedes[i, j]}`` (see :meth:`precedes`). Returns [B, M] int64 (0 = first)."""
        with self.scope(name):
            before = self.precedes(x, lower, same)
            # int32 halves the memory of the [B, M, M] intermediate (NeXT: M = 2880 -> 33 MB per request)
            count = self.reduce("ReduceSum", self.cast(before, "int32"), -1, keepdims=0, name="count")
            return self.cast(count, "int64", name="rank")

    def lower_mask(self, m: str, name: str = "lower") -> str:
        """[M, M] bool ``lower[i, j] = j < i`` for an int64 [1] size tensor ``m``."""
        with self.scope(name):
            ar = self.arange(m)
            return self.op("Less", self.unsqueeze(ar, 0, name="j"), self.unsqueeze(ar, 1, name="i"))

    def ascending_indices(self, keep: str, k: int, n: str, name: str = "ascending") -> str:
        """The K indices where the [B, N] bool ``keep`` is True (exactly K of them), ascending, int64 [B, K].

        TopK over distinct keys ``N - i`` of the kept entries (0 elsewhere): the K largest keys are exactly the
        kept entries, in ascending index order; keys are exact in float32 for N < 2**24 and never tie.
        """
        with self.scope(name):
            key = self.op("Sub", self.cast(n, "float32"), self.arange(n, np.float32), name="key")
            key = self.op("Where", keep, key, self.const(0.0, np.float32, "zero"), name="masked_key")
            _, idx = self.op("TopK", key, self.const([k], np.int64, "k"), outputs=2, axis=-1, largest=1, sorted=1)
            return idx


def value_info(name: str, dtype: str, dims: Sequence[int | str]) -> Any:
    """A graph input/output declaration (``dims``: ints or symbolic names)."""
    return require("onnx").helper.make_tensor_value_info(name, ONNX_DTYPES[dtype], list(dims))


def make_function(name: str, inputs: Sequence[str], outputs: Sequence[str], builder: Builder,
                  attributes: dict[str, Any], opset: int) -> Any:
    """A model-local function ``edgeprune.<name>`` whose body is ``builder``'s nodes.

    Args:
        name: the op type (``ZonalTopK``/``GraphRank``), also the TensorRT plugin name.
        inputs, outputs: formal parameter names used by the body.
        builder: the body.
        attributes: the attributes the call node carries, declared with their values as defaults (the body
            bakes the same values in as constants; the attributes are what a TensorRT plugin reads).
        opset: the standard opset of the body.
    Returns:
        An ``onnx.FunctionProto``.
    """
    onnx = require("onnx")
    fn = onnx.helper.make_function(DOMAIN, name, list(inputs), list(outputs), builder.nodes,
                                   [onnx.helper.make_opsetid("", opset)], attributes=[])
    fn.attribute_proto.extend(onnx.helper.make_attribute(k, v) for k, v in attributes.items())
    fn.doc_string = (f"{name}: standard-op lowering (ONNX Runtime, TensorRT without the plugin). TensorRT maps "
                     f"the node to the plugin {DOMAIN}::{name} v{PLUGIN_VERSION} when it is registered.")
    return fn


def plugin_attributes(**attrs: Any) -> dict[str, Any]:
    """``attrs`` plus the TensorRT plugin lookup attributes (``plugin_namespace``, ``plugin_version``)."""
    return {**attrs, "plugin_namespace": DOMAIN, "plugin_version": PLUGIN_VERSION}


def make_model(graph_name: str, builder: Builder, inputs: Sequence[Any], outputs: Sequence[Any],
               functions: Sequence[Any], opset: int, doc: str = "") -> Any:
    """Assemble and check an ``onnx.ModelProto`` (IR :data:`IR_VERSION`, opset ``opset`` + ``edgeprune`` 1).

    Raises:
        onnx.checker.ValidationError: the graph is malformed (a bug in a lowering).
    """
    onnx = require("onnx")
    graph = onnx.helper.make_graph(builder.nodes, graph_name, list(inputs), list(outputs))
    opsets = [onnx.helper.make_opsetid("", opset), onnx.helper.make_opsetid(DOMAIN, 1)]
    model = onnx.helper.make_model(graph, opset_imports=opsets, functions=list(functions),
                                   producer_name="edgeprune", doc_string=doc)
    model.ir_version = IR_VERSION
    onnx.checker.check_model(model)
    return model
