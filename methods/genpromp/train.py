"""GenPromp's two training stages (``train.*``): stage 1 learns each class's concept-token row, stage 2
finetunes the U-Net with 0.5 f_r + 0.5 f_d; both resume and write the official checkpoint layout."""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from wsolbench.weights import diffusers_load_kwargs

from .components import cast
from .inference import official_pixels

STAGE2_STATE = "stage2_state.pt"
DECAY_SCOPES = ("vocabulary", "concept")


def world_size() -> int:
    """Processes of this run (torch.distributed's world size, 1 without it)."""
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def scaled_lr(stage: dict) -> float:
    """A stage's learning rate: with ``scale_lr`` the official (accelerate) total-batch scaling
    lr x batch_size x grad_accum x processes (``processes`` null = this run's world size)."""
    lr = float(stage["lr"])
    if not stage["scale_lr"]:
        return lr
    processes = int(stage["processes"]) if stage["processes"] else world_size()
    return lr * int(stage["batch_size"]) * int(stage["grad_accum"]) * processes


def _progress(total: int, desc: str, initial: int = 0):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc=desc, leave=False, dynamic_ncols=True)


class TrainingMixin:
    """``fit`` for GenPromp: reads ``config["train"]``, the diffusers parts, ``concepts``, ``templates``,
    ``concept_tokens``/``meta_tokens``, and writes ``tokens/`` and ``unet/`` under the run's ``out_dir``."""

    def _train_transform(self):
        """PIL image -> 3×S×S in [-1, 1], the official train pipeline: Resize (torchvision's default, bilinear
        on the PIL image), RandomCrop, RandomHorizontalFlip, ColorJitter, then ``official_pixels``."""
        from torchvision.transforms import v2

        aug = self.config["train"]["augment"]
        ops = [v2.Resize((aug["resize"], aug["resize"]), interpolation=v2.InterpolationMode.BILINEAR),
               v2.RandomCrop(aug["crop"])]
        if aug["hflip"]:
            ops.append(v2.RandomHorizontalFlip())
        if aug["color_jitter"]:
            ops.append(v2.ColorJitter(*aug["color_jitter"]))
        augment = v2.Compose(ops)
        return lambda img: official_pixels(augment(img.convert("RGB")), self.image_size)

    def _load_batch(self, dataset, indices: Sequence[int], transform) -> torch.Tensor:
        return torch.stack([transform(dataset[i].load_image()) for i in indices])

    def _noisy(self, pixels: torch.Tensor):
        with torch.no_grad():
            z0 = self.encode_latents(pixels.to(self.device))
        noise = torch.randn_like(z0)
        t = torch.randint(0, self.scheduler.config.num_train_timesteps, (z0.shape[0],), device=z0.device)
        return self.scheduler.add_noise(z0, noise, t), noise, t

    def fit(self, train_data: Any, *, val_data: Any = None, out_dir: str | Path | None = None,
            resume: bool = False, progress: bool = True) -> dict:
        """Stage 1 (concept rows) then stage 2 (U-Net finetuning); each skipped when its official
        checkpoint is configured (model.token_path / model.unet_path) or disabled."""
        from wsolbench.training import seed_everything

        tr = self.config["train"]
        out_dir = Path(out_dir) if out_dir is not None else None
        seed_everything(int(tr["seed"]))
        cast(self.vae, self.device, torch.float32)
        cast(self.unet, self.device, torch.float32)
        self.infer_dtype_saved, self.infer_dtype = self.infer_dtype, torch.float32
        report: dict[str, Any] = {}
        try:
            if self.config["model"]["token_path"]:
                report["stage1"] = "skipped (model.token_path given)"
            else:
                report["stage1"] = self._fit_stage1(train_data, out_dir, resume, progress)
            s2 = tr["stage2"]
            if not self.config["inference"]["finetuned"] or not s2["enabled"]:
                report["stage2"] = "skipped (disabled)"
            elif self.config["model"]["unet_path"]:
                report["stage2"] = "skipped (model.unet_path given)"
            else:
                report["stage2"] = self._fit_stage2(train_data, out_dir, resume, progress)
        finally:
            self.infer_dtype = self.infer_dtype_saved
            cast(self.vae, self.device, self.infer_dtype).eval()
            cast(self.unet, self.device, self.infer_dtype).eval().requires_grad_(False)
            self.text_encoder.eval()
            self._cache.clear()
        return report

    def _stage1_plan(self, c: int, indices: list[int], cfg: dict) -> list[tuple[list[int], bool]]:
        """Micro-batches of class ``c`` over all epochs, each flagged when an optimizer step follows it
        (every ``grad_accum`` micro-batches and at each epoch end, as accelerate does)."""
        plan = []
        bs, acc = int(cfg["batch_size"]), int(cfg["grad_accum"])
        for e in range(int(cfg["epochs"])):
            rng = np.random.default_rng([int(self.config["train"]["seed"]), c, e])
            order = [indices[i] for i in rng.permutation(len(indices))]
            micro = [order[s:s + bs] for s in range(0, len(order), bs)]
            for j, mb in enumerate(micro):
                plan.append((mb, (j + 1) % acc == 0 or j == len(micro) - 1))
        return plan

    def _fit_stage1(self, train_data, out_dir: Path | None, resume: bool, progress: bool) -> dict:
        cfg = self.config["train"]["stage1"]
        n_cls = len(self.class_names)
        by_class: list[list[int]] = [[] for _ in range(n_cls)]
        for i, s in enumerate(train_data):
            by_class[s.label].append(i)
        classes = [c for c in range(n_cls) if by_class[c]]
        if cfg["max_classes"]:
            classes = classes[: int(cfg["max_classes"])]
        tok_dir = out_dir / "tokens" if out_dir is not None else None
        done = []
        if resume and tok_dir is not None and tok_dir.is_dir():
            have = {int(p.stem) - self.token_offset for p in tok_dir.glob("*.bin") if p.stem.isdigit()}
            done = [c for c in classes if c in have]
            if done:
                self.load_official_tokens(tok_dir)
        todo = [c for c in classes if c not in done]
        lr = scaled_lr(cfg)
        if cfg["weight_decay_scope"] not in DECAY_SCOPES:
            raise ValueError(f"train.stage1.weight_decay_scope must be one of {DECAY_SCOPES}, got "
                             f"{cfg['weight_decay_scope']!r}")
        # official: one AdamW over the whole token-embedding matrix per class, classes in turn on one text
        # encoder, so every row not trained shrinks by (1 - lr*wd) per optimizer step of every class before
        steps_before, n = {}, 0
        for c in classes:
            steps_before[c] = n
            n += sum(flag for _, flag in self._stage1_plan(c, by_class[c], cfg))
        transform = self._train_transform()
        group_size = max(1, int(cfg["parallel_classes"]))
        t0, losses = time.time(), []
        bar = _progress(len(todo), "genpromp stage 1 (classes)") if progress else None
        for g in range(0, len(todo), group_size):
            group = todo[g:g + group_size]
            losses.append(self._stage1_group(train_data, group, by_class, cfg, lr, transform, steps_before))
            if tok_dir is not None:
                self.save_official_tokens(tok_dir, group)
            if bar is not None:
                bar.update(len(group))
                bar.set_postfix(loss=f"{losses[-1]:.4f}")
        if bar is not None:
            bar.close()
        return {"classes_trained": len(todo), "classes_resumed": len(done), "lr": lr,
                "weight_decay_scope": cfg["weight_decay_scope"],
                "mean_loss": float(np.mean(losses)) if losses else None, "time_s": round(time.time() - t0, 2)}

    def _stage1_group(self, train_data, group: list[int], by_class, cfg: dict, lr: float, transform,
                      steps_before: dict[int, int]) -> float:
        torch.manual_seed(int(self.config["train"]["seed"]) * 7919 + group[0])
        plans = {c: self._stage1_plan(c, by_class[c], cfg) for c in group}
        wd = float(cfg["weight_decay"])
        keep = 1.0 - lr * wd  # what AdamW's decay leaves of an untrained row per step
        vocabulary = cfg["weight_decay_scope"] == "vocabulary"
        done = {c: steps_before[c] if vocabulary else 0 for c in group}  # decay steps each class's table has seen
        opts = {}
        for c in group:
            row = self.concepts.rows[c]
            with torch.no_grad():
                row.mul_(keep ** done[c])  # decayed with the table while the classes before trained
            row.requires_grad_(True)
            opts[c] = torch.optim.AdamW([row], lr=lr, betas=tuple(cfg["betas"]), weight_decay=wd, eps=float(cfg["eps"]))
        acc = int(cfg["grad_accum"])
        total, count = 0.0, 0
        try:
            for m in range(max(len(p) for p in plans.values())):
                active = [c for c in group if m < len(plans[c])]
                idx = [i for c in active for i in plans[c][m][0]]
                owner = torch.tensor([c for c in active for _ in plans[c][m][0]], device=self.device)
                zt, noise, t = self._noisy(self._load_batch(train_data, idx, transform))
                choice = torch.randint(len(self.templates), (len(idx),)).tolist()
                ids = self._tokenize([self.templates[k].format(self.concept_tokens[int(c)])
                                      for k, c in zip(choice, owner.tolist())]).to(self.device)
                if vocabulary:
                    self.concepts.base_scale = torch.tensor([keep ** done[int(c)] for c in owner.tolist()])
                pred = self.unet(zt, t, encoder_hidden_states=self.text_encoder(ids)[0]).sample
                per = F.mse_loss(pred.float(), noise.float(), reduction="none").mean(dim=(1, 2, 3))
                class_losses = [per[owner == c].mean() for c in active]
                (torch.stack(class_losses).sum() / acc).backward()
                total += float(sum(l.item() for l in class_losses))
                count += len(active)
                for c in active:
                    if plans[c][m][1]:
                        opts[c].step()
                        opts[c].zero_grad(set_to_none=True)
                        done[c] += vocabulary
        finally:
            self.concepts.base_scale = None
            for c in group:
                self.concepts.rows[c].requires_grad_(False)
                self.concepts.rows[c].grad = None
        return total / max(count, 1)

    def _fit_stage2(self, train_data, out_dir: Path | None, resume: bool, progress: bool) -> dict:
        from wsolbench.training import get_rng_state, set_rng_state

        cfg = self.config["train"]["stage2"]
        bs, acc = int(cfg["batch_size"]), int(cfg["grad_accum"])
        # null checkpoint_step: the last step; the official run trains on but never saves past it
        steps = int(cfg["steps"] if cfg["checkpoint_step"] is None else cfg["checkpoint_step"])
        if not 0 < steps <= int(cfg["steps"]):
            raise ValueError(f"train.stage2.checkpoint_step must be in [1, steps={cfg['steps']}], got {steps}")
        lr = scaled_lr(cfg)
        self.unet.train().requires_grad_(True)
        opt = torch.optim.AdamW(self.unet.parameters(), lr=lr, betas=tuple(cfg["betas"]),
                                weight_decay=float(cfg["weight_decay"]), eps=float(cfg["eps"]))
        state_path = out_dir / STAGE2_STATE if out_dir is not None else None
        step = 0
        if resume and state_path is not None and state_path.exists():
            from diffusers import UNet2DConditionModel

            st = torch.load(state_path, map_location="cpu", weights_only=True)
            fresh = UNet2DConditionModel.from_pretrained(str(out_dir / "unet"), **diffusers_load_kwargs())
            self.unet.load_state_dict(fresh.state_dict())
            if st["optimizer"] is not None:
                opt.load_state_dict(st["optimizer"])
            set_rng_state(st["rng"])
            step = int(st["step"])
        n = len(train_data)
        transform = self._train_transform()
        ratio = float(cfg["representative_ratio"])
        seed = int(self.config["train"]["seed"])
        t0, losses = time.time(), []
        bar = _progress(steps, "genpromp stage 2 (U-Net)", initial=step) if progress else None
        while step < steps:
            opt.zero_grad(set_to_none=True)
            step_loss = 0.0
            for a in range(acc):
                micro = step * acc + a  # a global micro-batch index: the data order needs no state
                epoch, pos = divmod(micro * bs, n)
                order = np.random.default_rng([seed, 2, epoch]).permutation(n)
                idx = [int(order[(pos + j) % n]) for j in range(min(bs, n))]
                zt, noise, t = self._noisy(self._load_batch(train_data, idx, transform))
                labels = [train_data[i].label for i in idx]
                choice = torch.randint(len(self.templates), (len(idx),)).tolist()
                with torch.no_grad():
                    f_r = self.encode_texts([self.templates[k].format(self.concept_tokens[c])
                                             for k, c in zip(choice, labels)])
                    f_d = self.encode_texts([self.templates[k].format(self.meta_tokens[c])
                                             for k, c in zip(choice, labels)])
                cond = ratio * f_r + (1 - ratio) * f_d
                pred = self.unet(zt, t, encoder_hidden_states=cond).sample
                loss = F.mse_loss(pred.float(), noise.float(), reduction="none").mean(dim=(1, 2, 3)).mean()
                (loss / acc).backward()
                step_loss += loss.item() / acc
            opt.step()
            step += 1
            losses.append(step_loss)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{np.mean(losses[-20:]):.4f}")
            if out_dir is not None and (step % int(cfg["save_steps"]) == 0 or step == steps):
                # the final state drops the optimizer (2x the U-Net): nothing is left to resume
                self._save_stage2(out_dir, opt if step < steps else None, step, get_rng_state())
        if bar is not None:
            bar.close()
        self.unet.eval().requires_grad_(False)
        self.unet_finetuned = True
        return {"steps": steps, "max_steps": int(cfg["steps"]), "lr": lr,
                "mean_loss": float(np.mean(losses)) if losses else None,
                "time_s": round(time.time() - t0, 2)}

    def _save_stage2(self, out_dir: Path, opt, step: int, rng: dict) -> None:
        import shutil

        from wsolbench.io import atomic_path

        tmp = out_dir / "unet.tmp"
        if tmp.exists():
            shutil.rmtree(tmp)
        self.unet.save_pretrained(str(tmp))
        final = out_dir / "unet"
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
        with atomic_path(out_dir / STAGE2_STATE) as p:
            torch.save({"step": step, "optimizer": None if opt is None else opt.state_dict(), "rng": rng}, p)
