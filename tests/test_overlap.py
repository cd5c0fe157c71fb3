"""kdbench.overlap: detects an inserted duplicate, agrees with a naive set-of-tuples count."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from kdbench import overlap
from kdbench.errors import DataError
from kdbench.suites import Example

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
needs_data = pytest.mark.skipif(not DATA.is_dir(), reason=f"shared test data not found at {DATA}")


def _naive_fraction(train_texts, example: Example, n: int):
    def grams(text):
        tokens = re.findall(r"\w+", text.lower())
        return [tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]

    train = {g for t in train_texts for g in grams(t)}
    fields = [example.instruction, example.input, *example.references]
    all_grams = [g for f in fields if f for g in grams(f)]
    return sum(g in train for g in all_grams) / len(all_grams) if all_grams else None


def _example(i: int, text: str, reference: str = "") -> Example:
    return Example(id=f"e{i}", instruction=text, input="", references=[reference or f"reference number {i}"])


def test_fractions_match_naive_count():
    corpus = [
        "the quick brown fox jumps over the lazy dog and then runs away into the deep dark forest",
        "lorem ipsum dolor sit amet consectetur adipiscing elit sed do eiusmod tempor incididunt ut labore",
    ]
    examples = [
        _example(0, "The QUICK brown fox jumps over the lazy dog, and then runs away!"),  # case/punctuation differ
        _example(1, "a quick brown fox jumps over the lazy dog and then walks away slowly"),
        _example(2, "completely unrelated words that never appear in the training corpus at all here"),
        _example(3, "too short"),
        _example(4, "lorem ipsum dolor sit", reference="amet consectetur adipiscing elit sed do eiusmod"),
    ]
    for n in (3, 5):
        rows = overlap.ngram_overlap(corpus, examples, n=n)
        for row, example in zip(rows, examples):
            expected = _naive_fraction(corpus, example, n)
            assert row["id"] == example.id
            if expected is None:
                assert row["fraction"] is None
            else:
                assert row["fraction"] == pytest.approx(expected)
    rows = overlap.ngram_overlap(corpus, examples, n=5)
    assert rows[0]["prompt_fraction"] == 1.0
    assert 0 < rows[1]["fraction"] < 1
    assert rows[2]["fraction"] == 0.0
    # n-grams never span fields: "sit amet" is split between instruction and reference in example 4
    assert rows[4]["prompt_fraction"] is None and rows[4]["reference_fraction"] == 1.0


def test_ngram_hashes_are_deterministic_and_distinct():
    a = overlap.ngram_hashes("one two three four five six", n=3)
    assert a.shape == (4,) and len(set(a.tolist())) == 4
    assert (a == overlap.ngram_hashes("ONE two, three four five six!", n=3)).all()
    assert overlap.ngram_hashes("one two", n=3).size == 0


@needs_data
def test_report_detects_inserted_duplicate(tmp_path):
    # training set: the raw Self-Instruct file (no 13-gram in common with Dolly) plus one Dolly row
    train_rows = [json.loads(line) for line in (DATA / "self_instruct/user_oriented_instructions.jsonl").open()]
    dolly_rows = [json.loads(line) for line in (DATA / "dolly/minillm_processed/valid.jsonl").open()]
    leaked = dolly_rows[123]
    train_rows.insert(40, {"instruction": "Answer.", "output": leaked["output"]})  # reference leaked only
    train_path = tmp_path / "train.jsonl"
    train_path.write_text("".join(json.dumps(r) + "\n" for r in train_rows))

    report = overlap.overlap_report(train_path, "dolly", data_path=DATA)
    summary = report["summary"]
    assert summary["n_examples"] == 500
    flagged = [row for row in report["rows"] if row["n_found"] > 0]
    leaked_ids = {f"dolly-{i}" for i, row in enumerate(dolly_rows) if row["output"] == leaked["output"]}
    assert {row["id"] for row in flagged} == leaked_ids
    assert all(row["reference_fraction"] == 1.0 for row in flagged)
    assert summary["n_any_overlap"] == len(leaked_ids)
    assert summary["train_unique_ngrams"] > 0

    clean = overlap.overlap_report(DATA / "self_instruct/user_oriented_instructions.jsonl", "dolly", data_path=DATA)
    assert clean["summary"]["n_any_overlap"] == 0


def test_plain_text_training_file_and_errors(tmp_path):
    text_file = tmp_path / "train.txt"
    text_file.write_text("alpha beta gamma delta\nepsilon zeta eta theta\n")
    assert list(overlap.iter_train_texts(text_file)) == ["alpha beta gamma delta", "epsilon zeta eta theta"]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{oops\n')
    with pytest.raises(DataError, match="line 2"):
        list(overlap.iter_train_texts(bad))
    with pytest.raises(DataError, match="does not exist"):
        list(overlap.iter_train_texts(tmp_path / "missing.jsonl"))
    chat = tmp_path / "chat.jsonl"
    chat.write_text(json.dumps({"messages": [{"role": "user", "content": "hello there"}]}) + "\n")
    assert list(overlap.iter_train_texts(chat)) == ["user", "hello there"]


def test_index_dedups_across_chunks():
    texts = [f"w{i} w{i + 1} w{i + 2}" for i in range(50)] * 3
    index = overlap.NgramIndex(texts, n=3, chunk_size=10)
    assert len(index) == 50 and index.n_texts == 150
