"""In-LLM pruning: our own loop over the decoder layers, with token drops between layers and a ragged KV cache.

In-LLM methods (FastV, FitPrune) decide *inside* the language model which visual tokens to drop, from the
attention probabilities of a layer. Instead of patching transformers, this module runs the HF decoder stack
(``LlamaModel`` / ``MistralModel``) layer by layer through its public seams only: ``lm.layers``, ``lm.norm``,
``lm.rotary_emb`` and, per layer, ``input_layernorm``, ``self_attn.{q,k,v,o}_proj``,
``post_attention_layernorm`` and ``mlp``. The arithmetic mirrors ``modeling_llama.py`` /
``modeling_mistral.py`` of transformers 5.23 (RoPE ``x*cos + rotate_half(x)*sin`` with the model's own
``rotary_emb``, scaling ``attn.scaling``, GQA by repeating kv heads), so with no drops the loop reproduces the
HF forward.

Drop semantics (METHODS.md §3): a token dropped at layer ``l`` still serves as key/value at layer ``l`` (so
layer ``l``'s cache holds it) and is removed from the attention output *before* ``o_proj`` and from the
residual stream, i.e. it skips ``o_proj``/FFN of layer ``l`` and every later layer. This is exact: after the
attention core every operation of a decoder layer (``o_proj``, residual add, RMSNorm, MLP) is per token, so
removing rows there changes no other row. For FastV ("prune before layer K using layer K-1's attention")
it is the same result: the dropped rows' own ``o_proj``/FFN at K-1 would never reach any kept row.

Public API:

* :func:`prefill` ``(lm, embeds [1,L,D], position_ids [1,L], visual_start, visual_count, plan, prunable)``
  -> :class:`InLLMState` (final-norm'ed last hidden ``[1, D]``, per-layer K/V, per-layer visual counts).
* :func:`decode_step` ``(lm, state, embeds [1,q,D], position)`` -> last hidden ``[1, D]``; appends to
  each layer's own cache, every new query attends all of its layer's cache.
* :func:`start_stream` / :func:`run_layer` / :func:`final_hidden`: the same prefill one layer at a time
  (FitPrune's recipe search steps several samples layer-synchronously).
* A *plan* is any callable ``plan(probe: LayerProbe) -> keep | None`` (see :class:`LayerProbe`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch

from ..errors import EdgepruneError

# ---------------------------------------------------------------------------------------------- primitives


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """``[-x2, x1]`` for the two halves of the last dim (the RoPE rotation of HF Llama/Mistral).

    Args:
        x: [..., hd].
    Returns:
        [..., hd].
    """
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding as HF applies it: ``x * cos + rotate_half(x) * sin``.

    Args:
        x: [1, H, S, hd] query or key states.
        cos, sin: [1, S, hd] from ``lm.rotary_emb`` (attention scaling already folded in).
    Returns:
        [1, H, S, hd].
    """
    return (x * cos.unsqueeze(1)) + (rotate_half(x) * sin.unsqueeze(1))


def repeat_kv(x: torch.Tensor, groups: int) -> torch.Tensor:
    """Repeat each kv head ``groups`` times (GQA), head ``h`` of the result uses kv head ``h // groups``.

    Args:
        x: [1, Hkv, S, hd].
    Returns:
        [1, Hkv * groups, S, hd].
    """
    return x if groups == 1 else torch.repeat_interleave(x, groups, dim=1)


def causal_mask(q_len: int, kv_len: int, device: Any = None) -> torch.Tensor:
    """Boolean mask, True = may attend: query ``i`` (the ``i``-th of the last ``q_len`` tokens) sees keys
    ``j <= kv_len - q_len + i`` (bottom-right aligned, so decode chunks see the whole cache).

    Returns:
        [q_len, kv_len] bool.
    """
    rows = torch.arange(q_len, device=device).unsqueeze(1) + (kv_len - q_len)
    return torch.arange(kv_len, device=device).unsqueeze(0) <= rows


def project_qkv(attn: Any, x: torch.Tensor, cos: torch.Tensor,
                sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q/k/v of one attention module, RoPE applied to q and k.

    Args:
        attn: the layer's ``self_attn`` (``q_proj``, ``k_proj``, ``v_proj``, ``head_dim``).
        x: [1, S, D] input-layernorm'ed hidden states.
        cos, sin: [1, S, hd].
    Returns:
        (q [1, H, S, hd], k [1, Hkv, S, hd], v [1, Hkv, S, hd]).
    """
    b, s, _ = x.shape
    hd = attn.head_dim
    q = attn.q_proj(x).view(b, s, -1, hd).transpose(1, 2)
    k = attn.k_proj(x).view(b, s, -1, hd).transpose(1, 2)
    v = attn.v_proj(x).view(b, s, -1, hd).transpose(1, 2)
    return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scaling: float,
           mask: Optional[torch.Tensor], eager: bool = False) -> torch.Tensor:
    """Attention context before ``o_proj``.

    Args:
        q: [1, H, Sq, hd]; k, v: [1, Hkv, Sk, hd].
        scaling: the module's ``scaling`` (``head_dim ** -0.5``).
        mask: [Sq, Sk] bool (True = attend) or None (attend everything).
        eager: HF eager attention's formulation (``softmax(q kᵀ · s + min-mask)`` in float32) instead of SDPA;
            the export wrappers use it below opset 23, where SDPA's lowering adds a NaN guard per score tensor
            (:mod:`edgeprune.export.ort_variant`).
    Returns:
        [1, Sq, H * hd].
    """
    groups = q.shape[1] // k.shape[1]
    k, v = repeat_kv(k, groups), repeat_kv(v, groups)
    if eager:
        scores = torch.matmul(q, k.transpose(-1, -2)) * scaling
        if mask is not None:
            scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
        out = torch.matmul(torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype), v)
    else:
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scaling)
    return out.transpose(1, 2).reshape(q.shape[0], q.shape[2], -1)


def attention_probs(q: torch.Tensor, k: torch.Tensor, scaling: float, rows: torch.Tensor) -> torch.Tensor:
    """Causal softmax attention probabilities of selected query rows, per head, in float32.

    Equals HF eager attention (``softmax(q kᵀ · scale + causal mask)``) for those rows; computed in float32
    so fp16 models give stable statistics.

    Args:
        q: [1, H, S, hd] (post-RoPE); k: [1, Hkv, S, hd] (post-RoPE).
        scaling: the module's ``scaling``.
        rows: [R] int64 query rows (sequence indices), used both to pick queries and for the causal mask.
    Returns:
        [H, R, S] float32, each row sums to 1 over its causal prefix.
    """
    groups = q.shape[1] // k.shape[1]
    qr = q[0, :, rows].float()
    kr = repeat_kv(k, groups)[0].float()
    cols = torch.arange(k.shape[2], device=q.device)
    bias = torch.zeros(rows.shape[0], k.shape[2], device=q.device)
    bias.masked_fill_(cols.unsqueeze(0) > rows.to(q.device).unsqueeze(1), float("-inf"))  # causal, [R, S]
    # one fused kernel for bias + scaling * q kᵀ: on a CPU every pass over [H, R, S] costs as much as the matmul
    logits = torch.baddbmm(bias.unsqueeze(0), qr, kr.transpose(-1, -2), alpha=scaling)
    return torch.softmax(logits, dim=-1)


def keep_top_visual(scores: torch.Tensor, prunable: torch.Tensor, n_drop: int) -> Optional[torch.Tensor]:
    """Keep every protected token and the highest-scoring prunable ones; drop ``n_drop`` prunable tokens.

    Ties: the lower index is kept (METHODS.md decision 1), so among equal scores the higher index is
    dropped first.

    Args:
        scores: [n] float, one per current visual token.
        prunable: [n] bool, False for tokens that are never dropped (LLaVA-NeXT ``image_newline``).
        n_drop: prunable tokens to drop, clipped to ``[0, #prunable]``.
    Returns:
        [n - n_drop] int64 ascending indices into the n tokens, or None when nothing is dropped.
    """
    n_drop = min(int(n_drop), int(prunable.sum()))
    if n_drop <= 0:
        return None
    s = scores.float().masked_fill(~prunable, float("inf"))
    order = torch.sort(s, descending=True, stable=True).indices  # stable: ties keep ascending index
    return torch.sort(order[: s.shape[0] - n_drop]).values


# ---------------------------------------------------------------------------------------------- the loop


@dataclass
class LayerProbe:
    """What a plan sees at layer ``layer``: the sequence layout and lazy access to that layer's attention.

    The sequence is ``[text before | visual_count visual tokens | text after]``; visual tokens dropped at
    earlier layers are gone, so the visual block is always contiguous at ``visual_start``.

    Attributes:
        layer, num_layers: index of this layer and depth of the stack.
        visual_start, visual_count, seq_len: layout of the current sequence.
        visual_index: [n] int64 index of each current visual token in the original visual block.
        prunable: [n] bool, False for tokens that must never be dropped.
    """

    layer: int
    num_layers: int
    visual_start: int
    visual_count: int
    seq_len: int
    visual_index: torch.Tensor
    prunable: torch.Tensor
    q: torch.Tensor = field(repr=False)
    k: torch.Tensor = field(repr=False)
    scaling: float = field(repr=False, default=1.0)

    def attention(self, rows: torch.Tensor) -> torch.Tensor:
        """Per-head causal attention probabilities of query ``rows`` of this layer: ``[H, R, S]`` float32."""
        return attention_probs(self.q, self.k, self.scaling, rows.to(self.q.device))


# plan(probe) -> [n_keep] ascending indices into the probe's current visual tokens, or None (keep all)
Plan = Callable[[LayerProbe], Optional[torch.Tensor]]


@dataclass
class Stream:
    """A prefill in progress (one request), between two layers.

    Attributes:
        hidden: [1, S, D] residual stream entering the next layer.
        position_ids: [1, S] int64 original RoPE positions of the current tokens.
        cos, sin: [1, S, hd] rotary tables of those positions (gathered with the tokens, never recomputed).
        visual_start: index of the first visual token.
        visual_index: [n] int64 original visual-block index of each current visual token.
        prunable: [n] bool.
    """

    hidden: torch.Tensor
    position_ids: torch.Tensor
    cos: torch.Tensor
    sin: torch.Tensor
    visual_start: int
    visual_index: torch.Tensor
    prunable: torch.Tensor

    @property
    def visual_count(self) -> int:
        return int(self.visual_index.shape[0])

    @property
    def seq_len(self) -> int:
        return int(self.hidden.shape[1])


@dataclass
class InLLMState:
    """Result of :func:`prefill` and the decode-time cache.

    Attributes:
        last_hidden: [1, D] final-norm'ed hidden state of the last token (apply ``lm_head`` for logits).
        keys, values: per layer ``[1, Hkv, S_l, hd]``: layer l holds the tokens that entered it (ragged),
            keys after RoPE; :func:`decode_step` appends to them.
        position_ids: [1, S] original positions of the tokens that left the last layer.
        visual_counts: per layer, visual tokens entering it (``len == num_layers``).
        visual_depth: [T] int64, per original visual token, the number of layers it entered (``num_layers``
            for survivors); for ``edgeprune viz`` and profiles.
        visual_kept: [n_final] int64 original visual-block indices of the surviving visual tokens.
    """

    last_hidden: torch.Tensor
    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    position_ids: torch.Tensor
    visual_counts: list[int]
    visual_depth: torch.Tensor
    visual_kept: torch.Tensor

    @property
    def cache_lengths(self) -> list[int]:
        """Per-layer KV-cache length (ragged after drops)."""
        return [int(k.shape[2]) for k in self.keys]


def _check_sliding_window(lm: Any, length: int) -> None:
    window = getattr(lm.config, "sliding_window", None)
    if window is not None and length > int(window):
        raise EdgepruneError(
            f"in-LLM pruning does not support sliding-window attention: the sequence has {length} tokens but "
            f"the model's sliding_window is {window}; use a pre-LLM method or a shorter prompt")


def start_stream(lm: Any, embeds: torch.Tensor, position_ids: torch.Tensor, visual_start: int,
                 visual_count: int, prunable: Optional[torch.Tensor] = None) -> Stream:
    """Begin a prefill: rotary tables from the model's own ``rotary_emb`` at the given positions.

    Args:
        lm: the decoder stack (``LlamaModel``/``MistralModel``).
        embeds: [1, L, D] inputs_embeds.
        position_ids: [1, L] or [L] int64 RoPE positions (any increasing convention).
        visual_start, visual_count: the visual block ``[visual_start, visual_start + visual_count)``.
        prunable: [visual_count] bool, None = every visual token may be dropped.
    Returns:
        A :class:`Stream` before layer 0.
    Raises:
        ValueError: shapes disagree or the visual block is outside the sequence (a caller bug).
        EdgepruneError: the sequence is longer than a sliding attention window.
    """
    if embeds.dim() != 3 or embeds.shape[0] != 1:
        raise ValueError(f"embeds must be [1, L, D]; got {tuple(embeds.shape)}")
    length = int(embeds.shape[1])
    pos = torch.as_tensor(position_ids, device=embeds.device).long().reshape(1, -1)
    if pos.shape[1] != length:
        raise ValueError(f"position_ids has {pos.shape[1]} entries for {length} tokens")
    if visual_start < 0 or visual_count < 0 or visual_start + visual_count > length:
        raise ValueError(f"visual block [{visual_start}, {visual_start + visual_count}) outside 0..{length}")
    _check_sliding_window(lm, length)
    if prunable is None:
        prunable = torch.ones(visual_count, dtype=torch.bool, device=embeds.device)
    prunable = torch.as_tensor(prunable, device=embeds.device).bool().reshape(-1)
    if prunable.shape[0] != visual_count:
        raise ValueError(f"prunable has {prunable.shape[0]} entries for {visual_count} visual tokens")
    cos, sin = lm.rotary_emb(embeds, position_ids=pos)
    return Stream(hidden=embeds, position_ids=pos, cos=cos, sin=sin, visual_start=int(visual_start),
                  visual_index=torch.arange(visual_count, device=embeds.device), prunable=prunable)


def _checked_keep(keep: torch.Tensor, stream: Stream, plan: Any) -> torch.Tensor:
    """Validate a plan's answer (a wrong answer is a bug in the method, hence RuntimeError)."""
    keep = torch.as_tensor(keep).long().reshape(-1).to(stream.hidden.device)
    n = stream.visual_count
    if keep.numel() and (int(keep.min()) < 0 or int(keep.max()) >= n):
        raise RuntimeError(f"plan {plan!r} returned indices outside [0, {n})")
    if keep.numel() > 1 and not bool((keep[1:] > keep[:-1]).all()):
        raise RuntimeError(f"plan {plan!r} returned kept indices that are not strictly ascending")
    kept = torch.zeros(n, dtype=torch.bool, device=keep.device)
    kept[keep] = True
    if bool((~kept & ~stream.prunable).any()):
        raise RuntimeError(f"plan {plan!r} dropped a protected (non-prunable) visual token")
    return keep


def run_layer(lm: Any, layer_idx: int, stream: Stream,
              plan: Optional[Plan] = None) -> tuple[Stream, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Run decoder layer ``layer_idx`` over the stream, letting ``plan`` drop visual tokens after attention.

    Args:
        lm: the decoder stack.
        layer_idx: which layer.
        stream: the stream entering the layer.
        plan: see :data:`Plan`; None = drop nothing.
    Returns:
        (stream leaving the layer, k [1, Hkv, S, hd], v [1, Hkv, S, hd] of the S tokens that entered,
        dropped [m] int64 original visual-block indices of the tokens dropped here).
    """
    layer = lm.layers[layer_idx]
    attn = layer.self_attn
    q, k, v = project_qkv(attn, layer.input_layernorm(stream.hidden), stream.cos, stream.sin)
    s = stream.seq_len
    ctx = attend(q, k, v, attn.scaling, causal_mask(s, s, q.device))  # [1, S, H*hd]
    keep = None
    if plan is not None and stream.visual_count:
        probe = LayerProbe(layer=layer_idx, num_layers=len(lm.layers), visual_start=stream.visual_start,
                           visual_count=stream.visual_count, seq_len=s, visual_index=stream.visual_index,
                           prunable=stream.prunable, q=q, k=k, scaling=attn.scaling)
        keep = plan(probe)
    dropped = stream.visual_index[:0]
    residual = stream.hidden
    if keep is not None:
        keep = _checked_keep(keep, stream, plan)
        vs, n = stream.visual_start, stream.visual_count
        dev = keep.device
        rows = torch.cat([torch.arange(vs, device=dev), vs + keep, torch.arange(vs + n, s, device=dev)])
        gone = torch.ones(n, dtype=torch.bool, device=dev)
        gone[keep] = False
        dropped = stream.visual_index[gone]
        # drop before o_proj and from the residual stream: everything below is per token (exact, see module doc)
        ctx, residual = ctx[:, rows], residual[:, rows]
        stream = Stream(hidden=residual, position_ids=stream.position_ids[:, rows], cos=stream.cos[:, rows],
                        sin=stream.sin[:, rows], visual_start=vs, visual_index=stream.visual_index[keep],
                        prunable=stream.prunable[keep])
    hidden = residual + attn.o_proj(ctx)
    hidden = hidden + layer.mlp(layer.post_attention_layernorm(hidden))
    return dataclasses.replace(stream, hidden=hidden), k, v, dropped


def final_hidden(lm: Any, stream: Stream) -> torch.Tensor:
    """Final RMSNorm of the last token: ``[1, D]`` (the norm is per token, so norming one row is exact)."""
    return lm.norm(stream.hidden[:, -1])


@torch.no_grad()
def prefill(lm: Any, embeds: torch.Tensor, position_ids: torch.Tensor, visual_start: int, visual_count: int,
            plan: Optional[Plan] = None, prunable: Optional[torch.Tensor] = None) -> InLLMState:
    """Prefill the decoder stack with in-LLM pruning.

    Args:
        lm: ``LlamaModel``/``MistralModel`` (``family.language_model(model)``).
        embeds: [1, L, D] inputs_embeds (all T visual tokens spliced in).
        position_ids: [1, L] or [L] int64 RoPE positions.
        visual_start: index of the first visual token in the sequence.
        visual_count: T, number of visual tokens (contiguous).
        plan: ``plan(probe) -> keep | None`` called at every layer (None = no pruning).
        prunable: [T] bool, False for tokens never dropped (LLaVA-NeXT newline tokens); None = all True.
    Returns:
        :class:`InLLMState` with the last hidden state, the ragged cache and per-layer visual counts.
    Raises:
        ValueError: inconsistent shapes (caller bug).
        EdgepruneError: a sliding attention window shorter than the sequence.
    """
    stream = start_stream(lm, embeds, position_ids, visual_start, visual_count, prunable)
    num_layers = len(lm.layers)
    depth = torch.full((visual_count,), num_layers, dtype=torch.long, device=embeds.device)
    keys, values, counts = [], [], []
    for idx in range(num_layers):
        counts.append(stream.visual_count)
        stream, k, v, dropped = run_layer(lm, idx, stream, plan)
        depth[dropped] = idx + 1
        keys.append(k)
        values.append(v)
    return InLLMState(last_hidden=final_hidden(lm, stream), keys=keys, values=values,
                      position_ids=stream.position_ids, visual_counts=counts, visual_depth=depth,
                      visual_kept=stream.visual_index)


@torch.no_grad()
def decode_step(lm: Any, state: InLLMState, embeds: torch.Tensor, position: int) -> torch.Tensor:
    """Run new token(s) through every layer with that layer's own (ragged) cache; appends to the cache.

    No pruning happens during decode. Each new query attends all of its layer's cache plus the new tokens
    up to itself.

    Args:
        lm: the decoder stack used for :func:`prefill`.
        state: the prefill state; ``keys``/``values`` are extended in place.
        embeds: [1, q, D] embeddings of the new token(s) (usually q = 1).
        position: RoPE position of the first new token (``original`` convention: after the unpruned length).
    Returns:
        [1, D] final-norm'ed hidden state of the last new token.
    Raises:
        EdgepruneError: the cache outgrows a sliding attention window.
    """
    q_len = int(embeds.shape[1])
    pos = torch.arange(position, position + q_len, device=embeds.device).unsqueeze(0)
    _check_sliding_window(lm, state.cache_lengths[0] + q_len)
    cos, sin = lm.rotary_emb(embeds, position_ids=pos)
    hidden = embeds
    for idx, layer in enumerate(lm.layers):
        attn = layer.self_attn
        q, k, v = project_qkv(attn, layer.input_layernorm(hidden), cos, sin)
        state.keys[idx] = torch.cat([state.keys[idx], k], dim=2)
        state.values[idx] = torch.cat([state.values[idx], v], dim=2)
        kv_len = state.keys[idx].shape[2]
        mask = None if q_len == 1 else causal_mask(q_len, kv_len, q.device)
        hidden = hidden + attn.o_proj(attend(q, state.keys[idx], state.values[idx], attn.scaling, mask))
        hidden = hidden + layer.mlp(layer.post_attention_layernorm(hidden))
    state.position_ids = torch.cat([state.position_ids, pos], dim=1)
    state.last_hidden = lm.norm(hidden[:, -1])
    return state.last_hidden


def last_row_visual_attention(probe: LayerProbe) -> torch.Tensor:
    """Attention of the last prompt token to each current visual token, averaged over heads (FastV's score).

    Returns:
        [n] float32.
    """
    probs = probe.attention(torch.tensor([probe.seq_len - 1]))  # [H, 1, S]
    return probs.mean(dim=0)[0, probe.visual_start: probe.visual_start + probe.visual_count]
