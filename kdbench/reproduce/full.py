"""``kdbench reproduce NAME --scale full``: the table on the paper's checkpoints and data.

Per pair (its own folder under ``--out``): the checkpoints at their pinned revisions (``huggingface_hub``'s
cache; a ``hub`` that names a local folder is used as a mirror), the training data file at its pinned
revision, the pruned student (``student_keep``, :func:`kdbench.students.derive_student`), the preparation
stages (``sft``, trained once and resumable), then every available row for each training seed through
:func:`kdbench.train.train` with the row's ``settings`` and ``params``, and its evaluation on the table's
reference suites through :func:`kdbench.evaluate.evaluate_many` (the suites' own pinned data). Every run is a
run directory: rerunning resumes an unfinished one and returns a finished one as it is.

Judged benchmarks (MT-Bench, AlpacaEval) of every evaluated model go through the judging library
(:mod:`kdbench.reproduce.judged`); the OLL suites through lm-eval as ``kdbench eval --suite oll`` does
(:mod:`kdbench.reproduce.harnessed`). Benchmarks this version cannot run at full scale (the pairwise ω, whose
in-domain prompts the tables do not pin) are listed as "not run".
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from kdbench.errors import ConfigError
from kdbench.reproduce.fetch import fetch_data, fetch_model
from kdbench.reproduce.layout import eval_dir, slug, train_dir
from kdbench.reproduce.table import Pair, Table


def check_full_inputs(table: Table) -> None:
    """Before any work: every dataset a pair trains on must be one file in kdbench's format (``file``), and a
    judged table needs the judge's API key."""
    for pair in table.pairs:
        used = [pair.data] + [p.get("data", pair.data) for p in table.preparation] + [r.data for r in table.rows if r.data]
        for key in dict.fromkeys(used):
            if not table.datasets[key].get("file"):
                raise ConfigError(f"Dataset {key} ({table.datasets[key]['hub']}) of reproduction {table.name} names no "
                                  "file in kdbench's training format, so it cannot be trained on as it is; convert it to "
                                  "JSONL (instruction, input, output or chosen / rejected) and set its file.")
    from kdbench.reproduce.judged import check_judge_configuration

    check_judge_configuration(table)


def _prune(teacher: str, target: Path, keep: float) -> str:
    from transformers import AutoConfig

    from kdbench.students import derive_student

    if (target / "config.json").is_file():
        return str(target)
    layers = max(1, round(keep * AutoConfig.from_pretrained(teacher).num_hidden_layers))
    return str(derive_student(teacher, target, layers=layers))


def run_pair(table: Table, pair: Pair, out: Path, cache_dir: Path | None, *, log: Callable[[str], None],
             progress: bool) -> dict:
    """Prepare, train and evaluate every available row of ``pair``; returns {row label: {"reference":
    {training seed: per-example scores averaged over generation seeds}}}."""
    from kdbench.config import build
    from kdbench.evaluate import EvalConfig, evaluate_many
    from kdbench.generate import DecodingConfig
    from kdbench.train import TrainConfig, train

    command = ["kdbench", "reproduce", table.name, "--scale", "full"]
    base = out / slug(pair.name)
    say = log
    prepared = {"teacher": fetch_model(table.models[pair.teacher]), "student": fetch_model(table.models[pair.student])}
    if pair.student_keep:
        prepared["student"] = _prune(prepared["teacher"], base / "prep" / "pruned-student", pair.student_keep)
    cache = str(cache_dir) if cache_dir else None
    for prep in table.preparation:
        data = fetch_data(table.datasets[prep.get("data", pair.data)])
        config = build(TrainConfig, {**(prep.get("settings") or {}), "method": "sft", "student": prepared[prep["of"]],
                                     "data": data, "output_dir": str(base / "prep"), "run_name": prep["name"], "seed": 0,
                                     "cache_dir": cache}, prefix=f"preparation {prep['name']}'s settings")
        say(f"{pair.name}: preparation {prep['name']}")
        prepared[prep["name"]] = str(train(config, log=say, command=command, progress=progress).model_dir)
        prepared[prep["of"]] = prepared[prep["name"]]  # the teacher / student "as prepared"
    decoding = DecodingConfig(**table.eval["decoding"])
    seeds = list(table.eval["seeds"]) or [0]
    suites = [b.suite for b in table.benchmarks if b.kind == "reference"]
    scores: dict = {}

    evaluated: list[tuple] = []  # (row, training seed) in evaluation order

    def evaluate_model(row, seed, model_dir: str) -> None:
        from kdbench.reproduce.harnessed import harness_model_dir
        from kdbench.reproduce.judged import judge_model_dir

        evaluated.append((row, seed))

        judged = judge_model_dir(table, base, row, seed, model_dir, prepared["teacher"], decoding, log=say,
                                 command=command)
        for suite, values in {**judged, **harness_model_dir(table, base, row, seed, model_dir, log=say,
                                                            command=command)}.items():
            scores.setdefault(row.label, {}).setdefault(suite, {})[str(seed)] = values
        if not suites:
            return
        target = eval_dir(base, row, seed)
        result = evaluate_many(suites, EvalConfig(model=model_dir, seeds=seeds, greedy=not table.eval["seeds"],
                                                  decoding=decoding, output_dir=str(target.parent),
                                                  run_name=target.name, label=row.label, limit=table.eval.get("limit")),
                               log=say, command=command, progress=progress)
        for bench in table.benchmarks:
            if bench.kind != "reference":
                continue
            by_seed = result.results[bench.suite].per_example["rougeL"]  # generation seed -> per example
            per_example = [sum(values) / len(values) for values in zip(*by_seed.values())]
            scores.setdefault(row.label, {}).setdefault(bench.suite, {})[str(seed)] = per_example

    for row in table.rows:
        if row.method is None:
            evaluate_model(row, None, prepared[row.evaluate])
    models: dict[tuple[str, int], str] = {}
    for seed in table.eval.get("train_seeds") or [1]:
        for row in table.rows:
            if row.method is None or not row.available:
                continue
            start = prepared.get(row.start) or models[(row.start, seed)]
            target = train_dir(base, row, seed)
            config = build(TrainConfig, {**row.settings, "method": row.method, "student": start,
                                         "teacher": prepared[row.teacher],
                                         "data": fetch_data(table.datasets[row.data or pair.data]),
                                         "output_dir": str(target.parent), "run_name": target.name, "seed": seed,
                                         "cache_dir": cache, "params": dict(row.params)},
                           prefix=f"row {row.label}'s settings")
            say(f"{pair.name}: {row.label} seed {seed}")
            models[(row.label, seed)] = str(train(config, log=say, command=command, progress=progress).model_dir)
            evaluate_model(row, seed, models[(row.label, seed)])
    from kdbench.reproduce.judged import judge_against_reference_rows

    for label, by_suite in judge_against_reference_rows(table, base, evaluated, log=say, command=command).items():
        for suite, by_seed in by_suite.items():
            scores.setdefault(label, {}).setdefault(suite, {}).update(by_seed)
    return scores


__all__ = ["check_full_inputs", "fetch_model", "fetch_data", "run_pair"]
