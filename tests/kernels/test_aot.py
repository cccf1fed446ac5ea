"""Ahead-of-time PTX of the fused kernels (edgeprune/kernels/aot.py): sm_87 / sm_90 / sm_110 without a GPU.

Every kernel of ZonalTopK and GraphRank is compiled for the three targets, its PTX checked against the launch
contract (entry name, parameter count = ``arg_order``, ``.reqntid`` = block, PTX ISA version), and assembled
by ptxas where one is available. On a GPU, the PTX is also loaded with the CUDA driver API and launched with
exactly the contract, and must reproduce the torch-facing wrappers.
"""

from __future__ import annotations

import ctypes
import re
import subprocess
import sys

import pytest
import torch

pytest.importorskip("triton")

from edgeprune.errors import EdgepruneError, UnknownNameError  # noqa: E402
from edgeprune.kernels import aot, compile_ptx, compile_sequence  # noqa: E402

TARGETS = {87: "sm_87", 90: "sm_90a", 110: "sm_110a"}


def check_contract(kernel, sm: int) -> None:
    """The PTX agrees with the launch contract the plugin will use."""
    ptx = kernel.ptx
    assert re.search(rf"^\.target {TARGETS[sm]}$", ptx, re.M)
    version = re.search(r"^\.version (\d+)\.(\d+)$", ptx, re.M)
    assert version and int(version[1]) * 10 + int(version[2]) == kernel.ptx_version == aot.DEFAULT_PTX_VERSION[sm]
    entry = re.search(rf"\.entry {kernel.kernel_name}\(([^)]*)\)", ptx)
    assert entry, "the kernel entry is missing"
    assert entry[1].count(".param") == len(kernel.arg_order), "PTX parameters != arg_order (hidden params?)"
    assert f".reqntid {kernel.block[0]}" in ptx and kernel.block == (32 * kernel.num_warps, 1, 1)
    assert kernel.shared_mem <= 48 * 1024, "more than 48 KiB needs an opt-in attribute at launch"
    if aot.find_ptxas(sm) is not None:
        assert kernel.cubin is not None and kernel.cubin[:4] == b"\x7fELF"
    else:
        assert kernel.cubin is None


@pytest.mark.parametrize("sm", sorted(TARGETS))
def test_every_kernel_compiles_for_every_target(sm, ptx_cache):
    zonal = compile_sequence("zonal_topk", sm, cache_dir=ptx_cache, K=64, tau=0.05, B=2, N=576)
    assert [k.op for k in zonal] == ["zonal_topk"] and zonal[0].grid == (2, 1, 1)
    check_contract(zonal[0], sm)
    assert [name for name, _ in zonal[0].arg_order] == ["scores", "rel", "zone", "order", "sizes", "N", "Z", "out",
                                                         "quota", "ws"]
    seq = compile_sequence("graph_rank", sm, cache_dir=ptx_cache, K=320, steps=5, B=1, N=2880)
    ops = [k.op.split(".")[1] for k in seq]
    assert ops == ["norm", "sim"] + ["step"] * 5 + ["select", "emit"]
    for kernel in seq:
        check_contract(kernel, sm)
        assert kernel.grid[0] == 1 and kernel.grid[1] >= 1
    sim = seq[1]
    assert sim.constants["THETA"] == 0.5 and sim.constants["PRECISION"] == "ieee"
    assert sim.grid == (1, -(-2880 // sim.constants["BLOCK_M"]), 1)


def test_tau_is_baked_as_an_exact_double(ptx_cache):
    kernel = compile_ptx("zonal_topk", 87, cache_dir=ptx_cache, K=64, tau=0.05)
    assert "0d3FA999999999999A" in kernel.ptx  # 0.05 as a double; an fp32 constant would read 0f3D4CCCCD


def test_zone_mean_variant_takes_fp32_token_relevance(ptx_cache):
    kernel = compile_ptx("zonal_topk", 90, cache_dir=ptx_cache, K=320, tau=0.05, zone_mean=True)
    assert dict(kernel.arg_order)["rel"] == "*fp32" and kernel.constants["ZONE_MEAN"] is True
    check_contract(kernel, 90)


def test_cache_hits_and_keys(ptx_cache):
    first = compile_ptx("graph_rank.emit", 110, cache_dir=ptx_cache, K=64)
    again = compile_ptx("graph_rank.emit", 110, cache_dir=ptx_cache, K=64)
    assert again == first
    other = compile_ptx("graph_rank.emit", 110, cache_dir=ptx_cache, K=65)
    assert other.constants["K"] == 65 and other.ptx != first.ptx
    names = {p.name for p in ptx_cache.iterdir()}
    assert any(n.startswith("graph_rank.emit-sm110-") and n.endswith(".ptx") for n in names)
    assert "triton" in names  # Triton's own cache is kept inside the caller's directory
    assert not any(n.startswith(".tmp-") for n in names)


def test_bad_requests(ptx_cache):
    with pytest.raises(UnknownNameError, match="zonal_topk"):
        compile_ptx("graph_rank", 87, cache_dir=ptx_cache)
    with pytest.raises(UnknownNameError):
        compile_sequence("fitprune", 87, cache_dir=ptx_cache)
    with pytest.raises(EdgepruneError, match="sm must be one of"):
        compile_ptx("zonal_topk", 70, cache_dir=ptx_cache, K=4, tau=0.1)
    with pytest.raises(EdgepruneError, match="PTX ISA >= 9.0"):
        compile_ptx("zonal_topk", 110, cache_dir=ptx_cache, K=4, tau=0.1, ptx_version=88)
    with pytest.raises(EdgepruneError, match="missing"):
        compile_ptx("zonal_topk", 87, cache_dir=ptx_cache, tau=0.1)
    with pytest.raises(EdgepruneError, match="unknown"):
        compile_ptx("graph_rank.step", 87, cache_dir=ptx_cache, K=4)
    with pytest.raises(EdgepruneError, match="unknown constants"):
        compile_sequence("graph_rank", 87, cache_dir=ptx_cache, K=4, kk=1)


def test_hidden_parameters_are_kept_when_used():
    ptx = (".visible .entry k(\n\t.param .u64 k_param_0,\n\t.param .u64 k_param_1\n)\n"
           "{\n\tld.param.u64 %rd1, [k_param_1];\n}")
    assert aot._strip_hidden_params(ptx, "k", 1) == ptx
    unused = ptx.replace("k_param_1]", "k_param_0]")
    stripped = aot._strip_hidden_params(unused, "k", 1)
    assert "k_param_1" not in stripped and "k_param_0\n)" in stripped


def test_importing_the_package_loads_neither_triton_nor_torch():
    code = ("import sys, edgeprune.kernels as K\nK.compile_ptx\n"
            "assert 'triton' not in sys.modules and 'torch' not in sys.modules, sorted(sys.modules)\nprint('ok')")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "ok" in proc.stdout, proc.stderr


# ------------------------------------------------------------------------------------------- on a GPU
class _Driver:
    """Just enough of the CUDA driver API (ctypes) to load PTX and launch it the way a plugin does."""

    def __init__(self) -> None:
        self.lib = ctypes.CDLL("libcuda.so.1")
        vp, ui = ctypes.c_void_p, ctypes.c_uint
        self.lib.cuLaunchKernel.argtypes = [vp, ui, ui, ui, ui, ui, ui, ui, vp, ctypes.POINTER(vp), ctypes.POINTER(vp)]
        self.lib.cuModuleLoadData.argtypes = [ctypes.POINTER(vp), ctypes.c_char_p]
        self.lib.cuModuleGetFunction.argtypes = [ctypes.POINTER(vp), vp, ctypes.c_char_p]

    def launch(self, kernel, tensors: dict, scalars: dict) -> None:
        module, fn = ctypes.c_void_p(), ctypes.c_void_p()
        assert self.lib.cuModuleLoadData(ctypes.byref(module), kernel.ptx.encode()) == 0
        assert self.lib.cuModuleGetFunction(ctypes.byref(fn), module, kernel.kernel_name.encode()) == 0
        values = [ctypes.c_void_p(tensors[n].data_ptr()) if t.startswith("*") else ctypes.c_int32(scalars[n])
                  for n, t in kernel.arg_order]
        params = (ctypes.c_void_p * len(values))(*[ctypes.cast(ctypes.byref(v), ctypes.c_void_p) for v in values])
        stream = ctypes.c_void_p(torch.cuda.current_stream().cuda_stream)
        assert self.lib.cuLaunchKernel(fn, *kernel.grid, *kernel.block, kernel.shared_mem, stream, params, None) == 0


@pytest.mark.gpu
def test_ptx_launched_through_the_driver_matches_the_wrappers(ptx_cache):
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    major, minor = torch.cuda.get_device_capability()
    sm = major * 10 + minor
    if sm not in aot.SUPPORTED_SM:
        pytest.skip(f"no AOT target for sm_{sm}")
    from edgeprune.kernels.graph_rank import graph_rank
    from edgeprune.kernels.zonal_topk import zonal_topk
    from edgeprune.methods import gridprune_fn as G

    drv, dev = _Driver(), "cuda"
    torch.zeros(1, device=dev)  # make torch's primary context current for the driver calls
    b, n, z, k = 2, 576, 16, 64
    zone = torch.arange(n) // 36
    scores, rel = torch.rand(b, n, device=dev), G.zone_mean(torch.rand(b, n), zone, z).to(dev)
    i32, i64 = {"dtype": torch.int32, "device": dev}, {"dtype": torch.int64, "device": dev}
    order = torch.argsort(zone, stable=True).int().to(dev)
    t = {"scores": scores, "rel": rel, "zone": zone.int().to(dev), "order": order,
         "sizes": torch.bincount(zone, minlength=z).int().to(dev), "out": torch.empty(b, k, **i32),
         "quota": torch.empty(b, z, **i32), "ws": torch.empty(b, 3 * z, **i64)}
    drv.launch(compile_ptx("zonal_topk", sm, cache_dir=ptx_cache, K=k, tau=0.05, B=b, N=n), t, {"N": n, "Z": z})
    torch.cuda.synchronize()
    assert torch.equal(t["out"], zonal_topk(scores, zone.to(dev), k, 0.05, zone_relevance=rel))

    x, steps = torch.randn(b, n, 64, device=dev), 3
    f32 = {"dtype": torch.float32, "device": dev}
    g = {"x": x, "norm": torch.empty(b, n, **f32), "attn": torch.empty(b, n, n, **f32), "deg": torch.empty(b, n, **f32),
         "score": torch.empty(b, n, **f32), "thr": torch.empty(b, dtype=torch.int32, device=dev),
         "out": torch.empty(b, k, dtype=torch.int32, device=dev)}
    bufs = (torch.empty(b, n, **f32), torch.empty(b, n, **f32))
    for i, kernel in enumerate(compile_sequence("graph_rank", sm, cache_dir=ptx_cache, K=k, steps=steps, B=b, N=n)):
        step = i - 2  # launches: norm, sim, steps x step, select, emit
        g["v_in"] = g["norm"] if step == 0 else bufs[(step - 1) % 2]
        g["v_out"] = bufs[step % 2] if 0 <= step < steps else None
        g["v"] = bufs[(steps - 1) % 2] if steps else g["norm"]
        drv.launch(kernel, g, {"N": n, "D": 64})
    torch.cuda.synchronize()
    assert torch.equal(g["out"], graph_rank(x, k, steps=steps))
