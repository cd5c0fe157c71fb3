"""``kdbench eval`` on the real Dolly file with a tiny random GPT-2 (real GPT-2 tokenizer), five seeds:
every record the protocol asks for, checked against independent computations (rouge_score itself,
statistics.stdev, word counts of the references); a SIGKILL midway and a rerun that regenerates
nothing and ends with the same numbers as an uninterrupted run; one clear sentence (exit code 2, no
traceback) for each suite's missing or malformed file."""

from __future__ import annotations

import json
import os
import signal
import statistics
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
from typer.testing import CliRunner  # noqa: E402

from kdbench.cli import app  # noqa: E402
from kdbench.store import read_jsonl  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
DOLLY = SHARED / "data" / "dolly" / "minillm_processed" / "valid.jsonl"
GPT2_TOKENIZER = SHARED / "models" / "gpt2-tokenizer"
SEEDS = [10, 20, 30, 40, 50]
SUITES = ["dolly", "selfinst", "vicuna", "sinst", "uinst"]

if not (DOLLY.is_file() and GPT2_TOKENIZER.is_dir()):
    pytest.skip(f"shared GPT-2 tokenizer / Dolly data not found under {SHARED}", allow_module_level=True)

runner = CliRunner()


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)  # see tests/test_generate.py
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(GPT2_TOKENIZER))
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=len(tokenizer), n_positions=1024)
    path = tmp_path_factory.mktemp("model") / "tiny-gpt2"
    transformers.GPT2LMHeadModel(config).save_pretrained(str(path))
    tokenizer.save_pretrained(str(path))
    return path


def _eval_args(model_dir: Path, out: Path, *extra: str) -> list[str]:
    return ["eval", "--suite", "dolly", "--model", str(model_dir), "--data", str(DOLLY), "--limit", "50",
            "--set", "decoding.max_new_tokens=16", "--output-dir", str(out), "--run-name", "run", "--label", "tiny",
            *extra]


def _values(metrics: list[dict]) -> dict:
    return {(r["suite"], r["metric"], str(r["seed"]), r["subset"]): {k: v for k, v in r.items() if k != "run"}
            for r in metrics}


@pytest.mark.slow
def test_eval_writes_every_record_and_resumes_after_sigkill(tmp_path, model_dir):
    from rouge_score import rouge_scorer

    from kdbench.metrics import bucket_labels

    # --- an uninterrupted run (in-process) --------------------------------------------------
    result = runner.invoke(app, _eval_args(model_dir, tmp_path / "a"))
    assert result.exit_code == 0, result.output
    run_a = tmp_path / "a" / "run"
    metrics = read_jsonl(run_a / "metrics.jsonl")
    rows = [json.loads(line) for line in DOLLY.read_text().splitlines()[:50]]
    references = [r["output"] for r in rows]
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)

    def record(metric, seed, subset="all"):
        found = [r for r in metrics if r["metric"] == metric and str(r["seed"]) == str(seed) and r["subset"] == subset]
        assert len(found) == 1, (metric, seed, subset)
        return found[0]

    per_seed = {}
    for seed in SEEDS:
        generations = {g["id"]: g["output"] for g in read_jsonl(run_a / "generations" / "dolly" / f"seed{seed}.jsonl")}
        assert len(generations) == 50
        expected = 100 * statistics.fmean(scorer.score(ref, generations[f"dolly-{i}"])["rougeL"].fmeasure
                                          for i, ref in enumerate(references))
        got = record("rougeL", seed)
        assert got["n"] == 50 and got["value"] == pytest.approx(expected, abs=1e-9)
        per_seed[seed] = got["value"]
    mean = record("rougeL", "mean")
    assert mean["value"] == pytest.approx(statistics.fmean(per_seed.values()), abs=1e-9)
    assert mean["std"] == pytest.approx(statistics.stdev(per_seed.values()), abs=1e-9) and mean["std"] > 0
    assert mean["n_seeds"] == 5 and mean["ci_low"] < mean["value"] < mean["ci_high"]
    assert 0 <= record("exact_match", "mean")["value"] <= 100

    # length buckets: word count of the reference, right-closed (0,30], (30,70], (70,inf)
    words = [len(ref.split()) for ref in references]
    low, mid, high = bucket_labels([30, 70])
    expected_buckets = {low: sum(w <= 30 for w in words), mid: sum(30 < w <= 70 for w in words),
                        high: sum(w > 70 for w in words)}
    expected_categories = Counter(r["topic"] for r in rows)
    assert len(expected_categories) == 8
    for metric in ("rougeL", "exact_match"):
        for seed in SEEDS + ["mean"]:
            for bucket, count in expected_buckets.items():
                assert record(metric, seed, f"bucket:{bucket}")["n"] == count
            for category, count in expected_categories.items():
                assert record(metric, seed, f"category:{category}")["n"] == count
        for bucket in expected_buckets:
            r = record(metric, "mean", f"bucket:{bucket}")
            assert r["ci_low"] <= r["value"] <= r["ci_high"] and "std" in r
    scores = json.loads((run_a / "scores" / "dolly.json").read_text())
    assert set(scores["scores"]["rougeL"]) == {str(s) for s in SEEDS}

    # --- the same command in a subprocess, SIGKILLed midway ---------------------------------
    out_b = tmp_path / "b"
    generations_b = out_b / "run" / "generations" / "dolly"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    command = [sys.executable, "-m", "kdbench", *_eval_args(model_dir, out_b, "--batch-size", "4")]
    with open(tmp_path / "b.log", "w") as log:
        proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=tmp_path)
        deadline = time.time() + 300
        lines = 0
        while time.time() < deadline and proc.poll() is None:
            lines = sum(len(read_jsonl(p)) for p in generations_b.glob("seed*.jsonl"))
            if lines >= 60:  # seed 10 done, seed 20 under way
                break
            time.sleep(0.02)
        assert proc.poll() is None, f"the run ended before it could be killed:\n{(tmp_path / 'b.log').read_text()}"
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert 60 <= lines < 250
    assert json.loads((out_b / "run" / "run.json").read_text())["status"] == "running"
    # a write torn by the kill: the rerun must neither lose nor duplicate a record because of it
    torn = generations_b / "seed20.jsonl"
    with open(torn, "a") as handle:
        handle.write('{"id": "dolly-4')
    before = {p.name: p.read_bytes() for p in generations_b.glob("seed*.jsonl")}

    result = runner.invoke(app, _eval_args(model_dir, out_b))
    assert result.exit_code == 0, result.output
    assert "resuming" in result.output
    for name, old in before.items():
        new = (generations_b / name).read_bytes()
        kept = old if old.endswith(b"\n") or not old else old[:old.rfind(b"\n") + 1]
        assert new.startswith(kept)  # nothing already on disk was rewritten
        ids = [r["id"] for r in read_jsonl(generations_b / name)]
        assert len(ids) == 50 == len(set(ids)) and len(new.splitlines()) == 50  # ... or regenerated
    for seed in SEEDS:  # the same text for every example as the uninterrupted run
        a = {g["id"]: g["output"] for g in read_jsonl(run_a / "generations" / "dolly" / f"seed{seed}.jsonl")}
        b = {g["id"]: g["output"] for g in read_jsonl(generations_b / f"seed{seed}.jsonl")}
        assert a == b
    assert _values(read_jsonl(out_b / "run" / "metrics.jsonl")) == _values(metrics)


def _write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


GOOD = json.dumps({"instruction": "Name a colour.", "input": "", "output": "Blue."}) + "\n"
MALFORMED = {
    "bad JSON": (GOOD + '{"instruction": "x", "output": \n', "line 2 is not valid JSON"),
    "no output": (GOOD + json.dumps({"instruction": "Name a fruit."}) + "\n", "line 2: the row has no 'output' field"),
    "no instruction": (json.dumps({"input": "", "output": "Blue."}) + "\n", "line 1: the row has no 'instruction'"),
    "output not text": (json.dumps({"instruction": "x", "output": 3}) + "\n", "'output' must be a string"),
    "empty": ("\n", "holds no examples"),
}


def _assert_one_clear_error(result, expected: str):
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    lines = [line for line in result.output.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), result.output
    assert expected in " ".join(result.output.split()), result.output


@pytest.mark.parametrize("suite", SUITES)
def test_each_suites_missing_or_malformed_file_is_one_clear_sentence(tmp_path, model_dir, suite, monkeypatch):
    base = ["eval", "--suite", suite, "--model", str(model_dir), "--output-dir", str(tmp_path / "runs")]
    runner_wide = CliRunner(env={"COLUMNS": "400"})
    result = runner_wide.invoke(app, base + ["--data", str(tmp_path / "nowhere.jsonl")])
    _assert_one_clear_error(result, "does not exist")
    monkeypatch.setenv("KDBENCH_DATA", str(tmp_path / "empty-folder"))
    (tmp_path / "empty-folder").mkdir()
    result = runner_wide.invoke(app, base)
    _assert_one_clear_error(result, f"No {suite} data found under")
    for name, (text, expected) in MALFORMED.items():
        data = _write(tmp_path / name.replace(" ", "_") / "valid.jsonl", text)
        result = runner_wide.invoke(app, base + ["--data", str(data)])
        _assert_one_clear_error(result, expected)
    assert not (tmp_path / "runs").exists()
