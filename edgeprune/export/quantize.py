"""Weight-only INT4 / INT8 LLM graphs (``edgeprune export --weights int4|int8``), with ONNX Runtime's quantizer.

Decode is bound by memory bandwidth: every step reads every weight of the decoder once. Storing the LLM's
weights in 4 or 8 bits (block-wise scales, activations stay fp32) cuts those bytes 7x / 3.6x. Only the LLM
graphs are quantized (``decoder`` and FastV / FitPrune's ``prefill``, and their fused-attention ``.ort.onnx``
variants); ``vision``, ``guidance``, ``prune`` and ``embed`` (a Gather, read one row per token) stay as exported.

How (:func:`quantize_proto`): every ``MatMul`` and ``Gemm`` with a constant weight becomes ONNX Runtime's
``com.microsoft.MatMulNBits`` (``onnxruntime.quantization.matmul_nbits_quantizer.MatMulNBitsQuantizer``). The
exporter writes the LM head as ``Gemm(transB=1)`` (its input is the selected last token, 2-D), which the
quantizer does not take, so such a Gemm is first rewritten as ``MatMul`` with the transposed weight (+ ``Add`` for
a bias): the head is the largest matrix of a small model (mini-llava: 65 of its 116 MB). Methods:

- ``rtn``: ONNX Runtime's default block-wise round-to-nearest (``DefaultWeightOnlyQuantConfig``), asymmetric
  (a zero point per block), int4 or int8. No calibration data.
- ``hqq``: Half-Quadratic Quantization (``HQQWeightOnlyQuantConfig``; int4 only: the CPU kernel does not run
  8-bit weights with its float zero points): optimises each block's scale
  and zero point against the weights; no calibration data; needs torch (an export dependency anyway).
- ``awq``: refused with a reason. ONNX Runtime 1.32's only AWQ is ``nvidia_awq``, which needs the
  ``nvidia-modelopt`` package and a calibration data reader over real activations; edgeprune ships neither.
  (Its ``RTN``/``GPTQ`` configs need Intel Neural Compressor; ``rtn`` here is the built-in default quantizer.)

``accuracy_level`` (MatMulNBits attribute, :data:`ACCURACY_LEVELS`) picks the compute type of the kernel; 4
(int8: activations quantized per block on the fly, VNNI/AMX/NEON-dot kernels) is the default because it is the
fast path on the CPUs measured (benchmarks/RESULTS.md, "Weight-only quantization"); int8 weights at level 0 take
a slow dequantize-then-fp32 path there.

Formats (``--weights-format``, :data:`FORMATS`). ``matmulnbits`` (default): every LLM file gets MatMulNBits, a
``com.microsoft`` contrib op: ONNX Runtime runs it; TensorRT for RTX 1.7 imports it only with fp16 activations
(its parser: "input tensor A must be FP16"), which these fp32 graphs are not; TensorRT 10.x's documented route
is the next one. ``qdq``:
the portable graph (``decoder.onnx``, which TensorRT builds) gets the form TensorRT takes for weight-only
quantization, symmetric block-wise ``DequantizeLinear`` (int4 with ``block_size``, opset 21; int8 is refused:
the quantizer has no int8 QDQ form) before a
plain ``MatMul`` (the graph's opset becomes 21), while ``decoder.ort.onnx`` keeps MatMulNBits for ONNX Runtime
(each file then has its own sidecar). TensorRT wants whole blocks, so every weight's input size must be a
multiple of the block size (checked; tiny-llava's MLP width 176 is not a multiple of 32).

The check (:func:`check_quantized`): a quantized graph cannot match PyTorch to fp32 precision, so after the fp32
graph passed the exact validation the quantized file is run on the same validation feeds and reported by its
logit error (absolute and relative to ``max(1, max |ref|)``) and its next-token agreement (argmax of every
validated last-token row vs the fp32 reference); the export fails only above :data:`EXPORT_BOUNDS`, which a
correct quantization stays far below and a wrong one (a transposed or misaligned weight) does not.
"""

from __future__ import annotations

import importlib
import logging
import os
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from .._deps import require
from ..errors import ExportError

SCHEMES = {"int4": 4, "int8": 8}
BLOCK_SIZES = (32, 64, 128)
DEFAULT_BLOCK_SIZE = 32
METHODS = ("rtn", "hqq", "awq")
# matmulnbits: every LLM file gets com.microsoft.MatMulNBits (ONNX Runtime). qdq: the portable graph
# (decoder.onnx, what TensorRT builds) gets block-wise DequantizeLinear + MatMul at opset 21 instead, symmetric
# (TensorRT takes no zero points); the .ort.onnx variant keeps MatMulNBits.
FORMATS = ("matmulnbits", "qdq")
QDQ_OPSET = 21  # the first opset whose DequantizeLinear takes int4 and block_size
# MatMulNBits ``accuracy_level``: the minimum compute type of the kernel.
ACCURACY_LEVELS = {0: "unset", 1: "fp32", 2: "fp16", 3: "bf16", 4: "int8"}
DEFAULT_ACCURACY_LEVEL = 4
# Export fails when a quantized graph's logit error exceeds bound * max(1, max |ref|): ~5x what RTN gives on the
# random-weight presets (where the error is largest: no outlier structure, small logit margins), well below the
# O(1) relative error of a broken quantization.
EXPORT_BOUNDS = {"int8": 0.05, "int4": 0.6}


@dataclass(frozen=True)
class WeightConfig:
    """A weight-only quantization scheme (``--weights``, ``--block-size``, ``--quant-method``).

    Attributes:
        scheme: ``int4`` or ``int8``; block_size: weights per scale (along the input dimension);
        method: ``rtn`` or ``hqq``; accuracy_level: MatMulNBits compute type (:data:`ACCURACY_LEVELS`).
    """

    scheme: str
    block_size: int = DEFAULT_BLOCK_SIZE
    method: str = "rtn"
    accuracy_level: int = DEFAULT_ACCURACY_LEVEL
    format: str = "matmulnbits"

    @property
    def bits(self) -> int:
        return SCHEMES[self.scheme]

    def to_dict(self) -> dict[str, Any]:
        return {"scheme": self.scheme, "bits": self.bits, "block_size": self.block_size, "method": self.method,
                "format": self.format, "accuracy_level": self.accuracy_level, "symmetric": False}


def weight_config(weights: str | None, block_size: int | None = None, method: str | None = None,
                  dtype: str = "fp32", accuracy_level: int | None = None,
                  fmt: str | None = None) -> WeightConfig | None:
    """Check the quantization flags before anything is loaded; None for ``weights=None`` (no quantization).

    Raises:
        ExportError: an unknown scheme / block size / method, ``awq`` (why it is unavailable), ``hqq`` with
            int8, ``--dtype fp16``, or ``--block-size`` / ``--quant-method`` without ``--weights``.
    """
    if weights is None:
        given = [f for f, v in (("--block-size", block_size), ("--quant-method", method),
                                ("--quant-accuracy-level", accuracy_level), ("--weights-format", fmt))
                 if v is not None]
        if given:
            raise ExportError(f"{given[0]} only applies to weight-only quantization; add --weights int4 or int8")
        return None
    if weights not in SCHEMES:
        raise ExportError(f"--weights must be one of {', '.join(SCHEMES)}; got {weights!r}")
    block = DEFAULT_BLOCK_SIZE if block_size is None else int(block_size)
    if block not in BLOCK_SIZES:
        raise ExportError(f"--block-size must be one of {', '.join(map(str, BLOCK_SIZES))}; got {block_size}")
    method = method or "rtn"
    if method not in METHODS:
        raise ExportError(f"--quant-method must be one of {', '.join(METHODS)}; got {method!r}")
    if method == "awq":
        raise ExportError("--quant-method awq is not available: ONNX Runtime 1.32's AWQ (nvidia_awq) needs the "
                          "nvidia-modelopt package and calibration activations, which edgeprune does not ship; "
                          "use rtn (default) or hqq")
    if method == "hqq" and weights != "int4":
        raise ExportError(f"--quant-method hqq is int4 only: ONNX Runtime 1.32's CPU MatMulNBits does not run 8-bit "
                          f"weights with HQQ's float zero points; got --weights {weights}; use --quant-method rtn")
    if dtype != "fp32":
        raise ExportError(f"--weights needs --dtype fp32 (the quantizer keeps fp32 activations and scales); got "
                          f"--dtype {dtype}")
    level = DEFAULT_ACCURACY_LEVEL if accuracy_level is None else int(accuracy_level)
    if level not in ACCURACY_LEVELS:
        raise ExportError(f"--quant-accuracy-level must be one of {', '.join(map(str, ACCURACY_LEVELS))} "
                          f"({', '.join(ACCURACY_LEVELS.values())}); got {accuracy_level}")
    fmt = fmt or "matmulnbits"
    if fmt not in FORMATS:
        raise ExportError(f"--weights-format must be one of {', '.join(FORMATS)}; got {fmt!r}")
    if fmt == "qdq" and weights != "int4":
        raise ExportError(f"--weights-format qdq writes int4 only (ONNX Runtime 1.32's quantizer has no int8 QDQ "
                          f"form for MatMul); got --weights {weights}; use int4, or int8 with matmulnbits")
    if fmt == "qdq" and method != "rtn":
        raise ExportError(f"--weights-format qdq needs --quant-method rtn (symmetric, no zero points, as TensorRT "
                          f"takes them); {method} writes float zero points")
    return WeightConfig(weights, block, method, level, fmt)


def checked(cfg: WeightConfig | None, dtype: str) -> WeightConfig | None:
    """``cfg`` re-checked against the export's ``dtype`` (:func:`weight_config`'s rules), for API callers."""
    if cfg is None:
        return None
    return weight_config(cfg.scheme, cfg.block_size, cfg.method, dtype, cfg.accuracy_level, cfg.format)


# ---------------------------------------------------------------------------------------------- the graph
def gemm_to_matmul(proto: Any) -> int:
    """Rewrite each ``Gemm`` with a constant weight (``alpha = 1``, ``transA = 0``) as ``MatMul`` (+ ``Add``).

    ``Gemm(A, B, C, transB=t)`` = ``A @ (B.T if t else B) * alpha + beta * C``; with alpha 1 and transA 0 it is
    ``MatMul(A, W)`` with the initializer ``W = B.T`` (``transB``) [K, N], plus ``Add(C * beta)``. In place.

    Returns:
        The number of rewritten nodes.
    """
    onnx = require("onnx")
    from onnx import numpy_helper

    inits = {t.name: t for t in proto.graph.initializer}
    nodes, count = [], 0
    for node in proto.graph.node:
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        if node.op_type != "Gemm" or node.input[1] not in inits or attrs.get("alpha", 1.0) != 1.0 \
                or attrs.get("transA", 0) != 0:
            nodes.append(node)
            continue
        w = numpy_helper.to_array(inits[node.input[1]])
        w_name = f"{node.input[1]}.kn"
        proto.graph.initializer.append(numpy_helper.from_array(np.ascontiguousarray(w.T if attrs.get("transB", 0)
                                                                                    else w), w_name))
        has_bias = len(node.input) > 2 and node.input[2]
        mm_out = f"{node.output[0]}.matmul" if has_bias else node.output[0]
        nodes.append(onnx.helper.make_node("MatMul", [node.input[0], w_name], [mm_out], name=node.name))
        if has_bias:
            bias = node.input[2]
            beta = attrs.get("beta", 1.0)
            if beta != 1.0:
                if bias not in inits:
                    raise ExportError(f"internal error: Gemm {node.name} has a non-constant bias with beta {beta}")
                bias = f"{bias}.beta"
                proto.graph.initializer.append(numpy_helper.from_array(
                    numpy_helper.to_array(inits[node.input[2]]) * np.float32(beta), bias))
            nodes.append(onnx.helper.make_node("Add", [mm_out, bias], [node.output[0]], name=f"{node.name}/bias"))
        count += 1
    del proto.graph.node[:]
    proto.graph.node.extend(nodes)
    return count


def _quantizer() -> Any:
    """``onnxruntime.quantization.matmul_nbits_quantizer``, imported without its side effect on logging.

    Why: that module calls ``logging.basicConfig(level=INFO)`` when imported, which would make every library
    logger of the process print INFO lines (and the quantizer logs one per node); the root logger's handlers and
    level are restored and the quantizer's own logger is set to ERROR.
    """
    require("onnxruntime")
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    try:
        module = importlib.import_module("onnxruntime.quantization.matmul_nbits_quantizer")
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)
    # ERROR: its warnings are about what this module does on purpose (opset 21 for qdq, skipped nodes)
    logging.getLogger(module.__name__).setLevel(logging.ERROR)
    return module


def _algo_config(cfg: WeightConfig, qdq: bool) -> Any:
    q = _quantizer()
    if cfg.method == "hqq":
        return q.HQQWeightOnlyQuantConfig(block_size=cfg.block_size, bits=cfg.bits)
    if qdq:
        return q.DefaultWeightOnlyQuantConfig(block_size=cfg.block_size, is_symmetric=True, bits=cfg.bits,
                                              quant_format=q.QuantFormat.QDQ)
    return q.DefaultWeightOnlyQuantConfig(block_size=cfg.block_size, is_symmetric=False,
                                          accuracy_level=cfg.accuracy_level or None, bits=cfg.bits)


def _check_whole_blocks(proto: Any, block: int) -> None:
    """TensorRT's DequantizeLinear needs every weight's input dimension K to be a multiple of the block size
    (ONNX Runtime's quantizer would pad the last block, which TensorRT's parser rejects)."""
    inits = {t.name: t for t in proto.graph.initializer}
    bad = sorted({int(inits[n.input[1]].dims[0]) for n in proto.graph.node if n.op_type == "MatMul"
                  and n.input[1] in inits and len(inits[n.input[1]].dims) == 2
                  and inits[n.input[1]].dims[0] % block})
    if bad:
        ok = [b for b in BLOCK_SIZES if all(k % b == 0 for k in bad)]
        raise ExportError(f"--weights-format qdq needs every weight's input size to be a multiple of --block-size "
                          f"{block} (TensorRT's DequantizeLinear takes whole blocks); this model has {bad}. "
                          + (f"Use --block-size {ok[0]}" if ok else "Use --weights-format matmulnbits (ONNX Runtime)"))


def quantize_proto(proto: Any, cfg: WeightConfig, qdq: bool = False) -> tuple[Any, dict[str, int]]:
    """Quantize the weights of ``proto`` (external data loaded) as ``cfg`` says; returns (new proto, op counts).

    Every MatMul/Gemm with a constant 2-D weight becomes ``MatMulNBits``; ``accuracy_level`` is set on every
    MatMulNBits node (HQQ's config does not take it). Counts: ``{"MatMulNBits": n, "MatMul": left, "Gemm": left}``
    where "left" counts the MatMul/Gemm nodes that still have a constant weight (none for the LLM graphs).
    With ``qdq`` the weights become int4/uint8 ``DequantizeLinear`` (``block_size``, opset 21) before the MatMul
    (``counts["DequantizeLinear"]``) instead.

    Raises:
        ExportError: ``qdq`` and a weight whose input size is not a multiple of the block size.
    """
    onnx = require("onnx")
    gemm_to_matmul(proto)
    if qdq:
        _check_whole_blocks(proto, cfg.block_size)
    quantizer = _quantizer().MatMulNBitsQuantizer(proto, algo_config=_algo_config(cfg, qdq))
    with warnings.catch_warnings():  # HQQ hands torch read-only numpy views; it only reads them
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        quantizer.process()
    out = quantizer.model.model
    for node in out.graph.node:
        if node.op_type == "MatMulNBits":
            keep = [a for a in node.attribute if a.name != "accuracy_level"]
            del node.attribute[:]
            node.attribute.extend([*keep, onnx.helper.make_attribute("accuracy_level", cfg.accuracy_level)])
    return out, op_counts(out)


def op_counts(proto: Any) -> dict[str, int]:
    """``MatMulNBits`` nodes and the ``MatMul`` / ``Gemm`` nodes that still read a constant weight."""
    inits = {t.name for t in proto.graph.initializer}
    counts = {"MatMulNBits": 0, "MatMul": 0, "Gemm": 0, "DequantizeLinear": 0}
    for node in proto.graph.node:
        if node.op_type in ("MatMulNBits", "DequantizeLinear"):
            counts[node.op_type] += 1
        elif node.op_type in ("MatMul", "Gemm") and len(node.input) > 1 and node.input[1] in inits:
            counts[node.op_type] += 1
    return counts


def weight_bytes(path: str | os.PathLike[str]) -> int:
    """Bytes of the initializers an ONNX file reads (inline and external), without loading them."""
    onnx = require("onnx")
    proto = onnx.load(str(path), load_external_data=False)
    total = 0
    for t in proto.graph.initializer:
        if t.data_location == onnx.TensorProto.EXTERNAL:
            total += int({e.key: e.value for e in t.external_data}["length"])
        else:
            total += len(t.raw_data) or onnx.numpy_helper.to_array(t).nbytes
    return total


# ---------------------------------------------------------------------------------------------- the hook
def quantize_graph(job: Any, tmp: Path, entry: dict[str, Any], cfg: WeightConfig) -> str:
    """Quantize an exported, validated LLM graph and its ``.ort.onnx`` variant in ``tmp``; update ``entry``.

    Both files are loaded with their weights first (the variant reads the portable graph's sidecar), then each is
    quantized and written back with its own sidecar, and the variant is pointed at the portable graph's quantized
    weights again (byte-identical: same weights, same deterministic quantizer). Each quantized file is checked
    with :func:`check_quantized`. ``entry`` gets ``weights`` (scheme, counts, bytes, error, agreement) and its
    ``files`` / the variant's ``data_files`` are updated.

    Returns:
        A note for the export log line.
    Raises:
        ExportError: a graph with nothing to quantize, or a quantized graph outside :data:`EXPORT_BOUNDS`.
    """
    onnx = require("onnx")
    from .ort_variant import share_external_data

    start = time.perf_counter()
    names = [entry["file"]] + [v["file"] for v in (entry.get("variants") or {}).values()]
    before = sum(weight_bytes(tmp / n) for n in names[:1])
    protos = {n: onnx.load(str(tmp / n)) for n in names}  # weights in memory before any sidecar is replaced
    for p in tmp.iterdir():
        if any(p.name.startswith(n) for n in names):
            p.unlink()
    info: dict[str, Any] = {**cfg.to_dict(), "fp32_weight_bytes": before}
    info["per_file"] = {}
    for n, proto in protos.items():
        qdq = cfg.format == "qdq" and n == entry["file"]  # the portable graph; the .ort.onnx keeps MatMulNBits
        quantized, counts = quantize_proto(proto, cfg, qdq)
        if counts["DequantizeLinear" if qdq else "MatMulNBits"] == 0 or counts["MatMul"] or counts["Gemm"]:
            raise ExportError(f"internal error: quantizing {n} left {counts} (every LLM matmul should be "
                              "quantized)")
        info["per_file"][n] = {"format": "qdq" if qdq else "matmulnbits", "counts": counts,
                            "opset": next(o.version for o in quantized.opset_import if o.domain in ("", "ai.onnx"))}
        onnx.save_model(quantized, str(tmp / n), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=f"{n}.data", size_threshold=1024)
        _shared_mode(tmp / n, tmp / f"{n}.data")
    info["weight_bytes"] = weight_bytes(tmp / names[0])
    for key, variant in (entry.get("variants") or {}).items():
        variant["data_files"] = share_external_data(tmp / variant["file"], tmp / names[0])
    info["check"] = {n: check_quantized(job, tmp / n, cfg) for n in names}
    info["seconds"] = round(time.perf_counter() - start, 2)
    entry["weights"] = info
    entry["files"] = sorted(p.name for p in tmp.iterdir() if any(p.name.startswith(n) for n in names))
    main = info["check"][names[0]]
    return (f"; {cfg.scheme} weights ({cfg.method}, block {cfg.block_size}): {before / 1e6:.1f} -> "
            f"{info['weight_bytes'] / 1e6:.1f} MB, logits max err {main['logits_max_abs_err']:.2e} "
            f"({main['logits_rel_err']:.1%} of max(1, |ref|)), next-token agreement "
            f"{main['agree']}/{main['positions']}")


def _shared_mode(*paths: Path) -> None:
    """``0666 & ~umask``, as the exporter's other files: onnx writes external data files private (0600)."""
    umask = os.umask(0)
    os.umask(umask)
    for p in paths:
        if p.exists():
            os.chmod(p, 0o666 & ~umask)


def check_quantized(job: Any, path: Path, cfg: WeightConfig) -> dict[str, Any]:
    """Run the quantized ``path`` on the job's example and validation feeds and compare with the fp32 module.

    Returns:
        ``logits_max_abs_err``, ``logits_rel_err`` (max over feeds of err / max(1, max |ref|)),
        ``positions`` (validated last-token rows), ``agree`` (rows whose argmax equals the reference's),
        ``agreement`` (their ratio), ``bound`` (:data:`EXPORT_BOUNDS`), ``other_outputs_max_abs_err``.
    Raises:
        ExportError: a shape mismatch, a non-finite logit, or ``logits_rel_err`` above the bound.
    """
    torch = require("torch")
    ort = require("onnxruntime")
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = job.spec.output_names
    logit = names.index("logits")
    abs_err = rel_err = other = 0.0
    agree = positions = 0
    for feeds in [job.example, *job.checks]:
        got = sess.run(names, feeds)
        with torch.no_grad():
            ref = job.module(*[torch.from_numpy(feeds[n]) for n in job.spec.input_names])
        ref = [r.detach().cpu().numpy() for r in (ref if isinstance(ref, (tuple, list)) else (ref,))]
        for i, (g, r) in enumerate(zip(got, ref)):
            if g.shape != r.shape and i == logit:
                raise ExportError(f"{path.name}: quantized logits have shape {g.shape}, PyTorch {r.shape}")
            if i != logit:
                if g.shape == r.shape and np.issubdtype(r.dtype, np.floating) and r.size:
                    other = max(other, float(np.abs(g - r).max()))
                continue
            if not np.all(np.isfinite(g)):
                raise ExportError(f"{path.name}: the {cfg.scheme} graph produced non-finite logits")
            err = float(np.abs(g - r).max())
            abs_err, rel_err = max(abs_err, err), max(rel_err, err / max(1.0, float(np.abs(r).max())))
            flat_g, flat_r = g.reshape(-1, g.shape[-1]), r.reshape(-1, r.shape[-1])
            agree += int(np.sum(flat_g.argmax(-1) == flat_r.argmax(-1)))
            positions += flat_g.shape[0]
    bound = EXPORT_BOUNDS[cfg.scheme]
    if rel_err > bound:
        raise ExportError(f"{path.name}: {cfg.scheme} ({cfg.method}, block {cfg.block_size}) logits differ from "
                          f"fp32 PyTorch by {rel_err:.1%} of max(1, |ref|), above the {bound:.0%} bound of a sound "
                          "quantization; try a smaller --block-size or --weights int8")
    return {"logits_max_abs_err": abs_err, "logits_rel_err": rel_err, "positions": positions, "agree": agree,
            "agreement": agree / positions if positions else None, "bound": bound,
            "other_outputs_max_abs_err": other}


def manifest_section(cfg: WeightConfig | None, graphs: Mapping[str, Any]) -> dict[str, Any]:
    """The manifest's optional top-level ``weights`` section: the scheme and the graphs and files it applies to
    (``{}``, no section, without quantization)."""
    if cfg is None:
        return {}
    quantized = [name for name, e in graphs.items() if e.get("weights")]
    files = [f for name in quantized
             for f in [graphs[name]["file"], *[v["file"] for v in (graphs[name].get("variants") or {}).values()]]]
    return {"weights": {**cfg.to_dict(), "graphs": quantized, "files": files}}


def same_weights(entry: Mapping[str, Any], cfg: WeightConfig | None, is_llm: bool) -> bool:
    """Whether a graph entry of another bundle has the weights this export asks for (``--reuse``)."""
    have = entry.get("weights")
    if not is_llm or cfg is None:
        return have is None
    want = cfg.to_dict()
    return have is not None and all(have.get(k) == v for k, v in want.items())
