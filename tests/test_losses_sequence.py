"""Sequence log-probs, preference losses, ADPA, DCKD and the fused path vs float64 references."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from kdbench.errors import ConfigError, DataError
from kdbench.losses import (
    DIVERGENCES,
    SparseTeacher,
    adpa,
    cpo,
    cross_entropy,
    dadpo,
    dckd,
    dpkd,
    dpo,
    fkl,
    fused_token_loss,
    ipo,
    sequence_logps,
    simpo,
    token_logps,
)


def logits_labels(B=3, T=6, V=11, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(B, T, V, generator=g, dtype=torch.float64) * 2).to(dtype)
    labels = torch.randint(0, V, (B, T), generator=g)
    mask = torch.rand(B, T, generator=g) > 0.3
    mask[:, 0] = True
    return logits, labels, mask


def pairs(B=5, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [-(torch.rand(B, generator=g, dtype=torch.float64) * 30 + 1) for _ in range(6)]


# ------------------------------------------------------------------ log-probs


def test_token_and_sequence_logps_match_reference():
    logits, labels, mask = logits_labels()
    want_tokens = torch.log_softmax(logits, -1).gather(-1, labels.unsqueeze(-1)).squeeze(-1) * mask
    torch.testing.assert_close(token_logps(logits, labels, mask, chunk_rows=4), want_tokens)
    torch.testing.assert_close(sequence_logps(logits, labels, mask), want_tokens.sum(-1))
    # labels -100 mark uncounted positions when no mask is given
    masked_labels = labels.masked_fill(~mask, -100)
    torch.testing.assert_close(sequence_logps(logits, masked_labels), want_tokens.sum(-1))


def test_sequence_logps_gradcheck_and_padding():
    logits, labels, mask = logits_labels(B=2, T=3, V=5)
    logits.requires_grad_()
    assert torch.autograd.gradcheck(lambda x: sequence_logps(x, labels, mask, chunk_rows=2), (logits,))
    padded = logits.detach().clone()
    padded[~mask] = float("nan")
    torch.testing.assert_close(sequence_logps(padded, labels, mask), sequence_logps(logits.detach(), labels, mask))


def test_cross_entropy_matches_torch():
    logits, labels, mask = logits_labels()
    want = F.cross_entropy(logits.reshape(-1, 11), labels.masked_fill(~mask, -100).reshape(-1))
    torch.testing.assert_close(cross_entropy(logits, labels, mask), want)


def test_counted_label_out_of_range_is_an_error():
    logits, labels, mask = logits_labels()
    labels[0, 0] = -100
    with pytest.raises(DataError):
        sequence_logps(logits, labels, mask)


# ------------------------------------------------------------------ preference losses


def sig(x):
    return -torch.log(torch.sigmoid(x))


def test_preference_losses_match_formulas():
    pc, pr, rc, rr, tc, tr = pairs()
    lc = torch.tensor([3.0, 5, 7, 2, 9], dtype=torch.float64)
    lr = torch.tensor([4.0, 1, 6, 8, 2], dtype=torch.float64)
    torch.testing.assert_close(dpo(pc, pr, rc, rr, beta=0.1, reduction="none"), sig(0.1 * ((pc - rc) - (pr - rr))))
    torch.testing.assert_close(ipo(pc, pr, rc, rr, tau=0.5, reduction="none"), ((pc - rc) - (pr - rr) - 1.0) ** 2)
    torch.testing.assert_close(ipo(pc, pr, rc, rr, tau=0.5, chosen_lengths=lc, rejected_lengths=lr, reduction="none"),
                               ((pc - rc) / lc - (pr - rr) / lr - 1.0) ** 2)
    torch.testing.assert_close(simpo(pc, pr, lc, lr, beta=2.0, gamma=0.5, reduction="none"),
                               sig(2.0 * pc / lc - 2.0 * pr / lr - 0.5))
    torch.testing.assert_close(cpo(pc, pr, lc, beta=0.1, reduction="none"), sig(0.1 * (pc - pr)) - pc / lc)
    torch.testing.assert_close(cpo(pc, pr, lc, beta=0.1, nll="sequence_sum", reduction="none"), sig(0.1 * (pc - pr)) - pc)
    torch.testing.assert_close(dpkd(pc, pr, tc, tr, lc, lr, beta=0.1, reduction="none"),
                               sig(0.1 * (pc - tc) / lc - 0.1 * (pr - tr) / lr))
    torch.testing.assert_close(dadpo(pc, pr, rc, rr, tc, tr, beta1=0.1, beta2=0.3, reduction="none"),
                               sig(0.1 * ((pc - rc) - (pr - rr)) + 0.3 * ((pc - tc) - (pr - tr))))
    torch.testing.assert_close(dpo(pc, pr, rc, rr, beta=0.1), sig(0.1 * ((pc - rc) - (pr - rr))).mean())
    from kdbench.train import recipe_schema  # noqa: F401 - every built-in form registered, whatever ran before
    from kdbench.train.preference_forms import PREFERENCE_FORMS  # the one table of preference losses by name

    assert set(PREFERENCE_FORMS) == {"dpo", "ipo", "simpo", "cpo", "dpkd", "dadpo", "wpo", "plad", "ddpo_rm", "dkto"}


def test_dadpo_and_dpkd_identities():
    pc, pr, rc, rr, tc, tr = pairs(seed=2)
    lc, lr = torch.full_like(pc, 4.0), torch.full_like(pc, 9.0)
    kw = {"reduction": "none"}
    torch.testing.assert_close(dadpo(pc, pr, rc, rr, tc, tr, beta1=0.2, beta2=0.0, **kw), dpo(pc, pr, rc, rr, beta=0.2, **kw))
    torch.testing.assert_close(dadpo(pc, pr, rc, rr, tc, tr, beta1=0.0, beta2=0.3, **kw), dpo(pc, pr, tc, tr, beta=0.3, **kw))
    delta_te = (tc - rc) - (tr - rr)
    torch.testing.assert_close(dadpo(rc, rr, rc, rr, tc, tr, beta1=0.1, beta2=0.4, **kw),
                               -F.logsigmoid(-0.4 * delta_te))
    torch.testing.assert_close(dpkd(pc, pr, tc, tr, lc, lr, beta=0.1, length_normalize=False, **kw),
                               dpo(pc, pr, tc, tr, beta=0.1, **kw))


@pytest.mark.parametrize("name", ["dpo", "ipo", "simpo", "cpo", "dpkd", "dadpo"])
def test_preference_gradcheck(name):
    pc, pr, rc, rr, tc, tr = [x.requires_grad_() for x in pairs(B=3, seed=3)]
    lc, lr = torch.tensor([2.0, 3, 4], dtype=torch.float64), torch.tensor([5.0, 1, 2], dtype=torch.float64)
    calls = {
        "dpo": lambda a, b, c, d: dpo(a, b, c, d, beta=0.1),
        "ipo": lambda a, b, c, d: ipo(a, b, c, d, tau=0.2, chosen_lengths=lc, rejected_lengths=lr),
        "simpo": lambda a, b, c, d: simpo(a, b, lc, lr, beta=2.0, gamma=1.0),
        "cpo": lambda a, b, c, d: cpo(a, b, lc, beta=0.1),
        "dpkd": lambda a, b, c, d: dpkd(a, b, c, d, lc, lr, beta=0.1),
        "dadpo": lambda a, b, c, d: dadpo(a, b, c, d, tc, tr, beta1=0.1, beta2=0.2),
    }
    assert torch.autograd.gradcheck(calls[name], (pc, pr, rc, rr))


def test_preference_errors():
    pc, pr, rc, rr, _, _ = pairs()
    with pytest.raises(ConfigError):
        dpo(pc, pr, rc, rr, beta=0.1, reduction="sum")
    with pytest.raises(DataError):
        simpo(pc, pr, torch.zeros_like(pc), torch.ones_like(pc), beta=1.0, gamma=0.0)
    with pytest.raises(ConfigError):
        ipo(pc, pr, rc, rr, tau=0.1, chosen_lengths=torch.ones_like(pc))


# ------------------------------------------------------------------ ADPA and DCKD


def adpa_reference(s, d, r, mask):
    q = torch.softmax(s, -1)
    per = -(q * (torch.log_softmax(d, -1) - torch.log_softmax(r, -1))).sum(-1)
    return (per * mask).sum() / mask.sum()


def test_adpa_dense_matches_reference_and_gradcheck():
    s, _, mask = logits_labels(seed=4)
    d, _, _ = logits_labels(seed=5)
    r, _, _ = logits_labels(seed=6)
    torch.testing.assert_close(adpa(s, d, r, mask, chunk_rows=4), adpa_reference(s, d, r, mask))
    per = adpa(s, d, r, mask, reduction="none")
    torch.testing.assert_close(adpa(s, d, r, mask, reduction="sum"), per.sum())
    small = [x[:2, :3, :5].clone().requires_grad_() for x in (s, d, r)]
    assert torch.autograd.gradcheck(lambda a, b, c: adpa(a, b, c, mask[:2, :3], reduction="none"), small)


@pytest.mark.parametrize("missing_ref", ["ref_lowest", "dpo_lowest"])
def test_adpa_top_k_matches_loop_reference(missing_ref):
    s, _, mask = logits_labels(B=2, T=3, V=9, seed=7)
    d, _, _ = logits_labels(B=2, T=3, V=9, seed=8)
    r, _, _ = logits_labels(B=2, T=3, V=9, seed=9)
    k = 3
    got = adpa(s, d, r, mask, top_k=k, missing_ref=missing_ref, reduction="none")
    via_sparse = adpa(s, SparseTeacher.from_logits(d, k), SparseTeacher.from_logits(r, k), mask,
                      missing_ref=missing_ref, reduction="none")
    torch.testing.assert_close(got, via_sparse)
    q, lpd, lpr = torch.softmax(s, -1), torch.log_softmax(d, -1), torch.log_softmax(r, -1)
    for b in range(2):
        for t in range(3):
            if not mask[b, t]:
                assert got[b, t] == 0
                continue
            top_d = lpd[b, t].topk(k).indices.tolist()
            top_r = lpr[b, t].topk(k).indices.tolist()
            lowest = min(lpr[b, t, i] for i in top_r) if missing_ref == "ref_lowest" else min(lpd[b, t, i] for i in top_d)
            want = -sum(q[b, t, a] * (lpd[b, t, a] - (lpr[b, t, a] if a in top_r else lowest)) for a in top_d)
            assert abs(float(got[b, t]) - float(want)) < 1e-10


def test_adpa_with_full_top_k_is_dense():
    s, _, mask = logits_labels(seed=10)
    d, _, _ = logits_labels(seed=11)
    r, _, _ = logits_labels(seed=12)
    torch.testing.assert_close(adpa(s, d, r, mask, top_k=11), adpa(s, d, r, mask))


def test_dckd_is_ce_plus_alpha_fkl_on_both():
    sc, labels, mc = logits_labels(seed=13)
    tc, _, _ = logits_labels(seed=14)
    sr, _, mr = logits_labels(seed=15)
    tr, _, _ = logits_labels(seed=16)
    got = dckd(sc, tc, labels, mc, sr, tr, mr, alpha=0.2)
    want = cross_entropy(sc, labels, mc) + 0.2 * (fkl(sc, tc, mc) + fkl(sr, tr, mr))
    torch.testing.assert_close(got, want)
    summed = dckd(sc, tc, labels, mc, sr, tr, mr, alpha=0.2, kl_reduction="sequence_sum")
    want_sum = cross_entropy(sc, labels, mc) + 0.2 * (fkl(sc, tc, mc, reduction="sum") / 3
                                                      + fkl(sr, tr, mr, reduction="sum") / 3)
    torch.testing.assert_close(summed, want_sum)
    top50 = dckd(sc, SparseTeacher.from_logits(tc, 11), labels, mc, sr, SparseTeacher.from_logits(tr, 11), mr)
    torch.testing.assert_close(top50, got)


# ------------------------------------------------------------------ fused path


def fused_inputs(B=2, T=5, H=7, Ht=4, V=13, seed=17, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    make = lambda *shape: torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype)  # noqa: E731
    mask = torch.rand(B, T, generator=g) > 0.3
    mask[0, 0] = True
    labels = torch.randint(0, V, (B, T), generator=g)
    return make(B, T, H), make(V, H), make(V), make(B, T, Ht), make(V, Ht), mask, labels


@pytest.mark.parametrize("name", list(DIVERGENCES))
def test_fused_equals_logits_path(name):
    hs, ws, bs, ht, wt, mask, labels = fused_inputs()
    params = {"jsd": {"beta": 0.3}}.get(name, {})
    leaves1 = [x.clone().requires_grad_() for x in (hs, ws, bs)]
    got = fused_token_loss(leaves1[0], leaves1[1], ht, wt, mask, student_bias=leaves1[2], divergence=name,
                           temperature=1.5, labels=labels, ce_weight=0.4, divergence_weight=0.6, chunk_rows=3,
                           **params)
    got.backward()
    leaves2 = [x.clone().requires_grad_() for x in (hs, ws, bs)]
    student_logits = leaves2[0] @ leaves2[1].T + leaves2[2]
    want = 0.6 * DIVERGENCES[name](student_logits, ht @ wt.T, mask, temperature=1.5, **params) \
        + 0.4 * cross_entropy(student_logits, labels, mask)
    want.backward()
    torch.testing.assert_close(got, want)
    for a, b in zip(leaves1, leaves2):
        torch.testing.assert_close(a.grad, b.grad)


def test_fused_gradcheck_and_sum_reduction():
    hs, ws, bs, ht, wt, mask, labels = fused_inputs(B=1, T=3, H=3, Ht=2, V=5)
    leaves = [x.requires_grad_() for x in (hs, ws, bs)]
    assert torch.autograd.gradcheck(
        lambda h, w, b: fused_token_loss(h, w, ht, wt, mask, student_bias=b, divergence="jsd", chunk_rows=2,
                                         reduction="sum"), leaves)
    per_mean = fused_token_loss(hs, ws, ht, wt, mask, student_bias=bs, reduction="mean")
    per_sum = fused_token_loss(hs, ws, ht, wt, mask, student_bias=bs, reduction="sum")
    torch.testing.assert_close(per_mean * mask.sum(), per_sum)


def test_fused_bf16_matches_logits_path():
    hs, ws, _, ht, wt, mask, labels = fused_inputs(H=16, Ht=16, V=40, dtype=torch.bfloat16)
    h1, w1 = hs.clone().requires_grad_(), ws.clone().requires_grad_()
    got = fused_token_loss(h1, w1, ht, wt, mask, divergence="fkl", chunk_rows=4)
    got.backward()
    h2, w2 = hs.clone().requires_grad_(), ws.clone().requires_grad_()
    want = fkl(h2 @ w2.T, ht @ wt.T, mask)
    want.backward()
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert h1.grad.dtype == torch.bfloat16 and w1.grad.dtype == torch.bfloat16
    torch.testing.assert_close(h1.grad.float(), h2.grad.float(), atol=2e-3, rtol=2e-2)
    torch.testing.assert_close(w1.grad.float(), w2.grad.float(), atol=2e-3, rtol=2e-2)


def test_fused_errors():
    hs, ws, bs, ht, wt, mask, labels = fused_inputs()
    with pytest.raises(DataError, match="vocabulary"):
        fused_token_loss(hs, ws, ht, wt[:-1], mask)
    with pytest.raises(ConfigError):
        fused_token_loss(hs, ws, ht, wt, mask, divergence="kl")
    with pytest.raises(ConfigError):
        fused_token_loss(hs, ws, ht, wt, mask, divergence="fkl", beta=0.5)
    with pytest.raises(ConfigError):
        fused_token_loss(hs, ws, ht, wt, mask, reduction="none")


@pytest.mark.parametrize("name", ["fkl", "tvd"])  # closed-form gradient, and autograd per sub-chunk
def test_fused_tiling_does_not_change_the_result(name, monkeypatch):
    """Row blocks, loss-math sub-chunks and weight-gradient vocabulary blocks all smaller than the
    input (each several pieces, uneven): same loss and gradients as the logits path, float64 and bf16."""
    import kdbench.losses.fused as fused_module

    monkeypatch.setattr(fused_module, "MATH_ELEMENTS", 2 * 13)  # 2 rows per sub-chunk at V=13
    monkeypatch.setattr(fused_module, "ACCUMULATOR_BLOCK_BYTES", 4 * 7 * 8)  # 4 vocabulary rows per block
    assert len(fused_module._vocab_blocks(13, 7, 8)) == 4
    hs, ws, bs, ht, wt, mask, labels = fused_inputs(B=3, T=6)
    leaves1 = [x.clone().requires_grad_() for x in (hs, ws, bs)]
    got = fused_token_loss(leaves1[0], leaves1[1], ht, wt, mask, student_bias=leaves1[2], divergence=name,
                           temperature=1.3, labels=labels, ce_weight=0.5, chunk_rows=5)
    got.backward()
    leaves2 = [x.clone().requires_grad_() for x in (hs, ws, bs)]
    student_logits = leaves2[0] @ leaves2[1].T + leaves2[2]
    want = DIVERGENCES[name](student_logits, ht @ wt.T, mask, temperature=1.3) \
        + 0.5 * cross_entropy(student_logits, labels, mask)
    want.backward()
    torch.testing.assert_close(got, want)
    for a, b in zip(leaves1, leaves2):
        torch.testing.assert_close(a.grad, b.grad)
    # bf16 weights: the weight gradient is accumulated over 3 row blocks in float32 and rounded once
    monkeypatch.setattr(fused_module, "ACCUMULATOR_BLOCK_BYTES", 4 * 16 * 4)
    hs, ws, _, ht, wt, mask, _ = fused_inputs(B=3, T=6, H=16, Ht=16, V=40, dtype=torch.bfloat16)
    h1, w1 = hs.clone().requires_grad_(), ws.clone().requires_grad_()
    got = fused_token_loss(h1, w1, ht, wt, mask, divergence=name, chunk_rows=4)
    got.backward()
    h2, w2 = hs.clone().requires_grad_(), ws.clone().requires_grad_()
    want = DIVERGENCES[name](h2 @ w2.T, ht @ wt.T, mask)
    want.backward()
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert w1.grad.dtype == torch.bfloat16
    torch.testing.assert_close(h1.grad.float(), h2.grad.float(), atol=2e-3, rtol=2e-2)
    torch.testing.assert_close(w1.grad.float(), w2.grad.float(), atol=2e-3, rtol=2e-2)
