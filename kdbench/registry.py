"""One registry for the declarative files: method recipes, evaluation suites and judge protocols.

The files live in the repository's top-level ``trainers/``, ``tasks/`` and ``judges/`` folders and
ship inside the wheel as package data (``kdbench/_registry/<kind>/``), so an editable checkout and a
plain ``pip install .`` find the same entries. ``KDBENCH_REGISTRY_PATH`` (os.pathsep-separated
folders, each holding ``trainers/`` / ``tasks/`` / ``judges/`` subfolders) adds a user's own entries;
a user entry with the same name overrides the built-in one.

Adding a method is one loss function plus one recipe file; adding a suite is one task file.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

from kdbench.errors import ConfigError

KINDS = ("trainers", "tasks", "judges")
_SINGULAR = {"trainers": "method", "tasks": "suite", "judges": "judge"}


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


@lru_cache(maxsize=None)
def _load(kind: str, roots: tuple[Path, ...]) -> dict[str, Entry]:
    import yaml

    entries: dict[str, Entry] = {}
    for root in roots:
        folder = root / kind
        if not folder.is_dir():
            continue
        for path in sorted(folder.glob("*.yaml")):
            try:
                body = yaml.safe_load(path.read_text()) or {}
            except yaml.YAMLError as err:
                raise ConfigError(f"Registry file {path} is not valid YAML ({err}); fix it or remove it.") from None
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
    return _load(kind, tuple(registry_roots()))


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
