"""Device memory, one stream and CUDA events for the ``trt`` backend, over cuda-python's runtime API.

The :class:`~edgeprune.runtime.trt_backend.TrtBackend` uses exactly this surface (:class:`CudaDevice`), so a
host-memory double with the same methods runs the whole backend on a machine without a GPU (the tests do).
Calls (``cuda.bindings.runtime``): ``cudaGetDeviceCount``, ``cudaDeviceGetAttribute`` (compute capability),
``cudaMalloc``/``cudaFree``, ``cudaMemcpyAsync`` (host <-> device, device -> device), ``cudaMemsetAsync``,
``cudaStreamCreate``/``cudaStreamSynchronize``, ``cudaEventCreate``/``cudaEventRecord``/``cudaEventElapsedTime``.
Every call's status is checked; a failure raises :class:`~edgeprune.errors.BackendError` naming the call.
Written against the documented API; it runs only where a CUDA driver exists (not on the CI machine).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from ..errors import BackendError


def _cudart() -> Any | None:
    try:
        from cuda.bindings import runtime
    except ImportError:
        try:  # cuda-python < 12.6 layout
            from cuda import cudart as runtime  # type: ignore[no-redef]
        except ImportError:
            return None
    return runtime


def _check(result: Any, call: str) -> Any:
    """Unpack a cuda-python ``(status, *values)`` tuple; raise on a non-success status."""
    status, *values = result if isinstance(result, tuple) else (result,)
    if int(status) != 0:
        raise BackendError(f"CUDA {call} failed: {getattr(status, 'name', status)}")
    return values[0] if len(values) == 1 else tuple(values)


def device_compute_capability(device: int = 0) -> int | None:
    """The compute capability of CUDA device ``device`` as ``major*10 + minor`` (86 for sm_86), or None when
    cuda-python is missing, no driver is loaded (``cudaErrorInsufficientDriver`` on a CPU-only machine) or no
    device exists."""
    rt = _cudart()
    if rt is None:
        return None
    status, count = rt.cudaGetDeviceCount()
    if int(status) != 0 or count <= device:
        return None
    attr = rt.cudaDeviceAttr
    major = _check(rt.cudaDeviceGetAttribute(attr.cudaDevAttrComputeCapabilityMajor, device), "cudaDeviceGetAttribute")
    minor = _check(rt.cudaDeviceGetAttribute(attr.cudaDevAttrComputeCapabilityMinor, device), "cudaDeviceGetAttribute")
    return int(major) * 10 + int(minor)


@dataclass
class DeviceBuffer:
    """``nbytes`` of device memory at ``ptr`` (an int, what ``set_tensor_address`` takes)."""

    ptr: int
    nbytes: int


class CudaDevice:
    """One CUDA device, one stream, an allocator and events (the backend's device surface).

    Raises:
        BackendError: no usable CUDA device (message says so; the CLI turns it into exit code 2).
    """

    def __init__(self, device: int = 0) -> None:
        rt = _cudart()
        if rt is None:
            raise BackendError("the trt backend needs cuda-python for device memory: pip install cuda-python")
        cc = device_compute_capability(device)
        if cc is None:
            raise BackendError(f"no usable CUDA device {device} (no driver or no GPU): the trt backend runs "
                               "TensorRT engines on an NVIDIA GPU")
        self.rt, self.cc = rt, cc
        _check(rt.cudaSetDevice(device), "cudaSetDevice")
        self.stream = _check(rt.cudaStreamCreate(), "cudaStreamCreate")
        self._kind = rt.cudaMemcpyKind
        self._pending: list[np.ndarray] = []  # host arrays queued uploads still read (freed at synchronize)

    @property
    def stream_handle(self) -> int:
        """The stream as an int, what ``execute_async_v3`` takes."""
        return int(self.stream)

    def alloc(self, nbytes: int) -> DeviceBuffer:
        ptr = _check(self.rt.cudaMalloc(max(1, int(nbytes))), "cudaMalloc")
        return DeviceBuffer(int(ptr), int(nbytes))

    def free(self, buf: DeviceBuffer) -> None:
        _check(self.rt.cudaFree(buf.ptr), "cudaFree")

    def upload(self, buf: DeviceBuffer, host: np.ndarray) -> None:
        """Copy a host array into ``buf``, asynchronously on the stream; the array is kept alive until the next
        :meth:`synchronize` (the copy reads it when the stream gets there)."""
        host = np.ascontiguousarray(host)
        if host.nbytes > buf.nbytes:
            raise BackendError(f"internal error: {host.nbytes} bytes do not fit a {buf.nbytes}-byte buffer")
        self._pending.append(host)
        _check(self.rt.cudaMemcpyAsync(buf.ptr, host.ctypes.data, host.nbytes, self._kind.cudaMemcpyHostToDevice,
                                       self.stream), "cudaMemcpyAsync(host to device)")

    def download(self, buf: DeviceBuffer, shape: tuple[int, ...], dtype: Any) -> np.ndarray:
        """A host copy of the first ``prod(shape)`` elements of ``buf`` (synchronises the stream)."""
        out = np.empty(shape, dtype=dtype)
        _check(self.rt.cudaMemcpyAsync(out.ctypes.data, buf.ptr, out.nbytes, self._kind.cudaMemcpyDeviceToHost,
                                       self.stream), "cudaMemcpyAsync(device to host)")
        self.synchronize()
        return out

    def copy(self, dst: DeviceBuffer, src: DeviceBuffer, nbytes: int) -> None:
        """Device-to-device copy on the stream (no host round trip)."""
        _check(self.rt.cudaMemcpyAsync(dst.ptr, src.ptr, int(nbytes), self._kind.cudaMemcpyDeviceToDevice,
                                       self.stream), "cudaMemcpyAsync(device to device)")

    def synchronize(self) -> None:
        _check(self.rt.cudaStreamSynchronize(self.stream), "cudaStreamSynchronize")
        self._pending.clear()

    def event(self) -> Any:
        """A new event recorded on the stream now."""
        ev = _check(self.rt.cudaEventCreate(), "cudaEventCreate")
        _check(self.rt.cudaEventRecord(ev, self.stream), "cudaEventRecord")
        return ev

    def elapsed_ms(self, start: Any, end: Any) -> float:
        """Milliseconds between two recorded events (waits for ``end``)."""
        _check(self.rt.cudaEventSynchronize(end), "cudaEventSynchronize")
        ms = _check(self.rt.cudaEventElapsedTime(start, end), "cudaEventElapsedTime")
        for ev in (start, end):
            self.rt.cudaEventDestroy(ev)
        return float(ms)
