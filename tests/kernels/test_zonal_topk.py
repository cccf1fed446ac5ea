"""ZonalTopK kernel vs the GridPrune reference (edgeprune/kernels/zonal_topk.py, methods/gridprune_fn.py).

Exact equality of kept indices *and* quotas on random inputs over N = 64 / 576 / 2,880, K = 1 / N/9 / N,
several zone grids and batches 1-4, on adversarial ties, and the documented behaviour for NaN / inf input.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("triton")

from edgeprune.errors import BackendError, BudgetError, EdgepruneError, MethodArgumentError  # noqa: E402
from edgeprune.kernels import zonal_topk as ZT  # noqa: E402
from edgeprune.methods import gridprune_fn as G  # noqa: E402


def layout(side: int, views: int = 1, drop_rows: int = 0) -> SimpleNamespace:
    """``views`` square ``side x side`` grids; the last ``drop_rows`` rows of views >= 1 are absent (NeXT padding)."""
    rows = torch.arange(side).repeat_interleave(side).repeat(views)
    cols = torch.arange(side).repeat(side * views)
    view = torch.arange(views).repeat_interleave(side * side)
    keep = (view == 0) | (rows < side - drop_rows)
    return SimpleNamespace(view=view[keep].numpy(), row=rows[keep].numpy(), col=cols[keep].numpy(),
                           grid=(side, side), num_views=views, n=int(keep.sum()))


def reference(scores, zone, num_zones, rel, k, tau):
    """Kept indices and quotas of gridprune_fn (float64 zone means of the per-token relevance)."""
    zr = G.zone_mean(rel, zone, num_zones)
    quotas = G.allocate_quotas(zr, G.zone_sizes(zone, num_zones), k, tau)
    return G.zonal_topk(scores, zone, quotas, k), quotas, zr


def check(scores, zone, num_zones, rel, k, tau, device, token_mode=False):
    """Run the kernel (both relevance modes when asked) and require exact equality with the reference."""
    ref_idx, ref_q, zr = reference(scores, zone, num_zones, rel, k, tau)
    kw = {"token_relevance": rel.to(device)} if token_mode else {"zone_relevance": zr.to(device)}
    idx, quotas = ZT.zonal_topk(scores.to(device), zone.to(device), k, tau, num_zones=num_zones, return_quotas=True,
                                **kw)
    assert idx.dtype == torch.int32 and idx.shape == (scores.shape[0], k)
    assert torch.equal(quotas.cpu().long(), ref_q), "quotas differ from allocate_quotas"
    assert torch.equal(idx.cpu().long(), ref_idx), "kept indices differ from gridprune_fn.zonal_topk"


# (side, views, drop_rows, G, batch, K rule, tau, token_mode): N = 64, 576, 2,880 (and a padded NeXT layout)
RANDOM_CASES = [
    (8, 1, 0, 3, 2, "1", 0.05, False),
    (8, 1, 0, 4, 4, "n/9", 1.0, True),
    (8, 1, 0, 2, 1, "n", 0.1, False),
    (24, 1, 0, 4, 1, "n/9", 0.05, False),
    (24, 1, 0, 6, 3, "1", 0.01, True),
    (24, 1, 0, 3, 2, "rand", 0.05, False),
    (24, 1, 0, 24, 1, "n/9", 0.05, False),  # one token per zone
    (24, 5, 0, 4, 1, "n/9", 0.05, True),  # 2,880 tokens, 80 zones
    (24, 5, 0, 2, 1, "rand", 0.01, False),
    (24, 5, 7, 4, 2, "n/9", 0.05, False),  # NeXT-like: padded rows absent, some zones empty
]


@pytest.mark.parametrize("side,views,drop,g,batch,krule,tau,token_mode", RANDOM_CASES)
def test_random_inputs_match_reference(side, views, drop, g, batch, krule, tau, token_mode, device):
    gen = torch.Generator().manual_seed(side * 100 + g * 10 + batch)
    lay = layout(side, views, drop)
    zone, nz, n = G.zone_ids(lay, g), G.num_zones(lay, g), lay.n
    k = {"1": 1, "n/9": n // 9, "n": n, "rand": int(torch.randint(1, n + 1, (1,), generator=gen))}[krule]
    rel = torch.rand(batch, n, generator=gen) * 0.5 - 0.1
    scores = G.local_scores(rel, torch.rand(batch, n, generator=gen), 0.5)
    check(scores, zone, nz, rel, k, tau, device, token_mode)


def test_many_small_random_cases(device):
    """A broader sweep on small layouts (cheap): random grids, budgets, temperatures, quantised inputs."""
    gen = torch.Generator().manual_seed(7)
    taus = [1.0, 0.3, 0.05, 0.01, 0.002, 0.5]
    for trial in range(20):
        lay = layout(8, 2, 3 * (trial % 2)) if trial % 3 else layout(12)
        g = 1 + trial % 5
        zone, nz = G.zone_ids(lay, g), G.num_zones(lay, g)
        batch = 1 + trial % 4
        rel = torch.round(torch.rand(batch, lay.n, generator=gen) * (4 if trial % 2 else 1000)) / 10
        scores = torch.round(torch.rand(batch, lay.n, generator=gen) * (3 if trial % 3 == 0 else 1e6))
        k = int(torch.randint(1, lay.n + 1, (1,), generator=gen))
        check(scores, zone, nz, rel, k, taus[trial % 6], device, token_mode=trial % 2 == 0)


def test_ties_everywhere(device):
    """Equal relevance and equal scores: quotas by zone id (largest-remainder ties), tokens by index."""
    lay = layout(8)
    for g in (3, 5):  # 9 and 25 zones: uniform P has equal fractional parts, ties go to the lower zone id
        zone, nz = G.zone_ids(lay, g), G.num_zones(lay, g)
        for k in (1, 10, 31, 64):
            check(torch.ones(2, 64), zone, nz, torch.full((2, 64), 0.2), k, 0.05, device)


def test_ties_in_groups_and_quantised_scores(device):
    gen = torch.Generator().manual_seed(3)
    lay = layout(24)
    zone, nz = G.zone_ids(lay, 4), G.num_zones(lay, 4)
    rel = torch.tensor([0.1, 0.3])[torch.randint(0, 2, (2, 576), generator=gen)]  # two relevance levels
    scores = torch.randint(0, 3, (2, 576), generator=gen).float() / 2  # three score levels: many ties
    check(scores, zone, nz, rel, 64, 0.05, device)


def test_signed_zeros_and_infinities_rank_like_the_reference(device):
    """-0.0 == +0.0 (index order decides) and +-inf are ordinary ranks, as in the CPU reference's sort."""
    lay = layout(8)
    zone, nz = G.zone_ids(lay, 2), G.num_zones(lay, 2)
    scores = torch.zeros(1, 64)
    scores[0, ::3] = -0.0
    scores[0, 5], scores[0, 9], scores[0, 40] = float("inf"), float("-inf"), float("inf")
    check(scores, zone, nz, torch.rand(1, 64) * 0.3, 20, 0.05, device)


def test_caps_and_redistribution(device):
    """A dominant zone asks for more than its size: the cap and the descending-P redistribution kick in."""
    lay = layout(8)
    zone, nz = G.zone_ids(lay, 4), G.num_zones(lay, 4)  # 16 zones of 4 tokens
    rel = torch.full((1, 64), 0.1)
    rel[0, zone == 5] = 0.9
    rel[0, zone == 6] = 0.5
    for k in (6, 13, 40):
        check(torch.rand(1, 64), zone, nz, rel, k, 0.01, device)


def test_more_zones_than_cells_leaves_empty_zones(device):
    lay = layout(4)  # G = 6 on a 4 x 4 grid: 20 of the 36 zones are empty
    zone, nz = G.zone_ids(lay, 6), G.num_zones(lay, 6)
    assert int((G.zone_sizes(zone, nz) == 0).sum()) > 0
    rel = torch.rand(2, 16)
    for k in (1, 7, 16):
        check(torch.rand(2, 16), zone, nz, rel, k, 0.05, device)


def test_float16_scores_are_compared_in_their_dtype(device):
    lay = layout(8)
    zone, nz = G.zone_ids(lay, 2), G.num_zones(lay, 2)
    scores = torch.rand(2, 64).half()
    check(scores, zone, nz, torch.rand(2, 64), 17, 0.05, device)


# ------------------------------------------------------------------------------------------- bad input
def _args(device, n=64):
    lay = layout(8)
    zone = G.zone_ids(lay, 2).to(device)
    return torch.rand(2, n, device=device), zone, torch.rand(2, 4, dtype=torch.float64, device=device)


def test_nan_scores_raise(device):
    scores, zone, zr = _args(device)
    scores[1, 3] = float("nan")
    with pytest.raises(EdgepruneError, match="NaN"):
        ZT.zonal_topk(scores, zone, 8, 0.05, zone_relevance=zr)


def test_non_finite_relevance_raises_but_empty_zones_are_ignored(device):
    scores, zone, zr = _args(device)
    for bad in (float("nan"), float("inf")):
        zr2 = zr.clone()
        zr2[0, 1] = bad
        with pytest.raises(EdgepruneError, match="zone softmax"):
            ZT.zonal_topk(scores, zone, 8, 0.05, zone_relevance=zr2)
    rel = torch.rand(2, 64, device=device)
    rel[0, 0] = float("nan")
    with pytest.raises(EdgepruneError):
        ZT.zonal_topk(scores, zone, 8, 0.05, token_relevance=rel)
    # zone slot 4 is empty (only 4 zones are used): its relevance is ignored, as in allocate_quotas
    zr5 = torch.cat([zr, torch.full((2, 1), float("nan"), dtype=torch.float64, device=device)], dim=1)
    out = ZT.zonal_topk(scores, zone, 8, 0.05, zone_relevance=zr5)
    quotas = G.allocate_quotas(zr5.cpu(), G.zone_sizes(zone.cpu(), 5), 8, 0.05)
    assert torch.equal(out.cpu().long(), G.zonal_topk(scores.cpu(), zone.cpu(), quotas, 8))


def test_unchecked_nan_never_writes_out_of_range(device):
    """With the checks off, NaN input is undefined but bounded: every entry is a token index or -1."""
    scores, zone, zr = _args(device)
    scores[:, ::5] = float("nan")
    out = ZT.zonal_topk(scores, zone, 30, 0.05, zone_relevance=zr, check_inputs=False)
    assert bool(((out >= -1) & (out < 64)).all())


@pytest.mark.parametrize("k", [0, 65])
def test_budget_out_of_range(k, device):
    scores, zone, zr = _args(device)
    with pytest.raises(BudgetError, match="K must be in"):
        ZT.zonal_topk(scores, zone, k, 0.05, zone_relevance=zr)


def test_bad_arguments(device):
    scores, zone, zr = _args(device)
    with pytest.raises(MethodArgumentError, match="tau"):
        ZT.zonal_topk(scores, zone, 4, 0.0, zone_relevance=zr)
    with pytest.raises(BackendError, match="exactly one"):
        ZT.zonal_topk(scores, zone, 4, 0.05)
    with pytest.raises(BackendError, match="zone_relevance"):
        ZT.zonal_topk(scores, zone, 4, 0.05, zone_relevance=zr[:, :3], num_zones=4)
    with pytest.raises(BackendError, match="zone ids"):
        ZT.zonal_topk(scores, zone, 4, 0.05, zone_relevance=zr[:, :3], num_zones=3)


def test_cpu_tensors_need_the_interpreter(monkeypatch):
    monkeypatch.setattr(ZT, "is_interpreted", lambda: False)
    scores, zone, zr = _args("cpu")
    with pytest.raises(BackendError, match="TRITON_INTERPRET"):
        ZT.zonal_topk(scores, zone, 4, 0.05, zone_relevance=zr)


@pytest.mark.gpu
def test_gpu_matches_reference_on_many_cases():
    """On a GPU: a wide random sweep (cheap there), the kernel on CUDA vs the reference on the CPU."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    gen = torch.Generator().manual_seed(11)
    for trial in range(100):
        lay = layout(24, 1 + 4 * (trial % 2), 3 * (trial % 3))
        g = 1 + trial % 6
        zone, nz = G.zone_ids(lay, g), G.num_zones(lay, g)
        rel = torch.rand(2, lay.n, generator=gen) * 0.4
        k = int(torch.randint(1, lay.n + 1, (1,), generator=gen))
        check(torch.rand(2, lay.n, generator=gen), zone, nz, rel, k, [0.01, 0.05, 1.0][trial % 3], "cuda",
              token_mode=trial % 2 == 1)
