"""House rule 4: ``import edgeprune`` and ``edgeprune --help`` need numpy only (torch/transformers blocked)."""

from __future__ import annotations

import subprocess
import sys

BLOCK = (
    "import sys\n"
    "for m in ('torch', 'transformers', 'onnxruntime', 'tensorrt', 'triton'):\n"
    "    sys.modules[m] = None  # any import of these now raises ImportError\n"
)


def _run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", BLOCK + code], capture_output=True, text=True, timeout=120)


def test_import_and_help_without_torch():
    proc = _run(
        "import edgeprune, edgeprune.methods, edgeprune.models\n"
        "from edgeprune.cli import main\n"
        "try:\n    main(['--help'])\nexcept SystemExit as e:\n    assert e.code == 0, e.code\n"
        "for cmd in (['methods'], ['models'], ['methods', '--json']):\n    assert main(cmd) == 0\n"
        "print('OK', edgeprune.__version__)\n"
    )
    assert proc.returncode == 0, proc.stderr
    assert "OK" in proc.stdout and "usage: edgeprune" in proc.stdout


def test_missing_torch_is_a_clear_error():
    """A command that needs torch says which extra to install and exits 2 instead of a traceback."""
    proc = _run("from edgeprune.cli import main\nraise SystemExit(main(['run', '--model', 'tiny-llava']))\n")
    assert proc.returncode == 2, proc.stderr
    assert "install" in proc.stderr and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def test_python_dash_m_entry_point():
    proc = subprocess.run([sys.executable, "-m", "edgeprune", "--version"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and "edgeprune" in proc.stdout
