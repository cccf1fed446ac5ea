"""A bundle is untrusted input: every attack or mistake class is refused with one clean BundleError line.

Each test edits a private copy of one exported bundle (conftest) the way an attacker or a careless user would:
paths outside the bundle (``..``, absolute, symlinks, external data), unhashed files, manifest edits that
contradict the graphs (method name, positions, K, params), malformed manifests, unreadable files and a broken
tokenizer. On the main branch before the bundle/ package these opened (exit 0) or ended in tracebacks.
"""

from __future__ import annotations

import builtins
import json
import os

import pytest

from edgeprune.bundle import BundleError, open_bundle
from edgeprune.bundle import format as F
from edgeprune.bundle.format import MANIFEST, sha256_file


def refused(root, match, capsys=None):
    """open_bundle raises a BundleError matching ``match``; with capsys also `edgeprune run` prints one line."""
    with pytest.raises(BundleError, match=match) as info:
        open_bundle(root)
    assert "\n" not in str(info.value)
    if capsys is not None:
        from edgeprune.cli import main

        assert main(["run", "--bundle", str(root), "--max-new-tokens", "1"]) == 2
        err = capsys.readouterr().err
        assert "error: " in err and err.count("\n") == 1 and "Traceback" not in err
    return str(info.value)


def test_the_exported_bundle_opens(bundle):
    b = open_bundle(bundle.root)
    assert set(b.graphs) == {"vision", "prune", "embed", "decoder"} and b.k == 64


# ------------------------------------------------------------------------------------------------ confinement
def test_path_traversal_in_files(bundle, tmp_path, capsys):
    outside = tmp_path / "secret.txt"
    outside.write_text("secret")
    bundle.edit(lambda m: m["files"].update({"../secret.txt": sha256_file(outside)}))
    msg = refused(bundle.root, r"files\['../secret.txt'\]", capsys)
    assert "leaves the bundle" in msg


def test_absolute_path_in_files(bundle):
    bundle.edit(lambda m: m["files"].update({"/etc/hostname": "0" * 64}))
    assert "is absolute" in refused(bundle.root, "/etc/hostname")


def test_graph_file_in_another_directory(bundle, tmp_path):
    other = tmp_path / "other"
    other.mkdir()
    (other / "vision.onnx").write_bytes((bundle.root / "vision.onnx").read_bytes())
    bundle.edit(lambda m: m["graphs"]["vision"].update(file="../other/vision.onnx"))
    refused(bundle.root, r"graphs.vision.file = '../other/vision.onnx' leaves the bundle")


def test_symlink_escape(bundle, tmp_path):
    outside = tmp_path / "tokenizer.json"
    outside.write_bytes((bundle.root / "tokenizer.json").read_bytes())  # same bytes: the hash alone would pass
    (bundle.root / "tokenizer.json").unlink()
    os.symlink(outside, bundle.root / "tokenizer.json")
    assert "symlink escape" in refused(bundle.root, "tokenizer.json")


def test_symlink_inside_the_bundle_is_fine(bundle):
    (bundle.root / "tok-real.json").write_bytes((bundle.root / "tokenizer.json").read_bytes())
    (bundle.root / "tokenizer.json").unlink()
    os.symlink("tok-real.json", bundle.root / "tokenizer.json")
    open_bundle(bundle.root)


def test_unhashed_tokenizer(bundle, capsys):
    (bundle.root / "evil.json").write_bytes((bundle.root / "tokenizer.json").read_bytes())
    bundle.edit(lambda m: m["tokenizer"].update(file="evil.json"))
    refused(bundle.root, "tokenizer.file = 'evil.json' is not listed with its sha256 in files", capsys)


def test_tokenizer_and_sidecars_are_hashed(bundle):
    with open(bundle.root / "tokenizer.json", "a") as f:
        f.write(" ")
    refused(bundle.root, "tokenizer.json does not match its sha256")
    bundle.rehash("tokenizer.json")
    with open(bundle.root / "tokenizer_config.json", "a") as f:
        f.write(" ")
    refused(bundle.root, "tokenizer_config.json does not match its sha256")


def test_external_data_outside_the_bundle(bundle, tmp_path):
    onnx = pytest.importorskip("onnx")
    path = bundle.root / "embed.onnx"
    proto = onnx.load(str(path), load_external_data=False)
    init = next(t for t in proto.graph.initializer if t.external_data)
    next(e for e in init.external_data if e.key == "location").value = "../elsewhere.data"
    onnx.save(proto, str(path))
    bundle.rehash("embed.onnx")
    refused(bundle.root, "the external data of embed.onnx = '../elsewhere.data' leaves the bundle")


# ------------------------------------------------------------------------------------------------ export records
@pytest.mark.parametrize("field,value,match", [
    ("name", "uniform", r"method.name is \"uniform\" but vision.onnx was exported for \"cls-topk\""),
    ("positions", "original", r"method.positions is \"original\" but vision.onnx was exported for \"compact\""),
    ("params", {"positions": "original"}, r"method.params.positions is \"original\""),
    ("n", 144, r"method.n is 144"),
])
def test_method_edits_are_refused(bundle, capsys, field, value, match):
    bundle.edit(lambda m: m["method"].update({field: value}))
    refused(bundle.root, match, capsys)


def test_k_edit_with_a_matching_spec_edit_is_refused(bundle):
    def change(m):
        m["method"]["k"] = 8
        for t in m["graphs"]["prune"]["spec"]["outputs"]:
            t["dims"][1] = 8

    bundle.edit(change)
    refused(bundle.root, "method.k is 8 but vision.onnx was exported for 64")
    bundle.edit(lambda m: m["method"].update(k=64))
    refused(bundle.root, "graphs.prune.spec is .* but prune.onnx was exported for")


def test_prompt_and_max_positions_edits_are_refused(bundle):
    bundle.edit(lambda m: m.update(max_positions=64))
    refused(bundle.root, "max_positions is 64")


def test_swapped_graph_files_are_refused(bundle):
    def change(m):
        g = m["graphs"]
        g["embed"]["file"], g["vision"]["file"] = g["vision"]["file"], g["embed"]["file"]

    bundle.edit(change)
    refused(bundle.root, "was exported for")


def test_graph_file_without_record(bundle):
    onnx = pytest.importorskip("onnx")
    path = bundle.root / "prune.onnx"
    proto = onnx.load(str(path))
    del proto.metadata_props[:]
    onnx.save(proto, str(path))
    bundle.rehash("prune.onnx")
    refused(bundle.root, "prune.onnx carries no edgeprune export record")


def test_not_onnx(bundle):
    (bundle.root / "prune.onnx").write_bytes(b"\xff" * 10)
    bundle.rehash("prune.onnx")
    refused(bundle.root, "prune.onnx is not a valid ONNX file")


# ------------------------------------------------------------------------------------------------ unreadable files
def test_unreadable_file(bundle, monkeypatch, capsys):
    """chmod 000 (or, as root, which reads anyway, an open() that fails as it would) is one clean line."""
    target = str(bundle.root / "embed.onnx.data")
    if os.geteuid() != 0:
        os.chmod(target, 0)
    else:
        real = builtins.open

        def deny(path, *args, **kwargs):
            if str(path) == target:
                raise PermissionError(13, "Permission denied", target)
            return real(path, *args, **kwargs)

        monkeypatch.setattr(F, "open", deny, raising=False)
    refused(bundle.root, "cannot read embed.onnx.data \\(Permission denied\\); check its permissions", capsys)


def test_unreadable_manifest(bundle, monkeypatch):
    from pathlib import Path

    real = Path.read_text

    def deny(self, *args, **kwargs):
        if self.name == MANIFEST:
            raise PermissionError(13, "Permission denied", str(self))
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Path, "read_text", deny)
    refused(bundle.root, "cannot read .*manifest.json \\(Permission denied\\)")


def test_broken_tokenizer(bundle, capsys):
    from edgeprune.runtime.ort_backend import OrtBackend

    (bundle.root / "tokenizer.json").write_text('{"model": {"type": "nonsense"}}')
    bundle.rehash("tokenizer.json")  # consistently broken: the hash passes, loading must not traceback
    with pytest.raises(BundleError, match="cannot load the tokenizer .*tokenizer.json"):
        OrtBackend(bundle.root)
    from edgeprune.cli import main

    assert main(["run", "--bundle", str(bundle.root), "--max-new-tokens", "1"]) == 2
    err = capsys.readouterr().err
    assert "cannot load the tokenizer" in err and err.count("\n") == 1


def test_bundle_path_refuses_unlisted_files(bundle):
    b = open_bundle(bundle.root)
    assert b.path("tokenizer.json") == bundle.root / "tokenizer.json"
    with pytest.raises(BundleError, match="not one of the bundle's hashed files"):
        b.path("../../etc/passwd")


def test_manifest_json_is_refused_before_hashing(bundle):
    (bundle.root / MANIFEST).write_text(json.dumps([1, 2]))
    refused(bundle.root, "is not an edgeprune bundle manifest")
