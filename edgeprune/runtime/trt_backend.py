"""The ``trt`` backend: a bundle's TensorRT engines (``edgeprune build``) run with the TensorRT Python API and
cuda-python device memory; numpy on the host, no torch, no transformers.

What runs where: every graph in its engine (``Runtime.deserialize_cuda_engine``, one execution context each,
``set_optimization_profile_async``, ``set_input_shape``, ``set_tensor_address``, ``execute_async_v3`` on one
stream); the host-side logic (tokenisation, LLaVA-NeXT packing, the splice, GridPrune guidance, G-Prune group
ids) is the ONNX Runtime backend's, inherited from :class:`~edgeprune.runtime.ort_backend.OrtBackend`, whose
runners here are :class:`TrtRunner` objects. The KV cache lives in preallocated device buffers of capacity
``max_positions`` per layer, two sets used in turn (ping-pong: a step reads one set and writes its presents into
the other), so a decode step moves no cache through the host; the decode step's embedding goes from the embed
engine to the decoder on the device and only the last-token logits come back. The pre-LLM decoder engine has two
optimisation profiles (0 prefill, 1 decode) and the runner switches between them. The in-LLM methods (FastV,
FitPrune) run their prefill engine, whose per-layer present lengths depend on data (drops inside the graph):
an ``IOutputAllocator`` hands TensorRT the cache buffers and records each layer's length; decode then runs over
that ragged cache. Each engine call is bracketed by CUDA events; the per-stage GPU milliseconds appear in the
profile's counters (``gpu_ms_<stage>``).

Which plans: the manifest's ``engines`` section (:mod:`edgeprune.engines.build`) keyed
``<flavour>-<version>-sm<cc>``; a set built for another TensorRT flavour/version or compute capability, a plan
whose sha256 differs from its record, or a plugin mode this process cannot serve is refused with a message that
says to rebuild. Plugin creators are registered before deserialising an engine that holds IPluginV3 layers.

The seam: every TensorRT and CUDA call goes through a :class:`TrtApi` (the bindings module and a
:class:`~edgeprune.runtime.cuda_mem.CudaDevice`). :func:`load_api` builds the real one and refuses clearly where
no TensorRT or no CUDA device is usable; tests inject a double that executes the bundle's ONNX graphs with
onnxruntime on host memory, which exercises everything here except the bindings themselves.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np

from ..bundle import Bundle, open_bundle
from ..bundle.format import member_path, sha256_file
from ..errors import BackendError
from .ort_backend import OrtBackend

log = logging.getLogger(__name__)


@dataclass
class TrtApi:
    """The TensorRT + CUDA surface the backend uses (module docstring).

    Attributes:
        trt: the bindings module (``Runtime``, ``ILogger``, ``TensorIOMode``, ``IOutputAllocator``).
        device: a :class:`~edgeprune.runtime.cuda_mem.CudaDevice` (or a double with its methods).
        flavour, version: the TensorRT in use; cc: the device's compute capability (86 = sm_86).
        aot_plugins: this TensorRT runs Python AOT plugins (their kernels are inside the plan).
        register_plugins: registers our IPluginV3 creators with ``trt`` (None: the plugins are unavailable).
    """

    trt: Any
    device: Any
    flavour: str
    version: str
    cc: int
    aot_plugins: bool = False
    register_plugins: Callable[[Any], Any] | None = None


def load_api(flavour: str | None = None) -> TrtApi:
    """The real :class:`TrtApi`: a TensorRT flavour and CUDA device 0.

    Raises:
        MissingDependencyError: no TensorRT is installed (names what to install).
        BackendError: TensorRT is installed but no CUDA device is usable (e.g. TensorRT-RTX on a CPU machine).
    """
    from ..engines.capability import detect
    from .cuda_mem import CudaDevice

    fl = detect(flavour)
    try:
        device = CudaDevice()
    except BackendError as exc:
        raise BackendError(f"--backend trt: {fl.name} {fl.version} is installed, but {exc}") from None
    register = None
    try:
        from ..engines.plugins import register_plugins as register
    except ImportError as exc:
        log.info("edgeprune plugin creators unavailable (%s): engines with IPluginV3 layers will be refused", exc)
    return TrtApi(trt=fl.module, device=device, flavour=fl.name, version=fl.version, cc=device.cc,
                  aot_plugins=fl.aot_plugins, register_plugins=register)


# ---------------------------------------------------------------------------------------------------- engine set
def select_engine_set(bundle: Bundle, api: TrtApi) -> tuple[str, dict[str, Any]]:
    """The bundle's engine set for this TensorRT and GPU, checked (module docstring).

    Returns:
        (key, manifest record).
    Raises:
        BackendError: no engines, none for this flavour/version/GPU, a record that contradicts its key, or a
            plugin mode this process cannot serve; every message says how to rebuild.
    """
    from ..engines.build import REBUILD, engine_key

    rebuild = REBUILD.format(root=bundle.root)
    sets = bundle.manifest.get("engines") or {}
    if not sets:
        raise BackendError(f"bundle {bundle.root} has no TensorRT engines; build them with `edgeprune build "
                           f"--bundle {bundle.root}`")
    key = engine_key(api.flavour, api.version, api.cc)
    rec = sets.get(key)
    if rec is None:
        built = "; ".join(f"{r.get('flavour')} {r.get('version')} for sm_{r.get('compute_capability')}"
                          for r in sets.values())
        raise BackendError(f"bundle {bundle.root} has engines for {built}, but this process runs {api.flavour} "
                           f"{api.version} on sm_{api.cc}; a plan only runs on the TensorRT version and GPU it was "
                           f"built for: {rebuild}")
    got = (rec.get("flavour"), rec.get("version"), rec.get("compute_capability"))
    if got != (api.flavour, api.version, api.cc):
        raise BackendError(f"bundle {bundle.root}: engine set {key} records {got}; {rebuild}")
    for op, entry in (rec.get("plugins") or {}).get("ops", {}).items():
        mode = entry.get("mode")
        if mode == "ipluginv3" and api.register_plugins is None:
            raise BackendError(f"the {op} engines were built with IPluginV3 plugins, which this process cannot "
                               "register (edgeprune.engines.plugins unavailable); " + rebuild + " --plugins none")
        if mode == "aot" and not api.aot_plugins:
            raise BackendError(f"the {op} engines hold an AOT plugin, which {api.flavour} {api.version} cannot run; "
                               + rebuild)
        if mode not in ("ipluginv3", "aot", "none"):
            raise BackendError(f"engine set {key}: unknown plugin mode {mode!r} for {op}; {rebuild}")
    missing = sorted(set(bundle.graphs) - set(rec.get("graphs") or {}))
    if missing:
        raise BackendError(f"engine set {key} of bundle {bundle.root} lacks the graphs {missing}; {rebuild}")
    return key, rec


def read_plan(bundle: Bundle, key: str, graph: str, rec: Mapping[str, Any]) -> bytes:
    """A plan's bytes after checking its path stays inside the bundle and its sha256 matches the record.

    Raises:
        BackendError: missing or modified plan (says to rebuild). BundleError: a path that leaves the bundle.
    """
    from ..engines.build import REBUILD

    entry = rec["graphs"][graph]
    path = member_path(bundle.root, entry["file"], f"engines.{key}.graphs.{graph}.file")
    if not path.is_file() or sha256_file(path) != entry.get("sha256"):
        state = "is missing" if not path.is_file() else "does not match its sha256 in the manifest"
        raise BackendError(f"engine {entry['file']} {state}; {REBUILD.format(root=bundle.root)}")
    return path.read_bytes()


# ---------------------------------------------------------------------------------------------------- runners
@dataclass
class DeviceTensor:
    """A tensor in device memory: buffer, shape and numpy dtype."""

    buf: Any
    shape: tuple[int, ...]
    dtype: Any

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * np.dtype(self.dtype).itemsize


def _output_allocator(trt: Any, runner: "TrtRunner") -> Any:
    """An ``IOutputAllocator`` for data-dependent output shapes: hands out the caller's target buffer when it is
    large enough (the KV cache), else a pooled one; records the final shape TensorRT reports."""

    class _Allocator(trt.IOutputAllocator):  # type: ignore[misc, name-defined]
        def __init__(self) -> None:
            trt.IOutputAllocator.__init__(self)
            self.targets: dict[str, Any] = {}
            self.shapes: dict[str, tuple[int, ...]] = {}
            self.buffers: dict[str, Any] = {}

        def reallocate_output_async(self, tensor_name: str, memory: int, size: int, alignment: int,
                                    stream: int) -> int:
            buf = self.targets.get(tensor_name)
            if buf is None or buf.nbytes < size:
                buf = runner.scratch(f"out:{tensor_name}", int(size))
            self.buffers[tensor_name] = buf
            return int(buf.ptr)

        def reallocate_output(self, tensor_name: str, memory: int, size: int, alignment: int) -> int:
            return self.reallocate_output_async(tensor_name, memory, size, alignment, 0)  # TensorRT < 10 name

        def notify_shape(self, tensor_name: str, shape: Any) -> None:
            self.shapes[tensor_name] = tuple(int(d) for d in shape)

    return _Allocator()


class TrtRunner:
    """One engine, one execution context; device-level :meth:`run` and host-level :meth:`infer`.

    Args:
        api: the :class:`TrtApi`; runtime: a ``trt.Runtime``; entry: the bundle's graph entry (spec);
        plan: the serialized engine; timings: (stage, start event, end event) sink.
    Raises:
        BackendError: the plan does not deserialize or its I/O differs from the graph's spec (rebuild).
    """

    def __init__(self, api: TrtApi, runtime: Any, entry: Any, plan: bytes, rebuild: str,
                 timings: list[tuple[str, Any, Any]]) -> None:
        self.api, self.spec, self.name, self.timings = api, entry.spec, entry.name, timings
        self.engine = runtime.deserialize_cuda_engine(plan)
        if self.engine is None:
            raise BackendError(f"{api.flavour} {api.version} cannot deserialize the {self.name} engine (another "
                               f"TensorRT version, GPU or plugin set built it?); {rebuild}")
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        inputs = [n for n in names if self.engine.get_tensor_mode(n) == api.trt.TensorIOMode.INPUT]
        if sorted(inputs) != sorted(self.spec.input_names) or \
                sorted(set(names) - set(inputs)) != sorted(self.spec.output_names):
            raise BackendError(f"the {self.name} engine has inputs {inputs} and outputs "
                               f"{sorted(set(names) - set(inputs))}, the bundle's graph {self.spec.input_names} -> "
                               f"{self.spec.output_names}; {rebuild}")
        # Inputs TensorRT reads on the host (shape tensors: values that decide output shapes, e.g. the in-LLM
        # prefill's visual_count): bound to host memory, as ``get_tensor_location`` says.
        host_loc = getattr(getattr(api.trt, "TensorLocation", None), "HOST", None)
        self._host_inputs = {n for n in inputs if host_loc is not None
                             and self.engine.get_tensor_location(n) == host_loc}
        self._host_arrays: dict[str, np.ndarray] = {}
        self.context = self.engine.create_execution_context()
        self.profiles = int(self.engine.num_optimization_profiles)
        self.profile = 0
        self._pool: dict[str, Any] = {}
        self._alloc = _output_allocator(api.trt, self)
        self._dtypes = {t.name: np.dtype(t.np_dtype) for t in (*self.spec.inputs, *self.spec.outputs)}

    def scratch(self, key: str, nbytes: int) -> Any:
        """A pooled device buffer of at least ``nbytes`` (grown, never shrunk)."""
        buf = self._pool.get(key)
        if buf is None or buf.nbytes < nbytes:
            if buf is not None:
                self.api.device.free(buf)
            buf = self._pool[key] = self.api.device.alloc(max(nbytes, 256))
        return buf

    def set_profile(self, index: int) -> None:
        """Switch the optimisation profile (the pre-LLM decoder: 0 prefill, 1 decode)."""
        if index >= self.profiles:
            raise BackendError(f"the {self.name} engine has {self.profiles} optimisation profiles, not {index + 1}")
        if index != self.profile:
            if not self.context.set_optimization_profile_async(index, self.api.device.stream_handle):
                raise BackendError(f"{self.name}: TensorRT refused optimisation profile {index}")
            self.profile = index

    def _bind_input(self, name: str, value: np.ndarray | DeviceTensor) -> None:
        if name in self._host_inputs:  # a shape tensor: TensorRT reads it from host memory at enqueue
            host = self._host_arrays[name] = np.ascontiguousarray(value, dtype=self._dtypes[name])
            if not self.context.set_input_shape(name, tuple(host.shape)):
                raise BackendError(f"{self.name}: input {name!r} shape {list(host.shape)} is outside the profile")
            self.context.set_tensor_address(name, int(host.ctypes.data))
            return
        if isinstance(value, np.ndarray):
            host = np.ascontiguousarray(value, dtype=self._dtypes[name])
            buf = self.scratch(f"in:{name}", host.nbytes)
            self.api.device.upload(buf, host)  # the device keeps ``host`` alive until the stream is synchronised
            value = DeviceTensor(buf, tuple(host.shape), host.dtype)
        if not self.context.set_input_shape(name, tuple(value.shape)):
            raise BackendError(f"{self.name}: input {name!r} shape {list(value.shape)} is outside the engine's "
                               f"optimisation profile {self.profile}; rebuild with larger bounds or shorten the "
                               "request")
        self.context.set_tensor_address(name, int(value.buf.ptr))

    def run(self, inputs: Mapping[str, np.ndarray | DeviceTensor], stage: str,
            targets: Mapping[str, Any] | None = None) -> dict[str, DeviceTensor]:
        """Enqueue the engine on the stream.

        Args:
            inputs: every input, as host arrays (uploaded) or :class:`DeviceTensor` (bound as they are).
            stage: the profile stage its GPU time counts to.
            targets: output name -> device buffer to write into (the KV cache); others go to pooled buffers.
        Returns:
            output name -> :class:`DeviceTensor` (still on the device; nothing is synchronised).
        Raises:
            BackendError: a shape outside the profile, a target too small, or a failed enqueue.
        """
        targets = targets or {}
        for name in self.spec.input_names:
            self._bind_input(name, inputs[name])
        shapes, dynamic = {}, []
        for name in self.spec.output_names:
            shape = tuple(int(d) for d in self.context.get_tensor_shape(name))
            if any(d < 0 for d in shape):  # data-dependent (in-LLM prefill): TensorRT asks the allocator
                self._alloc.targets[name] = targets.get(name)
                self.context.set_output_allocator(name, self._alloc)
                dynamic.append(name)
                continue
            nbytes = int(np.prod(shape, dtype=np.int64)) * self._dtypes[name].itemsize
            buf = targets.get(name)
            if buf is not None and buf.nbytes < nbytes:
                raise BackendError(f"{self.name}: output {name!r} needs {nbytes} bytes, its buffer has {buf.nbytes}")
            buf = buf if buf is not None else self.scratch(f"out:{name}", nbytes)
            self.context.set_tensor_address(name, int(buf.ptr))
            shapes[name] = DeviceTensor(buf, shape, self._dtypes[name])
        start = self.api.device.event()
        if not self.context.execute_async_v3(self.api.device.stream_handle):
            raise BackendError(f"{self.api.flavour}: execute_async_v3 failed for the {self.name} engine")
        self.timings.append((stage, start, self.api.device.event()))
        for name in dynamic:
            shapes[name] = DeviceTensor(self._alloc.buffers[name], self._alloc.shapes[name], self._dtypes[name])
        return shapes

    def download(self, t: DeviceTensor) -> np.ndarray:
        """A host copy of ``t`` (synchronises the stream)."""
        return self.api.device.download(t.buf, t.shape, t.dtype)

    def infer(self, feeds: Mapping[str, np.ndarray], stage: str | None = None) -> list[np.ndarray]:
        """Host in, host out, outputs in spec order (what the inherited host logic calls).

        Raises:
            BackendError: feeds that do not match the spec.
        """
        self.spec.check_feeds(feeds)
        out = self.run(feeds, stage or self.name)
        return [self.download(out[n]) for n in self.spec.output_names]


# ---------------------------------------------------------------------------------------------------- backend
class TrtBackend(OrtBackend):
    """:class:`~edgeprune.runtime.backend.Backend` over a bundle's engine set (module docstring).

    The host-side stages (vision packing, guidance, prune feeds, splice) are :class:`OrtBackend`'s, driving
    :class:`TrtRunner` objects; prefill and decode run over the device KV cache (:mod:`~edgeprune.runtime.trt_kv`).

    Args:
        bundle: the bundle directory or an opened :class:`~edgeprune.bundle.Bundle`.
        api: the TensorRT + CUDA surface (default :func:`load_api`; tests pass a double).
        verify: hash the bundle's files before loading (the plans are always checked against their records).
    Raises:
        BundleError, BackendError (no usable TensorRT or GPU, no matching engine set), MissingDependencyError.
    """

    name = "trt"

    def __init__(self, bundle: str | Path | Bundle, api: TrtApi | None = None, verify: bool = True) -> None:
        from ..engines.build import REBUILD
        from ..engines.rtx import _capture_logger
        from .trt_kv import CacheShape, KvCache, TrtLlm

        self.bundle = bundle if isinstance(bundle, Bundle) else open_bundle(bundle, verify=verify)
        self.api = api or load_api()
        self.engine_key, self.record = select_engine_set(self.bundle, self.api)
        modes = {e.get("mode") for e in (self.record.get("plugins") or {}).get("ops", {}).values()}
        if "ipluginv3" in modes and self.api.register_plugins is not None:
            self.api.register_plugins(self.api.trt)  # before deserialising: the plans name our creators
        self._logger = _capture_logger(self.api.trt)
        runtime = self.api.trt.Runtime(self._logger)
        self._timings: list[tuple[str, Any, Any]] = []
        self._gpu_ms: dict[str, float] = {}
        rebuild = REBUILD.format(root=self.bundle.root)
        self.runners = {name: TrtRunner(self.api, runtime, entry, read_plan(self.bundle, self.engine_key, name,
                                                                            self.record), rebuild, self._timings)
                        for name, entry in self.bundle.graphs.items()}
        self.device = "cuda"
        self._init_host()
        dec = self.runners["decoder"].spec
        shape = CacheShape.of(dec)
        cache = KvCache(self.api.device, [n for n in dec.input_names if n.startswith("past_")],
                        [n for n in dec.output_names if n.startswith("present_")], shape.heads, shape.head_dim,
                        shape.dtype, self.max_positions)
        self.llm = TrtLlm(self.runners["decoder"], self.runners["embed"], self.runners.get("prefill"), cache)
        log.info("trt backend: engine set %s, KV cache %.1f MiB on the device (2 x %d positions)", self.engine_key,
                 cache.nbytes / 2**20, self.max_positions)

    def _init_host(self) -> None:
        """The host-side state :class:`OrtBackend`'s stages read (its constructor sets the same fields)."""
        self._read_host_config()
        self._spliced = None
        self._ragged, self._ragged_active = None, False
        self._guidance = self._make_guidance(self.bundle.manifest.get("guidance"))

    def synchronize(self) -> None:
        self.api.device.synchronize()

    def gpu_ms(self) -> dict[str, float]:
        """GPU milliseconds per stage so far, from the CUDA events around every engine call."""
        pending, self._timings[:] = list(self._timings), []
        for stage, start, end in pending:
            self._gpu_ms[stage] = self._gpu_ms.get(stage, 0.0) + self.api.device.elapsed_ms(start, end)
        return dict(self._gpu_ms)

    @property
    def info(self) -> dict[str, Any]:
        """Engine set, TensorRT and GPU, and the per-stage GPU time of the request (``gpu_ms_<stage>``)."""
        out: dict[str, Any] = {"engines": self.engine_key, "plugins": ",".join(
            f"{op}:{e.get('mode')}" for op, e in (self.record.get("plugins") or {}).get("ops", {}).items()) or "-"}
        out.update({f"gpu_ms_{k}": round(v, 3) for k, v in self.gpu_ms().items()})
        self._gpu_ms.clear()  # one request's worth per profile
        return out

    def prefill(self, embeds: np.ndarray, position_ids: np.ndarray, in_llm: Any = None) -> np.ndarray:
        """Start a fresh device cache and run the prompt (in-LLM: through the prefill engine, ragged cache).

        Raises:
            BackendError: an in-LLM request for a bundle without a prefill engine, or the reverse.
        """
        self._ragged_active = in_llm is not None
        if in_llm is None:
            if self.llm.in_llm:
                raise BackendError("this bundle's decoder runs after an in-LLM prefill only (method "
                                   f"{self.bundle.method['name']}); the pipeline must pass the in-LLM request")
            return self.llm.prefill(embeds, position_ids)
        if not self.llm.in_llm or self._spliced is None:
            raise BackendError(f"this bundle ({self.bundle.method['name']}) has no in-LLM prefill graph; export one "
                               "with --method fastv or fitprune" if not self.llm.in_llm else
                               "splice() must run before an in-LLM prefill")
        visual, pos = self._spliced
        return self.llm.prefill_in_llm(embeds, position_ids, int(in_llm.visual_start), pos, visual.prunable_pos)

    def in_llm_stats(self) -> dict[str, Any]:
        return self.llm.stats()

    def decode(self, token: int, position: int) -> np.ndarray:
        return self.llm.decode(token, position)


def check_usable(flavour: str | None = None) -> TrtApi:
    """Fail fast where ``--backend trt`` cannot run: :func:`load_api` (one clear error, CLI exit 2)."""
    return load_api(flavour)


def build_trt_pipeline(bundle: str | Path, method: str | None = None, tokens: int | None = None,
                       ratio: float | None = None, method_args: Mapping[str, str] | None = None,
                       api: TrtApi | None = None) -> Any:
    """A :class:`~edgeprune.runtime.pipeline.Pipeline` over a bundle's engines; method, K and positions come from
    the bundle (given flags must match it).

    Raises:
        BundleError, BackendError, MissingDependencyError.
    """
    from ..methods.base import Budget
    from .pipeline import Pipeline

    opened = open_bundle(bundle)
    opened.check_request(method, tokens, ratio, method_args)
    m = opened.method
    budget = Budget(tokens=m["k"]) if m["uses_budget"] else Budget()
    return Pipeline(TrtBackend(opened, api=api, verify=False), budget, m["positions"], bool(m["uses_budget"]),
                    m.get("placement", "pre_llm"))
