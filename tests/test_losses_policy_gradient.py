"""MiniLLM's policy-gradient loss and the PPO pieces vs float64 references, and the estimator vs the exact
sequence-level reverse KL of an enumerable policy (tests/enumerable_policy.py)."""

from __future__ import annotations

import math

import pytest
import torch

from enumerable_policy import TablePolicy, assert_within_monte_carlo_error, batched_gradient_estimates
from kdbench.errors import ConfigError, DataError
from kdbench.losses import (minillm, minillm_advantages, minillm_rewards, mixed_importance_weights,
                            ppo_clipped_objective, reward_to_go, teacher_mixed_logprobs)


def rollout_batch(B=4, T=6, V=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    student = torch.randn(B, T, V, generator=g, dtype=torch.float64) * 2
    teacher = torch.randn(B, T, V, generator=g, dtype=torch.float64) * 2
    labels = torch.randint(0, V, (B, T), generator=g)
    mask = torch.rand(B, T, generator=g) > 0.25
    mask[:, 0] = True
    mask[-1] = False  # an all-masked row
    old_logps = torch.log_softmax(student + 0.3 * torch.randn(B, T, V, generator=g, dtype=torch.float64), -1) \
        .gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    advantages = torch.randn(B, T, generator=g, dtype=torch.float64)
    weights = torch.rand(B, T, generator=g, dtype=torch.float64) * 1.5 + 0.2
    return student, teacher, labels, mask, old_logps, advantages, weights


# ------------------------------------------------------------------ references (plain float64 torch)


def reference_ppo(logps, old_logps, advantages, mask, clip, weights=None):
    total, count = 0.0, 0
    for b in range(logps.shape[0]):
        for t in range(logps.shape[1]):
            if not mask[b, t]:
                continue
            ratio = torch.exp(logps[b, t] - old_logps[b, t]) * (1.0 if weights is None else weights[b, t])
            a = advantages[b, t]
            total = total + torch.maximum(-a * ratio, -a * torch.clamp(ratio, 1 - clip, 1 + clip))
            count += 1
    return total / max(count, 1)


def reference_minillm(student, teacher, labels, mask, old_logps, advantages, weights, clip, tau, weight_single):
    q = torch.softmax(student / tau, -1)
    p = torch.softmax(teacher / tau, -1)
    logps = torch.log(q.gather(-1, labels.unsqueeze(-1)).squeeze(-1))
    total, count = 0.0, 0
    for b in range(student.shape[0]):
        for t in range(student.shape[1]):
            if not mask[b, t]:
                continue
            ratio = torch.exp(logps[b, t] - old_logps[b, t]) * weights[b, t]
            a = advantages[b, t]
            policy = torch.maximum(-a * ratio, -a * torch.clamp(ratio, 1 - clip, 1 + clip))
            reverse_kl = (q[b, t] * (torch.log(q[b, t]) - torch.log(p[b, t]))).sum()
            total = total + policy + (weights[b, t] if weight_single else 1.0) * reverse_kl
            count += 1
    return total / max(count, 1)


def reference_reward_to_go(rewards, mask, gamma, include_current, normalize):
    out = torch.zeros_like(rewards)
    for b in range(rewards.shape[0]):
        positions = [t for t in range(rewards.shape[1]) if mask[b, t]]
        for i, t in enumerate(positions):
            future = positions[i:] if include_current else positions[i + 1:]
            value = sum(gamma ** k * rewards[b, s] for k, s in enumerate(future)) if future else 0.0
            out[b, t] = value / len(future) if normalize and future else value
    return out


# ------------------------------------------------------------------ definitions


def test_ppo_clipped_objective_matches_reference_value_and_gradient():
    student, _, labels, mask, old_logps, advantages, weights = rollout_batch()
    logps = torch.log_softmax(student, -1).gather(-1, labels.unsqueeze(-1)).squeeze(-1).detach().requires_grad_()
    for w in (None, weights):
        got = ppo_clipped_objective(logps, old_logps, advantages, mask, clip_range=0.2, importance_weights=w)
        want = reference_ppo(logps, old_logps, advantages, mask, 0.2, w)
        torch.testing.assert_close(got, want)
        (g_got,) = torch.autograd.grad(got, logps)
        (g_want,) = torch.autograd.grad(want, logps)
        torch.testing.assert_close(g_got, g_want)
        assert bool((g_got[~mask] == 0).all())


def test_ppo_ratio_one_gradient_is_minus_advantage():
    logps = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    advantages = torch.randn(3, 4, dtype=torch.float64)
    loss = ppo_clipped_objective(logps, logps.detach(), advantages, reduction="sum")
    (grad,) = torch.autograd.grad(loss, logps)
    torch.testing.assert_close(grad, -advantages)


def test_ppo_clipping_stops_the_gradient_beyond_the_trust_region():
    logps = torch.tensor([[0.5, -0.5]], dtype=torch.float64, requires_grad=True)
    old = torch.zeros(1, 2, dtype=torch.float64)
    # ratio e^0.5 > 1.2 with A > 0 and e^-0.5 < 0.8 with A < 0: both clipped
    advantages = torch.tensor([[1.0, -1.0]], dtype=torch.float64)
    (grad,) = torch.autograd.grad(ppo_clipped_objective(logps, old, advantages), logps)
    assert bool((grad == 0).all())


@pytest.mark.parametrize("tau", [1.0, 2.0])
@pytest.mark.parametrize("weight_single", [True, False])
def test_minillm_matches_reference_value_and_gradient(tau, weight_single):
    student, teacher, labels, mask, old_logps, advantages, weights = rollout_batch()
    student.requires_grad_()
    got = minillm(student, teacher, labels, mask, old_logps=old_logps, advantages=advantages,
                  importance_weights=weights, temperature=tau, weight_single_step=weight_single, chunk_rows=5)
    want = reference_minillm(student, teacher, labels, mask, old_logps, advantages, weights, 0.2, tau, weight_single)
    torch.testing.assert_close(got, want)
    (g_got,) = torch.autograd.grad(got, student)
    (g_want,) = torch.autograd.grad(want, student)
    torch.testing.assert_close(g_got, g_want)


def test_minillm_padding_cannot_leak_and_empty_batch_is_zero():
    student, teacher, labels, mask, old_logps, advantages, weights = rollout_batch()
    base = minillm(student, teacher, labels, mask, old_logps=old_logps, advantages=advantages,
                   importance_weights=weights)
    poisoned = [x.clone() for x in (student, teacher, old_logps, advantages, weights)]
    for x in poisoned:
        x[~mask] = float("nan")
    labels_poisoned = labels.masked_fill(~mask, -100)
    got = minillm(poisoned[0], poisoned[1], labels_poisoned, mask, old_logps=poisoned[2], advantages=poisoned[3],
                  importance_weights=poisoned[4])
    torch.testing.assert_close(got, base)
    nothing = torch.zeros_like(mask)
    student.requires_grad_()
    empty = minillm(student, teacher, labels, nothing, old_logps=old_logps, advantages=advantages)
    assert float(empty.detach()) == 0.0
    (grad,) = torch.autograd.grad(empty, student)
    assert bool((grad == 0).all())


def test_teacher_mixed_distribution_and_importance_weights():
    student, teacher, labels, mask, *_ = rollout_batch()
    mixed = teacher_mixed_logprobs(student, teacher, alpha=0.2).exp()
    torch.testing.assert_close(mixed, 0.2 * torch.softmax(teacher, -1) + 0.8 * torch.softmax(student, -1))
    torch.testing.assert_close(teacher_mixed_logprobs(student, teacher, alpha=0.0), torch.log_softmax(student, -1))
    s_lp = torch.log_softmax(student, -1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    t_lp = torch.log_softmax(teacher, -1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    w = mixed_importance_weights(s_lp, t_lp, mask, alpha=0.2)
    want = s_lp.exp() / (0.2 * t_lp.exp() + 0.8 * s_lp.exp())
    torch.testing.assert_close(w, want * mask)
    with pytest.raises(ConfigError):
        teacher_mixed_logprobs(student, teacher, alpha=1.5)
    with pytest.raises(DataError):
        teacher_mixed_logprobs(student, teacher[..., :-1])


@pytest.mark.parametrize("gamma", [1.0, 0.9])
@pytest.mark.parametrize("include_current", [True, False])
@pytest.mark.parametrize("normalize", [True, False])
def test_reward_to_go_matches_loop_reference(gamma, include_current, normalize):
    _, _, _, mask, _, rewards, _ = rollout_batch(seed=3)
    got = reward_to_go(rewards, mask, gamma=gamma, include_current=include_current, length_normalize=normalize)
    want = reference_reward_to_go(rewards, mask, gamma, include_current, normalize)
    torch.testing.assert_close(got, want)


def test_minillm_rewards_and_default_advantages_follow_the_paper():
    _, _, _, mask, old, adv, _ = rollout_batch(seed=4)
    teacher_lp = old - adv.abs()
    rewards = minillm_rewards(teacher_lp, old, mask)
    torch.testing.assert_close(rewards, (teacher_lp - old) * mask)
    # Paper default: length-normalised future return R^Norm_{t+1}, γ = 1, no whitening.
    torch.testing.assert_close(minillm_advantages(rewards, mask),
                               reference_reward_to_go(rewards, mask, 1.0, False, True))
    whitened = minillm_advantages(rewards, mask, whiten_advantages=True)
    assert abs(float(whitened[mask].mean())) < 1e-9 and abs(float(whitened[mask].std(unbiased=False)) - 1) < 1e-6


# ------------------------------------------------------------------ the estimator vs the exact objective

V, T = 3, 3


def exact_reverse_kl(policy, student_table, teacher_table):
    ys = policy.sequences
    log_q = policy.sequence_logps(student_table, ys)
    log_p = policy.sequence_logps(teacher_table, ys)
    return (log_q.exp() * (log_q - log_p)).sum()


def minillm_estimate(policy, theta, teacher_table, sequences, *, length_normalize=False, single_step=True):
    """MiniLLM's loss on on-policy samples (α = 0, first PPO epoch), summed over tokens, mean over samples.
    Without the single-step term the return must include the current token (plain REINFORCE)."""
    student_logits = policy.logits(theta, sequences)
    teacher_logits = policy.logits(teacher_table, sequences)
    with torch.no_grad():
        old = torch.log_softmax(student_logits, -1).gather(-1, sequences.unsqueeze(-1)).squeeze(-1)
        teacher_lp = torch.log_softmax(teacher_logits, -1).gather(-1, sequences.unsqueeze(-1)).squeeze(-1)
    advantages = minillm_advantages(minillm_rewards(teacher_lp, old), length_normalize=length_normalize,
                                    include_current_reward=not single_step)
    loss = minillm(student_logits, teacher_logits, sequences, old_logps=old, advantages=advantages, reduction="sum",
                   single_step=single_step)
    return loss / sequences.shape[0]


@pytest.mark.parametrize("single_step", [True, False])
def test_minillm_gradient_matches_the_exact_reverse_kl_gradient(single_step):
    policy = TablePolicy(V, T)
    student_table, teacher_table = policy.random_table(1, 1.0), policy.random_table(2, 2.0)
    theta = student_table.clone().requires_grad_()
    (exact,) = torch.autograd.grad(exact_reverse_kl(policy, theta, teacher_table), theta)
    g = torch.Generator().manual_seed(0)
    samples = [policy.sample(student_table, 400, g) for _ in range(30)]
    estimates = batched_gradient_estimates(
        lambda th, k: minillm_estimate(policy, th, teacher_table, samples[k], single_step=single_step), student_table,
        len(samples))
    assert_within_monte_carlo_error(estimates, exact)


@pytest.mark.parametrize("single_step", [True, False])
def test_minillm_training_lowers_the_exact_reverse_kl(single_step):
    policy = TablePolicy(V, T)
    teacher_table = policy.random_table(5, 2.5)
    theta = torch.zeros(policy.n_prefixes, V, dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.Adam([theta], lr=0.1)
    g = torch.Generator().manual_seed(1)
    start = float(exact_reverse_kl(policy, theta.detach(), teacher_table))
    for _ in range(60):
        sequences = policy.sample(theta.detach(), 64, g)
        optimizer.zero_grad()
        minillm_estimate(policy, theta, teacher_table, sequences, length_normalize=True,
                         single_step=single_step).backward()
        optimizer.step()
    end = float(exact_reverse_kl(policy, theta.detach(), teacher_table))
    assert end < (0.3 if single_step else 0.6) * start, (start, end)


def test_minillm_errors():
    student, teacher, labels, mask, old_logps, advantages, _ = rollout_batch()
    with pytest.raises(DataError):
        minillm(student[:, :-1], teacher, labels, mask, old_logps=old_logps, advantages=advantages)
    with pytest.raises(ConfigError):
        ppo_clipped_objective(old_logps, old_logps, advantages, clip_range=0.0)
    with pytest.raises(DataError):
        ppo_clipped_objective(old_logps, old_logps[:, :-1], advantages)
    with pytest.raises(ConfigError):
        reward_to_go(advantages, gamma=1.5)
    assert math.isfinite(float(minillm(student, teacher, labels, mask, old_logps=old_logps, advantages=advantages,
                                       reduction="sum")))
