"""TeD-Loc's CLIP side: the CLIP model (text anchors, pseudo-labels; not needed at inference), CLIP-ES Grad-CAM
pseudo-labels of each training image's class, and their on-disk cache."""
from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

log = logging.getLogger(__name__)

PSEUDO_LABEL_VERSION = "tedloc-clip-es-gradcam-v1"
CLIP_SOURCES = ("open_clip", "zoo", "zoo-random")
CACHE_CHOICES = ("shared", "run")  # pseudo_labels.cache; anything else is a folder


# ============================================================================ the CLIP model
def load_clip(c: dict, device: str) -> tuple[nn.Module, Any]:
    """The CLIP model and tokenizer of the ``clip`` config (training only)."""
    source = c["source"]
    if source not in CLIP_SOURCES:
        raise ValueError(f"clip.source must be one of {CLIP_SOURCES}, got {source!r}")
    if source in ("zoo", "zoo-random"):
        from wsolbench import zoo

        model, tok = zoo.load_clip(c["scale"], device=device) if source == "zoo" else zoo.create_clip(c["scale"])
        return model.to(device).eval(), tok
    from wsolbench import weights

    name, tag = c["name"], c["pretrained"]
    try:  # THE CLIP loader (QuickGELU for OpenAI weights); MissingWeightsError names files, places, fetch
        return weights.load_open_clip(name, tag, path=c["weights"], device=device)
    except KeyError as exc:
        raise ValueError(f"clip.name={name} clip.pretrained={tag}: {exc.args[0] if exc.args else exc}") from exc


def clip_text_dim(c: dict) -> int:
    """The CLIP text-embedding width z_p lives in: ``clip.embed_dim``, null = the model config's."""
    if c["embed_dim"]:
        return int(c["embed_dim"])
    if c["source"] in ("zoo", "zoo-random"):
        from wsolbench.zoo import spec

        return int(spec(c["scale"], "clip")["embed_dim"])
    import open_clip

    mc = open_clip.get_model_config(c["name"])
    if not mc:
        raise ValueError(f"clip.name {c['name']!r} is not an open_clip model; set clip.embed_dim")
    return int(mc["embed_dim"])


def clip_fingerprint(clip_model: nn.Module) -> str:
    """A short hash of the CLIP's projections: which weights made a cached pseudo-label."""
    h = hashlib.sha1()
    for name in ("visual.proj", "text_projection"):
        t = dict(clip_model.named_parameters()).get(name)
        if t is not None:
            h.update(t.detach().float().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


# ============================================================================ CLIP-ES Grad-CAM
def background_words(p: dict, class_names: Sequence[str], synonyms: Sequence[Sequence[str]] | None
                     ) -> tuple[list[str], list[str]]:
    """(used, removed) CLIP-ES background words of the ``pseudo_labels`` config: with ``background_filter:
    classes`` the words that name a class (its name or one of its ``synonyms``) are removed, as CLIP-ES
    keeps one list per dataset; null lists no words."""
    from wsolbench.maps.clip_gradcam import filter_background_words

    words = [str(w) for w in p["background_words"] or ()]
    mode = "none" if p["background_filter"] is None else str(p["background_filter"]).lower()
    if mode == "none":
        return words, []
    if mode != "classes":
        raise ValueError(f"pseudo_labels.background_filter must be classes or none, got {mode!r}")
    return filter_background_words(words, class_names, synonyms)


def make_gradcam(p: dict, clip_model: nn.Module, tokenizer: Any, class_names: Sequence[str],
                 words: Sequence[str], device: str):
    """The CLIP-ES Grad-CAM of the ``pseudo_labels`` config with background ``words``."""
    from wsolbench.maps.clip_gradcam import ClipGradCAM

    return ClipGradCAM(clip_model, tokenizer, class_names, prompt=p["prompt"], background_words=words,
                       input_size=p["clip_input_size"] or None, device=device,
                       readable_names=bool(p["readable_names"]))


def native_batch(gradcam: Any, image: Any) -> torch.Tensor:
    """One image at its own size rounded up to CLIP's patch size (CLIP-ES), normalised, on the CAM's device."""
    from wsolbench.maps.clip_gradcam import native_size_batch

    return native_size_batch(image, gradcam.model, gradcam.mean, gradcam.std).to(gradcam.device)


def gradcam_maps(gradcam: Any, p: dict, images: Any, queries: list[list[int]]) -> torch.Tensor:
    """B×K pseudo-label maps of the queried classes (square CLIP input, or each image at its own size;
    native-size maps are bilinearly resized to the first image's grid)."""
    import torch.nn.functional as F

    cols = []
    for j in range(len(queries[0])):
        if gradcam.input_size and p["clip_input_size"]:
            cols.append(gradcam(images, [q[j] for q in queries]))
        else:
            from wsolbench.imaging import as_image_list

            per = [gradcam(native_batch(gradcam, im), [q[j]], normalized=True)[0]
                   for im, q in zip(as_image_list(images), queries)]
            size = per[0].shape
            cols.append(torch.stack([F.interpolate(m[None, None], size=size, mode="bilinear")[0, 0] for m in per]))
    return torch.stack(cols, dim=1).float()


# ============================================================================ the cache
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


def cache_settings(cfg: dict, clip_model: nn.Module, words: Sequence[str], class_names: Sequence[str]) -> dict:
    """What makes a pseudo-label (its cache folder is their hash): CLIP identity, prompt, words, classes."""
    p, c = cfg["pseudo_labels"], cfg["clip"]
    return {"version": PSEUDO_LABEL_VERSION, "clip": {k: c[k] for k in ("source", "name", "pretrained", "weights",
                                                                        "scale")},
            "clip_fingerprint": clip_fingerprint(clip_model), "prompt": p["prompt"], "background_words": list(words),
            "clip_input_size": p["clip_input_size"], "readable_names": p["readable_names"],
            "class_names": list(class_names)}


def cache_root(where: str, out_dir: str | Path | None) -> Path:
    """``pseudo_labels.cache``: shared = <cache_dir>/tedloc/pseudo_labels, run = <out_dir>/pseudo_labels
    (shared without an out_dir), else a folder."""
    if where is None:
        raise ValueError("pseudo_labels.cache must be shared, run or a folder, got null")
    if where == "run" and out_dir is not None:
        return Path(out_dir) / "pseudo_labels"
    if where in CACHE_CHOICES:
        from wsolbench.paths import cache_dir

        return cache_dir() / "tedloc" / "pseudo_labels"
    return Path(os.path.expanduser(str(where)))


def compute_pseudo_labels(cfg: dict, dataset: Any, clip_model: nn.Module, tokenizer: Any,
                          class_names: Sequence[str], words: Sequence[str], device: str,
                          out_dir: str | Path | None, progress: bool) -> list[Path]:
    """CLIP Grad-CAM of each training image's GT class, computed where not cached; returns the files."""
    p = cfg["pseudo_labels"]
    cache = PseudoLabelCache(cache_root(p["cache"], out_dir), cache_settings(cfg, clip_model, words, class_names))
    ds_id = PseudoLabelCache.dataset_identity(dataset)
    paths = [cache.path(ds_id, s) for s in dataset]
    todo = [i for i, path in enumerate(paths) if not path.exists()]
    if not todo:
        return paths
    gradcam = make_gradcam(p, clip_model, tokenizer, class_names, words, device)
    square = bool(p["clip_input_size"])
    step = max(1, int(p["batch_size"])) if square else 1
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(todo), desc="tedloc pseudo-labels (CLIP Grad-CAM)", leave=False)
    try:
        for start in range(0, len(todo), step):
            idx = todo[start:start + step]
            samples = [dataset[i] for i in idx]
            images = [s.load_image() for s in samples]
            labels = [int(s.label) for s in samples]
            if square:
                maps = gradcam(images, labels)
            else:  # CLIP-ES: the image's own size rounded up to the patch size
                maps = gradcam(native_batch(gradcam, images[0]), labels, normalized=True)
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
