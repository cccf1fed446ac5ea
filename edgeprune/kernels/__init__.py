"""Triton kernels for the fused ops ``ZonalTopK`` and ``GraphRank`` and their ahead-of-time PTX (DESIGN.md §5).

* :mod:`.zonal_topk`: GridPrune's zone allocation + per-zone Top-K, one kernel; wrapper :func:`zonal_topk`.
* :mod:`.graph_rank`: G-Prune's graph scores + Top-K, a fixed kernel sequence; wrappers :func:`graph_rank`,
  :func:`graph_rank_select`.
* :mod:`.aot`: :func:`compile_ptx` / :func:`compile_sequence`: PTX (and cubin) for sm_87 / sm_90 / sm_110
  and the TensorRT-for-RTX targets (sm 75/80/86/89/120/121) without a GPU, with the launch contract a TensorRT
  plugin needs.

Importing this package imports neither triton nor torch (house rule 4): the AOT names below load their module
on first access. The wrappers are imported from their modules (``from edgeprune.kernels.zonal_topk import
zonal_topk``; a package-level alias would collide with the module names). They run on CUDA tensors, or on CPU
tensors under the Triton interpreter when the caller set ``TRITON_INTERPRET=1`` before triton was imported.
"""

from __future__ import annotations

import importlib

_LAZY = {
    "compile_ptx": "aot",
    "compile_sequence": "aot",
    "CompiledKernel": "aot",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str):
    """Import the module that defines ``name`` on first use (PEP 562)."""
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    globals()[name] = value
    return value
