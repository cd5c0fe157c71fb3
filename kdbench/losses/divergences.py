"""Token-level divergences as records: one :class:`Divergence` per divergence (METHODS.md, "Token-level
divergences").

A record holds everything the library knows about one divergence — its row math on normalized
log-distributions, its parameters with their defaults and checks, and (optionally) its closed-form
gradient — so recipe validation, the chunked logits path (:mod:`kdbench.losses.token`) and the fused path
(:mod:`kdbench.losses.fused`) all read the same record and cannot disagree about which names exist.

Adding a divergence is one :func:`register_divergence` call::

    register_divergence(Divergence("hellinger", rows=my_rows, defaults={}))

after which ``divergence: hellinger`` works in any token-level recipe, :func:`kdbench.losses.divergence_loss`
computes it, and :data:`kdbench.losses.DIVERGENCES` lists it.

Row functions: ``rows(log_p, log_q, params, rest_last) -> [n]`` with ``log_p`` (teacher) and ``log_q``
(student) normalized log-distributions [n, K] (K = V dense, k+1 sparse with the rest bin last when
``rest_last``). Analytic gradients: ``analytic(log_p, log_q, params) -> (values [n], ∂/∂z [n, V])``
with respect to the student's scaled logits z = s/τ, dense teacher without gradient.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

from kdbench.errors import ConfigError
from kdbench.losses.reduction import compute_dtype
from kdbench.losses.sparse import SparseTeacher, collapse_student, rest_from_top

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


# ---------------------------------------------------------------------------------------------
# The records
# ---------------------------------------------------------------------------------------------


def check_unit_interval(name: str, value: float) -> None:
    if not 0.0 <= value <= 1.0:
        raise ConfigError(f"{name} must be between 0 and 1 (got {value}).")


def unit_interval_params(values: dict) -> dict:
    """The default parameter check: every parameter is a weight in [0, 1] (as a float)."""
    for key, value in values.items():
        check_unit_interval(key, value)
        values[key] = float(value)
    return values


def akl_params(mu, head_rule, eps, swap) -> dict:
    check_unit_interval("mu", mu)
    if head_rule not in HEAD_RULES:
        raise ConfigError(f"head_rule must be one of {', '.join(HEAD_RULES)} (got {head_rule!r}).")
    return {"mu": float(mu), "head_rule": head_rule, "eps": float(eps), "swap": swap}


@dataclass(frozen=True)
class Divergence:
    """One token-level divergence D(p ‖ q) (p = teacher, q = student).

    ``rows``: the per-position math (module docstring); ``defaults``: its parameters (name → default; a
    recipe's ``divergence_params`` may set exactly these); ``check``: validates and normalizes the parameter
    values (raises :class:`~kdbench.errors.ConfigError`; default: each is a weight in [0, 1]); ``analytic``:
    its closed-form gradient for the dense path (``None``: per-chunk autograd); ``diagnose(student_logits,
    teacher_logits, temperature, params) -> {name: [B, T]}``: per-position diagnostics a trainer logs as means
    over counted tokens (AKL's head weight); ``help``: one line.
    """

    name: str
    rows: Callable[..., Any]
    defaults: Mapping[str, Any] = field(default_factory=dict)
    check: Callable[[dict], dict] = unit_interval_params
    analytic: Callable[..., Any] | None = None
    diagnose: Callable[..., dict] | None = None
    help: str = ""

    def resolve(self, **params) -> dict:
        """The parameter values for a call: the defaults with ``params`` over them, checked. An unknown
        name is one sentence listing the accepted ones."""
        unknown = set(params) - set(self.defaults)
        if unknown:
            raise ConfigError(f"divergence {self.name!r} takes no parameter(s) {', '.join(sorted(unknown))}; "
                              f"it accepts {', '.join(self.defaults) or 'none'}.")
        return self.check({**self.defaults, **params})


def akl_weights(student_logits, teacher_logits, *, temperature=1.0, mu=0.5, head_rule="paper", eps=1e-12):
    """The AKL weights (w_head, w_tail), each [B, T], for inspection and tests (no gradient).

    ``teacher_logits`` may be dense [B, T, V] or a SparseTeacher. w_head + w_tail = 1 − O(ε) unless p = q.
    """
    import torch

    akl_params(mu, head_rule, eps, False)
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


def _akl_diagnostics(swap: bool):
    def diagnose(student_logits, teacher_logits, temperature: float, params: dict) -> dict:
        w_head, _ = akl_weights(student_logits, teacher_logits, temperature=temperature, mu=params.get("mu", 0.5),
                                head_rule=params.get("head_rule", "paper"))
        return {"akl_fkl_weight": 1 - w_head if swap else w_head}  # AKL-r swaps the weights: FKL gets g_tail

    return diagnose


def _akl_check(swap: bool) -> Callable[[dict], dict]:
    return lambda values: akl_params(values["mu"], values["head_rule"], values["eps"], swap)


_AKL_DEFAULTS = {"mu": 0.5, "head_rule": "paper", "eps": 1e-12}

#: Every token-level divergence by the name recipes use (no substring dispatch); extend with
#: :func:`register_divergence`.
DIVERGENCE_FORMS: dict[str, Divergence] = {}


def register_divergence(divergence: Divergence, *, replace: bool = False) -> Divergence:
    """Add ``divergence`` under its name (``replace=True`` to redefine an existing one); returns it."""
    if divergence.name in DIVERGENCE_FORMS and not replace:
        raise ConfigError(f"A divergence named {divergence.name!r} is already registered; pick another name.")
    DIVERGENCE_FORMS[divergence.name] = divergence
    return divergence


def unregister_divergence(name: str) -> None:
    """Remove a divergence added with :func:`register_divergence` (tests, notebooks)."""
    DIVERGENCE_FORMS.pop(name, None)


def get_divergence(name: str) -> Divergence:
    """The record of divergence ``name``, or one sentence listing the known names."""
    if name not in DIVERGENCE_FORMS:
        raise ConfigError(f"unknown divergence {name!r}; choose one of {', '.join(DIVERGENCE_FORMS)}.")
    return DIVERGENCE_FORMS[name]


for _record in (
    Divergence("fkl", _rows_fkl, analytic=_analytic_fkl, help="Forward KL, sum_v p (log p - log q)."),
    Divergence("rkl", _rows_rkl, analytic=_analytic_rkl, help="Reverse KL, sum_v q (log q - log p)."),
    Divergence("fkl_rkl", _rows_fkl_rkl, {"weight": 0.5}, analytic=_analytic_fkl_rkl,
               help="w FKL + (1 - w) RKL."),
    Divergence("jsd", _rows_jsd, {"beta": 0.5}, analytic=_analytic_jsd, help="Generalized JSD of GKD (Eq. 1)."),
    Divergence("tvd", _rows_tvd, help="Total variation distance."),
    Divergence("skl", _rows_skl, {"alpha": 0.1}, help="Skew KL of DistiLLM."),
    Divergence("srkl", _rows_srkl, {"alpha": 0.1}, help="Skew reverse KL of DistiLLM."),
    Divergence("akl", _rows_akl, dict(_AKL_DEFAULTS), check=_akl_check(False), analytic=_analytic_akl,
               diagnose=_akl_diagnostics(False), help="Adaptive KL (akl.md Eqs. 11-15)."),
    Divergence("akl_r", _rows_akl, dict(_AKL_DEFAULTS), check=_akl_check(True), analytic=_analytic_akl,
               diagnose=_akl_diagnostics(True), help="AKL with the head / tail weights swapped (akl.md Eq. 16)."),
):
    register_divergence(_record)
