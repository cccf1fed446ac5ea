"""Pure tensor functions shared by the pruning methods (the specification in code).

Every function is deterministic, has no side effects, and documents its shapes. Ties are broken by the lower
token index everywhere (METHODS.md decision 1), which is why top-K is a *stable* sort rather than ``topk``.
"""

from __future__ import annotations

import torch


def stable_topk(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the K largest scores per row, ties to the lower index, returned ascending.

    Args:
        scores: [B, N] float scores (NaN is not allowed; callers validate).
        k: 1 <= k <= N.
    Returns:
        [B, K] int64 indices, sorted ascending (raster order).
    """
    order = torch.sort(scores, dim=-1, descending=True, stable=True).indices
    return torch.sort(order[..., :k], dim=-1).values


def gather_tokens(features: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Gather kept rows.

    Args:
        features: [B, N, D].
        idx: [B, K] int64.
    Returns:
        [B, K, D].
    """
    return torch.gather(features, 1, idx.unsqueeze(-1).expand(-1, -1, features.shape[-1]))


def uniform_indices(n: int, k: int) -> torch.Tensor:
    """K indices spread evenly over 0..N-1 in raster order: ``floor((i + 0.5) * N / K)``.

    On a square grid this is a strided spatial sample; exact K for any K, ascending and unique because
    N / K >= 1.

    Returns:
        [K] int64.
    """
    i = torch.arange(k, dtype=torch.float64)
    return torch.floor((i + 0.5) * n / k).to(torch.int64)


def uniform_grid_indices(rows: int, cols: int, k: int) -> torch.Tensor:
    """K indices forming a near-square lattice over a rows x cols raster grid (exact K, ascending).

    ``m = max(ceil(K / cols), round(sqrt(K * rows / cols)))`` rows are strided over the grid; the K tokens are
    shared among them as evenly as possible (earlier rows take the remainder) and strided within each row.
    K = 64 on 24 x 24 gives the 8 x 8 lattice at rows and columns 1, 4, ..., 22.

    Returns:
        [K] int64.
    """
    import math

    m = min(rows, k, max(math.ceil(k / cols), round(math.sqrt(k * rows / cols))))
    sel_rows = uniform_indices(rows, m)
    per_row = [k // m + (1 if i < k % m else 0) for i in range(m)]
    parts = [int(r) * cols + uniform_indices(cols, c) for r, c in zip(sel_rows.tolist(), per_row)]
    return torch.cat(parts)


def random_indices(batch: int, n: int, k: int, seed: int) -> torch.Tensor:
    """K distinct indices drawn uniformly at random, reproducible from ``seed``, ascending.

    Uses a private ``torch.Generator`` so the global RNG is untouched.

    Returns:
        [B, K] int64.
    """
    gen = torch.Generator().manual_seed(seed)
    rows = [torch.sort(torch.randperm(n, generator=gen)[:k]).values for _ in range(batch)]
    return torch.stack(rows)


def min_max_normalize(x: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """Scale each row to [0, 1]: ``(x - min) / (max - min)``; a constant row maps to zeros.

    Args:
        x: [B, N].
    Returns:
        [B, N], same dtype.
    """
    lo = x.amin(dim=-1, keepdim=True)
    hi = x.amax(dim=-1, keepdim=True)
    return (x - lo) / (hi - lo).clamp_min(eps)

