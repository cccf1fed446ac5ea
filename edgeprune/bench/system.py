"""What a benchmark records about where it ran, and the small measuring helpers it needs.

Machine (CPU model, ISA extensions such as AVX2/AVX-512/AMX or the ARM core types, logical/physical cores, memory,
GPU with driver and CUDA versions), library versions, thread settings, percentiles, the
peak resident memory of a run (a sampling thread over ``/proc/self/statm``, no tracemalloc: tracing every
allocation would slow the run it measures) and the synthetic question of an exact token count. Torch-free at
import time; torch is only touched when the caller already uses it.
"""

from __future__ import annotations

import os
import platform
import resource
import sys
import threading
from typing import Any, Callable, Sequence

import numpy as np

_LIBRARIES = ("edgeprune", "torch", "transformers", "onnxruntime", "onnxruntime-gpu", "onnx", "tokenizers", "numpy",
              "pillow", "matplotlib", "triton", "tensorrt_rtx_cu13_bindings", "tensorrt", "cuda-python")
# ISA extensions that decide which GEMM kernels a library can pick (x86 flags, ARM "Features").
_ISA_FLAGS = ("sse4_2", "avx", "avx2", "fma", "f16c", "avx_vnni", "avx512f", "avx512bw", "avx512vl", "avx512_vnni",
              "avx512_bf16", "avx512_fp16", "amx_tile", "amx_bf16", "amx_int8", "amx_fp16",
              "asimd", "asimdhp", "asimddp", "fphp", "sve", "sve2", "i8mm", "bf16", "sme")
# ARM "CPU part" ids of the cores we meet (Jetson Orin: Cortex-A78AE; Thor: Neoverse V3AE; Grace: Neoverse V2).
_ARM_PARTS = {"0xd42": "Cortex-A78AE", "0xd41": "Cortex-A78", "0xd4b": "Cortex-A78C", "0xd0c": "Neoverse-N1",
              "0xd40": "Neoverse-V1", "0xd4f": "Neoverse-V2", "0xd83": "Neoverse-V3AE", "0xd84": "Neoverse-V3",
              "0xd07": "Cortex-A57", "0xd08": "Cortex-A72", "0xd05": "Cortex-A55", "0xd0b": "Cortex-A76"}
# Ordinary words for the synthetic question; " a" (one token in every tokenizer we ship) fills the last gaps.
_WORDS = ("what", "is", "written", "on", "the", "sign", "next", "to", "red", "car", "near", "door", "of", "blue",
          "house", "and", "how", "many", "people", "are", "standing", "in", "front", "it")


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (linear interpolation, numpy's default); NaN for an empty list."""
    return float(np.percentile(np.asarray(values, dtype=np.float64), q)) if len(values) else float("nan")


def summary(values: Sequence[float]) -> dict[str, float]:
    """``{"p50", "p90", "mean", "min"}`` of ``values`` (p50 <= p90 by construction)."""
    arr = np.asarray(values, dtype=np.float64)
    if not arr.size:
        return {"p50": float("nan"), "p90": float("nan"), "mean": float("nan"), "min": float("nan")}
    return {"p50": percentile(arr, 50), "p90": percentile(arr, 90), "mean": float(arr.mean()), "min": float(arr.min())}


def _cpuinfo() -> tuple[str, int | None]:
    """(CPU model name, physical cores) from /proc/cpuinfo; (platform.processor(), None) elsewhere."""
    try:
        with open("/proc/cpuinfo") as f:
            text = f.read()
    except OSError:
        return platform.processor() or "unknown", None
    model, cores, phys = "", set(), "0"
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key, value = key.strip(), value.strip()
        if key == "model name" and not model:
            model = value
        elif key == "physical id":
            phys = value
        elif key == "core id":
            cores.add((phys, value))
    return model or platform.processor() or "unknown", len(cores) or None


def cpu_isa(cpuinfo: str | None = None) -> dict[str, Any]:
    """ISA extensions and (on ARM) the core types, from ``/proc/cpuinfo`` text (read when not given).

    Returns:
        ``{"arch", "flags": [the extensions of _ISA_FLAGS present], "arm_cores": {core name: count} or None}``;
        ``flags`` is empty where /proc/cpuinfo is unreadable.
    """
    if cpuinfo is None:
        try:
            with open("/proc/cpuinfo") as f:
                cpuinfo = f.read()
        except OSError:
            cpuinfo = ""
    present: set[str] = set()
    parts: dict[str, int] = {}
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        key = key.strip().lower()
        if key in ("flags", "features"):
            present.update(value.split())
        elif key == "cpu part":
            name = _ARM_PARTS.get(value.strip().lower(), f"part {value.strip()}")
            parts[name] = parts.get(name, 0) + 1
    return {"arch": platform.machine(), "flags": [f for f in _ISA_FLAGS if f in present], "arm_cores": parts or None}


def _mem_total_gb() -> float | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return round(int(line.split()[1]) / 2 ** 20, 1)
    except OSError:
        return None
    return None


def machine_info(device: str = "cpu") -> dict[str, Any]:
    """CPU model, cores (logical, usable by this process, physical), memory, OS, Python and the GPU if any."""
    model, physical = _cpuinfo()
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    info: dict[str, Any] = {"cpu": model, "cores_logical": os.cpu_count(), "cores_usable": usable,
                            "cores_physical": physical, "memory_gb": _mem_total_gb(), "os": platform.platform(),
                            "python": sys.version.split()[0], "isa": cpu_isa(), "gpu": None}
    if device.startswith("cuda"):
        torch = sys.modules.get("torch")
        if torch is not None and torch.cuda.is_available():
            props = torch.cuda.get_device_properties(torch.device(device))
            info["gpu"] = {"name": props.name, "memory_gb": round(props.total_memory / 2 ** 30, 1),
                           "capability": f"{props.major}.{props.minor}", "cuda": torch.version.cuda,
                           "driver": _nvidia_driver()}
    return info


def _nvidia_driver() -> str | None:
    """The NVIDIA driver version from ``/proc/driver/nvidia/version`` (Linux), or None."""
    try:
        with open("/proc/driver/nvidia/version") as f:
            first = f.readline()
    except OSError:
        return None
    words = [w for w in first.split() if w[:1].isdigit() and "." in w]
    return words[0] if words else None


def versions() -> dict[str, str | None]:
    """Installed versions of the libraries that decide the numbers (None when absent)."""
    from .._deps import package_versions

    return package_versions(_LIBRARIES)


def rss_bytes() -> int | None:
    """Current resident set size of this process (Linux), or None."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


def max_rss_bytes() -> int:
    """The process's resident high-water mark so far (``getrusage``; KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


class PeakRss:
    """Context manager sampling this process's RSS every ``interval`` seconds; ``peak`` is the largest seen.

    A 5 ms sampler costs one small file read per wake-up (well under 1 % of a core); where /proc is missing,
    ``peak`` stays None and the caller falls back to :func:`max_rss_bytes`.
    """

    def __init__(self, interval: float = 0.005) -> None:
        self.interval = interval
        self.peak: int | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _sample(self) -> None:
        now = rss_bytes()
        if now is not None and (self.peak is None or now > self.peak):
            self.peak = now

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            self._sample()

    def __enter__(self) -> "PeakRss":
        self._sample()
        self._thread = threading.Thread(target=self._loop, name="edgeprune-rss", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self._sample()


def synth_question(encode: Callable[[str], list[int]], n_tokens: int) -> tuple[str, int]:
    """A plain-English question of exactly ``n_tokens`` tokens (no BOS) under ``encode``.

    Words are appended while the count stays within the target; when a word would overshoot, the one-token
    filler " a" is tried instead.

    Args:
        encode: text -> token ids without special tokens.
        n_tokens: the target count (>= 1).
    Returns:
        (question, its actual token count); the count differs from ``n_tokens`` only for a tokenizer in which
        no candidate fits, which the caller reports.
    """
    text, count, i = "", 0, 0
    for _ in range(4 * n_tokens + 8):
        if count >= n_tokens:
            break
        word = _WORDS[i % len(_WORDS)]
        for cand in ((text + " " + word) if text else word.capitalize(), (text + " a") if text else "A"):
            got = len(encode(cand))
            if got <= n_tokens:
                text, count = cand, got
                break
        i += 1
    return text, count
