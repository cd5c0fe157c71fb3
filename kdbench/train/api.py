"""``train()``: one method recipe, end to end, into a run directory.

A run goes through stages, each recorded in ``stages.json`` of the run directory when it finishes,
so a rerun of the same command resumes at the first unfinished stage:

1. ``generate`` (SeqKD): the teacher's responses to the training prompts, in the artifact store;
   batches are appended to a partial file in the run directory, so a killed generation resumes
   where it stopped.
2. ``teacher_cache`` (``teacher_signal: topk``): the teacher's top-k signal on the training (and
   validation) set, in the artifact store (:mod:`kdbench.teacher_cache`); its build time is
   reported apart from training.
3. ``train``: :class:`~kdbench.train.engine.DistillTrainer`, resumed from the last *complete*
   checkpoint (a checkpoint killed mid-write is deleted and never resumed from).

The finished run holds ``model/`` (a Hugging Face checkpoint with a model card), ``cost.json``
(wall time, tokens processed, teacher forward tokens, generated tokens, peak memory, cache build
time) and ``train_log.jsonl`` (per-step loss components and diagnostics).
"""

from __future__ import annotations

import os
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from kdbench import registry
from kdbench.config import option, to_dict
from kdbench.errors import ConfigError, DataError
from kdbench.store import RunDir, atomic_write_json, atomic_write_text

RESPONSE_SOURCES = ("gold", "teacher", "on_policy")
# name -> greater is better; the reward metrics exist for preference pipelines (held-out pairs)
SELECT_METRICS = {"loss": False, "ce": False, "token_accuracy": True, "reward_accuracy": True, "reward_margin": True}
PAIR_SELECT_METRICS = ("loss", "reward_accuracy", "reward_margin")


@dataclass
class TrainConfig:
    method: str = option("sft", "Method recipe name (kdbench list methods).")
    student: str = option("", "Student model: a local directory or a Hugging Face id (the model that is trained).")
    teacher: str | None = option(None, "Teacher model directory or id (KD methods need one).")
    data: str = option("", "Training data: JSONL/JSON/Parquet with instruction, input, output; or "
                           "hf://OWNER/NAME@REVISION[:SPLIT] (a hub dataset at a pinned revision).")
    valid_data: str | None = option(None, "Validation data (same forms); default: hold out valid_fraction of data.")
    valid_fraction: float = option(0.05, "Fraction of data held out for validation when valid_data is not given.")
    lm_data: str | None = option(None, "Plain-text corpus (.txt, blank-line separated, or .jsonl with text) for an LM-loss term.")
    lm_weight: float = option(0.5, "Weight of the LM loss on lm_data (token mean over the step's LM tokens).")
    output_dir: str = option("runs", "Folder in which the run directory is created.")
    run_name: str | None = option(None, "Run directory name (default: METHOD-seedS). Rerunning it resumes.")
    continue_from: str | None = option(None, "A complete checkpoint of an earlier run (RUN/checkpoints/checkpoint-N) "
                                             "this new run continues from: its weights, optimizer state and step; "
                                             "the schedule goes on at this run's learning_rate (a diverged run's "
                                             "error names the checkpoint to use).")
    seed: int = option(1, "Training seed (initial data order, dropout, on-policy sampling).")
    learning_rate: float = option(5e-4, "Peak learning rate.")
    optim: str = option("adamw_torch", "Optimizer (a transformers optimizer name: adamw_torch, sgd, ...).")
    weight_decay: float = option(0.0, "AdamW weight decay.")
    warmup_ratio: float = option(0.05, "Fraction of steps with linear warmup.")
    lr_scheduler: str = option("cosine", "Learning-rate schedule (a transformers scheduler name).")
    max_grad_norm: float = option(1.0, "Gradient clipping norm (0 = off).")
    num_epochs: float = option(3.0, "Training epochs (ignored when max_steps > 0).")
    max_steps: int = option(-1, "Optimizer steps; -1 means use num_epochs.")
    batch_size: int = option(16, "Micro-batch size per process.")
    grad_accum: int = option(1, "Gradient accumulation steps per optimizer step.")
    max_prompt_length: int = option(256, "Prompt tokens kept (cut from the left).")
    max_length: int = option(512, "Prompt + response tokens kept (the response is cut at the end).")
    prompt_style: str = option("alpaca", "Prompt template: alpaca, compact (embedded benchmark) or chat.")
    select: str = option("last", "Model kept at the end: 'last' or 'best' (on the validation select_metric).")
    select_metric: str = option("loss", "Validation metric for select=best: loss (the recipe's), ce or token_accuracy; "
                                        "preference methods: loss, reward_accuracy or reward_margin.")
    eval_steps: int = option(0, "Validate every N steps (0: every save_steps when select=best, else never).")
    save_steps: int = option(200, "Checkpoint every N optimizer steps (resume point).")
    save_total_limit: int = option(3, "Complete checkpoints kept while training.")
    logging_steps: int = option(10, "Log loss components every N steps.")
    group_by_length: bool = option(False, "Batch examples of similar length together (less padding, faster).")
    bf16: bool = option(False, "Mixed precision in bfloat16 (student).")
    teacher_dtype: str = option("float32", "Teacher weights dtype for the online forward: float32 or bfloat16.")
    teacher_signal: str = option("online", "Teacher signal: online (forward in the same step) or topk (offline cache).")
    teacher_topk: int = option(64, "k of the offline top-k teacher cache.")
    teacher_cache_dtype: str = option("float32", "Log-prob dtype of the top-k cache: float32 or float16.")
    generation_batch_size: int = option(32, "Prompts per batch when the teacher or student generates.")
    cache_dir: str | None = option(None, "Artifact store for teacher caches and generations (default: the kdbench cache).")
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
            (self.select_metric in SELECT_METRICS, f"select_metric must be one of {', '.join(SELECT_METRICS)}."),
            (self.prompt_style in ("alpaca", "compact", "chat"), "prompt_style must be alpaca, compact or chat."),
            (self.max_prompt_length >= 1 and self.max_length > self.max_prompt_length,
             "max_length must be larger than max_prompt_length."),
            (0 <= self.warmup_ratio < 1, "warmup_ratio must be in [0, 1)."),
            (self.weight_decay >= 0, "weight_decay must not be negative."),
            (self.max_grad_norm >= 0, "max_grad_norm must not be negative (0 turns clipping off)."),
            (self.save_steps >= 1 and self.logging_steps >= 1, "save_steps and logging_steps must be at least 1."),
            (self.eval_steps >= 0, "eval_steps must be 0 or more."),
            (self.save_total_limit >= 1, "save_total_limit must be at least 1."),
            (self.teacher_signal in ("online", "topk"), "teacher_signal must be 'online' or 'topk'."),
            (self.teacher_topk >= 1, "teacher_topk must be at least 1."),
            (self.teacher_dtype in ("float32", "bfloat16"), "teacher_dtype must be float32 or bfloat16."),
            (self.teacher_cache_dtype in ("float32", "float16"), "teacher_cache_dtype must be float32 or float16."),
            (self.generation_batch_size >= 1, "generation_batch_size must be at least 1."),
            (self.lm_weight >= 0, "lm_weight must not be negative."),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(f"Setting {message}" if message[0].islower() else message)
        if self.continue_from:
            from kdbench.train.recovery import check_continuation_source

            check_continuation_source(self.continue_from)


@dataclass
class TrainResult:
    run: RunDir
    model_dir: Path
    cost: dict
    final_train_loss: float | None
    validation: dict | None = None
    trainer: object = field(default=None, repr=False)  # the DistillTrainer (None for a run found complete)
    teacher: object = field(default=None, repr=False)  # the teacher model object the run used, if any


def resolve_recipe(method: str, overrides: dict) -> tuple[registry.Entry, dict]:
    """The recipe entry and its parameters with the user's overrides (unknown names rejected)."""
    from kdbench.train.objectives import get_objective

    entry = registry.get("trainers", method)
    objective = get_objective(entry.body.get("objective", ""))
    if entry.body.get("responses", "gold") not in RESPONSE_SOURCES:
        raise ConfigError(f"Recipe {entry.path.name} has responses {entry.body.get('responses')!r}; use one of "
                          f"{', '.join(RESPONSE_SOURCES)}.")
    params = dict(entry.body.get("params") or {})
    unknown = sorted(set(overrides) - set(params))
    if unknown:
        raise ConfigError(f"Method {method} has no parameter {unknown[0]!r}; its parameters are: "
                          f"{', '.join(sorted(params)) or '(none)'}.")
    for key, value in overrides.items():
        if isinstance(params.get(key), dict) and isinstance(value, dict):
            params[key] = {**params[key], **value}
        else:
            params[key] = value
    if objective.validate:
        objective.validate(params)
    for name, settings in params.items():  # a stage's settings: known names, valid values, before any work
        if name.endswith("_settings") and isinstance(settings, dict):
            from kdbench.config import build

            build(TrainConfig, settings, prefix=f"params.{name}")
    return entry, params


def split_validation(examples, fraction: float, seed: int):
    import random

    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    n_valid = max(1, int(round(fraction * len(examples)))) if len(examples) > 1 else 0
    valid_idx = set(order[:n_valid])
    return [e for i, e in enumerate(examples) if i not in valid_idx], [e for i, e in enumerate(examples) if i in valid_idx]


class Stages:
    """``stages.json`` of a run: which stages finished, with their facts (a rerun skips them)."""

    def __init__(self, run: RunDir):
        self.path = run.path / "stages.json"

    def read(self) -> dict:
        import json

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


def train(config: TrainConfig, *, log: Callable[[str], None] | None = None, command: list[str] | None = None,
          progress: bool = True, callbacks: list | None = None) -> TrainResult:
    """Train ``config.student`` with ``config.method``; returns the run and the saved model directory.

    Rerunning with the same ``output_dir``/``run_name`` resumes (see the module docstring); a run
    that already finished is returned as is. ``callbacks``: extra ``TrainerCallback`` objects.
    """

    from kdbench.data import SFTDataset, build_dataset, load_examples
    from kdbench.models import check_same_vocabulary, count_parameters, load_model, load_tokenizer
    from kdbench.store import ArtifactStore
    from kdbench.train.data_sources import IndexedDataset, TrainCollator, load_text_corpus, resolve_data_path
    from kdbench.train.engine import (DistillTrainer, LMSource, OnPolicyConfig, RichProgressCallback, RunLogCallback,
                                      Stopwatch, peak_memory_mb, train_resuming)
    from kdbench.train.objectives import get_objective
    from kdbench.train.responses import GOLD_END, tokenize_response

    say = log or (lambda message: None)
    clock = Stopwatch()
    entry, params = resolve_recipe(config.method, config.params)
    if entry.body.get("objective") == "preference":  # sequence-level pipelines (dDPO, rDPO, daDPO, DPO, SimPO)
        from kdbench.train.pipeline import train_preference

        return train_preference(config, entry, params, log=say, command=command, progress=progress,
                                callbacks=callbacks)
    if entry.body.get("objective") == "guided":  # DCKD, ADPA, ADPA+ on preference data
        from kdbench.train.guided import train_guided

        return train_guided(config, entry, params, log=say, command=command, progress=progress, callbacks=callbacks)
    objective = get_objective(entry.body["objective"])
    if config.select_metric not in ("loss", "ce", "token_accuracy"):
        raise ConfigError(f"select_metric {config.select_metric} is measured on held-out preference pairs; method "
                          f"{config.method} trains on responses, so use loss, ce or token_accuracy.")
    responses = entry.body.get("responses", "gold")
    needs_teacher = objective.needs_teacher or responses == "teacher"
    require_inputs(config, needs_teacher)
    loaded_teacher = None
    use_cache = objective.needs_teacher and config.teacher_signal == "topk"
    if use_cache and responses == "on_policy":
        raise ConfigError(f"Method {config.method} trains on fresh student samples, which no offline cache can cover; "
                          "use --set teacher_signal=online.")
    store = ArtifactStore(config.cache_dir)

    # Validate everything the user gave before any heavy work or any file is written.
    data_path = resolve_data_path(config.data, store=store, log=say)
    # gold responses: for the training itself, or for the teacher's SFT stage (teacher_init: sft)
    examples = load_examples(data_path, require_output=responses != "teacher" or params.get("teacher_init") == "sft")
    if config.valid_data:
        train_examples = examples
        valid_examples = load_examples(resolve_data_path(config.valid_data, default_split="validation", store=store,
                                                         log=say))
    else:
        train_examples, valid_examples = split_validation(examples, config.valid_fraction, config.seed)
    valid_examples = [e for e in valid_examples if e.output.strip()]  # prompts without gold cannot be scored
    tokenizer = load_tokenizer(config.student)
    student = load_model(config.student)
    teacher = teacher_tokenizer = None
    if needs_teacher:
        teacher_tokenizer = load_tokenizer(config.teacher)
        teacher = loaded_teacher = load_model(config.teacher, trainable=False, dtype=config.teacher_dtype)
        if objective.needs_teacher:  # token-level signal; a generating-only teacher (seqkd, dsft) may differ
            params["vocab_size"] = check_same_vocabulary(teacher, teacher_tokenizer, student, tokenizer)
    lm_blocks = load_text_corpus(config.lm_data, tokenizer, config.max_length) if config.lm_data else None
    if use_cache and config.teacher_topk > params["vocab_size"]:
        raise ConfigError(f"Setting teacher_topk ({config.teacher_topk}) exceeds the vocabulary size {params['vocab_size']}.")
    decoding = recipe_decoding(config, params, responses)

    run_name = config.run_name or f"{config.method}-seed{config.seed}"
    run = RunDir.create(config.output_dir, run_name, kind="train",
                        config={**to_dict(config), "params": params, "recipe": entry.name,
                                "recipe_file": entry.path.name, "objective": entry.body["objective"],
                                "responses": responses},
                        command=command or sys.argv)
    model_dir = run.path / "model"
    if (finished := finished_result(run, say)) is not None:
        return finished
    stages = Stages(run)
    extra_cost: dict = {}
    teacher_source = config.teacher

    # Stage 0 (teacher_init: sft): the teacher fine-tuned on the task first, once, shared by methods and seeds
    if needs_teacher and params.get("teacher_init", "given") == "sft":
        from kdbench.train.pipeline import prepared_teacher

        teacher_source, t_facts = prepared_teacher(config, params, store, run, say, str(data_path))
        stages.mark("teacher", t_facts)
        teacher = loaded_teacher = load_model(teacher_source, trainable=False, dtype=config.teacher_dtype)

    # Stage 1: teacher generations (SeqKD); each keeps the EOS its teacher stopped with (none if cut)
    train_ends = [GOLD_END] * len(train_examples)
    if responses == "teacher":
        train_examples, train_ends, facts = generation_stage(config, params, decoding, teacher, teacher_tokenizer,
                                                             train_examples, run, store, say,
                                                             model_name=teacher_source)
        stages.mark("generate", facts)
        extra_cost.update(generated_tokens=facts["generated_tokens"], generation_reused=facts["reused"],
                          generation_seconds=facts["build_seconds"])

    train_set = SFTDataset([tokenize_response(e, tokenizer, style=config.prompt_style,
                                              max_prompt_length=config.max_prompt_length,
                                              max_length=config.max_length, end=end)
                            for e, end in zip(train_examples, train_ends)])
    valid_set = build_dataset(valid_examples, tokenizer, style=config.prompt_style,
                              max_prompt_length=config.max_prompt_length, max_length=config.max_length) if valid_examples else None
    if not train_set.n_response_tokens:
        raise DataError(f"The {len(train_set)} training examples hold no response tokens after tokenization "
                        f"(max_length={config.max_length}); check the data's outputs and the student's tokenizer.")
    if train_set.n_truncated:
        say(f"warning: {train_set.n_truncated} of {len(train_set)} training examples were truncated "
            f"(max_prompt_length={config.max_prompt_length}, max_length={config.max_length})")
    run.log(f"method={config.method} train={len(train_set)} valid={len(valid_set) if valid_set else 0} "
            f"truncated={train_set.n_truncated} teacher_signal={config.teacher_signal if objective.needs_teacher else '-'}")

    # Stage 2: the offline top-k teacher cache
    train_cache = valid_cache = None
    if use_cache:
        from kdbench.teacher_cache import build_topk_cache

        common = dict(teacher_name=teacher_source, k=config.teacher_topk, temperature=float(params["temperature"]),
                      vocab_size=params["vocab_size"], store=store, batch_size=config.generation_batch_size,
                      logprobs_dtype=config.teacher_cache_dtype, pad_token_id=tokenizer.pad_token_id,
                      teacher_dtype=config.teacher_dtype, log=say)
        train_cache, info = build_topk_cache(teacher, train_set, **common)
        build_seconds, cache_tokens = info["build_seconds"], info["teacher_forward_tokens"]
        if valid_set is not None:
            valid_cache, vinfo = build_topk_cache(teacher, valid_set, **common)
            build_seconds += vinfo["build_seconds"]
            cache_tokens += vinfo["teacher_forward_tokens"]
        stages.mark("teacher_cache", {"train": info, "k": config.teacher_topk})
        extra_cost.update(teacher_cache_build_seconds=round(build_seconds, 3), teacher_cache_reused=info["reused"],
                          teacher_cache_forward_tokens=cache_tokens, teacher_cache_bytes=info["cache_bytes"],
                          teacher_cache_path=info["path"])
        teacher = None  # training reads the cache only

    # Stage 3: training
    checkpoints_dir = run.path / "checkpoints"
    evaluate = valid_set is not None and (config.select == "best" or config.eval_steps > 0)
    eval_steps = config.eval_steps or config.save_steps
    if config.select == "best" and evaluate and config.save_steps % eval_steps:
        raise ConfigError(f"With select=best, save_steps ({config.save_steps}) must be a multiple of eval_steps ({eval_steps}).")
    args = training_arguments(config, checkpoints_dir, evaluate=evaluate, eval_steps=eval_steps)
    train_callbacks = [RunLogCallback(run.path / "train_log.jsonl")] + list(callbacks or [])
    if progress:
        train_callbacks.append(RichProgressCallback(f"train {config.method}"))
    on_policy = None
    if responses == "on_policy":
        on_policy = OnPolicyConfig(fraction=float(params["on_policy_fraction"]), decoding=decoding, seed=config.seed,
                                   pad_token_id=tokenizer.pad_token_id)
    lm_source = LMSource(lm_blocks, config.batch_size, config.seed, tokenizer.pad_token_id) if lm_blocks else None
    trainer = DistillTrainer(model=student, args=args, train_dataset=IndexedDataset(train_set),
                             eval_dataset=IndexedDataset(valid_set) if valid_set is not None else None,
                             data_collator=TrainCollator(tokenizer.pad_token_id), callbacks=train_callbacks,
                             objective=objective, params=params, teacher=teacher if objective.needs_teacher else None,
                             teacher_cache=train_cache,
                             eval_teacher_cache=valid_cache, on_policy=on_policy, lm_source=lm_source,
                             lm_weight=config.lm_weight, tokenizer=tokenizer)
    output, resumed = train_resuming(trainer, run, checkpoints_dir, say)

    final_loss = output.training_loss if output is not None else None
    best = getattr(trainer.state, "best_model_checkpoint", None)
    validation = None
    if valid_set is not None:
        validation = {k[len("eval_"):]: v for k, v in trainer.evaluate().items() if k.startswith("eval_")}
    trainer.model.config.kdbench_prompt_style = config.prompt_style  # evaluation warns on a mismatch
    counters = trainer.cost_counters()
    cost = {
        "wall_seconds": clock.seconds,
        "train_seconds": counters["train_seconds"],
        "optimizer_steps": trainer.state.global_step,
        "tokens_processed": counters["tokens_processed"],
        "response_tokens_trained": counters["response_tokens"],
        "teacher_forward_tokens": counters["teacher_forward_tokens"],
        "generated_tokens": extra_cost.pop("generated_tokens", 0) + counters["generated_tokens"],
        "on_policy_batches": counters["on_policy_batches"],
        "lm_tokens": counters["lm_tokens"],
        "train_examples": len(train_set),
        "response_tokens_per_epoch": train_set.n_response_tokens,
        **peak_memory_mb(),
        "student_parameters": count_parameters(trainer.model),
        "processes": trainer.accelerator.num_processes,
        "teacher_signal": (config.teacher_signal if objective.needs_teacher else None),
        "final_train_loss": final_loss,
        "selected": config.select,
        "select_metric": config.select_metric if config.select == "best" else None,
        "selected_checkpoint": best,
        "best_metric": getattr(trainer.state, "best_metric", None),
        "validation": validation,
        "resumed": resumed,
        **extra_cost,
    }
    if trainer.is_world_process_zero():
        _save_model_atomically(trainer.model, tokenizer, model_dir)
        atomic_write_json(run.path / "cost.json", cost)
        atomic_write_text(model_dir / "README.md", _model_card(config, entry, params, cost))
        stages.mark("train", {"optimizer_steps": trainer.state.global_step, "selected_checkpoint": best})
    trainer.accelerator.wait_for_everyone()
    if trainer.is_world_process_zero():
        # checkpoints exist for resuming; a finished run keeps only the final model
        shutil.rmtree(checkpoints_dir, ignore_errors=True)
        run.finish("complete", model_dir=str(model_dir))
    say(f"trained {config.method} in {cost['wall_seconds']:.1f}s ({cost['optimizer_steps']} steps); model at {model_dir}")
    return TrainResult(run, model_dir, cost, final_loss, validation, trainer=trainer, teacher=loaded_teacher)


def training_arguments(config: TrainConfig, checkpoints_dir: Path, *, evaluate: bool, eval_steps: int):
    """The ``TrainingArguments`` of a run (shared by :func:`train` and :mod:`kdbench.train.pipeline`)."""
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
        **_version_kwargs(config),
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


def recipe_decoding(config: TrainConfig, params: dict, responses: str):
    """The decoding settings of a generating recipe (None for gold responses)."""
    from kdbench.generate import DecodingConfig

    if responses == "gold":
        return None
    return DecodingConfig(greedy=bool(params.get("greedy", False)),
                          temperature=float(params.get("generation_temperature", 1.0)),
                          top_p=float(params.get("top_p", 1.0)), top_k=int(params.get("top_k", 0)),
                          max_new_tokens=int(params.get("max_new_tokens", 256)),
                          max_prompt_length=config.max_prompt_length, batch_size=config.generation_batch_size)


def generation_stage(config: TrainConfig, params: dict, decoding, teacher, teacher_tokenizer, examples,
                     run: RunDir, store, say, *, model_name: str | None = None, kind: str = "teacher-generations"):
    """SeqKD's data: the teacher's response to every training prompt (artifact store; a killed
    generation resumes from the partial file in the run directory). Returns (examples, ends, facts):
    the examples with the generated text as ``output`` and, per example, its
    :class:`~kdbench.train.responses.ResponseEnd` (the EOS token the model stopped with, or none when
    cut at ``max_new_tokens``), recorded with every stored generation.

    ``model_name`` / ``kind`` let the preference pipelines generate with another model (the original
    student: ``kind="student-generations"``) through the same cached, resumable stage."""
    import dataclasses
    import json

    from kdbench.data import Example, format_prompt
    from kdbench.generate import HFBackend
    from kdbench.store import append_jsonl, hash_obj, read_jsonl
    from kdbench.teacher_cache import model_fingerprint
    from kdbench.train.responses import ResponseEnd

    prompts = [format_prompt(e.instruction, e.input, style=config.prompt_style, tokenizer=teacher_tokenizer)
               for e in examples]
    ids = [f"{i}" for i in range(len(examples))]
    seed = int(params.get("generation_seed", 0))
    inputs = {"teacher": model_fingerprint(model_name or config.teacher), "prompts": hash_obj(prompts),
              "decoding": dataclasses.asdict(decoding), "seed": seed,
              "record": "text+finished+eos_token"}  # earlier records lacked the response ends: not reused
    partial = run.path / "stages" / f"generate-{store.key(kind, inputs)}.partial.jsonl"

    def record(generation) -> dict:
        end = ResponseEnd.of_ids(generation.eos_token_id, teacher_tokenizer)  # None: cut at the limit
        return {"id": generation.id, "text": generation.text, "new_tokens": generation.new_tokens, **end.record()}

    def build(tmp: Path) -> dict:
        partial.parent.mkdir(parents=True, exist_ok=True)
        done = {r["id"]: r for r in read_jsonl(partial) if "eos_token" in r}
        todo = [i for i in range(len(examples)) if ids[i] not in done]
        if done:
            say(f"resuming {kind}: {len(done)} of {len(examples)} done")
        backend = HFBackend(teacher, teacher_tokenizer)

        def keep(batch):
            rows = [record(g) for g in batch]
            append_jsonl(partial, rows)
            done.update({r["id"]: r for r in rows})

        if todo:
            backend.generate([prompts[i] for i in todo], [ids[i] for i in todo], decoding, seed, on_batch=keep)
        with open(tmp / "generations.jsonl", "w", encoding="utf-8") as handle:
            for i in ids:
                handle.write(json.dumps(done[i], ensure_ascii=False) + "\n")
        return {"n": len(ids), "generated_tokens": sum(int(done[i]["new_tokens"]) for i in ids),
                "unfinished": sum(not done[i]["finished"] for i in ids)}

    say(f"{kind.replace('-', ' ')} ({decoding.describe()}) for {len(examples)} prompts")
    artifact = store.get_or_build(kind, inputs, build, log=say)
    partial.unlink(missing_ok=True)
    rows = {r["id"]: r for r in read_jsonl(artifact.path / "generations.jsonl")}
    generated = [Example(instruction=e.instruction, input=e.input, output=rows[ids[i]]["text"], id=e.id, extra=e.extra)
                 for i, e in enumerate(examples)]
    ends = [ResponseEnd.from_record(rows[i]) for i in ids]
    facts = {"reused": artifact.reused, "path": str(artifact.path), "build_seconds": artifact.meta.get("build_seconds", 0.0),
             "generated_tokens": int(artifact.meta.get("generated_tokens", 0)),  # the method's cost, even if reused
             "unfinished": sum(not end.finished for end in ends), "decoding": decoding.describe()}
    return generated, ends, facts


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


def require_inputs(config: TrainConfig, needs_teacher: bool) -> None:
    """The student, the data and (where the method needs one) the teacher must be given."""
    if not config.student:
        raise ConfigError("Give the student model (--student DIR or a Hugging Face id).")
    if not config.data:
        raise ConfigError("Give the training data (--data FILE.jsonl).")
    if needs_teacher and not config.teacher:
        raise ConfigError(f"Method {config.method} needs a teacher; pass --teacher DIR or a Hugging Face id.")


def finished_result(run: RunDir, say: Callable[[str], None]) -> "TrainResult | None":
    """The result of a run that already finished (rerunning its command does nothing), else None."""
    model_dir = run.path / "model"
    if not (run.complete and (model_dir / "config.json").exists()):
        return None
    say(f"run {run.path} is already complete; nothing to do")
    cost = _read_json(run.path / "cost.json")
    return TrainResult(run, model_dir, cost, cost.get("final_train_loss"), cost.get("validation"))


def _read_json(path: Path) -> dict:
    import json

    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def _model_card(config: TrainConfig, entry, params: dict, cost: dict) -> str:
    rows = "\n".join(f"| {k} | {v} |" for k, v in sorted(params.items()))
    settings = ("learning_rate", "lr_scheduler", "warmup_ratio", "weight_decay", "batch_size", "grad_accum",
                "max_length", "max_prompt_length", "prompt_style", "seed", "select", "teacher_signal", "teacher_topk")
    setting_rows = "\n".join(f"| {k} | {getattr(config, k)} |" for k in settings)
    validation = cost.get("validation") or {}
    metric_rows = "\n".join(f"| validation {k} | {v:.6g} |" for k, v in validation.items()
                            if isinstance(v, float)) or "| (no validation set) | |"
    return (
        f"---\nlibrary_name: transformers\ntags: [kdbench, distillation, {config.method}]\n---\n\n"
        f"# {config.method} student (kdbench)\n\n"
        f"Trained with kdbench recipe `{entry.name}` ({entry.description}).\n\n"
        f"- Method: `{config.method}` (recipe file `{entry.path.name}`)\n"
        f"- Teacher: `{config.teacher}`\n- Initial student: `{config.student}`\n- Data: `{config.data}`"
        f" (validation: `{config.valid_data or f'{config.valid_fraction:g} held out'}`)\n"
        f"- Steps: {cost['optimizer_steps']}; final training loss: {cost['final_train_loss']}\n"
        f"- Model kept: {cost['selected']}"
        f"{' (' + str(cost['select_metric']) + ', ' + str(cost['selected_checkpoint']) + ')' if cost['selected'] == 'best' else ''}\n"
        f"- Cost: {cost['wall_seconds']} s wall; {cost['tokens_processed']} tokens processed; "
        f"{cost['teacher_forward_tokens']} teacher forward tokens; {cost['generated_tokens']} generated tokens; "
        f"peak RSS {cost['peak_rss_mb']} MiB\n\n"
        f"## Metrics\n\n| metric | value |\n|---|---|\n{metric_rows}\n\n"
        f"## Hyperparameters\n\n| setting | value |\n|---|---|\n{setting_rows}\n\n"
        f"| method parameter | value |\n|---|---|\n{rows}\n\nCitation: {entry.body.get('citation', '')}\n"
    )
