"""The run store: crash-safe files, content-addressed artifacts, and self-describing run directories.

Every piece of resumable work in kdbench goes through the three primitives here:

* :func:`atomic_write_bytes` / :func:`atomic_write_text` / :func:`atomic_write_json`: write to a
  temporary file in the same folder, fsync, then ``os.replace`` it into place. A reader sees the old
  file or the new one, never half of one.
* :func:`append_jsonl` / :func:`read_jsonl`: append one record per line with flush + fsync. A process
  killed mid-append leaves at most one unterminated last line, which :func:`read_jsonl` ignores (a
  record counts only once its newline is on disk).
* :class:`ArtifactStore`: directories keyed by a hash of their inputs (the config that produced them,
  the kdbench version, tokenizer hashes ...). An artifact is built in a temporary directory and renamed
  into place with a ``COMPLETE.json`` marker written last, so a killed build is never taken as done.

:class:`RunDir` lays out one ``train``/``eval`` run: resolved config, package versions, git revision,
an allowlisted environment summary (never a dump of environment variables), metrics in a
schema-versioned long format, generations and a log.
"""

from __future__ import annotations

import atexit
import contextlib
import datetime as _dt
import fcntl
import hashlib
import json
import os
import platform
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

from kdbench.errors import DataError

METRICS_SCHEMA_VERSION = 1
_UMASK = os.umask(0)
os.umask(_UMASK)
COMPLETE_MARKER = "COMPLETE.json"

# ---------------------------------------------------------------------------------------------
# Crash-safe file primitives
# ---------------------------------------------------------------------------------------------

def _fsync_dir(path: Path) -> None:
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
        os.fchmod(fd, 0o666 & ~_UMASK)  # mkstemp creates 0600; results are meant to be shared
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)
    return path

def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))

def atomic_write_json(path: str | os.PathLike, obj: Any) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=_json_default) + "\n")

def _json_default(obj: Any) -> Any:
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
    payload = "".join(json.dumps(r, sort_keys=True, default=_json_default) + "\n" for r in records)
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
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=_json_default)

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
                "created": _now(),
                "build_seconds": round(time.time() - started, 3),
                **extra,
            }
            atomic_write_json(tmp / COMPLETE_MARKER, meta)
            os.replace(tmp, final)
            _fsync_dir(final.parent)
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

# ---------------------------------------------------------------------------------------------
# Run directories
# ---------------------------------------------------------------------------------------------

# Environment variables whose *values* may go into a run's env summary. Anything else (API keys,
# tokens, proxies ...) is never written; for a few we only record whether they are set.
_ENV_VALUE_ALLOWLIST = (
    "OMP_NUM_THREADS",
    "MKL_NUM_THREADS",
    "CUDA_VISIBLE_DEVICES",
    "WORLD_SIZE",
    "LOCAL_RANK",
    "RANK",
    "HF_HUB_OFFLINE",
    "TRANSFORMERS_OFFLINE",
    "HF_DATASETS_OFFLINE",
    "KDBENCH_DATA",
    "CI",
)
_ENV_PRESENCE_ONLY = ("OPENAI_API_KEY", "OPENAI_BASE_URL", "KDBENCH_JUDGE_API_KEY", "HF_TOKEN")

def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")

def package_versions(names: Iterable[str] = ("kdbench", "torch", "transformers", "accelerate", "tokenizers",
                                            "datasets", "rouge-score", "lm-eval", "openai", "numpy")) -> dict:
    from importlib import metadata

    versions = {"python": platform.python_version()}
    for name in names:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return versions

def git_revision(start: str | os.PathLike | None = None) -> str | None:
    """The git commit of the kdbench source tree (with ``-dirty`` when modified), if it is a checkout."""
    here = Path(start) if start else Path(__file__).resolve().parent
    try:
        rev = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5)
        if rev.returncode != 0:
            return None
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                               capture_output=True, text=True, timeout=5)
        return rev.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return None

def environment_summary() -> dict:
    """Machine and process facts a reader needs to interpret timings; never secret values."""
    import multiprocessing

    summary = {
        "hostname": socket.gethostname(),
        "platform": platform.platform(),
        "machine": platform.machine(),
        "cpu_count": multiprocessing.cpu_count(),
        "python_executable": sys.executable,
        "env": {k: os.environ[k] for k in _ENV_VALUE_ALLOWLIST if k in os.environ},
        "env_set": sorted(k for k in _ENV_PRESENCE_ONLY if os.environ.get(k)),
    }
    try:
        import torch

        summary["torch_threads"] = torch.get_num_threads()
        summary["cuda"] = torch.cuda.is_available()
    except ImportError:  # pragma: no cover - torch is a hard dependency
        pass
    return summary

# Per run kind, the settings a rerun may change without changing what the run computes (where files go,
# logging, batch sizes of generation). Any other difference refuses the rerun, so a resumed run never
# mixes two configurations and its config.yaml is never rewritten to values it did not use. (Eval runs
# compare the settings that decide their generations instead: kdbench.evaluate.)
RERUN_MAY_CHANGE: dict[str, tuple[str, ...]] = {
    "train": ("output_dir", "run_name", "cache_dir", "report_to", "logging_steps", "save_total_limit",
              "generation_batch_size"),
}


def changed_settings(before: dict, now: dict, *, ignore: Iterable[str] = (), prefix: str = "") -> list[str]:
    """``"name X then, Y now"`` for every setting that differs between two configs (nested sections as
    ``params.kd_ratio``); a setting absent on one side and None on the other is not a difference."""
    now = json.loads(json.dumps(now, default=_json_default))  # the types a config file gives back
    ignore = set(ignore)
    changes = []
    for key in sorted(set(before) | set(now), key=str):
        if not prefix and key in ignore:
            continue
        old, new = before.get(key), now.get(key)
        if isinstance(old, dict) and isinstance(new, dict):
            changes += changed_settings(old, new, prefix=f"{prefix}{key}.")
        elif old != new and not (isinstance(old, (int, float)) and isinstance(new, (int, float))
                                 and not isinstance(old, bool) and float(old) == float(new)):
            changes.append(f"{prefix}{key} {old!r} then, {new!r} now")
    return changes


class RunDir:
    """One run's directory.

    Layout::

        run.json            identity, command, status ("running" -> "complete", "failed" or "interrupted";
                            a failed run also records the error sentence), timings
        config.yaml         the resolved configuration
        env.json            package versions, git revision, allowlisted environment summary
        metrics.jsonl       long-format metrics, one record per run x suite x metric x seed x subset
        generations/<suite>/seed<k>.jsonl
        log.txt             the run's log
        cost.json           wall time, tokens, peak memory (training runs)
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)

    # -- creation -------------------------------------------------------------------------
    @classmethod
    def create(cls, root: str | os.PathLike, name: str, *, kind: str, config: dict, command: list[str] | None = None,
               exist_ok: bool = True) -> "RunDir":
        """Create (or reopen, for resuming) the run directory ``root/name``."""
        run = cls(Path(root) / name)
        if kind in RERUN_MAY_CHANGE and (run.path / "run.json").is_file() and (run.path / "config.yaml").is_file():
            changed = changed_settings(run.config(), config, ignore=RERUN_MAY_CHANGE[kind])
            if changed:
                from kdbench.errors import ConfigError

                raise ConfigError(
                    f"Run {run.path} was started with other settings ({'; '.join(changed)}); rerun without those "
                    "changes to resume it, or give a new --run-name to start a new run with them.")
        run.path.mkdir(parents=True, exist_ok=exist_ok)
        previous = run.info() if (run.path / "run.json").exists() else {}
        info = {
            "run_id": name,
            "kind": kind,
            # a finished run stays finished when reopened (callers check ``complete`` to skip work)
            "status": "complete" if previous.get("status") == "complete" else "running",
            "started": previous.get("started", _now()),
            "resumed": bool(previous),
            "command": command if command is not None else previous.get("command"),
        }
        atomic_write_json(run.path / "run.json", info)
        if info["status"] == "running":
            _OPEN_RUNS[run.path.resolve()] = run
        run.write_config(config)
        atomic_write_json(
            run.path / "env.json",
            {"versions": package_versions(), "git_revision": git_revision(), "machine": environment_summary()},
        )
        return run

    @property
    def run_id(self) -> str:
        return self.info().get("run_id", self.path.name)

    def info(self) -> dict:
        try:
            return json.loads((self.path / "run.json").read_text())
        except (OSError, json.JSONDecodeError):
            return {}

    def write_config(self, config: dict) -> None:
        import yaml

        atomic_write_text(self.path / "config.yaml", yaml.safe_dump(config, sort_keys=False))

    def config(self) -> dict:
        import yaml

        path = self.path / "config.yaml"
        return yaml.safe_load(path.read_text()) if path.exists() else {}

    def finish(self, status: str = "complete", **extra: Any) -> None:
        """Record the run's end: ``complete``, ``failed`` (with ``error=`` the sentence shown) or
        ``interrupted``. A later run of the same command resumes a failed or interrupted run."""
        info = self.info()
        if status == "complete":
            info.pop("error", None)
        info.update(status=status, finished=_now(), **extra)
        atomic_write_json(self.path / "run.json", info)
        _OPEN_RUNS.pop(self.path.resolve(), None)

    @property
    def complete(self) -> bool:
        return self.info().get("status") == "complete"

    # -- metrics ------------------------------------------------------------------------
    def metric_record(self, suite: str, metric: str, value: float, *, seed: int | str | None = None,
                      subset: str = "all", n: int | None = None, **extra: Any) -> dict:
        return {
            "schema": METRICS_SCHEMA_VERSION,
            "run": self.run_id,
            "suite": suite,
            "metric": metric,
            "seed": seed,
            "subset": subset,
            "value": float(value),
            "n": n,
            **extra,
        }

    def write_metrics(self, records: list[dict], *, replace_suite: str | None = None) -> None:
        """Write metric records. With ``replace_suite``, earlier records of that suite are replaced
        atomically (a re-evaluation never leaves two versions of a number)."""
        existing = self.metrics()
        if replace_suite is not None:
            existing = [r for r in existing if r.get("suite") != replace_suite]
        body = "".join(json.dumps(r, sort_keys=True, default=_json_default) + "\n" for r in existing + records)
        atomic_write_text(self.path / "metrics.jsonl", body)

    def metrics(self) -> list[dict]:
        return read_jsonl(self.path / "metrics.jsonl")

    # -- generations & logs ---------------------------------------------------------------
    def generations_path(self, suite: str, seed: int | str) -> Path:
        return self.path / "generations" / suite / f"seed{seed}.jsonl"

    def log(self, message: str) -> None:
        with open(self.path / "log.txt", "a", encoding="utf-8") as handle:
            handle.write(f"{_now()} {message}\n")

# Runs this process opened (status "running") and has not finished yet: when a command stops with an
# error, :func:`fail_open_runs` marks each of them, so no run is left "running" by a command that ended.
_OPEN_RUNS: dict[Path, RunDir] = {}

def fail_open_runs(reason: str, *, status: str = "failed") -> list[RunDir]:
    """Mark every run this process opened and did not finish as ``status`` (``failed``, with ``reason`` as
    its ``error``, or ``interrupted``); returns them. The one place a stopped command's runs are marked:
    the CLI's error boundary calls it, and so does an exit of the interpreter (library use)."""
    marked = []
    for run in list(_OPEN_RUNS.values()):
        try:
            if run.info().get("status") == "running":
                run.finish(status, **({"error": reason} if status == "failed" else {}))
                marked.append(run)
        except OSError:  # the folder is gone (a temporary directory already removed)
            pass
        _OPEN_RUNS.pop(run.path.resolve(), None)
    return marked


def _fail_open_runs_at_exit() -> None:
    fail_open_runs("the process ended before the run finished")


atexit.register(_fail_open_runs_at_exit)


def find_run_dirs(paths: Iterable[str | os.PathLike]) -> list[RunDir]:
    """Run directories at or below ``paths`` (a path with run.json is a run; otherwise search below it)."""
    runs: list[RunDir] = []
    for raw in paths:
        path = Path(raw)
        if not path.exists():
            raise DataError(f"Run directory not found: {path}; pass a directory written by kdbench train/eval/demo.")
        if (path / "run.json").exists():
            runs.append(RunDir(path))
            continue
        for marker in sorted(path.rglob("run.json")):
            runs.append(RunDir(marker.parent))
    return runs
