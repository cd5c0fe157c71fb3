"""Second-tier token-level objectives (METHODS.md, "Second tier"): ATKD and Q-KD (argmax and softmax).

Shapes follow :mod:`kdbench.losses.token`: logits [B, T, V] (position t predicts token t+1, the caller
aligns), labels and masks [B, T]; the math runs chunk by chunk over the counted positions
(:mod:`kdbench.losses.chunking`), in float32 (float64 stays float64). Notation: p = teacher, q = student.
"""

from __future__ import annotations

import math

from kdbench.errors import ConfigError, DataError
from kdbench.losses.chunking import default_chunk_rows, rowwise_loss
from kdbench.losses.reduction import (check_reduction, compute_dtype, counted_mask, counted_rows,
                                      reduce_positions)
from kdbench.losses.guided import two_teacher_rows
from kdbench.losses.sequence import cross_entropy
from kdbench.losses.sparse import SparseTeacher


def _positions(student_logits, labels, mask):
    """(batch_shape, vocab_size, n_rows, mask_bool, rows) with labels checked in range at counted rows."""
    if student_logits.dim() != 3:
        raise DataError(f"student logits must be [B, T, V] (got shape {tuple(student_logits.shape)}).")
    batch_shape = tuple(student_logits.shape[:2])
    vocab_size = student_logits.shape[-1]
    n_rows = batch_shape[0] * batch_shape[1]
    mask_bool = counted_mask(mask, batch_shape)
    if labels is not None:
        if tuple(labels.shape) != batch_shape:
            raise DataError(f"labels {tuple(labels.shape)} do not match the logits' positions {batch_shape}.")
        if mask_bool is None:
            mask_bool = labels != -100
    rows = counted_rows(mask_bool, n_rows, student_logits.device)
    if labels is not None and rows.numel():
        counted = labels.reshape(n_rows).index_select(0, rows)
        if int(counted.min()) < 0 or int(counted.max()) >= vocab_size:
            raise DataError(f"a counted position has a label outside [0, {vocab_size}); mask it out or fix the labels.")
    return batch_shape, vocab_size, n_rows, mask_bool, rows


def _dense_teacher(teacher_logits, student_logits, name: str, method: str):
    if isinstance(teacher_logits, SparseTeacher):
        raise ConfigError(f"{method} needs the dense {name} (its top-k cache keeps no probability for tokens outside "
                          "the top k); use --set teacher_signal=online.")
    if teacher_logits.shape != student_logits.shape:
        raise DataError(f"{name} logits {tuple(teacher_logits.shape)} and student logits "
                        f"{tuple(student_logits.shape)} differ; {method} needs a shared vocabulary.")


# ------------------------------------------------------------------ ATKD (Zhong et al. 2024)


def atkd_uncertainty(teacher_logits, labels, mask=None, *, temperature=1.0):
    """ATKD's token uncertainty u_t = 1 − p(y_t) under the teacher at ``temperature`` (no gradient).

    ``teacher_logits`` [B, T, V], ``labels`` [B, T] → [B, T] (uncounted positions are NaN, so that
    :func:`atkd_threshold` can pool several micro-batches without counting them).
    """
    import torch

    batch_shape, vocab_size, n_rows, mask_bool, rows = _positions(teacher_logits, labels, mask)
    out = torch.full(batch_shape, math.nan, dtype=compute_dtype(teacher_logits), device=teacher_logits.device)
    with torch.no_grad():
        flat = teacher_logits.detach().reshape(n_rows, vocab_size)
        chunk = default_chunk_rows(vocab_size)
        labels_flat = labels.reshape(n_rows).long()
        for start in range(0, rows.numel(), chunk):
            idx = rows[start:start + chunk]
            logp = torch.log_softmax(flat[idx].to(out.dtype) / float(temperature), dim=-1)
            out.view(-1)[idx] = -torch.expm1(logp.gather(-1, labels_flat[idx].unsqueeze(-1)).squeeze(-1))
    return out


def atkd_threshold(*uncertainties):
    """The split point of ATKD: the (lower) median of u_t over every counted position given.

    Pass the :func:`atkd_uncertainty` tensors of all micro-batches of the optimizer step (and, with data
    parallelism, their all-gather): the split then does not depend on how the step is divided. NaN
    entries (uncounted positions) are ignored. → scalar tensor; a position is hard when u_t > threshold.
    """
    import torch

    values = torch.cat([u.detach().reshape(-1) for u in uncertainties])
    values = values[~torch.isnan(values)]
    if values.numel() == 0:
        return torch.tensor(math.inf, dtype=values.dtype)  # nothing counts: every position is "easy"
    return values.median()


def _atkd_rows(student_chunk, teacher_chunk, label_chunk, hard_chunk, tau, dtype):
    import torch

    log_q = torch.log_softmax(student_chunk.to(dtype) / tau, dim=-1)
    log_p = torch.log_softmax(teacher_chunk.to(dtype) / tau, dim=-1)
    target = label_chunk.unsqueeze(-1)
    log_p_target, log_q_target = log_p.gather(-1, target).squeeze(-1), log_q.gather(-1, target).squeeze(-1)
    is_target = torch.zeros_like(log_p, dtype=torch.bool).scatter_(-1, target, True)
    # log(1 − p(y)) as the log-sum-exp of the non-target log-probs: exact, no 1 − p cancellation
    log_p_rest = torch.logsumexp(log_p.masked_fill(is_target, -math.inf), dim=-1)
    log_q_rest = torch.logsumexp(log_q.masked_fill(is_target, -math.inf), dim=-1)

    def plogp_ratio(log_a, log_b):  # a·(log a − log b), 0 where a = 0
        return torch.where(torch.isneginf(log_a), torch.zeros_like(log_a), log_a.exp() * (log_a - log_b))

    # TCKD: binary KL([p(y), 1 − p(y)] ‖ [q(y), 1 − q(y)]) (DKD, Zhao et al. 2022, Eq. 3)
    tckd = plogp_ratio(log_p_target, log_q_target) + plogp_ratio(log_p_rest, log_q_rest)
    # NCKD: KL(p̂ ‖ q̂) over the non-target tokens, each renormalized, without DKD's (1 − p(y)) factor
    no_rest = torch.isneginf(log_p_rest).unsqueeze(-1)  # p(y) = 1: no non-target mass, NCKD = 0
    log_p_hat = (log_p - log_p_rest.unsqueeze(-1)).masked_fill(is_target | no_rest, -math.inf)
    log_q_hat = (log_q - log_q_rest.unsqueeze(-1)).masked_fill(is_target, 0.0)
    nckd = plogp_ratio(log_p_hat, log_q_hat).sum(-1)
    return nckd + torch.where(hard_chunk, tckd, torch.zeros_like(tckd))


def atkd(student_logits, teacher_logits, labels, mask=None, *, alpha=0.2, temperature=1.0, threshold=None,
         easy_count=None, hard_count=None, reduction="mean", chunk_rows=None):
    """ATKD (Zhong et al. 2024, "Revisiting KD for autoregressive LMs", §4): α·L_easy + (1 − α)·L_hard.

    Per position, u_t = 1 − p(y_t) (:func:`atkd_uncertainty`); a position is hard when u_t > ``threshold``
    (default: :func:`atkd_threshold` of this call's counted positions; a trainer passes the threshold of
    the whole optimizer step). Easy positions distil NCKD only, hard ones TCKD + NCKD (both at
    ``temperature``). ``reduction="mean"``: L_easy and L_hard are the means over the easy and the hard
    positions (``easy_count`` / ``hard_count`` replace those denominators by the step's counts);
    ``"sum"``: α·Σ_easy + (1 − α)·Σ_hard; ``"none"``: that per-position weighted value [B, T].

    Shapes: logits [B, T, V] (dense teacher, shared vocabulary), labels [B, T] (the target y_t that
    position t predicts), mask [B, T] (``None``: labels ≠ −100) → scalar or [B, T].
    """
    import torch

    check_reduction(reduction)
    if not 0.0 <= alpha <= 1.0:
        raise ConfigError(f"ATKD's alpha must be in [0, 1] (got {alpha}).")
    if not temperature > 0:
        raise ConfigError(f"temperature must be > 0 (got {temperature}).")
    _dense_teacher(teacher_logits, student_logits, "teacher", "ATKD")
    batch_shape, vocab_size, n_rows, mask_bool, rows = _positions(student_logits, labels, mask)
    uncertainty = atkd_uncertainty(teacher_logits, labels, mask_bool, temperature=temperature)
    if threshold is None:
        threshold = atkd_threshold(uncertainty)
    hard = torch.nan_to_num(uncertainty, nan=-math.inf) > torch.as_tensor(threshold).to(uncertainty)
    dtype = compute_dtype(student_logits, teacher_logits)
    tau = float(temperature)

    def rows_fn(s, t, y, h):
        return _atkd_rows(s, t, y, h, tau, dtype)

    chunk = chunk_rows if chunk_rows is not None else default_chunk_rows(vocab_size)
    per_row = rowwise_loss(rows_fn, [student_logits.reshape(n_rows, vocab_size),
                                     teacher_logits.reshape(n_rows, vocab_size), labels.reshape(n_rows).long(),
                                     hard.reshape(n_rows)], rows, chunk, dtype).reshape(batch_shape)
    counted = mask_bool if mask_bool is not None else torch.ones(batch_shape, dtype=torch.bool)
    easy_mask, hard_mask = counted & ~hard, counted & hard
    if reduction == "none":
        return torch.where(hard_mask, (1 - alpha) * per_row, alpha * per_row)
    easy_sum, hard_sum = (per_row * easy_mask).sum(), (per_row * hard_mask).sum()
    if reduction == "sum":
        return alpha * easy_sum + (1 - alpha) * hard_sum
    n_easy = max(float(easy_mask.sum()) if easy_count is None else float(easy_count), 1.0)
    n_hard = max(float(hard_mask.sum()) if hard_count is None else float(hard_count), 1.0)
    return alpha * easy_sum / n_easy + (1 - alpha) * hard_sum / n_hard


# ------------------------------------------------------------------ Q-KD (ADPA paper, Table 6)


def _advantage(log_dpo, log_ref):
    """A = log π_dpo − log π_ref, 0 where both are −inf (a token neither model can emit)."""
    import torch

    both = torch.isneginf(log_dpo) & torch.isneginf(log_ref)
    return torch.where(both, torch.zeros_like(log_dpo), log_dpo - log_ref)


def _q_rows(student_chunk, dpo_chunk, ref_chunk, beta, dtype):
    """Per position −Σ_a t(a) log q(a) + Σ_a t(a) log t(a), t = onehot(argmax A) (β = None) or softmax(βA)."""
    import torch

    log_q = torch.log_softmax(student_chunk.to(dtype), dim=-1)
    advantage = _advantage(torch.log_softmax(dpo_chunk.to(dtype), dim=-1),
                           torch.log_softmax(ref_chunk.to(dtype), dim=-1))
    if beta is None:  # CE(onehot(argmax_a A), q): the entropy of a one-hot target is 0
        return -log_q.gather(-1, advantage.argmax(-1, keepdim=True)).squeeze(-1)
    log_target = torch.log_softmax(beta * advantage, dim=-1)
    target = log_target.exp()
    return torch.where(target > 0, target * (log_target - log_q), torch.zeros_like(target)).sum(-1)


def _q_topk_rows(student_chunk, dpo_ids, dpo_logprobs, ref_ids, ref_logprobs, beta, dtype):
    """Top-k form: A over the DPO teacher's top-k tokens; a token missing from π_ref's top-k takes the lowest
    log-prob of π_ref's top-k (ADPA's fallback, METHODS.md); the target lives on those k tokens."""
    import torch

    log_q = torch.log_softmax(student_chunk.to(dtype), dim=-1).gather(-1, dpo_ids)
    dpo_logprobs, ref_logprobs = dpo_logprobs.to(dtype), ref_logprobs.to(dtype)
    match = dpo_ids.unsqueeze(-1) == ref_ids.unsqueeze(-2)  # [n, k_dpo, k_ref]
    ref_at_dpo = torch.where(match, ref_logprobs.unsqueeze(-2), torch.zeros_like(ref_logprobs.unsqueeze(-2))).sum(-1)
    fallback = ref_logprobs.min(-1, keepdim=True).values.expand_as(ref_at_dpo)
    advantage = dpo_logprobs - torch.where(match.any(-1), ref_at_dpo, fallback)
    if beta is None:
        return -log_q.gather(-1, advantage.argmax(-1, keepdim=True)).squeeze(-1)
    log_target = torch.log_softmax(beta * advantage, dim=-1)
    return (log_target.exp() * (log_target - log_q)).sum(-1)


def q_kd_term(student_logits, dpo_teacher_logits, ref_teacher_logits, mask=None, *, beta=None, top_k=None,
              reduction="mean", chunk_rows=None):
    """Q-KD's distillation term per position s_t: CE(onehot(argmax_a A(s_t, a)), π_θ) when ``beta`` is None
    (Q-argmax), KL(softmax(β·A(s_t, ·)) ‖ π_θ) otherwise (Q-softmax); A = log π_dpo − log π_ref.

    Dense over the vocabulary by default; ``top_k=k`` (or both teachers as :class:`SparseTeacher`) restricts
    A to the DPO teacher's top-k tokens (π_θ not renormalized, ADPA's fallback for tokens missing from
    π_ref's top-k). Shapes: student [B, T, V], teachers [B, T, V] or SparseTeacher, mask [B, T] →
    scalar ("mean" over counted positions, "sum") or [B, T] ("none").
    """
    check_reduction(reduction)
    if beta is not None and not beta > 0:
        raise ConfigError(f"Q-softmax-KD's beta must be > 0 (got {beta}).")
    batch_shape, _, _, mask_bool, rows = _positions(student_logits, None, mask)
    beta = None if beta is None else float(beta)
    per_row = two_teacher_rows(
        student_logits, dpo_teacher_logits, ref_teacher_logits, rows, method="Q-KD", top_k=top_k,
        chunk_rows=chunk_rows, dense_rows=lambda s, d, r, dtype: _q_rows(s, d, r, beta, dtype),
        topk_rows=lambda s, dpo_ids, dpo_lp, ref_ids, ref_lp, dtype: _q_topk_rows(
            s, dpo_ids, dpo_lp, ref_ids, ref_lp, beta, dtype))
    return reduce_positions(per_row.reshape(batch_shape), mask_bool, reduction)


def _q_kd(student_chosen_logits, chosen_labels, chosen_mask, student_generated_logits, dpo_teacher_logits,
          ref_teacher_logits, generated_mask, *, gamma, beta, top_k, chosen_token_count, generated_token_count,
          chunk_rows):
    if gamma < 0:
        raise ConfigError(f"Q-KD's gamma must be >= 0 (got {gamma}).")

    def count(mask, override):
        return max(float((mask != 0).sum()) if override is None else float(override), 1.0)

    ce = cross_entropy(student_chosen_logits, chosen_labels, chosen_mask, reduction="sum", chunk_rows=chunk_rows)
    term = q_kd_term(student_generated_logits, dpo_teacher_logits, ref_teacher_logits, generated_mask, beta=beta,
                     top_k=top_k, reduction="sum", chunk_rows=chunk_rows)
    return ce / count(chosen_mask, chosen_token_count) + gamma * term / count(generated_mask, generated_token_count)


def q_argmax_kd(student_chosen_logits, chosen_labels, chosen_mask, student_generated_logits, dpo_teacher_logits,
                ref_teacher_logits, generated_mask, *, gamma=1.0, top_k=None, chosen_token_count=None,
                generated_token_count=None, chunk_rows=None):
    """Q-argmax-KD (ADPA paper, Table 6; METHODS.md): CE(y_w) + γ/|ŷ|·Σ_t CE(onehot(argmax_a A(s_t, a)), π_θ).

    CE(y_w): token mean over ``chosen_mask`` of the student's logits on y_w [B, T, V] against
    ``chosen_labels`` [B, T]. The Q term: over the positions s_t of ŷ (``generated_mask`` [B, T']), with
    the student's, π_dpo's and π_ref's logits on ŷ ([B, T', V] or SparseTeacher). The token counts of the
    whole step replace the local denominators when given. → scalar.
    """
    return _q_kd(student_chosen_logits, chosen_labels, chosen_mask, student_generated_logits, dpo_teacher_logits,
                 ref_teacher_logits, generated_mask, gamma=gamma, beta=None, top_k=top_k,
                 chosen_token_count=chosen_token_count, generated_token_count=generated_token_count,
                 chunk_rows=chunk_rows)


def q_softmax_kd(student_chosen_logits, chosen_labels, chosen_mask, student_generated_logits, dpo_teacher_logits,
                 ref_teacher_logits, generated_mask, *, beta=0.05, gamma=1.0, top_k=None, chosen_token_count=None,
                 generated_token_count=None, chunk_rows=None):
    """Q-softmax-KD: as :func:`q_argmax_kd` with KL(softmax(β·A(s_t, ·)) ‖ π_θ) per position; β is the DPO
    teacher's β (0.05, METHODS.md). As β → ∞ the target tends to the one-hot argmax: Q-argmax-KD."""
    return _q_kd(student_chosen_logits, chosen_labels, chosen_mask, student_generated_logits, dpo_teacher_logits,
                 ref_teacher_logits, generated_mask, gamma=gamma, beta=beta, top_k=top_k,
                 chosen_token_count=chosen_token_count, generated_token_count=generated_token_count,
                 chunk_rows=chunk_rows)
