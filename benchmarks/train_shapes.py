"""Train the ``shapes-llava`` preset and its CLIP guidance on the synthetic shapes VQA (deterministic, CPU).

    python benchmarks/train_shapes.py --out /tmp/shapes-run          # ~30 min on 2 CPU threads
    python benchmarks/train_shapes.py --out /tmp/smoke --smoke       # a few steps of every stage

The staged recipe of ``../shared/docs/TOY-VLM.md`` (end-to-end training from scratch learns only the answer
prior on this budget):

1. **Vision tower alone** (``--stage1-steps``): a linear 13-way head on every layer -2 patch state (background
   or the colour x shape of the object covering > 25 % of the patch; background weighted 0.2), plus a
   multi-label head on the layer -2 [CLS] state that predicts which of the 12 colour x shape classes are
   present. The [CLS] attention row (what ``cls-topk`` ranks by) is never supervised: whatever it attends to
   emerges from the presence task. Patch position embeddings start as 2-D sin-cos at amplitude 0.5.
2. **Projector + LLM, tower frozen** (``--stage2-steps``): layer -2 states of a pool of images computed once;
   each image carries up to 6 independent question turns packed into one sequence, every turn seeing only
   the prompt prefix, the visual tokens and itself (a block mask; each turn's positions restart right after
   the image), so every turn is exactly the single-question request the pipeline runs; loss on the answer
   word and the EOS only. Visual tokens are **randomly pruned during training** so both position conventions
   mean something: per batch, 40 % keep all 576, 30 % a uniformly random subset, 30 % a random subset biased
   towards object patches (object patches 8x as likely; this mimics the object-heavy subsets that saliency
   methods keep, without favouring any method), K drawn from {288, 192, 128, 96, 64, 48, 32}; the kept tokens
   get their original positions in half of the batches and contiguous ones in the other half.
3. **CLIP-style text tower** (``--clip-steps``): a 2-layer CLIP text tower with text/visual projections to 32
   dims, trained against the frozen tower's layer -2 patch states (through the tower's post-LayerNorm, as
   GridPrune's guidance computes them): for a caption naming an object ("the red object", "is there a blue
   square?"), a softmax over the image's 576 patches must put its mass on the patches of the matching objects.

Every stage runs a fixed number of steps (never a time budget), from ``--seed``; training images come from
split 0 of :mod:`edgeprune.eval.shapes`, the held-out check from split 1. Writes a model directory
(``config.json``, ``model.safetensors``, tokenizer, ``preprocessor_config.json``, ``clip/``) and
``train_log.json`` (losses, wall times, held-out accuracy).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from edgeprune.eval import shapes as S  # noqa: E402
from edgeprune.models import shapes as M  # noqa: E402
from edgeprune.runtime.preprocess import CLIP_MEAN, CLIP_STD  # noqa: E402
from edgeprune.runtime.prompt import split_prompt  # noqa: E402

MEAN = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)
STD = torch.tensor(CLIP_STD).view(1, 3, 1, 1)
K_CHOICES = (288, 192, 128, 96, 64, 48, 32)
TURNS = 6


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def pixels(images: list[np.ndarray]) -> torch.Tensor:
    """[B, 3, 336, 336] CLIP-normalised pixels (what ``preprocess`` gives for a 336 x 336 image)."""
    x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 255.0
    return (x - MEAN) / STD


def sincos_2d(grid: int, dim: int) -> torch.Tensor:
    """[grid * grid, dim] 2-D sin-cos position table (half the channels for rows, half for columns)."""
    quarter = dim // 4
    omega = 1.0 / (10000 ** (torch.arange(quarter, dtype=torch.float32) / quarter))
    ys, xs = torch.meshgrid(torch.arange(grid, dtype=torch.float32), torch.arange(grid, dtype=torch.float32),
                            indexing="ij")
    parts = [f(c.reshape(-1, 1) * omega) for c in (ys, xs) for f in (torch.sin, torch.cos)]
    return torch.cat(parts, dim=1)


def schedule(opt: torch.optim.Optimizer, lr: float, step: int, total: int, warmup: int = 30) -> None:
    """Linear warm-up then cosine decay to 5 % of ``lr``."""
    if step < warmup:
        f = (step + 1) / warmup
    else:
        f = 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))
    for g in opt.param_groups:
        g["lr"] = lr * f


def tower_states(tower, px: torch.Tensor) -> torch.Tensor:
    """Layer -2 states [B, 577, D] ([CLS] first), running only the layers LLaVA reads."""
    t = getattr(tower, "vision_model", tower)
    state = t.pre_layrnorm(t.embeddings(px))
    for layer in t.encoder.layers[: len(t.encoder.layers) - 1]:
        out = layer(state, None)
        state = out[0] if isinstance(out, tuple) else out
    return state


# ------------------------------------------------------------------------------------------------ stage 1
def stage1(model, steps: int, batch: int, lr: float, seed: int, logs: dict) -> None:
    tower = model.model.vision_tower
    t = getattr(tower, "vision_model", tower)
    with torch.no_grad():
        pe = t.embeddings.position_embedding.weight
        pe[1:] = 0.5 * sincos_2d(S.GRID, pe.shape[1])
        pe[0] = 0.0
    d = pe.shape[1]
    patch_head, cls_head = torch.nn.Linear(d, S.N_CLASSES), torch.nn.Linear(d, S.N_CLASSES - 1)
    params = [p for layer in t.encoder.layers[:-1] for p in layer.parameters()]
    params += list(t.embeddings.parameters()) + list(t.pre_layrnorm.parameters())
    params += list(patch_head.parameters()) + list(cls_head.parameters())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    weight = torch.ones(S.N_CLASSES)
    weight[0] = 0.2
    t0, hist = time.time(), []
    for step in range(steps):
        samples = [S.make_sample(seed, step * batch + i) for i in range(batch)]
        px = pixels([s.image for s in samples])
        labels = torch.from_numpy(np.stack([s.patch_labels() for s in samples]))
        present = torch.from_numpy(np.stack([s.present() for s in samples]))
        schedule(opt, lr, step, steps)
        st = tower_states(tower, px)
        logits = patch_head(st[:, 1:])
        loss_p = F.cross_entropy(logits.reshape(-1, S.N_CLASSES), labels.reshape(-1), weight=weight)
        loss_c = F.binary_cross_entropy_with_logits(cls_head(st[:, 0]), present)
        loss = loss_p + 0.5 * loss_c
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        with torch.no_grad():
            pred = logits.argmax(-1)
            fg = labels > 0
            acc_fg = float((pred[fg] == labels[fg]).float().mean()) if fg.any() else 0.0
        hist.append((float(loss_p.detach()), float(loss_c.detach()), acc_fg))
        if step % 50 == 0 or step == steps - 1:
            m = np.mean(hist[-50:], axis=0)
            log(f"stage1 {step}/{steps} patch {m[0]:.3f} cls {m[1]:.3f} object-patch acc {m[2]:.3f} "
                f"({time.time() - t0:.0f}s)")
    logs["stage1"] = {"steps": steps, "batch": batch, "lr": lr, "wall_s": round(time.time() - t0, 1),
                      "final_object_patch_acc": round(float(np.mean([h[2] for h in hist[-50:]])), 4)}


# ------------------------------------------------------------------------------------------------ stage 2
def feature_pool(model, n: int, seed: int, start: int) -> tuple[torch.Tensor, list]:
    """Layer -2 patch states [n, 576, D] of images ``start..start+n`` of split ``seed`` and their samples."""
    tower = model.model.vision_tower
    samples = [S.make_sample(seed, start + i) for i in range(n)]
    out = []
    with torch.no_grad():
        for i in range(0, n, 32):
            out.append(tower_states(tower, pixels([s.image for s in samples[i:i + 32]]))[:, 1:])
    for s in samples:  # keep what question generation and the object bias need, drop the pixels
        s.labels = s.patch_labels()
        s.image = None
        s.id_map = None
    return torch.cat(out), samples


class Prompts:
    """Token ids of the preset template around the image, as the pipeline tokenizes them."""

    def __init__(self, tok) -> None:
        self.tok = tok
        before, _ = split_prompt(M.TEMPLATE, "x")
        self.prefix = list(tok(before, add_special_tokens=True).input_ids)
        self.eos = tok.eos_token_id
        self.cache: dict[str, list[int]] = {}

    def suffix(self, question: str) -> list[int]:
        if question not in self.cache:
            _, after = split_prompt(M.TEMPLATE, question)
            self.cache[question] = list(self.tok(after, add_special_tokens=False).input_ids)
        return self.cache[question]

    def answer(self, word: str) -> int:
        ids = self.tok(word, add_special_tokens=False).input_ids
        if len(ids) != 1 or ids[0] == self.tok.unk_token_id:
            raise ValueError(f"answer {word!r} is not one vocabulary word")
        return ids[0]


def choose_kept(rng: np.random.Generator, samples: list, full_p: float = 0.4) -> tuple[np.ndarray, str]:
    """[B, K] ascending kept indices for a training batch, and the position convention."""
    n = S.GRID * S.GRID
    conv = "original" if rng.random() < 0.5 else "compact"
    u = rng.random()
    if u < full_p:
        return np.tile(np.arange(n), (len(samples), 1)), conv
    k = int(K_CHOICES[int(rng.integers(len(K_CHOICES)))])
    rows = []
    for s in samples:
        if u < full_p + (1 - full_p) / 2:
            w = np.ones(n)
        else:
            w = np.where(s.labels > 0, 8.0, 1.0)
        rows.append(np.sort(rng.choice(n, size=k, replace=False, p=w / w.sum())))
    return np.stack(rows), conv


def build_batch(prompts: Prompts, samples: list, kept: np.ndarray, conv: str, rng: np.random.Generator):
    """Token ids, position ids, the block mask and the loss targets of one packed stage-2 batch."""
    b, k = kept.shape
    p = len(prompts.prefix)
    turns = []
    for s in samples:
        qs = {q: (a, t) for q, a, t in S.questions_for(s.objects, rng) + S.questions_for(s.objects, rng)}
        turns.append(list(qs.items())[:TURNS])
    length = max(len(prompts.suffix(q)) for ts in turns for q, _ in ts) + 2
    seq = p + k + TURNS * length
    ids = torch.full((b, TURNS * length), M.PAD_ID, dtype=torch.long)
    target = torch.full((b, seq), -100, dtype=torch.long)  # target[i] = token predicted at position i
    for bi, ts in enumerate(turns):
        for ti, (q, (a, _)) in enumerate(ts):
            suf = prompts.suffix(q)
            body = suf + [prompts.answer(a), prompts.eos]
            off = ti * length
            ids[bi, off:off + len(body)] = torch.tensor(body)
            target[bi, p + k + off + len(suf) - 1] = body[len(suf)]
            target[bi, p + k + off + len(suf)] = prompts.eos
    base = p + (S.GRID * S.GRID if conv == "original" else k)
    vis_pos = torch.from_numpy(p + kept) if conv == "original" else torch.arange(p, p + k).expand(b, k)
    text_pos = (base + torch.arange(length)).repeat(TURNS).expand(b, -1)
    pos = torch.cat([torch.arange(p).expand(b, p), vis_pos, text_pos], dim=1)
    turn_of = torch.cat([torch.full((p + k,), -1), torch.arange(TURNS).repeat_interleave(length)])
    causal = torch.ones(seq, seq, dtype=torch.bool).tril()
    mask = causal & ((turn_of[None, :] == -1) | (turn_of[:, None] == turn_of[None, :]))
    return ids, pos, mask[None, None], target


def llm_logits(model, feats: torch.Tensor, ids: torch.Tensor, prefix: list[int], pos, mask, rows=None):
    """Logits at the positions ``rows`` (a bool [B, S] mask) of ``prefix | projected feats | ids``."""
    emb = model.get_input_embeddings()
    b = feats.shape[0]
    pre = emb(torch.tensor(prefix)).expand(b, -1, -1)
    x = torch.cat([pre, model.model.multi_modal_projector(feats), emb(ids)], dim=1)
    h = model.model.language_model(inputs_embeds=x, attention_mask=mask, position_ids=pos).last_hidden_state
    return model.lm_head(h[rows])


def stage2(model, tok, pool, samples, steps: int, batch: int, lr: float, seed: int, logs: dict,
           full_p: float = 0.4) -> None:
    for p in model.model.vision_tower.parameters():
        p.requires_grad_(False)
    params = (list(model.model.multi_modal_projector.parameters()) + list(model.model.language_model.parameters())
              + list(model.lm_head.parameters()))
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    prompts = Prompts(tok)
    rng = np.random.default_rng([seed, 2])
    t0, hist = time.time(), []
    for step in range(steps):
        idx = rng.choice(len(samples), size=batch, replace=False)
        bs = [samples[i] for i in idx]
        kept, conv = choose_kept(rng, bs, full_p)
        ids, pos, mask, target = build_batch(prompts, bs, kept, conv, rng)
        feats = torch.gather(pool[torch.from_numpy(idx)], 1,
                             torch.from_numpy(kept)[..., None].expand(-1, -1, pool.shape[-1]))
        schedule(opt, lr, step, steps)
        rows = target >= 0
        logits = llm_logits(model, feats, ids, prompts.prefix, pos, mask, rows)
        loss = F.cross_entropy(logits, target[rows])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        with torch.no_grad():
            ans = target[rows] != prompts.eos
            acc = float((logits.argmax(-1)[ans] == target[rows][ans]).float().mean())
        hist.append((float(loss), acc))
        if step % 50 == 0 or step == steps - 1:
            m = np.mean(hist[-50:], axis=0)
            log(f"stage2 {step}/{steps} loss {m[0]:.3f} train answer acc {m[1]:.3f} ({time.time() - t0:.0f}s)")
    logs["stage2"] = {"steps": steps, "batch": batch, "lr": lr, "turns": TURNS, "pool": len(samples),
                      "full_p": full_p,
                      "wall_s": round(time.time() - t0, 1),
                      "final_train_answer_acc": round(float(np.mean([h[1] for h in hist[-50:]])), 4)}


# ------------------------------------------------------------------------------------------------ stage 3
def build_clip(model, tok):
    import transformers

    text = transformers.CLIPTextConfig(**M.CLIP_TEXT, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                                       pad_token_id=tok.pad_token_id)
    vc = model.config.vision_config
    vision = transformers.CLIPVisionConfig(hidden_size=vc.hidden_size, intermediate_size=vc.intermediate_size,
                                           num_hidden_layers=1, num_attention_heads=vc.num_attention_heads,
                                           image_size=vc.image_size, patch_size=vc.patch_size)
    cfg = transformers.CLIPConfig(text_config=text.to_dict(), vision_config=vision.to_dict(),
                                  projection_dim=M.CLIP_PROJECTION)
    return transformers.CLIPModel(cfg)


def stage3(model, tok, pool, samples, steps: int, batch: int, lr: float, seed: int, logs: dict):
    clip = build_clip(model, tok)
    post_ln = getattr(model.model.vision_tower, "vision_model", model.model.vision_tower).post_layernorm
    params = (list(clip.text_model.parameters()) + list(clip.text_projection.parameters())
              + list(clip.visual_projection.parameters()))
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    rng = np.random.default_rng([seed, 3])
    t0, hist = time.time(), []
    per = 4
    for step in range(steps):
        idx = rng.choice(len(samples), size=batch, replace=False)
        texts, pos_masks, owners = [], [], []
        for j, i in enumerate(idx):
            s = samples[i]
            for _ in range(per):
                obj = s.objects[int(rng.integers(len(s.objects)))]
                text, c, sh = S.caption(obj, rng)
                match = [o.label for o in s.objects if (c is None or o.color == c) and (sh is None or o.shape == sh)]
                texts.append(text)
                pos_masks.append(np.isin(s.labels, match))
                owners.append(j)
        bodies = [[tok.bos_token_id] + tok(t, add_special_tokens=False).input_ids + [tok.eos_token_id]
                  for t in texts]
        width = max(map(len, bodies))
        ids = torch.full((len(bodies), width), tok.pad_token_id, dtype=torch.long)
        for r, body in enumerate(bodies):
            ids[r, :len(body)] = torch.tensor(body)
        last = torch.tensor([len(body) - 1 for body in bodies])
        schedule(opt, lr, step, steps)
        hidden = clip.text_model(input_ids=ids).last_hidden_state[torch.arange(len(bodies)), last]
        t_emb = F.normalize(clip.text_projection(hidden), dim=-1)  # [T, Dc]
        with torch.no_grad():
            ln = post_ln(pool[torch.from_numpy(idx)])
        p_emb = F.normalize(clip.visual_projection(ln), dim=-1)  # [B, 576, Dc]
        sim = torch.einsum("td,tpd->tp", t_emb, p_emb[torch.tensor(owners)]) / 0.07
        pm = torch.from_numpy(np.stack(pos_masks))
        has = pm.any(dim=1)
        loss = (torch.logsumexp(sim, 1) - torch.logsumexp(sim.masked_fill(~pm, -1e4), 1))[has].mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        with torch.no_grad():
            top = sim.argmax(1)
            hit = float(pm[torch.arange(len(top)), top][has].float().mean())
        hist.append((float(loss), hit))
        if step % 50 == 0 or step == steps - 1:
            m = np.mean(hist[-50:], axis=0)
            log(f"clip {step}/{steps} loss {m[0]:.3f} top-patch on target {m[1]:.3f} ({time.time() - t0:.0f}s)")
    logs["clip"] = {"steps": steps, "batch": batch, "captions_per_image": per, "lr": lr, "temperature": 0.07,
                    "wall_s": round(time.time() - t0, 1),
                    "final_top_patch_on_target": round(float(np.mean([h[1] for h in hist[-50:]])), 4)}
    return clip.eval()


# ------------------------------------------------------------------------------------------------ check
@torch.no_grad()
def heldout(model, tok, n_images: int, seed: int) -> dict:
    """Greedy one-word accuracy on held-out images (split ``seed``), all tokens and random 64 / 32."""
    pool, samples = feature_pool(model, n_images, seed, 0)
    prompts = Prompts(tok)
    rng = np.random.default_rng([seed, 9])
    out = {}
    for name, k, conv in (("all-576", 576, "compact"), ("random-64-original", 64, "original"),
                          ("random-64-compact", 64, "compact"), ("random-32-original", 32, "original")):
        right = total = 0
        for i in range(0, n_images, 16):
            bs = samples[i:i + 16]
            kept = (np.tile(np.arange(576), (len(bs), 1)) if k == 576 else
                    np.stack([np.sort(rng.choice(576, size=k, replace=False)) for _ in bs]))
            qrng = np.random.default_rng([seed, 10, i])
            ids, pos, mask, target = build_batch(prompts, bs, kept, conv, qrng)
            feats = torch.gather(pool[i:i + len(bs)], 1, torch.from_numpy(kept)[..., None].expand(-1, -1, 64))
            rows = target >= 0
            pred = llm_logits(model, feats, ids, prompts.prefix, pos, mask, rows).argmax(-1)
            ans = target[rows] != prompts.eos
            ok = (pred[ans] == target[rows][ans]).tolist()
            right += sum(ok)
            total += len(ok)
        out[name] = round(right / max(1, total), 4)
    log(f"held-out ({n_images} images, up to {TURNS} questions each): {out}")
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="model directory to write (must not exist)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1, help="1 was faster than 2 on the shared 2-core machine")
    ap.add_argument("--stage1-steps", type=int, default=1300)
    ap.add_argument("--stage2-steps", type=int, default=1300)
    ap.add_argument("--clip-steps", type=int, default=300)
    ap.add_argument("--pool", type=int, default=2000, help="images whose features stage 2 and 3 train on")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--init", metavar="DIR", help="continue from this model directory (a run of this script): "
                    "stage 1 is skipped, its tower kept; with --clip-steps 0 its clip/ is copied")
    ap.add_argument("--pool-start", type=int, default=10_000_000, help="index of the pool's first training image "
                    "(a continuation with --init takes a fresh pool, e.g. 20000000)")
    ap.add_argument("--full-p", type=float, default=0.4, help="share of stage-2 batches that keep all 576 tokens")
    ap.add_argument("--smoke", action="store_true", help="5 steps per stage, 64-image pool (checks the script)")
    args = ap.parse_args()
    if args.smoke:
        args.stage1_steps = args.stage2_steps = args.clip_steps = 5
        args.pool = 64
    out = Path(args.out)
    if out.exists():
        print(f"error: {out} exists; pass a new directory", file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    from edgeprune.models.tiny import build_random_model, save_preset_atomic
    from edgeprune.runtime.preprocess import ImageConfig

    t0 = time.time()
    if args.init:
        import transformers

        model = transformers.LlavaForConditionalGeneration.from_pretrained(args.init).train()
        logs: dict = json.loads((Path(args.init) / "train_log.json").read_text())
        logs = {"seed": args.seed, "threads": args.threads, "args": vars(args), "init": logs}
    else:
        model = build_random_model(M.shapes_config(), seed=args.seed).train()
        logs = {"seed": args.seed, "threads": args.threads, "args": vars(args)}
    tok = M.build_shapes_tokenizer()
    if args.stage1_steps and not args.init:
        stage1(model, args.stage1_steps, args.batch, args.lr, args.seed, logs)
    tp = time.time()
    pool, samples = feature_pool(model, args.pool, args.seed, args.pool_start)
    logs["feature_pool_s"] = round(time.time() - tp, 1)
    stage2(model, tok, pool, samples, args.stage2_steps, args.batch, args.lr, args.seed, logs, args.full_p)
    clip = None
    if args.clip_steps:
        clip = stage3(model, tok, pool, samples, args.clip_steps, args.batch, args.lr, args.seed, logs)
    model.eval()
    logs["heldout"] = heldout(model, tok, 48 if args.smoke else 200, S.EVAL_SEED)
    logs["wall_s"] = round(time.time() - t0, 1)
    save_preset_atomic(model, tok, ImageConfig(size=336, crop=336), str(out))
    if clip is not None:
        clip.save_pretrained(str(out / "clip"))
        tok.save_pretrained(str(out / "clip"))
    elif args.init:
        shutil.copytree(Path(args.init) / "clip", out / "clip")
    (out / "train_log.json").write_text(json.dumps(logs, indent=2) + "\n")
    log(f"wrote {out} in {logs['wall_s']:.0f}s")
    shutil.rmtree(out / ".cache", ignore_errors=True)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    raise SystemExit(main())
