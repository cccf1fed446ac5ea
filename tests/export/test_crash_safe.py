"""Export survives being killed: leftovers of killed exports are cleaned up, an interrupted --force swap is undone.

The swap tests run :func:`~edgeprune.export.atomic.move_into_place` in a subprocess that SIGKILLs itself at a
named step (its ``on_step`` callback), then check what a later export's :func:`recover` makes of it. One test
kills a real ``edgeprune export`` as soon as its temporary folder appears.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from edgeprune.bundle import BundleError, open_bundle
from edgeprune.bundle.format import MANIFEST, OWNER_FILE
from edgeprune.errors import ExportError
from edgeprune.export.atomic import STEPS, make_temp_dir, move_into_place, recover

REPO = Path(__file__).resolve().parents[2]


def fake_bundle(path: Path, tag: str) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    (path / MANIFEST).write_text(json.dumps({"tag": tag}))
    (path / "graph.onnx").write_text(tag)
    return path


def tag_of(path: Path) -> str:
    return json.loads((path / MANIFEST).read_text())["tag"]


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def leftover(out: Path, tag: str, pid: int) -> Path:
    folder = out.parent / f".{out.name}{tag}{pid}-abc123"
    folder.mkdir()
    (folder / OWNER_FILE).write_text(json.dumps({"pid": pid, "host": socket.gethostname()}))
    return folder


_KILL_AT = """
import os, signal, sys
from pathlib import Path
from edgeprune.export.atomic import make_temp_dir, move_into_place
out, step = Path(sys.argv[1]), sys.argv[2]
tmp = make_temp_dir(out)
tmp.joinpath("manifest.json").write_text('{"tag": "new"}')
def on_step(name):
    if name == step:
        os.kill(os.getpid(), signal.SIGKILL)
move_into_place(tmp, out, on_step)
"""


@pytest.mark.parametrize("step", STEPS[:2])
def test_kill_between_the_force_steps_is_recovered(step, tmp_path):
    out = fake_bundle(tmp_path / "b", "old")
    proc = subprocess.run([sys.executable, "-c", _KILL_AT, str(out), step], cwd=REPO)
    assert proc.returncode == -signal.SIGKILL
    leftovers = sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".b."))
    if step == "old-moved-aside":  # killed between the two renames: no bundle at the target
        assert not out.exists() and any(".old-" in n for n in leftovers) and any(".tmp-" in n for n in leftovers)
        with pytest.raises(BundleError, match="an export replacing it was interrupted and the previous bundle is at"):
            open_bundle(out)
    else:
        assert tag_of(out) == "new" and any(".old-" in n for n in leftovers)
    lines: list[str] = []
    recover(out, lines.append)
    assert tag_of(out) == ("old" if step == "old-moved-aside" else "new")
    assert [p.name for p in tmp_path.iterdir()] == ["b"]  # every leftover is gone
    assert len(lines) == len(leftovers) and all(line.startswith("recovered: ") for line in lines)
    assert not (out / OWNER_FILE).exists()


def test_a_completed_swap_leaves_only_the_new_bundle(tmp_path):
    out = fake_bundle(tmp_path / "b", "old")
    tmp = make_temp_dir(out)
    (tmp / MANIFEST).write_text('{"tag": "new"}')
    seen: list[str] = []
    move_into_place(tmp, out, seen.append)
    assert seen == list(STEPS) and tag_of(out) == "new" and [p.name for p in tmp_path.iterdir()] == ["b"]
    assert not (out / OWNER_FILE).exists()


def test_stale_temp_dirs_are_removed_only_when_ours_and_dead(tmp_path):
    out = tmp_path / "b"
    dead = leftover(out, ".tmp-", dead_pid())
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        live = leftover(out, ".tmp-", sleeper.pid)
        foreign = tmp_path / ".b.tmp-1-zzz"
        foreign.mkdir()  # no owner file: not ours to delete
        other = leftover(tmp_path / "c", ".tmp-", dead_pid())  # another bundle's leftover
        lines: list[str] = []
        recover(out, lines.append)
        assert not dead.exists() and live.exists() and foreign.exists() and other.exists()
        assert any("still running" in line for line in lines) and any("no readable edgeprune owner" in line
                                                                      for line in lines)
    finally:
        sleeper.kill()
        sleeper.wait()


def test_export_runs_the_recovery_first(tmp_path, tiny_llava):
    """The next export (even one refused because the target exists) restores an interrupted swap."""
    out = tmp_path / "b"
    aside = leftover(out, ".old-", dead_pid())
    fake_bundle(aside / "bundle", "old")
    stale = leftover(out, ".tmp-", dead_pid())
    lines: list[str] = []
    with pytest.raises(ExportError, match="already exists"):
        from edgeprune.export.exporter import export_bundle

        export_bundle(tiny_llava, "none", out_dir=out, log=lines.append)
    assert tag_of(out) == "old" and not aside.exists() and not stale.exists()
    assert sum(line.startswith("recovered: ") for line in lines) == 2


def test_a_killed_export_leaves_a_folder_the_next_export_removes(tmp_path):
    out = tmp_path / "b"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "edgeprune", "export", "--model", "tiny-llava", "--method",
                             "none", "--no-ort-variant", "--out", str(out)], cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 300
        while not list(tmp_path.glob(".b.tmp-*")):
            assert proc.poll() is None and time.monotonic() < deadline, "the export ended before writing"
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
    assert list(tmp_path.glob(".b.tmp-*")) and not out.exists()
    lines: list[str] = []
    recover(out, lines.append)
    assert not list(tmp_path.glob(".b.tmp-*")) and lines and "killed" in lines[0]
