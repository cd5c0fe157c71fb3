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
