"""Bad input to `kdbench judge ...`, as a table: each case exits with code 2 and one line of output (no
traceback), and leaves nothing half-written (no run directory, or one marked failed). Run in-process through
the CLI entry point (kdbench.cli.app), a few through a real subprocess."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from judge_server import FakeJudgeServer
from kdbench.cli import app
from kdbench.store import RunDir, append_jsonl

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
MT = DATA / "mt_bench"
AE = DATA / "alpaca_eval"
pytestmark = pytest.mark.skipif(not DATA.is_dir(), reason=f"shared test data not found at {DATA}")
KEY = "sk-bad-inputs-0f1e"


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture()
def env(monkeypatch, tmp_path):
    monkeypatch.setenv("KDBENCH_JUDGE_API_KEY", KEY)
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)
    monkeypatch.delenv("KDBENCH_DATA", raising=False)
    monkeypatch.setenv("KDBENCH_CACHE", str(tmp_path / "cache"))
    rows = [{"id": i, "question": f"Question {i}?", "output": f"answer {i}", "references": [f"answer {i}"]}
            for i in range(3)]
    for name, transform in (("student", lambda r: r), ("teacher", lambda r: {**r, "output": "no"})):
        run = RunDir.create(tmp_path / "runs", name, kind="eval", config={"label": name})
        append_jsonl(run.generations_path("vicuna", 10), [transform(r) for r in rows])
    RunDir.create(tmp_path / "runs", "empty", kind="eval", config={"label": "empty"})
    other = RunDir.create(tmp_path / "runs", "other", kind="eval", config={"label": "other"})
    append_jsonl(other.generations_path("vicuna", 10), [{**r, "id": r["id"] + 5} for r in rows])
    (tmp_path / "plain").mkdir()
    (tmp_path / "bad.jsonl").write_text('{"question_id": 81, "choices": [{"turns": ["a", "b"]}]}\n{not json\n')
    (tmp_path / "noturns.jsonl").write_text('{"question_id": 81, "answer": "a"}\n')
    (tmp_path / "list.json").write_text('{"instruction": "x", "output": "y"}')
    (tmp_path / "noout.json").write_text('[{"instruction": "x"}]')
    (tmp_path / "other.json").write_text('[{"instruction": "an instruction nobody asked", "output": "y"}]')
    (tmp_path / "file.txt").write_text("not a folder")
    (tmp_path / "templates").mkdir()
    (tmp_path / "emptydata").mkdir()
    return tmp_path


ANSWERS = str(MT / "model_answer" / "gpt-4.jsonl")
REFERENCE = str(AE / "results" / "gpt4_1106_preview" / "model_outputs.json")
OUTPUTS = str(AE / "results" / "alpaca-7b" / "model_outputs.json")
TEMPLATES = str(AE / "evaluators_configs")


def _mt(*extra):
    return ["mt-bench", "--answers", ANSWERS, "--data-dir", str(MT), "--limit", "2", "--judge-model", "gpt-4", *extra]


def _ae(*extra):
    return ["alpaca-eval", "--outputs", OUTPUTS, "--reference", REFERENCE, "--templates-dir", TEMPLATES,
            "--limit", "2", "--judge-model", "gpt-4", *extra]


def _pw(root, *extra, student="runs/student", teacher="runs/teacher"):
    return ["pairwise", "--student", str(root / student), "--teacher", str(root / teacher), "--data-dir", str(MT),
            "--judge-model", "gpt-4", *extra]


# (case id, args builder (root, closed url) -> args, expected words in the sentence)
CASES = [
    ("mt-missing-answers", lambda r, u: ["mt-bench", "--answers", str(r / "nope.jsonl"), "--data-dir", str(MT),
                                         "--judge-model", "gpt-4"], "not found"),
    ("mt-malformed-answers", lambda r, u: ["mt-bench", "--answers", str(r / "bad.jsonl"), "--data-dir", str(MT),
                                           "--judge-model", "gpt-4"], "line 2 is not valid JSON"),
    ("mt-answers-without-turns", lambda r, u: ["mt-bench", "--answers", str(r / "noturns.jsonl"), "--data-dir",
                                               str(MT), "--judge-model", "gpt-4"], "choices[0].turns"),
    ("mt-no-answers", lambda r, u: ["mt-bench", "--data-dir", str(MT), "--judge-model", "gpt-4"], "--answers"),
    ("mt-bad-mode", lambda r, u: _mt("--mode", "triple"), "--mode"),
    ("mt-pairwise-one-model", lambda r, u: _mt("--mode", "pairwise"), "exactly two"),
    ("mt-bad-reference", lambda r, u: _mt("--reference", "gpt-5"), "Unknown reference set"),
    ("mt-bad-answer-protocol", lambda r, u: _mt("--answer-protocol", "vllm"), "--answer-protocol"),
    ("mt-empty-data-dir", lambda r, u: ["mt-bench", "--answers", ANSWERS, "--data-dir", str(r / "emptydata"),
                                        "--judge-model", "gpt-4"], "not in --data-dir"),
    ("mt-data-dir-is-a-file", lambda r, u: ["mt-bench", "--answers", ANSWERS, "--data-dir", str(r / "file.txt"),
                                            "--judge-model", "gpt-4"], "not a folder"),
    ("mt-no-judge-model", lambda r, u: ["mt-bench", "--answers", ANSWERS, "--data-dir", str(MT)], "--judge-model"),
    ("mt-concurrency-0", lambda r, u: _mt("--concurrency", "0"), "--concurrency"),
    ("mt-max-retries-negative", lambda r, u: _mt("--max-retries", "-1"), "--max-retries"),
    ("mt-timeout-0", lambda r, u: _mt("--timeout-s", "0"), "--timeout-s must be a positive number of seconds"),
    ("mt-timeout-nan", lambda r, u: _mt("--timeout-s", "nan"), "--timeout-s"),
    ("mt-backoff-negative", lambda r, u: _mt("--backoff-s", "-1"), "--backoff-s"),
    ("mt-rpm-0", lambda r, u: _mt("--rpm", "0"), "--rpm"),
    ("mt-price-negative", lambda r, u: _mt("--price-in", "-1", "--price-out", "1"), "--price-in"),
    ("mt-limit-0", lambda r, u: _mt("--limit", "0"), "--limit"),
    ("mt-batch-size-0", lambda r, u: ["mt-bench", "--model", "x", "--batch-size", "0", "--judge-model", "gpt-4"],
     "--batch-size"),
    ("mt-missing-model", lambda r, u: ["mt-bench", "--model", str(r / "no-model"), "--data-dir", str(MT), "--limit",
                                       "1", "--judge-model", "gpt-4"], "does not exist"),
    ("mt-chat-template-without-fastchat", lambda r, u: ["mt-bench", "--model", str(r / "no-model"), "--chat-template",
                                                        "vicuna_v1.1", "--data-dir", str(MT), "--limit", "1",
                                                        "--judge-model", "gpt-4"], "--chat-template"),
    ("mt-no-out", lambda r, u: ["mt-bench", "--answers", ANSWERS, "--data-dir", str(MT), "--judge-model", "gpt-4"],
     "--out"),
    ("mt-out-is-a-file", lambda r, u: _mt("--out", str(r / "file.txt")), "is a file"),
    ("mt-out-holds-other-files", lambda r, u: _mt("--out", str(r / "runs")), "holds other files"),
    ("mt-unreachable-endpoint", lambda r, u: _mt("--base-url", u, "--max-retries", "0"), "Could not reach"),
    ("ae-bad-version", lambda r, u: _ae("--version", "3"), "--version"),
    ("ae-missing-outputs", lambda r, u: ["alpaca-eval", "--outputs", str(r / "nope.json"), "--reference", REFERENCE,
                                         "--judge-model", "gpt-4"], "not found"),
    ("ae-no-outputs", lambda r, u: ["alpaca-eval", "--reference", REFERENCE], "--outputs"),
    ("ae-outputs-not-a-list", lambda r, u: ["alpaca-eval", "--outputs", str(r / "list.json"), "--reference",
                                            REFERENCE, "--judge-model", "gpt-4"], "JSON list"),
    ("ae-output-missing", lambda r, u: ["alpaca-eval", "--outputs", str(r / "noout.json"), "--reference", REFERENCE,
                                        "--judge-model", "gpt-4"], "needs an instruction"),
    ("ae-no-reference", lambda r, u: ["alpaca-eval", "--outputs", OUTPUTS, "--judge-model", "gpt-4"], "--reference"),
    ("ae-nothing-matches", lambda r, u: ["alpaca-eval", "--outputs", str(r / "other.json"), "--reference", REFERENCE,
                                         "--templates-dir", TEMPLATES, "--judge-model", "gpt-4"], "matches"),
    ("ae-missing-templates", lambda r, u: _ae("--templates-dir", str(r / "templates")), "template"),
    ("ae-templates-dir-missing", lambda r, u: _ae("--templates-dir", str(r / "nope")), "--templates-dir"),
    ("ae-plain-folder", lambda r, u: ["alpaca-eval", "--outputs", str(r / "plain"), "--reference", REFERENCE],
     "not a kdbench run directory"),
    ("ae-missing-difficulty-file", lambda r, u: _ae("--instruction-difficulty", str(r / "nope.csv")), "does not exist"),
    ("pw-missing-student", lambda r, u: ["pairwise", "--teacher", str(r / "runs/teacher"), "--offline", "exact"],
     "--student"),
    ("pw-student-folder-missing", lambda r, u: _pw(r, student="runs/nope"), "not found"),
    ("pw-plain-folder", lambda r, u: _pw(r, student="plain"), "not a kdbench run directory"),
    ("pw-run-without-generations", lambda r, u: _pw(r, student="runs/empty"), "no generations"),
    ("pw-wrong-suite", lambda r, u: _pw(r, "--suite", "dolly"), "no generations for suite 'dolly'"),
    ("pw-wrong-seed", lambda r, u: _pw(r, "--seed", "99"), "seed 99"),
    ("pw-bad-offline-mode", lambda r, u: _pw(r, "--offline", "triple"), "--offline"),
    ("pw-bad-tie-margin", lambda r, u: _pw(r, "--offline", "rouge", "--tie-margin", "2"), "--tie-margin"),
    ("pw-different-prompts", lambda r, u: _pw(r, teacher="runs/other"), "answered different prompts"),
    ("pw-offline-without-references", lambda r, u: ["pairwise", "--student", OUTPUTS, "--teacher", OUTPUTS,
                                                    "--offline", "exact"], "reference answers"),
    ("pw-missing-references-file", lambda r, u: _pw(r, "--offline", "exact", "--references", str(r / "nope.jsonl")),
     "not found"),
    ("pw-no-judge-model", lambda r, u: ["pairwise", "--student", str(r / "runs/student"), "--teacher",
                                        str(r / "runs/teacher")], "--judge-model"),
    ("pw-unreachable-endpoint", lambda r, u: _pw(r, "--base-url", u, "--max-retries", "0"), "Could not reach"),
]


def _assert_clean_failure(result, root: Path, expected: str | None) -> None:
    output = result.output.strip()
    assert result.exit_code == 2, output
    assert "Traceback" not in output and len(output.splitlines()) == 1, output
    assert output.startswith("error: ") or output.startswith("Error: "), output
    if expected:
        assert expected in output, output
    out = root / "out"
    if out.exists():  # a run that started is marked failed, never left running or complete
        assert RunDir(out).info().get("status") == "failed", output


@pytest.mark.parametrize("case_id,build,expected", CASES, ids=[c[0] for c in CASES])
def test_bad_judge_input_is_one_sentence_exit_2(env, case_id, build, expected):
    args = build(env, f"http://127.0.0.1:{_closed_port()}/v1")
    if "--out" not in args and "--dry-run" not in args and case_id != "mt-no-out":
        args += ["--out", str(env / "out")]
    result = CliRunner().invoke(app, ["judge", *args])
    _assert_clean_failure(result, env, expected)


def test_missing_api_key_writes_nothing(env, monkeypatch):
    monkeypatch.delenv("KDBENCH_JUDGE_API_KEY")
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    for args in (_mt(), _ae(), _pw(env)):
        result = CliRunner().invoke(app, ["judge", *args, "--out", str(env / "out")])
        _assert_clean_failure(result, env, "No judge API key")
        assert not (env / "out").exists()


def test_rejected_key_marks_the_run_failed(env):
    with FakeJudgeServer(api_key="sk-some-other-key") as server:
        result = CliRunner().invoke(app, ["judge", *_mt("--base-url", server.url, "--out", str(env / "out"))])
    _assert_clean_failure(result, env, "HTTP 401")
    assert RunDir(env / "out").info()["status"] == "failed"


@pytest.mark.parametrize("args", [["mt-bench", "--answers", "/nonexistent/answers.jsonl", "--judge-model", "gpt-4",
                                   "--out", "OUT"],
                                  ["alpaca-eval", "--outputs", OUTPUTS, "--version", "3", "--out", "OUT"],
                                  ["pairwise", "--student", "/nonexistent", "--teacher", "/nonexistent", "--offline",
                                   "exact", "--out", "OUT"]],
                         ids=["mt-bench", "alpaca-eval", "pairwise"])
def test_bad_judge_input_through_a_real_process(env, args):
    command = [sys.executable, "-m", "kdbench", "judge", *[str(env / "out") if a == "OUT" else a for a in args]]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "KDBENCH_CACHE": str(env / "cache")})
    output = (done.stdout + done.stderr).strip()
    assert done.returncode == 2 and "Traceback" not in output and len(output.splitlines()) == 1, output
    assert not (env / "out").exists()


def test_eval_run_folders_are_accepted_by_every_judge_command(env):
    """`kdbench judge pairwise` and `alpaca-eval` read the generations `kdbench eval` writes (question, output,
    references); the judged runs' labels name the rows."""
    runs = env / "runs"
    result = CliRunner().invoke(app, ["judge", "pairwise", "--student", str(runs / "student"), "--teacher",
                                      str(runs / "teacher"), "--offline", "exact", "--out", str(env / "pw")])
    assert result.exit_code == 0, result.output
    records = [json.loads(line) for line in (env / "pw" / "metrics.jsonl").read_text().splitlines()]
    assert [(r["metric"], r["wins"], r["ties"], r["losses"], r["label"]) for r in records] == [
        ("omega", 3, 0, 0, "student")]
    with FakeJudgeServer(api_key=KEY) as server:
        result = CliRunner().invoke(app, ["judge", "alpaca-eval", "--outputs", str(runs / "student"), "--reference",
                                          str(runs / "teacher"), "--templates-dir", TEMPLATES, "--version", "1",
                                          "--judge-model", "gpt-4", "--base-url", server.url, "--out", str(env / "ae")])
        assert result.exit_code == 0, result.output
        assert server.total_calls() == 3
    (win_rate,) = [json.loads(line) for line in (env / "ae" / "metrics.jsonl").read_text().splitlines()
                   if json.loads(line)["metric"] == "win_rate"]
    assert win_rate["n"] == 3 and win_rate["label"] == "student" and win_rate["reference"] == "teacher"

    # `kdbench report` reads the judge runs like any run (no judge-specific reader)
    result = CliRunner().invoke(app, ["report", str(env / "pw"), str(env / "ae"), "--out", str(env / "report")])
    assert result.exit_code == 0, result.output
    assert "### vicuna: judged" in result.output and "### alpaca_eval_1: judged" in result.output
    row = next(line for line in result.output.splitlines() if line.startswith("| student") and "offline-exact" in line)
    cells = [cell.strip() for cell in row.strip("|").split("|")]
    assert cells[2:6] == ["100.00", "3", "0", "0"]  # omega, W, T, L of the student against the teacher
    assert 'id="judged-vicuna"' in (env / "report" / "report.html").read_text()
