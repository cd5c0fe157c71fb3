"""Open LLM Leaderboard (and other lm-eval) suites through EleutherAI's lm-evaluation-harness.

A suite is a declarative file in ``tasks/`` (``type: lm_eval``) listing lm-eval tasks, each with its
own shot count, headline metric and, for generative tasks, the named filter whose score is reported
(PROTOCOLS.md section 5). :func:`run_harness` wraps a checkpoint or an already-loaded model in
lm-eval's ``HFLM``, builds every task with its own ``num_fewshot`` and runs them all in one
``lm_eval.simple_evaluate`` call. lm-eval's global ``num_fewshot`` argument is never used: it would
override every task configured with a non-zero count (so ARC 25-shot and HellaSwag 10-shot could
not share a run).

For groups (MMLU, BBH, ...) both aggregates are kept: lm-eval's group score (size-weighted for
``mmlu``) and the unweighted mean over the group's leaf tasks (the 57 MMLU subjects, as OLL v1
averaged them); the suite file says which one goes into the Average.

lm-eval is an optional dependency (``pip install 'kdbench[harness]'``) and slow to import, so it is
imported inside functions only.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from kdbench.errors import ConfigError, DataError, KdbenchError, ModelError

if TYPE_CHECKING:  # pragma: no cover - typing only
    from kdbench.store import RunDir

INSTALL_HINT = "Install the harness extra: pip install 'kdbench[harness]'"
AVERAGE_SOURCES = ("group", "subtask_mean")
AVERAGE_METHODS = ("unweighted_mean",)
_TASK_NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$")


# ----------------------------------------------------------------------------------------------
# Suite configuration
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class HarnessTask:
    """One lm-eval task (or group) of a suite, with the settings it is reported under.

    ``metrics`` holds the headline metric name(s); with several, the headline value is their mean
    (the leaderboard's IFEval score is the mean of prompt- and instruction-level strict accuracy).
    ``filter`` names the lm-eval filter pipeline whose score is read (``"none"`` when the task has
    no filters; gsm8k has ``strict-match`` and ``flexible-extract``).
    ``average_uses`` says which number of a group enters the suite average: ``"group"`` (lm-eval's
    group aggregate) or ``"subtask_mean"`` (unweighted mean over the group's leaf tasks).
    ``random_baseline`` / ``subtask_choices`` are the Open LLM Leaderboard v2 normalization baselines.
    """

    task: str
    num_fewshot: int
    metrics: tuple[str, ...]
    filter: str = "none"
    average_uses: str = "group"
    random_baseline: float | None = None
    subtask_choices: dict[str, int] | None = field(default=None, hash=False, compare=False)

    @property
    def metric_label(self) -> str:
        """The headline metric's name in records: ``acc_norm``, or ``mean(a,b)`` for several."""
        return self.metrics[0] if len(self.metrics) == 1 else f"mean({','.join(self.metrics)})"

    def to_dict(self) -> dict:
        body: dict[str, Any] = {"task": self.task, "num_fewshot": self.num_fewshot,
                                "metric": self.metrics[0] if len(self.metrics) == 1 else list(self.metrics),
                                "filter": self.filter, "average_uses": self.average_uses}
        if self.random_baseline is not None or self.subtask_choices:
            body["normalization"] = ({"subtask_choices": dict(self.subtask_choices)} if self.subtask_choices
                                     else {"random_baseline": self.random_baseline})
        return body


@dataclass(frozen=True)
class HarnessSuite:
    """A parsed ``type: lm_eval`` suite file (see ``tasks/oll.yaml``)."""

    name: str
    description: str
    protocol: str
    tasks: tuple[HarnessTask, ...]
    average_method: str = "unweighted_mean"
    lm_eval_group: str | None = None

    def task(self, name: str) -> HarnessTask:
        for entry in self.tasks:
            if entry.task == name:
                return entry
        raise ConfigError(f"Suite {self.name!r} has no task {name!r}; its tasks are: "
                          f"{', '.join(t.task for t in self.tasks)}.")

    def to_dict(self) -> dict:
        return {"name": self.name, "description": self.description, "type": "lm_eval", "protocol": self.protocol,
                "lm_eval_group": self.lm_eval_group, "tasks": [t.to_dict() for t in self.tasks],
                "average": {"method": self.average_method}}


def _parse_task(raw: Any, suite_name: str, index: int) -> HarnessTask:
    where = f"task #{index + 1} of suite {suite_name!r}"
    if not isinstance(raw, dict) or not isinstance(raw.get("task"), str) or not raw["task"].strip():
        raise ConfigError(f"The {where} must be a mapping with a 'task' name; fix the suite file.")
    name = raw["task"].strip()
    where = f"task {name!r} of suite {suite_name!r}"
    unknown = set(raw) - {"task", "num_fewshot", "metric", "filter", "average_uses", "normalization"}
    if unknown:
        raise ConfigError(f"Unknown key(s) {', '.join(sorted(unknown))} in {where}; allowed keys are task, "
                          f"num_fewshot, metric, filter, average_uses, normalization.")
    shots = raw.get("num_fewshot")
    if isinstance(shots, bool) or not isinstance(shots, int) or shots < 0:
        raise ConfigError(f"Set num_fewshot to a non-negative integer for {where} (got {shots!r}); "
                          "each task runs with its own shot count.")
    metric = raw.get("metric")
    metrics = (metric,) if isinstance(metric, str) else tuple(metric) if isinstance(metric, list) else ()
    if not metrics or not all(isinstance(m, str) and m for m in metrics):
        raise ConfigError(f"Set metric (a name such as acc_norm, or a list of names) for {where}.")
    filter_name = raw.get("filter", "none")
    if not isinstance(filter_name, str) or not filter_name:
        raise ConfigError(f"Set filter to the name of an lm-eval filter (e.g. strict-match) for {where}.")
    average_uses = raw.get("average_uses", "group")
    if average_uses not in AVERAGE_SOURCES:
        raise ConfigError(f"Set average_uses to one of {', '.join(AVERAGE_SOURCES)} for {where} "
                          f"(got {average_uses!r}).")
    normalization = raw.get("normalization") or {}
    if not isinstance(normalization, dict) or set(normalization) - {"random_baseline", "subtask_choices"}:
        raise ConfigError(f"normalization of {where} takes random_baseline or subtask_choices only.")
    baseline = normalization.get("random_baseline")
    if baseline is not None and (isinstance(baseline, bool) or not isinstance(baseline, (int, float))
                                 or not 0.0 <= baseline < 1.0):
        raise ConfigError(f"random_baseline of {where} must be a number in [0, 1) (got {baseline!r}).")
    choices = normalization.get("subtask_choices")
    if choices is not None and (not isinstance(choices, dict) or not choices or not all(
            isinstance(n, int) and not isinstance(n, bool) and n >= 2 for n in choices.values())):
        raise ConfigError(f"subtask_choices of {where} must map subtask names to choice counts >= 2.")
    return HarnessTask(name, shots, metrics, filter_name, average_uses,
                       None if baseline is None else float(baseline), dict(choices) if choices else None)


def load_suite(suite: str | dict | HarnessSuite) -> HarnessSuite:
    """Parse a suite: a registry name (``"oll"``, a file in ``tasks/``) or the same mapping inline.

    Raises ConfigError (one sentence) for an unknown name, a suite of another type or a malformed entry.
    """
    if isinstance(suite, HarnessSuite):
        return suite
    if isinstance(suite, str):
        from kdbench import registry

        body = registry.get("tasks", suite).body
    elif isinstance(suite, dict):
        body = suite
    else:
        raise ConfigError(f"Pass the suite as a registry name or a mapping, not {type(suite).__name__}.")
    name = str(body.get("name") or "custom")
    if body.get("type") != "lm_eval":
        raise ConfigError(f"Suite {name!r} is of type {body.get('type')!r}, not lm_eval; "
                          "run it with kdbench eval instead of the lm-eval harness.")
    raw_tasks = body.get("tasks")
    if not isinstance(raw_tasks, list) or not raw_tasks:
        raise ConfigError(f"Suite {name!r} lists no tasks; add a 'tasks:' list to its file.")
    tasks = tuple(_parse_task(raw, name, i) for i, raw in enumerate(raw_tasks))
    duplicates = sorted({t.task for t in tasks if sum(u.task == t.task for u in tasks) > 1})
    if duplicates:
        raise ConfigError(f"Suite {name!r} lists {', '.join(duplicates)} more than once; keep one entry each.")
    average = body.get("average") or {}
    method = average.get("method", "unweighted_mean") if isinstance(average, dict) else average
    if method not in AVERAGE_METHODS:
        raise ConfigError(f"Suite {name!r}: average method must be one of {', '.join(AVERAGE_METHODS)} "
                          f"(got {method!r}).")
    return HarnessSuite(name, str(body.get("description", "")).strip(), str(body.get("protocol") or name),
                        tasks, method, body.get("lm_eval_group"))


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


# ----------------------------------------------------------------------------------------------
# Local lm-eval tasks (offline evaluation over JSONL files)
# ----------------------------------------------------------------------------------------------
def _check_task_name(name: str) -> None:
    if not isinstance(name, str) or not _TASK_NAME_PATTERN.match(name):
        raise ConfigError(f"Task name {name!r} must start with a letter or digit and contain only letters, digits, "
                          "'_', '-' or '.'.")


def _write_local_task(name: str, out_dir: str | os.PathLike, config: dict, splits: dict[str, list[dict]]) -> str:
    """Write ``out_dir/<name>/<name>.yaml`` and one JSONL per split; return ``out_dir`` (the include path)."""
    import yaml

    from kdbench.store import atomic_write_text

    folder = Path(out_dir).expanduser().resolve() / name
    folder.mkdir(parents=True, exist_ok=True)
    data_files = {}
    for split, rows in splits.items():
        path = folder / f"{split}.jsonl"
        atomic_write_text(path, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))
        data_files[split] = str(path)
    body = {
        "task": name,
        "dataset_path": "json",
        # a private datasets cache next to the data: nothing is written to the user's HF cache
        "dataset_kwargs": {"data_files": data_files, "cache_dir": str(folder / ".hf_datasets_cache")},
        "test_split": "test",
        **({"fewshot_split": "train", "training_split": "train"} if "train" in splits else {}),
        **config,
    }
    atomic_write_text(folder / f"{name}.yaml", yaml.safe_dump(body, sort_keys=False, allow_unicode=True))
    return str(Path(out_dir).expanduser().resolve())


def _mc_rows(records: list[dict], what: str) -> list[dict]:
    if not isinstance(records, list) or not records:
        raise DataError(f"Pass a non-empty list of {what} records (question, choices, answer).")
    rows = []
    for i, record in enumerate(records):
        question, choices, answer = (record.get(k) for k in ("question", "choices", "answer")) \
            if isinstance(record, dict) else (None, None, None)
        if not isinstance(question, str) or not question.strip():
            raise DataError(f"{what} record {i} needs a non-empty 'question' string.")
        if (not isinstance(choices, list) or len(choices) < 2
                or not all(isinstance(c, str) and c.strip() for c in choices)):
            raise DataError(f"{what} record {i} needs 'choices': a list of at least two non-empty strings.")
        if isinstance(answer, bool) or not isinstance(answer, int) or not 0 <= answer < len(choices):
            raise DataError(f"{what} record {i} needs 'answer': the index (0-{len(choices) - 1}) of the right choice.")
        rows.append({"question": question, "choices": list(choices), "answer": answer})
    return rows


def local_multiple_choice_task(name: str, records: list[dict], out_dir: str | os.PathLike, *,
                               fewshot_records: list[dict] | None = None,
                               prompt_template: str = "Question: {{question}}\nAnswer:") -> str:
    """Write an lm-eval multiple-choice task over local records; return its ``include_path``.

    Each record is ``{"question": str, "choices": [str, ...] (at least 2, e.g. 4), "answer": int}``.
    The model scores each choice as the continuation ``" " + choice`` of the rendered prompt
    (``prompt_template``, a Jinja template over the record's fields); lm-eval reports ``acc``
    (highest log-likelihood) and ``acc_norm`` (log-likelihood per character of the choice).
    ``fewshot_records`` (same shape) become the split few-shot examples are drawn from; without
    them, lm-eval draws them from the test records themselves.
    Pass the returned folder as ``run_harness(..., include_path=...)``; several tasks may share it.
    """
    _check_task_name(name)
    splits = {"test": _mc_rows(records, "Multiple-choice")}
    if fewshot_records:
        splits["train"] = _mc_rows(fewshot_records, "Few-shot")
    config = {
        "output_type": "multiple_choice",
        "doc_to_text": prompt_template,
        "doc_to_choice": "{{choices}}",
        "doc_to_target": "answer",
        "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True},
                        {"metric": "acc_norm", "aggregation": "mean", "higher_is_better": True}],
        "metadata": {"version": 1.0, "source": "kdbench.harness.local_multiple_choice_task"},
    }
    return _write_local_task(name, out_dir, config, splits)


def local_generation_task(name: str, records: list[dict], out_dir: str | os.PathLike, *,
                          until: tuple[str, ...] | list[str] = ("\n",), max_gen_toks: int = 32,
                          filters: dict[str, str] | None = None, prompt_template: str = "{{prompt}}") -> str:
    """Write an lm-eval greedy-generation task scored by exact match; return its ``include_path``.

    Each record is ``{"prompt": str, "answer": str}``. Generation stops at any string of ``until`` or
    after ``max_gen_toks`` tokens. ``filters`` maps a filter name to a regex: the first match (first
    group if the regex has one, stripped) is compared with the answer, ``"[invalid]"`` when nothing
    matches - like lm-eval's gsm8k ``strict-match``. Without ``filters`` the raw completion is
    compared (filter ``none``).
    """
    _check_task_name(name)
    if not isinstance(records, list) or not records:
        raise DataError("Pass a non-empty list of generation records (prompt, answer).")
    rows = []
    for i, record in enumerate(records):
        if not isinstance(record, dict) or not isinstance(record.get("prompt"), str) \
                or not isinstance(record.get("answer"), str):
            raise DataError(f"Generation record {i} needs string fields 'prompt' and 'answer'.")
        rows.append({"prompt": record["prompt"], "answer": record["answer"]})
    if isinstance(max_gen_toks, bool) or not isinstance(max_gen_toks, int) or max_gen_toks < 1:
        raise ConfigError(f"max_gen_toks must be a positive integer (got {max_gen_toks!r}).")
    config: dict[str, Any] = {
        "output_type": "generate_until",
        "doc_to_text": prompt_template,
        "doc_to_target": "{{answer}}",
        "generation_kwargs": {"until": list(until), "do_sample": False, "max_gen_toks": max_gen_toks},
        "metric_list": [{"metric": "exact_match", "aggregation": "mean", "higher_is_better": True}],
        "metadata": {"version": 1.0, "source": "kdbench.harness.local_generation_task"},
    }
    if filters:
        for filter_name, pattern in filters.items():
            try:
                re.compile(pattern)
            except re.error as err:
                raise ConfigError(f"Filter {filter_name!r} has an invalid regex ({err}); fix the pattern.") from None
        config["filter_list"] = [
            {"name": filter_name, "filter": [{"function": "regex", "regex_pattern": pattern},
                                              {"function": "take_first"}]}
            for filter_name, pattern in filters.items()]
    return _write_local_task(name, out_dir, config, {"test": rows})


# ----------------------------------------------------------------------------------------------
# Running
# ----------------------------------------------------------------------------------------------
def _import_lm_eval():
    """``lm_eval`` or a KdbenchError telling how to install it."""
    try:
        import lm_eval
        import lm_eval.models.huggingface  # noqa: F401 - HFLM, imported here so a broken install fails early
        import lm_eval.tasks  # noqa: F401
    except ImportError:
        raise KdbenchError(f"{INSTALL_HINT} (lm-eval is not installed or cannot be imported).") from None
    return lm_eval


def lm_eval_version() -> str:
    """The installed lm-eval version (KdbenchError with the install hint when it is missing)."""
    lm_eval = _import_lm_eval()
    version = getattr(lm_eval, "__version__", None)
    if version:
        return str(version)
    from importlib.metadata import version as dist_version

    return dist_version("lm_eval")


_TASK_MANAGERS: dict[tuple, Any] = {}


def task_manager(include_path: str | os.PathLike | list | None = None, *, include_defaults: bool = True):
    """A cached ``lm_eval.tasks.TaskManager`` (indexing lm-eval's ~15k task files takes ~10 s)."""
    _import_lm_eval()
    from lm_eval.tasks import TaskManager

    paths = None
    if include_path is not None:
        raw = include_path if isinstance(include_path, (list, tuple)) else [include_path]
        paths = tuple(str(Path(p).expanduser().resolve()) for p in raw)
        for path in paths:
            if not Path(path).is_dir():
                raise DataError(f"Task folder {path} does not exist; pass the include_path returned by "
                                "local_multiple_choice_task or a folder of lm-eval task YAML files.")
    key = (paths, include_defaults)
    if key not in _TASK_MANAGERS:
        _TASK_MANAGERS[key] = TaskManager(include_path=list(paths) if paths else None,
                                          include_defaults=include_defaults)
    return _TASK_MANAGERS[key]


def _manager_for(names: list[str], include_path, suite_name: str):
    """The smallest TaskManager that knows every name (local-only when the include path has them all)."""
    if include_path is not None:
        local = task_manager(include_path, include_defaults=False)
        if all(name in local.task_index for name in names):
            return local
    manager = task_manager(include_path)
    for name in names:
        if name not in manager.task_index:
            raise ConfigError(f"Unknown lm-eval task {name!r} in suite {suite_name!r}; check the name with "
                              "`lm-eval ls tasks`, or pass include_path= for a local task folder.")
    return manager


def _download_errors() -> tuple[type[BaseException], ...]:
    """Exception types meaning "the dataset could not be fetched" across datasets/hub versions."""
    errors: list[type[BaseException]] = [ConnectionError, TimeoutError]
    for module_name, names in (("huggingface_hub.errors", ("HfHubHTTPError", "OfflineModeIsEnabled",
                                                          "LocalEntryNotFoundError")),
                               ("datasets.exceptions", ("DatasetNotFoundError",)),
                               ("requests.exceptions", ("RequestException",)),
                               ("httpx", ("TransportError", "HTTPStatusError"))):
        try:
            module = __import__(module_name, fromlist=list(names))
        except ImportError:
            continue
        errors.extend(getattr(module, n) for n in names if isinstance(getattr(module, n, None), type))
    return tuple(errors)


def _load_tasks(manager, entry: HarnessTask, suite_name: str):
    """Build the lm-eval Task/Group objects of one suite entry, each leaf set to the entry's shot count.

    Returns ``(top-level objects, {leaf name: Task}, group or None)``. Datasets are fetched here.
    """
    try:
        loaded = manager.load([entry.task])
    except _download_errors() as err:
        reason = str(err).strip().splitlines()[0][:200] if str(err).strip() else type(err).__name__
        raise DataError(f"The dataset of lm-eval task {entry.task!r} could not be downloaded ({reason}); check the "
                        "internet connection, or pre-download it on a connected machine and set "
                        "HF_DATASETS_OFFLINE=1.") from None
    except FileNotFoundError as err:
        raise DataError(f"A data file of lm-eval task {entry.task!r} is missing ({err}); "
                        "re-create the task folder or fix its data_files.") from None
    leaves = loaded["tasks"]
    for leaf in leaves.values():
        # per task, never through simple_evaluate's global num_fewshot (see module docstring)
        leaf.set_config(key="num_fewshot", value=entry.num_fewshot)
    group = loaded.get("groups", {}).get(entry.task)
    if group is not None:
        tops = [group]
    elif entry.task in leaves:
        tops = [leaves[entry.task]]
    else:  # a tag: a bare list of tasks
        tops = list(leaves.values())
    return tops, leaves, group


def _check_metrics(entry: HarnessTask, leaves: dict, group, suite_name: str) -> None:
    """Fail before the (long) evaluation when a metric or filter does not exist."""
    for leaf_name, leaf in leaves.items():
        available = set(leaf.aggregation())
        filter_list = leaf.config.filter_list
        filters = {f["name"] for f in filter_list} if filter_list else {"none"}
        for metric in entry.metrics:
            if metric not in available:
                raise ConfigError(f"lm-eval task {leaf_name!r} (suite {suite_name!r}) has no metric {metric!r}; "
                                  f"it reports: {', '.join(sorted(available))}.")
        if entry.filter not in filters:
            raise ConfigError(f"lm-eval task {leaf_name!r} (suite {suite_name!r}) has no filter {entry.filter!r}; "
                              f"name one of: {', '.join(sorted(filters))}.")
    if group is not None:
        aggregated = {agg.metric for agg in (group.aggregate_metric_list or [])}
        for metric in entry.metrics:
            if metric not in aggregated:
                raise ConfigError(f"lm-eval group {entry.task!r} (suite {suite_name!r}) does not aggregate "
                                  f"{metric!r}; it aggregates: {', '.join(sorted(aggregated)) or 'nothing'}.")


def _number(value: Any) -> float | None:
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
        return float(value)
    return None


def _score(entry: HarnessTask, leaves: dict, group, results: dict) -> TaskScore:
    """Read one suite entry's numbers from lm-eval's results dict."""
    per_task = results["results"]
    row = per_task.get(entry.task, {})
    n_samples = results.get("n-samples", {})
    leaf_n = {name: int(n_samples[name]["effective"]) for name in leaves if name in n_samples}

    def headline(values_row: dict) -> tuple[float | None, dict[str, float]]:
        components = {m: _number(values_row.get(f"{m},{entry.filter}")) for m in entry.metrics}
        if any(v is None for v in components.values()):
            return None, {}
        return math.fsum(components.values()) / len(components), components

    if group is None and len(leaves) > 1:  # a tag: no lm-eval aggregate, so mean over its tasks
        leaf_scores = {name: headline(per_task.get(name, {}))[0] for name in leaves}
        value, components, stderr = None, {}, None
        if all(v is not None for v in leaf_scores.values()):
            value = math.fsum(leaf_scores.values()) / len(leaf_scores)
    else:
        value, components = headline(row)
        stderr = _number(row.get(f"{entry.metrics[0]}_stderr,{entry.filter}")) if len(entry.metrics) == 1 else None
    if value is None:
        reported = sorted(k for k in row if "," in k and "_stderr" not in k)
        raise ConfigError(f"lm-eval reported no {entry.metric_label} with filter {entry.filter!r} for task "
                          f"{entry.task!r}; it reported: {', '.join(reported) or 'nothing'}.")
    subtasks: dict[str, float] = {}
    if len(leaves) > 1 or group is not None:
        for name in leaves:
            leaf_value = headline(per_task.get(name, {}))[0]
            if leaf_value is not None:
                subtasks[name] = leaf_value
    n = sum(leaf_n.values()) if leaf_n else None
    return TaskScore(
        task=entry.task, metric=entry.metric_label, value=value, stderr=stderr, n=n,
        num_fewshot=entry.num_fewshot, filter=entry.filter, average_uses=entry.average_uses,
        components=components if len(components) > 1 else {}, subtasks=subtasks,
        subtask_n={k: v for k, v in leaf_n.items() if k in subtasks},
        subtask_mean=(math.fsum(subtasks.values()) / len(subtasks)) if subtasks else None,
    )


def _json_safe(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    return str(value)


def _rng_state():
    import random

    import numpy as np
    import torch

    return random.getstate(), np.random.get_state(), torch.get_rng_state()


def _restore_rng_state(state) -> None:
    import random

    import numpy as np
    import torch

    random.setstate(state[0])
    np.random.set_state(state[1])
    torch.set_rng_state(state[2])


def run_harness(model, tokenizer=None, *, suite: str | dict, limit: int | float | None = None, batch_size: int = 8,
                device: str = "cpu", include_path: str | os.PathLike | list | None = None,
                log: Callable[[str], Any] | None = None) -> HarnessResult:
    """Evaluate ``model`` on an lm-eval suite, every task with its own shot count.

    ``model`` is a checkpoint directory (loaded by lm-eval's ``HFLM`` on ``device``) or an already
    loaded ``transformers.PreTrainedModel`` (kept on its own device; ``tokenizer`` is then required).
    A model in train mode is evaluated in eval mode and put back in train mode afterwards; the
    global random states (which lm-eval reseeds) and the tokenizer's pad token (which lm-eval may
    set) are restored too. ``limit`` caps documents per task (testing only: the numbers are then not
    the leaderboard's). ``include_path`` adds folders of lm-eval task YAML (e.g. from
    :func:`local_multiple_choice_task`). ``log`` receives progress lines (e.g. ``RunDir.log``).

    Raises KdbenchError (one sentence, no traceback) when lm-eval is missing, a task name is
    unknown, a dataset cannot be downloaded, or the model path does not exist.
    """
    spec = load_suite(suite)
    lm_eval = _import_lm_eval()
    version = lm_eval_version()
    from lm_eval.models.huggingface import HFLM

    say = log or (lambda message: None)
    pretrained_model = not isinstance(model, (str, os.PathLike))
    if pretrained_model:
        if tokenizer is None:
            raise ConfigError("Pass the tokenizer together with an already-loaded model: "
                              "run_harness(model, tokenizer, suite=...).")
        if not callable(getattr(model, "forward", None)) or not hasattr(model, "config"):
            raise ModelError(f"run_harness needs a checkpoint directory or a transformers PreTrainedModel, "
                             f"not {type(model).__name__}.")
    elif not Path(model).expanduser().is_dir():
        raise ModelError(f"Model directory not found: {model}; pass a checkpoint directory (config.json and "
                         "weights) or an already-loaded model with its tokenizer.")

    manager = _manager_for([t.task for t in spec.tasks], include_path, spec.name)
    loaded = []
    for entry in spec.tasks:
        say(f"harness: loading lm-eval task {entry.task} ({entry.num_fewshot}-shot)")
        tops, leaves, group = _load_tasks(manager, entry, spec.name)
        _check_metrics(entry, leaves, group, spec.name)
        loaded.append((entry, tops, leaves, group))

    was_training = bool(getattr(model, "training", False)) if pretrained_model else False
    restore_pad = tokenizer is not None and not isinstance(tokenizer, (str, os.PathLike))
    old_pad_token = getattr(tokenizer, "pad_token", None) if restore_pad else None
    rng = _rng_state()
    if pretrained_model:
        model.eval()
    try:
        if pretrained_model:
            lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
        else:
            lm = HFLM(pretrained=str(Path(model).expanduser()), tokenizer=tokenizer, batch_size=batch_size,
                      device=device)
        say(f"harness: running {len(spec.tasks)} task(s) of suite {spec.name} with lm-eval {version}")
        results = lm_eval.simple_evaluate(
            model=lm, tasks=[top for _, tops, _, _ in loaded for top in tops], task_manager=manager,
            limit=limit, log_samples=False, batch_size=batch_size)
    finally:
        _restore_rng_state(rng)
        if pretrained_model and was_training:
            model.train()
        if restore_pad and getattr(tokenizer, "pad_token", None) != old_pad_token:
            tokenizer.pad_token = old_pad_token  # lm-eval sets a pad token on the caller's tokenizer
    if results is None:  # pragma: no cover - only non-zero ranks get None
        raise KdbenchError("lm-eval returned no results (not the main process); run kdbench on one process.")

    scores = {entry.task: _score(entry, leaves, group, results) for entry, _, leaves, group in loaded}
    averages = suite_averages(scores)
    raw = {key: _json_safe(results.get(key)) for key in
           ("results", "groups", "group_subtasks", "n-shot", "n-samples", "versions", "higher_is_better")}
    raw["config"] = _json_safe({k: v for k, v in (results.get("config") or {}).items()})
    result = HarnessResult(spec, version, scores, averages, limit, raw)
    say(f"harness: {result.label}: average {averages['average']:.4f}")
    return result
