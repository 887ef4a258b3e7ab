"""Training the zoo on the synthetic world: one function per model, a quality check for each.

Quality figures (printed and stored in the manifest), each with its chance level:
* clip: zero-shot accuracy on held-out single-object scenes with prompts "a photo of a {class}" (chance 0.1);
* vae: reconstruction PSNR on held-out scenes; unet: denoising MSE averaged over timesteps 50..950 with the
  right caption, vs. 1.0 for predicting zero noise, and with a wrong class's caption (must be higher), and
  the fraction of held-out images whose class-word cross-attention peaks inside the object (what GenPromp
  reads; chance = the mean box area fraction) and that map's mean outside the object (its background: what
  GenPromp's fixed threshold meets; lower is better);
* captioner: exact-match accuracy of greedy captions of held-out object crops ("a red striped star";
  chance 1/400) and accuracy of the class word in them (chance 0.1);
* vit / vgg / classifier: top-1 accuracy on held-out single-object scenes (chance 0.1).
"""
from __future__ import annotations

import contextlib
import math
import sys
from pathlib import Path
from typing import Iterator

import numpy as np

from ..manifest import TRAIN
from ..specs import IMAGENET_MEAN, IMAGENET_STD, OPENAI_MEAN, OPENAI_STD, spec
from .data import flip_where, random_flips, to_tensor


class Progress:
    """tqdm bar per model on stderr (or silent)."""

    def __init__(self, enabled: bool):
        self.enabled = enabled

    @contextlib.contextmanager
    def bar(self, desc: str, total: int):
        if not self.enabled:
            class _Null:
                def update(self, n=1): pass
                def set_postfix_str(self, s): pass
            yield _Null()
            return
        from tqdm.auto import tqdm

        with tqdm(total=total, desc=desc, file=sys.stderr, dynamic_ncols=True, leave=True,
                  mininterval=1.0) as bar:
            yield bar

    def log(self, msg: str) -> None:
        if self.enabled:
            print(f"[wsolbench zoo] {msg}", flush=True)


@contextlib.contextmanager
def quiet_libraries() -> Iterator[None]:
    """Silence library progress bars and info warnings while the zoo trains/saves."""
    import logging

    loggers = [logging.getLogger(n) for n in ("", "transformers", "diffusers", "timm", "open_clip")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    bars_were_on = None
    try:
        from transformers.utils import logging as tlog

        bars_were_on = tlog.is_progress_bar_enabled()
        tlog.disable_progress_bar()
    except Exception:  # pragma: no cover
        pass
    try:
        yield
    finally:
        for lg, lvl in zip(loggers, levels):
            lg.setLevel(lvl)
        if bars_were_on:
            from transformers.utils import logging as tlog

            tlog.enable_progress_bar()


def _lr_at(step: int, steps: int, lr: float, warmup: float = 0.05) -> float:
    w = max(1, int(steps * warmup))
    if step < w:
        return lr * (step + 1) / w
    return lr * 0.5 * (1 + math.cos(math.pi * (step - w) / max(1, steps - w)))


def _set_lr(opt, lr: float) -> None:
    """Set every group's lr to ``lr`` times its ``lr_mult`` (1 when the group has none)."""
    for g in opt.param_groups:
        g["lr"] = lr * g.get("lr_mult", 1.0)


NO_DECAY_NAMES = ("embedding", "logit_scale", "pos")


def _adamw(named_params, lr: float, wd: float = 0.05, lr_mults: dict[str, float] | None = None,
           no_decay_names: tuple[str, ...] = NO_DECAY_NAMES):
    """AdamW (betas 0.9/0.98, eps 1e-6) without weight decay on norms, biases and parameters whose name
    contains one of ``no_decay_names``; ``lr_mults`` scales the lr of parameters whose name contains a key."""
    import torch

    mults = lr_mults or {}
    groups: dict[tuple, dict] = {}
    for n, p in named_params:
        if not p.requires_grad:
            continue
        mult = next((m for part, m in mults.items() if part in n), 1.0)
        decay = not (p.ndim <= 1 or any(word in n for word in no_decay_names))
        g = groups.setdefault((mult, decay), {"params": [], "weight_decay": wd if decay else 0.0, "lr_mult": mult})
        g["params"].append(p)
    # foreach: the same numbers as the per-tensor loop (checked bit for bit), in far fewer op dispatches
    return torch.optim.AdamW(list(groups.values()), lr=lr, betas=(0.9, 0.98), eps=1e-6, foreach=True)


def _rng(seed: int, tag: str) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([seed, *tag.encode()]))


def _seed_torch(seed: int, tag: str) -> None:
    import torch

    torch.manual_seed(int(np.random.SeedSequence([seed, *tag.encode()]).generate_state(1)[0]))


# --------------------------------------------------------------------------------------------- models
def train_clip(scale: str, pool, test, seed: int, prog: Progress, vit=None):
    """Contrastive image-caption training (multi-positive: identical captions in a batch are all positives)
    plus a UniCL-style image-label term: each single-object image against the 10 class prompts
    "a photo of a {class}". The image tower starts from the zoo ViT (``vit``) when given."""
    import torch
    import torch.nn.functional as F

    from ..clip import create_clip
    from .data import PROMPT, clip_text_for, world

    cfg = TRAIN[scale]["clip"]
    _seed_torch(seed, "clip")
    model, tok = create_clip(scale, seed=None)
    if vit is not None:
        from .convert import timm_vit_to_open_clip_visual

        timm_vit_to_open_clip_visual(vit, model.visual)
    model.train()
    rng = _rng(seed, "clip")
    opt = _adamw(model.named_parameters(), cfg["lr"], 0.1,
                 {"visual.": cfg.get("visual_lr_mult", 1.0) if vit is not None else 1.0, "visual.proj": 1.0},
                 no_decay_names=NO_DECAY_NAMES + ("cls",))
    names = world().CLASS_NAMES
    prompts = tok([PROMPT.format(n) for n in names])
    with prog.bar(f"clip ({scale})", cfg["steps"]) as bar:
        for step in range(cfg["steps"]):
            _set_lr(opt, _lr_at(step, cfg["steps"], cfg["lr"]))
            idx = rng.choice(len(pool), size=min(cfg["batch"], len(pool)), replace=False)
            x = to_tensor(pool.images[idx], OPENAI_MEAN, OPENAI_STD, flip=random_flips(rng, len(idx)))
            texts = [clip_text_for(pool, int(i), rng) for i in idx]
            t = tok(texts)
            img = F.normalize(model.encode_image(x), dim=-1)
            txt = F.normalize(model.encode_text(torch.cat([t, prompts])), dim=-1)
            txt, cls_txt = txt[:len(idx)], txt[len(idx):]
            scale_ = model.logit_scale.exp()
            logits = scale_ * img @ txt.t()
            same = (t[:, None, :] == t[None, :, :]).all(-1).float()
            target = same / same.sum(1, keepdim=True)
            loss = 0.5 * (torch.sum(-target * F.log_softmax(logits, 1), 1).mean()
                          + torch.sum(-target * F.log_softmax(logits.t(), 1), 1).mean())
            single = torch.from_numpy(pool.single[idx])
            if single.any() and cfg.get("w_labels", 0):
                y = torch.from_numpy(pool.labels[idx])[single]
                loss = loss + cfg["w_labels"] * F.cross_entropy(scale_ * img[single] @ cls_txt.t(), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 2.0, foreach=True)
            opt.step()
            with torch.no_grad():
                model.logit_scale.clamp_(0, math.log(100))
            bar.update(1)
            if step % 20 == 0:
                bar.set_postfix_str(f"loss {loss.item():.3f}")
    model.eval()
    with torch.no_grad():
        tfeat = F.normalize(model.encode_text(prompts), dim=-1)
        colors = list(getattr(world(), "COLORS", ()))
        cfeat = F.normalize(model.encode_text(tok([f"a {c} object" for c in colors])), dim=-1) if colors else None
        keep = test.single
        preds, cpreds = [], []
        for a in range(0, int(keep.sum()), 128):
            x = to_tensor(test.images[keep][a:a + 128], OPENAI_MEAN, OPENAI_STD)
            f = F.normalize(model.encode_image(x), dim=-1)
            preds.append((f @ tfeat.t()).argmax(1).numpy())
            if cfeat is not None:
                cpreds.append((f @ cfeat.t()).argmax(1).numpy())
        acc = float((np.concatenate(preds) == test.labels[keep]).mean())
    q = {"zero_shot_accuracy": round(acc, 4), "chance": round(1 / len(names), 4), "prompt": PROMPT}
    if cfeat is not None:
        truth = np.array([colors.index(p[0].split()[1]) if p and p[0].split()[1] in colors else -1
                          for p in np.array(test.phrases, dtype=object)[keep]])
        q["zero_shot_color_accuracy"] = round(float((np.concatenate(cpreds) == truth).mean()), 4)
        q["color_chance"] = round(1 / len(colors), 4)
    q["final_loss"] = round(float(loss.item()), 4)
    return model, q


def train_vae(scale: str, pool, test, seed: int, prog: Progress):
    import torch
    import torch.nn.functional as F

    from ..diffusion import create_vae

    cfg = TRAIN[scale]["vae"]
    _seed_torch(seed, "vae")
    vae = create_vae(scale)
    vae.train()
    rng = _rng(seed, "vae")
    opt = _adamw(vae.named_parameters(), cfg["lr"], wd=0.0)
    with prog.bar(f"vae ({scale})", cfg["steps"]) as bar:
        for step in range(cfg["steps"]):
            _set_lr(opt, _lr_at(step, cfg["steps"], cfg["lr"]))
            idx = rng.choice(len(pool), size=min(cfg["batch"], len(pool)), replace=False)
            x = to_pm1(pool.images[idx], flip=random_flips(rng, len(idx)))
            post = vae.encode(x).latent_dist
            z = post.mean + post.std * torch.randn_like(post.mean)
            rec = vae.decode(z).sample
            kl = post.kl().mean() / x[0].numel()
            loss = F.l1_loss(rec, x) + F.mse_loss(rec, x) + 1e-4 * kl
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            bar.update(1)
            if step % 20 == 0:
                bar.set_postfix_str(f"loss {loss.item():.3f}")
    vae.eval()
    with torch.no_grad():
        lat = torch.cat([vae.encode(to_pm1(pool.images[a:a + 64])).latent_dist.sample()
                         for a in range(0, min(len(pool), 512), 64)])
        scaling = float(1.0 / lat.std())
        x = to_pm1(test.images[:128])
        rec = vae.decode(vae.encode(x).latent_dist.mode()).sample.clamp(-1, 1)
        mse = F.mse_loss((rec + 1) / 2, (x + 1) / 2).item()
    vae.register_to_config(scaling_factor=scaling)
    return vae, {"psnr_db": round(10 * math.log10(1.0 / max(mse, 1e-10)), 2), "scaling_factor": round(scaling, 5)}


def to_pm1(images: np.ndarray, flip: np.ndarray | None = None):
    """uint8 N×H×W×3 → float N×3×H×W in [-1, 1] (Stable Diffusion's VAE input); the images where ``flip``
    is True flipped horizontally."""
    import torch

    x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float().div_(127.5).sub_(1.0)
    return flip_where(x, flip)


def _encode_text(text_encoder, tokenizer, texts: list[str]):
    import torch

    ids = tokenizer(texts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                    return_tensors="pt").input_ids
    with torch.no_grad():
        return text_encoder(ids).last_hidden_state


def _unet_text(pool, i: int, rng: np.random.Generator) -> str:
    from .data import PROMPT

    r = rng.random()
    if r < 0.1 or not pool.names[i]:
        return ""  # unconditional (classifier-free guidance dropout)
    if r < 0.5:
        return PROMPT.format(pool.names[i][0]) if len(pool.names[i]) == 1 else pool.captions[i]
    if r < 0.85:
        return pool.captions[i]
    return pool.phrases[i][0] if len(pool.phrases[i]) == 1 else pool.captions[i]


def multi_object_weights(names: list[list[str]], share: float) -> np.ndarray:
    """Sampling probabilities giving the scenes with several objects ``share`` of the mass (uniform within each
    kind): binding each object's words to its own pixels is what makes cross-attention spatial."""
    multi = np.asarray([len(n) > 1 for n in names])
    if multi.all() or not multi.any():
        return np.full(len(names), 1.0 / len(names))
    return np.where(multi, share / multi.sum(), (1.0 - share) / (~multi).sum())


def train_unet(scale: str, pool, test, seed: int, prog: Progress, vae, text_encoder, tokenizer, scheduler):
    import torch
    import torch.nn.functional as F

    from .data import PROMPT, world
    from ..diffusion import create_unet

    cfg = TRAIN[scale]["unet"]
    _seed_torch(seed, "unet")
    unet = create_unet(scale)
    sf = vae.config.scaling_factor
    with torch.no_grad():  # latent distribution of every training image, once (chunks of 16: the same
        means, stds = [], []  # numbers as chunks of 128, a third faster on this 2-core CPU)
        for a in range(0, len(pool), 16):
            post = vae.encode(to_pm1(pool.images[a:a + 16])).latent_dist
            means.append(post.mean)
            stds.append(post.std)
        means, stds = torch.cat(means), torch.cat(stds)
    unet.train()
    rng = _rng(seed, "unet")
    mult = cfg["xattn_qk_lr_mult"]
    opt = _adamw(unet.named_parameters(), cfg["lr"], wd=0.01, lr_mults={"attn2.to_q": mult, "attn2.to_k": mult})
    p = multi_object_weights(pool.names, cfg["multi_share"])
    T = scheduler.config.num_train_timesteps
    signal = scheduler.alphas_cumprod.float()  # how much of the image a noisy latent still shows
    word_pos = _word_positions(tokenizer)
    store: list = []
    old_processors = unet.attn_processors
    if cfg["xattn_mask"]:
        unet.set_attn_processor(_CrossAttentionRecorder(store, detach=False))
    with prog.bar(f"unet ({scale})", cfg["steps"]) as bar:
        for step in range(cfg["steps"]):
            _set_lr(opt, _lr_at(step, cfg["steps"], cfg["lr"]))
            idx = rng.choice(len(pool), size=min(cfg["batch"], len(pool)), replace=False, p=p)
            ti = torch.from_numpy(idx)
            z0 = (means[ti] + stds[ti] * torch.randn_like(means[ti])) * sf
            texts = [_unet_text(pool, int(i), rng) for i in idx]
            cond = _encode_text(text_encoder, tokenizer, texts)
            noise = torch.randn_like(z0)
            t = torch.randint(0, T, (len(idx),))
            zt = scheduler.add_noise(z0, noise, t)
            store.clear()
            loss = F.mse_loss(unet(zt, t, encoder_hidden_states=cond).sample, noise)
            if cfg["xattn_mask"]:
                pos = torch.as_tensor([word_pos(text, pool.names[i][0]) if pool.single[i] else -1
                                       for text, i in zip(texts, idx)])
                masks = torch.from_numpy(pool.masks[idx]).float()
                loss = loss + cfg["xattn_mask"] * attention_mask_loss(store, pos, masks, signal[t])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0, foreach=True)
            opt.step()
            bar.update(1)
            if step % 20 == 0:
                bar.set_postfix_str(f"loss {loss.item():.3f}")
    unet.set_attn_processor(old_processors)
    unet.eval()
    # held-out denoising loss, right vs. wrong class prompt, same noise
    names = world().CLASS_NAMES
    keep = np.flatnonzero(test.single)[:96]
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        z0 = vae.encode(to_pm1(test.images[keep])).latent_dist.mean * sf
        right = _encode_text(text_encoder, tokenizer, [PROMPT.format(names[test.labels[k]]) for k in keep])
        wrong = _encode_text(text_encoder, tokenizer,
                             [PROMPT.format(names[(test.labels[k] + 1 + j % (len(names) - 1)) % len(names)])
                              for j, k in enumerate(keep)])
        losses = {"right": [], "wrong": []}
        for tv in range(50, T, 100):
            noise = torch.randn(z0.shape, generator=g)
            t = torch.full((len(keep),), tv, dtype=torch.long)
            zt = scheduler.add_noise(z0, noise, t)
            for key, cond in (("right", right), ("wrong", wrong)):
                losses[key].append(F.mse_loss(unet(zt, t, encoder_hidden_states=cond).sample, noise).item())
    right_l, wrong_l = float(np.mean(losses["right"])), float(np.mean(losses["wrong"]))
    point, chance, background = _cross_attention_pointing(unet, vae, text_encoder, tokenizer, scheduler, test, seed)
    return unet, {"denoise_mse": round(right_l, 4), "denoise_mse_wrong_class": round(wrong_l, 4),
                  "zero_predictor_mse": 1.0, "attention_pointing": round(point, 4),
                  "attention_pointing_chance": round(chance, 4), "attention_background": round(background, 4)}


class _CrossAttentionRecorder:
    """A diffusers attention processor that keeps the cross-attention probabilities (B·heads × N × T), detached
    for inspection or with their graph for a loss on them."""

    def __init__(self, store: list, detach: bool = True):
        from diffusers.models.attention_processor import AttnProcessor

        self.store, self.detach, self.inner = store, detach, AttnProcessor()

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None,
                 *args, **kwargs):
        if encoder_hidden_states is not None:
            q = attn.head_to_batch_dim(attn.to_q(hidden_states))
            k = attn.head_to_batch_dim(attn.to_k(encoder_hidden_states))
            probs = attn.get_attention_scores(q, k, None)
            self.store.append(probs.detach() if self.detach else probs)
        return self.inner(attn, hidden_states, encoder_hidden_states, attention_mask, temb)


def _word_positions(tokenizer):
    """f(text, word): the index, in ``text``'s padded token ids, of the last token of ``word``'s last
    occurrence (-1 when absent)."""
    def find(text: str, word: str) -> int:
        ids = tokenizer(text, truncation=True, max_length=tokenizer.model_max_length).input_ids
        w = tokenizer(word, add_special_tokens=False).input_ids
        starts = [i for i in range(len(ids) - len(w) + 1) if ids[i:i + len(w)] == w]
        return starts[-1] + len(w) - 1 if starts and w else -1

    return find


def word_attention(probs, batch: int, rows, pos):
    """The cross-attention one layer gave token ``pos[j]`` of sample ``rows[j]`` (``probs``: (batch·heads)×N×
    tokens, as ``_CrossAttentionRecorder`` stores it), averaged over heads and divided by its maximum, as GenPromp
    normalises its maps: len(rows)×N. What both the mask loss trains and the pointing check measures."""
    p = probs.view(batch, -1, probs.shape[1], probs.shape[2])[rows, :, :, pos].mean(1)
    return p / p.amax(1, keepdim=True).clamp_min(1e-12)


def attention_mask_loss(store: list, pos, masks, weights):
    """1 − the soft IoU of each sample's ``word_attention`` at token ``pos`` with its object (``masks``, B×H×W
    in [0, 1]), averaged over the recorded layers and over the samples with ``pos`` ≥ 0, weighted by
    ``weights``. An IoU, not the attention's share on the object: that share alone peaked the maps on a few
    pixels of each object, which GenPromp's fixed threshold boxed too small (GT-known 4.9 on world seeds 0-3).

    The tiny zoo's stand-in for what web-scale training gives Stable Diffusion: a class word whose attention
    covers its object. Denoising alone left it to the build seed (issue #27)."""
    import torch
    import torch.nn.functional as F

    keep = torch.nonzero(pos >= 0).flatten()
    if not len(keep) or not store:
        return torch.zeros(())
    b, w = len(pos), weights[keep]
    losses = []
    for probs in store:
        side = int(round(probs.shape[1] ** 0.5))
        a = word_attention(probs, b, keep, pos[keep])  # K×N
        m = F.adaptive_avg_pool2d(masks[keep, None], side).flatten(1)
        iou = (a * m).sum(1) / (a + m - a * m).sum(1).clamp_min(1e-12)
        losses.append(((1.0 - iou) * w).sum() / w.sum().clamp_min(1e-12))
    return torch.stack(losses).mean()


def _cross_attention_pointing(unet, vae, text_encoder, tokenizer, scheduler, test, seed: int,
                              n: int = 64) -> tuple[float, float, float]:
    """GenPromp-style check: cross-attention of the class word of "a photo of a {class}" at t = 0 and 99,
    max-normalised per map, averaged over layers/heads/timesteps; :func:`attention_box_figures` of it on
    held-out single-object images."""
    import torch
    import torch.nn.functional as F

    from .data import PROMPT, world

    names = world().CLASS_NAMES
    keep = np.flatnonzero(test.single & (test.labels >= 0))[:n]
    if len(keep) == 0:
        return 0.0, 0.0, 0.0
    words = [names[test.labels[k]] for k in keep]
    prompts = [PROMPT.format(w) for w in words]
    ids = tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, return_tensors="pt")
    find = _word_positions(tokenizer)
    pos = torch.as_tensor([find(text, w) for text, w in zip(prompts, words)])
    store: list = []
    old = unet.attn_processors
    unet.set_attn_processor(_CrossAttentionRecorder(store))
    g = torch.Generator().manual_seed(seed)
    size = test.images.shape[1]
    try:
        with torch.no_grad():
            cond = text_encoder(ids.input_ids).last_hidden_state
            z0 = vae.encode(to_pm1(test.images[keep])).latent_dist.mean * vae.config.scaling_factor
            noise = torch.randn(z0.shape, generator=g)
            total = torch.zeros(len(keep), size, size)
            for tv in (0, 99):
                store.clear()
                t = torch.full((len(keep),), tv, dtype=torch.long)
                unet(scheduler.add_noise(z0, noise, t), t, encoder_hidden_states=cond)
                for probs in store:
                    b = len(keep)
                    side = int(round(probs.shape[1] ** 0.5))
                    p = word_attention(probs, b, torch.arange(b), pos)
                    total += F.interpolate(p.view(b, 1, side, side), size=(size, size), mode="bilinear",
                                           align_corners=False)[:, 0]
    finally:
        unet.set_attn_processor(old)
    return attention_box_figures(total.numpy(), test.boxes[keep])


def attention_box_figures(maps: np.ndarray, boxes: np.ndarray) -> tuple[float, float, float]:
    """For N×H×W maps and their objects' boxes (x0, y0, x1, y1, inclusive): the fraction of maps whose peak
    falls in the box, the chance level of that (the mean box area fraction), and the background: the mean of
    each max-normalised map outside its box: what a fixed threshold on the map meets (the builder's
    ``ATTENTION_BARS`` say what GenPromp made of both figures)."""
    n, height, width = maps.shape
    bx = np.asarray(boxes)
    yy, xx = np.mgrid[:height, :width]
    inside = (xx >= bx[:, 0, None, None]) & (xx <= bx[:, 2, None, None]) & (yy >= bx[:, 1, None, None]) & \
        (yy <= bx[:, 3, None, None])
    hit = inside.reshape(n, -1)[np.arange(n), maps.reshape(n, -1).argmax(1)]
    area = ((bx[:, 2] - bx[:, 0] + 1) * (bx[:, 3] - bx[:, 1] + 1)) / float(height * width)
    norm = maps / np.maximum(maps.reshape(n, -1).max(1), 1e-12)[:, None, None]
    background = [norm[i][~inside[i]].mean() for i in range(n) if (~inside[i]).any()]
    return float(hit.mean()), float(area.mean()), float(np.mean(background)) if background else 0.0


def train_captioner(scale: str, pool, test, seed: int, prog: Progress, tokenizer_dir: Path, vit=None):
    from ..captioner import caption, create_captioner
    from .data import to_tensor, world

    cfg = TRAIN[scale]["captioner"]
    _seed_torch(seed, "captioner")
    model, processor = create_captioner(scale, seed=None, tokenizer_dir=tokenizer_dir)
    if vit is not None:  # BLIP starts from a pretrained ViT, as the real one does
        from .convert import timm_vit_to_blip_vision

        timm_vit_to_blip_vision(vit, model.vision_model)
    tok = processor.tokenizer
    bos = model.config.text_config.bos_token_id
    max_len = spec(scale, "captioner")["max_length"]
    model.train()
    rng = _rng(seed, "captioner")
    opt = _adamw(model.named_parameters(), cfg["lr"], 0.05,
                 {"vision_model.": cfg.get("vision_lr_mult", 1.0) if vit is not None else 1.0},
                 no_decay_names=NO_DECAY_NAMES + ("cls",))
    mean, std = processor.image_processor.image_mean, processor.image_processor.image_std
    n = len(pool.crops)
    with prog.bar(f"captioner ({scale})", cfg["steps"]) as bar:
        for step in range(cfg["steps"]):
            _set_lr(opt, _lr_at(step, cfg["steps"], cfg["lr"]))
            idx = rng.choice(n, size=min(cfg["batch"], n), replace=False)
            x = to_tensor(pool.crops[idx], mean, std)
            enc = tok([pool.crop_phrases[i] for i in idx], padding="max_length", max_length=max_len,
                      truncation=True, return_tensors="pt")
            ids = enc.input_ids.clone()
            ids[:, 0] = bos
            labels = ids.masked_fill(enc.attention_mask == 0, -100)
            loss = model(pixel_values=x, input_ids=ids, attention_mask=enc.attention_mask, labels=labels).loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            bar.update(1)
            if step % 20 == 0:
                bar.set_postfix_str(f"loss {loss.item():.3f}")
    model.eval()
    k = min(len(test.crops), 200)
    preds = []
    for a in range(0, k, 100):
        preds += caption(model, processor, list(test.crops[a:min(k, a + 100)]), max_new_tokens=8)
    truth = test.crop_phrases[:k]
    names = world().CLASS_NAMES
    exact = float(np.mean([p == t for p, t in zip(preds, truth)]))
    cls_ok = float(np.mean([names[c] in p.split() for p, c in zip(preds, test.crop_labels[:k])]))
    return (model, processor), {"exact_match": round(exact, 4), "class_word_accuracy": round(cls_ok, 4),
                                "chance_exact": round(1 / 400, 4), "chance_class": 0.1,
                                "examples": [[t, p] for t, p in list(zip(truth, preds))[:4]]}


def _teacher_targets(teacher, x, grid: int):
    """A CNN teacher's logits and its stage-2..4 features resized to the student's token grid and
    layer-normalised per location (the targets of the ViT's patch tokens)."""
    import torch
    import torch.nn.functional as F

    with torch.no_grad():  # one pass for both (the same numbers as teacher(x))
        final, feats = teacher.forward_intermediates(x, indices=3, intermediates_only=False)
        maps = [F.interpolate(f, size=(grid, grid), mode="bilinear", align_corners=False) for f in feats]
        f = torch.cat(maps, 1).permute(0, 2, 3, 1)
        f = F.layer_norm(f, (f.shape[-1],)).reshape(x.shape[0], grid * grid, -1)
        return f, teacher.forward_head(final)


def _teacher_table(teacher, images: np.ndarray, batch: int, grid: int | None):
    """The teacher's targets for every training image, as seen unflipped ([0]) and flipped ([1]): logits,
    and with ``grid`` the dense feature targets too (else None). The teacher is frozen, so computing them
    once replaces a forward pass per training step; chunks of the training batch size give each image
    the same numbers it gets inside a training batch."""
    import torch

    feats, logits = [], []
    for flip in (False, True):
        for a in range(0, len(images), batch):
            chunk = images[a:a + batch]
            n = len(chunk)
            if n < batch:  # pad the last chunk to the batch size
                chunk = np.concatenate([chunk, np.repeat(chunk[-1:], batch - n, 0)])
            x = to_tensor(chunk, IMAGENET_MEAN, IMAGENET_STD, flip=np.full(batch, flip))
            if grid is None:
                with torch.no_grad():
                    logits.append(teacher(x)[:n])
            else:
                f, lg = _teacher_targets(teacher, x, grid)
                feats.append(f[:n])
                logits.append(lg[:n])
    shape = (2, len(images))
    logits = torch.cat(logits).view(*shape, -1)
    return (torch.cat(feats).view(*shape, *feats[0].shape[1:]) if feats else None), logits


def _eval_classifier(model, test, mean, std) -> float:
    import torch

    tk = test.single
    with torch.no_grad():
        preds = np.concatenate([model(to_tensor(test.images[tk][a:a + 128], mean, std)).argmax(1).numpy()
                                for a in range(0, int(tk.sum()), 128)])
    return float((preds == test.labels[tk]).mean())


def train_backbone(kind: str, scale: str, pool, test, seed: int, prog: Progress, teacher=None):
    """Supervised pretraining on single-object scenes. With a ``teacher`` (the zoo's CNN classifier) the
    student also matches its soft predictions (knowledge distillation) and, for the ViT, its intermediate
    feature maps at every patch token: dense targets that get a ViT off its long initial plateau."""
    import torch
    import torch.nn.functional as F

    from ..backbones import create_backbone
    from .data import world

    cfg = TRAIN[scale][kind]
    _seed_torch(seed, kind)
    n_cls = len(world().CLASS_NAMES)
    model = create_backbone(kind, scale, num_classes=n_cls, seed=None)
    if cfg.get("init") == "mimetic":
        from ..backbones import mimetic_init

        mimetic_init(model)
    model.train()
    dense_head = None
    keep = np.flatnonzero(pool.single)
    if teacher is not None:
        teacher.eval()
        grid = model.patch_embed.grid_size[0] if kind == "vit" else None
        t_feats, t_logits_all = _teacher_table(teacher, pool.images[keep], cfg["batch"], grid)
        if t_feats is not None:
            dense_head = torch.nn.Linear(model.embed_dim, t_feats.shape[-1])
    rng = _rng(seed, kind)
    params = torch.nn.ModuleList([model] + ([dense_head] if dense_head is not None else []))
    opt = _adamw(params.named_parameters(), cfg["lr"], wd=cfg.get("wd", 0.05))
    with prog.bar(f"{kind} ({scale})", cfg["steps"]) as bar:
        for step in range(cfg["steps"]):
            _set_lr(opt, _lr_at(step, cfg["steps"], cfg["lr"], cfg.get("warmup", 0.05)))
            idx = rng.choice(keep, size=min(cfg["batch"], len(keep)), replace=False)
            flip = random_flips(rng, len(idx))
            x = to_tensor(pool.images[idx], IMAGENET_MEAN, IMAGENET_STD, flip=flip)
            y = torch.from_numpy(pool.labels[idx])
            if teacher is None:
                loss = F.cross_entropy(model(x), y, label_smoothing=cfg.get("smoothing", 0.0))
            else:
                at = (torch.from_numpy(flip.astype(np.int64)), torch.from_numpy(np.searchsorted(keep, idx)))
                t_logits = t_logits_all[at]
                if dense_head is not None:
                    tokens = model.forward_features(x)
                    logits = model.forward_head(tokens)
                    feat_loss = F.mse_loss(dense_head(tokens[:, model.num_prefix_tokens:]), t_feats[at])
                else:
                    logits, feat_loss = model(x), torch.zeros(())
                kd = F.kl_div(F.log_softmax(logits, 1), F.softmax(t_logits, 1), reduction="batchmean")
                loss = 0.5 * F.cross_entropy(logits, y) + 0.5 * kd + cfg.get("w_feat", 1.0) * feat_loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params.parameters(), 2.0, foreach=True)
            opt.step()
            bar.update(1)
            if step % 20 == 0:
                bar.set_postfix_str(f"loss {loss.item():.3f}")
    model.eval()
    q = {"accuracy": round(_eval_classifier(model, test, IMAGENET_MEAN, IMAGENET_STD), 4),
         "chance": round(1 / n_cls, 4)}
    if teacher is not None:
        q["distilled_from"] = "classifier"
    return model, q
