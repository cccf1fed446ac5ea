"""``edgeprune demo``: warm-up, repeated runs, the median shown, and a speedup line a user can read."""

from __future__ import annotations

import re
from types import SimpleNamespace

from edgeprune.cli import main
from edgeprune.cli.demo import median_run, speedup_line
from edgeprune.runtime.profiler import Profile


def _result(ttft_ms: float, prefill_ms: float, kept: int = 64) -> SimpleNamespace:
    prof = Profile()
    prof.ttft = ttft_ms / 1e3
    prof.spans["prefill"] = [prefill_ms / 1e3]
    prof.counters.update(visual_kept=kept, visual_in=576)
    return SimpleNamespace(profile=prof)


def test_median_run_ignores_an_outlier():
    runs = [_result(100, 50), _result(900, 800), _result(110, 55)]
    assert median_run(runs) is runs[2]
    assert median_run(runs[:2]) is runs[0]  # even count: the lower middle


def test_speedup_line_states_both_ratios():
    line = speedup_line(_result(120, 60, 576), _result(60, 12), "cls-topk", 5)
    assert "64/576 tokens, median of 5 after a warm-up" in line
    assert "TTFT 120.0 -> 60.0 ms (2.00x)" in line and "prefill 60.0 -> 12.0 ms (5.00x)" in line


def test_demo_prints_both_answers_profiles_and_the_speedup(capsys, monkeypatch, tiny_llava):
    import edgeprune.models.loader as loader

    monkeypatch.setattr(loader, "load_model", lambda name, **kw: tiny_llava)  # the session's copy, not a rebuild
    assert main(["demo", "--repeat", "2", "--max-new-tokens", "3"]) == 0
    out = capsys.readouterr().out
    assert "== none: 576/576 visual tokens" in out and "== cls-topk: 64/576 visual tokens" in out
    assert out.count("answer: ") == 2 and out.count("TTFT") >= 2
    last = out.strip().splitlines()[-1]
    assert re.fullmatch(r"speedup with cls-topk \(64/576 tokens, median of 2 after a warm-up\): TTFT [\d.]+ -> "
                        r"[\d.]+ ms \([\d.]+x\), prefill [\d.]+ -> [\d.]+ ms \([\d.]+x\)", last), last
