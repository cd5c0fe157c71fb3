"""Judge fault injection through `kdbench judge` (real HTTP, real openai client): a 200 whose body is not JSON and
a 200 whose body is cut off in transit, among valid responses, are each one failed judgment, counted and retried
like a 5xx; every other judgment completes; a rerun calls the judge only for them. Credentials inside the base
URL never reach a file, and the run directory is marked failed when the endpoint rejects the key."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from judge_server import FakeJudgeServer
from kdbench.cli import app
from kdbench.store import RunDir, read_jsonl

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
pytestmark = pytest.mark.skipif(not DATA.is_dir(), reason=f"shared test data not found at {DATA}")
KEY = "sk-faults-SECRET-9a8b"
FAST = ["--timeout-s", "2", "--backoff-s", "0.01", "--max-retries", "2", "--concurrency", "1"]


@pytest.fixture()
def env(monkeypatch, tmp_path):
    monkeypatch.setenv("KDBENCH_JUDGE_API_KEY", KEY)
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)
    monkeypatch.setenv("KDBENCH_CACHE", str(tmp_path / "cache"))
    return tmp_path


def _judge(args: list[str]):
    return CliRunner().invoke(app, ["judge", *args])


def test_bad_json_and_truncated_bodies_fail_one_judgment_each_and_a_rerun_calls_only_for_them(env):
    doomed: dict[str, str] = {}

    def faults(pid: str, attempt: int) -> str | None:  # the first two prompts seen: one bad body each, every attempt
        if pid not in doomed and len(doomed) < 2:
            doomed[pid] = ("badjson", "truncated")[len(doomed)]
        return doomed.get(pid)

    args = ["mt-bench", "--answers", str(DATA / "mt_bench/model_answer/gpt-4.jsonl"), "--data-dir",
            str(DATA / "mt_bench"), "--limit", "5", "--judge-model", "gpt-4", "--out", str(env / "mt"), *FAST]
    with FakeJudgeServer(api_key=KEY, faults=faults) as server:
        result = _judge(args + ["--base-url", server.url])
        assert result.exit_code == 0, result.output
        assert server.fault_log == {"badjson": 3, "truncated": 3}  # 1 attempt + 2 retries each
        assert sum(server.successes.values()) == 8  # every other judgment completed
    records = read_jsonl(env / "mt" / "judgments.jsonl")
    failed = [r for r in records if r["error"]]
    assert len(records) == 10 and len(failed) == 2
    assert {r["error"] for r in failed} == {"malformed_response", "connection_error"}
    assert all(r["score"] == -1 for r in failed)
    overall = [r for r in read_jsonl(env / "mt" / "metrics.jsonl") if r["metric"] == "overall" and r["subset"] == "all"]
    assert overall[0]["n_failed"] == 2 and overall[0]["n"] == 8
    cost = json.loads((env / "mt" / "cost.json").read_text())["judge"]
    assert cost["calls_failed"] == 2 and cost["retries"] == 4 and cost["calls_made"] == 8
    assert "2 failed" in result.output

    with FakeJudgeServer(api_key=KEY) as server:  # the endpoint behaves now: only the two failed calls are made
        result = _judge(args + ["--base-url", server.url])
        assert result.exit_code == 0, result.output
        assert set(server.calls) == set(doomed) and server.total_calls() == 2
    assert not [r for r in read_jsonl(env / "mt" / "judgments.jsonl") if r["error"]]


def test_credentials_in_the_base_url_are_never_written_and_a_rejected_key_fails_the_run(env):
    students = [{"id": i, "prompt": f"Question {i}?", "output": f"answer {i}"} for i in range(3)]
    (env / "a.jsonl").write_text("".join(json.dumps(r) + "\n" for r in students))
    (env / "b.jsonl").write_text("".join(json.dumps({**r, "output": "other"}) + "\n" for r in students))
    with FakeJudgeServer(api_key="sk-another-key") as server:
        url = server.url.replace("http://", "http://alice:hunter2-PASSWORD@")
        result = _judge(["pairwise", "--student", str(env / "a.jsonl"), "--teacher", str(env / "b.jsonl"),
                         "--data-dir", str(DATA / "mt_bench"), "--judge-model", "gpt-4", "--base-url", url,
                         "--out", str(env / "pw"), *FAST])
    assert result.exit_code == 2 and "rejected the API key (HTTP 401)" in result.output
    assert len(result.output.strip().splitlines()) == 1 and "Traceback" not in result.output
    info = RunDir(env / "pw").info()
    assert info["status"] == "failed" and "401" in info["error"]
    assert "***@127.0.0.1" in (env / "pw" / "config.yaml").read_text()
    for path in env.rglob("*"):
        if path.is_file():
            text = path.read_text(errors="replace")
            assert "hunter2-PASSWORD" not in text and KEY not in text, path
