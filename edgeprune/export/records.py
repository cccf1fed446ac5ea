"""Write each graph's export record into its ONNX files (``metadata_props``), just before the manifest.

The record (:func:`edgeprune.bundle.onnx_meta.export_record`) says what the graph was exported for: its name
and spec, the method section (name, K, N, positions, params, ...), the model dtype, and the
prompt / vision / preprocessing / max_positions sections. The graph files are hashed afterwards, so the
runtime can refuse a manifest edited to say something else (:func:`edgeprune.bundle.integrity.check_records`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping

from .._deps import require
from ..bundle.onnx_meta import RECORD_KEY, export_record


def stamp_records(root: Path, sections: Mapping[str, Any]) -> None:
    """Set :data:`RECORD_KEY` in every graph file of ``sections["graphs"]`` (main file and variants).

    A graph file reused from another bundle is a hard link to that bundle's file: it is unlinked first and
    written anew, so the other bundle is never modified. External data (``.data`` sidecars) is not touched.
    """
    onnx = require("onnx")
    for name, entry in sections["graphs"].items():
        value = json.dumps(export_record(name, entry["spec"], dict(sections)), sort_keys=True)
        for rel in [entry["file"], *[v["file"] for v in (entry.get("variants") or {}).values()]]:
            path = root / rel
            proto = onnx.load(str(path), load_external_data=False)
            kept = [p for p in proto.metadata_props if p.key != RECORD_KEY]
            del proto.metadata_props[:]
            proto.metadata_props.extend(kept)
            proto.metadata_props.add(key=RECORD_KEY, value=value)
            path.unlink()
            onnx.save(proto, str(path))
