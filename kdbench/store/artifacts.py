"""Content-addressed artifacts: directories keyed by a hash of their inputs (:class:`ArtifactStore`).

An artifact is built in a temporary directory and renamed into place with a ``COMPLETE.json`` marker
written last, under a file lock, so a killed build is never taken as done and two processes never build
the same artifact twice.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from kdbench.store.files import COMPLETE_MARKER, atomic_write_json, file_lock, fsync_dir, hash_obj


def utc_now() -> str:
    """The current time, UTC, ISO 8601 to the second (run and artifact records)."""
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def default_cache_dir() -> Path:
    """``$KDBENCH_CACHE`` if set, else ``$XDG_CACHE_HOME/kdbench`` or ``~/.cache/kdbench``."""
    if env := os.environ.get("KDBENCH_CACHE"):
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "kdbench"

def kdbench_version() -> str:
    from kdbench.version import __version__

    return __version__

@dataclass(frozen=True)
class Artifact:
    """A finished artifact directory and the metadata written with it."""

    path: Path
    key: str
    kind: str
    meta: dict
    reused: bool

class ArtifactStore:
    """Directories keyed by the hash of their inputs; complete only once the marker is written.

    ``store.get_or_build("teacher", inputs, build)`` returns the finished artifact for ``inputs``,
    calling ``build(tmp_dir)`` only when no complete one exists. ``build`` writes into ``tmp_dir``
    and may return a dict of metadata (timings, counts) saved in the marker. The kdbench version is
    part of every key, so a new release never reuses an artifact an older one built.
    """

    def __init__(self, root: str | os.PathLike | None = None):
        self.root = Path(root).expanduser() if root is not None else default_cache_dir()
        if self.root.exists() and not self.root.is_dir():
            from kdbench.errors import ConfigError

            origin = "the cache folder" if root is not None else (
                "KDBENCH_CACHE" if os.environ.get("KDBENCH_CACHE") else "the default cache folder")
            raise ConfigError(f"{origin} {self.root} is a file; point {origin if root is None else '--cache-dir'} "
                              "to a folder (it is created if missing).")

    def key(self, kind: str, inputs: dict) -> str:
        return hash_obj({"kind": kind, "inputs": inputs, "kdbench": kdbench_version()})[:24]

    def path_for(self, kind: str, key: str) -> Path:
        return self.root / kind / key

    def lookup(self, kind: str, inputs: dict) -> Artifact | None:
        key = self.key(kind, inputs)
        path = self.path_for(kind, key)
        marker = path / COMPLETE_MARKER
        if marker.is_file():
            try:
                meta = json.loads(marker.read_text())
            except (OSError, json.JSONDecodeError):
                return None
            return Artifact(path=path, key=key, kind=kind, meta=meta, reused=True)
        return None

    def get_or_build(
        self, kind: str, inputs: dict, build: Callable[[Path], dict | None], *, log: Callable[[str], None] | None = None
    ) -> Artifact:
        key = self.key(kind, inputs)
        final = self.path_for(kind, key)
        with file_lock(self.root / ".locks" / f"{kind}-{key}.lock"):
            found = self.lookup(kind, inputs)
            if found is not None:
                if log:
                    log(f"reusing cached {kind} artifact {key} ({final})")
                return found
            if final.exists():  # an interrupted build left an incomplete directory: start over
                shutil.rmtree(final)
            tmp = final.parent / f".{key}.building-{os.getpid()}"
            if tmp.exists():
                shutil.rmtree(tmp)
            tmp.mkdir(parents=True)
            if log:
                log(f"building {kind} artifact {key}")
            started = time.time()
            try:
                extra = build(tmp) or {}
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
            meta = {
                "kind": kind,
                "key": key,
                "inputs": inputs,
                "kdbench": kdbench_version(),
                "created": utc_now(),
                "build_seconds": round(time.time() - started, 3),
                **extra,
            }
            atomic_write_json(tmp / COMPLETE_MARKER, meta)
            os.replace(tmp, final)
            fsync_dir(final.parent)
            return Artifact(path=final, key=key, kind=kind, meta=meta, reused=False)

    def entries(self) -> list[Artifact]:
        """Every complete artifact under the root."""
        found = []
        if not self.root.exists():
            return found
        for marker in sorted(self.root.glob(f"*/*/{COMPLETE_MARKER}")):
            try:
                meta = json.loads(marker.read_text())
            except (OSError, json.JSONDecodeError):
                continue
            found.append(Artifact(marker.parent, marker.parent.name, marker.parent.parent.name, meta, True))
        return found

    def kinds(self) -> list[str]:
        """The artifact kinds present in the cache (its sub-folders)."""
        if not self.root.is_dir():
            return []
        return sorted(p.name for p in self.root.iterdir() if p.is_dir() and not p.name.startswith("."))

    def check_kind(self, kind: str | None) -> None:
        """A ``kind`` to clear must be one present in the cache (never a path such as ``..``)."""
        if kind is not None and kind not in self.kinds():
            from kdbench.errors import ConfigError

            raise ConfigError(f"The cache {self.root} has no artifacts of kind {kind!r}; kinds present: "
                              f"{', '.join(self.kinds()) or '(none)'} (see kdbench cache list).")

    def clear(self, kind: str | None = None) -> int:
        """Delete every artifact (of ``kind``, which must be a kind present); returns how many complete
        ones were removed."""
        self.check_kind(kind)
        removed = 0
        targets = [self.root / kind] if kind else [p for p in self.root.glob("*") if p.is_dir()]
        for folder in targets:
            if not folder.exists():
                continue
            removed += sum(1 for _ in folder.glob(f"*/{COMPLETE_MARKER}"))
            shutil.rmtree(folder)
        return removed

