"""The synthetic-world model zoo: miniature foundation models in their real libraries and formats.

Every method's tiny profile runs its real code path (``open_clip.create_model``, diffusers/transformers
``from_pretrained(dir, subfolder=...)``, ``timm.create_model``) on models the project pretrains on its
synthetic world (``wsolbench.datasets.synthetic``), cached under ``zoo_root(scale)``:

    <cache_dir>/zoo/<scale>/
        manifest.json                 scale, seed, library versions, per-model quality figures and paths
        clip/                         open_clip local-dir: open_clip_config.json + open_clip_model.safetensors
        diffusion/                    diffusers layout: model_index.json vae/ unet/ text_encoder/ tokenizer/ scheduler/
        captioner/                    transformers BLIP: config.json model.safetensors + processor/tokenizer files
        backbones/{vit,vgg,classifier}/   timm HF layout: config.json + model.safetensors

Scales: ``micro`` (random-init-sized for tests, trains in seconds) and ``tiny`` (the CPU zoo, <= 15 min on
2 cores). Model names for ``models=``: ``MODELS``. ``wsolbench zoo build`` calls :func:`build_zoo`, the one
entry (with :func:`ensure_zoo` when building is asked for) into the trainer, :mod:`wsolbench.zoo.builder`,
which loading a model never imports. Recipes and the manifest: :mod:`.manifest`.

What each loaded model expects is documented in its module: :mod:`.clip` (image size
``model.visual.image_size``, patch grid, OpenAI mean/std in ``model.visual.preprocess_cfg``),
:mod:`.diffusion`, :mod:`.captioner`, :mod:`.backbones`; sizes are in :mod:`.specs`.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable

from .specs import SCALES, SPECS, check_scale, spec

MODELS = ("clip", "diffusion", "captioner", "vit", "vgg", "classifier")
BACKBONE_KINDS = ("vit", "vgg", "classifier")
MANIFEST = "manifest.json"
# "1" (what `--build-zoo` sets): loaders build missing models. Unset or "0": they raise ZooMissingError naming
# the command, so no run or constructor starts ~15 minutes of training that nobody asked for.
AUTOBUILD_ENV = "WSOLBENCH_ZOO_AUTOBUILD"

__all__ = ["SCALES", "SPECS", "MODELS", "ZooMissingError", "zoo_root", "model_dir", "build_zoo", "ensure_zoo",
           "zoo_status", "create_clip", "load_clip", "create_diffusion_components", "diffusion_dir",
           "load_diffusion_components", "create_captioner", "load_captioner", "create_backbone",
           "load_backbone", "spec", "build_command"]


class ZooMissingError(FileNotFoundError):
    """A zoo model is not built (and building was not asked for); the message names the command that builds it."""


def zoo_root(scale: str = "tiny") -> Path:
    """``wsolbench.paths.cache_dir() / "zoo" / scale`` (WSOLBENCH_CACHE moves it)."""
    from wsolbench.paths import cache_dir

    return cache_dir() / "zoo" / check_scale(scale)


def model_dir(model: str, scale: str = "tiny", root: str | Path | None = None) -> Path:
    """Folder of one zoo model (see the layout above)."""
    root = Path(root) if root is not None else zoo_root(scale)
    if model in BACKBONE_KINDS:
        return root / "backbones" / model
    if model not in MODELS:
        raise ValueError(f"unknown zoo model {model!r}; choose from {', '.join(MODELS)}")
    return root / model


def build_command(scale: str = "tiny", models: Iterable[str] | None = None) -> str:
    cmd = f"wsolbench zoo build --scale {scale}"
    if models:
        cmd += " --models " + ",".join(models)
    return cmd


def _normalise_models(models: Iterable[str] | str | None) -> list[str]:
    if models is None:
        return list(MODELS)
    if isinstance(models, str):
        models = [models]
    models = [m for entry in models for m in entry.split(",") if m]  # "a,b" as build_command writes it
    out = []
    for m in models:
        if m not in MODELS:
            raise ValueError(f"unknown zoo model {m!r}; choose from {', '.join(MODELS)}")
        if m not in out:
            out.append(m)
    return out


def zoo_status(scale: str = "tiny", root: str | Path | None = None) -> dict[str, dict]:
    """{model: {"built", "stale", "path", "quality"}} from the manifest and the folders; ``stale``: built with
    another recipe (sizes / training budget) than the current code's, so ``ensure_zoo`` rebuilds it."""
    from .manifest import is_built, read_manifest

    root = Path(root) if root is not None else zoo_root(scale)
    manifest = read_manifest(root)
    out = {}
    for m in MODELS:
        entry = manifest.get("models", {}).get(m, {})
        built = is_built(m, root, manifest, scale)
        out[m] = {"built": built, "stale": bool(entry) and not built, "path": str(model_dir(m, scale, root)),
                  "quality": entry.get("quality")}
    return out


def zoo_fingerprint(models: Iterable[str], scale: str = "tiny", root: str | Path | None = None) -> dict:
    """{model: "<recipe>/<seed>/<built_at>"} from the manifest (None where not built): what a run records
    about the zoo it used, so that rebuilding the zoo gives a new run id instead of resuming old results."""
    from .manifest import read_manifest

    entries = read_manifest(Path(root) if root is not None else zoo_root(scale)).get("models", {})
    out = {}
    for m in models:
        e = entries.get(m)
        out[m] = f"{e.get('recipe')}/{e.get('seed')}/{e.get('built_at')}" if e else None
    return out


def build_zoo(scale: str = "tiny", *, out: str | Path | None = None, seed: int = 0,
              models: Iterable[str] | str | None = None, progress: bool = True, force: bool = True) -> dict:
    """Train and save all (or the named) zoo models; returns {model: quality figures} and writes
    ``manifest.json`` atomically. ``out`` overrides the root folder (default :func:`zoo_root`).
    Models are built from others (``manifest.DEPENDS``): the ViT is distilled from the CNN ``classifier``,
    CLIP's and BLIP's image towers start from the ViT, the diffusion text encoder is CLIP's text tower;
    a dependency missing from the root is built too. ``force=False`` skips models already built (same
    seed and recipe)."""
    from .builder import build

    return build(check_scale(scale), root=Path(out) if out is not None else zoo_root(scale), seed=seed,
                 models=_normalise_models(models), progress=progress, force=force)


def autobuild() -> bool:
    """Whether loaders may build missing zoo models: only when asked (``--build-zoo`` or
    ``WSOLBENCH_ZOO_AUTOBUILD=1``)."""
    return os.environ.get(AUTOBUILD_ENV, "0").strip().lower() in ("1", "true", "yes", "on")


def missing_models(scale: str, models: Iterable[str] | str | None, root: str | Path | None = None) -> list[str]:
    """The named zoo models (all when None) that are not built (or are stale) under ``root``."""
    from .manifest import is_built, read_manifest

    root = Path(root) if root is not None else zoo_root(scale)
    manifest = read_manifest(root)
    return [m for m in _normalise_models(models) if not is_built(m, root, manifest, scale)]


def missing_message(scale: str, missing: Iterable[str], root: str | Path | None = None) -> str:
    """One line: what is missing, where it was looked for, and the one command that builds it."""
    missing = list(missing)
    root = Path(root) if root is not None else zoo_root(scale)
    took = " (about 15 minutes on 2 CPU cores, once)" if scale == "tiny" else ""
    command = build_command(scale, None if set(missing) == set(MODELS) else missing)
    return (f"the {scale} synthetic-world zoo lacks {', '.join(missing)} (looked in {root}); build it with "
            f"`{command}`{took}, or add --build-zoo to `wsolbench run` / `wsolbench demo`")


def ensure_zoo(scale: str = "tiny", models: Iterable[str] | str | None = None, *, seed: int = 0,
               root: str | Path | None = None, build: bool | None = None) -> Path:
    """Return the zoo root, building missing models first (it prints what it builds).

    ``build=None`` follows ``WSOLBENCH_ZOO_AUTOBUILD`` (default off: see :func:`autobuild`); with building off
    a missing model raises :class:`ZooMissingError` naming the command that builds it.
    """
    from .manifest import is_built, read_manifest, with_dependencies, zoo_lock

    scale = check_scale(scale)
    root = Path(root) if root is not None else zoo_root(scale)
    wanted = _normalise_models(models)
    if build is None:
        build = autobuild()
    missing = missing_models(scale, wanted, root)
    if not missing:
        return root
    if not build:
        raise ZooMissingError(missing_message(scale, missing, root))
    with zoo_lock(root):
        manifest = read_manifest(root)  # another process may have built it meanwhile
        missing = [m for m in wanted if not is_built(m, root, manifest, scale)]
        if missing:
            todo = [m for m in with_dependencies(missing) if m in missing or not is_built(m, root, manifest, scale)]
            print(f"[wsolbench zoo] building the {scale} zoo models {', '.join(todo)} into {root} "
                  f"(same as `{build_command(scale, missing)}`)", flush=True)
            from .builder import build as _build  # the trainer: imported only to build

            _build(scale, root=root, seed=seed, models=missing, progress=True, force=False, lock=False)
    return root


# ----------------------------------------------------------------------------------------------- CLIP
def create_clip(scale: str = "micro", seed: int | None = 0):
    """Random-init zoo CLIP (``open_clip.model.CLIP``, config registered as ``wsolbench-clip-<scale>``)
    and its open_clip tokenizer."""
    from .clip import create_clip as _create

    return _create(scale, seed=seed)


def load_clip(scale: str = "tiny", device: str = "cpu", root: str | Path | None = None):
    """The trained zoo CLIP (eval mode) and tokenizer, via ``open_clip.create_model("local-dir:...")``.

    Images: ``model.visual.image_size`` (H, W) pixels, [0, 1] then normalised by
    ``model.visual.preprocess_cfg["mean"]`` / ``["std"]`` (OpenAI CLIP's); patch grid
    ``image_size // model.visual.patch_size``.
    """
    from .clip import load_clip_dir

    root = ensure_zoo(scale, ["clip"], root=root)
    return load_clip_dir(model_dir("clip", scale, root), device=device)


# ------------------------------------------------------------------------------------------ diffusion
def create_diffusion_components(scale: str = "micro", seed: int | None = 0) -> dict:
    """Random-init ``{"vae", "unet", "text_encoder", "tokenizer", "scheduler"}`` (see :mod:`.diffusion`)."""
    from .diffusion import create_diffusion_components as _create

    return _create(scale, seed=seed)


def diffusion_dir(scale: str = "tiny", root: str | Path | None = None) -> Path:
    """The built diffusers folder (builds it if missing); load parts with
    ``UNet2DConditionModel.from_pretrained(diffusion_dir(), subfolder="unet")`` etc."""
    root = ensure_zoo(scale, ["diffusion"], root=root)
    return model_dir("diffusion", scale, root)


def load_diffusion_components(scale: str = "tiny", device: str = "cpu", root: str | Path | None = None) -> dict:
    """All five trained components, each loaded with ``from_pretrained(diffusion_dir, subfolder=...)``."""
    from .diffusion import load_diffusion

    return load_diffusion(diffusion_dir(scale, root), device=device)


# ------------------------------------------------------------------------------------------ captioner
def create_captioner(scale: str = "micro", seed: int | None = 0):
    """Random-init ``BlipForConditionalGeneration`` and ``BlipProcessor`` (offline tokenizer)."""
    from .captioner import create_captioner as _create

    return _create(scale, seed=seed)


def load_captioner(scale: str = "tiny", device: str = "cpu", root: str | Path | None = None):
    """The trained BLIP captioner (eval) and processor, via ``from_pretrained(dir)``; caption with
    ``wsolbench.zoo.captioner.caption(model, processor, images)``."""
    from .captioner import load_captioner_dir

    root = ensure_zoo(scale, ["captioner"], root=root)
    return load_captioner_dir(model_dir("captioner", scale, root), device=device)


# ------------------------------------------------------------------------------------------ backbones
def create_backbone(kind: str, scale: str = "micro", num_classes: int = 0, seed: int | None = 0, **kwargs):
    """Random-init timm model ``wsolbench_<kind>_<scale>``; kind in ``vit``, ``vgg``, ``classifier``."""
    from .backbones import create_backbone as _create

    return _create(kind, scale, num_classes=num_classes, seed=seed, **kwargs)


def load_backbone(kind: str, scale: str = "tiny", num_classes: int | None = None, device: str = "cpu",
                  root: str | Path | None = None, **kwargs):
    """The pretrained zoo backbone via ``timm.create_model("local-dir:<dir>", pretrained=True)``, eval mode.

    ``num_classes=None`` keeps the synthetic-world head (10 classes, ``CLASS_NAMES`` order); 0 drops it.
    """
    from .backbones import KINDS, load_backbone_dir

    if kind not in KINDS:
        raise ValueError(f"unknown backbone kind {kind!r}; choose one of {', '.join(KINDS)}")
    root = ensure_zoo(scale, [kind], root=root)
    return load_backbone_dir(model_dir(kind, scale, root), num_classes=num_classes, **kwargs).to(device)
