"""TeD-Loc's networks: the frozen ViT encoder E, the decoder D, the FG/BG classifier g and the QR anchors t."""
from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import nn

ENCODER_SOURCES = ("timm", "zoo", "zoo-random")
# named EVA ViT-L/14 encoders (timm): the paper cites EVA (Fang et al., CVPR 2023), i.e. EVA-01; EVA-02 is
# the later model the first version of this profile used. Each is created at input_size (position embedding
# resampled). ``encoder.name`` names any other timm model.
ENCODER_VARIANTS = {
    "eva01-l-196": "eva_large_patch14_196.in22k_ft_in22k_in1k",  # EVA-01 L/14, fine-tuned at 196 px
    "eva01-l-336": "eva_large_patch14_336.in22k_ft_in22k_in1k",  # EVA-01 L/14, fine-tuned at 336 px
    "eva02-l-448": "eva02_large_patch14_448.mim_m38m_ft_in22k_in1k",  # EVA-02 L/14, fine-tuned at 448 px
}


# ============================================================================ the frozen encoder E
def encoder_name(c: dict) -> str:
    """The timm model of the ``encoder`` config: ``name`` when set, else the named ``variant``."""
    if c["name"]:
        return str(c["name"])
    variant = str(c["variant"])
    if variant not in ENCODER_VARIANTS:
        raise ValueError(f"encoder.variant must be one of {', '.join(ENCODER_VARIANTS)} (or set encoder.name to a "
                         f"timm model), got {variant!r}")
    return ENCODER_VARIANTS[variant]


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


def build_encoder_model(c: dict, input_size: int) -> nn.Module:
    """The encoder network of the ``encoder`` config: a zoo ViT, or a timm model whose weights
    ``wsolbench.weights`` resolves (``encoder.weights`` or the catalogue's places)."""
    source = c["source"]
    if source not in ENCODER_SOURCES:
        raise ValueError(f"encoder.source must be one of {ENCODER_SOURCES}, got {source!r}")
    if source in ("zoo", "zoo-random"):
        from wsolbench import zoo

        if source == "zoo":
            return zoo.load_backbone("vit", c["scale"], num_classes=0)
        return zoo.create_backbone("vit", c["scale"], num_classes=0)
    name = encoder_name(c)
    if not c["pretrained"]:
        return _create_timm(name, input_size, pretrained=False, num_classes=0)
    from wsolbench import weights

    file = weights.resolve_timm(name, c["weights"])
    if file is None:  # raises MissingWeightsError naming the files, the places searched and the fetch command
        file = weights.resolve(name, c["weights"])
    return _create_timm(name, input_size, pretrained=True, num_classes=0, pretrained_cfg_overlay=dict(file=str(file)))


def encoder_norm(c: dict, model: nn.Module) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(mean, std) of the encoder's input: ``encoder.mean/std``, null = the model's ``pretrained_cfg``."""
    pcfg = getattr(model, "pretrained_cfg", None) or {}
    stats = []
    for key in ("mean", "std"):
        value = c[key] if c[key] is not None else pcfg.get(key)
        if value is None:
            raise ValueError(f"encoder.{key} is null but the encoder {type(model).__name__} has no pretrained_cfg "
                             f"{key}; set encoder.mean and encoder.std")
        stats.append(tuple(float(v) for v in value))
    return stats[0], stats[1]


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


# ============================================================================ the anchors t
def orthogonalize_anchors(text: torch.Tensor) -> torch.Tensor:
    """Class anchors from C×d text embeddings: row-normalise, then QR (see the package docstring).

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


# ============================================================================ the decoder D and g
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

    def __init__(self, in_dim: int, out_dim: int, *, hidden_dim: int, upsample_blocks: int, norm: str) -> None:
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

    def __init__(self, in_dim: int, text_dim: int, num_classes: int, *, hidden_dim: int, upsample_blocks: int,
                 norm: str, g_hidden: int, logit_scale: float) -> None:
        super().__init__()
        self.decoder = TeDLocDecoder(in_dim, text_dim, hidden_dim=hidden_dim, upsample_blocks=upsample_blocks,
                                     norm=norm)
        if g_hidden > 0:
            self.g = nn.Sequential(nn.Conv2d(text_dim, g_hidden, 1), nn.ReLU(inplace=True), nn.Conv2d(g_hidden, 1, 1))
        else:
            self.g = nn.Conv2d(text_dim, 1, 1)
        self.logit_scale = float(logit_scale)
        self.register_buffer("anchors", torch.zeros(num_classes, text_dim))
        self.register_buffer("anchors_ready", torch.zeros(1))
        self.register_buffer("trained", torch.zeros(1))
        self.register_buffer("encoder_fingerprint", torch.zeros(4, dtype=torch.float64))

    @classmethod
    def from_config(cls, cfg: dict, in_dim: int, text_dim: int, num_classes: int) -> "TeDLocHead":
        """The head of a resolved tedloc config (its ``decoder``, ``g`` and ``losses.logit_scale``)."""
        dec = cfg["decoder"]
        return cls(in_dim, text_dim, num_classes, hidden_dim=int(dec["hidden_dim"]),
                   upsample_blocks=int(dec["upsample_blocks"]), norm=dec["norm"], g_hidden=int(cfg["g"]["hidden_dim"]),
                   logit_scale=float(cfg["losses"]["logit_scale"]))

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
