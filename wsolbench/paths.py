"""Where data, weights and caches live: one setting each, environment first, then the user config file."""
from __future__ import annotations

import os
from pathlib import Path

def user_config_path() -> Path:
    """WSOLBENCH_CONFIG, else ~/.config/wsolbench/config.yaml (keys: data_root, cache_dir, weights_dir)."""
    return Path(os.environ.get("WSOLBENCH_CONFIG", Path.home() / ".config" / "wsolbench" / "config.yaml"))


def _user_setting(key: str) -> str | None:
    path = user_config_path()
    if not path.exists():
        return None
    import yaml

    data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping like 'data_root: /path', got {type(data).__name__}")
    value = data.get(key)
    return None if value is None else str(value)


def data_root() -> Path:
    """WSOLBENCH_DATA, else ``data_root`` in the user config, else ~/wsolbench-data."""
    value = os.environ.get("WSOLBENCH_DATA") or _user_setting("data_root")
    return Path(value).expanduser() if value else Path.home() / "wsolbench-data"


def dataset_root(subdir: str) -> Path:
    return data_root() / subdir


def cache_dir() -> Path:
    """WSOLBENCH_CACHE, else ``cache_dir`` in the user config, else ~/.cache/wsolbench (zoo, pseudo-labels)."""
    value = os.environ.get("WSOLBENCH_CACHE") or _user_setting("cache_dir")
    if value:
        return Path(value).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "wsolbench"


def weights_dir() -> Path | None:
    """WSOLBENCH_WEIGHTS, else ``weights_dir`` in the user config; None when unset."""
    value = os.environ.get("WSOLBENCH_WEIGHTS") or _user_setting("weights_dir")
    return Path(value).expanduser() if value else None
