"""Judge runs in the run store: the same run directory as ``kdbench eval`` writes, read by the same report.

A judge run (``kind: judge``) holds ``run.json`` (status, label, protocol, judge, the judge snapshots the
endpoint reported), ``config.yaml`` (the resolved settings; URLs without credentials, never a key),
``env.json``, ``judgments.jsonl`` (every judgment, FastChat / AlpacaEval format), ``metrics.jsonl`` (long-format
records with one set of keys for every protocol: ``suite``, ``metric``, ``subset``, ``value``, ``n``, and
``label`` / ``judge`` / ``protocol``, plus ``stderr``, ``wins`` / ``ties`` / ``losses`` and ``n_failed`` where
they apply) and ``cost.json`` (judge calls, tokens, estimated cost). A run that stops with an error is
marked ``failed``; nothing is written before the inputs are checked.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from kdbench.errors import ConfigError
from kdbench.store import RunDir, atomic_write_json, atomic_write_text


def open_run(out: str | Path, *, protocol: str, config: dict, command: list[str] | None = None) -> RunDir:
    """Create (or reopen) the judge run directory ``out``."""
    path = Path(out).expanduser()
    if path.exists() and not path.is_dir():
        raise ConfigError(f"--out {path} is a file; pass a folder for the judge run.")
    if path.is_dir() and any(path.iterdir()) and not (path / "run.json").is_file():
        raise ConfigError(f"--out {path} is a folder that holds other files; pass a new or empty folder (or an "
                          "earlier judge run to redo it).")
    return RunDir.create(path.parent, path.name, kind="judge", config={"protocol": protocol, **config},
                         command=command if command is not None else sys.argv)


def finish_run(run: RunDir, *, judgments: list[dict], metrics: list[dict], usage: dict | None, **info) -> None:
    """Write the judgments, the metric records (replacing earlier ones) and the cost; mark the run complete."""
    atomic_write_text(run.path / "judgments.jsonl",
                      "".join(json.dumps(r, sort_keys=True, default=str) + "\n" for r in judgments))
    atomic_write_text(run.path / "metrics.jsonl",
                      "".join(json.dumps(r, sort_keys=True, default=str) + "\n" for r in metrics))
    if usage is not None:
        atomic_write_json(run.path / "cost.json", {"judge": usage})
    run.finish("complete", **info)


def fail_run(run: RunDir | None, err: BaseException) -> None:
    """Mark a run that stopped with an error ``failed`` (with the one-sentence reason)."""
    if run is not None:
        reason = str(err) if str(err) else type(err).__name__
        run.finish("failed", error=reason[:500])


class failing:
    """``with failing(run_holder): ...`` marks the run in ``run_holder["run"]`` failed when the block raises."""

    def __init__(self, holder: dict):
        self.holder = holder

    def __enter__(self):
        return self.holder

    def __exit__(self, kind, err, traceback):
        if err is not None:
            fail_run(self.holder.get("run"), err if isinstance(err, BaseException) else Exception(str(err)))
        return False


__all__ = ["open_run", "finish_run", "fail_run", "failing"]
