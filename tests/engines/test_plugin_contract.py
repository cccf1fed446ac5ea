"""The plugin contract and launch path without TensorRT (edgeprune/engines/plugins).

Attributes, shapes, formats, workspace carving and the launch sequences are checked as pure functions; each
kernel's PTX entry (compiled here on the CPU) is checked against the contract's argument list; the launch path
runs with a recording driver (everything but the CUDA calls); the plugin-mode choice and the RTX library
symlink are checked with fake flavours and folders. On a GPU (marked ``gpu``) the launch path runs on device
buffers and must give the reference's indices exactly.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import types

import numpy as np
import pytest

from edgeprune.engines import capability as cap
from edgeprune.engines.plugins import contract as C
from edgeprune.engines.plugins.launch import LaunchError, PluginLauncher, RecordingDriver, pack_args, ptx_target

ZT = {"K": 64, "tau": 0.05, "zones": 4, "num_zones": 16}
GR = {"K": 64, "threshold": 0.5, "temperature": 0.03, "steps": 3, "num_groups": 1}


# ------------------------------------------------------------------------------------------------ contract
def test_attributes_are_parsed_and_validated():
    fields = {"K": np.array([64], np.int32), "tau": np.array([0.05], np.float32), "zones": 4, "num_zones": 16,
              "plugin_namespace": "edgeprune", "plugin_version": "1"}
    attrs = C.parse_attributes("ZonalTopK", fields)
    assert attrs == ZT and type(attrs["K"]) is int
    assert attrs["tau"] == 0.05  # the float32 attribute's decimal, not 0.0500000007
    assert C.parse_attributes("ZonalTopK", {**ZT, "tau": np.float64(0.05000000074505806)})["tau"] != 0.05
    with pytest.raises(C.PluginContractError, match=r"missing \['num_zones'\], unknown \['extra'\]"):
        C.parse_attributes("ZonalTopK", {"K": 1, "tau": 1.0, "zones": 1, "extra": 2})
    with pytest.raises(C.PluginContractError, match="bad attribute values"):
        C.parse_attributes("GraphRank", {**GR, "temperature": 0.0})
    with pytest.raises(C.PluginContractError, match="must be int"):
        C.parse_attributes("GraphRank", {**GR, "steps": "many"})
    with pytest.raises(C.PluginContractError, match="unknown plugin op"):
        C.parse_attributes("FitPrune", {})
    assert C.unsupported_reason("GraphRank", GR) is None
    assert "single group" in C.unsupported_reason("GraphRank", {**GR, "num_groups": 2})


def test_shapes_types_and_formats():
    assert C.output_dims("ZonalTopK", ZT) == ((C.Dim(0, 0), 64), (C.Dim(0, 0), 16))
    assert C.resolve_shape(C.output_dims("GraphRank", GR)[0], [(3, 576, 64), (576,)]) == (3, 64)
    assert C.output_dtypes("ZonalTopK") == ("int32", "int32") and C.output_dtypes("GraphRank") == ("int32",)
    assert C.io_dtypes("GraphRank") == ("float32", "int32", "int32")
    assert C.supports_format("ZonalTopK", 0, "float32", True) and not C.supports_format("ZonalTopK", 0, "float16", True)
    assert not C.supports_format("ZonalTopK", 2, "int32", False) and not C.supports_format("ZonalTopK", 5, "int32", True)
    assert C.problem_dims("ZonalTopK", ZT, [(2, 576), (2, 576), (576,)]) == {"B": 2, "N": 576, "Z": 16}
    with pytest.raises(C.PluginContractError, match="differs"):
        C.problem_dims("ZonalTopK", ZT, [(2, 576), (2, 575), (576,)])
    with pytest.raises(C.PluginContractError, match=r"K = 64 must be in \[1, N = 32\]"):
        C.problem_dims("GraphRank", GR, [(1, 32, 8), (32,)])
    with pytest.raises(C.PluginContractError, match="inputs must be"):
        C.problem_dims("GraphRank", GR, [(1, 576, 8)])


def test_workspace_is_carved_in_aligned_disjoint_slots():
    for op, dims in (("ZonalTopK", {"B": 2, "N": 577, "Z": 80}), ("GraphRank", {"B": 2, "N": 577, "D": 64})):
        ws = C.workspace_layout(op, dims)
        spans = sorted(ws.slots.values())
        assert all(off % C.WORKSPACE_ALIGN == 0 for off, _ in spans)
        assert all(a + n <= b for (a, n), (b, _) in zip(spans, spans[1:])) and spans[-1][0] + spans[-1][1] <= ws.nbytes
        assert C.workspace_bytes(op, dims) == ws.nbytes and ws.pointer(4096, "ws" if op == "ZonalTopK" else "attn") > 4096
    gr = C.workspace_layout("GraphRank", {"B": 1, "N": 2880, "D": 4096})
    assert gr.slots["attn"][1] == 4 * 2880 * 2880 and gr.slots["thr"][1] == 4
    assert C.workspace_layout("ZonalTopK", {"B": 3, "N": 10, "Z": 5}).slots["ws"][1] == 8 * 3 * 15


def _aot_spec_names(kernel, consts):
    from edgeprune.kernels.aot import SPECS

    spec = SPECS[kernel]
    return spec.args(spec.resolve(consts))


@pytest.mark.parametrize("op,attrs,dims", [("ZonalTopK", ZT, {"B": 2, "N": 576, "Z": 16}),
                                           ("GraphRank", GR, {"B": 2, "N": 576, "D": 64}),
                                           ("GraphRank", {**GR, "steps": 0}, {"B": 1, "N": 100, "D": 8})])
def test_launch_sequence_follows_the_kernel_specs(op, attrs, dims):
    pytest.importorskip("triton")
    seq = C.launch_sequence(op, attrs, dims)
    consts = C.kernel_constants(op, attrs)
    for launch in seq:
        args = _aot_spec_names(launch.kernel, consts[launch.kernel])
        assert [a.name for a in launch.args] == [n for n, _ in args], launch.kernel
        for arg, (_, dtype) in zip(launch.args, args):
            assert (arg.source == "scalar") == (not dtype.startswith("*")), (launch.kernel, arg)
        assert all(g >= 1 for g in launch.grid) and launch.grid[0] >= 1
    if op == "ZonalTopK":
        assert [l.kernel for l in seq] == ["zone_index", "zonal_topk"] and seq[1].grid == (2, 1, 1)
        assert consts["zonal_topk"]["zone_mean"] is True  # the node passes per-token relevance
        return
    kinds = [l.kernel.split(".")[1] for l in seq]
    assert kinds == ["norm", "sim"] + ["step"] * attrs["steps"] + ["select", "emit"]
    for launch in seq:
        if launch.kernel.endswith("step"):
            v_in, v_out = launch.args[1].ref, launch.args[3].ref
            assert v_in != v_out  # never writes the buffer it reads
    select = seq[-2]
    assert select.args[0].ref == ("norm" if attrs["steps"] == 0 else f"v{(attrs['steps'] - 1) % 2}")


def test_aot_node_takes_inputs_then_scalars_then_outputs():
    pytest.importorskip("triton")
    launch = C.aot_zonal_topk_launch({"B": 1, "N": 576, "Z": 16})
    sources = [a.source for a in launch.args]
    assert sources == ["input"] * 5 + ["scalar"] * 2 + ["output"] * 3  # the AOT launcher's order
    assert [a.ref for a in launch.args if a.source != "scalar"] == [0, 1, 2, 3, 4, 0, 1, 2]
    names = [n for n, _ in _aot_spec_names("zonal_topk", C.kernel_constants("ZonalTopK", ZT)["zonal_topk"])]
    assert [a.name for a in launch.args] == names
    assert len(C.AOT_ZONAL_TOPK_IO["inputs"]) == 5 and len(C.AOT_ZONAL_TOPK_IO["outputs"]) == 3
    sym = C.aot_zonal_topk_symbols(ZT)
    assert sym["grid"] == (C.Dim(0, 0), 1, 1) and sym["extra_args"] == (("N", C.Dim(0, 1)), ("Z", 16))


def test_bind_resolves_pointers_and_refuses_missing_ones():
    pytest.importorskip("triton")
    dims = {"B": 1, "N": 576, "Z": 16}
    layout = C.workspace_layout("ZonalTopK", dims)
    zone_index, zonal = C.launch_sequence("ZonalTopK", ZT, dims)
    bound = C.bind(zonal, [0x1000, 0x2000, 0x3000], [0x4000, 0x5000], 0x10000, layout)
    assert bound == [("ptr", 0x1000), ("ptr", 0x2000), ("ptr", 0x3000), ("ptr", layout.pointer(0x10000, "order")),
                     ("ptr", layout.pointer(0x10000, "sizes")), ("i32", 576), ("i32", 16), ("ptr", 0x4000),
                     ("ptr", 0x5000), ("ptr", layout.pointer(0x10000, "ws"))]
    with pytest.raises(C.PluginContractError, match="no device pointer"):
        C.bind(zonal, [0x1000, 0x2000], [0x4000, 0x5000], 0x10000, layout)
    with pytest.raises(C.PluginContractError, match="workspace"):
        C.bind(zone_index, [1, 2, 3], [4, 5], 0, layout)


def test_zone_index_kernel_equals_stable_argsort_and_bincount():
    """The IPluginV3 flavour's first ZonalTopK launch, on the Triton interpreter (in a child: TRITON_INTERPRET
    must be set before triton is imported, and this process compiles PTX)."""
    pytest.importorskip("triton")
    pytest.importorskip("torch")
    code = ("import torch\nfrom edgeprune.kernels.zone_index import zone_index\n"
            "g = torch.Generator().manual_seed(0)\n"
            "for n, z in [(576, 16), (100, 300), (1, 1), (2880, 80), (7, 3)]:\n"
            "    zone = torch.randint(0, z, (n,), generator=g)\n"
            "    o, s = zone_index(zone, z)\n"
            "    assert torch.equal(o.long(), torch.sort(zone, stable=True).indices), n\n"
            "    assert torch.equal(s.long(), torch.bincount(zone, minlength=z)), n\n"
            "print('ok')")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0 and "ok" in proc.stdout, proc.stderr[-2000:]


# ------------------------------------------------------------------------------------------------ PTX entries
@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    """Every kernel both plugins launch, compiled for sm_90 (H200) and sm_86 (an RTX target) on the CPU."""
    pytest.importorskip("triton")
    from edgeprune.kernels.aot import compile_ptx

    cache = tmp_path_factory.mktemp("plugin-ptx")
    out = {}
    for sm in (90, 86):
        for op, attrs in (("ZonalTopK", ZT), ("GraphRank", GR)):
            for kernel, consts in C.kernel_constants(op, attrs).items():
                if sm == 90 or kernel in ("zone_index", "zonal_topk"):
                    out[(sm, kernel)] = compile_ptx(kernel, sm, cache_dir=cache, **consts)
    return out


def test_every_ptx_entry_matches_the_contract(compiled):
    seqs = C.launch_sequence("ZonalTopK", ZT, {"B": 1, "N": 576, "Z": 16}) + \
        C.launch_sequence("GraphRank", GR, {"B": 1, "N": 576, "D": 64})
    checked = set()
    for (sm, kernel), ck in compiled.items():
        launch = next(l for l in seqs if l.kernel == kernel)
        params = C.ptx_params(ck.ptx, ck.kernel_name)
        assert params == [C.expected_param_type(t) for _, t in ck.arg_order], (sm, kernel)
        assert len(params) == len(launch.args)
        assert [n for n, _ in ck.arg_order] == [a.name for a in launch.args]
        assert ck.block == (128, 1, 1) and ck.shared_mem <= 48 * 1024
        checked.add(kernel)
    assert checked == {"zone_index", "zonal_topk", "graph_rank.norm", "graph_rank.sim", "graph_rank.step",
                       "graph_rank.select", "graph_rank.emit"}
    with pytest.raises(C.PluginContractError, match="no entry"):
        C.ptx_params(compiled[(90, "zonal_topk")].ptx, "missing_kernel")


# ------------------------------------------------------------------------------------------------ launch path
def test_ptx_target_choice():
    assert ptx_target(90) == 90 and ptx_target(87) == 87 and ptx_target(120) == 120 and ptx_target(86) == 86
    assert ptx_target(100) == 89  # sm_90a PTX is arch-specific: a B200 gets forward-compatible sm_89 PTX
    with pytest.raises(LaunchError, match="no PTX target runs on sm_72"):
        ptx_target(72, (75, 80, 90))
    assert ptx_target(95, (80, 90)) == 80


def test_pack_args_builds_a_void_pointer_array():
    import ctypes

    packed = pack_args([("ptr", 0xDEADBEEF00), ("i32", -7), ("i32", 576)])
    assert packed.decoded() == [0xDEADBEEF00, -7, 576]
    addrs = np.ctypeslib.as_array((ctypes.c_uint64 * 3).from_address(packed.address))
    assert ctypes.c_uint64.from_address(int(addrs[0])).value == 0xDEADBEEF00
    assert ctypes.c_int32.from_address(int(addrs[1])).value == -7
    with pytest.raises(LaunchError, match="out of range"):
        pack_args([("i32", 2**31)])


@pytest.mark.parametrize("op,attrs", [("ZonalTopK", ZT), ("GraphRank", GR)])
def test_launcher_records_the_contract(op, attrs, compiled):
    kernels = {k: ck for (sm, k), ck in compiled.items() if sm == 90}
    driver = RecordingDriver(sm=90)
    launcher = PluginLauncher(op, attrs, driver=driver, kernels=kernels)
    assert launcher.sm == 90
    shapes = [(2, 576), (2, 576), (576,)] if op == "ZonalTopK" else [(2, 576, 64), (576,)]
    inputs, outputs, ws = [0x1000 * (i + 1) for i in range(len(shapes))], [0x9000, 0xA000][:len(C.OUTPUTS[op])], 1 << 20
    dims, layout, _ = launcher.plan(shapes)
    seq = launcher.run(shapes, inputs, outputs, ws, stream=77, workspace_bytes=layout.nbytes)
    assert len(driver.launches) == len(seq) == (2 if op == "ZonalTopK" else 4 + attrs["steps"])
    for (name, grid, block, shared, stream, values), launch in zip(driver.launches, seq):
        kernel = kernels[launch.kernel]
        assert name == kernel.kernel_name and grid == launch.grid and block == kernel.block and stream == 77
        assert shared == kernel.shared_mem
        assert values == [v for _, v in C.bind(launch, inputs, outputs, ws, layout)]
    loads = len(driver.loads)
    assert loads == len({l.kernel for l in seq})  # one module per kernel, not per launch
    launcher.run(shapes, inputs, outputs, ws, stream=77)
    assert len(driver.loads) == loads  # loaded once per context
    driver.context = 2
    launcher.run(shapes, inputs, outputs, ws, stream=77)
    assert len(driver.loads) == 2 * loads  # a new context loads its own modules
    with pytest.raises(LaunchError, match="workspace has 16 bytes"):
        launcher.run(shapes, inputs, outputs, ws, stream=77, workspace_bytes=16)


def test_dry_run_of_the_check_cases(compiled):
    torch = pytest.importorskip("torch")
    from edgeprune.engines.plugins.check import make_case, run_case

    kernels = {k: ck for (sm, k), ck in compiled.items() if sm == 90}
    for op, n, k in (("ZonalTopK", 2880, 320), ("GraphRank", 576, 64)):
        case = make_case(op, n, k, d=32)
        driver = RecordingDriver()
        outputs, ws = run_case(case, PluginLauncher(op, case.attrs, driver=driver, kernels=kernels), 0)
        assert [tuple(o.shape) for o in outputs][0] == (1, k) and ws.dtype == torch.uint8
        ptrs = {t.data_ptr() for t in case.inputs + outputs}
        used = {v for *_, values in driver.launches for v in values if v > 1 << 16}
        assert {t.data_ptr() for t in case.inputs[:1] + outputs[:1]} <= used
        assert all(p in ptrs or ws.data_ptr() <= p < ws.data_ptr() + ws.numel() for p in used)


# ------------------------------------------------------------------------------------------------ plugin modes
def _flavour(name, version, v3=True, aot=False):
    mod = types.ModuleType("fake_trt")
    if v3:
        for attr in ("IPluginV3", "IPluginV3OneCore", "IPluginV3OneBuild", "IPluginV3OneRuntime",
                     "IPluginCreatorV3One", "get_plugin_registry"):
            setattr(mod, attr, object)
    return cap.TrtFlavour(name, mod, version, plugin_api=name == "tensorrt", python_plugins=aot, aot_plugins=aot)


def test_plugin_modes_are_chosen_and_logged(caplog):
    rtx, trt10_3 = _flavour("tensorrt-rtx", "1.7.1"), _flavour("tensorrt", "10.3.0")
    trt10_16, old = _flavour("tensorrt", "10.16.0", aot=True), _flavour("tensorrt", "9.0", v3=False)
    ops = {"ZonalTopK": ZT, "GraphRank": GR}
    with caplog.at_level(logging.INFO, logger="edgeprune.engines.capability"):
        auto = cap.choose_plugin_modes(trt10_16, "auto", ops)
    assert auto["ZonalTopK"][0] == "aot" and auto["GraphRank"][0] == "ipluginv3"
    assert "plugin mode for GraphRank: ipluginv3" in caplog.text and "no AOT form" in auto["GraphRank"][1]
    assert {op: m for op, (m, _) in cap.choose_plugin_modes(rtx, "auto", ops).items()} == \
        {"ZonalTopK": "ipluginv3", "GraphRank": "ipluginv3"}
    assert cap.choose_plugin_modes(trt10_3, "auto", ["ZonalTopK"])["ZonalTopK"][0] == "ipluginv3"
    assert {m for m, _ in cap.choose_plugin_modes(old, "auto", ops).values()} == {"none"}
    aot = cap.choose_plugin_modes(trt10_16, "aot", ops)
    assert aot["ZonalTopK"][0] == "aot" and aot["GraphRank"][0] == "none"
    assert {m for m, _ in cap.choose_plugin_modes(rtx, "none", ops).values()} == {"none"}
    grouped = cap.choose_plugin_modes(rtx, "ipluginv3", {"GraphRank": {**GR, "num_groups": 2}})
    assert grouped["GraphRank"][0] == "none" and "single group" in grouped["GraphRank"][1]
    with pytest.raises(cap.PluginModeError, match="no AOT Python plugins"):
        cap.choose_plugin_modes(rtx, "aot", ops)
    with pytest.raises(cap.PluginModeError, match="has no IPluginV3"):
        cap.choose_plugin_modes(old, "ipluginv3", ops)
    with pytest.raises(cap.PluginModeError, match="unknown plugin mode"):
        cap.choose_plugin_modes(rtx, "jit", ops)
    with pytest.raises(cap.PluginModeError, match="no plugin exists for op 'TopK'"):
        cap.choose_plugin_modes(rtx, "auto", ["TopK"])


def test_rtx_library_symlink(tmp_path):
    (tmp_path / "libtensorrt_rtx.so.1").write_bytes(b"\x7fELF")
    link = cap.ensure_rtx_parser_libs(tmp_path)
    assert link == tmp_path / "libtensorrt_rtx.so" and os.readlink(link) == "libtensorrt_rtx.so.1"
    assert cap.ensure_rtx_parser_libs(tmp_path) == link  # idempotent
    with pytest.raises(cap.PluginModeError, match="has no libtensorrt_rtx.so"):
        cap.ensure_rtx_parser_libs(tmp_path / "empty")
    ro = tmp_path / "ro"
    ro.mkdir()
    (ro / "libtensorrt_rtx.so.1").write_bytes(b"")
    ro.chmod(0o555)
    try:
        if os.access(ro, os.W_OK):  # running as root: permissions do not apply
            pytest.skip("cannot make a read-only folder here")
        with pytest.raises(cap.PluginModeError, match="ln -s libtensorrt_rtx.so.1"):
            cap.ensure_rtx_parser_libs(ro)
    finally:
        ro.chmod(0o755)


def test_importing_the_plugins_package_is_light():
    code = ("import sys\nimport edgeprune.engines.plugins as P\nfrom edgeprune.engines.plugins import contract, "
            "launch, aot\nP.register_plugins\nbad = [m for m in ('tensorrt', 'tensorrt_rtx_bindings', 'triton', "
            "'onnx', 'torch') if m in sys.modules]\nassert not bad, bad\nprint('ok')")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "ok" in proc.stdout, proc.stderr


# ------------------------------------------------------------------------------------------------ on a GPU
@pytest.mark.gpu
@pytest.mark.parametrize("op,n,k", [("ZonalTopK", 576, 64), ("ZonalTopK", 2880, 320), ("GraphRank", 576, 64),
                                    ("GraphRank", 2880, 320)])
def test_launch_path_on_gpu_matches_the_reference(op, n, k, tmp_path):
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    pytest.importorskip("cuda.bindings")
    from edgeprune.engines.plugins.check import make_case, reference_indices, run_case, scores_close

    torch.zeros(1, device="cuda")  # make torch's primary context current for the driver calls
    case = make_case(op, n, k, batch=2, d=256, device="cuda")
    launcher = PluginLauncher(op, case.attrs, cache_dir=str(tmp_path))
    stream = torch.cuda.current_stream().cuda_stream
    (out, *_), ws = run_case(case, launcher, stream)
    torch.cuda.synchronize()
    ref = reference_indices(case)
    if op == "GraphRank":
        assert scores_close(case, ws)  # fp32 scores agree to rounding (kernels/graph_rank.py)
    if case.exact:  # always for ZonalTopK; for GraphRank unless the input has a near-tie at the K-th score
        assert torch.equal(out.cpu(), ref)
    else:
        for got_row, ref_row in zip(out.cpu().tolist(), ref.tolist()):  # only tokens at the near-tie swap
            assert len(set(got_row) ^ set(ref_row)) <= 4
