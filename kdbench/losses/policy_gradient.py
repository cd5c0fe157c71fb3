"""Policy-gradient distillation: MiniLLM's estimator of the sequence-level reverse KL and the PPO pieces
it shares with DPPO (:mod:`kdbench.losses.dppo`). Definitions and decisions: ``docs/methods.md``
("Policy-gradient and contrastive methods").

MiniLLM (Gu et al., ICLR 2024) minimises the sequence-level reverse KL KL(q_θ(y|x) ‖ p(y|x)) of the
student q_θ from the teacher p. Its gradient (paper Eq. 3) is −E_{y~q}[Σ_t (R_t − 1) ∇log q_θ(y_t|y_<t,x)]
with per-token reward r_t = log p(y_t|·) − log q_θ(y_t|·) and R_t = Σ_{t'≥t} r_t'. The paper splits it
(Eq. 5) into the *single-step* part, whose expectation over y_t is taken exactly — the per-position
reverse KL Σ_v q(v)(log q(v) − log p(v)) differentiated in closed form (:func:`kdbench.losses.rkl`) — and
the *long-term* part Σ_t R_{t+1} ∇log q_θ(y_t), estimated from samples with R_{t+1} normalised by the number
of future tokens (Eq. 7, length normalisation). Responses are sampled from the teacher-mixed distribution
p̃ = α p + (1 − α) q_θ (α = 0.2, Eq. 6), corrected by the per-token importance weight
w_t = q_θ(y_t|·)/p̃(y_t|·), and the update is PPO's clipped surrogate (ratio clip 0.2).

Shapes: B responses, T response positions, V vocabulary. Position t of ``*_logits`` predicts ``labels[:, t]``
(already aligned, as in :func:`kdbench.losses.token_logps`); ``mask`` [B, T] marks the response tokens.
Everything that comes from the rollout (``old_logps``, ``advantages``, ``importance_weights``) carries no
gradient. Reductions: ``mean`` over the counted tokens of the batch (METHODS.md convention; a trainer
passes ``sum`` and divides by the token count of the whole optimizer step), ``sum``, or ``none`` → [B, T].
"""

from __future__ import annotations

import math

from kdbench.errors import ConfigError, DataError
from kdbench.losses.reduction import check_reduction, compute_dtype, counted_mask, reduce_positions

MINILLM_DEFAULTS = {"teacher_mix_alpha": 0.2, "clip_range": 0.2, "gamma": 1.0, "length_normalize": True,
                    "include_current_reward": False, "whiten": False, "weight_single_step": True,
                    "ppo_epochs": 4}


def _check_fraction(name: str, value: float, *, open_right: bool = False) -> float:
    value = float(value)
    if not (0.0 <= value < 1.0 if open_right else 0.0 <= value <= 1.0):
        raise ConfigError(f"{name} must be in [0, 1{')' if open_right else ']'} (got {value}).")
    return value


def token_mask(mask, shape):
    import torch

    bool_mask = counted_mask(mask, tuple(shape))
    return torch.ones(tuple(shape), dtype=torch.bool) if bool_mask is None else bool_mask


def check_token_shapes(**tensors) -> tuple:
    shapes = {name: tuple(t.shape) for name, t in tensors.items() if t is not None}
    first = next(iter(shapes.values()))
    if any(shape != first for shape in shapes.values()):
        raise DataError("per-token inputs must share one [B, T] shape (got "
                        + ", ".join(f"{name} {shape}" for name, shape in shapes.items()) + ").")
    if len(first) != 2:
        raise DataError(f"per-token inputs must be [B, T] tensors (got shape {first}).")
    return first


# ---------------------------------------------------------------------------------------------
# Sampling from the teacher-mixed distribution (MiniLLM Eq. 6)
# ---------------------------------------------------------------------------------------------


def teacher_mixed_logprobs(student_logits, teacher_logits, *, alpha=0.2, temperature=1.0):
    """log p̃ = log(α·p + (1 − α)·q) of the next-token distributions: [..., V], [..., V] → [..., V].

    The distribution MiniLLM samples its rollouts from (paper Eq. 6, α = 0.2 teacher). Formed in log space
    (logsumexp); no gradient (sampling only). α = 0 is the student, α = 1 the teacher.
    """
    import torch

    alpha = _check_fraction("teacher_mix_alpha", alpha)
    if tuple(student_logits.shape) != tuple(teacher_logits.shape):
        raise DataError(f"student and teacher next-token logits differ in shape ({tuple(student_logits.shape)} vs "
                        f"{tuple(teacher_logits.shape)}); both models must share one vocabulary.")
    with torch.no_grad():
        dtype = compute_dtype(student_logits, teacher_logits)
        log_q = torch.log_softmax(student_logits.to(dtype) / temperature, dim=-1)
        log_p = torch.log_softmax(teacher_logits.to(dtype) / temperature, dim=-1)
        if alpha == 0.0:
            return log_q
        if alpha == 1.0:
            return log_p
        return torch.logaddexp(log_p + math.log(alpha), log_q + math.log1p(-alpha))


def mixed_importance_weights(student_token_logps, teacher_token_logps, mask=None, *, alpha=0.2):
    """w_t = q(y_t|·) / (α p(y_t|·) + (1 − α) q(y_t|·)) per sampled token: [B, T], [B, T] → [B, T].

    MiniLLM's per-token approximation of the importance weight of a rollout drawn from p̃ (paper Eq. 6),
    from the log-probs of the sampled tokens at rollout time; 0 at uncounted positions; no gradient.
    """
    import torch

    alpha = _check_fraction("teacher_mix_alpha", alpha)
    check_token_shapes(student_token_logps=student_token_logps, teacher_token_logps=teacher_token_logps)
    mask_bool = token_mask(mask, student_token_logps.shape)
    with torch.no_grad():
        log_q = student_token_logps.to(compute_dtype(student_token_logps, teacher_token_logps))
        log_p = teacher_token_logps.to(log_q.dtype)
        if alpha == 0.0:
            log_w = torch.zeros_like(log_q)
        else:
            log_mix = torch.logaddexp(log_p + math.log(alpha), log_q + math.log1p(-alpha)) if alpha < 1 else log_p
            log_w = log_q - log_mix
        return torch.where(mask_bool, log_w.exp(), torch.zeros_like(log_w))


# ---------------------------------------------------------------------------------------------
# Rewards and advantages
# ---------------------------------------------------------------------------------------------


def minillm_rewards(teacher_token_logps, student_token_logps, mask=None):
    """Per-token reward r_t = log p(y_t|·) − log q(y_t|·) (MiniLLM Eq. 3): [B, T], [B, T] → [B, T], 0 where
    uncounted, no gradient. Summed over a response it is −log(q(y)/p(y)), whose expectation under q is minus
    the sequence-level reverse KL."""
    import torch

    check_token_shapes(teacher_token_logps=teacher_token_logps, student_token_logps=student_token_logps)
    mask_bool = token_mask(mask, teacher_token_logps.shape)
    with torch.no_grad():
        reward = teacher_token_logps.to(compute_dtype(teacher_token_logps)) - student_token_logps.to(
            compute_dtype(teacher_token_logps))
        return torch.where(mask_bool, reward, torch.zeros_like(reward))


def reward_to_go(rewards, mask=None, *, gamma=1.0, include_current=True, length_normalize=False):
    """Discounted return of every counted position: [B, T] → [B, T], 0 where uncounted, no gradient.

    ``include_current=True``: R_t = Σ_{t'≥t} γ^{t'−t} r_t' (the policy-gradient return of action t; DPPO);
    ``False``: R_{t+1} = Σ_{t'>t} γ^{t'−t−1} r_t', the future only (MiniLLM Eq. 5's long-term term, whose
    current-token part is the single-step term). ``length_normalize`` divides by the number of counted tokens
    summed (MiniLLM Eq. 7: 1/(T − t) for the future, 1/(T − t + 1) with the current token; a position with
    no token to sum gets 0). Counted positions need not be contiguous; uncounted ones are skipped.
    """
    import torch

    if not 0.0 <= gamma <= 1.0:
        raise ConfigError(f"gamma must be in [0, 1] (got {gamma}).")
    mask_bool = token_mask(mask, rewards.shape)
    with torch.no_grad():
        values = torch.where(mask_bool, rewards.to(compute_dtype(rewards)), torch.zeros((), dtype=compute_dtype(
            rewards)))
        counted = mask_bool.to(values.dtype)
        running = torch.zeros(values.shape[0], dtype=values.dtype)
        running_count = torch.zeros_like(running)
        returns = torch.zeros_like(values)
        counts = torch.zeros_like(values)
        for t in reversed(range(values.shape[1])):
            if include_current:
                running = torch.where(mask_bool[:, t], values[:, t] + gamma * running, running)
                running_count = running_count + counted[:, t]
                returns[:, t], counts[:, t] = running, running_count
            else:
                returns[:, t], counts[:, t] = running, running_count
                running = torch.where(mask_bool[:, t], values[:, t] + gamma * running, running)
                running_count = running_count + counted[:, t]
        if length_normalize:
            returns = torch.where(counts > 0, returns / counts.clamp(min=1), torch.zeros_like(returns))
        return torch.where(mask_bool, returns, torch.zeros_like(returns))


def whiten(values, mask=None, *, shift_mean=True, eps=1e-8):
    """(x − mean) / std over the counted positions of the batch (the authors' MiniLLM code and TRL whiten
    advantages; off by default here, see docs/methods.md): [B, T] → [B, T], 0 where uncounted."""
    import torch

    mask_bool = token_mask(mask, values.shape)
    with torch.no_grad():
        counted = values[mask_bool]
        if counted.numel() < 2:
            return torch.zeros_like(values)
        mean, var = counted.mean(), counted.var(unbiased=False)
        out = (values - mean) * torch.rsqrt(var + eps)
        if not shift_mean:
            out = out + mean
        return torch.where(mask_bool, out, torch.zeros_like(out))


def minillm_advantages(rewards, mask=None, *, gamma=1.0, length_normalize=True, include_current_reward=False,
                       whiten_advantages=False):
    """MiniLLM's advantage of each sampled token: [B, T] per-token rewards → [B, T], no gradient.

    Paper reading (default): the length-normalised future return R^Norm_{t+1} (Eqs. 5, 7), γ = 1, not
    whitened. The authors' code reading: ``include_current_reward=True`` (their return starts at t),
    ``gamma=0.95`` (their argument default), ``whiten_advantages=True``.
    """
    advantages = reward_to_go(rewards, mask, gamma=gamma, include_current=include_current_reward,
                              length_normalize=length_normalize)
    return whiten(advantages, mask) if whiten_advantages else advantages


# ---------------------------------------------------------------------------------------------
# PPO's clipped surrogate and MiniLLM's loss
# ---------------------------------------------------------------------------------------------


def ppo_clipped_objective(logps, old_logps, advantages, mask=None, *, clip_range=0.2, importance_weights=None,
                          reduction="mean"):
    """PPO's clipped policy loss per token, −min(ρ_t A_t, clip(ρ_t, 1 − ε, 1 + ε) A_t) (Schulman et al. 2017
    Eq. 7), reduced: [B, T] ×3 → scalar (or [B, T] with ``none``).

    ``logps`` [B, T]: log π_θ of the sampled tokens (with gradient); ``old_logps`` the same at rollout time;
    ρ_t = exp(logps − old_logps)·w_t with ``importance_weights`` w (MiniLLM's teacher-mix correction; 1 when
    ``None``), exactly as MiniLLM multiplies its ratio by w. At ρ = 1 the gradient is −A_t w_t ∇log π_θ(y_t).
    """
    import torch

    check_reduction(reduction)
    if not clip_range > 0:
        raise ConfigError(f"clip_range must be > 0 (got {clip_range}).")
    shape = check_token_shapes(logps=logps, old_logps=old_logps, advantages=advantages,
                              importance_weights=importance_weights)
    mask_bool = token_mask(mask, shape)
    dtype = compute_dtype(logps, old_logps, advantages)
    zero = torch.zeros((), dtype=dtype)
    # Uncounted positions never enter the math (their log-probs may be −inf or NaN padding).
    log_ratio = torch.where(mask_bool, logps.to(dtype) - old_logps.to(dtype).detach(), zero)
    ratio = log_ratio.exp()
    if importance_weights is not None:
        ratio = ratio * torch.where(mask_bool, importance_weights.to(dtype).detach(), zero)
    advantage = torch.where(mask_bool, advantages.to(dtype).detach(), zero)
    unclipped = -advantage * ratio
    clipped = -advantage * ratio.clamp(1.0 - clip_range, 1.0 + clip_range)
    per_position = torch.where(mask_bool, torch.maximum(unclipped, clipped), zero)
    return reduce_positions(per_position, None if mask is None else mask_bool, reduction)


def minillm(student_logits, teacher_logits, labels, mask=None, *, old_logps, advantages, importance_weights=None,
            clip_range=0.2, single_step=True, weight_single_step=True, temperature=1.0, reduction="mean",
            chunk_rows=None):
    """MiniLLM's loss on a minibatch of rollouts: PPO long-term term + single-step reverse KL (Eq. 5).

    ``student_logits`` [B, T, V] (with gradient) and ``teacher_logits`` [B, T, V] on the sampled responses
    ``labels`` [B, T]; ``old_logps`` [B, T] the student's log-probs of the sampled tokens at rollout time;
    ``advantages`` [B, T] from :func:`minillm_advantages`; ``importance_weights`` [B, T] from
    :func:`mixed_importance_weights` (``None`` = on-policy, w = 1).

    loss = mean_t[ −min(ρ_t A_t, clip(ρ_t) A_t) ] + mean_t[ w_t · RKL_t(q_θ ‖ p) ]

    where RKL_t is the exact reverse KL of the next-token distributions at position t (the single-step term;
    ``weight_single_step=False`` drops its w_t as the authors' code does; ``single_step=False`` drops it).
    Both terms use the same token reduction, so their sum is the paper's gradient up to one constant factor.
    """
    import torch

    from kdbench.losses.sequence import token_logps
    from kdbench.losses.token import rkl

    check_reduction(reduction)
    if student_logits.dim() != 3 or tuple(student_logits.shape[:2]) != tuple(labels.shape):
        raise DataError(f"student logits must be [B, T, V] over the labels' [B, T] (got {tuple(student_logits.shape)} "
                        f"and {tuple(labels.shape)}).")
    shape = tuple(labels.shape)
    mask_bool = token_mask(mask if mask is not None else labels != -100, shape)
    safe_labels = torch.where(mask_bool, labels, torch.zeros_like(labels))
    logps = token_logps(student_logits, safe_labels, mask_bool, temperature=temperature, chunk_rows=chunk_rows)
    policy = ppo_clipped_objective(logps, old_logps, advantages, mask_bool, clip_range=clip_range,
                                   importance_weights=importance_weights, reduction="none")
    total = policy
    if single_step:
        per_position = rkl(student_logits, teacher_logits, mask_bool, temperature=temperature, reduction="none",
                           chunk_rows=chunk_rows)
        if weight_single_step and importance_weights is not None:
            weights = torch.where(mask_bool, importance_weights.to(per_position.dtype).detach(),
                                  torch.zeros((), dtype=per_position.dtype))
            per_position = per_position * weights
        total = total + per_position.to(total.dtype)
    return reduce_positions(total, mask_bool, reduction)


def sequence_reverse_kl(student_sequence_logps, teacher_sequence_logps):
    """Plug-in estimate log q(y) − log p(y) per sampled response ([B] → [B]); its mean over responses drawn
    from q estimates KL(q ‖ p) (the quantity MiniLLM reports as ``rev_kl``)."""
    return student_sequence_logps - teacher_sequence_logps
