"""N-gram overlap between a training set and an evaluation suite (a contamination check).

For each evaluation example: the fraction of its word n-grams (default n = 13, as in the GPT-3
contamination analysis) that also occur anywhere in the training texts. Text is normalized to
lowercase word tokens (``\\w+`` runs, so punctuation and spacing do not matter); n-grams never
span two fields (instruction, input, each reference are separate texts).

Memory: training n-grams are stored as 64-bit hashes in one sorted numpy array (8 bytes each,
no Python objects per n-gram); each token is hashed once with BLAKE2b (deterministic across runs)
and n-gram hashes are combined with a polynomial (Rabin–Karp) hash, vectorized per text.
A hash collision can only over-report overlap, with probability about (number of n-grams) / 2^64.
"""

from __future__ import annotations

import hashlib
import math
import os
import re
from collections.abc import Iterable, Iterator, Sequence
from functools import lru_cache
from pathlib import Path

import numpy as np

from kdbench.errors import ConfigError, DataError

_WORD = re.compile(r"\w+")
# odd 64-bit multiplier for the polynomial n-gram hash (arithmetic wraps modulo 2^64)
_MULTIPLIER = np.uint64(0x9E3779B97F4A7C15)


def words(text: str) -> list[str]:
    """Normalized word tokens: lowercase ``\\w+`` runs."""
    return _WORD.findall(text.lower())


@lru_cache(maxsize=500_000)
def _token_hash(token: str) -> int:
    return int.from_bytes(hashlib.blake2b(token.encode("utf-8"), digest_size=8).digest(), "little")


def ngram_hashes(text: str, n: int = 13) -> np.ndarray:
    """64-bit hashes of all word n-grams of ``text``, shape [max(0, len(words) - n + 1)], dtype uint64."""
    tokens = words(text)
    count = len(tokens) - n + 1
    if count <= 0:
        return np.empty(0, dtype=np.uint64)
    token_hashes = np.fromiter((_token_hash(t) for t in tokens), dtype=np.uint64, count=len(tokens))
    hashes = np.zeros(count, dtype=np.uint64)
    with np.errstate(over="ignore"):
        for offset in range(n):  # h = (((t0·M + t1)·M + t2)·M + ...) mod 2^64
            hashes = hashes * _MULTIPLIER + token_hashes[offset : offset + count]
    return hashes


class NgramIndex:
    """The set of n-gram hashes of a training corpus, as one sorted unique uint64 array."""

    def __init__(self, texts: Iterable[str], n: int = 13, *, chunk_size: int = 1_000_000):
        if n < 1:
            raise ValueError(f"n must be at least 1, got {n}")
        self.n = n
        merged = np.empty(0, dtype=np.uint64)
        pending: list[np.ndarray] = []
        pending_size = 0
        self.n_texts = 0
        for text in texts:
            self.n_texts += 1
            hashes = ngram_hashes(text, n)
            if hashes.size:
                pending.append(hashes)
                pending_size += hashes.size
            if pending_size >= chunk_size:  # deduplicate as we go so memory tracks unique n-grams
                merged = np.unique(np.concatenate([merged, *pending]))
                pending, pending_size = [], 0
        if pending:
            merged = np.unique(np.concatenate([merged, *pending]))
        self.hashes = merged

    def __len__(self) -> int:
        return int(self.hashes.size)

    def contains(self, hashes: np.ndarray) -> np.ndarray:
        """Boolean mask, same shape as ``hashes``: which n-gram hashes occur in the index."""
        if hashes.size == 0 or self.hashes.size == 0:
            return np.zeros(hashes.shape, dtype=bool)
        positions = np.searchsorted(self.hashes, hashes)
        positions = np.minimum(positions, self.hashes.size - 1)
        return self.hashes[positions] == hashes


def _example_fields(example) -> tuple[list[str], list[str]]:
    """(prompt texts, reference texts) of an Example or a plain string."""
    if isinstance(example, str):
        return [example], []
    prompt = [example.instruction, example.input]
    return [t for t in prompt if t], list(example.references)


def _fraction(found: int, total: int) -> float | None:
    return found / total if total else None


def ngram_overlap(train_texts: Iterable[str] | NgramIndex, eval_examples: Sequence, n: int = 13) -> list[dict]:
    """Per evaluation example, the share of its word n-grams found in the training texts.

    ``eval_examples``: :class:`kdbench.suites.Example` objects (instruction, input and references
    are checked as separate texts) or plain strings. Returns one dict per example: ``id``,
    ``n_ngrams``, ``n_found``, ``fraction`` (None when the example has fewer than n words in
    every field), ``prompt_fraction`` and ``reference_fraction`` (same, per part).
    """
    index = train_texts if isinstance(train_texts, NgramIndex) else NgramIndex(train_texts, n)
    if index.n != n:
        raise ValueError(f"the index holds {index.n}-grams, asked for n={n}")
    rows = []
    for position, example in enumerate(eval_examples):
        prompt_texts, reference_texts = _example_fields(example)
        counts = {}
        for part, texts in (("prompt", prompt_texts), ("reference", reference_texts)):
            hashes = [ngram_hashes(t, n) for t in texts]
            total = sum(h.size for h in hashes)
            found = sum(int(index.contains(h).sum()) for h in hashes)
            counts[part] = (found, total)
        found = counts["prompt"][0] + counts["reference"][0]
        total = counts["prompt"][1] + counts["reference"][1]
        rows.append(
            {
                "id": getattr(example, "id", str(position)),
                "n_ngrams": total,
                "n_found": found,
                "fraction": _fraction(found, total),
                "prompt_fraction": _fraction(*counts["prompt"]),
                "reference_fraction": _fraction(*counts["reference"]),
            }
        )
    return rows


def _strings_in(value) -> Iterator[str]:
    """Every string in a JSON value (dict values, list items, chat ``content``), depth first."""
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for item in value.values():
            yield from _strings_in(item)
    elif isinstance(value, list):
        for item in value:
            yield from _strings_in(item)


def iter_train_texts(train_path: str | os.PathLike) -> Iterator[str]:
    """Texts of a training file, streamed: every string field of each JSONL row, or each line of a text file.

    ``.jsonl`` lines and a ``.json`` document are parsed as JSON (bad JSON raises DataError with the
    line); any other extension is read as plain text, one document per line (:mod:`kdbench.textfile`).
    """
    from kdbench.textfile import iter_jsonl, iter_lines, read_json

    path = Path(train_path)
    if not path.is_file():
        raise DataError(f"Training file {path} does not exist; give the JSONL or text file the student was trained on.")
    suffix = path.suffix.lower()
    if suffix == ".json":  # one JSON document (a list of rows, usually)
        yield from _strings_in(read_json(path))
    elif suffix == ".jsonl":
        for _, row in iter_jsonl(path):
            yield from _strings_in(row)
    else:
        for _, line, _ in iter_lines(path):
            if line.strip():
                yield line


def overlap_report(
    train_path: str | os.PathLike,
    suite: str,
    data_path: str | os.PathLike | None = None,
    n: int = 13,
    *,
    threshold: float = 0.5,
) -> dict:
    """Contamination report of suite ``suite`` against the training file ``train_path``.

    Returns ``{"suite", "train_path", "n", "rows": [per-example dicts, see ngram_overlap],
    "summary": {...}}``; the summary counts examples with any overlapping n-gram (GPT-3's
    "dirty" criterion) and with at least ``threshold`` of their n-grams overlapping, and gives the
    mean fraction over examples that have n-grams.
    """
    from kdbench.suites import load_suite

    if n < 1:
        raise ConfigError(f"--n must be an n-gram size of at least 1, not {n} (13 is GPT-3's choice).")
    examples = load_suite(suite, data_path)
    index = NgramIndex(iter_train_texts(train_path), n)
    rows = ngram_overlap(index, examples, n)
    checked = [row for row in rows if row["fraction"] is not None]
    fractions = [row["fraction"] for row in checked]
    summary = {
        "n_examples": len(rows),
        "n_checked": len(checked),
        "n_too_short": len(rows) - len(checked),
        "n_any_overlap": sum(1 for row in checked if row["n_found"] > 0),
        "n_above_threshold": sum(1 for f in fractions if f >= threshold),
        "threshold": threshold,
        "mean_fraction": math.fsum(fractions) / len(fractions) if fractions else None,
        "max_fraction": max(fractions) if fractions else None,
        "train_texts": index.n_texts,
        "train_unique_ngrams": len(index),
    }
    return {"suite": suite, "train_path": str(train_path), "n": n, "rows": rows, "summary": summary}
