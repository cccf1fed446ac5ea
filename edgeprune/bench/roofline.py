"""Roofline figures of a benchmark: the machine's measured ceilings and how close each stage comes to them.

Ceilings are measured per backend with that backend's own kernels and thread count, before and after the runs
(the better of the two is kept: a peak measured while other work shared the machine is too low, and a fraction
above 100 % in a report says exactly that, or that the data stayed in a cache larger than the copy):

* **compute**: the best of a few large square GEMMs in the run's dtype (``GEMM_SIDE``: 1024 on the CPU, 8192 on
  CUDA), ``2·n³`` FLOPs each: ``torch.matmul`` for the torch backend, a one-node ONNX ``MatMul`` graph on the
  run's execution providers for ORT (``numpy.matmul`` when neither is usable);
* **bandwidth**: the best of a few large device copies (``COPY_BYTES``: 256 MiB on the CPU, 1 GiB on CUDA) with
  ``torch.Tensor.copy_``, counted as read + write (``2·bytes``). On CUDA both are timed with CUDA events.

Per stage (vision + projector, prefill, one decode step) the report gives achieved FLOP/s and bytes/s from the
FLOPs model (:mod:`edgeprune.bench.flops`; bytes are the minimum a stage must move: its weights once, plus the
KV cache it reads or writes) and their fractions of the ceilings. The roofline time of a stage is
``max(FLOPs / peak FLOP/s, bytes / peak bytes/s)`` (``bound`` says which term wins) and its ``efficiency`` is
roofline time / measured time: 1.0 is at the limit, and the stage with the lowest efficiency is the one
furthest from its limit, where the next optimisation goes. The decode step is shown as tokens/s against its
bandwidth bound (weight + KV bytes per step / measured bandwidth).

Functions that compute figures from given numbers (:func:`stage_roofline`, :func:`row_roofline`,
:func:`furthest`, :func:`roofline_checks`) are pure; only ``measure_*`` touch the hardware.
"""

from __future__ import annotations

import math
import time
from typing import Any, Callable, Sequence

import numpy as np

GEMM_SIDE = {"cpu": 1024, "cuda": 8192}
COPY_BYTES = {"cpu": 256 * 2 ** 20, "cuda": 2 ** 30}
REPEATS = 5
#: ``--ceilings``: measure the ceilings (about a second per backend on a CPU), ``quick`` (small sizes: tests and
#: dry runs; far below the real ceilings), ``skip`` (no roofline figures).
CEILING_MODES = ("measure", "quick", "skip")
#: (stage, FLOPs keys summed, bytes key) of the stages the roofline covers.
STAGES = (("vision", ("vision", "projector"), "vision_bytes"), ("prefill", ("prefill",), "prefill_bytes"),
          ("decode_step", ("decode_first_step",), "decode_bytes_first_step"))
# The targets (benchmarks, evaluated at the row with every visual token, ORT).
COMPUTE_FRACTION_MIN = 0.5
DECODE_BANDWIDTH_FRACTION_MIN = 0.7
_NP_DTYPES = {"fp32": np.float32, "fp16": np.float16, "bf16": np.float32}


def _best(seconds: Sequence[float]) -> float:
    return min(seconds) if seconds else float("nan")


def _timed(fn: Callable[[], Any], repeat: int, sync: Callable[[], None] | None = None) -> list[float]:
    """Wall seconds of ``repeat`` calls after one warm-up (``sync`` after each, e.g. a CUDA synchronise)."""
    fn()
    if sync:
        sync()
    out = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        if sync:
            sync()
        out.append(time.perf_counter() - start)
    return out


def cuda_event_seconds(fn: Callable[[], Any], repeat: int, warmup: int = 1) -> list[float]:
    """Seconds of ``repeat`` calls of ``fn`` on the current CUDA stream, one CUDA event pair per call, after
    ``warmup`` calls (the benchmarks' kernel and plugin timings use it too)."""
    import torch

    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    out = []
    for _ in range(repeat):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        out.append(start.elapsed_time(end) / 1e3)
    return out


def measure_gemm_torch(dtype: str, device: str, side: int, repeat: int = REPEATS) -> float:
    """Peak FLOP/s of ``torch.matmul`` on ``[side, side] @ [side, side]`` in ``dtype`` on ``device``."""
    import torch

    from ..models.loader import torch_dtype

    a = torch.randn(side, side, device=device).to(torch_dtype(dtype))
    b = torch.randn(side, side, device=device).to(torch_dtype(dtype))
    fn = lambda: torch.matmul(a, b)  # noqa: E731
    secs = cuda_event_seconds(fn, repeat) if device.startswith("cuda") else _timed(fn, repeat)
    return 2.0 * side ** 3 / _best(secs)


def _gemm_model(side: int, dtype: str) -> bytes:
    """A one-node ONNX graph ``y = x @ w`` with ``w`` a constant ``[side, side]`` initializer."""
    from onnx import TensorProto, helper, numpy_helper

    np_dtype = _NP_DTYPES[dtype]
    elem = TensorProto.FLOAT16 if np_dtype == np.float16 else TensorProto.FLOAT
    w = np.random.default_rng(1).standard_normal((side, side)).astype(np_dtype)
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "gemm_ceiling",
                              [helper.make_tensor_value_info("x", elem, [side, side])],
                              [helper.make_tensor_value_info("y", elem, [side, side])],
                              [numpy_helper.from_array(w, "w")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]).SerializeToString()


def measure_gemm_ort(dtype: str, providers: Sequence[str], threads: int | None, side: int,
                     repeat: int = REPEATS) -> float:
    """Peak FLOP/s of an ONNX Runtime ``MatMul`` of ``[side, side]`` by a constant ``[side, side]`` weight.

    Inputs and outputs are bound on the first provider's device (IO binding), so a GPU run times the kernel and
    not the host copies; ``threads`` sets the intra-op threads as the bench does for its sessions.
    """
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    if threads:
        opts.intra_op_num_threads = threads
    sess = ort.InferenceSession(_gemm_model(side, dtype), sess_options=opts, providers=list(providers))
    x = np.random.default_rng(0).standard_normal((side, side)).astype(_NP_DTYPES[dtype])
    cuda = sess.get_providers()[0] == "CUDAExecutionProvider"
    binding = sess.io_binding()
    binding.bind_ortvalue_input("x", ort.OrtValue.ortvalue_from_numpy(x, "cuda" if cuda else "cpu", 0))
    binding.bind_output("y", "cuda" if cuda else "cpu")
    fn = lambda: sess.run_with_iobinding(binding)  # noqa: E731
    sync = binding.synchronize_outputs if cuda else None
    return 2.0 * side ** 3 / _best(_timed(fn, repeat, sync))


def measure_gemm_numpy(side: int, repeat: int = REPEATS) -> float:
    """Peak FLOP/s of ``numpy.matmul`` in float32 (the fallback when the backend's library is missing)."""
    rng = np.random.default_rng(0)
    a, b = (rng.standard_normal((side, side), dtype=np.float32) for _ in range(2))
    return 2.0 * side ** 3 / _best(_timed(lambda: np.matmul(a, b), repeat))


def measure_copy(device: str, nbytes: int, repeat: int = REPEATS) -> float:
    """Peak bytes/s of a device copy of ``nbytes`` (read + write counted: ``2·nbytes`` per copy)."""
    try:
        import torch
    except ImportError:
        src = np.ones(nbytes // 4, dtype=np.float32)
        dst = np.empty_like(src)
        return 2.0 * src.nbytes / _best(_timed(lambda: np.copyto(dst, src), repeat))
    src = torch.ones(nbytes // 4, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    fn = lambda: dst.copy_(src)  # noqa: E731
    secs = cuda_event_seconds(fn, repeat) if device.startswith("cuda") else _timed(fn, repeat)
    return 2.0 * src.numel() * 4 / _best(secs)


def measure_ceilings(backends: Sequence[str], dtype: str, device: str, providers: Sequence[str],
                     threads: int | None, quick: bool = False,
                     log: Callable[[str], None] | None = None) -> dict[str, dict[str, Any]]:
    """Measure the compute and bandwidth ceilings of every backend of a run (about a second each on a CPU).

    Args:
        backends: ``torch`` / ``ort`` (others get the numpy GEMM). dtype, device: the run's.
        providers: ONNX Runtime providers (full names) for the ORT GEMM. threads: the run's thread setting
            (torch's is already in effect in the caller).
        quick: small sizes (tests and dry runs): the figures are then far below the machine's ceilings.
    Returns:
        ``{backend: {"flops_per_s", "bytes_per_s", "gemm", "copy", "error"}}``; a ceiling that could not be
        measured is None with the reason in ``error`` (logged), never a silent substitute.
    """
    log = log or (lambda msg: None)
    kind = "cuda" if device.startswith("cuda") else "cpu"
    side, nbytes = (256, 8 * 2 ** 20) if quick else (GEMM_SIDE[kind], COPY_BYTES[kind])
    copy_desc = f"torch copy_ of {nbytes / 2 ** 20:.0f} MiB on {device} (read + write)"
    try:
        bandwidth, copy_error = measure_copy(device, nbytes), None
    except (RuntimeError, ValueError, MemoryError) as exc:
        bandwidth, copy_error = None, f"copy: {exc}"
        log(f"roofline: bandwidth not measured ({exc})")
    out = {}
    for backend in backends:
        gemm_desc, error = f"{side}x{side}x{side} {dtype}", copy_error
        try:
            if backend == "torch":
                flops, gemm_desc = measure_gemm_torch(dtype, device, side), f"torch.matmul {gemm_desc} on {device}"
            elif backend == "ort":
                flops = measure_gemm_ort(dtype, providers, threads, side)
                gemm_desc = f"ONNX Runtime MatMul {gemm_desc} on {providers[0]}"
            else:
                flops, gemm_desc = measure_gemm_numpy(side), f"numpy.matmul {side}x{side}x{side} fp32"
        except Exception as exc:  # noqa: BLE001 - torch/ORT raise their own classes; recorded, not fatal
            flops, error = None, f"gemm: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
            log(f"roofline: {backend} GEMM ceiling not measured ({error})")
        out[backend] = {"flops_per_s": flops, "bytes_per_s": bandwidth, "gemm": gemm_desc, "copy": copy_desc,
                        "threads": threads, "quick": quick, "error": error}
    return out


def merge_ceilings(a: dict[str, dict[str, Any]], b: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Two measurements of the same ceilings (before and after the runs): the larger of each figure per backend.

    A ceiling is a peak, so the better measurement is the truer one on a machine shared with other work;
    ``measurements`` counts how many were taken.
    """
    out = {}
    for backend, first in a.items():
        second = b.get(backend) or {}
        merged = dict(first)
        for key in ("flops_per_s", "bytes_per_s"):
            vals = [v for v in (first.get(key), second.get(key)) if v is not None]
            merged[key] = max(vals) if vals else None
        merged["measurements"] = first.get("measurements", 1) + 1
        merged["error"] = first.get("error") if merged["flops_per_s"] is None or merged["bytes_per_s"] is None else None
        out[backend] = merged
    return out


# ------------------------------------------------------------------------------------------ pure figures
def _div(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or b == 0 or not math.isfinite(a) or not math.isfinite(b):
        return None
    return a / b


def stage_roofline(flops: float | None, nbytes: float | None, seconds: float | None,
                   ceiling: dict[str, Any] | None) -> dict[str, Any]:
    """Roofline figures of one stage from its FLOPs, bytes and measured seconds against ``ceiling``.

    Returns:
        ``flops``, ``bytes``, ``ms``, ``flops_per_s``, ``bytes_per_s``, ``flops_fraction`` (of the GEMM
        ceiling), ``bytes_fraction`` (of the bandwidth), ``bound`` (``compute`` or ``memory``: the larger of
        FLOPs / peak and bytes / peak), ``roofline_ms`` and ``efficiency`` (roofline / measured); None where an
        input is missing.
    """
    peak_f = (ceiling or {}).get("flops_per_s")
    peak_b = (ceiling or {}).get("bytes_per_s")
    t_compute, t_memory = _div(flops, peak_f), _div(nbytes, peak_b)
    terms = [t for t in (t_compute, t_memory) if t is not None]
    roof = max(terms) if terms else None
    bound = None
    if t_compute is not None and t_memory is not None:
        bound = "compute" if t_compute >= t_memory else "memory"
    return {"flops": flops, "bytes": nbytes, "ms": None if seconds is None else 1e3 * seconds,
            "flops_per_s": _div(flops, seconds), "bytes_per_s": _div(nbytes, seconds),
            "flops_fraction": _div(_div(flops, seconds), peak_f), "bytes_fraction": _div(_div(nbytes, seconds), peak_b),
            "bound": bound, "roofline_ms": None if roof is None else 1e3 * roof, "efficiency": _div(roof, seconds)}


def row_roofline(row: dict[str, Any], ceiling: dict[str, Any] | None, statistic: str = "p50") -> dict[str, Any]:
    """Roofline figures of every stage of one measured result row (``statistic`` of its times).

    The decode step also gets ``tokens_per_s`` (one token per step) and ``bound_tokens_per_s`` (1 / its
    roofline time: the bandwidth bound for a memory-bound step).
    """
    flops = row.get("flops") or {}
    times = {"vision": row["stages"]["vision"][f"{statistic}_ms"], "prefill": row["stages"]["prefill"][f"{statistic}_ms"],
             "decode_step": row["decode_step"][f"{statistic}_ms"]}
    out = {}
    for stage, flop_keys, bytes_key in STAGES:
        f = sum(flops[k] for k in flop_keys) if all(k in flops for k in flop_keys) else None
        ms = times[stage]
        seconds = ms / 1e3 if ms is not None and math.isfinite(ms) and ms > 0 else None
        out[stage] = stage_roofline(f, flops.get(bytes_key), seconds, ceiling)
    dec = out["decode_step"]
    dec["tokens_per_s"] = _div(1.0, None if dec["ms"] is None else dec["ms"] / 1e3)
    dec["bound_tokens_per_s"] = _div(1.0, None if dec["roofline_ms"] is None else dec["roofline_ms"] / 1e3)
    return out


def furthest(rows: Sequence[dict[str, Any]]) -> dict[str, Any] | None:
    """The (row, stage) with the lowest roofline efficiency among measured rows with roofline figures.

    Returns:
        ``{backend, method, kept_tokens, stage, efficiency, bound}``, or None when no row has figures.
    """
    best = None
    for r in rows:
        for stage, fig in (r.get("roofline") or {}).items():
            eff = fig.get("efficiency")
            if r.get("status") == "ok" and eff is not None and (best is None or eff < best["efficiency"]):
                best = {"backend": r["backend"], "method": r["method"], "kept_tokens": r["kept_tokens"],
                        "stage": stage, "efficiency": eff, "bound": fig.get("bound")}
    return best


def roofline_checks(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """The issue's roofline targets on the ORT row with the most kept tokens of ``none`` (else any method):
    vision and prefill >= 50 % of the GEMM ceiling, decode step >= 70 % of its bandwidth bound."""
    ort = [r for r in rows if r.get("status") == "ok" and r["backend"] == "ort" and r.get("roofline")]
    if not ort:
        return []
    top = max(r["kept_tokens"] for r in ort)
    r = next((r for r in ort if r["kept_tokens"] == top and r["method"] == "none"),
             next(r for r in ort if r["kept_tokens"] == top))
    roof, out = r["roofline"], []
    for stage, key, threshold, what in (("vision", "flops_fraction", COMPUTE_FRACTION_MIN, "of the GEMM ceiling"),
                                        ("prefill", "flops_fraction", COMPUTE_FRACTION_MIN, "of the GEMM ceiling"),
                                        ("decode_step", "bytes_fraction", DECODE_BANDWIDTH_FRACTION_MIN,
                                         "of the bandwidth bound")):
        value = roof[stage].get(key)
        out.append({"target": f"roofline_{stage}", "backend": "ort", "method": r["method"], "value": value,
                    "threshold": threshold, "met": None if value is None else value >= threshold,
                    "detail": f"achieved / ceiling {what} at K={top}"})
    return out


def ceilings_text(ceilings: dict[str, dict[str, Any]] | None) -> str:
    """One line per backend: its measured ceilings (for the printed report)."""
    lines = []
    for backend, c in (ceilings or {}).items():
        f, b = c.get("flops_per_s"), c.get("bytes_per_s")
        lines.append(f"ceilings [{backend}]: GEMM {'-' if f is None else f'{f / 1e9:.1f} GFLOP/s'} ({c.get('gemm')}), "
                     f"copy {'-' if b is None else f'{b / 1e9:.1f} GB/s'}" + (f"; {c['error']}" if c.get("error") else "")
                     + ("; quick (not the machine's ceiling)" if c.get("quick") else ""))
    return "\n".join(lines)
