"""TensorRT plugins for the fused ops ``ZonalTopK`` and ``GraphRank`` (DESIGN.md §5; docs/tensorrt-plugins.md).

* :mod:`.contract`: shapes, dtypes, formats, workspace and launch sequences as pure functions (no TensorRT);
* :mod:`.launch`: the launch path (PTX through the CUDA driver API on a given stream), IPluginV3's ``enqueue``;
* :mod:`.ipluginv3`: Python ``IPluginV3`` plugins and creators for any TensorRT module; :func:`register_plugins`;
* :mod:`.aot`: the ``tensorrt.plugin`` AOT definition (TensorRT >= 10.9; ZonalTopK only), defined lazily;
* :mod:`.onnx_modes`: the fused nodes of a graph and the per-mode copy of it a build parses;
* :mod:`.prepare`: :func:`prepare_graph`, the one call a build makes per graph before parsing it;
* :mod:`.check`: plugin calls on torch tensors vs the reference (GPU test, ``benchmarks/plugin_launch.py``).

The mode choice is :func:`edgeprune.engines.capability.choose_plugin_modes`. Importing this package imports
neither TensorRT nor triton nor onnx; the names below load their module on first use.
"""

from __future__ import annotations

import importlib

_LAZY = {
    "register_plugins": "ipluginv3",
    "plugin_classes": "ipluginv3",
    "PluginLauncher": "launch",
    "RecordingDriver": "launch",
    "ptx_target": "launch",
    "register_aot_plugins": "aot",
    "fused_ops": "onnx_modes",
    "prepare_for_modes": "onnx_modes",
    "prepare_graph": "prepare",
    "PreparedGraph": "prepare",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str):
    """Import the module that defines ``name`` on first use (PEP 562)."""
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    globals()[name] = value
    return value
