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


class FreeForm(dict):
    """A section whose default is empty (``{}`` or ``None``): it takes any keys, in the merge that fills
    it and in every later one.

    Without the mark, the first layer that fills such a section (a seg config's ``postprocess:
    {min_area: 12}``) would become the known keys of every later layer, so ``--set
    postprocess.threshold=0.4`` or a compare override would be refused as unknown. The consumer of the
    section (e.g. ``segmentation.postprocess.postprocess_config``) checks its keys itself.
    """


def merge(base: dict, override: dict, source: str = "<config>", strict: bool = True, _prefix: str = "") -> dict:
    """Deep-merge ``override`` into a copy of ``base``; with ``strict``, keys not in ``base`` are errors.

    Sections whose default is an empty mapping or ``None`` accept any keys (free-form options), also
    after a layer has filled them in (:class:`FreeForm`).
    """
    free = isinstance(base, FreeForm)
    out = copy.deepcopy(base)
    for key, value in override.items():
        name = f"{_prefix}{key}"
        if strict and not free and key not in base:
            known = ", ".join(sorted(map(str, base))) or "none"
            raise CytoFuseError(f"{source}: unknown option {name!r} (known here: {known})")
        current = base.get(key)
        if isinstance(current, dict) and current and isinstance(value, dict):
            out[key] = merge(current, value, source, strict, f"{name}.")
        elif isinstance(value, dict) and (free or (key in base and current in (None, {}))):
            out[key] = _free_form(value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def _free_form(section: dict) -> FreeForm:
    """A copy of ``section`` with it and every mapping inside it marked free-form."""
    return FreeForm({k: _free_form(v) if isinstance(v, dict) else copy.deepcopy(v) for k, v in section.items()})


def plain(cfg: Any) -> Any:
    """``cfg`` with the free-form marks dropped: plain dicts, for YAML and for comparing with a read-back file."""
    if isinstance(cfg, dict):
        return {k: plain(v) for k, v in cfg.items()}
    if isinstance(cfg, list):
        return [plain(v) for v in cfg]
    return cfg


def dump_yaml(cfg: dict) -> str:
    """A config as YAML, in its own key order (``yaml.safe_dump`` refuses the :class:`FreeForm` marks)."""
    return yaml.safe_dump(plain(cfg), sort_keys=False)


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
        _refuse_empty_mappings(cfg, extra)
        cfg = merge(cfg, extra, "--set")
    return cfg


def _refuse_empty_mappings(cfg: Any, extra: dict, prefix: str = "") -> None:
    """``--set key={}`` over a filled section: mappings merge, so it would change nothing while the user
    meant to clear the section; say so instead of running with the section unchanged."""
    for key, value in extra.items():
        current = cfg.get(key) if isinstance(cfg, dict) else None
        if not isinstance(value, dict) or not isinstance(current, dict) or not current:
            continue
        if not value:
            raise CytoFuseError(f"--set {prefix}{key}={{}}: sections merge, so an empty one changes nothing here; "
                                f"set the keys inside it instead (it holds {', '.join(map(str, current))})")
        _refuse_empty_mappings(current, value, f"{prefix}{key}.")


def set_path(cfg: dict, dotted: str, value: Any) -> dict:
    """Return a copy of ``cfg`` with one dotted key replaced (used by sweeps)."""
    node: dict = {}
    top = node
    parts = dotted.split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = value
    return merge(cfg, top, f"set {dotted}")
