"""The plugin contract of ``ZonalTopK`` and ``GraphRank``: pure functions both plugin flavours call (no TensorRT).

Everything a TensorRT plugin computes besides the API calls lives here (DESIGN.md §5, wave 2): the node
attributes (PluginFields) and their validation, output shapes as expressions of the input dims and the baked
attributes (K is static), output dtypes, the supported format/dtype combinations, the workspace layout and its
size, and the launch sequence: which kernel of :data:`edgeprune.kernels.aot.SPECS` runs with which grid and
which arguments, in TensorRT's AOT order (input pointers, int32 scalars, output pointers).

The ONNX nodes (``edgeprune/export/lower_gridprune.py``, ``lower_gprune.py``)::

    ZonalTopK(scores [B,N] f32, relevance [B,N] f32, zone [N] i32) -> (kept_idx [B,K] i32, quota [B,Z] i32)
        attributes K, tau, zones, num_zones (= Z)
    GraphRank(x [B,N,D] f32, group [N] i32) -> kept_idx [B,K] i32
        attributes K, threshold, temperature, steps, num_groups

Launches (the IPluginV3 flavour, scratch in the plugin workspace, see :func:`workspace_layout`):

* ZonalTopK: ``zone_index`` (order and sizes from the zone ids) then ``zonal_topk`` with ``ZONE_MEAN`` (the node
  passes per-token relevance).
* GraphRank: ``norm``, ``sim``, ``steps`` x ``step`` (ping-pong buffers), ``select``, ``emit``. Only
  ``num_groups == 1`` is supported (the kernels rank one group); :func:`unsupported_reason` says so for the
  LLaVA-NeXT graphs, whose two groups then run the ONNX function body.

The AOT flavour (``tensorrt.plugin``) has no workspace and one kernel per plugin, so it runs the
:data:`AOT_ZONAL_TOPK` node (``zonal_topk`` alone: zone order and sizes as inputs, its scratch as a third output)
after standard ops that compute the zone index (see :mod:`.onnx_modes`).

Shapes are written as tuples whose entries are an ``int`` (a constant) or a :class:`Dim` (dimension ``axis`` of
input ``input``), so the IPluginV3 flavour maps them to ``IExprBuilder`` expressions and the AOT flavour to
``TensorDesc.shape_expr`` entries without either re-deriving them.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

from ...errors import EdgepruneError

NAMESPACE = "edgeprune"  # = export.onnx_builder.DOMAIN (not imported: engines must not need onnx)
VERSION = "1"  # = export.onnx_builder.PLUGIN_VERSION
OPS = ("ZonalTopK", "GraphRank")
AOT_ZONAL_TOPK = "ZonalTopKAot"  # the single-kernel ZonalTopK node of the AOT graph rewrite
WORKSPACE_ALIGN = 256  # bytes: every workspace slot starts on a 256-byte boundary (cudaMalloc's alignment)
PRECISION = "ieee"  # GraphRank's tl.dot precision inside the plugin: true fp32, like the reference

_SIZES = {"float32": 4, "int32": 4, "int64": 8}


class PluginContractError(EdgepruneError):
    """A plugin node carries bad attributes or inputs of the wrong shape; the message says which and why."""


@dataclass(frozen=True)
class Dim:
    """Dimension ``axis`` of input ``input`` (an output-shape entry that follows an input)."""

    input: int
    axis: int


@dataclass(frozen=True)
class TensorContract:
    """One plugin input or output: name, dtype (``float32``/``int32``/``int64``) and shape symbols."""

    name: str
    dtype: str
    dims: tuple[str, ...]


# op -> ((field name, python type), ...) in PluginField order (ints are INT32/INT64, floats FLOAT32/FLOAT64)
FIELDS: dict[str, tuple[tuple[str, type], ...]] = {
    "ZonalTopK": (("K", int), ("tau", float), ("zones", int), ("num_zones", int)),
    "GraphRank": (("K", int), ("threshold", float), ("temperature", float), ("steps", int), ("num_groups", int)),
}
INPUTS: dict[str, tuple[TensorContract, ...]] = {
    "ZonalTopK": (TensorContract("scores", "float32", ("B", "N")), TensorContract("relevance", "float32", ("B", "N")),
                  TensorContract("zone", "int32", ("N",))),
    "GraphRank": (TensorContract("x", "float32", ("B", "N", "D")), TensorContract("group", "int32", ("N",))),
}
OUTPUTS: dict[str, tuple[TensorContract, ...]] = {
    "ZonalTopK": (TensorContract("kept_idx", "int32", ("B", "K")), TensorContract("quota", "int32", ("B", "Z"))),
    "GraphRank": (TensorContract("kept_idx", "int32", ("B", "K")),),
}


def _known(op: str) -> None:
    if op not in FIELDS:
        raise PluginContractError(f"unknown plugin op {op!r}; known: {', '.join(OPS)}")


# ------------------------------------------------------------------------------------------------ attributes
def parse_attributes(op: str, fields: Mapping[str, Any]) -> dict[str, Any]:
    """Validate a node's attributes (PluginFields by name) and return them typed, in :data:`FIELDS` order.

    Args:
        op: ``ZonalTopK`` or ``GraphRank``.
        fields: name -> value; numpy scalars and 1-element arrays (how PluginFields arrive) are accepted, and
            ``plugin_namespace``/``plugin_version`` are ignored.
    Returns:
        {name: int or float}.
    Raises:
        PluginContractError: an unknown op, a missing or unknown field, or a value out of range (K >= 1, tau > 0,
            zones >= 1, num_zones >= 1, temperature > 0, steps >= 0, num_groups >= 1).
    """
    _known(op)
    given = {k: v for k, v in fields.items() if k not in ("plugin_namespace", "plugin_version", "aot")}
    names = [n for n, _ in FIELDS[op]]
    missing, unknown = sorted(set(names) - set(given)), sorted(set(given) - set(names))
    if missing or unknown:
        raise PluginContractError(f"{op}: the node needs attributes {names}; missing {missing}, unknown {unknown} "
                                  "(re-export the bundle with this edgeprune version)")
    out: dict[str, Any] = {}
    for name, kind in FIELDS[op]:
        value = given[name]
        value = value.reshape(-1)[0] if hasattr(value, "reshape") else value
        if kind is float and str(getattr(value, "dtype", "")) == "float32":
            # ONNX float attributes are float32: recover the decimal the exporter wrote (0.05, not
            # 0.0500000007), which is what the function body and the reference use in float64
            value = float(str(value))
        try:
            out[name] = kind(value.item() if hasattr(value, "item") else value)
        except (TypeError, ValueError) as exc:
            raise PluginContractError(f"{op}: attribute {name} must be {kind.__name__}; got {value!r}") from exc
    rules = {"K": lambda v: v >= 1, "tau": lambda v: v > 0, "zones": lambda v: v >= 1, "num_zones": lambda v: v >= 1,
             "temperature": lambda v: v > 0, "steps": lambda v: v >= 0, "num_groups": lambda v: v >= 1,
             "threshold": math.isfinite}
    bad = [f"{n}={v}" for n, v in out.items() if not rules[n](v)]
    if bad:
        raise PluginContractError(f"{op}: bad attribute values {bad} (need K >= 1, tau/temperature > 0, steps >= 0, "
                                  "zones/num_zones/num_groups >= 1, finite threshold)")
    return out


def unsupported_reason(op: str, attrs: Mapping[str, Any]) -> str | None:
    """Why the plugin cannot run this node (its function body must), or None when it can."""
    if op == "GraphRank" and int(attrs["num_groups"]) != 1:
        return (f"GraphRank with num_groups={attrs['num_groups']}: the kernels rank a single group (LLaVA-1.5); "
                "LLaVA-NeXT's per-group ranking runs the ONNX function body")
    return None


# ------------------------------------------------------------------------------------------- shapes and types
def output_dims(op: str, attrs: Mapping[str, Any]) -> tuple[tuple[int | Dim, ...], ...]:
    """Every output's shape as constants and :class:`Dim` references (B = input 0 axis 0)."""
    _known(op)
    batch, k = Dim(0, 0), int(attrs["K"])
    if op == "ZonalTopK":
        return ((batch, k), (batch, int(attrs["num_zones"])))
    return ((batch, k),)


def output_dtypes(op: str) -> tuple[str, ...]:
    """The output dtypes (``int32`` indices; whatever the input dtypes)."""
    _known(op)
    return tuple(t.dtype for t in OUTPUTS[op])


def io_dtypes(op: str) -> tuple[str, ...]:
    """The one supported dtype of every position (inputs then outputs), all in LINEAR format."""
    _known(op)
    return tuple(t.dtype for t in INPUTS[op] + OUTPUTS[op])


def supports_format(op: str, pos: int, dtype: str, linear: bool) -> bool:
    """``supports_format_combination``: position ``pos`` (inputs then outputs) must be LINEAR and its dtype."""
    types = io_dtypes(op)
    return linear and 0 <= pos < len(types) and dtype == types[pos]


def resolve_shape(dims: Sequence[int | Dim], input_shapes: Sequence[Sequence[int]]) -> tuple[int, ...]:
    """Concrete values of :func:`output_dims` entries for concrete input shapes."""
    return tuple(d if isinstance(d, int) else int(input_shapes[d.input][d.axis]) for d in dims)


def problem_dims(op: str, attrs: Mapping[str, Any], input_shapes: Sequence[Sequence[int]]) -> dict[str, int]:
    """B, N (and D, Z) of a call, checked against the node's contract.

    Args:
        input_shapes: the concrete shape of every input (``-1`` entries are not allowed here).
    Returns:
        {"B", "N", "Z"} for ZonalTopK, {"B", "N", "D"} for GraphRank.
    Raises:
        PluginContractError: wrong number of inputs or ranks, inconsistent N, or K > N.
    """
    _known(op)
    specs = INPUTS[op]
    if len(input_shapes) != len(specs) or any(len(s) != len(t.dims) for s, t in zip(input_shapes, specs)):
        raise PluginContractError(f"{op}: inputs must be {[f'{t.name}{list(t.dims)}' for t in specs]}; got shapes "
                                  f"{[list(s) for s in input_shapes]}")
    seen: dict[str, int] = {}
    for shape, t in zip(input_shapes, specs):
        for sym, value in zip(t.dims, shape):
            if seen.setdefault(sym, int(value)) != int(value):
                raise PluginContractError(f"{op}: dimension {sym} differs between inputs ({seen[sym]} vs {value})")
    if not 1 <= int(attrs["K"]) <= seen["N"]:
        raise PluginContractError(f"{op}: K = {attrs['K']} must be in [1, N = {seen['N']}]")
    if op == "ZonalTopK":
        return {"B": seen["B"], "N": seen["N"], "Z": int(attrs["num_zones"])}
    return {"B": seen["B"], "N": seen["N"], "D": seen["D"]}


# --------------------------------------------------------------------------------------------------- workspace
@dataclass(frozen=True)
class Workspace:
    """Named scratch slots carved from one workspace pointer: name -> (byte offset, bytes)."""

    slots: dict[str, tuple[int, int]]
    nbytes: int

    def pointer(self, base: int, name: str) -> int:
        """The device address of slot ``name`` in a workspace starting at ``base``."""
        return int(base) + self.slots[name][0]


def _carve(sizes: Sequence[tuple[str, int]]) -> Workspace:
    slots, offset = {}, 0
    for name, nbytes in sizes:
        slots[name] = (offset, nbytes)
        offset += -(-nbytes // WORKSPACE_ALIGN) * WORKSPACE_ALIGN
    return Workspace(slots, offset)


def workspace_layout(op: str, dims: Mapping[str, int]) -> Workspace:
    """The scratch of one call (``dims`` from :func:`problem_dims`, or the profile's max shapes).

    ZonalTopK: ``order [N] i32``, ``sizes [Z] i32``, ``ws [B,3Z] i64``. GraphRank: ``norm``, ``deg``, ``score``,
    ``v0``, ``v1`` (each ``[B,N] f32``), ``attn [B,N,N] f32``, ``thr [B] i32``. Slots are 256-byte aligned.
    """
    _known(op)
    b, n = int(dims["B"]), int(dims["N"])
    if op == "ZonalTopK":
        z = int(dims["Z"])
        return _carve([("order", 4 * n), ("sizes", 4 * z), ("ws", 8 * b * 3 * z)])
    rows = [(name, 4 * b * n) for name in ("norm", "deg", "score", "v0", "v1")]
    return _carve([*rows, ("attn", 4 * b * n * n), ("thr", 4 * b)])


def workspace_bytes(op: str, dims: Mapping[str, int]) -> int:
    """``get_workspace_size``: bytes of :func:`workspace_layout` (0 is never returned: both ops need scratch)."""
    return workspace_layout(op, dims).nbytes


# ------------------------------------------------------------------------------------------------- launches
@dataclass(frozen=True)
class Arg:
    """Where one kernel argument comes from: ``input``/``output`` (index), ``workspace`` (slot) or ``scalar``."""

    name: str
    source: str
    ref: Any  # int index, slot name, or the scalar's value


@dataclass(frozen=True)
class Launch:
    """One kernel launch: the kernel of ``aot.SPECS``, its grid and its arguments in AOT order."""

    kernel: str
    grid: tuple[int, int, int]
    args: tuple[Arg, ...]


def kernel_constants(op: str, attrs: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """The constants :func:`edgeprune.kernels.compile_ptx` needs for every kernel of the op (baked into PTX)."""
    _known(op)
    if op == "ZonalTopK":
        return {"zone_index": {}, "zonal_topk": {"K": int(attrs["K"]), "tau": float(attrs["tau"]),
                                                 "zone_mean": True}}
    graph = {"threshold": float(attrs["threshold"]), "temperature": float(attrs["temperature"]),
             "precision": PRECISION}
    k = {"K": int(attrs["K"])}
    return {"graph_rank.norm": {}, "graph_rank.sim": graph, "graph_rank.step": {}, "graph_rank.select": k,
            "graph_rank.emit": k}


def _grid(kernel: str, dims: Mapping[str, int]) -> tuple[int, int, int]:
    from ...kernels.aot import SPECS  # aot imports triton lazily; SPECS and the block sizes need it

    spec = SPECS[kernel]
    consts = {"B": dims["B"], "N": dims["N"], "Z": dims.get("Z")}
    return spec.grid({**spec.defaults, **consts})


def _i(name: str, idx: int) -> Arg:
    return Arg(name, "input", idx)


def _o(name: str, idx: int) -> Arg:
    return Arg(name, "output", idx)


def _w(name: str, slot: str | None = None) -> Arg:
    return Arg(name, "workspace", slot or name)


def _s(name: str, value: int) -> Arg:
    return Arg(name, "scalar", int(value))


def launch_sequence(op: str, attrs: Mapping[str, Any], dims: Mapping[str, int]) -> list[Launch]:
    """Every launch of one plugin call (IPluginV3 flavour), in order, for concrete ``dims``.

    Needs triton importable (the grids use the kernels' block sizes); the argument names equal the kernel
    specs' (``aot.SPECS[kernel].args``), which the tests check.
    """
    _known(op)
    n = dims["N"]
    if op == "ZonalTopK":
        z = dims["Z"]
        return [Launch("zone_index", _grid("zone_index", dims),
                       (_i("zone", 2), _s("N", n), _s("Z", z), _w("order"), _w("sizes"))),
                Launch("zonal_topk", _grid("zonal_topk", dims),
                       (_i("scores", 0), _i("rel", 1), _i("zone", 2), _w("order"), _w("sizes"), _s("N", n),
                        _s("Z", z), _o("out", 0), _o("quota", 1), _w("ws")))]
    d, steps = dims["D"], int(attrs["steps"])
    seq = [Launch("graph_rank.norm", _grid("graph_rank.norm", dims),
                  (_i("x", 0), _s("N", n), _s("D", d), _w("norm"), _w("thr"))),
           Launch("graph_rank.sim", _grid("graph_rank.sim", dims),
                  (_i("x", 0), _w("norm"), _s("N", n), _s("D", d), _w("attn"), _w("deg")))]
    v = "norm"
    for step in range(steps):
        nxt = f"v{step % 2}"  # never the buffer being read
        seq.append(Launch("graph_rank.step", _grid("graph_rank.step", dims),
                          (_w("attn"), _w("v_in", v), _s("N", n), _w("v_out", nxt))))
        v = nxt
    seq.append(Launch("graph_rank.select", _grid("graph_rank.select", dims),
                      (_w("v", v), _w("deg"), _s("N", n), _w("score"), _w("thr"), _o("out", 0))))
    seq.append(Launch("graph_rank.emit", _grid("graph_rank.emit", dims),
                      (_w("score"), _w("thr"), _s("N", n), _o("out", 0))))
    return seq


def aot_zonal_topk_launch(dims: Mapping[str, int]) -> Launch:
    """The one launch of the AOT node :data:`AOT_ZONAL_TOPK`: inputs (scores, rel, zone, order, sizes),
    scalars (N, Z), outputs (kept_idx, quota, ws), exactly the AOT launcher's order."""
    return Launch("zonal_topk", _grid("zonal_topk", dims),
                  (_i("scores", 0), _i("rel", 1), _i("zone", 2), _i("order", 3), _i("sizes", 4), _s("N", dims["N"]),
                   _s("Z", dims["Z"]), _o("out", 0), _o("quota", 1), _o("ws", 2)))


def aot_zonal_topk_symbols(attrs: Mapping[str, Any]) -> dict[str, Any]:
    """The AOT node's launch parameters as :class:`Dim`/int entries, for ``tensorrt.plugin``'s symbolic
    ``KernelLaunchParams``/``SymIntExprs``: ``grid`` (one program per request: ``(B, 1, 1)``) and ``extra_args``
    (the int32 scalars ``N``, ``Z`` in kernel order). Block and shared memory come from the compiled kernel."""
    return {"grid": (Dim(0, 0), 1, 1), "extra_args": (("N", Dim(0, 1)), ("Z", int(attrs["num_zones"])))}


AOT_ZONAL_TOPK_IO = {  # the AOT node: zonal_topk's arguments; ws is [B, 3Z] int64 declared as [B, 6Z] int32
    "inputs": INPUTS["ZonalTopK"] + (TensorContract("order", "int32", ("N",)), TensorContract("sizes", "int32", ("Z",))),
    "outputs": OUTPUTS["ZonalTopK"] + (TensorContract("ws", "int32", ("B", "6Z")),),
}


def bind(launch: Launch, inputs: Sequence[int], outputs: Sequence[int], workspace: int,
         layout: Workspace | None) -> list[tuple[str, int]]:
    """The launch's arguments as ``("ptr" | "i32", value)`` for device pointers ``inputs``/``outputs`` and the
    workspace base pointer, in argument order.

    Raises:
        PluginContractError: a pointer is missing or null, or a workspace slot is used without a layout.
    """
    out = []
    for arg in launch.args:
        if arg.source == "scalar":
            out.append(("i32", int(arg.ref)))
            continue
        if arg.source == "workspace":
            if layout is None or not workspace:
                raise PluginContractError(f"{launch.kernel}: argument {arg.name} needs the plugin workspace")
            ptr = layout.pointer(workspace, arg.ref)
        else:
            ptrs = inputs if arg.source == "input" else outputs
            if arg.ref >= len(ptrs) or not ptrs[arg.ref]:
                raise PluginContractError(f"{launch.kernel}: {arg.source} {arg.ref} ({arg.name}) has no device "
                                          f"pointer; got {len(ptrs)} {arg.source}s")
            ptr = int(ptrs[arg.ref])
        out.append(("ptr", ptr))
    return out


# -------------------------------------------------------------------------------------------- PTX checks
def ptx_params(ptx: str, entry: str) -> list[str]:
    """The parameter types of PTX entry ``entry`` (e.g. ``["u64", "u32", ...]``), in order.

    Raises:
        PluginContractError: the entry is not in the PTX.
    """
    m = re.search(rf"\.entry\s+{re.escape(entry)}\s*\(([^)]*)\)", ptx)
    if not m:
        raise PluginContractError(f"PTX has no entry {entry!r}")
    return re.findall(r"\.param\s+\.(\w+)", m[1])


def expected_param_type(kernel_dtype: str) -> str:
    """The PTX parameter type of a kernel argument dtype: pointers ``u64``, ``i32`` scalars ``u32``."""
    return "u64" if kernel_dtype.startswith("*") else {"i32": "u32", "i64": "u64", "fp32": "f32"}[kernel_dtype]
