"""The README's examples work as written from a fresh clone.

Every ``edgeprune ...`` line of the README's ``bash`` blocks parses with the real argument parser; every file
they read ships with the repository; the cheap ones run (in an empty directory holding only ``examples/``, so
nothing lands in the checkout), and the bundle / recipe chains run under the ``slow`` marker.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from edgeprune.cli import build_parser, main

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def readme_commands() -> list[list[str]]:
    """argv of every ``edgeprune`` command in the README's bash blocks (continuations joined, comments dropped)."""
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", README, flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            argv = shlex.split(line, comments=True)
            if argv and argv[0] == "edgeprune":
                commands.append(argv[1:])
            elif "&&" in argv:  # "pip install ... && edgeprune demo"
                for part in " ".join(argv).split("&&"):
                    sub = shlex.split(part)
                    if sub and sub[0] == "edgeprune":
                        commands.append(sub[1:])
    return commands


COMMANDS = readme_commands()
QUICK = [c for c in COMMANDS if c[0] in ("run", "viz") and "--bundle" not in c and "--device" not in c
         and "fitprune" not in c]


def test_the_readme_has_examples():
    assert len(COMMANDS) >= 12 and ["demo"] in COMMANDS and len(QUICK) >= 3


@pytest.mark.parametrize("argv", COMMANDS, ids=[" ".join(c)[:60] for c in COMMANDS])
def test_every_readme_command_parses(argv):
    args = build_parser().parse_args(argv)  # SystemExit(2) on an unknown flag or a bad choice
    assert args.command == argv[0]


def test_every_file_the_readme_reads_ships():
    for argv in COMMANDS:
        for flag in ("--image",):
            if flag in argv:
                assert (ROOT / argv[argv.index(flag) + 1]).is_file(), argv
    for path in re.findall(r"load_image\(\"([^\"]+)\"\)", README):
        assert (ROOT / path).is_file(), path
    image = ROOT / "examples" / "street.jpg"
    assert image.stat().st_size < 100_000


@pytest.fixture
def clone_dir(tmp_path, monkeypatch, tiny_llava, tiny_llava_next):
    """An empty working directory with the repository's ``examples/``; the tiny presets come from the session."""
    import edgeprune.models.loader as loader

    (tmp_path / "examples").symlink_to(ROOT / "examples")
    monkeypatch.chdir(tmp_path)
    real = loader.load_model
    shared = {"tiny-llava": tiny_llava, "tiny-llava-next": tiny_llava_next}

    def load(name, **kw):
        plain = kw.get("dtype", "fp32") == "fp32" and kw.get("device", "cpu") == "cpu"
        return shared[name] if plain and name in shared else real(name, **kw)

    monkeypatch.setattr(loader, "load_model", load)
    return tmp_path


@pytest.mark.parametrize("argv", QUICK, ids=[" ".join(c)[:60] for c in QUICK])
def test_quick_readme_examples_run(argv, clone_dir, capsys):
    assert main(argv) == 0, capsys.readouterr().err
    if argv[0] == "viz":
        assert (clone_dir / argv[argv.index("--out") + 1]).is_file()  # docs/ did not exist: viz created it


def test_readme_python_api_example_runs(clone_dir, capsys):
    code = re.search(r"```python\n(.*?)```", README, flags=re.S).group(1)
    exec(compile(code, "README.md", "exec"), {})
    assert "TTFT" in capsys.readouterr().out


@pytest.mark.slow
def test_readme_bundle_and_recipe_examples_run(clone_dir, capsys):
    chain = [c for c in COMMANDS if c[0] in ("export", "compare", "fit-recipe")
             or (c[0] == "run" and ("--bundle" in c or "fitprune" in c))]
    chain = [c for c in chain if "llava-1.5-7b" not in c and not any(a.endswith(".jsonl") for a in c)]
    assert sorted(c[0] for c in chain) == ["compare", "export", "fit-recipe", "run", "run"], chain
    for argv in sorted(chain, key=lambda c: ["export", "fit-recipe", "run", "compare"].index(c[0])):
        assert main(argv) == 0, (argv, capsys.readouterr().err)
