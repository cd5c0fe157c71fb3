"""MT-Bench (PROTOCOLS.md §2): FastChat llm_judge's answer generation, grading and aggregation.

* :func:`generate_answers`: two turns per question through the model's chat template, FastChat's
  per-category temperatures (writing and roleplay 0.7, stem and humanities 0.1, the rest greedy) and its
  1,024-new-token limit (``gen_model_answer.py``), with any Hugging Face causal LM.
* :func:`single_judgments`: single-answer grading with FastChat's ``single-v1`` / ``single-v1-multi-turn``
  prompts, and the reference-guided ``single-math-v1*`` prompts for math, reasoning and coding
  (``gen_judgment.py``); the rating is parsed from ``[[x]]``, then ``[x]``, else −1 (``common.py``).
* :func:`summarize`: ``show_result.py``: rows with score −1 are dropped (and counted), turn k = mean of that
  turn's scores, overall = mean of all remaining scores.
* :func:`pairwise_judgments` / :func:`summarize_pairwise`: the ``pair-v2*`` mode, both orders, where a tie
  in either order or disagreeing orders is a tie and an error in either order drops the pair.
"""

from __future__ import annotations

import re
import time
from collections import defaultdict
from typing import Any, Callable, Sequence

from kdbench.errors import DataError
from kdbench.judging.client import JudgeCall, JudgeReply

NEED_REF_CATEGORIES = ("math", "reasoning", "coding", "arena-hard-200")
# fastchat/llm_judge/common.py: temperature_config
TEMPERATURE_BY_CATEGORY = {"writing": 0.7, "roleplay": 0.7, "extraction": 0.0, "math": 0.0, "coding": 0.0,
                           "reasoning": 0.0, "stem": 0.1, "humanities": 0.1, "arena-hard-200": 0.0}
DEFAULT_TEMPERATURE = 0.7  # gen_model_answer.py: categories not in temperature_config
MAX_NEW_TOKENS = 1024
JUDGE_PARAMS = {"temperature": 0, "max_tokens": 2048}

_RATING = re.compile(r"\[\[(\d+\.?\d*)\]\]")
_RATING_BACKUP = re.compile(r"\[(\d+\.?\d*)\]")


# --- answer generation ------------------------------------------------------------------------------


def generate_answers(model, tokenizer, questions: Sequence[dict], *, model_id: str,
                     max_new_tokens: int = MAX_NEW_TOKENS,
                     temperature_by_category: dict[str, float] | None = None, seed: int = 0,
                     system_prompt: str | None = None,
                     progress: Callable[[int, int], None] | None = None) -> list[dict]:
    """Answer every MT-Bench question in two turns with ``model`` (FastChat ``gen_model_answer.py``).

    Turn 2 is generated after the model's own turn-1 answer in the conversation. Each question is
    formatted with ``tokenizer.apply_chat_template(messages, add_generation_prompt=True)``; a temperature
    below 1e-4 means greedy decoding, otherwise sampling with that temperature (seeded per question).
    The new tokens are decoded without special tokens and stripped.

    Returns FastChat ``model_answer`` records: ``{question_id, answer_id, model_id, category,
    choices: [{index: 0, turns: [answer_1, answer_2]}], tstamp}``.
    """
    import torch

    if getattr(tokenizer, "chat_template", None) is None:
        raise DataError("MT-Bench answers need a tokenizer with a chat template; use an instruction-tuned model's tokenizer.")
    temperatures = {**TEMPERATURE_BY_CATEGORY, **(temperature_by_category or {})}
    device = next(model.parameters()).device
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    records = []
    model.eval()
    for position, question in enumerate(questions):
        temperature = temperatures.get(question.get("category"), DEFAULT_TEMPERATURE)
        torch.manual_seed(seed + int(question["question_id"]))
        messages: list[dict] = [{"role": "system", "content": system_prompt}] if system_prompt else []
        turns = []
        for user_turn in question["turns"]:
            messages.append({"role": "user", "content": user_turn})
            input_ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                                      return_dict=True)["input_ids"].to(device)
            sampling = {"do_sample": True, "temperature": temperature, "top_p": 1.0, "top_k": 0} \
                if temperature >= 1e-4 else {"do_sample": False}
            with torch.no_grad():
                output_ids = model.generate(input_ids, attention_mask=torch.ones_like(input_ids),
                                            max_new_tokens=max_new_tokens, pad_token_id=pad_id, **sampling)
            new_tokens = output_ids[0, input_ids.shape[1]:]  # (new_len,)
            answer = tokenizer.decode(new_tokens, skip_special_tokens=True).strip()
            turns.append(answer)
            messages.append({"role": "assistant", "content": answer})
        records.append({"question_id": question["question_id"], "answer_id": f"{model_id}-{question['question_id']}",
                        "model_id": model_id, "category": question.get("category"),
                        "choices": [{"index": 0, "turns": turns}], "tstamp": time.time()})
        if progress:
            progress(position + 1, len(questions))
    return records


# --- single-answer grading --------------------------------------------------------------------------


def parse_rating(judgment: str | None) -> float:
    """FastChat's rating: the number in the first ``[[x]]``, else in the first ``[x]``; −1 when none."""
    if not judgment:
        return -1
    match = _RATING.search(judgment) or _RATING_BACKUP.search(judgment)
    return float(match.group(1)) if match else -1


def _messages(prompt: dict, user_prompt: str) -> list[dict]:
    # common.py run_judge_single/run_judge_pair: the prompt's system_prompt, then the formatted template
    return [{"role": "system", "content": prompt["system_prompt"]}, {"role": "user", "content": user_prompt}]


def single_judge_calls(questions: Sequence[dict], answers: dict[int, list[str]], judge_prompts: dict[str, dict],
                       references: dict[int, list[str]] | None, *, model: str) -> list[tuple[dict, JudgeCall]]:
    """(metadata, call) for every (question, turn) of one model's answers, in FastChat's format."""
    items = []
    for question in questions:
        qid = question["question_id"]
        if qid not in answers:
            continue
        need_ref = question.get("category") in NEED_REF_CATEGORIES
        if need_ref and (references is None or qid not in references):
            raise DataError(f"MT-Bench question {qid} ({question['category']}) needs a reference answer; pass a reference set.")
        answer = answers[qid]
        for turn in (1, 2):
            if turn > len(question["turns"]):
                continue
            name = ("single-math-v1" if need_ref else "single-v1") + ("-multi-turn" if turn == 2 else "")
            prompt = judge_prompts[name]
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
            items.append((meta, JudgeCall.make(_messages(prompt, user_prompt), **JUDGE_PARAMS)))
    return items


def single_records(items: Sequence[tuple[dict, JudgeCall]], replies: Sequence[JudgeReply], judge_model: str) -> list[dict]:
    """FastChat ``model_judgment/<judge>_single.jsonl`` records, plus the reported judge snapshot and any error."""
    records = []
    for (meta, _), reply in zip(items, replies):
        judgment = reply.content if reply.ok else None
        records.append({
            "question_id": meta["question_id"], "model": meta["model"], "judge": [judge_model, meta["prompt_name"]],
            "user_prompt": meta["user_prompt"], "judgment": judgment or "", "score": parse_rating(judgment),
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


def parse_pair_verdict(judgment: str | None) -> str:
    """FastChat's pairwise verdict: ``"A"`` for [[A]], ``"B"`` for [[B]], ``"tie"`` for [[C]], else ``"error"``."""
    if not judgment:
        return "error"
    if "[[A]]" in judgment:
        return "A"
    if "[[B]]" in judgment:
        return "B"
    if "[[C]]" in judgment:
        return "tie"
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
                         both_orders: bool = True) -> list[tuple[dict, JudgeCall]]:
    """(metadata, call) for each (question, turn, order) of a two-model comparison (pair-v2 / pair-math-v1)."""
    items = []
    for question in questions:
        qid = question["question_id"]
        if qid not in answers_1 or qid not in answers_2:
            continue
        need_ref = question.get("category") in NEED_REF_CATEGORIES
        for turn in (1, 2):
            name = ("pair-math-v1" if need_ref else "pair-v2") + ("-multi-turn" if turn == 2 else "")
            prompt = judge_prompts[name]
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
                items.append((meta, JudgeCall.make(_messages(prompt, user_prompt), **JUDGE_PARAMS)))
    return items


def pairwise_records(items: Sequence[tuple[dict, JudgeCall]], replies: Sequence[JudgeReply], *, model_1: str,
                     model_2: str, judge_model: str) -> list[dict]:
    """FastChat-style pairwise records (``g1_winner`` / ``g2_winner`` named by model) and the combined winner."""
    games: dict[tuple, dict] = {}
    for (meta, _), reply in zip(items, replies):
        key = (meta["question_id"], meta["turn"])
        game = games.setdefault(key, {"question_id": meta["question_id"], "turn": meta["turn"],
                                      "category": meta["category"], "model_1": model_1, "model_2": model_2,
                                      "judge": [judge_model, meta["prompt_name"]], "judge_model_reported": [],
                                      "errors": []})
        verdict = parse_pair_verdict(reply.content if reply.ok else None)
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
