"""Published numbers (``kdbench/paper_results.csv``) shown beside local results, never ranked with them.

The CSV (columns paper, table, teacher, student, method, benchmark, metric, value) holds the numbers
printed in the seed papers' tables. It has no judge column: the judge follows from the paper and the
benchmark (PROTOCOLS.md §2-5 and the papers' evaluation sections), see :func:`judge_of`.
"""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass
from importlib import resources

from kdbench.report.tables import Column, Table, cell

# benchmark (without "@dataset" / "(bucket)") -> the local suite or judge protocol it corresponds to
BENCHMARK_SUITES = {
    "dolly": "dolly", "selfinst": "selfinst", "sinst": "sinst", "uinst": "uinst", "vicuna": "vicuna",
    "mt_bench": "mt_bench", "alpaca_eval_1": "alpaca_eval_1", "alpaca_eval_vs_adpa": "alpaca_eval",
    "in_domain": "pairwise", "oll_v1": "oll",
}

_REFERENCE_BASED = "none (Rouge-L / exact match against references)"
JUDGES = {
    ("daDPO", "mt_bench"): "GPT-4o-2024-08-06 (MT-Bench single grading)",
    ("daDPO", "alpaca_eval_1"): "GPT-4o-2024-08-06 vs text-davinci-003 (not the alpaca_eval_gpt4 scale)",
    ("daDPO", "in_domain"): "GPT-4o-2024-08-06 (pairwise vs teacher, 300 ShareGPT prompts)",
    ("ADPA", "mt_bench"): "GPT-4-0125-preview (corrected reference answers)",
    ("ADPA", "alpaca_eval_vs_adpa"): "GPT-4-1106-preview vs the ADPA-trained student (ADPA = 50)",
    ("ADPA", "oll_v1"): "none (lm-eval, OLL v1 settings)",
}


# (paper, method as printed) -> the kdbench recipe it is, where the lower-cased name is not that recipe: the ADPA
# paper's "DDPO" is Fisch et al.'s reward-model distillation (ddpo_rm), not the daDPO paper's dDPO (ddpo), and
# its "VanillaKD" is Hinton's word-level KD (kd)
PAPER_METHODS = {("ADPA", "DDPO"): "ddpo_rm", ("ADPA", "VanillaKD"): "kd"}


@dataclass(frozen=True)
class PaperRow:
    paper: str
    table: str
    teacher: str
    student: str
    method: str
    benchmark: str
    metric: str
    value: float
    text: str  # the value as printed in the CSV (keeps the paper's decimals)

    @property
    def base_benchmark(self) -> str:
        return self.benchmark.split("@", 1)[0].split("(", 1)[0]

    @property
    def local_method(self) -> str:
        """The kdbench recipe this row's method is (:data:`PAPER_METHODS`, else the name lower-cased)."""
        return PAPER_METHODS.get((self.paper, self.method), self.method.lower())

    @property
    def pair(self) -> str:
        return f"{self.teacher or '?'} -> {self.student or '?'}"


def load_paper_results() -> list[PaperRow]:
    """Every row of the shipped ``paper_results.csv``."""
    text = resources.files("kdbench").joinpath("paper_results.csv").read_text(encoding="utf-8")
    return [PaperRow(r["paper"], r["table"], r["teacher"], r["student"], r["method"], r["benchmark"], r["metric"],
                     float(r["value"]), r["value"].strip()) for r in csv.DictReader(io.StringIO(text))]


def judge_of(row: PaperRow) -> str:
    """Who scored a published number (the CSV does not say; the papers do)."""
    return JUDGES.get((row.paper, row.base_benchmark), _REFERENCE_BASED)


def _decoding_of(row: PaperRow) -> str:
    if row.paper == "AKL":
        return "sampling, 5 seeds (mean ± std)"
    if row.paper == "DPKD":
        return "sampling, one seed"
    return "as in the paper (generation seeds not stated in the table)"


def paper_tables(local_labels: list[str], local_suites: list[str]) -> tuple[list[Table], str]:
    """Tables of published numbers for the methods of local rows (a row's recipe: :attr:`PaperRow.local_method`).

    Only benchmarks matching a local suite are shown when any matches; otherwise every benchmark of
    the matching methods (the note says so). One table per paper x table x teacher x benchmark (rows: method, student).
    """
    wanted = {label.lower() for label in local_labels}
    rows = [r for r in load_paper_results() if r.local_method in wanted]
    if not rows:
        return [], "No published numbers for methods named " + ", ".join(local_labels) + "."
    suites = {s.lower() for s in local_suites}
    same_benchmark = [r for r in rows if BENCHMARK_SUITES.get(r.base_benchmark, r.base_benchmark) in suites]
    note = ("Published numbers for the same benchmarks and method names."
            if same_benchmark else
            "No published numbers on the local suites; shown for orientation only: every benchmark of the same "
            "method names.")
    rows = same_benchmark or rows
    groups: dict[tuple, list[PaperRow]] = {}
    for r in rows:
        groups.setdefault((r.paper, r.table, r.teacher, r.benchmark), []).append(r)
    tables = []
    for index, ((paper, table_no, teacher, benchmark), members) in enumerate(groups.items()):
        values: dict[tuple[str, str], dict[str, PaperRow]] = {}
        metrics: list[str] = []
        for r in members:
            values.setdefault((r.method, r.student), {})[r.metric] = r
            metric = r.metric.removesuffix("_mean").removesuffix("_std")
            if metric not in metrics:
                metrics.append(metric)
        columns = [Column("method", align="left"), Column("student", align="left")] + [Column(m) for m in metrics]
        body = []
        for (method, student), found in values.items():
            row = [cell(method), cell(student or "?")]
            for metric in metrics:
                if metric in found:
                    row.append(cell(found[metric].text))
                elif f"{metric}_mean" in found:
                    std = found.get(f"{metric}_std")
                    row.append(cell(found[f"{metric}_mean"].text + (f" ±{std.text}" if std is not None else "")))
                else:
                    row.append(cell("-"))
            body.append(row)
        first = members[0]
        table = Table(f"paper-{index}", f"{paper} Table {table_no} · teacher {teacher or '?'} · {benchmark}", columns,
                      body, section="papers")
        table.notes = [f"Published in {paper}, Table {table_no}; teacher {teacher or 'not given'}, students as listed; "
                       f"data: {benchmark} as in the paper; judge: {judge_of(first)}; decoding: {_decoding_of(first)}. Not re-run here and not part of "
                       "the local ranking."]
        tables.append(table)
    return tables, note
