"""One progress helper for long commands (export, fit-recipe): a tqdm bar on stderr, or plain lines.

``with progress(total, "export", "graph") as report: ... report("vision: exported in 6.8 s")`` advances the
bar by one step per call. With ``sink`` (the library's ``log=`` callbacks, tests) every message goes to the
sink instead; without tqdm installed, numbered lines go to stderr.
"""

from __future__ import annotations

import sys
from contextlib import contextmanager
from typing import Callable, Iterator


@contextmanager
def progress(total: int, desc: str, unit: str, sink: Callable[[str], None] | None = None,
             lines: bool = True) -> Iterator[Callable[[str], None]]:
    """A per-step progress sink.

    Args:
        total: the expected number of steps; desc / unit: the bar's label and step name.
        sink: when given, receives each message as is (no bar).
        lines: with a bar, also print each message above it (False: show it as the bar's postfix).
    Yields:
        ``report(message)``: one finished step.
    """
    if sink is not None:
        yield sink
        return
    try:
        from tqdm import tqdm
    except ImportError:
        done = [0]

        def line(msg: str) -> None:
            done[0] += 1
            print(f"[{done[0]}/{total}] {msg}" if not msg.startswith("[") else msg, file=sys.stderr, flush=True)

        yield line
        return
    with tqdm(total=total, desc=desc, unit=unit, file=sys.stderr, leave=False) as bar:
        def report(msg: str) -> None:
            if lines:
                bar.write(msg, file=sys.stderr)
            else:
                bar.set_postfix_str(msg, refresh=False)
            bar.update(1)

        yield report
