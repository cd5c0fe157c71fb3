"""Reading run directories into the rows of a report (eval, judge and training runs alike).

A *row* is one model as the reader sees it: every eval run with the same ``label`` (several
training seeds of one method are one row). A run whose metric records carry their own ``label``
(a judge run that graded several models' MT-Bench answers) is one view per label. For a reference-based suite each eval run holds, per
metric and subset, a ``seed="mean"`` record (mean over generation seeds, their sample std, the
number of seeds) and ``scores/<suite>.json`` with every per-example score; :func:`reference_stat`
combines them over the row's runs:

* mean       = mean over training runs of each run's mean over generation seeds;
* std_gen    = generation-seed std (root mean square over the row's runs when it has several);
* std_train  = sample std over the training runs' means (only with two or more runs);
* ci         = 95% percentile bootstrap over examples of the per-example score averaged over
               generation seeds and training runs (PROTOCOLS.md §7).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from kdbench.store import RunDir, find_run_dirs, read_jsonl

CI_RESAMPLES = 1000


@dataclass
class RunView:
    """One run directory with its metadata read once."""

    run: RunDir
    label: str
    kind: str
    config: dict
    info: dict
    metrics: list[dict]

    @property
    def name(self) -> str:
        return self.run.path.name

    def scores(self, suite: str) -> dict | None:
        """``scores/<suite>.json`` ({"ids", "buckets", "categories", "scores": {metric: {seed: [..]}}}) or None."""
        path = self.run.path / "scores" / f"{suite}.json"
        if not path.is_file():
            return None
        try:
            return json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            return None


@dataclass
class Stat:
    """A row's number for one suite x metric x subset (see the module docstring)."""

    mean: float
    std_gen: float | None
    std_train: float | None
    n_runs: int
    n_seeds: int | None
    n: int | None
    ci: tuple[float, float] | None
    per_example: dict[str, float] | None = None  # example id -> score averaged over seeds and runs


@dataclass
class ReportData:
    """Everything a report is built from."""

    eval_runs: list[RunView] = field(default_factory=list)  # eval and judge runs (every run with scores)
    train_runs: list[RunView] = field(default_factory=list)
    train_of_eval: dict[str, RunView] = field(default_factory=dict)  # eval run path -> its training run
    external_costs: dict[str, dict] = field(default_factory=dict)  # eval run path -> cost of a cached model

    def labels(self) -> list[str]:
        return list(dict.fromkeys(run.label for run in self.eval_runs))

    def runs_of(self, label: str) -> list[RunView]:
        return [run for run in self.eval_runs if run.label == label]

    def suites(self) -> list[str]:
        return list(dict.fromkeys(r["suite"] for run in self.eval_runs for r in run.metrics if r.get("suite")))

    def suite_kinds(self, suite: str) -> list[str]:
        """The kinds of records a suite has, in report order: ``"reference"`` (per-seed generation metrics with
        a ``seed="mean"`` aggregate), ``"harness"`` (lm-eval), ``"judged"`` (records naming their ``judge``)."""
        records = [r for run in self.eval_runs for r in run.metrics if r.get("suite") == suite]
        kinds = [kind for kind, test in (("reference", lambda r: r.get("seed") == "mean"),
                                         ("harness", lambda r: "harness" in r), ("judged", lambda r: "judge" in r))
                 if any(test(r) for r in records)]
        return kinds or ["other"]

    def n_judge_runs(self) -> int:
        return len({str(run.run.path) for run in self.eval_runs if run.kind == "judge"})


def run_label(run: RunDir, info: dict, config: dict) -> str:
    """The name a run is shown under: run.json's label, the config's label, the training method, the folder."""
    return str(info.get("label") or config.get("label") or config.get("method") or run.path.name)


def view(run: RunDir) -> RunView:
    """The run as one view (every record under the run's label)."""
    info, config = run.info(), run.config() or {}
    return RunView(run, run_label(run, info, config), str(info.get("kind") or "eval"), config, info, run.metrics())


def views(run: RunDir) -> list[RunView]:
    """The run as one view per model: records with their own ``label`` form that label's view, the rest the
    run's own (a run that scored one model is one view)."""
    whole = view(run)
    by_label: dict[str, list[dict]] = {}
    for record in whole.metrics:
        by_label.setdefault(str(record.get("label") or whole.label), []).append(record)
    if len(by_label) <= 1:
        if by_label:
            whole.label = next(iter(by_label))
        return [whole]
    return [RunView(run, label, whole.kind, whole.config, whole.info, records) for label, records in by_label.items()]


def load(paths: list[Path]) -> ReportData:
    """The run directories at or below ``paths`` (train, eval and judge runs).

    Raises DataError (from :func:`find_run_dirs`) for a path that does not exist.
    """
    return from_runs(find_run_dirs(paths))


def from_runs(run_dirs: list[RunDir]) -> ReportData:
    """A :class:`ReportData` from run directories; eval runs are linked to the training runs of their models."""
    runs = [v for run in run_dirs for v in views(run)]
    data = ReportData(eval_runs=[r for r in runs if r.kind != "train"], train_runs=[r for r in runs if r.kind == "train"])
    by_path = {r.run.path.resolve(): r for r in data.train_runs}
    for run in data.eval_runs:
        model = run.config.get("model")
        if not model:
            continue
        model_dir = Path(str(model))
        parent = model_dir.parent
        try:
            parent = parent.resolve()
        except OSError:
            continue
        if parent in by_path:
            data.train_of_eval[str(run.run.path)] = by_path[parent]
        elif (parent / "run.json").is_file() and (parent / "cost.json").is_file():
            train = view(RunDir(parent))
            train.label = run.label  # the training run is shown under its evaluated model's name
            data.train_runs.append(train)
            by_path[parent] = train
            data.train_of_eval[str(run.run.path)] = train
        elif (parent / "COMPLETE.json").is_file():
            # a model built inside the artifact cache (the demo's teacher): its training cost is in the marker
            try:
                meta = json.loads((parent / "COMPLETE.json").read_text())
            except (OSError, json.JSONDecodeError):
                meta = {}
            if isinstance(meta.get("train_cost"), dict):
                data.external_costs[str(run.run.path)] = meta["train_cost"]
    for eval_path, train in data.train_of_eval.items():
        train.label = next(r.label for r in data.eval_runs if str(r.run.path) == eval_path)
    return data


# ---------------------------------------------------------------------------------------------
# Reference-based suites
# ---------------------------------------------------------------------------------------------


def _mean(values: list[float]) -> float:
    return math.fsum(values) / len(values) if values else math.nan


def subset_members(scores: dict, subset: str) -> list[int] | None:
    """Indices of the examples of ``subset`` ("all", "bucket:X", "category:Y") in a scores file."""
    n = len(scores.get("ids", []))
    if subset == "all":
        return list(range(n))
    group, _, name = subset.partition(":")
    labels = {"bucket": scores.get("buckets"), "category": scores.get("categories")}.get(group)
    if labels is None or len(labels) != n:
        return None
    return [i for i, label in enumerate(labels) if label == name]


def per_example(run: RunView, suite: str, metric: str, subset: str = "all") -> dict[str, float] | None:
    """Example id -> score averaged over the run's generation seeds, for the examples of ``subset``."""
    scores = run.scores(suite)
    if not scores or metric not in scores.get("scores", {}):
        return None
    per_seed = [values for values in scores["scores"][metric].values()]
    members = subset_members(scores, subset)
    if not per_seed or members is None:
        return None
    ids = [str(i) for i in scores["ids"]]
    return {ids[i]: _mean([values[i] for values in per_seed]) for i in members}


def reference_stat(runs: list[RunView], suite: str, metric: str, subset: str = "all") -> Stat | None:
    """Combine the ``seed="mean"`` records and per-example scores of one row's runs (module docstring)."""
    from kdbench.metrics import bootstrap_ci, mean_std

    records = []
    for run in runs:
        for record in run.metrics:
            if (record.get("suite") == suite and record.get("metric") == metric and record.get("seed") == "mean"
                    and record.get("subset", "all") == subset):
                records.append((run, record))
                break
    if not records:
        return None
    run_means = [float(r["value"]) for _, r in records]
    mean, std_train = mean_std(run_means)
    gen_stds = [r.get("std") for _, r in records if r.get("std") is not None]
    seeds = [r.get("n_seeds") for _, r in records if r.get("n_seeds") is not None]
    n_seeds = max(seeds) if seeds else None
    std_gen = math.sqrt(_mean([s * s for s in gen_stds])) if gen_stds and (n_seeds or 0) > 1 else None
    examples = [per_example(run, suite, metric, subset) for run, _ in records]
    combined = None
    if all(e is not None for e in examples):
        common = [i for i in examples[0] if all(i in e for e in examples[1:])]
        combined = {i: _mean([e[i] for e in examples]) for i in common}
    if combined:
        ci = bootstrap_ci(list(combined.values()), n_resamples=CI_RESAMPLES)
    elif len(records) == 1 and records[0][1].get("ci_low") is not None:
        ci = (float(records[0][1]["ci_low"]), float(records[0][1]["ci_high"]))
    else:
        ci = None
    n_values = [r.get("n") for _, r in records if r.get("n") is not None]
    return Stat(mean=mean, std_gen=std_gen, std_train=std_train if len(records) > 1 else None, n_runs=len(records),
                n_seeds=n_seeds, n=max(n_values) if n_values else None, ci=ci, per_example=combined)


def subsets(data: ReportData, suite: str, group: str) -> list[str]:
    """The ``bucket:...`` or ``category:...`` subsets of a suite, buckets in increasing order."""
    found = dict.fromkeys(r["subset"] for run in data.eval_runs for r in run.metrics
                          if r.get("suite") == suite and r.get("seed") == "mean"
                          and str(r.get("subset", "")).startswith(group + ":"))
    names = list(found)
    return sorted(names, key=_bucket_key) if group == "bucket" else names


def _bucket_key(subset: str) -> float:
    low = subset.split(":", 1)[1].strip("([").split(",")[0]
    try:
        return float(low)
    except ValueError:
        return math.inf


def reference_metrics(data: ReportData, suite: str) -> list[str]:
    return list(dict.fromkeys(r["metric"] for run in data.eval_runs for r in run.metrics
                              if r.get("suite") == suite and r.get("seed") == "mean"))


def suite_settings(runs: list[RunView], suite: str) -> dict[str, list[str]]:
    """Distinct data / decoding / prompt / seed settings of the runs that evaluated ``suite``."""
    settings: dict[str, dict[str, None]] = {"data": {}, "decoding": {}, "prompt": {}, "seeds": {}}
    for run in runs:
        if not any(r.get("suite") == suite and r.get("seed") == "mean" for r in run.metrics):
            continue
        config = run.config
        data = config.get("data_path") or config.get("data") or "default source (kdbench list suites)"
        limit = config.get("limit")
        settings["data"][f"{data}" + (f" (first {limit})" if limit else "")] = None
        settings["decoding"][str(config.get("decoding_summary") or _describe_decoding(config))] = None
        settings["prompt"][str(config.get("prompt_style") or "suite default")] = None
        seeds = ["greedy"] if config.get("greedy") else config.get("seeds")
        if seeds:
            settings["seeds"][",".join(str(s) for s in seeds)] = None
    return {key: list(values) for key, values in settings.items()}


def _describe_decoding(config: dict) -> str:
    decoding = config.get("decoding")
    if isinstance(decoding, dict) and decoding:
        return ", ".join(f"{k}={v}" for k, v in decoding.items())
    return "not recorded"


# ---------------------------------------------------------------------------------------------
# Training logs and costs
# ---------------------------------------------------------------------------------------------


def train_log(run: RunView) -> list[dict]:
    return read_jsonl(run.run.path / "train_log.jsonl")


def train_cost(run: RunView) -> dict:
    path = run.run.path / "cost.json"
    try:
        return json.loads(path.read_text()) if path.is_file() else {}
    except (OSError, json.JSONDecodeError):
        return {}


def row_costs(data: ReportData, label: str) -> list[dict]:
    """The training costs behind a row: its training runs' cost.json, and the cost recorded with a model
    built in the artifact cache (the demo's teacher)."""
    costs = [c for r in data.train_runs if r.label == label if (c := train_cost(r))]
    costs += [c for path, c in data.external_costs.items() if any(str(run.run.path) == path for run in data.runs_of(label))]
    return costs


def inference_speed(run: RunView) -> tuple[int, float | None]:
    """(generated tokens over all suites and seeds, tokens per second of the eval run's wall time).

    The wall time is run.json's started -> finished, so it includes model loading and scoring: a
    lower bound on the generation speed. None when the run was resumed or has no finish time.
    """
    import datetime as dt

    tokens = 0
    for file in (run.run.path / "generations").rglob("seed*.jsonl"):
        tokens += sum(int(r.get("new_tokens") or 0) for r in read_jsonl(file))
    started, finished = run.info.get("started"), run.info.get("finished")
    if not (started and finished) or run.info.get("resumed") or not tokens:
        return tokens, None
    try:
        seconds = (dt.datetime.fromisoformat(finished) - dt.datetime.fromisoformat(started)).total_seconds()
    except ValueError:
        return tokens, None
    return tokens, (tokens / seconds if seconds > 0 else None)
