"""The Python-defined AOT plugin (``tensorrt.plugin``, TensorRT >= 10.9): ``edgeprune::ZonalTopKAot``.

Written against TensorRT's documented QDP API (``trtp.register``, ``trtp.autotune``, ``trtp.aot_impl`` returning
the kernel name, the PTX, ``trtp.KernelLaunchParams`` and ``trtp.SymIntExprs``; DEPLOYMENT.md §1). It cannot run
here: ``tensorrt.plugin`` needs full TensorRT (libnvinfer), which this project's CI and GPU machine lack. So
nothing is defined at import; :func:`register_aot_plugins` defines it on first call, driven by
:mod:`.contract`, and the tests marked ``trt`` run it unchanged wherever ``import tensorrt`` works.

Which ops have an AOT form, and why:

* **ZonalTopK: yes, as a two-part rewrite.** An AOT plugin is exactly one kernel launched with (input pointers,
  int32 scalars, output pointers) and no workspace. ``zonal_topk_kernel`` is one launch, and its scratch
  ``ws`` becomes a third output; the zone index it reads (``order``, ``sizes``) is computed by standard ONNX ops
  in front of it (:func:`.onnx_modes.prepare_for_modes`), so the node ``ZonalTopKAot(scores, relevance, zone,
  order, sizes) -> (kept_idx, quota, ws)`` takes the kernel's arguments in the kernel's order. The PTX (with K,
  tau and the block sizes baked in: AOT plans do not keep plugin attributes) rides inside the plan, which then
  runs in any TensorRT process, ``trtexec`` included.
* **GraphRank: no; IPluginV3 only (else the ONNX body).** Its 5 + ``steps`` launches need grid-wide barriers
  between them (each step needs the whole previous vector) and an N x N scratch matrix that the AOT launcher
  cannot provide (no workspace). A chain of AOT nodes would expose that matrix as a network tensor and needs
  kernels that update ``thr``/``out`` written by an earlier launch, i.e. aliased plugin I/O (a preview
  feature in 10.x). ``choose_plugin_modes`` therefore gives GraphRank ``ipluginv3`` under ``auto`` and ``none``
  under ``aot`` (so an ``aot`` plan stays free of Python plugins).

Note: this module must not use ``from __future__ import annotations``: ``tensorrt.plugin`` reads the real
annotation objects (``trtp.TensorDesc``, ``int``, ...) of the decorated functions.
"""

import logging
from typing import Any, List, Tuple, Union

import numpy as np

from ..._deps import require
from .contract import AOT_ZONAL_TOPK, NAMESPACE, Dim, aot_zonal_topk_symbols, kernel_constants, parse_attributes

log = logging.getLogger(__name__)

PLUGIN_ID = f"{NAMESPACE}::{AOT_ZONAL_TOPK}"
_DEFINED: list = []  # the plugin ids defined in this process (tensorrt.plugin refuses a second register)


def build_sm() -> int:
    """The PTX target of the GPU the engine is built on (full TensorRT builds on its target GPU)."""
    from .launch import CudaDriver, ptx_target

    return ptx_target(CudaDriver().device_sm())


def _sym(shape_expr: Any, entry: Any) -> Any:
    """A contract entry as a ``tensorrt.plugin`` symbolic expression (or a plain int)."""
    return shape_expr[entry.input][entry.axis] if isinstance(entry, Dim) else int(entry)


def zonal_topk_aot_kernel(attrs: dict, sm: int, cache_dir: Any = None) -> Any:
    """The compiled ``zonal_topk`` kernel the AOT plugin ships (pure: no TensorRT), for tests and ``aot_impl``."""
    from ...kernels.aot import compile_ptx

    return compile_ptx("zonal_topk", sm, cache_dir=cache_dir, **kernel_constants("ZonalTopK", attrs)["zonal_topk"])


def _define(trtp: Any, trt: Any) -> None:
    """Register the description, autotune and aot_impl functions of ``ZonalTopKAot`` with ``tensorrt.plugin``."""

    @trtp.register(PLUGIN_ID)
    def zonal_topk_aot_desc(scores: trtp.TensorDesc, relevance: trtp.TensorDesc, zone: trtp.TensorDesc,
                            order: trtp.TensorDesc, sizes: trtp.TensorDesc, K: int, tau: float, zones: int,
                            num_zones: int) -> Tuple[trtp.TensorDesc, trtp.TensorDesc, trtp.TensorDesc]:
        batch = scores.shape_expr[0]
        return (trtp.from_shape_expr((batch, K), dtype=trt.int32),
                trtp.from_shape_expr((batch, num_zones), dtype=trt.int32),
                trtp.from_shape_expr((batch, 6 * num_zones), dtype=trt.int32))  # ws: [B, 3Z] int64 as int32 words

    @trtp.autotune(PLUGIN_ID)
    def zonal_topk_aot_autotune(scores: trtp.TensorDesc, relevance: trtp.TensorDesc, zone: trtp.TensorDesc,
                                order: trtp.TensorDesc, sizes: trtp.TensorDesc,
                                outputs: Tuple[trtp.TensorDesc]) -> List[trtp.AutoTuneCombination]:
        return [trtp.AutoTuneCombination("FP32, FP32, INT32, INT32, INT32, INT32, INT32, INT32", "LINEAR")]

    @trtp.aot_impl(PLUGIN_ID)
    def zonal_topk_aot_impl(scores: trtp.TensorDesc, relevance: trtp.TensorDesc, zone: trtp.TensorDesc,
                            order: trtp.TensorDesc, sizes: trtp.TensorDesc, K: int, tau: float, zones: int,
                            num_zones: int, outputs: Tuple[trtp.TensorDesc], tactic: int
                            ) -> Tuple[Union[str, bytes], Union[str, bytes], trtp.KernelLaunchParams,
                                       trtp.SymExprs]:
        # tau arrives as FLOAT64 converted from ONNX's float32 attribute: recover the exported decimal
        attrs = parse_attributes("ZonalTopK", {"K": K, "tau": np.float32(tau), "zones": zones,
                                               "num_zones": num_zones})
        kernel = zonal_topk_aot_kernel(attrs, build_sm())
        symbols = aot_zonal_topk_symbols(attrs)
        shapes = [scores.shape_expr]
        params = trtp.KernelLaunchParams()
        for axis, g, b in zip("xyz", symbols["grid"], kernel.block):  # the setters wrap values in SymInt32
            setattr(params, f"grid_{axis}", _sym(shapes, g))
            setattr(params, f"block_{axis}", int(b))
        params.shared_mem = kernel.shared_mem
        extra = trtp.SymIntExprs.from_tuple([trtp.SymInt32(_sym(shapes, v)) for _, v in symbols["extra_args"]])
        log.info("%s: PTX %s for sm_%d, grid %s, block %s, %d B shared", PLUGIN_ID, kernel.kernel_name, kernel.sm,
                 symbols["grid"], kernel.block, kernel.shared_mem)
        return kernel.kernel_name.encode(), kernel.ptx.encode(), params, extra


def register_aot_plugins(trt: Any = None) -> List[str]:
    """Define the AOT plugin(s) with ``tensorrt.plugin`` (once per process; later calls return the ids).

    Call before parsing a graph prepared with ``prepare_for_modes(..., {"ZonalTopK": "aot"})``; the plan then
    needs nothing at run time. Full TensorRT >= 10.9 only (TensorRT for RTX has no ``tensorrt.plugin``).

    Args:
        trt: the ``tensorrt`` module (default: imported).
    Returns:
        ``["edgeprune::ZonalTopKAot"]``.
    Raises:
        MissingDependencyError: ``tensorrt`` / ``tensorrt.plugin`` is not importable.
    """
    if not _DEFINED:
        trt = trt if trt is not None else require("tensorrt")
        trtp = require("tensorrt.plugin")
        _define(trtp, trt)
        _DEFINED.append(PLUGIN_ID)
        log.info("defined TensorRT AOT plugin %s (tensorrt.plugin)", PLUGIN_ID)
    return list(_DEFINED)
