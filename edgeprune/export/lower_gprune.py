"""G-Prune's prune graph: one fused ``edgeprune.GraphRank`` node over the projected tokens (fp32).

``prune.onnx`` takes ``features [B,N,D]`` (and, for LLaVA-NeXT, ``group_ids [N]``: 0 = base view,
1 = unpadded high-resolution grid, computed by the host from the anyres layout) and returns
``kept [B,K,D]`` and ``kept_idx [B,K]`` int32, ascending. The ``GraphRank`` node (attributes K, threshold,
temperature, steps, num_groups + the plugin lookup fields) is a model-local function whose body follows
:mod:`edgeprune.methods.gprune_fn` step by step, in float32 whatever the model dtype (METHODS.md decision 5):

    xn = x / max(||x||, 1e-12); S = xn xnᵀ; S := 0 where S < θ or i, j in different groups
    L = S / T; L := -5000 where L == 0; A = Softmax(L); deg = Σ_j (A_ij > 0)
    v = ||x|| (row vector); v := v A  (``steps`` unrolled MatMuls); score = v / deg
    shares: K split over the groups by largest remainder, in exact int64 (``split_budget``)
    keep the top-share scores of each group (pairwise ranks, ties to the lower index), ascending

Groups in the graph (why): LLaVA-NeXT's grid size depends on the image, so the split cannot be baked in and
per-group slices would have data-dependent shapes. Instead the graph is built over all N tokens with
cross-group edges cut like sub-threshold ones: their logits are masked to -5000, whose ``exp`` is exactly 0
in float32, so every row's softmax, degree and propagation equal the per-group computation of the reference
up to float32 summation order. The budget split is integer arithmetic on the group sizes, exact.

Exactness: the scores are float32 and are reduced in a different order than PyTorch's, so they agree to
~1e-6 relative; kept indices equal :func:`~edgeprune.methods.gprune_fn.gprune_select` wherever the gap
between a group's last kept and first dropped score exceeds that (bit-equal scores, e.g. duplicated tokens,
are broken by the lower index in both). Ops: ReduceSum, Sqrt, Max, Div, Transpose, MatMul, Less, Equal, Not,
Or, Where, Softmax, Greater, Cast, Mul, Mod, Gather, And, TopK (standard opset 18, all in TensorRT).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .lower_gridprune import EPS
from .onnx_builder import Builder, make_function, make_model, plugin_attributes, value_info
from ..bundle.spec import GraphSpec, TensorSpec

OP = "GraphRank"
MASKED_LOGIT = -5000.0  # gprune_fn.MASKED_LOGIT


def graph_rank_body(k: int, threshold: float, temperature: float, steps: int, num_groups: int) -> Builder:
    """The standard-op body of ``GraphRank``: ``(x [B,N,D] f32, group [N] i32) -> kept_idx [B,K] i32``."""
    b = Builder(f"/{OP}")
    n = b.dim("x", 1, name="N")
    group = b.cast("group", "int64", name="group64")
    same = b.op("Equal", b.unsqueeze(group, 1, name="gi"), b.unsqueeze(group, 0, name="gj"), name="same_group")
    with b.scope("graph"):
        norm = b.op("Sqrt", b.reduce("ReduceSum", b.op("Mul", "x", "x"), -1, name="sum_sq"), name="norm")  # [B,N,1]
        xn = b.op("Div", "x", b.op("Max", norm, b.const(EPS, np.float32, "eps")), name="normalized")
        sim = b.op("MatMul", xn, b.op("Transpose", xn, perm=[0, 2, 1]), name="cosine")  # [B, N, N]
        cut = b.op("Or", b.op("Less", sim, b.const(threshold, np.float32, "theta")), b.op("Not", same), name="cut")
        sim = b.op("Where", cut, b.const(0.0, np.float32, "zero"), sim, name="sparse")
        logits = b.op("Div", sim, b.const(temperature, np.float32, "T"), name="over_T")
        masked = b.op("Equal", logits, b.const(0.0, np.float32, "zero"), name="is_zero")
        logits = b.op("Where", masked, b.const(MASKED_LOGIT, np.float32, "masked_logit"), logits, name="masked")
        a = b.op("Softmax", logits, axis=-1, name="transition")
        deg = b.reduce("ReduceSum", b.cast(b.op("Greater", a, b.const(0.0, np.float32, "zero")), "float32"), -1,
                       keepdims=0, name="degree")  # [B, N], >= 1
    with b.scope("propagate"):
        v = b.op("Transpose", norm, perm=[0, 2, 1], name="init")  # [B, 1, N]: the feature norms
        for step in range(steps):
            v = b.op("MatMul", v, a, name=f"step{step}")
        score = b.op("Div", b.squeeze(v, 1), deg, name="score")
    with b.scope("budget"):  # split_budget: floor(K n_g / N) + 1 for the largest remainders (ties: lower group)
        onehot = b.op("Equal", b.unsqueeze(group, 1), b.const(np.arange(num_groups), np.int64, "group_ids"))
        sizes = b.reduce("ReduceSum", b.cast(onehot, "int64"), 0, keepdims=0, name="sizes")  # [G]
        kn = b.op("Mul", sizes, b.const(k, np.int64, "K"), name="K_sizes")
        share = b.op("Div", kn, n, name="floor")  # non-negative int64: truncation = floor
        rem = b.unsqueeze(b.op("Mod", kn, n, name="remainder"), 0)  # [1, G]
        remaining = b.op("Sub", b.const(k, np.int64, "K"), b.reduce("ReduceSum", share, 0), name="remaining")
        lower_g = b.const(np.tril(np.ones((num_groups, num_groups), bool), -1), np.bool_, "lower_g")
        bonus = b.op("Less", b.squeeze(b.rank_descending(rem, lower_g), 0), remaining, name="bonus")
        share = b.op("Add", share, b.cast(bonus, "int64"), name="share")
    with b.scope("select"):
        token_share = b.op("Gather", share, group, axis=0, name="token_share")  # [N]
        rank = b.rank_descending(score, b.lower_mask(n), same, name="group_rank")
        idx = b.ascending_indices(b.op("Less", rank, token_share, name="keep"), k, n)
    b.op("Cast", idx, to=6, name="kept_idx", out_names=["kept_idx"])
    return b


def graph_rank_attributes(k: int, params: Any, num_groups: int) -> dict[str, Any]:
    """The ``GraphRank`` node attributes (K, threshold, temperature, steps, num_groups, plugin fields)."""
    return plugin_attributes(K=int(k), threshold=float(params.threshold), temperature=float(params.temperature),
                             steps=int(params.steps), num_groups=int(num_groups))


def gprune_spec(n: int | None, k: int, hidden: int, dtype: str = "float32") -> GraphSpec:
    """The prune graph's boundary; ``n=None`` for an image-dependent N (NeXT: ``group_ids`` is an input)."""
    n_dim = "n" if n is None else n
    inputs = [TensorSpec("features", dtype, ("batch", n_dim, hidden))]
    if n is None:
        inputs.append(TensorSpec("group_ids", "int64", (n_dim,)))
    return GraphSpec("prune", inputs=tuple(inputs), outputs=(TensorSpec("kept", dtype, ("batch", k, hidden)),
                                                             TensorSpec("kept_idx", "int32", ("batch", k))))


def build_gprune_model(spec: GraphSpec, k: int, params: Any, num_groups: int, n_fixed: int | None,
                       opset: int) -> Any:
    """``prune.onnx`` for G-Prune.

    Args:
        spec: from :func:`gprune_spec`.
        k: the static budget.
        params: :class:`~edgeprune.methods.gprune.GPruneParams`.
        num_groups: 1 (LLaVA-1.5) or 2 (NeXT: base view, high-res grid).
        n_fixed: N when fixed (the group ids are then a constant 0), else None (``group_ids`` input).
        opset: standard opset.
    Returns:
        The checked ``onnx.ModelProto``.
    """
    b = Builder("/prune")
    x = "features" if spec.inputs[0].dtype == "float32" else b.cast("features", "float32", name="to_fp32")
    group = (b.const(np.zeros(n_fixed), np.int32, "group_ids") if n_fixed is not None
             else b.cast("group_ids", "int32", name="group_ids"))
    kept_idx = b.op(OP, x, group, domain="edgeprune", out_names=["kept_idx"],
                    **graph_rank_attributes(k, params, num_groups))
    idx = b.unsqueeze(b.cast(kept_idx, "int64"), -1, name="gather_idx")
    b.op("GatherND", "features", idx, batch_dims=1, name="gather", out_names=["kept"])
    fn = make_function(OP, ["x", "group"], ["kept_idx"],
                       graph_rank_body(k, params.threshold, params.temperature, params.steps, num_groups),
                       graph_rank_attributes(k, params, num_groups), opset)
    return make_model("prune", b, [value_info(t.name, t.dtype, t.dims) for t in spec.inputs],
                      [value_info(t.name, t.dtype, t.dims) for t in spec.outputs], [fn], opset,
                      doc=f"G-Prune K={k} threshold={params.threshold} T={params.temperature} steps={params.steps}")


class GPruneReference:
    """The PyTorch reference of the prune graph (validation): outputs from ``gprune_fn.gprune_select``."""

    def __init__(self, k: int, params: Any, n_fixed: int | None) -> None:
        self.k, self.params, self.n_fixed = k, params, n_fixed

    def __call__(self, features: Any, group: Any = None) -> tuple[Any, Any]:
        import torch

        from ..methods import gprune_fn as G
        from ..methods.functional import gather_tokens

        if group is None:
            group = torch.zeros(features.shape[1], dtype=torch.int64)
        p = self.params
        idx = G.gprune_select(features, group, self.k, p.threshold, p.temperature, p.steps)
        return gather_tokens(features, idx), idx.to(torch.int32)
