"""`kdbench judge ...` end to end through the CLI entry point against the local fake judge server (real HTTP,
real openai client); every command writes a run directory (run.json, metrics.jsonl, judgments.jsonl)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from typer.testing import CliRunner

from judge_server import REPORTED_MODEL, FakeJudgeServer
from kdbench.cli import app
from kdbench.judging import alpaca_eval as ae
from kdbench.store import RunDir, append_jsonl, read_jsonl

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
pytestmark = pytest.mark.skipif(not DATA.is_dir(), reason=f"shared test data not found at {DATA}")
KEY = "sk-cli-SECRET-0c1d2e"
FAST = ["--timeout-s", "2", "--backoff-s", "0.01", "--max-retries", "3"]


@pytest.fixture()
def env(monkeypatch, tmp_path):
    monkeypatch.setenv("KDBENCH_JUDGE_API_KEY", KEY)
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)
    monkeypatch.setenv("KDBENCH_CACHE", str(tmp_path / "cache"))
    return tmp_path


def _invoke(args):
    result = CliRunner().invoke(app, ["judge", *args], catch_exceptions=True)
    if result.exception and not isinstance(result.exception, SystemExit):
        raise result.exception
    assert result.exit_code == 0, result.output
    return result.output


def _metric(run_dir: Path, metric: str, subset: str = "all", label: str | None = None) -> dict:
    """The one record of ``metric`` (and subset, label) in a judge run's metrics.jsonl."""
    found = [r for r in read_jsonl(run_dir / "metrics.jsonl") if r["metric"] == metric and r["subset"] == subset
             and (label is None or r["label"] == label)]
    assert len(found) == 1, (metric, subset, label, found)
    return found[0]


def _assert_no_key(root: Path):
    for path in root.rglob("*"):
        if path.is_file():
            assert KEY not in path.read_text(errors="replace"), path


def _length_responder(messages, params):
    """P(m) = 0.8 when the output shown first is longer, else 0.2 (an independent, checkable rule)."""
    user = messages[-1]["content"]
    outputs = user.split('"output": """')[1:]
    first, second = (o.split('"""', 1)[0] for o in outputs)
    p_m = 0.8 if len(first) > len(second) else 0.2
    return ("m" if p_m > 0.5 else "M"), [{"token": "m", "logprob": math.log(p_m)},
                                          {"token": "M", "logprob": math.log(1 - p_m)}]


def test_alpaca_eval_2_end_to_end(env):
    results = DATA / "alpaca_eval" / "results"
    model = json.loads((results / "alpaca-7b/model_outputs.json").read_text())[:40]
    model[5]["output"] = json.loads((results / "gpt4_1106_preview/model_outputs.json").read_text())[5]["output"]
    outputs = env / "alpaca-7b.json"
    outputs.write_text(json.dumps(model))
    with FakeJudgeServer(api_key=KEY, responder=_length_responder,
                         faults=lambda pid, a: "429" if a == 1 and int(pid, 16) % 4 == 0 else None) as server:
        out = _invoke(["alpaca-eval", "--outputs", str(outputs), "--version", "2",
                       "--reference", str(results / "gpt4_1106_preview/model_outputs.json"),
                       "--templates-dir", str(DATA / "alpaca_eval/evaluators_configs"), "--limit", "40",
                       "--judge-model", "gpt-4-1106-preview", "--base-url", server.url, "--out", str(env / "ae"), *FAST])
        assert sum(server.successes.values()) == 39  # identical outputs (row 5) need no call
    info = RunDir(env / "ae").info()
    assert info["status"] == "complete" and info["kind"] == "judge" and info["protocol"] == "alpaca_eval_2"
    records = [json.loads(line) for line in (env / "ae/judgments.jsonl").read_text().splitlines()]
    reference = json.loads((results / "gpt4_1106_preview/model_outputs.json").read_text())[:40]
    expected = []
    for ref, mine in zip(reference, model):
        if ref["output"] == mine["output"]:
            expected.append(1.5)
        else:  # P(reference better) = 0.8 if the reference is longer
            expected.append(2 - (0.8 if len(ref["output"]) > len(mine["output"]) else 0.2))
    assert [r["preference"] for r in records] == pytest.approx(expected)
    win_rate = _metric(env / "ae", "win_rate")
    assert win_rate["value"] == pytest.approx(ae.win_rate(expected)["win_rate"])
    assert win_rate["stderr"] == pytest.approx(ae.win_rate(expected)["standard_error"])
    assert win_rate["n"] == 40 and win_rate["n_failed"] == 0
    assert (win_rate["judge"], win_rate["protocol"], win_rate["label"]) == ("gpt-4-1106-preview", "alpaca_eval_2",
                                                                            "alpaca-7b")
    assert not [r for r in read_jsonl(env / "ae/metrics.jsonl") if r["metric"] == "length_controlled_winrate"]
    assert "LC n/a" in out and "LC n/a" in info["length_controlled_note"]
    assert _metric(env / "ae", "avg_length")["value"] == int(sum(len(m["output"]) for m in model) / 40)
    assert info["judge_models_reported"] == {REPORTED_MODEL: 39}
    assert any(r["is_switched_outputs"] for r in records) and not all(r["is_switched_outputs"] for r in records)
    _assert_no_key(env)


def test_mt_bench_single_end_to_end_and_rerun_is_free(env):
    answers = DATA / "mt_bench/model_answer/gpt-4.jsonl"
    with FakeJudgeServer(api_key=KEY, faults=lambda pid, a: "garbage" if int(pid, 16) % 5 == 0 else None) as server:
        args = ["mt-bench", "--answers", str(answers), "--data-dir", str(DATA / "mt_bench"), "--limit", "12",
                "--judge-model", "gpt-4", "--base-url", server.url, "--out", str(env / "mt"), *FAST]
        _invoke(args)
        first = server.total_calls()
        assert first == 24
        # the fault plan is deterministic: exactly the prompts whose id is divisible by 5 got garbage
        garbage = sum(int(pid, 16) % 5 == 0 for pid in server.calls)
        assert len(server.calls) == 24 and garbage > 0
        dry = _invoke(args + ["--dry-run"])
        assert "0 judge calls to make (24 of 24 cached)" in dry
        _invoke(args)
        assert server.total_calls() == first
    records = [json.loads(line) for line in (env / "mt/judgments.jsonl").read_text().splitlines()]
    assert len(records) == 24 and {r["judge"][0] for r in records} == {"gpt-4"}
    failed = sum(r["score"] == -1 for r in records)
    assert failed == garbage
    overall = _metric(env / "mt", "overall", label="gpt-4")
    valid = [r["score"] for r in records if r["score"] != -1]
    assert overall["value"] == pytest.approx(sum(valid) / len(valid)) and overall["n_failed"] == failed
    assert overall["n"] == len(valid) and (overall["judge"], overall["protocol"]) == ("gpt-4", "mt_bench")
    for turn in (1, 2):
        scores = [r["score"] for r in records if r["score"] != -1 and r["turn"] == turn]
        assert _metric(env / "mt", f"turn_{turn}")["value"] == pytest.approx(sum(scores) / len(scores))
    assert RunDir(env / "mt").info()["status"] == "complete"
    assert {r["judge"][1] for r in records} == {"single-v1", "single-v1-multi-turn"}  # first 12: writing, roleplay
    _assert_no_key(env)


def _run_dir(root: Path, name: str, rows: list[dict]) -> Path:
    run = RunDir.create(root, name, kind="eval", config={"model": name})
    append_jsonl(run.generations_path("vicuna", 10), rows)
    return run.path


def test_pairwise_llm_and_offline(env):
    from kdbench.store import read_jsonl

    vicuna = read_jsonl(DATA / "vicuna80/minillm_processed/valid.jsonl")[:20]
    student = [{"id": i, "prompt": r["instruction"], "output": r["output"][: len(r["output"]) // 3],
                "references": [r["output"]]} for i, r in enumerate(vicuna)]
    teacher = [{"id": i, "prompt": r["instruction"], "output": r["output"] if i % 2 else "No idea."}
               for i, r in enumerate(vicuna)]
    s_dir, t_dir = _run_dir(env / "runs", "student", student), _run_dir(env / "runs", "teacher", teacher)

    judged_orders = []  # (answer A, answer B) of every request that reached the judge

    def longer_wins(messages, params):
        text = messages[-1]["content"]
        a = text.split("[The Start of Assistant A's Answer]\n")[1].split("\n[The End of Assistant A's Answer]")[0]
        b = text.split("[The Start of Assistant B's Answer]\n")[1].split("\n[The End of Assistant B's Answer]")[0]
        judged_orders.append((a.strip(), b.strip()))
        return ("[[A]]" if len(a) > len(b) else "[[B]]"), None

    doomed = {}

    def faults(pid, attempt):  # one prompt always fails: reported as failed, out of the denominator
        if not doomed:
            doomed["pid"] = pid
        return "500" if pid == doomed["pid"] else None

    with FakeJudgeServer(api_key=KEY, responder=longer_wins, faults=faults) as server:
        out = _invoke(["pairwise", "--student", str(s_dir), "--teacher", str(t_dir), "--data-dir", str(DATA / "mt_bench"),
                       "--judge-model", "gpt-4o-2024-08-06", "--base-url", server.url, "--out", str(env / "pw"),
                       "--concurrency", "1", *FAST])
    summary = _metric(env / "pw", "omega")
    # the doomed request's prompt is the one judged in a single order; the others were judged in both, and the
    # longer answer wins each order: the student wins exactly the judged prompts where its answer is longer
    orders = [sum(pair in judged_orders for pair in ((s["output"].strip(), t["output"].strip()),
                                                     (t["output"].strip(), s["output"].strip())))
              for s, t in zip(student, teacher)]
    assert sorted(orders) == [1] + [2] * 19
    judged = [(s, t) for (s, t), n in zip(zip(student, teacher), orders) if n == 2]
    expected_wins = sum(len(s["output"].strip()) > len(t["output"].strip()) for s, t in judged)
    expected_losses = sum(len(s["output"].strip()) < len(t["output"].strip()) for s, t in judged)
    assert summary["n_failed"] == 1 and summary["n"] == 19 and len(read_jsonl(env / "pw/judgments.jsonl")) == 20
    assert (summary["wins"], summary["losses"]) == (expected_wins, expected_losses)
    assert summary["wins"] + summary["ties"] + summary["losses"] == 19
    assert summary["value"] == pytest.approx((summary["wins"] - summary["losses"]) / 19 * 100)
    assert (summary["suite"], summary["label"], summary["opponent"]) == ("vicuna", "student", "teacher")
    assert "judge failures 1" in out

    out = _invoke(["pairwise", "--student", str(s_dir), "--teacher", str(t_dir), "--offline", "rouge",
                   "--out", str(env / "off")])
    info = RunDir(env / "off").info()
    assert "not an LLM judgment" in info["judge_label"] and "not an LLM judgment" in out
    omega = _metric(env / "off", "omega")
    assert omega["n"] == 20 and omega["n_failed"] == 0 and omega["judge"] == "offline-rouge-margin0.05"
    _assert_no_key(env)


def test_missing_answers_and_missing_key_are_one_sentence_exit_2(env, monkeypatch):
    result = CliRunner().invoke(app, ["judge", "alpaca-eval", "--outputs", str(env / "nope.json"), "--reference",
                                      str(env / "nope.json"), "--judge-model", "x", "--out", str(env / "o")])
    assert result.exit_code == 2 and "not found" in result.output and "Traceback" not in result.output
    assert not (env / "o").exists()
    monkeypatch.delenv("KDBENCH_JUDGE_API_KEY")
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    result = CliRunner().invoke(app, ["judge", "mt-bench", "--answers", str(DATA / "mt_bench/model_answer/gpt-4.jsonl"),
                                      "--limit", "1", "--data-dir", str(DATA / "mt_bench"), "--judge-model", "gpt-4",
                                      "--base-url", "http://127.0.0.1:9/v1", "--out", str(env / "o")])
    assert result.exit_code == 2 and "No judge API key" in result.output
    assert len(result.output.strip().splitlines()) == 1 and not (env / "o").exists()
