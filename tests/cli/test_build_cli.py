"""``edgeprune build`` on the command line (TensorRT-RTX on this CPU) and ``--backend trt`` where no usable
TensorRT exists: a happy path, the refusal of an existing engine set without ``--force``, every bad flag as one
``error:`` line with exit code 2 and nothing written, and ``run``/``compare``/``bench`` with the trt backend
failing cleanly here (TensorRT-RTX without a CUDA driver)."""

from __future__ import annotations

import json
import shutil

import pytest

from edgeprune.bundle.format import MANIFEST
from edgeprune.cli import main


@pytest.fixture(scope="module")
def bundle(tmp_path_factory, exported_bundle, tiny_llava):
    """A copy of the session's tiny-llava ``none`` bundle (tests/conftest.py's ``exported_bundle``)."""
    root = tmp_path_factory.mktemp("build-cli") / "bundle"
    shutil.copytree(exported_bundle(tiny_llava, "none"), root)
    return root


def _error_line(capsys):
    err = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert len(err) == 1, err
    return err[0]


def test_help(capsys):
    with pytest.raises(SystemExit) as info:
        main(["build", "--help"])
    assert info.value.code == 0 and "--plugins" in capsys.readouterr().out


@pytest.mark.parametrize("flags,match", [
    (["--opt-level", "7"], "--opt-level must be between 0 and 5"),
    (["--workspace-mb", "0"], "--workspace-mb must be a positive integer"),
    (["--sm", "87"], "--sm 87: TensorRT-RTX"),
    (["--precision", "fp16"], "--precision fp16: tensorrt-rtx .* this bundle is fp32"),
    (["--timing-cache", "/nonexistent/dir/t.cache"], "--timing-cache"),
])
def test_bad_flags_exit_2_and_write_nothing(bundle, capsys, flags, match):
    import re

    pytest.importorskip("tensorrt_rtx_bindings")
    before = (bundle / MANIFEST).read_text()
    assert main(["build", "--bundle", str(bundle), "--flavour", "tensorrt-rtx", *flags]) == 2
    assert re.search(match, _error_line(capsys))
    assert (bundle / MANIFEST).read_text() == before and not (bundle / "engines").exists()


def test_missing_bundle(tmp_path, capsys):
    assert main(["build", "--bundle", str(tmp_path / "nope")]) == 2
    assert "not an edgeprune bundle" in _error_line(capsys)


def test_build_then_refuse_then_force(bundle, capsys):
    pytest.importorskip("tensorrt_rtx_bindings")
    args = ["build", "--bundle", str(bundle), "--flavour", "tensorrt-rtx", "--opt-level", "0"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "engines: engines/tensorrt-rtx-" in out and "-sm86 (3 graphs" in out  # vision, embed, decoder
    rec = next(iter(json.loads((bundle / MANIFEST).read_text())["engines"].values()))
    assert main(args) == 2
    line = _error_line(capsys)
    assert "already has the engine set" in line and "--force" in line
    assert main([*args, "--force"]) == 0
    new = next(iter(json.loads((bundle / MANIFEST).read_text())["engines"].values()))
    assert new["built_at"] >= rec["built_at"] and set(new["graphs"]) == set(rec["graphs"])


def _no_gpu():
    from edgeprune.runtime.cuda_mem import device_compute_capability

    if device_compute_capability() is not None:
        pytest.skip("a CUDA device is visible: --backend trt may work here")


@pytest.mark.parametrize("cmd", [
    ["run", "--backend", "trt", "--bundle", "{b}", "--max-new-tokens", "2"],
    ["compare", "--bundle", "{b}", "--backends", "ort,trt", "--max-new-tokens", "2"],
    ["bench", "--backends", "ort,trt", "--methods", "none", "--repeat", "1"],
])
def test_trt_backend_without_usable_tensorrt_exits_2(bundle, capsys, cmd):
    _no_gpu()
    assert main([c.format(b=bundle) for c in cmd]) == 2
    line = _error_line(capsys)
    # what is missing here: TensorRT itself, cuda-python (the rtx extra brings it), or a CUDA device
    assert any(why in line for why in ("is not installed", "needs cuda-python", "no usable CUDA device")), line
