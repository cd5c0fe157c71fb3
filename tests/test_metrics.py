"""kdbench.metrics against independent references: rouge_score itself, a plain DP LCS, exact
enumeration for the sign-flip test, the statistics module, and hand-checked values."""

from __future__ import annotations

import itertools
import json
import math
import random
import statistics
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest

from kdbench import metrics

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
needs_data = pytest.mark.skipif(not DATA.is_dir(), reason=f"shared test data not found at {DATA}")


@pytest.fixture(scope="module")
def scorer():
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _reference_scores(scorer, predictions, references):
    return [max(scorer.score(ref, pred)["rougeL"].fmeasure for ref in refs) for pred, refs in zip(predictions, references)]


def _assert_equal_scores(ours, expected, predictions, references):
    assert len(ours) == len(expected)
    for index, (a, b) in enumerate(zip(ours, expected)):
        assert abs(a - b) <= 1e-9, (
            f"pair {index}: kdbench {a!r} != rouge_score {b!r}\n"
            f"prediction={predictions[index][:200]!r}\nreferences={[r[:200] for r in references[index]]!r}"
        )


# --- Rouge-L ------------------------------------------------------------------------------------


@needs_data
def test_rouge_l_equals_rouge_score_on_real_pairs(scorer):
    metrics.clear_caches()
    rng = random.Random(1)
    predictions, references = [], []
    # Self-Instruct: text-davinci-003's real predictions vs the human references (all 252)
    for row in _jsonl(DATA / "self_instruct/predictions/text-davinci-003_predictions.jsonl"):
        predictions.append(row["response"])
        references.append([row["target"]])
    # Vicuna: two real models' answers vs MiniLLM's references (long texts)
    vicuna_refs = [row["output"] for row in _jsonl(DATA / "vicuna80/minillm_processed/valid.jsonl")]
    for model in ("alpaca-13b", "llama-13b"):
        for row, ref in zip(_jsonl(DATA / f"vicuna80/fastchat_eval_table/answer/answer_{model}.jsonl"), vicuna_refs):
            predictions.append(row["text"])
            references.append([ref])
    # Dolly references against each other
    dolly = [row["output"] for row in _jsonl(DATA / "dolly/minillm_processed/valid.jsonl")]
    for _ in range(250):
        predictions.append(rng.choice(dolly))
        references.append([rng.choice(dolly)])
    # S-NI: a reference of one example against the (possibly several) references of another of the same task
    by_task = defaultdict(list)
    for row in _jsonl(DATA / "sni/minillm_processed/11_/valid.jsonl"):
        by_task[row["topic"]].append(row["output"])
    tasks = sorted(t for t, rows in by_task.items() if len(rows) > 1)
    for _ in range(250):
        first, second = rng.sample(by_task[rng.choice(tasks)], 2)
        predictions.append(rng.choice(first))
        references.append(second)
    expected = _reference_scores(scorer, predictions, references)
    ours = metrics.rouge_l_scores(predictions, references)
    _assert_equal_scores(ours, expected, predictions, references)
    assert 0.05 < statistics.mean(ours) < 0.6  # real, non-degenerate pairs
    assert any(len(r) > 1 for r in references)


def test_rouge_l_edge_cases(scorer):
    cases = [
        ("", "a reference"),
        ("a prediction", ""),
        ("", ""),
        ("!!! ??? ...", "..."),
        ("The cats are running quickly.", "the cat ran quick"),
        ("İstanbul straße café naïve", "istanbul strasse cafe naive"),
        ("K (Kelvin sign) and ﬁ ligature", "k kelvin sign and fi ligature"),
        ("１２３ full-width digits 123", "123 digits"),
        ("don't won't it's", "do not will not it is"),
        ("generously generalizations relational", "generous general relate"),
        ("abc " * 200, "abc " * 150 + "xyz " * 80),  # > 64 tokens: several machine words of bits
        ("\n\t line\r\nbreaks\u00a0nbsp\u2003emsp", "line breaks nbsp emsp"),
        ("x" * 5, "xxxxx"),
    ]
    predictions = [p for p, _ in cases]
    references = [[r] for _, r in cases]
    _assert_equal_scores(
        metrics.rouge_l_scores(predictions, references),
        _reference_scores(scorer, predictions, references),
        predictions,
        references,
    )
    assert metrics.rouge_l("same words here", "Same words, here!") == 1.0
    assert metrics.rouge_l("", "anything") == 0.0


def test_rouge_l_random_token_sequences(scorer):
    # small vocabulary, so LCS lengths are non-trivial and there are many repeated tokens
    rng = random.Random(7)
    vocab = ["alpha", "beta", "gamma", "running", "runs", "ran", "a", "the", "cats", "cat", "12", "x"]
    predictions, references = [], []
    for _ in range(300):
        predictions.append(" ".join(rng.choices(vocab, k=rng.randint(0, 90))))
        references.append([" ".join(rng.choices(vocab, k=rng.randint(1, 90))) for _ in range(rng.randint(1, 3))])
    _assert_equal_scores(
        metrics.rouge_l_scores(predictions, references),
        _reference_scores(scorer, predictions, references),
        predictions,
        references,
    )


def _dp_lcs(a, b):
    previous = [0] * (len(b) + 1)
    for x in a:
        current = [0]
        for j, y in enumerate(b, start=1):
            current.append(previous[j - 1] + 1 if x == y else max(previous[j], current[j - 1]))
        previous = current
    return previous[-1]


def test_bit_parallel_lcs_matches_dynamic_programming():
    rng = random.Random(3)
    for _ in range(400):
        alphabet = rng.randint(1, 8)
        a = [rng.randrange(alphabet) for _ in range(rng.randint(0, 150))]
        b = [rng.randrange(alphabet) for _ in range(rng.randint(0, 150))]
        assert metrics.lcs_length(a, b) == _dp_lcs(a, b) == metrics.lcs_length(b, a)


def test_rouge_l_scores_rejects_mismatched_inputs():
    with pytest.raises(ValueError):
        metrics.rouge_l_scores(["a"], [["a"], ["b"]])
    with pytest.raises(ValueError):
        metrics.rouge_l_scores(["a"], [[]])
    with pytest.raises(ValueError):
        metrics.rouge_l_scores(["a"], ["a plain string, not a list"])


# --- exact match --------------------------------------------------------------------------------


def test_exact_match_normalization():
    assert metrics.normalize_answer("  The  Cat,\tsat!\n") == "the cat sat"
    assert metrics.normalize_answer("A cat", drop_articles=True) == "cat"
    predictions = ["The cat.", "a cat", "a cat", "Paris", "no", "  42 "]
    references = [["the CAT"], ["cat"], ["cat"], ["London", "paris!"], ["No way"], ["42"]]
    assert metrics.exact_match_scores(predictions, references) == [1.0, 0.0, 0.0, 1.0, 0.0, 1.0]
    with_articles_dropped = metrics.exact_match_scores(predictions, references, drop_articles=True)
    assert with_articles_dropped == [1.0, 1.0, 1.0, 1.0, 0.0, 1.0]
    # articles are only whole words: "anthem" keeps its "an"
    assert metrics.normalize_answer("Anthem of the sea", drop_articles=True) == "anthem of sea"
    # only ASCII punctuation is removed, as in MiniLLM (string.punctuation)
    assert metrics.exact_match_scores(["“quoted”"], [["quoted"]]) == [0.0]


# --- length buckets -----------------------------------------------------------------------------


def _words(n: int) -> str:
    return " ".join(["w"] * n)


def test_length_buckets_are_right_closed_on_the_first_reference():
    counts = [1, 29, 30, 31, 69, 70, 71, 500]
    refs = [[_words(n), _words(1000)] for n in counts]  # second reference must be ignored
    assert metrics.length_buckets(refs) == [
        "(0,30]", "(0,30]", "(0,30]", "(30,70]", "(30,70]", "(30,70]", "(70,inf)", "(70,inf)"
    ]
    assert metrics.bucket_labels((30, 70)) == ["(0,30]", "(30,70]", "(70,inf)"]
    assert metrics.length_buckets([[_words(10)]], edges=(5,)) == ["(5,inf)"]
    with pytest.raises(ValueError):
        metrics.length_buckets(refs, edges=(70, 30))
    with pytest.raises(ValueError):
        metrics.length_buckets(refs, edges="median")


def test_auto_bucket_edges_are_median_and_mean():
    counts = [10, 20, 30, 40, 200]  # median 30, mean 60
    refs = [[_words(n)] for n in counts]
    assert metrics.bucket_edges_auto(refs) == (30, 60)
    assert metrics.length_buckets(refs, edges="auto") == ["(0,30]", "(0,30]", "(0,30]", "(30,60]", "(60,inf)"]
    # left-skewed: median above mean, the edges are sorted
    assert metrics.bucket_edges_auto([[_words(n)] for n in (1, 50, 51, 52)]) == (38, 50)


@needs_data
def test_auto_edges_on_dolly_are_close_to_dpkd():
    refs = [[row["output"]] for row in _jsonl(DATA / "dolly/minillm_processed/valid.jsonl")]
    counts = [len(r[0].split()) for r in refs]
    expected = tuple(sorted((round(statistics.median(counts)), round(statistics.mean(counts)))))
    assert metrics.bucket_edges_auto(refs) == expected == (33, 72)


# --- statistics ---------------------------------------------------------------------------------


def test_mean_std_matches_statistics_module():
    values = [38.2, 39.1, 37.6, 38.8, 40.0]
    mean, std = metrics.mean_std(values)
    assert mean == pytest.approx(statistics.mean(values), abs=1e-12)
    assert std == pytest.approx(statistics.stdev(values), abs=1e-12)
    assert metrics.mean_std([5.0]) == (5.0, 0.0)
    assert all(math.isnan(x) for x in metrics.mean_std([]))


def test_bootstrap_ci_contains_mean_and_shrinks_with_n():
    rng = np.random.default_rng(0)
    small = rng.uniform(0, 1, size=100)
    large = rng.uniform(0, 1, size=10_000)
    low_s, high_s = metrics.bootstrap_ci(small)
    low_l, high_l = metrics.bootstrap_ci(large)
    assert low_s < small.mean() < high_s
    assert low_l < large.mean() < high_l
    assert (high_l - low_l) < (high_s - low_s) / 5  # width ~ 1/sqrt(n): 10x narrower expected
    # width agrees with the normal approximation 2 * 1.96 * sd / sqrt(n)
    normal_width = 2 * 1.96 * large.std(ddof=1) / math.sqrt(large.size)
    assert (high_l - low_l) == pytest.approx(normal_width, rel=0.15)
    assert metrics.bootstrap_ci(small, seed=3) == metrics.bootstrap_ci(small, seed=3)
    assert metrics.bootstrap_ci([0.7]) == (0.7, 0.7)


def test_paired_test_separates_real_differences_from_noise():
    rng = np.random.default_rng(1)
    base = rng.uniform(0, 1, size=300)
    better = np.clip(base + 0.05 + rng.normal(0, 0.05, size=300), 0, 1)
    for method in ("bootstrap", "permutation"):
        assert metrics.paired_test(better, base, method=method, n_resamples=2000) < 0.01
        assert metrics.paired_test(base, base, method=method) == 1.0
    # same distribution: p-values spread over (0, 1], rarely below 0.05
    p_values = []
    for trial in range(40):
        trial_rng = np.random.default_rng(100 + trial)
        prompt_difficulty = trial_rng.uniform(0, 1, size=200)
        run_a = prompt_difficulty + trial_rng.normal(0, 0.1, size=200)
        run_b = prompt_difficulty + trial_rng.normal(0, 0.1, size=200)
        p_values.append(metrics.paired_test(run_a, run_b, n_resamples=500, seed=trial))
    assert sum(p < 0.05 for p in p_values) <= 6
    assert statistics.median(p_values) > 0.25


def test_permutation_test_matches_exact_enumeration():
    a = np.array([0.61, 0.40, 0.75, 0.52, 0.33, 0.90, 0.47, 0.58, 0.66, 0.71])
    b = np.array([0.55, 0.42, 0.60, 0.50, 0.30, 0.81, 0.49, 0.52, 0.61, 0.70])
    diff = a - b
    observed = abs(diff.mean())
    flips = np.array(list(itertools.product([-1, 1], repeat=diff.size)))
    exact = np.mean(np.abs((flips * diff).mean(axis=1)) >= observed - 1e-12)
    estimate = metrics.paired_test(a, b, method="permutation", n_resamples=20_000)
    assert estimate == pytest.approx(exact, abs=0.01)
    with pytest.raises(ValueError):
        metrics.paired_test(a, b[:-1])
    with pytest.raises(ValueError):
        metrics.paired_test(a, b, method="sign")


def test_omega_matches_published_counts():
    # FastChat's GPT-4 reviews of Vicuna-13B (vicuna80/SOURCE.md): W/T/L -> omega
    assert metrics.omega(76, 1, 3) == pytest.approx(91.25)
    assert metrics.omega(40, 10, 30) == pytest.approx(12.5)
    assert metrics.omega(14, 22, 44) == pytest.approx(-37.5)
    with pytest.raises(ValueError):
        metrics.omega(0, 0, 0)
    with pytest.raises(ValueError):
        metrics.omega(-1, 2, 3)


def test_summarize_scores_per_group():
    scores = {"rouge_l": [0.1, 0.2, 0.3, 0.4, 0.5], "exact_match": [0.0, 1.0, 0.0, 0.0, 1.0]}
    groups = ["(0,30]", "(30,70]", "(0,30]", None, "(30,70]"]
    rows = metrics.summarize_scores(scores, groups, group_order=["(0,30]", "(30,70]", "(70,inf)"])
    table = {(r.metric, r.group): r for r in rows}
    assert table[("rouge_l", None)].n == 5
    assert table[("rouge_l", None)].mean == pytest.approx(0.3)
    assert table[("rouge_l", "(0,30]")].n == 2
    assert table[("rouge_l", "(0,30]")].mean == pytest.approx(0.2)
    assert table[("exact_match", "(30,70]")].mean == pytest.approx(1.0)
    assert table[("rouge_l", "(70,inf)")].n == 0 and math.isnan(table[("rouge_l", "(70,inf)")].mean)
    for row in rows:
        if row.n:
            assert row.ci_low <= row.mean <= row.ci_high
    with pytest.raises(ValueError):
        metrics.summarize_scores({"a": [1.0], "b": [1.0, 2.0]})
