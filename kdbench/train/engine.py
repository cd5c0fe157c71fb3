"""The training engine: one ``transformers.Trainer`` subclass for every token-level method.

What :class:`DistillTrainer` adds to ``Trainer``:

* **Exact token normalization.** A recipe objective (:mod:`kdbench.train.objectives`) returns its loss
  *summed* over the micro-batch's counted response tokens. :meth:`DistillTrainer.get_batch_samples`
  fetches the optimizer step's micro-batches (after on-policy generation has replaced their
  responses, so the count is of the tokens actually trained on), counts their response tokens
  (``labels[:, 1:] != -100``) and sums the count over processes; ``compute_loss`` divides by that
  count. ``loss_is_scaled_for_ga = True`` stops Trainer from dividing by the accumulation steps a
  second time, and each process multiplies its loss by the number of processes because DDP
  *averages* gradients. The result does not depend on how the step's batch is split over
  micro-batches or processes (METHODS.md, "Token-level reduction"). Trainer's own count would not
  do here: it counts before on-policy generation and only for models that accept loss kwargs.
* **Teacher signals.** A frozen teacher kept *outside* the wrapped model (never DDP-wrapped, never
  in a checkpoint), run under ``torch.no_grad`` in the same step — or an offline top-k cache
  (:mod:`kdbench.teacher_cache`) gathered per batch from memory-mapped files.
* **On-policy responses (GKD).** With probability λ per micro-batch the gold responses are replaced
  by the current student's samples (:class:`kdbench.generate.HFBackend`); the coin and each
  example's sampling seed derive from (seed, step, micro-batch, process, example), so a resumed run
  draws the same samples as an uninterrupted one.
* **An LM term** on a plain-text corpus (``lm_weight`` × token-mean CE over the step's LM tokens,
  normalized over the whole step like the main loss).
* **Crash-safe checkpoints.** A checkpoint counts only once :data:`CHECKPOINT_MARKER` is written,
  after every other file (all processes past a barrier); the engine's counters are saved with it.
* **Diagnostics and cost.** Per-token loss components (all-reduced over processes), the AKL head
  weight, tokens processed, teacher forward tokens, generated tokens.
* A non-finite loss stops training with the step number and the last *sound* checkpoint to continue
  from as a new run (:mod:`kdbench.train.recovery`).
* ``training_loss`` of a resumed run is the mean over every step, not only the resumed ones (the sum of
  step losses is saved with each checkpoint).

FSDP and DeepSpeed configurations go through accelerate like any Trainer run and are expected to
work (the teacher stays unwrapped); they are not tested here.
"""

from __future__ import annotations

import json
import math
import random
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import Trainer, TrainerCallback

from kdbench.errors import TrainingError
from kdbench.store import append_jsonl, atomic_write_json, read_jsonl
from kdbench.train.objectives import Batch, Objective, cross_entropy_sum
from kdbench.train.recovery import CHECKPOINT_MARKER, divergence_message, seed_continuation
COUNTERS_FILE = "kdbench_counters.json"


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


@dataclass
class OnPolicyConfig:
    """GKD's on-policy mixing: with probability ``fraction`` (λ) a micro-batch's responses are sampled
    from the current student with ``decoding``; ``seed`` makes the draws reproducible."""

    fraction: float
    decoding: Any  # kdbench.generate.DecodingConfig
    seed: int
    pad_token_id: int


@dataclass
class LMSource:
    """A tokenized plain-text corpus ([n_blocks] lists of token ids) for an LM-loss term."""

    blocks: list
    batch_size: int
    seed: int
    pad_token_id: int
    order: list = field(default_factory=list)

    def __post_init__(self):
        self.order = list(range(len(self.blocks)))
        random.Random(self.seed).shuffle(self.order)

    def batch(self, global_micro_index: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(input_ids, attention_mask, labels) [b, L] of micro-batch ``global_micro_index`` (a pure
        function of the index, so resuming draws the same LM batches)."""
        n = len(self.order)
        picks = [self.blocks[self.order[(global_micro_index * self.batch_size + j) % n]] for j in range(self.batch_size)]
        longest = max(len(p) for p in picks)
        ids = torch.full((len(picks), longest), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(picks), longest), -100, dtype=torch.long)
        attention = torch.zeros((len(picks), longest), dtype=torch.long)
        for row, block in enumerate(picks):
            ids[row, :len(block)] = torch.tensor(block)
            labels[row, :len(block)] = torch.tensor(block)
            attention[row, :len(block)] = 1
        return ids, attention, labels


class DistillTrainer(Trainer):
    """``Trainer`` with a frozen teacher (or a top-k cache) and a recipe objective (see module docstring)."""

    loss_is_scaled_for_ga = True

    def __init__(self, *args, objective: Objective, params: dict, teacher=None, teacher_cache=None,
                 eval_teacher_cache=None, on_policy: OnPolicyConfig | None = None, lm_source: LMSource | None = None, lm_weight: float = 0.0,
                 tokenizer=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.objective = objective
        self.params = params
        self.teacher = teacher
        self.teacher_cache = teacher_cache
        self.eval_teacher_cache = eval_teacher_cache
        self.on_policy = on_policy
        self.lm_source = lm_source
        self.lm_weight = float(lm_weight)
        self.gen_tokenizer = tokenizer
        if teacher is not None:
            teacher.eval()
            teacher.requires_grad_(False)
            teacher.to(self.args.device)
        self.counters = {"tokens_processed": 0, "response_tokens": 0, "teacher_forward_tokens": 0,
                         "generated_tokens": 0, "on_policy_batches": 0, "lm_tokens": 0, "train_seconds": 0.0}
        self._window: dict[str, float] = {}
        self._step_lm_tokens = None
        self._micro_index = 0
        self._clock = time.time()
        self._loss_sum_before = 0.0  # sum of step losses up to the checkpoint this run resumed from

    # ---------------------------------------------------------------- batches of one optimizer step
    def get_batch_samples(self, epoch_iterator, num_batches: int, device):
        """The step's micro-batches and the number of counted response tokens over all of them and all
        processes (after on-policy generation replaced responses)."""
        batch_samples = take_batches(epoch_iterator, num_batches)
        world = self.accelerator.num_processes
        for i, batch in enumerate(batch_samples):
            if self.on_policy is not None:
                batch_samples[i] = batch = self._maybe_on_policy(batch, i)
            self.attach_lm_batch(batch, i)
        if not batch_samples:
            return batch_samples, None
        counts = [sum(int((b["labels"][:, 1:] != -100).sum()) for b in batch_samples)]
        if self.lm_source is not None:
            counts.append(sum(int((b["lm_labels"][:, 1:] != -100).sum()) for b in batch_samples))
        totals = torch.tensor(counts, dtype=torch.float64, device=device)
        if world > 1:
            totals = self.accelerator.reduce(totals, reduction="sum")
        if self.lm_source is not None:
            self._step_lm_tokens = totals[1].to(torch.float32)
        return batch_samples, totals[0].to(torch.float32)

    def attach_lm_batch(self, batch: dict, micro: int) -> None:
        """Add the LM corpus's rows for micro-batch ``micro`` of this step (a pure function of step,
        micro-batch and process, so a resumed run draws the same LM batches); nothing without a corpus."""
        if self.lm_source is None:
            return
        world, rank = self.accelerator.num_processes, self.accelerator.process_index
        index = (self.state.global_step * self.args.gradient_accumulation_steps + micro) * world + rank
        batch["lm_input_ids"], batch["lm_attention_mask"], batch["lm_labels"] = self.lm_source.batch(index)

    def _maybe_on_policy(self, batch: dict, micro: int) -> dict:
        """Replace the batch's responses by the student's samples with probability λ (GKD; TRL decides per
        micro-batch). Keeps the prompt tokens; labels cover the sampled tokens and the EOS if sampled."""
        from kdbench.generate import example_seed

        config = self.on_policy
        key = f"{config.seed}/{self.state.global_step}/{micro}/{self.accelerator.process_index}"
        coin = random.Random(example_seed(config.seed, key)).random()
        if coin >= config.fraction:
            return batch
        prompts = []
        for row in range(batch["input_ids"].shape[0]):
            length = int(batch["prompt_length"][row])
            prompts.append(batch["input_ids"][row, :length].tolist())
        ids = [f"{int(e)}@{self.state.global_step}" for e in batch["example_index"]]
        responses, generated_tokens = sample_responses(self.accelerator.unwrap_model(self.model), self.gen_tokenizer,
                                                       prompts, ids, config.decoding,
                                                       example_seed(config.seed, key) % (2**31))
        rows = [prompt + response for prompt, response in zip(prompts, responses)]
        labels = [[-100] * len(prompt) + response for prompt, response in zip(prompts, responses)]
        self.counters["generated_tokens"] += generated_tokens
        self.counters["on_policy_batches"] += 1
        longest = max(len(r) for r in rows)
        device = batch["input_ids"].device
        out = dict(batch)
        out["input_ids"] = torch.tensor([r + [config.pad_token_id] * (longest - len(r)) for r in rows], device=device)
        out["labels"] = torch.tensor([r + [-100] * (longest - len(r)) for r in labels], device=device)
        out["attention_mask"] = torch.tensor([[1] * len(r) + [0] * (longest - len(r)) for r in rows], device=device)
        out["on_policy"] = True
        return out

    # ---------------------------------------------------------------- the loss
    def _teacher_signal(self, inputs, mask, vocab):
        if self.teacher_cache is not None:
            if inputs.get("on_policy"):
                raise TrainingError("The top-k teacher cache covers the gold responses only; on-policy methods need "
                                    "--set teacher_signal=online.")
            return self.teacher_cache.sparse_batch(inputs["example_index"].tolist(), mask,
                                                   temperature=float(self.params.get("temperature", 1.0)))
        with torch.no_grad():
            logits = self.teacher(input_ids=inputs["input_ids"], attention_mask=inputs.get("attention_mask")).logits
        self.counters["teacher_forward_tokens"] += _n_tokens(inputs)
        return logits[:, :-1, :vocab]

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        labels = inputs["labels"]
        outputs = model(input_ids=inputs["input_ids"], attention_mask=inputs.get("attention_mask"))
        vocab = self.params.get("vocab_size") or outputs.logits.shape[-1]
        student_logits = outputs.logits[:, :-1, :vocab]  # position t predicts token t+1
        targets = labels[:, 1:]
        mask = (targets != -100).to(torch.float32)
        teacher_signal = self._teacher_signal(inputs, mask, vocab) if self.objective.needs_teacher else None
        parts = self.objective.fn(Batch(student_logits, teacher_signal, targets, mask), self.params)
        counted = mask.sum()
        if num_items_in_batch is None:  # evaluation, or a caller outside the training loop
            denominator = counted.clamp(min=1)
        else:
            denominator = torch.as_tensor(num_items_in_batch, dtype=torch.float32, device=counted.device).clamp(min=1)
        loss = parts["loss"] / denominator

        lm_sum = None
        if self.lm_source is not None and model.training and "lm_input_ids" in inputs and self.lm_weight > 0:
            lm_out = model(input_ids=inputs["lm_input_ids"], attention_mask=inputs["lm_attention_mask"])
            lm_sum = cross_entropy_sum(lm_out.logits[:, :-1, :vocab], inputs["lm_labels"][:, 1:])
            lm_tokens = self._step_lm_tokens if self._step_lm_tokens is not None else (inputs["lm_labels"][:, 1:] != -100).sum()
            loss = loss + self.lm_weight * lm_sum / torch.as_tensor(lm_tokens, dtype=torch.float32).clamp(min=1)
            self.counters["lm_tokens"] += int((inputs["lm_labels"][:, 1:] != -100).sum())

        self.check_finite(loss)
        if model.training:
            self._record(parts, int(counted), lm_sum, inputs, student_logits, teacher_signal, mask)
        if num_items_in_batch is not None and self.accelerator.num_processes > 1:
            # the denominator counts every process's tokens while DDP averages gradients: undo the average
            loss = loss * self.accelerator.num_processes
        return (loss, outputs) if return_outputs else loss

    def check_finite(self, loss) -> None:
        """A NaN or infinite loss stops training with one sentence naming the step and the last sound
        checkpoint to continue from as a new run (:func:`kdbench.train.recovery.divergence_message`)."""
        if not torch.isfinite(loss.detach()):
            raise TrainingError(divergence_message(
                loss.item(), self.state.global_step + 1, complete_checkpoints(self.args.output_dir),
                self.state.log_history, self.args.learning_rate, Path(self.args.output_dir).parent))

    def train(self, *args, **kwargs):
        """``Trainer.train``, with ``training_loss`` the mean step loss over *all* the run's steps (Trainer
        averages only the steps of this call, which after a resume are the resumed ones)."""
        output = super().train(*args, **kwargs)
        steps = self.state.global_step
        steps_now = steps - getattr(self, "_initial_global_step", 0)
        if steps and output.training_loss is not None:
            total = self._loss_sum_before + output.training_loss * steps_now
            output = output._replace(training_loss=total / steps)
        return output

    def _loss_sum(self) -> float:
        """The sum of step losses so far (before the resume point, logged since, and not yet logged)."""
        pending = getattr(self, "_tr_loss", None)
        pending = float(pending.item()) if isinstance(pending, torch.Tensor) else float(pending or 0.0)
        return self._loss_sum_before + float(getattr(self, "_total_loss_scalar", 0.0)) + pending

    def _record(self, parts, counted, lm_sum, inputs, student_logits, teacher_signal, mask) -> None:
        with torch.no_grad():
            for name, value in parts.items():
                self._window[name] = self._window.get(name, 0.0) + float(value)
            self._window["_tokens"] = self._window.get("_tokens", 0.0) + counted
            if lm_sum is not None:
                self._window["lm_ce"] = self._window.get("lm_ce", 0.0) + float(lm_sum)
                self._window["_lm_tokens"] = (self._window.get("_lm_tokens", 0.0)
                                              + float((inputs["lm_labels"][:, 1:] != -100).sum()))
            divergence = self.params.get("divergence")
            logging_now = (self.state.global_step + 1) % max(1, self.args.logging_steps) == 0
            if divergence in ("akl", "akl_r") and teacher_signal is not None and logging_now and counted:
                from kdbench.losses import akl_weights

                extra = self.params.get("divergence_params") or {}
                w_head, _ = akl_weights(student_logits, teacher_signal, temperature=self.params["temperature"],
                                        mu=extra.get("mu", 0.5), head_rule=extra.get("head_rule", "paper"))
                if divergence == "akl_r":  # AKL-r swaps the weights: FKL gets g_tail
                    w_head = 1 - w_head
                self._window["akl_fkl_weight"] = self._window.get("akl_fkl_weight", 0.0) + float((w_head * mask).sum())
                self._window["_akl_tokens"] = self._window.get("_akl_tokens", 0.0) + counted
        self.counters["tokens_processed"] += _n_tokens(inputs)
        self.counters["response_tokens"] += counted

    def _reduced_window(self) -> dict:
        """The loss components summed since the last log, over every process."""
        names = sorted(self._window)
        values = torch.tensor([self._window[n] for n in names], dtype=torch.float64, device=self.args.device)
        if self.accelerator.num_processes > 1:
            values = self.accelerator.reduce(values, reduction="sum")
        return dict(zip(names, values.tolist()))

    def log(self, logs: dict, start_time: float | None = None) -> None:
        if "loss" in logs and self._window:
            window = self._reduced_window()
            tokens = max(window.pop("_tokens", 0.0), 1.0)
            lm_tokens = max(window.pop("_lm_tokens", 0.0), 1.0)
            akl_tokens = max(window.pop("_akl_tokens", 0.0), 1.0)
            for name, total in window.items():
                denominator = lm_tokens if name == "lm_ce" else akl_tokens if name == "akl_fkl_weight" else tokens
                logs[f"{name}_per_token" if name not in ("akl_fkl_weight",) else name] = total / denominator
            logs["response_tokens"] = int(tokens)
            self._window = {}
        super().log(logs, start_time)

    # ---------------------------------------------------------------- evaluation (exact token means)
    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval") -> dict:
        """Validation metrics as exact means over every counted token of the set: ``loss`` (the
        recipe's objective), ``ce`` (gold cross-entropy) and ``token_accuracy`` (argmax = gold)."""

        def sums(model, inputs) -> list[float]:
            outputs = model(input_ids=inputs["input_ids"], attention_mask=inputs.get("attention_mask"))
            vocab = self.params.get("vocab_size") or outputs.logits.shape[-1]
            student_logits = outputs.logits[:, :-1, :vocab]
            targets = inputs["labels"][:, 1:]
            mask = (targets != -100).to(torch.float32)
            teacher_signal = None
            if self.objective.needs_teacher and self.eval_teacher_cache is not None:
                teacher_signal = self.eval_teacher_cache.sparse_batch(
                    inputs["example_index"].tolist(), mask, temperature=float(self.params.get("temperature", 1.0)))
            elif self.objective.needs_teacher:
                teacher_logits = self.teacher(input_ids=inputs["input_ids"],
                                              attention_mask=inputs.get("attention_mask")).logits
                teacher_signal = teacher_logits[:, :-1, :vocab]
            parts = self.objective.fn(Batch(student_logits, teacher_signal, targets, mask), self.params)
            ce = cross_entropy_sum(student_logits, targets)
            correct = ((student_logits.argmax(-1) == targets) & (targets != -100)).sum()
            return [float(parts["loss"]), float(ce), float(correct), float(mask.sum())]

        return self.exact_evaluation(eval_dataset, metric_key_prefix, sums, ("loss", "ce", "token_accuracy"), "tokens")

    def exact_evaluation(self, eval_dataset, prefix: str, sums_fn, names: tuple[str, ...], count_name: str) -> dict:
        """Run ``sums_fn(model, inputs) -> [sum per name..., count]`` over the whole evaluation set (eval
        mode, no gradient), add the sums over processes and report each as an exact mean over the count;
        logged and passed to the callbacks like ``Trainer.evaluate``."""
        dataloader = self.get_eval_dataloader(eval_dataset)
        model = self.model
        was_training = model.training
        model.eval()
        sums = torch.zeros(len(names) + 1, dtype=torch.float64, device=self.args.device)
        started = time.time()
        with torch.no_grad():
            for inputs in dataloader:
                inputs = self._prepare_inputs(inputs)
                sums += torch.tensor(sums_fn(model, inputs), dtype=torch.float64, device=sums.device)
        if self.accelerator.num_processes > 1:
            sums = self.accelerator.reduce(sums, reduction="sum")
        model.train(was_training)
        count = max(float(sums[-1]), 1.0)
        metrics = {f"{prefix}_{name}": float(total) / count for name, total in zip(names, sums.tolist())}
        metrics.update({f"{prefix}_{count_name}": int(count), f"{prefix}_runtime": round(time.time() - started, 3)})
        self.log(metrics)
        self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics)
        return metrics

    # ---------------------------------------------------------------- checkpoints
    def _save_checkpoint(self, model, trial) -> None:
        super()._save_checkpoint(model, trial)
        folder = Path(self._get_output_dir(trial)) / f"checkpoint-{self.state.global_step}"
        self.accelerator.wait_for_everyone()  # every process's files (RNG states) are written
        if self.args.should_save and folder.is_dir():
            counters = dict(self.counters, train_seconds=self.counters["train_seconds"] + time.time() - self._clock,
                            train_loss_sum=self._loss_sum())
            atomic_write_json(folder / COUNTERS_FILE, counters)
            atomic_write_json(folder / CHECKPOINT_MARKER, {"global_step": self.state.global_step})  # written last
        self.accelerator.wait_for_everyone()

    def restore_counters(self, checkpoint: Path) -> None:
        try:
            saved = json.loads((Path(checkpoint) / COUNTERS_FILE).read_text())
        except (OSError, ValueError):
            return
        for key, value in saved.items():
            if key in self.counters:
                self.counters[key] = value
        self._loss_sum_before = float(saved.get("train_loss_sum", 0.0))
        self._clock = time.time()

    def cost_counters(self) -> dict:
        return dict(self.counters, train_seconds=round(self.counters["train_seconds"] + time.time() - self._clock, 3))


def sample_responses(model, tokenizer, prompts: list[list[int]], ids: list[str], decoding, seed: int):
    """Responses of ``model`` (the *unwrapped* model: generation never goes through DDP) to token-id
    prompts: per prompt the new tokens plus the EOS id the model emitted when it stopped (one of its
    EOS ids, kept as produced); a response cut at ``max_new_tokens`` has no EOS. Also returns the
    number of tokens generated. Each row's sampling seed derives from ``seed`` and its id
    (:mod:`kdbench.generate`)."""
    from kdbench.generate import HFBackend

    generated = HFBackend(model, tokenizer).generate_ids(prompts, ids, decoding, seed=seed)
    return [row.with_eos() for row in generated], sum(len(row.tokens) for row in generated)


def _n_tokens(inputs) -> int:
    mask = inputs.get("attention_mask")
    return int(mask.sum()) if mask is not None else int(inputs["input_ids"].numel())


class RunLogCallback(TrainerCallback):
    """Appends every log record (loss, components, learning rate, validation metrics) to the run's
    ``train_log.jsonl``."""

    def __init__(self, path: Path):
        self.path = path

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_world_process_zero and logs:
            append_jsonl(self.path, {"step": state.global_step, "epoch": state.epoch, **logs})
        return control


def trim_run_log(path: Path, step: int) -> None:
    """Drop log records after ``step`` (a resumed run logs those steps again)."""
    from kdbench.store import atomic_write_text

    if not path.exists():
        return
    kept = [r for r in read_jsonl(path) if int(r.get("step", 0)) <= step]
    atomic_write_text(path, "".join(json.dumps(r, sort_keys=True) + "\n" for r in kept))


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


def peak_memory_mb() -> dict:
    """Peak resident set size of this process (MiB; Linux reports KiB) and, on CUDA, peak allocated."""
    import resource

    out = {"peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0, 1)}
    if torch.cuda.is_available():
        out["peak_cuda_allocated_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    return out


def peak_rss_mb() -> float:
    return peak_memory_mb()["peak_rss_mb"]


class Stopwatch:
    def __init__(self):
        self.start = time.time()

    @property
    def seconds(self) -> float:
        return round(time.time() - self.start, 3)


def finite_or_none(value: float | None) -> float | None:
    return value if value is not None and math.isfinite(value) else None


def train_resuming(trainer: "DistillTrainer", run, checkpoints_dir: Path, say) -> object:
    """Run ``trainer.train()`` from the last complete checkpoint of ``checkpoints_dir`` (if any).

    Incomplete checkpoints (a save killed midway) are deleted first; the engine's counters and the
    run's ``train_log.jsonl`` are rewound to the resumed step. A failure leaves the run to the one place that
    marks stopped runs (:func:`kdbench.store.fail_open_runs`, called by the CLI's error boundary).
    """
    from transformers.trainer_callback import PrinterCallback

    trainer.remove_callback(PrinterCallback)  # the run log and the progress bar replace its prints
    if trainer.is_world_process_zero():
        for removed in remove_incomplete_checkpoints(checkpoints_dir):
            run.log(f"removed incomplete checkpoint {removed} (a save was interrupted)")
    trainer.accelerator.wait_for_everyone()
    resume = complete_checkpoints(checkpoints_dir)
    continue_from = run.config().get("continue_from")
    if not resume and continue_from:  # a new run continuing from another run's checkpoint
        if trainer.is_world_process_zero():
            seed_continuation(continue_from, checkpoints_dir, trainer.args.learning_rate,
                              run.path / "train_log.jsonl")
            run.log(f"continuing from {continue_from} at learning_rate {trainer.args.learning_rate:g}")
        trainer.accelerator.wait_for_everyone()
        resume = complete_checkpoints(checkpoints_dir)
    if resume:
        say(f"resuming from {resume[-1]}")
        run.log(f"resuming from {resume[-1]}")
        trainer.restore_counters(resume[-1])
        if trainer.is_world_process_zero():
            trim_run_log(run.path / "train_log.jsonl", checkpoint_step(resume[-1]))
    output = trainer.train(resume_from_checkpoint=str(resume[-1]) if resume else None)
    if not trainer.counters["response_tokens"]:
        raise TrainingError(f"The run trained on 0 response tokens in {trainer.state.global_step} steps, so the model "
                            "learned nothing; check that the tokenizer encodes the data and that max_length leaves room "
                            "for responses, then start again.")
    return output, bool(resume)


def take_batches(epoch_iterator, num_batches: int) -> list:
    """Up to ``num_batches`` micro-batches of one optimizer step (fewer at the end of an epoch)."""
    import itertools

    return list(itertools.islice(epoch_iterator, num_batches))
