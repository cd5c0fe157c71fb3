"""lm-eval suite files (``type: lm_eval`` in ``tasks/``): parsed into :class:`HarnessSuite` / :class:`HarnessTask`.

A suite lists lm-eval tasks, each with its own shot count, headline metric, filter and (for the Open LLM
Leaderboard v2) normalization baselines; see ``tasks/oll.yaml``. :func:`load_harness_suite` accepts a registry name,
a mapping, or a path to a suite file (validated like a registry file; its ``include_path`` is resolved
relative to the file).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kdbench.errors import ConfigError

AVERAGE_SOURCES = ("group", "subtask_mean")
AVERAGE_METHODS = ("unweighted_mean",)
TASK_NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$")


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
    include_path: tuple[str, ...] = ()  # folders of local lm-eval task YAML (absolute)

    def task(self, name: str) -> HarnessTask:
        for entry in self.tasks:
            if entry.task == name:
                return entry
        raise ConfigError(f"Suite {self.name!r} has no task {name!r}; its tasks are: "
                          f"{', '.join(t.task for t in self.tasks)}.")

    def to_dict(self) -> dict:
        body = {"name": self.name, "description": self.description, "type": "lm_eval", "protocol": self.protocol,
                "lm_eval_group": self.lm_eval_group, "tasks": [t.to_dict() for t in self.tasks],
                "average": {"method": self.average_method}}
        if self.include_path:
            body["include_path"] = list(self.include_path)
        return body


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


def is_suite_file(suite) -> bool:
    """Whether ``suite`` names a suite file (``.yaml`` / ``.yml``, or an existing file) rather than a registry name."""
    if isinstance(suite, os.PathLike):
        return True
    return isinstance(suite, str) and (suite.endswith((".yaml", ".yml")) or Path(suite).expanduser().is_file())


def read_suite_file(path: str | os.PathLike) -> dict:
    """A suite file's body, validated like a registry task file (unknown keys are one sentence naming the
    file and key); its ``include_path`` folders are made absolute relative to the file."""
    import yaml

    from kdbench.registry_schemas import TASKS

    path = Path(path).expanduser()
    if not path.is_file():
        raise ConfigError(f"Suite file {path} does not exist; pass a suite name (kdbench list suites) or a task file.")
    try:
        body = yaml.safe_load(path.read_text(encoding="utf-8-sig")) or {}
    except (yaml.YAMLError, UnicodeDecodeError) as err:
        raise ConfigError(f"Suite file {path} is not valid YAML ({str(err).splitlines()[0]}); fix it.") from None
    TASKS.validate(body, path)
    raw = body.get("include_path") or []
    folders = [raw] if isinstance(raw, str) else list(raw)
    body = {**body, "name": body.get("name") or path.stem,
            "include_path": [str((path.parent / Path(folder).expanduser()).resolve()) for folder in folders]}
    return body


def load_harness_suite(suite: str | os.PathLike | dict | HarnessSuite) -> HarnessSuite:
    """Parse a suite: a registry name (``"oll"``, a file in ``tasks/``), a path to a suite file, or the same
    mapping inline.

    Raises ConfigError (one sentence) for an unknown name, a suite of another type or a malformed entry.
    """
    if isinstance(suite, HarnessSuite):
        return suite
    if is_suite_file(suite):
        body = read_suite_file(suite)
    elif isinstance(suite, str):
        from kdbench import registry

        body = registry.get("tasks", suite).body
    elif isinstance(suite, dict):
        body = suite
    else:
        raise ConfigError(f"Pass the suite as a registry name, a file or a mapping, not {type(suite).__name__}.")
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
    raw_include = body.get("include_path") or []
    include = tuple(str(p) for p in ([raw_include] if isinstance(raw_include, str) else raw_include))
    return HarnessSuite(name, str(body.get("description", "")).strip(), str(body.get("protocol") or name),
                        tasks, method, body.get("lm_eval_group"), include)
