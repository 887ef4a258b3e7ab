"""Safe persistence of methods: safetensors for tensors, YAML for config; no pickled code is ever loaded."""
from __future__ import annotations

from pathlib import Path
from typing import Any

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
