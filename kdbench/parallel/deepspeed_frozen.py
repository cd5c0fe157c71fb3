"""Frozen models (teacher, reference) under DeepSpeed, initialised for inference as TRL does.

Under ``accelerate launch --config_file configs/accelerate/deepspeed_zero3.yaml`` Trainer hands the student to
DeepSpeed, but a frozen teacher never goes through ``accelerator.prepare``; left alone it is a full copy on
every rank. TRL (``trl.models.utils.prepare_deepspeed``, used by its GKD / DPO trainers) wraps it in its own
DeepSpeed engine built from the run's DeepSpeed configuration:

* ZeRO-3: the frozen model is partitioned like the student (1/N of its parameters per rank, gathered per
  layer inside the forward); bucket sizes follow the model's hidden size (``reduce_bucket_size`` h²,
  ``stage3_prefetch_bucket_size`` 0.9·h², ``stage3_param_persistence_threshold`` 10·h), as TRL sets them;
* ZeRO-1/2 partition only optimizer state and gradients, which a frozen model has none of: it runs at
  stage 0 (a plain replicated copy), as TRL does.

The engine has no optimizer and no scheduler (those sections are dropped). :func:`frozen_inference_config`
builds and checks the configuration without DeepSpeed; :func:`prepare_frozen_deepspeed` needs it installed
(``pip install deepspeed``; a CUDA machine). Verified here: the configuration only (docs/scaling.md).
"""

from __future__ import annotations

import copy

from kdbench.errors import ConfigError

# sections of a training configuration that mean nothing for a model that is never stepped
TRAINING_ONLY = ("optimizer", "scheduler")


def model_hidden_size(model_config) -> int | None:
    """The hidden size TRL sizes ZeRO-3's buckets by (the largest of ``hidden_sizes`` when a model has several)."""
    sizes = getattr(model_config, "hidden_sizes", None)
    if sizes:
        return int(max(sizes))
    size = getattr(model_config, "hidden_size", None)
    return int(size) if size is not None else None


def frozen_inference_config(deepspeed_config: dict, hidden_size: int | None, *, micro_batch_size: int,
                            gradient_accumulation_steps: int, world_size: int) -> dict:
    """The DeepSpeed configuration of a frozen model's inference engine, from the run's ``deepspeed_config``
    (accelerate's plugin): ZeRO-3 kept with buckets sized by ``hidden_size``, any other stage turned into stage
    0; optimizer and scheduler dropped; batch sizes left at ``auto`` filled from the run's (the frozen model
    sees the student's micro-batches). ConfigError (one sentence) when the configuration has no
    ``zero_optimization`` stage or another value left at ``auto``."""
    config = copy.deepcopy(deepspeed_config)
    for key, value in (("train_micro_batch_size_per_gpu", micro_batch_size),
                       ("gradient_accumulation_steps", gradient_accumulation_steps)):
        if config.get(key, "auto") == "auto":
            config[key] = value
    if config.get("train_batch_size", "auto") == "auto":  # DeepSpeed checks micro x accumulation x ranks
        config["train_batch_size"] = (config["train_micro_batch_size_per_gpu"] * config["gradient_accumulation_steps"]
                                      * world_size)
    zero = config.get("zero_optimization")
    if not isinstance(zero, dict) or "stage" not in zero:
        raise ConfigError("The DeepSpeed configuration has no zero_optimization.stage; give one in the accelerate "
                          "config (e.g. configs/accelerate/deepspeed_zero3.yaml).")
    for name in TRAINING_ONLY:
        config.pop(name, None)
    if int(zero["stage"]) == 3:
        if hidden_size is not None:
            zero["reduce_bucket_size"] = hidden_size * hidden_size
            zero["stage3_param_persistence_threshold"] = 10 * hidden_size
            zero["stage3_prefetch_bucket_size"] = int(0.9 * hidden_size * hidden_size)
    else:  # ZeRO-1/2 shard optimizer state and gradients, which a frozen model does not have
        zero["stage"] = 0
    left = _auto_values(config)
    if left:
        raise ConfigError(f"The DeepSpeed configuration still has {left[0]}: auto, which only Trainer fills; build the "
                          "frozen model's configuration after the trainer (or give a number).")
    return config


def _auto_values(config: dict, prefix: str = "") -> list[str]:
    found = []
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            found += _auto_values(value, f"{name}.")
        elif value == "auto":
            found.append(name)
    return found


def prepare_frozen_deepspeed(model, accelerator, trainer_args):
    """``model`` (frozen) wrapped in a DeepSpeed inference engine built from ``accelerator``'s DeepSpeed plugin
    (:func:`frozen_inference_config`; ``trainer_args``: the run's ``TrainingArguments``), in eval mode. ConfigError when DeepSpeed is not installed."""
    try:
        import deepspeed
    except ImportError as err:
        raise ConfigError("This run uses accelerate's DeepSpeed plugin but DeepSpeed is not installed; pip install "
                          "deepspeed (on a CUDA machine), or launch with an FSDP or DDP config.") from err
    plugin = accelerator.state.deepspeed_plugin
    args = trainer_args
    config = frozen_inference_config(plugin.deepspeed_config, model_hidden_size(model.config),
                                     micro_batch_size=args.per_device_train_batch_size,
                                     gradient_accumulation_steps=args.gradient_accumulation_steps,
                                     world_size=accelerator.num_processes)
    engine, *_ = deepspeed.initialize(model=model, config=config)
    engine.eval()
    return engine
