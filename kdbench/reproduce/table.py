"""A ``reproductions/`` file read into what the planner and the runner use: pairs, preparation stages, method
rows (each marked available or not in this version's ``trainers/``), benchmarks and the keys of the published
numbers in ``kdbench/paper_results.csv``."""

from __future__ import annotations

from dataclasses import dataclass, field

from kdbench.errors import ConfigError


@dataclass(frozen=True)
class Row:
    """One method row of the table. ``method`` is None for evaluated-only rows (``evaluate``: teacher/student)."""

    label: str
    method: str | None
    evaluate: str | None
    start: str
    teacher: str
    data: str | None
    params: dict
    settings: dict
    source: str
    gap: str | None
    paper_student: str  # "student" or "teacher": which model names the row in paper_results.csv

    @property
    def available(self) -> bool:
        """Whether this version has the row's recipe (a recipe landing later lights the row up)."""
        from kdbench import registry

        return self.method is None or self.method in registry.names("trainers")


@dataclass(frozen=True)
class Pair:
    teacher: str
    student: str
    paper_teacher: str
    paper_student: str
    data: str
    benchmark_suffix: str
    paper_table: str
    student_keep: float | None

    @property
    def name(self) -> str:
        return f"{self.paper_teacher}->{self.paper_student}{self.benchmark_suffix}"


@dataclass(frozen=True)
class Benchmark:
    benchmark: str
    metric: str
    kind: str
    suite: str
    examples: int
    judge_model: str | None
    scale: float
    prompts: str | None = None  # a datasets key: the held-out prompts of a pairwise (in-domain) judge benchmark
    reference_row: str | None = None  # AlpacaEval against this row's answers instead of the protocol's reference


@dataclass
class Table:
    """A reproduction file, parsed (``body`` is the validated YAML)."""

    name: str
    description: str
    paper: str
    table: str
    source: str
    models: dict
    datasets: dict
    pairs: list[Pair]
    preparation: list[dict]
    rows: list[Row]
    benchmarks: list[Benchmark]
    eval: dict
    gaps: list[str]
    mini: dict
    path: str = ""
    body: dict = field(default_factory=dict, repr=False)

    def paper_key(self, pair: Pair, row: Row, benchmark: Benchmark) -> tuple:
        """The (paper, table, teacher, student, method, benchmark, metric) key into paper_results.csv."""
        student = pair.paper_teacher if row.paper_student == "teacher" else pair.paper_student
        return (self.paper, pair.paper_table, pair.paper_teacher, student, row.label,
                benchmark.benchmark + pair.benchmark_suffix, benchmark.metric)


def load_table(name: str) -> Table:
    """The registered reproduction ``name`` (an unknown name is one sentence listing the valid ones)."""
    from kdbench import registry

    entry = registry.get("reproductions", name)
    body = entry.body
    where = f"Reproduction {entry.path}"
    models, datasets = body["models"], body["datasets"]
    prep_names = [p["name"] for p in body.get("preparation") or []]

    def need(value, known, what):
        if value not in known:
            raise ConfigError(f"{where}: {what} {value!r} is not defined; use one of: {', '.join(known)}.")
        return value

    pairs = []
    for spec in body["pairs"]:
        data = need(spec.get("data", body["train_data"]), datasets, "dataset")
        pairs.append(Pair(need(spec["teacher"], models, "model"), need(spec["student"], models, "model"),
                          spec["paper_teacher"], spec["paper_student"], data, spec.get("benchmark_suffix", ""),
                          str(spec.get("paper_table", body["table"])), spec.get("student_keep")))
    rows: list[Row] = []
    for spec in body["rows"]:
        if bool(spec.get("method")) == bool(spec.get("evaluate")):
            raise ConfigError(f"{where}: row {spec['label']!r} needs either method (a trained row) or evaluate "
                              "(teacher / student), not both or neither.")
        start, teacher = spec.get("start", "student"), spec.get("teacher", "teacher")
        labels = [r.label for r in rows]
        if start not in ["student", *prep_names, *labels]:
            raise ConfigError(f"{where}: row {spec['label']!r} starts from {start!r}, which is neither student, a "
                              "preparation stage nor an earlier row.")
        if teacher not in ["teacher", *prep_names]:
            raise ConfigError(f"{where}: row {spec['label']!r} has teacher {teacher!r}; use teacher or a preparation "
                              "stage's name.")
        rows.append(Row(spec["label"], spec.get("method"), spec.get("evaluate"), start, teacher,
                        spec.get("data"), dict(spec.get("params") or {}), dict(spec.get("settings") or {}),
                        spec["source"], spec.get("gap"), spec.get("paper_student", "student")))
    from kdbench.reproduce.layout import slug

    if len({slug(r.label) for r in rows}) != len(rows):
        raise ConfigError(f"{where}: each row label may appear once (labels differing only in punctuation or case "
                          "share a run folder).")
    benchmarks = [Benchmark(b["benchmark"], b["metric"], b["kind"], b["suite"], int(b["examples"]),
                            b.get("judge_model"), float(b.get("scale", 1.0)),
                            need(b["prompts"], datasets, "dataset") if b.get("prompts") else None,
                            need(b["reference_row"], [r.label for r in rows], "row") if b.get("reference_row") else None)
                  for b in body["eval"]["benchmarks"]]
    return Table(entry.name, entry.description, body["paper"], str(body["table"]), body["source"], models, datasets,
                 pairs, list(body.get("preparation") or []), rows, benchmarks, dict(body["eval"]),
                 list(body.get("gaps") or []), dict(body["mini"]), str(entry.path), body)


__all__ = ["Row", "Pair", "Benchmark", "Table", "load_table"]
