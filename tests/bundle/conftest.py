"""The session's tiny-llava cls-topk bundle (K = 64, tests/conftest.py's ``exported_bundle``), copied per test."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any, Callable

import pytest

from edgeprune.bundle.format import MANIFEST, sha256_file


@pytest.fixture(scope="session")
def exported(exported_bundle, tiny_llava) -> Path:
    """Shared with the other test modules: never modify it (the ``bundle`` fixture gives a private copy)."""
    return exported_bundle(tiny_llava, "cls-topk", 64)


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
