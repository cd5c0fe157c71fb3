"""Metrics and statistics for the reference-based suites (PROTOCOLS.md §1 and §7).

Rouge-L here is a drop-in, exact re-implementation of
``rouge_score.rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True).score(target, prediction).fmeasure``
(the call MiniLLM / DistiLLM / AKL / DPKD use), made fast by

* tokenizing each distinct string once and Porter-stemming each distinct word once (caches), and
* computing the LCS length with the bit-parallel algorithm of Allison & Dix (1986) in Hyyrö's (2004)
  formulation, on Python integers used as bit vectors (one big-int step per token of the shorter
  sequence instead of one Python step per cell of the dynamic-programming table).

The precision / recall / F-measure arithmetic is the very expression rouge_score evaluates, so the
values are bit-for-bit equal, not merely within tolerance.

Statistics (§7): a percentile bootstrap confidence interval over examples and a paired
bootstrap / permutation test for two runs on the same prompts, both vectorized with numpy.
"""

from __future__ import annotations

import math
import re
import string
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache

# --- Rouge-L ------------------------------------------------------------------------------------

# rouge_score/tokenize.py: lowercase, non-[a-z0-9] runs -> " ", split on whitespace, stem words
# longer than 3 characters, keep only tokens matching ^[a-z0-9]+$.
_NON_ALPHANUM = re.compile(r"[^a-z0-9]+")
_VALID_TOKEN = re.compile(r"^[a-z0-9]+$")


@lru_cache(maxsize=1)
def _porter_stemmer():
    # The same object rouge_score builds (nltk.stem.porter.PorterStemmer() in its default
    # NLTK_EXTENSIONS mode); nltk is a dependency of rouge-score.
    from nltk.stem import porter

    return porter.PorterStemmer()


# word -> final token ("" when rouge_score would drop it); a plain dict is the cheapest cache to
# consult once per word. Bounded: cleared when it grows past _MAX_CACHED_WORDS entries.
_TOKEN_OF_WORD: dict[str, str] = {}
_MAX_CACHED_WORDS = 1_000_000


def _token_of_word(word: str) -> str:
    """rouge_score's treatment of one word of [a-z0-9]: Porter stem if longer than 3 characters, then
    kept only if it matches ^[a-z0-9]+$ (returned as "" otherwise)."""
    token = _porter_stemmer().stem(word) if len(word) > 3 else word
    return token if _VALID_TOKEN.match(token) else ""


@lru_cache(maxsize=100_000)
def rouge_tokens(text: str) -> tuple[str, ...]:
    """rouge_score's tokens of ``text`` with ``use_stemmer=True`` (lowercase, alphanumeric, stemmed).

    After the substitution the text holds only [a-z0-9] and single spaces, so ``str.split()`` yields
    exactly rouge_score's ``re.split(r"\\s+")`` pieces minus the empty ones it drops anyway.
    """
    cache = _TOKEN_OF_WORD
    if len(cache) > _MAX_CACHED_WORDS:
        cache.clear()
    tokens = []
    for word in _NON_ALPHANUM.sub(" ", text.lower()).split():
        token = cache.get(word)
        if token is None:
            token = cache[word] = _token_of_word(word)
        if token:
            tokens.append(token)
    return tuple(tokens)


def lcs_length(a: Sequence, b: Sequence) -> int:
    """Length of the longest common subsequence of two token sequences.

    Bit-parallel LCS (Allison & Dix 1986; Hyyrö 2004): bit i of ``row`` is 1 while position i of the
    longer sequence is not yet matched; per token of the shorter sequence, with ``matches`` = bit mask
    of that token's positions, ``row = (row + (row & matches)) | (row & ~matches)``. The LCS length
    is the number of zero bits at the end. O(len(a) · len(b) / word size).
    """
    if len(a) < len(b):
        a, b = b, a
    if not b:
        return 0
    match_masks: dict = {}
    for position, token in enumerate(a):
        match_masks[token] = match_masks.get(token, 0) | (1 << position)
    all_ones = (1 << len(a)) - 1
    row = all_ones
    get = match_masks.get
    for token in b:
        matches = get(token)
        if matches:
            hits = row & matches
            row = ((row + hits) | (row - hits)) & all_ones
    return len(a) - row.bit_count()


def _rouge_l_fmeasure(target_tokens: tuple, prediction_tokens: tuple) -> float:
    # rouge_scorer._score_lcs + scoring.fmeasure, same operations in the same order.
    if not target_tokens or not prediction_tokens:
        return 0.0
    lcs = lcs_length(target_tokens, prediction_tokens)
    precision = lcs / len(prediction_tokens)
    recall = lcs / len(target_tokens)
    if precision + recall > 0:
        return 2 * precision * recall / (precision + recall)
    return 0.0


def rouge_l(prediction: str, reference: str) -> float:
    """Rouge-L F-measure of one prediction against one reference, in [0, 1]."""
    return _rouge_l_fmeasure(rouge_tokens(reference), rouge_tokens(prediction))


def _check_pairs(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> None:
    if len(predictions) != len(references):
        raise ValueError(f"got {len(predictions)} predictions but {len(references)} reference lists")
    for index, refs in enumerate(references):
        if isinstance(refs, str) or len(refs) == 0:
            raise ValueError(f"example {index}: references must be a non-empty list of strings")


def rouge_l_scores(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> list[float]:
    """Per-example Rouge-L F-measure, max over each example's references; values in [0, 1].

    ``predictions``: N strings; ``references``: N non-empty lists of strings. Equal on every pair to
    ``RougeScorer(["rougeL"], use_stemmer=True).score(reference, prediction).fmeasure``.
    """
    _check_pairs(predictions, references)
    scores = []
    for prediction, refs in zip(predictions, references):
        prediction_tokens = rouge_tokens(prediction)
        scores.append(max(_rouge_l_fmeasure(rouge_tokens(ref), prediction_tokens) for ref in refs))
    return scores


# --- Exact match --------------------------------------------------------------------------------

_PUNCTUATION = frozenset(string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b")


def normalize_answer(text: str, *, drop_articles: bool = False) -> str:
    """MiniLLM's answer normalization: lowercase, remove ASCII punctuation, collapse whitespace.

    ``drop_articles=True`` also removes the words a / an / the (SQuAD's normalization).
    """
    text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
    if drop_articles:
        text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def exact_match_scores(
    predictions: Sequence[str], references: Sequence[Sequence[str]], *, drop_articles: bool = False
) -> list[float]:
    """Per-example exact match (1.0 or 0.0) after :func:`normalize_answer`, max over references."""
    _check_pairs(predictions, references)
    scores = []
    for prediction, refs in zip(predictions, references):
        normalized = normalize_answer(prediction, drop_articles=drop_articles)
        hit = any(normalized == normalize_answer(ref, drop_articles=drop_articles) for ref in refs)
        scores.append(1.0 if hit else 0.0)
    return scores


# --- Length buckets (DPKD §4.6) -----------------------------------------------------------------


def _word_count(text: str) -> int:
    return len(text.split())


def bucket_edges_auto(references: Sequence[Sequence[str]]) -> tuple[int, int]:
    """The two cut points derived from a suite: (median, mean) of the first references' word counts, rounded.

    DPKD's 30 and 70 were Dolly's median and mean. If the median exceeds the mean (left-skewed
    lengths) the two are sorted; if they round to the same value the second is moved up by one so
    that the middle bucket is non-empty as an interval.
    """
    import numpy as np

    if len(references) == 0:
        raise ValueError("cannot derive length buckets from an empty suite")
    counts = np.array([_word_count(refs[0]) for refs in references], dtype=float)
    low, high = sorted((int(round(float(np.median(counts)))), int(round(float(counts.mean())))))
    if high <= low:
        high = low + 1
    return low, high


def bucket_label(lower: float, upper: float) -> str:
    """Label of the right-closed interval (lower, upper]; an infinite upper end reads ``(lower,inf)``."""
    def fmt(x: float) -> str:
        return str(int(x)) if float(x).is_integer() else repr(float(x))

    return f"({fmt(lower)},inf)" if math.isinf(upper) else f"({fmt(lower)},{fmt(upper)}]"


def bucket_labels(edges: Sequence[float]) -> list[str]:
    """All labels for the given cut points, in order: (0,e1], (e1,e2], ..., (ek,inf)."""
    bounds = [0, *edges, math.inf]
    return [bucket_label(lo, hi) for lo, hi in zip(bounds[:-1], bounds[1:])]


def length_buckets(
    references: Sequence[Sequence[str]], edges: Sequence[float] | str = (30, 70)
) -> list[str]:
    """Per-example length bucket label by the word count of the FIRST reference, right-closed.

    ``edges`` are increasing cut points (default DPKD's 30 and 70, giving "(0,30]", "(30,70]",
    "(70,inf)") or ``"auto"`` for :func:`bucket_edges_auto`. A reference of exactly 30 words is in
    "(0,30]". An empty reference (0 words) is put in the first bucket.
    """
    if isinstance(edges, str):
        if edges != "auto":
            raise ValueError(f"edges must be a sequence of numbers or 'auto', not {edges!r}")
        edges = bucket_edges_auto(references)
    edges = list(edges)
    if any(b <= a for a, b in zip(edges[:-1], edges[1:])) or any(e <= 0 for e in edges):
        raise ValueError(f"bucket edges must be positive and strictly increasing, got {edges}")
    labels = bucket_labels(edges)
    out = []
    for refs in references:
        if isinstance(refs, str) or len(refs) == 0:
            raise ValueError("each example needs a non-empty list of references")
        count = _word_count(refs[0])
        index = sum(1 for edge in edges if count > edge)  # right-closed: count == edge stays below
        out.append(labels[index])
    return out


# --- Statistics (§7) ----------------------------------------------------------------------------


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (ddof=1) of ``values``.

    With one value the standard deviation is 0.0 (a single seed has no spread to report; the
    tables print "x ± 0.0"); with none both are nan.
    """
    n = len(values)
    if n == 0:
        return math.nan, math.nan
    mean = math.fsum(values) / n
    if n == 1:
        return float(mean), 0.0
    variance = math.fsum((v - mean) ** 2 for v in values) / (n - 1)
    return float(mean), math.sqrt(variance)


def bootstrap_ci(
    values: Sequence[float], *, n_resamples: int = 1000, confidence: float = 0.95, seed: int = 0
) -> tuple[float, float]:
    """Percentile bootstrap confidence interval of the mean of ``values`` (resampling examples).

    Returns (low, high). With one value both ends equal that value; with none both are nan.
    """
    import numpy as np

    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    data = np.asarray(values, dtype=float)
    if data.size == 0:
        return math.nan, math.nan
    rng = np.random.default_rng(seed)
    means = _resampled_means(data, n_resamples, rng)
    alpha = (1 - confidence) / 2
    low, high = np.quantile(means, [alpha, 1 - alpha])
    return float(low), float(high)


def _resampled_means(data, n_resamples: int, rng, chunk_cells: int = 4_000_000):
    """Means of ``n_resamples`` bootstrap resamples of ``data`` (shape [n]) -> shape [n_resamples].

    Works in chunks so memory stays at ``chunk_cells`` indices whatever n_resamples × n is.
    """
    import numpy as np

    n = data.size
    rows_per_chunk = max(1, chunk_cells // n)
    means = np.empty(n_resamples)
    for start in range(0, n_resamples, rows_per_chunk):
        stop = min(n_resamples, start + rows_per_chunk)
        indices = rng.integers(0, n, size=(stop - start, n))
        means[start:stop] = data[indices].mean(axis=1)
    return means


def paired_test(
    a: Sequence[float],
    b: Sequence[float],
    *,
    n_resamples: int = 10_000,
    seed: int = 0,
    method: str = "bootstrap",
) -> float:
    """Two-sided p-value for "runs a and b have the same mean score" on the same prompts.

    ``a`` and ``b``: per-example scores of two runs, same length and order. Works on the paired
    differences d = a - b (shape [n]):

    * ``"bootstrap"``: paired bootstrap under the null; resample the centred differences d - mean(d)
      and report the fraction of resampled |mean| >= |observed mean| (Efron & Tibshirani 1993, §16.4).
    * ``"permutation"``: sign-flip permutation test (each pair's labels swapped with probability 1/2).

    The p-value uses the (count + 1) / (n_resamples + 1) correction, so it is never exactly 0.
    Identical runs (all differences 0) give 1.0.
    """
    import numpy as np

    if len(a) != len(b):
        raise ValueError(f"paired_test needs two runs of equal length, got {len(a)} and {len(b)}")
    diff = np.asarray(a, dtype=float) - np.asarray(b, dtype=float)
    if diff.ndim != 1:
        raise ValueError(f"paired_test needs one score per example, got an array of shape {diff.shape}")
    if diff.size == 0:
        return math.nan
    observed = abs(diff.mean())
    if np.all(diff == 0):
        return 1.0
    rng = np.random.default_rng(seed)
    # a tiny tolerance so that float noise in the resampled means does not decide ties
    tolerance = 1e-12 * max(1.0, float(np.abs(diff).max()))
    if method == "bootstrap":
        null_means = _resampled_means(diff - diff.mean(), n_resamples, rng)
    elif method == "permutation":
        null_means = np.empty(n_resamples)
        rows_per_chunk = max(1, 4_000_000 // diff.size)
        for start in range(0, n_resamples, rows_per_chunk):
            stop = min(n_resamples, start + rows_per_chunk)
            signs = rng.integers(0, 2, size=(stop - start, diff.size)) * 2 - 1
            null_means[start:stop] = (signs * diff).mean(axis=1)
    else:
        raise ValueError(f"method must be 'bootstrap' or 'permutation', not {method!r}")
    extreme = int(np.count_nonzero(np.abs(null_means) >= observed - tolerance))
    return (extreme + 1) / (n_resamples + 1)


def omega(wins: int, ties: int, losses: int) -> float:
    """daDPO's in-domain win rate ω = (W − L) / (W + T + L) × 100, in [-100, 100] (PROTOCOLS §4)."""
    total = wins + ties + losses
    if min(wins, ties, losses) < 0:
        raise ValueError(f"counts must be non-negative, got W={wins} T={ties} L={losses}")
    if total == 0:
        raise ValueError("omega needs at least one judged prompt (W + T + L = 0)")
    return (wins - losses) / total * 100


@dataclass(frozen=True)
class GroupSummary:
    """Mean of one metric over one group of examples (``group`` None = all examples)."""

    metric: str
    group: str | None
    n: int
    mean: float
    ci_low: float
    ci_high: float


def summarize_scores(
    scores: dict[str, Sequence[float]],
    groups: Sequence[str | None] | None = None,
    *,
    n_resamples: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
    group_order: Sequence[str] | None = None,
) -> list[GroupSummary]:
    """Per-metric means over all examples and per group (length bucket or category), with counts.

    ``scores``: metric name -> per-example scores (all the same length N, e.g. in [0, 1]; the caller
    multiplies by 100 for tables). ``groups``: N group labels (None entries belong to no group) or
    None for the overall row only. Each row carries the example count and a bootstrap CI. Groups are
    listed in ``group_order`` when given (groups with no example get a row with n=0 and nan), else
    in order of first appearance.
    """
    lengths = {name: len(values) for name, values in scores.items()}
    if len(set(lengths.values())) > 1:
        raise ValueError(f"all metrics need one score per example, got lengths {lengths}")
    n = next(iter(lengths.values()), 0)
    if groups is not None and len(groups) != n:
        raise ValueError(f"got {len(groups)} group labels for {n} examples")

    def row(metric: str, group: str | None, values: list[float]) -> GroupSummary:
        mean = math.fsum(values) / len(values) if values else math.nan
        low, high = bootstrap_ci(values, n_resamples=n_resamples, confidence=confidence, seed=seed)
        return GroupSummary(metric, group, len(values), mean, low, high)

    order: list[str] = []
    if groups is not None:
        order = list(group_order) if group_order is not None else []
        for label in groups:
            if label is not None and label not in order:
                order.append(label)
    rows = []
    for metric, values in scores.items():
        values = [float(v) for v in values]
        rows.append(row(metric, None, values))
        for label in order:
            rows.append(row(metric, label, [v for v, g in zip(values, groups) if g == label]))
    return rows


def clear_caches() -> None:
    """Forget cached tokenizations and stems (for benchmarks that time a cold start)."""
    rouge_tokens.cache_clear()
    _TOKEN_OF_WORD.clear()
