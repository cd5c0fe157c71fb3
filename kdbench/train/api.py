"""``train()``: one method recipe, end to end, into a run directory."""

from __future__ import annotations

import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from kdbench import registry
from kdbench.config import option, to_dict
from kdbench.errors import ConfigError
from kdbench.store import RunDir, atomic_write_json, atomic_write_text


@dataclass
class TrainConfig:
    method: str = option("sft", "Method recipe name (kdbench list methods).")
    student: str = option("", "Student model: a local directory or a Hugging Face id (the model that is trained).")
    teacher: str | None = option(None, "Teacher model directory or id (token-level KD methods need one).")
    data: str = option("", "Training data: JSONL/JSON/Parquet with instruction, input, output.")
    valid_data: str | None = option(None, "Validation data (same format); default: hold out valid_fraction of data.")
    valid_fraction: float = option(0.05, "Fraction of data held out for validation when valid_data is not given.")
    output_dir: str = option("runs", "Folder in which the run directory is created.")
    run_name: str | None = option(None, "Run directory name (default: METHOD-seedS). Rerunning it resumes.")
    seed: int = option(1, "Training seed (initial data order, dropout).")
    learning_rate: float = option(5e-4, "Peak learning rate (AdamW).")
    weight_decay: float = option(0.0, "AdamW weight decay.")
    warmup_ratio: float = option(0.05, "Fraction of steps with linear warmup.")
    lr_scheduler: str = option("cosine", "Learning-rate schedule (a transformers scheduler name).")
    num_epochs: float = option(3.0, "Training epochs (ignored when max_steps > 0).")
    max_steps: int = option(-1, "Optimizer steps; -1 means use num_epochs.")
    batch_size: int = option(16, "Micro-batch size per process.")
    grad_accum: int = option(1, "Gradient accumulation steps per optimizer step.")
    max_prompt_length: int = option(256, "Prompt tokens kept (cut from the left).")
    max_length: int = option(512, "Prompt + response tokens kept (the response is cut at the end).")
    prompt_style: str = option("alpaca", "Prompt template: alpaca, compact (embedded benchmark) or chat.")
    select: str = option("last", "Model kept at the end: 'last' or 'best' (lowest validation loss).")
    eval_steps: int = option(0, "Validate every N steps (0: once per epoch when select=best, else never).")
    save_steps: int = option(200, "Checkpoint every N optimizer steps (resume point).")
    logging_steps: int = option(10, "Log loss components every N steps.")
    group_by_length: bool = option(False, "Batch examples of similar length together (less padding, faster).")
    bf16: bool = option(False, "Mixed precision in bfloat16.")
    report_to: str = option("none", "Logging integrations for transformers (none, tensorboard, wandb, ...).")
    params: dict = option(factory=dict, help="Method parameters overriding the recipe's (see the recipe file).")

    def __post_init__(self):
        checks = [
            (self.learning_rate > 0, "learning_rate must be greater than 0."),
            (self.batch_size >= 1, "batch_size must be at least 1."),
            (self.grad_accum >= 1, "grad_accum must be at least 1."),
            (self.max_steps > 0 or self.num_epochs > 0, "Set max_steps > 0 or num_epochs > 0."),
            (0 < self.valid_fraction < 1, "valid_fraction must be between 0 and 1."),
            (self.select in ("last", "best"), "select must be 'last' or 'best'."),
            (self.prompt_style in ("alpaca", "compact", "chat"), "prompt_style must be alpaca, compact or chat."),
            (self.max_prompt_length >= 1 and self.max_length > self.max_prompt_length,
             "max_length must be larger than max_prompt_length."),
            (0 <= self.warmup_ratio < 1, "warmup_ratio must be in [0, 1)."),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(f"Setting {message}" if message[0].islower() else message)


@dataclass
class TrainResult:
    run: RunDir
    model_dir: Path
    cost: dict
    final_train_loss: float | None


def resolve_recipe(method: str, overrides: dict) -> tuple[registry.Entry, dict]:
    """The recipe entry and its parameters with the user's overrides (unknown names rejected)."""
    from kdbench.train.objectives import get_objective

    entry = registry.get("trainers", method)
    objective = get_objective(entry.body.get("objective", ""))
    params = dict(entry.body.get("params") or {})
    unknown = sorted(set(overrides) - set(params))
    if unknown:
        raise ConfigError(f"Method {method} has no parameter {unknown[0]!r}; its parameters are: "
                          f"{', '.join(sorted(params)) or '(none)'}.")
    params.update(overrides)
    if objective.validate:
        objective.validate(params)
    return entry, params


def _split_validation(examples, fraction: float, seed: int):
    import random

    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    n_valid = max(1, int(round(fraction * len(examples)))) if len(examples) > 1 else 0
    valid_idx = set(order[:n_valid])
    return [e for i, e in enumerate(examples) if i not in valid_idx], [e for i, e in enumerate(examples) if i in valid_idx]


def train(config: TrainConfig, *, log: Callable[[str], None] | None = None, command: list[str] | None = None,
          progress: bool = True) -> TrainResult:
    """Train ``config.student`` with ``config.method``; returns the run and the saved model directory.

    Rerunning with the same ``output_dir``/``run_name`` resumes from the last complete checkpoint;
    a run that already finished is returned as is.
    """
    import torch
    from transformers import TrainingArguments

    from kdbench.data import PadCollator, build_dataset, load_examples
    from kdbench.models import check_same_vocabulary, count_parameters, load_model, load_tokenizer
    from kdbench.train.engine import (CompleteCheckpointCallback, DistillTrainer, RichProgressCallback,
                                      RunLogCallback, Stopwatch, complete_checkpoints, peak_rss_mb)
    from kdbench.train.objectives import get_objective

    say = log or (lambda message: None)
    entry, params = resolve_recipe(config.method, config.params)
    objective = get_objective(entry.body["objective"])
    if not config.student:
        raise ConfigError("Give the student model (--student DIR or a Hugging Face id).")
    if not config.data:
        raise ConfigError("Give the training data (--data FILE.jsonl).")
    if objective.needs_teacher and not config.teacher:
        raise ConfigError(f"Method {config.method} needs a teacher; pass --teacher DIR or a Hugging Face id.")

    # Validate everything the user gave before any heavy work or any file is written.
    examples = load_examples(config.data)
    if config.valid_data:
        train_examples, valid_examples = examples, load_examples(config.valid_data)
    else:
        train_examples, valid_examples = _split_validation(examples, config.valid_fraction, config.seed)
    tokenizer = load_tokenizer(config.student)
    student = load_model(config.student)
    teacher = None
    if objective.needs_teacher:
        teacher_tokenizer = load_tokenizer(config.teacher)
        teacher = load_model(config.teacher, trainable=False)
        params["vocab_size"] = check_same_vocabulary(teacher, teacher_tokenizer, student, tokenizer)

    run_name = config.run_name or f"{config.method}-seed{config.seed}"
    run = RunDir.create(config.output_dir, run_name, kind="train",
                        config={**to_dict(config), "params": params, "recipe": entry.name,
                                "recipe_file": entry.path.name, "objective": entry.body["objective"]},
                        command=command or sys.argv)
    model_dir = run.path / "model"
    if run.complete and (model_dir / "config.json").exists():
        say(f"run {run.path} is already complete; nothing to do")
        cost = _read_json(run.path / "cost.json")
        return TrainResult(run, model_dir, cost, cost.get("final_train_loss"))

    clock = Stopwatch()
    train_set = build_dataset(train_examples, tokenizer, style=config.prompt_style,
                              max_prompt_length=config.max_prompt_length, max_length=config.max_length)
    valid_set = build_dataset(valid_examples, tokenizer, style=config.prompt_style,
                              max_prompt_length=config.max_prompt_length, max_length=config.max_length) if valid_examples else None
    if train_set.n_truncated:
        say(f"warning: {train_set.n_truncated} of {len(train_set)} training examples were truncated "
            f"(max_prompt_length={config.max_prompt_length}, max_length={config.max_length})")
    run.log(f"method={config.method} train={len(train_set)} valid={len(valid_set) if valid_set else 0} "
            f"truncated={train_set.n_truncated}")

    checkpoints_dir = run.path / "checkpoints"
    evaluate = config.select == "best" or config.eval_steps > 0
    eval_strategy = ("steps" if config.eval_steps > 0 else "epoch") if evaluate and valid_set else "no"
    save_strategy = "steps" if eval_strategy != "epoch" else "epoch"
    args = TrainingArguments(
        output_dir=str(checkpoints_dir),
        per_device_train_batch_size=config.batch_size,
        per_device_eval_batch_size=config.batch_size,
        gradient_accumulation_steps=config.grad_accum,
        learning_rate=config.learning_rate,
        weight_decay=config.weight_decay,
        **_version_kwargs(config),
        lr_scheduler_type=config.lr_scheduler,
        num_train_epochs=config.num_epochs,
        max_steps=config.max_steps,
        logging_steps=config.logging_steps,
        save_strategy=save_strategy,
        save_steps=config.save_steps,
        save_total_limit=3,
        eval_strategy=eval_strategy,
        eval_steps=config.eval_steps or None,
        load_best_model_at_end=config.select == "best" and eval_strategy != "no",
        metric_for_best_model="eval_loss",
        greater_is_better=False,
        seed=config.seed,
        data_seed=config.seed,
        bf16=config.bf16,
        report_to=[] if config.report_to == "none" else [config.report_to],
        remove_unused_columns=False,
        disable_tqdm=True,
        use_cpu=not torch.cuda.is_available(),
        dataloader_num_workers=0,
        save_only_model=False,
    )
    callbacks = [CompleteCheckpointCallback(), RunLogCallback(run.path / "train_log.jsonl")]
    if progress:
        callbacks.append(RichProgressCallback(f"train {config.method}"))
    trainer = DistillTrainer(model=student, args=args, train_dataset=train_set, eval_dataset=valid_set,
                             data_collator=PadCollator(tokenizer.pad_token_id), callbacks=callbacks,
                             objective=objective, params=params, teacher=teacher)
    from transformers.trainer_callback import PrinterCallback

    trainer.remove_callback(PrinterCallback)  # the run log and the progress bar replace its prints
    resume = complete_checkpoints(checkpoints_dir)
    if resume:
        say(f"resuming from {resume[-1]}")
        run.log(f"resuming from {resume[-1]}")
    try:
        output = trainer.train(resume_from_checkpoint=str(resume[-1]) if resume else None)
    except BaseException:
        run.finish("failed")
        raise

    final_loss = output.training_loss if output is not None else None
    best = getattr(trainer.state, "best_model_checkpoint", None)
    trainer.model.config.kdbench_prompt_style = config.prompt_style  # evaluation warns on a mismatch
    _save_model_atomically(trainer.model, tokenizer, model_dir)
    cost = {
        "wall_seconds": clock.seconds,
        "optimizer_steps": trainer.state.global_step,
        "tokens_processed": trainer.tokens_processed,
        "teacher_forward_tokens": trainer.teacher_tokens,
        "generated_tokens": 0,
        "train_examples": len(train_set),
        "response_tokens_per_epoch": train_set.n_response_tokens,
        "peak_rss_mb": round(peak_rss_mb(), 1),
        "student_parameters": count_parameters(trainer.model),
        "final_train_loss": final_loss,
        "selected": config.select,
        "selected_checkpoint": best,
        "resumed": bool(resume),
    }
    atomic_write_json(run.path / "cost.json", cost)
    atomic_write_text(model_dir / "README.md", _model_card(config, entry, params, cost))
    # checkpoints exist for resuming; a finished run keeps only the final model
    shutil.rmtree(checkpoints_dir, ignore_errors=True)
    run.finish("complete", model_dir=str(model_dir))
    say(f"trained {config.method} in {cost['wall_seconds']:.1f}s ({cost['optimizer_steps']} steps); model at {model_dir}")
    return TrainResult(run, model_dir, cost, final_loss)


def _version_kwargs(config: TrainConfig) -> dict:
    """Arguments whose names differ between transformers 4.x and 5.x: 5 takes a warmup ratio as a
    float ``warmup_steps`` and the length-grouped sampler as ``train_sampling_strategy``."""
    import dataclasses

    from transformers import TrainingArguments

    names = {f.name for f in dataclasses.fields(TrainingArguments)}
    kwargs = {"warmup_ratio": config.warmup_ratio} if "warmup_ratio" in names else {"warmup_steps": config.warmup_ratio}
    if config.group_by_length:
        if "train_sampling_strategy" in names:
            kwargs["train_sampling_strategy"] = "group_by_length"
        else:
            kwargs["group_by_length"] = True
    return kwargs


def _save_model_atomically(model, tokenizer, model_dir: Path) -> None:
    tmp = model_dir.parent / f".{model_dir.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(str(tmp))
    tokenizer.save_pretrained(str(tmp))
    if model_dir.exists():
        shutil.rmtree(model_dir)
    os.replace(tmp, model_dir)


def _read_json(path: Path) -> dict:
    import json

    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def _model_card(config: TrainConfig, entry, params: dict, cost: dict) -> str:
    rows = "\n".join(f"| {k} | {v} |" for k, v in sorted(params.items()))
    return (
        f"---\nlibrary_name: transformers\ntags: [kdbench, distillation, {config.method}]\n---\n\n"
        f"# {config.method} student (kdbench)\n\n"
        f"Trained with kdbench recipe `{entry.name}` ({entry.description}).\n\n"
        f"- Teacher: `{config.teacher}`\n- Initial student: `{config.student}`\n- Data: `{config.data}`\n"
        f"- Seed: {config.seed}; learning rate {config.learning_rate}; batch {config.batch_size} x {config.grad_accum}; "
        f"steps {cost['optimizer_steps']}\n- Final training loss: {cost['final_train_loss']}\n"
        f"- Wall time: {cost['wall_seconds']} s; tokens processed: {cost['tokens_processed']}\n\n"
        f"| parameter | value |\n|---|---|\n{rows}\n\nCitation: {entry.body.get('citation', '')}\n"
    )

