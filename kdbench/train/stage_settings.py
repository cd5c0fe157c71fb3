"""Training settings of the stages a pipeline builds: the student's SFT checkpoint, the dSFT model,
π_ref (an SFT teacher), π_dpo, ADPA+'s DCKD student and the SFT teacher of ``teacher_init: sft``.

A stage is another recipe trained as its own run (:func:`kdbench.train.stages.model_stage`). Its
settings come from three places, so that no stage silently runs at the main run's learning rate:

* **Optimisation** (:data:`OPTIMIZATION_SETTINGS`: learning rate, epochs or steps, batch size,
  accumulation, schedule, ...) is never the main run's. It is the recipe's
  ``params.<stage>_settings`` — the values the papers ran the stage with, listed with their sources in
  ``docs/methods.md`` ("Stage settings") — then ``TrainConfig``'s defaults for any the recipe leaves out.
  ``--set params.<stage>_settings.NAME=VALUE`` overrides one; ``--set learning_rate=...`` changes the
  main stage only.
* **The method's own terms** (:data:`METHOD_SETTINGS`: ``lm_data`` / ``lm_weight``, the top-k teacher
  signal, model selection) never reach a stage: a stage trains on its own objective only, and these are
  reset to their defaults so that its artifact key does not change with them.
* **Everything else** — data shape (``max_length``, ``max_prompt_length``, ``prompt_style``), the
  validation split, precision, the seed — is the main run's.

Teacher-preparation stages (π_ref, π_dpo, ``teacher_init: sft``) train with seed
:data:`TEACHER_STAGE_SEED` unless their settings give one, so one prepared teacher serves every training
seed and every method on the same teacher and data.
"""

from __future__ import annotations

import dataclasses

from kdbench.errors import ConfigError

OPTIMIZATION_SETTINGS = ("learning_rate", "optim", "weight_decay", "warmup_ratio", "lr_scheduler", "max_grad_norm",
                         "num_epochs", "max_steps", "batch_size", "grad_accum")
METHOD_SETTINGS = ("lm_data", "lm_weight", "teacher_signal", "teacher_topk", "teacher_cache_dtype", "select",
                   "select_metric", "eval_steps")
#: Settings left out of the settings part of a stage's artifact key: those that do not change what it
#: produces, and the models and data files, which the key holds by content (not by path).
NOT_IN_KEY = ("output_dir", "run_name", "cache_dir", "report_to", "method", "params", "save_steps",
              "save_total_limit", "logging_steps", "generation_batch_size", "student", "teacher", "data",
              "valid_data", "sharding")
TEACHER_STAGE_SEED = 0
#: Part of every stage's key: stages built before generated responses kept their ends and stages had
#: their own settings are not reused.
STAGE_FORMAT = 2


def _default(field: dataclasses.Field):
    if field.default is not dataclasses.MISSING:
        return field.default
    return field.default_factory()  # type: ignore[misc]


def stage_values(config, settings: dict | None, *, kind: str, teacher_stage: bool = False) -> dict:
    """The training-setting values of a ``kind`` stage built during the run of ``config`` (a
    ``TrainConfig``): the main run's, with every optimisation and method-only setting at its default,
    then ``settings`` (the recipe's stage settings merged with the user's). Unknown names are one
    sentence."""
    fields = {f.name: f for f in dataclasses.fields(config)}
    settings = dict(settings or {})
    unknown = sorted(set(settings) - set(fields))
    if unknown:
        raise ConfigError(f"The {kind} stage's settings have {unknown[0]!r}, which is not a training setting; "
                          f"use names such as {', '.join(OPTIMIZATION_SETTINGS[:4])}.")
    values = {name: getattr(config, name) for name in fields}
    for name in OPTIMIZATION_SETTINGS + METHOD_SETTINGS:
        values[name] = _default(fields[name])
    if teacher_stage:
        values["seed"] = TEACHER_STAGE_SEED
    values.update(settings)
    return values


def stage_key(values: dict) -> dict:
    """The settings part of a stage's artifact key (what changes the stage's model)."""
    return {name: value for name, value in sorted(values.items()) if name not in NOT_IN_KEY}
