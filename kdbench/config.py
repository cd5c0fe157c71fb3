"""Typed configuration: dataclasses with help text and validation, loaded from YAML and overridden
from the command line with ``--set section.field=value``.

Every config class is a dataclass whose fields carry ``metadata={"help": ...}`` and whose
``__post_init__`` validates ranges (raising :class:`~kdbench.errors.ConfigError`), in the style of
TRL's ``*Config`` classes. :func:`build` turns nested dicts into nested dataclasses, rejecting
unknown keys by name.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

from kdbench.errors import ConfigError

T = TypeVar("T")


def option(default: Any = dataclasses.MISSING, help: str = "", *, factory: Any = dataclasses.MISSING) -> Any:
    """A dataclass field with help text."""
    if factory is not dataclasses.MISSING:
        return dataclasses.field(default_factory=factory, metadata={"help": help})
    return dataclasses.field(default=default, metadata={"help": help})


def _strip_optional(tp: Any) -> tuple[Any, bool]:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return tp, False


def _coerce(value: Any, tp: Any, where: str) -> Any:
    tp, optional = _strip_optional(tp)
    if value is None:
        if optional or tp is Any:
            return None
        raise ConfigError(f"Setting {where} may not be empty; give it a value.")
    if dataclasses.is_dataclass(tp) and isinstance(tp, type):
        if not isinstance(value, dict):
            raise ConfigError(f"Setting {where} must be a mapping of its fields, not {value!r}.")
        return build(tp, value, prefix=where)
    origin = typing.get_origin(tp)
    try:
        if tp is bool:
            if isinstance(value, str):
                if value.lower() in ("true", "1", "yes", "on"):
                    return True
                if value.lower() in ("false", "0", "no", "off"):
                    return False
                raise ValueError
            return bool(value)
        if tp is int:
            if isinstance(value, float) and not value.is_integer():
                raise ValueError
            return int(value)
        if tp is float:
            return float(value)
        if tp is str:
            return str(value)
        if tp is Path:
            return Path(value)
        if origin in (list, tuple):
            (inner, *_) = typing.get_args(tp) or (Any,)
            if isinstance(value, str):
                value = [v for v in value.split(",") if v.strip()]
            items = [_coerce(v, inner, f"{where}[{i}]") for i, v in enumerate(value)]
            return items if origin is list else tuple(items)
        if origin is dict or tp is dict:
            if not isinstance(value, dict):
                raise ValueError
            return dict(value)
        if origin is typing.Literal:
            allowed = typing.get_args(tp)
            if value not in allowed:
                raise ConfigError(f"Setting {where} must be one of {', '.join(map(str, allowed))}, not {value!r}.")
            return value
    except (TypeError, ValueError):
        raise ConfigError(f"Setting {where} must be of type {getattr(tp, '__name__', tp)}, not {value!r}.") from None
    return value


def build(cls: type[T], values: dict | None, prefix: str = "") -> T:
    """Instantiate dataclass ``cls`` from a (nested) dict, rejecting unknown keys by name."""
    values = dict(values or {})
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        where = f"{prefix}." if prefix else ""
        raise ConfigError(
            f"Unknown setting {where}{unknown[0]}; valid settings here are: {', '.join(sorted(fields))}."
        )
    kwargs = {name: _coerce(value, hints[name], f"{prefix}.{name}" if prefix else name) for name, value in values.items()}
    return cls(**kwargs)


def to_dict(obj: Any) -> Any:
    """A dataclass (tree) as plain YAML-friendly data."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    if isinstance(obj, Path):
        return str(obj)
    return obj


def parse_override(text: str) -> tuple[list[str], Any]:
    """``"trainer.lr=1e-4"`` -> (["trainer", "lr"], 1e-4); the value is parsed as YAML."""
    import yaml

    if "=" not in text:
        raise ConfigError(f"Override {text!r} must look like key=value, e.g. --set lr=1e-4.")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"Override {text!r} has no key; write it as key=value.")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    # YAML reads 1e-4 as a string (no dot): accept plain floats too
    if isinstance(value, str):
        try:
            value = float(value) if any(c in value.lower() for c in ".e") else value
        except ValueError:
            pass
    return key.split("."), value


def apply_overrides(values: dict, overrides: list[str] | None, *, drop_prefix: str | None = None) -> dict:
    """Apply ``key.sub=value`` overrides to a nested dict (a copy)."""
    import copy

    result = copy.deepcopy(values)
    for text in overrides or []:
        path, value = parse_override(text)
        if drop_prefix and path[0] == drop_prefix and len(path) > 1:
            path = path[1:]
        node = result
        for part in path[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"Override {text!r} sets a field inside {part!r}, which is not a section.")
        node[path[-1]] = value
    return result


def load_yaml(path: str | Path | None) -> dict:
    import yaml

    if path is None:
        return {}
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"Config file not found: {path}; check the path.")
    from kdbench.textfile import read_text

    try:
        data = yaml.safe_load(read_text(path)) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"Config file {path} is not valid YAML ({str(err).splitlines()[0]}); fix it.") from None
    if not isinstance(data, dict):
        raise ConfigError(f"Config file {path} must hold a mapping of settings.")
    return data


def describe(cls: type) -> list[tuple[str, str, str]]:
    """(name, default, help) for each field of ``cls``, for ``--help``-style listings."""
    rows = []
    for f in dataclasses.fields(cls):
        default = f.default if f.default is not dataclasses.MISSING else (
            "(computed)" if f.default_factory is dataclasses.MISSING else f.default_factory())
        rows.append((f.name, repr(default), f.metadata.get("help", "")))
    return rows
