"""The comparison a reproduction ends with: per pair, row and benchmark, the paper's number beside kdbench's,
the difference, and whether the paper's number lies inside kdbench's 95% confidence interval.

The interval is a two-level percentile bootstrap over training seeds and examples (:func:`seeds_examples_ci`):
each resample draws the training seeds with replacement, then each drawn seed's examples with replacement, so
the interval carries both the run-to-run spread of training and the sampling of the evaluation set. With one
training seed it is the usual bootstrap over examples.
"""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass

import numpy as np

from kdbench.reproduce.table import Benchmark, Pair, Row, Table

JUDGE_VALUES = {"win_rate": {"win": 100.0, "tie": 50.0, "loss": 0.0},
                "omega": {"win": 100.0, "tie": 0.0, "loss": -100.0},
                "score": {"win": 10.0, "tie": 5.0, "loss": 0.0}}  # mini stand-in for a 0-10 rating: win rate / 10


def seeds_examples_ci(per_seed: list[list[float]], *, n_resamples: int = 2000, confidence: float = 0.95,
                      seed: int = 0) -> tuple[float, float, float]:
    """(mean, low, high) of the mean score over training seeds x examples.

    ``per_seed``: one list of per-example scores per training seed (the same examples in each).
    """
    data = np.asarray(per_seed, dtype=np.float64)  # [seeds, examples]
    if data.ndim != 2 or data.size == 0:
        raise ValueError("per_seed must hold at least one seed with at least one example")
    n_seeds, n_examples = data.shape
    rng = np.random.default_rng(seed)
    means = np.empty(n_resamples)
    chunk = max(1, 2_000_000 // (n_seeds * n_examples))
    for start in range(0, n_resamples, chunk):
        size = min(chunk, n_resamples - start)
        seeds = rng.integers(0, n_seeds, size=(size, n_seeds))                 # [size, seeds]
        examples = rng.integers(0, n_examples, size=(size, n_seeds, n_examples))  # [size, seeds, examples]
        means[start:start + size] = data[seeds[..., None], examples].mean(axis=(1, 2))
    alpha = (1 - confidence) / 2
    low, high = np.quantile(means, [alpha, 1 - alpha])
    return float(data.mean()), float(low), float(high)


@dataclass
class ComparisonRow:
    pair: str
    row: str
    method: str
    benchmark: str
    metric: str
    paper: float | None
    kdbench: float | None
    ci_low: float | None
    ci_high: float | None
    n_seeds: int
    n_examples: int
    status: str  # compared, not available, no published number, not run

    @property
    def difference(self) -> float | None:
        return None if self.paper is None or self.kdbench is None else self.kdbench - self.paper

    @property
    def inside(self) -> bool | None:
        if self.paper is None or self.ci_low is None:
            return None
        return self.ci_low <= self.paper <= self.ci_high


def _values(bench: Benchmark, seeds: dict[str, list]) -> list[list[float]]:
    """Per training seed, the per-example numbers. A failed judgment (None, or the outcome "failed") is dropped
    from every seed, so the seeds keep the same examples in the same order (the CI needs a rectangle)."""
    mapping = JUDGE_VALUES.get(bench.metric, JUDGE_VALUES["win_rate"])

    def number(value) -> float | None:
        if value is None:
            return None
        if bench.kind == "judge" and isinstance(value, str):  # win / tie / loss (ω, the mini stand-in)
            return mapping.get(value)
        # a judge's number (full scale: an MT-Bench rating, an AlpacaEval (preference - 1) x 100) or a score
        return float(value) * bench.scale if bench.kind == "reference" else float(value)

    per_seed = [[number(v) for v in values] for values in seeds.values()]
    width = min((len(values) for values in per_seed), default=0)
    keep = [i for i in range(width) if all(values[i] is not None for values in per_seed)]
    return [[values[i] for i in keep] for values in per_seed]


def compare(table: Table, pair: Pair, scores: dict) -> list[ComparisonRow]:
    """The comparison rows of ``pair`` from ``scores`` ({row label: {suite, or benchmark kind for a stand-in:
    {training seed: per-example scores}}})."""
    from kdbench.report.papers import load_paper_results

    published = {(r.paper, r.table, r.teacher, r.student, r.method, r.benchmark, r.metric): r.value
                 for r in load_paper_results()}
    rows = []
    for row in table.rows:
        for bench in table.benchmarks:
            key = table.paper_key(pair, row, bench)
            paper = published.get(key)
            found = scores.get(row.label, {}).get(bench.suite) or scores.get(row.label, {}).get(bench.kind)
            if not row.available:
                status = f"method not available in this version (trainers/{row.method}.yaml)"
                rows.append(ComparisonRow(pair.name, row.label, row.method or "", key[5], bench.metric, paper,
                                          None, None, None, 0, 0, status))
                continue
            if not found:
                rows.append(ComparisonRow(pair.name, row.label, row.method or row.evaluate or "", key[5], bench.metric,
                                          paper, None, None, None, 0, 0, "not run"))
                continue
            per_seed = [v for v in _values(bench, found) if v]
            mean, low, high = seeds_examples_ci(per_seed)
            status = "compared" if paper is not None else "no published number"
            rows.append(ComparisonRow(pair.name, row.label, row.method or row.evaluate or "", key[5], bench.metric,
                                      paper, mean, low, high, len(per_seed), len(per_seed[0]), status))
    return rows


def _fmt(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def comparison_markdown(table: Table, rows: list[ComparisonRow], *, scale: str, stand_ins: dict | None = None,
                        judge_note: str = "") -> str:
    """The report: one Markdown table per benchmark, the gaps, and what the kdbench column measured."""
    lines = [f"# kdbench reproduce {table.name} (--scale {scale})", "", table.description, "",
             f"Published numbers: {table.paper}, Table {table.table} ({table.source}), from kdbench/paper_results.csv.",
             "kdbench: mean over training seeds x examples; 95% CI: two-level bootstrap over training seeds and "
             "examples; difference = kdbench - paper; inside = the paper's number lies in kdbench's CI.", ""]
    if scale == "mini":
        lines += ["**Miniature run: the kdbench column is measured on stand-ins (embedded synthetic world, tiny "
                  "models), not on the paper's models and data. It shows the table runs end to end; its numbers are "
                  "not comparable with the paper's.**", ""]
        if stand_ins:
            lines += ["Stand-ins: " + "; ".join(f"{kind} benchmarks -> {text}" for kind, text in stand_ins.items()), ""]
    if judge_note:
        lines += [judge_note, ""]
    gaps = {r.label: r.gap for r in table.rows if r.gap}
    for pair, benchmark in dict.fromkeys((r.pair, r.benchmark) for r in rows):
        members = [r for r in rows if r.pair == pair and r.benchmark == benchmark]
        lines += [f"## {pair} · {benchmark} ({members[0].metric})", "",
                  "| row | method | paper | kdbench | 95% CI | difference | paper inside CI | seeds x examples | note |",
                  "|---|---|---:|---:|---|---:|---|---|---|"]
        for r in members:
            ci = "-" if r.ci_low is None else f"[{r.ci_low:.2f}, {r.ci_high:.2f}]"
            inside = {True: "yes", False: "no", None: "-"}[r.inside]
            size = f"{r.n_seeds} x {r.n_examples}" if r.n_seeds else "-"
            note = r.status if r.status != "compared" else ""
            if r.row in gaps:
                note = (note + "; " if note else "") + "gap: " + gaps[r.row]
            lines.append(f"| {r.row} | {r.method} | {_fmt(r.paper)} | {_fmt(r.kdbench)} | {ci} | {_fmt(r.difference)} | "
                         f"{inside} | {size} | {note} |")
        lines.append("")
    lines += ["## Deviations from the paper", ""] + [f"- {gap}" for gap in table.gaps]
    lines += [f"- row {r.label}: {r.gap}" for r in table.rows if r.gap]
    lines += [f"- preparation {p['name']}: {p['gap']}" for p in table.preparation if p.get("gap")]
    return "\n".join(lines) + "\n"


def comparison_csv(rows: list[ComparisonRow]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["pair", "row", "method", "benchmark", "metric", "paper", "kdbench", "ci_low", "ci_high",
                     "difference", "paper_inside_ci", "n_seeds", "n_examples", "status"])
    for r in rows:
        writer.writerow([r.pair, r.row, r.method, r.benchmark, r.metric, r.paper, r.kdbench, r.ci_low, r.ci_high,
                         r.difference, r.inside, r.n_seeds, r.n_examples, r.status])
    return buffer.getvalue()


__all__ = ["seeds_examples_ci", "ComparisonRow", "compare", "comparison_markdown", "comparison_csv"]
