"""Issue 19's second-tier token-level methods as recipes: ATKD (a token objective) and Q-KD (argmax and softmax,
guided forms on ADPA's stages), dense and top-k.

Each trains from the same call the CLI makes on the tiny models and overfits one batch with its own
distillation term falling (a sign-flipped term rises, and fails here); frozen models stay unchanged. ATKD's split
is over the whole optimizer step, so accumulation does not change the loss; it refuses the top-k cache in one
sentence."""

from __future__ import annotations

import json
import math

import pytest
import torch
from typer.testing import CliRunner

from kdbench.cli import app
from tiny_models import build_tiny, loss_log, train_tiny, write_tiny_data

runner = CliRunner()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("second_tier_token")
    corpus, _ = build_tiny(root)
    write_tiny_data(root, corpus, n=8, n_pairs=8)
    return root




GUIDED_STAGES = {"sft_settings": {"max_steps": 4}, "teacher_dpo_settings": {"max_steps": 4}, "max_new_tokens": 8}
CASES = {
    "atkd": ("atkd", {}, "prompts", None),  # mixed with CE toward gold the tiny teacher's term need not fall
    "atkd-alone": ("atkd", {"kd_ratio": 1.0}, "prompts", "atkd_per_token"),
    "q_argmax_kd": ("q_argmax_kd", GUIDED_STAGES, "prefs", "q_kd_per_token"),
    "q_argmax_kd-top5": ("q_argmax_kd", {**GUIDED_STAGES, "loss_topk": 5}, "prefs", "q_kd_per_token"),
    # the tiny teachers' softmax(beta A) is near uniform while CE(y_w) sharpens the student: gamma makes the term lead
    "q_softmax_kd": ("q_softmax_kd", {**GUIDED_STAGES, "q_beta": 1.0, "gamma": 10.0}, "prefs", "q_kd_per_token"),
    "q_softmax_kd-top5": ("q_softmax_kd", {**GUIDED_STAGES, "loss_topk": 5, "gamma": 10.0}, "prefs", "q_kd_per_token"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_each_recipe_overfits_one_batch_with_its_term_falling(tiny, tmp_path, case):
    from kdbench.store import hash_tree

    method, params, data, term = CASES[case]
    hashes = {name: hash_tree(tiny / name) for name in ("teacher", "student")}
    result = train_tiny(tiny, tmp_path, method, params, data=str(tiny / f"{data}.jsonl"))
    log = loss_log(result)
    losses = [r["loss"] for r in log]
    assert len(losses) == 12 and all(math.isfinite(v) for v in losses), (case, losses)
    assert sum(losses[-3:]) / 3 < 0.85 * losses[0], (case, losses)
    if term:  # the distillation term itself is minimised
        first, last = log[0][term], sum(r[term] for r in log[-3:]) / 3
        assert last < 0.9 * first, (case, first, last)
    assert {name: hash_tree(tiny / name) for name in hashes} == hashes
    assert result.run.complete and (result.model_dir / "model.safetensors").is_file()


def test_q_softmax_kd_takes_the_dpo_teachers_beta_unless_set(tiny, tmp_path):
    from kdbench.train.recipes import resolve_recipe

    assert resolve_recipe("q_softmax_kd").form_params.q_beta is None  # filled from teacher_dpo_beta (0.05) in training
    result = train_tiny(tiny, tmp_path, "q_softmax_kd", {**GUIDED_STAGES, "teacher_dpo_beta": 0.2},
                    data=str(tiny / "prefs.jsonl"), max_steps=1)
    assert result.run.complete


def test_atkd_split_is_over_the_optimizer_step(tiny):
    """The step's split (median of every micro-batch's u_t) and the per-micro-batch losses built on it add up to
    ATKD on the whole batch at once — what a per-micro-batch median would not give."""
    from types import SimpleNamespace

    from kdbench.data import PadCollator, build_dataset, load_examples
    from kdbench.losses.second_tier_token import atkd
    from kdbench.models import load_model
    from kdbench.train.objectives import Batch
    from kdbench.train.second_tier_token_forms import ATKDParams, _atkd, atkd_step_split
    from kdbench.train.trainer_base import StepTrainer
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(tiny / "student"))
    teacher, student = load_model(str(tiny / "teacher")), load_model(str(tiny / "student"))
    teacher.eval(), student.eval()
    dataset = build_dataset(load_examples(tiny / "prompts.jsonl"), tokenizer, style="compact", max_prompt_length=128,
                            max_length=256)
    collate = PadCollator(tokenizer.pad_token_id)
    items = [dataset[i] for i in range(8)]
    whole, halves = collate(items), [collate(items[:4]), collate(items[4:])]
    trainer = SimpleNamespace(teacher=teacher, logit_rows=None, args=SimpleNamespace(device=torch.device("cpu")),
                              accelerator=SimpleNamespace(num_processes=1), counters={"teacher_forward_tokens": 0})
    trainer.teacher_logits = lambda *a: StepTrainer.teacher_logits(trainer, *a)
    params = ATKDParams(kd_ratio=1.0)
    split = atkd_step_split(trainer, halves, params, True)
    assert split["tokens"] == int((whole["labels"][:, 1:] != -100).sum()) and split["easy"] + split["hard"] == split["tokens"]
    assert trainer.counters["teacher_forward_tokens"] == int(whole["attention_mask"].sum())  # the extra teacher pass

    def batch(b, step):
        with torch.no_grad():
            s = student(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits[:, :-1]
            t = teacher(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits[:, :-1]
        targets = b["labels"][:, 1:]
        return Batch(s, t, targets, (targets != -100).float(), step), (s, t, targets)

    summed = sum(float(_atkd(batch(b, split)[0], params)["loss"]) for b in halves) / split["tokens"]
    _, (s, t, targets) = batch(whole, {})
    expected = float(atkd(s, t, targets, alpha=params.alpha))
    assert summed == pytest.approx(expected, rel=1e-5)
    per_micro = sum(float(_atkd(batch(b, {})[0], params)["loss"]) for b in halves) / split["tokens"]
    assert per_micro != pytest.approx(expected, rel=1e-4)  # splitting each micro-batch on its own differs
    from kdbench.losses.second_tier_token import atkd_threshold, atkd_uncertainty

    own = atkd_threshold(atkd_uncertainty(batch(halves[0], {})[1][1], halves[0]["labels"][:, 1:]))
    assert float(own) != pytest.approx(float(split["threshold"]), rel=1e-6)  # the first half's own median
    assert atkd_step_split(trainer, halves[:1], params, True) == {}  # one micro-batch, one process: nothing extra


def test_atkd_refuses_the_topk_cache_in_one_sentence(tiny, tmp_path):
    result = runner.invoke(app, ["train", "atkd", "--student", str(tiny / "student"), "--teacher", str(tiny / "teacher"),
                                 "--data", str(tiny / "prompts.jsonl"), "--output-dir", str(tmp_path), "--set",
                                 "teacher_signal=topk", "--set", "max_steps=1"])
    assert result.exit_code == 2 and "top-k cache" in result.output and "teacher_signal=online" in result.output
    assert not any(tmp_path.glob("atkd-*"))


def test_atkd_trains_from_the_cli(tiny, tmp_path):
    result = runner.invoke(app, ["train", "atkd", "--student", str(tiny / "student"), "--teacher", str(tiny / "teacher"),
                                 "--data", str(tiny / "prompts.jsonl"), "--output-dir", str(tmp_path), "--set",
                                 "max_steps=2", "--set", "batch_size=2", "--set", "grad_accum=2", "--set",
                                 "prompt_style=compact", "--set", f"cache_dir={tmp_path / 'cache'}"])
    assert result.exit_code == 0, result.output
    cost = json.loads((tmp_path / "atkd-seed1" / "cost.json").read_text())
    # accumulation: the teacher runs twice per micro-batch (the step's split, then the loss)
    assert cost["teacher_forward_tokens"] == 2 * cost["tokens_processed"]
