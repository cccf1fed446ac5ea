"""Crash-safe bundle directories: the temporary folder of an export, the ``--force`` swap, and recovery.

An export writes into ``.<name>.tmp-<pid>-<random>/`` next to its target ``<name>`` and renames it into place
at the end. Replacing an existing bundle (``--force``) takes two renames, done as:

1. ``<name>`` -> ``.<name>.old-<pid>-<random>/bundle`` (the old bundle, set aside),
2. ``.<name>.tmp-...`` -> ``<name>`` (the new one in place),
3. delete ``.<name>.old-...``.

Each temporary folder holds an owner file (:data:`~edgeprune.bundle.format.OWNER_FILE`: pid and host), so a
later export can tell its own leftovers from anything else and from a live export. :func:`recover`, run at the
start of every export, then:

- deletes a ``.tmp-`` folder whose owner process is gone (a killed export);
- for an ``.old-`` folder whose owner is gone: if ``<name>`` is missing (killed between steps 1 and 2) it moves
  the old bundle back; otherwise (killed after step 2) it finishes step 3;
- leaves alone (and reports) folders of a live process, of another host, or without an owner file.

Every decision is reported through the ``log`` callback (house rule 7). Steps can be observed by a callback
(``on_step``), which the crash-safety tests use to kill the process between two renames.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import tempfile
from pathlib import Path
from typing import Callable

from ..bundle.format import MANIFEST, OLD_TAG, OWNER_FILE, TMP_TAG

Step = Callable[[str], None]
# Steps reported to ``on_step`` by :func:`move_into_place`, in order (the names the tests kill at).
STEPS = ("old-moved-aside", "new-in-place", "old-deleted")


def _owner() -> dict[str, object]:
    return {"pid": os.getpid(), "host": socket.gethostname()}


def make_temp_dir(out: Path, tag: str = TMP_TAG) -> Path:
    """A fresh ``.<name><tag><pid>-<random>`` folder next to ``out``, with its owner file."""
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}{tag}{os.getpid()}-", dir=out.parent))
    (tmp / OWNER_FILE).write_text(json.dumps(_owner()) + "\n")
    return tmp


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def _status(folder: Path) -> str:
    """``dead`` (ours, owner gone), or why it is left alone."""
    try:
        owner = json.loads((folder / OWNER_FILE).read_text())
        pid, host = int(owner["pid"]), str(owner["host"])
    except (OSError, ValueError, KeyError, TypeError):
        return "it has no readable edgeprune owner file"
    if host != socket.gethostname():
        return f"it belongs to an export on host {host!r}"
    if pid == os.getpid() or _alive(pid):
        return f"its export (pid {pid}) is still running"
    return "dead"


def recover(out: Path, log: Callable[[str], None]) -> None:
    """Clean up after exports to ``out`` that were killed (see the module docstring).

    Args:
        out: the bundle directory an export is about to write.
        log: receives one line per folder found and what was done with it.
    """
    parent = out.absolute().parent
    if not parent.is_dir():
        return
    pattern = re.compile(rf"\.{re.escape(out.name)}({re.escape(OLD_TAG)}|{re.escape(TMP_TAG)})\d+-[A-Za-z0-9_]+")
    found = [(m.group(1), p) for p in parent.iterdir() if (m := pattern.fullmatch(p.name))]
    for tag, folder in sorted(found, key=lambda f: (f[0] != OLD_TAG, f[1].name)):  # restore before cleaning
        if not folder.is_dir() or folder.is_symlink():
            continue
        why = _status(folder)
        if why != "dead":
            log(f"note: left {folder} alone: {why}")
            continue
        old = folder / "bundle"
        if tag == OLD_TAG and old.is_dir() and not out.exists():
            os.rename(old, out)
            log(f"recovered: an export replacing {out} was killed between its two renames; moved the previous "
                f"bundle back from {folder}")
        elif tag == OLD_TAG and old.is_dir():
            log(f"recovered: an export replacing {out} was killed after its new bundle was in place; deleted the "
                f"previous bundle in {folder}")
        else:
            log(f"recovered: deleted {folder}, left by an export to {out} that was killed")
        shutil.rmtree(folder, ignore_errors=True)


def move_into_place(tmp: Path, out: Path, on_step: Step | None = None) -> None:
    """Rename the finished bundle ``tmp`` onto ``out``; an old bundle is replaced by the crash-safe swap.

    Args:
        tmp: the complete bundle (from :func:`make_temp_dir`); out: the target.
        on_step: called with each name of :data:`STEPS` after that step (tests kill the process there).
    """
    step = on_step or (lambda name: None)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp made it private (0700); a bundle is shared like a model directory
    if not out.exists():
        os.rename(tmp, out)
        (out / OWNER_FILE).unlink(missing_ok=True)
        return
    if not (out / MANIFEST).is_file() and any(out.iterdir()):
        raise FileExistsError(f"{out} is not an edgeprune bundle")  # checked earlier; never replace other data
    trash = make_temp_dir(out, OLD_TAG)
    os.rename(out, trash / "bundle")
    step(STEPS[0])
    os.rename(tmp, out)
    (out / OWNER_FILE).unlink(missing_ok=True)
    step(STEPS[1])
    shutil.rmtree(trash, ignore_errors=True)
    step(STEPS[2])
