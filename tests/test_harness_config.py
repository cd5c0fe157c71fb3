"""Suite configurations of kdbench.harness (OLL v1, OLL v2, AKL) and the arithmetic around them.

The real leaderboard datasets cannot be downloaded here, so OLL v1/v2 are configuration-tested:
task names, shot counts, metrics and filters against the spec (PROTOCOLS.md section 5) and against
lm-eval's own task files; the averages and the v2 normalization on hand-written result fixtures.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from pathlib import Path

import pytest

from kdbench import harness
from kdbench.errors import ConfigError, DataError

TOKENIZER_DIR = Path(__file__).resolve().parents[2] / "shared" / "models" / "gpt2-tokenizer"


def settings(suite: harness.HarnessSuite) -> list[tuple]:
    return [(t.task, t.num_fewshot, t.metrics, t.filter) for t in suite.tasks]


# ----------------------------------------------------------------------------------------------
# suite files (no lm-eval needed)
# ----------------------------------------------------------------------------------------------
def test_oll_v1_configuration():
    suite = harness.load_harness_suite("oll")
    assert suite.protocol == "OLL-v1" and suite.average_method == "unweighted_mean"
    assert settings(suite) == [
        ("arc_challenge", 25, ("acc_norm",), "none"),
        ("hellaswag", 10, ("acc_norm",), "none"),
        ("mmlu", 5, ("acc",), "none"),
        ("truthfulqa_mc2", 0, ("acc",), "none"),
        ("winogrande", 5, ("acc",), "none"),
        ("gsm8k", 5, ("exact_match",), "strict-match"),
    ]
    # OLL v1 averaged MMLU's 57 subjects unweighted; every other task enters with its own score
    assert {t.task: t.average_uses for t in suite.tasks} == {
        "arc_challenge": "group", "hellaswag": "group", "mmlu": "subtask_mean",
        "truthfulqa_mc2": "group", "winogrande": "group", "gsm8k": "group"}


def test_akl_general_configuration():
    suite = harness.load_harness_suite("akl-general")
    assert settings(suite) == [
        ("arc_challenge", 5, ("acc_norm",), "none"),
        ("winogrande", 0, ("acc",), "none"),
        ("openbookqa", 0, ("acc",), "none"),
        ("boolq", 0, ("acc",), "none"),
    ]


def test_oll_v2_configuration():
    suite = harness.load_harness_suite("oll-v2")
    assert suite.lm_eval_group == "leaderboard"
    assert settings(suite) == [
        ("leaderboard_bbh", 3, ("acc_norm",), "none"),
        ("leaderboard_gpqa", 0, ("acc_norm",), "none"),
        ("leaderboard_math_hard", 4, ("exact_match",), "none"),
        ("leaderboard_ifeval", 0, ("prompt_level_strict_acc", "inst_level_strict_acc"), "none"),
        ("leaderboard_musr", 0, ("acc_norm",), "none"),
        ("leaderboard_mmlu_pro", 5, ("acc",), "none"),
    ]
    baselines = {t.task: t.random_baseline for t in suite.tasks if t.random_baseline is not None}
    assert baselines == {"leaderboard_gpqa": 0.25, "leaderboard_math_hard": 0.0, "leaderboard_ifeval": 0.0,
                         "leaderboard_mmlu_pro": 0.1}
    musr = suite.task("leaderboard_musr").subtask_choices
    assert musr == {"leaderboard_musr_murder_mysteries": 2, "leaderboard_musr_object_placements": 5,
                    "leaderboard_musr_team_allocation": 3}
    assert len(suite.task("leaderboard_bbh").subtask_choices) == 24


@pytest.mark.parametrize("change, message", [
    ({"num_fewshot": -1}, "num_fewshot"),
    ({"num_fewshot": None}, "num_fewshot"),
    ({"metric": []}, "metric"),
    ({"average_uses": "weighted"}, "average_uses"),
    ({"shots": 5}, "Unknown key"),
    ({"normalization": {"random_baseline": 1.5}}, "random_baseline"),
])
def test_malformed_suite_entries_are_config_errors(change, message):
    entry = {"task": "arc_challenge", "num_fewshot": 25, "metric": "acc_norm", **change}
    with pytest.raises(ConfigError, match=message):
        harness.load_harness_suite({"name": "bad", "type": "lm_eval", "tasks": [entry]})


def test_suite_of_another_type_or_unknown_name_is_rejected():
    with pytest.raises(ConfigError, match="not lm_eval"):
        harness.load_harness_suite({"name": "dolly", "type": "generation", "tasks": []})
    with pytest.raises(ConfigError, match="no_such_suite"):
        harness.load_harness_suite("no_such_suite")
    with pytest.raises(ConfigError, match="more than once"):
        harness.load_harness_suite({"name": "dup", "type": "lm_eval", "tasks": [
            {"task": "boolq", "num_fewshot": 0, "metric": "acc"}] * 2})


# ----------------------------------------------------------------------------------------------
# averages and normalization on fixtures
# ----------------------------------------------------------------------------------------------
# (acc, number of questions) of three MMLU-like subjects, written by hand
MMLU_FIXTURE = {"mmlu_anatomy": (0.5, 100), "mmlu_astronomy": (0.8, 300), "mmlu_virology": (0.2, 100)}


def fake_lm_eval_results(group: str, subjects: dict[str, tuple[float, int]], group_value: float) -> dict:
    """What lm_eval.simple_evaluate returns for a group, in its own layout."""
    results = {group: {"acc,none": group_value, "acc_stderr,none": 0.01}}
    results.update({name: {"acc,none": acc, "acc_stderr,none": 0.02} for name, (acc, _) in subjects.items()})
    return {"results": results, "n-samples": {name: {"original": n, "effective": n}
                                              for name, (_, n) in subjects.items()}}


def test_mmlu_both_averages_on_fixture():
    averages = harness.subtask_averages(MMLU_FIXTURE)
    assert averages["size_weighted"] == pytest.approx((50 + 240 + 20) / 500)  # 0.62, lm-eval's `mmlu`
    assert averages["unweighted"] == pytest.approx((0.5 + 0.8 + 0.2) / 3)  # 0.5, OLL v1's MMLU


def test_mmlu_averages_match_lm_eval_aggregation_over_57_subjects():
    pytest.importorskip("lm_eval")
    from lm_eval.api.metrics import aggregate_subtask_metrics

    subjects = {f"mmlu_subject_{i:02d}": ((i * 37 % 101) / 101, 100 + 13 * i) for i in range(57)}
    values = [acc for acc, _ in subjects.values()]
    sizes = [n for _, n in subjects.values()]
    averages = harness.subtask_averages(subjects)
    assert averages["size_weighted"] == pytest.approx(aggregate_subtask_metrics(values, sizes, True))
    assert averages["unweighted"] == pytest.approx(aggregate_subtask_metrics(values, sizes, False))
    assert averages["size_weighted"] != pytest.approx(averages["unweighted"])  # the choice matters here


def test_oll_v1_average_uses_the_unweighted_mmlu_subject_mean():
    suite = harness.load_harness_suite("oll")
    weighted = harness.subtask_averages(MMLU_FIXTURE)["size_weighted"]
    mmlu = harness._score(suite.task("mmlu"), dict.fromkeys(MMLU_FIXTURE), object(),
                          fake_lm_eval_results("mmlu", MMLU_FIXTURE, weighted))
    assert mmlu.value == pytest.approx(0.62) and mmlu.subtask_mean == pytest.approx(0.5)
    assert mmlu.n == 500 and mmlu.stderr == 0.01
    others = {"arc_challenge": 0.40, "hellaswag": 0.60, "truthfulqa_mc2": 0.45, "winogrande": 0.55, "gsm8k": 0.10}
    scores = {"mmlu": mmlu}
    for task, value in others.items():
        entry = suite.task(task)
        key = f"{entry.metrics[0]},{entry.filter}"
        scores[task] = harness._score(entry, {task: None}, None, {
            "results": {task: {key: value, f"{entry.metrics[0]}_stderr,{entry.filter}": 0.01}},
            "n-samples": {task: {"effective": 1000}}})
    assert scores["gsm8k"].filter == "strict-match" and scores["gsm8k"].value == 0.10
    average = harness.suite_averages(scores)["average"]
    assert average == pytest.approx((0.40 + 0.60 + 0.5 + 0.45 + 0.55 + 0.10) / 6)


def test_gsm8k_score_reads_the_named_filter():
    entry = harness.load_harness_suite("oll").task("gsm8k")
    results = {"results": {"gsm8k": {"exact_match,strict-match": 0.12, "exact_match,flexible-extract": 0.31}},
               "n-samples": {"gsm8k": {"effective": 1319}}}
    assert harness._score(entry, {"gsm8k": None}, None, results).value == 0.12
    flexible = harness.HarnessTask("gsm8k", 5, ("exact_match",), "flexible-extract")
    assert harness._score(flexible, {"gsm8k": None}, None, results).value == 0.31


def test_leaderboard_normalization():
    assert harness.normalize_to_random_baseline(0.40, 0.25) == pytest.approx(20.0)
    assert harness.normalize_to_random_baseline(0.20, 0.25) == 0.0  # below chance clips to 0
    assert harness.normalize_to_random_baseline(0.37, 0.0) == pytest.approx(37.0)

    suite = harness.load_harness_suite("oll-v2")
    bbh_choices = suite.task("leaderboard_bbh").subtask_choices
    bbh_sub = {name: 0.6 for name in bbh_choices}
    musr_sub = {"leaderboard_musr_murder_mysteries": 0.55, "leaderboard_musr_object_placements": 0.30,
                "leaderboard_musr_team_allocation": 0.30}

    def score(task, value, subtasks=None, components=None):
        entry = suite.task(task)
        return harness.TaskScore(task, entry.metric_label, value, None, 100, entry.num_fewshot, "none",
                                 components=components or {}, subtasks=subtasks or {})

    tasks = {
        "leaderboard_bbh": score("leaderboard_bbh", 0.6, bbh_sub),
        "leaderboard_gpqa": score("leaderboard_gpqa", 0.30),
        "leaderboard_math_hard": score("leaderboard_math_hard", 0.05),
        "leaderboard_ifeval": score("leaderboard_ifeval", 0.45, components={
            "prompt_level_strict_acc": 0.40, "inst_level_strict_acc": 0.50}),
        "leaderboard_musr": score("leaderboard_musr", 0.40, musr_sub),
        "leaderboard_mmlu_pro": score("leaderboard_mmlu_pro", 0.28),
    }
    result = harness.HarnessResult(suite, "0.4.x", tasks, harness.suite_averages(tasks))
    normalized = result.normalized()
    bbh = sum(max(0.0, (0.6 - 1 / c) / (1 - 1 / c)) for c in bbh_choices.values()) * 100 / 24
    musr = ((0.55 - 0.5) / 0.5 + (0.30 - 0.2) / 0.8 + 0.0) * 100 / 3  # team allocation 0.30 < 1/3 -> 0
    expected = {"leaderboard_bbh": bbh, "leaderboard_gpqa": (0.30 - 0.25) / 0.75 * 100,
                "leaderboard_math_hard": 5.0, "leaderboard_ifeval": 45.0, "leaderboard_musr": musr,
                "leaderboard_mmlu_pro": (0.28 - 0.1) / 0.9 * 100}
    for task, value in expected.items():
        assert normalized[task] == pytest.approx(value), task
    assert normalized["average"] == pytest.approx(sum(expected.values()) / 6)
    with pytest.raises(ConfigError, match="random baseline"):
        harness.leaderboard_normalized_scores(harness.HarnessResult(
            harness.load_harness_suite("akl-general"), "0.4.x", {"boolq": score("leaderboard_gpqa", 0.5)}, {}))


# ----------------------------------------------------------------------------------------------
# against lm-eval's own task files (indexing them takes ~10 s, once per process)
# ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def manager():
    pytest.importorskip("lm_eval")
    return harness.task_manager()


def lm_eval_yaml(manager, name: str) -> dict:
    from lm_eval.tasks._yaml_loader import load_yaml

    entry = manager.task_index[name]
    return load_yaml(entry.yaml_path, resolve_func=False)


def test_suite_task_names_metrics_and_filters_exist_in_lm_eval(manager):
    for suite_name in ("oll", "akl-general", "oll-v2"):
        for entry in harness.load_harness_suite(suite_name).tasks:
            assert entry.task in manager.task_index, (suite_name, entry.task)
    for name, metric in (("arc_challenge", "acc_norm"), ("hellaswag", "acc_norm"), ("truthfulqa_mc2", "acc"),
                         ("winogrande", "acc"), ("openbookqa", "acc"), ("boolq", "acc"),
                         ("gsm8k", "exact_match")):
        assert metric in {m["metric"] for m in lm_eval_yaml(manager, name)["metric_list"]}, name
    gsm8k_filters = {f["name"] for f in lm_eval_yaml(manager, "gsm8k")["filter_list"]}
    assert {"strict-match", "flexible-extract"} <= gsm8k_filters
    mmlu = lm_eval_yaml(manager, "mmlu")
    assert [(a["metric"], a["weight_by_size"]) for a in mmlu["aggregate_metric_list"]] == [("acc", True)]


def test_oll_v2_matches_lm_eval_leaderboard_group(manager):
    suite = harness.load_harness_suite("oll-v2")
    assert sorted(t.task for t in suite.tasks) == sorted(lm_eval_yaml(manager, "leaderboard")["task"])
    for entry in suite.tasks:
        body = lm_eval_yaml(manager, entry.task)
        leaves = body["task"] if "group" in body else [entry.task]
        for leaf in leaves:
            # the shot count lm-eval's own file gives each leaf is the one the suite sets explicitly
            assert lm_eval_yaml(manager, leaf).get("num_fewshot", 0) == entry.num_fewshot, leaf
        if entry.subtask_choices:
            assert sorted(entry.subtask_choices) == sorted(leaves)
    for leaf, choices in suite.task("leaderboard_bbh").subtask_choices.items():
        assert len(lm_eval_yaml(manager, leaf)["doc_to_choice"]) == choices, leaf


@pytest.fixture(scope="module")
def tiny_model():
    transformers = pytest.importorskip("transformers")
    if not TOKENIZER_DIR.is_dir():
        pytest.skip(f"shared GPT-2 tokenizer not found at {TOKENIZER_DIR}")
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(TOKENIZER_DIR))
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=1, n_embd=32, n_head=2,
                                                                 vocab_size=len(tokenizer)))
    return model, tokenizer


def test_unknown_task_is_one_clear_sentence(manager, tiny_model):
    with pytest.raises(ConfigError) as info:
        harness.run_harness(*tiny_model, suite={"name": "typo", "type": "lm_eval", "tasks": [
            {"task": "arc_challeng", "num_fewshot": 25, "metric": "acc_norm"}]})
    message = str(info.value)
    assert "'arc_challeng'" in message and "'typo'" in message
    assert message.count(". ") == 0 and "\n" not in message and message.endswith(".")


def test_unreachable_dataset_says_so(manager, tiny_model, monkeypatch):
    import datasets.config
    import huggingface_hub.constants

    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", True, raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True, raising=False)
    with pytest.raises(DataError) as info:
        harness.run_harness(*tiny_model, suite="akl-general", limit=2)
    message = str(info.value)
    assert "'arc_challenge'" in message and "could not be downloaded" in message
    assert "HF_DATASETS_OFFLINE" in message and "\n" not in message
