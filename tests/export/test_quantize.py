"""Weight-only INT4/INT8 LLM graphs (``edgeprune export --weights``): which nodes are quantized (every LLM matmul,
the LM head included; nothing in vision/embed), the manifest's scheme, the export's accuracy report, ONNX Runtime
end to end through the pipeline, ``compare``'s quantized tolerance, ``--reuse`` across schemes, and every bad flag
as one error line with nothing written. One tiny-llava int4 export per module (the slow part, ~30-50 s)."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from edgeprune.bundle.format import MANIFEST
from edgeprune.errors import ExportError
from edgeprune.export import quantize as Q
from edgeprune.export.exporter import export_bundle

QUIET = {"log": lambda msg: None}
# Measured on tiny-llava (seeded random weights; the quantizer is deterministic): int4 RTN block 32 moves the
# logits by 8.2 % of max(1, |ref|) on the validation feeds. The bounds leave 2.5x margin; a broken quantization
# (transposed or misaligned weights) gives O(100 %).
TINY_INT4_REL_ERR = 0.2


@pytest.fixture(scope="module")
def int4_bundle(tmp_path_factory, tiny_llava):
    root = tmp_path_factory.mktemp("quant") / "tiny-int4"
    export_bundle(tiny_llava, "none", out_dir=root, weights=Q.weight_config("int4", 32), **QUIET)
    return root


def _manifest(root):
    return json.loads((root / MANIFEST).read_text())


def _ops(path):
    proto = onnx.load(str(path), load_external_data=False)
    return Q.op_counts(proto), {n.op_type for n in proto.graph.node}


def test_every_llm_matmul_is_matmulnbits_and_nothing_else_is(int4_bundle, tiny_llava):
    layers = tiny_llava.config.text_config.num_hidden_layers
    for name in ("decoder.onnx", "decoder.ort.onnx"):
        counts, _ = _ops(int4_bundle / name)
        # q, k, v, o, gate, up, down per layer, and the LM head (a Gemm in the export, rewritten to MatMul)
        assert counts == {"MatMulNBits": 7 * layers + 1, "MatMul": 0, "Gemm": 0, "DequantizeLinear": 0}, name
    for name in ("vision.onnx", "embed.onnx"):
        counts, types = _ops(int4_bundle / name)
        assert counts["MatMulNBits"] == 0 and "MatMulNBits" not in types, name
    vision_counts, _ = _ops(int4_bundle / "vision.onnx")
    assert vision_counts["MatMul"] + vision_counts["Gemm"] > 0  # still fp32 matmuls


def test_manifest_records_the_scheme_and_the_accuracy(int4_bundle):
    m = _manifest(int4_bundle)
    assert {k: m["weights"][k] for k in ("scheme", "bits", "block_size", "method", "format", "accuracy_level")} == \
        {"scheme": "int4", "bits": 4, "block_size": 32, "method": "rtn", "format": "matmulnbits", "accuracy_level": 4}
    assert m["weights"]["graphs"] == ["decoder"] and m["weights"]["files"] == ["decoder.onnx", "decoder.ort.onnx"]
    assert m["model"]["dtype"] == "fp32" and "weights" not in m["graphs"]["vision"]
    w = m["graphs"]["decoder"]["weights"]
    assert w["weight_bytes"] < w["fp32_weight_bytes"] / 4  # 4-bit codes + fp32 scales + 4-bit zero points
    for file, check in w["check"].items():
        assert check["logits_rel_err"] <= TINY_INT4_REL_ERR, file
        assert check["positions"] == 4 and 0 <= check["agree"] <= 4 and check["bound"] == Q.EXPORT_BOUNDS["int4"]
    # the variant shares the portable graph's quantized weights, and every file is hashed
    assert m["graphs"]["decoder"]["variants"]["ort"]["data_files"] == ["decoder.onnx.data"]
    assert set(m["graphs"]["decoder"]["files"]) <= set(m["files"])
    assert not (int4_bundle / "decoder.ort.onnx.data").exists()


def test_ort_runs_the_quantized_bundle_end_to_end(int4_bundle):
    from edgeprune.runtime.ort_backend import build_ort_pipeline
    from edgeprune.runtime.preprocess import default_image

    pipe = build_ort_pipeline(int4_bundle)
    assert pipe.backend.runners["decoder"].path.name == "decoder.ort.onnx"
    result = pipe.run(default_image(), "What is in the image?", max_new_tokens=5)
    assert len(result.tokens) == 5 and result.stop_reason == "max_new_tokens"


def test_compare_uses_the_quantized_tolerance_and_reports_agreement(int4_bundle):
    from dataclasses import replace

    from PIL import Image

    from edgeprune.eval.compare import compare_bundle

    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (336, 336, 3), dtype=np.uint8))
    report = compare_bundle(int4_bundle, "torch,ort", image=image, prompt="Describe the picture.", max_new_tokens=6)
    assert report.tolerance.weights == "int4" and report.tolerance.logits == Q.EXPORT_BOUNDS["int4"]
    assert report.tolerance.value == 1e-4  # vision / embed are not quantized and keep the fp32 bound
    assert all(c.passed for c in report.checks if c.stage not in ("prefill", "decode")), report.table()
    logits = [c for c in report.checks if c.output == "logits"]
    assert logits and all(c.passed and c.max_abs > 1e-3 for c in logits)  # not exact, within the int4 bound
    table = report.table()
    assert "int4 LLM weights: logits tol 0.6" in table and f"agreement {report.tokens.agreement:.0%}" in table
    assert report.passed and report.to_dict()["tokens"]["agreement"] == report.tokens.agreement
    strict = compare_bundle(int4_bundle, "torch,ort", image=image, prompt="Describe the picture.", max_new_tokens=6,
                            tolerance=replace(report.tolerance, min_agreement=1.01))  # a gate no run can meet
    assert not strict.passed and "need >= 101%" in strict.table()


def test_reuse_never_mixes_weight_schemes(int4_bundle, tiny_llava):
    m = _manifest(int4_bundle)
    int4, int8 = Q.weight_config("int4", 32), Q.weight_config("int8", 32)
    assert Q.same_weights(m["graphs"]["decoder"], int4, True)
    assert not Q.same_weights(m["graphs"]["decoder"], int8, True)
    assert not Q.same_weights(m["graphs"]["decoder"], None, True)  # an fp32 export does not take int4 graphs
    assert Q.same_weights(m["graphs"]["vision"], int8, False) and Q.same_weights(m["graphs"]["vision"], None, False)


def _toy_graph(k: int, n: int, m_out: int, rng) -> onnx.ModelProto:
    """x [2, k] -> MatMul(W1 [k, n]) -> Gemm(W2 [m_out, n], bias, transB=1, beta=0.5) -> y [2, m_out]."""
    w1 = numpy_helper.from_array(rng.standard_normal((k, n)).astype(np.float32), "w1")
    w2 = numpy_helper.from_array(rng.standard_normal((m_out, n)).astype(np.float32), "w2")
    b = numpy_helper.from_array(rng.standard_normal(m_out).astype(np.float32), "b")
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"], name="mm"),
             helper.make_node("Gemm", ["h", "w2", "b"], ["y"], name="head", transB=1, beta=0.5)]
    graph = helper.make_graph(nodes, "toy", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, k])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, m_out])], [w1, w2, b])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=9)


def _run(proto, x):
    return ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]


def test_gemm_rewrite_is_exact_in_fp32():
    rng = np.random.default_rng(0)
    proto = _toy_graph(64, 96, 40, rng)
    x = rng.standard_normal((2, 64)).astype(np.float32)
    ref = _run(proto, x)
    assert Q.gemm_to_matmul(proto) == 1
    assert [n.op_type for n in proto.graph.node] == ["MatMul", "MatMul", "Add"]
    np.testing.assert_allclose(_run(proto, x), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("scheme,block,method,bound", [("int8", 32, "rtn", 0.02), ("int4", 32, "rtn", 0.15),
                                                       ("int4", 128, "rtn", 0.2), ("int4", 64, "hqq", 0.15)])
def test_quantize_proto_on_a_toy_graph(scheme, block, method, bound):
    rng = np.random.default_rng(1)
    proto = _toy_graph(256, 128, 64, rng)
    x = rng.standard_normal((2, 256)).astype(np.float32)
    ref = _run(proto, x)
    quantized, counts = Q.quantize_proto(proto, Q.weight_config(scheme, block, method))
    assert counts == {"MatMulNBits": 2, "MatMul": 0, "Gemm": 0, "DequantizeLinear": 0}
    levels = {a.i for n in quantized.graph.node if n.op_type == "MatMulNBits" for a in n.attribute
              if a.name == "accuracy_level"}
    bits = {a.i for n in quantized.graph.node if n.op_type == "MatMulNBits" for a in n.attribute if a.name == "bits"}
    assert levels == {Q.DEFAULT_ACCURACY_LEVEL} and bits == {Q.SCHEMES[scheme]}
    got = _run(quantized, x)
    rel = float(np.abs(got - ref).max() / np.abs(ref).max())
    assert 0 < rel <= bound  # not exact (it is quantized), but close


@pytest.mark.parametrize("argv,phrase", [
    (["--weights", "int3"], "--weights must be one of int4, int8; got 'int3'"),
    (["--weights", "int4", "--block-size", "7"], "--block-size must be one of 32, 64, 128; got 7"),
    (["--weights", "int4", "--quant-method", "awq"], "awq is not available"),
    (["--weights", "int4", "--quant-method", "gptq"], "--quant-method must be one of"),
    (["--weights", "int8", "--quant-method", "hqq"], "hqq is int4 only"),
    (["--weights", "int4", "--dtype", "fp16"], "--weights needs --dtype fp32"),
    (["--weights", "int4", "--quant-accuracy-level", "5"], "--quant-accuracy-level must be one of"),
    (["--block-size", "32"], "--block-size only applies to weight-only quantization"),
])
def test_bad_quantization_flags_are_one_error_line_and_write_nothing(argv, phrase, tmp_path, capsys, monkeypatch):
    from edgeprune import cli
    from edgeprune.models import loader

    def no_model(*args, **kwargs):  # the flags are checked before any model is loaded
        raise AssertionError("a model was loaded before the flags were checked")

    monkeypatch.setattr(loader, "load_model", no_model)
    code = cli.main(["export", "--model", "tiny-llava", "--out", str(tmp_path / "b"), *argv])
    _, err = capsys.readouterr()
    assert code == 2 and err.count("\n") == 1 and "error:" in err, err
    assert phrase in err and "Traceback" not in err
    assert list(tmp_path.iterdir()) == []


def test_weight_config_api_rechecks_the_dtype(tiny_llava, tmp_path):
    with pytest.raises(ExportError, match="--dtype fp32"):
        export_bundle("tiny-llava", "none", out_dir=tmp_path / "b", dtype="fp16", weights=Q.WeightConfig("int4"),
                      **QUIET)
    assert list(tmp_path.iterdir()) == []


def test_qdq_format_is_blockwise_dequantize_linear_that_ort_runs():
    scheme = "int4"
    rng = np.random.default_rng(2)
    proto = _toy_graph(256, 128, 64, rng)
    x = rng.standard_normal((2, 256)).astype(np.float32)
    ref = _run(proto, x)
    quantized, counts = Q.quantize_proto(proto, Q.weight_config(scheme, 32, fmt="qdq"), qdq=True)
    assert counts == {"MatMulNBits": 0, "MatMul": 0, "Gemm": 0, "DequantizeLinear": 2}
    assert next(o.version for o in quantized.opset_import if o.domain in ("", "ai.onnx")) == Q.QDQ_OPSET
    dq = [n for n in quantized.graph.node if n.op_type == "DequantizeLinear"]
    assert all({a.name: a.i for a in n.attribute}.get("block_size") == 32 for n in dq)
    assert all(len(n.input) == 2 for n in dq)  # symmetric: no zero points (TensorRT takes none)
    onnx.checker.check_model(quantized)
    rel = float(np.abs(_run(quantized, x) - ref).max() / np.abs(ref).max())
    assert 0 < rel <= 0.2


def test_qdq_needs_whole_blocks_and_rtn():
    rng = np.random.default_rng(3)
    with pytest.raises(ExportError, match=r"multiple of --block-size 128.*\[96\]. Use --block-size 32"):
        Q.quantize_proto(_toy_graph(96, 128, 64, rng), Q.weight_config("int4", 128, fmt="qdq"), qdq=True)
    with pytest.raises(ExportError, match="--weights-format qdq needs --quant-method rtn"):
        Q.weight_config("int4", 32, "hqq", fmt="qdq")
    with pytest.raises(ExportError, match="--weights-format qdq writes int4 only"):
        Q.weight_config("int8", 32, fmt="qdq")
    with pytest.raises(ExportError, match="--weights-format must be one of matmulnbits, qdq"):
        Q.weight_config("int4", 32, fmt="gguf")


def test_tensorrt_rtx_builds_the_qdq_form_and_not_fp32_matmulnbits(tmp_path):
    """The form written for TensorRT is what its parser and builder take (TensorRT for RTX builds on a CPU)."""
    pytest.importorskip("tensorrt_rtx_bindings")
    from edgeprune.engines import rtx
    from edgeprune.engines.rtx import EngineBuildError

    rng = np.random.default_rng(4)
    profile = [("x", (2, 256), (2, 256), (2, 256))]
    for fmt, qdq in (("qdq", True), ("matmulnbits", False)):
        quantized, _ = Q.quantize_proto(_toy_graph(256, 128, 64, rng), Q.weight_config("int4", 32, fmt=fmt), qdq=qdq)
        path = tmp_path / f"toy_{fmt}.onnx"
        onnx.save(quantized, str(path))
        if qdq:
            build = rtx.build_engine(path, profile, tmp_path / "toy_qdq.plan", flavour="tensorrt-rtx")
            assert (tmp_path / "toy_qdq.plan").stat().st_size > 0 and build is not None
        else:
            with pytest.raises(EngineBuildError, match="MatMulNBits"):
                rtx.build_engine(path, profile, tmp_path / "toy_nbits.plan", flavour="tensorrt-rtx")


def test_in_llm_kept_tokens_of_a_quantized_bundle_are_compared_by_overlap():
    from edgeprune.eval.checks import Checker, quantized_tolerance

    ck = Checker(quantized_tolerance({"scheme": "int8"}, "fp32"), ("torch", "ort"))
    check = ck.overlap("prefill", "kept", np.array([1, 2, 3, 5]), np.array([1, 2, 3, 4]))
    assert check.passed and check.kind == "overlap" and check.mismatches == 1 and "3/4 shared" in check.detail
    assert not ck.overlap("prefill", "kept", np.array([1, 2]), np.array([1, 2, 3])).passed  # K must match
    assert quantized_tolerance(None, "fp32") is None and quantized_tolerance({"scheme": "int4"}, "fp32").logits == 0.6
