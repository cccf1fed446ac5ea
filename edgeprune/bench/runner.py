"""``run_bench``: latency of every (backend, method, budget) combination on one model, in one process.

The model is loaded once; the torch backend reuses it for every combination, the ORT backend runs one bundle
per (method, K), exported into a temporary directory with the vision/embed/decoder graphs of the first bundle
reused (``export_bundle(reuse_from=...)``). Combinations the exporter cannot lower yet (it raises a typed
:class:`~edgeprune.errors.EdgepruneError`) are recorded as skipped with its message. Every combination runs
``warmup`` unmeasured requests, then ``repeat`` measured ones; the statistics are p50/p90 over the repeats
(:mod:`edgeprune.bench.results`). ``schedule="interleaved"`` runs the repeats round-robin over all combinations,
so a load spike from another process hits every combination alike (better ratios on a shared machine, at the
cost of keeping every pipeline alive at once).
"""

from __future__ import annotations

import dataclasses
import datetime
import sys
import tempfile
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

from .._deps import available, require
from ..errors import BackendError, BudgetError, EdgepruneError
from ..methods.base import Budget
from . import results as R
from . import roofline as RF
from .system import PeakRss, machine_info, max_rss_bytes, synth_question, versions

BACKENDS = ("torch", "ort", "trt")  # trt: each bundle built with `edgeprune build` defaults
SCHEDULES = ("sequential", "interleaved")


@dataclass(frozen=True)
class BenchOptions:
    """One ``edgeprune bench`` invocation (see ``edgeprune bench --help`` for each field).

    Attributes:
        methods: method names; method_args: method -> ``--method-arg`` strings.
        tokens / ratios: budgets (each method with a budget runs every one; ``none`` and FitPrune run once).
        backends: ``torch`` and/or ``ort``; providers: ONNX Runtime providers (short names).
        ort_decoder: which decoder file the ORT bundles run (``auto``, ``fused``, ``portable``).
        env: environment variables recorded in the JSON (read by the CLI, house rule 12).
    """

    model: str = "tiny-llava"
    methods: tuple[str, ...] = ("none", "cls-topk")
    tokens: tuple[int, ...] = (576, 192, 128, 64)
    ratios: tuple[float, ...] = ()
    method_args: Mapping[str, Mapping[str, str]] = field(default_factory=dict)
    backends: tuple[str, ...] = ("torch",)
    providers: tuple[str, ...] = ("cpu",)
    random_weights: bool = False
    dtype: str = "fp32"
    device: str = "cpu"
    clip: str | None = None
    kernels: str = "torch"
    warmup: int = 3
    repeat: int = 10
    prompt_tokens: int = 32
    new_tokens: int = 32
    image: str | None = None
    threads: int | None = None
    schedule: str = "sequential"
    opset: int = 18
    ort_decoder: str = "auto"
    statistic: str = "p50"
    ceilings: str = "measure"
    env: Mapping[str, str] = field(default_factory=dict)
    command: str = ""


@dataclass
class Combo:
    """One measured combination and what it produced."""

    backend: str
    method: str
    budget: Budget
    method_args: dict[str, str] = field(default_factory=dict)
    bundle: str | None = None
    skipped: str | None = None
    pipe: Any = None
    profiles: list[Any] = field(default_factory=list)
    peak_rss: list[int] = field(default_factory=list)
    device_peak: list[int] = field(default_factory=list)
    prompt_split: tuple[int, int] = (0, 0)
    total_visual: int = 0
    clip_config: Any = None
    guidance_source: str | None = None

    @property
    def label(self) -> str:
        return f"{self.backend} {self.method} {self.budget.describe() if self.budget.is_set else 'all tokens'}"


def check_options(o: BenchOptions) -> None:
    """Every check that needs no model (fail before loading anything).

    Raises:
        UnknownMethodError, MethodArgumentError: a method name or argument.
        BackendError: an unknown backend or schedule. BudgetError: a bad K or ratio.
        EdgepruneError: an empty list, or non-positive counts.
    """
    from ..methods.registry import build_method

    if not o.methods:
        raise EdgepruneError("--methods is empty; give a comma-separated list such as none,cls-topk")
    if not o.backends:
        raise EdgepruneError("--backends is empty; give torch, ort or torch,ort")
    for b in o.backends:
        if b not in BACKENDS:
            raise BackendError(f"unknown backend {b!r}; available: {', '.join(BACKENDS)}")
    if o.schedule not in SCHEDULES:
        raise BackendError(f"unknown schedule {o.schedule!r}; available: {', '.join(SCHEDULES)}")
    if o.statistic not in R.STATISTICS:
        raise EdgepruneError(f"--statistic must be one of {', '.join(R.STATISTICS)}; got {o.statistic!r}")
    for name, value, low in (("--warmup", o.warmup, 0), ("--repeat", o.repeat, 1), ("--prompt-tokens",
                             o.prompt_tokens, 1), ("--new-tokens", o.new_tokens, 1), ("--threads", o.threads or 1, 1)):
        if value < low:
            raise EdgepruneError(f"{name} must be >= {low}; got {value}")
    if o.ceilings not in RF.CEILING_MODES:
        raise EdgepruneError(f"--ceilings must be one of {', '.join(RF.CEILING_MODES)}; got {o.ceilings!r}")
    if "trt" in o.backends:  # no usable TensorRT or GPU: one clear error before any export
        from ..runtime.trt_backend import check_usable

        check_usable()
    if "ort" in o.backends or "trt" in o.backends:
        from ..export.exporter import MAX_OPSET, MIN_OPSET
        from ..bundle.format import ORT_DECODER_CHOICES

        if not MIN_OPSET <= o.opset <= MAX_OPSET:
            raise EdgepruneError(f"--opset must be between {MIN_OPSET} and {MAX_OPSET}; got {o.opset}")
        if o.ort_decoder not in ORT_DECODER_CHOICES:
            raise EdgepruneError(f"--ort-decoder must be one of {', '.join(ORT_DECODER_CHOICES)}; "
                                 f"got {o.ort_decoder!r}")
    for k in o.tokens:
        Budget(tokens=k)
    for r in o.ratios:
        Budget(ratio=r)
    methods = [build_method(m, o.method_args.get(m)) for m in o.methods]
    if any(m.uses_budget for m in methods) and not (o.tokens or o.ratios):
        raise BudgetError("--tokens and --ratios are both empty; give at least one budget, e.g. --tokens 64")
    from ..api import preflight  # --device, --kernels and each method's bounds against the model's config

    for m in methods:
        preflight(o.model, m, Budget(tokens=max(o.tokens)) if m.uses_budget and o.tokens else Budget(),
                  device=o.device, kernels=o.kernels, random_weights=o.random_weights)


def plan(o: BenchOptions, n: int) -> list[Combo]:
    """The combinations, backend-major, in the order given; ``none`` and FitPrune get a single budget.

    Raises:
        BudgetError: a K larger than the image's N.
    """
    from ..methods.registry import get_method_class

    budgets = [Budget(tokens=k) for k in o.tokens] + [Budget(ratio=r) for r in o.ratios]
    for b in budgets:
        b.resolve(n)  # K > N fails here, before any export or measurement
    combos, seen = [], set()
    for backend in o.backends:
        for name in o.methods:
            takes_budget = get_method_class(name).uses_budget
            for b in (budgets if takes_budget else [Budget()]):
                key = (backend, name, b.resolve(n) if takes_budget else None)
                if key not in seen:  # --tokens N and --ratios 1.0 are the same request
                    seen.add(key)
                    combos.append(Combo(backend, name, b, dict(o.method_args.get(name) or {})))
    return combos


@dataclass
class BenchRun:
    """What :func:`run_bench` returns: the results document and a Chrome trace of one run per combination."""

    doc: dict[str, Any]
    trace: dict[str, Any]


def run_bench(o: BenchOptions, log: Callable[[str], None] | None = None) -> BenchRun:
    """Run the sweep ``o``: the results document (schema: :mod:`edgeprune.bench.results`) and a trace.

    Raises:
        The errors of :func:`check_options` and :func:`plan`, model loading errors, ImageError.
    """
    log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    check_options(o)
    torch = require("torch")
    from ..models.loader import load_model
    from ..runtime.preprocess import default_image, load_image

    image = load_image(o.image) if o.image else default_image()
    before = torch.get_num_threads()
    started = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    try:
        if o.threads:
            torch.set_num_threads(o.threads)
        loaded = load_model(o.model, random_weights=o.random_weights, dtype=o.dtype, device=o.device)
        question, q_tokens = synth_question(lambda t: loaded.tokenizer(t, add_special_tokens=False).input_ids,
                                            o.prompt_tokens)
        views, n = _count_visual(loaded, image)
        combos = plan(o, n)
        n_export = sum(c.backend in ("ort", "trt") for c in combos)
        per_combo = 1 if o.schedule == "sequential" else 1 + o.repeat
        # One bar over the whole sweep: exports, the ceilings, then the runs (skipped combinations drop out).
        with tempfile.TemporaryDirectory(prefix="edgeprune-bench-") as tmp, \
                _progress(n_export + 1 + per_combo * len(combos), log) as bar:
            _export_bundles(combos, loaded, o, Path(tmp), log, bar)
            bar.drop(per_combo * sum(c.skipped is not None for c in combos))
            ceilings = _ceilings(o, log)
            bar.step("ceilings measured" if ceilings else "ceilings skipped")
            _measure(combos, loaded, o, image, question, bar)
            if ceilings:  # again after the runs: on a shared machine, keep the better of the two (the ceiling)
                ceilings = RF.merge_ceilings(ceilings, _ceilings(o, log))
            _fill_clip_configs(combos, loaded, o)
            threads = _thread_info(torch, combos, o)
            for c in combos:
                c.pipe = None  # close ORT sessions before their files go
        ctx = R.Context(loaded=loaded, views=views, question_tokens=q_tokens, dtype=o.dtype)
        rows = R.combo_results(combos, ctx, o.statistic, ceilings)
    finally:
        torch.set_num_threads(before)
    doc = {"format": R.FORMAT, "format_version": R.FORMAT_VERSION, "created": started, "command": o.command,
           "config": _config(o), "machine": machine_info(o.device), "versions": versions(), "threads": threads,
           "model": R.model_info(loaded, n, views, o), "prompt": {"question": question, "question_tokens": q_tokens,
                                                                 "requested_tokens": o.prompt_tokens},
           "results": rows, "statistic": o.statistic, "checks": R.evaluate_targets(rows, o.statistic),
           "ceilings": ceilings, "roofline_furthest": RF.furthest(rows)}
    return BenchRun(doc=doc, trace=chrome_trace(combos))


def chrome_trace(combos: list[Combo]) -> dict[str, Any]:
    """One Chrome trace with the median-TTFT run of every measured combination, one process row each.

    Built from :meth:`~edgeprune.runtime.profiler.Profile.chrome_trace`; each run starts at 0 on its own row.
    """
    events: list[dict[str, Any]] = []
    for pid, c in enumerate(c for c in combos if c.profiles):
        runs = sorted(c.profiles, key=lambda p: p.ttft)
        median = runs[(len(runs) - 1) // 2]
        events.append({"name": "process_name", "ph": "M", "pid": pid, "tid": 0, "args": {"name": c.label}})
        for ev in median.chrome_trace()["traceEvents"]:
            events.append({**ev, "pid": pid})
    return {"traceEvents": events, "displayTimeUnit": "ms"}


def _config(o: BenchOptions) -> dict[str, Any]:
    out = dataclasses.asdict(o)
    out.pop("command")
    out["method_args"] = {k: dict(v) for k, v in o.method_args.items()}
    return out


def _count_visual(loaded: Any, image: Any) -> tuple[int, int]:
    """(vision views, N prunable tokens) of ``image`` on this model: one vision pass, before the sweep."""
    from ..methods.registry import build_method
    from ..runtime.preprocess import preprocess
    from ..runtime.torch_backend import TorchBackend

    backend = TorchBackend(loaded, build_method("none"))
    pixels, size = preprocess(image, loaded.image_config)
    return int(pixels.shape[0]) if pixels.ndim == 4 else 1, int(backend.encode_image(pixels, size).n)


def _ceilings(o: BenchOptions, log: Callable[[str], None]) -> dict[str, Any] | None:
    """The machine's ceilings per backend (``--ceilings measure|quick|skip``), measured with the run's threads."""
    if o.ceilings == "skip":
        log("roofline: ceilings not measured (--ceilings skip)")
        return None
    providers = ["CPUExecutionProvider"]
    if "ort" in o.backends:
        from ..runtime.ort_backend import resolve_providers

        providers = resolve_providers(o.providers)
    return RF.measure_ceilings(o.backends, o.dtype, o.device, providers, o.threads, quick=o.ceilings == "quick",
                               log=log)


def _export_bundles(combos: list[Combo], loaded: Any, o: BenchOptions, tmp: Path, log: Callable[[str], None],
                    bar: Any = None) -> None:
    """One bundle per ORT (method, K); a method the exporter refuses is recorded as skipped, not fatal."""
    bar = bar or _Bar(0, lambda msg: None)
    from ..export.exporter import export_bundle

    first: str | None = None
    for i, c in enumerate(combos):
        if c.backend not in ("ort", "trt"):
            continue
        out = tmp / f"{i:02d}-{c.method}"
        args = c.method_args or None
        try:
            export_bundle(loaded, c.method, out_dir=out, tokens=c.budget.tokens, ratio=c.budget.ratio,
                          method_args=args, dtype=o.dtype, opset=o.opset, reuse_from=first,
                          log=lambda m: log(f"  export: {m}"))
        except EdgepruneError as exc:  # typed refusals (no lowering yet, dtype): record, keep going
            c.skipped = f"{type(exc).__name__}: {str(exc).splitlines()[0]}"
            log(f"skip {c.label}: {c.skipped}")
            bar.step(f"export {c.label}: skipped")
            continue
        c.bundle, first = str(out), first or str(out)
        if c.backend == "trt":
            from ..engines.build import BuildRequest, build_bundle

            build_bundle(BuildRequest(bundle=out), log_line=lambda m: log(f"  build: {m}"))
        bar.step(f"exported {c.label}")


def _build(c: Combo, loaded: Any, o: BenchOptions) -> Any:
    from ..api import build_pipeline

    if c.backend == "trt":
        pipe = build_pipeline(None, None, backend="trt", bundle=c.bundle)
    elif c.backend == "ort":
        pipe = build_pipeline(None, None, backend="ort", bundle=c.bundle, providers=list(o.providers),
                              ort_decoder=o.ort_decoder)
        if o.threads:
            _set_ort_threads(pipe.backend, o.threads)
    else:
        pipe = build_pipeline(o.model, c.method, tokens=c.budget.tokens, ratio=c.budget.ratio,
                              method_args=c.method_args or None, loaded=loaded, device=o.device,
                              dtype=o.dtype, clip=o.clip, kernels=o.kernels)
    clip = getattr(pipe.backend, "clip", None)
    if c.backend in ("ort", "trt"):
        c.guidance_source = pipe.backend.bundle.method.get("guidance")
    elif pipe.backend.needs_guidance:
        c.guidance_source = "clip" if clip is not None else "llm"
    c.clip_config = clip.model.config if clip is not None else None
    pipe.backend.eos_token_id = None  # generate exactly --new-tokens: every combination decodes the same steps
    if available("nvtx"):
        pipe.backend = _NvtxBackend(pipe.backend, c.label)
    return pipe


def _fill_clip_configs(combos: list[Combo], loaded: Any, o: BenchOptions) -> None:
    """Give every CLIP-guided combination the CLIP config its FLOPs need.

    ORT bundles carry the CLIP text tower as a graph, not its config; the exporter resolves the CLIP exactly as
    ``build_pipeline`` does, so the torch twin's config (or, without one, a pipeline built for it) is the same.
    """
    need = [c for c in combos if c.guidance_source == "clip" and c.clip_config is None and c.profiles]
    if not need:
        return
    config = next((c.clip_config for c in combos if c.clip_config is not None), None)
    if config is None:
        from ..api import build_pipeline

        pipe = build_pipeline(o.model, need[0].method, tokens=1, method_args=need[0].method_args or None,
                              loaded=loaded, device=o.device, dtype=o.dtype, clip=o.clip)
        config = pipe.backend.clip.model.config
    for c in need:
        c.clip_config = config


def _set_ort_threads(backend: Any, threads: int) -> None:
    """Recreate the backend's sessions with ``threads`` intra-op threads.

    Why: the ORT backend takes no session options yet, and a fair torch-vs-ORT comparison needs both on the same
    thread count; the sessions are rebuilt from the same verified files with the same providers.
    """
    ort = require("onnxruntime")
    for name, runner in backend.runners.items():
        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        opts.intra_op_num_threads = threads
        runner.session = ort.InferenceSession(str(runner.path), sess_options=opts,
                                              providers=runner.session.get_providers())


class _NvtxBackend:
    """Delegates to a backend, wrapping each stage call in an NVTX range (visible in Nsight Systems)."""

    _STAGES = {"encode_image": "vision", "guidance": "guidance", "select": "prune", "splice": "embed",
               "prefill": "prefill", "decode": "decode"}

    def __init__(self, inner: Any, label: str) -> None:
        self.__dict__["_inner"], self.__dict__["_label"] = inner, label

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._inner, name)
        if name not in self._STAGES or not callable(attr):
            return attr
        nvtx = require("nvtx")

        def ranged(*args: Any, **kwargs: Any) -> Any:
            with nvtx.annotate(f"{self._STAGES[name]} ({self._label})", domain="edgeprune"):
                return attr(*args, **kwargs)

        return ranged

    def __setattr__(self, name: str, value: Any) -> None:
        setattr(self._inner, name, value)


@contextmanager
def _device_peak(c: Combo, torch: Any, device: str) -> Iterator[None]:
    """Record ``torch.cuda.max_memory_allocated`` of one run on CUDA (nothing on the CPU)."""
    cuda = device.startswith("cuda") and torch.cuda.is_available()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    yield
    if cuda:
        torch.cuda.synchronize()
        c.device_peak.append(int(torch.cuda.max_memory_allocated()))


def _run_once(c: Combo, image: Any, question: str, o: BenchOptions, torch: Any, measured: bool) -> None:
    with ExitStack() as stack:
        rss = stack.enter_context(PeakRss()) if measured else None
        stack.enter_context(_device_peak(c, torch, o.device) if measured else _noop())
        result = c.pipe.run(image, question, max_new_tokens=o.new_tokens)
    c.prompt_split = (len(result.prompt_ids[0]), len(result.prompt_ids[1]))
    c.total_visual = int(result.total_visual)
    if measured:
        c.profiles.append(result.profile)
        c.peak_rss.append(rss.peak if rss is not None and rss.peak is not None else max_rss_bytes())


@contextmanager
def _noop() -> Iterator[None]:
    yield


def _measure(combos: list[Combo], loaded: Any, o: BenchOptions, image: Any, question: str, bar: Any) -> None:
    """Warm up and measure every runnable combination, sequentially or interleaved, stepping ``bar``."""
    torch = require("torch")
    todo = [c for c in combos if c.skipped is None]
    if o.schedule == "sequential":
        for c in todo:
            c.pipe = _build(c, loaded, o)
            for i in range(o.warmup + o.repeat):
                _run_once(c, image, question, o, torch, measured=i >= o.warmup)
            c.pipe = None  # release ORT sessions before the next combination
            bar.step(c.label)
        return
    for c in todo:
        c.pipe = _build(c, loaded, o)
        for _ in range(o.warmup):
            _run_once(c, image, question, o, torch, measured=False)
        bar.step(f"{c.label} (built, warmed up)")
    for r in range(o.repeat):
        for c in todo:
            _run_once(c, image, question, o, torch, measured=True)
            bar.step(f"{c.label} (repeat {r + 1})")


class _Bar:
    """A progress bar over the whole sweep: tqdm on stderr when installed, else one line per step via ``log``."""

    def __init__(self, total: int, log: Callable[[str], None], tqdm_bar: Any = None) -> None:
        self.total, self.done, self._log, self._tqdm = total, 0, log, tqdm_bar

    def step(self, msg: str) -> None:
        self.done += 1
        if self._tqdm is not None:
            self._tqdm.set_postfix_str(msg, refresh=False)
            self._tqdm.update(1)
        else:
            self._log(f"[{self.done}/{self.total}] {msg}")

    def drop(self, n: int) -> None:
        """Remove ``n`` steps that will not happen (skipped combinations)."""
        self.total -= n
        if self._tqdm is not None and n:
            self._tqdm.total = self.total
            self._tqdm.refresh()


@contextmanager
def _progress(total: int, log: Callable[[str], None]) -> Iterator[_Bar]:
    """A :class:`_Bar` of ``total`` steps (tqdm when installed)."""
    try:
        from tqdm import tqdm
    except ImportError:
        yield _Bar(total, log)
        return
    with tqdm(total=total, desc="bench", unit="step", file=sys.stderr, leave=False) as bar:
        yield _Bar(total, log, bar)


def _thread_info(torch: Any, combos: list[Combo], o: BenchOptions) -> dict[str, Any]:
    """Thread counts in effect: torch intra/inter-op, ONNX Runtime intra-op (0 = its default, one per core)."""
    return {"torch_intra_op": torch.get_num_threads(), "torch_inter_op": torch.get_num_interop_threads(),
            "ort_intra_op": o.threads or 0, "requested": o.threads,
            "env": dict(o.env)}
