"""Exportable in-LLM pruning decoders (FastV, FitPrune): a prefill graph that drops visual tokens between
layers and leaves per-layer (ragged) KV lengths, and a decode graph over such a ragged cache.

Why two graphs (DESIGN.md §2, METHODS.md decision 6): prefill drops a *static* number of tokens at fixed layers
(the recipe / FastV's layer and K are baked in as constants), decode never drops and every layer has its own
past length; one graph for both would carry the drop logic through every decode step. Both mirror
:mod:`edgeprune.methods.inllm` (the reference: ``prefill`` / ``decode_step``) and use its primitives
(``project_qkv``, ``attend``, ``causal_mask``, the model's ``rotary_emb``), so with nothing to drop they are the
HF forward.

Prefill: ``(inputs_embeds [1,L,D], position_ids [1,L], visual_start [1], visual_count [1], prunable_index [N])``
-> ``(logits [1,V], key_0, value_0, ... [1,Hkv,L_l,hd], kept_positions [1,L_out])``. The visual block is
``[visual_start, visual_start + visual_count)`` (all T visual tokens spliced); ``prunable_index`` are the
indices within the block of the N tokens that may be dropped (LLaVA-NeXT's newline tokens are not), and its
length carries N as a symbolic size, so the drop counts (``N - K`` for FastV, ``floor(d_l N / N_recipe)`` for
FitPrune) are shape arithmetic and every intermediate shape is static given (L, N). The layout is carried as
masks (visual, after-the-image, prunable) gathered with the surviving rows, so no slice depends on a value.
At a dropping layer the candidates' scores are computed in float32 from that layer's post-RoPE q/k, every
non-candidate gets +inf, and the survivors are the ``S - m`` largest with ties to the lower index
(:func:`~edgeprune.export.wrappers.stable_topk_lowering`: exact, TensorRT-portable), i.e. the m lowest
candidates go, higher index first, exactly ``inllm.keep_top_visual``. Rows are dropped from the attention
output before ``o_proj`` and from the residual stream (the reference's drop semantics), so layer l's present
still holds the tokens dropped at l. ``kept_positions`` are the sequence indices of the rows that leave the
last layer; the host derives the kept visual tokens and the per-layer visual counts from them and the
presents' lengths.

Decode: ``(inputs_embeds [1,q,D], position_ids [1,q], past_key_0, past_value_0, ... [1,Hkv,P_l,hd])`` ->
``(logits [1,V], present_key_0, ... [1,Hkv,P_l+q,hd])`` with one symbolic past length per layer; each new
query attends its layer's whole cache and the new tokens up to itself (bottom-right causal mask).

FitPrune's statistics here are computed from the full ``[H,S,S]`` probabilities of a dropping layer (masked
sums over the rows after the image / the visual rows); that is ``H·S²`` floats per dropping layer, fine for
LLaVA-1.5 (S ≈ 640) but ~1 GB at a 7B LLaVA-NeXT prompt (S ≈ 3000).
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import nn

from ..methods import inllm
from .wrappers import stable_topk_lowering


class DropSchedule:
    """How many candidates each layer drops, as a function of N (an int, or a symbolic size at export).

    Args:
        kind: ``fastv`` or ``fitprune``.
        num_layers: depth of the decoder stack.
        fastv_layer: FastV's K (scores from layer K-1's attention, dropped from layer K on).
        keep: FastV: candidates that survive.
        drops: FitPrune: per-layer recipe drops fitted for ``n_ref`` tokens, rescaled by ``floor(d·N/n_ref)``.
        n_ref: the recipe's N.
    """

    def __init__(self, kind: str, num_layers: int, fastv_layer: int = 0, keep: int = 0,
                 drops: Sequence[int] = (), n_ref: int = 1) -> None:
        if kind not in ("fastv", "fitprune"):
            raise ValueError(f"unknown in-LLM schedule {kind!r}")
        self.kind, self.num_layers, self.fastv_layer, self.keep = kind, num_layers, fastv_layer, keep
        self.drops, self.n_ref = [int(d) for d in drops], int(n_ref)

    def at(self, layer: int, n: Any) -> Any:
        """Candidates dropped at ``layer`` for N = ``n`` (None: the layer drops nothing, no statistics)."""
        if self.kind == "fastv":
            return n - self.keep if layer == self.fastv_layer - 1 else None
        d = self.drops[layer]
        return None if d == 0 else d * n // self.n_ref  # scale_drops: the authors' integer truncation

    def to_dict(self) -> dict[str, Any]:
        """The schedule for the manifest."""
        if self.kind == "fastv":
            return {"kind": "fastv", "layer": self.fastv_layer, "keep": self.keep}
        return {"kind": "fitprune", "drops": self.drops, "n_ref": self.n_ref}


def _fastv_scores(q: torch.Tensor, k: torch.Tensor, scaling: float) -> torch.Tensor:
    """Head-mean attention of the last row to every column (``inllm.last_row_visual_attention``): [S] float32."""
    groups = q.shape[1] // k.shape[1]
    qr = q[0, :, -1:].float()  # [H, 1, hd]
    kr = inllm.repeat_kv(k, groups)[0].float()  # [H, S, hd]
    probs = torch.softmax(torch.matmul(qr, kr.transpose(-1, -2)) * scaling, dim=-1)  # the last row sees all
    return probs.mean(dim=0)[0]


def _fitprune_scores(q: torch.Tensor, k: torch.Tensor, scaling: float, visual: torch.Tensor,
                     after: torch.Tensor) -> torch.Tensor:
    """FitPrune's ``cross · self`` per column (``fitprune_fn.cross_self``): [S] float32.

    cross = mean over the rows after the image of the head-max causal attention (0 when there are none),
    self = mean over the visual rows.
    """
    groups = q.shape[1] // k.shape[1]
    s = q.shape[2]
    logits = torch.matmul(q[0].float(), inllm.repeat_kv(k, groups)[0].float().transpose(-1, -2)) * scaling
    causal = inllm.causal_mask(s, s, q.device)
    probs = torch.softmax(logits.masked_fill(~causal, float("-inf")), dim=-1)  # [H, S, S]
    a = probs.amax(dim=0)  # [S, S]
    after_f, visual_f = after.to(a.dtype), visual.to(a.dtype)
    cross = (after_f @ a) / after_f.sum().clamp_min(1.0)
    self_ = (visual_f @ a) / visual_f.sum().clamp_min(1.0)
    return cross * self_


def _eager(lm: Any) -> bool:
    """Whether the exporter asked for eager attention (below opset 23, see :mod:`.ort_variant`)."""
    return lm.config._attn_implementation == "eager"


class InLLMPrefillGraph(nn.Module):
    """The prefill graph (see the module docstring).

    Args:
        loaded: a :class:`~edgeprune.models.loader.LoadedModel` (Llama / Mistral decoder).
        schedule: the :class:`DropSchedule`.
    """

    def __init__(self, loaded: Any, schedule: DropSchedule) -> None:
        super().__init__()
        self.lm = loaded.family.language_model(loaded.model)
        self.head = loaded.family.lm_head(loaded.model)
        self.schedule = schedule

    def forward(self, inputs_embeds: torch.Tensor, position_ids: torch.Tensor, visual_start: torch.Tensor,
                visual_count: torch.Tensor, prunable_index: torch.Tensor) -> tuple[torch.Tensor, ...]:
        lm = self.lm
        length, n = inputs_embeds.shape[1], prunable_index.shape[0]
        torch._check(length >= n)  # the visual block lies inside the sequence: keeps every TopK k in range
        seq = torch.arange(length, device=inputs_embeds.device)
        start, end = visual_start.reshape(1), (visual_start + visual_count).reshape(1)
        state = {"visual": (seq >= start) & (seq < end), "after": seq >= end, "token": seq,
                 "prunable": (seq.unsqueeze(1) == (visual_start + prunable_index).unsqueeze(0)).any(dim=1)}
        cos, sin = lm.rotary_emb(inputs_embeds, position_ids=position_ids)
        hidden, presents = inputs_embeds, []
        for idx, layer in enumerate(lm.layers):
            attn = layer.self_attn
            q, k, v = inllm.project_qkv(attn, layer.input_layernorm(hidden), cos, sin)
            s = hidden.shape[1]
            ctx = inllm.attend(q, k, v, attn.scaling, inllm.causal_mask(s, s, q.device), _eager(lm))
            presents += [k, v]
            residual = hidden
            m = self.schedule.at(idx, n)
            if m is not None:
                keep = self._survivors(q, k, attn.scaling, state, s - m)
                ctx, residual = ctx[:, keep], residual[:, keep]
                cos, sin = cos[:, keep], sin[:, keep]
                state = {key: value[keep] for key, value in state.items()}
            hidden = residual + attn.o_proj(ctx)
            hidden = hidden + layer.mlp(layer.post_attention_layernorm(hidden))
        logits = self.head(lm.norm(hidden[:, -1]))
        return (logits, *presents, state["token"].unsqueeze(0))

    def _survivors(self, q: torch.Tensor, k: torch.Tensor, scaling: float, state: dict[str, torch.Tensor],
                   keep: Any) -> torch.Tensor:
        """Ascending indices of the ``keep`` rows that survive this layer ([keep] int64)."""
        if self.schedule.kind == "fastv":
            scores = _fastv_scores(q, k, scaling)
        else:
            scores = _fitprune_scores(q, k, scaling, state["visual"], state["after"])
        key = torch.where(state["prunable"], scores, torch.full_like(scores, float("inf")))
        torch._check(keep >= 1)
        torch._check(keep <= scores.shape[0])
        return stable_topk_lowering(key.unsqueeze(0), keep)[0]


class InLLMDecodeGraph(nn.Module):
    """The decode graph over a ragged cache (see the module docstring); ``forward(inputs_embeds,
    position_ids, *past)`` with ``past = key_0, value_0, key_1, ...``."""

    def __init__(self, loaded: Any) -> None:
        super().__init__()
        self.lm = loaded.family.language_model(loaded.model)
        self.head = loaded.family.lm_head(loaded.model)

    def forward(self, inputs_embeds: torch.Tensor, position_ids: torch.Tensor,
                *past: torch.Tensor) -> tuple[torch.Tensor, ...]:
        lm = self.lm
        if len(past) != 2 * len(lm.layers):  # a bug in the caller: the spec fixes the count
            raise ValueError(f"expected {2 * len(lm.layers)} past tensors, got {len(past)}")
        cos, sin = lm.rotary_emb(inputs_embeds, position_ids=position_ids)
        hidden, presents = inputs_embeds, []
        q_len = inputs_embeds.shape[1]
        for idx, layer in enumerate(lm.layers):
            attn = layer.self_attn
            q, k, v = inllm.project_qkv(attn, layer.input_layernorm(hidden), cos, sin)
            keys = torch.cat([past[2 * idx], k], dim=2)
            values = torch.cat([past[2 * idx + 1], v], dim=2)
            presents += [keys, values]
            # always masked (all True for one token) so q_len is not specialised by a Python branch
            mask = inllm.causal_mask(q_len, keys.shape[2], q.device)
            hidden = hidden + attn.o_proj(inllm.attend(q, keys, values, attn.scaling, mask, _eager(lm)))
            hidden = hidden + layer.mlp(layer.post_attention_layernorm(hidden))
        return (self.head(lm.norm(hidden[:, -1])), *presents)
