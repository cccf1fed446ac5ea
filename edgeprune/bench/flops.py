"""Analytic FLOPs and bytes of a LLaVA request, stage by stage, for any preset config.

Conventions (the ones DEPLOYMENT.md §4 uses for its anchors): a matrix product counts 2 FLOPs per
multiply-add; attention counts the full (non-causal) score matrix, ``4·S_q·S_k·D`` per layer for QKᵀ and AV,
which is what dense kernels compute; norms, activations and residual adds are ignored (they are O(S·D) against
O(S·D²)). Pruning methods are the exception: their cost *is* small element-wise work, so those terms are
counted at one FLOP per element operation (a comparison of a top-k counts as one).

Stage formulas (D: LLM width, F: its FFN width, kv: key/value width ``H_kv·head_dim``, L: layers, V: vocab;
Dv, Fv, Lv: the CLIP tower; S = P + 1 tokens per view with the [CLS]):

* vision, per view: patch conv ``2·P·(3p²)·Dv`` + per layer up to the feature layer
  ``2·S·(4Dv² + 2Dv·Fv) + 4·S²·Dv`` + the [CLS] attention row of the feature layer ``2·S·Dv² + 2·S·Dv``;
* projector: ``2·N·Σ in·out`` over its linear layers (LLaVA: Dv→D→D);
* prefill, per layer with ``s_in`` tokens entering and ``s_out`` surviving (in-LLM drops):
  ``2·s_in·(D² + 2·D·kv) + 4·s_in²·D + 2·s_out·(D² + 3·D·F)``, plus the last-token LM head ``2·D·V``;
* decode step at per-layer KV length ``c_l`` (including the new token):
  ``Σ_l [2·(2D² + 2·D·kv + 3·D·F) + 4·c_l·D] + 2·D·V``;
* bytes read per decode step: every LLM weight once (layers, final norm, LM head, one embedding row) plus the
  K and V cache of every layer, ``Σ_l 2·c_l·kv`` elements; the minimum bytes of vision (its weights up to the
  feature layer and the projector) and of prefill (the LLM weights plus the KV cache it writes), for the
  roofline (:mod:`edgeprune.bench.roofline`);
* pruning: see :func:`prune_flops`.

The ideal TTFT speedup of a pruned request is ``(vision + prefill_full) / (vision + prune + prefill_pruned)``
(:func:`ideal_ttft_speedup`): the compute-bound limit a backend can approach.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Sequence

PRE_LLM_ZERO = ("none", "random", "uniform")


def _get(obj: Any, key: str, default: Any = None) -> Any:
    """``obj.key`` for config objects, ``obj[key]`` for the dicts shipped in ``models/configs``."""
    if isinstance(obj, dict):
        return obj.get(key, default)
    return getattr(obj, key, default)


@dataclass(frozen=True)
class VisionDims:
    """The CLIP vision tower.

    Attributes:
        image_size, patch_size, channels: view geometry (P = (image_size // patch_size)² patches).
        hidden, ffn, heads: Dv, Fv and heads.
        layers: Lv, the tower's depth; feature_layers: layers that must run to reach the feature layer.
    """

    image_size: int
    patch_size: int
    hidden: int
    ffn: int
    heads: int
    layers: int
    feature_layers: int
    channels: int = 3

    @property
    def patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2


@dataclass(frozen=True)
class TextDims:
    """The decoder-only LLM.

    Attributes:
        hidden, ffn, layers, heads, kv_heads, head_dim, vocab: D, F, L, H, H_kv, head dim, V.
    """

    hidden: int
    ffn: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int

    @property
    def kv(self) -> int:
        """Width of one layer's K (or V) per token."""
        return self.kv_heads * self.head_dim

    @property
    def layer_params(self) -> int:
        """Weights of one decoder layer's linear maps (q, k, v, o and the gated FFN)."""
        d = self.hidden
        return 2 * d * d + 2 * d * self.kv + 3 * d * self.ffn


@dataclass(frozen=True)
class ClipTextDims:
    """The CLIP text tower that computes GridPrune's ``guidance=clip`` vector.

    Attributes:
        hidden, ffn, layers, context: its width, FFN width, depth and maximum tokens per chunk.
        projection: width of the shared CLIP space (Dc).
    """

    hidden: int
    ffn: int
    layers: int
    context: int
    projection: int


@dataclass(frozen=True)
class ModelDims:
    """Everything the formulas need: ``vision``, ``text`` and the projector's linear layers ``(in, out)``."""

    vision: VisionDims
    text: TextDims
    projector: tuple[tuple[int, int], ...]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def dims_from_config(config: Any) -> ModelDims:
    """Read the dimensions of a LLaVA / LLaVA-NeXT config (an HF config object or the shipped JSON dict).

    Args:
        config: ``loaded.config`` or ``Preset.shipped_config()``; uses ``vision_config``, ``text_config`` and
            ``vision_feature_layer`` (LLaVA: -2, i.e. the tower runs Lv - 1 layers to produce the features).
    Returns:
        :class:`ModelDims`.
    """
    vc, tc = _get(config, "vision_config"), _get(config, "text_config")
    lv = int(_get(vc, "num_hidden_layers"))
    layers = _get(config, "vision_feature_layer", -2)
    layers = list(layers) if isinstance(layers, (list, tuple)) else [layers]
    # hidden_states has Lv + 1 entries (embeddings first): index j >= 0 is reached after j layers, j < 0 after
    # Lv + 1 + j; a list of feature layers needs the deepest one and concatenates their widths.
    needed = max(int(j) if int(j) >= 0 else lv + 1 + int(j) for j in layers)
    dv = int(_get(vc, "hidden_size"))
    vision = VisionDims(image_size=int(_get(vc, "image_size")), patch_size=int(_get(vc, "patch_size")), hidden=dv,
                        ffn=int(_get(vc, "intermediate_size")), heads=int(_get(vc, "num_attention_heads")),
                        layers=lv, feature_layers=needed, channels=int(_get(vc, "num_channels", 3) or 3))
    d, h = int(_get(tc, "hidden_size")), int(_get(tc, "num_attention_heads"))
    text = TextDims(hidden=d, ffn=int(_get(tc, "intermediate_size")), layers=int(_get(tc, "num_hidden_layers")),
                    heads=h, kv_heads=int(_get(tc, "num_key_value_heads", None) or h),
                    head_dim=int(_get(tc, "head_dim", None) or d // h), vocab=int(_get(tc, "vocab_size")))
    return ModelDims(vision=vision, text=text, projector=((dv * len(layers), d), (d, d)))


def clip_text_dims(clip_config: Any) -> ClipTextDims:
    """Read a ``CLIPConfig`` (``ClipGuidance.model.config``) into :class:`ClipTextDims`."""
    tc = _get(clip_config, "text_config")
    return ClipTextDims(hidden=int(_get(tc, "hidden_size")), ffn=int(_get(tc, "intermediate_size")),
                        layers=int(_get(tc, "num_hidden_layers")),
                        context=int(_get(tc, "max_position_embeddings")),
                        projection=int(_get(clip_config, "projection_dim")))


# ---------------------------------------------------------------------------------------------- stages
def vision_flops(v: VisionDims, views: int = 1, layers: int | None = None) -> float:
    """FLOPs of the vision tower over ``views`` views.

    Args:
        v: the tower.
        views: 1 for LLaVA-1.5; base view + crops for LLaVA-NeXT.
        layers: encoder layers that run (default ``v.feature_layers``; ``v.layers`` is what a tower that is
            not truncated executes).
    Returns:
        FLOPs, including the patch convolution and the [CLS] attention row of the feature layer.
    """
    layers = v.feature_layers if layers is None else layers
    p, s, dv = v.patches, v.patches + 1, v.hidden
    patch = 2.0 * p * v.channels * v.patch_size ** 2 * dv
    per_layer = 2.0 * s * (4 * dv * dv + 2 * dv * v.ffn) + 4.0 * s * s * dv
    cls_row = 2.0 * s * dv * dv + 2.0 * s * dv  # k projection of every token + the [CLS] query's scores
    return views * (patch + layers * per_layer + cls_row)


def projector_flops(d: ModelDims, n: int) -> float:
    """FLOPs of projecting ``n`` visual tokens into the LLM space."""
    return 2.0 * n * sum(i * o for i, o in d.projector)


def topk_flops(n: int, k: int) -> float:
    """Comparisons of a top-k over n scores (a heap: n·⌈log2 k⌉), counted as FLOPs."""
    return float(n * max(1, math.ceil(math.log2(max(k, 2)))))


def clip_text_flops(c: ClipTextDims, question_tokens: int) -> float:
    """The CLIP text tower on the question (BOS + tokens + EOS, in chunks of its context) and the projection."""
    total = question_tokens + 2
    chunks = max(1, math.ceil(question_tokens / max(1, c.context - 2)))
    q = min(total, c.context)
    per_chunk = c.layers * (2.0 * q * (4 * c.hidden ** 2 + 2 * c.hidden * c.ffn) + 4.0 * q * q * c.hidden)
    return chunks * (per_chunk + 2.0 * c.hidden * c.projection)


@dataclass(frozen=True)
class RequestShape:
    """Token counts of one request.

    Attributes:
        n: N prunable visual tokens; total_visual: T visual positions (N plus LLaVA-NeXT newlines).
        visual_to_llm: K' visual tokens spliced into the LLM (pre-LLM methods: K plus newlines; in-LLM: T).
        prefix, suffix: text tokens before / after the image (template + question).
        question: tokens of the question alone (what text guidance encodes).
        new_tokens: generated tokens (the first comes from prefill, the rest from decode steps).
        views: vision passes (1, or base view + crops).
    """

    n: int
    total_visual: int
    visual_to_llm: int
    prefix: int
    suffix: int
    question: int
    new_tokens: int
    views: int = 1

    @property
    def text(self) -> int:
        return self.prefix + self.suffix


@dataclass(frozen=True)
class MethodCost:
    """What the FLOPs of a method depend on besides the shape.

    Attributes:
        name: registered method name.
        kept: K (pre-LLM budget; FastV's survivors).
        guidance: ``clip`` or ``llm`` for GridPrune.
        clip: the CLIP text tower when ``guidance == "clip"``.
        zones: GridPrune's G; steps: G-Prune's propagation steps.
        drops: per-layer drops of an in-LLM method (FitPrune's recipe, FastV's single drop).
    """

    name: str
    kept: int
    guidance: str | None = None
    clip: ClipTextDims | None = None
    zones: int = 4
    steps: int = 5
    drops: tuple[int, ...] | None = None


def fastv_drops(n: int, keep: int, layer: int, num_layers: int) -> tuple[int, ...]:
    """FastV as a drop list: ``n - keep`` tokens leave after layer ``layer - 1`` (absent from layer K on)."""
    drops = [0] * num_layers
    drops[layer - 1] = max(0, n - keep)
    return tuple(drops)


def layer_visual_tokens(m: MethodCost, s: RequestShape, num_layers: int) -> tuple[list[int], int]:
    """Visual tokens entering each decoder layer and leaving the last one.

    Returns:
        (entering [L], final): constant K' for pre-LLM methods; for in-LLM methods T minus the drops so far.
    """
    if m.drops is None:
        return [s.visual_to_llm] * num_layers, s.visual_to_llm
    entering, n, left = [], s.total_visual, s.n
    for drop in m.drops:  # same arithmetic as methods.fitprune_recipe.counts_after_drops (protected tokens stay)
        entering.append(n)
        cut = min(int(drop), left)
        n, left = n - cut, left - cut
    return entering, n


def prune_flops(m: MethodCost, d: ModelDims, s: RequestShape) -> tuple[float, float]:
    """FLOPs of the guidance and prune stages of a method (element operations count one FLOP).

    * ``none``/``random``/``uniform``: 0 (fixed or lattice indices); ``cls-topk``: a top-K over the N
      [CLS] scores (its attention row is computed in the vision tower).
    * ``gridprune``: guidance = the CLIP text tower on the question and the CLIP projection of the N patches
      (``2·N·Dv·Dc``), or the mean LLM embedding of the question (``Q·D``); prune = relevance ``4·N·Dg``
      (normalise + dot) + zone means ``N`` + softmax and largest remainder over Z = G² zones
      ``5Z + Z·⌈log2 Z⌉`` + local score ``8N`` + top-K.
    * ``gprune``: normalise ``2ND`` + cosine graph ``2N²D`` + threshold/softmax/degree ``6N²`` + norms ``2ND``
      + ``steps·2N²`` propagation + ``N`` + top-K.
    * ``fastv``: the last row's attention at layer K-1: ``2·S·D + 3·H·S + H·N`` + top-K.
    * ``fitprune``: at every layer with a drop, the rows from the image on (R = n_l + suffix) against all S_l
      keys: ``2·R·S_l·D + 4·H·R·S_l + 2·R·n_l + 2·n_l`` + a top-k.

    Returns:
        (guidance FLOPs, prune FLOPs).
    """
    n, k, t = s.n, m.kept, d.text
    if m.name in PRE_LLM_ZERO:
        return 0.0, 0.0
    if m.name == "cls-topk":
        return 0.0, topk_flops(n, k)
    if m.name == "gridprune":
        z = m.zones * m.zones * s.views
        if m.guidance == "clip" and m.clip is not None:
            dg = m.clip.projection
            guide = clip_text_flops(m.clip, s.question) + 2.0 * n * (d.vision.hidden * dg + dg)
        else:
            dg, guide = t.hidden, float(s.question * t.hidden)
        prune = 4.0 * n * dg + n + 5.0 * z + z * math.ceil(math.log2(max(z, 2))) + 8.0 * n + topk_flops(n, k)
        return guide, prune
    if m.name == "gprune":
        dd = t.hidden
        return 0.0, 4.0 * n * dd + 2.0 * n * n * dd + 6.0 * n * n + m.steps * 2.0 * n * n + n + topk_flops(n, k)
    if m.drops is not None:
        return 0.0, _in_llm_stats_flops(m, d, s)
    raise ValueError(f"no FLOPs model for method {m.name!r}")


def _in_llm_stats_flops(m: MethodCost, d: ModelDims, s: RequestShape) -> float:
    t = d.text
    entering, _ = layer_visual_tokens(m, s, t.layers)
    total = 0.0
    for n_l, drop in zip(entering, m.drops or ()):
        if drop <= 0:
            continue
        seq = s.prefix + n_l + s.suffix
        rows = 1 if m.name == "fastv" else n_l + s.suffix  # FastV scores with the last token only
        total += 2.0 * rows * seq * t.hidden + 3.0 * t.heads * rows * seq
        total += t.heads * n_l if m.name == "fastv" else t.heads * rows * seq + 2.0 * rows * n_l + 2.0 * n_l
        total += topk_flops(n_l, max(1, n_l - drop))
    return total


def prefill_flops(t: TextDims, text_tokens: int, entering: Sequence[int], final: int) -> float:
    """Prefill FLOPs with ``entering[l]`` visual tokens entering layer l (and ``final`` leaving the last).

    Args:
        t: the LLM.
        text_tokens: prompt tokens that are not visual (always present).
        entering: [L] visual tokens per layer; final: survivors of the last layer.
    Returns:
        FLOPs, including the last-token LM head.
    """
    d, outs = t.hidden, list(entering[1:]) + [final]
    total = 0.0
    for v_in, v_out in zip(entering, outs):
        s_in, s_out = text_tokens + v_in, text_tokens + v_out
        total += 2.0 * s_in * (d * d + 2 * d * t.kv) + 4.0 * s_in * s_in * d + 2.0 * s_out * (d * d + 3 * d * t.ffn)
    return total + 2.0 * d * t.vocab


def decode_flops(t: TextDims, cache: Sequence[int]) -> float:
    """One decode step with ``cache[l]`` keys at layer l (the new token included)."""
    return sum(2.0 * t.layer_params + 4.0 * c * t.hidden for c in cache) + 2.0 * t.hidden * t.vocab


def decode_bytes(t: TextDims, cache: Sequence[int], weight_bytes: int, kv_bytes: int | None = None) -> float:
    """Bytes read by one decode step: every LLM weight once, plus each layer's K and V cache.

    Args:
        t: the LLM; cache: [L] KV lengths; weight_bytes / kv_bytes: bytes per element (kv defaults to weights).
    """
    weights = t.layers * t.layer_params + (2 * t.layers + 1) * t.hidden + t.hidden * t.vocab + t.hidden
    kv = sum(2.0 * c * t.kv for c in cache)
    return weights * weight_bytes + kv * (kv_bytes or weight_bytes)


def vision_weight_bytes(d: ModelDims, weight_bytes: int) -> float:
    """Bytes of the vision tower's weights up to the feature layer, the patch embedding and the projector."""
    v = d.vision
    layer = 4 * v.hidden * v.hidden + 2 * v.hidden * v.ffn
    patch = v.channels * v.patch_size ** 2 * v.hidden + (v.patches + 1) * v.hidden
    return float(weight_bytes * (v.feature_layers * layer + patch + sum(i * o for i, o in d.projector)))


def ideal_ttft_speedup(full: dict[str, float], pruned: dict[str, float]) -> float:
    """``(vision + prefill_full) / (vision + prune + prefill_pruned)`` from two :func:`request_flops` results
    (vision includes the projector, prune includes the guidance)."""
    num = full["vision"] + full["projector"] + full["prefill"]
    den = pruned["vision"] + pruned["projector"] + pruned["guidance"] + pruned["prune"] + pruned["prefill"]
    return num / den if den > 0 else float("nan")


def request_flops(d: ModelDims, m: MethodCost, s: RequestShape, weight_bytes: int = 2) -> dict[str, Any]:
    """Every stage of one request.

    Returns:
        ``vision`` (up to the feature layer: what edgeprune runs), ``vision_executed`` (all tower layers: what
        HF's ``get_image_features`` runs, for comparison), ``projector``,
        ``guidance``, ``prune``, ``prefill``, ``ttft`` (the sum of the previous five, vision up to the feature
        layer), ``decode_first_step``, ``decode_total`` (``new_tokens - 1`` steps), ``decode_bytes_first_step``,
        ``vision_bytes``, ``prefill_bytes`` (minimum bytes moved), ``layer_visual_tokens`` ([L]) and
        ``cache_lengths`` ([L] after prefill), FLOPs and bytes as floats.
    """
    t = d.text
    entering, final = layer_visual_tokens(m, s, t.layers)
    guidance, prune = prune_flops(m, d, s)
    out: dict[str, Any] = {
        "vision": vision_flops(d.vision, s.views),
        "vision_executed": vision_flops(d.vision, s.views, layers=d.vision.layers),
        "projector": projector_flops(d, s.views * d.vision.patches),
        "guidance": guidance, "prune": prune, "prefill": prefill_flops(t, s.text, entering, final),
    }
    out["ttft"] = sum(out[k] for k in ("vision", "projector", "guidance", "prune", "prefill"))
    cache = [s.text + v for v in entering]  # a layer caches every token that entered it
    steps = max(0, s.new_tokens - 1)
    out["decode_first_step"] = decode_flops(t, [c + 1 for c in cache])
    out["decode_total"] = sum(decode_flops(t, [c + j for c in cache]) for j in range(1, steps + 1))
    out["decode_bytes_first_step"] = decode_bytes(t, [c + 1 for c in cache], weight_bytes)
    # Minimum bytes of the compute-bound stages (for the roofline): weights once, plus the KV cache prefill writes.
    out["vision_bytes"] = vision_weight_bytes(d, weight_bytes)
    out["prefill_bytes"] = decode_bytes(t, cache, weight_bytes)
    out["layer_visual_tokens"], out["cache_lengths"] = entering, cache
    return out
