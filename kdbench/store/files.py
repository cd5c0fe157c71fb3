"""Crash-safe files: atomic writes, append-only JSONL, file locks and content hashes (the run store's
primitives; :mod:`kdbench.store`).

* :func:`atomic_write_bytes` / :func:`atomic_write_text` / :func:`atomic_write_json`: write to a
  temporary file in the same folder, fsync, then ``os.replace`` it into place. A reader sees the old
  file or the new one, never half of one.
* :func:`append_jsonl` / :func:`read_jsonl`: append one record per line with flush + fsync. A process
  killed mid-append leaves at most one unterminated last line, which :func:`read_jsonl` ignores (a
  record counts only once its newline is on disk).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Iterable, Iterator

from kdbench.errors import DataError

UMASK = os.umask(0)
os.umask(UMASK)
#: Written last into a finished artifact (and left out of its content hash).
COMPLETE_MARKER = "COMPLETE.json"

# ---------------------------------------------------------------------------------------------
# Crash-safe file primitives
# ---------------------------------------------------------------------------------------------

def fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` so that readers see either the old file or all of the new one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~UMASK)  # mkstemp creates 0600; results are meant to be shared
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    fsync_dir(path.parent)
    return path

def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))

def atomic_write_json(path: str | os.PathLike, obj: Any) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=json_default) + "\n")

def json_default(obj: Any) -> Any:
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "tolist"):
        return obj.tolist()
    if hasattr(obj, "item"):
        return obj.item()
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")

def append_jsonl(path: str | os.PathLike, records: dict | Iterable[dict]) -> None:
    """Append one record (or several) as JSON lines, flushed and fsynced before returning."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(records, dict):
        records = [records]
    payload = "".join(json.dumps(r, sort_keys=True, default=json_default) + "\n" for r in records)
    if not payload:
        return
    _drop_torn_tail(path)
    with open(path, "a", encoding="utf-8") as handle:
        handle.write(payload)
        handle.flush()
        os.fsync(handle.fileno())

def _drop_torn_tail(path: Path) -> None:
    """Cut an unterminated last line (an append killed midway) so the next record starts on its own line."""
    try:
        with open(path, "rb+") as handle:
            size = handle.seek(0, os.SEEK_END)
            if size == 0:
                return
            handle.seek(size - 1)
            if handle.read(1) == b"\n":
                return
            block = 1 << 16
            position = size
            while position > 0:  # find the last newline, reading backwards
                start = max(0, position - block)
                handle.seek(start)
                chunk = handle.read(position - start)
                newline = chunk.rfind(b"\n")
                if newline >= 0:
                    handle.truncate(start + newline + 1)
                    return
                position = start
            handle.truncate(0)
    except FileNotFoundError:
        return

def read_jsonl(path: str | os.PathLike, *, strict: bool = False) -> list[dict]:
    """Read JSON lines written by :func:`append_jsonl` (or given by a user, through
    :func:`kdbench.textfile.iter_lines`: BOM, CRLF and non-UTF-8 bytes handled there).

    A final line without its newline is a record whose write was interrupted: it is ignored
    (``strict=False``, the default for kdbench's own files). With ``strict=True`` (user data),
    every non-empty line must parse, and an error names the file and line.
    """
    from kdbench.textfile import iter_lines, parse_json_line

    path = Path(path)
    if not path.exists():
        if strict:
            raise DataError(f"File not found: {path}; check the path and try again.")
        return []
    records = []
    for number, line, terminated in iter_lines(path):
        if not line.strip():
            continue
        if strict:
            records.append(parse_json_line(path, number, line))
        elif terminated:
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue  # a torn write in the middle of our own file cannot happen with append_jsonl; skip it
    return records

@contextlib.contextmanager
def file_lock(path: str | os.PathLike) -> Iterator[None]:
    """An advisory inter-process lock (``fcntl.flock``) on ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)

# ---------------------------------------------------------------------------------------------
# Hashing
# ---------------------------------------------------------------------------------------------

def canonical_json(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=json_default)

def hash_obj(obj: Any) -> str:
    """sha256 of the canonical JSON of ``obj``."""
    return hashlib.sha256(canonical_json(obj).encode("utf-8")).hexdigest()

def hash_file(path: str | os.PathLike, chunk_bytes: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(chunk_bytes):
            digest.update(chunk)
    return digest.hexdigest()

def hash_tree(path: str | os.PathLike, suffixes: tuple[str, ...] | None = None) -> str:
    """sha256 over the relative names and contents of the files below ``path`` (sorted)."""
    root = Path(path)
    if root.is_file():
        return hash_file(root)
    digest = hashlib.sha256()
    for file in sorted(p for p in root.rglob("*") if p.is_file()):
        if suffixes and file.suffix not in suffixes:
            continue
        if file.name == COMPLETE_MARKER:
            continue
        digest.update(str(file.relative_to(root)).encode())
        digest.update(hash_file(file).encode())
    return digest.hexdigest()

# ---------------------------------------------------------------------------------------------
# Content-addressed artifacts
# ---------------------------------------------------------------------------------------------

