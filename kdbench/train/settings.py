"""The settings of one training run (:class:`TrainConfig`) and what a run returns (:class:`TrainResult`).

A recipe's own parameters (``params``) are checked against the recipe's typed parameter groups
(:mod:`kdbench.train.params`); everything else a run needs — models, data, optimisation, batching,
selection, the teacher signal — is a field here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from kdbench.config import option
from kdbench.errors import ConfigError
from kdbench.store import RunDir

#: Validation metrics a run can select its model on: name -> greater is better. The reward metrics are
#: measured on held-out preference pairs (preference recipes); the others on held-out responses.
SELECT_METRICS = {"loss": False, "ce": False, "token_accuracy": True, "reward_accuracy": True, "reward_margin": True}
TOKEN_SELECT_METRICS = ("loss", "ce", "token_accuracy")
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
    lm_data: str | None = option(None, "Plain-text corpus (.txt, blank-line separated, or .jsonl with text) for the "
                                       "LM-loss term.")
    lm_weight: float | None = option(None, "Weight of the LM-loss term (token mean over the step's LM tokens) on "
                                           "lm_data, or on the recipe's own LM data (DPKD: the gold responses); "
                                           "empty: the recipe's lm.weight (0.5 unless the recipe says otherwise).")
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
    teacher_topk: int = option(64, "k of the offline top-k teacher cache (teacher_signal: topk).")
    teacher_cache_dtype: str = option("float32", "Log-prob dtype of the top-k cache: float32 or float16.")
    generation_batch_size: int = option(32, "Prompts per batch when the teacher or student generates.")
    cache_dir: str | None = option(None, "Artifact store for teacher caches and generations (default: the kdbench cache).")
    report_to: str = option("none", "Logging integrations for transformers (none, tensorboard, wandb, ...).")
    sharding: str | None = option(None, "Parameter sharding over the launched processes: fsdp (FSDP2: the student and "
                                        "the frozen teacher / reference models sharded over the ranks; launch with "
                                        "torchrun or accelerate launch), none (data parallel: full copies), auto or "
                                        "empty (fsdp when accelerate launch runs an FSDP config, else none). "
                                        "docs/scaling.md.")
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
            (self.lm_weight is None or self.lm_weight >= 0, "lm_weight must not be negative."),
            (self.sharding in (None, "auto", "fsdp", "none"), "sharding must be auto, fsdp or none."),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(f"Setting {message}" if message[0].islower() else message)
        if self.sharding == "fsdp":
            from kdbench.train.sharded import fsdp_requested

            fsdp_requested(self.sharding, launched_processes())  # one process: one sentence, before any file
        if self.continue_from:
            from kdbench.train.recovery import check_continuation_source

            check_continuation_source(self.continue_from)

    @property
    def evaluates(self) -> bool:
        """Whether the run validates while training (select=best or eval_steps > 0)."""
        return self.select == "best" or self.eval_steps > 0

    @property
    def run_dir_name(self) -> str:
        return self.run_name or f"{self.method}-seed{self.seed}"


@dataclass
class TrainResult:
    run: RunDir
    model_dir: Path
    cost: dict
    final_train_loss: float | None
    validation: dict | None = None
    trainer: object = field(default=None, repr=False)  # the trainer (None for a run found complete)
    teacher: object = field(default=None, repr=False)  # the teacher model object the run used, if any


def launched_processes() -> int:
    """The number of processes the launcher started (``WORLD_SIZE``; 1 without torchrun / accelerate launch)."""
    import os

    try:
        return max(1, int(os.environ.get("WORLD_SIZE", "1") or 1))
    except ValueError:
        return 1


def require_inputs(config: TrainConfig, needs_teacher: bool) -> None:
    """The student, the data and (where the method needs one) the teacher must be given."""
    if not config.student:
        raise ConfigError("Give the student model (--student DIR or a Hugging Face id).")
    if not config.data:
        raise ConfigError("Give the training data (--data FILE.jsonl).")
    if needs_teacher and not config.teacher:
        raise ConfigError(f"Method {config.method} needs a teacher; pass --teacher DIR or a Hugging Face id.")


def split_validation(examples, fraction: float, seed: int):
    """(train, validation): ``fraction`` of ``examples`` (at least one when there are two or more) held out
    by a seeded shuffle; both keep the original order."""
    import random

    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    n_valid = max(1, int(round(fraction * len(examples)))) if len(examples) > 1 else 0
    valid_idx = set(order[:n_valid])
    return [e for i, e in enumerate(examples) if i not in valid_idx], [e for i, e in enumerate(examples) if i in valid_idx]
