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

The tiny zoo also ships inside the package (``wsolbench/zoo/shipped/tiny/``, about 20 MB: exactly what
``wsolbench zoo build --scale tiny`` writes, manifest included): a model loads from the cache zoo when it is
built there, else from the shipped zoo (:func:`locate`), after its files are checked against the sha256
digests its build recorded (a mismatch raises :class:`ZooCorruptError` naming the rebuild command).

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
# "0": ignore the zoo shipped inside the package (tests of a missing zoo; a user who wants only their own build)
SHIPPED_ENV = "WSOLBENCH_ZOO_SHIPPED"

__all__ = ["SCALES", "SPECS", "MODELS", "ZooMissingError", "ZooCorruptError", "zoo_root", "shipped_root", "locate", "model_dir", "build_zoo", "ensure_zoo",
           "zoo_status", "create_clip", "load_clip", "create_diffusion_components", "diffusion_dir",
           "load_diffusion_components", "create_captioner", "load_captioner", "create_backbone",
           "load_backbone", "spec", "build_command"]


class ZooMissingError(FileNotFoundError):
    """A zoo model is not built (and building was not asked for); the message names the command that builds it."""


class ZooCorruptError(ZooMissingError):
    """A zoo model's files differ from the digests its build recorded; the message names the rebuild command."""


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


def shipped_root(scale: str = "tiny") -> Path | None:
    """The zoo shipped inside the package for ``scale`` (``wsolbench/zoo/shipped/<scale>``: exactly what
    ``wsolbench zoo build`` wrote, checked against its file digests before use), or None when none is shipped
    or ``WSOLBENCH_ZOO_SHIPPED=0``."""
    if os.environ.get(SHIPPED_ENV, "1").strip().lower() in ("0", "false", "no", "off"):
        return None
    root = Path(__file__).with_name("shipped") / check_scale(scale)
    return root if (root / MANIFEST).is_file() else None


def locate(model: str, scale: str = "tiny") -> Path | None:
    """The zoo root a model loads from: the cache zoo (:func:`zoo_root`) when it is built there (a zoo the user
    built wins), else the shipped zoo when it has it, else None (missing or stale everywhere)."""
    from .manifest import is_built

    for root in (zoo_root(scale), shipped_root(scale)):
        if root is not None and is_built(model, root, scale=scale):
            return root
    return None


def _roots(scale: str, models: Iterable[str], root: str | Path | None) -> dict[str, Path | None]:
    """{model: the root it loads from, None if missing}: under ``root`` when given, else :func:`locate`."""
    from .manifest import is_built

    if root is None:
        return {m: locate(m, scale) for m in models}
    return {m: Path(root) if is_built(m, Path(root), scale=scale) else None for m in models}


def zoo_status(scale: str = "tiny", root: str | Path | None = None) -> dict[str, dict]:
    """{model: {"built", "stale", "path", "quality"}} from the manifests and the folders (``root``, else the
    cache zoo then the shipped one); ``stale``: built with another recipe (sizes / training budget) than the
    current code's, so ``ensure_zoo`` rebuilds it."""
    from .manifest import read_manifest

    found = _roots(scale, MODELS, root)
    out = {}
    for m in MODELS:
        where = found[m] or (Path(root) if root is not None else zoo_root(scale))
        entry = read_manifest(where).get("models", {}).get(m, {})
        out[m] = {"built": found[m] is not None, "stale": bool(entry) and found[m] is None,
                  "path": str(model_dir(m, scale, where)), "quality": entry.get("quality")}
    return out


def zoo_fingerprint(models: Iterable[str], scale: str = "tiny", root: str | Path | None = None) -> dict:
    """{model: "<recipe>/<content fingerprint>"} of the zoo models a run loads (None where not built): what a
    run records about the zoo it used, so that another zoo gives a new run id instead of resuming old results."""
    from .manifest import read_manifest

    models = list(models)
    out = {}
    for m, where in _roots(scale, models, root).items():
        e = read_manifest(where).get("models", {}).get(m) if where is not None else None
        out[m] = f"{e.get('recipe')}/{e.get('fingerprint')}" if e else None
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
    """The named zoo models (all when None) that are not built (or are stale) under ``root`` (default: in
    neither the cache zoo nor the shipped one)."""
    return [m for m, where in _roots(scale, _normalise_models(models), root).items() if where is None]


def missing_message(scale: str, missing: Iterable[str], root: str | Path | None = None) -> str:
    """One line: what is missing, where it was looked for, and the one command that builds it."""
    missing = list(missing)
    root = Path(root) if root is not None else zoo_root(scale)
    took = " (about 45 minutes on one CPU thread, once)" if scale == "tiny" else ""
    command = build_command(scale, None if set(missing) == set(MODELS) else missing)
    return (f"the {scale} synthetic-world zoo lacks {', '.join(missing)} (looked in {root}); build it with "
            f"`{command}`{took}, or add --build-zoo to `wsolbench run` / `wsolbench demo`")


def ensure_zoo(scale: str = "tiny", models: Iterable[str] | str | None = None, *, seed: int = 0,
               root: str | Path | None = None, build: bool | None = None) -> Path:
    """Return the zoo root the models load from (``root``, else the cache zoo or the shipped one: see
    :func:`locate`), building missing ones into the cache zoo (or ``root``) first (it prints what it builds),
    after checking each model's files against the digests its build recorded.

    ``build=None`` follows ``WSOLBENCH_ZOO_AUTOBUILD`` (default off: see :func:`autobuild`); with building off
    a missing model raises :class:`ZooMissingError` naming the command that builds it; a model whose files
    changed since its build raises :class:`ZooCorruptError` (the same command rebuilds it into the cache).
    """
    from .manifest import is_built, read_manifest, with_dependencies, zoo_lock

    scale = check_scale(scale)
    wanted = _normalise_models(models)
    if build is None:
        build = autobuild()
    target = Path(root) if root is not None else zoo_root(scale)
    missing = missing_models(scale, wanted, root)
    if missing and not build:
        raise ZooMissingError(missing_message(scale, missing, target))
    if missing:
        with zoo_lock(target):
            manifest = read_manifest(target)  # another process may have built it meanwhile
            missing = [m for m in wanted if not is_built(m, target, manifest, scale)]
            if missing:
                todo = [m for m in with_dependencies(missing) if m in missing or not is_built(m, target, manifest, scale)]
                print(f"[wsolbench zoo] building the {scale} zoo models {', '.join(todo)} into {target} "
                      f"(same as `{build_command(scale, missing)}`)", flush=True)
                from .builder import build as _build  # the trainer: imported only to build

                _build(scale, root=target, seed=seed, models=missing, progress=True, force=False, lock=False)
    found = _roots(scale, wanted, root)
    for m, where in found.items():
        _verify(scale, m, where)
    roots = set(found.values())
    return roots.pop() if len(roots) == 1 else target


_VERIFIED: set[tuple] = set()  # (fingerprint, the folder's files with their sizes and mtimes) checked already


def _verify(scale: str, model: str, root: Path) -> None:
    """Raise :class:`ZooCorruptError` when a built model's files differ from the digests its build recorded."""
    from .manifest import changed_files, read_manifest

    manifest = read_manifest(root)
    folder = model_dir(model, scale, root)
    recorded = str(manifest["models"][model].get("fingerprint"))
    key = (recorded, tuple((str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(folder.rglob("*"))))
    if key in _VERIFIED:  # hashed already in this process, and no file changed since
        return
    changed = changed_files(model, root, manifest)
    if changed:
        raise ZooCorruptError(
            f"the {scale} zoo model {model} in {folder} differs from what its build wrote "
            f"(fingerprint {recorded}; changed: {', '.join(changed[:3])}{' ...' if len(changed) > 3 else ''}); "
            f"rebuild it with `{build_command(scale, [model])}`")
    _VERIFIED.add(key)


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
