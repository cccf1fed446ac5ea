"""The manifest schema: every malformed shape is one BundleError line naming its JSON path (no ONNX needed).

The cases are the ones that ended in tracebacks before (``files`` as a list, ``prompt: {}``,
``max_positions: "abc"``, ``vision: "x"``, ``method: null``) and their relatives; the documented optional
sections (``guidance``, ``engines``, ``weights``) validate, an unknown top-level section does not.
"""

from __future__ import annotations

import copy
import json

import pytest

from edgeprune.bundle import BundleError
from edgeprune.bundle.format import MANIFEST
from edgeprune.bundle.schema import validate_manifest


@pytest.fixture(scope="module")
def good(exported):
    return json.loads((exported / MANIFEST).read_text())


def test_an_exported_manifest_validates(good):
    validate_manifest(good)


def _set(m, path, value):
    *parents, last = path.split(".")
    for key in parents:
        m = m[key]
    if value is _DELETE:
        del m[last]
    else:
        m[last] = value


_DELETE = object()


@pytest.mark.parametrize("path,value,where", [
    ("files", ["vision.onnx"], "$.files"),
    ("prompt", {}, "$.prompt"),
    ("max_positions", "abc", "$.max_positions"),
    ("vision", "x", "$.vision"),
    ("method", None, "$.method"),
    ("method.k", "16", "$.method.k"),
    ("method.positions", "sideways", "$.method.positions"),
    ("graphs.decoder.spec.inputs", "x", "$.graphs.decoder.spec.inputs"),
    ("graphs.decoder.spec.inputs.0.dtype", "complex64", "$.graphs.decoder.spec.inputs[0].dtype"),
    ("graphs.embed", _DELETE, "$.graphs"),
    ("graphs.vision.file", 3, "$.graphs.vision.file"),
    ("tokenizer.file", None, "$.tokenizer.file"),
    ("prompt.template", "no placeholder", "$.prompt.template"),
    ("files.vision.onnx", "not-a-sha", "$.files"),
    ("vision.patch_size", 0, "$.vision.patch_size"),
    ("opset", _DELETE, "$"),
    ("surprise", {}, "$"),
])
def test_malformed_manifests(good, path, value, where):
    m = copy.deepcopy(good)
    if path == "files.vision.onnx":
        m["files"]["vision.onnx"] = value
    elif path == "graphs.decoder.spec.inputs.0.dtype":
        m["graphs"]["decoder"]["spec"]["inputs"][0]["dtype"] = value
    else:
        _set(m, path, value)
    with pytest.raises(BundleError) as info:
        validate_manifest(m, "b/manifest.json")
    msg = str(info.value)
    assert msg.startswith(f"b/manifest.json: {where}") and "\n" not in msg and len(msg) < 400, msg


def test_malformed_manifest_through_the_cli(bundle, capsys):
    from edgeprune.cli import main

    bundle.edit(lambda m: m.update(max_positions="abc"))
    assert main(["run", "--bundle", str(bundle.root), "--max-new-tokens", "1"]) == 2
    err = capsys.readouterr().err
    assert "$.max_positions: 'abc' is not of type 'integer'" in err and err.count("\n") == 1


def test_optional_sections_validate(good):
    m = copy.deepcopy(good)
    m["engines"] = {"tensorrt-rtx-1.7.1.116-sm86": {
        "dir": "engines/tensorrt-rtx-1.7.1.116-sm86", "flavour": "tensorrt-rtx", "version": "1.7.1.116",
        "compute_capability": 86, "build_seconds": 3.2, "plugins": {"requested": "auto", "ops": {}},
        "graphs": {"prune": {"file": "engines/tensorrt-rtx-1.7.1.116-sm86/prune.plan", "sha256": "a" * 64,
                             "profiles": [], "plugin_layers": []}}}}
    m["weights"] = {"scheme": "int4", "bits": 4, "block_size": 32, "method": "rtn", "graphs": ["decoder"],
                    "files": ["decoder.onnx"]}
    m["graphs"]["decoder"]["weights"] = {"scheme": "int4", "block_size": 32, "method": "rtn"}
    validate_manifest(m)
    m["weights"]["scheme"] = "int3"
    with pytest.raises(BundleError, match=r"\$.weights.scheme"):
        validate_manifest(m)


def test_engine_plans_must_be_hashed_and_under_engines(bundle):
    from edgeprune.bundle import open_bundle

    plan_dir = bundle.root / "engines" / "x-1-sm86"
    plan_dir.mkdir(parents=True)
    (plan_dir / "prune.plan").write_bytes(b"plan")
    rel = "engines/x-1-sm86/prune.plan"
    engine = {"dir": "engines/x-1-sm86", "graphs": {"prune": {"file": rel, "sha256": "b" * 64}}}
    bundle.edit(lambda m: m.update(engines={"x-1-sm86": engine}))
    with pytest.raises(BundleError, match="engines.x-1-sm86.graphs.prune.file .* is not listed with its sha256"):
        open_bundle(bundle.root)
    bundle.rehash(rel)
    open_bundle(bundle.root)
    (plan_dir / "prune.plan").write_bytes(b"other plan")
    with pytest.raises(BundleError, match="prune.plan does not match its sha256"):
        open_bundle(bundle.root)
