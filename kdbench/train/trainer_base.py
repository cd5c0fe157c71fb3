"""The training engine's base: one ``transformers.Trainer`` subclass whose loss is normalised over the whole
optimizer step. The token, pair and guided trainers only compute their loss (:meth:`StepTrainer.step_loss`)
and say what they count (:attr:`StepTrainer.COUNTS`, :meth:`StepTrainer.micro_batch_counts`).

What :class:`StepTrainer` adds to ``Trainer``:

* **Exact step normalisation.** :meth:`StepTrainer.get_batch_samples` fetches the optimizer step's
  micro-batches — after the recipe's sampling form (:mod:`kdbench.train.sampling`) replaced what it samples,
  so the counts are of what is actually trained on — counts each count column (response tokens, pairs, LM
  tokens, ...) over all micro-batches and sums them over processes; the subclass divides its summed loss
  by those totals. ``loss_is_scaled_for_ga = True`` stops Trainer from dividing by the accumulation steps a
  second time, and each process multiplies its loss by the number of processes because DDP *averages*
  gradients. The result does not depend on how the step's batch is split over micro-batches or processes
  (METHODS.md, "Token-level reduction"). Trainer's own count would not do: it counts before on-policy
  generation and only for models that accept loss kwargs.
* **Frozen models** (teachers, references) kept *outside* the wrapped model: never DDP-wrapped, never in a
  checkpoint, run under ``torch.no_grad`` in eval mode; sharded with the student under ``sharding: fsdp``
  (:mod:`kdbench.train.sharded`: checkpoints then hold the gathered model and the optimizer's shards).
* **An LM term** on a plain-text corpus: the corpus's rows for each micro-batch are a pure function of (step,
  micro-batch, process), so a resumed run draws the same LM batches.
* **Loss window and logging**: the subclass records named parts with the count they are averaged over;
  every log averages them over the window (all-reduced over processes).
* **Crash-safe checkpoints.** A checkpoint counts only once the marker is written, after every other file
  (all processes past a barrier); the engine's counters and the sampling form's state (per process) are
  saved with it and restored on resume.
* A non-finite loss stops training with the step number and the last *sound* checkpoint to continue from as a
  new run (:mod:`kdbench.train.recovery`).
* ``training_loss`` of a resumed run is the mean over every step, not only the resumed ones.
"""

from __future__ import annotations

import itertools
import json
import time
from pathlib import Path

import torch
from transformers import Trainer

from kdbench.errors import TrainingError
from kdbench.store import atomic_write_json
from kdbench.train import sharded
from kdbench.train.checkpoints import (COUNTERS_FILE, OBJECTIVE_MODULE_FILE, complete_checkpoints,
                                       sampling_state_file)
from kdbench.train.recovery import CHECKPOINT_MARKER, divergence_message


def take_batches(epoch_iterator, num_batches: int) -> list:
    """Up to ``num_batches`` micro-batches of one optimizer step (fewer at the end of an epoch)."""
    return list(itertools.islice(epoch_iterator, num_batches))


def n_tokens(inputs) -> int:
    """Tokens a forward pass over ``inputs`` processes (attention mask, else every position)."""
    mask = inputs.get("attention_mask")
    return int(mask.sum()) if mask is not None else int(inputs["input_ids"].numel())


#: Prefix of the per-token tensors a sampling form attaches to a micro-batch for the objective's loss.
ROLLOUT_PREFIX = "rollout_"


def rollout_extras(inputs: dict) -> dict:
    """The micro-batch's ``rollout_*`` tensors [B, L] (position j: token j), aligned with the shifted targets
    ([B, L-1], position t predicting token t+1) and keyed without the prefix."""
    return {key[len(ROLLOUT_PREFIX):]: value[:, 1:] for key, value in inputs.items() if key.startswith(ROLLOUT_PREFIX)}


def positive(value, like) -> torch.Tensor:
    """``value`` as a float32 tensor on ``like``'s device, at least 1 (a denominator)."""
    return torch.as_tensor(value, dtype=torch.float32, device=like.device).clamp(min=1)


class StepTrainer(Trainer):
    """``Trainer`` with a step-normalised loss (module docstring). Subclasses implement :meth:`step_loss` and
    :meth:`micro_batch_counts` and name their count columns in :attr:`COUNTS` (the first one is Trainer's
    ``num_items_in_batch``); :attr:`LOGGED_COUNTS` maps count columns to the names logged with each window."""

    loss_is_scaled_for_ga = True
    COUNTS: tuple[str, ...] = ("tokens",)
    LOGGED_COUNTS: dict[str, str] = {}

    def __init__(self, *args, params=None, tokenizer=None, teacher=None, sampling=None, lm_source=None,
                 lm_weight: float = 0.0, logit_rows: int | None = None, sharding: str | None = "none", **kwargs):
        super().__init__(*args, **kwargs)
        # FSDP (sharding: fsdp, several processes): the student is sharded here, frozen models in prepare_frozen
        self.fsdp = sharded.fsdp_requested(sharding, self.accelerator.num_processes)
        self.frozen_models: list = []  # every frozen model prepare_frozen prepared
        self.sharding_seen: dict | None = None  # what this rank held in its first training step (sharded runs)
        if self.fsdp:
            sharded.shard_trained_model(self)
        self.params = params  # the objective's / form's typed parameters
        self.gen_tokenizer = tokenizer
        self.teacher = self.prepare_frozen(teacher)
        self.sampling = sampling
        self.lm_source = lm_source
        self.lm_weight = float(lm_weight)
        self.logit_rows = logit_rows  # output rows every log-softmax is taken over (None: all the model has)
        self.counters = {"tokens_processed": 0, "response_tokens": 0, "teacher_forward_tokens": 0,
                         "generated_tokens": 0, "lm_tokens": 0, "train_seconds": 0.0}
        if sampling is not None:
            self.counters[sampling.counter] = 0
        self._window: dict[str, float] = {}
        self._window_labels: dict[str, tuple[str, str]] = {}
        self._step_totals: dict | None = None
        self._clock = time.time()
        self._loss_sum_before = 0.0  # sum of step losses up to the checkpoint this run resumed from
        self.objective_module: torch.nn.Module | None = None  # trained beside the student (attach_objective_module)
        self.objective_module_lr: float | None = None

    def attach_objective_module(self, module: torch.nn.Module, learning_rate: float | None) -> None:
        """Train ``module`` (an objective's own parameters, e.g. DSKD's projectors) with the student: its
        parameters join the optimizer as one more group (at ``learning_rate``, default the student's; no weight
        decay), its state is saved with each checkpoint (:data:`OBJECTIVE_MODULE_FILE`) and restored on resume;
        the saved model never holds it. One process only: its gradients are not all-reduced."""
        if self.accelerator.num_processes > 1:
            raise TrainingError("This objective trains parameters outside the student, which kdbench optimises on "
                                "one process only; run it without accelerate launch / torchrun.")
        self.objective_module = module.to(self.args.device).train()
        self.objective_module_lr = learning_rate

    def create_optimizer(self, model=None):
        optimizer = super().create_optimizer(model)
        if self.objective_module is not None and not any(
                p is q for group in optimizer.param_groups for p in group["params"]
                for q in self.objective_module.parameters()):
            group = {"params": list(self.objective_module.parameters()), "weight_decay": 0.0}
            if self.objective_module_lr is not None:
                group["lr"] = self.objective_module_lr
            optimizer.add_param_group(group)
        return optimizer

    def prepare_frozen(self, model):
        """A frozen model for the step: eval mode, no gradient, on the training device (None passes); sharded
        under ``sharding: fsdp``, or wrapped in a DeepSpeed inference engine under accelerate's DeepSpeed plugin
        (ZeRO-3 partitions it; :mod:`kdbench.parallel.deepspeed_frozen`)."""
        if model is not None:
            model.eval()
            model.requires_grad_(False)
            if sharded.deepspeed_runs(self.accelerator):
                from kdbench.parallel.deepspeed_frozen import prepare_frozen_deepspeed

                model = prepare_frozen_deepspeed(model, self.accelerator, self.args)
                self.frozen_models.append(model)
                return model
            model.to(self.args.device)
            if self.fsdp:
                sharded.shard_frozen_model(model)
            self.frozen_models.append(model)
        return model

    # ---------------------------------------------------------------- what a subclass implements
    def micro_batch_counts(self, batch: dict) -> list[float]:
        """One count per :attr:`COUNTS` column for a micro-batch (as trained on)."""
        raise NotImplementedError

    def step_loss(self, model, inputs: dict, totals: dict, num_items_in_batch) -> tuple[torch.Tensor, object]:
        """(loss normalised by ``totals`` — the step's counts in training, the micro-batch's otherwise —, the
        model outputs). Record diagnostics with :meth:`record` while ``model.training``."""
        raise NotImplementedError

    # ---------------------------------------------------------------- batches of one optimizer step
    def get_batch_samples(self, epoch_iterator, num_batches: int, device):
        """The step's micro-batches (after the sampling form) and their counts over all processes."""
        if self.objective_module is not None:  # Trainer zeroes the student's gradients only: a fresh step here
            self.objective_module.zero_grad(set_to_none=True)
        batch_samples = take_batches(epoch_iterator, num_batches)
        if self.fsdp and self.sharding_seen is None:
            self.sharding_seen = sharded.sharding_facts(self.model, self.frozen_models)
        with self.sampling_weights():
            for i, batch in enumerate(batch_samples):
                if self.sampling is not None:
                    batch_samples[i] = batch = self.sampling.transform(self, batch, i)
                self.attach_lm_batch(batch, i)
        if not batch_samples:
            return batch_samples, None
        totals = torch.tensor([float(sum(column)) for column in zip(*(self.micro_batch_counts(b) for b in batch_samples))],
                              dtype=torch.float64, device=device)
        if self.accelerator.num_processes > 1:
            totals = self.accelerator.reduce(totals, reduction="sum")
        self._step_totals = dict(zip(self.COUNTS, totals.to(torch.float32)))
        return batch_samples, self._step_totals[self.COUNTS[0]]

    def sampling_weights(self):
        """The context the sampling form runs in: with a sharded student that generates in the step, the
        student's full weights gathered once on every rank (:mod:`kdbench.train.sharded`, "Generation in
        the step"), so each rank samples its own lengths with no collective per token."""
        from contextlib import nullcontext

        from kdbench.parallel.sharding import full_parameters

        if self.fsdp and self.sampling is not None and self.sampling.generates:
            return full_parameters(self.model)
        return nullcontext()

    def attach_lm_batch(self, batch: dict, micro: int) -> None:
        """Add the LM corpus's rows for micro-batch ``micro`` of this step (a pure function of step,
        micro-batch and process, so a resumed run draws the same LM batches); nothing without a corpus."""
        if self.lm_source is None:
            return
        world, rank = self.accelerator.num_processes, self.accelerator.process_index
        index = (self.state.global_step * self.args.gradient_accumulation_steps + micro) * world + rank
        batch["lm_input_ids"], batch["lm_attention_mask"], batch["lm_labels"] = self.lm_source.batch(index)

    def step_totals(self, inputs: dict, num_items_in_batch) -> dict:
        """The denominators of a loss: the step's totals inside the training loop, else the micro-batch's."""
        if num_items_in_batch is not None and self._step_totals is not None:
            return self._step_totals
        return {name: torch.tensor(float(count)) for name, count in zip(self.COUNTS, self.micro_batch_counts(inputs))}

    # ---------------------------------------------------------------- the loss
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        loss, outputs = self.step_loss(model, inputs, self.step_totals(inputs, num_items_in_batch), num_items_in_batch)
        self.check_finite(loss)
        if num_items_in_batch is not None and self.accelerator.num_processes > 1:
            # the denominators count every process's items while DDP averages gradients: undo the average
            loss = loss * self.accelerator.num_processes
        return (loss, outputs) if return_outputs else loss

    def teacher_logits(self, model, input_ids, attention_mask, vocab: int | None):
        """A frozen model's logits [N, T-1, vocab] (position t predicts token t+1), counted as teacher tokens."""
        with torch.no_grad():
            logits = model(input_ids=input_ids, attention_mask=attention_mask).logits[:, :-1, :vocab]
        self.counters["teacher_forward_tokens"] += int(attention_mask.sum()) if attention_mask is not None \
            else int(input_ids.numel())
        return logits

    def check_finite(self, loss) -> None:
        """A NaN or infinite loss stops training with one sentence naming the step and the last sound
        checkpoint to continue from as a new run (:func:`kdbench.train.recovery.divergence_message`)."""
        if not torch.isfinite(loss.detach()):
            raise TrainingError(divergence_message(
                loss.item(), self.state.global_step + 1, complete_checkpoints(self.args.output_dir),
                self.state.log_history, self.args.learning_rate, Path(self.args.output_dir).parent))

    # ---------------------------------------------------------------- the loss window and logging
    def record(self, name: str, value: float, count_name: str, label: str | None = None) -> None:
        """Add ``value`` to part ``name`` of the window; logged as ``label`` = its sum over the window / the
        window's sum of ``count_name`` (:meth:`record_count`). Default label: ``{name}_per_token`` for a count
        of tokens, ``{name}_per_pair`` for pairs."""
        self._window[name] = self._window.get(name, 0.0) + float(value)
        default = f"{name}_per_token" if count_name.endswith("tokens") else f"{name}_per_pair"
        self._window_labels[name] = (count_name, label or default)

    def record_count(self, count_name: str, count: float) -> None:
        key = f"#{count_name}"
        self._window[key] = self._window.get(key, 0.0) + float(count)

    def _reduced_window(self) -> dict:
        """The window's sums since the last log, over every process."""
        names = sorted(self._window)
        values = torch.tensor([self._window[n] for n in names], dtype=torch.float64, device=self.args.device)
        if self.accelerator.num_processes > 1:
            values = self.accelerator.reduce(values, reduction="sum")
        return dict(zip(names, values.tolist()))

    def log(self, logs: dict, start_time: float | None = None) -> None:
        if "loss" in logs and self._window:
            window = self._reduced_window()
            counts = {key[1:]: max(window.pop(key), 1.0) for key in list(window) if key.startswith("#")}
            for name, total in window.items():
                count_name, label = self._window_labels[name]
                logs[label] = total / counts.get(count_name, 1.0)
            for count_name, label in self.LOGGED_COUNTS.items():
                logs[label] = int(counts.get(count_name, 1.0))
            self._window = {}
        super().log(logs, start_time)

    # ---------------------------------------------------------------- training loss over a resumed run
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

    # ---------------------------------------------------------------- evaluation (exact means)
    def exact_evaluation(self, eval_dataset, prefix: str, sums_fn, names: tuple[str, ...], count_name: str) -> dict:
        """Run ``sums_fn(model, inputs) -> [sum per name..., count]`` over the whole evaluation set (eval
        mode, no gradient), add the sums over processes and report each as an exact mean over the count;
        logged and passed to the callbacks (and the sampling form) like ``Trainer.evaluate``."""
        model = self.model
        was_training = model.training
        model.eval()
        sums = torch.zeros(len(names) + 1, dtype=torch.float64, device=self.args.device)
        started = time.time()
        with torch.no_grad():
            for inputs, weight in self._exact_eval_batches(eval_dataset):
                inputs = self._prepare_inputs(inputs)
                sums += weight * torch.tensor(sums_fn(model, inputs), dtype=torch.float64, device=sums.device)
        if self.accelerator.num_processes > 1:
            sums = self.accelerator.reduce(sums, reduction="sum")
        model.train(was_training)
        count = max(float(sums[-1]), 1.0)
        metrics = {f"{prefix}_{name}": float(total) / count for name, total in zip(names, sums.tolist())}
        metrics.update({f"{prefix}_{count_name}": int(count), f"{prefix}_runtime": round(time.time() - started, 3)})
        self.log(metrics)
        if self.sampling is not None:
            self.sampling.on_evaluate(self, metrics)
        self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics)
        return metrics

    def _exact_eval_batches(self, eval_dataset):
        """(batch, weight) pairs covering every evaluation example exactly once over the processes.

        One process: Trainer's evaluation loader. Several: accelerate's prepared loader would pad the last
        batches with repeated examples (``even_batches``), counting them twice in the summed means; here each
        process takes its own examples (rank, rank + N, ...) without repeats, and a process with fewer
        batches repeats one with weight 0, so every process runs the same number of forwards (a sharded
        model's forward is a collective)."""
        if self.accelerator.num_processes == 1:
            yield from ((batch, 1.0) for batch in self.get_eval_dataloader(eval_dataset))
            return
        eval_dataset = self.eval_dataset if eval_dataset is None else eval_dataset
        rank, world = self.accelerator.process_index, self.accelerator.num_processes
        size = self.args.per_device_eval_batch_size
        mine = list(range(rank, len(eval_dataset), world))
        batches = [self.data_collator([eval_dataset[i] for i in mine[start:start + size]])
                   for start in range(0, len(mine), size)]
        longest = -(-(-(-len(eval_dataset) // world)) // size)  # ceil(ceil(n / world) / size) on every process
        filler = batches[0] if batches else self.data_collator([eval_dataset[0]])
        yield from ((batch, 1.0) for batch in batches)
        yield from ((filler, 0.0) for _ in range(longest - len(batches)))

    # ---------------------------------------------------------------- checkpoints
    def _save_checkpoint(self, model, trial) -> None:
        super()._save_checkpoint(model, trial)
        folder = Path(self._get_output_dir(trial)) / f"checkpoint-{self.state.global_step}"
        self.accelerator.wait_for_everyone()  # every process's files (RNG states) are written
        if self.sampling is not None and folder.is_dir():
            atomic_write_json(sampling_state_file(folder, self.accelerator.process_index), self.sampling.state_dict())
        self.accelerator.wait_for_everyone()
        if self.args.should_save and folder.is_dir():
            counters = dict(self.counters, train_seconds=self.counters["train_seconds"] + time.time() - self._clock,
                            train_loss_sum=self._loss_sum())
            atomic_write_json(folder / COUNTERS_FILE, counters)
            if self.objective_module is not None:
                torch.save(self.objective_module.state_dict(), folder / OBJECTIVE_MODULE_FILE)
            atomic_write_json(folder / CHECKPOINT_MARKER, {"global_step": self.state.global_step})  # written last
        self.accelerator.wait_for_everyone()

    # sharded student (sharding: fsdp): the gathered model and the optimizer's shards (kdbench.train.sharded)
    @property
    def own_sharded_checkpoints(self) -> bool:
        """The student is sharded here (not by accelerate's FSDP plugin, whose checkpoints Trainer writes)."""
        return self.fsdp and not sharded.accelerate_shards_student(self)

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        if not self.own_sharded_checkpoints:
            return super().save_model(output_dir, _internal_call)
        state = sharded.gathered_state_dict(self.model)
        sharded.save_model_files(self.model, output_dir or self.args.output_dir, state, self.args.should_save)

    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        if not self.own_sharded_checkpoints:
            return super()._save_optimizer_and_scheduler(output_dir)
        sharded.save_optimizer_shards(self.model, sharded.inner_optimizer(self.optimizer), output_dir)
        if self.args.should_save:
            torch.save(self.lr_scheduler.state_dict(), str(Path(output_dir) / "scheduler.pt"))

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None) -> None:
        if not self.own_sharded_checkpoints:
            return super()._load_from_checkpoint(resume_from_checkpoint, model)
        sharded.load_model_files(self.model, resume_from_checkpoint, self.args.process_index == 0)

    def _load_optimizer_and_scheduler(self, checkpoint) -> None:
        if not self.own_sharded_checkpoints or checkpoint is None:
            return super()._load_optimizer_and_scheduler(checkpoint)
        sharded.load_optimizer_shards(self.model, sharded.inner_optimizer(self.optimizer), checkpoint)
        sharded.load_scheduler(self.lr_scheduler, checkpoint)

    def _load_best_model(self) -> None:
        if not self.own_sharded_checkpoints:
            return super()._load_best_model()
        sharded.load_model_files(self.model, self.state.best_model_checkpoint, self.args.process_index == 0)

    def gathered_state_dict(self) -> dict | None:
        """The trained model's full state dict for saving it (rank 0; ``{}`` elsewhere) when this rank holds
        only a shard (sharded here or by accelerate's FSDP2 plugin), else None (save the model itself). Every
        rank must call it."""
        from kdbench.parallel.sharding import is_sharded

        if not self.fsdp or not is_sharded(self.model):
            return None
        return sharded.gathered_state_dict(self.model)

    def restore_counters(self, checkpoint: Path) -> None:
        """The engine's counters, loss sum and sampling state as saved with ``checkpoint``."""
        try:
            saved = json.loads((Path(checkpoint) / COUNTERS_FILE).read_text())
        except (OSError, ValueError):
            saved = {}
        for key, value in saved.items():
            if key in self.counters:
                self.counters[key] = value
        self._loss_sum_before = float(saved.get("train_loss_sum", 0.0))
        self._clock = time.time()
        state_file = sampling_state_file(Path(checkpoint), self.accelerator.process_index)
        if self.sampling is not None and state_file.is_file():
            self.sampling.load_state_dict(json.loads(state_file.read_text()))
        module_file = Path(checkpoint) / OBJECTIVE_MODULE_FILE
        if self.objective_module is not None:
            if not module_file.is_file():
                raise TrainingError(f"{checkpoint} has no {OBJECTIVE_MODULE_FILE} (the objective's trained "
                                    "projectors); start the run again in a new output directory.")
            self.objective_module.load_state_dict(torch.load(module_file, map_location=self.args.device,
                                                             weights_only=True))

    def cost_counters(self) -> dict:
        return dict(self.counters, train_seconds=round(self.counters["train_seconds"] + time.time() - self._clock, 3))
