"""FitPrune: statistics and drop rules, recipe JSON (round trip, validation, rescaling), the α search, online
pruning against eager HF attentions, generation, and ``edgeprune fit-recipe`` (happy paths and bad inputs)."""

from __future__ import annotations

import argparse
import json
import os

import numpy as np
import pytest
import torch

from edgeprune import calibrate as C
from edgeprune.cli import fit_recipe as cli
from edgeprune.errors import BudgetError, EdgepruneError, ImageError, MethodArgumentError
from edgeprune.methods import inllm
from edgeprune.methods import fitprune_fn as F
from edgeprune.methods import fitprune_recipe as R
from edgeprune.methods.fitprune import FitPrune, FitPruneParams

from _inllm_inputs import eager_attentions, unpruned_inputs  # noqa: E402  (shared test helper)


def _recipe(drops, n=576, **kw):
    return R.Recipe(budget=0.5, n_visual=n, num_layers=len(drops), drops=tuple(drops), **kw)


def _run(loaded, image, recipe):
    embeds, pos, vs, t, prunable, n = unpruned_inputs(loaded, image)
    lm = loaded.family.language_model(loaded.model)
    return lm, inllm.prefill(lm, embeds, pos, vs, t, FitPrune(recipe=recipe).layer_plan(n, len(lm.layers)), prunable)


def _cli(*argv):
    parser = argparse.ArgumentParser(prog="edgeprune")
    cli.add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["fit-recipe", *argv])
    return args.func(args)


# ---------------------------------------------------------------------------------------------- pure functions


def test_statistics_and_drop_rules():
    probs = torch.zeros(2, 4, 5)  # H=2, rows 1..4 of a 5-token sequence, visual tokens at columns 1, 2
    probs[0, :, 1] = torch.tensor([0.2, 0.4, 0.1, 0.6])
    probs[1, :, 1] = torch.tensor([0.3, 0.1, 0.5, 0.2])
    probs[0, :, 2] = torch.tensor([0.0, 0.3, 0.2, 0.2])
    cross, self_ = F.cross_self(probs, visual_start=1, n=2)
    torch.testing.assert_close(self_, torch.tensor([(0.3 + 0.4) / 2, (0.0 + 0.3) / 2]))  # head max, visual rows
    torch.testing.assert_close(cross, torch.tensor([(0.5 + 0.6) / 2, (0.2 + 0.2) / 2]))  # head max, text rows
    assert F.lowest_first(torch.tensor([0.2, 0.1, 0.1, 0.3])).tolist() == [2, 1, 0, 3]  # tie: higher index first
    v = torch.tensor([0.1, 0.4, 0.2, 0.3])
    assert F.mass_drop_count(v, 0.75) == 1 and F.mass_drop_count(v, 0.7) == 2
    assert F.mass_drop_count(v, 0.0) == 4 and F.mass_drop_count(v, 1.5) == 0
    mask = F.mass_drop_mask(v, torch.tensor([True, True, False, True]), 0.4)  # 0.2 is protected
    assert mask.tolist() == [True, False, False, True]


def test_flops_model_and_counts():
    fm = R.FlopsModel(d=4096, d_ff=11008, num_layers=32)
    n = 576
    assert fm.full(n) == 32 * (4 * n * 4096 ** 2 + 2 * n * n * 4096 + 3 * n * 4096 * 11008)
    assert fm.of_counts([n] * 32, n) == fm.full(n)
    assert R.counts_after_drops(10, 8, [3, 0, 9, 1]) == ([10, 7, 7, 2], 2)  # at most the prunable 8 go
    assert fm.to_dict()["d_ff"] == 11008


def test_recipe_round_trip_rescale_and_atomic_write(tmp_path):
    rec = _recipe([100, 50, 3, 0], alpha=0.25, flops_ratio=0.4, model="tiny-llava", samples=3,
                  flops_model=R.FlopsModel(64, 176, 4).to_dict())
    path = tmp_path / "r.json"
    R.save_recipe(rec, path)
    assert R.load_recipe(path) == rec and os.listdir(tmp_path) == ["r.json"]
    data = json.loads(path.read_text())
    assert data["format"] == R.FORMAT and data["drops"] == [100, 50, 3, 0] and data["num_layers"] == 4
    assert rec.scaled_drops(576) == [100, 50, 3, 0]
    assert rec.scaled_drops(1152) == [200, 100, 6, 0]
    assert rec.scaled_drops(500) == [86, 43, 2, 0]  # integer truncation


@pytest.mark.parametrize("patch,match", [
    ({"format": "other/1"}, "format"), ({"drops": [1, 2, 3]}, "num_layers"), ({"drops": [1, -2, 0, 0]}, ">= 0"),
    ({"drops": [300, 300, 0, 0]}, "more than"), ({"drops": [1.5, 0, 0, 0]}, "integers"),
    ({"budget": 1.0}, "budget"), ({"n_visual": 0}, "n_visual"), ({"num_layers": None}, "num_layers"),
])
def test_recipe_validation_errors(patch, match, tmp_path):
    data = {**_recipe([1, 2, 3, 4]).to_json(), **patch}
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(data))
    with pytest.raises(MethodArgumentError, match=match):
        R.load_recipe(path)


def test_missing_corrupt_and_wrong_depth_recipes(tmp_path):
    with pytest.raises(MethodArgumentError, match="fit-recipe"):
        R.load_recipe(tmp_path / "nope.json")
    (tmp_path / "c.json").write_text("{not json")
    with pytest.raises(MethodArgumentError, match="not valid JSON"):
        FitPrune.from_args({"recipe": str(tmp_path / "c.json")})
    with pytest.raises(MethodArgumentError, match="fit-recipe"):
        FitPrune()
    with pytest.raises(MethodArgumentError, match="32"):
        FitPrune(recipe=_recipe([0, 0, 0, 0])).layer_plan(576, 32)


def test_search_alpha_finds_the_smallest_reaching_alpha():
    calls = []

    def sim(a):
        calls.append(a)
        return a >= 0.3, a

    alpha, reached, result = R.search_alpha(sim)
    assert reached and 0.3 <= alpha < 0.31 and result == alpha and len(calls) == 7
    alpha, reached, _ = R.search_alpha(lambda a: (False, None))
    assert alpha == 1.0 and not reached
    assert R.mean_drops(np.array([[3, 1], [4, 2]]), [576, 576], 576) == [3, 1]
    assert R.mean_drops(np.array([[10, 0], [20, 0]]), [576, 1152], 1152) == [20, 0]  # rescaled to N = 1152


# ---------------------------------------------------------------------------------------------- online


def test_class_attributes():
    assert (FitPrune.name, FitPrune.placement, FitPrune.default_positions) == ("fitprune", "in_llm", "original")
    assert "2409.10197" in FitPrune.paper and not FitPrune.uses_budget
    m = FitPrune(FitPruneParams(recipe="x.json"), recipe=_recipe([1, 0, 0, 0]))
    assert m.positions == "original" and m.describe_params()["recipe_drops"] == [1, 0, 0, 0]


@pytest.mark.parametrize("fixture", ["tiny_llava", "tiny_llava_next"])
def test_zero_recipe_equals_unpruned(fixture, request, rgb_image):
    loaded = request.getfixturevalue(fixture)
    embeds, pos, vs, t, prunable, _ = unpruned_inputs(loaded, rgb_image)
    lm, state = _run(loaded, rgb_image, _recipe([0, 0, 0, 0]))
    assert torch.equal(state.last_hidden, inllm.prefill(lm, embeds, pos, vs, t, None, prunable).last_hidden)
    assert state.visual_counts == [t] * 4


def test_drops_follow_recipe_and_match_eager_statistics(tiny_llava, rgb_image):
    embeds, pos, vs, t, _, _ = unpruned_inputs(tiny_llava, rgb_image)
    lm, state = _run(tiny_llava, rgb_image, _recipe([10, 20, 0, 5]))
    assert state.visual_counts == [576, 566, 546, 546] and state.visual_kept.numel() == 541
    assert state.position_ids[0, vs:vs + 541].tolist() == (vs + state.visual_kept).tolist()
    attentions = eager_attentions(tiny_llava, lm, embeds, pos)
    a = attentions[0][0].amax(0)  # layer 0 of the unpruned model is what the plan saw
    cross = a[vs + t:, vs:vs + t].mean(0)
    self_ = a[vs:vs + t, vs:vs + t].mean(0)
    expected = F.lowest_first(cross * self_)[:10]
    assert sorted(torch.nonzero(state.visual_depth == 1).flatten().tolist()) == sorted(expected.tolist())


def test_next_rescales_recipe_and_keeps_newlines(tiny_llava_next, rgb_image):
    _, _, _, t, prunable, n = unpruned_inputs(tiny_llava_next, rgb_image)
    recipe = _recipe([100, 0, 50, 0], n=576)  # fitted for 576 tokens, applied to N = 1344
    a, b = 100 * n // 576, 50 * n // 576
    assert n == 1344 and recipe.scaled_drops(n) == [a, 0, b, 0] == [233, 0, 116, 0]
    _, state = _run(tiny_llava_next, rgb_image, recipe)
    assert state.visual_counts == [t, t - a, t - a, t - a - b]
    assert set(np.flatnonzero(~prunable.numpy()).tolist()) <= set(state.visual_kept.tolist())


@pytest.mark.parametrize("fixture", ["tiny_llava", "tiny_llava_next"])
def test_generation_runs_to_completion(fixture, request, rgb_image):
    loaded = request.getfixturevalue(fixture)
    _, pos, *_ = unpruned_inputs(loaded, rgb_image)
    lm, state = _run(loaded, rgb_image, _recipe([200, 150, 100, 50]))
    head, embed = loaded.family.lm_head(loaded.model), loaded.family.embed_tokens(loaded.model)
    tokens, p, hidden = [], int(pos[-1]) + 1, state.last_hidden
    with torch.no_grad():
        for step in range(6):
            tokens.append(int(head(hidden).argmax()))
            hidden = inllm.decode_step(lm, state, embed(torch.tensor([[tokens[-1]]])), p + step)
    assert len(tokens) == 6 and torch.isfinite(hidden).all()
    assert state.cache_lengths[0] > state.cache_lengths[1] > state.cache_lengths[2] > state.cache_lengths[3]


# ---------------------------------------------------------------------------------------------- fit-recipe


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    """``edgeprune fit-recipe --budget 0.5 --calib generated:2`` on tiny-llava."""
    out = tmp_path_factory.mktemp("recipe") / "recipe.json"
    assert _cli("--model", "tiny-llava", "--budget", "0.5", "--calib", "generated:2", "--out", str(out)) == 0
    return out


def test_fit_recipe_meets_budget_on_its_calibration_set(fitted, tiny_llava):
    data = json.loads(fitted.read_text())
    assert {"format", "budget", "n_visual", "num_layers", "drops", "alpha", "flops_model", "flops_ratio",
            "model", "samples"} <= set(data)
    assert (data["budget"], data["n_visual"], data["num_layers"], data["samples"]) == (0.5, 576, 4, 2)
    assert data["model"] == "tiny-llava" and 0.0 < data["alpha"] <= 1.0 and sum(data["drops"]) > 0
    recipe = R.load_recipe(fitted)
    fm = R.FlopsModel(**{k: data["flops_model"][k] for k in ("d", "d_ff", "num_layers")})
    assert (fm.d, fm.d_ff) == (64, 176)
    samples = C.encode_calibration(tiny_llava, R.load_calib_images(R.generated_items(2)))
    lm = tiny_llava.family.language_model(tiny_llava.model)
    used = full = 0.0
    for s in samples:  # apply the recipe online to the same set and count FLOPs from the real per-layer counts
        plan = FitPrune(recipe=recipe).layer_plan(s.n_prunable, 4)
        st = inllm.prefill(lm, s.embeds, s.position_ids, s.visual_start, s.visual_count, plan, s.prunable)
        assert st.visual_counts == R.counts_after_drops(576, 576, recipe.drops)[0]
        used += fm.of_counts(st.visual_counts, st.visual_kept.numel())
        full += fm.full(s.visual_count)
    assert used / full == pytest.approx(data["flops_ratio"])
    assert used / full <= 1 - 0.5


def test_fit_recipe_jsonl_happy_path_and_force(fitted, tmp_path, rgb_image):
    rgb_image.save(tmp_path / "a.png")
    calib = tmp_path / "calib.jsonl"
    calib.write_text(json.dumps({"image": "a.png", "prompt": "What is it?"}) + "\n\n"
                     + json.dumps({"image": "missing.png", "prompt": "x"}) + "\n")
    out = tmp_path / "r.json"
    assert _cli("--budget", "0.4", "--calib", str(calib), "--out", str(out), "--samples", "1") == 0
    assert R.load_recipe(out).samples == 1
    with pytest.raises(EdgepruneError, match="--force"):
        _cli("--budget", "0.4", "--calib", "generated:1", "--out", str(fitted))


@pytest.mark.parametrize("argv,err,match", [
    (["--budget", "0"], BudgetError, "budget"), (["--budget", "1"], BudgetError, "budget"),
    (["--budget", "-0.5"], BudgetError, "budget"), (["--calib", "generated:0"], EdgepruneError, "positive"),
    (["--calib", "generated:x"], EdgepruneError, "positive"), (["--calib", "NOFILE.jsonl"], EdgepruneError, "not found"),
    (["--samples", "0"], EdgepruneError, "--samples"),
])
def test_fit_recipe_badunpruned_inputs(argv, err, match, tmp_path):
    base = {"--budget": "0.5", "--calib": "generated:1", "--out": str(tmp_path / "out.json")}
    base.update(dict(zip(argv[::2], argv[1::2])))
    flat = [x for kv in base.items() for x in kv]
    with pytest.raises(err, match=match):
        _cli(*flat)
    assert not (tmp_path / "out.json").exists()


@pytest.mark.parametrize("lines,err,match", [
    (['{"image": "a.png", "prompt": "ok"}', "{bad"], EdgepruneError, ":2: not valid JSON"),
    (['{"image": "a.png"}'], EdgepruneError, "prompt"), (['["a.png", "q"]'], EdgepruneError, "image"),
    ([""], EdgepruneError, "no samples"), (['{"image": "gone.png", "prompt": "q"}'], ImageError, "gone.png"),
])
def test_fit_recipe_bad_calibration_files(lines, err, match, tmp_path, rgb_image):
    rgb_image.save(tmp_path / "a.png")
    calib = tmp_path / "calib.jsonl"
    calib.write_text("\n".join(lines) + "\n")
    with pytest.raises(err, match=match):
        _cli("--budget", "0.5", "--calib", str(calib), "--out", str(tmp_path / "out.json"))
    assert not (tmp_path / "out.json").exists()
