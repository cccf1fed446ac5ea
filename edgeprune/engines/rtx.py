"""Build serialized TensorRT engines from a bundle's ONNX graphs, with optimisation profiles from its GraphSpecs.

The same code drives both flavours of :mod:`edgeprune.engines.capability` (the TensorRT 10.x builder API:
``Builder.create_network``, ``OnnxParser.parse_from_file``, ``IBuilderConfig.add_optimization_profile``,
``builder_optimization_level``, ``build_serialized_network``). With TensorRT for RTX it runs on a CPU-only
machine, which makes it the build smoke test of every exported graph; with full TensorRT it needs the target GPU.

Polygraphy's loaders are not used here: its RTX mode imports a module named ``tensorrt_rtx`` (the PyPI bindings
install as ``tensorrt_rtx_bindings``) and is switched by an environment variable, which only ``cli/`` may read.

Profiles (DESIGN.md §4: GraphSpec drives them). Every symbolic dimension of a spec gets (min, opt, max) from
:func:`symbol_bounds`, which reads the manifest: ``batch`` 1..``max_batch``; ``views`` 1..the most anyres views;
``n`` (LLaVA-NeXT prune graph) K..N_max; ``seq``/``past``/``total`` (and the per-layer ``past_l`` of in-LLM
decoders) up to ``max_positions``; the CLIP text tower's ``seq`` up to its context. The pre-LLM decoder gets two
profiles, prefill (profile 0: empty past, seq up to the context) and decode (profile 1: one token, past up to
the context), so each is tuned for its own shapes; a runner picks the profile by phase. The in-LLM methods have
a separate prefill graph, so their decoder gets the decode profile only.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from ..errors import EdgepruneError
from ..bundle.spec import GraphSpec
from .capability import NATIVE_TOPK_MAX_K, TrtFlavour, detect, onnx_topk_ks

Shape = tuple[int, ...]
ShapeRange = tuple[str, Shape, Shape, Shape]  # (input name, min, opt, max)
Profile = list[ShapeRange]
Bounds = dict[str, tuple[int, int, int]]  # symbol -> (min, opt, max)

PROMPT_TEXT_OPT = 64  # text tokens of a typical templated question: the "opt" of prompt-length profiles
ANSWER_OPT = 32  # generated tokens at the "opt" decode step


class EngineBuildError(EdgepruneError):
    """An engine cannot be built: unparsable graph, bad profiles, or a builder failure (the log is attached)."""


@dataclass
class EngineBuild:
    """The outcome of one engine build.

    Attributes:
        graph: graph name (or the ONNX file stem).
        path: the serialized engine (plan) file.
        nbytes: its size.
        parse_s / build_s: seconds spent parsing the ONNX file and building the engine.
        flavour: ``tensorrt`` or ``tensorrt-rtx`` and its version.
        profiles: the optimisation profiles used.
        warnings: builder/parser warnings and errors (verbatim).
        reused: the plan was copied from an identical graph built earlier (see ``cache``).
    """

    graph: str
    path: Path
    nbytes: int
    parse_s: float
    build_s: float
    flavour: str
    profiles: list[Profile]
    warnings: list[str] = field(default_factory=list)
    reused: bool = False
    plugin_layers: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"graph": self.graph, "path": str(self.path), "nbytes": self.nbytes, "parse_s": round(self.parse_s, 4),
                "build_s": round(self.build_s, 4), "flavour": self.flavour, "reused": self.reused,
                "plugin_layers": self.plugin_layers,
                "profiles": [[[n, list(a), list(b), list(c)] for n, a, b, c in p] for p in self.profiles],
                "warnings": self.warnings}


# ---------------------------------------------------------------------------------------------------- profiles
def _bound(bounds: Mapping[str, tuple[int, int, int]], sym: str) -> tuple[int, int, int] | None:
    """The bounds of ``sym``; per-layer symbols (``past_3``, ``len_0``) fall back to their family (``past``)."""
    return bounds.get(sym) or bounds.get(re.sub(r"_\d+$", "", sym))


def profile_ranges(spec: GraphSpec, bounds: Mapping[str, tuple[int, int, int]]) -> Profile:
    """One optimisation profile for ``spec``: fixed dims stay, each symbolic dim takes its (min, opt, max).

    Args:
        spec: the graph's spec.
        bounds: symbol -> (min, opt, max); symbols the spec does not use are ignored, and a per-layer symbol
            (``past_3``) without its own entry takes its family's (``past``).
    Returns:
        [(input name, min shape, opt shape, max shape)] in input order.
    Raises:
        EngineBuildError: a symbol of the spec has no bounds, or its bounds are not min <= opt <= max.
    """
    resolved: dict[str, tuple[int, int, int]] = {}
    for sym in spec.symbols():
        b = _bound(bounds, sym)
        if b is None:
            raise EngineBuildError(f"graph {spec.name!r}: no profile bounds for dimension {sym!r} "
                                   f"(bounds given for {sorted(bounds)})")
        if not 0 <= b[0] <= b[1] <= b[2]:
            raise EngineBuildError(f"graph {spec.name!r}: dimension {sym!r} needs 0 <= min <= opt <= max; got {b}")
        resolved[sym] = b
    return [(t.name, *(tuple(resolved[d][i] if isinstance(d, str) else d for d in t.dims) for i in range(3)))
            for t in spec.inputs]


def symbol_bounds(manifest: Mapping[str, Any], max_batch: int = 1) -> dict[str, list[Bounds]]:
    """(min, opt, max) of every symbolic dimension, per graph and profile (see the module docstring).

    Args:
        manifest: a bundle manifest (:mod:`edgeprune.bundle`).
        max_batch: the largest batch an engine accepts (the pipeline runs batch 1).
    Returns:
        graph name -> one bounds dict per optimisation profile.
    Raises:
        EngineBuildError: ``max_batch`` < 1.
    """
    if max_batch < 1:
        raise EngineBuildError(f"max_batch must be >= 1; got {max_batch}")
    method, vision = manifest["method"], manifest["vision"]
    max_pos = int(manifest["max_positions"])
    per_view = int(vision["patches_per_view"])
    n_max = int(method.get("n_max") or per_view)
    k = method.get("k")
    in_llm = method.get("placement") == "in_llm"
    views = max(1, n_max // per_view)  # LLaVA-1.5: 1; NeXT: base view + the most crops of any pinpoint
    # Visual tokens entering the LLM: K after a pre-LLM prune; every token for in-LLM methods (dropped inside).
    prompt = min(max_pos, (n_max if in_llm or not k else int(k)) + PROMPT_TEXT_OPT)
    past = min(max_pos - 1, prompt + ANSWER_OPT)
    base: Bounds = {"batch": (1, 1, max_batch), "views": (1, views, views), "n": (int(k or 1), n_max, n_max),
                    "seq": (1, PROMPT_TEXT_OPT, max_pos)}
    prefill = base | {"seq": (1, prompt, max_pos), "past": (0, 0, 0), "total": (1, prompt, max_pos)}
    decode = base | {"seq": (1, 1, 1), "past": (1, past, max_pos - 1), "total": (2, past + 1, max_pos)}
    guidance = manifest.get("guidance") or {}
    context = int(guidance.get("context") or max_pos)  # CLIP text tower: its position table (77)
    return {"vision": [base], "prune": [base], "embed": [base],
            "guidance": [base | {"seq": (1, min(16, context), context)}],
            "prefill": [prefill],  # in-LLM prefill graph (FastV, FitPrune): drops tokens, returns a ragged cache
            # pre-LLM decoder: one graph, two phases; in-LLM decoder: decode steps over the ragged cache only
            "decoder": [decode] if in_llm else [prefill, decode]}


def bundle_profiles(manifest: Mapping[str, Any], max_batch: int = 1) -> dict[str, list[Profile]]:
    """The optimisation profiles of every graph of a bundle.

    Returns:
        graph name -> list of profiles (the pre-LLM decoder has two: prefill, decode).
    Raises:
        EngineBuildError: a graph the bounds do not know, or a symbol without bounds.
    """
    bounds = symbol_bounds(manifest, max_batch)
    out: dict[str, list[Profile]] = {}
    for name, entry in manifest["graphs"].items():
        if name not in bounds:
            raise EngineBuildError(f"no optimisation profiles are defined for graph {name!r}; known: "
                                   f"{', '.join(bounds)}")
        spec = GraphSpec.from_dict(entry["spec"])
        out[name] = [profile_ranges(spec, b) for b in bounds[name]]
    return out


def _normalise(profiles: Sequence[Any]) -> list[Profile]:
    """Accept one profile ``[(name, min, opt, max), ...]`` or a list of them; return a list of profiles."""
    if not profiles:
        raise EngineBuildError("at least one optimisation profile is needed")
    if isinstance(profiles[0], tuple) and profiles[0] and isinstance(profiles[0][0], str):
        profiles = [profiles]
    return [[(str(n), tuple(map(int, a)), tuple(map(int, b)), tuple(map(int, c))) for n, a, b, c in p]
            for p in profiles]


# ---------------------------------------------------------------------------------------------------- building
def _capture_logger(trt: Any) -> Any:
    """An ``ILogger`` of ``trt`` that keeps warnings and errors (for error messages) and drops the rest."""

    class _Capture(trt.ILogger):  # type: ignore[misc, name-defined]
        def __init__(self) -> None:
            trt.ILogger.__init__(self)
            self.messages: list[str] = []

        def log(self, severity: Any, msg: str) -> None:
            if severity <= trt.ILogger.Severity.WARNING:  # lower value = more severe
                self.messages.append(f"[{severity.name}] {msg}")

    return _Capture()


def _check_profile(network: Any, profile: Profile, path: Path) -> None:
    """Profiles must name exactly the network's inputs with matching ranks; say what differs (clearer than the
    builder's own message, which arrives only after the build started)."""
    inputs = {network.get_input(i).name: tuple(network.get_input(i).shape) for i in range(network.num_inputs)}
    names = [n for n, *_ in profile]
    if sorted(names) != sorted(inputs):
        raise EngineBuildError(f"{path.name}: the profile names {names}, the graph's inputs are {list(inputs)}")
    for name, lo, opt, hi in profile:
        dims = inputs[name]
        for shape in (lo, opt, hi):
            if len(shape) != len(dims) or any(d >= 0 and d != s for d, s in zip(dims, shape)):
                raise EngineBuildError(f"{path.name}: input {name!r} has dims {list(dims)} (-1 = dynamic); the "
                                       f"profile gives {list(shape)}")
        if not all(a <= b <= c for a, b, c in zip(lo, opt, hi)):
            raise EngineBuildError(f"{path.name}: input {name!r} needs min <= opt <= max; got {lo}, {opt}, {hi}")


def _parse(trt: Any, builder: Any, logger: Any, path: Path, strongly_typed: bool) -> tuple[Any, Any]:
    flags = 0
    if strongly_typed and hasattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED"):
        # Precision comes from the ONNX types (fp16 bundles build fp16); TensorRT 11 is strongly typed only.
        flags = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(path)):  # from the file, so .onnx.data sidecars next to it are found
        errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
        raise EngineBuildError(f"the ONNX parser rejected {path}: " + "; ".join(errors or logger.messages[-5:]))
    return network, parser  # the parser owns weights the network points to: keep it alive until the build


def plugin_layers(trt: Any, network: Any) -> list[str]:
    """Names of the network's plugin layers (``LayerType.PLUGIN_V3``/``PLUGIN_V2``): proof that the parser
    mapped an ``edgeprune`` node to a registered plugin instead of inlining its local-function body."""
    kinds = {getattr(trt.LayerType, k) for k in ("PLUGIN_V3", "PLUGIN_V2", "PLUGIN") if hasattr(trt.LayerType, k)}
    return [network.get_layer(i).name for i in range(network.num_layers) if network.get_layer(i).type in kinds]


def make_builder(flavour: TrtFlavour, logger: Any = None) -> Any:
    """A ``Builder`` of ``flavour``.

    Raises:
        EngineBuildError: it cannot be created; full TensorRT needs a usable CUDA device to build (the bindings
            raise ``TypeError: ... returned nullptr`` after logging a CUDA initialisation error).
    """
    logger = logger if logger is not None else _capture_logger(flavour.module)
    try:
        builder = flavour.module.Builder(logger)
    except TypeError as exc:  # pybind11 factory returned nullptr
        builder, why = None, str(exc)
    else:
        why = ""
    if builder is None:
        raise EngineBuildError(f"{flavour.name} {flavour.version} could not create a builder (full TensorRT builds "
                               f"on its target GPU): " + "; ".join([*logger.messages[-3:], why]))
    return builder


@dataclass(frozen=True)
class BuildSettings:
    """Builder-config settings beyond the profiles (``edgeprune build`` flags; None = TensorRT's default).

    Attributes:
        opt_level: ``builder_optimization_level`` (0 = fastest build).
        strongly_typed: precision from the ONNX types; False builds weakly typed with ``precision_flag``.
        precision_flag: ``fp16``/``bf16``: ``BuilderFlag.FP16``/``BF16`` of a weakly typed build.
        workspace_mb: the ``MemoryPoolType.WORKSPACE`` limit.
        timing_cache: a timing-cache file, read when it exists and written back after the build.
        compute_capability: TensorRT-RTX's single target (e.g. 86 for ``ComputeCapability.SM86``).
    """

    opt_level: int | None = None
    strongly_typed: bool = True
    precision_flag: str | None = None
    workspace_mb: int | None = None
    timing_cache: Path | None = None
    compute_capability: int | None = None


def _configure(trt: Any, builder: Any, s: BuildSettings) -> tuple[Any, Any]:
    """An ``IBuilderConfig`` with ``s`` applied; returns (config, timing cache or None)."""
    config = builder.create_builder_config()
    if s.opt_level is not None:
        config.builder_optimization_level = int(s.opt_level)
    if s.precision_flag:
        config.set_flag(getattr(trt.BuilderFlag, s.precision_flag.upper()))
    if s.workspace_mb is not None:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(s.workspace_mb) << 20)
    if s.compute_capability is not None:
        config.num_compute_capabilities = 1
        if not config.set_compute_capability(getattr(trt.ComputeCapability, f"SM{s.compute_capability}"), 0):
            raise EngineBuildError(f"the builder refused compute capability sm{s.compute_capability}")
    cache = None
    if s.timing_cache is not None:
        data = s.timing_cache.read_bytes() if s.timing_cache.is_file() else b""
        cache = config.create_timing_cache(data)
        config.set_timing_cache(cache, False)
    return config, cache


def build_engine(onnx_path: str | os.PathLike[str], profiles: Sequence[Any], out_path: str | os.PathLike[str], *,
                 flavour: TrtFlavour | str | None = None, opt_level: int | None = None, strongly_typed: bool = True,
                 settings: BuildSettings | None = None, log: Callable[[str], None] | None = None) -> EngineBuild:
    """Parse ``onnx_path``, build a serialized engine with the given optimisation profiles, write ``out_path``.

    Plugins the parser should map ``edgeprune`` nodes to must be registered (``register_creator``) before.

    Args:
        onnx_path: the ONNX graph (its ``.onnx.data`` sidecar beside it).
        profiles: one profile ``[(input name, min, opt, max), ...]`` or a list of such profiles.
        out_path: where to write the plan (written to a temporary file and renamed).
        flavour: a :class:`TrtFlavour`, a flavour name, or None (full TensorRT if importable, else RTX).
        opt_level, strongly_typed: shorthands for the same fields of ``settings`` (used when it is None).
        settings: every builder setting (:class:`BuildSettings`).
        log: progress sink (one line per engine).
    Returns:
        The :class:`EngineBuild` (``plugin_layers`` lists the plan's plugin layers).
    Raises:
        EngineBuildError: missing file, parser error, bad profile, a TopK above the native limit, builder failure.
        MissingDependencyError: no TensorRT importable.
    """
    s = settings or BuildSettings(opt_level=opt_level, strongly_typed=strongly_typed)
    fl = flavour if isinstance(flavour, TrtFlavour) else detect(flavour)
    trt, src, out = fl.module, Path(onnx_path), Path(out_path)
    if not src.is_file():
        raise EngineBuildError(f"ONNX graph {src} does not exist")
    profs = _normalise(profiles)
    logger = _capture_logger(trt)
    builder = make_builder(fl, logger)
    start = time.perf_counter()
    network, _parser = _parse(trt, builder, logger, src, s.strongly_typed)
    parse_s = time.perf_counter() - start
    plugins = plugin_layers(trt, network)
    # Checked here, not left to the builder: its message for an oversized TopK does not say what to do. A TopK
    # inside a plugin's local function is not built (the plugin replaces it).
    too_big = [(n, k) for n, k in onnx_topk_ks(str(src)) if k is not None and k > NATIVE_TOPK_MAX_K]
    if too_big and not plugins:
        raise EngineBuildError(f"{src.name}: TopK nodes {too_big} exceed the native TopK limit K <= "
                               f"{NATIVE_TOPK_MAX_K} ({fl.name} {fl.version}); export with a smaller K")
    config, cache = _configure(trt, builder, s)
    for prof in profs:
        _check_profile(network, prof, src)
        p = builder.create_optimization_profile()
        for name, lo, opt, hi in prof:
            p.set_shape(name, lo, opt, hi)
        if config.add_optimization_profile(p) < 0:
            raise EngineBuildError(f"{src.name}: {fl.name} refused the profile {prof}: "
                                   + "; ".join(logger.messages[-3:]))
    start = time.perf_counter()
    plan = builder.build_serialized_network(network, config)
    build_s = time.perf_counter() - start
    if plan is None or plan.nbytes == 0:
        errors = [m for m in logger.messages if m.startswith(("[ERROR", "[INTERNAL_ERROR"))]
        raise EngineBuildError(f"{fl.name} {fl.version} failed to build {src.name}: "
                               + ("; ".join(errors) or "no error was logged"))
    _write_atomic(out, memoryview(plan))
    if cache is not None and s.timing_cache is not None:
        _write_atomic(s.timing_cache, memoryview(cache.serialize()))
    result = EngineBuild(graph=src.name.removesuffix(".onnx"), path=out, nbytes=int(plan.nbytes), parse_s=parse_s,
                         build_s=build_s, flavour=f"{fl.name} {fl.version}", profiles=profs,
                         warnings=list(logger.messages), plugin_layers=plugins)
    if log:
        log(f"{result.graph}: {result.nbytes / 2**20:.1f} MiB engine in {parse_s:.2f} s parse + {build_s:.2f} s build"
            + (f" ({len(plugins)} plugin layers)" if plugins else ""))
    return result


def _write_atomic(out: Path, data: Any) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def build_bundle_engines(bundle: str | os.PathLike[str], out_dir: str | os.PathLike[str], *,
                         flavour: TrtFlavour | str | None = None, opt_level: int | None = None, max_batch: int = 1,
                         graphs: Sequence[str] | None = None, cache: dict[str, Path] | None = None,
                         log: Callable[[str], None] | None = None) -> dict[str, EngineBuild]:
    """Build ``out_dir/<graph>.plan`` for every graph of a bundle, with :func:`bundle_profiles`.

    Args:
        bundle: the bundle directory (verified: hashes, format version).
        out_dir: where the plans go.
        flavour, opt_level: see :func:`build_engine`.
        max_batch: the largest batch of every engine.
        graphs: build only these graphs (default: all).
        cache: plans already built, keyed by graph content + profiles + flavour + level; an identical graph
            (e.g. the vision/embed/decoder graphs that ``export --reuse`` shares across budgets) is copied, not
            rebuilt. Updated in place.
        log: progress sink.
    Returns:
        graph name -> :class:`EngineBuild`.
    Raises:
        BundleError, EngineBuildError, MissingDependencyError.
    """
    from ..bundle import open_bundle

    opened = open_bundle(bundle)
    fl = flavour if isinstance(flavour, TrtFlavour) else detect(flavour)
    profiles = bundle_profiles(opened.manifest, max_batch)
    unknown = sorted(set(graphs or ()) - set(opened.graphs))
    if unknown:
        raise EngineBuildError(f"bundle {opened.root} has no graphs {unknown}; it has {sorted(opened.graphs)}")
    out: dict[str, EngineBuild] = {}
    for name in graphs or list(opened.graphs):
        entry, dest = opened.graphs[name], Path(out_dir) / f"{name}.plan"
        files = opened.manifest["graphs"][name].get("files", [entry.path.name])
        key = hashlib.sha256(json.dumps([[opened.manifest["files"].get(f) for f in files], profiles[name],
                                         fl.name, fl.version, opt_level]).encode()).hexdigest()
        hit = cache.get(key) if cache is not None else None
        if hit is not None and hit.is_file():
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(hit, dest)
            out[name] = EngineBuild(name, dest, dest.stat().st_size, 0.0, 0.0, f"{fl.name} {fl.version}",
                                    profiles[name], reused=True)
            continue
        out[name] = build_engine(entry.path, profiles[name], dest, flavour=fl, opt_level=opt_level, log=log)
        if cache is not None:
            cache[key] = dest
    return out


def deserialize(plan: bytes, flavour: TrtFlavour | str | None = None) -> tuple[Any, list[str]]:
    """Deserialize a plan with ``Runtime.deserialize_cuda_engine``.

    Returns:
        (the ``ICudaEngine`` or None, the runtime's warnings and errors). None without a usable CUDA driver
        (TensorRT-RTX on a CPU-only machine: "CUDA driver version is insufficient") or for a corrupt plan.
    """
    fl = flavour if isinstance(flavour, TrtFlavour) else detect(flavour)
    logger = _capture_logger(fl.module)
    try:
        runtime = fl.module.Runtime(logger)
    except TypeError as exc:  # full TensorRT without a CUDA device: the factory returns nullptr
        return None, [*logger.messages, str(exc)]
    engine = None if runtime is None else runtime.deserialize_cuda_engine(plan)
    return engine, list(logger.messages)


def engine_io(engine: Any, flavour: TrtFlavour | str | None = None) -> dict[str, Any]:
    """Input/output tensor names and the number of optimisation profiles of a deserialized engine."""
    trt = (flavour if isinstance(flavour, TrtFlavour) else detect(flavour)).module
    names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
    inputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
    return {"inputs": inputs, "outputs": [n for n in names if n not in inputs],
            "profiles": int(engine.num_optimization_profiles)}
