"""The in-domain win rate ω (daDPO; PROTOCOLS.md §4): two runs' answers to the same held-out prompts.

Each prompt is judged pairwise (A better, B better, or tie), by default in both orders: the student as A,
then the teacher as A. Agreeing orders decide; a tie in either order or disagreeing orders is a tie
(FastChat's rule). A prompt whose judgment still fails after the client's retries, or whose verdict
cannot be parsed, in either order, is *failed*: reported by count and left out of W + T + L.
ω = (W − L) / (W + T + L) × 100 over the judged prompts (:func:`kdbench.metrics.omega`). The prompt, judge
parameters, verdict markers and default orders come from ``judges/pairwise.yaml``.
"""

from __future__ import annotations

from typing import Any, Sequence

from kdbench.errors import DataError
from kdbench.judging.client import JudgeCall
from kdbench.judging.mt_bench import combine_orders, omega_record_fields, parse_pair_verdict, protocol_file
from kdbench.judging.offline import OfflineJudge


def pair_up(student_outputs: Sequence[dict], teacher_outputs: Sequence[dict],
            references: dict[str, list[str]] | None = None) -> list[dict]:
    """Match two runs' outputs by id: ``[{id, question, student, teacher, references}]``.

    Both runs must have answered the same prompt for an id; ids present in only one run are an error
    (ω needs W + T + L = the number of prompts).
    """
    teacher_by_id = {row["id"]: row for row in teacher_outputs}
    student_ids = {row["id"] for row in student_outputs}
    if student_ids != set(teacher_by_id):
        only = sorted(student_ids ^ set(teacher_by_id))[:3]
        raise DataError(f"The two runs answered different prompts (e.g. ids {only}); evaluate both on the same suite.")
    pairs = []
    for row in student_outputs:
        other = teacher_by_id[row["id"]]
        if other["instruction"] != row["instruction"]:
            raise DataError(f"Prompt {row['id']} differs between the two runs; evaluate both on the same suite.")
        refs = (references or {}).get(row["id"]) or row.get("references") or other.get("references")
        pairs.append({"id": row["id"], "question": row["instruction"], "student": row["output"],
                      "teacher": other["output"], "references": refs})
    return pairs


def judge_calls(pairs: Sequence[dict], prompt: dict, *, both_orders: bool = True,
                judge_params: dict | None = None) -> list[tuple[dict, JudgeCall]]:
    """(metadata, call) per pair and order with FastChat's pair-v2 prompt (order 0: student = A); the call
    parameters are the judge file's ``judge_params`` unless given."""
    params = judge_params if judge_params is not None else protocol_file("pairwise")["judge_params"]
    items = []
    for pair in pairs:
        orders = [(pair["student"], pair["teacher"]), (pair["teacher"], pair["student"])][:2 if both_orders else 1]
        for order, (answer_a, answer_b) in enumerate(orders):
            user = prompt["prompt_template"].format(question=pair["question"], answer_a=answer_a, answer_b=answer_b)
            messages = [{"role": "system", "content": prompt["system_prompt"]}, {"role": "user", "content": user}]
            items.append(({"id": pair["id"], "order": order}, JudgeCall.make(messages, **params)))
    return items


def _outcome(first: str, second: str | None) -> str:
    """Student's outcome: "win", "tie", "loss" or "failed" (model_1 = student)."""
    return {"model_1": "win", "model_2": "loss", "tie": "tie", "error": "failed"}[combine_orders(first, second)]


def judge_with_llm(client, pairs: Sequence[dict], prompt: dict, *, both_orders: bool = True,
                   protocol: dict | None = None) -> list[dict]:
    """Judge every pair with the LLM judge behind ``client``; one record per prompt (verdict markers and call
    parameters from ``protocol``, default ``judges/pairwise.yaml``)."""
    protocol = protocol or protocol_file("pairwise")
    items = judge_calls(pairs, prompt, both_orders=both_orders, judge_params=protocol["judge_params"])
    replies = client.complete([call for _, call in items])
    by_id: dict[str, dict] = {p["id"]: {"id": p["id"], "question": p["question"], "verdicts": [None, None],
                                        "judgments": [None, None], "judge_model_reported": [], "errors": []}
                              for p in pairs}
    for (meta, _), reply in zip(items, replies):
        record = by_id[meta["id"]]
        record["verdicts"][meta["order"]] = parse_pair_verdict(reply.content if reply.ok else None,
                                                               protocol["verdicts"])
        record["judgments"][meta["order"]] = reply.content
        record["judge_model_reported"].append(reply.model_reported)
        if reply.error:
            record["errors"].append(reply.error)
        elif record["verdicts"][meta["order"]] == "error":
            record["errors"].append("unparseable verdict")
    records = []
    for record in by_id.values():
        first, second = record["verdicts"]
        record["outcome"] = _outcome(first, second if both_orders else None)
        records.append(record)
    return records


def judge_offline(judge: OfflineJudge, pairs: Sequence[dict], *, both_orders: bool = True) -> list[dict]:
    """Judge every pair with the deterministic offline judge; same record shape as :func:`judge_with_llm`."""
    records = []
    for pair in pairs:
        first = judge.compare(pair["question"], pair["student"], pair["teacher"], pair["references"])
        second = judge.compare(pair["question"], pair["teacher"], pair["student"], pair["references"]) if both_orders else None
        records.append({"id": pair["id"], "question": pair["question"], "verdicts": [first, second],
                        "judgments": [None, None], "judge_model_reported": [judge.name()], "errors": [],
                        "outcome": _outcome(first, second)})
    return records


def summarize(records: Sequence[dict]) -> dict[str, Any]:
    """W, T, L (the student's), failed, n = W + T + L, and ω = (W − L)/(W + T + L) × 100 (None if n = 0)."""
    from kdbench.metrics import omega

    counts = {name: sum(r["outcome"] == name for r in records) for name in ("win", "tie", "loss", "failed")}
    judged = counts["win"] + counts["tie"] + counts["loss"]
    return {"wins": counts["win"], "ties": counts["tie"], "losses": counts["loss"], "failed": counts["failed"],
            "n": judged, "n_prompts": len(records),
            "omega": omega(counts["win"], counts["tie"], counts["loss"]) if judged else None}


def metric_records(run, summary: dict, *, suite: str, label: str, opponent: str, judge: str,
                   protocol: str = "pairwise") -> list[dict]:
    """The run's ``metrics.jsonl`` record: ω of ``label`` against ``opponent`` with W, T, L and failures
    (none when no prompt was judged)."""
    if summary["omega"] is None:
        return []
    return [run.metric_record(suite, "omega", summary["omega"], n=summary["n"], label=label, opponent=opponent,
                              judge=judge, protocol=protocol, **omega_record_fields(summary))]
