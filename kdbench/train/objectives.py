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

    name = divergence_name(params)
    divergence = DIVERGENCES[name]
    extra = params.get("divergence_params") or {}
    div = divergence(batch.student_logits, batch.teacher_logits, batch.mask, temperature=params["temperature"],
                     reduction="sum", **extra)
    if params.get("temperature_squared"):
        div = div * params["temperature"] ** 2
    ce = cross_entropy_sum(batch.student_logits, batch.targets)
    ratio = params["kd_ratio"]
    loss = (1 - ratio) * ce + ratio * div if params["kd_weighting"] == "mix" else ce + ratio * div
    return {"loss": loss, "ce": ce, name: div}


def divergence_name(params: dict) -> str:
    """The token divergence of a recipe: ``kl_direction`` (reverse → rkl, forward → fkl; dsft_kl) when the
    recipe has it, else ``divergence``."""
    if params.get("kl_direction"):
        return KL_DIRECTIONS[params["kl_direction"]]
    return str(params.get("divergence"))


def _dpkd_token(batch: Batch, params: dict) -> dict:
    """DPKD's token-level form (the authors' code) + λ·CE on the same (gold) responses."""
    from kdbench.losses.guided import dpkd_token

    preference = dpkd_token(batch.student_logits, batch.teacher_logits, batch.mask, beta=float(params["beta"]),
                            reduction="sum")
    ce = cross_entropy_sum(batch.student_logits, batch.targets)
    return {"loss": preference + float(params["lm_weight"]) * ce, "ce": ce, "dpkd_token": preference}


def _validate_dpkd_token(params: dict) -> None:
    if not _number(params, "beta") > 0:
        raise ConfigError(f"Parameter beta must be greater than 0 (got {params['beta']}).")
    if _number(params, "lm_weight") < 0:
        raise ConfigError(f"Parameter lm_weight must not be negative (got {params['lm_weight']}).")
    _validate_stage_settings(params)
    _validate_switches(params)


def _validate_token_kd(params: dict) -> None:
    from kdbench.losses.divergences import get_divergence

    if params.get("kl_direction") and params["kl_direction"] not in KL_DIRECTIONS:
        raise ConfigError(f"Parameter kl_direction must be one of {', '.join(KL_DIRECTIONS)} (got {params['kl_direction']!r}).")
    divergence = divergence_name(params)
    extra = params.get("divergence_params") or {}
    if not isinstance(extra, dict):
        raise ConfigError("Parameter divergence_params must be a mapping, e.g. {beta: 0.5}.")
    get_divergence(str(divergence)).resolve(**extra)  # unknown divergence, unknown or out-of-range parameter
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
    _validate_stage_settings(params)
    _validate_switches(params)


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
    _validate_stage_settings(params)
    _validate_switches(params)


def _validate_stage_settings(params: dict) -> None:
    """Every ``*_settings`` parameter (a stage's training settings) is a mapping."""
    for name, value in params.items():
        if name.endswith("_settings") and not isinstance(value, dict):
            raise ConfigError(f"Parameter {name} must be a mapping of training settings, e.g. {{learning_rate: 1e-4}}.")


def _validate_switches(params: dict) -> None:
    """The recipe switches shared by several objectives: ``disable_dropout`` and ``teacher_init``."""
    if "disable_dropout" in params and not isinstance(params["disable_dropout"], bool):
        raise ConfigError(f"Parameter disable_dropout must be true or false (got {params['disable_dropout']!r}).")
    if params.get("teacher_init", "given") not in ("given", "sft"):
        raise ConfigError("Parameter teacher_init must be given (--teacher is already fine-tuned on the task) or sft "
                          "(fine-tune it on --data first, once, cached).")


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
    "dpkd_token": Objective("dpkd_token", _dpkd_token, needs_teacher=True, validate=_validate_dpkd_token),
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

PREFERENCE_FORMS = ("dpo", "dadpo", "simpo", "dpkd", "ipo", "cpo")
PREFERENCE_REFERENCES = ("dsft", "teacher", "student")
KL_DIRECTIONS = {"reverse": "rkl", "forward": "fkl"}


@dataclass
class PairBatch:
    """Summed sequence log-probs of P preference pairs, all [P].

    ``policy_*``: the trained model, with gradient; ``*_lengths``: response tokens (EOS included);
    ``ref_*`` / ``teacher_*``: frozen log-probs computed once before training, or by the teacher in the
    step for DPKD's online pairs (``None`` when the recipe does not use them). Each model scored the
    response text with its own tokenizer.
    """

    policy_chosen: Any
    policy_rejected: Any
    chosen_lengths: Any
    rejected_lengths: Any
    ref_chosen: Any | None = None
    ref_rejected: Any | None = None
    teacher_chosen: Any | None = None
    teacher_rejected: Any | None = None


def preference_form(params: dict) -> str:
    """The sequence-level loss of a recipe: ``preference_form`` (DPKD's Table 2 switch) or ``loss``."""
    return str(params.get("preference_form") or params.get("loss"))


def preference_reference(params: dict) -> str | None:
    """Which frozen model the loss's reference is: None for SimPO and CPO (reference-free), "dsft" for
    daDPO (which also uses the teacher), the teacher for DPKD, else ``params.reference``."""
    form = preference_form(params)
    if form in ("simpo", "cpo"):
        return None
    if form == "dadpo":
        return "dsft"
    if form == "dpkd":
        return "teacher"
    return params.get("reference", "teacher")


#: Each form's reading when ``length_normalize`` is null: DPKD's Eq. 9 divides each log-ratio by its
#: response length; IPO's Eq. 17 (and DPKD's Table 2, METHODS.md) sums them — ``true`` gives TRL's
#: ``loss_type="ipo"``, which divides.
LENGTH_NORMALIZED_BY_DEFAULT = {"dpkd": True, "ipo": False}


def length_normalized(params: dict) -> bool:
    """Whether the recipe's dpkd / ipo form divides each log-ratio by its response length."""
    value = params.get("length_normalize")
    return LENGTH_NORMALIZED_BY_DEFAULT.get(preference_form(params), False) if value is None else bool(value)


def _reference_logps(pairs: PairBatch, params: dict):
    if preference_reference(params) == "teacher":
        return pairs.teacher_chosen, pairs.teacher_rejected
    return pairs.ref_chosen, pairs.ref_rejected


def _preference(pairs: PairBatch, params: dict) -> dict:
    """Σ over pairs of the recipe's preference loss, plus diagnostics summed over pairs: the implicit
    rewards of chosen and rejected (``reward_chosen`` / ``reward_rejected``; for DPKD β/|y|·log(q/p)),
    ``reward_margin`` and ``reward_accuracy`` (margin > 0)."""
    import torch

    from kdbench.losses.sequence import cpo, dadpo, dpkd, dpo, ipo, simpo

    form = preference_form(params)
    c_len = pairs.chosen_lengths.to(pairs.policy_chosen)
    r_len = pairs.rejected_lengths.to(pairs.policy_rejected)
    pc, pr = pairs.policy_chosen, pairs.policy_rejected
    if form == "dpo":
        ref_c, ref_r = _reference_logps(pairs, params)
        beta = float(params["beta"])
        per_pair = dpo(pc, pr, ref_c, ref_r, beta=beta, reduction="none")
        reward_c, reward_r = beta * (pc - ref_c), beta * (pr - ref_r)
    elif form == "dadpo":
        beta1, beta2 = float(params["beta1"]), float(params["beta2"])
        per_pair = dadpo(pc, pr, pairs.ref_chosen, pairs.ref_rejected, pairs.teacher_chosen, pairs.teacher_rejected,
                         beta1=beta1, beta2=beta2, reduction="none")
        reward_c = beta1 * (pc - pairs.ref_chosen) + beta2 * (pc - pairs.teacher_chosen)
        reward_r = beta1 * (pr - pairs.ref_rejected) + beta2 * (pr - pairs.teacher_rejected)
    elif form == "simpo":
        beta, gamma = float(params["beta"]), float(params["gamma"])
        per_pair = simpo(pc, pr, pairs.chosen_lengths, pairs.rejected_lengths, beta=beta, gamma=gamma,
                         reduction="none")
        reward_c, reward_r = beta * pc / c_len, beta * pr / r_len
    elif form == "dpkd":
        beta = float(params["beta"])
        normalize = length_normalized(params)
        per_pair = dpkd(pc, pr, pairs.teacher_chosen, pairs.teacher_rejected, pairs.chosen_lengths,
                        pairs.rejected_lengths, beta=beta, length_normalize=normalize, reduction="none")
        reward_c = beta * (pc - pairs.teacher_chosen) / (c_len if normalize else 1.0)
        reward_r = beta * (pr - pairs.teacher_rejected) / (r_len if normalize else 1.0)
    elif form == "ipo":
        ref_c, ref_r = _reference_logps(pairs, params)
        normalize = length_normalized(params)  # summed by default (IPO Eq. 17); true: TRL's per-token form
        lengths = {"chosen_lengths": pairs.chosen_lengths, "rejected_lengths": pairs.rejected_lengths} if normalize else {}
        per_pair = ipo(pc, pr, ref_c, ref_r, tau=float(params["tau"]), reduction="none", **lengths)
        reward_c = (pc - ref_c) / (c_len if normalize else 1.0)
        reward_r = (pr - ref_r) / (r_len if normalize else 1.0)
    elif form == "cpo":
        beta = float(params["beta"])
        per_pair = cpo(pc, pr, pairs.chosen_lengths, beta=beta, nll=params.get("cpo_nll", "token_mean"),
                       reduction="none")
        reward_c, reward_r = beta * pc, beta * pr
    else:  # pragma: no cover - validated before training
        raise ConfigError(f"Unknown preference loss {form!r}; use one of {', '.join(PREFERENCE_FORMS)}.")
    reward_c, reward_r = reward_c.detach(), reward_r.detach()
    margin = reward_c - reward_r
    return {"loss": per_pair.sum(), "reward_chosen": reward_c.sum(), "reward_rejected": reward_r.sum(),
            "reward_margin": margin.sum(), "reward_accuracy": (margin > 0).to(torch.float32).sum()}


def _validate_preference(params: dict) -> None:
    form = preference_form(params)
    if form not in PREFERENCE_FORMS:
        name = "preference_form" if "preference_form" in params else "loss"
        raise ConfigError(f"Parameter {name} must be one of {', '.join(PREFERENCE_FORMS)} (got {form!r}).")
    if form in ("dpo", "ipo") and "reference" in params and params.get("reference") not in PREFERENCE_REFERENCES:
        raise ConfigError(f"Parameter reference must be one of {', '.join(PREFERENCE_REFERENCES)} "
                          f"(got {params.get('reference')!r}).")
    names = {"dpo": ("beta",), "dadpo": ("beta1", "beta2"), "simpo": ("beta", "gamma"), "dpkd": ("beta",),
             "ipo": ("tau",), "cpo": ("beta",)}[form]
    for name in names:
        value = _number(params, name)
        if value < 0 or (name in ("beta", "tau") and value == 0):
            raise ConfigError(f"Parameter {name} must be {'greater than 0' if name in ('beta', 'tau') else 'at least 0'} "
                              f"(got {value}).")
    if form == "dadpo" and float(params["beta1"]) == 0 and float(params["beta2"]) == 0:
        raise ConfigError("Parameters beta1 and beta2 cannot both be 0 (the loss would be constant).")
    if form == "cpo" and params.get("cpo_nll", "token_mean") not in ("token_mean", "sequence_sum"):
        raise ConfigError("Parameter cpo_nll must be token_mean or sequence_sum.")
    normalize = params.get("length_normalize")
    if normalize is not None and not isinstance(normalize, bool):
        raise ConfigError(f"Parameter length_normalize must be true, false or null (got {normalize!r}).")
    if normalize is not None and form not in LENGTH_NORMALIZED_BY_DEFAULT:
        raise ConfigError(f"Parameter length_normalize applies to the dpkd and ipo forms, not {form}; leave it null.")
    _validate_stage_settings(params)
    _validate_switches(params)
    for name in ("lm_weight", "kl_weight"):
        if name in params and _number(params, name) < 0:
            raise ConfigError(f"Parameter {name} must not be negative (got {params[name]}).")
    if "kl_direction" in params and params["kl_direction"] not in KL_DIRECTIONS:
        raise ConfigError(f"Parameter kl_direction must be one of {', '.join(KL_DIRECTIONS)} (got {params['kl_direction']!r}).")
    if "pairs" in params and params["pairs"] not in ("online", "offline", "preference_data"):
        raise ConfigError(f"Parameter pairs must be online, offline or preference_data (got {params['pairs']!r}).")
    if "init" in params and params["init"] not in ("sft", "student"):
        raise ConfigError(f"Parameter init must be sft (train the student's SFT checkpoint first) or student "
                          f"(start from --student as given); got {params['init']!r}.")
    _validate_generation(params)


OBJECTIVES["preference"] = Objective("preference", _preference, needs_teacher=False, validate=_validate_preference)


# ---------------------------------------------------------------------------------------------------
# Teacher-guided objectives on preference data (METHODS.md: DCKD, ADPA), used by
# :mod:`kdbench.train.guided`. The trainer passes the optimizer step's token and sequence counts, so the
# returned loss is already normalized over the whole step (gradient accumulation, data parallelism).

GUIDED_FORMS = ("dckd", "adpa")


@dataclass
class GuidedBatch:
    """One micro-batch of (x, y_w, y_other) rows, logits aligned as in :class:`Batch`.

    ``chosen_*``: the y_w rows ([P, T, V] student logits, [P, T] targets and mask). ``other_*``: y_l (DCKD)
    or the student's own response ŷ (ADPA). ``dpo_chosen`` / ``dpo_other``: the DPO-aligned teacher's logits
    (dense or :class:`~kdbench.losses.SparseTeacher`; ``dpo_chosen`` None for ADPA); ``ref_other``: π_ref's
    logits on the ŷ rows (ADPA). ``chosen_tokens`` / ``other_tokens`` / ``sequences``: the step's totals.
    """

    chosen_logits: Any
    chosen_targets: Any
    chosen_mask: Any
    other_logits: Any
    other_mask: Any
    dpo_chosen: Any | None
    dpo_other: Any
    ref_other: Any | None
    chosen_tokens: Any
    other_tokens: Any
    sequences: Any


def _guided(batch: GuidedBatch, params: dict) -> dict:
    """DCKD: CE(y_w) + α·(FKL(π_dpo‖π_θ) on y_w + FKL on y_l); ADPA: CE(y_w) + γ·advantage loss on ŷ.
    Token means over the step's tokens by default; ``kl_reduction`` / ``adpa_reduction`` = sequence_sum
    (DCKD's Eqs. 5–6) or sum over positions then mean over the step's sequences (ADPA's Eq. 10)."""
    from kdbench.losses.guided import adpa, dckd

    if params["loss"] == "dckd":
        loss, parts = dckd(batch.chosen_logits, batch.dpo_chosen, batch.chosen_targets, batch.chosen_mask,
                           batch.other_logits, batch.dpo_other, batch.other_mask, alpha=float(params["alpha"]),
                           temperature=float(params.get("temperature", 1.0)), kl_reduction=params["kl_reduction"],
                           chosen_token_count=batch.chosen_tokens, rejected_token_count=batch.other_tokens,
                           sequence_count=batch.sequences, return_parts=True)
        return {"loss": loss, **parts}
    ce = cross_entropy_sum(batch.chosen_logits, batch.chosen_targets)
    top_k = params.get("teacher_topk")
    advantage = adpa(batch.other_logits, batch.dpo_other, batch.ref_other, batch.other_mask, reduction="sum",
                     top_k=int(top_k) if top_k else None, missing_ref=params.get("missing_ref", "ref_lowest"))
    denominator = batch.sequences if params["adpa_reduction"] == "sequence_sum" else batch.other_tokens
    loss = ce / batch.chosen_tokens + float(params["gamma"]) * advantage / denominator
    return {"loss": loss, "ce": ce, "adpa": advantage}


def _validate_guided(params: dict) -> None:
    form = params.get("loss")
    if form not in GUIDED_FORMS:
        raise ConfigError(f"Parameter loss must be one of {', '.join(GUIDED_FORMS)} (got {form!r}).")
    if "alpha" in params and _number(params, "alpha") < 0:
        raise ConfigError(f"Parameter alpha must not be negative (got {params['alpha']}).")
    if "gamma" in params and _number(params, "gamma") < 0:
        raise ConfigError(f"Parameter gamma must not be negative (got {params['gamma']}).")
    if not _number(params, "teacher_dpo_beta") > 0:
        raise ConfigError(f"Parameter teacher_dpo_beta must be greater than 0 (got {params['teacher_dpo_beta']}).")
    for name in ("kl_reduction", "adpa_reduction"):
        if name in params and params[name] not in ("token_mean", "sequence_sum"):
            raise ConfigError(f"Parameter {name} must be token_mean or sequence_sum (got {params[name]!r}).")
    top_k = params.get("teacher_topk")
    if top_k is not None and not (isinstance(top_k, int) and not isinstance(top_k, bool) and top_k >= 1):
        raise ConfigError(f"Parameter teacher_topk must be a whole number >= 1, or null for the dense teacher (got {top_k!r}).")
    if params.get("missing_ref", "ref_lowest") not in ("ref_lowest", "dpo_lowest"):
        raise ConfigError("Parameter missing_ref must be ref_lowest or dpo_lowest.")
    if params.get("ref_teacher", "given") not in ("given", "sft"):
        raise ConfigError("Parameter ref_teacher must be given (--teacher is already fine-tuned on the task) or sft "
                          "(fine-tune it on the chosen responses first).")
    if params.get("init", "student") not in ("sft", "student"):
        raise ConfigError(f"Parameter init must be sft or student (got {params['init']!r}).")
    _validate_stage_settings(params)
    _validate_switches(params)
    _validate_generation(params)


OBJECTIVES["guided"] = Objective("guided", _guided, needs_teacher=True, validate=_validate_guided)
