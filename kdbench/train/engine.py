"""The training engine: one ``transformers.Trainer`` subclass for every method.

What it adds to ``Trainer``:

* a frozen teacher kept *outside* the wrapped model (no DDP wrapping, not in checkpoints), run
  under ``torch.no_grad`` in the same step;
* a recipe objective (:mod:`kdbench.train.objectives`) that returns a loss summed over counted
  response tokens, divided here by the number of counted tokens of the whole optimizer step
  (``num_items_in_batch``: Trainer counts ``labels[..., 1:] != -100`` over all accumulated
  micro-batches, and across processes with ``average_tokens_across_devices``), so accumulation and
  data parallelism do not change the loss. ``loss_is_scaled_for_ga = True`` stops Trainer from
  dividing by the accumulation steps a second time;
* a non-finite loss stops training with the step number and the last complete checkpoint;
* cost counters (tokens processed, teacher forward tokens) and per-step loss components.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import torch
from transformers import Trainer, TrainerCallback

from kdbench.errors import TrainingError
from kdbench.store import append_jsonl, atomic_write_json
from kdbench.train.objectives import Batch, Objective

CHECKPOINT_MARKER = "kdbench_complete.json"


def complete_checkpoints(output_dir: str | Path) -> list[Path]:
    """Checkpoints whose save finished (marker written after every file), oldest first."""
    folder = Path(output_dir)
    found = [p for p in folder.glob("checkpoint-*") if (p / CHECKPOINT_MARKER).is_file()]
    return sorted(found, key=lambda p: int(p.name.split("-")[-1]))


class DistillTrainer(Trainer):
    """``Trainer`` with a frozen teacher and a recipe objective (see module docstring)."""

    loss_is_scaled_for_ga = True

    def __init__(self, *args, objective: Objective, params: dict, teacher=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.objective = objective
        self.params = params
        self.teacher = teacher
        if teacher is not None:
            teacher.eval()
            teacher.requires_grad_(False)
        self.tokens_processed = 0
        self.teacher_tokens = 0
        self._component_sums: dict[str, float] = {}
        self._component_tokens = 0

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        labels = inputs["labels"]
        attention_mask = inputs.get("attention_mask")
        outputs = model(input_ids=inputs["input_ids"], attention_mask=attention_mask)
        # position t predicts token t+1
        student_logits = outputs.logits[:, :-1, :]
        targets = labels[:, 1:]
        mask = (targets != -100).to(torch.float32)
        teacher_logits = None
        if self.objective.needs_teacher:
            with torch.no_grad():
                teacher_logits = self.teacher(input_ids=inputs["input_ids"], attention_mask=attention_mask).logits[:, :-1, :]
            vocab = min(teacher_logits.shape[-1], student_logits.shape[-1], self.params.get("vocab_size") or 10**12)
            teacher_logits, student_logits = teacher_logits[..., :vocab], student_logits[..., :vocab]
            self.teacher_tokens += int(attention_mask.sum()) if attention_mask is not None else inputs["input_ids"].numel()
        self.tokens_processed += int(attention_mask.sum()) if attention_mask is not None else inputs["input_ids"].numel()

        parts = self.objective.fn(Batch(student_logits, teacher_logits, targets, mask), self.params)
        counted = mask.sum()
        if num_items_in_batch is None:  # evaluation, or a caller outside the training loop
            denominator = counted.clamp(min=1)
        else:
            denominator = torch.as_tensor(num_items_in_batch, dtype=torch.float32, device=counted.device).clamp(min=1)
        loss = parts["loss"] / denominator
        if not torch.isfinite(loss.detach()):
            checkpoints = complete_checkpoints(self.args.output_dir)
            last = str(checkpoints[-1]) if checkpoints else "none (no checkpoint was saved yet)"
            raise TrainingError(
                f"The loss became {loss.item()} at step {self.state.global_step + 1}; the last good checkpoint is "
                f"{last}. Lower the learning rate or check the data, then rerun the same command to resume."
            )
        if model.training:
            with torch.no_grad():
                for name, value in parts.items():
                    self._component_sums[name] = self._component_sums.get(name, 0.0) + float(value)
                self._component_tokens += int(counted)
        if (self.args.average_tokens_across_devices and num_items_in_batch is not None
                and self.accelerator.num_processes > 1):
            # num_items_in_batch counts every process's tokens while DDP averages gradients: undo the average
            loss = loss * self.accelerator.num_processes
        return (loss, outputs) if return_outputs else loss

    def log(self, logs: dict, start_time: float | None = None) -> None:
        if "loss" in logs and self._component_tokens:
            for name, total in self._component_sums.items():
                logs[f"{name}_per_token"] = round(total / self._component_tokens, 6)
            self._component_sums, self._component_tokens = {}, 0
        super().log(logs, start_time)


class CompleteCheckpointCallback(TrainerCallback):
    """Writes a marker into each checkpoint after Trainer saved all of its files; a checkpoint without
    it (a save killed midway) is never resumed from."""

    def on_save(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            if folder.is_dir():
                atomic_write_json(folder / CHECKPOINT_MARKER, {"global_step": state.global_step})
        return control


class RunLogCallback(TrainerCallback):
    """Appends every log record (loss, components, learning rate) to the run's ``train_log.jsonl``."""

    def __init__(self, path: Path):
        self.path = path

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_world_process_zero and logs:
            append_jsonl(self.path, {"step": state.global_step, "epoch": state.epoch, **logs})
        return control


class RichProgressCallback(TrainerCallback):
    """A rich progress bar over optimizer steps, showing the latest loss."""

    def __init__(self, description: str = "training"):
        self.description = description
        self.progress = None
        self.task = None

    def on_train_begin(self, args, state, control, **kwargs):
        if not state.is_world_process_zero:
            return control
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

        self.progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                 TextColumn("{task.fields[loss]}"), TimeElapsedColumn(), TimeRemainingColumn(),
                                 transient=True)
        self.progress.start()
        self.task = self.progress.add_task(self.description, total=state.max_steps, completed=state.global_step,
                                           loss="")
        return control

    def on_step_end(self, args, state, control, **kwargs):
        if self.progress is not None:
            self.progress.update(self.task, completed=state.global_step)
        return control

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.progress is not None and logs and "loss" in logs:
            self.progress.update(self.task, loss=f"loss {logs['loss']:.4f}")
        return control

    def on_train_end(self, args, state, control, **kwargs):
        if self.progress is not None:
            self.progress.stop()
            self.progress = None
        return control


def peak_rss_mb() -> float:
    """Peak resident set size of this process, in MiB (Linux reports KiB)."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


class Stopwatch:
    def __init__(self):
        self.start = time.time()

    @property
    def seconds(self) -> float:
        return round(time.time() - self.start, 3)


def finite_or_none(value: float | None) -> float | None:
    return value if value is not None and math.isfinite(value) else None
