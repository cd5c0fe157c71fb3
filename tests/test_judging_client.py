"""The judge client against a real local HTTP server (tests/judge_server.py) with injected faults."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from judge_server import REPORTED_MODEL, FakeJudgeServer, prompt_id
from kdbench.errors import KdbenchError
from kdbench.judging.client import ClientSettings, JudgeCall, JudgeClient
from kdbench.store import read_jsonl

KEY = "sk-test-SECRET-7f3a9c"
FAST = dict(timeout_s=0.5, backoff_initial_s=0.01, backoff_max_s=0.05)


def _calls(n: int, tag: str = "q") -> list[JudgeCall]:
    return [JudgeCall.make([{"role": "system", "content": "judge"}, {"role": "user", "content": f"{tag}{i} [[rating]]"}],
                           temperature=0, max_tokens=16) for i in range(n)]


def _client(server, tmp_path, **overrides) -> JudgeClient:
    settings = ClientSettings(model="gpt-4", base_url=server.url, concurrency=overrides.pop("concurrency", 8),
                              **{**FAST, **overrides})
    return JudgeClient(settings, cache_path=tmp_path / "cache.jsonl", api_key=KEY)


def _pid(call: JudgeCall) -> str:
    return prompt_id(call.message_dicts())


def test_every_fault_is_retried_or_counted_and_none_is_lost(tmp_path):
    calls = _calls(60)
    pids = [_pid(c) for c in calls]
    plan = {}
    for i, pid in enumerate(pids):
        plan[pid] = [["429", "500"], ["timeout"], ["drop", "429"], ["garbage"], ["500"] * 10, []][i % 6]

    def faults(pid, attempt):
        sequence = plan[pid]
        return sequence[attempt - 1] if attempt <= len(sequence) else None

    with FakeJudgeServer(api_key=KEY, faults=faults, timeout_sleep_s=1.0) as server:
        client = _client(server, tmp_path, max_retries=4)
        replies = client.complete(calls)
    assert len(replies) == len(calls)
    always_failing = [i for i in range(60) if i % 6 == 4]
    for i, reply in enumerate(replies):
        if i in always_failing:
            assert not reply.ok and reply.error == "http_500" and reply.attempts == 5
        else:
            assert reply.ok and reply.model_reported == REPORTED_MODEL
    garbage = [replies[i] for i in range(60) if i % 6 == 3]
    assert all(r.content == "I cannot decide, both are nice." for r in garbage)  # delivered, parse fails later
    stats = client.stats
    assert stats.calls_made + stats.calls_failed == 60 and stats.calls_failed == len(always_failing)
    assert stats.failures == {"http_500": len(always_failing)}
    assert stats.models_reported == {REPORTED_MODEL: 60 - len(always_failing)}
    assert len(read_jsonl(tmp_path / "cache.jsonl")) == 60 - len(always_failing)
    # every fault kind really happened
    assert {"429", "500", "timeout", "drop", "garbage"} <= set(server.fault_log)


def test_rerun_uses_cache_and_retries_only_failures(tmp_path):
    calls = _calls(20)
    broken = {_pid(c) for c in calls[:3]}
    state = {"broken": True}
    with FakeJudgeServer(api_key=KEY, faults=lambda pid, a: "500" if state["broken"] and pid in broken else None) as server:
        first = _client(server, tmp_path, max_retries=1).complete(calls)
        assert sum(not r.ok for r in first) == 3
        before = server.total_calls()
        state["broken"] = False
        client = _client(server, tmp_path)
        second = client.complete(calls)
        assert server.total_calls() - before == 3  # only the failed ones
        assert all(r.ok for r in second) and client.stats.calls_cached == 17
        before = server.total_calls()
        third = _client(server, tmp_path)
        assert all(r.cached for r in third.complete(calls)) and server.total_calls() == before
        assert third.stats.calls_made == 0 and third.stats.prompt_tokens_cached > 0


def test_duplicate_calls_are_made_once_and_concurrency_is_bounded(tmp_path):
    calls = _calls(30) * 2
    with FakeJudgeServer(api_key=KEY, latency_s=0.05) as server:
        replies = _client(server, tmp_path, concurrency=4).complete(calls)
    assert server.total_calls() == 30 and len(replies) == 60
    assert [r.content for r in replies[:30]] == [r.content for r in replies[30:]]
    assert server.max_in_flight <= 4


def test_requests_per_minute_limit(tmp_path):
    with FakeJudgeServer(api_key=KEY) as server:
        client = _client(server, tmp_path, requests_per_minute=600)  # one start per 0.1 s
        started = time.monotonic()
        client.complete(_calls(8))
        assert time.monotonic() - started >= 0.65


def test_dry_run_counts_uncached_calls_and_tokens(tmp_path):
    calls = _calls(10)
    with FakeJudgeServer(api_key=KEY) as server:
        _client(server, tmp_path).complete(calls[:4])
        estimate = _client(server, tmp_path).dry_run(calls + calls[:2])
        assert server.total_calls() == 4
    assert (estimate.calls_total, estimate.calls_cached, estimate.calls_to_make) == (10, 4, 6)
    assert estimate.completion_tokens_max == 6 * 16
    assert estimate.prompt_tokens_estimate == sum(-(-c.prompt_chars() // 4) for c in calls[4:])
    assert estimate.estimated_cost_usd_max == pytest.approx(
        (estimate.prompt_tokens_estimate * 30 + estimate.completion_tokens_max * 60) / 1e6)
    assert "6 judge calls" in estimate.describe()


def test_user_errors_are_one_sentence_kdbench_errors(tmp_path, monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    monkeypatch.delenv("KDBENCH_JUDGE_API_KEY", raising=False)
    with FakeJudgeServer(api_key=KEY) as server:
        settings = ClientSettings(model="gpt-4", base_url=server.url, **FAST)
        with pytest.raises(KdbenchError, match="No judge API key"):
            JudgeClient(settings, cache_path=tmp_path / "c.jsonl").complete(_calls(1))
        with pytest.raises(KdbenchError, match="rejected the API key"):
            JudgeClient(settings, cache_path=tmp_path / "c.jsonl", api_key="wrong").complete(_calls(1))
        port = int(server.url.rsplit(":", 1)[1].split("/")[0])
    settings = ClientSettings(model="gpt-4", base_url=f"http://127.0.0.1:{port}/v1", max_retries=2, **FAST)
    with pytest.raises(KdbenchError, match="Could not reach the judge endpoint"):
        JudgeClient(settings, cache_path=tmp_path / "c.jsonl", api_key=KEY).complete(_calls(3))


_WORKER = r"""
import sys
sys.path[:0] = [sys.argv[1], sys.argv[2]]
from kdbench.judging.client import ClientSettings, JudgeCall, JudgeClient
calls = [JudgeCall.make([{"role": "system", "content": "judge"}, {"role": "user", "content": f"k{i} [[rating]]"}],
                        temperature=0, max_tokens=16) for i in range(int(sys.argv[5]))]
settings = ClientSettings(model="gpt-4", base_url=sys.argv[3], concurrency=4, timeout_s=5)
replies = JudgeClient(settings, cache_path=sys.argv[4]).complete(calls)
print("DONE", sum(r.ok for r in replies), flush=True)
"""


def test_sigkill_then_restart_repeats_no_cached_call(tmp_path):
    repo = Path(__file__).resolve().parents[1]
    cache = tmp_path / "cache.jsonl"
    n = 80
    with FakeJudgeServer(api_key=KEY, latency_s=0.03) as server:
        env = {**os.environ, "KDBENCH_JUDGE_API_KEY": KEY}
        args = [sys.executable, "-c", _WORKER, str(repo), str(repo / "tests"), server.url, str(cache), str(n)]
        worker = subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 30
        while len(read_jsonl(cache)) < 15 and time.monotonic() < deadline:
            time.sleep(0.01)
        os.kill(worker.pid, signal.SIGKILL)
        worker.wait()
        cached_keys = {r["key"] for r in read_jsonl(cache)}
        assert 15 <= len(cached_keys) < n
        calls = [JudgeCall.make([{"role": "system", "content": "judge"}, {"role": "user", "content": f"k{i} [[rating]]"}],
                                temperature=0, max_tokens=16) for i in range(n)]
        cached_pids = {_pid(c) for c in calls if c.cache_key("gpt-4") in cached_keys}
        calls_before = dict(server.calls)
        done = subprocess.run(args, env=env, capture_output=True, text=True, timeout=60)
        assert "DONE 80" in done.stdout, done.stderr[-2000:]
        repeated = [pid for pid in cached_pids if server.calls[pid] != calls_before.get(pid, 0)]
        assert repeated == []
        assert len({r["key"] for r in read_jsonl(cache)}) == n
    for path in tmp_path.rglob("*"):
        if path.is_file():
            assert KEY not in path.read_text(errors="replace")
