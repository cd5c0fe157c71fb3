"""kdbench.harness on a tiny random GPT-2: groups, checkpoint directories, restored state (offline).

Shares the model, tokenizer and helpers of tests/test_harness.py (split only to keep each file fast).
"""

from __future__ import annotations

import json
import os

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("lm_eval")

from kdbench import harness  # noqa: E402
from kdbench.store import RunDir  # noqa: E402
from test_harness import (  # noqa: E402,F401 - fixtures are used by name
    _offline, independent_choice_predictions, mc_records, model, suite, tasks_dir, tokenizer)


def test_group_reports_size_weighted_and_unweighted_means(model, tokenizer, tmp_path):
    small, large = mc_records(3, offset=100), mc_records(9, offset=200)
    harness.local_multiple_choice_task("toy_subject_a", small, tmp_path)
    harness.local_multiple_choice_task("toy_subject_b", large, tmp_path)
    (tmp_path / "toy_group.yaml").write_text(
        "group: toy_group\ntask:\n  - toy_subject_a\n  - toy_subject_b\n"
        "aggregate_metric_list:\n  - metric: acc\n    weight_by_size: true\nmetadata:\n  version: 1\n")
    result = harness.run_harness(model, tokenizer, include_path=str(tmp_path), suite=suite(
        {"task": "toy_group", "num_fewshot": 0, "metric": "acc", "average_uses": "subtask_mean"}))
    acc_a, _ = independent_choice_predictions(model, tokenizer, small)
    acc_b, _ = independent_choice_predictions(model, tokenizer, large)
    score = result.tasks["toy_group"]
    assert score.subtasks == {"toy_subject_a": pytest.approx(acc_a), "toy_subject_b": pytest.approx(acc_b)}
    assert score.value == pytest.approx((3 * acc_a + 9 * acc_b) / 12)  # lm-eval's size-weighted group
    assert score.subtask_mean == pytest.approx((acc_a + acc_b) / 2)    # OLL v1's unweighted mean
    assert score.n == 12
    assert result.averages["average"] == pytest.approx((acc_a + acc_b) / 2)

    run = RunDir.create(tmp_path / "runs", "r1", kind="eval", config={})
    records = result.to_metric_records(run, "toy-suite", include_subtasks=True)
    by_key = {(r["subset"], r["metric"]): r for r in records}
    assert by_key[("toy_group", "acc")]["value"] == pytest.approx(score.value)
    assert by_key[("toy_group", "acc")]["in_average"] is False
    assert by_key[("toy_group", "acc_subtask_mean")]["in_average"] is True
    assert by_key[("toy_group/toy_subject_b", "acc")]["n"] == 9
    assert by_key[("all", "average")]["value"] == pytest.approx(result.averages["average"])
    assert all(r["suite"] == "toy-suite" and r["run"] == "r1" and r["seed"] is None for r in records)
    assert by_key[("toy_group", "acc")]["harness"].endswith(f"via lm-eval {harness.lm_eval_version()}")
    run.write_metrics(records, replace_suite="toy-suite")
    assert len(run.metrics()) == len(records)
    summary = json.loads(json.dumps(result.to_dict()))
    assert summary["tasks"]["toy_group"]["subtask_mean"] == pytest.approx(score.subtask_mean)
    assert summary["suite"]["tasks"][0]["average_uses"] == "subtask_mean"


def test_checkpoint_directory_gives_the_same_numbers(model, tokenizer, tasks_dir, tmp_path):
    model.save_pretrained(tmp_path / "ckpt")
    tokenizer.save_pretrained(tmp_path / "ckpt")
    toy = suite({"task": "toy_mc", "num_fewshot": 0, "metric": "acc"})
    from_dir = harness.run_harness(tmp_path / "ckpt", suite=toy, include_path=tasks_dir, limit=8, device="cpu")
    in_memory = harness.run_harness(model, tokenizer, suite=toy, include_path=tasks_dir, limit=8)
    assert from_dir.tasks["toy_mc"].value == in_memory.tasks["toy_mc"].value
    assert from_dir.raw["results"]["toy_mc"] == in_memory.raw["results"]["toy_mc"]
    assert from_dir.tasks["toy_mc"].n == 8 and from_dir.limit == 8


def test_train_mode_rng_and_pad_token_are_restored(model, tokenizer, tasks_dir):
    tokenizer.pad_token = None  # the direct HFLM calls above set one
    model.train()
    torch.manual_seed(123)
    expected_next = torch.rand(3)
    torch.manual_seed(123)
    try:
        harness.run_harness(model, tokenizer, limit=4, include_path=tasks_dir,
                            suite=suite({"task": "toy_mc", "num_fewshot": 0, "metric": "acc"}))
        assert model.training
        assert torch.equal(torch.rand(3), expected_next)  # lm-eval's reseeding did not leak out
        assert tokenizer.pad_token is None
    finally:
        model.eval()
