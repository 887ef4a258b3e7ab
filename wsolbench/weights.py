"""Real pretrained weights: one catalogue, offline resolution with clear errors, safe loading.

Every pretrained model the paper profiles use is in :data:`CATALOGUE` with its source id, the files that
must be present and its licence: the models several methods load in ``configs/weights.yaml``, a method's own
in its package (``methods/<name>/weights.yaml``); a method's class names those it loads
(``Localizer.pretrained``; :func:`users` inverts that). Resolution is offline and goes, in order:

1. an explicit path (a method config's ``weights.<name>`` / ``path=`` argument): a folder holding the
   expected files, or the weights file itself; a relative one from the current folder, else from 2.'s dir;
2. ``WSOLBENCH_WEIGHTS`` (or ``weights_dir`` in the user config): ``<dir>/<name>/`` (e.g.
   ``<dir>/sd-v1-4/unet/...``), ``<dir>/<repo name>/`` (e.g. ``<dir>/stable-diffusion-v1-4/``), or a file
   with the expected name directly in ``<dir>`` (e.g. ``<dir>/vgg16-397923af.pth``);
3. the libraries' own caches, never the network: the Hugging Face hub cache (``HF_HUB_CACHE`` /
   ``HF_HOME``; diffusers, transformers, timm and open_clip all download there), torch hub's
   ``checkpoints/`` (torchvision, timm URL weights) and open_clip's URL cache.

A model found nowhere raises :class:`MissingWeightsError` naming the model, the files expected, every path
searched and the command that downloads it on a machine with network (``wsolbench weights fetch ...``).

Loading never executes pickled code: safetensors, or ``torch.load(weights_only=True)``; a checkpoint that
pickles whole modules (e.g. a saved ``nn.DataParallel``) is read by :func:`load_state_dict` with an
unpickler that turns every non-tensor class into an inert stub, so only the tensors come out.
"""
from __future__ import annotations

import os
import pickle
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping

__all__ = ["WeightSpec", "CATALOGUE", "MissingWeightsError", "catalogue", "resolve", "find", "list_weights",
           "weights_for_method", "fetch", "fetch_for_method", "fetch_command", "load_state_dict",
           "load_open_clip", "load_timm", "load_torchvision", "diffusers_dir", "load_blip",
           "local_path", "users", "resolve_timm", "resolve_diffusers"]


# ------------------------------------------------------------------------------------------ catalogue
@dataclass(frozen=True)
class WeightSpec:
    """One pretrained model.

    kind: ``diffusers`` | ``transformers`` (HF repo folders), ``open_clip`` (model + pretrained tag),
    ``timm`` (model name with tag), ``torchvision`` (a torch hub checkpoint file).
    source: the id the library knows it by (HF repo id, open_clip ``"ViT-B-16/openai"``, timm name,
    torchvision ``"vgg16/IMAGENET1K_V1"``).
    files: relative paths that must exist (folders) or acceptable file names (single-file kinds).
    """

    name: str
    kind: str
    source: str
    files: tuple[str, ...]
    licence: str
    description: str
    hf_repo: str | None = None          # where the files live on the Hugging Face hub
    url: str | None = None              # direct URL (torch hub / open_clip URL cache)
    size_gb: float | None = None
    notes: str = ""
    extra: Mapping[str, Any] = field(default_factory=dict)

    @property
    def is_folder(self) -> bool:
        return self.kind in ("diffusers", "transformers")


def _read_specs(path: Path) -> list[WeightSpec]:
    """The ``WeightSpec`` entries of one catalogue YAML (a list of mappings of its fields)."""
    import yaml

    try:
        entries = yaml.safe_load(path.read_text(encoding="utf-8")) or []
        return [WeightSpec(**{**e, "files": tuple(e["files"])}) for e in entries]
    except (TypeError, KeyError) as exc:
        raise ValueError(f"{path}: a catalogue entry is not a WeightSpec ({exc}); "
                         f"fields: {', '.join(WeightSpec.__dataclass_fields__)}") from exc


def _catalogue_files() -> list[Path]:
    """``configs/weights.yaml`` (models several methods load), then the ``weights.yaml`` beside each registered
    method's module (built-in packages and entry-point plugins alike; found without importing them)."""
    from importlib import resources

    from .registry import METHODS, list_methods

    homes = dict.fromkeys(METHODS.home(m) for m in list_methods())
    return [Path(str(resources.files("wsolbench.configs") / "weights.yaml"))] + \
        [h / "weights.yaml" for h in homes if (h / "weights.yaml").is_file()]


def _load_catalogue() -> dict[str, WeightSpec]:
    out: dict[str, WeightSpec] = {}
    for path in _catalogue_files():
        for s in _read_specs(path):
            if s.name in out:
                raise ValueError(f"{path}: pretrained model {s.name!r} is already in the catalogue")
            out[s.name] = s
    return out


# every pretrained model the paper profiles use; a method's class names the ones it loads in ``pretrained``
CATALOGUE: dict[str, WeightSpec] = _load_catalogue()
_ALIASES = {"stable-diffusion-v1-4": "sd-v1-4", "CompVis/stable-diffusion-v1-4": "sd-v1-4",
            "ViT-B-16": "clip-vit-b16-openai", "ViT-B/16": "clip-vit-b16-openai",
            "ViT-B-32": "clip-vit-b32-openai", "ViT-B/32": "clip-vit-b32-openai",
            "ViT-L-14": "clip-vit-l14-openai", "ViT-L/14": "clip-vit-l14-openai",
            "Salesforce/blip-image-captioning-base": "blip-caption-base", "blip": "blip-caption-base",
            "tf_efficientnet_b7": "efficientnet-b7", "inception_v3": "inception-v3"}
for _s in CATALOGUE.values():
    _ALIASES.setdefault(_s.source, _s.name)
    if _s.kind == "timm":
        _ALIASES.setdefault(_s.source.split(".")[0], _s.name)


class MissingWeightsError(FileNotFoundError):
    """Pretrained weights are not on this machine; the message says what, where we looked, and the fix.

    ``MissingWeightsError(spec, searched, reason)`` builds the standard message; ``MissingWeightsError(text)``
    (a method's own message) is accepted too.
    """

    def __init__(self, spec: "WeightSpec | str", searched: list[str] | None = None, reason: str = ""):
        if isinstance(spec, str):
            self.spec, self.searched = None, list(searched or [])
            super().__init__(spec)
            return
        self.spec, self.searched = spec, list(searched or [])
        files = "\n".join(f"      {f.replace('|', '  or  ')}" for f in spec.files)
        where = "\n".join(f"      {p}" for p in self.searched) or "      (nothing)"
        msg = (f"pretrained weights {spec.name!r} ({spec.description}; source {spec.source}) not found"
               f"{': ' + reason if reason else ''}.\n"
               f"  expected files:\n{files}\n"
               f"  searched:\n{where}\n"
               f"  on a machine with network run:\n      {fetch_command(spec.name)}\n"
               f"  (or {_raw_download_command(spec)}), then copy the result to the weights dir "
               f"(WSOLBENCH_WEIGHTS) or point the method config at it.")
        if spec.notes:
            msg += f"\n  note: {spec.notes}"
        msg += f"\n  licence: {spec.licence}"
        super().__init__(msg)

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


def catalogue() -> list[WeightSpec]:
    return list(CATALOGUE.values())


def _spec(name: str) -> WeightSpec:
    key = _ALIASES.get(name, name)
    if key in CATALOGUE:
        return CATALOGUE[key]
    adhoc = _adhoc_spec(name)
    if adhoc is not None:
        return adhoc
    import difflib

    close = difflib.get_close_matches(name, list(CATALOGUE) + list(_ALIASES), n=3)
    hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else ""
    raise KeyError(f"unknown pretrained model {name!r}{hint} (known: {', '.join(CATALOGUE)}; also accepted: "
                   "'torchvision/<file>.pth', a timm pretrained name, 'hf:<org>/<repo>')")


def _adhoc_spec(name: str) -> WeightSpec | None:
    """Models outside the catalogue: ``torchvision/<file>``, timm pretrained names, ``hf:<org>/<repo>``."""
    if name.startswith("torchvision/"):
        fname = name.split("/", 1)[1]
        for spec in CATALOGUE.values():
            if spec.kind == "torchvision" and fname in spec.files:
                return spec
        return WeightSpec(name, "torchvision", name, (fname,), "see the model's weights page",
                          f"torchvision checkpoint {fname}", url=f"https://download.pytorch.org/models/{fname}")
    if name.startswith("hf:") or name.startswith("hf-hub:"):
        repo = name.split(":", 1)[1]
        return WeightSpec(name, "transformers", repo, ("config.json|model_index.json|open_clip_config.json",),
                          "see the model card", f"Hugging Face repo {repo}", hf_repo=repo)
    if name.startswith("timm/"):
        name = name.split("/", 1)[1]
    try:
        import timm

        pretrained = timm.is_model_pretrained(name.split(".")[0]) and "." in name
    except Exception:  # pragma: no cover
        pretrained = False
    if pretrained:
        from timm.models import get_pretrained_cfg

        cfg = get_pretrained_cfg(name)
        if cfg is not None and cfg.hf_hub_id:
            url_file = cfg.url.rsplit("/", 1)[-1] if cfg.url else ""
            files = "model.safetensors|pytorch_model.bin" + (
                f"|{url_file}" if url_file.endswith((".pth", ".bin", ".safetensors")) else "")
            return WeightSpec(name, "timm", name, (files,), cfg.license or "see the model card",
                              f"timm {name}", hf_repo=cfg.hf_hub_id.rstrip("/"), url=cfg.url or None)
    return None


def weights_for_method(method: str) -> list[WeightSpec]:
    """The models ``method``'s class declares in ``pretrained`` (an unknown method: ``RegistryError``)."""
    from .registry import METHODS

    return [_spec(n) for n in METHODS.declared(method, "pretrained")]


def users(name: str) -> list[str]:
    """The registered methods whose class declares ``name`` in ``pretrained``."""
    from .registry import METHODS, list_methods

    return [m for m in list_methods() if name in METHODS.declared(m, "pretrained")]


def fetch_command(name: str | None = None, method: str | None = None) -> str:
    if method:
        return f"wsolbench weights fetch --method {method}"
    return f"wsolbench weights fetch {name}"


def _raw_download_command(spec: WeightSpec) -> str:
    if spec.kind in ("diffusers", "transformers", "timm") or (spec.kind == "open_clip" and spec.hf_repo):
        return f"hf download {spec.hf_repo}"
    return f"curl -L -o {spec.files[0].split('|')[0]} {spec.url}"


# ------------------------------------------------------------------------------------------ resolving
def _alternatives(entry: str) -> list[str]:
    return entry.split("|")


def _folder_complete(folder: Path, spec: WeightSpec) -> bool:
    return all(any((folder / alt).exists() for alt in _alternatives(f)) for f in spec.files)


_GENERIC_FILES = {"model.safetensors", "pytorch_model.bin", "open_clip_model.safetensors",
                  "open_clip_pytorch_model.bin"}


def _file_in(folder: Path, spec: WeightSpec, distinctive_only: bool = False) -> Path | None:
    """The first expected file present in ``folder``; ``distinctive_only`` skips generic names such as
    ``model.safetensors`` (a shared folder cannot tell whose they are)."""
    for entry in spec.files:
        for alt in _alternatives(entry):
            if distinctive_only and alt in _GENERIC_FILES:
                continue
            p = folder / alt
            if p.is_file():
                return p
    return None


def _check_candidate(path: Path, spec: WeightSpec, shared: bool = False) -> Path | None:
    if spec.is_folder:
        return path if path.is_dir() and _folder_complete(path, spec) else None
    if path.is_file():
        return path
    if path.is_dir():
        return _file_in(path, spec, distinctive_only=shared)
    return None


def _hf_cache_dir() -> Path:
    try:
        from huggingface_hub import constants

        return Path(constants.HF_HUB_CACHE)
    except Exception:  # pragma: no cover
        home = os.environ.get("HF_HOME", Path.home() / ".cache" / "huggingface")
        return Path(os.environ.get("HF_HUB_CACHE", Path(home) / "hub"))


def _hf_snapshot(repo: str) -> Path | None:
    """The newest cached snapshot folder of an HF repo, found without network."""
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(repo, local_files_only=True))
    except Exception:
        pass
    # fall back to reading the cache layout directly: models--org--name/snapshots/<rev>/
    base = _hf_cache_dir() / ("models--" + repo.replace("/", "--"))
    ref = base / "refs" / "main"
    if ref.is_file():
        snap = base / "snapshots" / ref.read_text().strip()
        if snap.is_dir():
            return snap
    snaps = sorted((base / "snapshots").glob("*"), key=lambda p: p.stat().st_mtime, reverse=True) \
        if (base / "snapshots").is_dir() else []
    return snaps[0] if snaps else None


def _torch_hub_checkpoints() -> Path:
    try:
        import torch.hub

        return Path(torch.hub.get_dir()) / "checkpoints"
    except Exception:  # pragma: no cover
        return Path(os.environ.get("TORCH_HOME", Path.home() / ".cache" / "torch")) / "hub" / "checkpoints"


def _open_clip_url_cache() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "clip"


def _candidates(spec: WeightSpec) -> list[tuple[str, Path]]:
    """(label, path) in resolution order, excluding the explicit path."""
    from .paths import weights_dir

    out: list[tuple[str, Path]] = []
    wdir = weights_dir()
    if wdir is not None:
        names = [spec.name]
        if spec.hf_repo:
            names.append(spec.hf_repo.split("/")[-1])
        if spec.kind == "timm":
            names.append(spec.source)
        for n in dict.fromkeys(names):
            out.append(("WSOLBENCH_WEIGHTS", wdir / n))
        for n in dict.fromkeys(names):  # also grouped by library: <dir>/timm/<name>, <dir>/diffusers/<name>, ...
            out.append(("WSOLBENCH_WEIGHTS", wdir / spec.kind / n))
        if not spec.is_folder:
            out.append(("WSOLBENCH_WEIGHTS (shared)", wdir / spec.kind))
            out.append(("WSOLBENCH_WEIGHTS (shared)", wdir))
    if spec.hf_repo:
        out.append(("huggingface cache", _hf_cache_dir() / ("models--" + spec.hf_repo.replace("/", "--"))))
    if spec.url:
        fname = spec.url.rsplit("/", 1)[-1]
        cache = _open_clip_url_cache() if spec.kind == "open_clip" else _torch_hub_checkpoints()
        out.append(("torch hub cache" if spec.kind != "open_clip" else "open_clip cache", cache / fname))
    return out


def local_path(value: str | os.PathLike) -> Path:
    """A file or folder named in a config: the path as given (absolute, or relative to the current folder),
    else under the weights dir (``WSOLBENCH_WEIGHTS``) when it exists there."""
    from .paths import weights_dir

    p, wdir = Path(value).expanduser(), weights_dir()
    return wdir / p if not p.exists() and wdir is not None and (wdir / p).exists() else p


def find(name: str, path: str | os.PathLike | None = None) -> tuple[Path | None, list[str]]:
    """(resolved path or None, the locations searched) for catalogue model ``name``."""
    spec = _spec(name)
    searched: list[str] = []
    if path is not None:
        p = local_path(path)
        searched.append(f"{p} (explicit path)")
        return _check_candidate(p, spec), searched
    for label, cand in _candidates(spec):
        if label == "huggingface cache":
            searched.append(f"{cand} ({label}, offline)")
            snap = _hf_snapshot(spec.hf_repo) if spec.hf_repo else None
            hit = _check_candidate(snap, spec) if snap is not None else None
        else:
            searched.append(f"{cand} ({label})")
            hit = _check_candidate(cand, spec, shared=label.endswith("(shared)"))
        if hit is not None:
            return hit, searched
    return None, searched


def resolve(name: str, path: str | os.PathLike | None = None) -> Path:
    """Local path of the weights of ``name`` (a folder for diffusers/transformers kinds, else a file).

    ``path``: an explicit location from the config; when given, nothing else is searched.
    Raises :class:`MissingWeightsError` when the weights are nowhere on this machine.
    """
    spec = _spec(name)
    hit, searched = find(name, path)
    if hit is None:
        reason = "the explicit path lacks the expected files" if path is not None else ""
        raise MissingWeightsError(spec, searched, reason)
    return hit


def list_weights(include_zoo: bool = True) -> list[dict]:
    """One row per catalogued model (and per zoo model): name, source, kind, status, path, licence, used_by."""
    rows = []
    for spec in CATALOGUE.values():
        hit, searched = find(spec.name)
        rows.append({"name": spec.name, "source": spec.source, "kind": spec.kind,
                     "status": "found" if hit else "missing", "path": str(hit) if hit else "",
                     "licence": spec.licence, "used_by": ",".join(users(spec.name)), "size_gb": spec.size_gb})
    if include_zoo:
        try:
            from . import zoo

            for scale in zoo.SCALES:
                for model, st in zoo.zoo_status(scale).items():
                    rows.append({"name": f"zoo-{scale}/{model}", "source": "wsolbench synthetic world",
                                 "kind": "zoo", "status": "found" if st["built"] else "missing",
                                 "path": st["path"] if st["built"] else "", "licence": "MIT (wsolbench)",
                                 "used_by": "tiny profiles" if scale == "tiny" else "tests", "size_gb": None})
        except Exception as exc:  # pragma: no cover - listing must not fail on a broken zoo
            rows.append({"name": "zoo", "source": "", "kind": "zoo", "status": f"error: {exc}", "path": "",
                         "licence": "", "used_by": "", "size_gb": None})
    return rows


# ------------------------------------------------------------------------------------------- fetching
def fetch(name: str, target: str | os.PathLike | None = None) -> Path:
    """Download ``name`` into the library's cache (or ``target``); needs network. Returns its path."""
    spec = _spec(name)
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False") and spec.hf_repo:
        raise RuntimeError(f"HF_HUB_OFFLINE is set: unset it to download {spec.name} ({spec.hf_repo})")
    if spec.kind in ("diffusers", "transformers"):
        from huggingface_hub import snapshot_download

        kw = {"allow_patterns": list(spec.extra.get("allow_patterns", []))} if spec.extra.get("allow_patterns") else {}
        if target is not None:
            kw["local_dir"] = str(Path(target) / spec.name)
        return Path(snapshot_download(spec.hf_repo, **kw))
    if spec.kind == "open_clip":
        from open_clip.pretrained import download_pretrained, get_pretrained_cfg

        arch, tag = spec.source.split("/")
        return Path(download_pretrained(get_pretrained_cfg(arch, tag),
                                        cache_dir=str(target) if target is not None else None))
    if spec.kind == "timm":
        from huggingface_hub import hf_hub_download

        kw = {"local_dir": str(Path(target) / spec.name)} if target is not None else {}
        for fname in ("model.safetensors", "pytorch_model.bin"):
            try:
                hf_hub_download(spec.hf_repo, "config.json", **kw)
                return Path(hf_hub_download(spec.hf_repo, fname, **kw))
            except Exception as exc:  # try the next file name
                last = exc
        raise RuntimeError(f"could not download {spec.name} from {spec.hf_repo}: {last}")
    if spec.kind == "torchvision":
        import torch.hub

        dst = Path(target) if target is not None else _torch_hub_checkpoints()
        dst.mkdir(parents=True, exist_ok=True)
        out = dst / spec.files[0]
        if not out.exists():
            torch.hub.download_url_to_file(spec.url, str(out), progress=True)
        return out
    raise ValueError(f"no downloader for kind {spec.kind!r}")  # pragma: no cover


def fetch_for_method(method: str, target: str | os.PathLike | None = None) -> None:
    """Download every pretrained model ``method``'s paper profile uses (run where there is network)."""
    specs = weights_for_method(method)
    total = sum(s.size_gb or 0 for s in specs)
    print(f"fetching {len(specs)} pretrained models for {method} (~{total:.1f} GB)", flush=True)
    for spec in specs:
        hit, _ = find(spec.name)
        if hit is not None and target is None:
            print(f"  {spec.name}: already present at {hit}", flush=True)
            continue
        print(f"  {spec.name}: downloading {spec.source} (licence: {spec.licence})", flush=True)
        path = fetch(spec.name, target)
        print(f"  {spec.name}: {path}", flush=True)


# -------------------------------------------------------------------------------------- safe loading
class _Stub:
    """Inert stand-in for any class a checkpoint pickles (modules, optimizers, user code)."""

    def __init__(self, *args, **kwargs):
        self._args = args

    def __setstate__(self, state):
        self.__dict__["_state"] = state

    def __call__(self, *args, **kwargs):  # a stubbed function "called" by REDUCE gives another stub
        return _Stub(*args)


def _stub_class(module: str, name: str) -> type:
    return type(name, (_Stub,), {"__module__": f"wsolbench.stub.{module}"})


_SAFE_GLOBALS = {
    ("collections", "OrderedDict"), ("builtins", "set"), ("builtins", "frozenset"), ("builtins", "slice"),
    ("builtins", "tuple"), ("builtins", "list"), ("builtins", "dict"), ("builtins", "int"), ("builtins", "float"),
    ("builtins", "complex"), ("builtins", "bytearray"), ("builtins", "str"), ("builtins", "bool"),
    ("torch._utils", "_rebuild_tensor"), ("torch._utils", "_rebuild_tensor_v2"),
    ("torch._utils", "_rebuild_tensor_v3"), ("torch._utils", "_rebuild_parameter"),
    ("torch._utils", "_rebuild_parameter_with_state"), ("torch._utils", "_rebuild_qtensor"),
    ("torch", "Size"), ("torch", "device"), ("torch.nn.parameter", "Parameter"),
    ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"), ("numpy", "dtype"),
}


class _StubPickleModule:
    """A ``pickle_module`` for ``torch.load``: tensors and plain containers load, every other class is a stub."""

    __name__ = "wsolbench_stub_pickle"
    load = pickle.load
    dumps = pickle.dumps

    class Unpickler(pickle.Unpickler):
        def find_class(self, module, name):
            if (module, name) in _SAFE_GLOBALS or (module == "torch" and name.endswith("dtype")):
                return super().find_class(module, name)
            if module == "torch" and (name in ("float32", "float16", "bfloat16", "float64", "int64", "int32",
                                                "uint8", "int8", "bool") or name.endswith("Storage")):
                return super().find_class(module, name)
            if module == "copyreg" and name == "_reconstructor":
                return lambda cls, base, state=None: cls() if isinstance(cls, type) and issubclass(cls, _Stub) \
                    else _Stub()
            return _stub_class(module, name)


def _tensors_from_stubs(obj: Any, prefix: str = "", out: dict | None = None, seen: set | None = None) -> dict:
    """Collect an ``nn.Module``-like stub tree's parameters and buffers into a flat state dict."""
    import torch

    out = {} if out is None else out
    seen = set() if seen is None else seen
    if id(obj) in seen:
        return out
    seen.add(id(obj))
    if isinstance(obj, torch.Tensor):
        out[prefix.rstrip(".")] = obj.detach()
        return out
    if isinstance(obj, _Stub):
        state = obj.__dict__.get("_state")
        if isinstance(state, dict):
            for group in ("_parameters", "_buffers"):
                for k, v in (state.get(group) or {}).items():
                    if isinstance(v, torch.Tensor):
                        out[prefix + k] = v.detach()
            for k, v in (state.get("_modules") or {}).items():
                if v is not None:
                    _tensors_from_stubs(v, prefix + k + ".", out, seen)
        return out
    if isinstance(obj, Mapping):
        for k, v in obj.items():
            _tensors_from_stubs(v, f"{prefix}{k}.", out, seen)
    return out


def diffusers_load_kwargs() -> dict[str, bool]:
    """Keyword arguments for a diffusers ``from_pretrained``: offline, and ``low_cpu_mem_usage`` only where
    accelerate is installed (without it diffusers prints a warning and falls back anyway)."""
    import importlib.util

    return {"local_files_only": True, "low_cpu_mem_usage": importlib.util.find_spec("accelerate") is not None}


def load_diffusers_folder(directory: str | os.PathLike) -> dict:
    """vae, unet, text_encoder, tokenizer and scheduler of a Stable-Diffusion-layout folder, offline, each with
    its library's ``from_pretrained(directory, subfolder=...)`` (real SD v1.4 and the zoo model alike)."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    d, kw, dkw = str(directory), {"local_files_only": True}, diffusers_load_kwargs()
    return {"vae": AutoencoderKL.from_pretrained(d, subfolder="vae", **dkw),
            "unet": UNet2DConditionModel.from_pretrained(d, subfolder="unet", **dkw),
            "text_encoder": CLIPTextModel.from_pretrained(d, subfolder="text_encoder", **kw),
            "tokenizer": CLIPTokenizer.from_pretrained(d, subfolder="tokenizer", **kw),
            "scheduler": DDPMScheduler.from_pretrained(d, subfolder="scheduler", **kw)}


def load_state_dict(path: str | os.PathLike, key: str | None = None, strip_prefix: str | Iterable[str] = (),
                    allow_module_pickle: bool = True) -> dict:
    """A flat ``{name: tensor}`` from a checkpoint file, without executing pickled code.

    * ``.safetensors`` → ``safetensors.torch.load_file``;
    * otherwise ``torch.load(weights_only=True)``; a top-level ``{"model": sd}`` / ``{"state_dict": sd}``
      (or ``key``) is unwrapped;
    * a file that pickles whole modules (rejected by ``weights_only``) is, when ``allow_module_pickle``,
      read with an unpickler whose every non-tensor class is an inert stub: the module tree's parameters and
      buffers come back under their usual names (e.g. ``module.E.Org_model.0.weight``); no code runs.
    ``strip_prefix``: prefixes removed from the names (e.g. ``"module."`` of ``nn.DataParallel``).
    """
    import torch

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        sd: Any = load_file(str(path))
    else:
        try:
            sd = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as exc:
            if not allow_module_pickle:
                raise ValueError(f"{path}: pickles more than tensors ({exc}); re-save it with "
                                 "torch.save(model.state_dict(), path)") from exc
            obj = torch.load(path, map_location="cpu", weights_only=False, pickle_module=_StubPickleModule)
            sd = obj if isinstance(obj, Mapping) and any(isinstance(v, torch.Tensor) for v in obj.values()) \
                else _tensors_from_stubs(obj)
    if key is not None:
        sd = sd[key]
    elif isinstance(sd, Mapping):
        for k in ("model", "state_dict", "model_state_dict", "net", "module"):
            if k in sd and isinstance(sd[k], Mapping):
                sd = sd[k]
                break
    if not isinstance(sd, Mapping):
        sd = _tensors_from_stubs(sd)
    prefixes = (strip_prefix,) if isinstance(strip_prefix, str) else tuple(strip_prefix)
    out = {}
    for k, v in sd.items():
        if not isinstance(v, torch.Tensor):
            continue
        for pre in prefixes:
            if pre and k.startswith(pre):
                k = k[len(pre):]
        out[k] = v
    return out


# ----------------------------------------------------------------------------------------- loaders
def load_open_clip(model_name: str = "ViT-B-16", pretrained: str = "openai", path: str | os.PathLike | None = None,
                   device: str = "cpu", **kwargs):
    """(model, tokenizer) of a CLIP through ``open_clip.create_model(name, pretrained=<local file>)``: THE loader
    of every method's OpenAI CLIP (WWbL, TeD-Loc, MMCST). ``kwargs`` go to ``create_model``.

    OpenAI weights get QuickGELU (``force_quick_gelu``): open_clip applies it for its known tags only, not for
    a file path (open_clip issue #771), and GELU shifts OpenAI CLIP's embeddings. An OpenAI TorchScript
    archive (the official ``ViT-B-32.pt``) loads through open_clip's own path for it (``torch.load`` hands it to
    ``torch.jit.load``, whose unpickler builds TorchScript objects only); anything else loads weights-only.
    The tokenizer is open_clip's ``SimpleTokenizer`` with its bundled BPE vocabulary (offline).
    """
    import open_clip

    spec = _spec(f"{model_name}/{pretrained}")
    file = resolve(spec.name, path)
    if file.is_dir():
        file = _file_in(file, spec) or file
    arch, _, tag = spec.source.partition("/")
    quick = openai_quick_gelu(arch, tag or pretrained)
    archive = _is_torchscript_archive(file)
    try:
        model = open_clip.create_model(arch, pretrained=str(file), device=device, force_quick_gelu=quick,
                                       weights_only=not archive, **kwargs)
    except RuntimeError as exc:
        raise ValueError(f"{file}: not a {arch} checkpoint open_clip can load ({' '.join(str(exc).split())[:300]}); "
                         f"point the method's CLIP weights key (clip.weights; MMCST: model.clip.weights_path) at "
                         f"OpenAI's {arch}.pt or an OpenAI/open_clip {arch} state dict") from exc
    return model.eval(), open_clip.get_tokenizer(arch)


def openai_quick_gelu(arch: str, tag: str) -> bool:
    """Whether weights ``arch``/``tag`` were trained with QuickGELU: OpenAI's (tag ``openai``) and every tag
    whose open_clip pretrained config says so."""
    import open_clip

    return tag == "openai" or bool((open_clip.get_pretrained_cfg(arch, tag) or {}).get("quick_gelu", False))


def _is_torchscript_archive(file: Path) -> bool:
    """A TorchScript zip (``torch.jit.save``; OpenAI's CLIP ``.pt`` files) rather than a ``torch.save`` file."""
    import zipfile

    if not zipfile.is_zipfile(file):
        return False
    with zipfile.ZipFile(file) as z:
        return any(n.endswith("/constants.pkl") or n == "constants.pkl" for n in z.namelist())


def load_timm(name: str, path: str | os.PathLike | None = None, **kwargs):
    """A timm model with real pretrained weights, offline: ``timm.create_model(arch, pretrained=True,
    pretrained_cfg_overlay=dict(file=<local file>), **kwargs)``."""
    import timm

    spec = _spec(name)
    if spec.kind != "timm":
        raise ValueError(f"{spec.name} is a {spec.kind} model, not timm")
    file = resolve(spec.name, path)
    if file.is_dir():
        file = _file_in(file, spec) or file
    return timm.create_model(spec.source, pretrained=True, pretrained_cfg_overlay=dict(file=str(file)), **kwargs)


def load_torchvision(name: str, path: str | os.PathLike | None = None, **kwargs):
    """A torchvision ImageNet model (``torchvision.models.get_model(arch, weights=None)`` + safe state dict)."""
    import torchvision

    spec = _spec(name)
    if spec.kind != "torchvision":
        raise ValueError(f"{spec.name} is a {spec.kind} model, not torchvision")
    arch = spec.source.split("/")[0]
    if arch == "inception_v3":
        kwargs.setdefault("aux_logits", True)
        kwargs.setdefault("init_weights", False)
    model = torchvision.models.get_model(arch, weights=None, **kwargs)
    model.load_state_dict(load_state_dict(resolve(spec.name, path)))
    return model.eval()


def resolve_timm(name: str, path: str | os.PathLike | None = None) -> Path | None:
    """The local weights file of a timm model (catalogue name or any timm pretrained name), or None."""
    hit, _ = find(name, path)
    if hit is not None and hit.is_dir():
        hit = _file_in(hit, _spec(name))
    return hit


def resolve_diffusers(name: str = "sd-v1-4", path: str | os.PathLike | None = None) -> Path:
    """Alias of :func:`diffusers_dir` accepting a repo id (``CompVis/stable-diffusion-v1-4``) or a folder."""
    p = Path(str(name)).expanduser()
    if path is None and p.is_dir():
        return p
    return diffusers_dir(name, path)


def diffusers_dir(name: str = "sd-v1-4", path: str | os.PathLike | None = None) -> Path:
    """Folder for ``<Class>.from_pretrained(folder, subfolder=..., local_files_only=True)``."""
    spec = _spec(name)
    if spec.kind != "diffusers":
        raise ValueError(f"{spec.name} is a {spec.kind} model, not diffusers")
    return resolve(spec.name, path)


def load_blip(path: str | os.PathLike | None = None, device: str = "cpu"):
    """(BlipForConditionalGeneration, BlipProcessor) of the BLIP base captioner, offline."""
    from transformers import BlipForConditionalGeneration, BlipProcessor

    folder = resolve("blip-caption-base", path)
    model = BlipForConditionalGeneration.from_pretrained(str(folder), local_files_only=True)
    processor = BlipProcessor.from_pretrained(str(folder), local_files_only=True)
    return model.to(device).eval(), processor


def main_list(stream=sys.stdout) -> None:  # pragma: no cover - convenience for `python -m wsolbench.weights`
    rows = list_weights()
    width = max(len(r["name"]) for r in rows)
    for r in rows:
        print(f"{r['name']:<{width}}  {r['status']:<7}  {r['kind']:<11}  {r['source']}  {r['path']}", file=stream)


if __name__ == "__main__":  # pragma: no cover
    main_list()
