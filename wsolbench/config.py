"""YAML configs: paper defaults per method, per-(method, dataset) and tiny-profile overlays, dotted overrides.

A method's YAML files live in its package, ``<package>/configs/`` (:func:`method_config_dir`); the harness's
in ``wsolbench/configs/``. Resolution for ``load_method_config("tedloc", profile="tiny", dataset_key="cub")``::

    tedloc.yaml            paper profile; its key tree is the schema (every valid key appears here)
    ← tedloc_cub.yaml      where the paper recipe differs per dataset (optional)
    ← tedloc_tiny.yaml     the tiny profile (CPU, zoo models)
    ← tedloc_tiny_cub.yaml (optional)
    ← --set a.b=c overrides        values parsed as YAML scalars

Any file may name one ``_base_`` file (one level) that it overlays. Unknown keys are rejected with the list
of valid keys at that level. A mapping that is empty in the schema (``{}``) accepts any keys.
"""
from __future__ import annotations

import copy
import difflib
import numbers
from importlib import resources
from pathlib import Path
from typing import Any, Iterable, Mapping

import yaml

PROFILES = ("paper", "tiny")


class ConfigError(ValueError):
    """A config file or override that cannot be used; the message names the file/key and the fix."""


def config_dir() -> Path:
    """``wsolbench/configs/``: the harness's settings (``harness.yaml``)."""
    return Path(str(resources.files("wsolbench.configs")))


def method_config_dir(method: str) -> Path:
    """``configs/`` beside the module that defines ``method`` (for a built-in: ``wsolbench/methods/<pkg>/configs``)."""
    from .registry import METHODS, RegistryError

    try:
        return METHODS.home(method) / "configs"
    except RegistryError as exc:
        raise ConfigError(f"no config for method {method!r}: {exc}") from exc


def method_schema_file(method: str) -> Path:
    """``<method>.yaml`` in the method's configs folder (a plugin may have none: check ``is_file()``)."""
    return method_config_dir(method) / f"{method}.yaml"


def method_schema(method: str) -> dict:
    """``<method>.yaml``: the paper profile, whose key tree (and value types) is the method's config schema."""
    return read_yaml(method_schema_file(method))


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
    return merge(read_yaml(base_path, allow_base=False), data, schema=None, where=str(path))


def merge(base: Mapping, overlay: Mapping, *, schema: Mapping | None, where: str = "", _path: str = "") -> dict:
    """Deep-merge ``overlay`` onto ``base``; with a ``schema``, keys unknown to it raise ConfigError (naming
    ``where``, the dotted key, the nearest valid keys and all valid keys at that level)."""
    out = copy.deepcopy(dict(base))
    for key, value in overlay.items():
        dotted = f"{_path}{key}"
        sub_schema = None
        if schema is not None:
            if key not in schema:
                raise ConfigError(_unknown_key(where, dotted, str(key), schema))
            sub_schema = schema[key]
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            free = isinstance(sub_schema, Mapping) and len(sub_schema) == 0
            out[key] = merge(out[key], value, schema=None if free or not isinstance(sub_schema, Mapping)
                             else sub_schema, where=where, _path=f"{dotted}.")
        else:
            out[key] = copy.deepcopy(value)
    return out


def _unknown_key(where: str, dotted: str, key: str, level: Mapping) -> str:
    valid = sorted(map(str, level))
    close = difflib.get_close_matches(key, valid, n=3, cutoff=0.6)
    parent = dotted[: -len(key) - 1]  # (a "harness." prefix stays on the suggestions)
    hint = f"did you mean {' or '.join(repr(parent + '.' + c if parent else c) for c in close)}? " if close else ""
    return (f"{where}: unknown key {dotted!r}; {hint}valid keys {'under ' + repr(parent) if parent else 'here'}: "
            f"{', '.join(valid) or '(none)'}")


def check_types(schema: Mapping, overlay: Mapping, where: str, _path: str = "") -> None:
    """Each value in ``overlay`` has the type of the schema's value for that key: an int for an int, a number
    for a float, a bool for a bool, a string for a string, a list for a list, a mapping for a mapping; null
    is accepted everywhere (it switches a setting off) and a schema value of null accepts anything."""
    for key, value in overlay.items():
        if key not in schema or value is None:
            continue
        dotted, expected = f"{_path}{key}", schema[key]
        if isinstance(expected, Mapping):
            if not isinstance(value, Mapping):
                keys = list(map(str, expected))
                shown = ", ".join(keys[:6]) + (", ..." if len(keys) > 6 else "") if keys else "any keys"
                raise ConfigError(f"{where} {dotted}={show_value(value)}: {dotted!r} is a group of settings "
                                  f"({shown}); set one of them, e.g. {dotted}.<key>=<value>")
            if expected:
                check_types(expected, value, where, f"{dotted}.")
            continue
        wanted = _type_name(expected)
        if wanted is not None and not _type_ok(expected, value):
            got = _type_name(value) or type(value).__name__
            raise ConfigError(f"{where} {dotted}={show_value(value)}: {dotted!r} expects {wanted} (default "
                              f"{show_value(expected)}), got {show_value(value)} ({got})")


def _type_name(value: Any) -> str | None:
    for kind, name in ((bool, "a boolean"), (numbers.Integral, "an integer"), (numbers.Real, "a number"),
                       (str, "a string"), ((list, tuple), "a list"), (Mapping, "a mapping")):
        if isinstance(value, kind):
            return name
    return None


def _type_ok(expected: Any, value: Any) -> bool:
    """Numbers by kind (numpy's too), a tuple where a list is expected (Python callers' overrides)."""
    if isinstance(expected, bool) or isinstance(value, bool):
        return isinstance(expected, bool) and isinstance(value, bool)
    if isinstance(expected, int):
        return isinstance(value, numbers.Integral)
    if isinstance(expected, float):
        return isinstance(value, numbers.Real)
    if isinstance(expected, list):
        return isinstance(value, (list, tuple))
    return isinstance(value, type(expected))


def show_value(value: Any) -> str:
    """A value as one line of YAML (flow style), as ``config show`` and the error messages print it."""
    try:
        return yaml.safe_dump(value, default_flow_style=True, width=10_000).strip().removesuffix("...").strip()
    except yaml.YAMLError:  # e.g. a numpy scalar from a Python caller
        return repr(value)


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
    root = method_config_dir(method)
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
    return resolve_method_config(method, profile, dataset_key, overrides, extra_file)[0]


def resolve_method_config(method: str, profile: str = "paper", dataset_key: str | None = None,
                          overrides: Mapping[str, Any] | Iterable[str] | None = None,
                          extra_file: str | Path | None = None) -> tuple[dict, dict[str, str]]:
    """(the resolved config, {dotted key: the file name or "--set" its value came from}) for ``config show``."""
    files = method_config_files(method, profile, dataset_key)
    schema = read_yaml(files[0])
    cfg, sources = copy.deepcopy(schema), dict.fromkeys(leaf_keys(schema), files[0].name)
    for f in files[1:] + ([Path(extra_file)] if extra_file else []):
        layer = read_yaml(f)
        cfg = merge(cfg, layer, schema=schema, where=str(f))
        check_types(schema, layer, str(f))
        sources.update(dict.fromkeys(leaf_keys(layer), f.name))
    if overrides:
        cfg = apply_overrides(cfg, overrides, schema)
        sources.update(dict.fromkeys(leaf_keys(nest(overrides)), "--set"))
    cfg["profile"] = profile
    sources["profile"] = "--profile"
    return cfg, sources


RESOLUTION_KEYS = ("profile",)  # what resolve_method_config adds beside the schema's keys


def with_defaults(method: str, config: Mapping | None) -> dict:
    """``config`` (a resolved config, or a partial one from a notebook or test) completed from the method's
    schema YAML, the one source of defaults; its keys and value types are checked against that schema."""
    schema = method_schema(method)
    partial = dict(config or {})
    added = {k: partial.pop(k) for k in RESOLUTION_KEYS if k in partial}
    out = merge(schema, partial, schema=schema, where=f"{method} config")
    check_types(schema, partial, f"{method} config")
    return out | added


def apply_overrides(cfg: Mapping, overrides: Mapping[str, Any] | Iterable[str], schema: Mapping,
                    prefix: str = "") -> dict:
    """``cfg`` with the dotted ``--set`` ``overrides`` merged on: each key must be in ``schema`` and of its
    type. ``prefix`` ("harness.") is how the user spelled the keys, for the messages."""
    nested = nest(overrides)
    out = merge(cfg, nested, schema=schema, where="--set", _path=prefix)
    check_types(schema, nested, "--set", prefix)
    return out


def leaf_keys(tree: Mapping, prefix: str = "") -> list[str]:
    """The dotted keys of a nested mapping's leaves (an empty mapping is a leaf)."""
    out = []
    for key, value in tree.items():
        if isinstance(value, Mapping) and value:
            out += leaf_keys(value, f"{prefix}{key}.")
        else:
            out.append(f"{prefix}{key}")
    return out


def harness_defaults() -> dict:
    """Harness settings (eval size, batch size, thresholds, policy, ...) from configs/harness.yaml."""
    return read_yaml(config_dir() / "harness.yaml")


def load_harness_config(overrides: Mapping[str, Any] | Iterable[str] | None = None) -> dict:
    """configs/harness.yaml with ``harness.*`` overrides (given without the prefix) checked and merged on."""
    return resolve_harness_config(overrides)[0]


def resolve_harness_config(overrides: Mapping[str, Any] | Iterable[str] | None = None
                           ) -> tuple[dict, dict[str, str]]:
    """(the harness config, {dotted key: "harness.yaml" or "--set"}), like :func:`resolve_method_config`."""
    schema = harness_defaults()
    sources = dict.fromkeys(leaf_keys(schema), "harness.yaml")
    if not overrides:
        return schema, sources
    sources.update(dict.fromkeys(leaf_keys(nest(overrides)), "--set"))
    return apply_overrides(schema, overrides, schema, prefix="harness."), sources


def value_at(tree: Mapping, dotted: str) -> Any:
    """``tree["a"]["b"]`` for ``"a.b"``."""
    for part in dotted.split("."):
        tree = tree[part]
    return tree


def split_overrides(items: Iterable[str]) -> tuple[list[str], list[str]]:
    """CLI ``--set`` items → (method overrides, harness overrides); ``harness.x=...`` goes to the harness."""
    method, harness = [], []
    for item in items:
        (harness if item.strip().startswith("harness.") else method).append(
            item.strip()[len("harness."):] if item.strip().startswith("harness.") else item)
    return method, harness
