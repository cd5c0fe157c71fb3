"""Tables of judged suites, from the metric records of judge runs (no reader per protocol).

Every judged record names its ``judge`` and ``protocol`` and may carry ``stderr``, ``wins`` / ``ties`` /
``losses``, ``n_failed`` and an ``opponent``; a suite's table has one row per (model, judge, opponent), one
column per metric at subset ``all`` (with ± its standard error when records give one), then W / T / L,
failures, n and the judge. Subsets (``turn:1``, ``category:writing``) get one table per group. Several runs
of one row (training seeds) are averaged, with the std over runs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from kdbench.report.collect import ReportData
from kdbench.report.tables import Column, Table, cell, fmt

COUNT_FIELDS = ("wins", "ties", "losses")


@dataclass
class JudgedRow:
    label: str
    judge: str
    opponent: str | None
    values: dict = field(default_factory=dict)  # (metric, subset) -> [record, ...]

    def records(self, metric: str, subset: str = "all") -> list[dict]:
        return self.values.get((metric, subset), [])


def judged_rows(data: ReportData, suite: str) -> list[JudgedRow]:
    """One row per (label, judge, opponent) with the records of every run behind it."""
    rows: dict[tuple, JudgedRow] = {}
    for run in data.eval_runs:
        for record in run.metrics:
            if record.get("suite") != suite or "judge" not in record:
                continue
            key = (run.label, str(record["judge"]), record.get("opponent"))
            row = rows.setdefault(key, JudgedRow(*key))
            row.values.setdefault((record["metric"], record.get("subset", "all")), []).append(record)
    return list(rows.values())


def judged_metrics(rows: list[JudgedRow]) -> list[str]:
    return list(dict.fromkeys(metric for row in rows for metric, subset in row.values if subset == "all"))


def _mean_std(values: list[float]) -> tuple[float, float | None]:
    mean = math.fsum(values) / len(values)
    if len(values) < 2:
        return mean, None
    return mean, math.sqrt(math.fsum((v - mean) ** 2 for v in values) / (len(values) - 1))


def _value_text(records: list[dict], digits: int) -> tuple[str, float | None]:
    if not records:
        return "-", None
    mean, std = _mean_std([float(r["value"]) for r in records])
    return fmt(mean, digits) + (f" ±{std:.{digits}f}" if std is not None else ""), mean


def _digits(records: list[dict]) -> int:
    """Whole numbers for a count-like quantity that is not a score (``higher_is_better: null``, e.g. an average
    length in characters), two decimals for scores."""
    values = [abs(float(r["value"])) for r in records]
    counts = values and all(v == int(v) for v in values) and all(r.get("higher_is_better", True) is None for r in records)
    return 0 if counts else 2


def headline_table(data: ReportData, suite: str) -> Table | None:
    """Rows = (model, judge, opponent); columns = each metric at subset ``all``, SE, W / T / L, failed, n, judge."""
    rows = judged_rows(data, suite)
    metrics = judged_metrics(rows)
    if not rows or not metrics:
        return None
    first = metrics[0]
    has_opponent = any(row.opponent for row in rows)
    has_se = {m: any(r.get("stderr") is not None for row in rows for r in row.records(m)) for m in metrics}
    counts_of = next((m for m in metrics if any(all(k in r for k in COUNT_FIELDS) for row in rows
                                                for r in row.records(m))), None)
    columns = [Column("model", align="left")] + ([Column("vs", align="left")] if has_opponent else [])
    for metric in metrics:
        higher = all(r.get("higher_is_better", True) is not None for row in rows for r in row.records(metric))
        columns.append(Column(metric, better="higher" if higher else None))
        if has_se[metric]:
            columns.append(Column("± SE"))
    if counts_of:
        columns += [Column("W", better="higher"), Column("T"), Column("L", better="lower")]
    columns += [Column("failed"), Column("n"), Column("judge", align="left")]
    ordered = sorted(rows, key=lambda row: -max((float(r["value"]) for r in row.records(first)), default=-math.inf))
    body = []
    for row in ordered:
        line = [cell(row.label)] + ([cell(row.opponent or "-")] if has_opponent else [])
        for metric in metrics:
            records = row.records(metric)
            text, value = _value_text(records, _digits(records))
            line.append(cell(text, value))
            if has_se[metric]:
                errors = [float(r["stderr"]) for r in records if r.get("stderr") is not None]
                line.append(cell(fmt(math.fsum(errors) / len(errors), 2) if errors else "-"))
        anchor = row.records(first)
        if counts_of:
            counted = [r for r in row.records(counts_of) if all(k in r for k in COUNT_FIELDS)]
            for key in COUNT_FIELDS:
                values = [float(r[key]) for r in counted]
                mean = math.fsum(values) / len(values) if values else None
                line.append(cell("-" if mean is None else (f"{mean:.0f}" if mean == int(mean) else f"{mean:.1f}"), mean))
        failed = [int(r["n_failed"]) for r in anchor if r.get("n_failed") is not None]
        n_values = [int(r["n"]) for r in anchor if r.get("n") is not None]
        line += [cell(str(sum(failed)) if failed else "-"), cell(str(max(n_values)) if n_values else "-"),
                 cell(row.judge)]
        body.append(line)
    table = Table(f"judged-{suite}", f"{suite}: judged", columns, body, section=suite)
    table.mark_best()
    table.notes = judged_notes(data, suite, rows) + [
        "Cells: mean over the row's runs (± std over runs when it has several); ± SE: the protocol's standard error "
        "over items; W / T / L: the row's wins, ties and losses against its opponent ('vs'); failed: judgments "
        "that failed after the retries or could not be parsed, excluded from every number; n: items judged.",
        "Bold: best in column."]
    return table


def judged_notes(data: ReportData, suite: str, rows: list[JudgedRow]) -> list[str]:
    """Which judges and protocols produced the suite's numbers (from the runs' records and run.json)."""
    protocols = sorted({str(r.get("protocol")) for row in rows for recs in row.values.values() for r in recs
                        if r.get("protocol")})
    runs = [run for run in data.eval_runs if any(r.get("suite") == suite and "judge" in r for r in run.metrics)]
    labels = sorted({str(run.info.get("judge_label") or "") for run in runs} - {""})
    inputs = list(dict.fromkeys(str(i) for run in runs for i in (run.config.get("inputs") or [])))
    notes = [f"Judge: {'; '.join(labels) or ', '.join(sorted({row.judge for row in rows}))}. Protocol: "
             f"{', '.join(protocols) or 'not recorded'}.",
             "Data, decoding and seeds: those of the judged answers, one generation seed per judged run"
             + (f" (inputs: {', '.join(inputs)})." if inputs else ".")]
    if len({row.judge for row in rows}) > 1 or len(protocols) > 1:
        notes.append("Warning: rows were judged by different judges or protocols; they are not comparable.")
    return notes


def subset_tables(data: ReportData, suite: str) -> list[Table]:
    """Per subset group (``turn``, ``category``): rows = models, columns = subsets, cells = the first metric
    that has that group's subsets."""
    rows = judged_rows(data, suite)
    groups: dict[str, dict[str, str]] = {}  # group -> subset -> metric
    for row in rows:
        for metric, subset in row.values:
            if subset != "all" and ":" in subset:
                groups.setdefault(subset.split(":", 1)[0], {}).setdefault(subset, metric)
    tables = []
    for group, subsets in groups.items():
        metric = next(iter(subsets.values()))
        names = [s for s, m in subsets.items() if m == metric]
        columns = [Column("model", align="left")] + [Column(s.split(":", 1)[1], better="higher") for s in names]
        body = []
        for row in rows:
            if not any(row.records(metric, s) for s in names):
                continue
            line = [cell(row.label + (f" vs {row.opponent}" if row.opponent else ""))]
            for subset in names:
                text, value = _value_text(row.records(metric, subset), 2)
                line.append(cell(text, value))
            body.append(line)
        if not body:
            continue
        table = Table(f"judged-{suite}-{group}", f"{suite}: {metric} by {group}", columns, body, section=suite)
        table.mark_best()
        table.notes = judged_notes(data, suite, rows) + [f"Cells: {metric} per {group} (mean over the row's runs)."]
        tables.append(table)
    return tables


def wtl_counts(data: ReportData, suite: str) -> list[tuple[str, float, float, float]]:
    """(row name, wins, ties, losses) of every judged row with counts, for the W / T / L bars."""
    out = []
    for row in judged_rows(data, suite):
        for metric, subset in row.values:
            records = [r for r in row.records(metric, subset) if subset == "all" and all(k in r for k in COUNT_FIELDS)]
            if records:
                name = row.label + (f" vs {row.opponent}" if row.opponent else "") + f" ({metric})"
                out.append((name, *(math.fsum(float(r[k]) for r in records) / len(records) for k in COUNT_FIELDS)))
                break
    return out


__all__ = ["headline_table", "subset_tables", "judged_rows", "wtl_counts"]
