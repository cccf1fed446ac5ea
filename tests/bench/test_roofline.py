"""Roofline figures of ``edgeprune bench``: ceilings measured on this machine are positive finite numbers, every
figure computed from given inputs is exact arithmetic, the report names the furthest stage, and the machine
record carries the CPU's ISA and the library versions. No test asserts on wall-clock time."""

from __future__ import annotations

import math

import pytest

from edgeprune.bench import roofline as RF
from edgeprune.bench.system import cpu_isa, machine_info, versions

CEIL = {"flops_per_s": 1e11, "bytes_per_s": 1e10}


def test_measured_ceilings_are_positive_finite():
    pytest.importorskip("torch")
    pytest.importorskip("onnxruntime")
    got = RF.measure_ceilings(["torch", "ort", "numpy"], "fp32", "cpu", ["CPUExecutionProvider"], 1, quick=True)
    assert set(got) == {"torch", "ort", "numpy"}
    for backend, c in got.items():
        assert c["error"] is None, (backend, c["error"])
        for key in ("flops_per_s", "bytes_per_s"):
            assert math.isfinite(c[key]) and c[key] > 0, (backend, key, c[key])
        assert c["quick"] is True and c["threads"] == 1
    assert "MatMul" in got["ort"]["gemm"] and "torch.matmul" in got["torch"]["gemm"]


def test_a_ceiling_that_cannot_be_measured_is_recorded_not_substituted(monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("no such kernel")

    monkeypatch.setattr(RF, "measure_gemm_torch", broken)
    logged = []
    got = RF.measure_ceilings(["torch"], "fp32", "cpu", ["CPUExecutionProvider"], 1, quick=True, log=logged.append)
    assert got["torch"]["flops_per_s"] is None and "no such kernel" in got["torch"]["error"]
    assert got["torch"]["bytes_per_s"] > 0 and any("not measured" in m for m in logged)


def test_stage_roofline_exact():
    # 1 GFLOP and 0.2 GB in 100 ms against 100 GFLOP/s and 10 GB/s: compute 10 ms, memory 20 ms -> memory-bound.
    fig = RF.stage_roofline(1e9, 2e8, 0.1, CEIL)
    assert fig["flops_per_s"] == pytest.approx(1e10) and fig["bytes_per_s"] == pytest.approx(2e9)
    assert fig["flops_fraction"] == pytest.approx(0.1) and fig["bytes_fraction"] == pytest.approx(0.2)
    assert fig["bound"] == "memory" and fig["roofline_ms"] == pytest.approx(20.0)
    assert fig["efficiency"] == pytest.approx(0.2) and fig["ms"] == pytest.approx(100.0)
    fig = RF.stage_roofline(5e10, 1e6, 1.0, CEIL)  # 500 ms of compute, 0.1 ms of memory
    assert fig["bound"] == "compute" and fig["efficiency"] == pytest.approx(0.5)
    missing = RF.stage_roofline(1e9, 1e8, 0.1, None)
    assert missing["flops_per_s"] == pytest.approx(1e10) and missing["flops_fraction"] is None
    assert missing["efficiency"] is None and missing["bound"] is None
    half = RF.stage_roofline(1e9, 1e8, 0.1, {"flops_per_s": 1e11, "bytes_per_s": None})
    assert half["bound"] is None and half["efficiency"] == pytest.approx(0.1)  # the known term still bounds it


def _row(backend="ort", method="none", k=576, vision=50.0, prefill=100.0, step=10.0):
    return {"backend": backend, "method": method, "kept_tokens": k, "status": "ok",
            "stages": {"vision": {"p50_ms": vision, "min_ms": vision / 2},
                       "prefill": {"p50_ms": prefill, "min_ms": prefill / 2}},
            "decode_step": {"p50_ms": step, "min_ms": step / 2},
            "flops": {"vision": 4e9, "projector": 1e9, "prefill": 5e9, "decode_first_step": 1e8,
                      "vision_bytes": 1e7, "prefill_bytes": 5e7, "decode_bytes_first_step": 5e7}}


def test_row_roofline_exact_and_decode_bandwidth_bound():
    roof = RF.row_roofline(_row(), CEIL)
    # vision: (4 + 1) GFLOP in 50 ms = 100 GFLOP/s = 100 % of the ceiling.
    assert roof["vision"]["flops_fraction"] == pytest.approx(1.0) and roof["vision"]["bound"] == "compute"
    assert roof["prefill"]["flops_fraction"] == pytest.approx(0.5) and roof["prefill"]["efficiency"] == pytest.approx(0.5)
    dec = roof["decode_step"]
    # 50 MB per step at 10 GB/s: 5 ms, i.e. 200 tokens/s bound; measured 10 ms = 100 tokens/s = 50 %.
    assert dec["bound"] == "memory" and dec["bytes_fraction"] == pytest.approx(0.5)
    assert dec["bound_tokens_per_s"] == pytest.approx(200.0) and dec["tokens_per_s"] == pytest.approx(100.0)
    quiet = RF.row_roofline(_row(), CEIL, statistic="min")
    assert quiet["decode_step"]["tokens_per_s"] == pytest.approx(200.0)
    old = _row()
    del old["flops"]["vision_bytes"]  # a results file from before the roofline: figures degrade to None
    assert RF.row_roofline(old, CEIL)["vision"]["bytes_fraction"] is None


def test_furthest_names_the_lowest_efficiency_stage_and_checks():
    a, b = _row(), _row(method="cls-topk", k=64, prefill=400.0)
    for r in (a, b):
        r["roofline"] = RF.row_roofline(r, CEIL)
    far = RF.furthest([a, b])
    assert far == {"backend": "ort", "method": "cls-topk", "kept_tokens": 64, "stage": "prefill",
                   "efficiency": pytest.approx(0.125), "bound": "compute"}
    assert RF.furthest([{**a, "roofline": None}]) is None
    checks = {c["target"]: c for c in RF.roofline_checks([a, b])}
    assert checks["roofline_vision"]["met"] is True and checks["roofline_vision"]["method"] == "none"
    assert checks["roofline_prefill"]["value"] == pytest.approx(0.5) and checks["roofline_prefill"]["met"] is True
    assert checks["roofline_decode_step"]["value"] == pytest.approx(0.5)
    assert checks["roofline_decode_step"]["met"] is False  # 50 % < 70 % of the bandwidth bound
    assert RF.roofline_checks([{**a, "backend": "torch"}]) == []


def test_report_lines_name_ceilings_and_furthest_stage():
    from edgeprune.bench.report import _roofline_lines

    doc = {"ceilings": {"ort": {**CEIL, "gemm": "ONNX Runtime MatMul", "error": None, "quick": False}},
           "roofline_furthest": {"backend": "ort", "method": "none", "kept_tokens": 576, "stage": "decode_step",
                                 "efficiency": 0.25, "bound": "memory"}}
    lines = _roofline_lines(doc)
    assert "100.0 GFLOP/s" in lines[0] and "10.0 GB/s" in lines[0]
    assert "decode_step of ort none K=576 at 25 % of its memory bound" in lines[1]


def test_cpu_isa_parses_x86_and_arm():
    x86 = "processor : 0\nflags : fpu sse4_2 avx avx2 fma avx512f avx512_bf16 amx_tile amx_bf16 amx_int8\n"
    isa = cpu_isa(x86)
    assert isa["flags"] == ["sse4_2", "avx", "avx2", "fma", "avx512f", "avx512_bf16", "amx_tile", "amx_bf16",
                            "amx_int8"] and isa["arm_cores"] is None
    arm = "".join(f"processor : {i}\nFeatures : fp asimd asimdhp asimddp i8mm\nCPU part : 0xd42\n" for i in range(8))
    isa = cpu_isa(arm)
    assert isa["flags"] == ["asimd", "asimdhp", "asimddp", "i8mm"] and isa["arm_cores"] == {"Cortex-A78AE": 8}
    assert cpu_isa("")["flags"] == []


def test_machine_record_has_isa_and_versions():
    info = machine_info()
    assert info["cpu"] and isinstance(info["isa"]["flags"], list) and info["isa"]["arch"]
    v = versions()
    for lib in ("numpy", "pillow", "onnxruntime", "torch", "onnx"):
        assert lib in v
    assert v["numpy"]


def test_merge_ceilings_keeps_the_better_measurement():
    a = {"ort": {"flops_per_s": 1e10, "bytes_per_s": 5e9, "error": None}}
    b = {"ort": {"flops_per_s": 2e10, "bytes_per_s": 4e9, "error": None}}
    got = RF.merge_ceilings(a, b)["ort"]
    assert got["flops_per_s"] == 2e10 and got["bytes_per_s"] == 5e9 and got["measurements"] == 2
    broken = RF.merge_ceilings({"ort": {"flops_per_s": None, "bytes_per_s": 5e9, "error": "gemm: x"}},
                               {"ort": {"flops_per_s": None, "bytes_per_s": 6e9, "error": "gemm: x"}})["ort"]
    assert broken["flops_per_s"] is None and broken["error"] == "gemm: x" and broken["bytes_per_s"] == 6e9
