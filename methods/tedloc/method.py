"""TeD-Loc: text distillation for weakly supervised object localization.

Murtaza, Belharbi, Guichemerre, Pedersoli, Granger — "TeD-Loc: Text Distillation for Weakly Supervised Object
Localization" (arXiv 2501.12632). The official code is not reachable; this follows the paper's facts (see
/work/shared/reference/methods.md) and, for the pseudo-labels, CLIP-ES (linyq2117/CLIP-ES) and the authors'
DiPS code. Values the reference does not give are our choices and are marked so in configs/tedloc.yaml.

Model (``TeDLocHead`` on a frozen encoder)
    E  a frozen pretrained ViT (``encoder.variant``: EVA-01 ViT-L/14 as the paper cites, or EVA-02; the zoo
       ViT in the tiny profile) → patch embeddings on an h×w grid (prefix tokens dropped);
    D  a trained decoder: 1×1 conv to ``decoder.hidden_dim`` then ``decoder.upsample_blocks`` × (×2 bilinear,
       3×3 conv, norm, ReLU) and a 1×1 conv to the CLIP text-embedding width → z_p on a (h·2^n)×(w·2^n) grid;
    g  a binary FG/BG patch classifier on z_p (1×1 conv, or a small MLP), sigmoid → g(z_p) ∈ (0, 1);
    t  class anchors: CLIP text embeddings of the class names (``anchors.templates``), L2-normalised and
       orthogonalised by a QR decomposition (Gram–Schmidt in class order: anchor k is the part of t_k
       orthogonal to t_0..t_{k-1}, sign kept so <anchor_k, t_k> > 0). Frozen buffers stored in the
       checkpoint, so inference never needs the text encoder. ``anchors.orthogonalize: false`` keeps the
       normalised embeddings (the paper's ablation). With more classes than dimensions (ILSVRC: 1000 classes,
       512-d CLIP B/16) exact orthonormality is impossible: the anchors are then the rows of Q from T = QR
       (T C×d), i.e. the whitened embeddings (QᵀQ = I), re-normalised to unit length (a warning says so).
    f(v, t_k) = logit_scale · <v, t_k>.

Pseudo-labels (computed once per training image, cached)
    CLIP-ES Grad-CAM (``wsolbench.maps.clip_gradcam``) of the ground-truth class with ``pseudo_labels.prompt`` and
    ``pseudo_labels.background_words`` (less the words that name a class or one of its synonyms, as CLIP-ES
    keeps one list per dataset) at the CLIP token grid, min-max normalised, stored as float16 .npy per
    image under ``<root>/<hash of the CLIP/prompt settings>/``, atomically. At every step, on the augmented
    map resized to the z_p grid: Otsu's threshold on floor(cam·255) (DiPS) gives the FG region; FG
    candidates = the ``sampling.n_fg`` highest cells of that region eroded by ``sampling.erosion_kernel``
    (pixels at ``input_size``, DiPS: 11 at 224; falls back to the un-eroded region if erosion empties it);
    BG candidates = the ``sampling.n_bg`` lowest cells outside the region, taken only from the lowest
    ``sampling.bg_fraction`` of the map (F-CAM/DiPS: 20%); 0 = all of them. Every other cell is unlabelled.
    ``sampling.per_step`` FG and as many BG cells are drawn per image and step (fewer, but still equal, when
    a set is smaller).

Losses (λs and on/off switches in ``losses``; means over the sampled cells instead of the paper's sums)
    L_KD = CE(y, f(z_p, t)) over sampled FG cells (softmax over all anchors);
    P_CL = BCE(y'_p, g(z_p)) over sampled FG (1) and BG (0) cells;
    I_CL = CE(y, f(h, t)), h = Σ_p a_p z_p, a_p = g(z_p) / Σ_j g(z_j);
    L = λ1 L_KD + λ2 P_CL + λ3 I_CL; SGD through ``wsolbench.training.TrainLoop`` (resumable).

Model selection (``selection``)
    After each epoch the ``g`` maps of the ``val`` split are scored (GT-known MaxBoxAcc, maps at 256²) and the
    head of the best epoch is kept, as the paper selects on val; the scores are in the history and
    ``<out_dir>/selection.json``. Without a val split the last epoch is kept and the record says so.

Inference (no label needed)
    maps = g(z_p) (class-agnostic; one copy per queried class); logits = f(h, t) (Top-1/Top-5 Loc); the named
    variant ``extras["zp_dot_t"]`` = <z_p, t_c> for the queried class c (GT-known in the harness; the
    predicted class when ``classes`` is None). ``inference.report_pseudo_labels: true`` adds
    ``extras["clip_gradcam"]``, the pseudo-label map of the queried class (loads CLIP; diagnostic only).
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import warnings
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from wsolbench.localizer import Capability, ImageMeta, InputError, Localizer, LocalizerOutput
from wsolbench.registry import register_method
from wsolbench.weights import MissingWeightsError

log = logging.getLogger(__name__)

PSEUDO_LABEL_VERSION = "tedloc-clip-es-gradcam-v1"
ENCODER_SOURCES = ("timm", "zoo", "zoo-random")
# named EVA ViT-L/14 encoders (timm): the paper cites EVA (Fang et al., CVPR 2023), i.e. EVA-01; EVA-02 is
# the later model the first version of this profile used. Each is created at input_size (position embedding
# resampled). ``encoder.name`` names any other timm model.
ENCODER_VARIANTS = {
    "eva01-l-196": "eva_large_patch14_196.in22k_ft_in22k_in1k",  # EVA-01 L/14, fine-tuned at 196 px
    "eva01-l-336": "eva_large_patch14_336.in22k_ft_in22k_in1k",  # EVA-01 L/14, fine-tuned at 336 px
    "eva02-l-448": "eva02_large_patch14_448.mim_m38m_ft_in22k_in1k",  # EVA-02 L/14, fine-tuned at 448 px
}
CLIP_SOURCES = ("open_clip", "zoo", "zoo-random")


# ============================================================================ errors / weights
def _weights_dir() -> Path | None:
    from wsolbench.paths import weights_dir

    return weights_dir()


def _create_timm(name: str, input_size: int, **kwargs) -> nn.Module:
    """``timm.create_model`` at ``input_size`` (ViT-family models resample their position embedding on
    load); models without an ``img_size`` argument are created at their own size."""
    import timm

    try:
        return timm.create_model(name, img_size=input_size, **kwargs)
    except TypeError as exc:
        if "img_size" not in str(exc):
            raise
        return timm.create_model(name, **kwargs)


def _user_path(p: str | os.PathLike) -> Path:
    path = Path(os.path.expanduser(str(p)))
    if not path.is_absolute() and not path.exists() and _weights_dir() is not None:
        path = _weights_dir() / path
    return path


def encoder_name(c: dict) -> str:
    """The timm model of the ``encoder`` config: ``name`` when set, else the named ``variant``."""
    if c.get("name"):
        return str(c["name"])
    variant = str(c.get("variant") or "")
    if variant not in ENCODER_VARIANTS:
        raise ValueError(f"encoder.variant must be one of {', '.join(ENCODER_VARIANTS)} (or set encoder.name to a "
                         f"timm model), got {variant!r}")
    return ENCODER_VARIANTS[variant]


# ============================================================================ anchors
def orthogonalize_anchors(text: torch.Tensor) -> torch.Tensor:
    """Class anchors from C×d text embeddings: row-normalise, then QR (see the module docstring).

    C ≤ d: Tᵀ = QR, anchors = Qᵀ with column signs making diag(R) > 0 — orthonormal rows, anchor k in
    span(t_0..t_k) and <anchor_k, t_k> = R_kk > 0 (class order kept). C > d: T = QR, anchors = rows of Q
    (sign-fixed) re-normalised to unit length.
    """
    t = F.normalize(text.detach().double(), dim=1)
    c, d = t.shape
    if c <= d:
        q, r = torch.linalg.qr(t.T)  # d×C, C×C
        s = torch.sign(torch.diagonal(r))
        s[s == 0] = 1
        return (q * s).T.contiguous().to(text.dtype)
    warnings.warn(f"{c} classes but {d}-d text embeddings: {c} orthonormal anchors do not exist; using the "
                  "whitened embeddings (rows of Q from T = QR), re-normalised", RuntimeWarning, stacklevel=2)
    q, r = torch.linalg.qr(t)  # C×d, d×d
    s = torch.sign(torch.diagonal(r))
    s[s == 0] = 1
    return F.normalize(q * s, dim=1).to(text.dtype)


# ============================================================================ the model
def _norm(kind: str, ch: int) -> nn.Module:
    if kind == "batch":
        return nn.BatchNorm2d(ch)
    if kind == "group":
        return nn.GroupNorm(min(32, ch), ch) if ch % min(32, ch) == 0 else nn.GroupNorm(1, ch)
    if kind in ("none", None):
        return nn.Identity()
    raise ValueError(f"decoder.norm must be batch, group or none, got {kind!r}")


class TeDLocDecoder(nn.Module):
    """Patch embeddings (B×D_enc×h×w) → z_p (B×D_text×h·2^n×w·2^n)."""

    def __init__(self, in_dim: int, out_dim: int, hidden_dim: int = 512, upsample_blocks: int = 2,
                 norm: str = "batch") -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_dim, hidden_dim, 1, bias=norm == "none"), _norm(norm, hidden_dim),
                                  nn.ReLU(inplace=True))
        blocks = []
        for _ in range(int(upsample_blocks)):
            blocks.append(nn.Sequential(nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False),
                                        nn.Conv2d(hidden_dim, hidden_dim, 3, padding=1, bias=norm == "none"),
                                        _norm(norm, hidden_dim), nn.ReLU(inplace=True)))
        self.blocks = nn.Sequential(*blocks)
        self.head = nn.Conv2d(hidden_dim, out_dim, 1)
        self.scale = 2 ** int(upsample_blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(self.stem(x)))


class TeDLocHead(nn.Module):
    """Everything TeD-Loc trains or stores: decoder D, FG/BG classifier g, anchors (buffers)."""

    def __init__(self, in_dim: int, text_dim: int, num_classes: int, *, hidden_dim: int = 512,
                 upsample_blocks: int = 2, norm: str = "batch", g_hidden: int = 0, logit_scale: float = 1.0) -> None:
        super().__init__()
        self.decoder = TeDLocDecoder(in_dim, text_dim, hidden_dim, upsample_blocks, norm)
        if g_hidden and g_hidden > 0:
            self.g = nn.Sequential(nn.Conv2d(text_dim, g_hidden, 1), nn.ReLU(inplace=True), nn.Conv2d(g_hidden, 1, 1))
        else:
            self.g = nn.Conv2d(text_dim, 1, 1)
        self.logit_scale = float(logit_scale)
        self.register_buffer("anchors", torch.zeros(num_classes, text_dim))
        self.register_buffer("anchors_ready", torch.zeros(1))
        self.register_buffer("trained", torch.zeros(1))
        self.register_buffer("encoder_fingerprint", torch.zeros(4, dtype=torch.float64))

    def set_anchors(self, anchors: torch.Tensor) -> None:
        if tuple(anchors.shape) != tuple(self.anchors.shape):
            raise ValueError(f"anchors must be {tuple(self.anchors.shape)}, got {tuple(anchors.shape)}")
        self.anchors.copy_(anchors.to(self.anchors))
        self.anchors_ready.fill_(1)

    def scores(self, v: torch.Tensor) -> torch.Tensor:
        """f(v, t_k) = logit_scale · <v, t_k> for v of shape (..., d) → (..., C)."""
        return self.logit_scale * (v @ self.anchors.T)

    def forward(self, feats: torch.Tensor) -> dict[str, torch.Tensor]:
        z = self.decoder(feats)
        g_logit = self.g(z)
        h = global_embedding(z, g_logit)
        return {"z": z, "g_logit": g_logit, "h": h, "logits": self.scores(h)}


def global_embedding(z: torch.Tensor, g_logit: torch.Tensor) -> torch.Tensor:
    """h = Σ_p a_p z_p with a_p = g(z_p) / Σ_j g(z_j), g = sigmoid(g_logit). z: B×d×H×W → B×d."""
    p = torch.sigmoid(g_logit.float()).flatten(1)  # B×N
    a = p / p.sum(dim=1, keepdim=True).clamp_min(1e-12)
    return torch.einsum("bn,bdn->bd", a, z.float().flatten(2))


class FrozenViTEncoder(nn.Module):
    """A timm ViT-like model → patch-token map B×D×h×w: ``forward_features`` with the prefix tokens dropped.
    Its tokens carry the final norm only where the model applies it there: timm's average-pooling EVA models
    (EVA-01 and EVA-02 L/14) keep that LayerNorm as ``fc_norm``, applied after pooling, so their patch tokens
    come un-normalised."""

    def __init__(self, model: nn.Module, input_size: int) -> None:
        super().__init__()
        self.model = model
        pe = getattr(model, "patch_embed", None)
        if pe is None or not hasattr(model, "forward_features"):
            raise TypeError(f"TeD-Loc's encoder must be a timm ViT (patch_embed + forward_features), got "
                            f"{type(model).__name__}")
        native = tuple(pe.img_size) if getattr(pe, "img_size", None) is not None else None
        if native is not None and native != (input_size, input_size) and hasattr(model, "set_input_size"):
            model.set_input_size(img_size=(input_size, input_size))
        ps = pe.patch_size if isinstance(pe.patch_size, (tuple, list)) else (pe.patch_size, pe.patch_size)
        self.patch_size = (int(ps[0]), int(ps[1]))
        self.grid = (input_size // self.patch_size[0], input_size // self.patch_size[1])
        self.num_prefix_tokens = int(getattr(model, "num_prefix_tokens", 1))
        self.dim = int(getattr(model, "num_features", None) or getattr(model, "embed_dim"))
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.model.eval()

    def train(self, mode: bool = True) -> "FrozenViTEncoder":  # always frozen, always eval
        return super().train(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.model.forward_features(x)
        tokens = tokens[:, self.num_prefix_tokens:, :]
        b, n, d = tokens.shape
        gh, gw = x.shape[-2] // self.patch_size[0], x.shape[-1] // self.patch_size[1]
        if gh * gw != n:
            raise RuntimeError(f"encoder returned {n} patch tokens, expected {gh}×{gw}")
        return tokens.transpose(1, 2).reshape(b, d, gh, gw)

    def fingerprint(self) -> torch.Tensor:
        """Cheap identity of the frozen weights (first and last parameter sums) stored with the head."""
        params = [p for p in self.model.parameters()]
        first, last = params[0].detach().double(), params[-1].detach().double()
        return torch.stack([first.sum(), first.abs().sum(), last.sum(), last.abs().sum()]).cpu()


# ============================================================================ losses
def _gather_cells(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """x: B×C×H×W, idx: B×k flat cell indices (≥ 0) → B×k×C."""
    flat = x.flatten(2).transpose(1, 2)  # B×N×C
    return flat.gather(1, idx.unsqueeze(-1).expand(-1, -1, flat.shape[-1]))


def tedloc_losses(out: dict[str, torch.Tensor], labels: torch.Tensor, fg_idx: torch.Tensor, bg_idx: torch.Tensor,
                  scores_fn, cfg: dict) -> dict[str, torch.Tensor]:
    """The three TeD-Loc losses and their weighted sum ``loss``.

    ``fg_idx``/``bg_idx``: B×k flat indices into the z_p grid, -1 = padding (not a sampled cell).
    ``scores_fn``: v (…×d) → (…×C) class scores f(v, t). ``cfg``: the ``losses`` config section.
    """
    z, g_logit, h = out["z"], out["g_logit"], out["h"]
    zero = z.sum() * 0.0
    fg_valid, bg_valid = fg_idx >= 0, bg_idx >= 0
    fg_i, bg_i = fg_idx.clamp_min(0), bg_idx.clamp_min(0)
    losses: dict[str, torch.Tensor] = {}

    # L_KD: CE(y, f(z_p, t)) over sampled FG cells
    if fg_valid.any():
        z_fg = _gather_cells(z.float(), fg_i)  # B×k×d
        logits = scores_fn(z_fg)  # B×k×C
        ce = F.cross_entropy(logits.flatten(0, 1), labels.repeat_interleave(fg_i.shape[1]), reduction="none")
        w = fg_valid.flatten().float()
        losses["l_kd"] = (ce * w).sum() / w.sum()
    else:
        losses["l_kd"] = zero

    # P_CL: BCE(y'_p, g(z_p)) over sampled FG (1) and BG (0) cells
    if fg_valid.any() or bg_valid.any():
        g_fg = _gather_cells(g_logit.float(), fg_i)[..., 0]
        g_bg = _gather_cells(g_logit.float(), bg_i)[..., 0]
        logit = torch.cat([g_fg, g_bg], dim=1)
        target = torch.cat([torch.ones_like(g_fg), torch.zeros_like(g_bg)], dim=1)
        w = torch.cat([fg_valid, bg_valid], dim=1).float()
        bce = F.binary_cross_entropy_with_logits(logit, target, reduction="none")
        losses["p_cl"] = (bce * w).sum() / w.sum()
    else:
        losses["p_cl"] = zero

    # I_CL: CE(y, f(h, t))
    losses["i_cl"] = F.cross_entropy(scores_fn(h.float()), labels)

    total = zero
    for key, name in (("l_kd", "kd"), ("p_cl", "pcl"), ("i_cl", "icl")):
        if cfg.get(name, True):
            total = total + float(cfg.get(f"lambda_{name}", 1.0)) * losses[key]
    losses["loss"] = total
    return losses


# ============================================================================ pseudo-label sampling
def otsu_regions(cam: np.ndarray, erosion: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """(FG region, eroded FG core) from a [0, 1] map: Otsu's threshold on floor(cam·255) (DiPS).

    A constant map has no FG: both masks are empty.
    """
    from scipy import ndimage
    from skimage.filters import threshold_otsu

    u8 = np.floor(np.clip(cam, 0, 1) * 255).astype(np.uint8)
    if u8.min() == u8.max():
        empty = np.zeros(cam.shape, bool)
        return empty, empty
    region = u8 > threshold_otsu(u8)
    core = region
    if erosion > 1:
        eroded = ndimage.binary_erosion(region, structure=np.ones((erosion, erosion), bool), border_value=1)
        if eroded.any():
            core = eroded
    return region, core


def fg_bg_candidates(cam: np.ndarray, n_fg: int, n_bg: int, erosion: int, bg_fraction: float
                     ) -> tuple[np.ndarray, np.ndarray]:
    """Flat indices of FG candidates (the n_fg highest cells of the eroded Otsu region) and BG candidates
    (the n_bg lowest cells outside the region among the lowest ``bg_fraction`` of all cells); n = 0 means all
    of them. Highest/lowest first; cells in neither set are unlabelled."""
    if not 0.0 < bg_fraction <= 1.0:
        raise ValueError(f"sampling.bg_fraction must be in (0, 1], got {bg_fraction}")
    region, core = otsu_regions(cam, erosion)
    flat = cam.ravel()
    fg = np.flatnonzero(core.ravel())
    fg = fg[np.argsort(-flat[fg], kind="stable")]
    lowest = np.argsort(flat, kind="stable")[:int(np.ceil(bg_fraction * flat.size))]
    bg = lowest[~region.ravel()[lowest]]
    if not region.any():  # no FG at all: nothing to sample on either side
        bg = bg[:0]
    if n_fg and n_fg > 0:
        fg = fg[:n_fg]
    if n_bg and n_bg > 0:
        bg = bg[:n_bg]
    return fg, bg


def sample_balanced(fg: np.ndarray, bg: np.ndarray, k: int, generator: torch.Generator | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw m = min(k, |fg|, |bg|) cells from each set without replacement; pad to k with -1."""
    m = min(int(k), len(fg), len(bg))
    out_fg = torch.full((int(k),), -1, dtype=torch.long)
    out_bg = torch.full((int(k),), -1, dtype=torch.long)
    if m > 0:
        pf = torch.randperm(len(fg), generator=generator)[:m]
        pb = torch.randperm(len(bg), generator=generator)[:m]
        out_fg[:m] = torch.from_numpy(np.asarray(fg)[pf.numpy()]).long()
        out_bg[:m] = torch.from_numpy(np.asarray(bg)[pb.numpy()]).long()
    return out_fg, out_bg


def erosion_on_grid(kernel_px: int, input_size: int, grid: int) -> int:
    """DiPS's erosion kernel (pixels at ``input_size``) scaled to the z_p grid, odd, ≥ 1."""
    if kernel_px <= 1:
        return 1
    k = max(1, int(round(kernel_px * grid / input_size)))
    return k if k % 2 == 1 else k + 1


# ============================================================================ pseudo-label cache
class PseudoLabelCache:
    """Per-image CLIP Grad-CAM maps (float16 .npy) under ``root/<settings hash>/<k[:2]>/<k>.npy``.

    ``k`` = sha1 of (dataset identity, image id, image file size); ``settings.json`` beside them records what
    produced the maps. Files are written atomically, so an interrupted run resumes where it stopped.
    """

    def __init__(self, root: str | Path, settings: dict) -> None:
        blob = json.dumps(settings, sort_keys=True, default=str)
        self.settings = settings
        self.digest = hashlib.sha1(blob.encode()).hexdigest()[:16]
        self.dir = Path(root) / self.digest

    @staticmethod
    def dataset_identity(dataset: Any) -> str:
        return f"{getattr(dataset, 'registry_name', '') or type(dataset).__name__}|{getattr(dataset, 'root', '')}"

    def path(self, dataset_id: str, sample: Any) -> Path:
        try:
            size = os.stat(sample.image_path).st_size
        except OSError:
            size = -1
        key = hashlib.sha1(f"{dataset_id}\0{sample.image_id}\0{size}".encode()).hexdigest()
        return self.dir / key[:2] / f"{key}.npy"

    def write(self, path: Path, cam: np.ndarray) -> None:
        from wsolbench.io import atomic_path, write_json

        if not (self.dir / "settings.json").exists():
            write_json(self.dir / "settings.json", self.settings)
        with atomic_path(path) as tmp:
            with open(tmp, "wb") as fh:
                np.save(fh, np.asarray(cam, dtype=np.float16))

    @staticmethod
    def read(path: Path) -> np.ndarray:
        return np.load(path, allow_pickle=False).astype(np.float32)


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


# ============================================================================ model selection
SELECTION_METRICS = ("maxboxacc", "maxboxacc_v2")
SELECTION_FILE = "selection.json"
BEST_HEAD_FILE = "best_head.safetensors"


class ValSelection:
    """Keeps the head of the epoch with the best validation localization (the paper selects on ``val``, the
    wsolevaluation protocol) and records every epoch's score in the history and in ``selection.json``."""

    def __init__(self, method: "TeDLoc", val_data: Any, cfg: dict, epochs: int, out_dir: Path | None) -> None:
        self.method, self.cfg, self.epochs, self.out_dir = method, cfg, int(epochs), out_dir
        self.metric = str(cfg.get("metric", "maxboxacc") or "last").lower()
        if self.metric not in SELECTION_METRICS + ("last",):
            raise ValueError(f"selection.metric must be one of {', '.join(SELECTION_METRICS)} or last, "
                             f"got {self.metric!r}")
        self.val = None
        if self.metric != "last" and val_data is not None and len(val_data) > 0:
            cap = cfg.get("max_images")
            self.val = val_data.subset(range(min(int(cap), len(val_data)))) if cap else val_data
        self.key = f"val_{self.metric}"
        self.best_state: dict[str, torch.Tensor] | None = None
        self.best_value = -float("inf")

    def on_epoch_end(self, epoch: int, record: dict) -> None:
        every = max(1, int(self.cfg.get("every", 1) or 1))
        if self.val is None or ((epoch + 1) % every and epoch + 1 != self.epochs):
            return
        value = self.method.box_accuracy(self.val, self.metric, int(self.cfg.get("map_size", 256)))
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
                      "map_size": int(self.cfg.get("map_size", 256))}
        if self.out_dir is not None:
            from wsolbench.io import write_json

            write_json(self.out_dir / SELECTION_FILE, result)
        log.info("tedloc: model selection %s", result)
        return result


# ============================================================================ the method
def _deep_get(cfg: dict, section: str) -> dict:
    value = cfg.get(section) or {}
    if not isinstance(value, dict):
        raise ValueError(f"tedloc config section {section!r} must be a mapping, got {type(value).__name__}")
    return value


@register_method("tedloc", aliases=("ted-loc",))
class TeDLoc(Localizer):
    """TeD-Loc (see the module docstring). Build with ``from_config``; ``fit`` trains; ``localize`` infers."""

    capabilities = frozenset({Capability.SINGLE})
    needs_training = True
    tiny_zoo = ("vit", "clip")
    pretrained = ("eva01-large", "eva02-large", "clip-vit-b16-openai", "clip-vit-l14-openai")
    single_label_training = True  # the decoder's loss and the pseudo-labels take Sample.label

    def __init__(self, config: dict | None = None, class_names: Sequence[str] | None = None,
                 device: str = "cpu") -> None:
        super().__init__(config, class_names, device)
        cfg = self.config
        self.input_size = int(cfg.get("input_size", 224))
        enc_cfg = _deep_get(cfg, "encoder")
        self.encoder = FrozenViTEncoder(self._build_encoder_model(enc_cfg), self.input_size)
        self.mean, self.std = self._encoder_norm(enc_cfg)
        self.text_dim = self._text_dim(_deep_get(cfg, "clip"))
        self._build_head()
        self._pl_gradcam = None  # CLIP Grad-CAM kept only for inference.report_pseudo_labels
        self._class_synonyms = None  # every name of each class (ILSVRC), read from the training set by fit
        self.to(device)

    # ---------------------------------------------------------------- construction helpers
    def _build_head(self) -> None:
        """The trainable head for ``len(self.class_names)`` classes (1 placeholder when none are known yet:
        enough to profile the architecture; ``fit`` rebuilds it with the training set's classes)."""
        dec, gcfg = _deep_get(self.config, "decoder"), _deep_get(self.config, "g")
        self.head = TeDLocHead(self.encoder.dim, self.text_dim, max(1, len(self.class_names)),
                               hidden_dim=int(dec.get("hidden_dim", 512)),
                               upsample_blocks=int(dec.get("upsample_blocks", 2)), norm=dec.get("norm", "batch"),
                               g_hidden=int(gcfg.get("hidden_dim", 0) or 0),
                               logit_scale=float(_deep_get(self.config, "losses").get("logit_scale", 1.0)))
        self.grid = (self.encoder.grid[0] * self.head.decoder.scale, self.encoder.grid[1] * self.head.decoder.scale)

    def _build_encoder_model(self, c: dict) -> nn.Module:
        source = c.get("source", "timm")
        if source not in ENCODER_SOURCES:
            raise ValueError(f"encoder.source must be one of {ENCODER_SOURCES}, got {source!r}")
        if source in ("zoo", "zoo-random"):
            from wsolbench import zoo

            scale = c.get("scale") or "tiny"
            if source == "zoo":
                return zoo.load_backbone("vit", scale, num_classes=0)
            return zoo.create_backbone("vit", scale, num_classes=0)
        name = encoder_name(c)
        if not c.get("pretrained", True):
            return _create_timm(name, self.input_size, pretrained=False, num_classes=0)
        from wsolbench import weights

        explicit = str(_user_path(c["weights"])) if c.get("weights") else None
        file = weights.resolve_timm(name, explicit)
        if file is None:  # raises MissingWeightsError naming the files, the places searched and the fetch command
            file = weights.resolve(name, explicit)
        return _create_timm(name, self.input_size, pretrained=True, num_classes=0,
                            pretrained_cfg_overlay=dict(file=str(file)))

    def _encoder_norm(self, c: dict) -> tuple[tuple, tuple]:
        pcfg = getattr(self.encoder.model, "pretrained_cfg", None) or {}
        mean = c.get("mean") or pcfg.get("mean") or (0.485, 0.456, 0.406)
        std = c.get("std") or pcfg.get("std") or (0.229, 0.224, 0.225)
        return tuple(float(v) for v in mean), tuple(float(v) for v in std)

    @staticmethod
    def _text_dim(c: dict) -> int:
        if c.get("embed_dim"):
            return int(c["embed_dim"])
        source = c.get("source", "open_clip")
        if source in ("zoo", "zoo-random"):
            from wsolbench.zoo import spec

            return int(spec(c.get("scale") or "tiny", "clip")["embed_dim"])
        import open_clip

        mc = open_clip.get_model_config(c.get("name", "ViT-B-16"))
        if not mc:
            raise ValueError(f"clip.name {c.get('name')!r} is not an open_clip model; set clip.embed_dim")
        return int(mc["embed_dim"])

    def load_clip(self) -> tuple[nn.Module, Any]:
        """The CLIP model and tokenizer for anchors and pseudo-labels (training only)."""
        c = _deep_get(self.config, "clip")
        source = c.get("source", "open_clip")
        if source not in CLIP_SOURCES:
            raise ValueError(f"clip.source must be one of {CLIP_SOURCES}, got {source!r}")
        if source in ("zoo", "zoo-random"):
            from wsolbench import zoo

            scale = c.get("scale") or "tiny"
            model, tok = zoo.load_clip(scale, device=self.device) if source == "zoo" else zoo.create_clip(scale)
            return model.to(self.device).eval(), tok
        from wsolbench import weights

        name, tag = c.get("name", "ViT-B-16"), c.get("pretrained", "openai")
        explicit = str(_user_path(c["weights"])) if c.get("weights") else None
        try:  # THE CLIP loader (QuickGELU for OpenAI weights); MissingWeightsError names files, places, fetch
            return weights.load_open_clip(name, tag, path=explicit, device=self.device)
        except KeyError as exc:
            raise ValueError(f"clip.name={name} clip.pretrained={tag}: {exc.args[0] if exc.args else exc}") from exc

    def clip_fingerprint(self, clip_model: nn.Module) -> str:
        h = hashlib.sha1()
        for name in ("visual.proj", "text_projection"):
            t = dict(clip_model.named_parameters()).get(name)
            if t is not None:
                h.update(t.detach().float().cpu().numpy().tobytes())
        return h.hexdigest()[:16]

    # ---------------------------------------------------------------- device / persistence
    def to(self, device: str | torch.device) -> "TeDLoc":
        self.device = str(device)
        self.encoder.to(device)
        self.head.to(device)
        return self

    def inference_modules(self) -> list[nn.Module]:
        return [self.encoder, self.head]

    def state_dict(self) -> dict[str, torch.Tensor]:
        state = {f"head.{k}": v for k, v in self.head.state_dict().items()}
        if _deep_get(self.config, "encoder").get("save_with_model", False):
            state.update({f"encoder.{k}": v for k, v in self.encoder.model.state_dict().items()})
        return state

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        head = {k[len("head."):]: v for k, v in state.items() if k.startswith("head.")}
        enc = {k[len("encoder."):]: v for k, v in state.items() if k.startswith("encoder.")}
        if not head:
            raise ValueError("not a TeD-Loc checkpoint: no 'head.*' tensors")
        self.head.load_state_dict(head)
        if enc:
            self.encoder.model.load_state_dict(enc)
        stored = self.head.encoder_fingerprint.cpu()
        if bool(stored.abs().sum() > 0) and not torch.allclose(stored, self.encoder.fingerprint(), rtol=1e-6):
            warnings.warn("the frozen encoder's weights differ from those this TeD-Loc head was trained on "
                          "(encoder fingerprint mismatch): results will be wrong; use the same encoder weights "
                          "or save with encoder.save_with_model=true", RuntimeWarning, stacklevel=2)

    # ---------------------------------------------------------------- anchors
    def build_anchors(self, clip_model: nn.Module, tokenizer: Any) -> torch.Tensor:
        from wsolbench.classnames import class_text
        from wsolbench.maps.clip_gradcam import prompt_embeddings

        a = _deep_get(self.config, "anchors")
        names = [class_text(n) if a.get("readable_names", True) else str(n) for n in self.class_names]
        text = prompt_embeddings(clip_model, tokenizer, names, a.get("templates") or ["a photo of a {}."],
                                 device=self.device)
        if text.shape[1] != self.text_dim:
            raise ValueError(f"CLIP text embeddings are {text.shape[1]}-d but the decoder was built for "
                             f"{self.text_dim}-d (clip.embed_dim)")
        anchors = orthogonalize_anchors(text) if a.get("orthogonalize", True) else F.normalize(text, dim=1)
        self.head.set_anchors(anchors)
        return anchors

    # ---------------------------------------------------------------- pseudo-labels
    def background_words(self) -> tuple[list[str], list[str]]:
        """(used, removed) CLIP-ES background words: with ``pseudo_labels.background_filter: classes`` the
        configured words that name a class (its name or, once ``fit`` saw the dataset's ``class_synonyms``,
        any synonym) are removed, as CLIP-ES does per dataset."""
        from wsolbench.maps.clip_gradcam import filter_background_words

        p = _deep_get(self.config, "pseudo_labels")
        words = [str(w) for w in (p.get("background_words") or [])]
        mode = str(p.get("background_filter", "classes") or "none").lower()
        if mode == "none":
            return words, []
        if mode != "classes":
            raise ValueError(f"pseudo_labels.background_filter must be classes or none, got {mode!r}")
        return filter_background_words(words, self.class_names, self._class_synonyms)

    def _gradcam(self, clip_model: nn.Module, tokenizer: Any):
        from wsolbench.maps.clip_gradcam import ClipGradCAM

        p = _deep_get(self.config, "pseudo_labels")
        return ClipGradCAM(clip_model, tokenizer, self.class_names, prompt=p.get("prompt") or "a clean origami {}.",
                           background_words=self.background_words()[0],
                           input_size=p.get("clip_input_size") or None, device=self.device,
                           readable_names=bool(p.get("readable_names", True)))

    def pseudo_label_settings(self, clip_model: nn.Module) -> dict:
        p = _deep_get(self.config, "pseudo_labels")
        c = _deep_get(self.config, "clip")
        return {"version": PSEUDO_LABEL_VERSION, "clip": {k: c.get(k) for k in ("source", "name", "pretrained",
                                                                                "weights", "scale")},
                "clip_fingerprint": self.clip_fingerprint(clip_model), "prompt": p.get("prompt"),
                "background_words": self.background_words()[0],
                "clip_input_size": p.get("clip_input_size"), "readable_names": p.get("readable_names", True),
                "class_names": list(self.class_names)}

    def pseudo_label_root(self, out_dir: str | Path | None) -> Path:
        where = _deep_get(self.config, "pseudo_labels").get("cache", "shared") or "shared"
        if where == "run" and out_dir is not None:
            return Path(out_dir) / "pseudo_labels"
        if where in ("shared", "run"):
            from wsolbench.paths import cache_dir

            return cache_dir() / "tedloc" / "pseudo_labels"
        return Path(os.path.expanduser(str(where)))

    def compute_pseudo_labels(self, dataset: Any, clip_model: nn.Module, tokenizer: Any,
                              out_dir: str | Path | None = None, progress: bool = True) -> list[Path]:
        """CLIP Grad-CAM of each training image's GT class, computed where not cached; returns the files."""
        cache = PseudoLabelCache(self.pseudo_label_root(out_dir), self.pseudo_label_settings(clip_model))
        ds_id = PseudoLabelCache.dataset_identity(dataset)
        paths = [cache.path(ds_id, s) for s in dataset]
        todo = [i for i, p in enumerate(paths) if not p.exists()]
        if not todo:
            return paths
        gradcam = self._gradcam(clip_model, tokenizer)
        bs = max(1, int(_deep_get(self.config, "pseudo_labels").get("batch_size", 32)))
        square = bool(_deep_get(self.config, "pseudo_labels").get("clip_input_size"))
        bar = None
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(todo), desc="tedloc pseudo-labels (CLIP Grad-CAM)", leave=False)
        try:
            step = bs if square else 1
            for start in range(0, len(todo), step):
                idx = todo[start:start + step]
                samples = [dataset[i] for i in idx]
                images = [s.load_image() for s in samples]
                labels = [int(s.label) for s in samples]
                if square:
                    maps = gradcam(images, labels)
                else:  # CLIP-ES: the image's own size rounded up to the patch size
                    maps = gradcam(self._clip_native_batch(gradcam, images[0]), labels, normalized=True)
                for i, m in zip(idx, maps.cpu().numpy()):
                    cache.write(paths[i], m)
                if bar is not None:
                    bar.update(len(idx))
        finally:
            if bar is not None:
                bar.close()
        log.info("tedloc: %d CLIP Grad-CAM pseudo-labels computed, %d reused, in %s", len(todo),
                 len(paths) - len(todo), cache.dir)
        return paths

    @staticmethod
    def _clip_native_batch(gradcam: Any, image: Any) -> torch.Tensor:
        from wsolbench.maps.clip_gradcam import native_size_batch

        return native_size_batch(image, gradcam.model, gradcam.mean, gradcam.std).to(gradcam.device)

    # ---------------------------------------------------------------- training
    def make_train_set(self, dataset: Any, cam_paths: Sequence[Path]) -> TeDLocTrainSet:
        t, s = _deep_get(self.config, "train"), _deep_get(self.config, "sampling")
        crop = int(t.get("crop_size") or self.input_size)
        if crop != self.input_size:
            raise ValueError(f"train.crop_size ({crop}) must equal input_size ({self.input_size})")
        return TeDLocTrainSet(dataset, cam_paths, resize=int(t.get("resize_size") or crop), crop=crop,
                              flip=bool(t.get("flip", True)), mean=self.mean, std=self.std, grid=self.grid,
                              n_fg=int(s.get("n_fg", 0) or 0), n_bg=int(s.get("n_bg", 0) or 0),
                              per_step=int(s.get("per_step", 16)), bg_fraction=float(s.get("bg_fraction", 1.0)),
                              erosion=erosion_on_grid(int(s.get("erosion_kernel", 1) or 1), self.input_size,
                                                      self.grid[0]))

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        with torch.no_grad():
            feats = self.encoder(x)
        return self.head(feats.float())

    def training_step(self, batch: dict) -> dict[str, torch.Tensor]:
        x = batch["image"].to(self.device)
        labels = torch.as_tensor(batch["label"], device=self.device).long()
        out = self.forward(x)
        return tedloc_losses(out, labels, batch["fg_idx"].to(self.device), batch["bg_idx"].to(self.device),
                             self.head.scores, _deep_get(self.config, "losses"))

    def make_optimizer(self) -> tuple[torch.optim.Optimizer, Any]:
        t = _deep_get(self.config, "train")
        params = [p for p in self.head.parameters() if p.requires_grad]
        name = str(t.get("optimizer", "sgd")).lower()
        if name != "sgd":
            raise ValueError(f"train.optimizer: the paper uses SGD; got {name!r}")
        opt = torch.optim.SGD(params, lr=float(t.get("lr", 0.01)), momentum=float(t.get("momentum", 0.9)),
                              weight_decay=float(t.get("weight_decay", 1e-4)), nesterov=bool(t.get("nesterov", False)))
        sched_name = str(t.get("scheduler", "none") or "none").lower()
        epochs = int(t.get("epochs", 1))
        if sched_name == "cosine":
            sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, epochs))
        elif sched_name == "step":
            sched = torch.optim.lr_scheduler.StepLR(opt, step_size=int(t.get("step_size", max(1, epochs // 3))),
                                                    gamma=float(t.get("gamma", 0.1)))
        elif sched_name == "none":
            sched = None
        else:
            raise ValueError(f"train.scheduler must be none, cosine or step, got {sched_name!r}")
        return opt, sched

    def fit(self, train_data: Any, *, val_data: Any = None, out_dir: str | Path | None = None,
            resume: bool = False, progress: bool = True) -> dict:
        from wsolbench.training import TrainLoop, make_loader, seed_everything

        t = _deep_get(self.config, "train")
        seed_everything(int(t.get("seed", 0)))
        if len(train_data) == 0:
            raise ValueError("TeD-Loc: the training set is empty")
        if not self.class_names:
            self.class_names = list(getattr(train_data, "class_names", []) or [])
            if not self.class_names:
                raise InputError("TeD-Loc needs class names (for its text anchors): none given and the training "
                                 "set has no class_names")
            self._build_head()
            self.to(self.device)
        self._class_synonyms = getattr(train_data, "class_synonyms", None)
        used, removed = self.background_words()
        log.info("tedloc: CLIP-ES background words %s (removed as class names: %s)", used, removed)
        clip_model, tokenizer = self.load_clip()
        self.build_anchors(clip_model, tokenizer)
        cam_paths = self.compute_pseudo_labels(train_data, clip_model, tokenizer, out_dir=out_dir, progress=progress)
        del clip_model
        self.head.encoder_fingerprint.copy_(self.encoder.fingerprint().to(self.head.encoder_fingerprint))
        train_set = self.make_train_set(train_data, cam_paths)
        opt, sched = self.make_optimizer()
        seed = int(t.get("seed", 0))
        bs = int(t.get("batch_size", 16))
        out = Path(out_dir) if out_dir is not None else None
        selector = ValSelection(self, val_data, _deep_get(self.config, "selection"), int(t.get("epochs", 1)), out)
        loop = TrainLoop(out, epochs=int(t.get("epochs", 1)),
                         modules={"head": self.head}, optimizer=opt, scheduler=sched, progress=progress,
                         desc="tedloc", grad_clip=t.get("grad_clip"),
                         max_steps_per_epoch=t.get("max_steps_per_epoch"), on_epoch_end=selector.on_epoch_end)
        history = loop.run(lambda epoch: make_loader(train_set, None, batch_size=bs, shuffle=True, seed=seed,
                                                     epoch=epoch, drop_last=len(train_set) > bs,
                                                     num_workers=int(t.get("num_workers", 0))),
                           self.training_step, resume=resume)
        selection = selector.finish(history)
        self.head.trained.fill_(1)
        self.head.eval()
        return {"history": history, "selection": selection, "background_words": dict(zip(
                    ("used", "removed"), self.background_words())),
                "pseudo_label_dir": str(cam_paths[0].parent.parent) if cam_paths else None}

    @torch.no_grad()
    def box_accuracy(self, dataset: Any, metric: str, map_size: int, batch_size: int = 32) -> float:
        """GT-known MaxBoxAcc (δ = 50, largest box) or MaxBoxAccV2 (mean over δ 30/50/70, all boxes) of the
        method's maps (``inference.map``, g by default) on ``dataset``, prepared as in wsolevaluation at
        ``map_size``² (model selection)."""
        from wsolbench.metrics import MaxBoxAcc, prepare_map

        if metric not in SELECTION_METRICS:
            raise ValueError(f"selection.metric must be one of {', '.join(SELECTION_METRICS)}, got {metric!r}")
        scorer = MaxBoxAcc((30, 50, 70), 0.01, multi_contour=metric == "maxboxacc_v2")
        for start in range(0, len(dataset), batch_size):
            samples = [dataset[i] for i in range(start, min(len(dataset), start + batch_size))]
            out = self.localize([s.load_image() for s in samples], classes=[int(s.label) for s in samples])
            maps = [prepare_map(m[0], (map_size, map_size)) for m in out.maps]
            scorer.update(maps, [np.asarray(s.boxes) for s in samples], image_sizes=[s.size for s in samples])
        return float(scorer.compute()[metric])

    # ---------------------------------------------------------------- inference
    @torch.no_grad()
    def localize(self, images: Any, classes: Sequence[Any] | None = None,
                 texts: Sequence[Any] | None = None, meta: Sequence[ImageMeta] | None = None) -> LocalizerOutput:
        if texts is not None:
            self.require(Capability.PHRASE)
        if not bool(self.head.anchors_ready.item()):
            warnings.warn("TeD-Loc has no anchors yet (not trained or loaded): logits and maps are meaningless",
                          RuntimeWarning, stacklevel=3)
        self.head.eval()
        x = self.preprocess(images, size=self.input_size, mean=self.mean, std=self.std)
        out = self.forward(x)
        b = x.shape[0]
        logits = out["logits"]
        queries = self.class_queries(classes, b)
        if queries is None:
            queries = [[int(c)] for c in logits.argmax(dim=1).tolist()]
        q = torch.as_tensor(queries, device=x.device)  # B×K
        k = q.shape[1]
        inf = _deep_get(self.config, "inference")
        gmap = torch.sigmoid(out["g_logit"].float())  # B×1×H×W
        zdot = torch.einsum("bdhw,bkd->bkhw", out["z"].float(), self.head.anchors[q])
        maps = {"g": gmap.expand(-1, k, -1, -1), "zp_dot_t": zdot}
        size = inf.get("map_size")
        if size:
            maps = {n: F.interpolate(m, size=(int(size), int(size)), mode="bilinear", align_corners=False)
                    for n, m in maps.items()}
        main = inf.get("map", "g")
        if main not in maps:
            raise ValueError(f"inference.map must be 'g' or 'zp_dot_t', got {main!r}")
        extras = {n: m.contiguous() for n, m in maps.items() if n != main and n != "g"}
        if main != "g":
            extras["g"] = maps["g"].contiguous()
        if inf.get("report_pseudo_labels", False):  # same shape as maps (the harness contract): bilinear
            pl = self._pseudo_label_maps(images, queries)
            extras["clip_gradcam"] = F.interpolate(pl, size=maps[main].shape[-2:], mode="bilinear",
                                                   align_corners=False).contiguous()
        return LocalizerOutput(maps=maps[main].contiguous().float(), logits=logits.float(), classes=queries,
                               extras=extras)

    def _pseudo_label_maps(self, images: Any, queries: list[list[int]]) -> torch.Tensor:
        if self._pl_gradcam is None:
            clip_model, tok = self.load_clip()
            self._pl_gradcam = self._gradcam(clip_model, tok)
        gc = self._pl_gradcam
        cols = []
        for j in range(len(queries[0])):
            if gc.input_size and _deep_get(self.config, "pseudo_labels").get("clip_input_size"):
                cols.append(gc(images, [q[j] for q in queries]))
            else:
                from wsolbench.imaging import as_image_list

                per = [gc(self._clip_native_batch(gc, im), [q[j]], normalized=True)[0]
                       for im, q in zip(as_image_list(images), queries)]
                size = per[0].shape
                cols.append(torch.stack([F.interpolate(p[None, None], size=size, mode="bilinear")[0, 0] for p in per]))
        return torch.stack(cols, dim=1).float().to(self.device)
