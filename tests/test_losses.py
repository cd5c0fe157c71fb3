"""Token-level divergences of kdbench.losses against independent float64 reference computations."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from kdbench.errors import ConfigError, DataError
from kdbench.losses import DIVERGENCES, SparseTeacher, akl, akl_weights, fkl, jsd, rkl

NAMES = list(DIVERGENCES)
PARAMS = {"fkl_rkl": {"weight": 0.3}, "jsd": {"beta": 0.3}, "skl": {"alpha": 0.2}, "srkl": {"alpha": 0.2},
          "akl": {"mu": 0.5}, "akl_r": {"mu": 0.5}}


# ------------------------------------------------------------------ independent references (float64)


def ref_akl_weights(p_row: np.ndarray, q_row: np.ndarray, mu: float, head_rule: str, rest_last=False):
    """AKL weights of one row, by an explicit loop over the sorted teacher distribution."""
    order = list(np.argsort(-p_row[:-1], kind="stable")) + [len(p_row) - 1] if rest_last \
        else list(np.argsort(-p_row, kind="stable"))
    head, cumulative = set(), 0.0
    for rank, index in enumerate(order):
        if head_rule == "paper":
            if cumulative < mu:
                head.add(index)
        elif cumulative + p_row[index] <= mu or rank == 0:
            head.add(index)
        cumulative += p_row[index]
    gap = np.abs(p_row - q_row)
    g_head = sum(gap[i] for i in head)
    g_tail = gap.sum() - g_head
    return g_head / (g_head + g_tail + 1e-12), g_tail / (g_head + g_tail + 1e-12)


def ref_rows(name, p, q, params, rest_last=False):
    """Per-row divergence [n] from probabilities p, q [n, K] (no zeros), detached AKL weights."""
    def kl(a, b):
        return (a * (a.log() - b.log())).sum(-1)

    if name == "fkl":
        return kl(p, q)
    if name == "rkl":
        return kl(q, p)
    if name == "fkl_rkl":
        w = params.get("weight", 0.5)
        return w * kl(p, q) + (1 - w) * kl(q, p)
    if name == "jsd":
        b = params.get("beta", 0.5)
        m = b * p + (1 - b) * q
        return b * kl(p, m) + (1 - b) * kl(q, m)
    if name == "tvd":
        return 0.5 * (p - q).abs().sum(-1)
    if name == "skl":
        a = params.get("alpha", 0.1)
        return kl(p, a * p + (1 - a) * q)
    if name == "srkl":
        a = params.get("alpha", 0.1)
        return kl(q, (1 - a) * p + a * q)
    if name in ("akl", "akl_r"):
        weights = [ref_akl_weights(pr.detach().numpy(), qr.detach().numpy(), params.get("mu", 0.5),
                                   params.get("head_rule", "paper"), rest_last) for pr, qr in zip(p, q)]
        w_head = torch.tensor([w[0] for w in weights], dtype=p.dtype)
        w_tail = torch.tensor([w[1] for w in weights], dtype=p.dtype)
        if name == "akl_r":
            w_head, w_tail = w_tail, w_head
        return w_head * kl(p, q) + w_tail * kl(q, p)
    raise AssertionError(name)


def ref_divergence(name, s, t, mask=None, temperature=1.0, reduction="mean", **params):
    """Dense reference: softmax of logits / τ, per position, masked reduction."""
    p = torch.softmax(t.double() / temperature, -1)
    q = torch.softmax(s.double() / temperature, -1)
    per = ref_rows(name, p.reshape(-1, p.shape[-1]), q.reshape(-1, q.shape[-1]), params).reshape(s.shape[:2])
    m = torch.ones(s.shape[:2], dtype=torch.bool) if mask is None else mask.bool()
    per = torch.where(m, per, torch.zeros_like(per))
    if reduction == "none":
        return per
    if reduction == "sum":
        return per.sum()
    return per.sum() / m.sum()


def random_inputs(B=3, T=5, V=17, seed=0, scale=2.0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    s = (torch.randn(B, T, V, generator=g, dtype=torch.float64) * scale).to(dtype)
    t = (torch.randn(B, T, V, generator=g, dtype=torch.float64) * scale).to(dtype)
    mask = torch.rand(B, T, generator=g) > 0.3
    mask[0, 0] = True
    return s, t, mask


# ------------------------------------------------------------------ values and gradients


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_matches_reference(name, reduction):
    s, t, mask = random_inputs()
    params = PARAMS.get(name, {})
    got = DIVERGENCES[name](s, t, mask, temperature=1.7, reduction=reduction, chunk_rows=4, **params)
    want = ref_divergence(name, s, t, mask, temperature=1.7, reduction=reduction, **params)
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, atol=1e-9, rtol=1e-9)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("teacher_grad", [False, True])
def test_gradients_match_reference(name, teacher_grad):
    """Student gradient (closed form or chunked autograd) and teacher gradient vs plain autograd."""
    s, t, mask = random_inputs(seed=1)
    params = PARAMS.get(name, {})
    s1, t1 = s.clone().requires_grad_(), t.clone().requires_grad_(teacher_grad)
    s2, t2 = s.clone().requires_grad_(), t.clone().requires_grad_(teacher_grad)
    DIVERGENCES[name](s1, t1, mask, temperature=0.8, chunk_rows=3, **params).backward()
    ref_divergence(name, s2, t2, mask, temperature=0.8, **params).backward()
    torch.testing.assert_close(s1.grad, s2.grad, atol=1e-9, rtol=1e-7)
    if teacher_grad:
        torch.testing.assert_close(t1.grad, t2.grad, atol=1e-9, rtol=1e-7)


@pytest.mark.parametrize("name", [n for n in NAMES if n not in ("akl", "akl_r")])
def test_gradcheck(name):
    s, t, mask = random_inputs(B=2, T=3, V=6, seed=2)
    params = PARAMS.get(name, {})
    s.requires_grad_()
    t.requires_grad_()
    fn = DIVERGENCES[name]
    assert torch.autograd.gradcheck(
        lambda a, b: fn(a, b, mask, temperature=1.3, reduction="none", chunk_rows=2, **params), (s, t))
    assert torch.autograd.gradcheck(lambda a, b: fn(a, b, mask, reduction="mean", **params), (s, t))


def test_akl_gradient_is_fkl_rkl_with_frozen_weights():
    """AKL's weights are stop-gradient (gradcheck of the full function does not apply): check the
    gradient against gradcheck-verified FKL/RKL mixed with the weights held fixed."""
    s, t, mask = random_inputs(B=2, T=4, V=9, seed=3)
    w_head, w_tail = akl_weights(s, t)
    s1 = s.clone().requires_grad_()
    akl(s1, t, reduction="sum").backward()
    s2 = s.clone().requires_grad_()
    (w_head * fkl(s2, t, reduction="none") + w_tail * rkl(s2, t, reduction="none")).sum().backward()
    torch.testing.assert_close(s1.grad, s2.grad, atol=1e-12, rtol=1e-9)


def test_repeated_backward_gives_same_gradient():
    s, t, mask = random_inputs(seed=4)
    s.requires_grad_()
    loss = jsd(s, t, mask)
    (g1,) = torch.autograd.grad(loss, s, retain_graph=True)
    (g2,) = torch.autograd.grad(loss, s)
    torch.testing.assert_close(g1, g2)


# ------------------------------------------------------------------ masking and reductions


@pytest.mark.parametrize("name", NAMES)
def test_padding_never_changes_the_result(name):
    s, t, mask = random_inputs(seed=5)
    params = PARAMS.get(name, {})
    s_pad, t_pad = s.clone(), t.clone()
    s_pad[~mask] = float("nan")
    t_pad[~mask] = 1e30
    s1, s2 = s.clone().requires_grad_(), s_pad.clone().requires_grad_()
    a = DIVERGENCES[name](s1, t, mask, **params)
    b = DIVERGENCES[name](s2, t_pad, mask, **params)
    a.backward()
    b.backward()
    torch.testing.assert_close(a, b)
    torch.testing.assert_close(s1.grad, s2.grad)
    assert torch.all(s2.grad[~mask] == 0)


@pytest.mark.parametrize("name", NAMES)
def test_reduction_consistency(name):
    s, t, mask = random_inputs(seed=6)
    fn, params = DIVERGENCES[name], PARAMS.get(name, {})
    per = fn(s, t, mask, reduction="none", **params)
    assert per.shape == mask.shape and torch.all(per[~mask] == 0)
    torch.testing.assert_close(fn(s, t, mask, reduction="sum", **params), per.sum())
    torch.testing.assert_close(fn(s, t, mask, reduction="mean", **params), per.sum() / mask.sum())
    # mask=None counts everything
    torch.testing.assert_close(fn(s, t, None, **params), fn(s, t, torch.ones_like(mask), **params))


def test_sum_reduction_gradients_add_across_microbatches():
    """The trainer sums per micro-batch and divides by the step's token count: splitting a batch
    must give the same gradient as one call."""
    s, t, mask = random_inputs(B=4, seed=7)
    s_full = s.clone().requires_grad_()
    (fkl(s_full, t, mask, reduction="sum") / mask.sum()).backward()
    s_parts = s.clone().requires_grad_()
    total = fkl(s_parts[:1], t[:1], mask[:1], reduction="sum") + fkl(s_parts[1:], t[1:], mask[1:], reduction="sum")
    (total / mask.sum()).backward()
    torch.testing.assert_close(s_full.grad, s_parts.grad)


def test_empty_mask_mean_is_zero():
    s, t, mask = random_inputs()
    s.requires_grad_()
    loss = fkl(s, t, torch.zeros_like(mask))
    loss.backward()
    assert float(loss.detach()) == 0.0 and torch.all(s.grad == 0)


# ------------------------------------------------------------------ identities of METHODS.md


def test_jsd_endpoints_are_fkl_and_rkl():
    s, t, mask = random_inputs(seed=8)
    torch.testing.assert_close(jsd(s, t, mask, beta=0.0), fkl(s, t, mask))
    torch.testing.assert_close(jsd(s, t, mask, beta=1.0), rkl(s, t, mask))
    # the mixture formula itself goes to 0 at the endpoints (why the convention is needed)
    assert float(jsd(s, t, mask, beta=1e-9)) < 1e-7


def test_skew_kl_at_zero_alpha():
    s, t, mask = random_inputs(seed=9)
    torch.testing.assert_close(DIVERGENCES["skl"](s, t, mask, alpha=0.0), fkl(s, t, mask))
    torch.testing.assert_close(DIVERGENCES["srkl"](s, t, mask, alpha=0.0), rkl(s, t, mask))


def test_temperature_squared_scaling():
    s, t, mask = random_inputs(seed=10)
    torch.testing.assert_close(fkl(s, t, mask, temperature=2.0, scale_by_temperature_squared=True),
                               4.0 * fkl(s, t, mask, temperature=2.0))


@pytest.mark.parametrize("head_rule", ["paper", "cumulative_le"])
def test_akl_weights_sum_to_one_and_match_loop(head_rule):
    s, t, _ = random_inputs(seed=11, V=23)
    w_head, w_tail = akl_weights(s, t, head_rule=head_rule, mu=0.5)
    torch.testing.assert_close(w_head + w_tail, torch.ones_like(w_head), atol=1e-9, rtol=0)
    p = torch.softmax(t, -1).reshape(-1, 23).numpy()
    q = torch.softmax(s, -1).reshape(-1, 23).numpy()
    want = np.array([ref_akl_weights(pr, qr, 0.5, head_rule)[0] for pr, qr in zip(p, q)])
    np.testing.assert_allclose(w_head.reshape(-1).numpy(), want, atol=1e-12)


def test_akl_head_rules_on_a_worked_example():
    """p = (0.4, 0.3, 0.2, 0.1), μ = 0.5: the paper's head (smallest prefix reaching μ) is {0.4, 0.3};
    the authors' rule (cumulative ≤ μ, plus top-1) is {0.4}."""
    t = torch.tensor([0.4, 0.3, 0.2, 0.1], dtype=torch.float64).log().reshape(1, 1, 4)
    s = torch.tensor([0.1, 0.2, 0.3, 0.4], dtype=torch.float64).log().reshape(1, 1, 4)
    w_paper, _ = akl_weights(s, t, head_rule="paper")
    w_code, _ = akl_weights(s, t, head_rule="cumulative_le")
    # gaps |p − q| = 0.3, 0.1, 0.1, 0.3; total 0.8
    assert abs(float(w_paper) - 0.4 / 0.8) < 1e-9
    assert abs(float(w_code) - 0.3 / 0.8) < 1e-9


@pytest.mark.parametrize("name", NAMES)
def test_identical_distributions_give_zero_without_nan(name):
    s, _, mask = random_inputs(seed=12)
    s1 = s.clone().requires_grad_()
    loss = DIVERGENCES[name](s1, s.clone(), mask, **PARAMS.get(name, {}))
    loss.backward()
    assert abs(float(loss.detach())) < 1e-12
    assert torch.isfinite(s1.grad).all() and float(s1.grad.abs().max()) < 1e-9


# ------------------------------------------------------------------ sparse teacher


@pytest.mark.parametrize("name", NAMES)
def test_sparse_with_k_equal_vocab_is_dense(name):
    s, t, mask = random_inputs(seed=13, V=11)
    params = PARAMS.get(name, {})
    sparse = SparseTeacher.from_logits(t, k=11, temperature=1.4)
    s1, s2 = s.clone().requires_grad_(), s.clone().requires_grad_()
    dense = DIVERGENCES[name](s1, t, mask, temperature=1.4, **params)
    top = DIVERGENCES[name](s2, sparse, mask, temperature=1.4, **params)
    dense.backward()
    top.backward()
    assert abs(float((dense - top).detach())) < 1e-6
    torch.testing.assert_close(s1.grad, s2.grad, atol=1e-6, rtol=0)
    # float32, with the rest mass computed from the top-k (rounds to ≤ 0 and is clamped)
    s32, t32 = s.float(), t.float()
    lp = torch.log_softmax(t32, -1)
    values, ids = lp.topk(11, -1)
    from_top = SparseTeacher(ids=ids, logprobs=values)
    got = DIVERGENCES[name](s32, from_top, mask, **params)
    assert torch.isfinite(got)
    assert abs(float(got) - float(DIVERGENCES[name](s32, t32, mask, **params))) < 1e-5


@pytest.mark.parametrize("name", NAMES)
def test_sparse_top_k_matches_k_plus_one_bin_reference(name):
    s, t, mask = random_inputs(seed=14, V=13)
    params = PARAMS.get(name, {})
    k = 4
    sparse = SparseTeacher.from_logits(t, k=k)
    got = DIVERGENCES[name](s, sparse, mask, reduction="none", **params)
    p_full = torch.softmax(t, -1).reshape(-1, 13)
    q_full = torch.softmax(s, -1).reshape(-1, 13)
    ids = sparse.ids.reshape(-1, k)
    p_bins = torch.cat([p_full.gather(1, ids), 1 - p_full.gather(1, ids).sum(1, keepdim=True)], 1)
    q_bins = torch.cat([q_full.gather(1, ids), 1 - q_full.gather(1, ids).sum(1, keepdim=True)], 1)
    want = ref_rows(name, p_bins, q_bins, params, rest_last=True).reshape(mask.shape)
    want = torch.where(mask, want, torch.zeros_like(want))
    torch.testing.assert_close(got, want, atol=1e-9, rtol=1e-9)


def test_sparse_rest_bin_rounding_is_clamped():
    """Top-k log-probs whose mass rounds above 1 leave an empty rest bin (0·log 0 = 0), not NaN."""
    from kdbench.losses.sparse import rest_from_top

    logprobs = torch.log(torch.tensor([[[0.6, 0.4 + 1e-7]]]))
    assert float(rest_from_top(logprobs)) == -math.inf
    teacher = SparseTeacher(ids=torch.tensor([[[0, 1]]]), logprobs=logprobs)
    s = torch.tensor([[[1.0, 0.5, -1.0]]], requires_grad=True)
    for name in ("fkl", "jsd", "tvd", "skl", "srkl"):
        loss = DIVERGENCES[name](s, teacher)
        loss.backward()
        assert torch.isfinite(loss) and torch.isfinite(s.grad).all(), name
    # the student puts mass where the teacher has none: reverse KL is +inf, as the mathematics says
    assert float(rkl(s, teacher).detach()) == math.inf


def test_sparse_temperature_mismatch_is_an_error():
    s, t, _ = random_inputs()
    with pytest.raises(ConfigError):
        fkl(s, SparseTeacher.from_logits(t, k=3), temperature=2.0)


# ------------------------------------------------------------------ numerics and dtypes


@pytest.mark.parametrize("name", NAMES)
def test_bf16_inputs_give_float32_math_on_rounded_logits(name):
    s, t, mask = random_inputs(seed=15, dtype=torch.float32)
    params = PARAMS.get(name, {})
    s16, t16 = s.bfloat16().requires_grad_(), t.bfloat16()
    s32 = s16.detach().float().requires_grad_()
    a = DIVERGENCES[name](s16, t16, mask, **params)
    b = DIVERGENCES[name](s32, t16.float(), mask, **params)
    assert a.dtype == torch.float32
    torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)
    a.backward()
    b.backward()
    assert s16.grad.dtype == torch.bfloat16
    torch.testing.assert_close(s16.grad.float(), s32.grad.bfloat16().float(), atol=1e-7, rtol=8e-3)


@pytest.mark.parametrize("name", NAMES)
def test_large_logits_stay_finite(name):
    s, t, mask = random_inputs(seed=16, dtype=torch.float32, scale=1.0)
    s, t = s.sign() * 1e4 * s.abs().clamp(max=1), t.sign() * 1e4 * t.abs().clamp(max=1)
    s.requires_grad_()
    loss = DIVERGENCES[name](s, t, mask, **PARAMS.get(name, {}))
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(s.grad).all()


@pytest.mark.parametrize("name", NAMES)
def test_shared_minus_inf_equals_trimmed_vocabulary(name):
    s, t, mask = random_inputs(seed=17, V=12)
    params = PARAMS.get(name, {})
    s_inf, t_inf = s.clone(), t.clone()
    s_inf[..., 9:] = -math.inf
    t_inf[..., 9:] = -math.inf
    s1 = s_inf.clone().requires_grad_()
    s2 = s[..., :9].clone().requires_grad_()
    a = DIVERGENCES[name](s1, t_inf, mask, **params)
    b = DIVERGENCES[name](s2, t[..., :9], mask, **params)
    a.backward()
    b.backward()
    torch.testing.assert_close(a, b)
    torch.testing.assert_close(s1.grad[..., :9], s2.grad)
    assert torch.all(s1.grad[..., 9:] == 0)


# +inf where the mathematics gives +inf; every other divergence stays finite.
ONE_SIDED = {  # name: (student -inf where teacher supports, teacher -inf where student supports)
    "fkl": (math.inf, "finite"), "rkl": ("finite", math.inf), "fkl_rkl": (math.inf, math.inf),
    "jsd": ("finite", "finite"), "tvd": ("finite", "finite"), "skl": ("finite", "finite"),
    "srkl": ("finite", "finite"), "akl": (math.inf, math.inf), "akl_r": (math.inf, math.inf),
}


@pytest.mark.parametrize("name", NAMES)
def test_one_sided_minus_inf(name):
    s, t, mask = random_inputs(seed=18, V=8)
    params = PARAMS.get(name, {})
    s_inf = s.clone()
    s_inf[..., 0] = -math.inf
    t_inf = t.clone()
    t_inf[..., 0] = -math.inf
    for (student, teacher), expected in zip(((s_inf, t), (s, t_inf)), ONE_SIDED[name]):
        loss = DIVERGENCES[name](student, teacher, mask, **params)
        if expected == "finite":
            assert torch.isfinite(loss), name
        else:
            assert float(loss) == math.inf, name


# ------------------------------------------------------------------ errors


def test_vocabulary_mismatch_is_a_clear_error():
    s, t, _ = random_inputs(V=10)
    with pytest.raises(DataError, match="vocabulary"):
        fkl(s, t[..., :9])


def test_bad_settings_are_config_errors():
    s, t, _ = random_inputs()
    with pytest.raises(ConfigError):
        fkl(s, t, reduction="avg")
    with pytest.raises(ConfigError):
        jsd(s, t, beta=1.5)
    with pytest.raises(ConfigError):
        akl(s, t, head_rule="other")
    with pytest.raises(ConfigError):
        fkl(s, t, temperature=0.0)


# ------------------------------------------------------------------ the AKL paper's toy experiment


@pytest.mark.parametrize("name", ["fkl", "rkl"])
def test_akl_toy_experiment_both_directions_converge(name):
    """akl.md §3 / Fig. 3: fit a fixed long-tail 50-bin teacher with Adam from the same initial
    student; after 200 steps both FKL and RKL have converged (Σ|p − q| small)."""
    bins = torch.arange(50, dtype=torch.float64)
    teacher_logits = (-0.15 * bins + 0.3 * torch.sin(bins)).reshape(1, 1, 50)  # long-tailed
    torch.manual_seed(0)
    student = torch.nn.Parameter(0.5 * torch.randn(1, 1, 50, dtype=torch.float64))
    optimizer = torch.optim.Adam([student], lr=0.1)
    start_gap = float((torch.softmax(teacher_logits, -1) - torch.softmax(student, -1)).abs().sum())
    for _ in range(200):
        optimizer.zero_grad()
        DIVERGENCES[name](student, teacher_logits).backward()
        optimizer.step()
    gap = float((torch.softmax(teacher_logits, -1) - torch.softmax(student.detach(), -1)).abs().sum())
    assert start_gap > 0.5
    assert gap < 0.02, gap
