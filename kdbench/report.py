"""Leaderboards from run directories.

Rows are models (runs grouped by their ``label``; several training seeds of one method are one
row: mean ± std over training seeds), columns the suite's metrics overall and per length bucket.
Every row carries a 95% bootstrap CI over examples; each method is compared with the baseline row
by a paired bootstrap test on the same prompts with Holm's correction across methods, so
differences within noise show as ties.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field

from kdbench.store import RunDir


@dataclass
class Row:
    label: str
    runs: list[RunDir]
    values: dict[tuple[str, str], list[float]] = field(default_factory=dict)  # (metric, subset) -> per-run means
    ci: dict[str, tuple[float, float]] = field(default_factory=dict)
    per_example: dict[str, list[float]] = field(default_factory=dict)  # metric -> example scores (avg over runs)
    n: int = 0


def holm(p_values: list[float]) -> list[float]:
    """Holm-Bonferroni adjusted p-values (same order as given)."""
    m = len(p_values)
    order = sorted(range(m), key=lambda i: p_values[i])
    adjusted = [0.0] * m
    running = 0.0
    for rank, index in enumerate(order):
        running = max(running, min(1.0, (m - rank) * p_values[index]))
        adjusted[index] = running
    return adjusted


def collect_rows(runs: list[RunDir], suite: str) -> list[Row]:
    from kdbench.metrics import bootstrap_ci

    rows: dict[str, Row] = {}
    for run in runs:
        records = [r for r in run.metrics() if r.get("suite") == suite and r.get("seed") == "mean"]
        if not records:
            continue
        label = run.info().get("label") or run.config().get("label") or run.path.name
        row = rows.setdefault(label, Row(label, []))
        row.runs.append(run)
        for record in records:
            row.values.setdefault((record["metric"], record["subset"]), []).append(record["value"])
        scores_path = run.path / "scores" / f"{suite}.json"
        if scores_path.exists():
            scores = json.loads(scores_path.read_text())
            for metric, per_seed in scores["scores"].items():
                n = len(scores["ids"])
                example_means = [sum(v[i] for v in per_seed.values()) / len(per_seed) for i in range(n)]
                previous = row.per_example.get(metric)
                k = len(row.runs)
                row.per_example[metric] = example_means if previous is None else [
                    (p * (k - 1) + e) / k for p, e in zip(previous, example_means)]
                row.n = n
    for row in rows.values():
        for metric, values in row.per_example.items():
            row.ci[metric] = bootstrap_ci(values)
    return list(rows.values())


def _fmt(values: list[float]) -> str:
    if not values:
        return "-"
    mean = sum(values) / len(values)
    if len(values) > 1:
        std = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))
        return f"{mean:.1f}±{std:.1f}"
    return f"{mean:.1f}"


def leaderboard_markdown(runs: list[RunDir], *, title: str = "kdbench leaderboard", suite: str | None = None,
                         baseline_label: str | None = "sft", reference_label: str | None = "teacher",
                         data_note: str = "") -> str:
    """A Markdown leaderboard (fits 100 columns) for the runs of one suite."""
    from kdbench.metrics import paired_test

    if suite is None:
        suites = sorted({r["suite"] for run in runs for r in run.metrics()})
        suite = suites[0] if suites else "?"
    rows = collect_rows(runs, suite)
    rows.sort(key=lambda r: -_mean(r.values.get(("rougeL", "all"), [float("-inf")])))
    buckets = sorted({subset for row in rows for (metric, subset) in row.values
                      if metric == "rougeL" and subset.startswith("bucket:")}, key=_bucket_key)
    baseline = next((r for r in rows if r.label == baseline_label), None)
    compared = [r for r in rows if baseline is not None and r is not baseline and "rougeL" in r.per_example
                and len(r.per_example["rougeL"]) == len(baseline.per_example.get("rougeL", []))]
    raw_p = [paired_test(r.per_example["rougeL"], baseline.per_example["rougeL"]) for r in compared]
    adjusted = dict(zip((r.label for r in compared), holm(raw_p)))

    best = {key: max(_mean(r.values.get(key, [float("-inf")])) for r in rows) for key in
            [("rougeL", "all"), ("exact_match", "all")] + [("rougeL", b) for b in buckets]} if rows else {}

    def cell(row: Row, key) -> str:
        text = _fmt(row.values.get(key, []))
        return f"**{text}**" if row.values.get(key) and math.isclose(_mean(row.values[key]), best[key]) else text

    first_run = rows[0].runs[0] if rows else None
    config = first_run.config() if first_run else {}
    header = ["model", "runs", "Rouge-L", "95% CI", "EM"] + [b.split(":", 1)[1] for b in buckets] + [
        f"vs {baseline_label}" if baseline else ""]
    lines = [f"# {title}", ""]
    lines.append(f"Suite `{suite}`: {data_note or config.get('data_path') or ''}".rstrip())
    lines.append(f"Decoding: {config.get('decoding_summary', '?')}; prompt: {config.get('prompt_style', '?')}.")
    lines.append("Judge: none (reference-based Rouge-L F1 x100 and exact match x100; buckets by reference words).")
    lines.append("")
    lines.append("| " + " | ".join(h for h in header if h != "") + " |")
    lines.append("|" + "|".join(["---"] + ["--:"] * (len([h for h in header if h != ""]) - 1)) + "|")
    for row in rows:
        low, high = row.ci.get("rougeL", (math.nan, math.nan))
        cells = [row.label, str(len(row.runs)), cell(row, ("rougeL", "all")), f"[{low:.1f}, {high:.1f}]",
                 cell(row, ("exact_match", "all"))] + [cell(row, ("rougeL", b)) for b in buckets]
        if baseline:
            if row is baseline:
                cells.append("baseline")
            elif row.label in adjusted:
                p = adjusted[row.label]
                diff = _mean(row.values[("rougeL", "all")]) - _mean(baseline.values[("rougeL", "all")])
                cells.append(f"{diff:+.1f} p={p:.3f}{'' if p < 0.05 else ' (tie)'}")
            else:
                cells.append("-")
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    counts = {b.split(":", 1)[1]: _bucket_count(rows, b) for b in buckets}
    if counts:
        lines.append("Bucket sizes (examples): " + ", ".join(f"{k} n={v}" for k, v in counts.items()) + ".")
    if baseline:
        lines.append(f"Column 'vs {baseline_label}': Rouge-L difference, paired bootstrap p-value, Holm-corrected "
                     f"over {len(compared)} comparisons; p >= 0.05 is marked (tie).")
    reference = next((r for r in rows if r.label == reference_label), None)
    if reference and baseline and "rougeL" in reference.ci and "rougeL" in baseline.ci:
        (t_low, t_high), (b_low, b_high) = reference.ci["rougeL"], baseline.ci["rougeL"]
        verdict = "do not overlap" if t_low > b_high or b_low > t_high else "overlap"
        lines.append(f"{reference_label} vs {baseline_label} Rouge-L 95% CIs: [{t_low:.1f}, {t_high:.1f}] vs "
                     f"[{b_low:.1f}, {b_high:.1f}] ({verdict}).")
    lines.append("Bold: best in column. ± : std over training seeds where a method has several runs.")
    return "\n".join(lines) + "\n"


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


def _bucket_key(subset: str) -> float:
    low = subset.split(":", 1)[1].strip("([").split(",")[0]
    try:
        return float(low)
    except ValueError:
        return math.inf


def _bucket_count(rows: list[Row], bucket: str) -> int:
    for row in rows:
        for run in row.runs:
            for record in run.metrics():
                if record.get("subset") == bucket and record.get("seed") == "mean" and record["metric"] == "rougeL":
                    return record.get("n") or 0
    return 0


CSV_COLUMNS = ("schema", "run", "label", "suite", "metric", "seed", "subset", "value", "n", "std", "ci_low", "ci_high")


def write_long_csv(runs: list[RunDir], path) -> None:
    """Every metric record of ``runs`` as one CSV row (run x suite x metric x seed x subset), for pandas."""
    import csv
    import io

    from kdbench.store import atomic_write_text

    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=CSV_COLUMNS, extrasaction="ignore")
    writer.writeheader()
    for run in runs:
        label = run.info().get("label") or run.config().get("label") or run.path.name
        for record in run.metrics():
            writer.writerow({**record, "label": label})
    atomic_write_text(path, buffer.getvalue())
