"""Typed configs: dataclasses loaded from YAML and overridden by ``key.sub=value`` arguments.

Every field carries a docstring-like comment in its dataclass; ``describe(cls)`` prints them.
Unknown keys are an error naming the key, so a typo never silently falls back to a default.
Both halves (``pipeline.config.ExtractConfig``, ``trainer.config``) use this machinery.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

T = TypeVar("T")


class ConfigError(ValueError):
    pass


def _field_types(cls) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _is_dataclass_type(tp) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Coerce a YAML/CLI value to the annotated type, with errors that name the key."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        non_none = [a for a in args if a is not type(None)]
        errors = []
        for a in non_none:
            try:
                return _coerce(value, a, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError("; ".join(errors))
    if _is_dataclass_type(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return from_dict(tp, value, prefix=key + ".")
    if origin in (list, tuple):
        if isinstance(value, str):
            value = yaml.safe_load(value) if value.strip().startswith("[") else [value]
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        inner = args[0] if args else Any
        items = [_coerce(v, inner, key) for v in value]
        return tuple(items) if origin is tuple else items
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return dict(value)
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        raise ConfigError(f"{key}: expected true/false, got {value!r}")
    if tp is int:
        bad = isinstance(value, bool) or (isinstance(value, float) and not value.is_integer())
        try:
            if not bad:
                return int(value)
        except (TypeError, ValueError):
            pass
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if tp is float:
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{key}: expected a number, got {value!r}") from None
    if tp is str:
        if value is None:
            raise ConfigError(f"{key}: expected a string, got null")
        return str(value)
    if typing.get_origin(tp) is typing.Literal:
        if value not in args:
            raise ConfigError(f"{key}: expected one of {list(args)}, got {value!r}")
        return value
    return value


def doc(default: Any, text: str):
    """A dataclass field with a default and a one-line description (shown by describe())."""
    if isinstance(default, list | dict):
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata={"doc": text})
    return dataclasses.field(default=default, metadata={"doc": text})


def from_dict(cls: type[T], data: dict, prefix: str = "") -> T:
    types_ = _field_types(cls)
    unknown = [k for k in data if k not in types_]
    if unknown:
        import difflib

        close = difflib.get_close_matches(unknown[0], list(types_), n=1, cutoff=0.5)
        hint = f"did you mean '{prefix}{close[0]}'? " if close else ""
        raise ConfigError(
            f"unknown config key '{prefix}{unknown[0]}' ({hint}known at this level: {', '.join(types_)})"
        )
    kwargs = {k: _coerce(v, types_[k], prefix + k) for k, v in data.items()}
    obj = cls(**kwargs)
    check = getattr(obj, "validate", None)
    if callable(check):
        check()
    return obj


def to_dict(obj) -> dict:
    return json.loads(json.dumps(dataclasses.asdict(obj), default=str))


def _set_path(tree: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for p in parts[:-1]:
        nxt = node.get(p)
        if nxt is None:
            nxt = node[p] = {}
        if not isinstance(nxt, dict):
            raise ConfigError(f"override '{dotted}': '{p}' is not a section")
        node = nxt
    node[parts[-1]] = value


def parse_overrides(overrides: list[str]) -> dict:
    tree: dict = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}' is not key=value")
        key, raw = item.split("=", 1)
        # YAML parsing lets `n=10`, `flag=true`, `templates=[a, b]` mean what they look like.
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError as e:
            raise ConfigError(f"override '{item}': value is not valid YAML ({e.problem})") from None
        _set_path(tree, key.strip(), value)
    return tree


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _merge(out[k], v)
        else:
            out[k] = v
    return out


def load_config(cls: type[T], path: str | Path | None = None, overrides: list[str] = (),
                base: dict | None = None) -> T:
    """Defaults, then ``base`` (e.g. a run's saved config), then the YAML file (if any), then
    ``key.sub=value`` overrides."""
    data: dict = {}
    if path is not None:
        text = Path(path).read_text()
        loaded = yaml.safe_load(text) or {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: top level must be a mapping")
        data = loaded
    data = _merge(data, parse_overrides(list(overrides)))
    defaults = _merge(to_dict(cls()), base or {})
    # Merge onto defaults so nested sections given partially keep their other defaults.
    return from_dict(cls, _merge(defaults, data))


def config_hash(obj_or_dict) -> str:
    d = obj_or_dict if isinstance(obj_or_dict, dict) else to_dict(obj_or_dict)
    return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


def describe(cls, cfg=None) -> list[str]:
    """One line per key: ``key = value  # meaning``, the value resolved in ``cfg`` (default:
    the defaults), ``(default X)`` beside it when they differ. ``--help-config`` prints it."""
    default = to_dict(cls())
    now = to_dict(cfg) if cfg is not None else default
    lines = []

    def walk(c, d_default, d_now, prefix):
        for f in dataclasses.fields(c):
            tp = _field_types(c)[f.name]
            if _is_dataclass_type(tp):
                walk(tp, d_default[f.name], d_now[f.name], prefix + f.name + ".")
                continue
            v, dv = d_now[f.name], d_default[f.name]
            note = f"  (default {dv!r})" if v != dv else ""
            lines.append(f"{prefix}{f.name} = {v!r}{note}  # {f.metadata.get('doc', '')}")

    walk(cls, default, now, "")
    return lines
