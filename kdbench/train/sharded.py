"""FSDP inside the training engine (``sharding: fsdp``): what :class:`~kdbench.train.trainer_base.StepTrainer`
does differently when the student and the frozen models are sharded over the launched processes.

* **The student** is sharded with FSDP2 ``fully_shard`` after ``Trainer.__init__`` (one unit per decoder
  block, :func:`kdbench.parallel.sharding.shard_student`), so the optimizer Trainer builds later holds only
  this rank's shards. Trainer is told the model owns its gradient reduction (its
  ``is_distributed_loading_by_transformers`` path): no DDP wrap, and gradient accumulation defers FSDP's
  reduce-scatter to the last micro-batch. When accelerate itself shards (its FSDP plugin, GPU backends
  only) the student is left to it and only the frozen models are sharded here.
* **Frozen models** (the online teacher, DPKD's teacher, ADPA's π_dpo and π_ref) are sharded with
  :func:`~kdbench.parallel.sharding.shard_frozen`: a rank holds 1/N of each.
* **Token normalisation** is unchanged: the step's counts are summed over ranks, each rank's loss is
  multiplied by N and FSDP averages the gradient over N ranks — the summed gradient of the global
  step, as under DDP (N is a power of two in practice, so the ×N / ÷N pair is exact in floating point).
* **Generation in the step** (GKD's on-policy samples, DPKD's online y_s) runs inside
  :func:`~kdbench.parallel.sharding.full_parameters`: every rank gathers the student's full weights once
  per optimizer step, then samples its own prompts for as many tokens as they need with no collective
  per token. The alternative — every rank stepping the sharded model together, HF ``synced_gpus``
  style — costs one all-gather per block per generated token and makes ranks whose coin says "no
  sample" (GKD's λ is drawn per rank) generate dummies; the gather costs one full copy of the
  *student* (the smaller model) for the duration of sampling.
* **Checkpoints** hold the student *gathered* (``model.safetensors``, written by rank 0: the checkpoint
  loads with ``from_pretrained`` and select=best reloads it like any other) and the optimizer state
  *sharded* (``optimizer_shards/``, torch.distributed.checkpoint: each rank writes its own shards, so
  the 8× larger optimizer state is never gathered). Resuming reads the model on rank 0 and broadcasts
  it; each rank reads its optimizer shards.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from kdbench.errors import ConfigError

OPTIMIZER_SHARDS = "optimizer_shards"


def fsdp_requested(setting: str | None, world_size: int) -> bool:
    """Whether a run with ``sharding: setting`` over ``world_size`` processes shards: ``fsdp`` always (one
    process is a ConfigError: there is nothing to shard over), ``auto`` or None (unset: runs recorded before
    the setting existed resume unchanged) when ``accelerate launch`` runs an FSDP configuration
    (``ACCELERATE_USE_FSDP``) over several processes, ``none`` never."""
    if setting == "none":
        return False
    if setting == "fsdp":
        if world_size <= 1:
            raise ConfigError("sharding=fsdp needs several processes: launch with torchrun --nproc_per_node N -m "
                              "kdbench train ... (or accelerate launch), or use --set sharding=none.")
        return True
    return world_size > 1 and os.environ.get("ACCELERATE_USE_FSDP", "").lower() in ("1", "true", "yes")


def shard_trained_model(trainer) -> None:
    """Shard ``trainer.model`` in place (unless accelerate's FSDP plugin shards it) and switch Trainer to
    its path for a model that reduces its own gradients."""
    from kdbench.parallel.sharding import accelerate_shards, shard_student

    if accelerate_shards(trainer.accelerator):
        return
    shard_student(trainer.model)
    trainer.model_wrapped = trainer.model
    # Trainer: the model owns placement and gradient reduction; no DDP wrap, deferred reduce-scatter
    # while accumulating (transformers' path for models sharded at load time)
    trainer.is_distributed_loading_by_transformers = True


def accelerate_shards_student(trainer) -> bool:
    """Whether accelerate's FSDP plugin (GPU) shards the student, so Trainer's own FSDP checkpointing applies."""
    from kdbench.parallel.sharding import accelerate_shards

    return accelerate_shards(trainer.accelerator)


def deepspeed_runs(accelerator) -> bool:
    """Whether accelerate runs DeepSpeed (its plugin is active: GPU launches with a DeepSpeed config)."""
    from accelerate.utils import DistributedType

    return accelerator.distributed_type == DistributedType.DEEPSPEED


def inner_optimizer(optimizer):
    """The torch optimizer inside accelerate's ``AcceleratedOptimizer`` wrapper."""
    return getattr(optimizer, "optimizer", optimizer)


def shard_frozen_model(model):
    """``model`` sharded as a frozen model (a model already sharded, shared by two trainers, passes)."""
    from kdbench.parallel.sharding import is_sharded, shard_frozen

    if model is not None and not is_sharded(model):
        shard_frozen(model)
    return model


def sharding_facts(student, frozen_models: list) -> dict:
    """What this rank holds of the student and of each frozen model (recorded in ``cost.json`` as
    ``sharding``): parameters that are DTensors, all parameters, ranks sharded over, local fraction of
    the bytes."""
    from kdbench.parallel.sharding import sharding_report

    def facts(model) -> dict:
        report = sharding_report(model)
        return {"sharded_parameters": report.sharded_parameters, "parameters": report.parameters,
                "mesh_size": report.mesh_size, "local_fraction": round(report.local_fraction, 6)}

    return {"student": facts(student), "frozen": [facts(model) for model in frozen_models]}


def gathered_state_dict(model) -> dict | None:
    """The student's full state dict on rank 0 (``{}`` on the others); every rank must call it."""
    from kdbench.parallel.sharding import full_state_dict

    state = full_state_dict(model)
    # a tied weight is written once, under its source's name, as save_pretrained does for a whole model
    return {name: tensor for name, tensor in state.items() if _tied_source(model, name) not in state}


def save_model_files(model, output_dir: str | Path, state_dict: dict, is_main: bool) -> None:
    """``model``'s config and the gathered ``state_dict`` as a ``from_pretrained`` checkpoint (rank 0)."""
    if is_main:
        model.save_pretrained(str(output_dir), state_dict=state_dict)


def load_model_files(model, checkpoint: str | Path, is_main: bool) -> None:
    """Load a checkpoint's gathered ``model.safetensors`` into the sharded ``model``: rank 0 reads it, every
    rank keeps its shard of the broadcast."""
    from safetensors.torch import load_file

    from kdbench.parallel.sharding import load_full_state_dict

    state = {}
    if is_main:
        state = load_file(str(Path(checkpoint) / "model.safetensors"))
        # a tied weight is saved once (GPT-2's head shares the embedding); the model's state dict has both
        for name, tensor in model.state_dict().items():
            if name not in state:
                source = _tied_source(model, name)
                if source is not None and source in state:
                    state[name] = state[source]
    load_full_state_dict(model, state)


def _tied_source(model, name: str) -> str | None:
    """The weight ``name`` is tied to (transformers 5: tied copy -> source), or None."""
    tied = getattr(model, "all_tied_weights_keys", None)
    if tied is None:
        tied = getattr(model, "_tied_weights_keys", None)
    return tied.get(name) if isinstance(tied, dict) else None


def save_optimizer_shards(model, optimizer, output_dir: str | Path) -> None:
    """Every rank writes its optimizer state shards to ``output_dir/optimizer_shards`` (collective)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    state = {"optimizer": get_optimizer_state_dict(model, optimizer)}
    dcp.save(state, checkpoint_id=str(Path(output_dir) / OPTIMIZER_SHARDS))


def load_optimizer_shards(model, optimizer, checkpoint: str | Path) -> bool:
    """Restore the optimizer state :func:`save_optimizer_shards` wrote (collective); False when the
    checkpoint has none."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

    folder = Path(checkpoint) / OPTIMIZER_SHARDS
    if not folder.is_dir():
        return False
    state = {"optimizer": get_optimizer_state_dict(model, optimizer)}
    dcp.load(state, checkpoint_id=str(folder))
    set_optimizer_state_dict(model, optimizer, state["optimizer"])
    return True


def load_scheduler(scheduler, checkpoint: str | Path) -> None:
    """The learning-rate schedule's position as Trainer saved it (``scheduler.pt``)."""
    path = Path(checkpoint) / "scheduler.pt"
    if path.is_file():
        scheduler.load_state_dict(torch.load(str(path), weights_only=True))
