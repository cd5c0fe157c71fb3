"""Judged protocols against real published inputs and outputs (/work/shared/data, PROTOCOLS.md §2–4)."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest

from kdbench.judging import alpaca_eval as ae
from kdbench.judging import mt_bench as mtb
from kdbench.judging import pairwise as pw
from kdbench.judging.data import (alpaca_eval_template, git_blob_id, load_judge_prompts, load_mt_bench_answers,
                                  load_questions, load_reference_answers)
from kdbench.judging.offline import OfflineJudge
from kdbench.store import read_jsonl

SHARED = Path(__file__).resolve().parents[2] / "shared"
DATA = SHARED / "data"
pytestmark = pytest.mark.skipif(not DATA.is_dir(), reason=f"shared test data not found at {DATA}")
AE = DATA / "alpaca_eval"
MT = DATA / "mt_bench"

# (annotations file, leaderboard csv, leaderboard row)
AE_CASES = [
    ("alpaca-7b/weighted_alpaca_eval_gpt4_turbo", "data_AlpacaEval_2/weighted_alpaca_eval_gpt4_turbo", "alpaca-7b"),
    ("FuseChat-Llama-3.2-1B-Instruct/weighted_alpaca_eval_gpt4_turbo", "data_AlpacaEval_2/weighted_alpaca_eval_gpt4_turbo",
     "FuseChat-Llama-3.2-1B-Instruct"),
    ("FuseChat-Llama-3.2-3B-Instruct/weighted_alpaca_eval_gpt4_turbo", "data_AlpacaEval_2/weighted_alpaca_eval_gpt4_turbo",
     "FuseChat-Llama-3.2-3B-Instruct"),
    ("alpaca-7b/alpaca_eval_gpt4", "data_AlpacaEval/alpaca_eval_gpt4", "alpaca-7b"),
    ("minichat-3b/alpaca_eval_gpt4", "data_AlpacaEval/alpaca_eval_gpt4", "minichat-3b"),
]


def _leaderboard_row(board: str, model: str) -> dict:
    with open(AE / "leaderboards" / f"{board}_leaderboard.csv", newline="") as handle:
        for row in csv.DictReader(handle):
            if row[""] == model:
                return row
    raise AssertionError(f"{model} not in {board}")


@pytest.mark.parametrize("annotations, board, model", AE_CASES)
def test_alpaca_eval_win_rate_equals_leaderboard(annotations, board, model):
    records = json.loads((AE / "results" / annotations / "annotations.json").read_text())
    metrics = ae.win_rate([r["preference"] for r in records])
    row = _leaderboard_row(board, model)
    assert metrics["win_rate"] == pytest.approx(float(row["win_rate"]), abs=1e-9)
    assert metrics["standard_error"] == pytest.approx(float(row["standard_error"]), abs=1e-9)
    for key in ("n_wins", "n_wins_base", "n_draws", "n_total"):
        assert metrics[key] == int(row[key]), key
    assert metrics["discrete_win_rate"] == pytest.approx(float(row["discrete_win_rate"]), abs=1e-9)


def test_win_rate_edge_cases():
    assert ae.win_rate([2, 1, 0, None, float("nan")]) == pytest.approx(
        {"win_rate": 50.0, "standard_error": 50.0 / math.sqrt(3) * 1.0, "n_wins": 1, "n_wins_base": 1, "n_draws": 1,
         "n_total": 3, "discrete_win_rate": 50.0})
    with pytest.raises(Exception, match="No valid preferences"):
        ae.win_rate([None])


def test_alpaca_eval_switch_and_logprob_parser_reproduce_real_annotations():
    """Recompute every AE2 preference from its raw completion: parse the shown-order preference from the top
    logprobs, map it back with our order switch, and compare with the stored preference."""
    records = json.loads((AE / "results/alpaca-7b/weighted_alpaca_eval_gpt4_turbo/annotations.json").read_text())
    checked = 0
    for record in records:
        raw = record["raw_completion"]
        if raw is None or raw.get("logprobs") is None:
            assert record["output_1"] == record["output_2"] and record["preference"] == 1.5
            continue
        shown = ae.parse_logprob(raw["logprobs"]["content"][0]["top_logprobs"])
        if abs(shown - 1.5) < 1e-9:
            continue  # symmetric: says nothing about the switch
        expected = 3 - shown if ae.is_switched(record["instruction"]) else shown
        assert expected == pytest.approx(float(record["preference"]), abs=1e-6)
        checked += 1
    assert checked >= 800


def test_ranking_parser():
    assert ae.parse_ranking("[{'model': 'model_1', 'rank': 1}, {'model': 'model_2', 'rank': 2}]") == 1
    assert ae.parse_ranking("[{'model': 'model_2', 'rank': 1}, {'model': 'model_1', 'rank': 2}]") == 2
    assert ae.parse_ranking("[{'model': 'model_1', 'rank': 3}, {'model': 'model_2', 'rank': 1}]") is None
    assert ae.parse_ranking("__import__('os').system('echo no')") is None
    assert ae.parse_ranking("") is None


def test_alpaca_eval_templates_become_chat_messages():
    template = alpaca_eval_template("alpaca_eval_clf_gpt4_turbo/alpaca_eval_clf.txt", AE / "evaluators_configs")
    prompt = ae.fill_template(template, {"instruction": "Say {hi}", "output_1": "A1 {output_2}", "output_2": "B2"})
    messages = ae.prompt_to_chatml(prompt)
    assert [m["role"] for m in messages] == ["system", "user"]
    user = messages[1]["content"]
    assert '"instruction": """Say {hi}"""' in user
    # alpaca_eval's make_prompts replaces the first occurrence of each placeholder in turn, so a "{output_2}"
    # inside output_1's text is what gets replaced: reproduced quirk for quirk
    assert '"output": """A1 B2"""' in user and user.endswith("## Best Model Identifier")
    ae1 = ae.prompt_to_chatml(ae.fill_template(alpaca_eval_template("alpaca_eval_gpt4/alpaca_eval.txt",
                                                                    AE / "evaluators_configs"),
                                               {"instruction": "x", "output_1": "y", "output_2": "z"}))
    assert ae1[0]["content"] == "You are a helpful assistant, that ranks models by the quality of their answers."


def test_lc_from_weights_baseline_is_fifty_and_matches_formula():
    weights = ae.read_glm_weights(AE / "metrics_weights" /
                                  "weighted_alpaca_eval_gpt4_turbo_length_controlled_v1_baseline_gpt4_1106_preview.csv")
    assert len(weights) == 200
    difficulty = [(-1) ** i * (i % 7) / 3 for i in range(805)]
    assert ae.lc_from_weights(weights, "gpt4_1106_preview", difficulty) == pytest.approx(50.0)
    w = weights["alpaca-7b"]
    expected = sum(1 / (1 + math.exp(-(w["not_gamed_baseline.astype(float)"] + w["instruction_difficulty"] * d)))
                   for d in difficulty) / 805 * 100
    assert ae.lc_from_weights(weights, "alpaca-7b", difficulty) == pytest.approx(expected, rel=1e-12)


def test_lc_is_na_for_custom_reference_and_ae1():
    from kdbench import registry

    protocol = registry.get("judges", "alpaca_eval_2").body
    value, note = ae.length_controlled([], protocol, reference_name="my-student")
    assert value is None and note.startswith("LC n/a") and "custom reference" in note
    value, note = ae.length_controlled([], {"length_controlled": False}, reference_name="text_davinci_003")
    assert value is None and note.startswith("LC n/a")


# --- MT-Bench ---------------------------------------------------------------------------------------


def test_summarize_instructlab_fixture():
    records = read_jsonl(MT / "judgment_fixture_instructlab/gpt-4_single.jsonl")
    summary = mtb.summarize(records, load_questions(MT / "question.jsonl"))["granite-7b-lab"]
    assert summary["turn_1"] == pytest.approx(7.621622, abs=1e-6)
    assert summary["turn_2"] == pytest.approx(4.666667, abs=1e-6)
    assert summary["overall"] == pytest.approx(7.4, abs=1e-9)
    assert (summary["n_valid"], summary["n_failed"]) == (40, 120)
    assert set(summary["per_category"]) == {"writing", "roleplay", "reasoning", "math", "coding", "extraction",
                                            "stem", "humanities"}


def test_overall_is_mean_of_all_valid_scores_not_mean_of_turn_means():
    # claude-instant-v1 (published_scores.csv): 80 turn-1 and 79 valid turn-2 scores, overall 1257/159
    records = [{"model": "m", "question_id": i, "turn": 1, "score": 7.8} for i in range(80)]
    records += [{"model": "m", "question_id": i, "turn": 2, "score": s}
                for i, s in enumerate([8.0] * 78 + [8.0 + 0.012658 * 79, -1])]
    summary = mtb.summarize(records)["m"]
    expected = (7.8 * 80 + sum(r["score"] for r in records if r["turn"] == 2 and r["score"] != -1)) / 159
    assert summary["overall"] == pytest.approx(expected)
    assert summary["overall"] != pytest.approx((summary["turn_1"] + summary["turn_2"]) / 2, abs=1e-6)
    assert summary["n_failed"] == 1


def test_parse_rating_reproduces_fixture_scores():
    for record in read_jsonl(MT / "judgment_fixture_instructlab/gpt-4_single.jsonl"):
        assert mtb.parse_rating(record["judgment"]) == record["score"]
    assert mtb.parse_rating("Rating: [[8.5]] and [[2]]") == 8.5
    assert mtb.parse_rating("I give it [7].") == 7
    assert mtb.parse_rating("no rating") == -1
    assert mtb.parse_rating(None) == -1


def test_single_judge_prompts_reproduce_fastchat_user_prompts():
    """FastChat built the fixture's user prompts from these questions, answers and GPT-4 references."""
    questions = load_questions(MT / "question.jsonl")
    prompts = load_judge_prompts(MT / "judge_prompts.jsonl")
    refs = load_reference_answers(MT / "reference_answer/gpt-4.jsonl")
    answers = load_mt_bench_answers(MT / "judgment_fixture_instructlab/granite-7b-lab.jsonl", "granite-7b-lab")
    items = mtb.single_judge_calls(questions, answers["granite-7b-lab"], prompts, refs, model="granite-7b-lab")
    ours = {(m["question_id"], m["turn"]): (m["prompt_name"], m["user_prompt"], call) for m, call in items}
    fixture = read_jsonl(MT / "judgment_fixture_instructlab/gpt-4_single.jsonl")
    assert len(ours) == len(fixture) == 160
    for record in fixture:
        name, user_prompt, call = ours[(record["question_id"], record["turn"])]
        assert name == record["judge"][1]
        assert user_prompt == record["user_prompt"]
        assert call.message_dicts()[0] == {"role": "system", "content": prompts[name]["system_prompt"]}
        assert call.param_dict() == {"temperature": 0, "max_tokens": 2048}


def test_reference_sets_differ_and_both_load():
    old = load_reference_answers(MT / "reference_answer/gpt-4.jsonl")
    new = load_reference_answers(MT / "reference_answer/gpt-4-0125-preview.jsonl")
    assert set(old) == set(new) == set(range(101, 131))
    assert old[104] != new[104]


def test_pinned_blob_ids_match_local_copies():
    from kdbench import registry

    for name, spec in registry.get("judges", "mt_bench").body["files"].items():
        assert git_blob_id((MT / name).read_bytes()).startswith(spec["blob"]), name


def test_pairwise_combination_rule():
    assert mtb.combine_orders("A", "B") == "model_1"      # A first, then B (= model 1) second
    assert mtb.combine_orders("B", "A") == "model_2"
    assert mtb.combine_orders("A", "A") == "tie"          # disagreement
    assert mtb.combine_orders("tie", "B") == "tie"
    assert mtb.combine_orders("A", "error") == "error"
    assert mtb.combine_orders("B", None) == "model_2"
    assert mtb.parse_pair_verdict("... [[C]]") == "tie" and mtb.parse_pair_verdict("A is better") == "error"


# --- omega -------------------------------------------------------------------------------------------


def test_omega_reproduces_dadpo_tables_except_the_two_inconsistent_rows():
    from kdbench.metrics import omega

    rows = list(csv.DictReader(open(SHARED / "spec" / "paper_results.csv", newline="")))
    counts: dict[tuple, dict] = {}
    printed: dict[tuple, float] = {}
    for row in rows:
        if row["paper"] != "daDPO" or row["benchmark"] != "in_domain":
            continue
        key = (row["student"], row["method"])
        if row["table"] == "7-9":
            counts.setdefault(key, {})[row["metric"]] = int(float(row["value"]))
        elif row["metric"] == "omega":
            printed[key] = float(row["value"])
    inconsistent = {("vicuna-7b-0.5", "dSFT"), ("qwen2.5-0.5b", "daDPO")}
    checked = 0
    for key, c in counts.items():
        value = omega(c["wins"], c["ties"], c["losses"])
        if key in inconsistent:
            assert abs(value - printed[key]) > 1.0, key
            continue
        assert abs(value - printed[key]) <= 0.1 + 1e-9, (key, value, printed[key])
        checked += 1
    assert checked == len(counts) - 2 >= 18


def test_pairwise_summary_excludes_failures_from_denominator():
    records = [{"outcome": o} for o in ["win"] * 5 + ["tie"] * 2 + ["loss"] * 3 + ["failed"] * 4]
    summary = pw.summarize(records)
    assert (summary["wins"], summary["ties"], summary["losses"], summary["failed"], summary["n"]) == (5, 2, 3, 4, 10)
    assert summary["omega"] == pytest.approx(20.0)


# --- offline judge -----------------------------------------------------------------------------------


def test_offline_exact_judge():
    judge = OfflineJudge("exact")
    assert judge.compare("q", "Bavo is a baker .", "bavo is a pilot", ["bavo is a baker"]) == "A"
    assert judge.compare("q", "no", "Bavo is a baker", ["bavo is a baker"]) == "B"
    assert judge.compare("q", "x", "y", ["bavo is a baker"]) == "tie"
    assert "not an LLM judgment" in judge.label


def test_offline_rouge_judge_on_vicuna_references():
    from rouge_score import rouge_scorer

    rows = read_jsonl(DATA / "vicuna80/minillm_processed/valid.jsonl")[:12]
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    judge = OfflineJudge("rouge", tie_margin=0.05)
    for row in rows:
        ref = row["output"] if isinstance(row["output"], str) else row["output"][0]
        good, bad = ref[: len(ref) // 2], "I do not know."
        a = scorer.score(ref, good)["rougeL"].fmeasure
        b = scorer.score(ref, bad)["rougeL"].fmeasure
        expected = "A" if a - b > 0.05 else ("B" if b - a > 0.05 else "tie")
        assert judge.compare(row["instruction"], good, bad, [ref]) == expected
        assert judge.compare(row["instruction"], bad, good, [ref]) == {"A": "B", "B": "A", "tie": "tie"}[expected]
    assert "proxy" in judge.label


def test_avg_length_is_alpaca_eval_s_truncated_mean():
    """alpaca_eval's avg_length: int(mean characters of the model's outputs); minichat-3b -> 868 as published."""
    rows = json.loads((AE / "results/minichat-3b/alpaca_eval_gpt4/annotations.json").read_text())
    lengths = [len(r["output_2"]) for r in rows]
    assert sum(lengths) / len(lengths) % 1 >= 0.5  # the mean rounds up: rounding would give 869
    assert ae.avg_length([r["output_2"] for r in rows]) == 868
    board = AE / "leaderboards/data_AlpacaEval/alpaca_eval_gpt4_leaderboard.csv"
    published = {row[""]: row for row in csv.DictReader(open(board, newline=""))}
    assert published["minichat-3b"]["avg_length"] == "868"


def test_alpaca_eval_1_default_judge_is_alpaca_eval_0_6_6_s():
    from kdbench import registry

    assert registry.get("judges", "alpaca_eval_1").body["default_judge_model"] == "gpt-4"
    assert registry.get("judges", "alpaca_eval_2").body["default_judge_model"] == "gpt-4-1106-preview"


def test_local_judge_inputs_are_checked_against_their_pinned_blob_ids(tmp_path):
    from kdbench import registry
    from kdbench.judging.data import mt_bench_file

    warnings: list[str] = []
    for name in ("question.jsonl", "judge_prompts.jsonl"):
        (tmp_path / name).write_bytes((MT / name).read_bytes())
    assert mt_bench_file("judge_prompts.jsonl", tmp_path, warn=warnings.append) == tmp_path / "judge_prompts.jsonl"
    assert warnings == []  # an exact copy is silent
    edited = (MT / "judge_prompts.jsonl").read_text().replace("Rating: [[5]]", "Rating: [[7]]", 1)
    (tmp_path / "judge_prompts.jsonl").write_text(edited)
    mt_bench_file("judge_prompts.jsonl", tmp_path, warn=warnings.append)
    assert len(warnings) == 1 and str(tmp_path / "judge_prompts.jsonl") in warnings[0]
    assert registry.get("judges", "mt_bench").body["files"]["judge_prompts.jsonl"]["blob"] in warnings[0]

    template = "alpaca_eval_gpt4/alpaca_eval.txt"
    blob = registry.get("judges", "alpaca_eval_1").body["prompt_template_blob"]
    alpaca_eval_template(template, AE / "evaluators_configs", blob=blob, warn=warnings.append)
    assert len(warnings) == 1
    (tmp_path / "alpaca_eval_gpt4__alpaca_eval.txt").write_text(
        (AE / "evaluators_configs/alpaca_eval_gpt4__alpaca_eval.txt").read_text() + "\nBe kind.")
    alpaca_eval_template(template, tmp_path, blob=blob, warn=warnings.append)
    assert len(warnings) == 2 and "alpaca_eval_gpt4__alpaca_eval.txt" in warnings[1]
