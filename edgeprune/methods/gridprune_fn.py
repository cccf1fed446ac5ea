"""GridPrune as pure tensor functions (METHODS.md §1 and decision 4): the specification in code.

GridPrune replaces a global Top-K by two steps: a text-conditioned *zone budget* ("where to look") and a
*local* Top-K inside each zone ("what to select"). The pipeline is::

    r      = sign * cos(e_i, g)                               relevance            [B, N]
    zone   = view*G^2 + (row*G // rows)*G + (col*G // cols)   zone of each token   [N]
    rbar   = mean of r over each zone's present tokens         zone relevance       [B, Z]
    P      = softmax(rbar / tau) over the non-empty zones      (float64)            [B, Z]
    k_z    = largest remainder of K*P, capped at n_z, excess to the highest-P zones  [B, Z]
    s      = (1 - alpha) * (r + 1) / 2 + alpha * minmax(cls_attn)                    [B, N]
    keep   = top-k_z of s in every zone, ties to the lower token index, ascending    [B, K]

Everything here is deterministic: ties are broken by the lower zone id (quotas) or the lower token index
(selection), and the budget arithmetic runs in float64 so that equal zone relevances give bit-equal
fractional parts and therefore reproducible largest-remainder ties. The Triton ``ZonalTopK`` kernel and the
ONNX lowering are tested against :func:`allocate_quotas`, :func:`zone_ids` and :func:`zonal_topk`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from .functional import min_max_normalize

if TYPE_CHECKING:  # pragma: no cover
    from .base import TokenLayout


def num_zones(layout: "TokenLayout", zones: int) -> int:
    """Number of zone slots Z = num_views * G^2 (some may be empty, e.g. padded LLaVA-NeXT rows).

    Args:
        layout: the token layout.
        zones: G, the number of zones per side of one view.
    Returns:
        Z.
    """
    return layout.num_views * zones * zones


def zone_ids(layout: "TokenLayout", zones: int) -> torch.Tensor:
    """The zone of every token: ``view*G^2 + (row*G // rows)*G + (col*G // cols)``.

    Each view's ``rows x cols`` patch grid (``layout.grid``) is cut into G x G near-equal blocks; integer
    arithmetic keeps the partition exact for any G, including G larger than the grid (then some zones are
    empty). Zone ids are global over views, so one softmax ranks the zones of every view together.

    Args:
        layout: the token layout (numpy ``view``, ``row``, ``col`` of length N and ``grid``).
        zones: G >= 1.
    Returns:
        [N] int64 zone ids in ``[0, num_zones(layout, zones))`` (CPU tensor).
    Raises:
        ValueError: G < 1.
    """
    if zones < 1:
        raise ValueError(f"zones must be >= 1; got {zones}")
    rows, cols = layout.grid
    view = torch.as_tensor(layout.view, dtype=torch.int64)
    row = torch.as_tensor(layout.row, dtype=torch.int64)
    col = torch.as_tensor(layout.col, dtype=torch.int64)
    return view * zones * zones + (row * zones // rows) * zones + (col * zones // cols)


def zone_sizes(zone: torch.Tensor, num_zones: int) -> torch.Tensor:
    """Number of present tokens in each zone.

    Args:
        zone: [N] int64 zone ids.
        num_zones: Z.
    Returns:
        [Z] int64.
    """
    return torch.bincount(zone, minlength=num_zones)


def relevance(embeds: torch.Tensor, guidance: torch.Tensor, sign: int = 1) -> torch.Tensor:
    """Text relevance ``sign * cos(e_i, g)`` of every token, in float32.

    Args:
        embeds: [B, N, D] token embeddings (CLIP-space patch embeddings, or projected LLM-space tokens).
        guidance: [B, D] (or [1, D], broadcast) text guidance vector in the same space.
        sign: +1, or -1 to flip (CDPruner negates this cosine for LLaVA; GridPrune's sign is unknown).
    Returns:
        [B, N] float32 in [-1, 1].
    Raises:
        ValueError: the embedding widths differ.
    """
    if embeds.shape[-1] != guidance.shape[-1]:
        raise ValueError(f"guidance width {guidance.shape[-1]} does not match token width {embeds.shape[-1]}")
    e = torch.nn.functional.normalize(embeds.float(), dim=-1)
    g = torch.nn.functional.normalize(guidance.float(), dim=-1).expand(e.shape[0], -1)
    return float(sign) * torch.bmm(e, g.unsqueeze(-1)).squeeze(-1)


def zone_mean(values: torch.Tensor, zone: torch.Tensor, num_zones: int) -> torch.Tensor:
    """Mean of ``values`` over each zone's tokens, in float64; empty zones get 0.

    A one-hot matrix product is used instead of ``scatter_add`` because CUDA atomics add in a
    non-deterministic order, which would change the last bits of the mean and hence quota ties.

    Args:
        values: [B, N] float.
        zone: [N] int64 zone ids.
        num_zones: Z.
    Returns:
        [B, Z] float64.
    """
    onehot = torch.nn.functional.one_hot(zone.to(values.device), num_zones).to(torch.float64)  # [N, Z]
    counts = onehot.sum(0)
    return (values.to(torch.float64) @ onehot) / counts.clamp_min(1.0)


def _rank_descending(x: torch.Tensor) -> torch.Tensor:
    """Rank of every entry under a stable descending sort (0 = largest, ties to the lower index).

    Args:
        x: [B, Z].
    Returns:
        [B, Z] int64.
    """
    order = torch.sort(x, dim=-1, descending=True, stable=True).indices
    ranks = torch.arange(x.shape[-1], device=x.device, dtype=torch.int64).expand_as(order)
    return torch.empty_like(order).scatter_(-1, order, ranks)


def _cap_and_fill(quota: torch.Tensor, sizes: torch.Tensor, p: torch.Tensor, k: int) -> torch.Tensor:
    """Cap quotas at the zone sizes and hand the excess to unsaturated zones in descending P.

    Equivalent to the loop "give the whole excess to the highest-P zone that still has room, cap it, repeat"
    (at most Z rounds), written in closed form with one sort and one cumulative sum so that the ONNX and
    Triton lowerings need no loop: zone z (in descending-P order, ties to the lower zone id) receives
    ``clamp(excess - spare capacity of the zones before it, 0, its own spare capacity)``.

    Args:
        quota: [B, Z] int64 quotas summing to k.
        sizes: [B, Z] int64 zone sizes, with ``sizes.sum(-1) >= k``.
        p: [B, Z] float64 zone probabilities (the priority order).
        k: the budget.
    Returns:
        [B, Z] int64 quotas with ``quota <= sizes`` and ``quota.sum(-1) == k``.
    """
    quota = torch.minimum(quota, sizes)
    excess = k - quota.sum(-1, keepdim=True)  # [B, 1], >= 0
    spare = sizes - quota
    order = torch.sort(p, dim=-1, descending=True, stable=True).indices
    spare_sorted = torch.gather(spare, -1, order)
    before = torch.cumsum(spare_sorted, dim=-1) - spare_sorted
    add_sorted = torch.minimum((excess - before).clamp_min(0), spare_sorted)
    return quota + torch.zeros_like(quota).scatter_(-1, order, add_sorted)


def allocate_quotas(zone_relevance: torch.Tensor, zone_sizes: torch.Tensor, k: int, tau: float) -> torch.Tensor:
    """Split the budget K over the zones: softmax weights, largest remainder, capped at the zone sizes.

    1. ``P = softmax(rbar / tau)`` over the non-empty zones (empty zones get P = 0), in float64.
    2. ``k_z = floor(K P_z)``; the ``K - sum floor`` remaining tokens go one each to the zones with the
       largest fractional parts ``K P_z - floor(K P_z)`` (ties to the lower zone id).
    3. ``k_z := min(k_z, n_z)``; the excess goes to the zones with room in descending P (ties to the lower
       zone id), each filled up to its size before the next one (see :func:`_cap_and_fill`).

    float64 makes the result reproducible: zones with bit-equal relevance get bit-equal fractional parts,
    so ties are resolved by zone id rather than by rounding noise.

    Args:
        zone_relevance: [B, Z] float zone relevances (values of empty zones are ignored).
        zone_sizes: [Z] or [B, Z] int number of present tokens per zone.
        k: the budget, ``0 <= k <= sum(zone_sizes)`` per request.
        tau: softmax temperature, > 0.
    Returns:
        [B, Z] int64 quotas: ``sum == k`` and ``0 <= k_z <= n_z``.
    Raises:
        ValueError: tau <= 0, k < 0, k larger than the number of present tokens, or a non-finite relevance of a
            non-empty zone (a NaN would make the quotas sum to anything but K).
    """
    if not tau > 0:
        raise ValueError(f"tau must be > 0; got {tau}")
    rel = zone_relevance.to(torch.float64)
    sizes = zone_sizes.to(device=rel.device, dtype=torch.int64).expand_as(rel)
    total = sizes.sum(-1)
    if k < 0 or bool((total < k).any()):
        raise ValueError(f"budget k = {k} must be in [0, present tokens = {total.min().item()}]")
    present = sizes > 0
    if not bool(torch.isfinite(rel[present]).all()):
        raise ValueError("zone relevance holds NaN or inf; GridPrune needs finite relevances")
    if k == 0:
        return torch.zeros_like(sizes)
    logits = torch.where(present, rel / tau, torch.full_like(rel, float("-inf")))
    p = torch.softmax(logits, dim=-1)  # exp(-inf) = 0: empty zones get exactly P = 0
    scaled = k * p
    floor = torch.floor(scaled)
    remaining = k - floor.sum(-1, keepdim=True).to(torch.int64)  # in [0, Z) since sum(K P) = K
    bonus = (_rank_descending(scaled - floor) < remaining).to(torch.int64)
    return _cap_and_fill(floor.to(torch.int64) + bonus, sizes, p, k)


def local_scores(rel: torch.Tensor, cls_attn: torch.Tensor, alpha: float) -> torch.Tensor:
    """Local score ``(1 - alpha) * (r + 1) / 2 + alpha * minmax(cls_attn)``, in float32.

    ``(r + 1) / 2`` maps the cosine to [0, 1]; the [CLS] attention is min-max normalised over all N tokens
    of the request so both terms share the same [0, 1] scale (raw attention is ~1/N).

    Args:
        rel: [B, N] relevance in [-1, 1].
        cls_attn: [B, N] [CLS]->patch attention.
        alpha: weight of the attention term, in [0, 1].
    Returns:
        [B, N] float32.
    """
    a = min_max_normalize(cls_attn.float())
    return (1.0 - alpha) * (rel.float() + 1.0) * 0.5 + alpha * a


def zonal_topk(scores: torch.Tensor, zone: torch.Tensor, quotas: torch.Tensor, k: int) -> torch.Tensor:
    """Keep the top-``k_z`` scores of every zone (ties to the lower token index); return them ascending.

    Tokens are ordered by (zone ascending, score descending, index ascending) with two stable sorts; a
    token's rank inside its zone is its position minus the zone's start, and it is kept when that rank is
    below the zone's quota.

    Args:
        scores: [B, N] float scores; no NaN (+-inf are ordinary ranks, as in the fused ZonalTopK kernel).
        zone: [N] int64 zone ids.
        quotas: [B, Z] int64 quotas with ``sum == k`` and ``k_z <= n_z``.
        k: the budget.
    Returns:
        [B, K] int64 kept indices, ascending.
    Raises:
        ValueError: NaN scores, or quotas that do not keep exactly k tokens (never hidden by a slice).
    """
    b, n = scores.shape
    if bool(torch.isnan(scores).any()):  # +-inf rank like any value (so does the fused kernel); NaN has no rank
        raise ValueError("GridPrune's local scores hold NaN, which has no rank (the method refuses non-finite "
                         "inputs before this)")
    zone = zone.to(scores.device)
    by_score = torch.sort(scores, dim=-1, descending=True, stable=True).indices  # [B, N]
    zone_of = zone[by_score]
    by_zone = torch.sort(zone_of, dim=-1, stable=True).indices
    token = torch.gather(by_score, -1, by_zone)  # grouped by zone, best first inside a zone
    zone_sorted = torch.gather(zone_of, -1, by_zone)
    sizes = torch.bincount(zone, minlength=quotas.shape[-1])
    start = torch.cumsum(sizes, 0) - sizes  # [Z] first sorted position of every zone
    rank = torch.arange(n, device=scores.device) - start[zone_sorted]
    kept_sorted = rank < torch.gather(quotas, -1, zone_sorted)
    kept = torch.zeros(b, n, dtype=torch.bool, device=scores.device).scatter_(-1, token, kept_sorted)
    counts = kept.sum(-1)
    if not bool((counts == k).all()):
        raise ValueError(f"the zone quotas keep {counts.tolist()} tokens, not K = {k}: they must sum to K with "
                         f"k_z <= n_z (see allocate_quotas)")
    # A stable sort of "not kept" puts the K kept tokens first, already in ascending index order.
    return torch.sort((~kept).to(torch.int8), dim=-1, stable=True).indices[:, :k]


def gridprune_select(
    rel: torch.Tensor, cls_attn: torch.Tensor, zone: torch.Tensor, num_zones: int, k: int, alpha: float, tau: float
) -> torch.Tensor:
    """The full GridPrune selection from relevance, attention and zones.

    Args:
        rel: [B, N] relevance in [-1, 1] (see :func:`relevance`).
        cls_attn: [B, N] [CLS]->patch attention.
        zone: [N] int64 zone ids (see :func:`zone_ids`).
        num_zones: Z.
        k: budget, 1 <= k <= N.
        alpha: weight of the attention term in the local score.
        tau: zone softmax temperature.
    Returns:
        [B, K] int64 kept indices, ascending.
    """
    zone = zone.to(rel.device)
    quotas = allocate_quotas(zone_mean(rel, zone, num_zones), zone_sizes(zone, num_zones), k, tau)
    return zonal_topk(local_scores(rel, cls_attn, alpha), zone, quotas, k)
