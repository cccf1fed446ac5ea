"""``edgeprune build``: every graph of a bundle built into a TensorRT engine set, recorded in the manifest.

An engine set is one directory ``DIR/engines/<flavour>-<version>-sm<cc>/`` with one ``<graph>.plan`` per graph
(profiles from :func:`~edgeprune.engines.rtx.bundle_profiles`: the pre-LLM decoder gets prefill and decode
profiles) and one entry of the manifest's optional ``engines`` section (format: ``docs/tensorrt.md``)::

    "engines": {"tensorrt-rtx-1.7.1.116-sm86": {
        "dir": "engines/tensorrt-rtx-1.7.1.116-sm86", "flavour": "tensorrt-rtx", "version": "1.7.1.116",
        "compute_capability": 86, "precision": "fp32", "strongly_typed": true, "workspace_mb": null,
        "opt_level": 0, "timing_cache": null, "build_seconds": 3.2, "built_at": "2026-12-02T01:00:00+00:00",
        "plugins": {"requested": "auto", "ops": {"ZonalTopK": {"mode": "ipluginv3", "reason": "..."}}},
        "graphs": {"prune": {"file": "engines/.../prune.plan", "sha256": "...", "bytes": 123, "parse_s": 0.1,
                             "build_s": 0.4, "profiles": [[["features", [1,576,64], ...]]],
                             "plugin_layers": ["/prune/ZonalTopK"], "warnings": 0}, ...}}}

Precision: a strongly typed network takes its precision from the ONNX types, so by default an fp16 bundle builds
an fp16 engine and an fp32 bundle an fp32 one; ``--precision`` equal to the bundle's dtype changes nothing, and
another precision is honoured only where TensorRT still has weak typing (full TensorRT 10.x: ``BuilderFlag.FP16``
/ ``BF16`` on an fp32 network); TensorRT-RTX and TensorRT 11 are strongly typed only, so there it is refused.

Compute capability: full TensorRT builds for the GPU it runs on (``--sm`` must match it). TensorRT-RTX builds
ahead of time for one target: ``--sm``, else the visible GPU's, else :data:`DEFAULT_RTX_SM` (sm_86, the
Ampere RTX/A-series parts; the builder's own default is a multi-target plan, which one directory name cannot
describe).

The plans are also listed with their sha256 in the manifest's ``files`` (so ``open_bundle`` verifies them like
every other file). Atomicity: plans are written into ``engines/.tmp-<key>-<pid>/`` and renamed into place; the manifest is rewritten
through a temporary file and ``os.replace``. An existing set of the same key is kept aside until the new manifest
is in place, so an interrupted build leaves the previous state (old plans, old manifest).
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

from ..bundle.format import ENGINES_DIR, MANIFEST, sha256_file
from ..bundle.manifest import write_json_atomic
from ..errors import EdgepruneError
from ..progress import progress
from .capability import FLAVOURS, TrtFlavour, detect
from .rtx import BuildSettings, build_engine, bundle_profiles

log = logging.getLogger(__name__)

PRECISIONS = ("fp32", "fp16", "bf16")
PLUGIN_MODES = ("auto", "ipluginv3", "aot", "none")
RTX_SMS = (75, 80, 86, 89, 120, 121)  # TensorRT-RTX 1.7's ComputeCapability enum
DEFAULT_RTX_SM = 86
REBUILD = "rebuild with `edgeprune build --bundle {root} --force`"


class BuildError(EdgepruneError):
    """``edgeprune build`` cannot run as asked (bad flag, existing engine set, unsupported precision)."""


@dataclass(frozen=True)
class BuildRequest:
    """What ``edgeprune build`` was asked (None = the documented default)."""

    bundle: Path
    precision: str | None = None
    plugins: str = "auto"
    timing_cache: Path | None = None
    workspace_mb: int | None = None
    opt_level: int | None = None
    flavour: str | None = None
    sm: int | None = None
    force: bool = False


@dataclass
class BuildPlan:
    """Everything decided before the first engine is built (so every refusal comes first)."""

    request: BuildRequest
    bundle: Any  # edgeprune.bundle.Bundle
    flavour: TrtFlavour
    cc: int
    settings: BuildSettings
    precision: str
    plugin_modes: dict[str, tuple[str, str]]
    profiles: dict[str, list[Any]]
    graphs: list[str] = field(default_factory=list)

    @property
    def key(self) -> str:
        return engine_key(self.flavour.name, self.flavour.version, self.cc)

    @property
    def rel_dir(self) -> str:
        return f"{ENGINES_DIR}/{self.key}"


def engine_key(flavour: str, version: str, cc: int) -> str:
    """The engine set's directory name and manifest key: ``<flavour>-<version>-sm<cc>``."""
    return f"{flavour}-{version}-sm{int(cc)}"


def check_request(r: BuildRequest) -> None:
    """Refuse bad flags before anything is imported or opened.

    Raises:
        BuildError: says which flag, what it accepts and what was given.
    """
    if r.precision is not None and r.precision not in PRECISIONS:
        raise BuildError(f"--precision must be one of {', '.join(PRECISIONS)}; got {r.precision!r}")
    if r.plugins not in PLUGIN_MODES:
        raise BuildError(f"--plugins must be one of {', '.join(PLUGIN_MODES)}; got {r.plugins!r}")
    if r.workspace_mb is not None and r.workspace_mb <= 0:
        raise BuildError(f"--workspace-mb must be a positive integer; got {r.workspace_mb}")
    if r.opt_level is not None and not 0 <= r.opt_level <= 5:
        raise BuildError(f"--opt-level must be between 0 and 5; got {r.opt_level}")
    if r.flavour is not None and r.flavour not in FLAVOURS:
        raise BuildError(f"--flavour must be one of {', '.join(FLAVOURS)}; got {r.flavour!r}")
    if r.sm is not None and r.sm <= 0:
        raise BuildError(f"--sm takes a compute capability such as 86 (sm_86); got {r.sm}")
    if r.timing_cache is not None:
        parent = r.timing_cache.parent if str(r.timing_cache.parent) else Path(".")
        if r.timing_cache.is_dir() or not parent.is_dir():
            raise BuildError(f"--timing-cache {str(r.timing_cache)!r} must be a file in an existing directory")
    if not (Path(r.bundle) / MANIFEST).is_file():
        raise BuildError(f"--bundle {str(r.bundle)!r} is not an edgeprune bundle (no manifest.json); create one "
                         "with `edgeprune export --model M --method X --out DIR`")


def resolve_cc(flavour: TrtFlavour, sm: int | None, device_cc: int | None) -> tuple[int, str]:
    """The compute capability to build for and why (see the module docstring).

    Raises:
        BuildError: an ``--sm`` the flavour cannot target.
    """
    if flavour.name == "tensorrt-rtx":
        if sm is not None:
            if sm not in RTX_SMS:
                raise BuildError(f"--sm {sm}: TensorRT-RTX {flavour.version} targets sm "
                                 f"{', '.join(map(str, RTX_SMS))}")
            return sm, f"--sm {sm}"
        if device_cc in RTX_SMS:
            return int(device_cc), f"the visible GPU (sm_{device_cc})"
        return DEFAULT_RTX_SM, f"no supported GPU visible: TensorRT-RTX's ahead-of-time default sm_{DEFAULT_RTX_SM}"
    if device_cc is None:
        raise BuildError(f"full TensorRT {flavour.version} builds on its target GPU and no CUDA device is visible "
                         "here; build on the target, or use --flavour tensorrt-rtx")
    if sm is not None and sm != device_cc:
        raise BuildError(f"--sm {sm}: full TensorRT builds for the GPU it runs on (sm_{device_cc}); drop --sm or "
                         "build on the target GPU")
    return int(device_cc), f"the GPU TensorRT builds on (sm_{device_cc})"


def resolve_precision(flavour: TrtFlavour, bundle_dtype: str, precision: str | None) -> tuple[str, BuildSettings]:
    """(precision, settings with typing and flags) for the bundle's dtype (see the module docstring).

    Raises:
        BuildError: a precision the bundle's types cannot give with this TensorRT.
    """
    want = precision or bundle_dtype
    if want == bundle_dtype:
        return want, BuildSettings(strongly_typed=True)
    weak = (flavour.name == "tensorrt" and flavour.version_tuple < (11,)
            and hasattr(flavour.module.BuilderFlag, want.upper()))
    if weak and bundle_dtype == "fp32":
        return want, BuildSettings(strongly_typed=False, precision_flag=want)
    raise BuildError(f"--precision {want}: {flavour.name} {flavour.version} builds strongly typed networks, whose "
                     f"precision comes from the ONNX types, and this bundle is {bundle_dtype}; drop --precision, or "
                     f"export a {want} bundle (`edgeprune export ... --dtype {want}`)")


def _device_cc() -> int | None:
    from ..runtime.cuda_mem import device_compute_capability

    return device_compute_capability()


def _fused_ops(bundle: Any) -> dict[str, Any]:
    """{fused op: parsed node attributes} over the bundle's graphs (the chooser refuses a node the plugin cannot
    take, e.g. GraphRank over two groups)."""
    from .plugins.onnx_modes import fused_ops

    ops: dict[str, Any] = {}
    for name, entry in bundle.manifest["graphs"].items():
        if entry.get("fused_op"):
            ops.update(fused_ops(bundle.graphs[name].path))
    return ops


def _plugin_modes(flavour: TrtFlavour, requested: str, ops: Mapping[str, Any]) -> dict[str, tuple[str, str]]:
    """{fused op: (mode, reason)} (:func:`~edgeprune.engines.capability.choose_plugin_modes`; house rule 7: the
    reason is logged and recorded)."""
    from .capability import PluginModeError, choose_plugin_modes

    if not ops:
        return {}
    try:
        return dict(choose_plugin_modes(flavour, requested, ops))
    except PluginModeError as exc:
        raise BuildError(f"--plugins {requested}: {exc}") from None


def plan_build(r: BuildRequest, device_cc: Callable[[], int | None] = _device_cc) -> BuildPlan:
    """Open and verify the bundle, pick flavour, target, precision and plugin modes; refuse an existing set.

    Raises:
        BuildError, BundleError, MissingDependencyError, EngineBuildError (profiles).
    """
    from ..bundle import open_bundle

    check_request(r)
    opened = open_bundle(r.bundle)
    fl = detect(r.flavour)
    cc, cc_why = resolve_cc(fl, r.sm, device_cc())
    precision, typed = resolve_precision(fl, str(opened.manifest["model"].get("dtype", "fp32")), r.precision)
    settings = BuildSettings(opt_level=r.opt_level, strongly_typed=typed.strongly_typed,
                             precision_flag=typed.precision_flag, workspace_mb=r.workspace_mb,
                             timing_cache=r.timing_cache, compute_capability=cc if fl.name == "tensorrt-rtx" else None)
    modes = _plugin_modes(fl, r.plugins, _fused_ops(opened))
    plan = BuildPlan(request=r, bundle=opened, flavour=fl, cc=cc, settings=settings, precision=precision,
                     plugin_modes=modes, profiles=bundle_profiles(opened.manifest), graphs=list(opened.graphs))
    log.info("engine set %s: compute capability sm_%d (%s); precision %s (%s)", plan.key, cc, cc_why, precision,
             "strongly typed: from the ONNX types" if settings.strongly_typed else f"weakly typed, {precision} flag")
    for op, (mode, why) in modes.items():
        log.info("fused op %s: plugin mode %s (%s)", op, mode, why)
    existing = (opened.manifest.get("engines") or {}).get(plan.key)
    if (existing or (opened.root / plan.rel_dir).exists()) and not r.force:
        raise BuildError(f"bundle {opened.root} already has the engine set {plan.key}; pass --force to replace it")
    return plan


def build_bundle(r: BuildRequest, *, log_line: Callable[[str], None] | None = None,
                 device_cc: Callable[[], int | None] = _device_cc) -> dict[str, Any]:
    """``edgeprune build``: plan, build every graph, install the set and its manifest record atomically.

    Args:
        r: the request.
        log_line: progress sink (default: a tqdm bar on stderr when installed, else lines on stderr).
        device_cc: the visible GPU's compute capability or None (a seam for tests).
    Returns:
        The manifest record of the new engine set (module docstring).
    Raises:
        BuildError, BundleError, EngineBuildError, MissingDependencyError.
    """
    plan = plan_build(r, device_cc)
    root = plan.bundle.root
    tmp = root / ENGINES_DIR / f".tmp-{plan.key}-{os.getpid()}"
    parse_dir = root / ENGINES_DIR / f".parse-{plan.key}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    start = time.perf_counter()
    try:
        builds = {}
        with progress(len(plan.graphs), "build", "engine", log_line) as report:
            for name in plan.graphs:
                b = build_engine(_graph_to_parse(plan, name, parse_dir), plan.profiles[name], tmp / f"{name}.plan",
                                 flavour=plan.flavour, settings=plan.settings)
                for msg in b.warnings:
                    log.warning("%s: %s", name, msg)
                _check_plugin_layers(plan, name, b.plugin_layers)
                builds[name] = b
                report(f"{name}: {b.nbytes / 2**20:.1f} MiB in {b.parse_s + b.build_s:.2f} s"
                       + (f", plugin layers {b.plugin_layers}" if b.plugin_layers else ""))
        record = _record(plan, builds, time.perf_counter() - start)
        _install(root, tmp, plan.rel_dir, plan.key, record)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(parse_dir, ignore_errors=True)
    return record


def _graph_to_parse(plan: BuildPlan, name: str, parse_dir: Path) -> Path:
    """The ONNX file the parser reads, from :func:`~edgeprune.engines.plugins.prepare.prepare_graph`: it
    registers the creators the graph's modes need (IPluginV3; AOT; the RTX parser symlink) and, where a mode
    needs it, writes a rewritten copy (``none`` inlines the local function so a registered creator cannot take
    the node; ``aot`` swaps in the AOT node). The bundle's graph is never modified."""
    entry = plan.bundle.graphs[name]
    if not plan.bundle.manifest["graphs"][name].get("fused_op"):
        return entry.path
    from .plugins.prepare import prepare_graph

    parse_dir.mkdir(parents=True, exist_ok=True)
    prepared = prepare_graph(plan.flavour, plan.request.plugins, entry.path, parse_dir)
    if prepared.modes and prepared.modes != {op: plan.plugin_modes[op] for op in prepared.modes}:
        raise BuildError(f"internal error: {name}: plugin modes {prepared.modes} differ from the plan's "
                         f"{plan.plugin_modes}")
    return Path(prepared.path)


def _check_plugin_layers(plan: BuildPlan, name: str, layers: list[str]) -> None:
    """The plan must be what the record will say: plugin layers exactly where a plugin mode was chosen.

    Raises:
        BuildError: the parser inlined a node that should be a plugin, or the reverse.
    """
    op = plan.bundle.manifest["graphs"][name].get("fused_op")
    mode = plan.plugin_modes.get(op, ("none", ""))[0] if op else "none"
    if mode != "none" and not layers:
        raise BuildError(f"{name}: {op} was to build as a {mode} plugin, but the parser built its ONNX body "
                         f"(is the creator registered?); rerun with --plugins none to build the body on purpose")
    if mode == "none" and layers:
        raise BuildError(f"{name}: plugin layers {layers} in a graph whose fused ops build as standard ops "
                         "(a creator registered in this process took the node)")


def _record(plan: BuildPlan, builds: Mapping[str, Any], seconds: float) -> dict[str, Any]:
    s = plan.settings
    graphs = {name: {"file": f"{plan.rel_dir}/{name}.plan", "sha256": sha256_file(b.path), "bytes": b.nbytes,
                     "parse_s": round(b.parse_s, 3), "build_s": round(b.build_s, 3),
                     "profiles": [[[n, list(a), list(o), list(c)] for n, a, o, c in p] for p in b.profiles],
                     "plugin_layers": list(b.plugin_layers), "warnings": len(b.warnings)}
              for name, b in builds.items()}
    return {"dir": plan.rel_dir, "flavour": plan.flavour.name, "version": plan.flavour.version,
            "compute_capability": plan.cc, "precision": plan.precision, "strongly_typed": s.strongly_typed,
            "workspace_mb": s.workspace_mb, "opt_level": s.opt_level,
            "timing_cache": None if s.timing_cache is None else str(s.timing_cache),
            "build_seconds": round(seconds, 3),
            "built_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "plugins": {"requested": plan.request.plugins,
                        "ops": {op: {"mode": m, "reason": why} for op, (m, why) in plan.plugin_modes.items()}},
            "graphs": graphs}


def _install(root: Path, tmp: Path, rel_dir: str, key: str, record: Mapping[str, Any]) -> None:
    """Move the new plans into place and rewrite the manifest; on any failure restore the previous set."""
    final, old = root / rel_dir, root / ENGINES_DIR / f".old-{key}-{os.getpid()}"
    if final.exists():
        os.replace(final, old)
    try:
        os.replace(tmp, final)
        manifest = json.loads((root / MANIFEST).read_text())
        manifest.setdefault("engines", {})[key] = dict(record)
        # Plans are bundle files: hashed in ``files`` like every other (the reader opens only hashed files).
        files = {rel: h for rel, h in manifest["files"].items() if not rel.startswith(f"{rel_dir}/")}
        manifest["files"] = files | {g["file"]: g["sha256"] for g in record["graphs"].values()}
        write_json_atomic(root / MANIFEST, manifest)
    except BaseException:
        shutil.rmtree(final, ignore_errors=True)
        if old.exists():
            os.replace(old, final)
        raise
    shutil.rmtree(old, ignore_errors=True)
