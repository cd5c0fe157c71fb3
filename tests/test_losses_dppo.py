"""DPPO's rewards, advantages and losses vs float64 references, and the estimator vs the exact KL-regularised
reward of an enumerable policy (adpa_dckd.md Appendix C, Eqs. 26–29)."""

from __future__ import annotations

import pytest
import torch

from enumerable_policy import TablePolicy, assert_within_monte_carlo_error, batched_gradient_estimates
from kdbench.errors import ConfigError, DataError
from kdbench.losses import (clipped_value_loss, critic_free_advantages, dpo_implicit_rewards, dppo, gae_advantages,
                            kl_penalized_rewards)


def token_tensors(B=4, T=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    make = lambda: -torch.rand(B, T, generator=g, dtype=torch.float64) * 3  # noqa: E731
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[0, 3:] = False
    mask[1, 1:] = False
    mask[2, :] = False  # all-masked row
    return make(), make(), make(), mask


def test_implicit_rewards_token_and_sequence_level():
    dpo_lp, ref_lp, _, mask = token_tensors()
    token = dpo_implicit_rewards(dpo_lp, ref_lp, mask, beta=0.1, level="token")
    torch.testing.assert_close(token, 0.1 * (dpo_lp - ref_lp) * mask)
    sequence = dpo_implicit_rewards(dpo_lp, ref_lp, mask, beta=0.1, level="sequence")
    # Eq. 26: the whole sequence reward at the last response token, 0 elsewhere.
    torch.testing.assert_close(sequence.sum(-1), token.sum(-1))
    assert float(sequence[0, 2]) == pytest.approx(float(token[0].sum()))
    assert bool((sequence[0, :2] == 0).all()) and bool((sequence[2] == 0).all())
    assert float(sequence[3, 4]) == pytest.approx(float(token[3].sum()))
    with pytest.raises(ConfigError):
        dpo_implicit_rewards(dpo_lp, ref_lp, mask, beta=0.1, level="word")


def test_kl_penalty_to_the_sft_student():
    rewards, policy_lp, sft_lp, mask = token_tensors(seed=1)
    got = kl_penalized_rewards(rewards, policy_lp, sft_lp, mask, kl_coef=0.05)
    torch.testing.assert_close(got, (rewards - 0.05 * (policy_lp - sft_lp)) * mask)


def reference_gae(rewards, values, mask, gamma, lam):
    out = torch.zeros_like(rewards)
    for b in range(rewards.shape[0]):
        positions = [t for t in range(rewards.shape[1]) if mask[b, t]]
        advantage, next_value = 0.0, 0.0
        for t in reversed(positions):
            delta = rewards[b, t] + gamma * next_value - values[b, t]
            advantage = delta + gamma * lam * advantage
            out[b, t], next_value = advantage, values[b, t]
    return out


@pytest.mark.parametrize("gamma,lam", [(1.0, 0.95), (0.9, 1.0), (1.0, 0.0)])
def test_gae_matches_reference(gamma, lam):
    rewards, values, _, mask = token_tensors(seed=2)
    mask[3, 1] = False  # a hole inside a response is skipped
    advantages, returns = gae_advantages(rewards, values, mask, gamma=gamma, gae_lambda=lam)
    want = reference_gae(rewards, values, mask, gamma, lam)
    torch.testing.assert_close(advantages, want)
    torch.testing.assert_close(returns, (want + values) * mask)


def test_critic_free_advantages_use_a_leave_one_out_baseline():
    rewards, _, _, mask = token_tensors(seed=3)
    got = critic_free_advantages(rewards, mask)
    totals = (rewards * mask).sum(-1)
    for b in range(4):
        baseline = (totals.sum() - totals[b]) / 3
        for t in range(5):
            if mask[b, t]:
                want = (rewards[b, t:] * mask[b, t:]).sum() - baseline
                assert float(got[b, t]) == pytest.approx(float(want))
            else:
                assert float(got[b, t]) == 0.0


def test_clipped_value_loss_and_dppo_match_reference():
    values, old_values, returns, mask = token_tensors(seed=4)
    values = values.clone().requires_grad_()
    got = clipped_value_loss(values, old_values, returns, mask, clip_range=0.2)
    clipped = old_values + (values - old_values).clamp(-0.2, 0.2)
    per = 0.5 * torch.maximum((values - returns) ** 2, (clipped - returns) ** 2)
    want = (per * mask).sum() / mask.sum()
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(*(torch.autograd.grad(x, values)[0] for x in (got, want)))
    logps, old_logps, advantages, _ = token_tensors(seed=5)
    total = dppo(logps, old_logps, advantages, mask, values=values, old_values=old_values, returns=returns,
                 value_coef=0.5)
    ratio = torch.exp(logps - old_logps)
    policy = torch.maximum(-advantages * ratio, -advantages * ratio.clamp(0.8, 1.2))
    torch.testing.assert_close(total, (policy * mask).sum() / mask.sum() + 0.5 * want)
    with pytest.raises(DataError):
        dppo(logps, old_logps, advantages, mask, values=values)


# ------------------------------------------------------------------ the estimator vs the exact objective

V, T, BETA, KL_COEF = 3, 3, 0.5, 0.2


def exact_objective(policy, theta, tables):
    """J(θ) = E_{y~π_θ}[β log π_dpo(y)/π_ref(y) − β_KL log π_θ(y)/π_sft(y)] by enumeration."""
    ys = policy.sequences
    log_pi = policy.sequence_logps(theta, ys)
    dpo, ref, sft = (policy.sequence_logps(table, ys) for table in tables)
    return (log_pi.exp() * (BETA * (dpo - ref) - KL_COEF * (log_pi - sft))).sum()


def token_logps_of(policy, table, sequences):
    return torch.log_softmax(policy.logits(table, sequences), -1).gather(-1, sequences.unsqueeze(-1)).squeeze(-1)


def dppo_estimate(policy, theta, tables, sequences, level):
    """Critic-free DPPO loss on on-policy samples (first PPO epoch), summed over tokens, mean over samples."""
    logps = token_logps_of(policy, theta, sequences)
    with torch.no_grad():
        dpo, ref, sft = (token_logps_of(policy, table, sequences) for table in tables)
        rewards = kl_penalized_rewards(dpo_implicit_rewards(dpo, ref, beta=BETA, level=level), logps.detach(), sft,
                                       kl_coef=KL_COEF)
        advantages = critic_free_advantages(rewards)
    return dppo(logps, logps.detach(), advantages, reduction="sum") / sequences.shape[0]


@pytest.mark.parametrize("level", ["sequence", "token"])
def test_dppo_gradient_matches_the_exact_regularised_reward_gradient(level):
    policy = TablePolicy(V, T)
    tables = [policy.random_table(seed, 1.5) for seed in (11, 12, 13)]
    start = policy.random_table(14, 1.0)
    theta = start.clone().requires_grad_()
    (exact_ascent,) = torch.autograd.grad(exact_objective(policy, theta, tables), theta)
    g = torch.Generator().manual_seed(0)
    samples = [policy.sample(start, 400, g) for _ in range(30)]
    estimates = batched_gradient_estimates(lambda th, k: dppo_estimate(policy, th, tables, samples[k], level),
                                           start, len(samples))
    assert_within_monte_carlo_error(estimates, -exact_ascent)  # the loss descends where J ascends


@pytest.mark.parametrize("level", ["sequence", "token"])
def test_dppo_training_raises_the_exact_regularised_reward(level):
    policy = TablePolicy(V, T)
    tables = [policy.random_table(seed, 2.0) for seed in (21, 22, 23)]
    theta = tables[2].clone().requires_grad_()  # start from the SFT student, as DPPO does
    optimizer = torch.optim.Adam([theta], lr=0.05)
    g = torch.Generator().manual_seed(2)
    start = float(exact_objective(policy, theta.detach(), tables))
    for _ in range(40):
        sequences = policy.sample(theta.detach(), 64, g)
        optimizer.zero_grad()
        dppo_estimate(policy, theta, tables, sequences, level).backward()
        optimizer.step()
    end = float(exact_objective(policy, theta.detach(), tables))
    ys = policy.sequences
    best = float(BETA * (policy.sequence_logps(tables[0], ys) - policy.sequence_logps(tables[1], ys)).max())
    assert end > start + 0.3 * (best - start), (start, end, best)
