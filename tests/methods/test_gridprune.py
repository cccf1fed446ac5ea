"""Tests of GridPrune (edgeprune/methods/gridprune.py, gridprune_fn.py): hand-computed cases and properties."""

from __future__ import annotations

import math
import subprocess
import sys

import numpy as np
import pytest
import torch

from edgeprune.errors import BudgetError, MethodArgumentError
from edgeprune.methods.base import TokenLayout, VisualTokens
from edgeprune.methods.gridprune import GridPrune, GridPruneParams
from edgeprune.methods import gridprune_fn as G


# ----------------------------------------------------------------------------------------------- helpers
def unit_embeds(r: list[float]) -> torch.Tensor:
    """[1, N, 2] unit vectors (r_i, sqrt(1 - r_i^2)) whose cosine with (1, 0) is r_i."""
    r_t = torch.tensor(r, dtype=torch.float64)
    return torch.stack([r_t, torch.sqrt(1 - r_t**2)], dim=-1).float().unsqueeze(0)


def make_tokens(layout: TokenLayout, r: list[float], attn: list[float]) -> VisualTokens:
    """One request with CLIP guidance (1, 0) and patch embeddings whose cosines are ``r``."""
    n = layout.n
    return VisualTokens(
        features=torch.randn(1, n, 8, generator=torch.Generator().manual_seed(0)),
        cls_attn=torch.tensor([attn], dtype=torch.float32),
        layout=layout,
        clip_embeds=unit_embeds(r),
        guidance=torch.tensor([[1.0, 0.0]]),
    )


def random_tokens(layout: TokenLayout, batch: int, seed: int, d: int = 6) -> VisualTokens:
    gen = torch.Generator().manual_seed(seed)
    n = layout.n
    return VisualTokens(
        features=torch.randn(batch, n, d, generator=gen),
        cls_attn=torch.rand(batch, n, generator=gen),
        layout=layout,
        guidance=torch.randn(batch, d, generator=gen),
    )


def next_layout(side: int = 24, crops: tuple[int, int] = (2, 2), rows_kept: tuple[int, int] = (8, 40)) -> TokenLayout:
    """LLaVA-NeXT-like layout: base side x side view, then the unpadded high-res grid (raster over the full
    (crops*side) grid, rows ``rows_kept[0]:rows_kept[1]`` only), each token tagged with its crop view 1..4."""
    base = TokenLayout.single_view(side, side)
    rr, cc = np.meshgrid(np.arange(*rows_kept), np.arange(crops[1] * side), indexing="ij")
    rr, cc = rr.ravel(), cc.ravel()
    view = 1 + (rr // side) * crops[1] + (cc // side)
    return TokenLayout(
        view=np.concatenate([base.view, view]).astype(np.int64),
        row=np.concatenate([base.row, rr % side]).astype(np.int64),
        col=np.concatenate([base.col, cc % side]).astype(np.int64),
        group=np.concatenate([base.group, np.ones_like(rr)]).astype(np.int64),
        grid=(side, side),
    )


def reference_quotas(rbar: list[float], sizes: list[int], k: int, tau: float) -> list[int]:
    """Independent loop implementation of the quota rule (largest remainder, then cap-and-refill rounds)."""
    present = [z for z, s in enumerate(sizes) if s > 0]
    m = max(rbar[z] / tau for z in present)
    w = [math.exp(rbar[z] / tau - m) if sizes[z] > 0 else 0.0 for z in range(len(sizes))]
    p = [x / sum(w) for x in w]
    q = [math.floor(k * x) for x in p]
    frac = [k * x - math.floor(k * x) for x in p]
    for z in sorted(range(len(p)), key=lambda z: -frac[z])[: k - sum(q)]:
        q[z] += 1
    while True:  # at most Z rounds: each round saturates a zone or finishes
        q = [min(a, s) for a, s in zip(q, sizes)]
        excess = k - sum(q)
        if excess == 0:
            return q
        best = next(z for z in sorted(range(len(p)), key=lambda z: -p[z]) if q[z] < sizes[z])
        q[best] += excess


def check_indices(idx: torch.Tensor, b: int, k: int, n: int) -> None:
    assert idx.shape == (b, k) and idx.dtype == torch.int64
    assert bool((idx >= 0).all()) and bool((idx < n).all())
    if k > 1:
        assert bool((idx[:, 1:] > idx[:, :-1]).all())


# ------------------------------------------------------------------------------------------- zone ids
def test_zone_ids_4x4_grid_with_2x2_zones():
    z = G.zone_ids(TokenLayout.single_view(4, 4), 2)
    assert z.tolist() == [0, 0, 1, 1, 0, 0, 1, 1, 2, 2, 3, 3, 2, 2, 3, 3]


def test_zone_ids_uneven_and_oversized_grids():
    # 24x24 with G = 5: zone row = row*5 // 24 -> rows 0-4 -> 0, 5-9 -> 1, 10-14 -> 2, 15-19 -> 3, 20-23 -> 4.
    z = G.zone_ids(TokenLayout.single_view(24, 24), 5).view(24, 24)
    assert torch.bincount(z[:, 0] // 5).tolist() == [5, 5, 5, 5, 4]
    # G = 30 on 4x4: every token is its own zone, ids 0, 7, 15, 22 along each axis; 896 of 900 zones are empty.
    z = G.zone_ids(TokenLayout.single_view(4, 4), 30)
    assert len(set(z.tolist())) == 16 and z[:4].tolist() == [0, 7, 15, 22] and z[4].item() == 7 * 30
    assert G.num_zones(TokenLayout.single_view(4, 4), 30) == 900


# --------------------------------------------------------------------------------- hand-computed case
# 4x4 grid, 2x2 zones: zone 0 = {0,1,4,5}, zone 1 = {2,3,6,7}, zone 2 = {8,9,12,13}, zone 3 = {10,11,14,15}.
HAND_R = [
    0.4, 0.2, 0.2, 0.2,
    0.3, 0.3, 0.2, 0.2,
    0.0, 0.2, 0.0, 0.0,
    0.1, 0.1, 0.1, -0.1,
]  # zone means: z0 (0.4+0.2+0.3+0.3)/4 = 0.3, z1 0.2, z2 (0+0.2+0.1+0.1)/4 = 0.1, z3 (0+0-0.1+0.1)/4 = 0.0
HAND_A = [
    0.25, 0.25, 0.5, 0.0,
    0.25, 0.25, 1.0, 0.0,
    0.0, 0.0, 0.75, 0.75,
    0.5, 0.25, 0.75, 0.75,
]  # min 0 and max 1, so minmax(a) = a


def test_hand_zone_softmax_and_quotas():
    # tau = 0.1: logits rbar/tau = 3, 2, 1, 0; exp = 20.0855, 7.3891, 2.7183, 1.0; sum = 31.1929
    # P = 0.643914, 0.236883, 0.087144, 0.032059
    rbar = torch.tensor([[0.3, 0.2, 0.1, 0.0]], dtype=torch.float64)
    sizes = torch.tensor([4, 4, 4, 4])
    p = torch.softmax(rbar / 0.1, -1)[0].tolist()
    assert p == pytest.approx([0.6439143, 0.2368828, 0.0871443, 0.0320586], abs=1e-7)
    # K = 6: K P = 3.8635, 1.4213, 0.5229, 0.1924 -> floors 3,1,0,0 (sum 4), 2 left; largest fractions
    # .8635 (z0) and .5229 (z2) -> 4,1,1,0; all within the zone size 4.
    assert G.allocate_quotas(rbar, sizes, 6, 0.1).tolist() == [[4, 1, 1, 0]]
    # K = 8: K P = 5.1513, 1.8951, 0.6972, 0.2565 -> floors 5,1,0,0 (sum 6), 2 left; largest fractions
    # .8951 (z1) and .6972 (z2) -> 5,2,1,0; z0 capped at 4, excess 1 goes to the highest-P zone with room,
    # z1 -> 4,3,1,0.
    assert G.allocate_quotas(rbar, sizes, 8, 0.1).tolist() == [[4, 3, 1, 0]]
    # relevance_sign = -1 reverses the order: P = .0321, .0871, .2369, .6439; K P = .2565, .6972, 1.8951,
    # 5.1513 -> floors 0,0,1,5, +1 to z2 (.8951) and z1 (.6972) -> 0,1,2,5; z3 capped at 4, excess to z2 -> 0,1,3,4.
    assert G.allocate_quotas(-rbar, sizes, 8, 0.1).tolist() == [[0, 1, 3, 4]]


def test_hand_selection_k8():
    # Quotas 4,3,1,0 (above). alpha = 0.5: s = 0.25 (r + 1) + 0.5 a.
    # z0 quota 4 = its size: keep 0,1,4,5.
    # z1 r = 0.2 everywhere: s = 0.3 + 0.5 a -> t2 .55, t3 .30, t6 .80, t7 .30; top 3 = 6, 2 and the tie
    #    3/7 goes to the lower index 3.
    # z2 quota 1: s(8) = .25, s(9) = .30, s(12) = .275 + .375 = .65, s(13) = .275 + .125 = .40 -> keep 12
    #    (attention overrides the higher relevance of 9).
    # z3 quota 0, although its tokens have high attention (global cls-topk would take them).
    method = GridPrune(GridPruneParams(zones=2, alpha=0.5, tau=0.1))
    idx = method.select(make_tokens(TokenLayout.single_view(4, 4), HAND_R, HAND_A), 8)
    assert idx.tolist() == [[0, 1, 2, 3, 4, 5, 6, 12]]


def test_hand_selection_k6_and_alpha_extremes():
    layout = TokenLayout.single_view(4, 4)
    tokens = make_tokens(layout, HAND_R, HAND_A)
    # Quotas 4,1,1,0: z1 best is 6 (s .80), z2 best is 12.
    assert GridPrune(GridPruneParams(zones=2, tau=0.1)).select(tokens, 6).tolist() == [[0, 1, 4, 5, 6, 12]]
    # alpha = 0: relevance only; z1 all tie -> 2, z2 best relevance is 9 (0.2).
    assert GridPrune(GridPruneParams(zones=2, tau=0.1, alpha=0.0)).select(tokens, 6).tolist() == [[0, 1, 2, 4, 5, 9]]


def test_constant_scores_keep_the_first_indices_of_each_zone():
    # Equal relevance: P = 1/4 each, K P = 1.5 exactly in float64 -> floors 1,1,1,1, 2 left, the tie of the
    # fractional parts goes to the lower zones -> quotas 2,2,1,1; equal scores -> the lowest indices per zone.
    tokens = make_tokens(TokenLayout.single_view(4, 4), [0.3] * 16, [0.5] * 16)
    assert G.allocate_quotas(torch.full((1, 4), 0.3), torch.tensor([4] * 4), 6, 0.05).tolist() == [[2, 2, 1, 1]]
    idx = GridPrune(GridPruneParams(zones=2)).select(tokens, 6)
    assert idx.tolist() == [[0, 1, 2, 3, 8, 10]]


# ------------------------------------------------------------------------------------------ quota properties
def test_allocate_quotas_matches_loop_reference_and_invariants():
    rng = np.random.default_rng(0)
    for trial in range(300):
        z = int(rng.integers(1, 20))
        sizes = rng.integers(0, 6, size=z)
        if trial % 3 == 0:
            sizes[rng.random(z) < 0.3] = 0  # many empty zones
        if sizes.sum() == 0:
            sizes[0] = 1
        total = int(sizes.sum())
        k = int(rng.choice([1, total, int(rng.integers(1, total + 1))]))
        tau = float(rng.choice([1.0, 0.1, 0.05, 0.01]))
        rbar = rng.uniform(-0.4, 0.4, size=z)
        if trial % 5 == 0:
            rbar = np.round(rbar, 1)  # many exact ties
        q = G.allocate_quotas(torch.tensor(rbar)[None], torch.tensor(sizes), k, tau)[0]
        assert int(q.sum()) == k
        assert bool((q >= 0).all()) and bool((q <= torch.tensor(sizes)).all())
        assert q.tolist() == reference_quotas(rbar.tolist(), sizes.tolist(), k, tau), (trial, rbar, sizes, k, tau)


def test_allocate_quotas_batched_sizes_and_errors():
    rel = torch.tensor([[0.1, 0.2, 0.3], [0.3, 0.2, 0.1]])
    sizes = torch.tensor([[2, 0, 5], [1, 1, 1]])
    q = G.allocate_quotas(rel, sizes, 3, 0.05)
    assert q.sum(-1).tolist() == [3, 3] and q[0, 1].item() == 0 and q[1].tolist() == [1, 1, 1]
    assert G.allocate_quotas(rel, sizes, 0, 0.05).tolist() == [[0, 0, 0], [0, 0, 0]]
    with pytest.raises(ValueError, match="present tokens"):
        G.allocate_quotas(rel, sizes, 4, 0.05)
    with pytest.raises(ValueError, match="tau"):
        G.allocate_quotas(rel, sizes, 1, 0.0)


# ----------------------------------------------------------------------------------------- select properties
@pytest.mark.parametrize("rows,cols,zones", [(4, 4, 2), (6, 5, 3), (24, 24, 4), (7, 7, 1), (4, 4, 4), (5, 3, 5)])
def test_select_properties(rows, cols, zones):
    layout = TokenLayout.single_view(rows, cols)
    n = layout.n
    zone = G.zone_ids(layout, zones)
    z = G.num_zones(layout, zones)
    method = GridPrune(GridPruneParams(zones=zones, guidance="llm"))
    for seed, k in enumerate(sorted({1, 2, n // 3 + 1, n - 1, n})):
        tokens = random_tokens(layout, batch=3, seed=seed)
        idx = method.select(tokens, k)
        check_indices(idx, 3, k, n)
        assert torch.equal(idx, method.select(tokens, k))  # deterministic
        rel = G.relevance(tokens.features, tokens.guidance)
        quotas = G.allocate_quotas(G.zone_mean(rel, zone, z), G.zone_sizes(zone, z), k, 0.05)
        per_zone = torch.stack([torch.bincount(zone[row], minlength=z) for row in idx])
        assert torch.equal(per_zone, quotas)  # every zone keeps exactly its quota
        if k == n:
            assert idx.tolist() == [list(range(n))] * 3


def test_k1_with_one_zone_per_token_keeps_the_most_relevant_token():
    # G = 4 on 4x4: each token is its own zone; K = 1 -> floor(P) = 0 everywhere, the single remaining token
    # goes to the largest fractional part = the largest P = the most relevant token (index 9 here).
    r = [0.0] * 16
    r[9] = 0.3
    r[12] = 0.3 - 1e-3
    tokens = make_tokens(TokenLayout.single_view(4, 4), r, [0.0] * 15 + [1.0])
    assert GridPrune(GridPruneParams(zones=4)).select(tokens, 1).tolist() == [[9]]


def test_relevance_sign_flips_the_zone_budget():
    layout = TokenLayout.single_view(4, 4)
    tokens = make_tokens(layout, HAND_R, HAND_A)
    idx = GridPrune(GridPruneParams(zones=2, tau=0.1, relevance_sign=-1)).select(tokens, 8)
    per_zone = torch.bincount(G.zone_ids(layout, 2)[idx[0]], minlength=4)
    assert per_zone.tolist() == [0, 1, 3, 4]  # quotas computed by hand in test_hand_zone_softmax_and_quotas


def test_select_rejects_bad_k():
    tokens = make_tokens(TokenLayout.single_view(4, 4), HAND_R, HAND_A)
    with pytest.raises(BudgetError):
        GridPrune().select(tokens, 17)


# ------------------------------------------------------------------------------------------------- guidance
def test_guidance_auto_clip_llm():
    layout = TokenLayout.single_view(4, 4)
    tokens = make_tokens(layout, HAND_R, HAND_A)
    assert GridPrune().guidance_source(tokens) == "clip"
    no_clip = VisualTokens(tokens.features, tokens.cls_attn, layout, None, torch.randn(1, 8))
    assert GridPrune().guidance_source(no_clip) == "llm"
    with pytest.raises(MethodArgumentError, match="--clip"):
        GridPrune(GridPruneParams(guidance="clip")).select(no_clip, 4)
    # llm guidance on features built like the CLIP embeddings gives the same selection.
    llm = VisualTokens(tokens.clip_embeds, tokens.cls_attn, layout, None, torch.tensor([[1.0, 0.0]]))
    assert GridPrune(GridPruneParams(zones=2, tau=0.1, guidance="llm")).select(llm, 8).tolist() == [
        [0, 1, 2, 3, 4, 5, 6, 12]
    ]


def test_missing_or_mismatched_guidance_is_a_clear_error():
    layout = TokenLayout.single_view(4, 4)
    tokens = make_tokens(layout, HAND_R, HAND_A)
    no_guidance = VisualTokens(tokens.features, tokens.cls_attn, layout, tokens.clip_embeds, None)
    with pytest.raises(MethodArgumentError, match="pipeline must compute it"):
        GridPrune().select(no_guidance, 4)
    wrong_width = VisualTokens(tokens.features, tokens.cls_attn, layout, tokens.clip_embeds, torch.randn(1, 5))
    with pytest.raises(MethodArgumentError, match="does not match"):
        GridPrune().select(wrong_width, 4)


# ------------------------------------------------------------------------------------------ LLaVA-NeXT layout
def test_next_layout_budgets_skip_padded_zones():
    layout = next_layout()  # 576 base + 32 x 48 = 1536 unpadded high-res tokens
    n, zones = layout.n, 4
    assert n == 576 + 1536
    zone = G.zone_ids(layout, zones)
    z = G.num_zones(layout, zones)
    sizes = G.zone_sizes(zone, z)
    # Crops 1, 2 (top) lose in-crop rows 0-7: zone row 0 (rows 0-5) is empty, zone row 1 keeps rows 8-11.
    # Crops 3, 4 (bottom) keep in-crop rows 0-15: zone row 3 (rows 18-23) is empty, zone row 2 keeps 12-15.
    empty = (sizes == 0).nonzero().squeeze(1).tolist()
    expected_empty = [v * 16 + zr * 4 + zc for v, zr in ((1, 0), (2, 0), (3, 3), (4, 3)) for zc in range(4)]
    assert empty == sorted(expected_empty)
    assert sizes[16 + 4].item() == 4 * 6 and sizes[48 + 8].item() == 4 * 6  # partial zones: 4 rows x 6 cols
    tokens = random_tokens(layout, batch=2, seed=3)
    for k in (1, 160, 320, 640, n):
        idx = GridPrune(GridPruneParams(zones=zones, guidance="llm")).select(tokens, k)
        check_indices(idx, 2, k, n)
        rel = G.relevance(tokens.features, tokens.guidance)
        quotas = G.allocate_quotas(G.zone_mean(rel, zone, z), sizes, k, 0.05)
        assert quotas.sum(-1).tolist() == [k, k]
        assert bool((quotas[:, sizes == 0] == 0).all()) and bool((quotas <= sizes).all())
        per_zone = torch.stack([torch.bincount(zone[row], minlength=z) for row in idx])
        assert torch.equal(per_zone, quotas)


# ------------------------------------------------------------------------------------------- params & import
def test_params_validation_and_from_args():
    m = GridPrune.from_args({"zones": "6", "alpha": "0.3", "tau": "1", "relevance_sign": "-1", "guidance": "llm"})
    assert m.params == GridPruneParams(zones=6, alpha=0.3, tau=1.0, relevance_sign=-1, guidance="llm")
    assert m.positions == "compact" and m.name == "gridprune"
    for bad in ({"zones": "0"}, {"alpha": "1.5"}, {"tau": "0"}, {"relevance_sign": "2"}, {"guidance": "text"}):
        with pytest.raises(MethodArgumentError):
            GridPrune.from_args(bad)


def test_module_import_does_not_import_torch():
    code = "import sys, edgeprune.methods.gridprune; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)
