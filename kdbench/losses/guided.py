"""Teacher-guided token losses: DCKD and ADPA (adpa_dckd.md §3.2–3.3) and DPKD's token-level form as the
DPKD authors' code computes it (METHODS.md, second tier)."""

from __future__ import annotations


from kdbench.errors import ConfigError, DataError
from kdbench.losses.chunking import default_chunk_rows, rowwise_loss
from kdbench.losses.reduction import check_reduction, compute_dtype, counted_mask, counted_rows, reduce_positions
from kdbench.losses.sequence import cross_entropy
from kdbench.losses.sparse import SparseTeacher
from kdbench.losses.token import fkl

ADPA_MISSING_REF = ("ref_lowest", "dpo_lowest")


def _adpa_dense_rows(student_chunk, dpo_chunk, ref_chunk, dtype):
    import torch

    q = torch.softmax(student_chunk.to(dtype), dim=-1)
    log_dpo = torch.log_softmax(dpo_chunk.to(dtype), dim=-1)
    log_ref = torch.log_softmax(ref_chunk.to(dtype), dim=-1)
    both_zero = torch.isneginf(log_dpo) & torch.isneginf(log_ref)
    advantage = torch.where(both_zero, torch.zeros_like(log_dpo), log_dpo - log_ref)  # A = log π_dpo − log π_ref
    return -torch.where(q > 0, q * advantage, torch.zeros_like(q)).sum(-1)


def _adpa_topk_rows(student_chunk, dpo_ids, dpo_logprobs, ref_ids, ref_logprobs, missing_ref, dtype):
    import torch

    log_q = torch.log_softmax(student_chunk.to(dtype), dim=-1)
    q_top = log_q.gather(-1, dpo_ids).exp()  # π_θ at the DPO teacher's top-k, not renormalized
    dpo_logprobs, ref_logprobs = dpo_logprobs.to(dtype), ref_logprobs.to(dtype)
    match = dpo_ids.unsqueeze(-1) == ref_ids.unsqueeze(-2)  # [n, k_dpo, k_ref]
    found = match.any(-1)
    ref_at_dpo = torch.where(match, ref_logprobs.unsqueeze(-2), torch.zeros_like(ref_logprobs.unsqueeze(-2))).sum(-1)
    if missing_ref == "ref_lowest":  # METHODS.md: the lowest log-prob in π_ref's top-k
        fallback = ref_logprobs.min(-1, keepdim=True).values.expand_as(ref_at_dpo)
    else:  # the authors' code: the lowest log-prob in the DPO teacher's top-k
        fallback = dpo_logprobs.min(-1, keepdim=True).values.expand_as(ref_at_dpo)
    ref_at_dpo = torch.where(found, ref_at_dpo, fallback)
    return -(q_top * (dpo_logprobs - ref_at_dpo)).sum(-1)


def two_teacher_rows(student_logits, dpo_teacher_logits, ref_teacher_logits, rows, *, method: str, dense_rows,
                     topk_rows, top_k=None, chunk_rows=None):
    """Per-row values [N] (N = B·T, zero outside the counted ``rows``) of a loss that reads a DPO-aligned
    teacher and a reference teacher (ADPA, Q-KD): both teachers dense -> ``dense_rows(student, dpo, ref,
    dtype)`` on [n, V] chunks, or, with ``top_k``, ``topk_rows`` on each teacher's top-k; both
    :class:`SparseTeacher` -> ``topk_rows(student [n, V], dpo_ids, dpo_logprobs, ref_ids, ref_logprobs,
    dtype)`` on the cached [n, k] entries. One teacher of each kind is a ConfigError; dense teachers must
    share the student's vocabulary."""
    import torch

    batch_shape = tuple(student_logits.shape[:2])
    vocab_size = student_logits.shape[-1]
    n_rows = batch_shape[0] * batch_shape[1]
    student_flat = student_logits.reshape(n_rows, vocab_size)
    chunk = chunk_rows if chunk_rows is not None else default_chunk_rows(vocab_size)
    sparse = [isinstance(t, SparseTeacher) for t in (dpo_teacher_logits, ref_teacher_logits)]
    if any(sparse) and not all(sparse):
        raise ConfigError(f"pass both {method} teachers dense or both as SparseTeacher, not one of each.")
    if all(sparse):
        dtype = compute_dtype(student_logits, dpo_teacher_logits.logprobs, ref_teacher_logits.logprobs)
        tensors = []
        for teacher in (dpo_teacher_logits, ref_teacher_logits):
            if tuple(teacher.ids.shape[:2]) != batch_shape:
                raise DataError(f"sparse teacher ids {tuple(teacher.ids.shape)} do not match the student's "
                                f"positions {batch_shape}.")
            k = teacher.ids.shape[-1]
            tensors += [teacher.ids.reshape(n_rows, k).long(), teacher.logprobs.reshape(n_rows, k)]

        def sparse_fn(s, dpo_ids, dpo_lp, ref_ids, ref_lp):
            return topk_rows(s, dpo_ids, dpo_lp, ref_ids, ref_lp, dtype)

        return rowwise_loss(sparse_fn, [student_flat, *tensors], rows, chunk, dtype)
    for name, teacher in (("DPO teacher", dpo_teacher_logits), ("reference teacher", ref_teacher_logits)):
        if teacher.shape != student_logits.shape:
            raise DataError(f"{name} logits {tuple(teacher.shape)} and student logits "
                            f"{tuple(student_logits.shape)} differ (vocabularies {teacher.shape[-1]} and "
                            f"{vocab_size}); {method} needs a shared vocabulary.")
    dtype = compute_dtype(student_logits, dpo_teacher_logits, ref_teacher_logits)
    if top_k is None:
        def dense_fn(s, d, r):
            return dense_rows(s, d, r, dtype)
    else:
        if not 1 <= int(top_k) <= vocab_size:
            raise ConfigError(f"top_k must be between 1 and the vocabulary size {vocab_size} (got {top_k}).")

        def dense_fn(s, d, r):
            dpo_lp, dpo_ids = torch.log_softmax(d.to(dtype), dim=-1).topk(int(top_k), dim=-1)
            ref_lp, ref_ids = torch.log_softmax(r.to(dtype), dim=-1).topk(int(top_k), dim=-1)
            return topk_rows(s, dpo_ids, dpo_lp, ref_ids, ref_lp, dtype)

    return rowwise_loss(dense_fn, [student_flat, dpo_teacher_logits.reshape(n_rows, vocab_size),
                                   ref_teacher_logits.reshape(n_rows, vocab_size)], rows, chunk, dtype)


def adpa(student_logits, dpo_teacher_logits, ref_teacher_logits, mask=None, *, reduction="mean", top_k=None,
         missing_ref="ref_lowest", chunk_rows=None):
    """ADPA's advantage-guided loss (adpa_dckd.md Eq. 10 with METHODS.md's token mean).

    Per position: −Σ_a q(a)·(log π_dpo(a) − log π_ref(a)), q = student. Reduced by the mean over
    counted positions (default, the authors' code), "sum" (the paper's Eq. 10 per batch) or "none".

    Exact over the vocabulary by default. Top-k variant (all of the paper's results): pass ``top_k=k``
    with dense teachers, or pass both teachers as :class:`SparseTeacher`; the sum then runs over the
    DPO teacher's top-k tokens, q is not renormalized, and a token missing from π_ref's top-k takes
    the lowest log-prob of π_ref's top-k (``missing_ref="ref_lowest"``) or of π_dpo's top-k
    (``"dpo_lowest"``, the authors' code).

    Shapes: student [B, T, V]; teachers [B, T, V] or SparseTeacher; mask [B, T] → scalar or [B, T].
    """
    check_reduction(reduction)
    if missing_ref not in ADPA_MISSING_REF:
        raise ConfigError(f"missing_ref must be one of {', '.join(ADPA_MISSING_REF)} (got {missing_ref!r}).")
    batch_shape = tuple(student_logits.shape[:2])
    mask_bool = counted_mask(mask, batch_shape)
    rows = counted_rows(mask_bool, batch_shape[0] * batch_shape[1], student_logits.device)
    per_row = two_teacher_rows(
        student_logits, dpo_teacher_logits, ref_teacher_logits, rows, method="ADPA", top_k=top_k,
        chunk_rows=chunk_rows, dense_rows=_adpa_dense_rows,
        topk_rows=lambda s, dpo_ids, dpo_lp, ref_ids, ref_lp, dtype: _adpa_topk_rows(
            s, dpo_ids, dpo_lp, ref_ids, ref_lp, missing_ref, dtype))
    return reduce_positions(per_row.reshape(batch_shape), mask_bool, reduction)


DCKD_KL_REDUCTIONS = ("token_mean", "sequence_sum")


def dckd(student_chosen_logits, teacher_chosen_logits, chosen_labels, chosen_mask,
         student_rejected_logits, teacher_rejected_logits, rejected_mask, *, alpha=0.2, temperature=1.0,
         kl_reduction="token_mean", chosen_token_count=None, rejected_token_count=None, sequence_count=None,
         chunk_rows=None, return_parts=False):
    """DCKD (adpa_dckd.md §3.2): CE(y_w) + α·FKL(π_dpo ‖ π_θ) on y_w + α·FKL on y_l.

    Shapes: logits [B, T, V] (teachers may be SparseTeacher: the paper's top-50), labels/masks [B, T];
    → scalar. CE and each KL are token means over their own counted positions (the authors' code);
    ``kl_reduction="sequence_sum"`` sums each KL over positions and averages over sequences (the paper's
    Eqs. 5–6). ``chosen_token_count`` / ``rejected_token_count`` / ``sequence_count`` replace the local
    denominators by the counts of the whole optimizer step (gradient accumulation, data parallelism).
    ``return_parts=True`` also returns the summed terms {"ce", "fkl_chosen", "fkl_rejected"}.
    """
    if kl_reduction not in DCKD_KL_REDUCTIONS:
        raise ConfigError(f"kl_reduction must be one of {', '.join(DCKD_KL_REDUCTIONS)} (got {kl_reduction!r}).")

    def count(mask, override):
        return max(int((mask != 0).sum()) if override is None else float(override), 1)

    def denominator(mask, override):
        if kl_reduction == "sequence_sum":
            return max(int(mask.shape[0]) if sequence_count is None else float(sequence_count), 1)
        return count(mask, override)

    ce = cross_entropy(student_chosen_logits, chosen_labels, chosen_mask, reduction="sum", chunk_rows=chunk_rows)
    kl_chosen = fkl(student_chosen_logits, teacher_chosen_logits, chosen_mask, temperature=temperature,
                    reduction="sum", chunk_rows=chunk_rows)
    kl_rejected = fkl(student_rejected_logits, teacher_rejected_logits, rejected_mask, temperature=temperature,
                      reduction="sum", chunk_rows=chunk_rows)
    loss = (ce / count(chosen_mask, chosen_token_count)
            + alpha * (kl_chosen / denominator(chosen_mask, chosen_token_count)
                       + kl_rejected / denominator(rejected_mask, rejected_token_count)))
    if return_parts:
        return loss, {"ce": ce, "fkl_chosen": kl_chosen, "fkl_rejected": kl_rejected}
    return loss


def _dpkd_token_rows(student_chunk, teacher_chunk, beta, dtype):
    import torch
    import torch.nn.functional as F

    log_q = torch.log_softmax(student_chunk.to(dtype), dim=-1)
    log_p = torch.log_softmax(teacher_chunk.to(dtype), dim=-1)
    chosen = log_p.argmax(-1, keepdim=True)  # the teacher's argmax token a_t
    rejected = log_q.detach().argmax(-1, keepdim=True)  # the student's argmax token a_s (no gradient through argmax)
    ratio_chosen = (log_q.gather(-1, chosen) - log_p.gather(-1, chosen)).squeeze(-1)
    ratio_rejected = (log_q.gather(-1, rejected) - log_p.gather(-1, rejected)).squeeze(-1)
    return -F.logsigmoid(beta * (ratio_chosen - ratio_rejected))


def dpkd_token(student_logits, teacher_logits, mask=None, *, beta=0.1, reduction="mean", chunk_rows=None):
    """DPKD's token-level variant (the authors' released code; METHODS.md second tier).

    At each counted position: chosen = the teacher's argmax token a_t, rejected = the student's argmax
    token a_s; −log σ(β[(log q(a_t) − log p(a_t)) − (log q(a_s) − log p(a_s))]). Where both argmaxes
    agree the margin is 0 and the position contributes log 2 with no gradient. Reduced by the token mean
    (default), "sum" or "none". Shapes: logits [B, T, V] (a shared vocabulary), mask [B, T].
    """
    check_reduction(reduction)
    if beta <= 0:
        raise ConfigError(f"dpkd_token's beta must be > 0 (got {beta}).")
    if isinstance(teacher_logits, SparseTeacher):
        raise ConfigError("dpkd_token needs the dense teacher (the student's argmax token may lie outside the top-k "
                          "cache); use --set teacher_signal=online.")
    if teacher_logits.shape != student_logits.shape:
        raise DataError(f"teacher logits {tuple(teacher_logits.shape)} and student logits "
                        f"{tuple(student_logits.shape)} differ; dpkd_token needs a shared vocabulary.")
    batch_shape = tuple(student_logits.shape[:2])
    vocab_size = student_logits.shape[-1]
    n_rows = batch_shape[0] * batch_shape[1]
    mask_bool = counted_mask(mask, batch_shape)
    rows = counted_rows(mask_bool, n_rows, student_logits.device)
    dtype = compute_dtype(student_logits, teacher_logits)
    chunk = chunk_rows if chunk_rows is not None else default_chunk_rows(vocab_size)

    def rows_fn(s, t):
        return _dpkd_token_rows(s, t, float(beta), dtype)

    per_row = rowwise_loss(rows_fn, [student_logits.reshape(n_rows, vocab_size),
                                     teacher_logits.reshape(n_rows, vocab_size)], rows, chunk, dtype)
    return reduce_positions(per_row.reshape(batch_shape), mask_bool, reduction)
