"""Scoring a reference-based suite's generations: the metric registry and the records it produces.

A task file's ``metrics:`` names entries of :data:`METRICS` (``rouge_l``, ``exact_match``); each entry
knows its per-example scoring function (scores in [0, 1]), the name its records carry in
``metrics.jsonl`` and its title. :func:`score` turns one suite's generations into metric records
(PROTOCOLS.md §1, §7): per seed, per length bucket and category, and across seeds mean ± sample std
with a 95% bootstrap CI over examples of the seed-averaged score.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

from kdbench.errors import ConfigError
from kdbench.store import RunDir, atomic_write_json


@dataclass(frozen=True)
class ReferenceMetric:
    """One per-example metric against a suite's references (max over references where it applies)."""

    name: str  # the name task files use
    record_name: str  # the ``metric`` of its records in metrics.jsonl
    title: str
    description: str
    scores: Callable[[Sequence[str], Sequence[Sequence[str]]], list[float]]  # predictions, references -> [0, 1]


def _rouge_l(predictions, references):
    from kdbench.metrics import rouge_l_scores

    return rouge_l_scores(predictions, references)


def _exact_match(predictions, references):
    from kdbench.metrics import exact_match_scores

    return exact_match_scores(predictions, references)


METRICS: dict[str, ReferenceMetric] = {
    "rouge_l": ReferenceMetric("rouge_l", "rougeL", "Rouge-L", "Rouge-L F1", _rouge_l),
    "exact_match": ReferenceMetric("exact_match", "exact_match", "EM", "exact match", _exact_match),
}


def metric(name: str) -> ReferenceMetric:
    """The registered metric ``name`` (ConfigError listing the valid names otherwise)."""
    if name not in METRICS:
        raise ConfigError(f"Unknown metric {name!r}; choose from {', '.join(METRICS)}.")
    return METRICS[name]


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


def _ordered(labels: list, declared: Sequence[str] = ()) -> list:
    """Distinct labels: the declared order first (a task file's ``categories``), then first appearance."""
    present = dict.fromkeys(x for x in labels if x is not None)
    return [x for x in declared if x in present] + [x for x in present if x not in declared]


def score(run: RunDir, suite: str, examples, outputs: dict[str, dict[str, str]], spec, edges, *,
          n_bootstrap: int = 1000) -> tuple[list[dict], dict]:
    """Metric records for generations ``outputs`` (seed -> example id -> text) of the metrics the suite's
    task file names (``spec.metrics``); also writes ``scores/<suite>.json`` with every per-example score
    (for paired tests in reports). Returns (records, {record metric name: {seed: per-example scores}})."""
    from kdbench.metrics import bootstrap_ci, length_buckets, mean_std

    references = [e.references for e in examples]
    ids = [e.id for e in examples]
    buckets = length_buckets(references, edges)
    categories = [e.category for e in examples]
    groups = (("bucket", buckets, _ordered(buckets)),
              ("category", categories, _ordered(categories, getattr(spec, "categories", ()) or ())))
    per_example: dict[str, dict[str, list[float]]] = {}
    records: list[dict] = []
    for entry in (metric(name) for name in spec.metrics):
        name = entry.record_name
        per_seed = {}
        for seed, texts in outputs.items():
            values = [100.0 * v for v in entry.scores([texts[i] for i in ids], references)]
            per_seed[seed] = values
            records.append(run.metric_record(suite, name, _mean(values), seed=seed, n=len(values)))
            for group_name, labels, order in groups:
                for label in order:
                    subset = [v for v, g in zip(values, labels) if g == label]
                    records.append(run.metric_record(suite, name, _mean(subset), seed=seed,
                                                     subset=f"{group_name}:{label}", n=len(subset)))
        per_example[name] = per_seed
        # across seeds: mean ± sample std of the per-seed means; CI over examples of the seed-averaged score
        example_means = [_mean([per_seed[s][i] for s in per_seed]) for i in range(len(ids))]
        seed_means = [_mean(v) for v in per_seed.values()]
        mean, std = mean_std(seed_means)
        low, high = bootstrap_ci(example_means, n_resamples=n_bootstrap)
        records.append(run.metric_record(suite, name, mean, seed="mean", n=len(ids), std=std, ci_low=low,
                                         ci_high=high, n_seeds=len(seed_means)))
        for group_name, labels, order in groups:
            for label in order:
                members = [i for i, g in enumerate(labels) if g == label]
                group_seed_means = [_mean([per_seed[s][i] for i in members]) for s in per_seed]
                g_mean, g_std = mean_std(group_seed_means)
                g_low, g_high = bootstrap_ci([example_means[i] for i in members], n_resamples=n_bootstrap)
                records.append(run.metric_record(suite, name, g_mean, seed="mean", subset=f"{group_name}:{label}",
                                                 n=len(members), std=g_std, ci_low=g_low, ci_high=g_high,
                                                 n_seeds=len(group_seed_means)))
    atomic_write_json(run.path / "scores" / f"{suite}.json",
                      {"ids": ids, "buckets": buckets, "categories": categories, "scores": per_example})
    return records, per_example
