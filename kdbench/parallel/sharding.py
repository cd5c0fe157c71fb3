"""FSDP2 (``torch.distributed.fsdp.fully_shard``) for the student and for frozen models.

Why kdbench shards here rather than only through accelerate (accelerate 1.x, torch 2.13):

* accelerate switches its state to FSDP for GPU backends only; on CPU (gloo) an FSDP configuration
  silently becomes plain DDP, so every rank keeps a full copy and nothing is sharded;
* accelerate's FSDP2 ``prepare`` takes one model, but a distillation run also holds a frozen teacher
  (and for DPO-style stages a frozen reference model): an unwrapped 13B teacher is 26 GB in bf16 on
  every rank, which is what stops Llama-2-13B -> 7B on 8 x 40 GB (TRL's GKD prepares its teacher under
  DeepSpeed ZeRO-3 for the same reason).

So frozen models are always sharded here; the student is sharded here on CPU and may go through
accelerate's FSDP plugin on GPU (:func:`accelerate_shards` tells which happened).

Layout: each decoder block (the model's ``_no_split_modules`` classes, as accelerate's auto-wrap
uses) is one FSDP unit, then the root (embeddings, final norm, head; tied embeddings share one unit).
Every parameter becomes a ``DTensor`` placed ``Shard(0)`` over a 1-D mesh of all ranks: a rank holds
``ceil(rows / world)`` rows of each weight, so per-rank parameter memory is about ``1 / world``.

Callers' rule: a sharded model all-gathers each block's parameters inside its forward, so every rank
must run the same number of forwards (give a rank without data a dummy row). Generation whose length
differs per rank runs inside :func:`full_parameters`, which gathers once and holds the full weights.

On CPU, run with glibc's ``MALLOC_MMAP_THRESHOLD_`` fixed (e.g. ``1048576``): glibc otherwise raises its
mmap threshold as large blocks are freed, and the all-gather buffers each forward frees stay in the
heap (a sharded rank's RSS then grows back towards the unsharded size; benchmarks/fsdp_teacher_memory.py).
"""

from __future__ import annotations

import weakref
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

import torch
from torch import nn

from kdbench.errors import ConfigError


# the reshard_after_forward each sharded model was built with (restored when full_parameters ends)
_RESHARD_AFTER_FORWARD: "weakref.WeakKeyDictionary[nn.Module, bool]" = weakref.WeakKeyDictionary()


@dataclass(frozen=True)
class ShardingReport:
    """What one rank holds of a model: parameter counts and bytes, local (this rank) and full."""

    sharded_parameters: int  # parameters that are DTensors
    parameters: int  # all parameters
    local_bytes: int  # bytes of this rank's shards (unsharded parameters counted in full)
    full_bytes: int  # bytes of the whole model
    mesh_size: int  # ranks the DTensors are sharded over (1 when nothing is sharded)

    @property
    def local_fraction(self) -> float:
        return self.local_bytes / max(1, self.full_bytes)


def sharding_mesh(device_type: str | None = None):
    """A 1-D device mesh over every rank of the initialised default process group (``cuda`` when the
    group's backend is NCCL, else ``cpu``). ConfigError when no process group is running."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    if not (dist.is_available() and dist.is_initialized()):
        raise ConfigError("FSDP sharding needs several processes: launch with torchrun or accelerate launch "
                          "(e.g. torchrun --nproc_per_node 2 -m kdbench ...).")
    if device_type is None:
        device_type = "cuda" if dist.get_backend() == "nccl" else "cpu"
    return init_device_mesh(device_type, (dist.get_world_size(),))


def block_classes(model: nn.Module) -> tuple[type, ...]:
    """The classes of the model's repeated blocks (Hugging Face ``_no_split_modules``, e.g. GPT2Block,
    LlamaDecoderLayer); empty when the model names none."""
    names = set(getattr(model, "_no_split_modules", None) or ())
    return tuple({type(m) for m in model.modules() if type(m).__name__ in names})


def _shard(model: nn.Module, mesh, *, reshard_after_forward: bool, param_dtype: torch.dtype | None,
           reduce_dtype: torch.dtype | None, cpu_offload: bool) -> nn.Module:
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard

    if is_sharded(model):
        raise ValueError("the model is already sharded")
    mesh = mesh if mesh is not None else sharding_mesh()
    kwargs = dict(mesh=mesh, reshard_after_forward=reshard_after_forward,
                  mp_policy=MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype),
                  offload_policy=CPUOffloadPolicy() if cpu_offload else OffloadPolicy())
    blocks = block_classes(model)
    for module in list(model.modules()):
        if module is not model and isinstance(module, blocks):
            fully_shard(module, **kwargs)
    fully_shard(model, **kwargs)
    _RESHARD_AFTER_FORWARD[model] = reshard_after_forward
    return model


def shard_student(model: nn.Module, mesh=None, *, param_dtype: torch.dtype | None = None,
                  reduce_dtype: torch.dtype | None = torch.float32, reshard_after_forward: bool = True,
                  cpu_offload: bool = False) -> nn.Module:
    """Shard a trainable model in place (FSDP2; returns it). Build the optimizer AFTER this call, from
    ``model.parameters()`` (the DTensor shards). Gradients are reduce-scattered in ``reduce_dtype``
    (float32 by default, so bf16 parameters do not make the gradient average lossy) and averaged over
    ranks: a loss already normalised by the tokens of the whole global step needs
    :func:`sum_gradients_over_ranks` to keep that normalisation exact."""
    return _shard(model, mesh, reshard_after_forward=reshard_after_forward, param_dtype=param_dtype,
                  reduce_dtype=reduce_dtype, cpu_offload=cpu_offload)


def sum_gradients_over_ranks(model: nn.Module) -> None:
    """Make a sharded student's gradient reduction a plain sum over ranks instead of FSDP's mean: for a
    loss normalised by the response tokens of the whole global step (TRL's ``num_items_in_batch``), the
    summed gradient is exactly the 1-process gradient of the same global batch. Sum-only collectives,
    because gloo has no pre-multiplied sum."""
    for unit in _fsdp_modules(model):
        unit.set_gradient_divide_factor(1.0)
        unit.set_force_sum_reduction_for_comms(True)


def shard_frozen(model: nn.Module, mesh=None, *, param_dtype: torch.dtype | None = None,
                 cpu_offload: bool = False) -> nn.Module:
    """Freeze (eval mode, no gradients) and shard a teacher or reference model in place (returns it).
    Each block's full weights exist only during that block's forward, then are freed again."""
    model.eval()
    model.requires_grad_(False)
    return _shard(model, mesh, reshard_after_forward=True, param_dtype=param_dtype, reduce_dtype=None,
                  cpu_offload=cpu_offload)


def load_sharded(path: str, mesh=None, *, frozen: bool = True, dtype: torch.dtype = torch.float32) -> nn.Module:
    """Load a safetensors checkpoint directory straight into a sharded model, each rank reading only its own
    rows of every weight: the full model never exists in any process (``load_model`` + ``shard_*`` would
    hold it whole while sharding, and the CPU allocator rarely gives that memory back).

    The model is built with parameters on the meta device and real buffers (so computed buffers such as
    rotary frequencies are right), sharded (:func:`shard_frozen`, or :func:`shard_student` with
    ``frozen=False``), materialised shard by shard, then filled from the checkpoint with safetensors
    slices. ModelError (one sentence) when the directory holds no safetensors weights for the model."""
    import json
    from pathlib import Path

    from accelerate import init_empty_weights
    from safetensors import safe_open
    from torch.distributed.tensor import DTensor
    from transformers import AutoConfig, AutoModelForCausalLM

    from kdbench.errors import ModelError

    folder = Path(path)
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
    elif (folder / "model.safetensors").is_file():
        weight_map = None
    else:
        raise ModelError(f"No safetensors weights in {folder}; sharded loading reads model.safetensors "
                         "(re-save the model with save_pretrained).")
    mesh = mesh if mesh is not None else sharding_mesh()
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(str(folder)), dtype=dtype)
    model.tie_weights()  # meta-device construction leaves tied weights (GPT-2's head) as two parameters
    buffers = {name: buffer.clone() for name, buffer in model.named_buffers()}
    if frozen:
        shard_frozen(model, mesh)
    else:
        shard_student(model, mesh)
    model.to_empty(device=mesh.device_type)
    tied = getattr(model, "_tied_weights_keys", None)
    tied = dict(tied) if isinstance(tied, dict) else {}  # tied copy -> its source (transformers 5)

    def read(name: str, rows: tuple[int, int] | None) -> torch.Tensor | None:
        """The checkpoint's tensor ``name`` (or only its ``rows``), None when the checkpoint lacks it. The
        file is opened per tensor: its memory map, and the page-cache pages it maps, last one tensor."""
        for key in (name, tied.get(name)):  # a tied weight is saved once, under its source's name
            if key is None or (weight_map is not None and key not in weight_map):
                continue
            file = folder / (weight_map[key] if weight_map is not None else "model.safetensors")
            with safe_open(str(file), framework="pt", device="cpu") as handle:
                if key not in handle.keys():
                    continue
                piece = handle.get_slice(key)
                return (piece[rows[0]:rows[1]] if rows is not None else piece[:]).clone()
        return None

    with torch.no_grad():
        state = dict(model.named_parameters())
        state.update(model.named_buffers())
        for name, target in state.items():
            local = target.to_local() if isinstance(target, DTensor) else target
            rows = None
            if isinstance(target, DTensor) and local.shape != target.shape:  # Shard(0): this rank's rows
                per_rank = -(-target.shape[0] // mesh.size())
                start = min(target.shape[0], mesh.get_local_rank() * per_rank)
                rows = (start, start + local.shape[0])
            values = read(name, rows)
            if values is None and name in buffers:  # a buffer the model computes (kept from construction)
                values = buffers[name]
            if values is None:
                raise ModelError(f"{folder} has no weight {name!r} for this model; load it with load_model "
                                 "and shard it with shard_frozen / shard_student instead.")
            local.copy_(values.to(local.dtype))
    if frozen:
        model.eval()
    return model


def is_sharded(model: nn.Module) -> bool:
    """Whether ``fully_shard`` has been applied to the model (its root)."""
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def sharding_report(model: nn.Module) -> ShardingReport:
    """Parameter counts and bytes this rank holds (see :class:`ShardingReport`)."""
    from torch.distributed.tensor import DTensor

    sharded = total = local_bytes = full_bytes = 0
    mesh_size = 1
    for parameter in model.parameters():
        total += 1
        full_bytes += parameter.numel() * parameter.element_size()
        if isinstance(parameter, DTensor):
            sharded += 1
            local = parameter.to_local()
            local_bytes += local.numel() * local.element_size()
            mesh_size = max(mesh_size, parameter.device_mesh.size())
        else:
            local_bytes += parameter.numel() * parameter.element_size()
    return ShardingReport(sharded, total, local_bytes, full_bytes, mesh_size)


def _fsdp_modules(model: nn.Module) -> list:
    from torch.distributed.fsdp import FSDPModule

    return [m for m in model.modules() if isinstance(m, FSDPModule)]


@contextmanager
def full_parameters(model: nn.Module) -> Iterator[nn.Module]:
    """Hold the sharded model's full parameters on every rank for the block (one all-gather per FSDP
    unit on entry, all ranks together), so that forwards inside it run no collective: each rank may
    then generate a different number of tokens (GKD / online DPKD sampling). Costs the full model's
    parameter memory per rank while inside; no gradients flow (use under ``torch.no_grad``).
    Does nothing for a model that is not sharded."""
    units = _fsdp_modules(model)
    if not units:
        yield model
        return
    restore = _RESHARD_AFTER_FORWARD.get(model, True)
    for unit in units:
        unit.unshard()
    for unit in units:
        unit.set_reshard_after_forward(False, recurse=False)
    try:
        yield model
    finally:
        for unit in units:
            unit.set_reshard_after_forward(restore, recurse=False)
            unit.reshard()


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The full (gathered) state dict on CPU on rank 0, and ``{}`` on the other ranks (every rank must
    call it: it gathers). For writing a plain ``model.safetensors`` checkpoint from a sharded model."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def load_full_state_dict(model: nn.Module, state_dict: dict[str, torch.Tensor]) -> None:
    """Load a full state dict into a sharded model: rank 0 passes the tensors, the other ranks ``{}``;
    rank 0 broadcasts and each rank keeps its shard."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    set_model_state_dict(model, state_dict,
                         options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True, strict=True))


def accelerate_shards(accelerator) -> bool:
    """Whether accelerate itself shards the model it prepares: only when its state switched to FSDP,
    which it does for GPU backends only (on CPU an FSDP config runs as DDP; shard with
    :func:`shard_student` instead)."""
    from accelerate.utils import DistributedType

    return accelerator.distributed_type == DistributedType.FSDP
