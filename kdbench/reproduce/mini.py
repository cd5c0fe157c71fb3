"""``kdbench reproduce NAME --scale mini``: a table's miniature on the embedded synthetic world, end to end on a CPU.

The stand-ins (built by the demo's own cached stages, :mod:`kdbench.demo`): the teacher is a small model trained
on the whole generated world (the task-fine-tuned teacher every preparation stage produces), the student a
smaller model pretrained on the world's language (the pretrained student checkpoint), the training data the
world's labelled subset, unlabelled prompts and preference pairs (each row takes what its recipe declares, by
the demo's fair-start rule, :func:`kdbench.synthetic.arms.arm_for`). Every method row of the table that this
version has a recipe for is trained for each mini training seed with the row's method parameters (its paper
optimisation settings are for the real models; the mini budget replaces them), then evaluated. The benchmarks
are replaced by stand-ins of the same kind:

* reference suites (Rouge-L) -> Rouge-L on the world's test split;
* judged benchmarks -> the offline Rouge-L proxy judge of each student against the teacher on the same prompts
  (win rate, ω; an MT-Bench score stands in as the win rate / 10);
* lm-eval suites (OLL) -> accuracy on the world's four-option questions (lm-eval), x 100.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Callable

from kdbench.reproduce.layout import eval_dir, slug, train_dir
from kdbench.reproduce.table import Row, Table

STAND_INS = {"reference": "Rouge-L on the synthetic test split",
             "judge": "offline Rouge-L proxy judge vs the teacher (deterministic; ties within its margin)",
             "lm_eval": "synthetic four-option accuracy (lm-eval) x 100"}


def mini_preset(table: Table):
    """The demo :class:`~kdbench.demo.Preset` of the table's ``mini`` section."""
    from kdbench.config import build
    from kdbench.demo import MEASURED, Preset

    mini = table.mini
    values = {**MEASURED, "name": f"reproduce-{table.name}", "corpus": dict(mini["corpus"]),
              "teacher_steps": mini["teacher_steps"], "student_pretrain_steps": mini["student_pretrain_steps"],
              "student_epochs": mini["student_epochs"], "preference_epochs": mini["preference_epochs"],
              "train_seeds": list(mini["train_seeds"]), "max_new_tokens": mini["max_new_tokens"],
              "eval_limit": mini["eval_limit"], "batch_size": mini["batch_size"],
              "checkpoints": mini.get("checkpoints", MEASURED["checkpoints"]), "methods": ["sft"]}
    return build(Preset, values, prefix=f"reproduction {table.name}'s mini settings")


def _arms(rows: list[Row]):
    """One demo arm per trained row (label = the row's), plus the SFT / dSFT arms their fair starts need, in
    training order."""
    from kdbench.synthetic.arms import arm_for
    from kdbench.train.recipes import resolve_recipe

    arms = []
    by_method = {}
    for row in rows:
        arm = arm_for(row.method)
        recipe = resolve_recipe(row.method, row.params)
        data = {"pairs": ("preferences", "validation_preferences"), "prompts": ("student_unlabelled", "validation"),
                "responses": ("student_train", "validation")}[recipe.training_data]
        arm = dataclasses.replace(arm, label=row.label, data=data[0], valid=data[1],
                                  params={**arm.params, **row.params})
        arms.append(arm)
        by_method.setdefault(row.method, row.label)
    needed = {a.start for a in arms if a.start != "init"}
    needed |= {v[1:] for a in arms for v in a.params.values() if isinstance(v, str) and v.startswith("@")}
    for method in sorted(needed - set(by_method)):
        extra = dataclasses.replace(arm_for(method), label=f"({method})")  # a start the table has no row for
        arms.insert(0, extra)
        by_method[method] = extra.label
    for arm in arms:  # starts and @-references name arms by method: point them at the arm's label
        if arm.start != "init":
            arm.start = by_method[arm.start]
        arm.params = {k: (f"@{by_method[v[1:]]}" if isinstance(v, str) and v.startswith("@") else v)
                      for k, v in arm.params.items()}
    ordered, pending = [], list(arms)
    while pending:
        done = {a.label for a in ordered}
        ready = next(a for a in pending if ({a.start} - {"init"}) | {v[1:] for v in a.params.values()
                                                                      if isinstance(v, str) and v.startswith("@")} <= done)
        ordered.append(ready)
        pending.remove(ready)
    return ordered


def run_mini(table: Table, out: Path, cache_dir: Path | None, *, log: Callable[[str], None], progress: bool) -> dict:
    """Train and evaluate every available row of ``table`` on the stand-ins; returns per-row, per-benchmark
    per-seed per-example scores: {row label: {benchmark: {seed: [scores]}}} and the timings."""
    from kdbench.demo import build_student_init, build_teacher, score_multiple_choice
    from kdbench.demo_report import judge_against_teacher
    from kdbench.evaluate import EvalConfig, evaluate
    from kdbench.generate import DecodingConfig
    from kdbench.store import ArtifactStore, RunDir
    from kdbench.synthetic.arms import arm_train_config
    from kdbench.synthetic.corpus import FILES, build_corpus
    from kdbench.config import to_dict
    from kdbench.train import train

    preset = mini_preset(table)
    store = ArtifactStore(cache_dir)
    timings: dict[str, float] = {}
    started = time.time()
    corpus_dir = store.get_or_build("demo-corpus", to_dict(preset.corpus), lambda tmp: build_corpus(preset.corpus, tmp)).path
    teacher_dir, _, seconds = build_teacher(preset, corpus_dir, store, log)
    timings["teacher_seconds"] = round(seconds, 1)
    trained_rows = [r for r in table.rows if r.method and r.available]
    arms = _arms(trained_rows)
    decoding = DecodingConfig(greedy=True, max_new_tokens=preset.max_new_tokens, max_prompt_length=128, batch_size=64)
    models: dict[tuple[str, int], Path] = {}
    evaluated: list[tuple[Row, int | None, Path, Path]] = []  # (row, seed, model, eval dir)
    rows_by_label = {r.label: r for r in table.rows}

    def run_eval(row: Row, seed: int | None, model_dir: Path) -> None:
        target = eval_dir(out, row, seed)
        evaluate(EvalConfig(suite="synthetic", model=str(model_dir), data_path=str(corpus_dir), seeds=[0], greedy=True,
                            limit=preset.eval_limit, decoding=decoding, output_dir=str(target.parent),
                            run_name=target.name, label=row.label),
                 log=log, command=["kdbench", "reproduce", table.name, "--scale", "mini"], progress=progress)
        evaluated.append((row, seed, model_dir, target))

    first_init = build_student_init(preset, corpus_dir, store, preset.train_seeds[0], log=log)
    for row in table.rows:
        if row.method is None:  # evaluated-only rows: the prepared teacher / the student before training
            run_eval(row, None, teacher_dir if row.evaluate == "teacher" else first_init)
    teachers = {"teacher": teacher_dir}
    for seed in preset.train_seeds:
        init_dir = build_student_init(preset, corpus_dir, store, seed, log=log)
        for arm in arms:
            t0 = time.time()
            config = arm_train_config(arm, preset, seed=seed, corpus_dir=corpus_dir, init_dir=init_dir, teachers=teachers,
                                      models=models, output_dir=out / "train", cache_dir=str(store.root))
            row = rows_by_label.get(arm.label)
            if row is not None:
                config = dataclasses.replace(config, run_name=train_dir(out, row, seed).name)
            else:
                config = dataclasses.replace(config, run_name=f"{slug(arm.label)}-seed{seed}")
            result = train(config, log=log, command=["kdbench", "reproduce", table.name, "--scale", "mini"],
                           progress=progress)
            models[(arm.label, seed)] = result.model_dir
            timings[f"train_{slug(arm.label)}_seed{seed}_seconds"] = round(time.time() - t0, 1)
            if row is not None:
                run_eval(row, seed, result.model_dir)
    scores: dict[str, dict[str, dict[str, list[float]]]] = {}
    kinds = {b.kind for b in table.benchmarks}
    for row, seed, _, target in evaluated:  # greedy decoding: one generation seed per run
        per_example = next(iter(_rouge_per_example(RunDir(target)).values()))
        scores.setdefault(row.label, {}).setdefault("reference", {})[str(seed)] = per_example
    if "judge" in kinds:
        t0 = time.time()
        teacher_row = next((r for r in table.rows if r.evaluate == "teacher"), None)
        teacher_eval = eval_dir(out, teacher_row, None) if teacher_row else None
        if teacher_eval is None:  # the table has no teacher row: evaluate the teacher for the judge
            teacher_eval = out / "eval" / "teacher"
            evaluate(EvalConfig(suite="synthetic", model=str(teacher_dir), data_path=str(corpus_dir), seeds=[0],
                                greedy=True, limit=preset.eval_limit, decoding=decoding, output_dir=str(out / "eval"),
                                run_name="teacher", label="teacher"), log=log, progress=progress)
        students = [(row.label, target.name) for row, _, _, target in evaluated if target != teacher_eval]
        outcomes = judge_against_teacher(out, students, "rouge", teacher_run=teacher_eval.name, log=log)
        for (row, seed, _, target), outcome in zip([e for e in evaluated if e[3] != teacher_eval], outcomes):
            scores[row.label].setdefault("judge", {})[str(seed)] = [r["outcome"] for r in outcome.judgments]
        if teacher_row is not None:  # the teacher against itself: ties by definition (ω = 0, as the papers print)
            n = len(scores[teacher_row.label]["reference"]["None"])
            scores[teacher_row.label]["judge"] = {"None": ["tie"] * n}
        timings["judge_seconds"] = round(time.time() - t0, 1)
    if "lm_eval" in kinds:
        t0 = time.time()
        score_multiple_choice(corpus_dir, [(target.name, None, model) for _, _, model, target in evaluated], out, log=log)
        n_items = sum(1 for line in open(corpus_dir / FILES["multiple_choice"], encoding="utf-8") if line.strip())
        for row, seed, _, target in evaluated:
            accuracy = next((r["value"] for r in RunDir(target).metrics()
                             if r.get("suite") == "synthetic-mc" and r.get("metric") == "acc"), None)
            if accuracy is not None:  # the items' 0/1 scores: the same mean and bootstrap as the item list
                correct = round(float(accuracy) * n_items)
                scores[row.label].setdefault("lm_eval", {})[str(seed)] = [100.0] * correct + [0.0] * (n_items - correct)
        timings["multiple_choice_seconds"] = round(time.time() - t0, 1)
    timings["total_seconds"] = round(time.time() - started, 1)
    return {"scores": scores, "timings": timings, "corpus_dir": str(corpus_dir), "teacher_dir": str(teacher_dir)}


def _rouge_per_example(run) -> dict[str, list[float]]:
    """The per-example Rouge-L (0-100) of a synthetic evaluation run by generation seed, from the
    ``scores/synthetic.json`` :func:`kdbench.scoring.score` writes."""
    import json

    data = json.loads((run.path / "scores" / "synthetic.json").read_text(encoding="utf-8"))
    return {str(seed): list(values) for seed, values in data["scores"]["rougeL"].items()}


__all__ = ["STAND_INS", "mini_preset", "run_mini"]
