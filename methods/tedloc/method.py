"""The registered TeD-Loc localizer: builds the model from its resolved config, trains it (``fit``) and infers
(``localize``); the paper facts and where this code differs are in the package docstring."""
from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from wsolbench.localizer import Capability, ImageMeta, InputError, Localizer, LocalizerOutput
from wsolbench.registry import register_method

from . import pseudo_labels as PL
from .losses import tedloc_losses
from .model import FrozenViTEncoder, TeDLocHead, build_encoder_model, encoder_norm, orthogonalize_anchors
from .train import TeDLocTrainSet, box_accuracy, make_optimizer, make_train_set, train_head

log = logging.getLogger(__name__)


@register_method("tedloc", aliases=("ted-loc",))
class TeDLoc(Localizer):
    """TeD-Loc (see the package docstring). Build with ``from_config``; ``fit`` trains; ``localize`` infers."""

    capabilities = frozenset({Capability.SINGLE})
    needs_training = True
    data_parallel_fit = True  # fit goes through wsolbench.training.TrainLoop + make_loader
    tiny_zoo = ("vit", "clip")
    pretrained = ("eva01-large", "eva02-large", "clip-vit-b16-openai", "clip-vit-l14-openai")
    single_label_training = True  # the decoder's loss and the pseudo-labels take Sample.label

    def __init__(self, config: dict | None = None, class_names: Sequence[str] | None = None,
                 device: str = "cpu") -> None:
        super().__init__(config, class_names, device)
        cfg = self.config
        self.input_size = int(cfg["input_size"])
        self.encoder = FrozenViTEncoder(build_encoder_model(cfg["encoder"], self.input_size), self.input_size)
        self.mean, self.std = encoder_norm(cfg["encoder"], self.encoder.model)
        self.text_dim = PL.clip_text_dim(cfg["clip"])
        self._build_head()
        self._pl_gradcam = None  # CLIP Grad-CAM kept only for inference.report_pseudo_labels
        self._class_synonyms = None  # every name of each class (ILSVRC), read from the training set by fit
        self.to(device)

    def _build_head(self) -> None:
        """The trainable head for ``len(self.class_names)`` classes (1 placeholder when none are known yet:
        enough to profile the architecture; ``fit`` rebuilds it with the training set's classes)."""
        self.head = TeDLocHead.from_config(self.config, self.encoder.dim, self.text_dim, max(1, len(self.class_names)))
        self.grid = (self.encoder.grid[0] * self.head.decoder.scale, self.encoder.grid[1] * self.head.decoder.scale)

    def load_clip(self) -> tuple[nn.Module, Any]:
        """The CLIP model and tokenizer for anchors and pseudo-labels (training only)."""
        return PL.load_clip(self.config["clip"], self.device)

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
        if self.config["encoder"]["save_with_model"]:
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

    # ---------------------------------------------------------------- anchors and pseudo-labels
    def build_anchors(self, clip_model: nn.Module, tokenizer: Any) -> torch.Tensor:
        """The class anchors t (``anchors`` config) from CLIP text embeddings, set in the head."""
        from wsolbench.classnames import class_text
        from wsolbench.maps.clip_gradcam import prompt_embeddings

        a = self.config["anchors"]
        names = [class_text(n) if a["readable_names"] else str(n) for n in self.class_names]
        text = prompt_embeddings(clip_model, tokenizer, names, a["templates"], device=self.device)
        if text.shape[1] != self.text_dim:
            raise ValueError(f"CLIP text embeddings are {text.shape[1]}-d but the decoder was built for "
                             f"{self.text_dim}-d (clip.embed_dim)")
        anchors = orthogonalize_anchors(text) if a["orthogonalize"] else F.normalize(text, dim=1)
        self.head.set_anchors(anchors)
        return anchors

    def background_words(self) -> tuple[list[str], list[str]]:
        """(used, removed) CLIP-ES background words for this method's classes (and, once ``fit`` saw the
        dataset's ``class_synonyms``, their synonyms)."""
        return PL.background_words(self.config["pseudo_labels"], self.class_names, self._class_synonyms)

    def _gradcam(self, clip_model: nn.Module, tokenizer: Any):
        return PL.make_gradcam(self.config["pseudo_labels"], clip_model, tokenizer, self.class_names,
                               self.background_words()[0], self.device)

    # ---------------------------------------------------------------- training
    def make_train_set(self, dataset: Any, cam_paths: Sequence[Path]) -> TeDLocTrainSet:
        return make_train_set(self.config, dataset, cam_paths, mean=self.mean, std=self.std, grid=self.grid)

    def make_optimizer(self) -> tuple[torch.optim.Optimizer, Any]:
        return make_optimizer([p for p in self.head.parameters() if p.requires_grad], self.config["train"])

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        with torch.no_grad():
            feats = self.encoder(x)
        return self.head(feats.float())

    def training_step(self, batch: dict) -> dict[str, torch.Tensor]:
        x = batch["image"].to(self.device)
        labels = torch.as_tensor(batch["label"], device=self.device).long()
        out = self.forward(x)
        return tedloc_losses(out, labels, batch["fg_idx"].to(self.device), batch["bg_idx"].to(self.device),
                             self.head.scores, self.config["losses"])

    def fit(self, train_data: Any, *, val_data: Any = None, out_dir: str | Path | None = None,
            resume: bool = False, progress: bool = True) -> dict:
        from wsolbench.training import seed_everything

        seed_everything(int(self.config["train"]["seed"]))
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
        cam_paths = PL.compute_pseudo_labels(self.config, train_data, clip_model, tokenizer, self.class_names, used,
                                             self.device, out_dir, progress)
        del clip_model
        self.head.encoder_fingerprint.copy_(self.encoder.fingerprint().to(self.head.encoder_fingerprint))
        train_set = self.make_train_set(train_data, cam_paths)
        out = Path(out_dir) if out_dir is not None else None
        history, selection = train_head(self, train_set, val_data=val_data, out_dir=out, resume=resume,
                                        progress=progress)
        self.head.trained.fill_(1)
        self.head.eval()
        return {"history": history, "selection": selection, "background_words": {"used": used, "removed": removed},
                "pseudo_label_dir": str(cam_paths[0].parent.parent) if cam_paths else None}

    def box_accuracy(self, dataset: Any, metric: str, map_size: int, batch_size: int | None = None) -> float:
        """GT-known MaxBoxAcc or MaxBoxAccV2 of this method's maps on ``dataset`` (model selection), scored
        ``batch_size`` images at a time (None: ``selection.batch_size``)."""
        if batch_size is None:
            batch_size = int(self.config["selection"]["batch_size"])
        return box_accuracy(self, dataset, metric, map_size, batch_size)

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
        inf = self.config["inference"]
        gmap = torch.sigmoid(out["g_logit"].float())  # B×1×H×W
        zdot = torch.einsum("bdhw,bkd->bkhw", out["z"].float(), self.head.anchors[q])
        maps = {"g": gmap.expand(-1, k, -1, -1), "zp_dot_t": zdot}
        size = inf["map_size"]
        if size:
            maps = {n: F.interpolate(m, size=(int(size), int(size)), mode="bilinear", align_corners=False)
                    for n, m in maps.items()}
        main = inf["map"]
        if main not in maps:
            raise ValueError(f"inference.map must be 'g' or 'zp_dot_t', got {main!r}")
        extras = {n: m.contiguous() for n, m in maps.items() if n != main and n != "g"}
        if main != "g":
            extras["g"] = maps["g"].contiguous()
        if inf["report_pseudo_labels"]:  # same shape as maps (the harness contract): bilinear
            pl = self._pseudo_label_maps(images, queries)
            extras["clip_gradcam"] = F.interpolate(pl, size=maps[main].shape[-2:], mode="bilinear",
                                                   align_corners=False).contiguous()
        return LocalizerOutput(maps=maps[main].contiguous().float(), logits=logits.float(), classes=queries,
                               extras=extras)

    def _pseudo_label_maps(self, images: Any, queries: list[list[int]]) -> torch.Tensor:
        if self._pl_gradcam is None:
            clip_model, tok = self.load_clip()
            self._pl_gradcam = self._gradcam(clip_model, tok)
        return PL.gradcam_maps(self._pl_gradcam, self.config["pseudo_labels"], images, queries).to(self.device)
