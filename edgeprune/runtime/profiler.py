"""Named-span profiler and the :class:`Profile` a pipeline run returns.

Spans use ``time.perf_counter``; a backend on a GPU passes a ``sync`` callable so a span ends only when the
device work it launched has finished (CUDA events come with the benchmark issue). A profile prints as a table,
serialises to JSON and to Chrome-trace JSON (open in chrome://tracing or Perfetto).
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

STAGES = ("preprocess", "vision", "guidance", "prune", "embed", "prefill", "decode")


@dataclass
class Profile:
    """Timings (seconds) and counters of one request.

    Attributes:
        spans: stage name -> list of durations in seconds (``decode`` has one entry per step).
        events: (name, start, duration) in seconds from the start of the request, for Chrome traces.
        counters: tokens in/out, visual tokens before/after pruning, ...
        ttft: time to first token (request start -> first generated token chosen).
        total: request wall time.
    """

    spans: dict[str, list[float]] = field(default_factory=dict)
    events: list[tuple[str, float, float]] = field(default_factory=list)
    counters: dict[str, Any] = field(default_factory=dict)
    ttft: float = 0.0
    total: float = 0.0

    def stage_total(self, name: str) -> float:
        return float(sum(self.spans.get(name, [])))

    @property
    def decode_tokens_per_s(self) -> float:
        steps = self.spans.get("decode", [])
        return len(steps) / sum(steps) if steps and sum(steps) > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        """JSON-able summary: per-stage totals in ms, TTFT, decode tokens/s and the counters."""
        stages = {k: {"ms": 1e3 * self.stage_total(k), "calls": len(v)} for k, v in self.spans.items()}
        return {"stages": stages, "ttft_ms": 1e3 * self.ttft, "total_ms": 1e3 * self.total,
                "decode_tokens_per_s": self.decode_tokens_per_s, "counters": dict(self.counters)}

    def table(self) -> str:
        """A fixed-width table of the stages in pipeline order, then TTFT, decode rate and counters."""
        lines = [f"{'stage':<12}{'ms':>10}{'calls':>7}{'share':>8}"]
        total = self.total or 1e-12
        for name in [s for s in STAGES if s in self.spans] + [s for s in self.spans if s not in STAGES]:
            t = self.stage_total(name)
            lines.append(f"{name:<12}{1e3 * t:>10.2f}{len(self.spans[name]):>7}{100 * t / total:>7.1f}%")
        lines.append(f"{'TTFT':<12}{1e3 * self.ttft:>10.2f}")
        lines.append(f"{'total':<12}{1e3 * self.total:>10.2f}")
        lines.append(f"decode: {self.decode_tokens_per_s:.1f} tokens/s")
        lines.append("  ".join(f"{k}={v}" for k, v in self.counters.items()))
        return "\n".join(lines)

    def chrome_trace(self) -> dict[str, Any]:
        """Chrome-trace JSON ("X" complete events, microseconds)."""
        events = [{"name": n, "ph": "X", "ts": 1e6 * s, "dur": 1e6 * d, "pid": 0, "tid": 0, "cat": "edgeprune"}
                  for n, s, d in self.events]
        return {"traceEvents": events, "displayTimeUnit": "ms"}


class Profiler:
    """Collects spans into a :class:`Profile`.

    Args:
        sync: called before a span's end time is read (e.g. ``torch.cuda.synchronize``); None on CPU.
    """

    def __init__(self, sync: Callable[[], None] | None = None) -> None:
        self._sync = sync
        self.profile = Profile()
        self._t0 = time.perf_counter()

    def now(self) -> float:
        """Seconds since the profiler was created (after syncing the device)."""
        if self._sync is not None:
            self._sync()
        return time.perf_counter() - self._t0

    @contextmanager
    def span(self, name: str) -> Iterator[None]:
        """Time the body as one call of stage ``name``."""
        start = self.now()
        try:
            yield
        finally:
            end = self.now()
            self.profile.spans.setdefault(name, []).append(end - start)
            self.profile.events.append((name, start, end - start))
