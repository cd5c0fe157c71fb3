"""Token-level distillation divergences (METHODS.md, "Token-level divergences").

Every function has one signature::

    fn(student_logits, teacher_logits, mask=None, *, temperature=1.0, reduction="mean", **params)

* ``student_logits``: float [B, T, V] (any float dtype; the math runs in float32, float64 stays float64).
  Position t predicts token t+1: the caller aligns student and teacher.
* ``teacher_logits``: float [B, T, V] dense logits, or a :class:`~kdbench.losses.sparse.SparseTeacher`
  (top-k ids/log-probs + rest mass: the divergence is then taken over k+1 bins).
* ``mask``: [B, T], nonzero = this position counts; ``None`` = every position counts. Uncounted
  positions are never read into the math (padding cannot change the result, even if it holds NaN).
* ``temperature``: τ divides both logits (teacher and student) before the softmax.
* ``scale_by_temperature_squared``: multiply the divergence by τ² (Hinton et al.), default off.
* ``reduction``: "mean" over counted positions, "sum" over them, or "none" → [B, T].
* ``chunk_rows``: positions per chunk (default: about 4 MiB of float32 per temporary).

Memory: the loss is evaluated over chunks of positions and its gradient is formed per chunk
(:mod:`kdbench.losses.chunking`), so beyond the inputs and their gradient only chunk-sized float32
temporaries exist. Gradients flow to the student and, if it requires grad, to the teacher (AKL's
weights are detached, as in the authors' code).

Notation: p = teacher, q = student; every sum runs over the vocabulary (or the k+1 bins). Terms
with zero weight are zero (0·log 0 = 0); a term with positive weight against a zero probability is
+inf (e.g. FKL when the student gives −inf to a token the teacher supports) — that is the mathematics.
Mixtures are formed in log space (logsumexp).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping

from kdbench.errors import ConfigError, DataError
from kdbench.losses.chunking import default_chunk_rows, rowwise_loss
from kdbench.losses.divergences import DIVERGENCE_FORMS, Divergence, get_divergence
from kdbench.losses.reduction import check_reduction, compute_dtype, counted_mask, counted_rows, reduce_positions
from kdbench.losses.sparse import SparseTeacher, collapse_student, rest_from_top, validate_sparse

# ---------------------------------------------------------------------------------------------
# Driver: alignment checks, dense / sparse teacher, chunking, reduction
# ---------------------------------------------------------------------------------------------


def scale_logits(logits, dtype, tau: float):
    """``logits`` in ``dtype`` divided by τ, without a division (and its copy) when τ = 1."""
    logits = logits.to(dtype)
    return logits if tau == 1.0 else logits / tau


def _check_student(student_logits):
    if student_logits.dim() != 3 or not student_logits.is_floating_point():
        raise DataError(f"student logits must be a float [B, T, V] tensor (got shape {tuple(student_logits.shape)}, "
                        f"dtype {student_logits.dtype}).")


def _check_temperature(temperature: float) -> None:
    if not temperature > 0:
        raise ConfigError(f"temperature must be > 0 (got {temperature}).")


def token_divergence(divergence: Divergence, student_logits, teacher_logits, mask, *, temperature, reduction,
                     params, scale_by_temperature_squared=False, chunk_rows=None):
    """Shared driver of the token-level divergences: ``divergence``'s rows (with ``params``, already
    resolved) over the counted positions, reduced (see module doc)."""
    import torch

    rows_impl = divergence.rows

    _check_student(student_logits)
    _check_temperature(temperature)
    check_reduction(reduction)
    batch_shape = tuple(student_logits.shape[:2])
    vocab_size = student_logits.shape[-1]
    mask_bool = counted_mask(mask, batch_shape)
    n_rows = batch_shape[0] * batch_shape[1]
    rows = counted_rows(mask_bool, n_rows, student_logits.device)
    student_flat = student_logits.reshape(n_rows, vocab_size)
    tau = float(temperature)

    analytic = None
    if isinstance(teacher_logits, SparseTeacher):
        validate_sparse(teacher_logits, batch_shape, vocab_size, temperature)
        dtype = compute_dtype(student_logits, teacher_logits.logprobs)
        k = teacher_logits.ids.shape[-1]
        ids = teacher_logits.ids.reshape(n_rows, k).long()
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= vocab_size):
            raise DataError(f"sparse teacher ids must lie in [0, {vocab_size}) (the student's vocabulary).")
        top = teacher_logits.logprobs.reshape(n_rows, k)
        rest = teacher_logits.rest_logprob
        if k == vocab_size:  # no token lies outside the top-k: the rest bin is empty, whatever rounding says
            rest = torch.full((n_rows,), -math.inf, dtype=dtype, device=top.device)
        elif rest is None:
            rest = rest_from_top(top.detach().to(dtype))
        else:
            rest = rest.reshape(n_rows)

        def rows_fn(student_chunk, ids_chunk, top_chunk, rest_chunk):
            log_q_full = torch.log_softmax(student_chunk.to(dtype) / tau, dim=-1)
            log_q = collapse_student(log_q_full, ids_chunk)
            log_p = torch.cat([top_chunk.to(dtype), rest_chunk.to(dtype).unsqueeze(-1)], dim=-1)
            return rows_impl(log_p, log_q, params, True)

        inputs = [student_flat, ids, top, rest]
    else:
        if teacher_logits.shape != student_logits.shape:
            raise DataError(f"teacher logits {tuple(teacher_logits.shape)} and student logits "
                            f"{tuple(student_logits.shape)} differ: token-level distillation needs the same "
                            f"[B, T, V] (teacher vocabulary {teacher_logits.shape[-1]}, student vocabulary "
                            f"{vocab_size}); trim padded vocabulary rows first.")
        dtype = compute_dtype(student_logits, teacher_logits)

        def rows_fn(student_chunk, teacher_chunk):
            log_q = torch.log_softmax(student_chunk.to(dtype) / tau, dim=-1)
            log_p = torch.log_softmax(teacher_chunk.to(dtype) / tau, dim=-1)
            return rows_impl(log_p, log_q, params, False)

        inputs = [student_flat, teacher_logits.reshape(n_rows, vocab_size)]
        closed_form = divergence.analytic
        if closed_form is not None:
            def analytic(student_chunk, teacher_chunk):
                log_q = torch.log_softmax(scale_logits(student_chunk, dtype, tau), dim=-1)
                log_p = torch.log_softmax(scale_logits(teacher_chunk, dtype, tau), dim=-1)
                values, grad_z = closed_form(log_p, log_q, params)
                return values, grad_z if tau == 1.0 else grad_z.div_(tau)

    chunk = chunk_rows if chunk_rows is not None else default_chunk_rows(vocab_size)
    per_row = rowwise_loss(rows_fn, inputs, rows, chunk, dtype, analytic)
    if scale_by_temperature_squared:
        per_row = per_row * (tau * tau)
    return reduce_positions(per_row.reshape(batch_shape), mask_bool, reduction)


def divergence_loss(name: str, student_logits, teacher_logits, mask=None, *, temperature=1.0, reduction="mean",
                    scale_by_temperature_squared=False, chunk_rows=None, **params):
    """The registered divergence ``name`` (:mod:`kdbench.losses.divergences`) with its ``**params``; the
    common signature and shapes of :func:`fkl`."""
    divergence = get_divergence(name)
    return token_divergence(divergence, student_logits, teacher_logits, mask, temperature=temperature,
                            reduction=reduction, params=divergence.resolve(**params), chunk_rows=chunk_rows,
                            scale_by_temperature_squared=scale_by_temperature_squared)


def _named(name: str, student_logits, teacher_logits, mask, temperature, reduction, scale, chunk_rows, **params):
    return divergence_loss(name, student_logits, teacher_logits, mask, temperature=temperature, reduction=reduction,
                           scale_by_temperature_squared=scale, chunk_rows=chunk_rows, **params)


def fkl(student_logits, teacher_logits, mask=None, *, temperature=1.0, reduction="mean",
        scale_by_temperature_squared=False, chunk_rows=None):
    """Forward KL, Σ_v p (log p − log q) (Hinton et al.; MiniLLM's "KD").

    Shapes: logits [B, T, V] (or a SparseTeacher), mask [B, T] → scalar, or [B, T] with
    ``reduction="none"``. +inf where the student gives zero probability to a teacher-supported token.
    """
    return _named("fkl", student_logits, teacher_logits, mask, temperature, reduction, scale_by_temperature_squared,
                  chunk_rows)


def rkl(student_logits, teacher_logits, mask=None, *, temperature=1.0, reduction="mean",
        scale_by_temperature_squared=False, chunk_rows=None):
    """Reverse KL, Σ_v q (log q − log p). Shapes as :func:`fkl`.

    +inf where the teacher gives zero probability to a token the student supports.
    """
    return _named("rkl", student_logits, teacher_logits, mask, temperature, reduction, scale_by_temperature_squared,
                  chunk_rows)


def fkl_rkl(student_logits, teacher_logits, mask=None, *, temperature=1.0, reduction="mean", weight=0.5,
            scale_by_temperature_squared=False, chunk_rows=None):
    """w·FKL + (1 − w)·RKL, w = ``weight`` (0.5: AKL paper's "FKL+RKL" up to a factor 2). Shapes as :func:`fkl`."""
    return _named("fkl_rkl", student_logits, teacher_logits, mask, temperature, reduction,
                  scale_by_temperature_squared, chunk_rows, weight=weight)


def jsd(student_logits, teacher_logits, mask=None, *, temperature=1.0, reduction="mean", beta=0.5,
        scale_by_temperature_squared=False, chunk_rows=None):
    """Generalized JSD of GKD (Agarwal et al. Eq. 1, TRL's ``generalized_jsd_loss``).

    M = β p + (1 − β) q; JSD(β) = β·KL(p ‖ M) + (1 − β)·KL(q ‖ M). At the endpoints, β = 0 gives FKL
    and β = 1 gives RKL exactly (TRL's convention; the formula itself degenerates to 0 there).
    Shapes as :func:`fkl`. Always finite.
    """
    return _named("jsd", student_logits, teacher_logits, mask, temperature, reduction, scale_by_temperature_squared,
                  chunk_rows, beta=beta)


def tvd(student_logits, teacher_logits, mask=None, *, temperature=1.0, reduction="mean",
        scale_by_temperature_squared=False, chunk_rows=None):
    """Total variation distance ½ Σ_v |p − q| (DistiLLM's ``tvd``). Shapes as :func:`fkl`. In [0, 1]."""
    return _named("tvd", student_logits, teacher_logits, mask, temperature, reduction, scale_by_temperature_squared,
                  chunk_rows)


def skl(student_logits, teacher_logits, mask=None, *, temperature=1.0, reduction="mean", alpha=0.1,
        scale_by_temperature_squared=False, chunk_rows=None):
    """Skew KL, KL(p ‖ α p + (1 − α) q), α = 0.1 (DistiLLM Eq. 4). Shapes as :func:`fkl`. α = 0 is FKL."""
    return _named("skl", student_logits, teacher_logits, mask, temperature, reduction, scale_by_temperature_squared,
                  chunk_rows, alpha=alpha)


def srkl(student_logits, teacher_logits, mask=None, *, temperature=1.0, reduction="mean", alpha=0.1,
         scale_by_temperature_squared=False, chunk_rows=None):
    """Skew reverse KL, KL(q ‖ (1 − α) p + α q), α = 0.1 (DistiLLM). Shapes as :func:`fkl`. α = 0 is RKL."""
    return _named("srkl", student_logits, teacher_logits, mask, temperature, reduction, scale_by_temperature_squared,
                  chunk_rows, alpha=alpha)


def akl(student_logits, teacher_logits, mask=None, *, temperature=1.0, reduction="mean", mu=0.5,
        head_rule="paper", eps=1e-12, scale_by_temperature_squared=False, chunk_rows=None):
    """Adaptive KL (akl.md Eqs. 11–15): g_head/(g_head+g_tail)·FKL + g_tail/(g_head+g_tail)·RKL.

    The head is the smallest most-probable prefix of the teacher reaching mass μ (``head_rule="paper"``,
    Eq. 12) or the authors' code rule (``"cumulative_le"``: cumulative mass ≤ μ, plus the top-1 token).
    g = Σ |p − q| over head / tail with p and q detached; ``eps`` in the denominator keeps p = q at 0.
    With a SparseTeacher the rest bin is ordered after the k teacher tokens (it is in the tail unless
    the top-k mass is below μ). Shapes as :func:`fkl`.
    """
    return _named("akl", student_logits, teacher_logits, mask, temperature, reduction, scale_by_temperature_squared,
                  chunk_rows, mu=mu, head_rule=head_rule, eps=eps)


def akl_r(student_logits, teacher_logits, mask=None, *, temperature=1.0, reduction="mean", mu=0.5,
          head_rule="paper", eps=1e-12, scale_by_temperature_squared=False, chunk_rows=None):
    """AKL-r (akl.md Eq. 16): AKL with the two weights swapped, g_tail/(…)·FKL + g_head/(…)·RKL. As :func:`akl`."""
    return _named("akl_r", student_logits, teacher_logits, mask, temperature, reduction,
                  scale_by_temperature_squared, chunk_rows, mu=mu, head_rule=head_rule, eps=eps)


class _DivergenceFunctions(Mapping):
    """Name → loss function of every registered divergence (a live view of
    :data:`kdbench.losses.divergences.DIVERGENCE_FORMS`: a divergence registered later is here too)."""

    def __getitem__(self, name: str):
        if name not in DIVERGENCE_FORMS:
            raise KeyError(name)
        return _BUILT_IN.get(name) or functools.partial(divergence_loss, name)

    def __iter__(self):
        return iter(DIVERGENCE_FORMS)

    def __len__(self) -> int:
        return len(DIVERGENCE_FORMS)


_BUILT_IN = {"fkl": fkl, "rkl": rkl, "fkl_rkl": fkl_rkl, "jsd": jsd, "tvd": tvd, "skl": skl, "srkl": srkl,
             "akl": akl, "akl_r": akl_r}
#: Token-level divergences by the names recipes use (no substring dispatch), each a loss function with the
#: common signature.
DIVERGENCES: Mapping = _DivergenceFunctions()
