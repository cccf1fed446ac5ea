"""Export: the exact top-K lowering (adversarial ties), the bundle layout and manifest (GridPrune's guidance and
CLIP tokenizer, the fused-op prune graphs, the in-LLM prefill/decode graphs), reuse (never across CLIPs), and
every refusal (K > N, existing output, unsupported method/opset, ratio on NeXT, budgets a method does not take)
leaving no output directory behind."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from edgeprune.errors import BudgetError, MethodArgumentError
from edgeprune.export import graphs as G
from edgeprune.export.exporter import export_bundle, export_graph
from edgeprune.export.job import GraphJob
from edgeprune.bundle.format import FORMAT_VERSION, MANIFEST, sha256_file
from edgeprune.bundle.spec import GraphSpec
from edgeprune.errors import ExportError
from edgeprune.export.spec import prune_spec
from edgeprune.export.wrappers import PruneGraph, stable_topk_lowering, uniform_indices_lowering
from edgeprune.methods import functional as F
from edgeprune.methods.fitprune_recipe import Recipe, save_recipe
from edgeprune.runtime.preprocess import ImageConfig

K = 64
QUIET = {"log": lambda msg: None}


class _Lazy(dict):
    """name -> bundle, exported on first use (a test that needs only cls-topk does not wait for the others)."""

    def __init__(self, make):
        super().__init__()
        self.make = make

    def __missing__(self, name):
        self[name] = self.make(name)
        return self[name]


@pytest.fixture(scope="module")
def bundles(exported_bundle, tiny_llava, tiny_recipe):
    """The session's bundles (tests/conftest.py): cls-topk in full, the others reusing its model graphs."""
    specs = {"cls-topk": ("cls-topk", K), "none": ("none", None), "uniform": ("uniform", 100),
             "gridprune": ("gridprune", K), "gprune": ("gprune", K), "fastv": ("fastv", K),
             "fitprune": ("fitprune", None, {"recipe": str(tiny_recipe)})}
    return _Lazy(lambda name: exported_bundle(tiny_llava, *specs[name]))


def tie_cases(n, rng):
    """Score rows designed to break an unstable top-K: all equal, two levels, +-0, a coarse grid, distinct."""
    rows = [np.zeros(n), np.where(np.arange(n) % 3 == 0, 1.0, 0.5), np.where(np.arange(n) % 2 == 0, 0.0, -0.0),
            rng.integers(0, 4, n) / 4, np.repeat(rng.standard_normal((n + 7) // 8), 8)[:n], rng.standard_normal(n)]
    return np.stack(rows).astype(np.float32)


# ----------------------------------------------------------------------------------- lowerings (no export)
@pytest.mark.parametrize("n,k", [(1, 1), (7, 1), (7, 7), (40, 5), (576, 64), (576, 576)])
def test_stable_topk_lowering_equals_reference_on_ties(n, k):
    scores = torch.from_numpy(tie_cases(n, np.random.default_rng(n + k)))
    assert torch.equal(stable_topk_lowering(scores, k), F.stable_topk(scores, k))


def test_uniform_lowering_is_exact_integer_arithmetic():
    for n in (576, 577, 1000, 2351, 2880):
        for k in (1, 3, 64, 100, 575, n):
            if k <= n:
                assert torch.equal(uniform_indices_lowering(n, k), F.uniform_indices(n, k)), (n, k)


# ----------------------------------------------------------------------------------- lowerings in ONNX Runtime
def test_onnx_topk_graph_keeps_ties_to_the_lower_index(tmp_path):
    """A dynamic-N prune graph: K = N, K < N and heavy ties through ONNX TopK/CumSum (K = 1: the torch test)."""
    k = 3
    spec = prune_spec(None, k, 4, uses_scores=True)
    rng = np.random.default_rng(k)
    job = GraphJob("prune", PruneGraph(k, "topk"), spec,
                   spec.dummy_inputs({"batch": 2, "n": 12}), [], mins={"n": k})
    export_graph(job, tmp_path / "prune.onnx", 18)
    sess = ort.InferenceSession(str(tmp_path / "prune.onnx"), providers=["CPUExecutionProvider"])
    for n in (k, k + 1, 40, 300):
        scores = tie_cases(n, rng)
        feats = rng.standard_normal((len(scores), n, 4)).astype(np.float32)
        kept, idx = sess.run(None, {"features": feats, "cls_attn": scores})
        ref = F.stable_topk(torch.from_numpy(scores), k).numpy()
        assert idx.dtype == np.int32 and np.array_equal(idx, ref), n
        assert np.array_equal(kept, np.take_along_axis(feats, ref[..., None], axis=1))


def test_bundle_prune_graph_matches_reference(bundles):
    sess = ort.InferenceSession(str(bundles["cls-topk"] / "prune.onnx"), providers=["CPUExecutionProvider"])
    scores = tie_cases(576, np.random.default_rng(0))
    feats = np.random.default_rng(1).standard_normal((len(scores), 576, 64)).astype(np.float32)
    _, idx = sess.run(None, {"features": feats, "cls_attn": scores})
    assert np.array_equal(idx, F.stable_topk(torch.from_numpy(scores), K).numpy())


# ----------------------------------------------------------------------------------- bundle layout
def test_manifest_describes_the_bundle(bundles, tiny_llava):
    root = bundles["cls-topk"]
    m = json.loads((root / MANIFEST).read_text())
    assert m["format_version"] == FORMAT_VERSION and m["opset"] == 18
    assert m["method"] | {"params": None} == {"name": "cls-topk", "params": None, "positions": "compact",
                                               "placement": "pre_llm", "uses_budget": True, "k": K, "n": 576,
                                               "n_max": 576, "lowering": "topk", "guidance": None,
                                               "fused_op": None, "in_llm": None}
    assert set(m["graphs"]) == {"vision", "prune", "embed", "decoder"}
    on_disk = sorted(p.name for p in root.iterdir() if p.name != MANIFEST)
    assert sorted(m["files"]) == on_disk and "tokenizer.json" in on_disk
    assert all(sha256_file(root / f) == h for f, h in m["files"].items())
    for name, g in m["graphs"].items():
        variant = [f"{name}.ort.onnx"] if name == "decoder" else []  # weights shared: no sidecar of its own
        assert g["files"] == [f"{name}.onnx", f"{name}.onnx.data", *variant] and g["max_abs_err"] < 1e-4
        proto = onnx.load(str(root / g["file"]), load_external_data=False)
        assert [i.name for i in proto.graph.input] == GraphSpec.from_dict(g["spec"]).input_names
        assert any(o.version == 18 for o in proto.opset_import if o.domain in ("", "ai.onnx"))
        names = [n.name for n in proto.graph.node]
        assert len(set(names)) == len(names) and all(n.startswith(f"/{name}/") for n in names)
    assert any(n.name.startswith("/decoder/lm/layers.3/self_attn/") for n in proto.graph.node)
    assert ImageConfig.from_dict(m["preprocessing"]) == tiny_llava.image_config
    assert m["prompt"]["image_token_id"] == tiny_llava.image_token_id and m["max_positions"] == 4096
    assert m["vision"]["patch_grid"] == [24, 24] and m["vision"]["grid_pinpoints"] is None
    assert m["libraries"]["torch"] == torch.__version__ and m["model"]["fingerprint"]
    assert (root.stat().st_mode & 0o777) != 0o700  # not left private like the temporary directory


def test_decoder_variant_fuses_attention_and_shares_the_weights(bundles):
    """decoder.onnx: opset 18, eager-attention pattern without the SDPA NaN guard; decoder.ort.onnx: opset 23 with
    the fused Attention op, every weight read from decoder.onnx.data, same outputs."""
    root = bundles["cls-topk"]
    entry = json.loads((root / MANIFEST).read_text())["graphs"]["decoder"]
    variant = entry["variants"]["ort"]
    assert variant["file"] == "decoder.ort.onnx" and variant["opset"] == 23 and variant["max_abs_err"] < 1e-4
    assert variant["data_files"] == ["decoder.onnx.data"] and not (root / "decoder.ort.onnx.data").exists()
    portable = onnx.load(str(root / "decoder.onnx"), load_external_data=False)
    fused = onnx.load(str(root / "decoder.ort.onnx"), load_external_data=False)
    ops = lambda proto: {n.op_type for n in proto.graph.node}  # noqa: E731
    assert "Softmax" in ops(portable) and not {"IsNaN", "Attention"} & ops(portable)
    assert "Attention" in ops(fused) and "Softmax" not in ops(fused)
    locations = {e.value for t in fused.graph.initializer for e in t.external_data if e.key == "location"}
    assert locations == {"decoder.onnx.data"}
    spec = GraphSpec.from_dict(entry["spec"])
    feeds = spec.dummy_inputs({"batch": 1, "seq": 9, "past": 4, "total": 13}, seed=3,
                              overrides={"attention_mask": np.ones((1, 13), np.int64),
                                         "position_ids": np.arange(4, 13)[None]})
    outs = [ort.InferenceSession(str(root / f), providers=["CPUExecutionProvider"]).run(None, feeds)
            for f in ("decoder.onnx", "decoder.ort.onnx")]
    for a, b in zip(*outs):
        assert a.shape == b.shape and np.abs(a - b).max() < 1e-4


def test_share_external_data_keeps_only_tensors_without_a_twin(tmp_path):
    """A variant with one tensor equal to the base's (under another name) and one new: the first points into
    the base's sidecar, the second stays in a rewritten sidecar of its own; the model still runs."""
    from onnx import TensorProto as T, helper, numpy_helper

    from edgeprune.export.ort_variant import share_external_data

    a = np.arange(6, dtype=np.float32).reshape(2, 3)
    b = np.full((2, 3), 7, np.float32)

    def save(name, tensors):
        inits = [numpy_helper.from_array(v, k) for k, v in tensors.items()]
        nodes = [helper.make_node("Add", ["x", k], [f"y{i}"]) for i, k in enumerate(tensors)]
        graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", T.FLOAT, [2, 3])],
                                  [helper.make_tensor_value_info(f"y{i}", T.FLOAT, [2, 3]) for i in range(len(nodes))],
                                  inits)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=10)
        onnx.save(model, str(tmp_path / name), save_as_external_data=True, location=f"{name}.data",
                  size_threshold=0)

    save("base.onnx", {"w": a})
    save("var.onnx", {"renamed": a, "new": b})
    assert share_external_data(tmp_path / "var.onnx", tmp_path / "base.onnx") == ["base.onnx.data", "var.onnx.data"]
    assert (tmp_path / "var.onnx.data").stat().st_size == b.nbytes  # only the tensor without a twin
    x = np.ones((2, 3), np.float32)
    y0, y1 = ort.InferenceSession(str(tmp_path / "var.onnx"), providers=["CPUExecutionProvider"]).run(None, {"x": x})
    assert np.array_equal(y0, x + a) and np.array_equal(y1, x + b)


def test_llm_attention_is_restored_after_a_failed_export(tiny_llava):
    from edgeprune.export.ort_variant import llm_attention

    lm = tiny_llava.family.language_model(tiny_llava.model)
    before = lm.config._attn_implementation
    with pytest.raises(RuntimeError), llm_attention(lm, 18):
        assert lm.config._attn_implementation == "eager"
        raise RuntimeError("the exporter failed")
    assert lm.config._attn_implementation == before
    with llm_attention(lm, 23):
        assert lm.config._attn_implementation == before  # SDPA lowers to the fused op at opset 23


@pytest.mark.slow  # a second full export (no reuse)
def test_no_ort_variant_writes_the_portable_decoder_only(tmp_path, tiny_llava):
    out = tmp_path / "b"
    m = export_bundle(tiny_llava, "none", out_dir=out, ort_variant=False, **QUIET)
    assert "variants" not in m["graphs"]["decoder"] and not (out / "decoder.ort.onnx").exists()


def test_reuse_links_model_graphs_and_exports_the_prune_graph(bundles):
    none = json.loads((bundles["none"] / MANIFEST).read_text())
    uni = json.loads((bundles["uniform"] / MANIFEST).read_text())
    assert set(none["graphs"]) == {"vision", "embed", "decoder"} and none["method"]["k"] is None
    assert all("reused_from" in g for g in none["graphs"].values())
    assert "reused_from" not in uni["graphs"]["prune"] and uni["method"]["lowering"] == "const"
    cls = json.loads((bundles["cls-topk"] / MANIFEST).read_text())
    assert uni["files"]["decoder.onnx.data"] == cls["files"]["decoder.onnx.data"]


def _manifest(root):
    return json.loads((root / MANIFEST).read_text())


def test_gridprune_bundle_records_its_guidance(bundles):
    """CLIP guidance: vision adds clip_embeds, the CLIP text tower is guidance.onnx, its tokenizer ships in a
    hashed subdirectory; the prune graph is one file holding the ZonalTopK function."""
    root = bundles["gridprune"]
    m = _manifest(root)
    assert list(m["graphs"]) == ["vision", "guidance", "prune", "embed", "decoder"]
    assert m["method"]["guidance"] == "clip" and m["method"]["fused_op"] == "ZonalTopK"
    g = m["guidance"]
    assert (g["source"], g["clip"], g["context"]) == ("clip", "tiny-clip", 77)
    assert g["tokenizer"] in m["files"] and (root / g["tokenizer"]).is_file()
    vision = GraphSpec.from_dict(m["graphs"]["vision"]["spec"])
    assert vision.output_names == ["features", "cls_attn", "clip_embeds"]
    assert "reused_from" not in m["graphs"]["vision"] and "reused_from" in m["graphs"]["decoder"]
    assert m["graphs"]["vision"]["clip_fingerprint"] == g["fingerprint"] == m["graphs"]["guidance"]["clip_fingerprint"]
    prune = m["graphs"]["prune"]
    assert prune["files"] == ["prune.onnx"] and prune["num_zones"] == 16
    assert GraphSpec.from_dict(prune["spec"]).input_names == ["features", "cls_attn", "guidance", "clip_embeds"]
    proto = onnx.load(str(root / "prune.onnx"))
    assert [f.name for f in proto.functions] == ["ZonalTopK"]
    assert {n.op_type for n in proto.graph.node if n.domain == "edgeprune"} == {"ZonalTopK"}


@pytest.mark.slow  # FastV and FitPrune prefill/decoder exports
def test_gprune_and_in_llm_bundles(bundles):
    gp = _manifest(bundles["gprune"])
    assert gp["method"]["fused_op"] == "GraphRank" and gp["graphs"]["prune"]["num_groups"] == 1
    assert gp["method"]["guidance"] is None and gp["guidance"] is None
    fastv, fit = _manifest(bundles["fastv"]), _manifest(bundles["fitprune"])
    for m in (fastv, fit):
        assert list(m["graphs"]) == ["vision", "embed", "prefill", "decoder"] and m["method"]["placement"] == "in_llm"
        dec = GraphSpec.from_dict(m["graphs"]["decoder"]["spec"])
        assert "attention_mask" not in dec.input_names and dec.symbols()[1:] == [f"past_{i}" for i in range(4)]
        assert GraphSpec.from_dict(m["graphs"]["prefill"]["spec"]).output_names[-1] == "kept_positions"
    assert fastv["method"]["in_llm"] == {"kind": "fastv", "layer": 2, "keep": K} and fastv["method"]["k"] == K
    assert fit["method"]["in_llm"] == {"kind": "fitprune", "drops": [100, 200, 0, 50], "n_ref": 576}
    assert fit["method"]["k"] is None and fit["graphs"]["prefill"]["in_llm"] == fit["method"]["in_llm"]
    assert "reused_from" in fit["graphs"]["decoder"] and "reused_from" not in fit["graphs"]["prefill"]
    assert fit["files"]["decoder.onnx.data"] == fastv["files"]["decoder.onnx.data"]


@pytest.mark.slow  # two more GridPrune exports
def test_clip_graphs_are_reused_only_from_the_same_clip(bundles, tiny_llava, tmp_path):
    from edgeprune.models.clip_guidance import build_tiny_clip

    same = export_bundle(tiny_llava, "gridprune", tokens=32, out_dir=tmp_path / "same", reuse_from=bundles["gridprune"],
                         **QUIET)
    assert all("reused_from" in same["graphs"][g] for g in ("vision", "guidance", "embed", "decoder"))
    other = export_bundle(tiny_llava, "gridprune", tokens=32, out_dir=tmp_path / "other",
                          clip=build_tiny_clip(tiny_llava.config.vision_config, seed=99),
                          reuse_from=bundles["gridprune"], **QUIET)
    assert not any("reused_from" in other["graphs"][g] for g in ("vision", "guidance"))
    assert other["guidance"]["fingerprint"] != same["guidance"]["fingerprint"]


# ----------------------------------------------------------------------------------- refusals
def _nothing_written(parent, name):
    return not (parent / name).exists() and not [p for p in parent.iterdir() if p.name.startswith(f".{name}.")]


def test_k_larger_than_n_writes_nothing(tiny_llava, tmp_path):
    with pytest.raises(BudgetError, match="577"):
        export_bundle(tiny_llava, "cls-topk", tokens=577, out_dir=tmp_path / "b", **QUIET)
    with pytest.raises(BudgetError, match="--tokens K or --ratio"):
        export_bundle(tiny_llava, "uniform", out_dir=tmp_path / "b", **QUIET)
    assert _nothing_written(tmp_path, "b")


@pytest.mark.parametrize("kwargs,match", [({"method": "gprune", "tokens": 64}, "no ONNX lowering"),
                                          ({"method": "none", "opset": 17}, "opset"),
                                          ({"method": "none", "dtype": "bf16"}, "dtype")])
def test_unsupported_requests_are_typed_errors(kwargs, match, tiny_llava, tmp_path, monkeypatch):
    monkeypatch.setattr(G, "LOWERED", tuple(m for m in G.LOWERED if m != "gprune"))  # a method without lowering
    with pytest.raises(ExportError, match=match):
        export_bundle(tiny_llava, out_dir=tmp_path / "b", **kwargs, **QUIET)
    assert _nothing_written(tmp_path, "b")


@pytest.mark.parametrize("kwargs,error,match", [
    ({"method": "fastv", "tokens": 64, "method_args": {"layer": "9"}}, MethodArgumentError, "exceeds"),
    ({"method": "fitprune", "tokens": 64, "method_args": {"recipe": "r.json"}}, BudgetError, "recipe sets"),
    ({"method": "none", "tokens": 64}, BudgetError, "keeps every token"),
    ({"method": "gridprune"}, BudgetError, "--tokens K or --ratio")])
def test_method_arguments_and_budgets_are_checked_before_writing(kwargs, error, match, tiny_llava, tmp_path):
    if "recipe" in kwargs.get("method_args", {}):
        save_recipe(Recipe(budget=0.5, n_visual=576, num_layers=4, drops=(1, 2, 3, 4)), tmp_path / "r.json")
        kwargs["method_args"] = {"recipe": str(tmp_path / "r.json")}
    with pytest.raises(error, match=match):
        export_bundle(tiny_llava, out_dir=tmp_path / "b", **kwargs, **QUIET)
    assert _nothing_written(tmp_path, "b")


def test_existing_output_needs_force_and_must_be_a_bundle(bundles, tiny_llava, tmp_path):
    with pytest.raises(ExportError, match="--force"):
        export_bundle(tiny_llava, "none", out_dir=bundles["none"], **QUIET)
    other = tmp_path / "not-a-bundle"
    other.mkdir()
    (other / "keep.txt").write_text("precious")
    with pytest.raises(ExportError, match="not an edgeprune bundle"):
        export_bundle(tiny_llava, "none", out_dir=other, force=True, **QUIET)
    assert (other / "keep.txt").read_text() == "precious"


def test_reuse_refuses_another_dtype(bundles, tmp_path):
    with pytest.raises(ExportError, match="dtype"):
        export_bundle("tiny-llava", "none", out_dir=tmp_path / "b", dtype="fp16", reuse_from=bundles["none"], **QUIET)
    assert _nothing_written(tmp_path, "b")


def test_next_needs_tokens_and_a_data_dependent_method(tiny_llava_next, tmp_path):
    with pytest.raises(ExportError, match="--tokens"):
        export_bundle(tiny_llava_next, "cls-topk", ratio=0.1, out_dir=tmp_path / "b", **QUIET)
    with pytest.raises(ExportError, match="fixed N"):
        export_bundle(tiny_llava_next, "random", tokens=64, out_dir=tmp_path / "b", **QUIET)
    with pytest.raises(BudgetError, match="--tokens K"):  # FastV's 50 % default needs a fixed N
        export_bundle(tiny_llava_next, "fastv", out_dir=tmp_path / "b", **QUIET)
    assert _nothing_written(tmp_path, "b")


# ----------------------------------------------------------------------------------- CLI
def _cli(monkeypatch, capsys, *argv):
    from edgeprune import cli

    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_export_help_happy_path_and_errors(bundles, monkeypatch, capsys, tmp_path):
    with pytest.raises(SystemExit) as exc:
        _cli(monkeypatch, capsys, "export", "--help")
    assert exc.value.code == 0 and "usage: edgeprune export" in capsys.readouterr().out
    out_dir = tmp_path / "cli-bundle"
    code, out, err = _cli(monkeypatch, capsys, "export", "--model", "tiny-llava", "--method", "uniform", "--ratio",
                          "0.25", "--out", str(out_dir), "--reuse", str(bundles["cls-topk"]))
    assert code == 0, err
    assert "K = 144" in out and "[2/4] prune" in err
    assert json.loads((out_dir / MANIFEST).read_text())["method"]["k"] == 144
    code, _, err = _cli(monkeypatch, capsys, "export", "--method", "cls-topk", "--tokens", "600", "--out",
                        str(tmp_path / "bad"))
    assert code == 2 and err.count("\n") == 1 and "error:" in err
    code, _, err = _cli(monkeypatch, capsys, "export", "--method", "none", "--out", str(out_dir))
    assert code == 2 and "--force" in err
    assert _nothing_written(tmp_path, "bad")



def test_fingerprint_ignores_save_bookkeeping_but_not_weights(tmp_path):
    """save_pretrained rewrites config bookkeeping (architectures, _name_or_path, ...): same weights, same print."""
    import torch

    from edgeprune.export.exporter import model_fingerprint
    from edgeprune.models.loader import load_model

    loaded = load_model("tiny-llava")
    before = model_fingerprint(loaded.model)
    loaded.model.save_pretrained(tmp_path / "m")
    assert model_fingerprint(loaded.model) == before
    with torch.no_grad():
        loaded.model.lm_head.weight[0, 0] += 1.0
    assert model_fingerprint(loaded.model) != before


@pytest.mark.slow  # a second full export (no reuse)
def test_a_failing_variant_is_skipped_not_fatal(tmp_path, tiny_llava, monkeypatch):
    """The fused decoder is an optimisation: when its export fails the bundle keeps the portable decoder, says
    why in the manifest and the log, and leaves no partial variant file."""
    import edgeprune.export.exporter as E

    real = E.export_graph

    def fail_at_23(job, path, opset):
        if opset == 23:
            path.write_bytes(b"partial")
            raise ExportError("exporting the decoder graph failed: simulated")
        real(job, path, opset)

    monkeypatch.setattr(E, "export_graph", fail_at_23)
    lines = []
    m = export_bundle(tiny_llava, "none", out_dir=tmp_path / "b", log=lines.append)
    entry = m["graphs"]["decoder"]
    assert "variants" not in entry and "simulated" in entry["variants_skipped"]["ort"]
    assert not list((tmp_path / "b").glob("decoder.ort.onnx*")) and "decoder.ort.onnx" not in m["files"]
    assert any("decoder.ort.onnx skipped" in line for line in lines)
