"""Python ``IPluginV3`` plugins and ``IPluginCreatorV3One`` creators for ``ZonalTopK`` and ``GraphRank``.

Written against TensorRT's Python plugin API (``IPluginV3`` + ``IPluginV3OneCore``/``OneBuild``/``OneRuntime``,
``IPluginCreatorV3One``, ``get_plugin_registry().register_creator``; NVIDIA's ``samples/python/python_plugin``),
which full TensorRT (>= 10.0, JetPack 6's 10.3 included) and TensorRT for RTX share. The classes are built by
:func:`plugin_classes` for a given TensorRT module, so the same code serves ``tensorrt`` and
``tensorrt_rtx_bindings``. Everything they compute comes from :mod:`.contract`; ``enqueue`` hands TensorRT's
pointers, workspace and stream to :class:`.launch.PluginLauncher`.

What runs where: with TensorRT for RTX on a CPU, the parser maps the ``edgeprune`` nodes to these creators and
``build_serialized_network`` calls the build-time methods (output types and shapes, formats, configure,
workspace size, clone); the tests check it. ``enqueue`` runs only on a GPU (full TensorRT also calls it while
timing during the build). An engine built with these plugins needs :func:`register_plugins` in the process
that deserialises it (Python plugins are never serialised into the plan), plus cuda-python and the PTX
(``edgeprune.kernels.compile_ptx``'s cache, or triton to fill it).
"""

from __future__ import annotations

import logging
from types import ModuleType
from typing import Any

import numpy as np

from .contract import (FIELDS, NAMESPACE, OPS, VERSION, Dim, INPUTS, OUTPUTS, PluginContractError,
                       output_dims, parse_attributes, problem_dims, supports_format, workspace_bytes)

log = logging.getLogger(__name__)

_CLASSES: dict[int, dict[str, type]] = {}  # id(trt module) -> {op: creator class}
_REGISTERED: dict[int, dict[str, Any]] = {}  # id(trt module) -> {op: creator instance} (kept alive)


def _dtype_name(trt: ModuleType, dtype: Any) -> str:
    names = {trt.DataType.FLOAT: "float32", trt.DataType.INT32: "int32", trt.DataType.HALF: "float16"}
    if hasattr(trt.DataType, "INT64"):
        names[trt.DataType.INT64] = "int64"
    return names.get(dtype, str(dtype))


def _trt_dtype(trt: ModuleType, name: str) -> Any:
    return {"float32": trt.DataType.FLOAT, "int32": trt.DataType.INT32, "int64": getattr(trt.DataType, "INT64", None)}[name]


def _fields(fc: Any) -> dict[str, Any]:
    return {f.name: np.asarray(f.data) for f in fc} if fc is not None else {}


class _FusedPlugin:
    """The methods of the plugin of one fused-op node; combined with TensorRT's bases by :func:`_build_classes`
    (``trt`` is the class attribute naming the TensorRT module). Attributes come from PluginFields, everything
    else from the contract."""

    trt: ModuleType

    def __init__(self, op: str, attrs: dict[str, Any], phase: Any = None) -> None:
        trt = self.trt
        for base in (trt.IPluginV3, trt.IPluginV3OneCore, trt.IPluginV3OneBuild, trt.IPluginV3OneRuntime):
            base.__init__(self)
        self.op, self.attrs, self.phase = op, dict(attrs), phase
        self.num_outputs = len(OUTPUTS[op])
        self.plugin_namespace, self.plugin_name, self.plugin_version = NAMESPACE, op, VERSION
        # identical nodes share timings: same op, same baked constants
        self.timing_cache_id = f"{op}:" + ",".join(f"{k}={v}" for k, v in self.attrs.items())
        self.launcher = None  # created on first enqueue (needs the device)

    # ---- core / build
    def get_capability_interface(self, capability_type: Any) -> Any:
        return self

    def get_output_data_types(self, input_types: Any) -> list[Any]:
        return [_trt_dtype(self.trt, t.dtype) for t in OUTPUTS[self.op]]

    def get_output_shapes(self, inputs: Any, shape_inputs: Any, expr_builder: Any) -> list[Any]:
        out = []
        for dims in output_dims(self.op, self.attrs):
            exprs = [inputs[d.input][d.axis] if isinstance(d, Dim) else expr_builder.constant(int(d)) for d in dims]
            out.append(self.trt.DimsExprs(exprs))
        return out

    def supports_format_combination(self, pos: int, in_out: Any, num_inputs: int) -> bool:
        desc = in_out[pos].desc
        linear = desc.format == self.trt.TensorFormat.LINEAR
        return supports_format(self.op, pos, _dtype_name(self.trt, desc.type), linear)

    def configure_plugin(self, inputs: Any, outputs: Any) -> None:
        if len(inputs) != len(INPUTS[self.op]):
            raise PluginContractError(f"{self.op}: expected {len(INPUTS[self.op])} inputs, got {len(inputs)}")

    def get_workspace_size(self, inputs: Any, outputs: Any) -> int:
        shapes = [tuple(int(v) for v in d.max) for d in inputs]
        return workspace_bytes(self.op, problem_dims(self.op, self.attrs, shapes))

    def get_valid_tactics(self) -> list[int]:
        return []

    def set_tactic(self, tactic: int) -> None:
        pass

    # ---- runtime
    def on_shape_change(self, inputs: Any, outputs: Any) -> None:
        problem_dims(self.op, self.attrs, [tuple(int(v) for v in d.dims) for d in inputs])

    def enqueue(self, input_desc: Any, output_desc: Any, inputs: Any, outputs: Any, workspace: int,
                stream: int) -> None:
        if self.launcher is None:
            from .launch import PluginLauncher

            self.launcher = PluginLauncher(self.op, self.attrs)
        shapes = [tuple(int(v) for v in d.dims) for d in input_desc]
        self.launcher.run(shapes, [int(p) for p in inputs], [int(p) for p in outputs], int(workspace), int(stream))

    def attach_to_context(self, context: Any) -> Any:
        return self.clone()

    def get_fields_to_serialize(self) -> Any:
        return self.trt.PluginFieldCollection([_field(self.trt, name, kind, self.attrs[name])
                                               for name, kind in FIELDS[self.op]])

    def clone(self) -> Any:
        twin = type(self)(self.op, self.attrs, self.phase)
        twin.launcher = self.launcher  # loaded modules are per context in launch.py; sharing is safe
        return twin


class _Creator:
    """The methods of the ``IPluginCreatorV3One`` of one op (``op``, ``trt``, ``plugin`` are class attributes)."""

    trt: ModuleType
    op: str
    plugin: type

    def __init__(self) -> None:
        self.trt.IPluginCreatorV3One.__init__(self)
        self.name, self.plugin_namespace, self.plugin_version = self.op, NAMESPACE, VERSION
        self.field_names = self.trt.PluginFieldCollection([_field(self.trt, name, kind, None)
                                                           for name, kind in FIELDS[self.op]])

    def create_plugin(self, name: str, fc: Any, phase: Any) -> Any:
        attrs = parse_attributes(self.op, _fields(fc))
        log.debug("creating %s::%s %s (%s)", NAMESPACE, self.op, attrs, phase)
        return self.plugin(self.op, attrs, phase)


def _build_classes(trt: ModuleType) -> dict[str, type]:
    """The plugin class and one creator class per op for the TensorRT module ``trt``."""
    plugin = type("FusedPlugin", (_FusedPlugin, trt.IPluginV3, trt.IPluginV3OneCore, trt.IPluginV3OneBuild,
                                  trt.IPluginV3OneRuntime), {"trt": trt})
    return {op: type(f"{op}Creator", (_Creator, trt.IPluginCreatorV3One), {"trt": trt, "op": op, "plugin": plugin})
            for op in OPS}


def _field(trt: ModuleType, name: str, kind: type, value: Any) -> Any:
    """A PluginField: ints as INT32, floats as FLOAT64 when serialised (exact) and FLOAT32 when declared (ONNX
    float attributes are float32; the contract recovers their decimal value)."""
    if kind is int:
        data = np.array([] if value is None else [int(value)], dtype=np.int32)
        return trt.PluginField(name, data, trt.PluginFieldType.INT32)
    if value is None:
        return trt.PluginField(name, np.array([], dtype=np.float32), trt.PluginFieldType.FLOAT32)
    return trt.PluginField(name, np.array([float(value)], dtype=np.float64), trt.PluginFieldType.FLOAT64)


def plugin_classes(trt: ModuleType) -> dict[str, type]:
    """{op: IPluginCreatorV3One subclass} for the TensorRT module ``trt`` (built once per module)."""
    key = id(trt)
    if key not in _CLASSES:
        _CLASSES[key] = _build_classes(trt)
    return _CLASSES[key]


def register_plugins(trt: ModuleType, ops: tuple[str, ...] | list[str] | None = None) -> list[str]:
    """Register the ``edgeprune`` creators with ``trt.get_plugin_registry()`` (idempotent).

    Call it before parsing a graph whose fused nodes should become plugins, and in every process that
    deserialises an engine built with them. Under TensorRT for RTX it first makes the library symlink
    (:func:`edgeprune.engines.capability.ensure_rtx_parser_libs`): once a creator is registered, its parser
    loads ``libtensorrt_rtx.so`` on the next plugin node and would abort the process without it.

    Args:
        trt: the TensorRT module (``tensorrt`` or ``tensorrt_rtx_bindings``, i.e. ``TrtFlavour.module``).
        ops: the ops to register (default: both).
    Returns:
        The registered plugin ids, ``["edgeprune::ZonalTopK", "edgeprune::GraphRank"]``.
    Raises:
        PluginContractError: an unknown op, or the registry refused a creator.
        PluginModeError: TensorRT for RTX's library symlink cannot be made (the message says how to make it).
    """
    wanted = list(ops) if ops is not None else list(OPS)
    unknown = sorted(set(wanted) - set(OPS))
    if unknown:
        raise PluginContractError(f"no plugin for ops {unknown}; known: {', '.join(OPS)}")
    if "rtx" in getattr(trt, "__name__", ""):
        from ..capability import ensure_rtx_parser_libs

        ensure_rtx_parser_libs()
    done = _REGISTERED.setdefault(id(trt), {})
    registry = trt.get_plugin_registry()
    for op in wanted:
        if op in done:
            continue
        existing = registry.get_creator(op, VERSION, NAMESPACE) if hasattr(registry, "get_creator") else None
        if existing is not None:  # registered by an earlier copy of this module (e.g. importlib.reload)
            done[op] = existing
            continue
        creator = plugin_classes(trt)[op]()
        if not registry.register_creator(creator, NAMESPACE):
            raise PluginContractError(f"the TensorRT plugin registry refused {NAMESPACE}::{op} v{VERSION}")
        done[op] = creator  # the registry holds a raw pointer: keep the Python object alive
        log.info("registered TensorRT plugin %s::%s v%s (IPluginV3, Python)", NAMESPACE, op, VERSION)
    return [f"{NAMESPACE}::{op}" for op in wanted]
