"""Students derived from a teacher: fewer layers, optionally narrower, weights copied (or a fresh init).

daDPO's pruned-student setting (and Minitron-style "prune, then distil") starts the student from the
teacher's own weights: :func:`derive_student` keeps ``layers`` of the teacher's transformer blocks and
optionally shrinks the MLP width and/or the residual width, copying every kept weight. With
``from_scratch=True`` it builds the same architecture from a seeded random init instead, so the two
starting points can be compared at equal size. Either way the student shares the teacher's tokenizer
(and full vocabulary), so every token-level KD method applies.

Exactly what is kept (``d``/``k`` = the student's hidden / intermediate size, ``D``/``K`` the teacher's):

* **Layers**: ``selection="even"`` keeps blocks ``round(i * (L - 1) / (N - 1))`` for ``i = 0 .. N-1``
  rounded half up (always the first and the last block; ``N = 1`` keeps block 0); ``selection="first"`` keeps blocks
  ``0 .. N-1``. Student block ``j`` is a copy of teacher block ``kept_layers[j]``.
* **Intermediate size** (``k < K``): MLP neurons ``0 .. k-1`` — the first ``k`` rows of
  ``gate_proj``/``up_proj`` (Llama; first ``k`` columns of GPT-2's ``c_fc`` and its bias) and the first
  ``k`` input columns of ``down_proj`` (first ``k`` rows of GPT-2's ``mlp.c_proj``).
* **Hidden size** (``d < D``): residual-stream dimensions ``0 .. d-1`` everywhere they appear — the
  first ``d`` columns of the token (and GPT-2 position) embeddings and of an untied ``lm_head``, the
  first ``d`` entries of every norm's weight/bias, the first ``d`` input columns of every projection that
  reads the residual stream, and the first ``d`` output rows of every projection that writes it.
  Llama-family attention keeps all heads at their size (``head_dim`` is written into the config);
  GPT-2 ties the head size to ``n_embd / n_head``, so it keeps the first ``d / head_dim`` heads (``d``
  must be a multiple of the head size) — the first ``d`` columns of each of the query, key and value
  blocks of ``c_attn`` and the first ``d`` rows of ``attn.c_proj``.
* Everything else (vocabulary, positions, norms' epsilon, rotary settings) is the teacher's.

Every copied tensor is therefore the leading block of the teacher's tensor (per q/k/v block for
GPT-2's fused ``c_attn``), taken from the kept layer. Slicing the residual stream is a crude pruning
(norm statistics change); the point of such a student is to be distilled afterwards.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from kdbench.errors import ConfigError, ModelError

STUDENT_RECORD = "kdbench_student.json"
RECORD_FORMAT = 1

# model_type -> the state-dict prefix of the transformer blocks. Llama, Mistral and Qwen2 share the
# same module names (q/k/v/o_proj, gate/up/down_proj, input/post_attention_layernorm).
_LAYER_PREFIX = {"llama": "model.layers.", "mistral": "model.layers.", "qwen2": "model.layers.",
                 "gpt2": "transformer.h."}


def select_layers(total: int, keep: int, selection: str = "even") -> list[int]:
    """Indices of the ``keep`` teacher blocks (out of ``total``) a student keeps, in order."""
    if not 1 <= keep <= total:
        raise ConfigError(f"layers must be between 1 and the teacher's {total} layers, got {keep}.")
    if selection == "first":
        return list(range(keep))
    if selection == "even":
        if keep == 1:
            return [0]
        # the spacing (total-1)/(keep-1) is >= 1, so rounding never maps two students to one block
        return [int(i * (total - 1) / (keep - 1) + 0.5) for i in range(keep)]  # rounded half up
    raise ConfigError(f"selection must be 'even' or 'first', got {selection!r}.")


def _dims(config) -> dict:
    """Teacher dimensions under common names: layers, hidden, intermediate, heads, head_dim."""
    if config.model_type == "gpt2":
        return {"layers": config.n_layer, "hidden": config.n_embd, "intermediate": config.n_inner or 4 * config.n_embd,
                "heads": config.n_head, "head_dim": config.n_embd // config.n_head}
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return {"layers": config.num_hidden_layers, "hidden": config.hidden_size,
            "intermediate": config.intermediate_size, "heads": config.num_attention_heads, "head_dim": head_dim}


def student_config(teacher_config, kept_layers: list[int], hidden: int, intermediate: int):
    """A copy of ``teacher_config`` with ``len(kept_layers)`` blocks and the given widths."""
    config = teacher_config.__class__.from_dict(teacher_config.to_dict())
    teacher = _dims(teacher_config)
    if config.model_type == "gpt2":
        if hidden % teacher["head_dim"]:
            raise ConfigError(f"For GPT-2, hidden_size must be a multiple of the head size {teacher['head_dim']} "
                              f"(heads are kept whole), got {hidden}.")
        config.n_layer, config.n_embd, config.n_inner = len(kept_layers), hidden, intermediate
        config.n_head = hidden // teacher["head_dim"]
        return config
    if hidden != teacher["hidden"] and "head_dim" not in config.to_dict():
        raise ConfigError(f"{config.model_type} configs have no head_dim setting, so hidden_size cannot be narrowed "
                          "without changing the heads; narrow intermediate_size or the layers instead.")
    config.num_hidden_layers, config.hidden_size, config.intermediate_size = len(kept_layers), hidden, intermediate
    if "head_dim" in config.to_dict():
        config.head_dim = teacher["head_dim"]  # attention keeps its heads whole when the residual narrows
    if isinstance(getattr(config, "layer_types", None), list):
        config.layer_types = [teacher_config.layer_types[i] for i in kept_layers]
    return config


def _teacher_key(student_key: str, prefix: str, kept_layers: list[int]) -> str:
    """The teacher state-dict key a student key copies from (block index renumbered)."""
    if not student_key.startswith(prefix):
        return student_key
    index, _, rest = student_key[len(prefix):].partition(".")
    return f"{prefix}{kept_layers[int(index)]}.{rest}"


def _slice_like(teacher_tensor, student_shape: tuple[int, ...], key: str, model_type: str, teacher_hidden: int):
    """The leading block of ``teacher_tensor`` with ``student_shape``; GPT-2's fused c_attn per q/k/v block."""
    import torch

    if model_type == "gpt2" and key.endswith(("attn.c_attn.weight", "attn.c_attn.bias")):
        # Conv1D weight [D, 3D] / bias [3D]: output columns are [query | key | value], D each.
        width = student_shape[-1] // 3
        blocks = [teacher_tensor[..., i * teacher_hidden: i * teacher_hidden + width] for i in range(3)]
        fused = torch.cat(blocks, dim=-1)
        return fused[: student_shape[0]] if fused.dim() == 2 else fused
    if teacher_tensor.dim() != len(student_shape) or any(t < s for t, s in zip(teacher_tensor.shape, student_shape)):
        raise ModelError(f"Cannot derive {key}: teacher shape {tuple(teacher_tensor.shape)} vs student "
                         f"{student_shape}; only Llama-family and GPT-2 teachers are supported.")
    return teacher_tensor[tuple(slice(0, size) for size in student_shape)]


def copy_teacher_weights(teacher, student, kept_layers: list[int]) -> int:
    """Copy every student tensor from the leading block of its teacher tensor (see the module docstring).

    Returns the number of state-dict entries copied.
    """
    import torch

    model_type = teacher.config.model_type
    prefix = _LAYER_PREFIX[model_type]
    teacher_state = teacher.state_dict()
    teacher_hidden = _dims(teacher.config)["hidden"]
    copied = 0
    with torch.no_grad():
        for key, target in student.state_dict().items():
            source_key = _teacher_key(key, prefix, kept_layers)
            if source_key not in teacher_state:
                raise ModelError(f"The teacher has no weight {source_key} for the student's {key}; "
                                 "only Llama-family and GPT-2 teachers are supported.")
            target.copy_(_slice_like(teacher_state[source_key], tuple(target.shape), key, model_type, teacher_hidden))
            copied += 1
    return copied


def derive_student(teacher_dir: str | os.PathLike, out_dir: str | os.PathLike, *, layers: int,
                   selection: str = "even", hidden_size: int | None = None, intermediate_size: int | None = None,
                   from_scratch: bool = False, seed: int = 0) -> Path:
    """Save a student derived from the teacher at ``teacher_dir`` into ``out_dir``; returns ``out_dir``.

    ``teacher_dir`` is anything :func:`kdbench.models.resolve_model_path` accepts (a directory, a hub
    id, a GGUF alias or file). ``layers`` blocks are kept (``selection`` "even" or "first"),
    ``hidden_size`` / ``intermediate_size`` narrow the widths (default: the teacher's). The student's
    weights are copied from the teacher (see the module docstring for exactly which), or, with
    ``from_scratch=True``, drawn from the architecture's init under ``torch.manual_seed(seed)``.
    ``out_dir`` receives ``config.json``, ``model.safetensors``, the teacher's tokenizer and
    generation config, and ``kdbench_student.json`` (what was kept). The directory is written
    atomically; when it already holds a student derived with the same settings it is returned as is.
    """
    import torch
    from transformers import AutoModelForCausalLM

    from kdbench.models import count_parameters, load_model, load_tokenizer, resolve_model_path
    from kdbench.store import atomic_write_json

    out_dir = Path(out_dir)
    teacher_path = resolve_model_path(teacher_dir)
    tokenizer = load_tokenizer(teacher_path)  # a folder without tokenizer files fails before any work
    teacher = load_model(teacher_path, trainable=False)
    model_type = teacher.config.model_type
    if model_type not in _LAYER_PREFIX:
        raise ModelError(f"Cannot derive a student from a {model_type} model; supported: {', '.join(_LAYER_PREFIX)}.")
    dims = _dims(teacher.config)
    hidden = dims["hidden"] if hidden_size is None else int(hidden_size)
    intermediate = dims["intermediate"] if intermediate_size is None else int(intermediate_size)
    if not 1 <= hidden <= dims["hidden"]:
        raise ConfigError(f"hidden_size must be between 1 and the teacher's {dims['hidden']}, got {hidden}.")
    if not 1 <= intermediate <= dims["intermediate"]:
        raise ConfigError(f"intermediate_size must be between 1 and the teacher's {dims['intermediate']}, "
                          f"got {intermediate}.")
    kept_layers = select_layers(dims["layers"], int(layers), selection)
    recipe = {"teacher": str(teacher_dir), "layers": len(kept_layers),
              "selection": selection, "hidden_size": hidden, "intermediate_size": intermediate,
              "from_scratch": bool(from_scratch), "seed": int(seed)}
    existing = _existing_record(out_dir)
    if existing is not None:
        if existing.get("recipe") == recipe:
            return out_dir
        raise ModelError(f"{out_dir} already holds a different model; choose another output directory or delete it.")

    config = student_config(teacher.config, kept_layers, hidden, intermediate)
    torch.manual_seed(seed)
    student = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    copied = 0 if from_scratch else copy_teacher_weights(teacher, student, kept_layers)
    student.generation_config = teacher.generation_config

    student_dims = _dims(student.config)
    record = {
        "format": RECORD_FORMAT,
        "recipe": recipe,
        "teacher_path": str(teacher_path),
        "model_type": model_type,
        "weights": "random init (seeded)" if from_scratch else "copied from the teacher (leading blocks)",
        "tensors_copied": copied,
        "teacher_layers": dims["layers"],
        "kept_layers": kept_layers,
        "teacher_dims": dims,
        "student_dims": student_dims,
        "kept_hidden_dims": [0, hidden],
        "kept_intermediate_neurons": [0, intermediate],
        "kept_heads": [0, student_dims["heads"]],
        "parameters": {"teacher": count_parameters(teacher), "student": count_parameters(student)},
    }
    tmp = out_dir.parent / f".{out_dir.name}.building-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        student.save_pretrained(str(tmp), safe_serialization=True)
        tokenizer.save_pretrained(str(tmp))
        atomic_write_json(tmp / STUDENT_RECORD, record)
        if out_dir.exists():  # an empty folder the caller made
            out_dir.rmdir()
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def _existing_record(out_dir: Path) -> dict | None:
    """The student record in ``out_dir``; None when it is absent or empty; an error when it holds something else."""
    if not out_dir.exists():
        return None
    if not out_dir.is_dir():
        raise ModelError(f"{out_dir} is a file; choose a directory for the student.")
    if not any(out_dir.iterdir()):
        return None
    try:
        return json.loads((out_dir / STUDENT_RECORD).read_text())
    except (OSError, json.JSONDecodeError):
        raise ModelError(f"{out_dir} is not empty and holds no kdbench student; choose another output directory "
                         "or delete it.") from None


def read_student_record(model_dir: str | os.PathLike) -> dict:
    """The ``kdbench_student.json`` of a derived student."""
    path = Path(model_dir) / STUDENT_RECORD
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        raise ModelError(f"{path} is missing or unreadable; derive the student with "
                         "kdbench.students.derive_student.") from None
