"""GraphRank kernels vs the G-Prune reference (edgeprune/kernels/graph_rank.py, methods/gprune_fn.py).

Scores are compared with a tolerance (fp32 sums in a different order); kept indices exactly whenever the inputs
leave a margin (no cosine within 1e-5 of theta, a K-th/K+1-th score gap above the tolerance), and otherwise
every disagreement must be a near-tie at the K-th place. Exact ties (duplicated tokens, zero or constant rows)
must resolve to the lower index exactly as in the reference.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from edgeprune.errors import BackendError, BudgetError, EdgepruneError, MethodArgumentError  # noqa: E402
from edgeprune.kernels.graph_rank import graph_rank, graph_rank_select  # noqa: E402
from edgeprune.methods import gprune_fn as P  # noqa: E402
from edgeprune.methods.functional import stable_topk  # noqa: E402

RTOL, ATOL = 1e-4, 1e-6  # fp32 rounding differences measured at ~1e-5 relative
SIM_MARGIN = 1e-5  # a cosine this close to theta may land on either side of it


def clustered(batch: int, n: int, d: int, seed: int, noise: float = 0.08, dtype=torch.float32) -> torch.Tensor:
    """Tokens around orthonormal centres with varied norms: neighbourhoods of different sizes.

    With ``noise = 0.08`` within-cluster cosines sit near 0.9 and cross-cluster ones near 0, so no cosine is
    within rounding of theta = 0.5 and exact index equality is required; larger noise overlaps the clusters.
    """
    gen = torch.Generator().manual_seed(seed)
    n_centres = min(d, max(2, n // 40))
    q = torch.linalg.qr(torch.randn(batch, d, d, generator=gen)).Q[:, :, :n_centres].transpose(1, 2)
    label = torch.randint(0, n_centres, (batch, n), generator=gen)
    x = q.gather(1, label.unsqueeze(-1).expand(-1, -1, d)) + noise * torch.randn(batch, n, d, generator=gen)
    return (x * (0.5 + torch.rand(batch, n, 1, generator=gen))).to(dtype)


def clear_margins(x, ref_scores, k, threshold) -> bool:
    """True when neither a cosine nor the K-th score gap is within rounding: exact indices are then required."""
    xn = torch.nn.functional.normalize(x.float(), dim=-1)
    if float((xn @ xn.transpose(1, 2) - threshold).abs().min()) < SIM_MARGIN:
        return False
    if k == x.shape[1]:
        return True
    top = torch.sort(ref_scores, dim=-1, descending=True).values
    return bool(((top[:, k - 1] - top[:, k]) > RTOL * top[:, k - 1].abs() + ATOL).all())


def check(x, k, device, threshold=0.5, temperature=0.03, steps=5, **kw) -> str:
    """Scores within tolerance; kept indices exact (with margins) or differing only at a near-tie.

    Returns:
        ``exact`` when exact index equality was asserted, ``near-tie`` when the tolerance rule was used.
    """
    ref_scores = P.gprune_scores(x, threshold, temperature, steps)
    idx, scores = graph_rank(x.to(device), k, threshold, temperature, steps, return_scores=True, **kw)
    assert idx.dtype == torch.int32 and idx.shape == (x.shape[0], k)
    torch.testing.assert_close(scores.cpu(), ref_scores, rtol=RTOL, atol=ATOL)
    ref = stable_topk(ref_scores, k)
    got = idx.cpu().long()
    if clear_margins(x, ref_scores, k, threshold):
        assert torch.equal(got, ref), "kept indices differ from the reference despite clear margins"
        return "exact"
    kth = torch.sort(ref_scores, dim=-1, descending=True).values[:, k - 1 : k]
    for row in range(x.shape[0]):
        differ = torch.tensor(sorted(set(got[row].tolist()) ^ set(ref[row].tolist())), dtype=torch.long)
        if differ.numel():
            gap = (ref_scores[row, differ] - kth[row]).abs()
            assert bool((gap <= RTOL * kth[row].abs() + ATOL).all()), "a disagreement is not a near-tie"
    return "near-tie"


# (batch, N, D, K, threshold, temperature, steps): N = 64 / 576 / 2,880, K = 1 / N/9 / N; D > one D block
CASES = [
    (2, 64, 32, 1, 0.5, 0.03, 5),
    (1, 64, 300, 64, 0.5, 0.03, 5),
    (4, 64, 24, 7, 0.3, 0.05, 1),
    (3, 100, 40, 11, 0.5, 0.03, 0),
    (1, 576, 48, 64, 0.5, 0.03, 5),
    (2, 576, 16, 576, 0.5, 0.03, 3),
    (1, 2880, 16, 320, 0.5, 0.03, 5),
]


@pytest.mark.parametrize("batch,n,d,k,threshold,temperature,steps", CASES)
def test_random_inputs_match_reference(batch, n, d, k, threshold, temperature, steps, device):
    x = clustered(batch, n, d, seed=n + d + k)
    assert check(x, k, device, threshold, temperature, steps) == "exact"


def test_overlapping_clusters_differ_only_at_near_ties(device):
    """Overlapping clusters put some cosines within rounding of theta: scores within tolerance, and any index
    disagreement must sit at a near-tie (the rule the other tests tighten to exact equality)."""
    check(clustered(1, 576, 16, seed=9, noise=0.4), 64, device)


def test_duplicated_tokens_tie_to_the_lower_index(device):
    """Bit-equal rows give bit-equal scores in both implementations: ties resolve by index, exactly."""
    gen = torch.Generator().manual_seed(1)
    base = torch.randn(1, 40, 24, generator=gen)
    x = torch.cat([base, base[:, :30]], dim=1)[:, torch.randperm(70, generator=gen)]
    for k in (1, 13, 35, 69):
        ref = stable_topk(P.gprune_scores(x), k)
        assert torch.equal(graph_rank(x.to(device), k).cpu().long(), ref)


def test_zero_and_constant_rows(device):
    """Zero rows (norm 0: no neighbour, uniform row) and all-equal tokens (every score tied)."""
    x = clustered(1, 50, 8, seed=2)
    x[0, 5] = 0.0
    x[0, 17] = 0.0
    for k in (1, 10, 50):
        assert torch.equal(graph_rank(x.to(device), k).cpu().long(), stable_topk(P.gprune_scores(x), k))
    const = torch.ones(2, 30, 5)
    assert graph_rank(const.to(device), 7).cpu().tolist() == [list(range(7))] * 2


def test_float16_features(device):
    x = clustered(1, 64, 40, seed=3, dtype=torch.float16)
    assert check(x, 9, device) == "exact"


def test_grouped_selection_matches_gprune_select(device):
    x = clustered(2, 100, 16, seed=4)
    group = torch.cat([torch.zeros(36, dtype=torch.long), torch.ones(64, dtype=torch.long)])
    for k in (1, 17, 100):
        ref = P.gprune_select(x, group, k, 0.5, 0.03, 5)
        assert torch.equal(graph_rank_select(x.to(device), group, k).cpu().long(), ref)


# ------------------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_features_raise(bad, device):
    x = torch.randn(1, 16, 8, device=device)
    x[0, 3, 2] = bad
    with pytest.raises(EdgepruneError, match="NaN or inf"):
        graph_rank(x, 4)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the interpreter's numpy warns about the NaN arithmetic
def test_unchecked_nan_never_writes_out_of_range(device):
    x = torch.randn(1, 40, 8, device=device)
    x[0, ::3] = float("nan")
    out = graph_rank(x, 10, check_inputs=False)
    assert bool(((out >= -1) & (out < 40)).all())


def test_bad_arguments(device):
    x = torch.randn(1, 16, 8, device=device)
    for k in (0, 17):
        with pytest.raises(BudgetError, match="K must be in"):
            graph_rank(x, k)
    with pytest.raises(MethodArgumentError, match="temperature"):
        graph_rank(x, 4, temperature=0.0)
    with pytest.raises(MethodArgumentError, match="steps"):
        graph_rank(x, 4, steps=-1)
    with pytest.raises(MethodArgumentError, match="precision"):
        graph_rank(x, 4, precision="fp8")
    with pytest.raises(BackendError, match=r"\[B, N, D\]"):
        graph_rank(x[0], 4)
    with pytest.raises(BudgetError):
        graph_rank_select(x, torch.zeros(16, dtype=torch.long), 20)


@pytest.mark.gpu
def test_gpu_large_d_and_tf32x3():
    """On a GPU: D = 4,096 at N = 2,880 (tiling over D and N), with true fp32 and with tf32x3 dots."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    x = clustered(1, 2880, 4096, seed=5)
    check(x, 320, "cuda")
    check(x, 320, "cuda", precision="tf32x3")
