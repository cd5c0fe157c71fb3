"""Fixture run directories for the report tests: real RunDir files with synthetic per-example scores.

The per-example scores are built so that their seed- and run-averages are known exactly: generation
seeds add +e / -e around a target, training runs add +t / -t, so averaging gives the target back.
Rows (suite ``dolly``, 240 examples):

* ``sft``     the baseline: target = base (uniform 20..60)
* ``kd``      two training runs; target = base + d with mean(d) = 0.05 and sd 3: within noise (a tie)
* ``akl``     one training run; target = base + 6 + noise: clearly better
* ``teacher`` target = base + 20
"""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

import numpy as np

from kdbench.store import RunDir, append_jsonl, atomic_write_json

N = 240
SUITE = "dolly"
IDS = [f"ex{i:03d}" for i in range(N)]
BUCKETS = ["(0,30]", "(30,70]", "(70,inf)"]
CATEGORIES = ["open_qa", "closed_qa", "brainstorming", "summarization"]
SEEDS = ["10", "20"]
DECODING = "sampling temperature 1.0, top_p 1.0, max_new_tokens 256, seeds 10,20"


def _mean(values) -> float:
    return float(np.mean(values)) if len(values) else float("nan")


def write_eval_run(root: Path, name: str, label: str, rouge_per_seed: dict[str, np.ndarray], *, model: str | None = None,
                   suite: str = SUITE, wall_seconds: float = 20.0) -> RunDir:
    """An eval run as kdbench.evaluate writes it (records, scores file, generations) from given scores."""
    from kdbench.metrics import bootstrap_ci, mean_std

    buckets = [BUCKETS[i % 3] for i in range(N)]
    categories = [CATEGORIES[i % 4] for i in range(N)]
    per_metric = {"rougeL": {s: [float(v) for v in values] for s, values in rouge_per_seed.items()},
                  "exact_match": {s: [100.0 if v > 55 else 0.0 for v in values] for s, values in rouge_per_seed.items()}}
    run = RunDir.create(root, name, kind="eval", command=["pytest"],
                        config={"suite": suite, "model": model or f"models/{label}", "label": label,
                                "data_path": "fixtures/dolly-valid.jsonl", "seeds": [int(s) for s in SEEDS],
                                "greedy": False, "prompt_style": "alpaca", "decoding_summary": DECODING})
    records = []
    for metric, per_seed in per_metric.items():
        for seed, values in per_seed.items():
            records.append(run.metric_record(suite, metric, _mean(values), seed=seed, n=N))
            for group, labels in (("bucket", buckets), ("category", categories)):
                for name_ in dict.fromkeys(labels):
                    subset = [v for v, g in zip(values, labels) if g == name_]
                    records.append(run.metric_record(suite, metric, _mean(subset), seed=seed, subset=f"{group}:{name_}",
                                                     n=len(subset)))
        example_means = [_mean([per_seed[s][i] for s in per_seed]) for i in range(N)]
        mean, std = mean_std([_mean(v) for v in per_seed.values()])
        low, high = bootstrap_ci(example_means)
        records.append(run.metric_record(suite, metric, mean, seed="mean", n=N, std=std, ci_low=low, ci_high=high,
                                         n_seeds=len(per_seed)))
        for group, labels in (("bucket", buckets), ("category", categories)):
            for name_ in dict.fromkeys(labels):
                members = [i for i, g in enumerate(labels) if g == name_]
                g_mean, g_std = mean_std([_mean([per_seed[s][i] for i in members]) for s in per_seed])
                g_low, g_high = bootstrap_ci([example_means[i] for i in members])
                records.append(run.metric_record(suite, metric, g_mean, seed="mean", subset=f"{group}:{name_}",
                                                 n=len(members), std=g_std, ci_low=g_low, ci_high=g_high,
                                                 n_seeds=len(per_seed)))
    run.write_metrics(records, replace_suite=suite)
    atomic_write_json(run.path / "scores" / f"{suite}.json",
                      {"ids": IDS, "buckets": buckets, "categories": categories, "scores": per_metric})
    for seed in per_metric["rougeL"]:
        append_jsonl(run.generations_path(suite, seed),
                     [{"id": i, "seed": seed, "output": "x", "new_tokens": 50} for i in IDS])
    run.finish("complete", label=label)
    info = run.info()
    finished = dt.datetime.fromisoformat(info["finished"])
    info["started"] = (finished - dt.timedelta(seconds=wall_seconds)).isoformat(timespec="seconds")
    atomic_write_json(run.path / "run.json", info)
    return run


def write_train_run(root: Path, name: str, method: str, *, seed: int, wall_seconds: float, steps: int = 40) -> RunDir:
    run = RunDir.create(root, name, kind="train", command=["pytest"],
                        config={"method": method, "seed": seed, "student": "init", "teacher": "teacher"})
    (run.path / "model").mkdir(exist_ok=True)
    for step in range(5, steps + 1, 5):
        record = {"step": step, "epoch": step / steps, "loss": 3.0 / (1 + 0.1 * step) + 0.01 * seed,
                  "ce_per_token": 2.5 / (1 + 0.1 * step)}
        if method != "sft":
            record["rkl_per_token"] = 1.0 / (1 + 0.05 * step)
        append_jsonl(run.path / "train_log.jsonl", record)
    atomic_write_json(run.path / "cost.json", {
        "wall_seconds": wall_seconds, "optimizer_steps": steps, "tokens_processed": 10_000 * seed,
        "teacher_forward_tokens": 0 if method == "sft" else 10_000, "generated_tokens": 0, "peak_rss_mb": 512.0,
        "final_train_loss": 1.0})
    run.finish("complete", model_dir=str(run.path / "model"))
    return run


def targets(rng_seed: int = 0) -> dict[str, np.ndarray]:
    """Seed- and run-averaged per-example Rouge-L of every row (what the report must recover)."""
    rng = np.random.default_rng(rng_seed)
    base = rng.uniform(20, 60, N)
    d = rng.normal(0, 3, N)
    d = d - d.mean() + 0.05  # mean difference 0.05 against a per-example sd of 3: far inside the noise
    return {"sft": base, "kd": base + d, "akl": base + 6 + rng.normal(0, 3, N), "teacher": base + 20}


def _seeds(target: np.ndarray, rng, spread: float = 2.0) -> dict[str, np.ndarray]:
    e = rng.normal(0, spread, target.shape)
    return {SEEDS[0]: target + e, SEEDS[1]: target - e}


def build_reference_runs(root: Path) -> dict[str, list[RunDir]]:
    """sft, kd (2 training seeds), akl, teacher eval runs under root/eval, training runs under root/train."""
    rng = np.random.default_rng(1)
    goal = targets()
    runs: dict[str, list[RunDir]] = {}
    train_root, eval_root = root / "train", root / "eval"
    sft_train = write_train_run(train_root, "sft-seed1", "sft", seed=1, wall_seconds=10.0)
    runs["sft"] = [write_eval_run(eval_root, "sft-seed1", "sft", _seeds(goal["sft"], rng),
                                  model=str(sft_train.path / "model"), wall_seconds=10.0)]
    t = rng.normal(0.5, 1.5, N)  # the two training runs differ by 2*mean(t) ~ 1 point
    runs["kd"] = []
    for index, sign in ((1, 1.0), (2, -1.0)):
        train = write_train_run(train_root, f"kd-seed{index}", "kd", seed=index, wall_seconds=30.0 + 10 * index)
        runs["kd"].append(write_eval_run(eval_root, f"kd-seed{index}", "kd", _seeds(goal["kd"] + sign * t, rng),
                                         model=str(train.path / "model"), wall_seconds=20.0))
    akl_train = write_train_run(train_root, "akl-seed1", "akl", seed=1, wall_seconds=45.0)
    runs["akl"] = [write_eval_run(eval_root, "akl-seed1", "akl", _seeds(goal["akl"], rng),
                                  model=str(akl_train.path / "model"))]
    runs["teacher"] = [write_eval_run(eval_root, "teacher", "teacher", _seeds(goal["teacher"], rng))]
    return runs


def build_oll_run(root: Path, label: str, arc: float) -> RunDir:
    """An lm-eval suite run written through HarnessResult.to_metric_records (the real record format)."""
    from kdbench.harness import HarnessResult, TaskScore, load_harness_suite, suite_averages

    suite = load_harness_suite("oll")
    scores = {}
    for index, task in enumerate(suite.tasks):
        value = arc if task.task == "arc_challenge" else 0.3 + 0.05 * index
        score = TaskScore(task.task, task.metrics[0], value, 0.01, 100, task.num_fewshot, task.filter, task.average_uses)
        if task.average_uses == "subtask_mean":
            score.subtasks = {"a": value - 0.02, "b": value + 0.02}
            score.subtask_mean = value
        scores[task.task] = score
    result = HarnessResult(suite, "0.4.9", scores, suite_averages(scores), limit=None)
    run = RunDir.create(root, f"oll-{label}", kind="eval", command=["pytest"],
                        config={"suite": "oll", "model": f"models/{label}", "label": label})
    run.write_metrics(result.to_metric_records(run, "oll"), replace_suite="oll")
    run.finish("complete", suite="oll", label=label, harness=result.label)
    return run


def build_judge_results(root: Path, student_run: Path, teacher_run: Path) -> None:
    """An MT-Bench, a pairwise and an AlpacaEval judge run directory, written and summarized by the real
    judging code (kdbench.judging.runs, the protocols' summaries and metric records)."""
    from kdbench.judging import alpaca_eval as ae
    from kdbench.judging import mt_bench as mtb
    from kdbench.judging import pairwise as pw
    from kdbench.judging.runs import finish_run, open_run

    records = [{"model": model, "question_id": q, "turn": turn, "score": score,
                "category": "writing" if q % 2 else "math"}
               for model, offset in (("kd", 0), ("sft", 1)) for q in range(1, 6) for turn in (1, 2)
               for score in [float((q + turn + offset) % 9 + 1)]]
    run = open_run(root / "judge-mt", protocol="mt_bench", config={"reference": "gpt-4", "inputs": ["answers.jsonl"]},
                   command=["pytest"])
    metrics = mtb.metric_records(run, mtb.summarize(records), judge="gpt-4o-2024-08-06", protocol="mt_bench")
    finish_run(run, judgments=records, metrics=metrics, usage=None, label="kd+sft", protocol="mt_bench",
               judge="gpt-4o-2024-08-06", judge_label="LLM judge gpt-4o-2024-08-06 (FastChat single prompts)")

    outcomes = ["win"] * 7 + ["tie"] * 2 + ["loss"] * 3 + ["failed"]
    run = open_run(root / "judge-pw", protocol="pairwise", config={"student": str(student_run),
                                                                   "teacher": str(teacher_run)}, command=["pytest"])
    judgments = [{"outcome": o} for o in outcomes]
    metrics = pw.metric_records(run, pw.summarize(judgments), suite=SUITE, label="kd", opponent="teacher",
                                judge="offline-rouge-margin0.05")
    finish_run(run, judgments=judgments, metrics=metrics, usage=None, label="kd", protocol="pairwise",
               judge="offline-rouge-margin0.05", judge_label="offline rouge judge (not an LLM judgment)")

    run = open_run(root / "judge-ae", protocol="alpaca_eval_2", config={"outputs": str(student_run)},
                   command=["pytest"])
    summary = {"win_rate": 12.5, "standard_error": 1.1, "n_wins": 90, "n_wins_base": 700, "n_draws": 15,
               "n_total": 805, "n_failed": 0, "discrete_win_rate": 12.1, "avg_length": 868,
               "length_controlled_winrate": None}
    metrics = ae.metric_records(run, summary, label="kd", judge="gpt-4-1106-preview", protocol="alpaca_eval_2",
                                reference="gpt4_1106_preview")
    finish_run(run, judgments=[], metrics=metrics, usage=None, label="kd", protocol="alpaca_eval_2",
               judge="gpt-4-1106-preview",
               judge_label="weighted_alpaca_eval_gpt4_turbo via gpt-4-1106-preview vs gpt4_1106_preview")
