"""The cost table: training cost per row (from cost.json) and the evaluated model's inference speed."""

from __future__ import annotations

import math

from kdbench.report.collect import ReportData, inference_speed, row_costs
from kdbench.report.tables import Column, Table, cell, fmt, fmt_int

COST_FIELDS = (
    ("wall_seconds", "train s", "lower", 0),
    ("tokens_processed", "tokens", None, None),
    ("teacher_forward_tokens", "teacher tok", None, None),
    ("generated_tokens", "gen tok", None, None),
    ("peak_rss_mb", "peak MB", "lower", 0),
)


def cost_table(data: ReportData, reference_label: str | None) -> Table | None:
    """Training cost per row (mean over its training runs) and the student's inference speed."""
    labels = data.labels() + [r.label for r in data.train_runs if r.label not in data.labels()]
    labels = list(dict.fromkeys(labels))
    columns = [Column("model", align="left"), Column("runs")] + [
        Column(title, better=better) for _, title, better, _ in COST_FIELDS] + [Column("infer tok/s", better="higher")]
    rows, order = [], []
    for label in labels:
        costs = row_costs(data, label)
        speeds = [s for run in data.runs_of(label) if (s := inference_speed(run)[1]) is not None]
        if not costs and not speeds:
            continue
        row = [cell(label), cell(str(len(costs)) if costs else "-")]
        for key, _, _, digits in COST_FIELDS:
            values = [float(c[key]) for c in costs if c.get(key) is not None]
            if not values:
                row.append(cell("-"))
                continue
            mean = math.fsum(values) / len(values)
            row.append(cell(fmt_int(round(mean)) if digits is None else fmt(mean, digits), mean))
        speed = math.fsum(speeds) / len(speeds) if speeds else None
        row.append(cell(fmt(speed), speed))
        rows.append(row)
        order.append(label)
    if not rows:
        return None
    table = Table("cost", "Cost", columns, rows, section="cost")
    table.mark_best({order.index(reference_label)} if reference_label in order else set())
    table.notes = ["Training (from each run's cost.json, mean over the row's training runs): train s = wall time; "
                   "tokens = tokens through the student; teacher tok = tokens through the teacher's forward pass; "
                   "gen tok = tokens generated during training (on-policy methods); peak MB = peak resident memory.",
                   "infer tok/s: tokens the evaluated model generated per second of its eval run's wall time "
                   "(includes loading and scoring, so a lower bound; blank for resumed runs). "
                   "Bold: best in column" + (f" ({reference_label} excluded)." if reference_label in order else ".")]
    return table


__all__ = ["COST_FIELDS", "cost_table"]
