"""One training run's lifecycle, written once for every recipe kind.

:class:`TrainRun` opens the run directory (or reopens it to resume: a rerun with changed settings is refused
by :meth:`kdbench.store.RunDir.create`), returns a finished run as it is, records each stage's facts
(``stages.json``), gives the trainer its ``TrainingArguments`` and callbacks, trains from the last *complete*
checkpoint (a checkpoint killed mid-write is deleted and never resumed from; ``--continue-from`` seeds a new
run from another run's checkpoint), and finishes: validation, ``cost.json``, the model saved atomically with
its model card, the checkpoints removed, the run marked complete. A run that stops with an error is marked by
the one place that marks stopped runs (:func:`kdbench.store.fail_open_runs`, the CLI's error boundary).

The finished run holds ``model/`` (a Hugging Face checkpoint with a model card), ``cost.json`` (wall time,
tokens processed, teacher forward tokens, generated tokens, peak memory, stage build times) and
``train_log.jsonl`` (per-step loss components and diagnostics).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import sys
from pathlib import Path

from kdbench.config import to_dict
from kdbench.errors import TrainingError
from kdbench.models import count_parameters
from kdbench.store import RunDir, atomic_write_json, atomic_write_text
from kdbench.train.callbacks import RichProgressCallback, RunLogCallback, peak_memory_mb, trim_run_log
from kdbench.train.checkpoints import checkpoint_step, complete_checkpoints, remove_incomplete_checkpoints
from kdbench.train.recovery import seed_continuation
from kdbench.train.settings import SELECT_METRICS, TrainResult


def training_arguments(config, checkpoints_dir: Path, *, evaluate: bool, eval_steps: int):
    """The ``TrainingArguments`` of a run."""
    import torch
    from transformers import TrainingArguments

    return TrainingArguments(
        output_dir=str(checkpoints_dir),
        per_device_train_batch_size=config.batch_size,
        per_device_eval_batch_size=config.batch_size,
        gradient_accumulation_steps=config.grad_accum,
        learning_rate=config.learning_rate,
        optim=config.optim,
        weight_decay=config.weight_decay,
        max_grad_norm=config.max_grad_norm,
        **version_kwargs(config),
        lr_scheduler_type=config.lr_scheduler,
        num_train_epochs=config.num_epochs,
        max_steps=config.max_steps,
        logging_steps=config.logging_steps,
        save_strategy="steps",
        save_steps=config.save_steps,
        save_total_limit=config.save_total_limit,
        eval_strategy="steps" if evaluate else "no",
        eval_steps=eval_steps if evaluate else None,
        load_best_model_at_end=config.select == "best" and evaluate,
        metric_for_best_model=f"eval_{config.select_metric}",
        greater_is_better=SELECT_METRICS[config.select_metric],
        seed=config.seed,
        data_seed=config.seed,
        bf16=config.bf16,
        report_to=[] if config.report_to == "none" else [config.report_to],
        remove_unused_columns=False,  # example_index / prompt_length reach compute_loss
        average_tokens_across_devices=True,
        disable_tqdm=True,
        use_cpu=not torch.cuda.is_available(),
        dataloader_num_workers=0,
        save_only_model=False,
    )


def version_kwargs(config) -> dict:
    """Arguments whose names differ between transformers 4.x and 5.x: 5 takes a warmup ratio as a
    float ``warmup_steps`` and the length-grouped sampler as ``train_sampling_strategy``."""
    from transformers import TrainingArguments

    names = {f.name for f in dataclasses.fields(TrainingArguments)}
    kwargs = {"warmup_ratio": config.warmup_ratio} if "warmup_ratio" in names else {"warmup_steps": config.warmup_ratio}
    if config.group_by_length:
        if "train_sampling_strategy" in names:
            kwargs["train_sampling_strategy"] = "group_by_length"
        else:
            kwargs["group_by_length"] = True
    return kwargs


def save_model_atomically(model, tokenizer, model_dir: Path, state_dict: dict | None = None) -> None:
    """``model`` and ``tokenizer`` saved into ``model_dir``: written to a temporary folder beside it, then
    swapped in, so ``model_dir`` is never half written. ``state_dict``: the weights to write instead of the
    model's own (a sharded model's gathered state)."""
    tmp = model_dir.parent / f".{model_dir.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(str(tmp), state_dict=state_dict)
    tokenizer.save_pretrained(str(tmp))
    if model_dir.exists():
        shutil.rmtree(model_dir)
    os.replace(tmp, model_dir)


class TrainRun:
    """The run directory of one training run and everything done to it (module docstring)."""

    def __init__(self, run: RunDir, config, recipe, say, clock):
        self.dir = run
        self.config = config
        self.recipe = recipe
        self.say = say
        self.clock = clock

    @classmethod
    def open(cls, config, recipe, *, say, clock, command: list[str] | None = None) -> "TrainRun":
        """Create the run directory (or reopen it to resume) with the resolved configuration."""
        recorded = {**to_dict(config), "params": recipe.params, "recipe": recipe.name,
                    "recipe_file": recipe.path.name, "objective": recipe.objective.name, "stages": list(recipe.stages)}
        run = RunDir.create(config.output_dir, config.run_dir_name, kind="train", config=recorded,
                            command=command or sys.argv)
        return cls(run, config, recipe, say, clock)

    @property
    def path(self) -> Path:
        return self.dir.path

    @property
    def model_dir(self) -> Path:
        return self.dir.path / "model"

    @property
    def checkpoints_dir(self) -> Path:
        return self.dir.path / "checkpoints"

    def finished(self) -> TrainResult | None:
        """The result of a run that already finished (rerunning its command does nothing), else None."""
        if not (self.dir.complete and (self.model_dir / "config.json").exists()):
            return None
        self.say(f"run {self.dir.path} is already complete; nothing to do")
        try:
            cost = json.loads((self.dir.path / "cost.json").read_text())
        except (OSError, ValueError):
            cost = {}
        return TrainResult(self.dir, self.model_dir, cost, cost.get("final_train_loss"), cost.get("validation"))

    def mark(self, stage: str, facts: dict) -> None:
        self.dir.stages.mark(stage, facts)

    def log(self, message: str) -> None:
        self.dir.log(message)

    def arguments(self, *, evaluate: bool, group_by_length: bool | None = None):
        """``TrainingArguments`` for this run (``evaluate``: validate while training)."""
        config = self.config
        if group_by_length is not None and group_by_length != config.group_by_length:
            config = dataclasses.replace(config, group_by_length=group_by_length)
        return training_arguments(config, self.checkpoints_dir, evaluate=evaluate,
                                  eval_steps=config.eval_steps or config.save_steps)

    def callbacks(self, extra: list | None, progress: bool) -> list:
        """The run log, the caller's callbacks and (with ``progress``) a progress bar."""
        out = [RunLogCallback(self.dir.path / "train_log.jsonl")] + list(extra or [])
        if progress:
            out.append(RichProgressCallback(f"train {self.config.method}"))
        return out

    def fit(self, trainer) -> tuple[object, bool]:
        """``trainer.train()`` from the last complete checkpoint (if any); returns (output, resumed).

        Incomplete checkpoints (a save killed midway) are deleted first; the engine's counters and the run's
        ``train_log.jsonl`` are rewound to the resumed step; a run with ``continue_from`` and no checkpoint of
        its own starts from a copy of that checkpoint."""
        from transformers.trainer_callback import PrinterCallback

        trainer.remove_callback(PrinterCallback)  # the run log and the progress bar replace its prints
        if trainer.is_world_process_zero():
            for removed in remove_incomplete_checkpoints(self.checkpoints_dir):
                self.dir.log(f"removed incomplete checkpoint {removed} (a save was interrupted)")
        trainer.accelerator.wait_for_everyone()
        resume = complete_checkpoints(self.checkpoints_dir)
        continue_from = self.dir.config().get("continue_from")
        if not resume and continue_from:  # a new run continuing from another run's checkpoint
            if trainer.is_world_process_zero():
                seed_continuation(continue_from, self.checkpoints_dir, trainer.args.learning_rate,
                                  self.dir.path / "train_log.jsonl")
                self.dir.log(f"continuing from {continue_from} at learning_rate {trainer.args.learning_rate:g}")
            trainer.accelerator.wait_for_everyone()
            resume = complete_checkpoints(self.checkpoints_dir)
        if resume:
            self.say(f"resuming from {resume[-1]}")
            self.dir.log(f"resuming from {resume[-1]}")
            trainer.restore_counters(resume[-1])
            if trainer.is_world_process_zero():
                trim_run_log(self.dir.path / "train_log.jsonl", checkpoint_step(resume[-1]))
        output = trainer.train(resume_from_checkpoint=str(resume[-1]) if resume else None)
        if not trainer.counters["response_tokens"]:
            raise TrainingError(f"The run trained on 0 response tokens in {trainer.state.global_step} steps, so the "
                                "model learned nothing; check that the tokenizer encodes the data and that max_length "
                                "leaves room for responses, then start again.")
        return output, bool(resume)

    def train(self, trainer, tokenizer, *, validate: bool, cost: dict, teacher=None) -> TrainResult:
        """Train (:meth:`fit`) and finish: validation when ``validate``, ``cost.json`` (the engine's counters,
        the stages' and the kind's ``cost`` facts), the model and its card, checkpoints removed, run complete."""
        output, resumed = self.fit(trainer)
        config = self.config
        final_loss = output.training_loss if output is not None else None
        validation = None
        if validate:
            validation = {k[len("eval_"):]: v for k, v in trainer.evaluate().items() if k.startswith("eval_")}
        best = config.select == "best"
        trainer.model.config.kdbench_prompt_style = config.prompt_style  # evaluation warns on a mismatch
        counters = trainer.cost_counters()
        selected_checkpoint = getattr(trainer.state, "best_model_checkpoint", None) if best else None
        cost = {
            "wall_seconds": self.clock.seconds,
            "train_seconds": counters["train_seconds"],
            "optimizer_steps": trainer.state.global_step,
            "tokens_processed": counters["tokens_processed"],
            "response_tokens_trained": counters["response_tokens"],
            "teacher_forward_tokens": counters["teacher_forward_tokens"],
            "lm_tokens": counters["lm_tokens"],
            **peak_memory_mb(),
            "student_parameters": count_parameters(trainer.model),
            "processes": trainer.accelerator.num_processes,
            "final_train_loss": final_loss,
            "selected": config.select if validate else "last",
            "select_metric": config.select_metric if best else None,
            "selected_checkpoint": selected_checkpoint,
            "best_metric": getattr(trainer.state, "best_metric", None) if best else None,
            "validation": validation,
            "resumed": resumed,
            **({"sharding": trainer.sharding_seen} if getattr(trainer, "sharding_seen", None) else {}),
            **({trainer.sampling.counter: counters[trainer.sampling.counter]} if trainer.sampling is not None else {}),
            **(getattr(trainer.sampling, "cost_facts", dict)() if trainer.sampling is not None else {}),
            **cost,
            "generated_tokens": cost.get("generated_tokens", 0) + counters["generated_tokens"],
        }
        gathered = trainer.gathered_state_dict()  # a sharded student: its weights gathered on rank 0 (collective)
        if trainer.is_world_process_zero():
            save_model_atomically(trainer.model, tokenizer, self.model_dir, gathered)
            atomic_write_json(self.dir.path / "cost.json", cost)
            atomic_write_text(self.model_dir / "README.md", model_card(config, self.recipe, cost))
            self.mark("train", {"optimizer_steps": trainer.state.global_step, "selected_checkpoint": selected_checkpoint})
        trainer.accelerator.wait_for_everyone()
        if trainer.is_world_process_zero():
            shutil.rmtree(self.checkpoints_dir, ignore_errors=True)  # they exist for resuming; the model is kept
            self.dir.finish("complete", model_dir=str(self.model_dir))
        self.say(f"trained {config.method} in {cost['wall_seconds']:.1f}s ({cost['optimizer_steps']} steps); "
                 f"model at {self.model_dir}")
        return TrainResult(self.dir, self.model_dir, cost, final_loss, validation, trainer=trainer, teacher=teacher)


def model_card(config, recipe, cost: dict) -> str:
    """The model card (``model/README.md``) of a finished run: recipe, models, data, cost, settings."""
    rows = "\n".join(f"| {k} | {v} |" for k, v in sorted(recipe.params.items()))
    settings = ("learning_rate", "lr_scheduler", "warmup_ratio", "weight_decay", "batch_size", "grad_accum",
                "max_length", "max_prompt_length", "prompt_style", "seed", "select", "teacher_signal", "teacher_topk")
    setting_rows = "\n".join(f"| {k} | {getattr(config, k)} |" for k in settings)
    validation = cost.get("validation") or {}
    metric_rows = "\n".join(f"| validation {k} | {v:.6g} |" for k, v in validation.items()
                            if isinstance(v, float)) or "| (no validation set) | |"
    kept = cost["selected"]
    if kept == "best":
        kept += f" ({cost['select_metric']}, {cost['selected_checkpoint']})"
    return (
        f"---\nlibrary_name: transformers\ntags: [kdbench, distillation, {config.method}]\n---\n\n"
        f"# {config.method} student (kdbench)\n\n"
        f"Trained with kdbench recipe `{recipe.name}` ({recipe.description}).\n\n"
        f"- Method: `{config.method}` (recipe file `{recipe.path.name}`; stages: {', '.join(recipe.stages)})\n"
        f"- Teacher: `{config.teacher}`\n- Initial student: `{config.student}`\n- Data: `{config.data}`"
        f" (validation: `{config.valid_data or f'{config.valid_fraction:g} held out'}`)\n"
        f"- Steps: {cost['optimizer_steps']}; final training loss: {cost['final_train_loss']}\n"
        f"- Model kept: {kept}\n"
        f"- Cost: {cost['wall_seconds']} s wall; {cost['tokens_processed']} tokens processed; "
        f"{cost['teacher_forward_tokens']} teacher forward tokens; {cost['generated_tokens']} generated tokens; "
        f"peak RSS {cost['peak_rss_mb']} MiB\n\n"
        f"## Metrics\n\n| metric | value |\n|---|---|\n{metric_rows}\n\n"
        f"## Hyperparameters\n\n| setting | value |\n|---|---|\n{setting_rows}\n\n"
        f"| method parameter | value |\n|---|---|\n{rows}\n\nCitation: {recipe.citation}\n"
    )
