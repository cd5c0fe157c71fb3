"""Second-tier losses (WPO, PLaD, DDPO-RM, dKTO, ATKD, Q-KD) against independent float64 references."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from kdbench.errors import ConfigError, DataError
from kdbench.losses import (SparseTeacher, atkd, atkd_threshold, atkd_uncertainty, ddpo_rm, dkto, dpo,
                            kto_reference_point, mismatched_order, plad, q_argmax_kd, q_kd_term, q_softmax_kd, wpo,
                            wpo_log_weight)


def logits_labels(B=3, T=6, V=11, seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(B, T, V, generator=g, dtype=torch.float64) * 2
    labels = torch.randint(0, V, (B, T), generator=g)
    mask = torch.rand(B, T, generator=g) > 0.3
    mask[:, 0] = True
    return logits, labels, mask


def seq_logps(B=5, seed=1, n=6):
    g = torch.Generator().manual_seed(seed)
    return [-(torch.rand(B, generator=g, dtype=torch.float64) * 30 + 1) for _ in range(n)]


def grads(fn, *inputs):
    leaves = [x.detach().clone().requires_grad_() for x in inputs]
    fn(*leaves).backward()
    return [leaf.grad for leaf in leaves]


# ------------------------------------------------------------------ WPO


def ref_wpo_log_weight(logits, labels, mask):
    out = []
    for b in range(logits.shape[0]):
        terms = []
        for t in range(logits.shape[1]):
            if mask[b, t]:
                probs = torch.softmax(logits[b, t], -1)
                terms.append(math.log(probs[labels[b, t]]) - math.log(float((probs ** 2).sum())))
        out.append(sum(terms) / len(terms))
    return torch.tensor(out, dtype=torch.float64)


def test_wpo_weight_and_loss_match_reference():
    logits, labels, mask = logits_labels(B=4, seed=2)
    got_w = wpo_log_weight(logits, labels, mask, chunk_rows=3)
    torch.testing.assert_close(got_w, ref_wpo_log_weight(logits, labels, mask))
    assert not got_w.requires_grad and bool((got_w <= 0).all())  # w(y) ≤ 0 unless y beats sampling itself
    padded = logits.clone()
    padded[~mask] = float("nan")
    torch.testing.assert_close(wpo_log_weight(padded, labels, mask), got_w)

    pc, pr, rc, rr = seq_logps(B=4, seed=3, n=4)
    wc, wr = got_w, got_w.flip(0) + 0.3
    weight = torch.tensor([min(math.exp(a + b), 1.0) for a, b in zip(wc.tolist(), wr.tolist())], dtype=torch.float64)

    def reference(pc, pr, rc, rr):
        return (weight * -F.logsigmoid(0.1 * ((pc - rc) - (pr - rr)))).mean()

    def got(pc, pr, rc, rr):
        return wpo(pc, pr, rc, rr, wc, wr, beta=0.1)

    torch.testing.assert_close(got(pc, pr, rc, rr), reference(pc, pr, rc, rr))
    for a, b in zip(grads(got, pc, pr, rc, rr), grads(reference, pc, pr, rc, rr)):
        torch.testing.assert_close(a, b)
    # the weight is a stop-gradient: no gradient reaches the log-weights
    wc_leaf = wc.clone().requires_grad_()
    wpo(pc.clone().requires_grad_(), pr, rc, rr, wc_leaf, wr, beta=0.1).backward()
    assert wc_leaf.grad is None


def test_wpo_with_unit_weights_is_dpo():
    pc, pr, rc, rr = seq_logps(seed=4, n=4)
    zero = torch.zeros_like(pc)
    kw = {"beta": 0.2, "reduction": "none"}
    torch.testing.assert_close(wpo(pc, pr, rc, rr, zero, zero, **kw), dpo(pc, pr, rc, rr, **kw))
    torch.testing.assert_close(wpo(pc, pr, rc, rr, zero + 2, zero + 1, **kw), dpo(pc, pr, rc, rr, **kw))  # clamp at 1


def test_wpo_weight_of_an_all_masked_row_is_an_error():
    logits, labels, mask = logits_labels(seed=5)
    mask[1] = False
    with pytest.raises(DataError):
        wpo_log_weight(logits, labels, mask)


# ------------------------------------------------------------------ PLaD and DDPO-RM


def test_plad_matches_hinge_and_its_gradient():
    pc, pr = seq_logps(B=6, seed=6, n=2)
    lc = torch.tensor([3.0, 5, 7, 2, 9, 4], dtype=torch.float64)
    lr = torch.tensor([4.0, 1, 6, 8, 2, 3], dtype=torch.float64)
    want = [max(0.0, 1.5 - a / la + b / lb) for a, b, la, lb in zip(pc.tolist(), pr.tolist(), lc.tolist(), lr.tolist())]
    got = plad(pc, pr, lc, lr, margin=1.5, reduction="none")
    torch.testing.assert_close(got, torch.tensor(want, dtype=torch.float64))
    assert 0 < sum(v > 0 for v in want) < 6  # both sides of the hinge are exercised
    gc, gr = grads(lambda a, b: plad(a, b, lc, lr, margin=1.5, reduction="none").sum(), pc, pr)
    active = torch.tensor([v > 0 for v in want], dtype=torch.float64)
    torch.testing.assert_close(gc, -active / lc)
    torch.testing.assert_close(gr, active / lr)
    summed = plad(pc, pr, lc, lr, margin=0.0, length_normalize=False, reduction="none")
    torch.testing.assert_close(summed, (pr - pc).clamp(min=0))


def test_ddpo_rm_matches_square_and_its_gradient():
    pc, pr, rc, rr, sc, sr = seq_logps(seed=7)
    beta = 0.3
    h = (pc - rc) - (pr - rr)
    torch.testing.assert_close(ddpo_rm(pc, pr, rc, rr, sc, sr, beta=beta, reduction="none"),
                               (beta * h - (sc - sr)) ** 2)
    gc, gr = grads(lambda a, b: ddpo_rm(a, b, rc, rr, sc, sr, beta=beta, reduction="none").sum(), pc, pr)
    torch.testing.assert_close(gc, 2 * beta * (beta * h - (sc - sr)))
    torch.testing.assert_close(gr, -2 * beta * (beta * h - (sc - sr)))
    # zero exactly when the implicit reward margin equals the reward model's
    exact = ddpo_rm(pc, pr, rc, rr, beta * h, torch.zeros_like(h), beta=beta)
    torch.testing.assert_close(exact, torch.tensor(0.0, dtype=torch.float64))


# ------------------------------------------------------------------ dKTO


def test_dkto_with_zero_reference_point_by_hand():
    policy = torch.tensor([-10.0, -20.0, -5.0], dtype=torch.float64)
    ref = torch.tensor([-11.0, -19.5, -5.0], dtype=torch.float64)  # r = 1.0, -0.5, 0.0
    desirable = torch.tensor([True, False, False])
    got = dkto(policy, ref, desirable, beta=0.5, reference_point=0.0, desirable_weight=1.0, undesirable_weight=1.5,
               reduction="none")

    def sig(x):
        return 1 / (1 + math.exp(-x))

    want = [1 - sig(0.5), 1.5 - 1.5 * sig(0.25), 1.5 - 1.5 * 0.5]
    torch.testing.assert_close(got, torch.tensor(want, dtype=torch.float64))
    (g,) = grads(lambda p: dkto(p, ref, desirable, beta=0.5, reference_point=0.0, undesirable_weight=1.5,
                                reduction="none").sum(), policy)
    want_g = [-0.5 * sig(0.5) * (1 - sig(0.5)), 1.5 * 0.5 * sig(0.25) * (1 - sig(0.25)), 1.5 * 0.5 * 0.25]
    torch.testing.assert_close(g, torch.tensor(want_g, dtype=torch.float64))


def test_dkto_reference_point_is_detached_clamped_and_pooled_over_the_step():
    policy, ref = seq_logps(B=8, seed=8, n=2)
    z_all = kto_reference_point(policy, ref)
    assert not z_all.requires_grad
    torch.testing.assert_close(z_all, (policy - ref).mean().clamp(min=0))
    assert float(kto_reference_point(ref - 1.0, ref)) == 0.0  # negative estimates clamp to 0
    order = mismatched_order(4)
    assert order.tolist() == [1, 2, 3, 0]
    with pytest.raises(DataError):
        mismatched_order(1)
    z0 = torch.tensor(0.7, dtype=torch.float64)
    desirable = torch.tensor([True, False] * 4)
    leaf = policy.clone().requires_grad_()
    dkto(leaf, ref, desirable, beta=0.1, reference_point=z0.clone().requires_grad_()).backward()
    r = (policy - ref)
    sig = torch.sigmoid
    want = torch.where(desirable, -0.1 * sig(0.1 * (r - z0)) * (1 - sig(0.1 * (r - z0))),
                       0.1 * sig(0.1 * (z0 - r)) * (1 - sig(0.1 * (z0 - r)))) / 8
    torch.testing.assert_close(leaf.grad, want)


# ------------------------------------------------------------------ ATKD


def ref_atkd_parts(student, teacher, labels, mask, tau):
    """Per counted position: (u_t, NCKD, TCKD) by explicit formulas, in float64 (differentiable in student)."""
    out = []
    for b in range(student.shape[0]):
        for t in range(student.shape[1]):
            if not mask[b, t]:
                continue
            p = torch.softmax(teacher[b, t] / tau, -1)
            q = torch.softmax(student[b, t] / tau, -1)
            y = int(labels[b, t])
            others = [v for v in range(p.shape[0]) if v != y]
            p_rest, q_rest = 1 - p[y], 1 - q[y]
            tckd = p[y] * torch.log(p[y] / q[y]) + p_rest * torch.log(p_rest / q_rest)
            nckd = sum((p[v] / p_rest) * torch.log((p[v] / p_rest) / (q[v] / q_rest)) for v in others)
            out.append((float(1 - torch.softmax(teacher[b, t], -1)[y]) if tau == 1 else float(1 - p[y]), nckd, tckd))
    return out


def ref_atkd(student, teacher, labels, mask, alpha, tau, threshold=None):
    parts = ref_atkd_parts(student, teacher, labels, mask, tau)
    u = sorted(p[0] for p in parts)
    threshold = u[(len(u) - 1) // 2] if threshold is None else threshold  # the lower median
    easy = [n for (uu, n, _) in parts if uu <= threshold]
    hard = [n + tk for (uu, n, tk) in parts if uu > threshold]
    return alpha * sum(easy) / max(len(easy), 1) + (1 - alpha) * sum(hard) / max(len(hard), 1)


@pytest.mark.parametrize("tau", [1.0, 2.0])
def test_atkd_matches_reference_value_and_gradient(tau):
    student, labels, mask = logits_labels(seed=9)
    teacher, _, _ = logits_labels(seed=10)
    got = atkd(student, teacher, labels, mask, alpha=0.3, temperature=tau, chunk_rows=4)
    torch.testing.assert_close(got, ref_atkd(student, teacher, labels, mask, 0.3, tau))
    g_got, = grads(lambda s: atkd(s, teacher, labels, mask, alpha=0.3, temperature=tau), student)
    g_want, = grads(lambda s: ref_atkd(s, teacher, labels, mask, 0.3, tau), student)
    torch.testing.assert_close(g_got, g_want)


def test_atkd_uncertainty_split_and_padding():
    student, labels, mask = logits_labels(seed=11)
    teacher, _, _ = logits_labels(seed=12)
    u = atkd_uncertainty(teacher, labels, mask)
    want = 1 - torch.softmax(teacher, -1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    torch.testing.assert_close(u[mask], want[mask])
    assert bool(torch.isnan(u[~mask]).all())
    counted = sorted(want[mask].tolist())
    assert float(atkd_threshold(u)) == counted[(len(counted) - 1) // 2]
    padded_s, padded_t = student.clone(), teacher.clone()
    padded_s[~mask] = float("nan")
    padded_t[~mask] = float("nan")
    torch.testing.assert_close(atkd(padded_s, padded_t, labels, mask), atkd(student, teacher, labels, mask))
    # labels −100 mark the uncounted positions when no mask is given
    torch.testing.assert_close(atkd(student, teacher, labels.masked_fill(~mask, -100)),
                               atkd(student, teacher, labels, mask))


def test_atkd_split_over_the_step_does_not_depend_on_accumulation():
    student, labels, mask = logits_labels(B=4, T=7, seed=13)
    teacher, _, _ = logits_labels(B=4, T=7, seed=14)
    halves = [slice(0, 2), slice(2, 4)]
    threshold = atkd_threshold(*[atkd_uncertainty(teacher[h], labels[h], mask[h]) for h in halves])
    torch.testing.assert_close(threshold, atkd_threshold(atkd_uncertainty(teacher, labels, mask)))
    whole = atkd(student, teacher, labels, mask, alpha=0.3, reduction="none")
    split = torch.cat([atkd(student[h], teacher[h], labels[h], mask[h], alpha=0.3, threshold=threshold,
                            reduction="none") for h in halves])
    torch.testing.assert_close(split, whole)
    # with the step's counts the micro-batch means add up to the whole step's mean
    u = atkd_uncertainty(teacher, labels, mask)
    n_hard = int((u[mask] > threshold).sum())
    n_easy = int(mask.sum()) - n_hard
    accumulated = sum(atkd(student[h], teacher[h], labels[h], mask[h], alpha=0.3, threshold=threshold,
                           easy_count=n_easy, hard_count=n_hard) for h in halves)
    torch.testing.assert_close(accumulated, atkd(student, teacher, labels, mask, alpha=0.3))
    # the local (per micro-batch) split differs: the precomputed threshold is what makes them equal
    local = torch.cat([atkd(student[h], teacher[h], labels[h], mask[h], alpha=0.3, reduction="none") for h in halves])
    assert not torch.allclose(local, whole)


def test_atkd_all_masked_and_errors():
    student, labels, mask = logits_labels(seed=15)
    teacher, _, _ = logits_labels(seed=16)
    mask[1] = False  # an all-masked row changes nothing for the others
    keep = torch.tensor([0, 2])
    threshold = atkd_threshold(atkd_uncertainty(teacher, labels, mask))
    torch.testing.assert_close(atkd(student, teacher, labels, mask, threshold=threshold, reduction="none")[keep],
                               atkd(student[keep], teacher[keep], labels[keep], mask[keep], threshold=threshold,
                                    reduction="none"))
    leaf = student.clone().requires_grad_()
    loss = atkd(leaf, teacher, labels, torch.zeros_like(mask))
    loss.backward()
    assert float(loss.detach()) == 0.0 and float(leaf.grad.abs().sum()) == 0.0
    with pytest.raises(ConfigError):
        atkd(student, SparseTeacher.from_logits(teacher, 3), labels, mask)
    with pytest.raises(ConfigError):
        atkd(student, teacher, labels, mask, alpha=1.5)
    with pytest.raises(DataError):
        atkd(student, teacher[..., :5], labels, mask)


# ------------------------------------------------------------------ Q-KD


def ref_q_term(student, dpo_logits, ref_logits, mask, beta):
    values = []
    for b in range(student.shape[0]):
        for t in range(student.shape[1]):
            if not mask[b, t]:
                continue
            log_q = torch.log_softmax(student[b, t], -1)
            adv = torch.log_softmax(dpo_logits[b, t], -1) - torch.log_softmax(ref_logits[b, t], -1)
            if beta is None:
                values.append(-log_q[int(adv.argmax())])
            else:
                target = torch.softmax(beta * adv, -1)
                values.append(sum(target[a] * (torch.log(target[a]) - log_q[a]) for a in range(len(target))))
    return sum(values) / len(values)


@pytest.mark.parametrize("beta", [None, 0.05, 3.0])
def test_q_kd_matches_reference_value_and_gradient(beta):
    sc, labels, mc = logits_labels(seed=17)
    sg, _, mg = logits_labels(B=3, T=5, seed=18)
    d, _, _ = logits_labels(B=3, T=5, seed=19)
    r, _, _ = logits_labels(B=3, T=5, seed=20)

    def got(sc, sg):
        if beta is None:
            return q_argmax_kd(sc, labels, mc, sg, d, r, mg, gamma=0.7, chunk_rows=4)
        return q_softmax_kd(sc, labels, mc, sg, d, r, mg, beta=beta, gamma=0.7, chunk_rows=4)

    def want(sc, sg):
        ce = -torch.log_softmax(sc, -1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)[mc].mean()
        return ce + 0.7 * ref_q_term(sg, d, r, mg, beta)

    torch.testing.assert_close(got(sc, sg), want(sc, sg))
    for a, b in zip(grads(got, sc, sg), grads(want, sc, sg)):
        torch.testing.assert_close(a, b)


def test_q_softmax_tends_to_q_argmax_as_beta_grows():
    s, _, mask = logits_labels(seed=21)
    d, _, _ = logits_labels(seed=22)
    r, _, _ = logits_labels(seed=23)
    argmax = q_kd_term(s, d, r, mask, reduction="none")
    gaps = [float((q_kd_term(s, d, r, mask, beta=b, reduction="none") - argmax).abs().max()) for b in (1.0, 10.0, 1e4)]
    assert gaps[0] > gaps[1] > gaps[2] and gaps[2] < 1e-8


def test_q_kd_top_k_matches_loop_and_full_k_is_dense():
    s, _, mask = logits_labels(B=2, T=3, V=9, seed=24)
    d, _, _ = logits_labels(B=2, T=3, V=9, seed=25)
    r, _, _ = logits_labels(B=2, T=3, V=9, seed=26)
    for beta in (None, 2.0):
        torch.testing.assert_close(q_kd_term(s, d, r, mask, beta=beta, top_k=9), q_kd_term(s, d, r, mask, beta=beta))
        got = q_kd_term(s, SparseTeacher.from_logits(d, 3), SparseTeacher.from_logits(r, 3), mask, beta=beta,
                        reduction="none")
        torch.testing.assert_close(got, q_kd_term(s, d, r, mask, beta=beta, top_k=3, reduction="none"))
        log_q, lpd, lpr = torch.log_softmax(s, -1), torch.log_softmax(d, -1), torch.log_softmax(r, -1)
        for b in range(2):
            for t in range(3):
                if not mask[b, t]:
                    assert got[b, t] == 0
                    continue
                top_d, top_r = lpd[b, t].topk(3).indices.tolist(), lpr[b, t].topk(3).indices.tolist()
                lowest = min(float(lpr[b, t, i]) for i in top_r)
                adv = {a: float(lpd[b, t, a]) - (float(lpr[b, t, a]) if a in top_r else lowest) for a in top_d}
                if beta is None:
                    want = -float(log_q[b, t, max(adv, key=adv.get)])
                else:
                    z = math.log(sum(math.exp(beta * v) for v in adv.values()))
                    want = sum(math.exp(beta * v - z) * (beta * v - z - float(log_q[b, t, a])) for a, v in adv.items())
                assert abs(float(got[b, t]) - want) < 1e-10


def test_q_kd_masking_and_errors():
    s, _, mask = logits_labels(seed=27)
    d, _, _ = logits_labels(seed=28)
    r, _, _ = logits_labels(seed=29)
    padded = s.clone()
    padded[~mask] = float("nan")
    torch.testing.assert_close(q_kd_term(padded, d, r, mask, beta=0.5), q_kd_term(s, d, r, mask, beta=0.5))
    leaf = s.clone().requires_grad_()
    loss = q_kd_term(leaf, d, r, torch.zeros_like(mask))
    loss.backward()
    assert float(loss.detach()) == 0.0 and float(leaf.grad.abs().sum()) == 0.0
    with pytest.raises(ConfigError):
        q_kd_term(s, d, r, mask, beta=0.0)
    with pytest.raises(ConfigError):
        q_kd_term(s, SparseTeacher.from_logits(d, 3), r, mask)
