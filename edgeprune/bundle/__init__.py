"""The bundle format, one low-floor package: ``export/`` writes through it, ``runtime/`` reads through it.

- :mod:`~edgeprune.bundle.format`: file names, format version, hashing and path confinement (stdlib only).
- :mod:`~edgeprune.bundle.spec`: :class:`GraphSpec` / :class:`TensorSpec`, the graph boundaries (numpy).
- :mod:`~edgeprune.bundle.manifest`: writing ``manifest.json`` atomically.
- :mod:`~edgeprune.bundle.reader`: :func:`open_bundle` -> :class:`Bundle` (verified), :class:`GraphEntry`.

It imports numpy and the standard library only (no torch, no onnx, no onnxruntime). See
``docs/bundle-format.md`` for the layout, the manifest sections and what the integrity check protects against.
"""

from __future__ import annotations

from ..errors import BundleError
from .reader import Bundle, GraphEntry, open_bundle
from .spec import GraphSpec, TensorSpec

__all__ = ["Bundle", "BundleError", "GraphEntry", "GraphSpec", "TensorSpec", "open_bundle"]
