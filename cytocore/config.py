"""YAML configs: a stage's defaults merged with the user's file and ``--set key=value`` overrides.

Read explicitly by the command that needs them (no config magic at import time). Unknown keys are
an error naming the file, because a typo in a config silently training the wrong model costs hours.
"""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Iterable, Optional, Union

import yaml

from .errors import CytoFuseError

PathLike = Union[str, Path]


def read_yaml(path: PathLike) -> dict:
    path = Path(path)
    if not path.is_file():
        raise CytoFuseError(f"{path}: config file not found")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = f":{mark.line + 1}" if mark is not None else ""
        raise CytoFuseError(f"{path}{line}: invalid YAML ({getattr(exc, 'problem', exc)})") from None
    if not isinstance(data, dict):
        raise CytoFuseError(f"{path}: a config must be a mapping of sections, not {type(data).__name__}")
    return data


def merge(base: dict, override: dict, source: str = "<config>", strict: bool = True, _prefix: str = "") -> dict:
    """Deep-merge ``override`` into a copy of ``base``; with ``strict``, keys not in ``base`` are errors.

    Sections whose default is an empty mapping or ``None`` accept any keys (free-form options).
    """
    out = copy.deepcopy(base)
    for key, value in override.items():
        name = f"{_prefix}{key}"
        if strict and key not in base:
            known = ", ".join(sorted(map(str, base))) or "none"
            raise CytoFuseError(f"{source}: unknown option {name!r} (known here: {known})")
        current = base.get(key)
        if isinstance(current, dict) and current and isinstance(value, dict):
            out[key] = merge(current, value, source, strict, f"{name}.")
        else:
            out[key] = copy.deepcopy(value)
    return out


def parse_overrides(pairs: Iterable[str]) -> dict:
    """Turn ``["optimizer.lr=1e-3", "train.epochs=5"]`` into a nested dict (values parsed as YAML)."""
    result: dict = {}
    for pair in pairs:
        if "=" not in pair:
            raise CytoFuseError(f"--set {pair!r}: expected key.path=value")
        key, raw = pair.split("=", 1)
        node = result
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = parse_value(raw)
    return result


def parse_value(raw: str) -> Any:
    """YAML scalar parsing, plus floats like ``1e-3`` that PyYAML's YAML 1.1 rules leave as strings."""
    value = yaml.safe_load(raw)
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value


def load_config(defaults: Union[dict, PathLike], path: Optional[PathLike] = None, overrides: Iterable[str] = ()) -> dict:
    """Defaults (a dict or a YAML path) ← the user's YAML ← ``--set`` overrides."""
    cfg = read_yaml(defaults) if not isinstance(defaults, dict) else copy.deepcopy(defaults)
    if path is not None:
        cfg = merge(cfg, read_yaml(path), str(path))
    extra = parse_overrides(overrides)
    if extra:
        cfg = merge(cfg, extra, "--set")
    return cfg


def set_path(cfg: dict, dotted: str, value: Any) -> dict:
    """Return a copy of ``cfg`` with one dotted key replaced (used by sweeps)."""
    node: dict = {}
    top = node
    parts = dotted.split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = value
    return merge(cfg, top, f"set {dotted}")
