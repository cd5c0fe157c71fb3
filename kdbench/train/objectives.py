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


# ---------------------------------------------------------------------------------------------------
# Sequence-level preference objectives (METHODS.md, "Sequence-level preference losses"), used by
# :mod:`kdbench.train.pipeline`. Unlike the token objectives above they take a :class:`PairBatch` and
# return the loss *summed over pairs*; the pipeline's trainer divides by the number of pairs of the
# whole optimizer step.

PREFERENCE_FORMS = ("dpo", "dadpo", "simpo")
PREFERENCE_REFERENCES = ("dsft", "teacher", "student")


@dataclass
class PairBatch:
    """Summed sequence log-probs of P preference pairs, all [P].

    ``policy_*``: the trained model, with gradient; ``*_lengths``: response tokens (EOS included);
    ``ref_*`` / ``teacher_*``: frozen log-probs computed once before training (``None`` when the
    recipe does not use them). Each model scored the response text with its own tokenizer.
    """

    policy_chosen: Any
    policy_rejected: Any
    chosen_lengths: Any
    rejected_lengths: Any
    ref_chosen: Any | None = None
    ref_rejected: Any | None = None
    teacher_chosen: Any | None = None
    teacher_rejected: Any | None = None


def preference_reference(params: dict) -> str | None:
    """Which frozen model DPO's reference is (None for SimPO, which has none; daDPO uses dsft + teacher)."""
    form = params["loss"]
    if form == "simpo":
        return None
    if form == "dadpo":
        return "dsft"
    return params["reference"]


def _preference(pairs: PairBatch, params: dict) -> dict:
    """Σ over pairs of the recipe's preference loss, plus diagnostics summed over pairs:
    ``reward_accuracy`` (implicit reward margin > 0) and ``reward_margin``."""
    import torch

    from kdbench.losses.sequence import dadpo, dpo, simpo

    form = params["loss"]
    if form == "dpo":
        if params["reference"] == "teacher":  # rDPO: the teacher is the reference
            ref_c, ref_r = pairs.teacher_chosen, pairs.teacher_rejected
        else:
            ref_c, ref_r = pairs.ref_chosen, pairs.ref_rejected
        per_pair = dpo(pairs.policy_chosen, pairs.policy_rejected, ref_c, ref_r, beta=float(params["beta"]),
                       reduction="none")
        margin = float(params["beta"]) * ((pairs.policy_chosen - ref_c) - (pairs.policy_rejected - ref_r))
    elif form == "dadpo":
        beta1, beta2 = float(params["beta1"]), float(params["beta2"])
        per_pair = dadpo(pairs.policy_chosen, pairs.policy_rejected, pairs.ref_chosen, pairs.ref_rejected,
                         pairs.teacher_chosen, pairs.teacher_rejected, beta1=beta1, beta2=beta2, reduction="none")
        margin = (beta1 * ((pairs.policy_chosen - pairs.ref_chosen) - (pairs.policy_rejected - pairs.ref_rejected))
                  + beta2 * ((pairs.policy_chosen - pairs.teacher_chosen)
                             - (pairs.policy_rejected - pairs.teacher_rejected)))
    elif form == "simpo":
        beta, gamma = float(params["beta"]), float(params["gamma"])
        per_pair = simpo(pairs.policy_chosen, pairs.policy_rejected, pairs.chosen_lengths, pairs.rejected_lengths,
                         beta=beta, gamma=gamma, reduction="none")
        margin = (beta * pairs.policy_chosen / pairs.chosen_lengths.to(pairs.policy_chosen)
                  - beta * pairs.policy_rejected / pairs.rejected_lengths.to(pairs.policy_rejected))
    else:  # pragma: no cover - validated before training
        raise ConfigError(f"Unknown preference loss {form!r}; use one of {', '.join(PREFERENCE_FORMS)}.")
    margin = margin.detach()
    return {"loss": per_pair.sum(), "reward_margin": margin.sum(), "reward_accuracy": (margin > 0).to(torch.float32).sum()}


def _validate_preference(params: dict) -> None:
    form = params.get("loss")
    if form not in PREFERENCE_FORMS:
        raise ConfigError(f"Parameter loss must be one of {', '.join(PREFERENCE_FORMS)} (got {form!r}).")
    if form == "dpo" and params.get("reference") not in PREFERENCE_REFERENCES:
        raise ConfigError(f"Parameter reference must be one of {', '.join(PREFERENCE_REFERENCES)} "
                          f"(got {params.get('reference')!r}).")
    names = {"dpo": ("beta",), "dadpo": ("beta1", "beta2"), "simpo": ("beta", "gamma")}[form]
    for name in names:
        value = _number(params, name)
        if value < 0 or (name == "beta" and value == 0):
            raise ConfigError(f"Parameter {name} must be {'greater than 0' if name == 'beta' else 'at least 0'} "
                              f"(got {value}).")
    if form == "dadpo" and float(params["beta1"]) == 0 and float(params["beta2"]) == 0:
        raise ConfigError("Parameters beta1 and beta2 cannot both be 0 (the loss would be constant).")
    if "dsft_settings" in params and not isinstance(params["dsft_settings"], dict):
        raise ConfigError("Parameter dsft_settings must be a mapping of training settings, e.g. {learning_rate: 1e-4}.")
    _validate_generation(params)


OBJECTIVES["preference"] = Objective("preference", _preference, needs_teacher=False, validate=_validate_preference)
