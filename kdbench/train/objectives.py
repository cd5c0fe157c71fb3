"""Training objectives: how a recipe turns one micro-batch into a summed loss.

Each objective returns the loss *summed* over the micro-batch's counted response tokens; the
engine divides by the number of counted tokens of the whole optimizer step (across micro-batches
and processes), so gradient accumulation and data parallelism do not change the result
(METHODS.md, "Token-level reduction").

A method is a loss function in :mod:`kdbench.losses` plus a recipe file in ``trainers/`` naming an
objective here and its parameters.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from kdbench.errors import ConfigError


@dataclass
class Batch:
    """Aligned tensors of one micro-batch: position t predicts ``targets[:, t]``.

    ``student_logits``: [B, T, V]; ``teacher_logits``: [B, T, V] dense logits, a top-k
    :class:`~kdbench.losses.SparseTeacher` (offline cache) or ``None`` (no teacher); ``targets``:
    [B, T] (−100 = not counted); ``mask``: [B, T] float (1 = counted response position).
    """

    student_logits: Any
    teacher_logits: Any | None
    targets: Any
    mask: Any


def cross_entropy_sum(logits, targets):
    """Σ over counted positions of −log q(target); logits upcast to float32 (METHODS.md conventions)."""
    import torch.nn.functional as F

    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=-100,
                           reduction="sum")


def _sft(batch: Batch, params: dict) -> dict:
    ce = cross_entropy_sum(batch.student_logits, batch.targets)
    return {"loss": ce, "ce": ce}


def _token_kd(batch: Batch, params: dict) -> dict:
    """(1−r)·CE(gold) + r·D(p‖q) (MiniLLM convention) or CE + r·D (ADPA Eq. 1, ``kd_weighting: additive``)."""
    from kdbench.losses import DIVERGENCES

    divergence = DIVERGENCES[params["divergence"]]
    extra = params.get("divergence_params") or {}
    div = divergence(batch.student_logits, batch.teacher_logits, batch.mask, temperature=params["temperature"],
                     reduction="sum", **extra)
    if params.get("temperature_squared"):
        div = div * params["temperature"] ** 2
    ce = cross_entropy_sum(batch.student_logits, batch.targets)
    ratio = params["kd_ratio"]
    loss = (1 - ratio) * ce + ratio * div if params["kd_weighting"] == "mix" else ce + ratio * div
    return {"loss": loss, "ce": ce, params["divergence"]: div}


def _validate_token_kd(params: dict) -> None:
    from kdbench.losses.token import divergence_rows

    divergence = params.get("divergence")
    extra = params.get("divergence_params") or {}
    if not isinstance(extra, dict):
        raise ConfigError("Parameter divergence_params must be a mapping, e.g. {beta: 0.5}.")
    divergence_rows(str(divergence), **extra)  # unknown divergence, unknown or out-of-range parameter
    if params.get("kd_weighting") not in ("mix", "additive"):
        raise ConfigError("Parameter kd_weighting must be 'mix' ((1-r)·CE + r·KD) or 'additive' (CE + r·KD).")
    ratio = _number(params, "kd_ratio")
    if params["kd_weighting"] == "mix" and not 0.0 <= ratio <= 1.0:
        raise ConfigError(f"Parameter kd_ratio must be between 0 and 1 with kd_weighting: mix (got {ratio}).")
    if ratio < 0:
        raise ConfigError(f"Parameter kd_ratio must not be negative (got {ratio}).")
    if not _number(params, "temperature") > 0:
        raise ConfigError(f"Parameter temperature must be greater than 0 (got {params['temperature']}).")
    _validate_generation(params)


def _validate_generation(params: dict) -> None:
    """Parameters of recipes that generate responses (seqkd: the teacher; gkd: the student)."""
    if "on_policy_fraction" in params and not 0.0 <= _number(params, "on_policy_fraction") <= 1.0:
        raise ConfigError(f"Parameter on_policy_fraction must be between 0 and 1 (got {params['on_policy_fraction']}).")
    if "generation_temperature" in params and not _number(params, "generation_temperature") > 0:
        raise ConfigError("Parameter generation_temperature must be greater than 0 (use greedy: true instead of 0).")
    if "max_new_tokens" in params and not (isinstance(params["max_new_tokens"], int) and params["max_new_tokens"] >= 1):
        raise ConfigError(f"Parameter max_new_tokens must be a whole number of at least 1 (got {params['max_new_tokens']}).")
    if "top_p" in params and not 0 < _number(params, "top_p") <= 1:
        raise ConfigError(f"Parameter top_p must be in (0, 1] (got {params['top_p']}).")
    if "top_k" in params and not (isinstance(params["top_k"], int) and params["top_k"] >= 0):
        raise ConfigError(f"Parameter top_k must be a whole number >= 0 (got {params['top_k']}).")


def _validate_sft(params: dict) -> None:
    _validate_generation(params)


def _number(params: dict, name: str) -> float:
    value = params.get(name)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"Parameter {name} must be a number (got {value!r}).")
    return float(value)


@dataclass(frozen=True)
class Objective:
    name: str
    fn: Callable[[Batch, dict], dict]
    needs_teacher: bool
    validate: Callable[[dict], None] | None = None


OBJECTIVES: dict[str, Objective] = {
    "sft": Objective("sft", _sft, needs_teacher=False, validate=_validate_sft),
    "token_kd": Objective("token_kd", _token_kd, needs_teacher=True, validate=_validate_token_kd),
}


def get_objective(name: str) -> Objective:
    if name not in OBJECTIVES:
        raise ConfigError(f"Recipe names unknown objective {name!r}; known: {', '.join(OBJECTIVES)}.")
    return OBJECTIVES[name]
