"""`kdbench eval --suite my_suite.yaml --include-path tasks_dir`: a local lm-eval task from the CLI, scored as
lm-eval scores it (checked against lm_eval.simple_evaluate called directly on the same checkpoint)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

pytest.importorskip("lm_eval")
torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from kdbench import harness  # noqa: E402
from kdbench.cli import app  # noqa: E402
from test_harness import TOKENIZER_DIR, _offline, direct_simple_evaluate, mc_records  # noqa: E402,F401


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    if not TOKENIZER_DIR.is_dir():
        pytest.skip(f"shared GPT-2 tokenizer not found at {TOKENIZER_DIR}")
    folder = tmp_path_factory.mktemp("ckpt") / "tiny-gpt2"
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(TOKENIZER_DIR))
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=1, n_embd=32, n_head=2,
                                                                 vocab_size=len(tokenizer)))
    model.save_pretrained(str(folder))
    tokenizer.save_pretrained(str(folder))
    return folder


def _suite_file(folder: Path, body: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "my_suite.yaml"
    path.write_text(body)
    return path


SUITE = """name: my_suite
description: A local four-option task.
type: lm_eval
protocol: MINE
tasks:
  - task: toy_mc
    num_fewshot: 0
    metric: acc
"""


def test_suite_file_with_include_path_scores_what_lm_eval_scores(checkpoint, tmp_path):
    tasks_dir = tmp_path / "tasks_dir"
    harness.local_multiple_choice_task("toy_mc", mc_records(16), tasks_dir)
    suite = _suite_file(tmp_path / "suites", SUITE)
    result = CliRunner().invoke(app, ["eval", "--suite", str(suite), "--include-path", str(tasks_dir), "--model",
                                      str(checkpoint), "--output-dir", str(tmp_path / "runs"), "--batch-size", "4"])
    assert result.exit_code == 0, result.output
    run = tmp_path / "runs" / "eval-my_suite-tiny-gpt2"
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    (acc,) = [r for r in records if r["subset"] == "toy_mc" and r["metric"] == "acc"]
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(checkpoint))
    model = transformers.AutoModelForCausalLM.from_pretrained(str(checkpoint)).eval()
    direct = direct_simple_evaluate(model, tokenizer, "toy_mc", 0, str(tasks_dir), batch_size=4)
    assert acc["value"] == direct["acc,none"] and acc["n"] == 16 and acc["suite"] == "my_suite"
    assert json.loads((run / "run.json").read_text())["status"] == "complete"

    # the suite file may name its own task folder, relative to the file
    relative = _suite_file(tmp_path / "suites2", SUITE + "include_path: ../tasks_dir\n")
    result = CliRunner().invoke(app, ["eval", "--suite", str(relative), "--model", str(checkpoint), "--output-dir",
                                      str(tmp_path / "runs"), "--run-name", "relative", "--batch-size", "4"])
    assert result.exit_code == 0, result.output
    records = [json.loads(line) for line in (tmp_path / "runs" / "relative" / "metrics.jsonl").read_text().splitlines()]
    assert [r["value"] for r in records if r["subset"] == "toy_mc" and r["metric"] == "acc"] == [direct["acc,none"]]


def test_suite_file_errors_are_one_sentence(checkpoint, tmp_path):
    bad = _suite_file(tmp_path / "bad", SUITE.replace("num_fewshot: 0", "num_fewshot: 0\n    shots: 5"))
    result = CliRunner().invoke(app, ["eval", "--suite", str(bad), "--model", str(checkpoint), "--output-dir",
                                      str(tmp_path / "runs")])
    assert result.exit_code == 2 and "unknown key 'tasks[0].shots'" in result.output and str(bad) in result.output
    assert len(result.output.strip().splitlines()) == 1 and not (tmp_path / "runs").exists()
    suite = _suite_file(tmp_path / "good", SUITE)
    result = CliRunner().invoke(app, ["eval", "--suite", str(suite), "--include-path", str(tmp_path / "missing"),
                                      "--model", str(checkpoint), "--output-dir", str(tmp_path / "runs")])
    assert result.exit_code == 2 and "--include-path" in result.output and not (tmp_path / "runs").exists()
