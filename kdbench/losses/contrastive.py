"""DistiLLM-2's contrastive distillation loss (Ko et al., ICML 2025, arXiv 2503.07067) and its curriculum.
Definitions and decisions: ``docs/methods.md`` ("DistiLLM-2").

For a prompt x with a teacher response y_t and a student response y_s (generated once per round):

    L = (2 − β)·SKL_α1(y_t) + β·SRKL_α2(y_s)

* SKL_α1(y_t) = mean over the tokens of y_t of KL(p ‖ α1·p + (1 − α1)·q_θ) — pulls the student toward the
  teacher on the teacher's response;
* SRKL_α2(y_s) = mean over the tokens of y_s of KL(q_θ ‖ (1 − α2)·p + α2·q_θ) — pushes the student's own
  response toward the teacher;
* β = 1 (equal weights) by default; the curriculum option raises it from 1 to 1.5 over the first half of
  training (:func:`distillm2_beta`);
* α1, α2 = 0.1 by default or per pair from the adaptive rule :func:`distillm2_adaptive_alpha`.

Each response's token mean is taken first, then the mean over pairs (the authors' reduction; ``token_mean``
is kdbench's batch-token convention as an option). Shapes: B pairs; teacher responses [B, T1], student
responses [B, T2]; logits [B, T, V], position t predicting the token at t (aligned). Temperature τ divides all
logits. A response without counted tokens contributes 0.
"""

from __future__ import annotations

from kdbench.errors import ConfigError, DataError
from kdbench.losses.divergences import kl_rows
from kdbench.losses.reduction import check_reduction, compute_dtype, counted_mask

DISTILLM2_DEFAULTS = {"alpha_teacher": 0.1, "alpha_student": 0.1, "beta": 1.0, "beta_schedule": "constant",
                      "adaptive_alpha": False, "min_alpha": 0.01, "detach_student_in_mixture": False,
                      "response_reduction": "sequence_mean"}
BETA_SCHEDULES = ("constant", "gradual")
RESPONSE_REDUCTIONS = ("sequence_mean", "token_mean")


def _alpha_column(alpha, batch: int, dtype):
    """α as a [B, 1, 1] tensor (a float or a per-pair [B] tensor), checked to lie in (0, 1)."""
    import torch

    column = torch.as_tensor(alpha, dtype=dtype)
    if column.dim() == 0:
        column = column.expand(batch)
    if tuple(column.shape) != (batch,):
        raise DataError(f"alpha must be a float or a [B] tensor with B = {batch} pairs (got shape "
                        f"{tuple(column.shape)}).")
    if not bool(((column > 0) & (column < 1)).all()):
        raise ConfigError("every alpha of the skew divergences must lie strictly between 0 and 1.")
    return column.detach().reshape(batch, 1, 1)


def _skew_per_position(student_logits, teacher_logits, alpha, *, reverse: bool, detach_student_in_mixture: bool,
                       temperature: float):
    """Per-position skew KL [B, T] (``reverse=False``: KL(p ‖ α p + (1−α) q); ``True``: KL(q ‖ (1−α) p + α q))."""
    import torch

    dtype = compute_dtype(student_logits, teacher_logits)
    log_q = torch.log_softmax(student_logits.to(dtype) / temperature, dim=-1)
    log_p = torch.log_softmax(teacher_logits.to(dtype) / temperature, dim=-1)
    a = _alpha_column(alpha, student_logits.shape[0], dtype)
    if reverse:
        log_q_mix = log_q.detach() if detach_student_in_mixture else log_q
        log_mix = torch.logaddexp(torch.log1p(-a) + log_p, torch.log(a) + log_q_mix)
        rows = kl_rows(log_q.reshape(-1, log_q.shape[-1]), log_mix.reshape(-1, log_q.shape[-1]))
    else:
        log_mix = torch.logaddexp(torch.log(a) + log_p, torch.log1p(-a) + log_q)
        rows = kl_rows(log_p.reshape(-1, log_p.shape[-1]), log_mix.reshape(-1, log_p.shape[-1]))
    return rows.reshape(student_logits.shape[:2])


def _response_means(per_position, mask_bool, reduction: str):
    """[B, T] per-position values → [B] per-response values (``sequence_mean``) or their token sum and count."""
    import torch

    zero = torch.zeros((), dtype=per_position.dtype)
    values = torch.where(mask_bool, per_position, zero)
    counts = mask_bool.sum(-1).to(per_position.dtype)
    if reduction == "sequence_mean":
        return values.sum(-1) / counts.clamp(min=1)
    return values.sum(-1), counts


def _checked_mask(logits, mask):
    import torch

    if logits.dim() != 3:
        raise DataError(f"logits must be [B, T, V] tensors (got shape {tuple(logits.shape)}).")
    mask_bool = counted_mask(mask, tuple(logits.shape[:2]))
    return torch.ones(tuple(logits.shape[:2]), dtype=torch.bool) if mask_bool is None else mask_bool


def distillm2(student_teacher_response_logits, teacher_teacher_response_logits, teacher_response_mask,
              student_student_response_logits, teacher_student_response_logits, student_response_mask, *,
              alpha_teacher=0.1, alpha_student=0.1, beta=1.0, temperature=1.0, detach_student_in_mixture=False,
              response_reduction="sequence_mean", reduction="mean"):
    """DistiLLM-2's loss (module docstring) on B (teacher response, student response) pairs → scalar
    (``reduction="none"`` → per-pair [B]; with ``token_mean`` only ``mean`` is defined).

    ``*_teacher_response_logits`` [B, T1, V] on y_t with ``teacher_response_mask`` [B, T1];
    ``*_student_response_logits`` [B, T2, V] on y_s with ``student_response_mask`` [B, T2]; the teacher's
    logits carry no gradient. ``alpha_*``: float or per-pair [B] tensor in (0, 1). ``beta`` in [0, 2].
    ``detach_student_in_mixture=True`` stops the gradient through q_θ inside SRKL's mixture (the authors'
    code); the default differentiates the divergence as written.
    """
    import torch

    check_reduction(reduction, ("mean", "none"))
    if response_reduction not in RESPONSE_REDUCTIONS:
        raise ConfigError(f"response_reduction must be one of {', '.join(RESPONSE_REDUCTIONS)} "
                          f"(got {response_reduction!r}).")
    if not 0.0 <= beta <= 2.0:
        raise ConfigError(f"beta must be in [0, 2] (got {beta}).")
    if not temperature > 0:
        raise ConfigError(f"temperature must be > 0 (got {temperature}).")
    for student, teacher in ((student_teacher_response_logits, teacher_teacher_response_logits),
                             (student_student_response_logits, teacher_student_response_logits)):
        if tuple(student.shape) != tuple(teacher.shape):
            raise DataError(f"student and teacher logits differ in shape ({tuple(student.shape)} vs "
                            f"{tuple(teacher.shape)}); both models must share one vocabulary.")
    if student_teacher_response_logits.shape[0] != student_student_response_logits.shape[0]:
        raise DataError("teacher and student responses must come in pairs (one of each per prompt).")
    teacher_mask = _checked_mask(student_teacher_response_logits, teacher_response_mask)
    student_mask = _checked_mask(student_student_response_logits, student_response_mask)
    pull = _skew_per_position(student_teacher_response_logits, teacher_teacher_response_logits, alpha_teacher,
                              reverse=False, detach_student_in_mixture=False, temperature=temperature)
    push = _skew_per_position(student_student_response_logits, teacher_student_response_logits, alpha_student,
                              reverse=True, detach_student_in_mixture=detach_student_in_mixture,
                              temperature=temperature)
    if response_reduction == "sequence_mean":
        per_pair = (2.0 - beta) * _response_means(pull, teacher_mask, response_reduction) + beta * _response_means(
            push, student_mask, response_reduction)
        return per_pair if reduction == "none" else per_pair.mean()
    if reduction == "none":
        raise ConfigError("response_reduction='token_mean' averages over the batch's tokens; use reduction='mean'.")
    pull_sum, pull_count = _response_means(pull, teacher_mask, response_reduction)
    push_sum, push_count = _response_means(push, student_mask, response_reduction)
    return ((2.0 - beta) * pull_sum.sum() / pull_count.sum().clamp(min=1)
            + beta * push_sum.sum() / push_count.sum().clamp(min=1))


def distillm2_beta(progress: float, *, schedule="constant", start=1.0, end=1.5, ramp_fraction=0.5) -> float:
    """β at training ``progress`` ∈ [0, 1] (fraction of optimizer steps done).

    ``constant``: ``start`` (1: SKL and SRKL weighted equally). ``gradual`` (the authors' code's curriculum):
    linear from ``start`` to ``end`` over the first ``ramp_fraction`` of training, then ``end`` — the push
    on student responses grows as the student improves.
    """
    if schedule not in BETA_SCHEDULES:
        raise ConfigError(f"beta schedule must be one of {', '.join(BETA_SCHEDULES)} (got {schedule!r}).")
    if not 0.0 <= progress <= 1.0:
        raise ConfigError(f"training progress must be in [0, 1] (got {progress}).")
    if schedule == "constant":
        return float(start)
    if not ramp_fraction > 0:
        raise ConfigError(f"ramp_fraction must be > 0 (got {ramp_fraction}).")
    return float(start + (end - start) * min(1.0, progress / ramp_fraction))


def distillm2_adaptive_alpha(own_mean_logps, other_mean_logps, initial_gap, *, base_alpha=0.1, min_alpha=0.01,
                             eps=1e-5):
    """Per-pair adaptive α of DistiLLM-2's curriculum: [B], [B], [B] (or float) → [B], no gradient.

    gap = exp(ā) − exp(b̄), with ā = ``own_mean_logps`` and b̄ = ``other_mean_logps`` the token-mean log-probs
    of the response under the two models *now* (for α1 on a teacher response: ā = teacher, b̄ = student; for
    α2 on a student response: ā = student, b̄ = teacher); ``initial_gap`` is the same gap measured once before
    training (the authors precompute it offline). α = clip(1 − (1 − α0)·initial_gap / (gap + eps), min_alpha,
    α0): α0 at the start, shrinking toward ``min_alpha`` as the gap closes, so the mixture moves toward the
    plain KL as the student catches up.
    """
    import torch

    if not 0.0 < min_alpha <= base_alpha < 1.0:
        raise ConfigError(f"need 0 < min_alpha <= base_alpha < 1 (got {min_alpha}, {base_alpha}).")
    with torch.no_grad():
        dtype = compute_dtype(own_mean_logps, other_mean_logps)
        gap = own_mean_logps.to(dtype).exp() - other_mean_logps.to(dtype).exp()
        anchor = (1.0 - base_alpha) * torch.as_tensor(initial_gap, dtype=dtype)
        alpha = 1.0 - anchor / (gap + eps)
        alpha = torch.nan_to_num(alpha, nan=base_alpha, posinf=base_alpha, neginf=min_alpha)
        return alpha.clamp(min=min_alpha, max=base_alpha)


def response_mean_logps(token_logps, mask):
    """Token-mean log-prob of each response, [B, T] → [B] (0 for an empty response): the statistic
    :func:`distillm2_adaptive_alpha` compares."""
    import torch

    mask_bool = mask != 0
    total = torch.where(mask_bool, token_logps, torch.zeros((), dtype=token_logps.dtype)).sum(-1)
    return total / mask_bool.sum(-1).clamp(min=1).to(token_logps.dtype)

