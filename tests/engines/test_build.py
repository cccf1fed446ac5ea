"""``edgeprune build`` library: TensorRT-RTX builds on this CPU of tiny-llava GridPrune and G-Prune bundles with
our plugins registered (plugin layers in the plans), the manifest's engine records, atomicity (an interrupted
build or manifest write leaves the previous state), ``--force``, the refusal of bad flags before any build, and
the trt backend's refusal of engine sets built for another TensorRT, GPU or plugin mode.

Builds use optimisation level 0; each bundle is exported once per session (shared names with the other test
files) and copied before a build writes into it.
"""

from __future__ import annotations

import json
import shutil

import pytest

from edgeprune.bundle import open_bundle
from edgeprune.bundle.format import MANIFEST
from edgeprune.engines import build as B
from edgeprune.errors import BackendError

pytest.importorskip("tensorrt_rtx_bindings")
NO_GPU = lambda: None  # noqa: E731 - the device seam: build as on a machine without a GPU


@pytest.fixture(scope="module")
def built(tmp_path_factory, tiny_llava, exported_bundle):
    """method -> (a copy of its bundle with one engine set, the record), built once with --plugins auto."""
    out = {}
    for method in ("gridprune", "gprune"):
        root = tmp_path_factory.mktemp(f"build-{method}") / "bundle"
        shutil.copytree(exported_bundle(tiny_llava, method, 64), root)  # the session's (tests/conftest.py)
        out[method] = root, B.build_bundle(B.BuildRequest(bundle=root, opt_level=0), log_line=lambda m: None,
                                           device_cc=NO_GPU)
    return out


@pytest.mark.parametrize("method,op", [("gridprune", "ZonalTopK"), ("gprune", "GraphRank")])
def test_build_records_engines_with_plugin_layers(built, method, op):
    root, rec = built[method]
    key = B.engine_key("tensorrt-rtx", rec["version"], 86)
    manifest = json.loads((root / MANIFEST).read_text())
    assert manifest["engines"][key] == rec and rec["dir"] == f"engines/{key}"
    assert rec["flavour"] == "tensorrt-rtx" and rec["compute_capability"] == B.DEFAULT_RTX_SM
    assert rec["precision"] == "fp32" and rec["strongly_typed"] is True and rec["opt_level"] == 0
    assert rec["plugins"]["requested"] == "auto"
    assert rec["plugins"]["ops"][op]["mode"] == "ipluginv3" and rec["plugins"]["ops"][op]["reason"]
    bundle = open_bundle(root)  # verifies every file, the plans included (they are listed in files)
    assert set(rec["graphs"]) == set(bundle.graphs)
    for name, g in rec["graphs"].items():
        assert manifest["files"][g["file"]] == g["sha256"] and (root / g["file"]).stat().st_size == g["bytes"]
    assert rec["graphs"]["prune"]["plugin_layers"] and op in rec["graphs"]["prune"]["plugin_layers"][0]
    assert all(not g["plugin_layers"] for n, g in rec["graphs"].items() if n != "prune")
    assert op.encode() in (root / rec["graphs"]["prune"]["file"]).read_bytes()  # the plan holds the plugin
    assert len(rec["graphs"]["decoder"]["profiles"]) == 2  # prefill and decode
    assert not [p for p in (root / "engines").iterdir() if p.name.startswith(".")]  # no temp or old dirs


def test_existing_set_refused_then_replaced_with_force(built):
    root, rec = built["gprune"]
    before = (root / MANIFEST).read_text()
    with pytest.raises(B.BuildError, match="already has the engine set .* --force"):
        B.build_bundle(B.BuildRequest(bundle=root, opt_level=0), log_line=lambda m: None, device_cc=NO_GPU)
    assert (root / MANIFEST).read_text() == before
    new = B.build_bundle(B.BuildRequest(bundle=root, opt_level=1, force=True), log_line=lambda m: None,
                         device_cc=NO_GPU)
    assert new["opt_level"] == 1 and new["built_at"] >= rec["built_at"]
    manifest = json.loads((root / MANIFEST).read_text())
    assert list(manifest["engines"]) == [B.engine_key("tensorrt-rtx", rec["version"], 86)]
    open_bundle(root)  # the new hashes are the plans' hashes
    built["gprune"] = root, new


def test_interrupted_build_leaves_previous_state(built, monkeypatch):
    root, rec = built["gridprune"]
    manifest, plans = (root / MANIFEST).read_bytes(), {g: (root / r["file"]).read_bytes()
                                                        for g, r in rec["graphs"].items()}
    real, calls = B.build_engine, []

    def flaky(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt  # an interrupt in the middle of the set
        return real(*args, **kwargs)

    monkeypatch.setattr(B, "build_engine", flaky)
    with pytest.raises(KeyboardInterrupt):
        B.build_bundle(B.BuildRequest(bundle=root, opt_level=0, force=True), log_line=lambda m: None,
                       device_cc=NO_GPU)
    monkeypatch.setattr(B, "build_engine", real)

    def broken_write(path, doc):
        raise OSError("disk full")

    monkeypatch.setattr(B, "write_json_atomic", broken_write)  # every plan built, the manifest write fails
    with pytest.raises(OSError, match="disk full"):
        B.build_bundle(B.BuildRequest(bundle=root, opt_level=0, force=True), log_line=lambda m: None,
                       device_cc=NO_GPU)
    assert (root / MANIFEST).read_bytes() == manifest
    assert {g: (root / r["file"]).read_bytes() for g, r in rec["graphs"].items()} == plans
    assert [p.name for p in (root / "engines").iterdir()] == [rec["dir"].split("/")[1]]


def test_timing_cache_and_explicit_target(tmp_path, tiny_llava, exported_bundle):
    root = tmp_path / "b"
    shutil.copytree(exported_bundle(tiny_llava, "gprune", 64), root)
    cache = tmp_path / "timing.cache"
    rec = B.build_bundle(B.BuildRequest(bundle=root, opt_level=0, sm=89, timing_cache=cache, plugins="none"),
                         log_line=lambda m: None, device_cc=NO_GPU)
    assert rec["compute_capability"] == 89 and rec["dir"].endswith("-sm89") and cache.is_file()
    assert rec["plugins"]["ops"]["GraphRank"]["mode"] == "none"


@pytest.mark.parametrize("change,match", [
    ({"precision": "fp8"}, "--precision must be one of"), ({"plugins": "jit"}, "--plugins must be one of"),
    ({"workspace_mb": 0}, "--workspace-mb must be a positive"), ({"opt_level": 6}, "--opt-level must be between"),
    ({"flavour": "trt"}, "--flavour must be one of"), ({"sm": -1}, "--sm takes"),
    ({"timing_cache": "/nonexistent/dir/cache"}, "--timing-cache"),
])
def test_bad_flags_refused_before_anything(tmp_path, change, match):
    (tmp_path / MANIFEST).write_text("{}")
    req = B.BuildRequest(bundle=tmp_path, **{k: (B.Path(v) if k == "timing_cache" else v) for k, v in change.items()})
    with pytest.raises(B.BuildError, match=match):
        B.check_request(req)
    assert not (tmp_path / "engines").exists()


def test_target_and_precision_rules():
    from edgeprune.engines.capability import detect

    rtx = detect("tensorrt-rtx")
    assert B.resolve_cc(rtx, None, None)[0] == 86 and B.resolve_cc(rtx, None, 89)[0] == 89
    assert B.resolve_cc(rtx, 120, 89)[0] == 120
    with pytest.raises(B.BuildError, match="targets sm 75, 80, 86, 89, 120, 121"):
        B.resolve_cc(rtx, 87, None)
    assert B.resolve_precision(rtx, "fp16", None) == ("fp16", B.BuildSettings(strongly_typed=True))
    with pytest.raises(B.BuildError, match="strongly typed .* this bundle is fp32"):
        B.resolve_precision(rtx, "fp32", "fp16")
    full = B.TrtFlavour("tensorrt", rtx.module, "10.16.0", True, True, True)
    with pytest.raises(B.BuildError, match="builds on its target GPU"):
        B.resolve_cc(full, None, None)
    with pytest.raises(B.BuildError, match="--sm 86"):
        B.resolve_cc(full, 86, 90)


def test_builder_settings_reach_the_config():
    """--workspace-mb and --timing-cache on the builder config (a CPU-only RTX build cannot allocate a set
    workspace: TensorRT-RTX reports OutOfMemory, so the limit is checked on the config, not by a build)."""
    from edgeprune.engines.capability import detect
    from edgeprune.engines.rtx import _configure, make_builder

    rtx = detect("tensorrt-rtx")
    trt = rtx.module
    config, cache = _configure(trt, make_builder(rtx), B.BuildSettings(opt_level=2, workspace_mb=64,
                                                                        compute_capability=120))
    assert config.get_memory_pool_limit(trt.MemoryPoolType.WORKSPACE) == 64 << 20
    assert config.builder_optimization_level == 2 and cache is None
    assert config.get_compute_capability(0) == trt.ComputeCapability.SM120


def test_missing_bundle_refused(tmp_path):
    with pytest.raises(B.BuildError, match="not an edgeprune bundle"):
        B.check_request(B.BuildRequest(bundle=tmp_path / "nope"))


# ------------------------------------------------------------------------------------- mismatched-plan refusal
def _api(rec, **over):
    from edgeprune.runtime.trt_backend import TrtApi

    fields = {"trt": None, "device": None, "flavour": rec["flavour"], "version": rec["version"],
              "cc": rec["compute_capability"], "register_plugins": lambda trt: None} | over
    return TrtApi(**fields)


@pytest.mark.parametrize("over,match", [
    ({"version": "1.8.0"}, "tensorrt-rtx 1.8.0 on sm_86"), ({"cc": 120}, "on sm_120"),
    ({"flavour": "tensorrt", "version": "10.16.0"}, "runs tensorrt 10.16.0"),
    ({"register_plugins": None}, "IPluginV3 plugins, which this process cannot register"),
])
def test_trt_backend_refuses_mismatched_engine_sets(built, over, match):
    from edgeprune.runtime.trt_backend import select_engine_set

    root, rec = built["gridprune"]
    with pytest.raises(BackendError, match=match) as info:
        select_engine_set(open_bundle(root), _api(rec, **over))
    assert f"edgeprune build --bundle {root} --force" in str(info.value)
    key, got = select_engine_set(open_bundle(root), _api(rec))
    assert got == rec and key == rec["dir"].split("/")[1]


def test_trt_backend_refuses_modified_plan(built):
    from edgeprune.runtime.trt_backend import read_plan

    root, rec = built["gridprune"]
    key = rec["dir"].split("/")[1]
    bundle = open_bundle(root)
    assert read_plan(bundle, key, "prune", rec)[:4]
    bad = dict(rec, graphs=dict(rec["graphs"], prune=dict(rec["graphs"]["prune"], sha256="0" * 64)))
    with pytest.raises(BackendError, match="does not match its sha256.*--force"):
        read_plan(bundle, key, "prune", bad)
