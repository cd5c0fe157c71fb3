"""MiniLLM and DistiLLM as recipes (issue 18): they train from ``kdbench train NAME`` on tiny models and write
their cost figures; training moves the student toward the teacher by the recipe's own measure (exact
per-position reverse KL for MiniLLM, skew KL for DistiLLM, on the training prompts' gold responses) while the
same run with the objective's sign flipped moves it away; the teacher is unchanged.

The recipe's MiniLLM estimator (the rollout tensors its sampling form stores and the objective's loss) is
checked against the exact gradient of the sequence-level reverse KL on an enumerable policy."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from enumerable_policy import TablePolicy, assert_within_monte_carlo_error, batched_gradient_estimates
from kdbench.cli import app
from tiny_models import build_tiny, write_tiny_data

runner = CliRunner()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("policy_recipes")
    corpus, _ = build_tiny(root)
    write_tiny_data(root, corpus, n=8, n_pairs=8)
    return root


#: Small settings that exercise each method's sampling: DistiLLM starts with student outputs likely and a
#: buffer of two batches, so gold, fresh and replayed steps all occur.
METHOD_PARAMS = {"minillm": ["--set", "params.max_new_tokens=8", "--set", "params.ppo_epochs=2"],
                 "distillm": ["--set", "params.max_new_tokens=8", "--set", "params.init_threshold=0.7",
                              "--set", "params.capacity=8"]}


@pytest.mark.parametrize("method", sorted(METHOD_PARAMS))
def test_policy_recipes_train_from_the_cli(tiny, tmp_path, method):
    from kdbench.store import hash_tree

    teacher_hash = hash_tree(tiny / "teacher")
    result = runner.invoke(app, [
        "train", method, "--student", str(tiny / "student"), "--teacher", str(tiny / "teacher"),
        "--data", str(tiny / "prompts.jsonl"), "--output-dir", str(tmp_path), "--set", "max_steps=4",
        "--set", "batch_size=4", "--set", "valid_fraction=0.25", "--set", "prompt_style=compact",
        "--set", "save_steps=2", "--set", "logging_steps=1", "--set", f"cache_dir={tmp_path / 'cache'}",
        *METHOD_PARAMS[method]])
    assert result.exit_code == 0, result.output
    run = tmp_path / f"{method}-seed1"
    cost = json.loads((run / "cost.json").read_text())
    assert cost["optimizer_steps"] == 4 and cost["generated_tokens"] > 0 and cost["teacher_forward_tokens"] > 0
    if method == "minillm":
        assert cost["rollout_rounds"] == 2  # 4 steps, 2 PPO epochs per round
    else:
        assert sum(cost["sgo_steps"].values()) == 4 and cost["replay_buffer_size"] > 0
    assert hash_tree(tiny / "teacher") == teacher_hash
    assert f"# {method} student" in (run / "model" / "README.md").read_text()


# ------------------------------------------------------------------ direction: toward the teacher, not away


def _divergence_on_gold(tiny, student_dir, divergence: str) -> float:
    """Mean per-token divergence of the student from the teacher on the gold responses of the training file."""
    from kdbench.data import PadCollator, build_dataset, load_examples
    from kdbench.losses import DIVERGENCES
    from kdbench.models import load_model, load_tokenizer

    tokenizer = load_tokenizer(str(tiny / "student"))
    data = build_dataset(load_examples(str(tiny / "prompts.jsonl")), tokenizer, style="compact",
                         max_prompt_length=128, max_length=256)
    batch = PadCollator(tokenizer.pad_token_id)([{k: data[i][k] for k in ("input_ids", "labels")}
                                                 for i in range(len(data))])
    student, teacher = load_model(str(student_dir), trainable=False), load_model(str(tiny / "teacher"), trainable=False)
    with torch.no_grad():
        s = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
        t = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    mask = (batch["labels"][:, 1:] != -100).float()
    return float(DIVERGENCES[divergence](s, t, mask))


@pytest.mark.parametrize("method,divergence", [("minillm", "rkl"), ("distillm", "skl")])
@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_training_moves_the_student_toward_the_teacher_and_a_flipped_sign_does_not(tiny, tmp_path, monkeypatch,
                                                                                   method, divergence, sign):
    from kdbench.train import TrainConfig, train
    from kdbench.train import objectives

    name = "minillm" if method == "minillm" else "token_kd"
    original = objectives.OBJECTIVES[name]

    def flipped(batch, params):
        parts = original.loss(batch, params)
        return {**parts, "loss": sign * parts["loss"]}

    monkeypatch.setitem(objectives.OBJECTIVES, name, dataclasses.replace(original, loss=flipped))
    params = {"max_new_tokens": 8, **({"ppo_epochs": 2} if method == "minillm" else {"init_threshold": 0.7,
                                                                                   "capacity": 8})}
    result = train(TrainConfig(method=method, student=str(tiny / "student"), teacher=str(tiny / "teacher"),
                               data=str(tiny / "prompts.jsonl"), valid_data=str(tiny / "prompts.jsonl"), output_dir=str(tmp_path),
                               max_steps=10, batch_size=8, learning_rate=3e-3, warmup_ratio=0.0,
                               lr_scheduler="constant", prompt_style="compact", logging_steps=1, save_steps=100,
                               seed=3, cache_dir=str(tmp_path / "cache"), params=params), progress=False)
    before = _divergence_on_gold(tiny, tiny / "student", divergence)
    after = _divergence_on_gold(tiny, result.model_dir, divergence)
    if sign > 0:
        assert after < 0.9 * before, (before, after)
    else:
        assert after > before, (before, after)


# ------------------------------------------------------------------ the recipe's estimator, enumerated

V, T = 3, 3


def _exact_reverse_kl(policy, student_table, teacher_table):
    ys = policy.sequences
    log_q, log_p = policy.sequence_logps(student_table, ys), policy.sequence_logps(teacher_table, ys)
    return (log_q.exp() * (log_q - log_p)).sum()


def _recipe_estimate(policy, theta, teacher_table, sequences, rollout_params):
    """The recipe's loss on on-policy samples: the rollout tensors its sampling form stores
    (:func:`kdbench.train.minillm.rollout_tensors`) and its objective (first PPO epoch), mean over samples."""
    from kdbench.train.minillm import MiniLLMLossParams, minillm_objective, rollout_tensors
    from kdbench.train.objectives import Batch

    student_logits, teacher_logits = policy.logits(theta, sequences), policy.logits(teacher_table, sequences)
    with torch.no_grad():
        old = torch.log_softmax(student_logits, -1).gather(-1, sequences.unsqueeze(-1)).squeeze(-1)
        teacher_lp = torch.log_softmax(teacher_logits, -1).gather(-1, sequences.unsqueeze(-1)).squeeze(-1)
    mask = torch.ones_like(sequences, dtype=torch.bool)
    advantages, weights = rollout_tensors(old, teacher_lp, mask, rollout_params)
    batch = Batch(student_logits, teacher_logits, sequences, mask.double(),
                  extras={"old_logps": old, "advantages": advantages, "weights": weights})
    return minillm_objective(batch, MiniLLMLossParams())["loss"] / sequences.shape[0]


def test_the_recipes_estimator_matches_the_exact_reverse_kl_gradient():
    """On-policy (α = 0) and without length normalisation, the estimator is unbiased (docs/methods.md)."""
    from kdbench.train.minillm import MiniLLMRolloutParams

    rollout_params = MiniLLMRolloutParams(teacher_mix_alpha=0.0, length_normalize=False)
    policy = TablePolicy(V, T)
    student_table, teacher_table = policy.random_table(11, 1.0), policy.random_table(12, 2.0)
    theta = student_table.clone().requires_grad_()
    (exact,) = torch.autograd.grad(_exact_reverse_kl(policy, theta, teacher_table), theta)
    g = torch.Generator().manual_seed(0)
    samples = [policy.sample(student_table, 400, g) for _ in range(30)]
    estimates = batched_gradient_estimates(
        lambda th, k: _recipe_estimate(policy, th, teacher_table, samples[k], rollout_params), student_table,
        len(samples))
    assert_within_monte_carlo_error(estimates, exact)


def test_the_recipes_defaults_lower_the_exact_reverse_kl():
    """With the recipe's defaults (length normalisation, teacher-mixed sampling α = 0.2 with its importance
    weights) the exact sequence-level reverse KL falls over training."""
    from kdbench.losses.policy_gradient import teacher_mixed_logprobs
    from kdbench.train.minillm import MiniLLMRolloutParams

    rollout_params = MiniLLMRolloutParams()
    policy = TablePolicy(V, T)
    teacher_table = policy.random_table(5, 2.5)
    theta = torch.zeros(policy.n_prefixes, V, dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.Adam([theta], lr=0.1)
    g = torch.Generator().manual_seed(1)
    start = float(_exact_reverse_kl(policy, theta.detach(), teacher_table))
    for _ in range(60):
        with torch.no_grad():  # sample from p̃ = 0.2 p + 0.8 q, prefix by prefix
            mixed = teacher_mixed_logprobs(theta.detach(), teacher_table, alpha=rollout_params.teacher_mix_alpha)
            sequences = policy.sample(mixed, 64, g)
        optimizer.zero_grad()
        _recipe_estimate(policy, theta, teacher_table, sequences, rollout_params).backward()
        optimizer.step()
    end = float(_exact_reverse_kl(policy, theta.detach(), teacher_table))
    assert end < 0.3 * start, (start, end)


@pytest.mark.parametrize("method,setting,words", [
    ("minillm", "params.generation_temperature=0.7", "temperature 1"),
    ("distillm", "params.capacity=2", "capacity (2)"),
    ("minillm", "grad_accum=2", "grad_accum=1"),
])
def test_settings_a_sampling_form_cannot_run_are_one_sentence_before_any_file(tiny, tmp_path, method, setting, words):
    result = runner.invoke(app, [
        "train", method, "--student", str(tiny / "student"), "--teacher", str(tiny / "teacher"),
        "--data", str(tiny / "prompts.jsonl"), "--output-dir", str(tmp_path / "out"), "--set", "batch_size=4",
        "--set", "prompt_style=compact", "--set", setting])
    assert result.exit_code == 2, result.output
    assert words in result.output and "Traceback" not in result.output
    assert not (tmp_path / "out").exists()


def test_minillm_rollouts_stop_at_the_models_last_position():
    """A prompt near the position limit of a model with learned position embeddings: the mixed sampler cuts
    the response where the positions end (it indexed past GPT-2's position table before: IndexError)."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    from kdbench.train.minillm import sample_mixed

    torch.manual_seed(0)
    student = GPT2LMHeadModel(GPT2Config(vocab_size=11, n_positions=8, n_embd=8, n_layer=1, n_head=1)).eval()
    teacher = GPT2LMHeadModel(GPT2Config(vocab_size=11, n_positions=12, n_embd=8, n_layer=1, n_head=1)).eval()
    for prompt_length, expected in ((6, 2), (8, 0)):
        response = sample_mixed(student, teacher, list(range(1, prompt_length + 1)), alpha=0.2, max_new_tokens=50,
                                eos_ids=set(), vocab=11, generator=torch.Generator().manual_seed(0))
        assert len(response) == expected
