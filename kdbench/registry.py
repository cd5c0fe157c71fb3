"""One registry for the declarative files: method recipes, evaluation suites and judge protocols.

The files live in the repository's top-level ``trainers/``, ``tasks/`` and ``judges/`` folders and
ship inside the wheel as package data (``kdbench/_registry/<kind>/``), so an editable checkout and a
plain ``pip install .`` find the same entries. ``KDBENCH_REGISTRY_PATH`` (os.pathsep-separated
folders, each holding ``trainers/`` / ``tasks/`` / ``judges/`` subfolders) adds a user's own entries;
a user entry with the same name overrides the built-in one.

Adding a method is one loss function plus one recipe file; adding a suite is one task file.

Every file of a kind with a schema (:data:`kdbench.registry_schemas.SCHEMAS`: ``trainers``, ``tasks``, ``judges``)
is validated when the kind is loaded: an unknown key, a missing required key or a value of the wrong
type is one :class:`~kdbench.errors.ConfigError` sentence naming the file and the key. The mechanism
(:class:`~kdbench.schema.Schema`, :class:`~kdbench.schema.Key`) lives in :mod:`kdbench.schema`, so a
new kind only adds its schema to that table.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

from kdbench.errors import ConfigError
from kdbench.registry_schemas import SCHEMAS
from kdbench.schema import FileSchema, Key, Schema  # noqa: F401 - the schema mechanism, re-exported

KINDS = ("trainers", "tasks", "judges", "reproductions")
_SINGULAR = {"trainers": "method", "tasks": "suite", "judges": "judge", "reproductions": "reproduction"}


@dataclass(frozen=True)
class Entry:
    """A registry entry: its name, one-line description, source file and parsed body."""

    kind: str
    name: str
    description: str
    path: Path
    body: dict = field(hash=False, compare=False)
    alias_of: str | None = None


def registry_roots() -> list[Path]:
    """Folders searched, lowest priority first."""
    package = Path(__file__).resolve().parent
    roots = []
    installed = package / "_registry"
    if installed.is_dir():
        roots.append(installed)
    else:  # a source checkout (editable install or PYTHONPATH)
        roots.append(package.parent)
    for extra in filter(None, os.environ.get("KDBENCH_REGISTRY_PATH", "").split(os.pathsep)):
        roots.append(Path(extra).expanduser())
    return roots


def _files(kind: str, roots: tuple[Path, ...]) -> tuple[tuple[Path, int, int], ...]:
    """The kind's files with their modification time and size (the cache key: an edited file is reread)."""
    found = []
    for root in roots:
        folder = root / kind
        if folder.is_dir():
            for path in sorted(folder.glob("*.yaml")):
                stat = path.stat()
                found.append((path, stat.st_mtime_ns, stat.st_size))
    return tuple(found)


@lru_cache(maxsize=64)
def _load(kind: str, files: tuple[tuple[Path, int, int], ...]) -> dict[str, Entry]:
    import yaml

    entries: dict[str, Entry] = {}
    schema = SCHEMAS.get(kind)
    for path, _, _ in files:
        try:
            body = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as err:
            reason = str(err).splitlines()[0]
            raise ConfigError(f"Registry file {path} is not valid YAML ({reason}); fix it or remove it.") from None
        except (OSError, UnicodeDecodeError) as err:
            raise ConfigError(f"Registry file {path} cannot be read ({type(err).__name__}); fix it or remove it.") from None
        if not isinstance(body, dict):
            raise ConfigError(f"Registry file {path} must hold a mapping of keys; fix it or remove it.")
        if schema is not None:
            schema.validate(body, path)
        name = body.get("name", path.stem)
        entries[name] = Entry(kind, name, str(body.get("description", "")).strip(), path, body)
        # a recipe may declare named aliases with parameter overrides (one file, several methods)
        for alias, spec in (body.get("aliases") or {}).items():
            spec = spec or {}
            entries[alias] = Entry(kind, alias, str(spec.get("description", "")).strip(), path,
                                   {**body, "name": alias, "params": {**(body.get("params") or {}),
                                                                      **(spec.get("params") or {})}},
                                   alias_of=name)
    return entries


def entries(kind: str) -> dict[str, Entry]:
    if kind not in KINDS:
        raise ValueError(f"unknown registry kind {kind!r}")
    return _load(kind, _files(kind, tuple(registry_roots())))


def get(kind: str, name: str) -> Entry:
    """The entry ``name`` of ``kind``, or a ConfigError listing the valid names."""
    found = entries(kind)
    if name not in found:
        raise ConfigError(
            f"Unknown {_SINGULAR[kind]} {name!r}; choose one of: {', '.join(sorted(found)) or '(none installed)'}."
        )
    return found[name]


def names(kind: str) -> list[str]:
    return sorted(entries(kind))
