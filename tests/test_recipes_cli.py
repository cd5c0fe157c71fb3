"""Every token-level recipe trains from the CLI (``kdbench train METHOD``) on the embedded benchmark's
data and writes a run directory with its model, model card and cost figures."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from kdbench.cli import app
from kdbench.synthetic.corpus import FILES
from tiny_models import build_tiny

RECIPES = ["sft", "kd", "rkl", "fkl_rkl", "jsd", "tvd", "skl", "srkl", "akl", "akl_r", "seqkd", "gkd"]
runner = CliRunner()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("recipes_cli")
    corpus, tokenizer = build_tiny(root)
    return root, corpus


def test_every_recipe_trains_from_the_cli(tiny, tmp_path):
    root, corpus = tiny
    for method in RECIPES:
        result = runner.invoke(app, [
            "train", method, "--student", str(root / "student"), "--teacher", str(root / "teacher"),
            "--data", str(corpus / FILES["student_train"]), "--valid-data", str(corpus / FILES["validation"]),
            "--output-dir", str(tmp_path), "--set", "max_steps=2", "--set", "batch_size=4",
            "--set", "prompt_style=compact", "--set", "save_steps=1", "--set", "logging_steps=1",
            "--set", f"cache_dir={tmp_path / 'cache'}", "--set", "generation_batch_size=64",
            *(["--set", "params.max_new_tokens=8"] if method in ("seqkd", "gkd") else []),
            *(["--set", "params.on_policy_fraction=1.0"] if method == "gkd" else []),
        ])
        assert result.exit_code == 0, f"{method}: {result.output}"
        run = tmp_path / f"{method}-seed1"
        assert (run / "model" / "config.json").is_file() and (run / "model" / "README.md").is_file()
        assert f"# {method} student" in (run / "model" / "README.md").read_text()
        cost = json.loads((run / "cost.json").read_text())
        for key in ("wall_seconds", "tokens_processed", "teacher_forward_tokens", "generated_tokens", "peak_rss_mb"):
            assert isinstance(cost[key], (int, float)), (method, key)
        assert cost["optimizer_steps"] == 2 and cost["tokens_processed"] > 0
        assert (cost["generated_tokens"] > 0) == (method in ("seqkd", "gkd")), method
        assert (cost["teacher_forward_tokens"] > 0) == (method not in ("sft", "seqkd")), method
        assert json.loads((run / "run.json").read_text())["status"] == "complete"
        assert not (run / "checkpoints").exists()


def test_topk_teacher_signal_from_the_cli(tiny, tmp_path):
    root, corpus = tiny
    args = ["train", "kd", "--student", str(root / "student"), "--teacher", str(root / "teacher"),
            "--data", str(corpus / FILES["student_train"]), "--valid-data", str(corpus / FILES["validation"]),
            "--output-dir", str(tmp_path), "--set", "max_steps=2", "--set", "batch_size=4",
            "--set", "prompt_style=compact", "--set", "teacher_signal=topk", "--set", "teacher_topk=8",
            "--set", f"cache_dir={tmp_path / 'cache'}"]
    first = runner.invoke(app, [*args, "--run-name", "a"])
    assert first.exit_code == 0, first.output
    cost = json.loads((tmp_path / "a" / "cost.json").read_text())
    assert cost["teacher_forward_tokens"] == 0 and cost["teacher_cache_build_seconds"] > 0
    assert cost["teacher_cache_forward_tokens"] > 0 and not cost["teacher_cache_reused"]
    second = runner.invoke(app, [*args, "--run-name", "b"])
    assert second.exit_code == 0, second.output
    cost = json.loads((tmp_path / "b" / "cost.json").read_text())
    assert cost["teacher_cache_reused"] and cost["teacher_cache_build_seconds"] == 0
    gkd = runner.invoke(app, [*args[:1], "gkd", *args[2:], "--run-name", "c"])
    assert gkd.exit_code == 2 and "teacher_signal=online" in gkd.output
