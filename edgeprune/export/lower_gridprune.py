"""GridPrune's prune graph: relevance and local scores in standard ops, then the fused ``edgeprune.ZonalTopK``.

The graph (``prune.onnx``) takes ``features [B,N,D]``, ``cls_attn [B,N]``, the text ``guidance [B,Dg]``,
``clip_embeds [B,N,Dc]`` (``guidance=clip`` only) and ``zone_ids [N]`` (LLaVA-NeXT only: N and the zones
depend on the image, the host computes them from the anyres layout; LLaVA-1.5's are a constant) and returns
``kept [B,K,D]`` and ``kept_idx [B,K]`` int32, ascending. Steps (METHODS.md §1, decision 4):

1. ``relevance = sign * cos(embeds, guidance)`` in float32 (standard ops, outside the fused op);
2. local scores ``(1 - alpha) * (r + 1) * 0.5 + alpha * minmax(cls_attn)``, float32, in exactly the
   reference's op order (IEEE-exact, so bit-equal to :func:`gridprune_fn.local_scores`);
3. ``ZonalTopK(scores, relevance, zone) -> (kept_idx, quota)``, an ``edgeprune``-domain node whose local
   function body is the static-K lowering of METHODS.md §5 "GridPrune static graph" (:func:`zonal_topk_body`).

Exactness of the body against :func:`~edgeprune.methods.gridprune_fn.gridprune_select`:

* zone means are ``(r @ onehot) / max(n_z, 1)`` in float64 as in the reference; the sums of float32 values
  are exact in float64 (whatever the summation order), so the zone relevances are bit-equal;
* ``P = softmax(rbar / tau)`` is float64 ``exp(x - max) / sum``; ``exp`` and the summation order may differ
  from torch's in the last bit, which can change a quota only when two fractional parts of ``K P`` are
  within ~1e-15 of each other without being equal, or ``K P_z`` is within ~1e-15 of an integer; bit-equal
  zone relevances give bit-equal ``P`` in both, so exact ties are resolved identically (lower zone id);
* everything else is exact: ``Floor``, integer quotas, ranks by pairwise comparison (no sort, whose tie order
  ONNX leaves open), the closed-form cap/redistribute of ``_cap_and_fill`` as a masked sum over the zones that
  precede each zone in descending P, per-zone ranks of the scores with ties to the lower token index, and the
  ascending output by a TopK over distinct keys.

Zones are padded to ``Z = views_max * G^2``: the extra zones are empty (P = 0, no fraction, no spare) and have
the highest ids, so they never precede a real zone in any order: the result equals the reference's with its
``num_views * G^2``.

Ops of the body (opset 18): Shape, Cast, Equal, Unsqueeze, Squeeze, ReduceSum, ReduceMax, MatMul, Max, Min, Div,
Greater, Less, Where, Exp, Sub, Mul, Floor, And, Or, Add, Gather, Range, TopK, Constant. All exist in TensorRT,
but TensorRT has no float64: its parser narrows the allocation to float32 (TensorRT for RTX parses and builds this
graph that way, with a warning), where the zone sums are no longer exact and quotas can differ from the reference
near float32 ties. Exact indices under TensorRT therefore need the ``ZonalTopK`` plugin (its Triton kernel does
the allocation in float64 like this body); ONNX Runtime runs the float64 body exactly as described above.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .onnx_builder import Builder, make_function, make_model, plugin_attributes, value_info
from ..bundle.spec import GraphSpec, TensorSpec

OP = "ZonalTopK"
EPS = 1e-12  # F.normalize's and min_max_normalize's eps


def zonal_topk_body(k: int, tau: float, num_zones: int) -> Builder:
    """The standard-op body of ``ZonalTopK``: ``(scores [B,N] f32, relevance [B,N] f32, zone [N] i32) ->
    (kept_idx [B,K] i32 ascending, quota [B,Z] i32)`` (see the module docstring)."""
    b = Builder(f"/{OP}")
    n = b.dim("scores", 1, name="N")
    zone = b.cast("zone", "int64", name="zone64")
    lower_z = b.const(np.tril(np.ones((num_zones, num_zones), bool), -1), np.bool_, "lower_z")  # [i, j]: j < i
    with b.scope("zones"):
        onehot = b.op("Equal", b.unsqueeze(zone, 1), b.const(np.arange(num_zones), np.int64, "zone_ids"))
        onehot = b.cast(onehot, "float64", name="onehot")  # [N, Z]
        counts = b.reduce("ReduceSum", onehot, 0, keepdims=0, name="counts")  # [Z] float64
        sizes = b.cast(counts, "int64", name="sizes")
    with b.scope("allocate"):
        rel = b.op("MatMul", b.cast("relevance", "float64"), onehot, name="zone_sum")
        rbar = b.op("Div", rel, b.op("Max", counts, b.const(1.0, np.float64, "one")), name="zone_mean")
        logits = b.op("Div", rbar, b.const(tau, np.float64, "tau"), name="over_tau")
        present = b.op("Greater", counts, b.const(0.0, np.float64, "zero"), name="present")
        logits = b.op("Where", present, logits, b.const(-np.inf, np.float64, "neg_inf"), name="masked")
        e = b.op("Exp", b.op("Sub", logits, b.reduce("ReduceMax", logits, -1), name="shift"))
        p = b.op("Div", e, b.reduce("ReduceSum", e, -1, name="denominator"), name="P")  # [B, Z] float64
        scaled = b.op("Mul", p, b.const(float(k), np.float64, "K"), name="KP")
        floor = b.op("Floor", scaled)
        frac = b.op("Sub", scaled, floor, name="fraction")
        k64 = b.const(k, np.int64, "K_int")
        remaining = b.op("Sub", k64, b.cast(b.reduce("ReduceSum", floor, -1), "int64"), name="remaining")
        bonus = b.op("Less", b.rank_descending(frac, lower_z, name="fraction_rank"), remaining, name="bonus")
        quota = b.op("Add", b.cast(floor, "int64"), b.cast(bonus, "int64"), name="largest_remainder")
    with b.scope("cap"):
        quota = b.op("Min", quota, sizes, name="capped")
        excess = b.op("Sub", k64, b.reduce("ReduceSum", quota, -1), name="excess")  # [B, 1]
        spare = b.op("Sub", sizes, quota, name="spare")  # [B, Z]
        # closed form of _cap_and_fill: zone z gets clamp(excess - spare of the zones before it in
        # descending P (ties: lower id), 0, its own spare)
        before = b.cast(b.precedes(p, lower_z, name="p_order"), "int64")  # [B, Z(z), Z(w)]
        before = b.reduce("ReduceSum", b.op("Mul", before, b.unsqueeze(spare, 1)), -1, keepdims=0,
                          name="spare_before")
        add = b.op("Max", b.op("Sub", excess, before), b.const(0, np.int64, "zero"), name="wanted")
        quota = b.op("Add", quota, b.op("Min", add, spare, name="granted"), name="quota")
    with b.scope("select"):
        token_quota = b.op("Gather", quota, zone, axis=1, name="token_quota")  # [B, N]
        same = b.op("Equal", b.unsqueeze(zone, 1, name="zi"), b.unsqueeze(zone, 0, name="zj"), name="same_zone")
        rank = b.rank_descending("scores", b.lower_mask(n), same, name="zone_rank")
        keep = b.op("Less", rank, token_quota, name="keep")
        idx = b.ascending_indices(keep, k, n)
    b.op("Cast", idx, to=6, name="kept_idx", out_names=["kept_idx"])
    b.op("Cast", quota, to=6, name="quota_out", out_names=["quota"])
    return b


def zonal_topk_function(k: int, tau: float, zones: int, num_zones: int, opset: int) -> Any:
    """The model-local function ``edgeprune.ZonalTopK`` with its attributes (see :func:`zonal_topk_body`)."""
    return make_function(OP, ["scores", "relevance", "zone"], ["kept_idx", "quota"],
                         zonal_topk_body(k, tau, num_zones), zonal_topk_attributes(k, tau, zones, num_zones), opset)


def zonal_topk_attributes(k: int, tau: float, zones: int, num_zones: int) -> dict[str, Any]:
    """The ``ZonalTopK`` node attributes: K, tau, G (zones per side), Z, and the plugin lookup fields."""
    return plugin_attributes(K=int(k), tau=float(tau), zones=int(zones), num_zones=int(num_zones))


def gridprune_spec(n: int | None, k: int, hidden: int, guidance_dim: int, clip_dim: int | None,
                   dtype: str = "float32") -> GraphSpec:
    """The prune graph's boundary (see the module docstring); ``n=None`` for an image-dependent N (NeXT)."""
    n_dim = "n" if n is None else n
    inputs = [TensorSpec("features", dtype, ("batch", n_dim, hidden)),
              TensorSpec("cls_attn", "float32", ("batch", n_dim)),
              TensorSpec("guidance", "float32", ("batch", guidance_dim))]
    if clip_dim is not None:
        inputs.append(TensorSpec("clip_embeds", "float32", ("batch", n_dim, clip_dim)))
    if n is None:
        inputs.append(TensorSpec("zone_ids", "int64", (n_dim,)))
    return GraphSpec("prune", inputs=tuple(inputs), outputs=(TensorSpec("kept", dtype, ("batch", k, hidden)),
                                                             TensorSpec("kept_idx", "int32", ("batch", k))))


def l2_normalize(b: Builder, x: str, name: str) -> str:
    """``x / max(||x||_2, 1e-12)`` over the last axis (``torch.nn.functional.normalize``), float32."""
    with b.scope(name):
        norm = b.op("Sqrt", b.reduce("ReduceSum", b.op("Mul", x, x), -1, name="sum_sq"), name="norm")
        return b.op("Div", x, b.op("Max", norm, b.const(EPS, np.float32, "eps")))


def build_gridprune_model(spec: GraphSpec, k: int, params: Any, num_zones: int, zone_const: np.ndarray | None,
                          opset: int) -> Any:
    """``prune.onnx`` for GridPrune.

    Args:
        spec: from :func:`gridprune_spec` (decides the guidance space and whether zones are an input).
        k: the static budget.
        params: :class:`~edgeprune.methods.gridprune.GridPruneParams` (zones, alpha, tau, relevance_sign).
        num_zones: Z (padded, see the module docstring).
        zone_const: [N] int zone ids for a fixed N (LLaVA-1.5), None when ``zone_ids`` is an input.
        opset: standard opset.
    Returns:
        The checked ``onnx.ModelProto``.
    """
    b = Builder("/prune")
    names = spec.input_names
    features_f32 = "features" if spec.inputs[0].dtype == "float32" else b.cast("features", "float32")
    with b.scope("relevance"):
        embeds = "clip_embeds" if "clip_embeds" in names else features_f32
        e = l2_normalize(b, embeds, "embeds")
        g = l2_normalize(b, "guidance", "guidance")
        rel = b.squeeze(b.op("MatMul", e, b.unsqueeze(g, 2)), 2, name="cosine")  # [B, N]
        if params.relevance_sign < 0:
            rel = b.op("Neg", rel, name="sign")
    with b.scope("local_scores"):  # (1 - alpha) * (r + 1) * 0.5 + alpha * minmax(a), the reference's op order
        lo = b.reduce("ReduceMin", "cls_attn", -1, name="lo")
        span = b.op("Max", b.op("Sub", b.reduce("ReduceMax", "cls_attn", -1, name="hi"), lo),
                    b.const(EPS, np.float32, "eps"), name="span")
        a = b.op("Div", b.op("Sub", "cls_attn", lo), span, name="minmax")
        s = b.op("Mul", b.op("Add", rel, b.const(1.0, np.float32, "one")),
                 b.const(1.0 - params.alpha, np.float32, "one_minus_alpha"))
        s = b.op("Mul", s, b.const(0.5, np.float32, "half"))
        scores = b.op("Add", s, b.op("Mul", a, b.const(params.alpha, np.float32, "alpha")), name="scores")
    zone = (b.const(zone_const, np.int32, "zone_ids") if zone_const is not None
            else b.cast("zone_ids", "int32", name="zone_ids"))
    attrs = zonal_topk_attributes(k, params.tau, params.zones, num_zones)
    kept_idx, _ = b.op(OP, scores, rel, zone, outputs=2, domain="edgeprune", out_names=["kept_idx", "/prune/quota"],
                       **attrs)
    idx = b.unsqueeze(b.cast(kept_idx, "int64"), -1, name="gather_idx")
    b.op("GatherND", "features", idx, batch_dims=1, name="gather", out_names=["kept"])
    fn = zonal_topk_function(k, params.tau, params.zones, num_zones, opset)
    return make_model("prune", b, [value_info(t.name, t.dtype, t.dims) for t in spec.inputs],
                      [value_info(t.name, t.dtype, t.dims) for t in spec.outputs], [fn], opset,
                      doc=f"GridPrune K={k} zones={params.zones} alpha={params.alpha} tau={params.tau}")


class GridPruneReference:
    """The PyTorch reference of the prune graph (validation): same inputs, outputs from ``gridprune_fn``.

    Args:
        k, params, num_zones, zone_const: as :func:`build_gridprune_model`.
        clip: whether ``clip_embeds`` is an input (guidance=clip).
    """

    def __init__(self, k: int, params: Any, num_zones: int, zone_const: np.ndarray | None, clip: bool) -> None:
        self.k, self.params, self.num_zones, self.zone_const, self.clip = k, params, num_zones, zone_const, clip

    def __call__(self, features: Any, cls_attn: Any, guidance: Any, *rest: Any) -> tuple[Any, Any]:
        import torch

        from ..methods import gridprune_fn as G
        from ..methods.functional import gather_tokens

        rest = list(rest)
        embeds = rest.pop(0) if self.clip else features
        zone = torch.as_tensor(self.zone_const) if self.zone_const is not None else rest.pop(0)
        rel = G.relevance(embeds, guidance, self.params.relevance_sign)
        idx = G.gridprune_select(rel, cls_attn, zone.long(), self.num_zones, self.k, self.params.alpha,
                                 self.params.tau)
        return gather_tokens(features, idx), idx.to(torch.int32)
