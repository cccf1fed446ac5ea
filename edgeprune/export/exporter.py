"""``export_bundle``: cut a LLaVA model into ONNX graphs, validate each with ONNX Runtime, write a bundle.

Graphs (DESIGN.md §2): ``vision`` (CLIP + projector + [CLS] attention, + CLIP-space patch embeddings for
GridPrune with CLIP guidance), ``guidance`` (GridPrune with CLIP guidance: the CLIP text tower), ``prune`` (the
method with a static K; GridPrune / G-Prune as a fused ``edgeprune``-domain node defined by a local function,
written op by op in :mod:`~edgeprune.export.lower_gridprune` / :mod:`~edgeprune.export.lower_gprune`; none for
``none`` and the in-LLM methods), ``embed``, and ``decoder`` (one graph for prefill and decode, flat KV cache) or,
for FastV / FitPrune, ``prefill`` (drops between layers, ragged presents) + ``decoder`` (decode over the ragged
cache), see :mod:`~edgeprune.export.inllm_decoder`. Traced graphs are exported with
``torch.onnx.export(dynamo=True)`` from examples with batch 2, seq > 1 and past > 0 (sizes 0
and 1 would be specialised, DESIGN.md §6); every graph is then run with ONNX Runtime on *other* sizes (batch 1,
an empty past, a single-token decode, other LLaVA-NeXT layouts, exact ties) and compared with its PyTorch
wrapper or reference (integer outputs such as kept indices must be equal); the worst absolute error goes into
the manifest.

The bundle is written into a temporary sibling directory and renamed into place at the end, so an interrupted
or failed export leaves nothing behind. ``reuse_from`` copies the model graphs (vision, guidance, embed, decoder)
of an existing bundle of the same model (checked by a weights fingerprint; CLIP-dependent graphs also by the CLIP
fingerprint) whose specs match, so a sweep over budgets exports the LLM once; ``prune`` and ``prefill`` bake the
method in and are always exported.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import os
import re
import shutil
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

import numpy as np

from .._deps import require
from ..progress import progress
from ..methods.base import Budget
from ..methods.registry import build_method
from . import graphs as G
from . import quantize as Q
from ..bundle.format import (CLIP_TOKENIZER_DIR, MANIFEST, NEWLINE_FILE, TOKENIZER_FILE, VARIANT, VARIANT_OPSET,
                             variant_file)
from ..bundle.manifest import write_manifest
from ..errors import ExportError
from .ort_variant import llm_attention, share_external_data
from .atomic import make_temp_dir, move_into_place, recover
from .job import GraphJob
from .records import stamp_records
from .spec import dynamic_shapes

DTYPES = {"fp32": "float32", "fp16": "float16"}
MIN_OPSET, MAX_OPSET = 18, 23
# Validation tolerance on max |ORT - torch|, relative to max(1, max |torch|): fp32 graphs differ only by kernel
# summation order (~1e-6 relative here), so 1e-4 leaves margin yet catches any real lowering bug (a wrong mask
# or position shifts logits by O(0.1)). fp16 keeps ~3 decimal digits per op.
TOLERANCE = {"float32": 1e-4, "float16": 2e-2}
NEVER_REUSED = ("prune", "prefill")  # graphs that depend on the method and budget, not only on the model


def export_bundle(model: Any, method: str = "none", *, out_dir: str | os.PathLike[str], tokens: int | None = None,
                  ratio: float | None = None, method_args: Mapping[str, str] | None = None, opset: int = 18,
                  dtype: str = "fp32", force: bool = False, reuse_from: str | os.PathLike[str] | None = None,
                  random_weights: bool = False, clip: Any = None, ort_variant: bool = True,
                  weights: Q.WeightConfig | None = None, log: Callable[[str], None] | None = None,
                  on_step: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Export ``model`` with ``method`` into the bundle directory ``out_dir``.

    Args:
        model: a preset name, model directory or hub id, or a loaded :class:`~edgeprune.models.loader.LoadedModel`
            (its dtype must be ``dtype``).
        method: a method with an ONNX lowering (:data:`edgeprune.export.graphs.LOWERED`).
        out_dir: the bundle directory to create.
        tokens / ratio: the static budget K (``ratio`` only where N is fixed, i.e. LLaVA-1.5).
        method_args: ``--method-arg`` strings.
        opset: ONNX opset, 18 (TensorRT-portable) to 23.
        dtype: ``fp32`` or ``fp16`` (graph precision).
        force: replace an existing bundle at ``out_dir``.
        reuse_from: a bundle of the same model, dtype and opset whose vision/embed/decoder graphs are reused.
        random_weights: with a preset name, build its architecture with random weights.
        clip: GridPrune's CLIP checkpoint (``--clip``: directory, hub id, ``tiny-clip``, or a loaded
            :class:`~edgeprune.models.clip_guidance.ClipGuidance`); default as ``build_pipeline``: ``tiny-clip``
            for the offline presets, CLIP-L/336's towers with random weights for ``random_weights``, else
            ``guidance=llm``.
        ort_variant: below opset 23, also write ``decoder.ort.onnx`` (and ``prefill.ort.onnx`` for FastV /
            FitPrune): the LLM graphs at opset 23 with ONNX Runtime's fused Attention op, sharing the weights of
            the portable graphs; see :mod:`~edgeprune.export.ort_variant`.
        weights: weight-only INT4/INT8 for the LLM graphs (``--weights``, :func:`~edgeprune.export.quantize.
            weight_config`); None keeps them at ``dtype``. See :mod:`~edgeprune.export.quantize`.
        log: progress sink (default: stderr, through tqdm when installed); also receives what the recovery of
            killed exports did (:func:`~edgeprune.export.atomic.recover`).
        on_step: called at each step of the final rename (:data:`~edgeprune.export.atomic.STEPS`; tests).
    Returns:
        The manifest as written.
    Raises:
        ExportError: unsupported method/opset/dtype, an existing non-bundle or bundle without ``force``, or a
            graph that fails validation. BudgetError: no budget, or K > N. Model loading errors as
            :func:`~edgeprune.models.loader.load_model`. Nothing is written in any of these cases.
    """
    budget = Budget(tokens=tokens, ratio=ratio)  # cheap checks first, before loading anything
    prune = build_method(method, method_args)
    G.check_lowerable(prune)
    sdtype = _check_options(opset, dtype)
    weights = Q.checked(weights, dtype)
    out = Path(out_dir)
    recover(out, log or _stderr)  # leftovers of killed exports to the same target (restores an interrupted swap)
    _check_out_dir(out, force)
    from ..models.limits import limits_from_config, model_limits

    limits = model_limits(model, random_weights) if isinstance(model, str) else None
    if limits is not None:  # a preset's shipped config: refuse e.g. GridPrune zones above the grid before building
        prune.check_limits(limits)
    loaded = _load(model, dtype, random_weights)
    prune.check_limits(limits_from_config(loaded.config))  # every model, with the bound in the message
    plan = G.plan_prune(loaded, prune, budget, clip)
    out.absolute().parent.mkdir(parents=True, exist_ok=True)
    tmp = make_temp_dir(out.absolute())
    try:
        fingerprint = model_fingerprint(loaded.model)
        clip_fp = None if plan.clip is None else model_fingerprint(plan.clip.model)
        jobs = G.graph_jobs(loaded, plan, sdtype, prune, clip_fp)
        reused = _reuse(reuse_from, jobs, fingerprint, dtype, opset, tmp, weights) if reuse_from else {}
        with progress(len(jobs), "export", "graph", log) as report:
            entries = _export_all(jobs, reused, tmp, opset, sdtype, report, ort_variant, weights)
        host = _write_host_files(loaded, tmp, plan, clip_fp)
        sections = {**G.manifest_sections(loaded, prune, plan, entries, host, fingerprint, dtype, opset),
                    **Q.manifest_section(weights, entries)}
        stamp_records(tmp, sections)  # what each graph was exported for, inside the hashed graph files
        manifest = write_manifest(tmp, sections)
        move_into_place(tmp, out, on_step)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return manifest


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _check_options(opset: int, dtype: str) -> str:
    if dtype not in DTYPES:
        raise ExportError(f"--dtype must be one of {', '.join(DTYPES)} for export; got {dtype!r}")
    if not MIN_OPSET <= int(opset) <= MAX_OPSET:
        raise ExportError(f"--opset must be between {MIN_OPSET} and {MAX_OPSET}; got {opset} (the torch dynamo "
                          "exporter emits opset 18 for anything lower; 18 is the TensorRT-portable default)")
    return DTYPES[dtype]


def _check_out_dir(out: Path, force: bool) -> None:
    if not out.exists():
        return
    if not force:
        raise ExportError(f"{out} already exists; pass --force to replace it or choose another --out")
    if not out.is_dir() or (any(out.iterdir()) and not (out / MANIFEST).is_file()):
        raise ExportError(f"{out} exists and is not an edgeprune bundle; refusing to replace it even with --force")


def _load(model: Any, dtype: str, random_weights: bool) -> Any:
    from ..models.loader import load_model, torch_dtype

    if not isinstance(model, str):
        got = next(model.model.parameters()).dtype
        if got != torch_dtype(dtype):
            raise ExportError(f"the loaded model is {got}, but --dtype {dtype} was asked; load it in {dtype} "
                              "or pass the model name")
        return model
    return load_model(model, random_weights=random_weights, dtype=dtype)


# Config keys that record where and how a model was saved, not what it computes: save_pretrained rewrites them.
_BOOKKEEPING = frozenset({"architectures", "_name_or_path", "name_or_path", "transformers_version", "torch_dtype",
                          "dtype", "_attn_implementation_autoset", "_commit_hash", "output_attentions",
                          "output_hidden_states", "return_dict", "use_cache"})


def _architecture(cfg: Any) -> Any:
    """``cfg`` (nested dicts) without the :data:`_BOOKKEEPING` keys."""
    if isinstance(cfg, dict):
        return {k: _architecture(v) for k, v in cfg.items() if k not in _BOOKKEEPING}
    return cfg


def model_fingerprint(model: Any) -> str:
    """A cheap sha256 of a model: its config, every tensor's name/shape/dtype and a strided sample of values.

    Used to decide whether the graphs of another bundle were exported from the same weights (``reuse_from``);
    sampling keeps it fast for 7B models while any re-initialisation or fine-tune changes it.
    """
    torch = require("torch")
    h = hashlib.sha256(json.dumps(_architecture(model.config.to_dict()), sort_keys=True, default=str).encode())
    for name, tensor in model.state_dict().items():
        flat = tensor.detach().reshape(-1)
        sample = flat[:: max(1, flat.numel() // 4096)].to(torch.float32).cpu().numpy()
        h.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype}".encode())
        h.update(sample.tobytes())
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------- graph export
def export_graph(job: GraphJob, path: Path, opset: int) -> None:
    """Export one wrapper to ``path`` (+ ``path.data``) with the dynamo exporter.

    Raises:
        ExportError: the exporter failed (its log is attached), or the graph's inputs differ from the spec.
    """
    onnx = require("onnx")
    if job.build is not None:  # written op by op (fused-op prune graphs): small, one file, names set already
        proto = job.build(opset)
        onnx.save(proto, str(path))
        _check_exported(proto, job, opset)
        return
    torch = require("torch")
    args = tuple(torch.from_numpy(job.example[n]) for n in job.spec.input_names)
    captured = io.StringIO()
    try:
        # The dynamo exporter prints its own progress and warns about optional torchvision ops; keep the
        # user's terminal to one line per graph and show the capture only when something fails.
        with contextlib.redirect_stdout(captured), warnings.catch_warnings(), torch.no_grad(), \
                _quiet_exporter_logs(), llm_attention(job.llm, opset):
            warnings.simplefilter("ignore")
            program = torch.onnx.export(
                job.module.eval(), args, dynamo=True, opset_version=opset, input_names=job.spec.input_names,
                output_names=job.spec.output_names, verbose=False,
                dynamic_shapes=dynamic_shapes(job.spec, job.var_inputs, job.mins, job.maxs))
            program.save(str(path), external_data=True)
    except Exception as exc:  # noqa: BLE001 - torch.export raises many types; re-raised typed with the log
        first = (str(exc).strip().splitlines() or [""])[0]
        raise ExportError(f"exporting the {job.name} graph failed: {type(exc).__name__}: {first}\n"
                          f"{captured.getvalue()[-2000:]}") from exc
    proto = onnx.load(str(path), load_external_data=False)
    _hierarchical_names(proto, job.name)
    onnx.save(proto, str(path))  # initializers stay in the sidecar: they were not loaded
    _check_exported(proto, job, opset)


def _check_exported(proto: Any, job: GraphJob, opset: int) -> None:
    """The written graph has the spec's inputs and the asked opset (ExportError otherwise)."""
    names = [i.name for i in proto.graph.input]
    if names != job.spec.input_names:
        raise ExportError(f"internal error: the exported {job.name} graph has inputs {names}, its spec "
                          f"{job.spec.input_names}")
    got_opset = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), None)
    if got_opset != opset:
        raise ExportError(f"asked for opset {opset}, the exporter wrote {got_opset}; use --opset {got_opset}")


def _hierarchical_names(proto: Any, graph: str) -> None:
    """Name nodes after their module path (``/decoder/lm/layers.0/self_attn/q_proj/linear_3``, house rule 6)
    and drop the exporter's per-node stack traces (they hold local file paths and bloat the graph).

    The dynamo exporter names nodes flatly (``node_linear_3``) but records the module scopes of each node in
    its ``pkg.torch.onnx.name_scopes`` metadata, which is what profilers and TensorRT layer names need.
    """
    import ast

    seen: dict[str, int] = {}
    for node in proto.graph.node:
        meta = {p.key: p.value for p in node.metadata_props}
        scopes = meta.get("pkg.torch.onnx.name_scopes")
        try:
            parts = [s for s in ast.literal_eval(scopes) if s] if scopes else []
        except (ValueError, SyntaxError):
            parts = []
        if len(parts) >= 2:
            path = re.sub(r"\.(\d+)(?=\.|$)", r"#\1", parts[-2]).replace(".", "/").replace("#", ".")
            node.name = f"/{graph}/{path}/{parts[-1]}"
        elif parts:
            node.name = f"/{graph}/{parts[-1]}"
        else:
            node.name = f"/{graph}/{node.name}"
        # One torch op may lower to several ONNX nodes with the same scopes; ONNX needs unique names.
        count = seen[node.name] = seen.get(node.name, 0) + 1
        if count > 1:
            node.name = f"{node.name}:{count - 1}"  # ":" never occurs in an fx name
        keep = [p for p in node.metadata_props if p.key not in ("pkg.torch.onnx.stack_trace", "pkg.torch.onnx.fx_node")]
        del node.metadata_props[:]
        node.metadata_props.extend(keep)


def validate_graph(job: GraphJob, path: Path, tolerance: float) -> float:
    """Run the ONNX graph with ONNX Runtime (CPU) on ``job.checks`` and compare with the PyTorch wrapper.

    Returns:
        The largest absolute difference over every float output (integer outputs must be equal).
    Raises:
        ExportError: a shape or integer mismatch, or a float error above ``tolerance * max(1, max |ref|)``.
    """
    torch = require("torch")
    ort = require("onnxruntime")
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    worst = 0.0
    for feeds in job.checks:
        job.spec.check_feeds(feeds)
        got = sess.run(job.spec.output_names, feeds)
        with torch.no_grad():
            ref = job.module(*[torch.from_numpy(feeds[n]) for n in job.spec.input_names])
        ref = ref if isinstance(ref, (tuple, list)) else (ref,)
        sizes = {k: v.shape for k, v in feeds.items()}
        for t, g, r in zip(job.spec.outputs, got, ref):
            r = r.detach().cpu().numpy()
            if g.shape != r.shape:
                raise ExportError(f"{job.name}: output {t.name} has shape {g.shape} in ONNX Runtime, {r.shape} in "
                                  f"PyTorch (inputs {sizes})")
            if not np.issubdtype(r.dtype, np.floating):
                if not np.array_equal(g, r):
                    raise ExportError(f"{job.name}: integer output {t.name} differs between ONNX Runtime and "
                                      f"PyTorch (inputs {sizes})")
                continue
            err = float(np.abs(g.astype(np.float32) - r.astype(np.float32)).max()) if r.size else 0.0
            scale = max(1.0, float(np.abs(r.astype(np.float32)).max()) if r.size else 1.0)
            if not err <= tolerance * scale:  # also catches NaN
                raise ExportError(f"{job.name}: output {t.name} differs by {err:.3g} between ONNX Runtime and "
                                  f"PyTorch (tolerance {tolerance * scale:.3g}, inputs {sizes})")
            worst = max(worst, err)
    return worst


def _export_all(jobs: list[GraphJob], reused: dict[str, dict[str, Any]], tmp: Path, opset: int, sdtype: str,
                log: Callable[[str], None], ort_variant: bool = True,
                weights: Q.WeightConfig | None = None) -> dict[str, dict[str, Any]]:
    entries: dict[str, dict[str, Any]] = {}
    for i, job in enumerate(jobs, 1):
        if job.name in reused:
            entries[job.name] = reused[job.name]
            log(f"[{i}/{len(jobs)}] {job.name}: reused from {reused[job.name]['reused_from']}")
            continue
        start = time.perf_counter()
        path = tmp / f"{job.name}.onnx"
        export_graph(job, path, opset)
        err = validate_graph(job, path, TOLERANCE[sdtype])
        files = sorted(p.name for p in tmp.iterdir() if p.name.startswith(path.name))
        entry = {"file": path.name, "files": files, "spec": job.spec.to_dict(), "max_abs_err": err,
                 "validated_on": [job.spec.check_feeds(c) for c in job.checks], **job.meta}
        note = ""
        if ort_variant and job.llm is not None and opset < VARIANT_OPSET:
            try:
                variant = _export_variant(job, tmp, sdtype)
            except ExportError as exc:  # an optimisation, not a requirement: the bundle works without it
                for p in tmp.glob(f"{variant_file(job.name)}*"):
                    p.unlink()
                entry["variants_skipped"] = {VARIANT: str(exc).splitlines()[0]}
                note = f"; {variant_file(job.name)} skipped ({str(exc).splitlines()[0]})"
            else:
                entry["variants"] = {VARIANT: variant}
                entry["files"] = sorted({*files, variant["file"], *variant["data_files"]})
                note = f"; {variant['file']} (opset {VARIANT_OPSET}) {variant['max_abs_err']:.2e}"
        if weights is not None and job.llm is not None:  # --weights: int4/int8 LLM graphs, checked vs fp32
            note += Q.quantize_graph(job, tmp, entry, weights)
        entry["export_seconds"] = seconds = round(time.perf_counter() - start, 2)
        entries[job.name] = entry
        log(f"[{i}/{len(jobs)}] {job.name}: exported in {seconds:.1f} s, max |ORT - torch| = {err:.2e}{note}")
    return entries


def _export_variant(job: GraphJob, tmp: Path, sdtype: str) -> dict[str, Any]:
    """Export ``job`` again at opset 23 as ``<name>.ort.onnx``, validate it, point its weights at the portable
    graph's sidecar; returns its manifest entry (``file``, ``opset``, ``data_files``: the sidecars it reads,
    ``max_abs_err``).

    Raises:
        ExportError: the export or the validation failed; the caller then records the variant as skipped
            (``variants_skipped`` in the manifest entry, a note in the log) and keeps the portable graph.
    """
    path = tmp / variant_file(job.name)
    export_graph(job, path, VARIANT_OPSET)
    err = validate_graph(job, path, TOLERANCE[sdtype])
    data_files = share_external_data(path, tmp / f"{job.name}.onnx")
    return {"file": path.name, "opset": VARIANT_OPSET, "data_files": data_files, "max_abs_err": err,
            "purpose": "ONNX Runtime: fused Attention/RotaryEmbedding/RMSNormalization (opset 23)"}


def _reuse(source: str | os.PathLike[str], jobs: list[GraphJob], fingerprint: str, dtype: str, opset: int,
           tmp: Path, weights: Q.WeightConfig | None = None) -> dict[str, dict[str, Any]]:
    """Copy (hard-link when possible) the model graphs of ``source`` into ``tmp`` after checking they match."""
    from ..bundle import open_bundle

    bundle = open_bundle(source)
    m = bundle.manifest
    why = ("it was exported from other weights" if m["model"].get("fingerprint") != fingerprint else
           f"its dtype is {m['model'].get('dtype')}" if m["model"].get("dtype") != dtype else
           f"its opset is {m.get('opset')}" if m.get("opset") != opset else "")
    if why:
        raise ExportError(f"cannot reuse the graphs of {source}: {why}; drop --reuse or export from the same "
                          f"model with --dtype {dtype} --opset {opset}")
    out: dict[str, dict[str, Any]] = {}
    for job in jobs:
        entry = m["graphs"].get(job.name)
        # prune and prefill graphs bake the method in; CLIP-dependent graphs must come from the same CLIP
        if job.name in NEVER_REUSED or entry is None or entry.get("spec") != job.spec.to_dict() \
                or entry.get("clip_fingerprint") != job.meta.get("clip_fingerprint") \
                or not Q.same_weights(entry, weights, job.llm is not None):
            continue
        for name in entry["files"]:
            try:
                os.link(bundle.path(name), tmp / name)
            except OSError:  # another filesystem, or links not supported: copy
                shutil.copy2(bundle.path(name), tmp / name)
        out[job.name] = {**entry, "reused_from": str(Path(source).absolute())}
    return out


def _write_host_files(loaded: Any, tmp: Path, plan: Any, clip_fingerprint: str | None) -> dict[str, Any]:
    """The tokenizer (``save_pretrained``), for LLaVA-NeXT the newline embedding, and GridPrune's guidance data
    (the CLIP tokenizer in :data:`CLIP_TOKENIZER_DIR`); returns their names and the manifest's guidance section."""
    before = set(os.listdir(tmp))
    loaded.tokenizer.save_pretrained(str(tmp))
    tok_files = sorted(set(os.listdir(tmp)) - before)
    if TOKENIZER_FILE not in tok_files:
        raise ExportError(f"the tokenizer of {loaded.name} has no fast {TOKENIZER_FILE}; the torch-free runtime "
                          "needs one (convert it with transformers' PreTrainedTokenizerFast)")
    newline = None
    inner = loaded.family.inner(loaded.model)
    if getattr(inner, "image_newline", None) is not None:
        np.save(tmp / NEWLINE_FILE, inner.image_newline.detach().cpu().numpy())
        newline = NEWLINE_FILE
    return {"tokenizer_files": tok_files, "newline_file": newline,
            "guidance": _guidance_section(loaded, tmp, plan, clip_fingerprint)}


def _guidance_section(loaded: Any, tmp: Path, plan: Any, clip_fingerprint: str | None) -> dict[str, Any] | None:
    """What the runtime needs to compute GridPrune's guidance vector from the question (None otherwise).

    ``clip``: the CLIP tokenizer (saved to a subdirectory), its BOS/EOS ids and context (the host splits long
    questions into ``[BOS] ... [EOS]`` chunks of at most ``context`` tokens, runs ``guidance.onnx`` on each and
    averages the unit embeddings). ``llm``: host-side mean of ``embed.onnx`` over the question's tokens (no BOS);
    an empty question embeds ``empty_token_id`` (the tokenizer's unk, else 0), as the torch backend does.
    """
    if plan.guidance == "llm":
        return {"source": "llm", "empty_token_id": int(loaded.tokenizer.unk_token_id or 0)}
    if plan.guidance != "clip":
        return None
    tok = plan.clip.tokenizer
    tok.save_pretrained(str(tmp / CLIP_TOKENIZER_DIR))
    if not (tmp / CLIP_TOKENIZER_DIR / TOKENIZER_FILE).is_file():
        raise ExportError(f"the CLIP tokenizer of {plan.clip.name} has no fast {TOKENIZER_FILE}; the torch-free "
                          "runtime needs one")
    if tok.eos_token_id is None:
        raise ExportError(f"the CLIP tokenizer of {plan.clip.name} has no EOS token; it cannot pool [EOS]")
    return {"source": "clip", "clip": plan.clip.name, "fingerprint": clip_fingerprint,
            "tokenizer": f"{CLIP_TOKENIZER_DIR}/{TOKENIZER_FILE}", "context": int(plan.clip.context),
            "bos_token_id": None if tok.bos_token_id is None else int(tok.bos_token_id),
            "eos_token_id": int(tok.eos_token_id)}


@contextlib.contextmanager
def _quiet_exporter_logs() -> Iterator[None]:
    """Raise the ``torch.onnx`` logger to ERROR for the duration of one export, then restore its level.

    Why: every export logs four "torchvision is not installed. Skipping torchvision::..." warnings (there is no
    torchvision here, DESIGN.md §6), which would bury the one progress line per graph.
    """
    logger = logging.getLogger("torch.onnx")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)
