"""DistiLLM-2's contrastive loss and curriculum vs float64 references computed in probability space."""

from __future__ import annotations

import pytest
import torch

from kdbench.errors import ConfigError, DataError
from kdbench.losses import distillm2, distillm2_adaptive_alpha, distillm2_beta, response_mean_logps, skl, srkl


def pair_batch(B=3, T1=5, T2=4, V=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    make = lambda T: torch.randn(B, T, V, generator=g, dtype=torch.float64) * 2  # noqa: E731
    teacher_mask = torch.rand(B, T1, generator=g) > 0.3
    teacher_mask[:, 0] = True
    student_mask = torch.rand(B, T2, generator=g) > 0.3
    student_mask[:, 0] = True
    student_mask[min(1, B - 1)] = False  # one student response without counted tokens
    return make(T1), make(T1), teacher_mask, make(T2), make(T2), student_mask


def reference(s_t, t_t, m_t, s_s, t_s, m_s, a1, a2, beta, tau, detach=False):
    """(2 − β)·mean_t KL(p ‖ a1 p + (1 − a1) q) on y_t + β·mean_t KL(q ‖ (1 − a2) p + a2 q) on y_s, per pair."""
    out = []
    for b in range(s_t.shape[0]):
        alpha1 = float(a1[b]) if torch.is_tensor(a1) else a1
        alpha2 = float(a2[b]) if torch.is_tensor(a2) else a2
        p, q = torch.softmax(t_t[b] / tau, -1), torch.softmax(s_t[b] / tau, -1)
        pull = (p * torch.log(p / (alpha1 * p + (1 - alpha1) * q))).sum(-1)
        pull = (pull * m_t[b]).sum() / max(int(m_t[b].sum()), 1)
        p, q = torch.softmax(t_s[b] / tau, -1), torch.softmax(s_s[b] / tau, -1)
        q_mix = q.detach() if detach else q
        push = (q * torch.log(q / ((1 - alpha2) * p + alpha2 * q_mix))).sum(-1)
        push = (push * m_s[b]).sum() / max(int(m_s[b].sum()), 1)
        out.append((2 - beta) * pull + beta * push)
    return torch.stack(out)


@pytest.mark.parametrize("beta", [1.0, 1.5])
@pytest.mark.parametrize("tau", [1.0, 2.0])
@pytest.mark.parametrize("detach", [False, True])
def test_distillm2_matches_reference_value_and_gradient(beta, tau, detach):
    s_t, t_t, m_t, s_s, t_s, m_s = pair_batch()
    s_t.requires_grad_()
    s_s.requires_grad_()
    got = distillm2(s_t, t_t, m_t, s_s, t_s, m_s, alpha_teacher=0.1, alpha_student=0.2, beta=beta, temperature=tau,
                    detach_student_in_mixture=detach)
    want = reference(s_t, t_t, m_t, s_s, t_s, m_s, 0.1, 0.2, beta, tau, detach).mean()
    torch.testing.assert_close(got, want)
    got_grads = torch.autograd.grad(got, (s_t, s_s))
    want_grads = torch.autograd.grad(want, (s_t, s_s))
    for a, b in zip(got_grads, want_grads):
        torch.testing.assert_close(a, b)
    assert bool((got_grads[1][1] == 0).all())  # the empty student response contributes nothing


def test_distillm2_per_pair_alphas_and_none_reduction():
    s_t, t_t, m_t, s_s, t_s, m_s = pair_batch(seed=1)
    a1 = torch.tensor([0.1, 0.05, 0.02], dtype=torch.float64)
    a2 = torch.tensor([0.01, 0.1, 0.07], dtype=torch.float64)
    got = distillm2(s_t, t_t, m_t, s_s, t_s, m_s, alpha_teacher=a1, alpha_student=a2, reduction="none")
    torch.testing.assert_close(got, reference(s_t, t_t, m_t, s_s, t_s, m_s, a1, a2, 1.0, 1.0))


def test_distillm2_halves_are_the_library_skew_divergences():
    """With one response each and β = 1 the two halves are the first tier's skl and srkl token means."""
    s_t, t_t, m_t, s_s, t_s, m_s = pair_batch(B=1, seed=2)
    m_s[:] = True
    got = distillm2(s_t, t_t, m_t, s_s, t_s, m_s, response_reduction="token_mean")
    want = skl(s_t, t_t, m_t, alpha=0.1) + srkl(s_s, t_s, m_s, alpha=0.1)
    torch.testing.assert_close(got, want)


def test_distillm2_padding_cannot_leak_and_errors():
    s_t, t_t, m_t, s_s, t_s, m_s = pair_batch(seed=3)
    base = distillm2(s_t, t_t, m_t, s_s, t_s, m_s)
    for x, m in ((s_t, m_t), (t_t, m_t), (s_s, m_s), (t_s, m_s)):
        x[~m] = float("nan")
    torch.testing.assert_close(distillm2(s_t, t_t, m_t, s_s, t_s, m_s), base)
    with pytest.raises(ConfigError):
        distillm2(s_t, t_t, m_t, s_s, t_s, m_s, alpha_teacher=0.0)
    with pytest.raises(ConfigError):
        distillm2(s_t, t_t, m_t, s_s, t_s, m_s, beta=2.5)
    with pytest.raises(DataError):
        distillm2(s_t, t_t[..., :-1], m_t, s_s, t_s, m_s)
    with pytest.raises(DataError):
        distillm2(s_t, t_t, m_t, s_s[:2], t_s[:2], m_s[:2])


def test_beta_curriculum():
    assert distillm2_beta(0.7) == 1.0
    assert distillm2_beta(0.0, schedule="gradual") == 1.0
    assert distillm2_beta(0.25, schedule="gradual") == pytest.approx(1.25)
    assert distillm2_beta(0.5, schedule="gradual") == pytest.approx(1.5)
    assert distillm2_beta(0.9, schedule="gradual") == pytest.approx(1.5)
    with pytest.raises(ConfigError):
        distillm2_beta(1.2)


def test_adaptive_alpha_starts_at_base_and_shrinks_as_the_gap_closes():
    teacher_mean = torch.log(torch.tensor([0.6, 0.6, 0.6], dtype=torch.float64))
    student_start = torch.log(torch.tensor([0.2, 0.4, 0.1], dtype=torch.float64))
    initial_gap = teacher_mean.exp() - student_start.exp()
    at_start = distillm2_adaptive_alpha(teacher_mean, student_start, initial_gap)
    torch.testing.assert_close(at_start, torch.full((3,), 0.1, dtype=torch.float64), atol=1e-4, rtol=0)
    student_later = torch.log(torch.tensor([0.4, 0.55, 0.59], dtype=torch.float64))
    later = distillm2_adaptive_alpha(teacher_mean, student_later, initial_gap)
    gap = teacher_mean.exp() - student_later.exp()
    want = (1 - 0.9 * initial_gap / (gap + 1e-5)).clamp(0.01, 0.1)
    torch.testing.assert_close(later, want)
    assert bool((later < 0.1).all()) and float(later[2]) == pytest.approx(0.01)
    logps = torch.tensor([[-1.0, -3.0, 0.0]], dtype=torch.float64)
    torch.testing.assert_close(response_mean_logps(logps, torch.tensor([[1, 1, 0]])),
                               torch.tensor([-2.0], dtype=torch.float64))
