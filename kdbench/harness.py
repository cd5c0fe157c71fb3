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

import math
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from kdbench.errors import ConfigError, DataError, KdbenchError, ModelError
from kdbench.harness_results import (HarnessResult, TaskScore, leaderboard_normalized_scores,  # noqa: F401
                                     normalize_to_random_baseline, subtask_averages, suite_averages)
from kdbench.harness_suite import (AVERAGE_METHODS, AVERAGE_SOURCES, HarnessSuite, HarnessTask,  # noqa: F401
                                   load_harness_suite)
from kdbench.harness_tasks import local_generation_task, local_multiple_choice_task  # noqa: F401

if TYPE_CHECKING:  # pragma: no cover - typing only
    from kdbench.store import RunDir

INSTALL_HINT = "Install the harness extra: pip install 'kdbench[harness]'"


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
                log: Callable[[str], Any] | None = None, backend: str = "transformers") -> HarnessResult:
    """Evaluate ``model`` on an lm-eval suite, every task with its own shot count.

    ``model`` is a checkpoint directory (loaded by lm-eval's ``HFLM`` on ``device``) or an already
    loaded ``transformers.PreTrainedModel`` (kept on its own device; ``tokenizer`` is then required).
    A model in train mode is evaluated in eval mode and put back in train mode afterwards; the
    global random states (which lm-eval reseeds) and the tokenizer's pad token (which lm-eval may
    set) are restored too. ``limit`` caps documents per task (testing only: the numbers are then not
    the leaderboard's). ``include_path`` adds folders of lm-eval task YAML (e.g. from
    :func:`local_multiple_choice_task`). ``log`` receives progress lines (e.g. ``RunDir.log``).
    ``backend="vllm"`` runs a checkpoint directory through lm-eval's own ``vllm`` model type (GPU).

    Raises KdbenchError (one sentence, no traceback) when lm-eval is missing, a task name is
    unknown, a dataset cannot be downloaded, or the model path does not exist.
    """
    spec = load_harness_suite(suite)
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
    if backend != "transformers":
        from kdbench.inference import check_backend

        check_backend(backend)
        if pretrained_model:
            raise ConfigError(f"The {backend} backend loads the model itself: pass a checkpoint directory.")

    include = [str(Path(p).expanduser()) for p in
               ([] if include_path is None else include_path if isinstance(include_path, (list, tuple)) else [include_path])]
    include += [p for p in spec.include_path if p not in include]
    manager = _manager_for([t.task for t in spec.tasks], include or None, spec.name)
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
        if backend == "vllm":
            from lm_eval.models.vllm_causallms import VLLM

            lm = VLLM(pretrained=str(Path(model).expanduser()), batch_size="auto")
        elif pretrained_model:
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


def harness_into_run(run: "RunDir", model, tokenizer=None, *, suite: str | os.PathLike | dict | HarnessSuite,
                     suite_name: str | None = None, limit: int | float | None = None, batch_size: int = 8,
                     device: str = "cpu", include_path=None, log: Callable[[str], Any] | None = None,
                     backend: str = "transformers") -> HarnessResult:
    """The one lm-eval -> run directory path: :func:`run_harness`, then the suite's records written into
    ``run``'s ``metrics.jsonl`` (replacing that suite's earlier records; suite = ``suite_name`` or its name)."""
    result = run_harness(model, tokenizer, suite=suite, limit=limit, batch_size=batch_size, device=device,
                         include_path=include_path, log=log, backend=backend)
    name = suite_name or result.suite.name
    run.write_metrics(result.to_metric_records(run, name), replace_suite=name)
    return result


def evaluate_harness(model: str, suite: str | os.PathLike | dict, *, output_dir: str | os.PathLike = "runs",
                     run_name: str | None = None, label: str | None = None, limit: int | float | None = None,
                     batch_size: int = 8, include_path=None, log: Callable[[str], Any] | None = None,
                     command: list[str] | None = None, backend: str = "transformers") -> tuple["RunDir", HarnessResult]:
    """``kdbench eval`` for an lm-eval suite (a registry name or a suite file): an eval run directory
    ``output_dir/run_name`` (default ``eval-<suite>-<label>``) with the suite's records; the suite, the task
    folders and the model are checked before the run directory is created, and a run that stops with an
    error is marked failed."""
    import sys

    from kdbench.models import load_tokenizer, resolve_model_path
    from kdbench.store import RunDir

    spec = load_harness_suite(suite)
    if backend != "transformers":
        from kdbench.inference import check_backend

        check_backend(backend)  # a missing vLLM: one sentence before any run directory exists
    for folder in ([] if include_path is None else include_path if isinstance(include_path, (list, tuple))
                   else [include_path]):
        if not Path(folder).expanduser().is_dir():
            raise DataError(f"--include-path {folder} is not a folder; pass a folder of lm-eval task YAML files.")
    path = resolve_model_path(model)  # a missing folder or damaged weights: one sentence before any run exists
    load_tokenizer(path)
    label = label or Path(str(model)).name
    run = RunDir.create(output_dir, run_name or f"eval-{spec.name}-{label}", kind="eval", command=command or sys.argv,
                        config={"suite": spec.name, "suite_file": str(suite) if not isinstance(suite, (str, dict))
                                or str(suite).endswith((".yaml", ".yml")) else None,
                                "model": str(model), "limit": limit, "batch_size": batch_size, "label": label,
                                "include_path": [str(p) for p in (include_path or [])] + list(spec.include_path)})
    try:
        result = harness_into_run(run, path, suite=spec, limit=limit, batch_size=batch_size,
                                  include_path=include_path, log=log, backend=backend)
    except BaseException as err:
        run.finish("failed", error=str(err)[:500] or type(err).__name__)
        raise
    run.finish("complete", suite=spec.name, label=label, harness=result.label)
    return run, result
