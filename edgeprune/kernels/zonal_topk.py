"""Fused ``ZonalTopK`` (GridPrune's budget allocation + per-zone Top-K) as one Triton kernel.

The kernel reproduces :func:`edgeprune.methods.gridprune_fn.allocate_quotas` and
:func:`~edgeprune.methods.gridprune_fn.zonal_topk` step by step (METHODS.md decision 1: same kept indices as
the reference, ties to the lower zone id / token index):

1. (optional, ``ZONE_MEAN``) zone means of the per-token relevance in float64 (:func:`zone_mean`);
2. ``P = softmax(rbar / tau)`` over the non-empty zones, float64, max-subtracted, ``P = e / sum(e)``;
3. largest remainder of ``K P`` (bonus to the ``K - sum floor`` largest fractional parts, ties to the lower
   zone id), cap at the zone sizes, excess handed out in descending P (closed form of ``_cap_and_fill``);
4. per zone, the token of rank ``k_z - 1`` under (score descending, index ascending) is the zone's threshold;
5. one pass in ascending token order keeps every token at or above its zone's threshold (exactly K).

Exactness. Every comparison, floor and integer step is exact; the only rounding is in the float64 softmax
(exp and one sum). Bit-equal relevances give bit-equal P, so exact ties are resolved identically (by zone id).
The sum is a tree reduction, not torch's vectorised order, and exp is numpy's (interpreter) or libdevice's
(GPU): P can differ from ``torch.softmax`` in the last bit, which changes a quota only when two fractional
parts are within ~1e-15 of each other without being equal, or ``K P_z`` is within ~1e-15 of an integer.
FMA contraction is disabled (``enable_fp_fusion=False``) so ``K*P - floor(K*P)`` rounds like torch.

Launch contract (one kernel, ``zonal_topk_kernel``; argument order = TensorRT AOT order: inputs, int32
scalars, outputs; all tensors contiguous):

====  ==============  ============  =========================================================================
 #    name            dtype         meaning
====  ==============  ============  =========================================================================
 0    scores          *fp32 [B,N]   local scores (no NaN)
 1    rel             *fp64 [B,Z]   zone relevance; with ``ZONE_MEAN`` per-token relevance *fp32 [B,N]
 2    zone            *i32 [N]      zone id of every token, in [0, Z)
 3    order           *i32 [N]      token indices sorted stably by zone (``argsort(zone, stable=True)``)
 4    sizes           *i32 [Z]      tokens per zone (``bincount(zone)``)
 5    N               i32           tokens per request
 6    Z               i32           zone slots
 7    out             *i32 [B,K]    kept indices, ascending
 8    quota           *i32 [B,Z]    the zone quotas (a by-product, equal to ``allocate_quotas``)
 9    ws              *i64 [B,3Z]   workspace (no initialisation needed)
====  ==============  ============  =========================================================================

Grid ``(B, 1, 1)``: one program per request (the allocation needs every zone, and the output order needs
every zone's threshold, so the request stays in one CTA); block ``32 * num_warps`` threads (4 warps);
shared memory as reported by the compiler (reductions only). Constexprs: ``K``, ``TAU`` (baked as an fp64
constant), ``ZONE_MEAN`` and the block sizes. Work per request: O(Z^2) for the allocation, O(N (tile + 2 n_z))
for the per-zone ranks, O(N) for the output.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .._deps import require
from ..errors import BackendError, BudgetError, EdgepruneError, MethodArgumentError

triton = require("triton")
tl = triton.language

if TYPE_CHECKING:  # pragma: no cover
    import torch

# Threshold sentinels (constexpr so kernels can read them): the zone keeps no token / every token.
KEEP_NONE = tl.constexpr(-1)
KEEP_ALL = tl.constexpr(-2)


@triton.jit
def _zone_logit(rel_row, sizes_ptr, z, Z, TAU: tl.constexpr):
    """``rel / tau`` in float64 for zone indices ``z`` (a vector), ``-inf`` for empty or padded slots."""
    valid = z < Z
    n = tl.load(sizes_ptr + z, mask=valid, other=0)
    r = tl.load(rel_row + z, mask=valid, other=0.0).to(tl.float64)
    tau = tl.full([], TAU, tl.float64)  # tl.full keeps the double; a bare constexpr float would be fp32
    return tl.where(n > 0, r / tau, float("-inf")), n


@triton.jit
def _zone_p(p_row, sizes_ptr, z, Z, K: tl.constexpr):
    """P (stored once), floor(K P), the fractional part and the size of zones ``z``."""
    p = tl.load(p_row + z, mask=z < Z, other=0.0)
    scaled = K * p
    fl = tl.floor(scaled)
    return p, fl, scaled - fl, tl.load(sizes_ptr + z, mask=z < Z, other=0)


@triton.jit
def _zone_means(rel_tok_row, zone_ptr, sizes_ptr, mean_row, N, Z, BLOCK_Z: tl.constexpr, BLOCK_N: tl.constexpr):
    """Float64 mean of the per-token relevance over every zone (0 for empty zones), as masked tile sums."""
    offs_z = tl.arange(0, BLOCK_Z)
    offs_n = tl.arange(0, BLOCK_N)
    for z0 in range(0, Z, BLOCK_Z):
        z = z0 + offs_z
        acc = tl.zeros([BLOCK_Z], tl.float64)
        for n0 in range(0, N, BLOCK_N):
            ok = n0 + offs_n < N
            zt = tl.load(zone_ptr + n0 + offs_n, mask=ok, other=-1)
            r = tl.load(rel_tok_row + n0 + offs_n, mask=ok, other=0.0).to(tl.float64)
            acc += tl.sum(tl.where(zt[None, :] == z[:, None], r[None, :], 0.0), 1)
        n = tl.load(sizes_ptr + z, mask=z < Z, other=0)
        tl.store(mean_row + z, acc / tl.maximum(n, 1).to(tl.float64), mask=z < Z)


@triton.jit
def _softmax(rel_row, sizes_ptr, p_row, Z, K: tl.constexpr, TAU: tl.constexpr, BLOCK_Z: tl.constexpr):
    """Store ``P = exp(l - max) / sum`` in ``p_row``; return ``K - sum floor(K P)``, the number of bonuses."""
    offs = tl.arange(0, BLOCK_Z)
    m = tl.full([], float("-inf"), tl.float64)
    for z0 in range(0, Z, BLOCK_Z):
        logit, n = _zone_logit(rel_row, sizes_ptr, z0 + offs, Z, TAU)
        m = tl.maximum(m, tl.max(logit, 0))
    s = tl.zeros([], tl.float64)
    for z0 in range(0, Z, BLOCK_Z):
        logit, n = _zone_logit(rel_row, sizes_ptr, z0 + offs, Z, TAU)
        s += tl.sum(tl.exp(logit - m), 0)
    floor_sum = 0
    for z0 in range(0, Z, BLOCK_Z):
        z = z0 + offs
        logit, n = _zone_logit(rel_row, sizes_ptr, z, Z, TAU)
        p = tl.exp(logit - m) / s
        tl.store(p_row + z, p, mask=z < Z)
        floor_sum += tl.sum(tl.floor(K * p).to(tl.int32), 0)  # the same ops as _zone_p, so the same bits
    return K - floor_sum


@triton.jit
def _capped_quotas(p_row, sizes_ptr, ws_row, Z, remaining, K: tl.constexpr, BLOCK_Z: tl.constexpr):
    """Largest-remainder quotas capped at the zone sizes, stored in ``ws_row``; returns the excess to hand out.

    A zone gets a bonus when fewer than ``remaining`` zones rank before it by (fraction desc, zone id asc),
    which is ``_rank_descending(frac) < remaining`` of the reference without a sort.
    """
    offs = tl.arange(0, BLOCK_Z)
    capped_sum = 0
    for z0 in range(0, Z, BLOCK_Z):
        z = z0 + offs
        p, fl, frac, n = _zone_p(p_row, sizes_ptr, z, Z, K)
        rank = tl.zeros([BLOCK_Z], tl.int32)
        for j0 in range(0, Z, BLOCK_Z):
            j = j0 + offs
            pj, flj, fracj, nj = _zone_p(p_row, sizes_ptr, j, Z, K)
            first = (fracj[None, :] > frac[:, None]) | ((fracj[None, :] == frac[:, None]) & (j[None, :] < z[:, None]))
            rank += tl.sum((first & (j < Z)[None, :]).to(tl.int32), 1)
        capped = tl.minimum(fl.to(tl.int32) + (rank < remaining).to(tl.int32), n)
        tl.store(ws_row + z, capped.to(tl.int64), mask=z < Z)
        capped_sum += tl.sum(tl.where(z < Z, capped, 0), 0)
    return K - capped_sum


@triton.jit
def _fill_quotas(p_row, sizes_ptr, ws_row, quota_row, Z, excess, K: tl.constexpr, BLOCK_Z: tl.constexpr):
    """Hand the excess to zones with room in descending P (ties to the lower id): the ``_cap_and_fill`` closed form."""
    offs = tl.arange(0, BLOCK_Z)
    for z0 in range(0, Z, BLOCK_Z):
        z = z0 + offs
        p, fl, frac, n = _zone_p(p_row, sizes_ptr, z, Z, K)
        capped = tl.load(ws_row + z, mask=z < Z, other=0).to(tl.int32)
        before = tl.zeros([BLOCK_Z], tl.int32)
        for j0 in range(0, Z, BLOCK_Z):
            j = j0 + offs
            pj, flj, fracj, nj = _zone_p(p_row, sizes_ptr, j, Z, K)
            spare_j = nj - tl.load(ws_row + j, mask=j < Z, other=0).to(tl.int32)
            first = (pj[None, :] > p[:, None]) | ((pj[None, :] == p[:, None]) & (j[None, :] < z[:, None]))
            before += tl.sum(tl.where(first & (j < Z)[None, :], spare_j[None, :], 0), 1)
        add = tl.minimum(tl.maximum(excess - before, 0), n - capped)
        tl.store(quota_row + z, capped + add, mask=z < Z)


@triton.jit
def _zone_start(sizes_ptr, z, Z, BLOCK_Z: tl.constexpr):
    """First position of zone ``z`` (a scalar) in the zone-sorted token order: the sizes of the zones before it."""
    offs = tl.arange(0, BLOCK_Z)
    start = 0
    for j0 in range(0, Z, BLOCK_Z):
        j = j0 + offs
        start += tl.sum(tl.load(sizes_ptr + j, mask=(j < Z) & (j < z), other=0), 0)
    return start


@triton.jit
def _zone_thresholds(scores_row, zone_ptr, order_ptr, sizes_ptr, quota_row, ws_row, N, Z, BLOCK_Z: tl.constexpr,
                     BLOCK_M: tl.constexpr):
    """Store every zone's threshold token, the member of rank ``k_z - 1``, in ``ws_row``.

    Zones with ``k_z = 0`` or ``k_z = n_z`` get the KEEP_NONE / KEEP_ALL sentinels. Ranks are counted over the
    zone-sorted order: a tile of sorted positions only meets the members of its own zones, which form one
    contiguous window, so the work is about ``N * (tile + 2 * zone size)`` comparisons instead of ``N^2``.
    """
    offs_z = tl.arange(0, BLOCK_Z)
    for z0 in range(0, Z, BLOCK_Z):
        z = z0 + offs_z
        q = tl.load(quota_row + z, mask=z < Z, other=0)
        n = tl.load(sizes_ptr + z, mask=z < Z, other=0)
        tl.store(ws_row + z, tl.where(q == n, KEEP_ALL, KEEP_NONE).to(tl.int64), mask=z < Z)
    tl.debug_barrier()  # the sentinels are written before the threshold tokens overwrite some of them
    offs = tl.arange(0, BLOCK_M)
    for p0 in range(0, N, BLOCK_M):
        ok_a = p0 + offs < N
        ia = tl.load(order_ptr + p0 + offs, mask=ok_a, other=0)
        za = tl.load(zone_ptr + ia, mask=ok_a, other=-1)
        sa = tl.load(scores_row + ia, mask=ok_a, other=0.0)
        z_last = tl.load(zone_ptr + tl.load(order_ptr + tl.minimum(p0 + BLOCK_M, N) - 1))
        w0 = _zone_start(sizes_ptr, tl.load(zone_ptr + tl.load(order_ptr + p0)), Z, BLOCK_Z)
        w1 = _zone_start(sizes_ptr, z_last, Z, BLOCK_Z) + tl.load(sizes_ptr + z_last)
        rank = tl.zeros([BLOCK_M], tl.int32)
        for j0 in range(w0, w1, BLOCK_M):
            ok_b = j0 + offs < w1
            ib = tl.load(order_ptr + j0 + offs, mask=ok_b, other=0)
            zb = tl.load(zone_ptr + ib, mask=ok_b, other=-2)
            sb = tl.load(scores_row + ib, mask=ok_b, other=0.0)
            first = (sb[None, :] > sa[:, None]) | ((sb[None, :] == sa[:, None]) & (ib[None, :] < ia[:, None]))
            rank += tl.sum((first & (zb[None, :] == za[:, None])).to(tl.int32), 1)
        qa = tl.load(quota_row + za, mask=ok_a, other=0)
        na = tl.load(sizes_ptr + za, mask=ok_a, other=0)
        hit = ok_a & (qa > 0) & (qa < na) & (rank == qa - 1)  # exactly one member per such zone
        tl.store(ws_row + za, ia.to(tl.int64), mask=hit)


@triton.jit
def _emit_kept(scores_row, zone_ptr, ws_row, out_row, N, K: tl.constexpr, BLOCK_N: tl.constexpr):
    """Write the tokens at or above their zone threshold, in ascending index order (a running prefix count)."""
    offs = tl.arange(0, BLOCK_N)
    for k0 in range(0, K, BLOCK_N):  # -1 marks slots left empty by invalid (NaN) input instead of stale data
        tl.store(out_row + k0 + offs, tl.full([BLOCK_N], -1, tl.int32), mask=k0 + offs < K)
    tl.debug_barrier()
    count = 0
    for i0 in range(0, N, BLOCK_N):
        i = i0 + offs
        ok = i < N
        t = tl.load(ws_row + tl.load(zone_ptr + i, mask=ok, other=0), mask=ok, other=-1).to(tl.int32)
        si = tl.load(scores_row + i, mask=ok, other=0.0)
        st = tl.load(scores_row + t, mask=ok & (t >= 0), other=0.0)
        keep = ok & ((t == KEEP_ALL) | ((t >= 0) & ((si > st) | ((si == st) & (i <= t)))))
        pos = count + tl.cumsum(keep.to(tl.int32), 0) - 1
        tl.store(out_row + pos, i, mask=keep & (pos < K))
        count += tl.sum(keep.to(tl.int32), 0)


@triton.jit
def zonal_topk_kernel(scores_ptr, rel_ptr, zone_ptr, order_ptr, sizes_ptr, N, Z, out_ptr, quota_ptr, ws_ptr,
                      K: tl.constexpr, TAU: tl.constexpr, ZONE_MEAN: tl.constexpr, BLOCK_Z: tl.constexpr,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """One request per program: allocate K over the zones, then keep each zone's top-k_z (see module doc)."""
    b = tl.program_id(0).to(tl.int64)
    scores_row = scores_ptr + b * N
    ws_row = ws_ptr + b * 3 * Z  # [0, Z): integer scratch, [Z, 2Z): float64 zone means, [2Z, 3Z): float64 P
    quota_row = quota_ptr + b * Z
    if ZONE_MEAN:
        rel_row = (ws_row + Z).to(tl.pointer_type(tl.float64), bitcast=True)
        _zone_means(rel_ptr + b * N, zone_ptr, sizes_ptr, rel_row, N, Z, BLOCK_Z, BLOCK_M)
        tl.debug_barrier()  # the means are read back by other threads of this program
    else:
        rel_row = rel_ptr + b * Z
    p_row = (ws_row + 2 * Z).to(tl.pointer_type(tl.float64), bitcast=True)
    remaining = _softmax(rel_row, sizes_ptr, p_row, Z, K, TAU, BLOCK_Z)
    tl.debug_barrier()  # P is read back by other threads
    excess = _capped_quotas(p_row, sizes_ptr, ws_row, Z, remaining, K, BLOCK_Z)
    tl.debug_barrier()
    _fill_quotas(p_row, sizes_ptr, ws_row, quota_row, Z, excess, K, BLOCK_Z)
    tl.debug_barrier()  # every capped quota is read before the thresholds overwrite the scratch
    _zone_thresholds(scores_row, zone_ptr, order_ptr, sizes_ptr, quota_row, ws_row, N, Z, BLOCK_Z, BLOCK_M)
    tl.debug_barrier()
    _emit_kept(scores_row, zone_ptr, ws_row, out_ptr + b * K, N, K, BLOCK_N)


# Block sizes: small tiles keep register use low on a GPU; the CPU interpreter pays per operation, not per
# element, so it gets larger tiles (same code paths, fewer iterations).
GPU_BLOCKS = {"BLOCK_Z": 32, "BLOCK_M": 64, "BLOCK_N": 256}
INTERPRETER_BLOCKS = {"BLOCK_Z": 256, "BLOCK_M": 1024, "BLOCK_N": 1024}
NUM_WARPS = 4


def is_interpreted() -> bool:
    """True when Triton was imported with ``TRITON_INTERPRET=1`` (kernels then run on the CPU interpreter)."""
    return type(zonal_topk_kernel).__name__ == "InterpretedFunction"


def check_device(tensor: "torch.Tensor", op: str) -> None:
    """Refuse CPU tensors unless the interpreter is active (a compiled Triton kernel needs a GPU).

    Raises:
        BackendError: the tensor is on the CPU and Triton is not in interpreter mode.
    """
    if tensor.device.type == "cpu" and not is_interpreted():
        raise BackendError(
            f"{op}: the Triton kernel needs CUDA tensors, got CPU tensors; move the inputs to a GPU, or run the "
            "CPU interpreter by setting TRITON_INTERPRET=1 before triton is first imported"
        )


def _validate(scores, zone, relevance, per_token: bool, k: int, tau: float, num_zones: int) -> None:
    """Shape, budget and finiteness checks with messages that say what to fix (a few host syncs)."""
    import torch

    if scores.dim() != 2 or zone.dim() != 1 or zone.shape[0] != scores.shape[1]:
        raise BackendError(f"zonal_topk: need scores [B, N] and zone [N]; got {tuple(scores.shape)} and "
                           f"{tuple(zone.shape)}")
    b, n = scores.shape
    want = (b, n) if per_token else (b, num_zones)
    if tuple(relevance.shape) != want:
        what = "token_relevance [B, N]" if per_token else "zone_relevance [B, Z]"
        raise BackendError(f"zonal_topk: {what} must have shape {want}; got {tuple(relevance.shape)}")
    if not 1 <= k <= n:
        raise BudgetError(f"zonal_topk: the budget K must be in [1, N = {n}]; got K = {k}")
    if not tau > 0:
        raise MethodArgumentError(f"zonal_topk: tau must be > 0; got {tau}")
    if n and (int(zone.min()) < 0 or int(zone.max()) >= num_zones):
        raise BackendError(f"zonal_topk: zone ids must lie in [0, {num_zones}); got [{int(zone.min())}, "
                           f"{int(zone.max())}]")
    if scores.dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        raise BackendError(f"zonal_topk: scores must be floating point; got {scores.dtype}")
    if bool(torch.isnan(scores).any()):
        raise EdgepruneError("zonal_topk: the scores contain NaN, which has no rank; fix the upstream stage "
                             "(+-inf is allowed and ranks like any value)")
    present = torch.bincount(zone, minlength=num_zones) > 0
    logits = relevance.to(torch.float64) / tau
    bad = ~torch.isfinite(logits) if per_token else ~torch.isfinite(logits) & present
    if bool(bad.any()):
        raise EdgepruneError("zonal_topk: the relevance (divided by tau) of a present zone or token is NaN or "
                             "infinite, so the zone softmax is undefined; check the relevance and tau")


def zonal_topk(
    scores: "torch.Tensor",
    zone: "torch.Tensor",
    k: int,
    tau: float,
    *,
    zone_relevance: "torch.Tensor | None" = None,
    token_relevance: "torch.Tensor | None" = None,
    num_zones: int | None = None,
    check_inputs: bool = True,
    return_quotas: bool = False,
):
    """GridPrune's zone allocation and per-zone Top-K in one fused kernel launch.

    Equals ``gridprune_fn.zonal_topk(scores, zone, allocate_quotas(zone_relevance, zone_sizes(zone, Z), k,
    tau), k)`` (with ``token_relevance``: ``zone_relevance = zone_mean(token_relevance, zone, Z)``), see the
    module docstring for the exactness argument. Runs on CUDA tensors, or on CPU tensors under the Triton
    interpreter (``TRITON_INTERPRET=1`` set by the caller before triton is imported).

    Args:
        scores: [B, N] float local scores (any float dtype, compared in that dtype; no NaN, +-inf allowed).
        zone: [N] int zone ids in ``[0, Z)``.
        k: the budget, 1 <= K <= N.
        tau: zone softmax temperature, > 0.
        zone_relevance: [B, Z] zone relevance, computed with in float64 (pass float64 for exactness).
        token_relevance: [B, N] per-token relevance instead; the kernel takes the zone means in float64.
        num_zones: Z (default: ``zone_relevance.shape[-1]``, else ``zone.max() + 1``).
        check_inputs: validate budget, ids and finiteness first (host syncs); turn off only for trusted input.
        return_quotas: also return the quotas.
    Returns:
        [B, K] int32 kept indices, ascending; with ``return_quotas`` also the [B, Z] int32 quotas.
    Raises:
        BudgetError: K outside [1, N].
        MethodArgumentError: tau <= 0.
        EdgepruneError: NaN scores, or non-finite relevance / tau of a present zone.
        BackendError: inconsistent shapes or ids, both or neither relevance given, CPU tensors without the
            interpreter.
    """
    import torch

    if (zone_relevance is None) == (token_relevance is None):
        raise BackendError("zonal_topk: give exactly one of zone_relevance [B, Z] and token_relevance [B, N]")
    per_token = token_relevance is not None
    check_device(scores, "zonal_topk")
    device = scores.device
    relevance = (token_relevance if per_token else zone_relevance).to(device).contiguous()
    zone = zone.to(device=device, dtype=torch.int64)
    if num_zones is None:
        num_zones = int(zone.max()) + 1 if per_token else relevance.shape[-1]
    if check_inputs:
        _validate(scores, zone, relevance, per_token, k, tau, num_zones)
    b, n = scores.shape
    sizes = torch.bincount(zone, minlength=num_zones).to(torch.int32)
    order = torch.sort(zone, stable=True).indices.to(torch.int32)
    out = torch.empty(b, k, dtype=torch.int32, device=device)
    quota = torch.empty(b, num_zones, dtype=torch.int32, device=device)
    ws = torch.empty(b, 3 * num_zones, dtype=torch.int64, device=device)
    blocks = INTERPRETER_BLOCKS if is_interpreted() else GPU_BLOCKS
    zonal_topk_kernel[(b,)](
        scores.contiguous(), relevance, zone.to(torch.int32), order, sizes, n, num_zones,
        out, quota, ws, K=k, TAU=float(tau), ZONE_MEAN=per_token, **blocks,
        num_warps=NUM_WARPS, enable_fp_fusion=False,
    )
    return (out, quota) if return_quotas else out
