"""The checks that make a bundle safe to open: confinement, hashes, and what each graph was exported for.

One validation layer, run by :func:`edgeprune.bundle.reader.open_bundle` after the schema:

1. **Confinement** (:func:`check_confined`): every entry of ``files`` is a relative path without ``..`` that
   resolves inside the bundle root, symlinks included; every path any reader opens (graph files and sidecars,
   variants, the tokenizer files, the CLIP tokenizer, the newline embedding, quantized-weight files, engine
   plans) is one of those entries, so it is hashed. Anything else is refused naming the entry.
2. **Hashes** (:func:`verify_files`): every listed file exists, is readable, and has its recorded sha256.
3. **Export records** (:func:`check_records`): every graph file carries the record the exporter wrote
   (:mod:`edgeprune.bundle.onnx_meta`); the manifest's method, prompt, vision, preprocessing and
   max_positions, the graph's spec and the model dtype must equal it, and the graph's external data must
   be hashed files of the bundle.

What this protects against and what not (``docs/bundle-format.md``): sha256 detects edits, truncation and
corruption of any file and any edit of the manifest that contradicts the graphs; it does not authenticate the
author (there are no signatures): whoever rewrites files, records and hashes consistently makes a valid bundle.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterator, Mapping

from ..errors import BundleError
from .format import MANIFEST, REEXPORT, member_path, sha256_file
from .onnx_meta import OnnxFormatError, export_record, parse_record, read_onnx_facts


def referenced_files(manifest: Mapping[str, Any]) -> Iterator[tuple[str, str]]:
    """Every path a reader of the bundle may open, as (JSON path of the field, relative path)."""
    for name, entry in manifest["graphs"].items():
        yield f"graphs.{name}.file", entry["file"]
        for i, rel in enumerate(entry.get("files") or []):
            yield f"graphs.{name}.files[{i}]", rel
        for key, variant in (entry.get("variants") or {}).items():
            yield f"graphs.{name}.variants.{key}.file", variant["file"]
            for i, rel in enumerate(variant.get("data_files") or []):
                yield f"graphs.{name}.variants.{key}.data_files[{i}]", rel
    tok = manifest["tokenizer"]
    yield "tokenizer.file", tok["file"]
    for i, rel in enumerate(tok.get("files") or []):
        yield f"tokenizer.files[{i}]", rel
    guidance = manifest.get("guidance") or {}
    if guidance.get("tokenizer") is not None:
        yield "guidance.tokenizer", guidance["tokenizer"]
    if manifest["vision"].get("newline_file"):
        yield "vision.newline_file", manifest["vision"]["newline_file"]
    for i, rel in enumerate((manifest.get("weights") or {}).get("files") or []):
        yield f"weights.files[{i}]", rel
    for key, engine in (manifest.get("engines") or {}).items():
        for graph, plan in engine["graphs"].items():
            yield f"engines.{key}.graphs.{graph}.file", plan["file"]


def check_confined(root: Path, manifest: Mapping[str, Any]) -> None:
    """Confinement (rule 1 of the module docstring), without reading any file.

    Raises:
        BundleError: names the offending entry.
    """
    files = manifest["files"]
    for rel in files:
        member_path(root, rel, f"files[{rel!r}]")
    for where, rel in referenced_files(manifest):
        member_path(root, rel, where)
        if rel not in files:
            raise BundleError(f"{root / MANIFEST}: {where} = {rel!r} is not listed with its sha256 in files; a "
                              f"bundle opens only hashed files. Refusing to open it; {REEXPORT}")
        if where.startswith("engines.") and not rel.startswith("engines/"):
            raise BundleError(f"{root / MANIFEST}: {where} = {rel!r} is not under engines/; {REEXPORT}")


def verify_files(root: Path, files: Mapping[str, str]) -> None:
    """Check that every file the manifest lists exists, is readable and has its recorded sha256.

    Raises:
        BundleError: names the first missing, unreadable or modified file.
    """
    for rel, digest in files.items():
        path = root / rel
        if not path.is_file():
            raise BundleError(f"bundle {str(root)!r} is incomplete: {rel} is missing; copy the whole directory "
                              f"or {REEXPORT}")
        try:
            got = sha256_file(path)
        except OSError as exc:
            raise BundleError(f"bundle {str(root)!r}: cannot read {rel} ({exc.strerror or exc}); check its "
                              "permissions (the user running edgeprune must be able to read every file)") from None
        if got != digest:
            raise BundleError(f"bundle {str(root)!r} is corrupt: {rel} does not match its sha256 in {MANIFEST} "
                              f"(modified or truncated); {REEXPORT}")


def _first_difference(want: Any, got: Any, where: str) -> tuple[str, Any, Any] | None:
    """The first JSON path where ``got`` differs from ``want`` (dicts compared key by key)."""
    if isinstance(want, dict) and isinstance(got, dict):
        for key in sorted(set(want) | set(got), key=str):
            diff = _first_difference(want.get(key), got.get(key), f"{where}.{key}")
            if diff:
                return diff
        return None
    return None if want == got else (where, want, got)


def _graph_files(entry: Mapping[str, Any]) -> list[str]:
    return [entry["file"], *[v["file"] for v in (entry.get("variants") or {}).values()]]


def check_records(root: Path, manifest: Mapping[str, Any]) -> None:
    """Export records (rule 3 of the module docstring) of every graph file.

    Raises:
        BundleError: a graph file that is unreadable or not ONNX, has no record, disagrees with the manifest
            (names the field, the manifest's value and the exported one), or reads unhashed external data.
    """
    files = manifest["files"]
    for name, entry in manifest["graphs"].items():
        hashed_here = set(entry.get("files") or []) & set(files)
        want_sections = export_record(name, entry["spec"], dict(manifest))
        for rel in _graph_files(entry):
            try:
                meta, locations = read_onnx_facts(root / rel)
            except OSError as exc:
                raise BundleError(f"bundle {str(root)!r}: cannot read {rel} ({exc.strerror or exc}); check its "
                                  "permissions") from None
            except OnnxFormatError as exc:
                raise BundleError(f"bundle {str(root)!r}: {rel} is not a valid ONNX file ({exc}); {REEXPORT}") from None
            record = parse_record(meta)
            if record is None:
                raise BundleError(f"bundle {str(root)!r}: {rel} carries no edgeprune export record (exported by an "
                                  f"older edgeprune, or not by edgeprune); {REEXPORT}")
            diff = _first_difference(record, want_sections, "")
            if diff:
                field, exported, listed = diff
                field = field.lstrip(".")
                shown = f"graphs.{name}.spec" if field.startswith("spec") else \
                    f"graphs.{name} (graph name)" if field == "graph" else field
                raise BundleError(f"{root / MANIFEST}: {shown} is {json.dumps(listed)[:120]} but {rel} was exported "
                                  f"for {json.dumps(exported)[:120]}; the manifest was edited. Restore it or {REEXPORT}")
            for loc in locations:
                if loc not in hashed_here:
                    member_path(root, loc, f"the external data of {rel}")
                    raise BundleError(f"bundle {str(root)!r}: {rel} reads external data {loc!r}, which is not one "
                                      f"of the hashed files of graph {name}; {REEXPORT}")

