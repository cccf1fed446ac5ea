"""Writing ``manifest.json``: format fields, library versions, the sha256 of every file; atomically.

The exporter calls :func:`write_manifest` last, when every other file of the bundle is in place. The file is
written to a temporary name, flushed to disk and renamed over ``manifest.json``, so a reader never sees half a
manifest. What a manifest may contain is :mod:`edgeprune.bundle.schema`; reading is :mod:`edgeprune.bundle.reader`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Mapping

from ..errors import ExportError
from .format import FORMAT, FORMAT_VERSION, MANIFEST, REQUIRED, file_hashes

_LIBRARIES = ("edgeprune", "torch", "transformers", "onnx", "onnxscript", "onnxruntime", "tokenizers", "numpy")


def library_versions() -> dict[str, str | None]:
    """Installed versions of the libraries that shape the graphs (None when one is not installed)."""
    from .._deps import package_versions

    return package_versions(_LIBRARIES)


def write_json_atomic(path: Path, data: Any) -> None:
    """Write ``data`` as indented JSON to ``path`` through a temporary file, fsync and rename."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w") as f:
        json.dump(data, f, indent=2, sort_keys=False)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_manifest(root: str | os.PathLike[str], sections: Mapping[str, Any]) -> dict[str, Any]:
    """Complete and write ``manifest.json``: format fields, library versions and the sha256 of every file.

    Args:
        root: the (temporary) bundle directory.
        sections: the content sections (model, method, graphs, preprocessing, prompt, tokenizer, vision,
            max_positions, opset, and the optional ones of :mod:`edgeprune.bundle.schema`).
    Returns:
        The manifest as written.
    Raises:
        ExportError: a required section is missing or the manifest fails its schema (a bug in the exporter,
            reported clearly).
    """
    manifest = {"format": FORMAT, "format_version": FORMAT_VERSION, **dict(sections),
                "libraries": library_versions(), "files": file_hashes(root)}
    missing = [k for k in REQUIRED if k not in manifest]
    if missing:
        raise ExportError(f"internal error: manifest sections {missing} are missing")
    write_json_atomic(Path(root) / MANIFEST, manifest)
    return manifest
