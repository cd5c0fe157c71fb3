"""Checkpoints of a training run: complete only once the engine's marker is written after every other file.

A save killed midway leaves a folder without :data:`~kdbench.train.recovery.CHECKPOINT_MARKER`; such a folder is
deleted before a rerun resumes (:func:`remove_incomplete_checkpoints`) and never resumed from
(:func:`complete_checkpoints`). Besides Trainer's files, each checkpoint holds the engine's counters
(:data:`COUNTERS_FILE`) and, per process, the sampling form's state (:func:`sampling_state_file`).
"""

from __future__ import annotations

import shutil
from pathlib import Path

from kdbench.train.recovery import CHECKPOINT_MARKER

COUNTERS_FILE = "kdbench_counters.json"
# the objective's own trainable parameters (DSKD's projectors): beside the model, never inside it
OBJECTIVE_MODULE_FILE = "kdbench_objective_module.pt"


def sampling_state_file(checkpoint: Path, process_index: int) -> Path:
    """Where process ``process_index`` keeps its sampling form's state in ``checkpoint`` (rollout or replay
    buffers are per process)."""
    return Path(checkpoint) / f"kdbench_sampling-{process_index}.json"


def checkpoint_step(path: Path) -> int:
    try:
        return int(path.name.rsplit("-", 1)[-1])
    except ValueError:
        return -1


def complete_checkpoints(output_dir: str | Path) -> list[Path]:
    """Checkpoints whose save finished (marker written after every file), oldest first."""
    folder = Path(output_dir)
    found = [p for p in folder.glob("checkpoint-*") if (p / CHECKPOINT_MARKER).is_file() and checkpoint_step(p) >= 0]
    return sorted(found, key=checkpoint_step)


def remove_incomplete_checkpoints(output_dir: str | Path) -> list[Path]:
    """Delete checkpoint folders a killed save left without a marker; returns what was removed."""
    removed = []
    for path in Path(output_dir).glob("checkpoint-*"):
        if path.is_dir() and not (path / CHECKPOINT_MARKER).is_file():
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed
