"""What an ONNX file says about itself, read without onnx or onnxruntime: its export record and external data.

The exporter writes into every graph file (``ModelProto.metadata_props``, key :data:`RECORD_KEY`) a JSON record
of what the graph was exported for: the graph name and spec, the method section (name, K, N, positions,
params, ...), the model dtype, and the host sections the graph's numbers depend on (prompt,
vision, preprocessing, max_positions). The graph files are hashed in the manifest, so editing the manifest
alone (``method.name``, ``positions``, ...) no longer changes what runs silently: :mod:`edgeprune.bundle.reader`
compares the two on open.

A minimal protobuf walker (wire format only: varints and length-delimited fields) reads the two things the
reader needs, skipping everything else by its length: the model's ``metadata_props`` (field 14) and the
``location`` of every external initializer (graph field 7 -> initializer 5 -> external_data 13), so that a graph
cannot make ONNX Runtime read a file outside the bundle or one the manifest does not hash.
"""

from __future__ import annotations

import json
import mmap
from pathlib import Path
from typing import Any, Iterator

RECORD_KEY = "edgeprune.built_for"
# The manifest sections every record repeats (besides the graph's own name and spec).
RECORD_SECTIONS = ("method", "prompt", "vision", "preprocessing", "max_positions")
# The model's dtype (what the graphs compute in). Not its weights fingerprint: that is where the weights came
# from, which ``--reuse`` and ``compare`` check against a real model, and which the graphs' hashes already pin.
RECORD_MODEL_KEYS = ("dtype",)


class OnnxFormatError(ValueError):
    """The bytes are not a well-formed protobuf message."""


def export_record(graph: str, spec: dict[str, Any], sections: dict[str, Any]) -> dict[str, Any]:
    """The record the exporter stores in ``graph``'s ONNX files (see the module docstring).

    Args:
        graph: the graph name; spec: its spec as in the manifest; sections: the manifest sections.
    """
    model = sections.get("model") or {}
    return {"graph": graph, "spec": spec, "model": {k: model.get(k) for k in RECORD_MODEL_KEYS},
            **{k: sections.get(k) for k in RECORD_SECTIONS}}


def _varint(buf: Any, pos: int, end: int) -> tuple[int, int]:
    shift = value = 0
    while True:
        if pos >= end or shift > 63:
            raise OnnxFormatError("truncated varint")
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, pos
        shift += 7


def _fields(buf: Any, start: int, end: int) -> Iterator[tuple[int, int, int]]:
    """(field number, start, end) of every length-delimited field in ``buf[start:end]``; others are skipped."""
    pos = start
    while pos < end:
        tag, pos = _varint(buf, pos, end)
        kind = tag & 7
        if kind == 0:
            _, pos = _varint(buf, pos, end)
        elif kind == 1:
            pos += 8
        elif kind == 5:
            pos += 4
        elif kind == 2:
            length, pos = _varint(buf, pos, end)
            if pos + length > end:
                raise OnnxFormatError("a field runs past the end of its message")
            yield tag >> 3, pos, pos + length
            pos += length
        else:
            raise OnnxFormatError(f"unsupported wire type {kind}")
    if pos != end:
        raise OnnxFormatError("a fixed-size field runs past the end of its message")


def _entry(buf: Any, start: int, end: int) -> tuple[str, str]:
    """A ``StringStringEntryProto`` (key = 1, value = 2)."""
    key = value = ""
    for field, a, b in _fields(buf, start, end):
        if field == 1:
            key = bytes(buf[a:b]).decode("utf-8", "replace")
        elif field == 2:
            value = bytes(buf[a:b]).decode("utf-8", "replace")
    return key, value


def read_onnx_facts(path: Path) -> tuple[dict[str, str], list[str]]:
    """The ``metadata_props`` of an ONNX model file and the external-data locations of its initializers.

    Raises:
        OSError: the file cannot be read. OnnxFormatError: it is not a protobuf message.
    """
    with open(path, "rb") as f:
        if f.seek(0, 2) == 0:
            raise OnnxFormatError("the file is empty")
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            meta: dict[str, str] = {}
            locations: list[str] = []
            for field, a, b in _fields(buf, 0, len(buf)):
                if field == 14:
                    key, value = _entry(buf, a, b)
                    meta[key] = value
                elif field == 7:
                    for gfield, ga, gb in _fields(buf, a, b):
                        if gfield == 5:  # TensorProto initializer: external_data = 13
                            locations += [v for f13, ta, tb in _fields(buf, ga, gb) if f13 == 13
                                          for k, v in [_entry(buf, ta, tb)] if k == "location"]
            return meta, locations


def parse_record(meta: dict[str, str]) -> dict[str, Any] | None:
    """The export record in ``meta`` (None when absent or not a JSON object)."""
    raw = meta.get(RECORD_KEY)
    if raw is None:
        return None
    try:
        record = json.loads(raw)
    except json.JSONDecodeError:
        return None
    return record if isinstance(record, dict) else None
