"""Sparse (top-k) teacher signals and the collapse of a distribution onto k+1 bins.

A sparse teacher stores, per position, its k most probable token ids, their log-probabilities
(normalized over the full vocabulary) and the log of the remaining mass. Divergences are then taken
over k+1 bins: the k teacher tokens and one "rest" bin (METHODS.md, Sparse teacher). The student is
collapsed onto the same bins: its log-probabilities gathered at the k ids, and its rest bin as the
log-sum-exp of its log-probabilities over the *other* tokens (exact, with no 1 − Σ cancellation).
"""

from __future__ import annotations

import math
from typing import NamedTuple

from kdbench.errors import ConfigError, DataError


class SparseTeacher(NamedTuple):
    """A top-k teacher signal for a batch of positions.

    Attributes:
        ids: long [B, T, k], the teacher's top-k token ids at each position (any order, no repeats).
        logprobs: float [B, T, k], the teacher's log-probabilities of those ids over the full vocabulary.
        rest_logprob: float [B, T] or None, log of the mass outside the k ids. ``None`` computes it as
            log(1 − Σ exp(logprobs)) in log space; where rounding makes 1 − Σ ≤ 0 it is clamped to
            −inf (zero mass), with 0·log 0 = 0 in every divergence. When k = V the rest bin is empty
            by construction (−inf), whatever rounding leaves in 1 − Σ.
        temperature: the temperature the log-probabilities were computed at; a loss called with a
            different temperature raises :class:`ConfigError` (a top-k signal cannot be re-tempered
            exactly, because the rest bin aggregates many tokens).
    """

    ids: "object"
    logprobs: "object"
    rest_logprob: "object" = None
    temperature: float = 1.0

    @classmethod
    def from_logits(cls, teacher_logits, k: int, *, temperature: float = 1.0) -> "SparseTeacher":
        """Top-k signal of dense teacher logits [B, T, V] at ``temperature`` (exact rest bin)."""
        import torch

        vocab_size = teacher_logits.shape[-1]
        if not 1 <= k <= vocab_size:
            raise ConfigError(f"top-k must be between 1 and the vocabulary size {vocab_size} (got {k}).")
        dtype = torch.float64 if teacher_logits.dtype == torch.float64 else torch.float32
        logprobs = torch.log_softmax(teacher_logits.to(dtype) / temperature, dim=-1)
        top_logprobs, ids = logprobs.topk(k, dim=-1)
        rest = safe_logsumexp(logprobs.scatter(-1, ids, -math.inf), dim=-1)
        return cls(ids=ids, logprobs=top_logprobs, rest_logprob=rest, temperature=temperature)


def safe_logsumexp(values, dim: int = -1):
    """logsumexp over ``dim`` that returns −inf, with a zero (not NaN) gradient, for all −inf rows."""
    import torch

    empty = torch.isneginf(values.detach().amax(dim=dim, keepdim=True))
    result = torch.logsumexp(torch.where(empty, torch.zeros_like(values), values), dim=dim)
    return torch.where(empty.squeeze(dim), torch.full_like(result, -math.inf), result)


def rest_from_top(top_logprobs):
    """log(1 − Σ_k exp(top_logprobs)) over the last dim, clamped to −inf where the mass rounds to ≥ 1."""
    import torch

    total = safe_logsumexp(top_logprobs, dim=-1)
    full = total >= 0
    safe_total = torch.where(full, torch.full_like(total, -1.0), total)
    rest = torch.log(-torch.expm1(safe_total))  # log(1 − e^total), accurate for total near 0
    return torch.where(full, torch.full_like(rest, -math.inf), rest)


def collapse_student(student_logprobs, ids):
    """Collapse student log-probs [n, V] onto the bins of ``ids`` [n, k] plus a rest bin → [n, k+1]."""
    import torch

    top = student_logprobs.gather(-1, ids)
    rest = safe_logsumexp(student_logprobs.scatter(-1, ids, -math.inf), dim=-1)
    return torch.cat([top, rest.unsqueeze(-1)], dim=-1)


def validate_sparse(teacher: SparseTeacher, batch_shape, vocab_size: int, temperature: float) -> None:
    """Raise a clear error when a sparse teacher does not fit the student logits."""
    ids, logprobs = teacher.ids, teacher.logprobs
    if tuple(ids.shape[:-1]) != tuple(batch_shape) or tuple(logprobs.shape) != tuple(ids.shape):
        raise DataError(f"sparse teacher ids {tuple(ids.shape)} and log-probs {tuple(logprobs.shape)} must both be "
                        f"[B, T, k] with [B, T] = {tuple(batch_shape)} as in the student logits.")
    if teacher.rest_logprob is not None and tuple(teacher.rest_logprob.shape) != tuple(batch_shape):
        raise DataError(f"sparse teacher rest_logprob has shape {tuple(teacher.rest_logprob.shape)}; "
                        f"it must be [B, T] = {tuple(batch_shape)}.")
    if ids.shape[-1] > vocab_size:
        raise DataError(f"sparse teacher has k = {ids.shape[-1]} ids per position but the vocabulary has only "
                        f"{vocab_size} tokens.")
    if abs(float(teacher.temperature) - float(temperature)) > 1e-12:
        raise ConfigError(f"the sparse teacher was built at temperature {teacher.temperature} but the loss uses "
                          f"{temperature}; rebuild it with SparseTeacher.from_logits(..., temperature={temperature}).")
