"""The IPluginV3 plugins under TensorRT for RTX on the CPU, and the AOT plugin under full TensorRT (``trt``).

With TensorRT for RTX (``tensorrt_rtx_bindings``, CPU-only builds): the creators register, the ONNX parser maps
the ``edgeprune`` nodes of the GridPrune and G-Prune prune graphs (tiny-llava sizes: N = 576, LLaVA-NeXT: N
dynamic) to them (a ``PLUGIN_V3`` layer instead of the inlined function body), ``build_serialized_network``
calls their build-time methods and succeeds, and the plan names the plugin. ``prepare_for_modes`` copies
build the function body (``none``) or the AOT rewrite. The fixture creates the RTX library symlink first: a
plugin node parsed without it aborts the whole pytest process.

Tests marked ``trt`` need full TensorRT (>= 10.9 for AOT, plus its GPU) and run unchanged where it imports.
"""

from __future__ import annotations

import numpy as np
import pytest

from edgeprune.engines import capability as cap
from edgeprune.engines.plugins import contract as C
from edgeprune.engines.plugins.onnx_modes import fused_ops, prepare_for_modes

K = 64


@pytest.fixture(scope="module")
def rtx():
    pytest.importorskip("tensorrt_rtx_bindings")
    cap.ensure_rtx_parser_libs()  # before any plugin node is parsed (see capability.py)
    fl = cap.detect("tensorrt-rtx")
    from edgeprune.engines.plugins import register_plugins

    assert register_plugins(fl.module) == ["edgeprune::ZonalTopK", "edgeprune::GraphRank"]
    assert register_plugins(fl.module) == ["edgeprune::ZonalTopK", "edgeprune::GraphRank"]  # idempotent
    return fl


def _save(model, path):
    import onnx

    onnx.save(model, str(path))
    return path


def gridprune_graph(path, next_sizes=False):
    """The GridPrune prune graph at tiny-llava sizes (hidden 64; NeXT: N dynamic, zone ids an input)."""
    from edgeprune.export.lower_gridprune import build_gridprune_model, gridprune_spec
    from edgeprune.methods import gridprune_fn as G
    from edgeprune.methods.base import TokenLayout
    from edgeprune.methods.gridprune import GridPruneParams

    p = GridPruneParams()
    n = None if next_sizes else 576
    spec = gridprune_spec(n, K, 64, 64, None)
    zone = None if next_sizes else G.zone_ids(TokenLayout.single_view(24, 24), p.zones).numpy()
    views = 5 if next_sizes else 1
    return _save(build_gridprune_model(spec, K, p, views * p.zones ** 2, zone, 18), path)


def gprune_graph(path, next_sizes=False):
    from edgeprune.export.lower_gprune import build_gprune_model, gprune_spec
    from edgeprune.methods.gprune import GPruneParams

    n = None if next_sizes else 576
    return _save(build_gprune_model(gprune_spec(n, K, 64), K, GPruneParams(), 2 if next_sizes else 1, n, 18), path)


def _profile(path, n_max=576):
    import onnx

    model = onnx.load(str(path))
    prof = []
    for inp in model.graph.input:
        dims = [d.dim_value if d.dim_value else None for d in inp.type.tensor_type.shape.dim]
        lo = tuple(1 if d is None and i == 0 else (K if d is None else d) for i, d in enumerate(dims))
        hi = tuple(2 if d is None and i == 0 else (n_max if d is None else d) for i, d in enumerate(dims))
        if inp.name.endswith("_ids"):  # [n]
            lo, hi = (K,), (n_max,)
        prof.append((inp.name, lo, hi, hi))
    return prof


def _parse(fl, path):
    trt = fl.module
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    parser = trt.OnnxParser(network, logger)
    assert parser.parse_from_file(str(path)), [str(parser.get_error(i)) for i in range(parser.num_errors)]
    layers = [network.get_layer(i) for i in range(network.num_layers)]
    return builder, network, parser, layers


def _build(fl, builder, network, profile):
    config = builder.create_builder_config()
    config.builder_optimization_level = 0
    p = builder.create_optimization_profile()
    for name, lo, opt, hi in profile:
        p.set_shape(name, lo, opt, hi)
    config.add_optimization_profile(p)
    plan = builder.build_serialized_network(network, config)
    assert plan is not None and plan.nbytes > 0
    return bytes(plan)


@pytest.mark.parametrize("graph,op", [(gridprune_graph, "ZonalTopK"), (gprune_graph, "GraphRank")])
def test_parser_maps_the_fused_node_to_the_plugin_and_the_plan_holds_it(rtx, graph, op, tmp_path, monkeypatch):
    from edgeprune.engines.plugins import ipluginv3

    path = graph(tmp_path / "prune.onnx")
    assert list(fused_ops(path)) == [op]
    created = []
    parse = ipluginv3.parse_attributes
    monkeypatch.setattr(ipluginv3, "parse_attributes", lambda o, f: created.append(parse(o, f)) or created[-1])
    builder, network, _parser, layers = _parse(rtx, path)
    assert created and created[0] == fused_ops(path)[op]  # the PluginFields the parser passed, decoded
    assert created[0].get("tau", 0.05) == 0.05 and created[0]["K"] == K
    plugins = [l for l in layers if l.type == rtx.module.LayerType.PLUGIN_V3]
    assert [l.name for l in plugins] == [f"/prune/{op}"]
    assert not [l for l in layers if l.type == rtx.module.LayerType.TOPK]  # not the inlined function body
    calls = []
    real = ipluginv3.workspace_bytes
    monkeypatch.setattr(ipluginv3, "workspace_bytes", lambda o, dims: calls.append((o, dict(dims))) or real(o, dims))
    plan = _build(rtx, builder, network, _profile(path))
    assert op.encode() in plan and C.NAMESPACE.encode() in plan
    dims = {"B": 2, "N": 576, "Z": 16} if op == "ZonalTopK" else {"B": 2, "N": 576, "D": 64}
    assert (op, dims) in calls  # the builder asked for the workspace of the profile's max shapes


def test_next_graphs_parse_with_dynamic_n(rtx, tmp_path):
    path = gridprune_graph(tmp_path / "grid.onnx", next_sizes=True)
    builder, network, _parser, layers = _parse(rtx, path)
    assert [l.name for l in layers if l.type == rtx.module.LayerType.PLUGIN_V3] == ["/prune/ZonalTopK"]
    assert b"ZonalTopK" in _build(rtx, builder, network, _profile(path, 2880))
    # G-Prune over two groups: the plugin ranks one group, so the mode choice keeps the body
    path = gprune_graph(tmp_path / "gr.onnx", next_sizes=True)
    modes = cap.choose_plugin_modes(rtx, "auto", fused_ops(path))
    assert modes["GraphRank"][0] == "none"
    copy = prepare_for_modes(path, tmp_path / "gr.build.onnx", modes)
    _b, _n, _p, layers = _parse(rtx, copy)
    assert not [l for l in layers if l.type == rtx.module.LayerType.PLUGIN_V3]


def test_none_mode_builds_the_body_even_with_creators_registered(rtx, tmp_path):
    src = gridprune_graph(tmp_path / "prune.onnx")
    before = src.read_bytes()
    assert prepare_for_modes(src, tmp_path / "same.onnx", {"ZonalTopK": "ipluginv3"}) == src  # no copy needed
    copy = prepare_for_modes(src, tmp_path / "build" / "prune.onnx", {"ZonalTopK": ("none", "--plugins none")})
    assert copy != src and src.read_bytes() == before  # the bundle's graph is untouched
    builder, network, _parser, layers = _parse(rtx, copy)
    assert not [l for l in layers if l.type == rtx.module.LayerType.PLUGIN_V3]
    assert [l for l in layers if l.type == rtx.module.LayerType.TOPK]
    assert C.NAMESPACE.encode() not in _build(rtx, builder, network, _profile(copy))  # no plugin in the plan


def test_aot_rewrite_structure_and_zone_index_ops(tmp_path):
    """The AOT copy: standard zone-index ops (checked against torch with ONNX Runtime) + one aot=1 node."""
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    torch = pytest.importorskip("torch")
    from onnx import helper

    from edgeprune.engines.plugins.onnx_modes import zone_index_nodes
    from edgeprune.export.onnx_builder import Builder, make_model, value_info

    src = gridprune_graph(tmp_path / "prune.onnx", next_sizes=True)
    copy = prepare_for_modes(src, tmp_path / "aot.onnx", {"ZonalTopK": "aot"})
    model = onnx.load(str(copy))
    (node,) = [n for n in model.graph.node if n.domain == "edgeprune"]
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    assert node.op_type == C.AOT_ZONAL_TOPK and attrs["aot"] == 1 and attrs["plugin_namespace"] == b"edgeprune"
    assert len(node.input) == 5 and len(node.output) == 3 and node.output[0] == "kept_idx"
    assert not [f for f in model.functions if f.name == "ZonalTopK"]
    with pytest.raises(ValueError, match="only ZonalTopK has an AOT form"):
        prepare_for_modes(gprune_graph(tmp_path / "g.onnx"), tmp_path / "g2.onnx", {"GraphRank": "aot"})

    b = Builder("/t")
    zone = b.cast("zone", "int32", name="zone32")
    order, sizes = zone_index_nodes(b, zone, 80)
    b.op("Identity", order, out_names=["order"])
    b.op("Identity", sizes, out_names=["sizes"])
    m = make_model("zi", b, [value_info("zone", "int64", ["n"])],
                   [value_info("order", "int32", ["n"]), value_info("sizes", "int32", [80])], [], 18)
    sess = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    for n in (576, 2880, 7):
        z = rng.integers(0, 80, n)
        got_order, got_sizes = sess.run(None, {"zone": z})
        assert np.array_equal(got_order, torch.sort(torch.as_tensor(z), stable=True).indices.numpy())
        assert np.array_equal(got_sizes, np.bincount(z, minlength=80))


# ------------------------------------------------------------------------------------ full TensorRT (trt)
@pytest.fixture(scope="module")
def full_trt():
    trt = pytest.importorskip("tensorrt")
    fl = cap.detect("tensorrt")
    try:
        trt.Builder(trt.Logger(trt.Logger.WARNING))
    except TypeError as exc:  # no usable GPU: full TensorRT builds on its target GPU
        pytest.skip(str(exc))
    return fl


@pytest.mark.trt
@pytest.mark.parametrize("graph,op", [(gridprune_graph, "ZonalTopK"), (gprune_graph, "GraphRank")])
def test_full_tensorrt_builds_with_the_ipluginv3_plugins(full_trt, graph, op, tmp_path):
    from edgeprune.engines.plugins import register_plugins

    register_plugins(full_trt.module)
    path = graph(tmp_path / "prune.onnx")
    builder, network, _parser, layers = _parse(full_trt, path)
    assert [l.name for l in layers if l.type == full_trt.module.LayerType.PLUGIN_V3] == [f"/prune/{op}"]
    assert op.encode() in _build(full_trt, builder, network, _profile(path))  # times enqueue on the GPU


@pytest.mark.trt
def test_full_tensorrt_builds_the_aot_plugin(full_trt, tmp_path):
    if not full_trt.aot_plugins:
        pytest.skip(f"TensorRT {full_trt.version} has no AOT Python plugins")
    from edgeprune.engines.plugins.aot import register_aot_plugins

    assert register_aot_plugins(full_trt.module) == ["edgeprune::ZonalTopKAot"]
    copy = prepare_for_modes(gridprune_graph(tmp_path / "prune.onnx"), tmp_path / "aot.onnx", {"ZonalTopK": "aot"})
    builder, network, _parser, layers = _parse(full_trt, copy)
    assert [l for l in layers if l.type == full_trt.module.LayerType.PLUGIN_V3]
    assert b"ZonalTopKAot" in _build(full_trt, builder, network, _profile(copy))


def test_prepare_graph_is_the_build_hook(rtx, tmp_path):
    from edgeprune.engines.plugins import prepare_graph

    src = gridprune_graph(tmp_path / "prune.onnx")
    got = prepare_graph(rtx, "auto", src, tmp_path / "build")
    assert got.path == src and got.modes["ZonalTopK"][0] == "ipluginv3" and got.plugin_ids == ("edgeprune::ZonalTopK",)
    none = prepare_graph(rtx, "none", src, tmp_path / "build")
    assert none.path == tmp_path / "build" / "prune.onnx" and none.to_dict()["modes"]["ZonalTopK"]["mode"] == "none"
    with pytest.raises(cap.PluginModeError, match="no AOT Python plugins"):
        prepare_graph(rtx, "aot", src, tmp_path / "build")
    plain = tmp_path / "plain.onnx"
    plain.write_bytes(src.read_bytes().replace(b"ZonalTopK", b"ZonalTopX"))  # no fused op left
    assert prepare_graph(rtx, "auto", plain, tmp_path / "build").modes == {}


def test_enqueue_and_serialisation_round_trip_with_a_recording_driver(rtx, tmp_path):
    """The plugin object TensorRT would run: fields serialise exactly, clones keep the launcher, and enqueue
    hands TensorRT's pointers, workspace and stream to the launch path (recorded, not launched)."""
    pytest.importorskip("triton")
    from types import SimpleNamespace

    from edgeprune.engines.plugins import plugin_classes, register_plugins
    from edgeprune.engines.plugins.launch import PluginLauncher, RecordingDriver

    trt = rtx.module
    creator = plugin_classes(trt)["ZonalTopK"]()
    fc = trt.PluginFieldCollection([trt.PluginField("K", np.array([64], np.int32), trt.PluginFieldType.INT32),
                                    trt.PluginField("tau", np.array([0.05], np.float32), trt.PluginFieldType.FLOAT32),
                                    trt.PluginField("zones", np.array([4], np.int32), trt.PluginFieldType.INT32),
                                    trt.PluginField("num_zones", np.array([16], np.int32), trt.PluginFieldType.INT32)])
    plugin = creator.create_plugin("z", fc, trt.TensorRTPhase.BUILD)
    assert plugin.attrs == {"K": 64, "tau": 0.05, "zones": 4, "num_zones": 16}
    again = creator.create_plugin("z", plugin.get_fields_to_serialize(), trt.TensorRTPhase.RUNTIME)
    assert again.attrs == plugin.attrs and type(again.attrs["tau"]) is float  # FLOAT64 on the way back: exact
    driver = RecordingDriver(sm=86)
    plugin.launcher = PluginLauncher("ZonalTopK", plugin.attrs, driver=driver, cache_dir=str(tmp_path))
    twin = plugin.attach_to_context(None)
    assert twin is not plugin and twin.launcher is plugin.launcher and twin.timing_cache_id == plugin.timing_cache_id
    descs = [SimpleNamespace(dims=d) for d in ((2, 576), (2, 576), (576,))]
    twin.enqueue(descs, [SimpleNamespace(dims=(2, 64)), SimpleNamespace(dims=(2, 16))], [0x1000, 0x2000, 0x3000],
                 [0x4000, 0x5000], 0x100000, 42)
    (zi, *_, zi_args), (zt, *_, zt_args) = driver.launches
    assert (zi, zt) == ("zone_index_kernel", "zonal_topk_kernel")
    assert zi_args[:3] == [0x3000, 576, 16] and zt_args[:3] == [0x1000, 0x2000, 0x3000]
    assert zt_args[5:9] == [576, 16, 0x4000, 0x5000] and all(a >= 0x100000 for a in (zt_args[3], zt_args[4], zt_args[9]))
    assert [l[4] for l in driver.launches] == [42, 42]  # TensorRT's stream
    with pytest.raises(C.PluginContractError, match="no plugin for ops"):
        register_plugins(trt, ["TopK"])
