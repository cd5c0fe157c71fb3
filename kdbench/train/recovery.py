"""Recovering from a diverged run: which checkpoint is still sound, and continuing from it as a new run.

When the loss becomes NaN or infinite, rerunning the same command would resume from the run's last
checkpoint, which may have been taken after divergence began, with the same schedule: it diverges again.
So the error names the **last sound checkpoint** — the latest complete checkpoint such that every loss
logged up to its step, *and the first one logged after it*, is finite and at most
:data:`DIVERGENCE_FACTOR` (k = 2) times the first logged loss — and says how to continue from it as a *new* run with a lower learning rate:
``kdbench train ... --continue-from RUN/checkpoints/checkpoint-N --run-name NEW --set learning_rate=LR``.

A continued run (:func:`seed_continuation`) copies that checkpoint into its own ``checkpoints/`` and
resumes from it like any interrupted run: the weights, the optimizer moments, the step count, the data
order and the RNG states are the checkpoint's; the learning-rate schedule keeps its position and shape
but is rescaled to the new run's peak ``learning_rate``. The new run's ``config.yaml`` records its own
settings and ``continue_from``; its ``train_log.jsonl`` starts with the source run's records up to the
checkpoint; its cost and ``final_train_loss`` cover every step the model was trained for.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path

from kdbench.errors import ConfigError

# A checkpoint is sound when every loss logged up to it is finite and at most this many times the first
# logged loss (k = 2 in the docs). Losses of every kdbench objective fall from their first value in a healthy
# run (the first value is a whole logging window's mean, so one noisy batch does not count); doubling
# means the optimizer left the basin, usually well before the loss overflows.
DIVERGENCE_FACTOR = 2.0
CHECKPOINT_MARKER = "kdbench_complete.json"  # the engine writes it last into every finished checkpoint


def logged_losses(log_history: list[dict]) -> list[tuple[int, float]]:
    """(step, training loss) of every logged training window, in order."""
    return [(int(r["step"]), float(r["loss"])) for r in log_history
            if "loss" in r and "step" in r and isinstance(r["loss"], (int, float))]


def last_sound_checkpoint(checkpoints: list[Path], log_history: list[dict],
                          factor: float = DIVERGENCE_FACTOR) -> tuple[Path | None, float | None]:
    """The latest checkpoint (of ``checkpoints``, oldest first, named ``checkpoint-<step>``) such that every
    loss logged up to its step, and the first loss logged after it, is finite and at most ``factor`` × the
    first logged loss; and that first loss.

    The loss logged at step t is computed *before* update t, while checkpoint t holds the weights *after*
    it: only a later loss shows whether those weights are still sound, so a checkpoint with no loss
    logged after it (the divergence came first) never counts."""
    losses = logged_losses(log_history)
    initial = losses[0][1] if losses and math.isfinite(losses[0][1]) else None

    def healthy(loss: float) -> bool:
        return math.isfinite(loss) and (initial is None or loss <= factor * initial)

    sound = None
    for checkpoint in checkpoints:
        step = int(checkpoint.name.rsplit("-", 1)[-1])
        after = next((loss for s, loss in losses if s > step), None)
        if after is None or not healthy(after) or not all(healthy(loss) for s, loss in losses if s <= step):
            break
        sound = checkpoint
    return sound, initial


def divergence_message(loss: float, step: int, checkpoints: list[Path], log_history: list[dict],
                       learning_rate: float, run_path: Path) -> str:
    """The one sentence a non-finite loss stops training with: where, the last sound checkpoint, and the
    command-line additions that continue from it as a new run at a tenth of the learning rate."""
    sound, initial = last_sound_checkpoint(checkpoints, log_history)
    lower = f"{learning_rate / 10:.3g}"
    new_run = f"{run_path.name}-lr{lower}"
    head = f"The loss became {loss} at step {step} of run {run_path}"
    if sound is None:
        return (f"{head}, and no checkpoint before the divergence was kept; start a new run with a lower learning "
                f"rate: rerun the command with --run-name {new_run} --set learning_rate={lower}.")
    first = f" ({initial:.4g})" if initial is not None else ""
    return (f"{head}; the last sound checkpoint is {sound} (the losses logged up to it and just after it are "
            f"finite and at most {DIVERGENCE_FACTOR:g}x the first{first}); continue from it as a new run with a lower learning rate: "
            f"rerun the command with --continue-from {sound} --run-name {new_run} --set learning_rate={lower}.")


def check_continuation_source(path: str) -> None:
    """``continue_from`` must be a complete checkpoint folder (validated before any work)."""
    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise ConfigError(f"Checkpoint {folder} (continue_from) does not exist; pass a folder RUN/checkpoints/"
                          "checkpoint-N of an earlier run.")
    if not (folder / CHECKPOINT_MARKER).is_file():
        raise ConfigError(f"{folder} (continue_from) is not a complete kdbench checkpoint (no {CHECKPOINT_MARKER}); "
                          "pass a checkpoint-N folder whose save finished.")


def seed_continuation(source: str | Path, checkpoints_dir: Path, learning_rate: float, run_log: Path) -> Path:
    """Copy checkpoint ``source`` of another run into ``checkpoints_dir`` (same step name), rescale its saved
    learning-rate schedule and optimizer to the peak ``learning_rate``, drop the source run's best-model
    pointer, and start ``run_log`` with the source run's log records up to the checkpoint. Returns the copy."""
    import torch

    source = Path(source).expanduser()
    step = int(source.name.rsplit("-", 1)[-1])
    target = checkpoints_dir / source.name
    partial = checkpoints_dir / f".{source.name}.copying-{os.getpid()}"
    shutil.rmtree(partial, ignore_errors=True)
    checkpoints_dir.mkdir(parents=True, exist_ok=True)
    shutil.copytree(source, partial, ignore=shutil.ignore_patterns(CHECKPOINT_MARKER))
    scheduler_file, optimizer_file = partial / "scheduler.pt", partial / "optimizer.pt"
    if scheduler_file.is_file():
        scheduler = torch.load(scheduler_file, weights_only=True)
        old_peak = float((scheduler.get("base_lrs") or [learning_rate])[0]) or learning_rate
        scale = learning_rate / old_peak
        for key in ("base_lrs", "_last_lr"):
            if key in scheduler:
                scheduler[key] = [value * scale for value in scheduler[key]]
        torch.save(scheduler, scheduler_file)
        if optimizer_file.is_file():
            optimizer = torch.load(optimizer_file, weights_only=True)
            for group in optimizer.get("param_groups", []):
                for key in ("lr", "initial_lr"):
                    if key in group:
                        group[key] = group[key] * scale
            torch.save(optimizer, optimizer_file)
    state_file = partial / "trainer_state.json"
    if state_file.is_file():
        state = json.loads(state_file.read_text())
        state.update(best_model_checkpoint=None, best_metric=None)
        state_file.write_text(json.dumps(state, indent=2))
    source_log = source.parent.parent / "train_log.jsonl"
    if source_log.is_file() and not run_log.exists():
        from kdbench.store import atomic_write_text, read_jsonl

        kept = [r for r in read_jsonl(source_log) if int(r.get("step", 0)) <= step]
        atomic_write_text(run_log, "".join(json.dumps(r, sort_keys=True) + "\n" for r in kept))
    shutil.copy2(source / CHECKPOINT_MARKER, partial / CHECKPOINT_MARKER)  # complete only once every file is in
    os.replace(partial, target)
    return target
