"""The report's tables, as plain data rendered later to Markdown and HTML.

Each builder returns :class:`Table` objects whose ``notes`` name the judge, decoding, seeds and data
behind every column, so a table copied out of the report still says what it measured.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from kdbench.report.collect import ReportData, Stat, reference_metrics, reference_stat, subsets, suite_settings

ALPHA = 0.05
METRIC_TITLES = {"rougeL": "Rouge-L", "exact_match": "EM"}
REFERENCE_JUDGE = "none: reference-based ({what} x100 against the suite's references, max over references)"
METRIC_DESCRIPTIONS = {"rougeL": "Rouge-L F1", "exact_match": "exact match"}


@dataclass
class Column:
    title: str
    better: str | None = None  # "higher" / "lower": the best cell of the column is marked
    align: str = "right"


@dataclass
class Cell:
    text: str
    value: float | None = None
    best: bool = False
    kind: str = ""  # "better" / "worse" / "tie" / "baseline": styling of verdict cells


@dataclass
class Table:
    id: str
    title: str
    columns: list[Column]
    rows: list[list[Cell]]
    notes: list[str] = field(default_factory=list)
    section: str = ""

    def mark_best(self, skip_rows: set[int] = frozenset()) -> None:
        """Mark the best cell of every column with a direction (ties at the best are all marked)."""
        for index, column in enumerate(self.columns):
            if column.better is None:
                continue
            values = [(r, row[index].value) for r, row in enumerate(self.rows)
                      if r not in skip_rows and row[index].value is not None and not math.isnan(row[index].value)]
            if len(values) < 2:
                continue
            pick = max if column.better == "higher" else min
            best = pick(v for _, v in values)
            for r, v in values:
                if math.isclose(v, best, rel_tol=1e-9, abs_tol=1e-12):
                    self.rows[r][index].best = True


def cell(text: str, value: float | None = None, kind: str = "") -> Cell:
    return Cell(text, value, False, kind)


def fmt(value: float | None, digits: int = 1) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:.{digits}f}"


def fmt_int(value) -> str:
    if value is None:
        return "-"
    return f"{int(value):,}"


def holm(p_values: list[float]) -> list[float]:
    """Holm-Bonferroni adjusted p-values, in the order given (step-down, made monotone)."""
    m = len(p_values)
    order = sorted(range(m), key=lambda i: p_values[i])
    adjusted = [0.0] * m
    running = 0.0
    for rank, index in enumerate(order):
        running = max(running, min(1.0, (m - rank) * p_values[index]))
        adjusted[index] = running
    return adjusted


@dataclass
class Comparison:
    """A row against the baseline on the same prompts."""

    label: str
    n: int
    diff: float
    p_raw: float
    p_holm: float = math.nan
    wins: int = 0
    ties: int = 0
    losses: int = 0

    @property
    def verdict(self) -> str:
        if math.isnan(self.p_holm) or self.p_holm >= ALPHA:
            return "tie"
        return "better" if self.diff > 0 else "worse"


def compare_with_baseline(stats: dict[str, Stat], baseline_label: str | None) -> dict[str, Comparison]:
    """Paired bootstrap test (kdbench.metrics.paired_test) of every row against the baseline on the
    examples both have, with Holm's correction over the family of rows compared in this table."""
    from kdbench.metrics import paired_test

    baseline = stats.get(baseline_label) if baseline_label else None
    if baseline is None or not baseline.per_example:
        return {}
    out: dict[str, Comparison] = {}
    for label, stat in stats.items():
        if label == baseline_label or not stat.per_example:
            continue
        common = [i for i in baseline.per_example if i in stat.per_example]
        if len(common) < 2:
            continue
        a = [stat.per_example[i] for i in common]
        b = [baseline.per_example[i] for i in common]
        diff = math.fsum(a) / len(a) - math.fsum(b) / len(b)
        wins = sum(x > y for x, y in zip(a, b))
        losses = sum(x < y for x, y in zip(a, b))
        out[label] = Comparison(label, len(common), diff, paired_test(a, b), wins=wins, losses=losses,
                                ties=len(common) - wins - losses)
    for comparison, adjusted in zip(out.values(), holm([c.p_raw for c in out.values()])):
        comparison.p_holm = adjusted
    return out


def _order(labels: list[str], stats: dict[str, Stat], reference_label: str | None) -> list[str]:
    """Reference (teacher) first, then by mean, best first."""
    present = [label for label in labels if label in stats]
    rest = sorted((label for label in present if label != reference_label), key=lambda label: -stats[label].mean)
    return ([reference_label] if reference_label in present else []) + rest


def settings_notes(data: ReportData, suite: str, metric_text: str) -> list[str]:
    settings = suite_settings(data.eval_runs, suite)
    notes = [f"Data: {'; '.join(settings['data']) or 'not recorded'}.",
             f"Decoding: {'; '.join(settings['decoding']) or 'not recorded'} "
             f"(prompt: {', '.join(settings['prompt']) or 'not recorded'}).",
             f"Generation seeds: {'; '.join(settings['seeds']) or 'not recorded'}.",
             f"Judge: {REFERENCE_JUDGE.format(what=metric_text)}."]
    if any(len(v) > 1 for k, v in settings.items() if k != "seeds"):
        notes.append("Warning: rows were evaluated with different data or decoding settings; they are not comparable.")
    return notes


# ---------------------------------------------------------------------------------------------
# Reference-based suites
# ---------------------------------------------------------------------------------------------


@dataclass
class SuiteTables:
    suite: str
    tables: list[Table]
    stats: dict[str, dict[str, Stat]]  # metric -> label -> overall stat
    comparisons: dict[str, dict[str, Comparison]]  # metric -> label -> comparison


def leaderboard_tables(data: ReportData, suite: str, *, baseline_label: str | None, reference_label: str | None,
                       metrics: list[str] | None = None) -> SuiteTables:
    """One leaderboard per metric of a reference-based suite (module docstring of collect for the numbers)."""
    labels = data.labels()
    result = SuiteTables(suite, [], {}, {})
    for metric in metrics or reference_metrics(data, suite):
        stats = {label: s for label in labels if (s := reference_stat(data.runs_of(label), suite, metric)) is not None}
        if not stats:
            continue
        comparisons = compare_with_baseline(stats, baseline_label)
        result.stats[metric], result.comparisons[metric] = stats, comparisons
        has_baseline = baseline_label in stats
        title = METRIC_TITLES.get(metric, metric)
        columns = [Column("model", align="left"), Column("t×g"), Column("n"),
                   Column(title, better="higher"), Column("±gen"), Column("±train"), Column("95% CI")]
        if has_baseline:
            columns += [Column(f"Δ {baseline_label}"), Column("p Holm"), Column("verdict", align="left")]
        rows = []
        order = _order(labels, stats, reference_label)
        for label in order:
            stat = stats[label]
            ci = f"[{stat.ci[0]:.1f}, {stat.ci[1]:.1f}]" if stat.ci else "-"
            row = [cell(label), cell(f"{stat.n_runs}×{stat.n_seeds or '-'}"), cell(str(stat.n or "-")),
                   cell(fmt(stat.mean), stat.mean), cell(fmt(stat.std_gen)), cell(fmt(stat.std_train)), cell(ci)]
            if has_baseline:
                if label == baseline_label:
                    row += [cell("-"), cell("-"), cell("baseline", kind="baseline")]
                elif label in comparisons:
                    c = comparisons[label]
                    row += [cell(f"{c.diff:+.1f}"), cell(_p(c.p_holm)), cell(c.verdict, kind=c.verdict)]
                else:
                    row += [cell("-"), cell("-"), cell("no shared examples")]
            rows.append(row)
        table = Table(f"leaderboard-{suite}-{metric}", f"{suite}: {title}", columns, rows, section=suite)
        skip = {order.index(reference_label)} if reference_label in order else set()
        table.mark_best(skip)
        description = METRIC_DESCRIPTIONS.get(metric, metric)
        table.notes = settings_notes(data, suite, description) + [
            f"{title}: mean over training runs of the mean over generation seeds. t×g = training runs (seeds) "
            "of the row × generation seeds per run; n = examples. ±gen: std over generation seeds; "
            "±train: std over training runs; 95% CI: bootstrap over examples of the seed- and run-averaged "
            "score.",
        ]
        if has_baseline:
            table.notes.append(
                f"Δ {baseline_label}: difference to the {baseline_label} row on the same examples; p Holm: paired "
                f"bootstrap p-value (10,000 resamples), Holm-corrected over the {len(comparisons)} rows compared; "
                f"verdict 'tie' when p Holm >= {ALPHA} (not significantly different).")
        table.notes.append("Bold: best in column" + (f" ({reference_label} excluded)." if skip else "."))
        result.tables.append(table)
    return result


def _p(p: float) -> str:
    if math.isnan(p):
        return "-"
    return "<0.001" if p < 0.001 else f"{p:.3f}"


def group_tables(data: ReportData, suite: str, group: str, *, reference_label: str | None,
                 metrics: list[str] | None = None) -> list[Table]:
    """Per length bucket (``group="bucket"``) or per category: rows = models, columns = subsets."""
    names = subsets(data, suite, group)
    if not names:
        return []
    labels = data.labels()
    tables = []
    for metric in metrics or reference_metrics(data, suite):
        per_label: dict[str, dict[str, Stat]] = {}
        for label in labels:
            runs = data.runs_of(label)
            found = {name: s for name in names if (s := reference_stat(runs, suite, metric, name)) is not None}
            if found:
                per_label[label] = found
        if not per_label:
            continue
        sizes = {name: next((s[name].n for s in per_label.values() if name in s), None) for name in names}
        columns = [Column("model", align="left")] + [
            Column(f"{name.split(':', 1)[1]} n={sizes[name] or '?'}", better="higher") for name in names]
        overall = {label: reference_stat(data.runs_of(label), suite, metric) for label in per_label}
        order = _order(list(per_label), {k: v for k, v in overall.items() if v is not None}, reference_label)
        order += [label for label in per_label if label not in order]
        rows = []
        for label in order:
            row = [cell(label)]
            for name in names:
                stat = per_label[label].get(name)
                if stat is None:
                    row.append(cell("-"))
                    continue
                spread = stat.std_train if stat.std_train is not None else stat.std_gen
                text = fmt(stat.mean) + (f" ±{spread:.1f}" if spread is not None else "")
                row.append(cell(text, stat.mean))
            rows.append(row)
        title = METRIC_TITLES.get(metric, metric)
        what = "length bucket (reference words, right-closed)" if group == "bucket" else "category"
        table = Table(f"{group}-{suite}-{metric}", f"{suite}: {title} by {what}", columns, rows, section=suite)
        skip = {order.index(reference_label)} if reference_label in order else set()
        table.mark_best(skip)
        table.notes = settings_notes(data, suite, METRIC_DESCRIPTIONS.get(metric, metric)) + [
            f"Cells: mean {title}; ± is the std over training runs when the row has several, else over generation "
            "seeds. n = examples in the subset.",
            "Bold: best in column" + (f" ({reference_label} excluded)." if skip else "."),
        ]
        tables.append(table)
    return tables


def win_tie_loss_table(suite_tables: SuiteTables, data: ReportData, baseline_label: str | None,
                       metric: str = "rougeL") -> Table | None:
    """Per-example W / T / L of each row against the baseline (seed- and run-averaged scores)."""
    comparisons = suite_tables.comparisons.get(metric) or {}
    if not comparisons:
        return None
    title = METRIC_TITLES.get(metric, metric)
    columns = [Column("model", align="left"), Column("wins", better="higher"), Column("ties"),
               Column("losses", better="lower"), Column("n"), Column(f"Δ {title}"), Column("p Holm"),
               Column("verdict", align="left")]
    rows = []
    for label, c in sorted(comparisons.items(), key=lambda item: -item[1].diff):
        rows.append([cell(label), cell(str(c.wins), c.wins), cell(str(c.ties)), cell(str(c.losses), c.losses),
                     cell(str(c.n)), cell(f"{c.diff:+.1f}"), cell(_p(c.p_holm)), cell(c.verdict, kind=c.verdict)])
    suite = suite_tables.suite
    table = Table(f"wtl-{suite}-{metric}", f"{suite}: win / tie / loss vs {baseline_label} ({title} per example)",
                  columns, rows, section=suite)
    table.mark_best()
    table.notes = settings_notes(data, suite, METRIC_DESCRIPTIONS.get(metric, metric)) + [
        f"Per example, a row wins when its {title} (averaged over generation seeds and training runs) is higher "
        f"than {baseline_label}'s, ties when equal. Not an LLM judgment.",
    ]
    return table


# ---------------------------------------------------------------------------------------------
# lm-eval (OLL) suites
# ---------------------------------------------------------------------------------------------


def harness_table(data: ReportData, suite: str, *, reference_label: str | None) -> Table | None:
    """Rows = models; columns = each task's number that enters the Average (x100), then the Average."""
    tasks: dict[str, dict] = {}
    for run in data.eval_runs:
        for r in run.metrics:
            if r.get("suite") == suite and "harness" in r and r.get("in_average") and r.get("subset") not in (None, "all"):
                tasks.setdefault(r["subset"], r)
    averages = list(dict.fromkeys(r["metric"] for run in data.eval_runs for r in run.metrics
                                  if r.get("suite") == suite and "harness" in r and r.get("subset") == "all"))
    if not tasks and not averages:
        return None
    columns = [Column("model", align="left"), Column("runs")]
    columns += [Column(f"{task} {_shots(r)}", better="higher") for task, r in tasks.items()]
    columns += [Column(name, better="higher") for name in averages]
    rows, labels = [], []
    for label in data.labels():
        runs = [run for run in data.runs_of(label) if any(r.get("suite") == suite for r in run.metrics)]
        if not runs:
            continue
        row = [cell(label), cell(str(len(runs)))]
        for key in [(task, r["metric"]) for task, r in tasks.items()] + [("all", name) for name in averages]:
            values = [float(r["value"]) for run in runs for r in run.metrics
                      if r.get("suite") == suite and r.get("subset") == key[0] and r.get("metric") == key[1]
                      and (key[0] == "all" or r.get("in_average"))]
            if not values:
                row.append(cell("-"))
                continue
            mean = 100 * math.fsum(values) / len(values)
            std = _std([100 * v for v in values])
            row.append(cell(fmt(mean) + (f" ±{std:.1f}" if std is not None else ""), mean))
        rows.append(row)
        labels.append(label)
    order = sorted(range(len(rows)), key=lambda i: -(rows[i][-1].value or -math.inf))
    rows, labels = [rows[i] for i in order], [labels[i] for i in order]
    table = Table(f"oll-{suite}", f"{suite}: lm-eval harness", columns, rows, section=suite)
    table.mark_best({labels.index(reference_label)} if reference_label in labels else set())
    harness = next((r["harness"] for run in data.eval_runs for r in run.metrics
                    if r.get("suite") == suite and r.get("harness")), "lm-eval")
    settings = "; ".join(f"{task}: {r['metric']}, {r.get('num_fewshot', '?')}-shot, filter {r.get('filter', 'none')}"
                         for task, r in tasks.items())
    limits = {str(r.get("limit")) for run in data.eval_runs for r in run.metrics if r.get("suite") == suite and r.get("limit")}
    table.notes = [f"Protocol: {harness}. Judge: none (log-likelihood / exact-match scoring); decoding: greedy where "
                   "generative; seeds: not applicable (deterministic).",
                   f"Data: lm-eval task datasets{' (limit ' + ', '.join(sorted(limits)) + ' per task: not comparable with full runs)' if limits else ''}.",
                   f"Columns (x100): {settings}." if settings else "Columns x100.",
                   "The Average is the suite's unweighted mean over tasks; ± is the std over training runs when a "
                   "row has several. Bold: best in column."]
    return table


def _shots(record: dict) -> str:
    shots = record.get("num_fewshot")
    return f"({shots}s)" if shots is not None else ""


def _std(values: list[float]) -> float | None:
    from kdbench.metrics import mean_std

    return mean_std(values)[1] if len(values) > 1 else None


__all__ = ["Cell", "Column", "Table", "holm", "Comparison", "compare_with_baseline", "leaderboard_tables",
           "group_tables", "win_tie_loss_table", "harness_table"]
