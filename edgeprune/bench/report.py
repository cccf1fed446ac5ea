"""Reports of a results document: the printed table, the markdown table, the PNG plot and atomic writes.

The plot uses matplotlib's object API (``matplotlib.figure.Figure`` rendered by the Agg canvas), never
``pyplot``, so it leaves no global figure state behind and needs no display.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import textwrap
from pathlib import Path
from typing import Any, Callable, Sequence

from .._deps import require

COLUMNS = ("backend", "method", "K", "LLM in", "vision", "guid+prune", "prefill", "decode/step", "TTFT p50 (p90)",
           "tok/s", "e2e", "prefill FLOPs x", "TTFT x", "ideal x", "eff", "prune %", "RSS MB", "vision %peak",
           "prefill %peak", "decode %BW", "decode bound tok/s")
# The printed table keeps what fits ~120 columns; the markdown and JSON have every column.
TEXT_COLUMNS = ("backend", "method", "K", "vision", "g+prune", "prefill", "dec/step", "TTFT", "tok/s",
                "TTFT x (ideal)", "roofline v/p/d %")
WIDTH = 120
_TTFT_STAGES = ("preprocess", "vision", "guidance", "prune", "embed", "prefill")
_COLORS = {"none": "black", "random": "tab:gray", "uniform": "tab:olive", "cls-topk": "tab:blue",
           "gridprune": "tab:green", "gprune": "tab:red", "fitprune": "tab:purple", "fastv": "tab:orange"}


def _f(value: Any, fmt: str = "{:.1f}") -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return fmt.format(value)


def table_rows(doc: dict[str, Any]) -> list[list[str]]:
    """One list of cells per measured row, in :data:`COLUMNS` order (times in ms, p50 unless said)."""
    out = []
    for r in doc["results"]:
        if r["status"] != "ok":
            continue
        st, vs = r["stages"], r.get("vs_none") or {}
        guide = st["guidance"]["p50_ms"] + st["prune"]["p50_ms"]
        out.append([
            r["backend"], r["method"], str(r["kept_tokens"]), str(r["tokens"]["prompt"]),
            _f(st["vision"]["p50_ms"]), _f(guide, "{:.2f}"), _f(st["prefill"]["p50_ms"]),
            _f(r["decode_step"]["p50_ms"], "{:.2f}"),
            f"{_f(r['ttft_ms']['p50'])} ({_f(r['ttft_ms']['p90'])})", _f(r["decode_tokens_per_s"]["p50"]),
            _f(r["total_ms"]["p50"]), _f(vs.get("prefill_flops_ratio"), "{:.2f}"),
            _f(vs.get("ttft_speedup"), "{:.2f}"), _f(vs.get("ideal_ttft_speedup"), "{:.2f}"),
            _f(vs.get("ttft_efficiency"), "{:.0%}"), _f(100 * r["prune_share_of_ttft"], "{:.2f}"),
            _f(r["memory"]["peak_rss_mb"], "{:.0f}"), *_roof_cells(r)])
    return out


def _roof_cells(r: dict[str, Any]) -> list[str]:
    """vision and prefill % of the GEMM ceiling, decode % of the bandwidth, decode's bound tokens/s."""
    roof = r.get("roofline") or {}
    v, p, d = (roof.get(s) or {} for s in ("vision", "prefill", "decode_step"))
    pct = lambda x: _f(None if x is None else 100 * x, "{:.0f}")  # noqa: E731
    return [pct(v.get("flops_fraction")), pct(p.get("flops_fraction")), pct(d.get("bytes_fraction")),
            _f(d.get("bound_tokens_per_s"), "{:.0f}")]


def text_rows(doc: dict[str, Any]) -> list[list[str]]:
    """The printed table's cells (:data:`TEXT_COLUMNS`), taken from :func:`table_rows`."""
    out = []
    for full in table_rows(doc):
        cell = dict(zip(COLUMNS, full))
        roof = "/".join(cell[c] for c in ("vision %peak", "prefill %peak", "decode %BW"))
        out.append([cell["backend"], cell["method"], cell["K"], cell["vision"], cell["guid+prune"], cell["prefill"],
                    cell["decode/step"], cell["TTFT p50 (p90)"].split(" ")[0], cell["tok/s"],
                    f"{cell['TTFT x']} ({cell['ideal x']})", "-" if roof == "-/-/-" else roof])
    return out


def _skipped(doc: dict[str, Any]) -> list[str]:
    return [f"{r['backend']} {r['method']} {r['budget']['tokens'] or r['budget']['ratio'] or ''}: {r['reason']}"
            for r in doc["results"] if r["status"] != "ok"]


def _header(doc: dict[str, Any]) -> str:
    m, mach, c = doc["model"], doc["machine"], doc["config"]
    th = doc["threads"]
    dev = mach["gpu"]["name"] if mach.get("gpu") else f"{mach['cpu']} ({mach['cores_usable']} cores)"
    return (f"{m['name']} ({m['params'] / 1e6:.1f} M params, N = {m['n_visual']}, {m['dtype']}) on {dev}; "
            f"torch threads {th['torch_intra_op']}, ORT intra-op {th['ort_intra_op'] or 'default'}; "
            f"question {doc['prompt']['question_tokens']} tokens, {c['new_tokens']} new tokens; "
            f"p50 of {c['repeat']} after {c['warmup']} warm-up ({c['schedule']}); ratios from "
            f"{doc.get('statistic', 'p50')}" + ("; RSS is the whole process (every pipeline alive)"
                                                 if c["schedule"] == "interleaved" else ""))


def _roofline_lines(doc: dict[str, Any]) -> list[str]:
    """The measured ceilings per backend and the stage furthest from its limit."""
    from .roofline import ceilings_text

    lines = [ln for ln in ceilings_text(doc.get("ceilings")).splitlines() if ln]
    far = doc.get("roofline_furthest")
    if far:
        lines.append(f"furthest from its limit: {far['stage']} of {far['backend']} {far['method']} K={far['kept_tokens']} "
                     f"at {100 * far['efficiency']:.0f} % of its {far['bound'] or 'roofline'} bound: optimise that next")
    return lines


def _checks(doc: dict[str, Any]) -> list[str]:
    lines = []
    for ch in doc.get("checks", []):
        mark = {True: "met", False: "NOT met", None: "n/a"}[ch["met"]]
        value = "-" if ch["value"] is None else f"{ch['value']:.3g}"
        lines.append(f"{ch['target']} [{ch['backend']} {ch['method']}]: {value} vs {ch['threshold']} -> {mark} "
                     f"({ch['detail']})")
    return lines


def text_table(doc: dict[str, Any]) -> str:
    """A fixed-width table for the terminal, then skipped combinations and target checks."""
    rows = [list(TEXT_COLUMNS)] + text_rows(doc)
    widths = [max(len(r[i]) for r in rows) for i in range(len(TEXT_COLUMNS))]
    lines = textwrap.wrap(_header(doc), WIDTH)
    lines += [" ".join(cell.rjust(w) if i > 1 else cell.ljust(w) for i, (cell, w) in enumerate(zip(r, widths)))
              for r in rows]
    notes = ["ms p50; roofline v/p/d %: vision and prefill FLOP/s as % of the GEMM ceiling, decode bytes/s as % of "
             "the copy bandwidth; every column is in --markdown and --out"]
    notes += [f"skipped {s}" for s in _skipped(doc)] + _roofline_lines(doc) + _checks(doc)
    for note in notes:
        lines += textwrap.wrap(note, WIDTH, subsequent_indent="    ")
    return "\n".join(lines)


def markdown_table(doc: dict[str, Any]) -> str:
    """The same table in GitHub markdown, with the run's header line, skipped combinations and checks."""
    lines = [f"_{_header(doc)}_", "", "| " + " | ".join(COLUMNS) + " |",
             "|" + "|".join("---" if i < 2 else "---:" for i in range(len(COLUMNS))) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in table_rows(doc)]
    skipped, checks, roof = _skipped(doc), _checks(doc), _roofline_lines(doc)
    for block in (skipped and [f"skipped {s}" for s in skipped], roof, checks):
        if block:
            lines += [""] + [f"- {c}" for c in block]
    return "\n".join(lines) + "\n"


def figure(doc: dict[str, Any], dpi: int = 80) -> Any:
    """A ``Figure``: TTFT and decode tokens/s against kept tokens (a line per method and backend) and the TTFT
    stage breakdown as stacked bars (p50 ms)."""
    require("matplotlib")
    from matplotlib.figure import Figure

    ok = [r for r in doc["results"] if r["status"] == "ok"]
    fig = Figure(figsize=(16, 10), dpi=dpi, layout="constrained")
    grid = fig.subplot_mosaic([["ttft", "dec", "legend"], ["bar", "bar", "bar"]], width_ratios=(1, 1, 0.45),
                              height_ratios=(1, 1.05))
    ax_ttft, ax_dec, ax_bar, ax_leg = grid["ttft"], grid["dec"], grid["bar"], grid["legend"]
    for (method, backend), rs in _series(ok).items():
        xs = [r["kept_tokens"] for r in rs]
        style = dict(color=_COLORS.get(method), linestyle="-" if backend == "torch" else "--",
                     marker="*" if method == "none" else "o", markersize=9 if method == "none" else 4,
                     markerfacecolor=None if backend == "torch" else "white", label=f"{method} ({backend})")
        ax_ttft.plot(xs, [r["ttft_ms"]["p50"] for r in rs], **style)
        ax_dec.plot(xs, [r["decode_tokens_per_s"]["p50"] for r in rs], **style)
    for ax, title in ((ax_ttft, "TTFT p50 (ms)"), (ax_dec, "decode tokens/s (p50)")):
        ax.set_xlabel("kept visual tokens")
        ax.set_title(title, fontsize=12)
        ax.grid(alpha=0.3)
    ax_ttft.set_ylim(bottom=0)
    ax_dec.set_ylim(bottom=0)
    # The legend gets its own panel, so it never covers a line.
    ax_leg.axis("off")
    handles, labels = ax_ttft.get_legend_handles_labels()
    ax_leg.legend(handles, labels, loc="center left", fontsize=10, frameon=False,
                  title="method (backend): solid torch, dashed ORT")
    _stacked(ax_bar, ok)
    fig.suptitle(f"edgeprune bench: {doc['model']['name']} on {_device(doc)}", fontsize=13)
    return fig


def _device(doc: dict[str, Any]) -> str:
    mach = doc["machine"]
    return mach["gpu"]["name"] if mach.get("gpu") else f"{mach['cpu']} ({mach['cores_usable']} cores)"


def _series(rows: Sequence[dict[str, Any]]) -> dict[tuple[str, str], list[dict[str, Any]]]:
    out: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for r in rows:
        out.setdefault((r["method"], r["backend"]), []).append(r)
    return {k: sorted(v, key=lambda r: r["kept_tokens"]) for k, v in out.items()}


def _stacked(ax: Any, rows: Sequence[dict[str, Any]]) -> None:
    labels = [f"{r['backend'][0]} {r['method']} {r['kept_tokens']}" for r in rows]
    bottom = [0.0] * len(rows)
    cmap = ("tab:gray", "tab:blue", "tab:pink", "tab:red", "tab:olive", "tab:green")
    for stage, color in zip(_TTFT_STAGES, cmap):
        vals = [r["stages"][stage]["p50_ms"] for r in rows]
        ax.bar(range(len(rows)), vals, bottom=bottom, color=color, label=stage, width=0.8)
        bottom = [b + v for b, v in zip(bottom, vals)]
    ax.set_xticks(range(len(rows)), labels, rotation=60, fontsize=8, ha="right")
    ax.set_title("TTFT breakdown, p50 ms (t = torch, o = ORT)", fontsize=12)
    ax.legend(fontsize=9, loc="upper left", bbox_to_anchor=(1.005, 1.0), borderaxespad=0)
    ax.grid(axis="y", alpha=0.3)


def check_writable(path: str, flag: str, suffix: str | None = None) -> Path:
    """Validate an output path before any work.

    Raises:
        EdgepruneError: wrong suffix, a directory, a missing or read-only parent directory, or a read-only file.
    """
    from ..errors import EdgepruneError

    p = Path(path)
    if suffix and p.suffix.lower() != suffix:
        raise EdgepruneError(f"{flag} must be a {suffix} file; got {path!r}")
    if p.is_dir():
        raise EdgepruneError(f"{flag} {path!r} is a directory; give a file name")
    parent = p.absolute().parent
    if not parent.is_dir():
        raise EdgepruneError(f"{flag}: directory {str(parent)!r} does not exist; create it first")
    if not os.access(parent, os.W_OK) or (p.exists() and not os.access(p, os.W_OK)):
        raise EdgepruneError(f"{flag} {path!r} is not writable; choose another path")
    return p


def write_atomic(path: Path, write: Callable[[Any], None], binary: bool = False) -> None:
    """Write through a temporary sibling renamed into place, so a failure leaves no half file."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.absolute().parent)
    umask = os.umask(0)
    os.umask(umask)
    try:
        with os.fdopen(fd, "wb" if binary else "w") as f:
            write(f)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes it private; a report is an ordinary file
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def json_safe(obj: Any) -> Any:
    """``obj`` with NaN/inf floats replaced by None (strict JSON: other tools refuse ``NaN``)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    return obj


def save_outputs(doc: dict[str, Any], trace: dict[str, Any], out: Path | None, plot: Path | None = None,
                 markdown: Path | None = None, trace_path: Path | None = None, dpi: int = 80) -> None:
    """Write the JSON (unless ``out`` is None), the PNG plot, the markdown table and the Chrome trace."""
    if out is not None:
        write_atomic(out, lambda f: json.dump(json_safe(doc), f, indent=1, allow_nan=False))
    if plot is not None:
        fig = figure(doc, dpi=dpi)
        write_atomic(plot, lambda f: fig.savefig(f, format="png"), binary=True)
    if markdown is not None:
        write_atomic(markdown, lambda f: f.write(markdown_table(doc)))
    if trace_path is not None:
        write_atomic(trace_path, lambda f: json.dump(trace, f))
