"""Second-tier token-level methods on the engine: ATKD (a token objective) and Q-KD (two guided forms on ADPA's
stages), on the losses of :mod:`kdbench.losses.second_tier_token`.

* **ATKD** (``objective: atkd``): (1 − r)·CE(gold) + r·[α·L_easy + (1 − α)·L_hard], the split at the median of
  the teacher's u_t = 1 − p(y_t) over the *whole optimizer step*. With one micro-batch on one process the step
  is the micro-batch and nothing extra runs; otherwise :func:`atkd_step_split` runs the teacher once more, without
  gradient, over every micro-batch of the step before the gradient passes (one extra teacher forward per
  micro-batch: the step's teacher compute doubles) and all-gathers the step's u_t across processes (one float
  per counted token), so the split and the group means do not depend on accumulation or process count. It needs
  the dense teacher: the top-k cache keeps no p(y_t) for a target outside the top k, so ATKD refuses it.
* **Q-KD** (``guided_form: q_argmax_kd`` / ``q_softmax_kd``): CE(y_w) + γ/|ŷ|·Σ_t (CE to onehot(argmax A) or
  KL(softmax(βA) ‖ π_θ)) on ADPA's ŷ, A = log π_dpo − log π_ref; dense, or top-k with ``loss_topk``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from kdbench.config import option
from kdbench.errors import ConfigError
from kdbench.losses.sequence import cross_entropy_sum
from kdbench.train.guided_forms import GuidedBatch, GuidedForm, GuidedParams, register_guided_form
from kdbench.train.objectives import Batch, Objective, register_objective
from kdbench.train.params import not_negative, positive, unit_interval


# ------------------------------------------------------------------------------------------ ATKD
@dataclass
class ATKDParams:
    """ATKD (Zhong et al. 2024 §4) mixed with CE on the gold responses as the token KD recipes."""

    alpha: float = option(0.2, "alpha, the weight of the easy tokens' loss (1 - alpha: the hard tokens').")
    kd_ratio: float = option(0.5, "r: (1-r)*CE + r*ATKD (MiniLLM's convention, as kd); 1.0 = ATKD alone.")
    temperature: float = option(1.0, "Divides teacher and student logits in u_t, TCKD and NCKD.")

    def __post_init__(self):
        unit_interval("alpha", self.alpha)
        unit_interval("kd_ratio", self.kd_ratio)
        positive("temperature", self.temperature)


def atkd_step_split(trainer, micro_batches: list, params: ATKDParams, reduce: bool) -> dict:
    """The step's ATKD split: {"threshold", "easy", "hard", "tokens"} over every counted position of
    ``micro_batches`` on every process (the lower median of u_t, hard = above it). Empty when the step is one
    micro-batch on one process (the loss then splits that micro-batch itself: the same thing) or outside
    training (``reduce`` false)."""
    import torch

    from kdbench.losses.second_tier_token import atkd_threshold, atkd_uncertainty

    world = trainer.accelerator.num_processes
    if not reduce or (len(micro_batches) == 1 and world == 1):
        return {}
    device = trainer.args.device
    values = []
    for batch in micro_batches:
        ids, mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)
        targets = batch["labels"][:, 1:].to(device)
        teacher = trainer.teacher_logits(trainer.teacher, ids, mask, trainer.logit_rows)
        u = atkd_uncertainty(teacher, targets, temperature=params.temperature)
        values.append(u[~torch.isnan(u)].float())
    values = torch.cat(values)
    if world > 1:  # every process's u_t: padded to the longest with NaN (ignored by the median), gathered
        values = trainer.accelerator.pad_across_processes(values, dim=0, pad_index=math.nan)
        values = trainer.accelerator.gather(values)
        values = values[~torch.isnan(values)]
    threshold = atkd_threshold(values)
    hard = int((values > threshold).sum())
    return {"threshold": threshold, "hard": hard, "easy": int(values.numel()) - hard, "tokens": int(values.numel())}


def _atkd(batch: Batch, params: ATKDParams) -> dict:
    """Summed over the micro-batch as every token objective: the step-normalised ATKD term times the step's
    token count (the engine divides by it again), plus the CE sum."""
    from kdbench.losses.second_tier_token import atkd

    split = batch.step or {}
    tokens = split.get("tokens", float(batch.mask.sum()))
    term = atkd(batch.student_logits, batch.teacher_logits, batch.targets, batch.mask, alpha=params.alpha,
                temperature=params.temperature, threshold=split.get("threshold"), easy_count=split.get("easy"),
                hard_count=split.get("hard"), reduction="mean") * tokens
    ce = cross_entropy_sum(batch.student_logits, batch.targets)
    return {"loss": (1 - params.kd_ratio) * ce + params.kd_ratio * term, "ce": ce, "atkd": term}


register_objective(Objective("atkd", "token", _atkd, (ATKDParams,), needs_teacher=True, dense_teacher=True,
                             step_stats=atkd_step_split,
                             help="ATKD: CE mixed with easy (NCKD) / hard (TCKD + NCKD) token KD, split at the "
                                  "step's median teacher uncertainty."))


# ------------------------------------------------------------------------------------------ Q-KD
@dataclass
class QArgmaxParams:
    gamma: float = option(1.0, "gamma, the weight of the Q term (per token of y-hat).")

    def __post_init__(self):
        not_negative("gamma", self.gamma)


@dataclass
class QSoftmaxParams:
    gamma: float = option(1.0, "gamma, the weight of the Q term (per token of y-hat).")
    q_beta: float | None = option(None, "beta of softmax(beta x A); null = the DPO teacher's beta (teacher_dpo_beta).")

    def __post_init__(self):
        not_negative("gamma", self.gamma)
        if self.q_beta is not None:
            positive("q_beta", self.q_beta)


def _q_kd(beta_of):
    def loss(batch: GuidedBatch, p, family: GuidedParams) -> dict:
        from kdbench.losses.second_tier_token import q_kd_term

        ce = cross_entropy_sum(batch.chosen_logits, batch.chosen_targets)
        top_k = int(family.loss_topk) if family.loss_topk else None
        term = q_kd_term(batch.other_logits, batch.teachers["dpo", "other"], batch.teachers["ref", "other"],
                         batch.other_mask, beta=beta_of(p), top_k=top_k, reduction="sum")
        return {"loss": ce / batch.chosen_tokens + p.gamma * term / batch.other_tokens, "ce": ce, "q_kd": term}

    return loss


def _softmax_beta(p: QSoftmaxParams) -> float:
    if p.q_beta is None:  # the recipe's kind fills it from teacher_dpo_beta before training
        raise ConfigError("Parameter q_beta is not set; give --set params.q_beta=BETA or params.teacher_dpo_beta.")
    return p.q_beta


register_guided_form(GuidedForm("q_argmax_kd", QArgmaxParams, (("dpo", "other"), ("ref", "other")),
                                _q_kd(lambda p: None), {"ce": "chosen", "q_kd": "other"},
                                "Q-argmax-KD (ADPA Table 6): CE + gamma x CE(onehot(argmax A), student) on y-hat."))
register_guided_form(GuidedForm("q_softmax_kd", QSoftmaxParams, (("dpo", "other"), ("ref", "other")),
                                _q_kd(_softmax_beta), {"ce": "chosen", "q_kd": "other"},
                                "Q-softmax-KD (ADPA Table 6): CE + gamma x KL(softmax(beta A) || student) on y-hat."))
