"""Safe persistence of methods: safetensors for tensors, YAML for config; no pickled code is ever loaded."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping

import yaml

from .io import atomic_path, write_text

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.yaml"


def save_tensors(tensors: dict, path: str | Path, metadata: dict[str, str] | None = None) -> Path:
    """Atomically write a flat dict of tensors as safetensors (contiguous CPU copies, shared storage split)."""
    from safetensors.torch import save_file

    flat = {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}
    with atomic_path(path) as tmp:
        save_file(flat, str(tmp), metadata=metadata)
    return Path(path)


def load_tensors(path: str | Path, device: str = "cpu") -> dict:
    """Read safetensors, or a torch file with ``weights_only=True`` (plain tensors/containers only)."""
    import torch

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path), device=device)
    try:
        obj = torch.load(path, map_location=device, weights_only=True)
    except Exception as exc:  # pickled modules/code are refused by weights_only
        raise ValueError(f"{path}: not a plain tensor checkpoint ({exc.__class__.__name__}: {exc}). "
                         "Re-save it as a state_dict, e.g. torch.save(model.state_dict(), path)") from exc
    return obj


def save_localizer(method: Any, directory: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    save_tensors(method.state_dict(), directory / WEIGHTS_FILE, metadata={"method": method.registry_name})
    meta = {"method": method.registry_name, "class_names": list(method.class_names), "config": method.config}
    write_text(directory / CONFIG_FILE, yaml.safe_dump(meta, sort_keys=False))
    return directory


def read_saved_meta(directory: Path, method: str | None = None) -> dict:
    """The ``config.yaml`` of a saved method directory (keys method, class_names, config)."""
    if not Path(directory).exists():
        raise FileNotFoundError(f"checkpoint not found: {directory} (give a directory written by Localizer.save, "
                                "or a checkpoint file of the method's own code)")
    cfg_path = Path(directory) / CONFIG_FILE
    if not cfg_path.exists():
        raise FileNotFoundError(f"{cfg_path} is missing: a saved method directory holds {CONFIG_FILE} and "
                                f"{WEIGHTS_FILE} (written by Localizer.save)")
    meta = yaml.safe_load(cfg_path.read_text(encoding="utf-8"))
    if method and meta.get("method") not in (None, method):
        raise ValueError(f"{directory} holds a {meta.get('method')!r} checkpoint, not {method!r}")
    return meta


def load_localizer(cls: Any, directory: Path, device: str = "cpu", config: dict | None = None) -> Any:
    """Rebuild a saved method; ``config`` replaces the saved config (e.g. the saved one plus ``--set``)."""
    meta = read_saved_meta(directory, cls.registry_name)
    method = cls.from_config(config if config is not None else meta["config"],
                             class_names=meta.get("class_names"), device=device)
    method.load_state_dict(load_tensors(directory / WEIGHTS_FILE, device=device))
    return method


# ---------------------------------------------------------------------------------------------------------
# Foreign checkpoints (a file written by another code base): loaded exactly, or refused with the reason
# ---------------------------------------------------------------------------------------------------------
class CheckpointError(ValueError):
    """A checkpoint that does not fit the model; the message is one line naming the file and the fix."""


@dataclass
class LoadReport:
    """What a strict load did: every tensor of the file and of the model is accounted for (the run records it)."""

    where: str
    loaded: list[str]  # model tensors set from the file
    missing: list[str] = field(default_factory=list)  # model tensors the file lacks, allowed by ``partial``
    unexpected: list[str] = field(default_factory=list)  # file tensors the model lacks, allowed by ``partial``
    ignored: dict[str, str] = field(default_factory=dict)  # file tensors the method's reader drops, and why
    adapted: dict[str, str] = field(default_factory=dict)  # file tensors the reader reshaped, and how
    partial: list[str] = field(default_factory=list)  # the names/prefixes the user allowed to be partial
    layout: str | None = None  # the file layout the method recognised (e.g. "mctformer-v2")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def summary(self) -> str:
        s = f"{self.where}: loaded {len(self.loaded)} tensors"
        if self.layout:
            s += f" ({self.layout} layout)"
        if self.missing or self.unexpected:
            s += f"; partial load ({', '.join(self.partial)}): {len(self.missing)} model tensors left as they " \
                 f"were, {len(self.unexpected)} file tensors unused"
        if self.ignored:
            s += f"; {len(self.ignored)} file tensors dropped by the reader"
        return s


def _named(name: str, partial: Iterable[str]) -> str | None:
    """The entry of ``partial`` that covers ``name`` (equal, or a prefix ending at a dot), or None."""
    for entry in partial:
        stem = entry.rstrip(".")
        if name == stem or name.startswith(stem + "."):
            return entry
    return None


def _examples(names: list[str], n: int = 4) -> str:
    return ", ".join(names[:n]) + (f" and {len(names) - n} more" if len(names) > n else "")


def partial_names(config: Mapping[str, Any] | None) -> tuple[str, ...]:
    """The partial load a user asked for in a method config (``load.partial``: tensor names or prefixes)."""
    entries = ((config or {}).get("load") or {}).get("partial") or ()
    if isinstance(entries, str):
        entries = [entries]
    return tuple(str(e) for e in entries)


def load_exact(module: Any, state: Mapping[str, Any], *, partial: Iterable[str] = (), where: str | Path = "checkpoint",
               ignored: Mapping[str, str] | None = None, adapted: Mapping[str, str] | None = None,
               layout: str | None = None) -> LoadReport:
    """Load ``state`` into ``module`` so that every model tensor comes from the file and every file tensor is used.

    A model tensor missing from ``state`` or a ``state`` tensor the model lacks raises ``CheckpointError``
    unless a ``partial`` entry (a tensor name, or a prefix such as ``text_proj``) names it; a shape mismatch
    always raises; so does a ``partial`` entry that names nothing (a typo would silently allow nothing).
    ``ignored`` / ``adapted``: file tensors the caller's reader dropped / reshaped (name → why, how), recorded.
    """
    import torch

    where = str(where)
    partial = tuple(partial)
    own = module.state_dict()
    shape_bad = [f"{k} (file {tuple(v.shape)}, model {tuple(own[k].shape)})" for k, v in state.items()
                 if k in own and torch.is_tensor(v) and tuple(v.shape) != tuple(own[k].shape)]
    if shape_bad:
        raise CheckpointError(f"{where}: {len(shape_bad)} tensors have other shapes than the model's: "
                              f"{_examples(shape_bad, 3)}; the file was written for another architecture "
                              "(check the backbone and the number of classes)")
    missing = sorted(k for k in own if k not in state)
    unexpected = sorted(k for k in state if k not in own)
    bad_missing = [k for k in missing if _named(k, partial) is None]
    bad_unexpected = [k for k in unexpected if _named(k, partial) is None]
    if bad_missing or bad_unexpected:
        parts = []
        if bad_missing:
            parts.append(f"{len(bad_missing)} of the model's {len(own)} tensors are not in the file "
                         f"({_examples(bad_missing)})")
        if bad_unexpected:
            parts.append(f"{len(bad_unexpected)} tensors of the file are not in the model "
                         f"({_examples(bad_unexpected)})")
        raise CheckpointError(f"{where}: {'; '.join(parts)}: the file does not match this model; use the matching "
                              "config, or allow a partial load by name (--set load.partial=[name_or_prefix,...])")
    unused = [e for e in partial if not any(_named(k, [e]) for k in missing + unexpected)]
    if unused:
        raise CheckpointError(f"{where}: load.partial names {unused}, which match no missing or unused tensor; "
                              "remove them (tensor names are the model's state_dict keys)")
    module.load_state_dict({k: v for k, v in state.items() if k in own}, strict=False)
    return LoadReport(where=where, loaded=sorted(k for k in state if k in own), missing=missing,
                      unexpected=unexpected, ignored=dict(ignored or {}), adapted=dict(adapted or {}),
                      partial=list(partial), layout=layout)


def load_foreign_method(cls: Any, path: str | Path, config: dict, class_names: Any, device: str = "cpu") -> Any:
    """``cls.load_foreign`` with its failures as ``CheckpointError`` (one line naming the file and the fix)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path} (a file written by other code, or a directory "
                              "written by Localizer.save)")
    try:
        return cls.load_foreign(path, config, class_names, device)
    except NotImplementedError as exc:
        raise CheckpointError(str(exc)) from exc


def load_record(method: Any) -> dict | None:
    """What ``--checkpoint FILE`` loaded into ``method`` (its ``LoadReport``), for the run's metrics.json."""
    report = getattr(method, "load_report", None)
    return report.to_dict() if report is not None else None
