"""Run directories: one ``train`` / ``eval`` / ``judge`` run's folder (:class:`RunDir`), its stage records
(:class:`StageRecords`), and the one place runs a stopped command left open are marked
(:func:`fail_open_runs`).

:class:`RunDir` lays out one run: resolved config, package versions, git revision, an allowlisted
environment summary (never a dump of environment variables), metrics in a schema-versioned long format,
generations, stage records and a log.
"""

from __future__ import annotations

import atexit
import json
import os
import platform
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any, Iterable

from kdbench.errors import DataError
from kdbench.store.artifacts import utc_now
from kdbench.store.files import atomic_write_json, atomic_write_text, json_default, read_jsonl

METRICS_SCHEMA_VERSION = 1

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
    now = json.loads(json.dumps(now, default=json_default))  # the types a config file gives back
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
            "started": previous.get("started", utc_now()),
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
        info.update(status=status, finished=utc_now(), **extra)
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
        body = "".join(json.dumps(r, sort_keys=True, default=json_default) + "\n" for r in existing + records)
        atomic_write_text(self.path / "metrics.jsonl", body)

    def metrics(self) -> list[dict]:
        return read_jsonl(self.path / "metrics.jsonl")

    # -- generations & logs ---------------------------------------------------------------
    def generations_path(self, suite: str, seed: int | str) -> Path:
        return self.path / "generations" / suite / f"seed{seed}.jsonl"

    @property
    def stages(self) -> "StageRecords":
        """This run's stage records (``stages.json``)."""
        return StageRecords(self.path / "stages.json")

    def log(self, message: str) -> None:
        with open(self.path / "log.txt", "a", encoding="utf-8") as handle:
            handle.write(f"{utc_now()} {message}\n")

class StageRecords:
    """``stages.json`` of a run: which stages finished, with their facts (cache paths, reuse, build times,
    settings). A rerun skips nothing by itself — each stage's artifact is reused through the artifact store —
    but the records say what the run was made of."""

    def __init__(self, path: Path):
        self.path = path

    def read(self) -> dict:
        try:
            return json.loads(self.path.read_text())
        except (OSError, ValueError):
            return {}

    def done(self, name: str) -> dict | None:
        return self.read().get(name)

    def mark(self, name: str, facts: dict) -> None:
        data = self.read()
        data[name] = facts
        atomic_write_json(self.path, data)


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
