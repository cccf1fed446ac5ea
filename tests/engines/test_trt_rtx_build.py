"""Engine build smoke test: every graph of every lowered method's tiny-llava bundle (``export.graphs.LOWERED``)
parses and builds into a serialized engine with the bundle's optimisation profiles, with the ``edgeprune``
IPluginV3 creators registered: graphs with fused nodes (GridPrune's ``ZonalTopK``, G-Prune's ``GraphRank``)
must hold a ``PLUGIN_V3`` layer for each (not the inlined function body) and their plans the plugin's name.
The flavour fixture creates the TensorRT-for-RTX library symlink first (``capability.ensure_rtx_parser_libs``):
without it a plugin node aborts the whole pytest process.

Two flavours, one test body: TensorRT for RTX (``tensorrt_rtx_bindings``; builds on a CPU-only machine, skipped
when not installed) and full TensorRT (``tensorrt``, marked ``trt``; needs its GPU, skipped when ``import
tensorrt`` fails). Deserialising needs a CUDA driver: on a CPU-only machine the RTX runtime refuses with a logged
CUDA error, which is asserted instead. Builds use optimisation level 0; identical graphs (shared by
``export --reuse``) are built once per flavour through the builder's cache.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from edgeprune.engines import capability as cap
from edgeprune.engines.plugins.onnx_modes import fused_ops
from edgeprune.engines.rtx import (EngineBuildError, build_bundle_engines, build_engine, bundle_profiles, deserialize,
                                   engine_io, make_builder, profile_ranges, symbol_bounds)
from edgeprune.export.graphs import LOWERED
from edgeprune.bundle.format import MANIFEST
from edgeprune.bundle.spec import GraphSpec, TensorSpec
from edgeprune.export.spec import decoder_spec, prune_spec
from edgeprune.methods.registry import get_method_class

# case -> (method, K, method args). The baselines use the ORT backend tests' budgets and directories, so a full
# run exports each bundle once; every other lowered method gets K = 64 and its defaults. Slow (a vision/guidance
# or LLM graph of its own, 10-20 s of export each): GridPrune with CLIP guidance and the in-LLM methods.
CASES = {"none": ("none", None, {}), "cls-topk": ("cls-topk", 64, {}), "uniform": ("uniform", 100, {}),
         "random": ("random", 50, {}), "gridprune-llm": ("gridprune", 64, {"guidance": "llm"})}
SLOW = {"gridprune", "fastv", "fitprune"}
SKIP: dict[str, str] = {}
MODULES = {"tensorrt-rtx": "tensorrt_rtx_bindings", "tensorrt": "tensorrt"}
FLAVOURS = [pytest.param("tensorrt-rtx", id="rtx"), pytest.param("tensorrt", id="trt", marks=pytest.mark.trt)]


def _case(name):
    """(method, K or None, method args) of a case; a lowered method without an entry gets K = 64."""
    method, k, args = CASES.get(name, (name, 64, {}))
    return method, (k if get_method_class(method).uses_budget else None), args


def _cases():
    """Every lowered method (GridPrune twice: text guidance from the LLM, and from CLIP when slow is run)."""
    names = [c for c, (m, _, _) in CASES.items() if m in LOWERED] + [m for m in LOWERED if m not in CASES]
    out = []
    for n in names:
        marks = [pytest.mark.slow] if n in SLOW else []
        if n in SKIP:
            marks.append(pytest.mark.skip(reason=SKIP[n]))
        out.append(pytest.param(n, id=n, marks=marks))
    return out


def _with_plugins(fl):
    """Make plugin nodes parseable (RTX library symlink) and register the creators (process-wide, idempotent)."""
    from edgeprune.engines.plugins import register_plugins

    cap.ensure_rtx_parser_libs()
    register_plugins(fl.module)
    return fl


@pytest.fixture(scope="module", params=FLAVOURS)
def flavour(request):
    pytest.importorskip(MODULES[request.param])
    fl = cap.detect(request.param)
    try:
        make_builder(fl)
    except EngineBuildError as exc:  # full TensorRT on a machine without its GPU
        pytest.skip(str(exc))
    return _with_plugins(fl)


@pytest.fixture(scope="module")
def rtx():
    pytest.importorskip("tensorrt_rtx_bindings")
    return _with_plugins(cap.detect("tensorrt-rtx"))


def _plugin_layers(fl, onnx_path):
    """Names of the ``PLUGIN_V3`` layers the parser makes of a graph (the creators are registered)."""
    trt = fl.module
    logger = trt.Logger(trt.Logger.ERROR)
    network = make_builder(fl).create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    parser = trt.OnnxParser(network, logger)
    assert parser.parse_from_file(str(onnx_path)), [str(parser.get_error(i)) for i in range(parser.num_errors)]
    layers = [network.get_layer(i) for i in range(network.num_layers)]
    return [layer.name for layer in layers if layer.type == trt.LayerType.PLUGIN_V3]


@pytest.fixture(scope="module")
def bundles(exported_bundle, tiny_llava, tiny_recipe):
    """case name -> bundle directory: the session's (tests/conftest.py), exported on first use and reusing the
    cls-topk bundle's model graphs; FitPrune gets the session's small hand-made recipe (the graph types matter
    here, not the fit)."""
    def get(name):
        method, k, args = _case(name)
        if method == "fitprune":
            args = {"recipe": str(tiny_recipe)}
        return exported_bundle(tiny_llava, method, k, args)

    return get


@pytest.fixture(scope="module")
def plan_cache():
    return {}


@pytest.mark.parametrize("case", _cases())
def test_every_graph_builds(case, flavour, bundles, plan_cache, tmp_path):
    root = bundles(case)
    manifest = json.loads((root / MANIFEST).read_text())
    builds = build_bundle_engines(root, tmp_path, flavour=flavour, opt_level=0, cache=plan_cache)
    assert set(builds) == set(manifest["graphs"])
    profiles = bundle_profiles(manifest)
    fused_graphs = set()
    for name, b in builds.items():
        assert b.nbytes > 0 and b.path.stat().st_size == b.nbytes
        fused = fused_ops(root / manifest["graphs"][name].get("files", [f"{name}.onnx"])[0])
        if fused:  # the fused node became our plugin, in the network and in the plan
            fused_graphs.add(name)
            assert _plugin_layers(flavour, root / f"{name}.onnx") == [f"/prune/{op}" for op in fused]
            plan = b.path.read_bytes()
            assert all(op.encode() in plan for op in fused) and b"edgeprune" in plan, name
        two = name == "decoder" and manifest["method"]["placement"] == "pre_llm"  # prefill + decode phases
        assert b.profiles == profiles[name] and len(b.profiles) == (2 if two else 1)
        engine, messages = deserialize(b.path.read_bytes(), flavour)
        spec = manifest["graphs"][name]["spec"]
        if engine is None:  # no usable CUDA driver (CPU-only) or a GPU outside RTX's targets: a logged refusal
            assert flavour.name == "tensorrt-rtx", messages
            assert any(w in m.lower() for m in messages for w in ("cuda", "compatib", "capabilit")), messages
            continue
        io = engine_io(engine, flavour)
        assert sorted(io["inputs"]) == sorted(t["name"] for t in spec["inputs"])  # runners bind by name
        assert sorted(io["outputs"]) == sorted(t["name"] for t in spec["outputs"])
        assert io["profiles"] == len(b.profiles)
    if _case(case)[0] in ("gridprune", "gprune"):  # the methods with a fused op: its graph was checked
        assert fused_graphs == {"prune"}


def test_decoder_profiles_cover_prefill_and_decode(bundles):
    manifest = json.loads((bundles("cls-topk") / MANIFEST).read_text())
    prefill, decode = bundle_profiles(manifest)["decoder"]
    ranges = {name: (lo, opt, hi) for name, lo, opt, hi in prefill}
    assert ranges["past_key_0"] == ((1, 4, 0, 16),) * 3  # a prefill starts from an empty cache
    assert ranges["inputs_embeds"][0] == (1, 1, 64) and ranges["inputs_embeds"][2] == (1, 4096, 64)
    ranges = {name: (lo, opt, hi) for name, lo, opt, hi in decode}
    assert ranges["inputs_embeds"] == ((1, 1, 64),) * 3
    assert ranges["past_value_3"][2] == (1, 4, 4095, 16) and ranges["attention_mask"][2] == (1, 4096)
    assert ranges["attention_mask"][1][1] == ranges["past_key_0"][1][2] + 1  # total = past + 1 at opt


def test_profile_bounds_from_specs():
    spec = prune_spec(None, 64, 32, uses_scores=True)  # LLaVA-NeXT: N depends on the image
    manifest = {"method": {"k": 64, "n_max": 2880}, "vision": {"patches_per_view": 576}, "max_positions": 4096,
                "graphs": {"prune": {"spec": spec.to_dict()}}}
    bounds = symbol_bounds(manifest, max_batch=2)
    assert bounds["vision"][0]["views"] == (1, 5, 5) and bounds["prune"][0]["n"] == (64, 2880, 2880)
    assert bounds["guidance"][0]["seq"] == (1, 16, 4096) and len(bounds["decoder"]) == 2
    in_llm = {**manifest, "method": {**manifest["method"], "placement": "in_llm"}, "guidance": {"context": 77}}
    bounds = symbol_bounds(in_llm)
    assert bounds["guidance"][0]["seq"] == (1, 16, 77)
    assert bounds["prefill"][0]["seq"] == (1, 2880 + 64, 4096)  # every visual token enters an in-LLM prefill
    (decode,) = bounds["decoder"]  # the ragged decoder only decodes; per-layer past_l use the "past" family
    assert profile_ranges(GraphSpec("d", (TensorSpec("past_key_3", "float32", (1, 2, "past_3", 4)),), ()),
                          decode) == [("past_key_3", (1, 2, 1, 4), (1, 2, 2976, 4), (1, 2, 4095, 4))]
    (prof,) = bundle_profiles(manifest, max_batch=2)["prune"]
    assert prof == [("features", (1, 64, 32), (1, 2880, 32), (2, 2880, 32)),
                    ("cls_attn", (1, 64), (1, 2880), (2, 2880))]
    with pytest.raises(EngineBuildError, match="no profile bounds for dimension 'past'"):
        profile_ranges(decoder_spec(1, 1, 4, 4, 8), {"batch": (1, 1, 1), "seq": (1, 1, 1), "total": (1, 1, 1)})
    with pytest.raises(EngineBuildError, match="min <= opt <= max"):
        profile_ranges(spec, {"batch": (2, 1, 1), "n": (1, 1, 1)})
    with pytest.raises(EngineBuildError, match="max_batch"):
        symbol_bounds(manifest, max_batch=0)


def test_onnx_topk_ks(bundles):
    assert [k for _, k in cap.onnx_topk_ks(str(bundles("cls-topk") / "prune.onnx"))] == [64, 64]
    assert cap.onnx_topk_ks(str(bundles("uniform") / "prune.onnx")) == []


# ----------------------------------------------------------------------------------- RTX specifics and refusals
def _onnx(path, nodes, inputs, outputs, inits=(), functions=()):
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info(n, TensorProto.FLOAT, s) for n, s in inputs],
                              [helper.make_tensor_value_info(n, t, s) for n, t, s in outputs], list(inits))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid("edgeprune", 1)],
                              functions=list(functions))
    model.ir_version = 10  # onnx.helper defaults to 14, which onnxruntime 1.31 refuses (DESIGN.md §6)
    onnx.save(model, str(path))
    return path


def test_edgeprune_local_function_is_inlined(rtx, tmp_path):
    """A fused op in the ``edgeprune`` domain, defined as a model-local function (a TopK body), builds through
    that body: the RTX network has no plugin API (DESIGN.md §5 fallback)."""
    from onnx import TensorProto, helper

    body = [helper.make_node("Constant", [], ["k"], value=helper.make_tensor("kv", TensorProto.INT64, [1], [3])),
            helper.make_node("TopK", ["scores", "k"], ["vals", "idx"], axis=-1)]
    fn = helper.make_function("edgeprune", "ZonalTopK", ["scores"], ["idx"], body,
                              [helper.make_opsetid("", 18)])
    path = _onnx(tmp_path / "f.onnx", [helper.make_node("ZonalTopK", ["s"], ["i"], domain="edgeprune")],
                 [("s", ["b", 16])], [("i", TensorProto.INT64, ["b", 3])], functions=[fn])
    b = build_engine(path, [("s", (1, 16), (1, 16), (2, 16))], tmp_path / "f.plan", flavour=rtx, opt_level=0)
    assert b.nbytes > 0 and cap.onnx_topk_ks(str(path)) == [("", 3)]


def test_build_refusals(rtx, bundles, tmp_path):
    from onnx import TensorProto, helper, numpy_helper

    prune = bundles("cls-topk") / "prune.onnx"
    shapes = ((1, 576, 64), (1, 576, 64), (1, 576, 64))
    with pytest.raises(EngineBuildError, match="graph's inputs are"):
        build_engine(prune, [("features", *shapes)], tmp_path / "p.plan", flavour=rtx, opt_level=0)
    with pytest.raises(EngineBuildError, match="dims"):
        build_engine(prune, [("features", (1, 575, 64), *shapes[1:]), ("cls_attn", (1, 576), (1, 576), (1, 576))],
                     tmp_path / "p.plan", flavour=rtx, opt_level=0)
    with pytest.raises(EngineBuildError, match="does not exist"):
        build_engine(tmp_path / "none.onnx", [("x", (1,), (1,), (1,))], tmp_path / "x.plan", flavour=rtx)
    (tmp_path / "junk.onnx").write_bytes(b"not a model")
    with pytest.raises(EngineBuildError, match="ONNX parser rejected"):
        build_engine(tmp_path / "junk.onnx", [("x", (1,), (1,), (1,))], tmp_path / "x.plan", flavour=rtx)
    big = numpy_helper.from_array(np.array([4000], np.int64), "k")
    path = _onnx(tmp_path / "big.onnx", [helper.make_node("TopK", ["s", "k"], ["v", "i"])], [("s", [1, 5000])],
                 [("v", TensorProto.FLOAT, [1, 4000]), ("i", TensorProto.INT64, [1, 4000])], inits=[big])
    with pytest.raises(EngineBuildError, match="native TopK limit K <= 3840"):
        build_engine(path, [("s", (1, 5000), (1, 5000), (1, 5000))], tmp_path / "big.plan", flavour=rtx)
    assert not list(tmp_path.glob("*.plan")) and not list(tmp_path.glob(".*tmp*"))  # nothing half-written


def test_missing_flavour_names_the_install(monkeypatch):
    monkeypatch.setattr(cap, "_import", lambda name: None)
    with pytest.raises(cap.MissingDependencyError, match="tensorrt-rtx-cu13-bindings"):
        cap.detect("tensorrt-rtx")
    with pytest.raises(cap.MissingDependencyError, match=r"\[trt\]"):
        cap.detect()
