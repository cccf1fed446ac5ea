"""The fused-op lowerings through ONNX Runtime against the references, no model export needed.

``ZonalTopK`` (GridPrune) must give exactly ``gridprune_fn.gridprune_select``'s indices and
``allocate_quotas``' quotas, on random inputs and adversarial ties (equal zone relevances, all-equal scores,
+-0, saturated zones that trigger the cap/redistribute, padded empty zones of LLaVA-NeXT layouts, K = 1 and
K = N). ``GraphRank`` (G-Prune) must give ``gprune_fn.gprune_select``'s indices wherever the score gap exceeds
float32 noise, ties (duplicated tokens) to the lower index, with LLaVA-NeXT's two groups. The prune graphs are
``edgeprune``-domain nodes with the TensorRT plugin attributes, defined by model-local functions of standard ops.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from edgeprune.export.lower_gprune import GPruneReference, build_gprune_model, gprune_spec
from edgeprune.export.lower_gridprune import (OP, GridPruneReference, build_gridprune_model, gridprune_spec,
                                              zonal_topk_attributes, zonal_topk_function)
from edgeprune.export.onnx_builder import Builder, make_model, value_info
from edgeprune.methods import gprune_fn as GP
from edgeprune.methods import gridprune_fn as G
from edgeprune.methods.base import TokenLayout, VisualTokens
from edgeprune.methods.gprune import GPruneParams
from edgeprune.methods.gridprune import GridPrune, GridPruneParams
from edgeprune.runtime.anyres import pack_layout

PINS = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]
# ONNX ops the function bodies may use: standard ops only (no custom domain inside a body).
STANDARD = {"Add", "And", "Cast", "Constant", "Div", "Equal", "Exp", "Floor", "Gather", "Greater", "Less",
            "MatMul", "Max", "Min", "Mod", "Mul", "Not", "Or", "Range", "ReduceMax", "ReduceSum", "Shape", "Softmax",
            "Sqrt", "Squeeze", "Sub", "TopK", "Transpose", "Unsqueeze", "Where"}


def session(model):
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


def zonal_session(k, tau, num_zones):
    """A graph holding only the ZonalTopK node: (scores, relevance, zone) -> (kept_idx, quota)."""
    b = Builder("/test")
    attrs = zonal_topk_attributes(k, tau, 4, num_zones)
    b.op(OP, "scores", "relevance", b.cast("zone", "int32"), outputs=2, domain="edgeprune",
         out_names=["kept_idx", "quota"], **attrs)
    model = make_model("zonal", b, [value_info("scores", "float32", ["b", "n"]),
                                    value_info("relevance", "float32", ["b", "n"]), value_info("zone", "int64", ["n"])],
                       [value_info("kept_idx", "int32", ["b", k]), value_info("quota", "int32", ["b", num_zones])],
                       [zonal_topk_function(k, tau, 4, num_zones, 18)], 18)
    return session(model)


def next_layout(size, zones=4):
    """A real LLaVA-NeXT layout (prunable tokens only) and its zone ids."""
    lay = pack_layout(size, PINS, 336, 14)
    keep = lay.source >= 0
    layout = TokenLayout(view=lay.view[keep], row=lay.row[keep], col=lay.col[keep], group=lay.group[keep],
                         grid=(24, 24))
    return layout, G.zone_ids(layout, zones)


def tie_inputs(n, rng):
    """(relevance, cls_attn) rows built to tie: all equal, few levels, +-0, constant zones, random."""
    rel = [np.zeros(n), rng.integers(0, 3, n) / 4, np.where(np.arange(n) % 2, 0.0, -0.0),
           np.repeat(rng.integers(0, 2, (n + 35) // 36) / 2, 36)[:n], rng.uniform(-1, 1, n)]
    attn = [np.zeros(n), rng.integers(0, 4, n) / 4, np.ones(n), rng.integers(0, 2, n) / 1.0, rng.random(n)]
    return (torch.from_numpy(np.stack(rel).astype(np.float32)), torch.from_numpy(np.stack(attn).astype(np.float32)))


# ----------------------------------------------------------------------------------------------- ZonalTopK
@pytest.mark.parametrize("k,tau", [(1, 0.05), (64, 0.05), (64, 1.0), (200, 0.01), (575, 0.05), (576, 0.05)])
def test_zonal_topk_equals_reference_on_ties_llava(k, tau):
    """Quotas and indices bit-equal to the reference (tau = 0.01 saturates zones: cap/redistribute)."""
    layout = TokenLayout.single_view(24, 24)
    zone, z = G.zone_ids(layout, 4), G.num_zones(layout, 4)
    sess = zonal_session(k, tau, z)
    rng = np.random.default_rng(k)
    for alpha in (0.5, 0.3):
        rel, attn = tie_inputs(576, rng)
        scores = G.local_scores(rel, attn, alpha)
        kept, quota = sess.run(None, {"scores": scores.numpy(), "relevance": rel.numpy(), "zone": zone.numpy()})
        want_q = G.allocate_quotas(G.zone_mean(rel, zone, z), G.zone_sizes(zone, z), k, tau)
        assert np.array_equal(quota, want_q.numpy())
        assert np.array_equal(kept, G.gridprune_select(rel, attn, zone, z, k, alpha, tau).numpy())


@pytest.mark.parametrize("size", [(300, 400), (500, 260), (1000, 300), (336, 336)])
def test_zonal_topk_next_layouts_with_padded_zones(size):
    """Image-dependent zones (unpadded rows, whole empty crops) padded to 5 views x 16 zones: same result as the
    reference with its own ``num_views * 16``."""
    layout, zone = next_layout(size)
    n, z_ref = layout.n, G.num_zones(layout, 4)
    rng = np.random.default_rng(n)
    for k in (1, 160, n // 2, n):
        sess = zonal_session(k, 0.05, 5 * 16)
        rel, attn = tie_inputs(n, rng)
        scores = G.local_scores(rel, attn, 0.5)
        kept, _ = sess.run(None, {"scores": scores.numpy(), "relevance": rel.numpy(), "zone": zone.numpy()})
        assert np.array_equal(kept, G.gridprune_select(rel, attn, zone, z_ref, k, 0.5, 0.05).numpy()), (size, k)


def test_zonal_topk_random_inputs_many_seeds():
    layout = TokenLayout.single_view(24, 24)
    zone = G.zone_ids(layout, 4)
    sess = zonal_session(64, 0.05, 16)
    gen = torch.Generator().manual_seed(0)
    for _ in range(20):
        rel = torch.rand(4, 576, generator=gen) * 0.5 - 0.1  # CLIP-like compressed cosines
        attn = torch.rand(4, 576, generator=gen) ** 4
        scores = G.local_scores(rel, attn, 0.5)
        kept, _ = sess.run(None, {"scores": scores.numpy(), "relevance": rel.numpy(), "zone": zone.numpy()})
        assert np.array_equal(kept, G.gridprune_select(rel, attn, zone, 16, 64, 0.5, 0.05).numpy())


@pytest.mark.parametrize("clip", [True, False])
def test_gridprune_graph_equals_method(clip):
    """The whole prune graph (relevance, local scores, ZonalTopK, gather) against ``GridPrune.select``,
    with one-hot embeddings so relevances are exactly 0/1 and tie everywhere."""
    params = GridPruneParams(guidance="clip" if clip else "llm", relevance_sign=-1 if clip else 1)
    layout = TokenLayout.single_view(24, 24)
    zone = G.zone_ids(layout, 4).numpy()
    spec = gridprune_spec(576, 64, 8, 6 if clip else 8, 6 if clip else None)
    sess = session(build_gridprune_model(spec, 64, params, 16, zone, 18))
    rng = np.random.default_rng(1)
    for ties in (True, False):
        emb = np.eye(6 if clip else 8, dtype=np.float32)[rng.integers(0, 3, (2, 576))] if ties else \
            rng.standard_normal((2, 576, 6 if clip else 8)).astype(np.float32)
        feats = emb if not clip else rng.standard_normal((2, 576, 8)).astype(np.float32)
        guide = np.eye(emb.shape[-1], dtype=np.float32)[[0, 1]]
        attn = (rng.integers(0, 4, (2, 576)) / 4).astype(np.float32)
        feeds = {"features": feats, "cls_attn": attn, "guidance": guide} | ({"clip_embeds": emb} if clip else {})
        kept, idx = sess.run(None, feeds)
        tokens = VisualTokens(features=torch.from_numpy(feats), cls_attn=torch.from_numpy(attn), layout=layout,
                              clip_embeds=torch.from_numpy(emb) if clip else None, guidance=torch.from_numpy(guide))
        want = GridPrune(params).select(tokens, 64)
        assert idx.dtype == np.int32 and np.array_equal(idx, want.numpy())
        assert np.array_equal(kept, np.take_along_axis(feats, want.numpy()[..., None], axis=1))
        ref_kept, ref_idx = GridPruneReference(64, params, 16, zone, clip)(
            *[torch.from_numpy(feeds[n]) for n in spec.input_names])
        assert np.array_equal(ref_idx.numpy(), idx)


# ----------------------------------------------------------------------------------------------- GraphRank
def clustered(rng, b, n, d, dup=True):
    """Features with exact duplicates (bit-equal scores: ties) and random rows."""
    x = rng.standard_normal((b, n, d)).astype(np.float32)
    if dup:
        x[:, 20:40] = x[:, 3:4]  # one 21-token cluster of identical rows
        x[:, 100:103] = x[:, 50:51]
    return x


def assert_same_up_to_fp32(idx, want, x, group, k, params):
    """Kept indices equal, except tokens whose reference score is within float32 noise (1e-5 relative) of their
    group's boundary score (the K-th largest): there the order is decided by rounding, not by the method."""
    for g, share in enumerate(GP.split_budget(np.bincount(group).tolist(), k)):
        members = np.flatnonzero(group == g)
        scores = GP.gprune_scores(torch.from_numpy(x[:, members]), params.threshold, params.temperature,
                                  params.steps).numpy()
        for b, row in enumerate(scores):
            got, ref = np.intersect1d(idx[b], members), np.intersect1d(want[b], members)
            assert len(got) == len(ref) == share
            boundary = np.sort(row)[::-1][share - 1] if share else np.inf
            for token in np.setxor1d(got, ref):
                s = row[np.searchsorted(members, token)]
                assert abs(s - boundary) <= 1e-5 * max(1.0, abs(boundary)), (g, token, s, boundary)


@pytest.mark.parametrize("k", [1, 64, 300, 576])
def test_graph_rank_equals_reference_llava(k):
    params = GPruneParams()
    spec = gprune_spec(576, k, 16)
    sess = session(build_gprune_model(spec, k, params, 1, 576, 18))
    rng = np.random.default_rng(k)
    for dup in (True, False):
        x = clustered(rng, 2, 576, 16, dup)
        kept, idx = sess.run(None, {"features": x})
        want = GP.gprune_select(torch.from_numpy(x), torch.zeros(576, dtype=torch.int64), k, params.threshold,
                                params.temperature, params.steps).numpy()
        assert_same_up_to_fp32(idx, want, x, np.zeros(576, np.int64), k, params)
        assert np.array_equal(kept, x[np.arange(2)[:, None], idx])
        if dup:  # a duplicated cluster ties exactly: both keep its lowest indices first
            assert np.array_equal(idx, want)


@pytest.mark.parametrize("size,k", [((300, 400), 160), ((500, 260), 1000), ((1000, 300), 1)])
def test_graph_rank_next_groups(size, k):
    """Base view and high-res grid ranked separately, K split by largest remainder, in one graph."""
    params = GPruneParams(threshold=0.3, steps=3)
    layout, _ = next_layout(size)
    group = layout.group.astype(np.int64)
    spec = gprune_spec(None, k, 16)
    sess = session(build_gprune_model(spec, k, params, 2, None, 18))
    x = clustered(np.random.default_rng(k), 1, layout.n, 16)
    _, idx = sess.run(None, {"features": x, "group_ids": group})
    want = GPruneReference(k, params, None)(torch.from_numpy(x), torch.from_numpy(group))[1].numpy()
    assert_same_up_to_fp32(idx, want, x, group, k, params)


# ----------------------------------------------------------------------------------------------- structure
@pytest.mark.parametrize("which", ["gridprune", "gprune"])
def test_fused_node_is_a_plugin_mappable_local_function(which):
    """DEPLOYMENT.md §1: an edgeprune-domain node with plugin_namespace/plugin_version whose definition is a
    model-local function of standard ops (what ONNX Runtime and a TensorRT without the plugin run)."""
    if which == "gridprune":
        model = build_gridprune_model(gridprune_spec(None, 64, 8, 8, None), 64, GridPruneParams(), 80, None, 18)
        name, attrs = "ZonalTopK", {"K": 64, "tau": 0.05, "zones": 4, "num_zones": 80}
    else:
        model = build_gprune_model(gprune_spec(None, 64, 8), 64, GPruneParams(), 2, None, 18)
        name, attrs = "GraphRank", {"K": 64, "threshold": 0.5, "temperature": 0.03, "steps": 5, "num_groups": 2}
    onnx.checker.check_model(model, full_check=True)
    node = next(n for n in model.graph.node if n.domain == "edgeprune")
    got = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    assert node.op_type == name and got.pop("plugin_namespace") == b"edgeprune" and got.pop("plugin_version") == b"1"
    assert got == pytest.approx(attrs)
    (fn,) = model.functions
    assert (fn.domain, fn.name) == ("edgeprune", name)
    assert {a.name for a in fn.attribute_proto} >= set(attrs) | {"plugin_namespace", "plugin_version"}
    assert {n.op_type for n in fn.node} <= STANDARD and all(n.domain == "" for n in fn.node)
    assert all(n.name.startswith(f"/{name}/") for n in fn.node)
    assert all(n.name.startswith("/prune/") for n in model.graph.node)
    assert {o.domain: o.version for o in model.opset_import} == {"": 18, "edgeprune": 1}
    assert model.ir_version <= 13  # onnxruntime 1.31 refuses IR 14
