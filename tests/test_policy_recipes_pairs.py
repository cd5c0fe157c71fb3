"""DistiLLM-2 and DPPO as recipes (issue 18): they train from ``kdbench train NAME`` on tiny models, write their
stages and cost figures, leave the frozen models unchanged, and move the student the way their loss says (a
flipped sign moves it the other way). DPPO's recipe estimator — the rewards its sampling form computes and its
guided form's loss — is checked against the exact gradient of the KL-regularised DPO reward of an enumerable
policy (critic-free option: a value head's advantages are biased by the critic's error)."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from typer.testing import CliRunner

from enumerable_policy import TablePolicy, assert_within_monte_carlo_error, batched_gradient_estimates
from kdbench.cli import app
from tiny_models import build_tiny, write_tiny_data

runner = CliRunner()
STAGE_STEPS = ["--set", "params.max_new_tokens=8", "--set", "params.sft_settings={max_steps: 4}",
               "--set", "params.teacher_dpo_settings={max_steps: 4}"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("policy_pairs")
    corpus, _ = build_tiny(root)
    write_tiny_data(root, corpus, n=8, n_pairs=8)
    return root


@pytest.mark.parametrize("method,data,extra", [("distillm2", "prompts", ["--set", "params.max_new_tokens=8"]),
                                               ("dppo", "prefs", STAGE_STEPS)])
def test_pair_recipes_train_from_the_cli(tiny, tmp_path, method, data, extra):
    from kdbench.store import hash_tree

    teacher_hash = hash_tree(tiny / "teacher")
    result = runner.invoke(app, [
        "train", method, "--student", str(tiny / "student"), "--teacher", str(tiny / "teacher"),
        "--data", str(tiny / f"{data}.jsonl"), "--output-dir", str(tmp_path), "--set", "max_steps=4",
        "--set", "batch_size=4", "--set", "prompt_style=compact", "--set", "save_steps=2", "--set", "logging_steps=1",
        "--set", f"cache_dir={tmp_path / 'cache'}", *extra])
    assert result.exit_code == 0, result.output
    run = tmp_path / f"{method}-seed1"
    cost = json.loads((run / "cost.json").read_text())
    stages = json.loads((run / "stages.json").read_text())
    assert cost["optimizer_steps"] == 4 and cost["generated_tokens"] > 0
    log = [json.loads(line) for line in open(run / "train_log.jsonl")]
    if method == "distillm2":
        assert {"teacher_responses", "student_responses"} <= set(stages)
        assert all(r["skl_teacher_response_per_token"] > 0 for r in log if "loss" in r)
    else:
        assert {"ref_teacher", "dpo_teacher", "sft_student"} <= set(stages)
        assert cost["rollout_rounds"] == 1 and cost["value_loss"] >= 0  # 4 steps, 4 PPO epochs per round
        assert all("ppo_per_token" in r for r in log if "loss" in r)
    assert hash_tree(tiny / "teacher") == teacher_hash


def _gold_measure(tiny, model_dir, measure: str) -> float:
    """skl: mean skew KL of the model from the teacher on the prompts file's gold responses; ce: mean
    cross-entropy of the chosen responses of the pairs file."""
    from kdbench.data import PadCollator, build_dataset, load_examples
    from kdbench.losses import DIVERGENCES
    from kdbench.models import load_model, load_tokenizer
    from kdbench.train.pairs import load_preference_pairs

    tokenizer = load_tokenizer(str(tiny / "student"))
    if measure == "skl":
        examples = load_examples(str(tiny / "prompts.jsonl"))
    else:
        examples = [dataclasses.replace(p.example, output=p.chosen) for p in load_preference_pairs(tiny / "prefs.jsonl")]
    data = build_dataset(examples, tokenizer, style="compact", max_prompt_length=128, max_length=256)
    batch = PadCollator(tokenizer.pad_token_id)([{k: data[i][k] for k in ("input_ids", "labels")}
                                                 for i in range(len(data))])
    with torch.no_grad():
        s = load_model(str(model_dir), trainable=False)(input_ids=batch["input_ids"],
                                                         attention_mask=batch["attention_mask"]).logits[:, :-1]
        targets = batch["labels"][:, 1:]
        mask = (targets != -100).float()
        if measure == "ce":
            logps = torch.log_softmax(s, -1).gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
            return float(-(logps * mask).sum() / mask.sum())
        t = load_model(str(tiny / "teacher"), trainable=False)(input_ids=batch["input_ids"],
                                                               attention_mask=batch["attention_mask"]).logits[:, :-1]
    return float(DIVERGENCES["skl"](s, t, mask))


@pytest.mark.parametrize("method,data,measure", [("distillm2", "prompts", "skl"), ("dppo", "prefs", "ce")])
@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_pair_recipes_move_the_student_their_losses_way(tiny, tmp_path, monkeypatch, method, data, measure, sign):
    from kdbench.train import TrainConfig, train
    from kdbench.train import guided_forms

    original = guided_forms.GUIDED_FORMS[method]

    def flipped(batch, params, family):
        parts = original.loss(batch, params, family)
        return {**parts, "loss": sign * parts["loss"]}

    monkeypatch.setitem(guided_forms.GUIDED_FORMS, method, dataclasses.replace(original, loss=flipped))
    params = {"max_new_tokens": 8, **({"sft_settings": {"max_steps": 2}, "teacher_dpo_settings": {"max_steps": 2},
                                       "init": "student"} if method == "dppo" else {})}
    result = train(TrainConfig(method=method, student=str(tiny / "student"), teacher=str(tiny / "teacher"),
                               data=str(tiny / f"{data}.jsonl"), valid_fraction=0.2, output_dir=str(tmp_path),
                               max_steps=10, batch_size=8, learning_rate=3e-3, warmup_ratio=0.0,
                               lr_scheduler="constant", prompt_style="compact", logging_steps=1, save_steps=100,
                               seed=3, cache_dir=str(tmp_path / "cache"), params=params), progress=False)
    before = _gold_measure(tiny, tiny / "student", measure)
    after = _gold_measure(tiny, result.model_dir, measure)
    if sign > 0:
        assert after < 0.9 * before, (before, after)
    else:
        assert after > before, (before, after)


# ------------------------------------------------------------------ DPPO's recipe estimator, enumerated

V, T, BETA, KL_COEF = 3, 3, 0.5, 0.2


def _exact_objective(policy, theta, tables):
    """J(θ) = E_{y~π_θ}[β log π_dpo(y)/π_ref(y) − β_KL log π_θ(y)/π_sft(y)] by enumeration."""
    ys = policy.sequences
    log_pi = policy.sequence_logps(theta, ys)
    dpo, ref, sft = (policy.sequence_logps(table, ys) for table in tables)
    return (log_pi.exp() * (BETA * (dpo - ref) - KL_COEF * (log_pi - sft))).sum()


def _token_logps(policy, table, sequences):
    return torch.log_softmax(policy.logits(table, sequences), -1).gather(-1, sequences.unsqueeze(-1)).squeeze(-1)


def _recipe_estimate(policy, theta, tables, sequences, level):
    """The recipe's PPO term on on-policy samples (first PPO epoch, CE weight 0): rewards by
    :func:`kdbench.train.dppo.dppo_rewards`, critic-free advantages, the ``dppo`` guided form's loss."""
    from kdbench.losses.dppo import critic_free_advantages
    from kdbench.train.dppo import DPPOLossParams, dppo_rewards
    from kdbench.train.guided_forms import GUIDED_FORMS, GuidedBatch, GuidedParams

    logits = policy.logits(theta, sequences)
    with torch.no_grad():
        old = torch.log_softmax(logits, -1).gather(-1, sequences.unsqueeze(-1)).squeeze(-1)
        dpo, ref, sft = (_token_logps(policy, table, sequences) for table in tables)
        mask = torch.ones_like(sequences, dtype=torch.bool)
        advantages = critic_free_advantages(dppo_rewards(old, dpo, ref, sft, mask, beta=BETA, kl_coef=KL_COEF,
                                                         level=level), mask)
    n = torch.tensor(float(sequences.shape[0]), dtype=torch.float64)
    batch = GuidedBatch(logits, sequences, mask.double(), logits, mask.double(), {}, n, n, n, other_targets=sequences,
                        extras={"old_logps": old, "advantages": advantages})
    return GUIDED_FORMS["dppo"].loss(batch, DPPOLossParams(sft_weight=0.0), GuidedParams(guided_form="dppo"))["loss"]


@pytest.mark.parametrize("level", ["sequence", "token"])
def test_the_dppo_recipes_estimator_matches_the_exact_gradient(level):
    policy = TablePolicy(V, T)
    tables = [policy.random_table(seed, 1.5) for seed in (31, 32, 33)]
    start = policy.random_table(34, 1.0)
    theta = start.clone().requires_grad_()
    (exact_ascent,) = torch.autograd.grad(_exact_objective(policy, theta, tables), theta)
    g = torch.Generator().manual_seed(0)
    samples = [policy.sample(start, 400, g) for _ in range(30)]
    estimates = batched_gradient_estimates(lambda th, k: _recipe_estimate(policy, th, tables, samples[k], level),
                                           start, len(samples))
    assert_within_monte_carlo_error(estimates, -exact_ascent)  # the loss descends where J ascends


def test_the_dppo_recipe_raises_the_exact_regularised_reward():
    policy = TablePolicy(V, T)
    tables = [policy.random_table(seed, 2.0) for seed in (41, 42, 43)]
    theta = tables[2].clone().requires_grad_()  # from the SFT student, as DPPO starts
    optimizer = torch.optim.Adam([theta], lr=0.05)
    g = torch.Generator().manual_seed(2)
    start = float(_exact_objective(policy, theta.detach(), tables))
    for _ in range(40):
        sequences = policy.sample(theta.detach(), 64, g)
        optimizer.zero_grad()
        _recipe_estimate(policy, theta, tables, sequences, "sequence").backward()
        optimizer.step()
    end = float(_exact_objective(policy, theta.detach(), tables))
    ys = policy.sequences  # the regularised optimum: J* = β_KL log Σ_y π_sft(y) exp(r(y) / β_KL)
    reward = BETA * (policy.sequence_logps(tables[0], ys) - policy.sequence_logps(tables[1], ys))
    best = float(KL_COEF * torch.logsumexp(policy.sequence_logps(tables[2], ys) + reward / KL_COEF, 0))
    assert end > start + 0.3 * (best - start), (start, end, best)
