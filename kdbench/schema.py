"""Schemas for the declarative registry files: every key documented, typed and consumed.

A :class:`Schema` lists the keys a mapping may hold, each a :class:`Key` with the accepted value
types, a help text, and what its value contains (a nested mapping, a list, a mapping with free
names). :meth:`Schema.validate` walks a parsed YAML body and raises one
:class:`~kdbench.errors.ConfigError` sentence naming the file and the dotted key for the first key
it does not know or the first value of the wrong type. A :class:`FileSchema` picks the schema of a
file from a discriminating key (a task file's ``type``, a judge file's ``kind``).

The registry (:mod:`kdbench.registry`) validates every file it loads against the schema of its
kind, so a typo in a user's task file fails at once instead of being ignored.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

from kdbench.errors import ConfigError

_TYPE_NAMES = {str: "a string", int: "an integer", float: "a number", bool: "true or false", list: "a list",
               dict: "a mapping", type(None): "empty"}


@dataclass(frozen=True)
class Key:
    """One documented key: accepted value ``types``, ``help``, and the shape of what it holds.

    * ``keys``: the value is a mapping validated by this schema;
    * ``items``: the value is a list whose items are validated by this schema or key;
    * ``values``: the value is a mapping with free names whose values follow this schema or key;
    * ``choices``: the allowed values (or a function returning them, evaluated at validation time);
    * ``check``: a function returning an error phrase (``"must be a valid regular expression"``) or None.
    """

    types: tuple[type, ...] = (object,)
    help: str = ""
    required: bool = False
    keys: "Schema | None" = None
    items: "Schema | Key | None" = None
    values: "Schema | Key | None" = None
    choices: tuple | Callable[[], Iterable] | None = None
    check: Callable[[Any], str | None] | None = None

    def validate(self, value: Any, file: Path | str, where: str) -> None:
        if value is None and type(None) not in self.types and not self.required and object not in self.types:
            return  # an empty optional key means "not set"
        if object not in self.types and not _is_instance(value, self.types):
            raise ConfigError(f"Registry file {file}: key {where!r} must be {_describe(self.types)}, not "
                              f"{_short(value)}; fix the file.")
        if self.choices is not None:
            allowed = tuple(self.choices() if callable(self.choices) else self.choices)
            for item in (value if isinstance(value, list) else [value]):
                if item not in allowed:
                    raise ConfigError(f"Registry file {file}: key {where!r} has the unknown value {item!r}; use "
                                      f"one of: {', '.join(map(str, allowed))}.")
        if self.check is not None:
            problem = self.check(value)
            if problem:
                raise ConfigError(f"Registry file {file}: key {where!r} {problem}; fix the file.")
        if self.keys is not None and isinstance(value, dict):
            self.keys.validate(value, file, where)
        if self.items is not None and isinstance(value, list):
            for index, item in enumerate(value):
                _validate_part(self.items, item, file, f"{where}[{index}]")
        if self.values is not None and isinstance(value, dict):
            for name, item in value.items():
                _validate_part(self.values, item, file, f"{where}.{name}")


@dataclass(frozen=True)
class Schema:
    """The keys a mapping may hold (see :class:`Key`); ``open`` allows keys not listed (not recommended);
    ``check(body)``: a check of the whole mapping once its keys are valid, returning the problem as the end of
    a sentence (``"unknown key 'params.x'; valid keys here are ..."``) or None."""

    keys: Mapping[str, Key] = field(default_factory=dict)
    open: bool = False
    check: Callable[[dict], str | None] | None = None

    def validate(self, body: Any, file: Path | str, where: str = "") -> None:
        """Raise one ConfigError sentence for the first unknown key, missing required key or bad value."""
        if not isinstance(body, dict):
            raise ConfigError(f"Registry file {file}: {('key ' + repr(where)) if where else 'the file'} must be a "
                              f"mapping of keys, not {_short(body)}; fix the file.")
        if not self.open:
            for name in body:
                if name not in self.keys:
                    dotted = f"{where}.{name}" if where else str(name)
                    raise ConfigError(f"Registry file {file}: unknown key {dotted!r}; valid keys here are "
                                      f"{', '.join(self.keys) or '(none)'}.")
        for name, key in self.keys.items():
            dotted = f"{where}.{name}" if where else name
            if name not in body:
                if key.required:
                    raise ConfigError(f"Registry file {file}: key {dotted!r} is missing; add it ({key.help}).")
                continue
            key.validate(body[name], file, dotted)
        if self.check is not None:
            problem = self.check(body)
            if problem:
                raise ConfigError(f"Registry file {file}: {problem}")

    def describe(self, indent: str = "") -> list[str]:
        """One line per key (nested keys indented): the documentation of a file kind."""
        lines = []
        for name, key in self.keys.items():
            lines.append(f"{indent}{name}{' (required)' if key.required else ''}: {key.help}")
            for nested in (key.keys, key.items, key.values):
                if isinstance(nested, Schema):
                    lines += nested.describe(indent + "  ")
        return lines


@dataclass(frozen=True)
class FileSchema:
    """The schemas of one registry kind, chosen by the value of ``discriminator`` in each file."""

    discriminator: str
    schemas: Mapping[str, Schema]

    def schema_for(self, body: dict, file: Path | str) -> Schema:
        value = body.get(self.discriminator) if isinstance(body, dict) else None
        if value not in self.schemas:
            raise ConfigError(f"Registry file {file}: key {self.discriminator!r} must be one of "
                              f"{', '.join(self.schemas)}, not {value!r}; fix the file.")
        return self.schemas[value]

    def validate(self, body: Any, file: Path | str) -> None:
        if not isinstance(body, dict):
            raise ConfigError(f"Registry file {file} must hold a mapping of keys; fix the file.")
        self.schema_for(body, file).validate(body, file)


def _validate_part(part: "Schema | Key", value: Any, file, where: str) -> None:
    if isinstance(part, Schema):
        part.validate(value, file, where)
    else:
        part.validate(value, file, where)


def _is_instance(value: Any, types: tuple[type, ...]) -> bool:
    if isinstance(value, bool) and bool not in types:
        return False  # YAML true is not a number here
    if isinstance(value, int) and float in types:
        return True
    return isinstance(value, types)


def _describe(types: tuple[type, ...]) -> str:
    return " or ".join(_TYPE_NAMES.get(t, t.__name__) for t in types)


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


# --- common keys and checks ------------------------------------------------------------------------


def regex_check(value: Any) -> str | None:
    """A ``check`` for regular expressions (a string, or a list of them)."""
    for pattern in (value if isinstance(value, list) else [value]):
        try:
            re.compile(str(pattern))
        except re.error as err:
            return f"holds an invalid regular expression {pattern!r} ({err})"
    return None


def text(help: str, *, required: bool = False, choices=None) -> Key:
    return Key((str,), help, required=required, choices=choices)


def number(help: str, *, required: bool = False) -> Key:
    return Key((int, float), help, required=required)


def integer(help: str, *, required: bool = False) -> Key:
    return Key((int,), help, required=required)


def flag(help: str, *, required: bool = False) -> Key:
    return Key((bool,), help, required=required)


def text_list(help: str, *, required: bool = False, choices=None) -> Key:
    return Key((list,), help, required=required, items=Key((str,), help), choices=choices)


def mapping(help: str, keys: dict[str, Key] | None = None, *, required: bool = False, values=None) -> Key:
    return Key((dict,), help, required=required, keys=Schema(keys) if keys is not None else None, values=values)


NAME = text("Name of the entry (default: the file name without .yaml).")
DESCRIPTION = text("One-line description shown by `kdbench list`.", required=True)

__all__ = ["Key", "Schema", "FileSchema", "regex_check", "text", "number", "integer", "flag", "text_list",
           "mapping", "NAME", "DESCRIPTION"]
