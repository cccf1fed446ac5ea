"""A test double of the TensorRT + CUDA surface the ``trt`` backend uses, for machines without a GPU.

``FakeDevice`` is a host-memory "device" (integer pointers into bytearrays) that counts every host<->device
transfer; ``fake_api`` returns a :class:`~edgeprune.runtime.trt_backend.TrtApi` whose ``Runtime`` deserializes a
real plan (built by TensorRT-RTX on this CPU) by its sha256 into an engine that executes the ONNX graph the plan
was built from with onnxruntime. The execution context behaves like TensorRT's where the backend relies on it:
input shapes are checked against the active optimisation profile (recorded in the manifest), output shapes are
inferred from the input shapes (``-1`` where they depend on data, which then go through the output allocator),
outputs are written to the bound addresses (refusing a buffer that is too small), and profile switches are
recorded. It checks the backend's bookkeeping, not TensorRT.
"""

from __future__ import annotations

import ctypes
import hashlib
import time
import types

import numpy as np
import onnxruntime as ort

from edgeprune.runtime.cuda_mem import DeviceBuffer
from edgeprune.runtime.trt_backend import TrtApi


class FakeDevice:
    """Host memory addressed by integer pointers; counts transfers (bytes per direction and per step)."""

    stream_handle = 7

    def __init__(self) -> None:
        self.mem: dict[int, bytearray] = {}
        self._next = 1 << 16
        self.uploads: list[int] = []
        self.downloads: list[int] = []
        self.syncs = 0

    def alloc(self, nbytes: int) -> DeviceBuffer:
        ptr, self._next = self._next, self._next + ((nbytes + 511) // 256) * 256
        self.mem[ptr] = bytearray(nbytes)
        return DeviceBuffer(ptr, nbytes)

    def free(self, buf: DeviceBuffer) -> None:
        del self.mem[buf.ptr]

    def _block(self, ptr: int) -> tuple[bytearray, int]:
        base = max(p for p in self.mem if p <= ptr)
        return self.mem[base], ptr - base

    def write(self, ptr: int, arr: np.ndarray) -> None:
        block, off = self._block(ptr)
        data = np.ascontiguousarray(arr).tobytes()
        if off + len(data) > len(block):
            raise AssertionError(f"write of {len(data)} bytes overflows the buffer at {ptr}")
        block[off:off + len(data)] = data

    def read(self, ptr: int, shape, dtype) -> np.ndarray:
        block, off = self._block(ptr)
        n = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
        if off + n > len(block):
            raise AssertionError(f"read of {n} bytes overflows the buffer at {ptr}")
        return np.frombuffer(bytes(block[off:off + n]), dtype=dtype).reshape(shape).copy()

    def upload(self, buf: DeviceBuffer, host: np.ndarray) -> None:
        self.uploads.append(int(host.nbytes))
        self.write(buf.ptr, host)

    def download(self, buf: DeviceBuffer, shape, dtype) -> np.ndarray:
        out = self.read(buf.ptr, shape, dtype)
        self.downloads.append(int(out.nbytes))
        self.synchronize()
        return out

    def copy(self, dst: DeviceBuffer, src: DeviceBuffer, nbytes: int) -> None:
        self.mem[dst.ptr][:nbytes] = self.mem[src.ptr][:nbytes]

    def synchronize(self) -> None:
        self.syncs += 1

    def event(self) -> float:
        return time.perf_counter()

    def elapsed_ms(self, start: float, end: float) -> float:
        return 1e3 * (end - start)


# Inputs the double treats as TensorRT shape tensors (read from host memory at enqueue), as a real engine may for
# the values that decide the in-LLM prefill's output lengths.
HOST_INPUTS = {"visual_start", "visual_count"}


def _host_read(ptr: int, shape, dtype) -> np.ndarray:
    n = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
    return np.frombuffer(ctypes.string_at(ptr, n), dtype=dtype).reshape(shape).copy()


class _Context:
    def __init__(self, engine: "_Engine") -> None:
        self.engine, self.profile = engine, 0
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.addrs: dict[str, int] = {}
        self.allocators: dict[str, object] = {}
        self.session = engine.session

    def set_optimization_profile_async(self, index: int, stream: int) -> bool:
        self.engine.history.append(("profile", index))
        self.profile = index
        return 0 <= index < self.engine.num_optimization_profiles

    def set_input_shape(self, name: str, shape) -> bool:
        lo, _, hi = self.engine.profiles[self.profile][name]
        ok = len(shape) == len(lo) and all(a <= s <= b for a, s, b in zip(lo, shape, hi))
        if ok:
            self.shapes[name] = tuple(int(s) for s in shape)
        return ok

    def set_tensor_address(self, name: str, ptr: int) -> bool:
        self.addrs[name] = int(ptr)
        return True

    def set_output_allocator(self, name: str, allocator) -> bool:
        self.allocators[name] = allocator
        return True

    def _bound(self) -> dict[str, int]:
        bound: dict[str, int] = {}
        for t in self.engine.spec.inputs:
            for d, s in zip(t.dims, self.shapes[t.name]):
                if isinstance(d, str):
                    bound[d] = s
        for sym in list(bound):  # what TensorRT's shape inference derives: presents = past + seq (concat)
            if sym.startswith("past_") and "seq" in bound:
                bound["total_" + sym[5:]] = bound[sym] + bound["seq"]
        return bound

    def get_tensor_shape(self, name: str):
        if name in self.engine.spec.input_names:
            return self.shapes[name]
        t = next(o for o in self.engine.spec.outputs if o.name == name)
        bound = self._bound()
        return tuple(d if isinstance(d, int) else bound.get(d, -1) for d in t.dims)

    def execute_async_v3(self, stream: int) -> bool:
        spec, dev = self.engine.spec, self.engine.device
        feeds = {t.name: (_host_read if t.name in HOST_INPUTS else dev.read)(self.addrs[t.name], self.shapes[t.name],
                                                                              t.np_dtype) for t in spec.inputs}
        outs = self.session.run(spec.output_names, feeds)
        self.engine.history.append(("run", self.profile, {k: v.shape for k, v in feeds.items()}))
        for t, arr in zip(spec.outputs, outs):
            expect = self.get_tensor_shape(t.name)
            arr = np.ascontiguousarray(arr, dtype=t.np_dtype)
            if any(d < 0 for d in expect):
                alloc = self.allocators[t.name]
                ptr = alloc.reallocate_output_async(t.name, 0, arr.nbytes, 256, stream)
                dev.write(ptr, arr)
                alloc.notify_shape(t.name, arr.shape)
            else:
                assert tuple(arr.shape) == tuple(expect), (t.name, arr.shape, expect)
                dev.write(self.addrs[t.name], arr)
        return True


class _Engine:
    def __init__(self, path, spec, profiles, device) -> None:
        self.spec, self.device = spec, device
        self.profiles = [{n: (tuple(a), tuple(o), tuple(b)) for n, a, o, b in p} for p in profiles]
        self.num_optimization_profiles = len(profiles)
        self._names = spec.input_names + spec.output_names
        self.num_io_tensors = len(self._names)
        self.history: list = []
        self.session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])

    def get_tensor_name(self, i: int) -> str:
        return self._names[i]

    def get_tensor_mode(self, name: str) -> str:
        return "input" if name in self.spec.input_names else "output"

    def get_tensor_location(self, name: str) -> str:
        return "host" if name in HOST_INPUTS else "device"

    def create_execution_context(self) -> _Context:
        return _Context(self)


def fake_trt(bundle, key: str, device: FakeDevice) -> types.SimpleNamespace:
    """A module-like namespace with ``Runtime``, ``ILogger``, ``TensorIOMode`` and ``IOutputAllocator``; its
    runtime knows the plans of engine set ``key`` of ``bundle`` by sha256. ``engines`` collects what it made."""
    rec = bundle.manifest["engines"][key]
    known = {g["sha256"]: (name, g["profiles"]) for name, g in rec["graphs"].items()}
    made: dict[str, _Engine] = {}

    class ILogger:
        class Severity:
            WARNING = 2

        def __init__(self) -> None:
            pass

    class IOutputAllocator:
        def __init__(self) -> None:
            pass

    class Runtime:
        def __init__(self, logger) -> None:
            self.logger = logger

        def deserialize_cuda_engine(self, plan: bytes):
            hit = known.get(hashlib.sha256(plan).hexdigest())
            if hit is None:
                return None
            name, profiles = hit
            made[name] = _Engine(bundle.graphs[name].path, bundle.graphs[name].spec, profiles, device)
            return made[name]

    return types.SimpleNamespace(Runtime=Runtime, ILogger=ILogger, IOutputAllocator=IOutputAllocator,
                                 TensorIOMode=types.SimpleNamespace(INPUT="input", OUTPUT="output"),
                                 TensorLocation=types.SimpleNamespace(HOST="host", DEVICE="device"), engines=made)


def fake_api(bundle, key: str, *, flavour=None, version=None, cc=None, register=True) -> TrtApi:
    """A :class:`TrtApi` on the double for engine set ``key`` (override flavour/version/cc to test refusals)."""
    rec = bundle.manifest["engines"][key]
    device = FakeDevice()
    calls: list = []
    return TrtApi(trt=fake_trt(bundle, key, device), device=device, flavour=flavour or rec["flavour"],
                  version=version or rec["version"], cc=cc or rec["compute_capability"],
                  register_plugins=(lambda trt: calls.append(trt)) if register else None)
