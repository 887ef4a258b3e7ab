"""YAML configs: paper defaults per method, per-(method, dataset) and tiny-profile overlays, dotted overrides.

Resolution for ``load_method_config("tedloc", profile="tiny", dataset_key="cub")``::

    configs/tedloc.yaml            paper profile; its key tree is the schema (every valid key appears here)
    ← configs/tedloc_cub.yaml      where the paper recipe differs per dataset (optional)
    ← configs/tedloc_tiny.yaml     the tiny profile (CPU, zoo models)
    ← configs/tedloc_tiny_cub.yaml (optional)
    ← --set a.b=c overrides        values parsed as YAML scalars

Any file may name one ``_base_`` file (one level) that it overlays. Unknown keys are rejected with the list
of valid keys at that level. A mapping that is empty in the schema (``{}``) accepts any keys.
"""
from __future__ import annotations

import copy
from importlib import resources
from pathlib import Path
from typing import Any, Iterable, Mapping

import yaml

PROFILES = ("paper", "tiny")


class ConfigError(ValueError):
    """A config file or override that cannot be used; the message names the file/key and the fix."""


def config_dir() -> Path:
    return Path(str(resources.files("wsolbench.configs")))


def read_yaml(path: str | Path, *, allow_base: bool = True) -> dict:
    """Load one YAML mapping with ``yaml.safe_load``; resolve its ``_base_`` (one level, relative path)."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: invalid YAML: {exc}") from exc
    data = {} if data is None else data
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level, got {type(data).__name__}")
    base = data.pop("_base_", None)
    if base is None:
        return data
    if not allow_base:
        raise ConfigError(f"{path}: '_base_' is allowed one level deep only (its base has a base too)")
    base_path = (path.parent / base) if not Path(base).is_absolute() else Path(base)
    if not base_path.exists() and (config_dir() / base).exists():
        base_path = config_dir() / base
    return merge(read_yaml(base_path, allow_base=False), data, schema=None, where=str(path))


def merge(base: Mapping, overlay: Mapping, *, schema: Mapping | None, where: str = "") -> dict:
    """Deep-merge ``overlay`` onto ``base``; with a ``schema``, keys unknown to it raise ConfigError."""
    out = copy.deepcopy(dict(base))
    for key, value in overlay.items():
        sub_schema = None
        if schema is not None:
            if key not in schema:
                valid = ", ".join(sorted(map(str, schema))) or "(none)"
                raise ConfigError(f"{where}: unknown key {key!r}; valid keys here: {valid}")
            sub_schema = schema[key]
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            free = isinstance(sub_schema, Mapping) and len(sub_schema) == 0
            out[key] = merge(out[key], value, schema=None if free or not isinstance(sub_schema, Mapping)
                             else sub_schema, where=f"{where}{'.' if where else ''}{key}")
        else:
            out[key] = copy.deepcopy(value)
    return out


def parse_override(text: str) -> tuple[list[str], Any]:
    """``"train.lr=1e-4"`` → (["train", "lr"], 1e-4); the value is a YAML scalar/list."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like key.sub=value")
    key, raw = text.split("=", 1)
    parts = [p for p in key.strip().split(".") if p]
    if not parts:
        raise ConfigError(f"override {text!r} has an empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"override {text!r}: value is not valid YAML ({exc})") from exc
    if isinstance(value, str) and _looks_numeric(value):
        value = float(value)  # YAML 1.1 reads "1e-4" as a string
    return parts, value


def _looks_numeric(s: str) -> bool:
    try:
        float(s)
    except ValueError:
        return False
    return True


def nest(overrides: Mapping[str, Any] | Iterable[str]) -> dict:
    """Dotted overrides (``{"a.b": 1}`` or ``["a.b=1"]``) → a nested dict."""
    items = overrides.items() if isinstance(overrides, Mapping) else (
        (".".join(k), v) for k, v in map(parse_override, overrides))
    out: dict = {}
    for dotted, value in items:
        node = out
        parts = dotted.split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {dotted!r} conflicts with another override of {p!r}")
        node[parts[-1]] = value
    return out


def method_config_files(method: str, profile: str, dataset_key: str | None) -> list[Path]:
    """The existing YAML files that make up ``method``'s config, in merge order."""
    if profile not in PROFILES:
        raise ConfigError(f"unknown profile {profile!r}; choose one of {', '.join(PROFILES)}")
    root = config_dir()
    names = [f"{method}.yaml"]
    if dataset_key:
        names.append(f"{method}_{dataset_key}.yaml")
    if profile == "tiny":
        names.append(f"{method}_tiny.yaml")
        if dataset_key:
            names.append(f"{method}_tiny_{dataset_key}.yaml")
    files = [root / n for n in names if (root / n).exists()]
    if not files or files[0].name != f"{method}.yaml":
        raise ConfigError(f"no config for method {method!r}: expected {root / (method + '.yaml')}")
    return files


def load_method_config(method: str, profile: str = "paper", dataset_key: str | None = None,
                       overrides: Mapping[str, Any] | Iterable[str] | None = None,
                       extra_file: str | Path | None = None) -> dict:
    """The fully resolved config of ``method`` (see the module docstring for the order)."""
    files = method_config_files(method, profile, dataset_key)
    schema = read_yaml(files[0])
    cfg = copy.deepcopy(schema)
    for f in files[1:] + ([Path(extra_file)] if extra_file else []):
        cfg = merge(cfg, read_yaml(f), schema=schema, where=str(f))
    if overrides:
        cfg = merge(cfg, nest(overrides), schema=schema, where="--set")
    cfg["profile"] = profile
    return cfg


def harness_defaults() -> dict:
    """Harness settings (eval size, batch size, thresholds, policy, ...) from configs/harness.yaml."""
    return read_yaml(config_dir() / "harness.yaml")


def load_harness_config(overrides: Mapping[str, Any] | Iterable[str] | None = None) -> dict:
    schema = harness_defaults()
    return merge(schema, nest(overrides), schema=schema, where="--set harness") if overrides else schema


def split_overrides(items: Iterable[str]) -> tuple[list[str], list[str]]:
    """CLI ``--set`` items → (method overrides, harness overrides); ``harness.x=...`` goes to the harness."""
    method, harness = [], []
    for item in items:
        (harness if item.strip().startswith("harness.") else method).append(
            item.strip()[len("harness."):] if item.strip().startswith("harness.") else item)
    return method, harness
