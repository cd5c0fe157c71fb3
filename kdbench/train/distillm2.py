"""DistiLLM-2 (Ko et al., ICML 2025) as a guided form: the contrastive loss on (teacher response, student
response) pairs — skew KL toward the teacher on y_t, skew reverse KL on the student's own y_s — with its β
curriculum. Definitions, defaults and decisions: ``docs/methods.md`` ("DistiLLM-2"); the loss is
:func:`kdbench.losses.contrastive.distillm2`.

The recipe (``trainers/distillm2.yaml``) reads prompts; its stages generate y_t (``teacher_responses``) and
y_s (``student_responses``, the starting student) once and cache them (the paper's one round of generation
per training round; kdbench runs one round). The guided trainer puts y_t in the ``chosen`` rows and y_s in the
``other`` rows and runs the teacher on both (the form's teacher ``dpo`` is the step's teacher: ``--teacher``,
prepared by ``prepare_teacher`` when ``teacher_init: sft``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from kdbench.config import option
from kdbench.errors import ConfigError
from kdbench.train.guided_forms import GuidedBatch, GuidedForm, GuidedParams, register_guided_form
from kdbench.train.params import positive


@dataclass
class DistiLLM2Params:
    alpha_teacher: float = option(0.1, "alpha_1 of the skew KL on teacher responses (loss_type distillm_v2).")
    alpha_student: float = option(0.1, "alpha_2 of the skew reverse KL on student responses.")
    beta_schedule: Literal["constant", "gradual"] = option(
        "constant", "constant: beta = 1 (SKL and SRKL weighted equally); gradual: beta rises from 1 to 1.5 over the "
                    "first half of training (the authors' curriculum).")
    detach_student_in_mixture: bool = option(False, "Stop the gradient through q inside SRKL's mixture (the "
                                                    "authors' code); false differentiates the divergence as written.")
    response_reduction: Literal["sequence_mean", "token_mean"] = option(
        "sequence_mean", "sequence_mean: each response's token mean, then the mean over pairs (the authors'); "
                         "token_mean: the batch's tokens.")
    temperature: float = option(1.0, "Divides student and teacher logits.")

    def __post_init__(self):
        for name in ("alpha_teacher", "alpha_student"):
            if not 0.0 < getattr(self, name) < 1.0:
                raise ConfigError(f"Parameter {name} must lie strictly between 0 and 1 (got {getattr(self, name)}).")
        positive("temperature", self.temperature)


def _distillm2(batch: GuidedBatch, p: DistiLLM2Params, family: GuidedParams) -> dict:
    """(2 − β)·SKL_α1(y_t) + β·SRKL_α2(y_s); per pair, normalised by the step's pairs (sequence_mean) or by each
    side's token count (token_mean)."""
    import torch

    from kdbench.losses import DIVERGENCES
    from kdbench.losses.contrastive import distillm2, distillm2_beta

    n = batch.chosen_logits.shape[0]
    teacher = batch.teachers["dpo", "all"]
    beta = distillm2_beta(batch.progress, schedule=p.beta_schedule)
    common = dict(alpha_teacher=p.alpha_teacher, alpha_student=p.alpha_student, beta=beta, temperature=p.temperature,
                  detach_student_in_mixture=p.detach_student_in_mixture)
    args = (batch.chosen_logits, teacher[:n], batch.chosen_mask, batch.other_logits, teacher[n:], batch.other_mask)
    if p.response_reduction == "sequence_mean":
        loss = distillm2(*args, **common, reduction="none").sum() / batch.sequences
    else:  # each side's token sum over the step's tokens of that side
        pull = distillm2(*args, **{**common, "beta": 0.0}, response_reduction="token_mean") / 2.0  # SKL token mean
        push = distillm2(*args, **{**common, "beta": 2.0}, response_reduction="token_mean") / 2.0  # SRKL token mean
        pull_tokens, push_tokens = batch.chosen_mask.sum().clamp(min=1), batch.other_mask.sum().clamp(min=1)
        loss = ((2.0 - beta) * pull * pull_tokens / batch.chosen_tokens
                + beta * push * push_tokens / batch.other_tokens)
    with torch.no_grad():  # the two divergences, summed over their tokens, for the log
        skl = DIVERGENCES["skl"](batch.chosen_logits, teacher[:n], batch.chosen_mask, temperature=p.temperature,
                                 reduction="sum", alpha=p.alpha_teacher)
        srkl = DIVERGENCES["srkl"](batch.other_logits, teacher[n:], batch.other_mask, temperature=p.temperature,
                                   reduction="sum", alpha=p.alpha_student)
    return {"loss": loss, "skl_teacher_response": skl, "srkl_student_response": srkl}


register_guided_form(GuidedForm("distillm2", DistiLLM2Params, (("dpo", "all"),), _distillm2,
                                {"skl_teacher_response": "chosen", "srkl_student_response": "other"},
                                "DistiLLM-2: skew KL on teacher responses + skew reverse KL on student responses."))

__all__ = ["DistiLLM2Params"]
