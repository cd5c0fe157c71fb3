"""Token-level recipes are wired to the loss their names promise: for every recipe the first training
step's logged loss equals an independent float64 reference (tests/wiring_reference.py: plain torch on the
frozen teacher, the student and the batch) and the one SGD step moved the student by exactly −lr × the
reference's gradient. The reference reads the recipe's resolved parameters (divergence, its parameters,
kd_ratio, kd_weighting, temperature), so a wrong divergence, weight or temperature fails here."""

from __future__ import annotations

import pytest
import torch

import wiring_reference as ref

KD_ALIASES = ["kd", "rkl", "fkl_rkl", "jsd", "tvd", "skl", "srkl", "akl", "akl_r"]
CASES = {name: (name, {}) for name in KD_ALIASES}
CASES.update({
    "kd-additive": ("kd", {"kd_weighting": "additive", "kd_ratio": 0.3}),  # CE + r·D (ADPA Eq. 1)
    "kd-temperature": ("kd", {"temperature": 2.0}),
    "kd-temperature-squared": ("kd", {"temperature": 2.0, "temperature_squared": True}),
    "jsd-beta": ("jsd", {"divergence_params": {"beta": 0.2}}),
    "skl-alpha": ("skl", {"divergence_params": {"alpha": 0.3}}),
    "srkl-alpha": ("srkl", {"divergence_params": {"alpha": 0.3}}),
    "akl-mu": ("akl", {"divergence_params": {"mu": 0.8}}),
    "akl_r-temperature": ("akl_r", {"temperature": 1.5}),
    "gkd-gold": ("gkd", {"on_policy_fraction": 0.0}),  # λ = 0: GKD's divergence on the gold responses
})


def _gold_batch(world):
    rows = ref.rows_of(world.batch)
    return ref.pad([ref.tokenized(world.tokenizer, r, r["output"]) for r in rows], world.tokenizer.pad_token_id)


@pytest.mark.parametrize("case", sorted(CASES))
def test_token_kd_first_step_is_the_recipes_divergence(wiring_world, tmp_path, case):
    method, overrides = CASES[case]
    world = wiring_world
    params = ref.resolved(method, overrides)
    result = ref.run(world, tmp_path, method, world.batch, overrides)
    batch = _gold_batch(world)
    vocab = len(world.tokenizer)
    student = ref.load64(world.student)
    with torch.no_grad():
        teacher_logits = ref.shifted_logits(ref.load64(world.teacher), batch, vocab)
    targets, mask = ref.targets_mask(batch)
    loss = ref.token_kd_loss(params, ref.shifted_logits(student, batch, vocab), teacher_logits, targets, mask)
    assert ref.logged(result)["loss"] == pytest.approx(float(loss.detach()), rel=1e-5, abs=1e-7)
    ref.assert_one_sgd_step(world.student, result.model_dir, student, loss)


def test_sft_first_step_is_gold_cross_entropy(wiring_world, tmp_path):
    world = wiring_world
    result = ref.run(world, tmp_path, "sft", world.batch)
    batch = _gold_batch(world)
    student = ref.load64(world.student)
    targets, mask = ref.targets_mask(batch)
    loss = ref.ce_mean(ref.shifted_logits(student, batch, len(world.tokenizer)), targets, mask)
    assert ref.logged(result)["loss"] == pytest.approx(float(loss.detach()), rel=1e-5)
    ref.assert_one_sgd_step(world.student, result.model_dir, student, loss)


def test_dpkd_token_first_step_is_its_definition(wiring_world, tmp_path):
    """dpkd_token: per gold position, chosen = the teacher's argmax a_t, rejected = the student's argmax a_s;
    −log σ(β[(log q(a_t) − log p(a_t)) − (log q(a_s) − log p(a_s))]) token mean + ce_weight·CE."""
    world = wiring_world
    params = ref.resolved("dpkd_token")
    result = ref.run(world, tmp_path, "dpkd_token", world.batch)
    batch = _gold_batch(world)
    vocab = len(world.tokenizer)
    student = ref.load64(world.student)
    with torch.no_grad():
        log_p = torch.log_softmax(ref.shifted_logits(ref.load64(world.teacher), batch, vocab), -1)
    logits = ref.shifted_logits(student, batch, vocab)
    log_q = torch.log_softmax(logits, -1)
    targets, mask = ref.targets_mask(batch)
    a_t, a_s = log_p.argmax(-1), log_q.detach().argmax(-1)
    margin = (ref.gathered(log_q, a_t) - ref.gathered(log_p, a_t)) - (ref.gathered(log_q, a_s) - ref.gathered(log_p, a_s))
    preference = (-ref.log_sigmoid(float(params["beta"]) * margin) * mask).sum() / mask.sum()
    loss = preference + float(params["ce_weight"]) * ref.ce_mean(logits, targets, mask)
    assert ref.logged(result)["loss"] == pytest.approx(float(loss.detach()), rel=1e-5)
    ref.assert_one_sgd_step(world.student, result.model_dir, student, loss)


def _teacher_batch(world, params, max_new_tokens=None):
    rows = ref.rows_of(world.batch)
    responses = ref.greedy_responses(world.teacher, world.tokenizer, rows, max_new_tokens or int(params["max_new_tokens"]))
    return responses, ref.pad([ref.tokenized(world.tokenizer, r, text, finished)
                               for r, (text, finished) in zip(rows, responses)], world.tokenizer.pad_token_id)


GENERATING = {
    "dsft": ("dsft", {}),
    "seqkd-greedy": ("seqkd", {"greedy": True}),
    "dsft_kl": ("dsft_kl", {}),
    "dsft_kl-forward": ("dsft_kl", {"divergence": "fkl"}),
}


@pytest.mark.parametrize("case", sorted(GENERATING))
def test_teacher_response_recipes_train_on_the_teachers_greedy_outputs(wiring_world, tmp_path, case):
    """dSFT / SeqKD (greedy) / dsft_kl: the gold responses are replaced by the teacher's greedy outputs
    (transformers' own generate here), and the loss is CE (+ λ·KL for dsft_kl) on them."""
    method, overrides = GENERATING[case]
    world = wiring_world
    overrides = {**overrides, "max_new_tokens": ref.MAX_NEW_TOKENS}
    params = ref.resolved(method, overrides)
    assert params["greedy"]
    result = ref.run(world, tmp_path, method, world.batch, overrides)
    responses, batch = _teacher_batch(world, params)
    assert all(finished for _, finished in responses)  # the teacher ends its answers (cut answers: issue 14)
    gold = [r["output"] for r in ref.rows_of(world.batch)]
    assert [text for text, _ in responses] != gold  # the models answer these prompts in their own words
    vocab = len(world.tokenizer)
    student = ref.load64(world.student)
    logits = ref.shifted_logits(student, batch, vocab)
    targets, mask = ref.targets_mask(batch)
    if method == "dsft_kl":
        with torch.no_grad():
            teacher_logits = ref.shifted_logits(ref.load64(world.teacher), batch, vocab)
        loss = ref.token_kd_loss(params, logits, teacher_logits, targets, mask)
    else:
        loss = ref.ce_mean(logits, targets, mask)
    assert ref.logged(result)["loss"] == pytest.approx(float(loss.detach()), rel=1e-5)
    ref.assert_one_sgd_step(world.student, result.model_dir, student, loss)


def test_seqkd_trains_on_its_cached_teacher_samples_not_the_gold(wiring_world, tmp_path):
    """SeqKD's default (sampling at T = 1): the responses trained on are the cached teacher generations of
    the run's generate stage, one per prompt, and not the gold responses."""
    import json
    from pathlib import Path

    world = wiring_world
    params = ref.resolved("seqkd", {"max_new_tokens": ref.MAX_NEW_TOKENS})
    assert not params["greedy"]
    result = ref.run(world, tmp_path, "seqkd", world.batch, {"max_new_tokens": ref.MAX_NEW_TOKENS})
    stage = json.loads((result.run.path / "stages.json").read_text())["teacher_responses"]
    generations = [json.loads(line) for line in open(Path(stage["path"]) / "generations.jsonl")]
    rows = ref.rows_of(world.batch)
    assert len(generations) == len(rows)
    texts = [g["text"] for g in generations]
    assert texts != [r["output"] for r in rows]
    batch = ref.pad([ref.tokenized(world.tokenizer, r, t) for r, t in zip(rows, texts)], world.tokenizer.pad_token_id)
    student = ref.load64(world.student)
    targets, mask = ref.targets_mask(batch)
    loss = ref.ce_mean(ref.shifted_logits(student, batch, len(world.tokenizer)), targets, mask)
    assert ref.logged(result)["loss"] == pytest.approx(float(loss.detach()), rel=1e-5)
    ref.assert_one_sgd_step(world.student, result.model_dir, student, loss)


def test_a_teacher_response_cut_at_max_new_tokens_carries_no_eos(wiring_world, tmp_path):
    world = wiring_world
    overrides = {"max_new_tokens": 2}
    params = ref.resolved("dsft", overrides)
    result = ref.run(world, tmp_path, "dsft", world.batch, overrides)
    responses, batch = _teacher_batch(world, params)
    assert not any(finished for _, finished in responses)
    targets, mask = ref.targets_mask(batch)
    loss = ref.ce_mean(ref.shifted_logits(ref.load64(world.student), batch, len(world.tokenizer)), targets, mask)
    assert ref.logged(result)["loss"] == pytest.approx(float(loss.detach()), rel=1e-5)
