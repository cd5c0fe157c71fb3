"""The embedded benchmark's corpus: determinism, length buckets, split hygiene, tokenizer."""

from __future__ import annotations

import json
from collections import Counter

import pytest

from kdbench.errors import ConfigError
from kdbench.metrics import length_buckets
from kdbench.store import hash_tree
from kdbench.synthetic.corpus import FILES, CorpusConfig, build_corpus, load_corpus_rows
from kdbench.synthetic.world import CATEGORIES


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    folder = tmp_path_factory.mktemp("corpus")
    info = build_corpus(CorpusConfig(), folder)
    return folder, info


def test_deterministic_for_a_seed(corpus, tmp_path):
    folder, _ = corpus
    again = tmp_path / "again"
    again.mkdir()
    build_corpus(CorpusConfig(), again)
    for name in FILES.values():
        assert (folder / name).read_bytes() == (again / name).read_bytes(), name
    other = tmp_path / "other"
    other.mkdir()
    build_corpus(CorpusConfig(seed=1), other)
    assert (other / FILES["test"]).read_bytes() != (folder / FILES["test"]).read_bytes()
    assert hash_tree(folder / "tokenizer") == hash_tree(again / "tokenizer")


def test_every_length_bucket_and_category_is_covered(corpus):
    folder, _ = corpus
    test = load_corpus_rows(folder, "test")
    buckets = Counter(length_buckets([r["references"] for r in test]))
    assert set(buckets) == {"(0,30]", "(30,70]", "(70,inf)"}, buckets
    assert all(count >= 5 for count in buckets.values()), buckets
    train = load_corpus_rows(folder, "teacher_train")
    assert set(CATEGORIES) <= {r["category"] for r in train + test}


def test_no_instance_in_two_splits(corpus):
    folder, _ = corpus
    splits = {name: load_corpus_rows(folder, name) for name in ("teacher_train", "validation", "test")}
    keys = {name: {r["key"] for r in rows} for name, rows in splits.items()}
    prompts = {name: {(r["instruction"], r["input"]) for r in rows} for name, rows in splits.items()}
    for a, b in (("teacher_train", "validation"), ("teacher_train", "test"), ("validation", "test")):
        assert not keys[a] & keys[b], (a, b)
        assert not prompts[a] & prompts[b], (a, b)


def test_student_sees_a_labelled_subset_and_unlabelled_prompts(corpus):
    folder, info = corpus
    teacher = {r["key"] for r in load_corpus_rows(folder, "teacher_train")}
    student = load_corpus_rows(folder, "student_train")
    unlabelled = load_corpus_rows(folder, "student_unlabelled")
    assert {r["key"] for r in student} < teacher
    assert all("output" not in r for r in unlabelled)
    assert not {r["key"] for r in student} & {r["key"] for r in unlabelled}
    assert len(student) < len(teacher) / 2  # the teacher genuinely sees more
    prefs = load_corpus_rows(folder, "preferences")
    assert prefs and all(p["chosen"] != p["rejected"] for p in prefs)


def test_brainstorming_has_several_valid_references(corpus):
    folder, _ = corpus
    rows = [r for r in load_corpus_rows(folder, "teacher_train") + load_corpus_rows(folder, "test")
            if r["key"].count("/") == 1 and r["category"] == "brainstorming"]
    assert rows and all(len(r["references"]) > 1 for r in rows)


def test_tokenizer_round_trips_the_text(corpus):
    from transformers import AutoTokenizer

    folder, _ = corpus
    tokenizer = AutoTokenizer.from_pretrained(str(folder / "tokenizer"))
    for row in load_corpus_rows(folder, "test")[:50]:
        text = row["references"][0]
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        assert tokenizer.unk_token_id not in ids
        assert tokenizer.decode(ids) == text


def test_multiple_choice_rows_are_well_formed(corpus):
    folder, _ = corpus
    with open(folder / FILES["multiple_choice"]) as handle:
        rows = [json.loads(line) for line in handle]
    test_keys = {r["key"] for r in load_corpus_rows(folder, "test")}
    assert len(rows) >= 30 and all(r["key"] in test_keys for r in rows)
    assert all(len(r["choices"]) == 4 and len(set(r["choices"])) == 4 and 0 <= r["answer"] < 4 for r in rows)


def test_invalid_config_is_a_clear_error():
    with pytest.raises(ConfigError, match="n_people"):
        CorpusConfig(n_people=4)
    with pytest.raises(ConfigError, match="between 0 and 1"):
        CorpusConfig(test_fraction=1.5)


@pytest.fixture(scope="module")
def noisy_corpus(tmp_path_factory):
    folder = tmp_path_factory.mktemp("noisy")
    config = CorpusConfig(n_people=24, n_cities=4, label_noise=0.3, language_people=16)
    return folder, build_corpus(config, folder), config


def test_careless_annotator_writes_the_plausible_wrong_answer(noisy_corpus, tmp_path):
    folder, info, config = noisy_corpus
    truth = {r["key"]: r for r in load_corpus_rows(folder, "teacher_train") if "rejected" in r}
    student_all = load_corpus_rows(folder, "student_all")
    assert {r["key"] for r in student_all} == set(truth)
    noisy = [r for r in student_all if r["output"] != truth[r["key"]]["output"]]
    assert all(r["output"] == truth[r["key"]]["rejected"] for r in noisy)
    assert len(noisy) == info["noisy_labels"]["student_all"]
    assert 0.2 < len(noisy) / len(student_all) < 0.4  # the configured rate, one draw per instance
    student = load_corpus_rows(folder, "student_train")
    assert all(r in student_all for r in student)  # the labelled subset carries the same labels
    assert all(set(r) == {"key", "category", "instruction", "input", "output"} for r in student)
    # the preference pairs, validation and test keep the right answers
    assert all(p["chosen"] == truth[p["key"]]["output"] for p in load_corpus_rows(folder, "preferences"))
    swapped = load_corpus_rows(folder, "preferences_swapped")
    assert [(p["chosen"], p["rejected"]) for p in swapped] == \
        [(p["rejected"], p["chosen"]) for p in load_corpus_rows(folder, "preferences")]
    valid = load_corpus_rows(folder, "validation_preferences")
    assert valid and {p["key"] for p in valid} <= {r["key"] for r in load_corpus_rows(folder, "validation")}
    build_corpus(CorpusConfig(n_people=24, n_cities=4), tmp_path)  # the same world without the noise
    assert load_corpus_rows(tmp_path, "test") == load_corpus_rows(folder, "test")


def test_language_world_shares_the_templates_but_no_name(noisy_corpus):
    folder, info, config = noisy_corpus
    language = load_corpus_rows(folder, "language")
    assert len(language) == info["counts"]["language"] > 0
    names = {r["key"].split("/")[1] for r in load_corpus_rows(folder, "teacher_train")}
    language_names = {r["key"].split("/")[1] for r in language}
    assert names and language_names and not names & language_names
    words = lambda rows: {w for r in rows for w in (r["instruction"] + " " + r["output"]).split()}
    assert not words(language) & names  # no fact of the benchmark's world is mentioned
    assert {r["category"] for r in language} >= set(CATEGORIES)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(folder / "tokenizer"))
    ids = tokenizer(language[0]["output"], add_special_tokens=False)["input_ids"]
    assert tokenizer.unk_token_id not in ids


def test_noise_and_language_settings_are_checked():
    with pytest.raises(ConfigError, match="label_noise"):
        CorpusConfig(label_noise=0.5)
    with pytest.raises(ConfigError, match="language_people"):
        CorpusConfig(language_people=3)
