"""DPPO ("distilled PPO", the PPO baseline of the ADPA paper, adpa_dckd.md §4.4 and Appendix C): PPO on the
student with the DPO teacher's implicit reward and a KL penalty to the SFT student.

Rewards (adpa_dckd.md Eqs. 26–29), per sampled token y_t of a response y drawn from the student π_θ:

* token level:    r_t = β·log(π_dpo(y_t|·)/π_ref(y_t|·)) − β_KL·log(π_θ(y_t|·)/π_S-ref(y_t|·))
* sequence level: r_t = −β_KL·log(π_θ(y_t|·)/π_S-ref(y_t|·)), plus β·log(π_dpo(y|x)/π_ref(y|x)) at the last
  response token (the EOS)

β is the DPO teacher's β; the paper writes the same β for the KL penalty (β_KL = β by default). π_S-ref is
the student after SFT. The recipe adds CE(y_w) with weight 1 (METHODS.md).

Critic: the paper says "the overall loss also includes the policy loss and critic loss, as is standard in
PPO training" (Appendix C, footnote 5), so a value head is the default: advantages by GAE
(:func:`gae_advantages`) and a clipped value loss (:func:`clipped_value_loss`). The critic-free option
(:func:`critic_free_advantages`) uses the reward-to-go minus a leave-one-out baseline, which keeps the
estimator unbiased without a value head.

Shapes and conventions as :mod:`kdbench.losses.policy_gradient` (rollout quantities carry no gradient).
"""

from __future__ import annotations

from kdbench.errors import ConfigError, DataError
from kdbench.losses.policy_gradient import check_token_shapes, token_mask, ppo_clipped_objective, reward_to_go
from kdbench.losses.reduction import check_reduction, compute_dtype, reduce_positions

REWARD_LEVELS = ("sequence", "token")
ADVANTAGE_ESTIMATORS = ("gae", "critic_free")
DPPO_DEFAULTS = {"beta": 0.05, "reward_level": "sequence", "advantage": "gae", "clip_range": 0.2,
                 "value_clip_range": 0.2, "value_coef": 0.1, "gamma": 1.0, "gae_lambda": 0.95, "sft_weight": 1.0}


def last_counted_index(mask_bool):
    """Index of the last counted position of every row ([B, T] bool → long [B]; −1 for an empty row)."""
    import torch

    positions = torch.arange(mask_bool.shape[1]).expand_as(mask_bool)
    return torch.where(mask_bool, positions, torch.full_like(positions, -1)).max(dim=1).values


def dpo_implicit_rewards(dpo_token_logps, ref_token_logps, mask=None, *, beta, level="sequence"):
    """The DPO teacher's implicit reward placed on the response tokens: [B, T], [B, T] → [B, T], no gradient.

    ``token``: β·(log π_dpo(y_t|·) − log π_ref(y_t|·)) at every counted position (Eq. 28).
    ``sequence``: β·Σ_t (log π_dpo − log π_ref) = β·log(π_dpo(y|x)/π_ref(y|x)) at the last counted position,
    0 elsewhere (Eq. 26). Both sum to the same sequence reward. An all-uncounted row is all zeros.
    """
    import torch

    if level not in REWARD_LEVELS:
        raise ConfigError(f"reward level must be one of {', '.join(REWARD_LEVELS)} (got {level!r}).")
    check_token_shapes(dpo_token_logps=dpo_token_logps, ref_token_logps=ref_token_logps)
    mask_bool = token_mask(mask, dpo_token_logps.shape)
    with torch.no_grad():
        dtype = compute_dtype(dpo_token_logps, ref_token_logps)
        per_token = torch.where(mask_bool, beta * (dpo_token_logps.to(dtype) - ref_token_logps.to(dtype)),
                                torch.zeros((), dtype=dtype))
        if level == "token":
            return per_token
        last = last_counted_index(mask_bool)
        rewards = torch.zeros_like(per_token)
        rows = (last >= 0).nonzero().squeeze(1)
        rewards[rows, last[rows]] = per_token[rows].sum(-1)
        return rewards


def kl_penalized_rewards(rewards, policy_token_logps, sft_token_logps, mask=None, *, kl_coef):
    """r_t − β_KL·(log π_θ(y_t|·) − log π_S-ref(y_t|·)) at every counted position (Eqs. 27, 29): [B, T] ×3 →
    [B, T], no gradient (the policy log-probs are those of the rollout)."""
    import torch

    check_token_shapes(rewards=rewards, policy_token_logps=policy_token_logps, sft_token_logps=sft_token_logps)
    mask_bool = token_mask(mask, rewards.shape)
    with torch.no_grad():
        dtype = compute_dtype(rewards, policy_token_logps, sft_token_logps)
        penalty = kl_coef * (policy_token_logps.to(dtype) - sft_token_logps.to(dtype))
        return torch.where(mask_bool, rewards.to(dtype) - penalty, torch.zeros((), dtype=dtype))


def gae_advantages(rewards, values, mask=None, *, gamma=1.0, gae_lambda=0.95):
    """Generalised advantage estimation (Schulman et al. 2016) over the counted positions: rewards and the
    critic's values V(s_t) [B, T] → (advantages [B, T], returns = advantages + values [B, T]), no gradient.

    δ_t = r_t + γ V(s_next) − V(s_t), A_t = δ_t + γλ A_next, where "next" is the next counted position and
    the value after the last one is 0 (the episode ends at the EOS). Uncounted positions are 0.
    """
    import torch

    if not (0.0 <= gamma <= 1.0 and 0.0 <= gae_lambda <= 1.0):
        raise ConfigError(f"gamma and gae_lambda must be in [0, 1] (got {gamma}, {gae_lambda}).")
    check_token_shapes(rewards=rewards, values=values)
    mask_bool = token_mask(mask, rewards.shape)
    with torch.no_grad():
        dtype = compute_dtype(rewards, values)
        zero = torch.zeros((), dtype=dtype)
        r = torch.where(mask_bool, rewards.to(dtype), zero)
        v = torch.where(mask_bool, values.to(dtype), zero)
        next_value = torch.zeros(r.shape[0], dtype=dtype)
        next_advantage = torch.zeros_like(next_value)
        advantages = torch.zeros_like(r)
        for t in reversed(range(r.shape[1])):
            delta = r[:, t] + gamma * next_value - v[:, t]
            advantage = delta + gamma * gae_lambda * next_advantage
            counted = mask_bool[:, t]
            advantages[:, t] = torch.where(counted, advantage, zero)
            next_value = torch.where(counted, v[:, t], next_value)
            next_advantage = torch.where(counted, advantage, next_advantage)
        return advantages, torch.where(mask_bool, advantages + v, zero)


def critic_free_advantages(rewards, mask=None, *, gamma=1.0):
    """Critic-free option: reward-to-go R_t = Σ_{t'≥t} γ^{t'−t} r_t' minus a leave-one-out baseline, the mean
    total return R_0 of the *other* responses of the batch ([B, T] → [B, T], no gradient).

    The baseline does not depend on the response's own tokens, so the estimator stays unbiased; with one
    response in the batch the baseline is 0.
    """
    import torch

    mask_bool = token_mask(mask, rewards.shape)
    returns = reward_to_go(rewards, mask_bool, gamma=gamma, include_current=True)
    with torch.no_grad():
        first = torch.where(mask_bool.any(1), returns.gather(1, mask_bool.to(torch.long).argmax(1, keepdim=True))
                            .squeeze(1), torch.zeros((), dtype=returns.dtype))
        n = first.shape[0]
        baseline = (first.sum() - first) / (n - 1) if n > 1 else torch.zeros_like(first)
        return torch.where(mask_bool, returns - baseline.unsqueeze(1), torch.zeros((), dtype=returns.dtype))


def clipped_value_loss(values, old_values, returns, mask=None, *, clip_range=0.2, reduction="mean"):
    """PPO's clipped critic loss ½·max((V − R)², (clip(V, V_old ± ε) − R)²) per token (as TRL's PPO), reduced:
    [B, T] ×3 → scalar (``values`` with gradient; ``old_values`` and ``returns`` from the rollout)."""
    import torch

    check_reduction(reduction)
    shape = check_token_shapes(values=values, old_values=old_values, returns=returns)
    mask_bool = token_mask(mask, shape)
    dtype = compute_dtype(values, old_values, returns)
    zero = torch.zeros((), dtype=dtype)
    v = torch.where(mask_bool, values.to(dtype), zero)
    v_old = torch.where(mask_bool, old_values.to(dtype).detach(), zero)
    target = torch.where(mask_bool, returns.to(dtype).detach(), zero)
    v_clipped = v_old + (v - v_old).clamp(-clip_range, clip_range)
    per_position = 0.5 * torch.maximum((v - target) ** 2, (v_clipped - target) ** 2)
    per_position = torch.where(mask_bool, per_position, zero)
    return reduce_positions(per_position, None if mask is None else mask_bool, reduction)


def dppo(policy_token_logps, old_token_logps, advantages, mask=None, *, values=None, old_values=None, returns=None,
         clip_range=0.2, value_clip_range=0.2, value_coef=0.1, reduction="mean"):
    """DPPO's PPO loss on a minibatch of rollouts: clipped policy loss (+ ``value_coef`` × clipped value loss
    when the critic's ``values`` are given): [B, T] tensors → scalar.

    ``policy_token_logps`` (with gradient) and ``old_token_logps`` are the student's log-probs of the sampled
    tokens now and at rollout time; ``advantages`` from :func:`gae_advantages` (critic) or
    :func:`critic_free_advantages`; ``values``/``old_values``/``returns`` [B, T] for the critic. The recipe
    adds 1 × CE on y_w (:func:`kdbench.losses.cross_entropy`).
    """
    loss = ppo_clipped_objective(policy_token_logps, old_token_logps, advantages, mask, clip_range=clip_range,
                                 reduction=reduction)
    if values is None:
        return loss
    if old_values is None or returns is None:
        raise DataError("the critic loss needs old_values and returns as well as values.")
    return loss + value_coef * clipped_value_loss(values, old_values, returns, mask, clip_range=value_clip_range,
                                                  reduction=reduction)
