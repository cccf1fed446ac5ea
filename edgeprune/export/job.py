"""``GraphJob``: one graph to export, with its wrapper, spec, export example and validation feeds.

Its own module so that the planners (:mod:`~edgeprune.export.graphs`, :mod:`~edgeprune.export.method_graphs`)
and the driver (:mod:`~edgeprune.export.exporter`) import it downwards, without an import circle.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from ..bundle.spec import GraphSpec


@dataclass
class GraphJob:
    """One graph to export: the wrapper, its spec, the export example and the validation feeds.

    Attributes:
        module: the PyTorch wrapper traced by the exporter, or (with ``build``) the PyTorch reference the
            hand-built graph is validated against.
        build: ``build(opset) -> onnx.ModelProto`` for graphs written op by op (the fused-op prune graphs).
        mins / maxs: bounds of symbolic dimensions for ``torch.export``.
        meta: extra fields recorded in the graph's manifest entry.
        llm: the HF decoder stack the traced graph runs: exported with eager attention below opset 23 and, with
            ``ort_variant``, also at opset 23 as ``<name>.ort.onnx`` (see :mod:`~edgeprune.export.ort_variant`).
    """

    name: str
    module: Any
    spec: GraphSpec
    example: dict[str, np.ndarray]
    checks: list[dict[str, np.ndarray]]
    var_inputs: int = 0
    mins: dict[str, int] = field(default_factory=dict)
    maxs: dict[str, int] = field(default_factory=dict)
    build: Callable[[int], Any] | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    llm: Any = None
