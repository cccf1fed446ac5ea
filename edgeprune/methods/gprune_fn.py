"""G-Prune (arXiv 2501.02268) as pure tensor functions (METHODS.md §2 and decision 5): the spec in code.

G-Prune builds a similarity graph over the projected visual tokens, lets every token spread "information"
(its feature norm) over the graph for a few hops, and keeps the tokens that receive the most, divided by
their degree so that members of large redundant clusters are penalised::

    X^   = X / ||X||                    row-normalised features          [N, D]
    S    = X^ X^T, S_ij := 0 if < theta  sparse cosine graph (self-loops) [N, N]
    L    = S / T, exactly-zero -> -5000  masked logits
    A    = row-softmax(L)                transition matrix
    deg  = #{j : A_ij > 0}               neighbours incl. self
    v    = ||X||  (row vector), v := v A  (n times)
    score = v / deg

Everything runs in float32 whatever the input dtype: 1/T = 33 amplifies fp16 rounding, and in fp16 weak
neighbours underflow to 0 and silently drop out of the degree. The authors use ``matrix_power``; n
vector-matrix products give the same result (associativity) for far less work.
"""

from __future__ import annotations

import torch

# Logit given to masked (non-neighbour) entries: exp(-5000 - max) is exactly 0 in float32, so masked entries
# vanish from the softmax and from the degree count (value from the authors' code).
MASKED_LOGIT = -5000.0


def transition_matrix(x: torch.Tensor, threshold: float, temperature: float) -> torch.Tensor:
    """Row-stochastic transition matrix A of the thresholded cosine graph, in float32.

    Args:
        x: [B, N, D] token features (any float dtype).
        threshold: theta, cosines below it are cut (set to 0).
        temperature: T > 0.
    Returns:
        [B, N, N] float32, rows sum to 1.
    """
    xn = torch.nn.functional.normalize(x.float(), dim=-1)
    sim = xn @ xn.transpose(-1, -2)
    sim = torch.where(sim < threshold, torch.zeros_like(sim), sim)
    logits = sim / temperature
    # Only exact zeros are masked (the authors mask |L| < 1e-6); identical for any threshold > 3e-8.
    logits = torch.where(logits == 0, torch.full_like(logits, MASKED_LOGIT), logits)
    return torch.softmax(logits, dim=-1)


def gprune_scores(x: torch.Tensor, threshold: float = 0.5, temperature: float = 0.03, steps: int = 5) -> torch.Tensor:
    """G-Prune token scores ``(||X|| A^n) / deg``, as n vector-matrix products in float32.

    Args:
        x: [B, N, D] token features of one group (any float dtype).
        threshold: theta, cosine threshold of the graph.
        temperature: T > 0, softmax temperature.
        steps: n >= 0, number of propagation steps.
    Returns:
        [B, N] float32 scores (higher = keep).
    Raises:
        ValueError: temperature <= 0 or steps < 0.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0; got {temperature}")
    if steps < 0:
        raise ValueError(f"steps must be >= 0; got {steps}")
    a = transition_matrix(x, threshold, temperature)
    degree = (a > 0).sum(-1).to(torch.float32)  # >= 1: a softmax row always has a positive entry
    v = torch.linalg.vector_norm(x.float(), dim=-1).unsqueeze(1)  # [B, 1, N] initial information
    for _ in range(steps):
        v = torch.bmm(v, a)
    return v.squeeze(1) / degree


def split_budget(sizes: list[int] | tuple[int, ...], k: int) -> list[int]:
    """Split K over groups in proportion to their sizes by largest remainder (ties to the lower group).

    Exact integer arithmetic: group g gets ``floor(K n_g / N)`` plus one if its remainder ``K n_g mod N`` is
    among the ``K - sum floor`` largest. Since ``K <= N`` every share is at most its group's size.

    Args:
        sizes: group sizes n_g >= 0.
        k: the budget, ``0 <= k <= sum(sizes)``.
    Returns:
        shares, one per group, summing to K, each ``<= n_g``.
    Raises:
        ValueError: a negative size or k outside ``[0, sum(sizes)]``.
    """
    total = sum(sizes)
    if any(s < 0 for s in sizes) or not 0 <= k <= total:
        raise ValueError(f"need sizes >= 0 and 0 <= k <= sum(sizes); got sizes={list(sizes)}, k={k}")
    if total == 0:
        return [0 for _ in sizes]
    shares = [k * s // total for s in sizes]
    remainders = [k * s % total for s in sizes]
    # sorted() is stable, so equal remainders keep the lower group first.
    order = sorted(range(len(sizes)), key=lambda g: -remainders[g])
    for g in order[: k - sum(shares)]:
        shares[g] += 1
    return shares


def gprune_select(
    x: torch.Tensor, group: torch.Tensor, k: int, threshold: float, temperature: float, steps: int
) -> torch.Tensor:
    """Rank every group separately and keep its proportional share of K; return the kept indices ascending.

    Args:
        x: [B, N, D] token features.
        group: [N] int64 group ids >= 0 (0 = base view, 1 = LLaVA-NeXT high-res grid).
        k: the budget, 1 <= k <= N.
        threshold, temperature, steps: see :func:`gprune_scores`.
    Returns:
        [B, K] int64 kept indices, ascending.
    """
    from .functional import stable_topk

    group = group.to(torch.int64).cpu()
    sizes = torch.bincount(group).tolist()
    kept = []
    for g, share in enumerate(split_budget(sizes, k)):
        if share == 0:
            continue
        members = torch.nonzero(group == g).squeeze(1).to(x.device)  # ascending global indices
        scores = gprune_scores(x[:, members], threshold, temperature, steps)
        kept.append(members[stable_topk(scores, share)])
    return torch.sort(torch.cat(kept, dim=-1), dim=-1).values
