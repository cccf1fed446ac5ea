"""The results document of ``edgeprune bench``: per-combination statistics, FLOPs, ratios and target checks.

Schema (``format = "edgeprune-bench"``, ``format_version = 1``); times in milliseconds, p50/p90 over the
measured repeats (numpy's linear-interpolation percentiles)::

    {format, format_version, created, command, config{...BenchOptions}, machine{cpu, cores_*, memory_gb, os,
     python, gpu}, versions{lib: version}, threads{torch_intra_op, torch_inter_op, ort_intra_op, requested, env},
     model{name, source, dtype, device, params, n_visual, views, dims{vision, text, projector}},
     prompt{question, question_tokens, requested_tokens},
     results: [{backend, method, method_args, budget{tokens, ratio}, status: ok|skipped, reason,
                kept_tokens, repeats,
                tokens{question, prefix, suffix, prompt, visual_in, visual_kept, visual_to_llm, new, layer_tokens},
                stages{preprocess|vision|guidance|prune|embed|prefill|decode: {p50_ms, p90_ms, mean_ms, min_ms,
                       calls}}, decode_step{p50_ms, p90_ms, mean_ms, min_ms, steps},
                ttft_ms{p50, p90, mean, min}, total_ms{...}, decode_tokens_per_s{...},
                memory{peak_rss_mb, device_peak_mb}, flops{vision, vision_executed, projector, guidance, prune,
                prefill, ttft, decode_first_step, decode_total, decode_bytes_first_step, vision_bytes, prefill_bytes,
                layer_visual_tokens, cache_lengths}, prune_share_of_ttft, vs_none{ttft_speedup, prefill_speedup, decode_speedup,
                prefill_flops_ratio, ideal_ttft_speedup, ttft_efficiency}, ort_vs_torch{vision, prefill,
                decode_step, ttft} (ORT rows with a torch twin), samples{ttft_ms[], total_ms[], stages_ms{}}}],
     statistic: which of p50/min/mean/p90 the ratios and checks use (default p50),
     checks: [{target, backend, method, value, threshold, met, detail}],
     ceilings{backend: {flops_per_s, bytes_per_s, gemm, copy, threads, quick, error}},
     roofline_furthest{backend, method, kept_tokens, stage, efficiency, bound}}

Each measured row also has ``roofline{vision|prefill|decode_step: {flops, bytes, ms, flops_per_s, bytes_per_s,
flops_fraction, bytes_fraction, bound, roofline_ms, efficiency}}`` (decode_step adds ``tokens_per_s`` and
``bound_tokens_per_s``) when the run measured ceilings (:mod:`edgeprune.bench.roofline`); ``machine.isa`` holds
the CPU's ISA extensions (AVX2/AVX-512/AMX, ARM features) and ARM core types.

Every stage of :data:`~edgeprune.runtime.profiler.STAGES` is present in ``stages``; a stage that did not run
(``guidance`` for a method without text guidance) has ``calls = 0`` and 0 ms.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

from ..runtime.profiler import STAGES
from . import flops as F
from . import roofline as RF
from .system import summary

FORMAT = "edgeprune-bench"
FORMAT_VERSION = 1
STATISTICS = ("p50", "min", "mean", "p90")
WEIGHT_BYTES = {"fp32": 4, "fp16": 2, "bf16": 2}
PRUNE_SHARE_MAX = 0.02
EFFICIENCY_MIN = 0.8
ORT_PREFILL_SPEEDUP_MIN = 4.0


@dataclass(frozen=True)
class Context:
    """What the FLOPs of every combination share: the model, its views, the question length and dtype."""

    loaded: Any
    views: int
    question_tokens: int
    dtype: str


def run_stats(profiles: Sequence[Any]) -> dict[str, Any]:
    """p50/p90 statistics of the measured :class:`~edgeprune.runtime.profiler.Profile` objects of a combination.

    A stage's value per run is its total over the run (``decode``: the sum of every step); ``decode_step``
    pools the individual steps of every run.
    """
    per_stage = {s: [1e3 * p.stage_total(s) for p in profiles] for s in STAGES}
    stages = {}
    for s in STAGES:
        st = summary(per_stage[s])
        stages[s] = {"p50_ms": st["p50"], "p90_ms": st["p90"], "mean_ms": st["mean"], "min_ms": st["min"],
                     "calls": len(profiles[0].spans.get(s, [])) if profiles else 0}
    steps = [1e3 * d for p in profiles for d in p.spans.get("decode", [])]
    step = summary(steps)
    ttft, total = [1e3 * p.ttft for p in profiles], [1e3 * p.total for p in profiles]
    return {"stages": stages,
            "decode_step": {"p50_ms": step["p50"], "p90_ms": step["p90"], "mean_ms": step["mean"],
                            "min_ms": step["min"], "steps": len(steps)},
            "ttft_ms": summary(ttft), "total_ms": summary(total),
            "decode_tokens_per_s": summary([p.decode_tokens_per_s for p in profiles]),
            "samples": {"ttft_ms": ttft, "total_ms": total, "stages_ms": per_stage}}


def _method_cost(c: Any, ctx: Context, shape: F.RequestShape, kept: int) -> F.MethodCost:
    """The :class:`~edgeprune.bench.flops.MethodCost` of a combination, from the method's own parameters."""
    from ..methods.registry import build_method

    method = build_method(c.method, c.method_args or None)
    layers = int(ctx.loaded.config.text_config.num_hidden_layers)
    p = method.params
    if c.method == "fastv":
        return F.MethodCost("fastv", kept, drops=F.fastv_drops(shape.n, kept, int(p.layer), layers))
    if c.method == "fitprune":
        return F.MethodCost("fitprune", kept, drops=tuple(method.drops_for(shape.n, layers)))
    if c.method == "gridprune":
        clip = F.clip_text_dims(c.clip_config) if c.clip_config is not None else None
        return F.MethodCost("gridprune", kept, guidance="clip" if clip else "llm", clip=clip, zones=int(p.zones))
    if c.method == "gprune":
        return F.MethodCost("gprune", kept, steps=int(p.steps))
    return F.MethodCost(c.method, kept)


def _tokens(c: Any) -> dict[str, Any]:
    cnt = c.profiles[0].counters
    return {"prefix": c.prompt_split[0], "suffix": c.prompt_split[1], "prompt": cnt.get("prompt_tokens"),
            "visual_in": cnt.get("visual_in"), "visual_kept": cnt.get("visual_kept"),
            "visual_to_llm": cnt.get("visual_to_llm"), "total_visual": c.total_visual,
            "new": cnt.get("new_tokens"), "layer_tokens": cnt.get("layer_tokens")}


def _row(c: Any, ctx: Context, dims: F.ModelDims) -> dict[str, Any]:
    row: dict[str, Any] = {"backend": c.backend, "method": c.method, "method_args": dict(c.method_args or {}),
                           "budget": {"tokens": c.budget.tokens, "ratio": c.budget.ratio},
                           "status": "skipped" if c.skipped else "ok", "reason": c.skipped,
                           "guidance": c.guidance_source}
    if c.skipped or not c.profiles:
        return row
    tokens = {"question": ctx.question_tokens, **_tokens(c)}
    shape = F.RequestShape(n=tokens["visual_in"], total_visual=c.total_visual, visual_to_llm=tokens["visual_to_llm"],
                           prefix=tokens["prefix"], suffix=tokens["suffix"], question=ctx.question_tokens,
                           new_tokens=tokens["new"], views=ctx.views)
    cost = _method_cost(c, ctx, shape, tokens["visual_kept"])
    stats = run_stats(c.profiles)
    mb = 2.0 ** 20
    row.update(kept_tokens=tokens["visual_kept"], repeats=len(c.profiles), tokens=tokens,
               stages=stats["stages"], decode_step=stats["decode_step"], ttft_ms=stats["ttft_ms"],
               total_ms=stats["total_ms"], decode_tokens_per_s=stats["decode_tokens_per_s"],
               memory={"peak_rss_mb": max(c.peak_rss) / mb if c.peak_rss else None,
                       "device_peak_mb": max(c.device_peak) / mb if c.device_peak else None},
               flops=F.request_flops(dims, cost, shape, WEIGHT_BYTES.get(ctx.dtype, 4)))
    counters = c.profiles[0].counters
    row["backend_info"] = {k: counters[k] for k in ("providers", "graph_files") if k in counters}
    row["samples"] = stats["samples"]
    return row


def combo_results(combos: Sequence[Any], ctx: Context, statistic: str = "p50",
                  ceilings: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """One result row per combination (schema in the module docstring), with the ratios (and, given the
    measured ``ceilings`` per backend, the roofline figures) filled in."""
    dims = F.dims_from_config(ctx.loaded.config)
    rows = [_row(c, ctx, dims) for c in combos]
    derive(rows, statistic, ceilings)
    return rows


def recompute(doc: dict[str, Any], statistic: str) -> dict[str, Any]:
    """Re-derive the ratios and checks of a results document from another statistic (in place; returned).

    Raises:
        EdgepruneError: not an ``edgeprune-bench`` document of a known version, or an unknown statistic.
    """
    from ..errors import EdgepruneError

    if statistic not in STATISTICS:
        raise EdgepruneError(f"--statistic must be one of {', '.join(STATISTICS)}; got {statistic!r}")
    if doc.get("format") != FORMAT or doc.get("format_version") != FORMAT_VERSION:
        raise EdgepruneError(f"not an {FORMAT} v{FORMAT_VERSION} results file (format {doc.get('format')!r}, "
                             f"version {doc.get('format_version')!r}); re-run edgeprune bench")
    derive(doc["results"], statistic, doc.get("ceilings"))
    doc["statistic"], doc["checks"] = statistic, evaluate_targets(doc["results"], statistic)
    doc["roofline_furthest"] = RF.furthest(doc["results"])
    return doc


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b not in (None, 0) else None


def _t(r: dict[str, Any], what: str, stat: str) -> float:
    """The ``stat`` (``p50``/``p90``/``mean``/``min``) time in ms of a stage, ``ttft`` or ``decode_step``."""
    if what == "ttft":
        return r["ttft_ms"][stat]
    return (r["decode_step"] if what == "decode_step" else r["stages"][what])[f"{stat}_ms"]


def derive(rows: list[dict[str, Any]], statistic: str = "p50", ceilings: dict[str, Any] | None = None) -> None:
    """Fill the ratios of every measured row in place, from the ``statistic`` of each time.

    ``prune_share_of_ttft``; ``vs_none`` against the ``none`` row of the same backend (TTFT, prefill and
    decode-step speedups, the prefill FLOPs ratio, the ideal TTFT speedup and measured / ideal);
    ``ort_vs_torch`` (torch time / ORT time) for ORT rows with a torch twin of the same method and K.
    ``p50`` is the default; ``min`` (the quietest repeat) is the robust choice on a machine shared with other work.
    With ``ceilings`` (``{backend: ceiling}``, :func:`~edgeprune.bench.roofline.measure_ceilings`), ``roofline``
    holds :func:`~edgeprune.bench.roofline.row_roofline` of the row.
    """
    ok = [r for r in rows if r["status"] == "ok"]
    base = {r["backend"]: r for r in ok if r["method"] == "none"}
    twins = {(r["method"], r["kept_tokens"]): r for r in ok if r["backend"] == "torch"}
    for r in ok:
        r["prune_share_of_ttft"] = _ratio(_t(r, "guidance", statistic) + _t(r, "prune", statistic),
                                          _t(r, "ttft", statistic))
        b = base.get(r["backend"])
        if b is not None:
            ideal = F.ideal_ttft_speedup(b["flops"], r["flops"])
            measured = _ratio(_t(b, "ttft", statistic), _t(r, "ttft", statistic))
            r["vs_none"] = {
                "ttft_speedup": measured,
                "prefill_speedup": _ratio(_t(b, "prefill", statistic), _t(r, "prefill", statistic)),
                "decode_speedup": _ratio(_t(b, "decode_step", statistic), _t(r, "decode_step", statistic)),
                "prefill_flops_ratio": _ratio(b["flops"]["prefill"], r["flops"]["prefill"]),
                "ideal_ttft_speedup": ideal, "ttft_efficiency": _ratio(measured, ideal)}
        if ceilings and r["backend"] in ceilings:
            r["roofline"] = RF.row_roofline(r, ceilings[r["backend"]], statistic)
        t = twins.get((r["method"], r["kept_tokens"]))
        if r["backend"] == "ort" and t is not None:
            r["ort_vs_torch"] = {k: _ratio(_t(t, k, statistic), _t(r, k, statistic))
                                 for k in ("vision", "prefill", "decode_step", "ttft")}


def model_info(loaded: Any, n: int, views: int, o: Any) -> dict[str, Any]:
    """Name, source, dtype, device, parameter count, N, views and the dimensions the FLOPs model read."""
    params = sum(int(p.numel()) for p in loaded.model.parameters())
    return {"name": o.model, "source": loaded.source, "dtype": o.dtype, "device": o.device, "params": params,
            "n_visual": n, "views": views, "dims": F.dims_from_config(loaded.config).to_dict()}


def _check(target: str, backend: str, method: str, value: float | None, threshold: float, above: bool,
           detail: str) -> dict[str, Any]:
    met = None if value is None else (value >= threshold if above else value < threshold)
    return {"target": target, "backend": backend, "method": method, "value": value, "threshold": threshold,
            "met": met, "detail": detail}


def evaluate_targets(rows: Sequence[dict[str, Any]], statistic: str = "p50") -> list[dict[str, Any]]:
    """The issue's targets, evaluated at the smallest budget of the sweep on the ratios :func:`derive` filled
    (``statistic`` only labels them).

    * ``prune_share``: guidance + prune < 2 % of TTFT, every pre-LLM method (not ``none``), per backend;
    * ``ttft_efficiency``: measured TTFT speedup over ``none`` >= 80 % of the ideal FLOPs speedup;
    * ``ort_prefill_speedup``: ORT prefill at N over prefill at the smallest K >= 4x (pre-LLM methods);
    * ``ort_beats_torch_<stage>``: torch / ORT time > 1 for vision, prefill and decode step, every twin;
    * ``roofline_<stage>``: :func:`~edgeprune.bench.roofline.roofline_checks` (rows with roofline figures).
    """
    ok = [r for r in rows if r["status"] == "ok"]
    pruned = [r for r in ok if r["method"] != "none"]
    if not pruned:
        return RF.roofline_checks(ok)
    k_min = min(r["kept_tokens"] for r in pruned)
    out = []
    for r in (r for r in pruned if r["kept_tokens"] == k_min):
        where, pre_llm = f"K={k_min}", not r["tokens"].get("layer_tokens")
        if pre_llm:
            out.append(_check("prune_share", r["backend"], r["method"], r["prune_share_of_ttft"], PRUNE_SHARE_MAX,
                              False, f"(guidance + prune) / TTFT at {where}"))
        vs = r.get("vs_none") or {}
        out.append(_check("ttft_efficiency", r["backend"], r["method"], vs.get("ttft_efficiency"), EFFICIENCY_MIN,
                          True, f"measured {vs.get('ttft_speedup') or float('nan'):.2f}x / ideal "
                                f"{vs.get('ideal_ttft_speedup') or float('nan'):.2f}x at {where}"))
        if r["backend"] == "ort" and pre_llm:
            out.append(_check("ort_prefill_speedup", "ort", r["method"], vs.get("prefill_speedup"),
                              ORT_PREFILL_SPEEDUP_MIN, True, f"prefill(none) / prefill({where})"))
    for stage in ("vision", "prefill", "decode_step"):
        vals = [(r["method"], r["kept_tokens"], r["ort_vs_torch"][stage]) for r in ok if r.get("ort_vs_torch")]
        if vals:
            worst = min(vals, key=lambda v: v[2] or 0.0)
            out.append(_check(f"ort_beats_torch_{stage}", "ort", "all", worst[2], 1.0, True,
                              f"min torch/ORT {statistic} over {len(vals)} combinations (worst: {worst[0]} "
                              f"K={worst[1]})"))
    return out + RF.roofline_checks(ok)
