"""The ``kdbench`` CLI through Typer's test runner: list, train on user-given models and data, clear
errors for bad input, the regression gate, the cache."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from kdbench.cli import app
from kdbench.synthetic.corpus import FILES
from tiny_models import build_tiny

runner = CliRunner()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A small corpus, a teacher and a student directory sharing its tokenizer."""
    root = tmp_path_factory.mktemp("tiny")
    corpus, tokenizer = build_tiny(root)
    data = root / "train.jsonl"
    rows = [json.loads(line) for line in open(corpus / FILES["student_train"])][:24]
    data.write_text("".join(json.dumps({k: r[k] for k in ("instruction", "input", "output")}) + "\n" for r in rows))
    return root


def _invoke(*args):
    result = runner.invoke(app, list(args))
    return result, result.output


def test_help_is_fast_and_lists_commands():
    started = time.time()
    proc = subprocess.run([sys.executable, "-m", "kdbench", "--help"], capture_output=True, text=True, timeout=60)
    elapsed = time.time() - started
    assert proc.returncode == 0
    for command in ("train", "eval", "check", "demo", "list", "cache", "judge", "report"):
        assert command in proc.stdout
    assert elapsed < 10, f"--help took {elapsed:.1f}s"
    imported = subprocess.run([sys.executable, "-c", "import sys, kdbench.cli; print('torch' in sys.modules)"],
                              capture_output=True, text=True, timeout=60)
    assert imported.stdout.strip() == "False"  # heavy imports stay lazy


def test_list_shows_one_line_per_entry():
    result, out = _invoke("list")
    assert result.exit_code == 0
    for name in ("sft", "kd", "rkl", "akl", "synthetic", "dolly", "mt_bench"):
        assert f"  {name} " in out
    result, out = _invoke("list", "nonsense")
    assert result.exit_code == 2 and "choose methods, suites or judges" in out


def test_train_sft_and_kd_on_user_models_and_data(tiny, tmp_path):
    for method in ("sft", "kd"):
        args = ["train", method, "--student", str(tiny / "student"), "--data", str(tiny / "train.jsonl"),
                "--output-dir", str(tmp_path), "--set", "max_steps=4", "--set", "batch_size=4",
                "--set", "prompt_style=compact", "--set", "save_steps=2"]
        if method == "kd":
            args += ["--teacher", str(tiny / "teacher"), "--set", "params.kd_ratio=0.3"]
        result, out = _invoke(*args)
        assert result.exit_code == 0, out
        run = tmp_path / f"{method}-seed1"
        assert (run / "model" / "config.json").is_file() and (run / "model" / "README.md").is_file()
        cost = json.loads((run / "cost.json").read_text())
        assert cost["optimizer_steps"] == 4 and cost["tokens_processed"] > 0
        assert (cost["teacher_forward_tokens"] > 0) == (method == "kd")
        info = json.loads((run / "run.json").read_text())
        assert info["status"] == "complete"
        assert not (run / "checkpoints").exists()
    config = (tmp_path / "kd-seed1" / "config.yaml").read_text()
    assert "kd_ratio: 0.3" in config


@pytest.mark.parametrize("case, expected", [
    ("missing_file", "Data file not found"),
    ("malformed_row", "line 2 is not valid JSON"),
    ("missing_field", "has no 'output'"),
    ("bad_model", "does not exist"),
    ("unknown_method", "Unknown method 'nope'"),
    ("bad_param", "has no parameter 'kd_rate'"),
    ("bad_setting", "Unknown setting lerning_rate"),
    ("no_teacher", "needs a teacher"),
])
def test_bad_input_is_one_clear_sentence(tiny, tmp_path, case, expected):
    good = tiny / "train.jsonl"
    bad = tmp_path / "bad.jsonl"
    method, student, data, extra = "kd", str(tiny / "student"), str(good), ["--teacher", str(tiny / "teacher")]
    if case == "missing_file":
        data = str(tmp_path / "nope.jsonl")
    elif case == "malformed_row":
        bad.write_text(good.read_text().splitlines()[0] + "\n{not json\n")
        data = str(bad)
    elif case == "missing_field":
        bad.write_text(json.dumps({"instruction": "hi", "input": ""}) + "\n")
        data = str(bad)
    elif case == "bad_model":
        student = str(tmp_path / "no-such-model")
    elif case == "unknown_method":
        method = "nope"
    elif case == "bad_param":
        extra += ["--set", "params.kd_rate=0.3"]
    elif case == "bad_setting":
        extra += ["--set", "lerning_rate=0.1"]
    elif case == "no_teacher":
        extra = []
    result, out = _invoke("train", method, "--student", student, "--data", data, "--output-dir", str(tmp_path / "runs"),
                          *extra)
    assert result.exit_code == 2, out
    assert expected in out
    assert "Traceback" not in out
    assert len([line for line in out.strip().splitlines() if line.strip()]) == 1
    assert not (tmp_path / "runs").exists()  # nothing half-written


def test_vocabulary_mismatch_is_caught_up_front(tiny, tmp_path):
    from transformers import AutoTokenizer

    from kdbench.models import make_model

    gpt2 = Path(__file__).resolve().parents[2] / "shared" / "models" / "gpt2-tokenizer"
    if not gpt2.is_dir():
        pytest.skip(f"the shared GPT-2 tokenizer is not at {gpt2}")
    tokenizer = AutoTokenizer.from_pretrained(str(gpt2))
    other = tmp_path / "gpt2-teacher"
    make_model("gpt2-nano", tokenizer, max_positions=64).save_pretrained(str(other))
    tokenizer.save_pretrained(str(other))
    result, out = _invoke("train", "kd", "--student", str(tiny / "student"), "--teacher", str(other),
                          "--data", str(tiny / "train.jsonl"), "--output-dir", str(tmp_path / "runs"))
    assert result.exit_code == 2 and "vocabularies differ" in out and "50257" in out


def test_cache_commands(tmp_path, monkeypatch):
    monkeypatch.setenv("KDBENCH_CACHE", str(tmp_path / "cache"))
    from kdbench.store import ArtifactStore

    ArtifactStore().get_or_build("demo-corpus", {"x": 1}, lambda folder: (folder / "f").write_text("1") and None)
    result, out = _invoke("cache", "where")
    assert out.strip() == str(tmp_path / "cache")
    result, out = _invoke("cache", "list")
    assert "demo-corpus" in out
    result, out = _invoke("cache", "clear", "--yes")
    assert "removed 1 artifact" in out


def test_seeds_and_sweep_expand_into_named_runs(tiny, tmp_path):
    result, out = _invoke("train", "kd", "--student", str(tiny / "student"), "--teacher", str(tiny / "teacher"),
                          "--data", str(tiny / "train.jsonl"), "--output-dir", str(tmp_path),
                          "--set", "max_steps=2", "--set", "batch_size=4", "--set", "prompt_style=compact",
                          "--seeds", "1,2", "--sweep", "params.kd_ratio=0.2,0.8")
    assert result.exit_code == 0, out
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["kd-kd_ratio0.2-seed1", "kd-kd_ratio0.2-seed2", "kd-kd_ratio0.8-seed1", "kd-kd_ratio0.8-seed2"]
    assert "kd_ratio: 0.8" in (tmp_path / "kd-kd_ratio0.8-seed2" / "config.yaml").read_text()
    assert "seed: 2" in (tmp_path / "kd-kd_ratio0.8-seed2" / "config.yaml").read_text()
    result, out = _invoke("train", "kd", "--student", str(tiny / "student"), "--data", str(tiny / "train.jsonl"),
                          "--teacher", str(tiny / "teacher"), "--sweep", "params.kd_ratio=0.2,7")
    assert result.exit_code == 2 and "kd_ratio" in out


def test_student_derive_command(tiny, tmp_path):
    result, out = _invoke("student", "derive", str(tiny / "teacher"), str(tmp_path / "pruned"), "--layers", "1")
    assert result.exit_code == 0, out
    assert "kept layers [0]" in out and (tmp_path / "pruned" / "config.json").is_file()
    result, out = _invoke("student", "derive", str(tmp_path / "nope"), str(tmp_path / "x"), "--layers", "1")
    assert result.exit_code == 2 and "does not exist" in out
