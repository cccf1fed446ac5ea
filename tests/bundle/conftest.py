"""One exported bundle for the bundle tests (cls-topk, K = 16, no fused-attention variant), copied per test."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any, Callable

import pytest

from edgeprune.bundle.format import MANIFEST, sha256_file


@pytest.fixture(scope="session")
def exported(tmp_path_factory, tiny_llava) -> Path:
    from edgeprune.export.exporter import export_bundle

    out = tmp_path_factory.mktemp("bundle-src") / "b"
    export_bundle(tiny_llava, "cls-topk", out_dir=out, tokens=16, ort_variant=False, log=lambda msg: None)
    return out


class Copy:
    """A private copy of the exported bundle with helpers to edit it as an attacker or a careless user would."""

    def __init__(self, root: Path) -> None:
        self.root = root

    @property
    def manifest(self) -> dict[str, Any]:
        return json.loads((self.root / MANIFEST).read_text())

    def edit(self, change: Callable[[dict[str, Any]], Any]) -> None:
        m = self.manifest
        change(m)
        (self.root / MANIFEST).write_text(json.dumps(m))

    def rehash(self, *rels: str) -> None:
        """Record the current sha256 of ``rels`` (a consistent edit: only the export record can catch it)."""
        self.edit(lambda m: m["files"].update({rel: sha256_file(self.root / rel) for rel in rels}))


@pytest.fixture
def bundle(exported, tmp_path) -> Copy:
    dst = tmp_path / "bundle"
    shutil.copytree(exported, dst)
    return Copy(dst)
