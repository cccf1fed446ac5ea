"""One call before an engine build parses a graph: choose the plugin modes, make the parser ready, write the copy.

:func:`prepare_graph` is the hook a build calls per graph (``edgeprune build``, ``engines/rtx.py``): it finds the
graph's fused nodes, picks each op's mode with :func:`~edgeprune.engines.capability.choose_plugin_modes`
(logged, house rule 7), creates the TensorRT-for-RTX library symlink before any plugin node is parsed,
registers the IPluginV3 creators and/or defines the AOT plugin as the modes need, and returns the file to parse
(the bundle's own graph, or a build copy from :func:`.onnx_modes.prepare_for_modes`). Graphs without fused
nodes come back unchanged with no modes.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..capability import TrtFlavour, choose_plugin_modes, ensure_rtx_parser_libs

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PreparedGraph:
    """What to parse and why.

    Attributes:
        path: the ONNX file to parse (``src`` itself, or the build copy).
        modes: {op: (mode, reason)} for every fused op of the graph (empty when it has none); record the modes
            in the manifest: a plan built with ``ipluginv3`` needs :func:`register_plugins` where it is loaded.
        plugin_ids: the plugins registered for this build (``edgeprune::ZonalTopK``, ...).
    """

    path: Path
    modes: dict[str, tuple[str, str]] = field(default_factory=dict)
    plugin_ids: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return {"path": str(self.path), "plugin_ids": list(self.plugin_ids),
                "modes": {op: {"mode": m, "reason": r} for op, (m, r) in self.modes.items()}}


def prepare_graph(flavour: TrtFlavour, requested: str, src: str | os.PathLike[str],
                  build_dir: str | os.PathLike[str]) -> PreparedGraph:
    """Get one graph ready for ``OnnxParser.parse_from_file`` under ``flavour`` with ``--plugins requested``.

    Args:
        flavour: the TensorRT in use (``capability.detect``).
        requested: ``auto``, ``ipluginv3``, ``aot`` or ``none``.
        src: the bundle's ``.onnx`` file (never modified).
        build_dir: where a build copy may be written (``<build_dir>/<name>.onnx``; e.g. a temporary folder
            beside the engines).
    Returns:
        The :class:`PreparedGraph`.
    Raises:
        PluginModeError: the mode cannot be used with this TensorRT, or the RTX symlink cannot be made.
        PluginContractError: a fused node with bad attributes. MissingDependencyError: onnx (or, for ``aot``,
            tensorrt.plugin) is not installed.
    """
    from .ipluginv3 import register_plugins
    from .onnx_modes import fused_ops, prepare_for_modes

    src = Path(src)
    ops = fused_ops(src)
    if not ops:
        return PreparedGraph(src)
    modes = choose_plugin_modes(flavour, requested, ops)
    v3 = [op for op, (m, _) in modes.items() if m == "ipluginv3"]
    ids: list[str] = []
    if v3 and flavour.name == "tensorrt-rtx":
        ensure_rtx_parser_libs()  # its parser aborts the process on a plugin node without the symlink
    if v3:
        ids += register_plugins(flavour.module, v3)
    if any(m == "aot" for m, _ in modes.values()):
        from .aot import register_aot_plugins

        ids += register_aot_plugins(flavour.module)
    path = prepare_for_modes(src, Path(build_dir) / src.name, modes)
    log.info("%s: parse %s (plugin modes: %s)", src.name, path,
             ", ".join(f"{op}={m}" for op, (m, _) in modes.items()))
    return PreparedGraph(path, modes, tuple(ids))
