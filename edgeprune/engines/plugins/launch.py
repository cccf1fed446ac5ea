"""The plugins' launch path: AOT PTX loaded through the CUDA driver API, launched on a given stream.

This is the body of the IPluginV3 ``enqueue`` (DESIGN.md §5): for one call of a fused op it takes the device
pointers of the inputs, outputs and workspace and TensorRT's stream, and launches the op's kernels in the
contract's argument order (:func:`.contract.launch_sequence`, TensorRT's AOT order: input pointers, int32
scalars, output pointers; GraphRank's scratch carved from the workspace pointer). A GPU test and
``benchmarks/plugin_launch.py`` call :meth:`PluginLauncher.run` directly on device buffers, so TensorRT itself
is only the caller.

Layers, so that everything but the driver calls runs on a CPU:

* :func:`ptx_target`: the PTX target for the device's SM (exact, else forward-compatible PTX);
* :func:`pack_args`: the ``void**`` parameter array ``cuLaunchKernel`` reads (numpy storage kept alive);
* :class:`CudaDriver` (cuda-python's ``cuda.bindings.driver``: ``cuModuleLoadData``, ``cuModuleGetFunction``,
  ``cuFuncSetAttribute``, ``cuLaunchKernel``) and :class:`RecordingDriver` (records the calls; ``--dry-run``
  and the CPU tests use it);
* :class:`PluginLauncher`: PTX per kernel (``edgeprune.kernels.compile_ptx``, disk-cached; the first compile
  needs triton), modules loaded once per CUDA context and PTX, launches in order.

No synchronisation happens here: launches are queued on the caller's stream, as ``enqueue`` requires.
"""

from __future__ import annotations

import hashlib
import logging
import threading
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import numpy as np

from ...errors import EdgepruneError
from .contract import Launch, bind, launch_sequence, problem_dims, workspace_layout

log = logging.getLogger(__name__)

DEFAULT_SHARED_LIMIT = 48 * 1024  # dynamic shared memory above this needs cuFuncSetAttribute first
_MAX_DYNAMIC_SHARED = 8  # CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES


class LaunchError(EdgepruneError):
    """A kernel could not be loaded or launched (the CUDA error is named), or the device has no PTX target."""


def ptx_target(device_sm: int, supported: Sequence[int] | None = None) -> int:
    """The PTX target to load on a device of compute capability ``device_sm`` (e.g. 90 for an H200).

    The device's own SM when it is a target. Otherwise the highest target below sm_90 not above the device:
    PTX for sm_75..sm_89 is JIT-compiled forward by the driver, while Triton's sm_90+ PTX is architecture-
    specific (``sm_90a``) and runs on that SM only.

    Raises:
        LaunchError: no target fits (a GPU older than every target).
    """
    if supported is None:
        from ...kernels.aot import SUPPORTED_SM as supported
    if device_sm in supported:
        return int(device_sm)
    portable = [s for s in supported if s < 90 and s <= device_sm]
    if not portable:
        raise LaunchError(f"no PTX target runs on sm_{device_sm}: targets are {sorted(supported)} (sm_90 and later "
                          "are architecture-specific)")
    return max(portable)


@dataclass
class PackedArgs:
    """``cuLaunchKernel``'s ``kernelParams``: ``address`` is a ``void**`` into ``pointers``, whose entries point
    into ``values`` (one small numpy array per argument, kept alive with this object)."""

    values: list[np.ndarray]
    pointers: np.ndarray

    @property
    def address(self) -> int:
        return int(self.pointers.ctypes.data)

    def decoded(self) -> list[int]:
        """The argument values as integers (what the kernel will read), for tests and dry runs."""
        return [int(v[0]) for v in self.values]


def pack_args(bound: Sequence[tuple[str, int]]) -> PackedArgs:
    """Pack ``[("ptr" | "i32", value), ...]`` (from :func:`.contract.bind`) for ``cuLaunchKernel``.

    Raises:
        LaunchError: an i32 out of range or an unknown kind.
    """
    values = []
    for kind, value in bound:
        if kind == "ptr":
            values.append(np.array([value], dtype=np.uint64))
        elif kind == "i32":
            if not -2**31 <= int(value) < 2**31:
                raise LaunchError(f"int32 kernel argument out of range: {value}")
            values.append(np.array([value], dtype=np.int32))
        else:
            raise LaunchError(f"unknown kernel argument kind {kind!r}")
    pointers = np.array([v.ctypes.data for v in values], dtype=np.uint64)
    return PackedArgs(values, pointers)


# ------------------------------------------------------------------------------------------------ drivers
class CudaDriver:
    """The CUDA driver calls of the launch path, through cuda-python (``cuda.bindings.driver``)."""

    def __init__(self) -> None:
        from ..._deps import require

        driver = require("cuda.bindings.driver")  # cuda-python (extra [trt]); the driver library needs a GPU

        self.cu = driver
        try:
            result = driver.cuInit(0)
        except RuntimeError as exc:  # cuda.pathfinder: no NVIDIA driver library on this machine
            raise LaunchError(f"the CUDA driver cannot be loaded ({exc}); the launch path needs an NVIDIA GPU") from exc
        self._check(result, "cuInit")

    def _check(self, result: Any, what: str) -> Any:
        err, *rest = result if isinstance(result, tuple) else (result,)
        if err != self.cu.CUresult.CUDA_SUCCESS:
            _, name = self.cu.cuGetErrorName(err)
            raise LaunchError(f"{what} failed: {name.decode() if isinstance(name, bytes) else name}")
        return rest[0] if len(rest) == 1 else rest

    def current_context(self) -> int:
        ctx = self._check(self.cu.cuCtxGetCurrent(), "cuCtxGetCurrent")
        if not int(ctx):
            raise LaunchError("no CUDA context is current on this thread (TensorRT or the caller must set one)")
        return int(ctx)

    def device_sm(self) -> int:
        """The compute capability of the current context's device (device 0 when no context is current)."""
        ctx = self._check(self.cu.cuCtxGetCurrent(), "cuCtxGetCurrent")
        dev = (self._check(self.cu.cuCtxGetDevice(), "cuCtxGetDevice") if int(ctx) else
               self._check(self.cu.cuDeviceGet(0), "cuDeviceGet"))
        attr = self.cu.CUdevice_attribute
        major = self._check(self.cu.cuDeviceGetAttribute(attr.CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR, dev), "")
        minor = self._check(self.cu.cuDeviceGetAttribute(attr.CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR, dev), "")
        return int(major) * 10 + int(minor)

    def load(self, ptx: str, name: str) -> Any:
        module = self._check(self.cu.cuModuleLoadData(ptx.encode() + b"\0"), f"cuModuleLoadData({name})")
        return self._check(self.cu.cuModuleGetFunction(module, name.encode()), f"cuModuleGetFunction({name})")

    def set_max_shared(self, fn: Any, nbytes: int) -> None:
        attr = self.cu.CUfunction_attribute.CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES
        self._check(self.cu.cuFuncSetAttribute(fn, attr, int(nbytes)), "cuFuncSetAttribute")

    def launch(self, fn: Any, grid: Sequence[int], block: Sequence[int], shared: int, stream: int,
               params: PackedArgs) -> None:
        self._check(self.cu.cuLaunchKernel(fn, *map(int, grid), *map(int, block), int(shared),
                                           self.cu.CUstream(int(stream)), params.address, 0), "cuLaunchKernel")


@dataclass
class RecordingDriver:
    """A driver that records what would be loaded and launched (CPU tests, ``--dry-run``); no GPU needed.

    Attributes:
        sm: the compute capability it reports.
        context: the context handle it reports.
        loads: (kernel name, PTX sha256) per module load.
        launches: (kernel name, grid, block, shared bytes, stream, decoded argument values) per launch.
    """

    sm: int = 90
    context: int = 1
    loads: list[tuple[str, str]] = field(default_factory=list)
    launches: list[tuple[str, tuple, tuple, int, int, list[int]]] = field(default_factory=list)
    shared_limits: list[tuple[str, int]] = field(default_factory=list)

    def current_context(self) -> int:
        return self.context

    def device_sm(self) -> int:
        return self.sm

    def load(self, ptx: str, name: str) -> Any:
        self.loads.append((name, hashlib.sha256(ptx.encode()).hexdigest()))
        return name

    def set_max_shared(self, fn: Any, nbytes: int) -> None:
        self.shared_limits.append((fn, nbytes))

    def launch(self, fn: Any, grid: Sequence[int], block: Sequence[int], shared: int, stream: int,
               params: PackedArgs) -> None:
        self.launches.append((fn, tuple(grid), tuple(block), int(shared), int(stream), params.decoded()))


# ------------------------------------------------------------------------------------------------ launcher
_MODULES: dict[tuple[int, str], Any] = {}  # (context, PTX sha256) -> function: loaded once per context
_LOCK = threading.Lock()


def _function(driver: Any, kernel: Any) -> Any:
    key = (driver.current_context(), hashlib.sha256(kernel.ptx.encode()).hexdigest())
    if isinstance(driver, RecordingDriver):
        key = (id(driver),) + key  # recordings never share a cache entry with real contexts or each other
    with _LOCK:
        fn = _MODULES.get(key)
        if fn is None:
            fn = driver.load(kernel.ptx, kernel.kernel_name)
            if kernel.shared_mem > DEFAULT_SHARED_LIMIT:
                driver.set_max_shared(fn, kernel.shared_mem)
            _MODULES[key] = fn
            log.debug("loaded %s (sm_%d) into context %#x", kernel.kernel_name, kernel.sm, key[-2])
    return fn


class PluginLauncher:
    """Launches one fused op's kernels for a plugin instance (one op, fixed attributes).

    Args:
        op: ``ZonalTopK`` or ``GraphRank``.
        attrs: the node attributes (:func:`.contract.parse_attributes`).
        driver: :class:`CudaDriver` (default, created on first use) or :class:`RecordingDriver`.
        sm: the PTX target; default :func:`ptx_target` of the current device.
        cache_dir: the PTX cache (``edgeprune.kernels.compile_ptx``'s default when None).
        kernels: {kernel: CompiledKernel} to use instead of compiling (e.g. PTX shipped with a bundle).
    """

    def __init__(self, op: str, attrs: Mapping[str, Any], *, driver: Any = None, sm: int | None = None,
                 cache_dir: str | None = None, kernels: Mapping[str, Any] | None = None) -> None:
        self.op, self.attrs = op, dict(attrs)
        self._driver, self._sm, self.cache_dir = driver, sm, cache_dir
        self._kernels = dict(kernels) if kernels else None

    @property
    def driver(self) -> Any:
        if self._driver is None:
            self._driver = CudaDriver()
        return self._driver

    @property
    def sm(self) -> int:
        if self._sm is None:
            self._sm = ptx_target(self.driver.device_sm())
            log.info("%s: PTX target sm_%d for this device", self.op, self._sm)
        return self._sm

    def kernels(self) -> dict[str, Any]:
        """{kernel: CompiledKernel} of the op for :attr:`sm` (compiled or read from the PTX cache once)."""
        if self._kernels is None:
            from ...kernels.aot import compile_ptx
            from .contract import kernel_constants

            self._kernels = {name: compile_ptx(name, self.sm, cache_dir=self.cache_dir, **consts)
                             for name, consts in kernel_constants(self.op, self.attrs).items()}
        return self._kernels

    def plan(self, input_shapes: Sequence[Sequence[int]]) -> tuple[dict[str, int], Any, list[Launch]]:
        """(problem dims, workspace layout, launches) of a call with these input shapes (pure; no driver)."""
        dims = problem_dims(self.op, self.attrs, input_shapes)
        return dims, workspace_layout(self.op, dims), launch_sequence(self.op, self.attrs, dims)

    def run(self, input_shapes: Sequence[Sequence[int]], inputs: Sequence[int], outputs: Sequence[int],
            workspace: int, stream: int, workspace_bytes: int | None = None) -> list[Launch]:
        """Queue the op's launches on ``stream`` (IPluginV3 ``enqueue``'s body).

        Args:
            input_shapes: the concrete input shapes (TensorRT's ``input_desc[i].dims``).
            inputs, outputs: device pointers, in node order.
            workspace: the workspace device pointer (at least :func:`.contract.workspace_bytes` bytes).
            stream: the CUDA stream handle (an int).
            workspace_bytes: the workspace's size when known; checked against the layout.
        Returns:
            The launches made.
        Raises:
            PluginContractError: bad shapes or missing pointers; LaunchError: a driver failure or a too small
                workspace.
        """
        dims, layout, seq = self.plan(input_shapes)
        if workspace_bytes is not None and workspace_bytes < layout.nbytes:
            raise LaunchError(f"{self.op}: the workspace has {workspace_bytes} bytes, the call needs {layout.nbytes} "
                              f"for {dims}")
        kernels = self.kernels()
        for launch in seq:
            kernel = kernels[launch.kernel]
            params = pack_args(bind(launch, inputs, outputs, workspace, layout))
            self.driver.launch(_function(self.driver, kernel), launch.grid, kernel.block, kernel.shared_mem,
                               stream, params)
        return seq
