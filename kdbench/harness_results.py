"""lm-eval results in kdbench's terms: per-task scores, suite averages, leaderboard-v2 normalization, and the
long-format metric records of a run directory."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from kdbench.errors import ConfigError
from kdbench.harness_suite import HarnessSuite

if TYPE_CHECKING:  # pragma: no cover - typing only
    from kdbench.store import RunDir


# ----------------------------------------------------------------------------------------------
# Results
# ----------------------------------------------------------------------------------------------
@dataclass
class TaskScore:
    """One suite task's result.

    ``value`` is the headline metric (lm-eval's number for a task; its group aggregate for a group),
    ``subtasks`` the headline metric of each leaf task of a group (empty for a single task) and
    ``subtask_mean`` their unweighted mean. ``n`` counts evaluated documents (summed over leaves).
    """

    task: str
    metric: str
    value: float
    stderr: float | None
    n: int | None
    num_fewshot: int
    filter: str
    average_uses: str = "group"
    components: dict[str, float] = field(default_factory=dict)
    subtasks: dict[str, float] = field(default_factory=dict)
    subtask_n: dict[str, int] = field(default_factory=dict)
    subtask_mean: float | None = None

    @property
    def value_in_average(self) -> float:
        """The number this task contributes to the suite average."""
        if self.average_uses == "subtask_mean":
            if self.subtask_mean is None:
                raise ConfigError(f"Task {self.task!r} has no subtasks, so average_uses: subtask_mean cannot apply; "
                                  "use average_uses: group.")
            return self.subtask_mean
        return self.value


@dataclass
class HarnessResult:
    """Scores of one suite run, plus lm-eval's raw results (without per-sample logs)."""

    suite: HarnessSuite
    lm_eval_version: str
    tasks: dict[str, TaskScore]
    averages: dict[str, float]
    limit: int | float | None = None
    raw: dict = field(default_factory=dict, repr=False)

    @property
    def label(self) -> str:
        """E.g. ``"OLL-v1 protocol via lm-eval 0.4.13"``."""
        return f"{self.suite.protocol} protocol via lm-eval {self.lm_eval_version}"

    def normalized(self) -> dict[str, float]:
        """Open LLM Leaderboard v2 normalized scores (0-100); see :func:`leaderboard_normalized_scores`."""
        return leaderboard_normalized_scores(self)

    def to_metric_records(self, run: "RunDir", suite_name: str | None = None, *, include_subtasks: bool = False,
                          normalized: bool = False) -> list[dict]:
        """kdbench long-format metric records (``RunDir.metric_record``), one per task and average.

        Per task: the headline metric (``subset`` = task name, with ``n``, ``stderr``, ``num_fewshot``,
        ``filter``); for a group also ``<metric>_subtask_mean`` (unweighted over leaves); each record
        says with ``in_average`` whether it entered the Average. ``include_subtasks`` adds one record
        per leaf (``subset`` = ``group/leaf``); ``normalized`` adds the leaderboard-v2 normalized
        scores (``normalized_score``, 0-100) and their average.
        """
        suite_name = suite_name or self.suite.name
        common = {"harness": self.label}
        if self.limit is not None:
            common["limit"] = self.limit
        records = []
        for score in self.tasks.values():
            setting = {"num_fewshot": score.num_fewshot, "filter": score.filter, **common}
            records.append(run.metric_record(
                suite_name, score.metric, score.value, seed=None, subset=score.task, n=score.n,
                stderr=score.stderr, in_average=score.average_uses == "group", **setting))
            for component, value in score.components.items():
                records.append(run.metric_record(suite_name, component, value, seed=None, subset=score.task,
                                                 n=score.n, in_average=False, **setting))
            if score.subtask_mean is not None:
                records.append(run.metric_record(
                    suite_name, f"{score.metric}_subtask_mean", score.subtask_mean, seed=None, subset=score.task,
                    n=score.n, in_average=score.average_uses == "subtask_mean", subtasks=len(score.subtasks),
                    **setting))
            if include_subtasks:
                for leaf, value in score.subtasks.items():
                    records.append(run.metric_record(suite_name, score.metric, value, seed=None,
                                                     subset=f"{score.task}/{leaf}", n=score.subtask_n.get(leaf),
                                                     in_average=False, **setting))
        for metric, value in self.averages.items():
            records.append(run.metric_record(suite_name, metric, value, seed=None, subset="all",
                                             n=len(self.tasks), method=self.suite.average_method, **common))
        if normalized:
            scores = self.normalized()
            for task, value in scores.items():
                metric, subset = ("normalized_average", "all") if task == "average" else ("normalized_score", task)
                records.append(run.metric_record(suite_name, metric, value, seed=None, subset=subset, **common))
        return records

    def to_dict(self) -> dict:
        """JSON-ready summary (suite settings, per-task scores, averages, lm-eval raw results)."""
        return {
            "label": self.label, "lm_eval_version": self.lm_eval_version, "limit": self.limit,
            "suite": self.suite.to_dict(),
            "tasks": {name: dict(vars(score)) for name, score in self.tasks.items()},
            "averages": dict(self.averages), "raw": self.raw,
        }


def subtask_averages(subtask_results: dict[str, tuple[float, int]]) -> dict[str, float]:
    """Both aggregates of a group from its leaves' ``{name: (score, n_documents)}``.

    Returns ``{"size_weighted": sum(score_i n_i) / sum(n_i), "unweighted": mean(score_i)}``: the first
    is what lm-eval 0.4's ``mmlu`` group reports, the second OLL v1's MMLU (mean over 57 subjects).
    """
    if not subtask_results:
        raise ConfigError("A group needs at least one subtask result to average.")
    total_n = sum(n for _, n in subtask_results.values())
    if total_n <= 0:
        raise ConfigError("Subtask sizes must add up to a positive number of documents.")
    return {
        "size_weighted": math.fsum(score * n for score, n in subtask_results.values()) / total_n,
        "unweighted": math.fsum(score for score, _ in subtask_results.values()) / len(subtask_results),
    }


def suite_averages(scores: dict[str, TaskScore]) -> dict[str, float]:
    """``{"average": unweighted mean over tasks}``, each task contributing its ``value_in_average``
    (the OLL v1 Average: mean of the six scores, MMLU as its unweighted subject mean)."""
    if not scores:
        raise ConfigError("A suite needs at least one task score to average.")
    return {"average": math.fsum(score.value_in_average for score in scores.values()) / len(scores)}


def normalize_to_random_baseline(score: float, random_baseline: float) -> float:
    """The Open LLM Leaderboard v2 rescaling of a 0-1 score: 0 at the random baseline, 100 at 1.

    Scores at or below the baseline map to 0 (the leaderboard clips them), e.g. GPQA (4 choices,
    baseline 0.25): 0.40 -> 20.0.
    """
    if not 0.0 <= random_baseline < 1.0:
        raise ConfigError(f"A random baseline must lie in [0, 1) (got {random_baseline}).")
    if score <= random_baseline:
        return 0.0
    return 100.0 * (score - random_baseline) / (1.0 - random_baseline)


def leaderboard_normalized_scores(result: HarnessResult) -> dict[str, float]:
    """Open LLM Leaderboard v2 normalized scores (0-100) of a harness result, plus their ``average``.

    A task with ``subtask_choices`` (BBH, MuSR) is normalized per subtask with baseline
    1/choices and then averaged unweighted; a task with ``random_baseline`` (GPQA 0.25, MMLU-Pro 0.1,
    MATH 0, IFEval 0) normalizes its headline score. The leaderboard's Average is the unweighted mean
    of these six numbers.
    """
    normalized: dict[str, float] = {}
    for entry in result.suite.tasks:
        score = result.tasks.get(entry.task)
        if score is None:
            continue
        if entry.subtask_choices:
            missing = sorted(set(entry.subtask_choices) - set(score.subtasks))
            if missing:
                raise ConfigError(f"Task {entry.task!r} has no result for subtask(s) {', '.join(missing)}; "
                                  "its normalization needs every subtask listed in subtask_choices.")
            normalized[entry.task] = math.fsum(
                normalize_to_random_baseline(score.subtasks[leaf], 1.0 / choices)
                for leaf, choices in entry.subtask_choices.items()) / len(entry.subtask_choices)
        elif entry.random_baseline is not None:
            normalized[entry.task] = normalize_to_random_baseline(score.value, entry.random_baseline)
        else:
            raise ConfigError(f"Suite {result.suite.name!r} gives no random baseline for task {entry.task!r}; "
                              "leaderboard normalization needs a normalization entry for every task (see oll-v2).")
    if normalized:
        normalized["average"] = math.fsum(normalized.values()) / len(normalized)
    return normalized
