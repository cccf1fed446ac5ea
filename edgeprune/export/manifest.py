"""The bundle format (DESIGN.md §4 "Bundle"): ``manifest.json`` plus graphs, tokenizer and host-side data.

A bundle is a directory::

    manifest.json            format + version, model, method, K/N, graphs (spec, files), preprocessing,
                             prompt, tokenizer, vision geometry, library versions, opset, sha256 of every file
    vision.onnx(.data)       CLIP + projector (+ CLIP-space patch embeddings for GridPrune with CLIP guidance)
    guidance.onnx(.data)     GridPrune with CLIP guidance: the CLIP text tower
    prune.onnx(.data)        pre-LLM methods with a budget (GridPrune/G-Prune: a fused edgeprune-domain node)
    embed.onnx(.data)        the LLM's token embedding
    prefill.onnx(.data)      in-LLM methods (FastV, FitPrune): prefill with in-graph drops, ragged presents
    decoder.onnx(.data)      decode (pre-LLM methods: prefill and decode; in-LLM: decode over the ragged cache)
    decoder.ort.onnx         the same decoder at opset 23 (fused Attention) for ONNX Runtime, reading
                             decoder.onnx.data (also prefill.ort.onnx); absent with --no-ort-variant or opset 23
    tokenizer.json ...       the tokenizer as written by ``save_pretrained`` (the runtime reads tokenizer.json)
    clip_tokenizer/          GridPrune with CLIP guidance: the CLIP tokenizer
    image_newline.npy        LLaVA-NeXT only: the newline embedding the host splices after every grid row

This module owns the schema constants, hashing and writing; :mod:`edgeprune.runtime.bundle` reads and verifies.
It imports no torch, so the runtime can import it.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Mapping

from ..errors import EdgepruneError

FORMAT = "edgeprune-bundle"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
NEWLINE_FILE = "image_newline.npy"
TOKENIZER_FILE = "tokenizer.json"
CLIP_TOKENIZER_DIR = "clip_tokenizer"  # GridPrune with CLIP guidance: the CLIP text tower's tokenizer
# The top-level manifest sections every reader may rely on (checked when a bundle is opened).
REQUIRED = ("format", "format_version", "model", "method", "graphs", "preprocessing", "prompt", "tokenizer",
            "vision", "max_positions", "opset", "libraries", "files")
_LIBRARIES = ("edgeprune", "torch", "transformers", "onnx", "onnxscript", "onnxruntime", "tokenizers", "numpy")


class ExportError(EdgepruneError):
    """An export cannot be done as asked (unsupported method/model/opset, existing output, failed validation)."""


def sha256_file(path: str | os.PathLike[str], chunk: int = 1 << 22) -> str:
    """Hex sha256 of a file, read in 4 MiB chunks (bundles of 7B models hold multi-GB sidecars)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def bundle_files(root: str | os.PathLike[str]) -> list[str]:
    """Every file under ``root`` except the manifest, as sorted POSIX paths relative to ``root``."""
    base = Path(root)
    return sorted(p.relative_to(base).as_posix() for p in base.rglob("*")
                  if p.is_file() and p != base / MANIFEST)


def file_hashes(root: str | os.PathLike[str]) -> dict[str, str]:
    """``{relative path: sha256}`` of every file of the bundle (see :func:`bundle_files`)."""
    return {rel: sha256_file(Path(root) / rel) for rel in bundle_files(root)}


def library_versions() -> dict[str, str | None]:
    """Installed versions of the libraries that shape the graphs (None when one is not installed)."""
    from .._deps import package_versions

    return package_versions(_LIBRARIES)


def write_manifest(root: str | os.PathLike[str], sections: Mapping[str, Any]) -> dict[str, Any]:
    """Complete and write ``manifest.json``: format fields, library versions and the sha256 of every file.

    Call it last, when every other file of the bundle is in place.

    Args:
        root: the (temporary) bundle directory.
        sections: the content sections (model, method, graphs, preprocessing, prompt, tokenizer, vision,
            max_positions, opset).
    Returns:
        The manifest as written.
    Raises:
        ExportError: a required section is missing (a bug in the exporter, reported clearly).
    """
    manifest = {"format": FORMAT, "format_version": FORMAT_VERSION, **dict(sections),
                "libraries": library_versions(), "files": file_hashes(root)}
    missing = [k for k in REQUIRED if k not in manifest]
    if missing:
        raise ExportError(f"internal error: manifest sections {missing} are missing")
    with open(Path(root) / MANIFEST, "w") as f:
        json.dump(manifest, f, indent=2, sort_keys=False)
        f.write("\n")
    return manifest
