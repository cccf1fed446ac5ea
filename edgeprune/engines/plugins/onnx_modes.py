"""The fused nodes of an ONNX graph, and the copy of the graph a build parses for the chosen plugin modes.

A bundle's graph is never modified. :func:`prepare_for_modes` writes a build copy only when a mode needs one:

* ``ipluginv3``: no change. The node ``edgeprune.ZonalTopK`` / ``edgeprune.GraphRank`` carries
  ``plugin_namespace``/``plugin_version``; a parser with the creator registered maps it to the plugin (since
  TensorRT 10.7 a registered plugin wins over the model-local function of the same name).
* ``none``: the node's local function is inlined, so the body (standard ops) is built even in a process where
  the creators are registered.
* ``aot`` (ZonalTopK): the node is replaced by standard ops that compute the zone index (``order`` = stable
  argsort of the zone ids, as a TopK over the distinct keys ``zone * N + i``; ``sizes`` = per-zone counts) and
  one :data:`.contract.AOT_ZONAL_TOPK` node with ``aot=1`` that takes (scores, relevance, zone, order, sizes)
  and returns (kept_idx, quota, ws): exactly the ``zonal_topk`` kernel's arguments, because an AOT plugin is
  one kernel without a workspace (its scratch is the third output, unused downstream).

Needs ``onnx`` (the export extra).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from ..._deps import require
from .contract import AOT_ZONAL_TOPK, NAMESPACE, OPS, VERSION, parse_attributes

log = logging.getLogger(__name__)

MODES = ("aot", "ipluginv3", "none")


def _attr_values(node: Any) -> dict[str, Any]:
    helper = require("onnx").helper
    out = {}
    for attr in node.attribute:
        value = helper.get_attribute_value(attr)
        if attr.type == attr.FLOAT:
            value = np.float32(value)  # ONNX floats are float32; the contract recovers the decimal
        out[attr.name] = value.decode() if isinstance(value, bytes) else value
    return out


def fused_ops(onnx_path: str | os.PathLike[str]) -> dict[str, dict[str, Any]]:
    """The ``edgeprune`` fused nodes of a graph: {op: parsed attributes} (empty for graphs without any).

    Reads the graph without its external weights.

    Raises:
        PluginContractError: a fused node with bad attributes.
    """
    onnx = require("onnx")
    model = onnx.load(str(onnx_path), load_external_data=False)
    out: dict[str, dict[str, Any]] = {}
    for node in model.graph.node:
        if node.domain == NAMESPACE and node.op_type in OPS:
            attrs = parse_attributes(node.op_type, _attr_values(node))
            if out.setdefault(node.op_type, attrs) != attrs:
                log.warning("%s: two %s nodes with different attributes; modes are chosen per op", onnx_path,
                            node.op_type)
    return out


def zone_index_nodes(b: Any, zone: str, num_zones: int) -> tuple[str, str]:
    """Standard ops for ``order = argsort(zone, stable)`` and ``sizes = bincount(zone, Z)`` (both int32).

    ``zone`` is an int32 [N] value. The keys ``zone * N + i`` are distinct and exact in float32 while
    ``Z * N < 2**24`` (LLaVA-NeXT: 320 zones x 2,880 tokens = 0.9 M), so a TopK (smallest first) over them is the
    stable sort. Returns the (order, sizes) value names.
    """
    with b.scope("zone_index"):
        n = b.dim(zone, 0, name="N")
        nf = b.cast(n, "float32", name="N_f")
        key = b.op("Add", b.op("Mul", b.cast(zone, "float32", name="zone_f"), nf), b.arange(n, np.float32), name="key")
        _, idx = b.op("TopK", key, n, outputs=2, axis=-1, largest=0, sorted=1, name="stable_sort")
        order = b.cast(idx, "int32", name="order")
        onehot = b.op("Equal", b.unsqueeze(b.cast(zone, "int64", name="zone64"), 1),
                      b.const(np.arange(num_zones), np.int64, "zone_ids"))
        sizes = b.reduce("ReduceSum", b.cast(onehot, "int32"), 0, keepdims=0, name="sizes")
    return order, sizes


def _aot_nodes(node: Any) -> list[Any]:
    """The standard zone-index ops and the AOT ZonalTopK node that replace one ``ZonalTopK`` node."""
    from ...export.onnx_builder import Builder

    attrs = parse_attributes("ZonalTopK", _attr_values(node))
    b = Builder(node.name or "/ZonalTopK")
    order, sizes = zone_index_nodes(b, node.input[2], attrs["num_zones"])
    outputs = list(node.output) + [f"{node.name}/ws"]
    b.op(AOT_ZONAL_TOPK, *node.input, order, sizes, outputs=3, domain=NAMESPACE, out_names=outputs, name="aot",
         K=attrs["K"], tau=attrs["tau"], zones=attrs["zones"], num_zones=attrs["num_zones"],
         plugin_namespace=NAMESPACE, plugin_version=VERSION, aot=1)
    return b.nodes


def prepare_for_modes(src: str | os.PathLike[str], dst: str | os.PathLike[str],
                      modes: Mapping[str, str | tuple[str, str]]) -> Path:
    """Write the graph a build should parse for ``modes`` (see the module docstring); the source is untouched.

    Args:
        src: the bundle's ``.onnx`` file.
        dst: where to write the copy (its external data, if any, goes next to it as ``<name>.data``).
        modes: {op: mode} or {op: (mode, reason)} (the output of ``choose_plugin_modes``); ops absent from
            the graph are ignored, fused ops absent from ``modes`` keep their node (``ipluginv3``).
    Returns:
        ``dst`` when a copy was written, else ``src`` (no mode needed a change).
    Raises:
        ValueError: an unknown mode, or ``aot`` for GraphRank (no AOT form: a programming error, since
            ``choose_plugin_modes`` never picks it).
    """
    onnx = require("onnx")
    wanted = {op: (m[0] if isinstance(m, tuple) else m) for op, m in modes.items()}
    bad = {op: m for op, m in wanted.items() if m not in MODES or (m == "aot" and op != "ZonalTopK")}
    if bad:
        raise ValueError(f"unsupported plugin modes {bad}; modes are {MODES} and only ZonalTopK has an AOT form")
    model = onnx.load(str(src), load_external_data=False)
    present = {n.op_type for n in model.graph.node if n.domain == NAMESPACE and n.op_type in OPS}
    changes = {op: m for op, m in wanted.items() if op in present and m != "ipluginv3"}
    if not changes:
        return Path(src)
    model = onnx.load(str(src))  # with external data: the copy is saved elsewhere
    inline = [(NAMESPACE, op) for op, m in changes.items() if m == "none"]
    if inline:
        from onnx import inliner

        model = inliner.inline_selected_functions(model, inline)
    if changes.get("ZonalTopK") == "aot":
        nodes = []
        for node in model.graph.node:
            is_fused = node.domain == NAMESPACE and node.op_type == "ZonalTopK"
            nodes.extend(_aot_nodes(node) if is_fused else [node])
        del model.graph.node[:]
        model.graph.node.extend(nodes)
        keep = [f for f in model.functions if not (f.domain == NAMESPACE and f.name == "ZonalTopK")]
        del model.functions[:]
        model.functions.extend(keep)
    out = Path(dst)
    out.parent.mkdir(parents=True, exist_ok=True)
    if model.ByteSize() > 1 << 30:  # not a prune graph; weights go to a sidecar next to the copy
        onnx.save(model, str(out), save_as_external_data=True, location=f"{out.name}.data")
    else:  # through a temporary file, so an interrupted write leaves nothing half-written
        tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
        try:
            onnx.save(model, str(tmp))
            os.replace(tmp, out)
        finally:
            tmp.unlink(missing_ok=True)
    log.info("%s: build copy %s with plugin modes %s", Path(src).name, out, changes)
    return out
