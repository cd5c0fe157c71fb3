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

import math

from kdbench.errors import ConfigError, DataError
from kdbench.losses.chunking import default_chunk_rows, rowwise_loss
from kdbench.losses.reduction import check_reduction, compute_dtype, counted_mask, counted_rows, reduce_positions
from kdbench.losses.sparse import SparseTeacher, collapse_student, rest_from_top, validate_sparse

HEAD_RULES = ("paper", "cumulative_le")

# ---------------------------------------------------------------------------------------------
# Row math on normalized log-distributions log_p, log_q: [n, K] (K = V dense, k+1 sparse) → [n]
# ---------------------------------------------------------------------------------------------


def kl_rows(log_a, log_b):
    """KL(a ‖ b) = Σ a (log a − log b) per row, with 0·log 0 = 0 and +inf where a > 0 = b."""
    import torch

    a = log_a.exp()
    supported = a > 0
    # Where a = 0 the term is 0; substituting 0 keeps −inf − (−inf) = NaN out of values and gradients.
    diff = torch.where(supported, log_a - torch.where(supported, log_b, torch.zeros_like(log_b)),
                       torch.zeros_like(log_a))
    return (a * diff).sum(-1)


def log_mixture(log_a, log_b, weight_a: float):
    """log(w·a + (1 − w)·b) elementwise, in log space; −inf (zero gradient) where both are 0."""
    import torch

    if weight_a >= 1.0:
        return log_a
    if weight_a <= 0.0:
        return log_b
    x = log_a + math.log(weight_a)
    y = log_b + math.log1p(-weight_a)
    empty = torch.isneginf(x) & torch.isneginf(y)
    zero = torch.zeros_like(x)
    mixed = torch.logaddexp(torch.where(empty, zero, x), torch.where(empty, zero, y))
    return torch.where(empty, torch.full_like(mixed, -math.inf), mixed)


def akl_head_mask(log_p, *, mu: float, head_rule: str, rest_last: bool = False):
    """Boolean [n, K] mask of the AKL head (akl.md Eqs. 11–12).

    ``paper``: the smallest set of most-probable teacher tokens whose cumulative mass reaches μ
    (a token is in the head when the mass of the tokens sorted before it is < μ).
    ``cumulative_le``: the authors' code reading: tokens whose cumulative mass (including their own)
    is ≤ μ, plus the top-1 token always. With ``rest_last`` the last bin is a sparse rest bin; each
    of its tokens is less probable than every top-k token, so it is ordered after them.
    """
    import torch

    p = log_p.detach().exp()
    key = p.clone()
    if rest_last:
        key[:, -1] = -1.0  # below every probability: the rest bin sorts last
    order = key.argsort(dim=-1, descending=True, stable=True)
    sorted_p = p.gather(-1, order)
    inclusive = sorted_p.cumsum(-1)
    if head_rule == "paper":
        head_sorted = (inclusive - sorted_p) < mu
    elif head_rule == "cumulative_le":
        head_sorted = inclusive <= mu
        head_sorted[:, 0] = True
    else:
        raise ConfigError(f"head_rule must be one of {', '.join(HEAD_RULES)} (got {head_rule!r}).")
    return torch.zeros_like(head_sorted).scatter(-1, order, head_sorted)


def akl_weight_rows(log_p, log_q, *, mu: float, head_rule: str, eps: float, rest_last: bool = False):
    """AKL weights (w_head, w_tail), each [n], from detached p and q (akl.md Eqs. 13–15).

    g_head = Σ_head |p − q|, g_tail = Σ_tail |p − q|; w = g/(g_head + g_tail + ε). ε keeps p = q
    finite (weights 0, loss 0); it is not in the paper (METHODS.md).
    """
    head = akl_head_mask(log_p, mu=mu, head_rule=head_rule, rest_last=rest_last)
    gap = (log_p.detach().exp() - log_q.detach().exp()).abs()
    g_head = (gap * head).sum(-1)
    g_tail = (gap * ~head).sum(-1)
    denominator = g_head + g_tail + eps
    return g_head / denominator, g_tail / denominator


def _weighted(weight, value):
    """weight·value with 0·inf = 0 (a zero-weight infinite term does not count)."""
    import torch

    return torch.where(weight == 0, torch.zeros_like(value), weight * value)


def _rows_fkl(log_p, log_q, params, rest_last):
    return kl_rows(log_p, log_q)


def _rows_rkl(log_p, log_q, params, rest_last):
    return kl_rows(log_q, log_p)


def _rows_fkl_rkl(log_p, log_q, params, rest_last):
    weight = params["weight"]
    return weight * kl_rows(log_p, log_q) + (1.0 - weight) * kl_rows(log_q, log_p)


def _rows_jsd(log_p, log_q, params, rest_last):
    beta = params["beta"]
    if beta == 0.0:  # TRL's endpoint convention: the mixture formula degenerates to 0 there
        return kl_rows(log_p, log_q)
    if beta == 1.0:
        return kl_rows(log_q, log_p)
    log_m = log_mixture(log_p, log_q, beta)  # M = β p + (1 − β) q (GKD Eq. 1)
    return beta * kl_rows(log_p, log_m) + (1.0 - beta) * kl_rows(log_q, log_m)


def _rows_tvd(log_p, log_q, params, rest_last):
    return 0.5 * (log_p.exp() - log_q.exp()).abs().sum(-1)


def _rows_skl(log_p, log_q, params, rest_last):
    return kl_rows(log_p, log_mixture(log_p, log_q, params["alpha"]))  # KL(p ‖ α p + (1−α) q)


def _rows_srkl(log_p, log_q, params, rest_last):
    return kl_rows(log_q, log_mixture(log_p, log_q, 1.0 - params["alpha"]))  # KL(q ‖ (1−α) p + α q)


def _rows_akl(log_p, log_q, params, rest_last):
    w_head, w_tail = akl_weight_rows(log_p, log_q, mu=params["mu"], head_rule=params["head_rule"],
                                     eps=params["eps"], rest_last=rest_last)
    fkl_rows, rkl_rows = kl_rows(log_p, log_q), kl_rows(log_q, log_p)
    if params["swap"]:  # AKL-r (akl.md Eq. 16)
        w_head, w_tail = w_tail, w_head
    return _weighted(w_head, fkl_rows) + _weighted(w_tail, rkl_rows)  # akl.md Eq. 15


# Closed-form gradients with respect to the student's scaled logits z = s/τ (dense teacher, teacher
# without gradient). They replace per-chunk autograd for the divergences trainers use most; the tests
# check them against autograd. With q = softmax(z): ∂FKL/∂z = q − p; ∂KL(q‖r)/∂z = q(log q − log r − KL)
# for r independent of q; for JSD, ∂J/∂q = (1 − β) log(q/M), hence ∂J/∂z = (1 − β) q (log q − log M − KL(q‖M)).


def _rkl_like_grad(log_q, log_r, kl_value):
    """q (log q − log r − KL(q‖r)) with 0 where q = 0."""
    import torch

    q = log_q.exp()
    supported = q > 0
    diff = torch.where(supported, log_q - torch.where(supported, log_r, torch.zeros_like(log_r)),
                       torch.zeros_like(log_q))
    return q * (diff - kl_value.unsqueeze(-1))


def _analytic_fkl(log_p, log_q, params):
    """FKL per row and q − p, with p = exp(log_p) formed once (the values are those of :func:`kl_rows`)."""
    import torch

    p = log_p.exp()
    # Where p = 0 the term is 0 (also when log q = −inf: −inf − (−inf) would be NaN); elsewhere
    # log p − log q exactly as kl_rows forms it.
    diff = torch.where(p > 0, log_p - log_q, 0.0)
    value = diff.mul_(p).sum(-1)
    del diff
    return value, log_q.exp().sub_(p)


def _analytic_rkl(log_p, log_q, params):
    value = kl_rows(log_q, log_p)
    return value, _rkl_like_grad(log_q, log_p, value)


def _analytic_fkl_rkl(log_p, log_q, params):
    weight = params["weight"]
    forward_value, forward_grad = _analytic_fkl(log_p, log_q, params)
    reverse_value, reverse_grad = _analytic_rkl(log_p, log_q, params)
    return (weight * forward_value + (1.0 - weight) * reverse_value,
            weight * forward_grad + (1.0 - weight) * reverse_grad)


def _analytic_jsd(log_p, log_q, params):
    beta = params["beta"]
    if beta == 0.0:
        return _analytic_fkl(log_p, log_q, params)
    if beta == 1.0:
        return _analytic_rkl(log_p, log_q, params)
    log_m = log_mixture(log_p, log_q, beta)
    student_kl = kl_rows(log_q, log_m)
    value = beta * kl_rows(log_p, log_m) + (1.0 - beta) * student_kl
    return value, (1.0 - beta) * _rkl_like_grad(log_q, log_m, student_kl)


def _analytic_akl(log_p, log_q, params):
    w_head, w_tail = akl_weight_rows(log_p, log_q, mu=params["mu"], head_rule=params["head_rule"],
                                     eps=params["eps"])
    if params["swap"]:
        w_head, w_tail = w_tail, w_head
    forward_value, forward_grad = _analytic_fkl(log_p, log_q, params)
    reverse_value, reverse_grad = _analytic_rkl(log_p, log_q, params)
    value = _weighted(w_head, forward_value) + _weighted(w_tail, reverse_value)
    return value, w_head.unsqueeze(-1) * forward_grad + w_tail.unsqueeze(-1) * reverse_grad


ANALYTIC_GRADIENTS = {_rows_fkl: _analytic_fkl, _rows_rkl: _analytic_rkl, _rows_fkl_rkl: _analytic_fkl_rkl,
                      _rows_jsd: _analytic_jsd, _rows_akl: _analytic_akl}


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


def token_divergence(rows_impl, student_logits, teacher_logits, mask, *, temperature, reduction, params,
                     scale_by_temperature_squared=False, chunk_rows=None):
    """Shared driver of the token-level divergences: returns the reduced loss (see module doc)."""
    import torch

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
        closed_form = ANALYTIC_GRADIENTS.get(rows_impl)
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


def _check_unit_interval(name: str, value: float) -> None:
    if not 0.0 <= value <= 1.0:
        raise ConfigError(f"{name} must be between 0 and 1 (got {value}).")


def fkl(student_logits, teacher_logits, mask=None, *, temperature=1.0, reduction="mean",
        scale_by_temperature_squared=False, chunk_rows=None):
    """Forward KL, Σ_v p (log p − log q) (Hinton et al.; MiniLLM's "KD").

    Shapes: logits [B, T, V] (or a SparseTeacher), mask [B, T] → scalar, or [B, T] with
    ``reduction="none"``. +inf where the student gives zero probability to a teacher-supported token.
    """
    return token_divergence(_rows_fkl, student_logits, teacher_logits, mask, temperature=temperature,
                            reduction=reduction, params={}, chunk_rows=chunk_rows,
                            scale_by_temperature_squared=scale_by_temperature_squared)


def rkl(student_logits, teacher_logits, mask=None, *, temperature=1.0, reduction="mean",
        scale_by_temperature_squared=False, chunk_rows=None):
    """Reverse KL, Σ_v q (log q − log p). Shapes as :func:`fkl`.

    +inf where the teacher gives zero probability to a token the student supports.
    """
    return token_divergence(_rows_rkl, student_logits, teacher_logits, mask, temperature=temperature,
                            reduction=reduction, params={}, chunk_rows=chunk_rows,
                            scale_by_temperature_squared=scale_by_temperature_squared)


def fkl_rkl(student_logits, teacher_logits, mask=None, *, temperature=1.0, reduction="mean", weight=0.5,
            scale_by_temperature_squared=False, chunk_rows=None):
    """w·FKL + (1 − w)·RKL, w = ``weight`` (0.5: AKL paper's "FKL+RKL" up to a factor 2). Shapes as :func:`fkl`."""
    _check_unit_interval("weight", weight)
    return token_divergence(_rows_fkl_rkl, student_logits, teacher_logits, mask, temperature=temperature,
                            reduction=reduction, params={"weight": float(weight)}, chunk_rows=chunk_rows,
                            scale_by_temperature_squared=scale_by_temperature_squared)


def jsd(student_logits, teacher_logits, mask=None, *, temperature=1.0, reduction="mean", beta=0.5,
        scale_by_temperature_squared=False, chunk_rows=None):
    """Generalized JSD of GKD (Agarwal et al. Eq. 1, TRL's ``generalized_jsd_loss``).

    M = β p + (1 − β) q; JSD(β) = β·KL(p ‖ M) + (1 − β)·KL(q ‖ M). At the endpoints, β = 0 gives FKL
    and β = 1 gives RKL exactly (TRL's convention; the formula itself degenerates to 0 there).
    Shapes as :func:`fkl`. Always finite.
    """
    _check_unit_interval("beta", beta)
    return token_divergence(_rows_jsd, student_logits, teacher_logits, mask, temperature=temperature,
                            reduction=reduction, params={"beta": float(beta)}, chunk_rows=chunk_rows,
                            scale_by_temperature_squared=scale_by_temperature_squared)


def tvd(student_logits, teacher_logits, mask=None, *, temperature=1.0, reduction="mean",
        scale_by_temperature_squared=False, chunk_rows=None):
    """Total variation distance ½ Σ_v |p − q| (DistiLLM's ``tvd``). Shapes as :func:`fkl`. In [0, 1]."""
    return token_divergence(_rows_tvd, student_logits, teacher_logits, mask, temperature=temperature,
                            reduction=reduction, params={}, chunk_rows=chunk_rows,
                            scale_by_temperature_squared=scale_by_temperature_squared)


def skl(student_logits, teacher_logits, mask=None, *, temperature=1.0, reduction="mean", alpha=0.1,
        scale_by_temperature_squared=False, chunk_rows=None):
    """Skew KL, KL(p ‖ α p + (1 − α) q), α = 0.1 (DistiLLM Eq. 4). Shapes as :func:`fkl`. α = 0 is FKL."""
    _check_unit_interval("alpha", alpha)
    return token_divergence(_rows_skl, student_logits, teacher_logits, mask, temperature=temperature,
                            reduction=reduction, params={"alpha": float(alpha)}, chunk_rows=chunk_rows,
                            scale_by_temperature_squared=scale_by_temperature_squared)


def srkl(student_logits, teacher_logits, mask=None, *, temperature=1.0, reduction="mean", alpha=0.1,
         scale_by_temperature_squared=False, chunk_rows=None):
    """Skew reverse KL, KL(q ‖ (1 − α) p + α q), α = 0.1 (DistiLLM). Shapes as :func:`fkl`. α = 0 is RKL."""
    _check_unit_interval("alpha", alpha)
    return token_divergence(_rows_srkl, student_logits, teacher_logits, mask, temperature=temperature,
                            reduction=reduction, params={"alpha": float(alpha)}, chunk_rows=chunk_rows,
                            scale_by_temperature_squared=scale_by_temperature_squared)


def _akl_params(mu, head_rule, eps, swap):
    _check_unit_interval("mu", mu)
    if head_rule not in HEAD_RULES:
        raise ConfigError(f"head_rule must be one of {', '.join(HEAD_RULES)} (got {head_rule!r}).")
    return {"mu": float(mu), "head_rule": head_rule, "eps": float(eps), "swap": swap}


def akl(student_logits, teacher_logits, mask=None, *, temperature=1.0, reduction="mean", mu=0.5,
        head_rule="paper", eps=1e-12, scale_by_temperature_squared=False, chunk_rows=None):
    """Adaptive KL (akl.md Eqs. 11–15): g_head/(g_head+g_tail)·FKL + g_tail/(g_head+g_tail)·RKL.

    The head is the smallest most-probable prefix of the teacher reaching mass μ (``head_rule="paper"``,
    Eq. 12) or the authors' code rule (``"cumulative_le"``: cumulative mass ≤ μ, plus the top-1 token).
    g = Σ |p − q| over head / tail with p and q detached; ``eps`` in the denominator keeps p = q at 0.
    With a SparseTeacher the rest bin is ordered after the k teacher tokens (it is in the tail unless
    the top-k mass is below μ). Shapes as :func:`fkl`.
    """
    return token_divergence(_rows_akl, student_logits, teacher_logits, mask, temperature=temperature,
                            reduction=reduction, params=_akl_params(mu, head_rule, eps, False),
                            chunk_rows=chunk_rows, scale_by_temperature_squared=scale_by_temperature_squared)


def akl_r(student_logits, teacher_logits, mask=None, *, temperature=1.0, reduction="mean", mu=0.5,
          head_rule="paper", eps=1e-12, scale_by_temperature_squared=False, chunk_rows=None):
    """AKL-r (akl.md Eq. 16): AKL with the two weights swapped, g_tail/(…)·FKL + g_head/(…)·RKL. As :func:`akl`."""
    return token_divergence(_rows_akl, student_logits, teacher_logits, mask, temperature=temperature,
                            reduction=reduction, params=_akl_params(mu, head_rule, eps, True),
                            chunk_rows=chunk_rows, scale_by_temperature_squared=scale_by_temperature_squared)


def akl_weights(student_logits, teacher_logits, *, temperature=1.0, mu=0.5, head_rule="paper", eps=1e-12):
    """The AKL weights (w_head, w_tail), each [B, T], for inspection and tests (no gradient).

    ``teacher_logits`` may be dense [B, T, V] or a SparseTeacher. w_head + w_tail = 1 − O(ε) unless p = q.
    """
    import torch

    _akl_params(mu, head_rule, eps, False)
    batch_shape = tuple(student_logits.shape[:2])
    with torch.no_grad():
        if isinstance(teacher_logits, SparseTeacher):
            dtype = compute_dtype(student_logits, teacher_logits.logprobs)
            log_q = collapse_student(torch.log_softmax(student_logits.to(dtype) / temperature, dim=-1),
                                     teacher_logits.ids.long())
            rest = teacher_logits.rest_logprob
            rest = rest_from_top(teacher_logits.logprobs.to(dtype)) if rest is None else rest.to(dtype)
            if teacher_logits.ids.shape[-1] == student_logits.shape[-1]:
                rest = torch.full_like(rest, -math.inf)
            log_p = torch.cat([teacher_logits.logprobs.to(dtype), rest.unsqueeze(-1)], dim=-1)
            rest_last = True
        else:
            dtype = compute_dtype(student_logits, teacher_logits)
            log_q = torch.log_softmax(student_logits.to(dtype) / temperature, dim=-1)
            log_p = torch.log_softmax(teacher_logits.to(dtype) / temperature, dim=-1)
            rest_last = False
        bins = log_p.shape[-1]
        w_head, w_tail = akl_weight_rows(log_p.reshape(-1, bins), log_q.reshape(-1, bins), mu=mu,
                                         head_rule=head_rule, eps=eps, rest_last=rest_last)
    return w_head.reshape(batch_shape), w_tail.reshape(batch_shape)


#: Token-level divergences by the names recipes use (no substring dispatch).
DIVERGENCES = {
    "fkl": fkl,
    "rkl": rkl,
    "fkl_rkl": fkl_rkl,
    "jsd": jsd,
    "tvd": tvd,
    "skl": skl,
    "srkl": srkl,
    "akl": akl,
    "akl_r": akl_r,
}

def divergence_rows(name: str, **params):
    """(row implementation, validated params) of the divergence ``name``, for the fused path.

    Raises :class:`ConfigError` for an unknown name or parameter.
    """
    allowed = {"fkl": {}, "rkl": {}, "tvd": {}, "fkl_rkl": {"weight": 0.5}, "jsd": {"beta": 0.5},
               "skl": {"alpha": 0.1}, "srkl": {"alpha": 0.1},
               "akl": {"mu": 0.5, "head_rule": "paper", "eps": 1e-12},
               "akl_r": {"mu": 0.5, "head_rule": "paper", "eps": 1e-12}}
    if name not in allowed:
        raise ConfigError(f"unknown divergence {name!r}; choose one of {', '.join(allowed)}.")
    unknown = set(params) - set(allowed[name])
    if unknown:
        raise ConfigError(f"divergence {name!r} takes no parameter(s) {', '.join(sorted(unknown))}; "
                          f"it accepts {', '.join(allowed[name]) or 'none'}.")
    values = {**allowed[name], **params}
    implementations = {"fkl": _rows_fkl, "rkl": _rows_rkl, "tvd": _rows_tvd, "fkl_rkl": _rows_fkl_rkl,
                       "jsd": _rows_jsd, "skl": _rows_skl, "srkl": _rows_srkl, "akl": _rows_akl, "akl_r": _rows_akl}
    if name in ("akl", "akl_r"):
        values = _akl_params(values["mu"], values["head_rule"], values["eps"], name == "akl_r")
    else:
        for key, value in values.items():
            _check_unit_interval(key, value)
            values[key] = float(value)
    return implementations[name], values
