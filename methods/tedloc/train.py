"""TeD-Loc's training: the augmented training set with re-sampled FG/BG cells, SGD, the epoch loop and the
model selection on val (the paper's wsolevaluation protocol)."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .pseudo_labels import PseudoLabelCache
from .sampling import erosion_on_grid, fg_bg_candidates, sample_balanced

if TYPE_CHECKING:
    from .method import TeDLoc

log = logging.getLogger(__name__)

SELECTION_METRICS = ("maxboxacc", "maxboxacc_v2")
SELECTION_FILE = "selection.json"
BEST_HEAD_FILE = "best_head.safetensors"


# ============================================================================ training data
class TeDLocTrainSet(torch.utils.data.Dataset):
    """Samples → dict(image, label, fg_idx, bg_idx, index) with FG/BG cells re-sampled at every access.

    The image and its cached pseudo-label map get the same augmentation (resize ``resize``², random crop
    ``crop``², horizontal flip); the map is then area-resized to the z_p ``grid``.
    """

    def __init__(self, dataset: Any, cam_paths: Sequence[Path], *, resize: int, crop: int, flip: bool,
                 mean: Sequence[float], std: Sequence[float], grid: tuple[int, int], n_fg: int, n_bg: int,
                 per_step: int, erosion: int, bg_fraction: float) -> None:
        self.dataset = dataset
        self.cam_paths = list(cam_paths)
        self.resize, self.crop, self.flip = int(resize), int(crop), bool(flip)
        if self.crop > self.resize:
            raise ValueError(f"train.crop_size {crop} > train.resize_size {resize}")
        self.mean = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)
        self.grid = tuple(grid)
        self.n_fg, self.n_bg, self.per_step, self.erosion = int(n_fg), int(n_bg), int(per_step), int(erosion)
        self.bg_fraction = float(bg_fraction)

    def __len__(self) -> int:
        return len(self.dataset)

    def augment(self, image: Any, cam: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        from wsolbench.imaging import to_float_chw

        x = to_float_chw(image)
        x = F.interpolate(x[None], size=(self.resize, self.resize), mode="bilinear", align_corners=False,
                          antialias=True)[0].clamp_(0, 1)
        c = F.interpolate(torch.from_numpy(np.asarray(cam, np.float32))[None, None], size=(self.resize, self.resize),
                          mode="bilinear", align_corners=False)[0, 0]
        if self.crop < self.resize:
            i = int(torch.randint(0, self.resize - self.crop + 1, ()))
            j = int(torch.randint(0, self.resize - self.crop + 1, ()))
            x, c = x[:, i:i + self.crop, j:j + self.crop], c[i:i + self.crop, j:j + self.crop]
        if self.flip and bool(torch.rand(()) < 0.5):
            x, c = x.flip(-1), c.flip(-1)
        x = (x - self.mean) / self.std
        c = F.interpolate(c[None, None], size=self.grid, mode="area")[0, 0]
        return x, c

    def __getitem__(self, index: int) -> dict:
        sample = self.dataset[index]
        cam = PseudoLabelCache.read(self.cam_paths[index])
        x, c = self.augment(sample.load_image(), cam)
        fg, bg = fg_bg_candidates(c.numpy(), self.n_fg, self.n_bg, self.erosion, self.bg_fraction)
        fg_idx, bg_idx = sample_balanced(fg, bg, self.per_step)
        return {"image": x, "label": int(sample.label), "fg_idx": fg_idx, "bg_idx": bg_idx, "index": int(index)}


def make_train_set(cfg: dict, dataset: Any, cam_paths: Sequence[Path], *, mean: Sequence[float],
                   std: Sequence[float], grid: tuple[int, int]) -> TeDLocTrainSet:
    """The training set of a resolved tedloc config (``train`` augmentation, ``sampling``)."""
    t, s, size = cfg["train"], cfg["sampling"], int(cfg["input_size"])
    crop = int(t["crop_size"])
    if crop != size:
        raise ValueError(f"train.crop_size ({crop}) must equal input_size ({size})")
    return TeDLocTrainSet(dataset, cam_paths, resize=int(t["resize_size"]), crop=crop, flip=bool(t["flip"]),
                          mean=mean, std=std, grid=grid, n_fg=int(s["n_fg"]), n_bg=int(s["n_bg"]),
                          per_step=int(s["per_step"]), bg_fraction=float(s["bg_fraction"]),
                          erosion=erosion_on_grid(int(s["erosion_kernel"]), size, grid[0]))


def make_optimizer(params: Sequence[nn.Parameter], t: dict) -> tuple[torch.optim.Optimizer, Any]:
    """SGD (the paper's) and its scheduler from the ``train`` config."""
    name = str(t["optimizer"]).lower()
    if name != "sgd":
        raise ValueError(f"train.optimizer: the paper uses SGD; got {name!r}")
    opt = torch.optim.SGD(params, lr=float(t["lr"]), momentum=float(t["momentum"]),
                          weight_decay=float(t["weight_decay"]), nesterov=bool(t["nesterov"]))
    sched_name = "none" if t["scheduler"] is None else str(t["scheduler"]).lower()
    if sched_name == "cosine":
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, int(t["epochs"])))
    elif sched_name == "step":
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=int(t["step_size"]), gamma=float(t["gamma"]))
    elif sched_name == "none":
        sched = None
    else:
        raise ValueError(f"train.scheduler must be none, cosine or step, got {sched_name!r}")
    return opt, sched


# ============================================================================ model selection
@torch.no_grad()
def box_accuracy(method: "TeDLoc", dataset: Any, metric: str, map_size: int, batch_size: int) -> float:
    """GT-known MaxBoxAcc (δ = 50, largest box) or MaxBoxAccV2 (mean over δ 30/50/70, all boxes) of the
    method's maps on ``dataset``, prepared as in wsolevaluation at ``map_size``²."""
    from wsolbench.metrics import MaxBoxAcc, prepare_map

    if metric not in SELECTION_METRICS:
        raise ValueError(f"selection.metric must be one of {', '.join(SELECTION_METRICS)}, got {metric!r}")
    scorer = MaxBoxAcc((30, 50, 70), 0.01, multi_contour=metric == "maxboxacc_v2")
    for start in range(0, len(dataset), batch_size):
        samples = [dataset[i] for i in range(start, min(len(dataset), start + batch_size))]
        out = method.localize([s.load_image() for s in samples], classes=[int(s.label) for s in samples])
        maps = [prepare_map(m[0], (map_size, map_size)) for m in out.maps]
        scorer.update(maps, [np.asarray(s.boxes) for s in samples], image_sizes=[s.size for s in samples])
    return float(scorer.compute()[metric])


class ValSelection:
    """Keeps the head of the epoch with the best validation localization (the paper selects on ``val``, the
    wsolevaluation protocol) and records every epoch's score in the history and in ``selection.json``."""

    def __init__(self, method: "TeDLoc", val_data: Any, cfg: dict, epochs: int, out_dir: Path | None) -> None:
        self.method, self.cfg, self.epochs, self.out_dir = method, cfg, int(epochs), out_dir
        self.metric = "last" if cfg["metric"] is None else str(cfg["metric"]).lower()
        if self.metric not in SELECTION_METRICS + ("last",):
            raise ValueError(f"selection.metric must be one of {', '.join(SELECTION_METRICS)} or last, "
                             f"got {self.metric!r}")
        if not isinstance(cfg["every"], int) or cfg["every"] < 1:
            raise ValueError(f"selection.every must be an integer of at least 1, got {cfg['every']!r}")
        self.val = None
        if self.metric != "last" and val_data is not None and len(val_data) > 0:
            cap = cfg["max_images"]
            self.val = val_data.subset(range(min(int(cap), len(val_data)))) if cap else val_data
        self.key = f"val_{self.metric}"
        self.best_state: dict[str, torch.Tensor] | None = None
        self.best_value = -float("inf")

    def on_epoch_end(self, epoch: int, record: dict) -> None:
        if self.val is None or ((epoch + 1) % self.cfg["every"] and epoch + 1 != self.epochs):
            return
        value = self.method.box_accuracy(self.val, self.metric, int(self.cfg["map_size"]),
                                         int(self.cfg["batch_size"]))
        record[self.key] = value
        self.method.head.train()
        if value > self.best_value:
            self.best_value = value
            self.best_state = {k: v.detach().clone() for k, v in self.method.head.state_dict().items()}
            if self.out_dir is not None:
                from wsolbench.checkpoint import save_tensors

                save_tensors(self.best_state, self.out_dir / BEST_HEAD_FILE)

    def finish(self, history: list[dict]) -> dict:
        """Load the selected head; return (and write beside the checkpoints) what was selected and why."""
        scored = [(i, r[self.key]) for i, r in enumerate(history) if self.key in r]
        if not scored:
            reason = "selection.metric is last" if self.metric == "last" else "no val split given"
            result = {"metric": "last", "epoch": len(history), "reason": reason}
        else:
            best_i, best = max(scored, key=lambda iv: iv[1])  # the first of equal scores
            state = self.best_state if self.best_value == best else None
            if state is None and self.out_dir is not None and (self.out_dir / BEST_HEAD_FILE).is_file():
                from wsolbench.checkpoint import load_tensors

                state = load_tensors(self.out_dir / BEST_HEAD_FILE)  # chosen before a resume
            if state is None:
                raise RuntimeError(f"selection: the best head (epoch {best_i + 1}) was not kept; rerun without resume")
            self.method.head.load_state_dict(state)
            result = {"metric": self.metric, "split": "val", "images": len(self.val), "epoch": best_i + 1,
                      "value": best, "per_epoch": {str(i + 1): v for i, v in scored},
                      "map_size": int(self.cfg["map_size"])}
        if self.out_dir is not None:
            from wsolbench.io import write_json

            write_json(self.out_dir / SELECTION_FILE, result)
        log.info("tedloc: model selection %s", result)
        return result


# ============================================================================ the loop
def train_head(method: "TeDLoc", train_set: TeDLocTrainSet, *, val_data: Any, out_dir: Path | None, resume: bool,
               progress: bool) -> tuple[list[dict], dict]:
    """Train the head (``wsolbench.training.TrainLoop``, resumable), then keep the val-selected epoch's head;
    returns (the per-epoch history, the selection record)."""
    from wsolbench.training import TrainLoop, make_loader

    t = method.config["train"]
    opt, sched = method.make_optimizer()
    seed, bs, epochs = int(t["seed"]), int(t["batch_size"]), int(t["epochs"])
    selector = ValSelection(method, val_data, method.config["selection"], epochs, out_dir)
    loop = TrainLoop(out_dir, epochs=epochs, modules={"head": method.head}, optimizer=opt, scheduler=sched,
                     progress=progress, desc="tedloc", grad_clip=t["grad_clip"],
                     max_steps_per_epoch=t["max_steps_per_epoch"], on_epoch_end=selector.on_epoch_end)
    history = loop.run(lambda epoch: make_loader(train_set, None, batch_size=bs, shuffle=True, seed=seed,
                                                 epoch=epoch, drop_last=len(train_set) > bs,
                                                 num_workers=int(t["num_workers"])),
                       method.training_step, resume=resume)
    return history, selector.finish(history)
