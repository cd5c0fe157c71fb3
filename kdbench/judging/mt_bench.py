"""MT-Bench (PROTOCOLS.md §2): FastChat llm_judge's grading and aggregation; answers: :mod:`kdbench.judging.answers`.

Every setting comes from the judge files: ``judges/mt_bench.yaml`` (prompt names, reference categories, judge
parameters, rating patterns) and ``judges/mt_bench_pairwise.yaml`` (pair prompts, verdict markers, orders).

* :func:`single_judge_calls`: single-answer grading with FastChat's ``single-v1`` / ``single-v1-multi-turn``
  prompts, and the reference-guided ``single-math-v1*`` prompts for math, reasoning and coding
  (``gen_judgment.py``); the rating is parsed with the file's patterns (``[[x]]``, then ``[x]``), else −1.
* :func:`summarize`: ``show_result.py``: rows with score −1 are dropped (and counted), turn k = mean of that
  turn's scores, overall = mean of all remaining scores.
* :func:`pairwise_judge_calls` / :func:`summarize_pairwise`: the ``pair-v2*`` mode, both orders, where a tie
  in either order or disagreeing orders is a tie and an error in either order drops the pair.
* :func:`metric_records`: the run's ``metrics.jsonl`` records (turn 1, turn 2, overall, per category).
"""

from __future__ import annotations

import re
import time
from collections import defaultdict
from typing import Any, Sequence

from kdbench.errors import DataError
from kdbench.judging.client import JudgeCall, JudgeReply


def protocol_file(name: str = "mt_bench") -> dict:
    """The body of a judge file (``mt_bench``, ``mt_bench_pairwise``, ...)."""
    from kdbench import registry

    return registry.get("judges", name).body


# --- single-answer grading --------------------------------------------------------------------------


def parse_rating(judgment: str | None, patterns: Sequence[str] | None = None) -> float:
    """FastChat's rating: the first group of the first of ``patterns`` (default: the judge file's
    ``rating_patterns``, ``[[x]]`` then ``[x]``) that matches; −1 when none does."""
    if not judgment:
        return -1
    for pattern in patterns if patterns is not None else protocol_file()["rating_patterns"]:
        match = re.search(pattern, judgment)
        if match:
            return float(match.group(1))
    return -1


def _messages(prompt: dict, user_prompt: str) -> list[dict]:
    # common.py run_judge_single/run_judge_pair: the prompt's system_prompt, then the formatted template
    return [{"role": "system", "content": prompt["system_prompt"]}, {"role": "user", "content": user_prompt}]


def _prompt(judge_prompts: dict[str, dict], name: str) -> dict:
    if name not in judge_prompts:
        raise DataError(f"The judge prompts file has no prompt named {name!r}; pass FastChat's judge_prompts.jsonl "
                        "(--data-dir) or fix the prompt names in the judge file.")
    return judge_prompts[name]


def _answer_turns(answer: list[str], qid, need: int) -> list[str]:
    if len(answer) < need:
        raise DataError(f"The MT-Bench answer to question {qid} has {len(answer)} turn(s), but the question has "
                        f"{need}; generate both turns (kdbench judge mt-bench --model) or fix the answers file.")
    return answer


def single_judge_calls(questions: Sequence[dict], answers: dict[int, list[str]], judge_prompts: dict[str, dict],
                       references: dict[int, list[str]] | None, *, model: str,
                       protocol: dict | None = None) -> list[tuple[dict, JudgeCall]]:
    """(metadata, call) for every (question, turn) of one model's answers, in FastChat's format, with the
    prompt names, reference categories and judge parameters of ``protocol`` (default ``judges/mt_bench.yaml``)."""
    protocol = protocol or protocol_file()
    need_ref_categories = set(protocol["need_reference_categories"])
    items = []
    for question in questions:
        qid = question["question_id"]
        if qid not in answers:
            continue
        need_ref = question.get("category") in need_ref_categories
        if need_ref and (references is None or qid not in references):
            raise DataError(f"MT-Bench question {qid} ({question['category']}) needs a reference answer; pass a reference set.")
        answer = _answer_turns(answers[qid], qid, len(question["turns"][:2]))
        names = protocol["prompts"]["single_reference" if need_ref else "single"]
        for turn in (1, 2):
            if turn > len(question["turns"]):
                continue
            name = names[f"turn_{turn}"]
            prompt = _prompt(judge_prompts, name)
            if turn == 1:
                fields = {"question": question["turns"][0], "answer": answer[0]}
                if need_ref:
                    fields["ref_answer_1"] = references[qid][0]
            else:
                fields = {"question_1": question["turns"][0], "question_2": question["turns"][1],
                          "answer_1": answer[0], "answer_2": answer[1]}
                if need_ref:
                    fields.update(ref_answer_1=references[qid][0], ref_answer_2=references[qid][1])
            user_prompt = prompt["prompt_template"].format(**fields)
            meta = {"question_id": qid, "model": model, "prompt_name": name, "turn": turn,
                    "category": question.get("category"), "user_prompt": user_prompt}
            items.append((meta, JudgeCall.make(_messages(prompt, user_prompt), **protocol["judge_params"])))
    return items


def single_records(items: Sequence[tuple[dict, JudgeCall]], replies: Sequence[JudgeReply], judge_model: str,
                   patterns: Sequence[str] | None = None) -> list[dict]:
    """FastChat ``model_judgment/<judge>_single.jsonl`` records, plus the reported judge snapshot and any error."""
    patterns = patterns if patterns is not None else protocol_file()["rating_patterns"]
    records = []
    for (meta, _), reply in zip(items, replies):
        judgment = reply.content if reply.ok else None
        records.append({
            "question_id": meta["question_id"], "model": meta["model"], "judge": [judge_model, meta["prompt_name"]],
            "user_prompt": meta["user_prompt"], "judgment": judgment or "", "score": parse_rating(judgment, patterns),
            "turn": meta["turn"], "tstamp": time.time(), "category": meta["category"],
            "judge_model_reported": reply.model_reported, "error": reply.error,
        })
    return records


def summarize(records: Sequence[dict], questions: Sequence[dict] | None = None) -> dict[str, dict[str, Any]]:
    """Aggregate FastChat single-answer judgment records per model (``show_result.py``).

    Records need ``model``, ``question_id``, ``turn`` and ``score``. Scores of −1 (no rating parsed, or a
    failed call) are dropped and counted in ``n_failed``. Returns per model ``turn_1``, ``turn_2`` (means of
    that turn's valid scores, None if none), ``overall`` (mean of all valid scores), ``n_valid``,
    ``n_failed`` and ``per_category`` (category from the records or from ``questions``).
    """
    category_of = {q["question_id"]: q.get("category") for q in (questions or [])}
    by_model: dict[str, dict[str, list]] = defaultdict(lambda: defaultdict(list))
    failed: dict[str, int] = defaultdict(int)
    for record in records:
        model = record["model"]
        score = float(record["score"])
        if score == -1:
            failed[model] += 1
            continue
        by_model[model][f"turn_{int(record['turn'])}"].append(score)
        by_model[model]["all"].append(score)
        category = record.get("category") or category_of.get(record["question_id"])
        if category:
            by_model[model][f"cat:{category}"].append(score)
    out = {}
    for model in sorted(set(by_model) | set(failed)):
        groups = by_model.get(model, {})

        def mean(values):
            return sum(values) / len(values) if values else None

        out[model] = {
            "turn_1": mean(groups.get("turn_1", [])),
            "turn_2": mean(groups.get("turn_2", [])),
            "overall": mean(groups.get("all", [])),
            "n_valid": len(groups.get("all", [])),
            "n_failed": failed.get(model, 0),
            "per_category": {key[4:]: mean(values) for key, values in sorted(groups.items()) if key.startswith("cat:")},
        }
    return out


# --- pairwise ---------------------------------------------------------------------------------------


def parse_pair_verdict(judgment: str | None, verdicts: dict[str, str] | None = None) -> str:
    """FastChat's pairwise verdict: the value of the first marker of ``verdicts`` found in the judgment
    (default the judge file's: ``[[A]]`` -> A, ``[[B]]`` -> B, ``[[C]]`` -> tie), else ``"error"``."""
    if not judgment:
        return "error"
    for marker, verdict in (verdicts if verdicts is not None else protocol_file("pairwise")["verdicts"]).items():
        if marker in judgment:
            return verdict
    return "error"


def combine_orders(first: str, second_swapped: str | None) -> str:
    """One pair's outcome from the first order (A = model 1) and the second order (A = model 2).

    Returns ``"model_1"``, ``"model_2"``, ``"tie"`` or ``"error"``; a tie in either order or disagreeing
    orders is a tie; an error in either order is an error (the pair is reported failed). With
    ``second_swapped=None`` (single order) the first verdict decides.
    """
    g1 = {"A": "model_1", "B": "model_2"}.get(first, first)
    if second_swapped is None:
        return g1
    g2 = {"A": "model_2", "B": "model_1"}.get(second_swapped, second_swapped)
    if "error" in (g1, g2):
        return "error"
    return g1 if g1 == g2 else "tie"


def pairwise_judge_calls(questions: Sequence[dict], answers_1: dict[int, list[str]], answers_2: dict[int, list[str]],
                         judge_prompts: dict[str, dict], references: dict[int, list[str]] | None, *,
                         both_orders: bool | None = None, protocol: dict | None = None,
                         questions_protocol: dict | None = None) -> list[tuple[dict, JudgeCall]]:
    """(metadata, call) for each (question, turn, order) of a two-model comparison (pair-v2 / pair-math-v1),
    with the prompts, judge parameters and orders of ``protocol`` (default ``judges/mt_bench_pairwise.yaml``)
    and the reference categories of ``questions_protocol`` (default the file it ``uses``)."""
    protocol = protocol or protocol_file("mt_bench_pairwise")
    questions_protocol = questions_protocol or protocol_file(protocol["uses"])
    need_ref_categories = set(questions_protocol["need_reference_categories"])
    both_orders = protocol["both_orders"] if both_orders is None else both_orders
    items = []
    for question in questions:
        qid = question["question_id"]
        if qid not in answers_1 or qid not in answers_2:
            continue
        need_ref = question.get("category") in need_ref_categories
        if need_ref and (references is None or qid not in references):
            raise DataError(f"MT-Bench question {qid} ({question['category']}) needs a reference answer; pass a reference set.")
        need = len(question["turns"][:2])
        _answer_turns(answers_1[qid], qid, need), _answer_turns(answers_2[qid], qid, need)
        names = protocol["prompts"]["pair_reference" if need_ref else "pair"]
        for turn in range(1, need + 1):
            name = names[f"turn_{turn}"]
            prompt = _prompt(judge_prompts, name)
            for order, (a, b) in enumerate([(answers_1[qid], answers_2[qid]), (answers_2[qid], answers_1[qid])][
                                                :2 if both_orders else 1]):
                if turn == 1:
                    fields = {"question": question["turns"][0], "answer_a": a[0], "answer_b": b[0]}
                    if need_ref:
                        fields["ref_answer_1"] = references[qid][0]
                else:
                    fields = {"question_1": question["turns"][0], "question_2": question["turns"][1],
                              "answer_a_1": a[0], "answer_a_2": a[1], "answer_b_1": b[0], "answer_b_2": b[1]}
                    if need_ref:
                        fields.update(ref_answer_1=references[qid][0], ref_answer_2=references[qid][1])
                user_prompt = prompt["prompt_template"].format(**fields)
                meta = {"question_id": qid, "turn": turn, "order": order, "prompt_name": name,
                        "category": question.get("category")}
                items.append((meta, JudgeCall.make(_messages(prompt, user_prompt), **protocol["judge_params"])))
    return items


def pairwise_records(items: Sequence[tuple[dict, JudgeCall]], replies: Sequence[JudgeReply], *, model_1: str,
                     model_2: str, judge_model: str, verdicts: dict[str, str] | None = None) -> list[dict]:
    """FastChat-style pairwise records (``g1_winner`` / ``g2_winner`` named by model) and the combined winner."""
    verdicts = verdicts if verdicts is not None else protocol_file("mt_bench_pairwise")["verdicts"]
    games: dict[tuple, dict] = {}
    for (meta, _), reply in zip(items, replies):
        key = (meta["question_id"], meta["turn"])
        game = games.setdefault(key, {"question_id": meta["question_id"], "turn": meta["turn"],
                                      "category": meta["category"], "model_1": model_1, "model_2": model_2,
                                      "judge": [judge_model, meta["prompt_name"]], "judge_model_reported": [],
                                      "errors": []})
        verdict = parse_pair_verdict(reply.content if reply.ok else None, verdicts)
        game["g1_verdict" if meta["order"] == 0 else "g2_verdict"] = verdict
        game["g1_judgment" if meta["order"] == 0 else "g2_judgment"] = reply.content or ""
        game["judge_model_reported"].append(reply.model_reported)
        if reply.error:
            game["errors"].append(reply.error)
    names = {"model_1": model_1, "model_2": model_2}
    records = []
    for game in games.values():
        outcome = combine_orders(game["g1_verdict"], game.get("g2_verdict"))
        game["winner"] = names.get(outcome, outcome)
        game["g1_winner"] = names.get(combine_orders(game["g1_verdict"], None), combine_orders(game["g1_verdict"], None))
        if "g2_verdict" in game:
            g2 = {"A": model_2, "B": model_1}.get(game["g2_verdict"], game["g2_verdict"])
            game["g2_winner"] = g2
        records.append(game)
    return records


def summarize_pairwise(records: Sequence[dict], model: str) -> dict:
    """Wins, ties and losses of ``model`` over pairwise records, and the failed (error) pairs, per turn."""
    from kdbench.metrics import omega

    out = {}
    for turn_key, rows in (("all", records), ("turn_1", [r for r in records if r["turn"] == 1]),
                           ("turn_2", [r for r in records if r["turn"] == 2])):
        wins = sum(r["winner"] == model for r in rows)
        ties = sum(r["winner"] == "tie" for r in rows)
        failed = sum(r["winner"] == "error" for r in rows)
        losses = len(rows) - wins - ties - failed
        judged = wins + ties + losses
        out[turn_key] = {"wins": wins, "ties": ties, "losses": losses, "failed": failed, "n": judged,
                         "win_rate": (wins + ties / 2) / judged * 100 if judged else None,
                         "omega": omega(wins, ties, losses) if judged else None}
    return out


def metric_records(run, summary: dict[str, dict], *, judge: str, protocol: str, suite: str = "mt_bench") -> list[dict]:
    """``metrics.jsonl`` records of single-answer grading: per model ``turn_1``, ``turn_2``, ``overall`` (subset
    ``all``) and ``overall`` per ``category:<name>``, each with the model as ``label`` and the judge, protocol,
    valid and failed counts."""
    records = []
    for model, row in summary.items():
        common = {"label": model, "judge": judge, "protocol": protocol, "n_failed": row["n_failed"]}
        for metric in ("turn_1", "turn_2", "overall"):
            if row.get(metric) is not None:
                records.append(run.metric_record(suite, metric, row[metric], n=row["n_valid"], **common))
        for category, value in row["per_category"].items():
            if value is not None:
                records.append(run.metric_record(suite, "overall", value, subset=f"category:{category}", **common))
    return records


def omega_record_fields(summary: dict) -> dict:
    """The counts every ω-like record carries: ``wins``, ``ties``, ``losses`` and ``n_failed``."""
    return {"wins": summary["wins"], "ties": summary["ties"], "losses": summary["losses"],
            "n_failed": summary["failed"]}


def pairwise_metric_records(run, summary: dict, *, model: str, opponent: str, judge: str, protocol: str,
                            suite: str = "mt_bench_pairwise") -> list[dict]:
    """``metrics.jsonl`` records of a pairwise comparison: ω and win rate of ``model`` against ``opponent``
    overall (subset ``all``) and per turn, with the wins, ties, losses and failed pairs."""
    records = []
    for key, row in summary.items():
        subset = "all" if key == "all" else f"turn:{key.split('_')[1]}"
        if row["omega"] is None:
            continue
        fields = {"label": model, "opponent": opponent, "judge": judge, "protocol": protocol,
                  **omega_record_fields(row)}
        records.append(run.metric_record(suite, "omega", row["omega"], subset=subset, n=row["n"], **fields))
        records.append(run.metric_record(suite, "win_rate", row["win_rate"], subset=subset, n=row["n"], **fields))
    return records
