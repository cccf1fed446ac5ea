"""A first run that reads well: compare's table cannot be misread, viz creates its output directory."""

from __future__ import annotations

from edgeprune.cli import main
from edgeprune.eval.checks import TOLERANCES, Check, CompareReport


def test_compare_table_puts_the_checked_absolute_error_beside_its_bound():
    # a near-zero reference: relative error far above the bound, absolute error within it -> ok
    rep = CompareReport("b", "torch", "ort", "tiny-llava", "cls-topk", 64, "q", TOLERANCES["fp32"], "numpy",
                        checks=[Check("prefill", "logits", "close", True, [1024], None, 3e-7, 0.5, 1e-4),
                                Check("prune", "kept_idx", "exact", True, [64])])
    lines = rep.table().splitlines()
    legend = next(line for line in lines if line.startswith("checked:"))
    assert "max abs <= abs bound" in legend and "'max rel' is not checked" in legend
    header = next(line for line in lines if line.startswith("stage"))
    assert header.split()[4:8] == ["max", "abs", "abs", "bound"]  # the pair that is compared, side by side
    assert header.rstrip().endswith("max rel (info)") and "result" in header.split("abs bound")[1]
    row = next(line for line in lines if line.startswith("prefill"))
    assert row.split()[-3:] == ["0.0001", "ok", "0.5"]  # bound, verdict, then the informative relative error
    exact = next(line for line in lines if line.startswith("prune"))
    assert exact.split()[-2:] == ["exact", "ok"]


def test_viz_creates_the_output_directory(tmp_path, monkeypatch, capsys, tiny_llava):
    import edgeprune.models.loader as loader

    monkeypatch.setattr(loader, "load_model", lambda name, **kw: tiny_llava)
    monkeypatch.chdir(tmp_path)
    assert main(["viz", "--model", "tiny-llava", "--method", "uniform", "--tokens", "16", "--size", "64",
                 "--out", "docs/sub/kept.png"]) == 0
    assert (tmp_path / "docs" / "sub" / "kept.png").stat().st_size > 0
    assert "wrote docs/sub/kept.png" in capsys.readouterr().out
