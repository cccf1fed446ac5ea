"""Which TensorRT is importable here and what it can do: flavour, version, plugin API, native TopK limits.

Two flavours share the TensorRT 10.x builder API (``Builder``, ``OnnxParser``, ``IBuilderConfig``,
``IOptimizationProfile``, ``build_serialized_network``):

- ``tensorrt``: full TensorRT (x86/SBSA wheels, JetPack apt). Needs a GPU to build; has the plugin API
  (``INetworkDefinition.add_plugin_v3``) and, from 10.6, Python-defined plugins (``tensorrt.plugin``), with
  ahead-of-time (PTX) implementations from 10.9 (DEPLOYMENT.md §1).
- ``tensorrt-rtx``: TensorRT for RTX (PyPI ``tensorrt-rtx-cu13-libs`` + ``-bindings``, module
  ``tensorrt_rtx_bindings``). Parses ONNX and builds engines on a CPU-only machine (ahead-of-time for
  sm_80/86/89/120 by default), so it is the build smoke test here. Its network definition has no
  ``add_plugin*``, but its ONNX parser maps ``edgeprune``-domain nodes to registered Python ``IPluginV3``
  creators (:mod:`edgeprune.engines.plugins`); without them it inlines the nodes' ONNX local-function bodies
  (standard ops). Deserialising an engine needs a CUDA driver.

House rule 7: a path is never chosen silently; :func:`choose_plugin_modes` says which plugin flavour (``aot``,
``ipluginv3`` or ``none``) each fused op gets and why.

TensorRT for RTX's ONNX parser and plugins: the parser dlopens ``libtensorrt_rtx.so`` when it meets a
plugin node, but the ``tensorrt-rtx-cu13-libs`` wheel ships only ``libtensorrt_rtx.so.1``. The failed
``dlopen`` throws inside a ``noexcept`` function, which aborts the whole process (``terminate called without an
active exception``), so :func:`ensure_rtx_parser_libs` must run before a graph with plugin nodes is parsed: it
creates the missing ``libtensorrt_rtx.so -> libtensorrt_rtx.so.1`` symlink next to the library (the parser's
RPATH is ``$ORIGIN``, so that folder is where it looks). Observed with TensorRT for RTX 1.7.1 (DEPLOYMENT.md §1).
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any, Iterable, Mapping

from ..errors import EdgepruneError, MissingDependencyError

log = logging.getLogger(__name__)

# Native ITopKLayer limit ([TRT] python/docstrings/infer/pyGraphDoc.h): K <= 3840. LLaVA-1.5 (N = 576) and
# LLaVA-NeXT (N <= ~2.9k) fit, so a standard-op TopK + Gather lowering builds everywhere.
NATIVE_TOPK_MAX_K = 3840
# Python AOT plugins (PTX inside the plan, no Python at run time) entered the bindings in 10.9.
AOT_PLUGIN_MIN_VERSION = (10, 9)

# flavour name -> (module, pip hint)
FLAVOURS: dict[str, tuple[str, str]] = {
    "tensorrt": ("tensorrt", "pip install -e '.[trt]' (on Jetson use the JetPack tensorrt bindings)"),
    "tensorrt-rtx": ("tensorrt_rtx_bindings", "pip install tensorrt-rtx-cu13-libs tensorrt-rtx-cu13-bindings"),
}


@dataclass(frozen=True)
class TrtFlavour:
    """An importable TensorRT and its capabilities.

    Attributes:
        name: ``tensorrt`` or ``tensorrt-rtx`` (a key of :data:`FLAVOURS`).
        module: the imported bindings module (``trt`` in NVIDIA's samples).
        version: ``module.__version__``.
        plugin_api: the network definition can add plugin layers (``add_plugin_v3``).
        python_plugins: ``tensorrt.plugin`` (Python-defined plugins) is importable.
        aot_plugins: Python plugins can ship PTX inside the plan (TensorRT >= 10.9).
        notes: why each capability is present or absent (for logs and ``--json`` reports).
    """

    name: str
    module: ModuleType = field(repr=False)
    version: str
    plugin_api: bool
    python_plugins: bool
    aot_plugins: bool
    notes: tuple[str, ...] = ()

    @property
    def version_tuple(self) -> tuple[int, ...]:
        return _version_tuple(self.version)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "version": self.version, "plugin_api": self.plugin_api,
                "python_plugins": self.python_plugins, "aot_plugins": self.aot_plugins, "notes": list(self.notes)}


def _version_tuple(version: str) -> tuple[int, ...]:
    out = []
    for part in version.split(".")[:3]:
        digits = "".join(ch for ch in part if ch.isdigit())
        out.append(int(digits) if digits else 0)
    return tuple(out)


def _import(name: str) -> ModuleType | None:
    module_name = FLAVOURS[name][0]
    try:
        return importlib.import_module(module_name)
    except ImportError:
        return None
    except OSError as exc:  # the bindings import, but their shared libraries do not load (broken install)
        log.warning("%s is installed but cannot be loaded: %s", module_name, exc)
        return None


def _describe(name: str, trt: ModuleType) -> TrtFlavour:
    version = str(getattr(trt, "__version__", "0"))
    notes = []
    plugin_api = hasattr(getattr(trt, "INetworkDefinition", None), "add_plugin_v3")
    notes.append("network plugin API: " + ("add_plugin_v3" if plugin_api else
                                           "none (the ONNX parser still maps registered plugin creators)"))
    python_plugins = False
    if name == "tensorrt":
        try:
            importlib.import_module("tensorrt.plugin")
            python_plugins = True
        except ImportError as exc:
            notes.append(f"tensorrt.plugin unavailable ({exc})")
    aot = python_plugins and _version_tuple(version) >= AOT_PLUGIN_MIN_VERSION
    if python_plugins and not aot:
        notes.append(f"TensorRT {version} < 10.9: Python plugins are JIT only (no PTX inside the plan)")
    return TrtFlavour(name=name, module=trt, version=version, plugin_api=plugin_api, python_plugins=python_plugins,
                      aot_plugins=aot, notes=tuple(notes))


def available_flavours() -> list[str]:
    """The TensorRT flavours importable here, full TensorRT first (it is the deployment target)."""
    return [name for name in FLAVOURS if _import(name) is not None]


def detect(name: str | None = None) -> TrtFlavour:
    """Import a TensorRT flavour and describe it.

    Args:
        name: ``tensorrt``, ``tensorrt-rtx``, or None for the first importable one (full TensorRT first).
    Returns:
        The :class:`TrtFlavour`.
    Raises:
        MissingDependencyError: the flavour (or, with None, any flavour) is not installed; says what to install.
        ValueError: an unknown flavour name (a programming error: the CLI validates choices).
    """
    if name is not None and name not in FLAVOURS:
        raise ValueError(f"unknown TensorRT flavour {name!r}; known: {', '.join(FLAVOURS)}")
    for candidate in [name] if name else list(FLAVOURS):
        trt = _import(candidate)
        if trt is not None:
            flavour = _describe(candidate, trt)
            log.info("TensorRT flavour %s %s (%s)", flavour.name, flavour.version, "; ".join(flavour.notes))
            return flavour
    wanted = [name] if name else list(FLAVOURS)
    hints = "; or ".join(f"{FLAVOURS[w][0]}: {FLAVOURS[w][1]}" for w in wanted)
    raise MissingDependencyError(f"{' / '.join(FLAVOURS[w][0] for w in wanted)} is not installed; install {hints}")


def onnx_topk_ks(onnx_path: str) -> list[tuple[str, int | None]]:
    """The K of every ``TopK`` node of an ONNX graph (and of its local functions), None where K is computed.

    Reads the graph without its external weights; a K stored in the ``.data`` sidecar is loaded on its own.

    Args:
        onnx_path: the ``.onnx`` file.
    Returns:
        [(node name, K or None)] in graph order.
    """
    from pathlib import Path

    from .._deps import require

    onnx = require("onnx")
    from onnx import numpy_helper
    from onnx.external_data_helper import load_external_data_for_tensor, uses_external_data

    proto = onnx.load(str(onnx_path), load_external_data=False)
    consts: dict[str, Any] = {t.name: t for t in proto.graph.initializer}
    nodes = list(proto.graph.node) + [n for f in proto.functions for n in f.node]
    for node in nodes:
        if node.op_type == "Constant":
            for attr in node.attribute:
                if attr.name == "value":
                    consts[node.output[0]] = attr.t
    out: list[tuple[str, int | None]] = []
    for node in nodes:
        if node.op_type != "TopK" or len(node.input) < 2:
            continue
        tensor = consts.get(node.input[1])
        k = None
        if tensor is not None:
            if uses_external_data(tensor):
                load_external_data_for_tensor(tensor, str(Path(onnx_path).parent))
            k = int(numpy_helper.to_array(tensor).reshape(-1)[0])
        out.append((node.name, k))
    return out


# ------------------------------------------------------------------------------------------ plugin modes
PLUGIN_MODES = ("auto", "ipluginv3", "aot", "none")
# Fused ops whose launch sequence fits one AOT (tensorrt.plugin) kernel after the graph rewrite of
# plugins.onnx_modes; GraphRank does not (see edgeprune/engines/plugins/aot.py).
AOT_CAPABLE_OPS = ("ZonalTopK",)


class PluginModeError(EdgepruneError):
    """The requested plugin mode cannot be used with this TensorRT; the message says what to choose instead."""


def python_v3_plugins(flavour: TrtFlavour) -> tuple[bool, str]:
    """Whether ``flavour``'s plugin registry takes Python ``IPluginV3`` creators, and why (not)."""
    trt = flavour.module
    missing = [n for n in ("IPluginV3", "IPluginV3OneCore", "IPluginV3OneBuild", "IPluginV3OneRuntime",
                           "IPluginCreatorV3One", "get_plugin_registry") if not hasattr(trt, n)]
    if missing:
        return False, f"{flavour.name} {flavour.version} has no {', '.join(missing)}"
    return True, f"{flavour.name} {flavour.version} registers Python IPluginV3 creators"


def choose_plugin_modes(flavour: TrtFlavour, requested: str,
                        ops: Mapping[str, Mapping[str, Any]] | Iterable[str]) -> dict[str, tuple[str, str]]:
    """Pick the plugin flavour of every fused op and say why (house rule 7; each choice is logged).

    ``auto``: ZonalTopK gets ``aot`` on TensorRT >= 10.9 with ``tensorrt.plugin`` (the kernel rides in the
    plan), else ``ipluginv3`` where the registry takes Python V3 creators (the loading process must register
    them: :func:`edgeprune.engines.plugins.register_plugins`), else ``none`` (the ONNX function body, standard
    ops). GraphRank never gets ``aot`` (its launch sequence needs a workspace and grid-wide barriers, see
    ``plugins/aot.py``): ``ipluginv3`` where possible, else ``none``. ``aot``: ZonalTopK must get it (else
    :class:`PluginModeError`); GraphRank then gets ``none`` so the plan still runs without Python.
    ``ipluginv3``: every op gets it (else :class:`PluginModeError`). ``none``: every op runs its body.
    A node the plugin cannot take (:func:`~edgeprune.engines.plugins.contract.unsupported_reason`, e.g.
    GraphRank over two groups) gets ``none`` in every mode.

    Args:
        flavour: the TensorRT in use (:func:`detect`).
        requested: one of :data:`PLUGIN_MODES`.
        ops: the fused ops of the graph, as {op: node attributes} (checked for support) or op names.
    Returns:
        {op: (mode, reason)} with mode in ``aot``/``ipluginv3``/``none``.
    Raises:
        PluginModeError: an unknown mode, or ``aot``/``ipluginv3`` requested where this TensorRT cannot.
    """
    from .plugins.contract import OPS, unsupported_reason

    if requested not in PLUGIN_MODES:
        raise PluginModeError(f"unknown plugin mode {requested!r}; choose one of {', '.join(PLUGIN_MODES)}")
    attrs = dict(ops) if isinstance(ops, Mapping) else {op: None for op in ops}
    v3_ok, v3_why = python_v3_plugins(flavour)
    aot_why = (f"{flavour.name} {flavour.version} runs Python AOT plugins (PTX inside the plan, no Python at run "
               "time)" if flavour.aot_plugins else
               f"{flavour.name} {flavour.version} has no AOT Python plugins (needs TensorRT >= 10.9 with "
               "tensorrt.plugin)")
    out: dict[str, tuple[str, str]] = {}
    for op, node_attrs in attrs.items():
        if op not in OPS:
            raise PluginModeError(f"no plugin exists for op {op!r}; known: {', '.join(OPS)}")
        why_not = unsupported_reason(op, node_attrs) if node_attrs is not None else None
        out[op] = choice = _mode_for(op, requested, why_not, flavour.aot_plugins, aot_why, v3_ok, v3_why)
        log.info("plugin mode for %s: %s (%s)", op, choice[0], choice[1])
    return out


def _mode_for(op: str, requested: str, why_not: str | None, aot_ok: bool, aot_why: str, v3_ok: bool,
              v3_why: str) -> tuple[str, str]:
    """One op's (mode, reason) under :func:`choose_plugin_modes`' rules."""
    if requested == "none":
        return "none", "--plugins none: the ONNX function body (standard ops)"
    if why_not:
        return "none", why_not
    aot_capable = op in AOT_CAPABLE_OPS
    if requested == "aot":
        if not aot_capable:
            return "none", (f"{op} cannot be one AOT kernel (multi-launch sequence with a workspace); the function "
                            "body keeps the plan free of Python plugins")
        if not aot_ok:
            raise PluginModeError(f"--plugins aot: {aot_why}; use --plugins ipluginv3 or auto")
        return "aot", aot_why
    if requested == "ipluginv3":
        if not v3_ok:
            raise PluginModeError(f"--plugins ipluginv3: {v3_why}; use --plugins auto or none")
        return "ipluginv3", v3_why + "; the loading process must register the creators"
    if aot_capable and aot_ok:
        return "aot", aot_why
    if v3_ok:
        return "ipluginv3", (aot_why if aot_capable else f"{op} has no AOT form") + "; " + v3_why
    return "none", f"{v3_why} and {aot_why}: the ONNX function body (standard ops)"


# ------------------------------------------------------------------------------- RTX parser library fix
def ensure_rtx_parser_libs(libs_dir: str | os.PathLike[str] | None = None) -> Path | None:
    """Create ``libtensorrt_rtx.so -> libtensorrt_rtx.so.<N>`` in the TensorRT-for-RTX wheel's library folder.

    Why: the RTX ONNX parser dlopens the unversioned name when it parses a plugin node; the wheel ships
    only the versioned file, and the failed load aborts the process (see the module docstring). Call this
    before parsing any graph with ``edgeprune`` plugin nodes under TensorRT for RTX; it is idempotent and safe
    when several processes race (an existing link is kept).

    Args:
        libs_dir: the folder holding ``libtensorrt_rtx.so.*`` (default: the installed ``tensorrt_rtx_libs``).
    Returns:
        The path of the (existing or new) ``libtensorrt_rtx.so``, or None when TensorRT for RTX's library wheel
        is not installed (nothing to fix; full TensorRT needs no link).
    Raises:
        PluginModeError: the folder has no ``libtensorrt_rtx.so.*``, or the link cannot be created (e.g. a
            read-only site-packages); the message gives the ``ln -s`` command to run once by hand.
    """
    if libs_dir is None:
        spec = importlib.util.find_spec("tensorrt_rtx_libs")
        if spec is None or not spec.submodule_search_locations:
            return None
        libs_dir = list(spec.submodule_search_locations)[0]
    folder = Path(libs_dir)
    link = folder / "libtensorrt_rtx.so"
    if link.exists():
        return link
    versioned = sorted(folder.glob("libtensorrt_rtx.so.*"))
    if not versioned:
        raise PluginModeError(f"{folder} has no libtensorrt_rtx.so.*; reinstall tensorrt-rtx-cu13-libs")
    try:
        link.symlink_to(versioned[0].name)  # relative: the folder may move with its virtualenv
    except FileExistsError:
        pass  # another process made it first
    except OSError as exc:
        raise PluginModeError(f"cannot create {link} -> {versioned[0].name} ({exc}); TensorRT for RTX's parser "
                              f"aborts on plugin nodes without it: run  ln -s {versioned[0].name} {link}") from exc
    log.info("created %s -> %s (TensorRT for RTX's parser dlopens the unversioned name)", link, versioned[0].name)
    return link
