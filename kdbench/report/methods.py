"""The method table: what each trained row is — its recipe, the recipe's one-line description and the papers
and code it follows (the ``citation`` of ``trainers/<name>.yaml``)."""

from __future__ import annotations

from kdbench.report.collect import ReportData
from kdbench.report.tables import Column, Table, cell


def method_table(data: ReportData) -> Table | None:
    """One row per trained method of the report (from each training run's resolved config); its description and
    citation are the table's notes (a citation is longer than a Markdown row may be). Methods no longer in the
    registry say so."""
    from kdbench import registry
    from kdbench.errors import ConfigError

    methods: dict[str, list[str]] = {}
    for run in data.train_runs:
        method = run.config.get("method")
        if method:
            methods.setdefault(str(method), []).append(run.label)
    if not methods:
        return None
    rows, notes = [], []
    for method, labels in methods.items():
        try:
            entry = registry.get("trainers", method)
            description, citation = entry.description, str(entry.body.get("citation", "") or "-")
        except ConfigError:  # a run of a recipe that is not registered here any more
            description, citation = "(not in this registry)", "-"
        rows.append([cell(method), cell(", ".join(dict.fromkeys(labels)))])
        notes.append(f"{method}: {description} Source: {citation}")
    columns = [Column("method", align="left"), Column("rows", align="left")]
    table = Table("methods", "Methods", columns, rows, section="methods")
    table.notes = ["Each method's recipe (trainers/NAME.yaml) and the papers and code it follows; definitions, "
                   "defaults and decisions in docs/methods.md."] + notes
    return table


__all__ = ["method_table"]
