"""Cross-tokenizer KD: ULD, DSKD and the position alignments, against float64 references and real tokenizers."""

from __future__ import annotations

import functools
import importlib.util
from pathlib import Path

import pytest
import torch

from kdbench.errors import ConfigError, DataError
from kdbench.losses import (alignment_scores_from_pairs, cross_model_attention_scores, dskd, prefix_alignment,
                            rank_alignment, token_offsets, uld)

MODELS = Path(__file__).resolve().parents[1] / ".." / "shared" / "models"
TEXT = "The answer is 42, naïve café.\nSecond line: x = y**2 — done! 日本語 🙂 ok"


def grads(fn, *inputs):
    leaves = [x.detach().clone().requires_grad_() for x in inputs]
    fn(*leaves).backward()
    return [leaf.grad for leaf in leaves]


def pair_batch(seed=0, B=3, Ts=6, Tt=8, Vs=7, Vt=11):
    g = torch.Generator().manual_seed(seed)
    student = torch.randn(B, Ts, Vs, generator=g, dtype=torch.float64) * 2
    teacher = torch.randn(B, Tt, Vt, generator=g, dtype=torch.float64) * 2
    student_mask = torch.rand(B, Ts, generator=g) > 0.3
    teacher_mask = torch.rand(B, Tt, generator=g) > 0.3
    student_mask[:, 1] = teacher_mask[:, 2] = True
    return student, teacher, student_mask, teacher_mask


# ------------------------------------------------------------------ ULD


def ref_uld(student, teacher, student_mask, teacher_mask, tau):
    """Mean over rank-aligned pairs of Σ_i |sorted q − sorted p|, by an explicit loop."""
    values = []
    for b in range(student.shape[0]):
        s_idx = [i for i in range(student.shape[1]) if student_mask[b, i]]
        t_idx = [j for j in range(teacher.shape[1]) if teacher_mask[b, j]]
        for i, j in zip(s_idx, t_idx):
            q = sorted(torch.softmax(student[b, i] / tau, -1), key=lambda x: float(x.detach()), reverse=True)
            p = sorted(torch.softmax(teacher[b, j] / tau, -1), key=lambda x: float(x.detach()), reverse=True)
            width = max(len(q), len(p))
            q, p = q + [0.0] * (width - len(q)), p + [0.0] * (width - len(p))
            values.append(sum(abs(a - c) for a, c in zip(q, p)))
    return sum(values) / len(values)


def test_rank_alignment_pairs_kth_counted_positions():
    student_mask = torch.tensor([[0, 1, 1, 1, 0], [1, 1, 0, 0, 0]])
    teacher_mask = torch.tensor([[0, 0, 1, 1, 0, 0], [0, 1, 1, 1, 1, 0]])
    batch, s_pos, t_pos = rank_alignment(student_mask, teacher_mask)
    assert batch.tolist() == [0, 0, 1, 1]
    assert s_pos.tolist() == [1, 2, 0, 1]
    assert t_pos.tolist() == [2, 3, 1, 2]


@pytest.mark.parametrize("tau", [1.0, 2.0])
def test_uld_matches_reference_value_and_gradient(tau):
    student, teacher, sm, tm = pair_batch(seed=1)
    torch.testing.assert_close(uld(student, teacher, sm, tm, temperature=tau, chunk_rows=2),
                               ref_uld(student, teacher, sm, tm, tau))
    got = grads(lambda s, t: uld(s, t, sm, tm, temperature=tau), student, teacher)
    want = grads(lambda s, t: ref_uld(s, t, sm, tm, tau), student, teacher)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)


def test_uld_reductions_padding_and_empty_rows():
    student, teacher, sm, tm = pair_batch(seed=2)
    per = uld(student, teacher, sm, tm, reduction="none")
    batch, s_pos, _ = rank_alignment(sm, tm)
    torch.testing.assert_close(uld(student, teacher, sm, tm, reduction="sum"), per.sum())
    torch.testing.assert_close(uld(student, teacher, sm, tm), per.sum() / batch.numel())
    assert bool((per[~sm] == 0).all())
    padded_s, padded_t = student.clone(), teacher.clone()
    padded_s[~sm] = float("nan")
    padded_t[~tm] = float("nan")
    torch.testing.assert_close(uld(padded_s, padded_t, sm, tm), uld(student, teacher, sm, tm))
    sm_empty = sm.clone()
    sm_empty[1] = False  # a row without response positions contributes nothing
    keep = torch.tensor([0, 2])
    torch.testing.assert_close(uld(student, teacher, sm_empty, tm, reduction="sum"),
                               uld(student[keep], teacher[keep], sm[keep], tm[keep], reduction="sum"))
    leaf = student.clone().requires_grad_()
    loss = uld(leaf, teacher, torch.zeros_like(sm), tm)
    loss.backward()
    assert float(loss.detach()) == 0.0 and float(leaf.grad.abs().sum()) == 0.0


def test_uld_is_zero_for_a_permuted_vocabulary_and_positive_otherwise():
    student, _, sm, _ = pair_batch(seed=3, Vs=9)
    permuted = torch.cat([student[..., torch.randperm(9, generator=torch.Generator().manual_seed(0))],
                          torch.full(student.shape[:2] + (4,), -torch.inf, dtype=torch.float64)], -1)
    assert float(uld(student, permuted, sm, sm)) < 1e-12  # same probabilities, other token ids and vocabulary size
    assert float(uld(student, permuted.flip(1), sm, sm)) > 0.01


def test_uld_errors():
    student, teacher, sm, tm = pair_batch(seed=4)
    with pytest.raises(ConfigError):
        uld(student, teacher, sm, tm, temperature=0.0)
    with pytest.raises(DataError):
        uld(student, teacher, sm[:2], tm)


# ------------------------------------------------------------------ alignment on the real tokenizers


@functools.lru_cache(maxsize=None)
def cached_tokenizer(folder):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder)


def load(name):

    if name in ("llama2",) and (importlib.util.find_spec("sentencepiece") is None
                                or importlib.util.find_spec("google.protobuf") is None):
        pytest.skip("the Llama 2 tokenizer needs sentencepiece and protobuf")
    folder = MODELS / f"{name}-tokenizer"
    if not folder.is_dir():
        pytest.skip(f"{folder} is not present")
    return cached_tokenizer(folder)


@pytest.mark.parametrize("pair", [("gpt2", "qwen2"), ("gpt2", "llama2"), ("qwen2", "llama2")])
def test_prefix_alignment_pairs_positions_that_have_read_the_same_text(pair):
    student_tok, teacher_tok = load(pair[0]), load(pair[1])
    student_ids, student_offsets = token_offsets(student_tok, TEXT)
    teacher_ids, teacher_offsets = token_offsets(teacher_tok, TEXT)
    pairs = prefix_alignment(student_offsets, teacher_offsets)
    js, ks = [j for j, _ in pairs], [k for _, k in pairs]
    assert js == sorted(set(js)) and ks == sorted(set(ks))
    for j, k in pairs:  # both models have read exactly the same text before the aligned tokens
        assert student_tok.decode(student_ids[:j]) == teacher_tok.decode(teacher_ids[:k])
    # every word that starts after a space is a boundary for both tokenizers
    word_starts = {i for i in range(1, len(TEXT)) if TEXT[i - 1] != " " and TEXT[i] == " "}
    aligned_starts = {student_offsets[j][0] for j in js}
    assert word_starts <= aligned_starts
    assert 0.5 * min(len(student_ids), len(teacher_ids)) <= len(pairs)


def test_prefix_alignment_skips_byte_pieces_of_one_character():
    gpt2 = load("gpt2")
    ids, offsets = token_offsets(gpt2, "🙂🙂")
    assert len(ids) > 2  # byte-level pieces share their character's span
    pairs = prefix_alignment(offsets, [(0, 1), (1, 2)])
    assert [offsets[j][0] for j, _ in pairs] == [0, 1] and len(pairs) == 2


def test_slow_tokenizer_is_a_config_error():
    class Slow:
        is_fast = False

    with pytest.raises(ConfigError):
        token_offsets(Slow(), "text")


def test_uld_on_real_tokenizations_aligns_first_response_tokens():
    student_tok, teacher_tok = load("gpt2"), load("qwen2")
    prompt, response = "Question: what is 6 x 7?\nAnswer:", " It is 42, of course."
    rows = []
    for tok in (student_tok, teacher_tok):
        prompt_ids = tok(prompt, add_special_tokens=False)["input_ids"]
        response_ids = tok(response, add_special_tokens=False)["input_ids"]
        mask = torch.zeros(len(prompt_ids) + len(response_ids), dtype=torch.bool)
        mask[len(prompt_ids) - 1:-1] = True  # the logits positions predicting the response tokens
        rows.append((mask.unsqueeze(0), len(prompt_ids), len(response_ids)))
    (sm, s_prompt, s_len), (tm, t_prompt, t_len) = rows
    batch, s_pos, t_pos = rank_alignment(sm, tm)
    assert s_pos[0] == s_prompt - 1 and t_pos[0] == t_prompt - 1  # both predict their first response token
    assert batch.numel() == min(s_len, t_len)
    g = torch.Generator().manual_seed(5)
    student = torch.randn(1, sm.shape[1], len(student_tok), generator=g)
    teacher = torch.randn(1, tm.shape[1], len(teacher_tok), generator=g)
    assert torch.isfinite(uld(student, teacher, sm, tm))


# ------------------------------------------------------------------ DSKD


def ref_dskd(sh, th, ws, wt, p_t2s, p_s2t, sl, tl, scores, tau, accurate_only, teacher_space="kept", t2s_src=None):
    """DSKD by explicit loops over positions (float64); returns the three terms. ``teacher_space``: "kept" — the
    teacher space attends the student positions the student space kept, "all" — every one with a key;
    ``t2s_src``: what the t2s projector reads (default the teacher hidden states)."""
    import math

    def kl(p_logits, q_logits):  # KL(softmax(p/τ) ‖ softmax(q/τ))
        p, log_p, log_q = torch.softmax(p_logits / tau, -1), torch.log_softmax(p_logits / tau, -1), \
            torch.log_softmax(q_logits / tau, -1)
        return (p * (log_p - log_q)).sum()

    t2s_src = th if t2s_src is None else t2s_src
    ce, kd_s, kd_t, n_ce, used, attended = 0.0, [], [], 0, {}, {}
    for b in range(sh.shape[0]):
        for i in range(sh.shape[1]):
            keys = [j for j in range(th.shape[1]) if tl[b, j] != -100 and math.isfinite(float(scores[b, i, j]))]
            if sl[b, i] == -100 or not keys:
                continue
            w = torch.softmax(torch.stack([scores[b, i, j] for j in keys]), 0)
            h = sum(w[n] * (p_t2s @ t2s_src[b, j]) for n, j in enumerate(keys))
            z = h @ ws.detach().T
            ce = ce - torch.log_softmax(z, -1)[sl[b, i]]
            n_ce += 1
            attended[(b, i)] = True
            if accurate_only and int(z.argmax()) != int(sl[b, i]):
                continue
            used[(b, i)] = True
            kd_s.append(kl(z.detach(), sh[b, i] @ ws.T))
    for b in range(th.shape[0]):
        for j in range(th.shape[1]):
            source = used if teacher_space == "kept" else attended
            keys = [i for i in range(sh.shape[1]) if (b, i) in source and math.isfinite(float(scores[b, i, j]))]
            if tl[b, j] == -100 or not keys:
                continue
            w = torch.softmax(torch.stack([scores[b, i, j] for i in keys]), 0)
            h = sum(w[n] * (p_s2t @ sh[b, i]) for n, i in enumerate(keys))
            kd_t.append(kl(th[b, j] @ wt.T, h @ wt.T))
    mean = (lambda xs: sum(xs) / max(len(xs), 1))
    return mean(kd_s), mean(kd_t), ce / max(n_ce, 1)


def dskd_inputs(seed=6, B=2, Ts=5, Tt=6, ds=4, dt=3, Vs=7, Vt=9):
    g = torch.Generator().manual_seed(seed)

    def r(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64)

    sl = torch.randint(0, Vs, (B, Ts), generator=g)
    tl = torch.randint(0, Vt, (B, Tt), generator=g)
    sl[0, 0] = tl[1, -1] = -100
    return r(B, Ts, ds), r(B, Tt, dt), r(Vs, ds), r(Vt, dt), r(ds, dt), r(dt, ds), sl, tl, r(B, Ts, Tt)


@pytest.mark.parametrize("accurate_only", [False, True])
def test_dskd_matches_reference_value_and_gradient(accurate_only):
    sh, th, ws, wt, p_t2s, p_s2t, sl, tl, scores = dskd_inputs()
    scores[0, 2] = -torch.inf  # a student position attending to no teacher position
    if accurate_only:  # make some projected predictions right, so both branches of the filter count
        sl[:, 1:3] = (torch.einsum("btd,sd->bts", th, p_t2s)[:, :1] @ ws.T).argmax(-1)

    def got(sh, ws, p_t2s, p_s2t):
        return dskd(sh, th, ws, wt, sl, tl, scores, t2s_projection=lambda x: x @ p_t2s.T,
                    s2t_projection=lambda x: x @ p_s2t.T, temperature=2.0, accurate_only=accurate_only)

    def want(sh, ws, p_t2s, p_s2t):
        return sum(ref_dskd(sh, th, ws, wt, p_t2s, p_s2t, sl, tl, scores, 2.0, accurate_only))

    torch.testing.assert_close(got(sh, ws, p_t2s, p_s2t), want(sh, ws, p_t2s, p_s2t))
    for a, b in zip(grads(got, sh, ws, p_t2s, p_s2t), grads(want, sh, ws, p_t2s, p_s2t)):
        torch.testing.assert_close(a, b)
    _, parts = dskd(sh, th, ws, wt, sl, tl, scores, t2s_projection=lambda x: x @ p_t2s.T,
                    s2t_projection=lambda x: x @ p_s2t.T, accurate_only=accurate_only, return_parts=True)
    assert parts["student_positions"] > 0 and parts["teacher_positions"] > 0


def test_dskd_teacher_space_over_every_position_and_t2s_inputs_match_reference():
    """The dskd recipe's reading (the authors' code): the teacher space attends every counted student position,
    and the t2s projector reads its own inputs (normalised hidden states + target embeddings)."""
    sh, th, ws, wt, p_t2s, p_s2t, sl, tl, scores = dskd_inputs(seed=11)
    sl[:, 1:3] = (torch.einsum("btd,sd->bts", th, p_t2s)[:, :1] @ ws.T).argmax(-1)
    t2s_src = th / th.std() + torch.randn(th.shape, generator=torch.Generator().manual_seed(12), dtype=torch.float64)

    def got(sh, ws, p_t2s, p_s2t):
        return dskd(sh, th, ws, wt, sl, tl, scores, t2s_projection=lambda x: x @ p_t2s.T,
                    s2t_projection=lambda x: x @ p_s2t.T, accurate_only=True, t2s_inputs=t2s_src,
                    teacher_space_positions="all")

    def want(sh, ws, p_t2s, p_s2t):
        return sum(ref_dskd(sh, th, ws, wt, p_t2s, p_s2t, sl, tl, scores, 1.0, True, "all", t2s_src))

    torch.testing.assert_close(got(sh, ws, p_t2s, p_s2t), want(sh, ws, p_t2s, p_s2t))
    for a, b in zip(grads(got, sh, ws, p_t2s, p_s2t), grads(want, sh, ws, p_t2s, p_s2t)):
        torch.testing.assert_close(a, b)
    kept = sum(ref_dskd(sh, th, ws, wt, p_t2s, p_s2t, sl, tl, scores, 1.0, True, "kept", t2s_src))
    assert abs(float(want(sh, ws, p_t2s, p_s2t) - kept)) > 1e-6  # the two readings differ on these inputs
    with pytest.raises(ConfigError):
        dskd(sh, th, ws, wt, sl, tl, scores, t2s_projection=lambda x: x @ p_t2s.T,
             s2t_projection=lambda x: x @ p_s2t.T, teacher_space_positions="some")


def test_dskd_of_a_model_with_itself_has_zero_kd_terms():
    sh, _, ws, _, _, _, sl, _, _ = dskd_inputs(seed=7, Tt=5, dt=4, Vt=7)
    scores = alignment_scores_from_pairs([[(i, i) for i in range(5)]] * 2, 5, 5, dtype=torch.float64)
    identity = (lambda x: x)
    _, parts = dskd(sh, sh, ws, ws, sl, sl, scores, t2s_projection=identity, s2t_projection=identity,
                    accurate_only=False, return_parts=True)
    assert abs(float(parts["kd_student_space"])) < 1e-12 and abs(float(parts["kd_teacher_space"])) < 1e-12


def test_dskd_with_cross_model_attention_and_hard_alignment_from_real_tokenizers():
    student_tok, teacher_tok = load("gpt2"), load("qwen2")
    s_ids, s_offsets = token_offsets(student_tok, TEXT)
    t_ids, t_offsets = token_offsets(teacher_tok, TEXT)
    # token j is predicted at position j − 1; position 0 (no prefix) is not aligned
    pairs = [(j - 1, k - 1) for j, k in prefix_alignment(s_offsets, t_offsets) if j > 0 and k > 0]
    scores = alignment_scores_from_pairs([pairs], len(s_ids), len(t_ids), dtype=torch.float64)
    g = torch.Generator().manual_seed(8)
    sh, th = torch.randn(1, len(s_ids), 4, generator=g, dtype=torch.float64), \
        torch.randn(1, len(t_ids), 3, generator=g, dtype=torch.float64)
    ws, wt = torch.randn(50, 4, generator=g, dtype=torch.float64), torch.randn(60, 3, generator=g, dtype=torch.float64)
    sl = torch.tensor([s_ids[1:] + [-100]]) % 50
    tl = torch.tensor([t_ids[1:] + [-100]]) % 60
    p_t2s = torch.randn(4, 3, generator=g, dtype=torch.float64)
    p_s2t = torch.randn(3, 4, generator=g, dtype=torch.float64)
    for s in (scores, cross_model_attention_scores(sh, th @ torch.randn(3, 4, generator=g, dtype=torch.float64))):
        got = dskd(sh, th, ws, wt, sl, tl, s, t2s_projection=lambda x: x @ p_t2s.T,
                   s2t_projection=lambda x: x @ p_s2t.T, accurate_only=False)
        want = sum(ref_dskd(sh, th, ws, wt, p_t2s, p_s2t, sl, tl, s, 1.0, False))
        torch.testing.assert_close(got, want)


def test_dskd_and_alignment_errors():
    sh, th, ws, wt, p_t2s, p_s2t, sl, tl, scores = dskd_inputs(seed=9)
    with pytest.raises(DataError):
        dskd(sh, th, ws, wt, sl, tl, scores[:, :, :2], t2s_projection=lambda x: x @ p_t2s.T,
             s2t_projection=lambda x: x @ p_s2t.T)
    with pytest.raises(DataError):
        alignment_scores_from_pairs([[(0, 9)]], 2, 3)


def test_dskd_with_nothing_counted_is_zero_with_zero_gradient():
    sh, th, ws, wt, p_t2s, p_s2t, sl, tl, scores = dskd_inputs(seed=10)
    leaves = [x.clone().requires_grad_() for x in (sh, ws, p_t2s, p_s2t)]
    loss = dskd(leaves[0], th, leaves[1], wt, torch.full_like(sl, -100), tl, scores,
                t2s_projection=lambda x: x @ leaves[2].T, s2t_projection=lambda x: x @ leaves[3].T)
    loss.backward()
    assert float(loss.detach()) == 0.0
    assert all(leaf.grad is None or float(leaf.grad.abs().sum()) == 0.0 for leaf in leaves)
