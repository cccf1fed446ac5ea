"""Fused ``GraphRank`` (G-Prune's similarity graph, propagation and Top-K) as a fixed sequence of Triton kernels.

Reproduces :func:`edgeprune.methods.gprune_fn.gprune_scores` followed by
:func:`edgeprune.methods.functional.stable_topk` (METHODS.md decision 5), everything in float32::

    norm   = ||x_i||                              graph_norm_kernel          [B, N]
    L_ij   = S_ij / T, S_ij < theta -> 0 -> -5000   graph_sim_kernel (pass 1)  [B, N, N] workspace
    A      = row softmax of L (max, sum, divide)  graph_sim_kernel (pass 2-3), in place; deg_i = #{A_ij > 0}
    v      = v A   (steps times)                  graph_step_kernel, ping-pong buffers
    score  = v / deg; rank; threshold token       graph_select_kernel
    kept   = tokens at or above the threshold     graph_emit_kernel, ascending

N (up to 2,880 and beyond) and D (up to 4,096 and beyond) are tiled: the similarity loops over column tiles
and D chunks, the propagation over row chunks, the Top-K over token tiles; nothing assumes one block holds a
row. The similarity, the softmax and every propagation step need the whole previous result, hence a sequence
of launches rather than one kernel (grid-wide barriers would need a cooperative launch, which TensorRT AOT
plugins cannot request).

Exactness. Ranks use exact comparisons with ties to the lower index, so equal scores resolve like the
reference. Scores agree with the reference to fp32 rounding (different summation orders in the dot products
and the propagation, ``ex2``-based exp on GPUs); they are not bit-equal. Hence kept indices equal the
reference's except where two scores straddling the K-th place differ by less than that rounding (about 1e-6
relative); and since the degree counts neighbours with ``S_ij >= theta``, a similarity within rounding of
theta can flip one edge. Tests compare scores with a tolerance and indices exactly on inputs whose similarity
margin to theta and score gap at the K-th place exceed it.

Launch contract (argument order = TensorRT AOT order: inputs, int32 scalars, outputs; contiguous tensors;
``x`` any float dtype, loaded as fp32; 4 warps = 128 threads per program; shared memory as the compiler reports):

=====================  ===========================  ===========================================  ==============
kernel                 grid                         arguments                                     constexprs
=====================  ===========================  ===========================================  ==============
graph_norm_kernel      (B, cdiv(N, BLOCK_M))        x [B,N,D], N, D, norm [B,N] f32,              BLOCK_M/D
                                                    thr [B] i32 (reset to -1)
graph_sim_kernel       (B, cdiv(N, BLOCK_M))        x, norm, N, D, attn [B,N,N] f32, deg [B,N] f32  THETA, TEMP,
                                                                                                  PRECISION, blocks
graph_step_kernel      (B, cdiv(N, BLOCK_N))        attn, v_in [B,N], N, v_out [B,N] f32           BLOCK_N/K
graph_select_kernel    (B, cdiv(N, BLOCK_M))        v, deg, N, score [B,N] f32, thr [B] i32,       K, blocks
                                                    out [B,K] i32 (reset to -1)
graph_emit_kernel      (B, cdiv(N, BLOCK_M))        score, thr, N, out [B,K] i32                   K, BLOCK_M
=====================  ===========================  ===========================================  ==============

Sequence: norm; sim; ``steps`` times step (v_in = norm, then alternate two buffers); select with the last v;
emit. Workspace per request: N^2 + 4N floats.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .._deps import require
from ..errors import BackendError, BudgetError, EdgepruneError, MethodArgumentError

triton = require("triton")
tl = triton.language

if TYPE_CHECKING:  # pragma: no cover
    import torch

# Globals read inside kernels must be constexpr for Triton.
MASKED_LOGIT = tl.constexpr(-5000.0)  # as gprune_fn.MASKED_LOGIT: exp(-5000 - max) is exactly 0 in float32
NORM_EPS = tl.constexpr(1e-12)  # torch.nn.functional.normalize's eps


@triton.jit
def graph_norm_kernel(x_ptr, N, D, norm_ptr, thr_ptr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    """Row norms ``||x_i||`` (the initial information and the normaliser); resets the threshold slot."""
    b = tl.program_id(0).to(tl.int64)
    i = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    acc = tl.zeros([BLOCK_M], tl.float32)
    for d0 in range(0, D, BLOCK_D):
        d = d0 + offs_d
        x = tl.load(x_ptr + b * N * D + i[:, None] * D + d[None, :], mask=(i[:, None] < N) & (d[None, :] < D),
                    other=0.0).to(tl.float32)
        acc += tl.sum(x * x, 1)
    tl.store(norm_ptr + b * N + i, tl.sqrt_rn(acc), mask=i < N)
    if tl.program_id(1) == 0:
        tl.store(thr_ptr + b, -1)  # "no threshold yet": graph_emit keeps nothing unless select finds one


@triton.jit
def _cosine_tile(x_row, norm_row, i, j, N, D, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                 BLOCK_D: tl.constexpr, PRECISION: tl.constexpr):
    """``S[i, j]`` of row-normalised features, fp32 accumulation over D chunks (normalise first, as the reference)."""
    di = tl.maximum(tl.load(norm_row + i, mask=i < N, other=1.0), NORM_EPS)
    dj = tl.maximum(tl.load(norm_row + j, mask=j < N, other=1.0), NORM_EPS)
    offs_d = tl.arange(0, BLOCK_D)
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for d0 in range(0, D, BLOCK_D):
        d = d0 + offs_d
        xi = tl.load(x_row + i[:, None] * D + d[None, :], mask=(i[:, None] < N) & (d[None, :] < D), other=0.0)
        xj = tl.load(x_row + j[:, None] * D + d[None, :], mask=(j[:, None] < N) & (d[None, :] < D), other=0.0)
        xi = tl.math.div_rn(xi.to(tl.float32), di[:, None])
        xj = tl.math.div_rn(xj.to(tl.float32), dj[:, None])
        acc = tl.dot(xi, tl.trans(xj), acc, input_precision=PRECISION)
    return acc


@triton.jit
def graph_sim_kernel(x_ptr, norm_ptr, N, D, attn_ptr, deg_ptr, THETA: tl.constexpr, TEMP: tl.constexpr,
                     PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """Rows ``i`` of the transition matrix A (stored in ``attn``) and their degrees.

    Three passes over the row block, as ``torch.softmax``: logits and row max; sum of ``exp(L - max)``;
    ``A = exp(L - max) / sum`` and the count of ``A > 0``. Passes 2-3 re-read the logits that pass 1 wrote.
    """
    b = tl.program_id(0).to(tl.int64)
    i = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    x_row = x_ptr + b * N * D
    norm_row = norm_ptr + b * N
    attn_rows = attn_ptr + b * N * N + i[:, None].to(tl.int64) * N
    m = tl.full([BLOCK_M], float("-inf"), tl.float32)
    for j0 in range(0, N, BLOCK_N):
        j = j0 + offs_n
        ok = (i[:, None] < N) & (j[None, :] < N)
        s = _cosine_tile(x_row, norm_row, i, j, N, D, BLOCK_M, BLOCK_N, BLOCK_D, PRECISION)
        logit = tl.math.div_rn(tl.where(s < THETA, 0.0, s), TEMP)
        logit = tl.where(logit == 0.0, MASKED_LOGIT, logit)  # only exact zeros are masked, as the reference
        tl.store(attn_rows + j[None, :], logit, mask=ok)
        m = tl.maximum(m, tl.max(tl.where(ok, logit, float("-inf")), 1))
    m = tl.where(i < N, m, 0.0)  # padding rows (all -inf) would give -inf - -inf = NaN
    tl.debug_barrier()  # the logits are re-read by other threads of this program
    total = tl.zeros([BLOCK_M], tl.float32)
    for j0 in range(0, N, BLOCK_N):
        j = j0 + offs_n
        ok = (i[:, None] < N) & (j[None, :] < N)
        logit = tl.load(attn_rows + j[None, :], mask=ok, other=float("-inf"))
        total += tl.sum(tl.exp(logit - m[:, None]), 1)  # exp(-inf) = 0 for the padding
    total = tl.where(i < N, total, 1.0)  # padding rows: avoid 0 / 0
    tl.debug_barrier()  # pass 3 overwrites entries; no thread may still be reading them in pass 2
    deg = tl.zeros([BLOCK_M], tl.float32)
    for j0 in range(0, N, BLOCK_N):
        j = j0 + offs_n
        ok = (i[:, None] < N) & (j[None, :] < N)
        logit = tl.load(attn_rows + j[None, :], mask=ok, other=float("-inf"))
        a = tl.math.div_rn(tl.exp(logit - m[:, None]), total[:, None])
        tl.store(attn_rows + j[None, :], a, mask=ok)
        deg += tl.sum((a > 0.0).to(tl.float32), 1)
    tl.store(deg_ptr + b * N + i, deg, mask=i < N)


@triton.jit
def graph_step_kernel(attn_ptr, v_ptr, N, out_ptr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """One propagation step ``out[j] = sum_i v[i] A[i, j]`` for a tile of columns, fp32 accumulation."""
    b = tl.program_id(0).to(tl.int64)
    j = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    acc = tl.zeros([BLOCK_N], tl.float32)
    for i0 in range(0, N, BLOCK_K):
        i = i0 + offs_k
        v = tl.load(v_ptr + b * N + i, mask=i < N, other=0.0)
        a = tl.load(attn_ptr + b * N * N + i[:, None].to(tl.int64) * N + j[None, :],
                    mask=(i[:, None] < N) & (j[None, :] < N), other=0.0)
        acc += tl.sum(v[:, None] * a, 0)
    tl.store(out_ptr + b * N + j, acc, mask=j < N)


@triton.jit
def graph_select_kernel(v_ptr, deg_ptr, N, score_ptr, thr_ptr, out_ptr, K: tl.constexpr, BLOCK_M: tl.constexpr,
                        BLOCK_N: tl.constexpr):
    """Scores ``v / deg`` of a token tile, their ranks (score desc, index asc), and the token of rank K-1.

    Exactly one token in the request has rank K-1, so exactly one program writes ``thr``; the other tiles'
    scores are recomputed (the same division, so the same bits) instead of read, which needs no grid barrier.
    """
    b = tl.program_id(0).to(tl.int64)
    i = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    ok_i = i < N
    si = tl.math.div_rn(tl.load(v_ptr + b * N + i, mask=ok_i, other=0.0), tl.load(deg_ptr + b * N + i, mask=ok_i,
                                                                                  other=1.0))
    tl.store(score_ptr + b * N + i, si, mask=ok_i)
    offs_n = tl.arange(0, BLOCK_N)
    rank = tl.zeros([BLOCK_M], tl.int32)
    for j0 in range(0, N, BLOCK_N):
        j = j0 + offs_n
        ok_j = j < N
        sj = tl.math.div_rn(tl.load(v_ptr + b * N + j, mask=ok_j, other=0.0), tl.load(deg_ptr + b * N + j,
                                                                                      mask=ok_j, other=1.0))
        first = (sj[None, :] > si[:, None]) | ((sj[None, :] == si[:, None]) & (j[None, :] < i[:, None]))
        rank += tl.sum((first & ok_j[None, :]).to(tl.int32), 1)
    tl.store(thr_ptr + b + tl.zeros([BLOCK_M], tl.int64), i, mask=ok_i & (rank == K - 1))
    if tl.program_id(1) == 0:  # -1 marks slots that invalid (NaN) input would leave empty
        for k0 in range(0, K, BLOCK_M):
            kk = k0 + tl.arange(0, BLOCK_M)
            tl.store(out_ptr + b * K + kk, tl.full([BLOCK_M], -1, tl.int32), mask=kk < K)


@triton.jit
def graph_emit_kernel(score_ptr, thr_ptr, N, out_ptr, K: tl.constexpr, BLOCK_M: tl.constexpr):
    """Write the kept tokens of a tile at their ascending positions (kept tokens before the tile + prefix count)."""
    b = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK_M)
    # t as a vector: the interpreter mis-types (vector bool & scalar bool), so keep every mask a vector
    t = tl.load(thr_ptr + b) + tl.zeros([BLOCK_M], tl.int32)
    valid_t = (t >= 0) & (t < N)
    st = tl.load(score_ptr + b * N + tl.where(valid_t, t, 0))
    tile0 = tl.program_id(1) * BLOCK_M
    before = 0
    for j0 in range(0, tile0, BLOCK_M):
        j = j0 + offs
        sj = tl.load(score_ptr + b * N + j)  # j < tile0 <= N: always in range
        before += tl.sum(((sj > st) | ((sj == st) & (j <= t))).to(tl.int32), 0)
    i = tile0 + offs
    si = tl.load(score_ptr + b * N + i, mask=i < N, other=0.0)
    keep = (i < N) & valid_t & ((si > st) | ((si == st) & (i <= t)))
    pos = before + tl.cumsum(keep.to(tl.int32), 0) - 1
    tl.store(out_ptr + b * K + pos, i, mask=keep & (pos < K))


# Block sizes (GPU: register-friendly tiles; interpreter: large tiles, since it pays per operation).
GPU_BLOCKS = {
    "norm": {"BLOCK_M": 32, "BLOCK_D": 128}, "sim": {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_D": 32},
    "step": {"BLOCK_N": 128, "BLOCK_K": 32}, "select": {"BLOCK_M": 128, "BLOCK_N": 128}, "emit": {"BLOCK_M": 256},
}
INTERPRETER_BLOCKS = {
    "norm": {"BLOCK_M": 256, "BLOCK_D": 256}, "sim": {"BLOCK_M": 1024, "BLOCK_N": 1024, "BLOCK_D": 64},
    "step": {"BLOCK_N": 1024, "BLOCK_K": 256}, "select": {"BLOCK_M": 1024, "BLOCK_N": 1024}, "emit": {"BLOCK_M": 1024},
}
NUM_WARPS = 4
PRECISIONS = ("ieee", "tf32x3", "tf32")


def _validate(x, k: int, threshold: float, temperature: float, steps: int, precision: str) -> None:
    """Shape, parameter and finiteness checks (one host sync)."""
    import torch

    if x.dim() != 3 or not x.is_floating_point():
        raise BackendError(f"graph_rank: x must be a float tensor [B, N, D]; got {tuple(x.shape)} {x.dtype}")
    n = x.shape[1]
    if not 1 <= k <= n:
        raise BudgetError(f"graph_rank: the budget K must be in [1, N = {n}]; got K = {k}")
    if not temperature > 0 or steps < 0:
        raise MethodArgumentError(f"graph_rank: need temperature > 0 and steps >= 0; got {temperature}, {steps}")
    if precision not in PRECISIONS:
        raise MethodArgumentError(f"graph_rank: precision must be one of {', '.join(PRECISIONS)}; got {precision!r}")
    if not bool(torch.isfinite(x).all()):
        raise EdgepruneError("graph_rank: the features contain NaN or inf, for which the cosine graph is undefined; "
                             "fix the upstream stage")


def graph_rank(
    x: "torch.Tensor",
    k: int,
    threshold: float = 0.5,
    temperature: float = 0.03,
    steps: int = 5,
    *,
    precision: str = "ieee",
    check_inputs: bool = True,
    return_scores: bool = False,
):
    """G-Prune's scores and Top-K of one group of tokens with the fused kernel sequence.

    Equals ``stable_topk(gprune_scores(x, threshold, temperature, steps), k)`` (see the module docstring for
    how near-equal scores are handled). Runs on CUDA tensors, or on CPU tensors under the Triton interpreter
    (``TRITON_INTERPRET=1`` set by the caller before triton is imported).

    Args:
        x: [B, N, D] token features (any float dtype; computed in float32).
        k: the budget, 1 <= K <= N.
        threshold: theta, cosines below it are cut.
        temperature: T > 0.
        steps: propagation steps n >= 0.
        precision: ``tl.dot`` input precision: ``ieee`` (true fp32, the default), ``tf32x3`` (near fp32, tensor
            cores) or ``tf32`` (fast, ~1e-3 error in S, which 1/T amplifies: not recommended).
        check_inputs: validate budget, parameters and finiteness first (a host sync).
        return_scores: also return the [B, N] float32 scores.
    Returns:
        [B, K] int32 kept indices, ascending; with ``return_scores`` also the scores.
    Raises:
        BudgetError: K outside [1, N].
        MethodArgumentError: temperature <= 0, steps < 0 or an unknown precision.
        EdgepruneError: non-finite features.
        BackendError: a bad shape, or CPU tensors without the interpreter.
    """
    import torch

    from .zonal_topk import check_device, is_interpreted

    check_device(x, "graph_rank")
    if check_inputs:
        _validate(x, k, threshold, temperature, steps, precision)
    x = x.contiguous()
    b, n, d = x.shape
    f32 = {"dtype": torch.float32, "device": x.device}
    norm, deg, score = (torch.empty(b, n, **f32) for _ in range(3))
    attn = torch.empty(b, n, n, **f32)
    thr = torch.empty(b, dtype=torch.int32, device=x.device)
    out = torch.empty(b, k, dtype=torch.int32, device=x.device)
    blocks = INTERPRETER_BLOCKS if is_interpreted() else GPU_BLOCKS
    opts = {"num_warps": NUM_WARPS}

    def grid(kind: str, key: str = "BLOCK_M") -> tuple[int, int]:
        return (b, triton.cdiv(n, blocks[kind][key]))

    graph_norm_kernel[grid("norm")](x, n, d, norm, thr, **blocks["norm"], **opts)
    graph_sim_kernel[grid("sim")](x, norm, n, d, attn, deg, THETA=float(threshold), TEMP=float(temperature),
                                  PRECISION=precision, **blocks["sim"], **opts)
    v, bufs = norm, (torch.empty(b, n, **f32), torch.empty(b, n, **f32))
    for step in range(steps):
        nxt = bufs[step % 2]  # never the buffer being read
        graph_step_kernel[grid("step", "BLOCK_N")](attn, v, n, nxt, **blocks["step"], **opts)
        v = nxt
    graph_select_kernel[grid("select")](v, deg, n, score, thr, out, K=k, **blocks["select"], **opts)
    graph_emit_kernel[grid("emit")](score, thr, n, out, K=k, **blocks["emit"], **opts)
    return (out, score) if return_scores else out


def graph_rank_select(x: "torch.Tensor", group: "torch.Tensor", k: int, threshold: float = 0.5,
                      temperature: float = 0.03, steps: int = 5, **kwargs) -> "torch.Tensor":
    """Drop-in for :func:`~edgeprune.methods.gprune_fn.gprune_select` with the kernels: rank each group, share K.

    Args:
        x: [B, N, D] token features.
        group: [N] int group ids >= 0 (0 = base view, 1 = LLaVA-NeXT high-res grid).
        k: the budget, 1 <= K <= N, split over the groups by largest remainder (``split_budget``).
        threshold, temperature, steps, kwargs: see :func:`graph_rank`.
    Returns:
        [B, K] int32 kept indices, ascending.
    Raises:
        BudgetError: K outside [1, N]; and what :func:`graph_rank` raises.
    """
    import torch

    from ..methods.gprune_fn import split_budget

    group = group.to(torch.int64).cpu()
    n = group.shape[0]
    if not 1 <= k <= n:
        raise BudgetError(f"graph_rank_select: the budget K must be in [1, N = {n}]; got K = {k}")
    kept = []
    for g, share in enumerate(split_budget(torch.bincount(group).tolist(), k)):
        if share:
            members = torch.nonzero(group == g).squeeze(1).to(x.device)  # ascending global indices
            idx = graph_rank(x[:, members], share, threshold, temperature, steps, **kwargs)
            kept.append(members[idx.long()])
    return torch.sort(torch.cat(kept, dim=-1), dim=-1).values.to(torch.int32)
