"""Reports from run directories: leaderboards, breakdowns, cost, plots; Markdown, HTML and CSV.

Rows are models (runs grouped by their ``label``; several training seeds of one method are one row:
mean ± std over training seeds, next to the std over generation seeds). Every number carries a 95%
bootstrap CI over examples; each row is compared with the baseline row by a paired bootstrap test on
the same prompts with Holm's correction across the rows of the table, so differences within noise
show as ties.

* :func:`build_report` — everything (``kdbench report``): per suite and metric a leaderboard, length
  bucket and category tables, per-example win / tie / loss against the baseline, lm-eval (OLL) tables,
  judged results (``kdbench judge`` run directories, read like any run), a cost table, plots (forest plots
  with the baseline, length buckets, score vs cost, win / tie / loss bars, training curves), and with
  ``compare_papers`` the published numbers of the same methods beside (never inside) the rankings.
* :func:`leaderboard_markdown` — the compact leaderboard printed by ``kdbench demo`` / ``eval``.
* :func:`write_long_csv` — every metric record as one CSV row, for pandas.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

from kdbench.errors import ConfigError, DataError
from kdbench.report.collect import ReportData, from_runs, load
from kdbench.report.render import Section, report_html, report_markdown
from kdbench.report.tables import Table, holm
from kdbench.store import RunDir

FORMATS = ("md", "html", "csv")
MARKDOWN_FILE, HTML_FILE, CSV_FILE = "leaderboard.md", "report.html", "metrics.csv"


@dataclass
class ReportResult:
    """What :func:`build_report` produced. ``paths`` maps a format ("md", "html", "csv") or
    ``"plot:<figure id>"`` to the file written (empty when ``out`` is None)."""

    markdown: str
    html: str | None
    tables: list[str]
    figures: list[str]
    paths: dict[str, Path] = field(default_factory=dict)
    n_eval_runs: int = 0
    n_train_runs: int = 0
    n_judge_runs: int = 0
    notes: list[str] = field(default_factory=list)


def _suites_to_show(data: ReportData, suite: str | None) -> list[str]:
    suites = data.suites()
    if suite is None:
        return suites
    if suite not in suites:
        raise ConfigError(f"No run has results for suite {suite!r}; the runs have: {', '.join(suites) or 'none'}.")
    return [suite]


def build_sections(data: ReportData, *, baseline_label: str | None = "sft", reference_label: str | None = "teacher",
                   suite: str | None = None, compare_papers: bool = False, plots: bool = True,
                   metrics: Sequence[str] | None = None, full: bool = True) -> tuple[list[Section], list[str]]:
    """The report's sections (tables and figures) and notes about what was left out. Each suite has one
    section per kind of record it holds (reference-based, lm-eval, judged), in that order."""
    from kdbench.report import plots as plot_module

    notes: list[str] = []
    draw = plots and plot_module.available()
    if plots and not draw:
        notes.append("Plots skipped: matplotlib cannot be imported (reinstall kdbench).")
    sections: list[Section] = []
    for name in _suites_to_show(data, suite):
        kinds = data.suite_kinds(name)
        section = Section(f"suite-{name}", f"Suite {name}")
        if "reference" in kinds:
            _reference_section(section, data, name, baseline_label, reference_label, metrics, full, draw)
        if "harness" in kinds:
            from kdbench.report.tables import harness_table

            table = harness_table(data, name, reference_label=reference_label)
            if table:
                section.tables.append(table)
        if "judged" in kinds:
            judged = section if kinds == ["judged"] else Section(f"judged-{name}", f"Suite {name}: judged")
            _judged_section(judged, data, name, full, draw)
            if judged is not section:
                sections.append(section)
            section = judged
        if kinds == ["other"]:
            section.intro.append("No table for this suite's records; they are in the CSV.")
        sections.append(section)
    if full:
        from kdbench.report.cost import cost_table

        cost = cost_table(data, reference_label)
        figure = plot_module.training_curves_figure(data) if draw else None
        if cost or figure:
            sections.append(Section("cost", "Cost and training", tables=[cost] if cost else [],
                                    figures=[figure] if figure else []))
        from kdbench.report.methods import method_table

        methods = method_table(data)
        if methods:
            sections.append(Section("methods", "Methods", tables=[methods]))
    if compare_papers:
        from kdbench.report.papers import paper_tables

        labels = data.labels() + [r.label for r in data.train_runs]
        paper, note = paper_tables(list(dict.fromkeys(labels)), data.suites())
        sections.append(Section("papers", "Published results (for comparison, not ranked)",
                                intro=[note, "These numbers come from the papers (kdbench/paper_results.csv), were "
                                             "obtained with other models, data and judges, and are never mixed into "
                                             "the rankings above."], tables=paper))
    return sections, notes


def _reference_section(section: Section, data: ReportData, name: str, baseline_label, reference_label, metrics,
                       full: bool, draw: bool) -> None:
    from kdbench.report import plots as plot_module
    from kdbench.report import tables as t

    suite_tables = t.leaderboard_tables(data, name, baseline_label=baseline_label, reference_label=reference_label,
                                        metrics=list(metrics) if metrics else None)
    section.tables += suite_tables.tables
    section.figures_after = len(section.tables)  # the plots right after the leaderboards, before the breakdowns
    if baseline_label and baseline_label not in next(iter(suite_tables.stats.values()), {}):
        section.intro.append(f"No row is labelled {baseline_label!r}, so there are no paired tests; choose "
                             "the baseline with --baseline-label.")
    first_metric = next(iter(suite_tables.stats), None)
    bucket_metrics = list(metrics) if metrics else (None if full or not first_metric else [first_metric])
    section.tables += t.group_tables(data, name, "bucket", reference_label=reference_label, metrics=bucket_metrics)
    if full:
        section.tables += t.group_tables(data, name, "category", reference_label=reference_label,
                                         metrics=list(metrics) if metrics else None)
        if first_metric:
            wtl = t.win_tie_loss_table(suite_tables, data, baseline_label, first_metric)
            if wtl:
                section.tables.append(wtl)
    if not draw:
        return
    for metric, stats in suite_tables.stats.items():
        order = [row[0].text for table in suite_tables.tables if table.id.endswith(f"-{metric}")
                 and table.id.startswith("leaderboard-") for row in table.rows]
        figure = plot_module.forest_figure(name, metric, stats, order, baseline_label)
        if figure:
            section.figures.append(figure)
    if first_metric:
        order = [row[0].text for row in suite_tables.tables[0].rows]
        for figure in (plot_module.bucket_figure(data, name, first_metric, order),
                       plot_module.cost_figure(data, name, first_metric, suite_tables.stats[first_metric])):
            if figure:
                section.figures.append(figure)


def _judged_section(section: Section, data: ReportData, name: str, full: bool, draw: bool) -> None:
    from kdbench.report import judged
    from kdbench.report import plots as plot_module

    headline = judged.headline_table(data, name)
    if headline:
        section.tables.append(headline)
    if full:
        section.tables += judged.subset_tables(data, name)
    if draw:
        figure = plot_module.wtl_figure(name, judged.wtl_counts(data, name))
        if figure:
            section.figures.append(figure)


def _intro(data: ReportData, baseline_label: str | None, reference_label: str | None) -> list[str]:
    from kdbench.version import __version__

    n_judge = data.n_judge_runs()
    n_eval = len({str(r.run.path) for r in data.eval_runs}) - n_judge
    lines = [f"{n_eval} eval run(s) and {n_judge} judge run(s) as {len(data.labels())} row(s), "
             f"{len(data.train_runs)} training run(s); kdbench {__version__}."]
    if baseline_label:
        lines.append(f"Baseline for paired tests: {baseline_label}. Reference row (not marked best): "
                     f"{reference_label or 'none'}. Significance: paired bootstrap, Holm-corrected, alpha 0.05.")
    return lines


def build_report(run_dirs: list[Path], out: Path | None = None, formats: Iterable[str] = FORMATS,
                 compare_papers: bool = False, baseline_label: str = "sft", suite: str | None = None, *,
                 reference_label: str | None = "teacher", title: str = "kdbench report") -> ReportResult:
    """Read the run directories (train, eval and judge runs) at or below ``run_dirs`` and build the
    report; with ``out``, write ``leaderboard.md``, ``report.html``, ``metrics.csv`` (as chosen by
    ``formats``) and the figures as ``plots/<id>.png``.

    Raises DataError when a path does not exist or holds no run, ConfigError for an unknown format or
    a suite no run has.
    """
    formats = [f.strip().lower() for f in formats if f.strip()]
    unknown = sorted(set(formats) - set(FORMATS))
    if unknown or not formats:
        raise ConfigError(f"Unknown report format {', '.join(unknown) or '(none)'}; choose from {', '.join(FORMATS)}.")
    data = load([Path(p) for p in run_dirs])
    if not data.eval_runs and not data.train_runs:
        raise DataError("No run directories found there; pass folders written by kdbench train / eval / demo / judge.")
    sections, notes = build_sections(data, baseline_label=baseline_label, reference_label=reference_label, suite=suite,
                                     compare_papers=compare_papers, plots="html" in formats or out is not None)
    intro = _intro(data, baseline_label, reference_label) + notes
    figures = [f for s in sections for f in s.figures]
    markdown = report_markdown(title, intro, sections,
                               figure_note=f"in {HTML_FILE} and plots/" if out is not None else "in the HTML report")
    page = report_html(title, intro, sections) if "html" in formats else None
    result = ReportResult(markdown, page, [t.id for s in sections for t in s.tables], [f.id for f in figures],
                          n_eval_runs=len({str(r.run.path) for r in data.eval_runs}) - data.n_judge_runs(),
                          n_train_runs=len(data.train_runs), n_judge_runs=data.n_judge_runs(), notes=notes)
    if out is not None:
        from kdbench.store import atomic_write_bytes, atomic_write_text

        out = Path(out)
        if "md" in formats:
            result.paths["md"] = atomic_write_text(out / MARKDOWN_FILE, markdown)
        if page is not None:
            result.paths["html"] = atomic_write_text(out / HTML_FILE, page)
        if "csv" in formats:
            runs = list({str(r.run.path): r.run for r in data.eval_runs + data.train_runs}.values())
            result.paths["csv"] = write_long_csv(runs, out / CSV_FILE)
        for figure in figures:
            result.paths[f"plot:{figure.id}"] = atomic_write_bytes(out / "plots" / f"{figure.id}.png", figure.png)
    return result


def leaderboard_markdown(runs: list[RunDir], *, title: str = "kdbench leaderboard", suite: str | None = None,
                         baseline_label: str | None = "sft", reference_label: str | None = "teacher",
                         data_note: str = "") -> str:
    """The compact Markdown leaderboard (fits 100 columns): per suite, one table per metric and the
    length buckets of the first metric, with CIs and Holm-corrected paired tests against the baseline."""
    data = from_runs(list(runs))
    if not data.eval_runs:
        return f"# {title}\n\nNo evaluation runs.\n"
    sections, _ = build_sections(data, baseline_label=baseline_label, reference_label=reference_label, suite=suite,
                                 plots=False, full=False)
    for section in sections:
        if data_note:
            for table in section.tables:
                table.notes = [f"Data: {data_note}." if note.startswith("Data: ") else note for note in table.notes]
        _add_ci_overlap(section, data, baseline_label, reference_label)
    return report_markdown(title, [], sections)


def _add_ci_overlap(section: Section, data: ReportData, baseline_label, reference_label) -> None:
    from kdbench.report.collect import reference_stat

    name = section.id.removeprefix("suite-")
    if not (baseline_label and reference_label) or "reference" not in data.suite_kinds(name):
        return
    for metric in ("rougeL",):
        teacher = reference_stat(data.runs_of(reference_label), name, metric)
        baseline = reference_stat(data.runs_of(baseline_label), name, metric)
        if teacher is None or baseline is None or not teacher.ci or not baseline.ci:
            continue
        (t_low, t_high), (b_low, b_high) = teacher.ci, baseline.ci
        verdict = "do not overlap" if t_low > b_high or b_low > t_high else "overlap"
        section.intro.append(f"{reference_label} vs {baseline_label} {metric} 95% CIs: [{t_low:.1f}, {t_high:.1f}] vs "
                             f"[{b_low:.1f}, {b_high:.1f}] ({verdict}).")


# ---------------------------------------------------------------------------------------------
# CSV
# ---------------------------------------------------------------------------------------------

CSV_COLUMNS = ("schema", "run", "label", "kind", "suite", "metric", "seed", "subset", "value", "n", "std", "ci_low",
               "ci_high", "n_seeds", "stderr", "judge", "protocol", "opponent", "wins", "ties", "losses", "n_failed",
               "harness", "num_fewshot", "filter", "in_average")


def write_long_csv(runs: list[RunDir], path) -> Path:
    """Every metric record of ``runs`` (train, eval and judge runs alike) as one CSV row (run x suite x metric
    x seed x subset), for pandas:
    ``pd.read_csv(path).pivot_table(index="label", columns=["suite", "metric"], values="value")``."""
    import csv
    import io

    from kdbench.report.collect import views
    from kdbench.store import atomic_write_text

    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=CSV_COLUMNS, extrasaction="ignore")
    writer.writeheader()
    for run in {str(Path(r.path).resolve()): r for r in runs}.values():  # one run, several views: once
        for viewed in views(run):
            for record in viewed.metrics:
                row = {**record, "label": viewed.label, "kind": viewed.kind}
                writer.writerow({k: _csv_value(v) for k, v in row.items()})
    return atomic_write_text(path, buffer.getvalue())


def _csv_value(value):
    if isinstance(value, float) and math.isnan(value):
        return ""
    return value


__all__ = ["ReportResult", "build_report", "build_sections", "leaderboard_markdown", "write_long_csv", "holm",
           "FORMATS", "CSV_COLUMNS", "Table"]
