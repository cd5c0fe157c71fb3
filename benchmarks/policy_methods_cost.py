"""Cost of the on-policy and policy-gradient methods against word-level KD, one run, the same data.

Reproduces the table "Cost of MiniLLM, DistiLLM, DistiLLM-2 and DPPO" of ``docs/BENCHMARKS.md``. The smoke
preset's world, its cached teacher (``gpt2-mini``) and its language-pretrained student (``gpt2-nano``, both from
the artifact store, built once if missing); every method trains ``--steps`` optimizer steps of ``--batch``
examples on the student's labelled training prompts (DPPO on the preference pairs of the same prompts), at the
smoke preset's student learning rate, responses limited to ``--max-new-tokens``, no validation and no
checkpoint inside the measured steps. DistiLLM runs with ``init_threshold: 1`` (student outputs every step: the
regime whose cost it adds over KD; with the default 0 it costs what KD costs until the validation loss rises).

Per method: the median and the mean wall time between consecutive optimizer steps (generation, teacher passes,
forward and backward; the first two steps are warm-up and left out) and their ratios to KD's — the median is a
plain step, the mean includes the steps that sample (MiniLLM and DPPO sample once per round of 4 steps); tokens generated in the training
steps and in the stages before them (DistiLLM-2's cached responses, DPPO's none); teacher forward tokens; each
per step and as a ratio to KD. Everything is measured in this one run on this machine.

Usage: ``python benchmarks/policy_methods_cost.py [--out DIR] [--cache DIR] [--steps N]``. Prints a Markdown
table and writes ``cost.json`` into ``--out``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

METHODS = {  # label -> (method, data file key, params)
    "kd": ("kd", "student_train", {}),
    "minillm": ("minillm", "student_train", {}),
    "distillm": ("distillm", "student_train", {"init_threshold": 1.0}),
    "distillm2": ("distillm2", "student_train", {}),
    "dppo": ("dppo", "preferences", {}),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/policy-methods-cost", help="Folder for the runs and cost.json.")
    parser.add_argument("--cache", default=None, help="Artifact store (default: the kdbench cache).")
    parser.add_argument("--steps", type=int, default=24, help="Optimizer steps per method.")
    parser.add_argument("--batch", type=int, default=16, help="Examples per optimizer step.")
    parser.add_argument("--max-new-tokens", type=int, default=64, help="Generation limit of every sampled response.")
    options = parser.parse_args()

    from transformers import TrainerCallback

    from kdbench.demo import PRESETS, build_student_init, build_teacher
    from kdbench.synthetic.arms import stage_params
    from kdbench.store import ArtifactStore
    from kdbench.synthetic.corpus import FILES, build_corpus
    from kdbench.train import TrainConfig, train
    from kdbench.train.recipes import resolve_recipe

    class StepClock(TrainerCallback):
        def __init__(self):
            self.ends: list[float] = []

        def on_step_end(self, args, state, control, **kwargs):
            self.ends.append(time.perf_counter())

    out = Path(options.out)
    out.mkdir(parents=True, exist_ok=True)
    preset = PRESETS["smoke"]
    store = ArtifactStore(options.cache)
    corpus = out / "corpus"
    if not (corpus / FILES["student_train"]).is_file():
        corpus.mkdir(parents=True, exist_ok=True)
        build_corpus(preset.corpus, corpus)
    teacher, _, _ = build_teacher(preset, corpus, store, print)
    student = build_student_init(preset, corpus, store, 1, print)
    results = {}
    for label, (method, data, params) in METHODS.items():
        clock = StepClock()
        stages = {k: {**v, "max_steps": 8, "num_epochs": 1.0} for k, v in stage_params(method, preset).items()}
        config = TrainConfig(method=method, student=str(student), teacher=str(teacher), data=str(corpus / FILES[data]),
                             valid_fraction=0.05, output_dir=str(out / "runs"), run_name=label, seed=1,
                             learning_rate=preset.student_lr, max_steps=options.steps, batch_size=options.batch,
                             max_length=256, max_prompt_length=128, prompt_style="compact", logging_steps=1,
                             save_steps=10 * options.steps, group_by_length=False, cache_dir=options.cache,
                             params={**stages, **params, **({"max_new_tokens": options.max_new_tokens}
                                                            if "max_new_tokens" in resolve_recipe(method).params else {})})
        result = train(config, progress=False, callbacks=[clock], log=lambda message: None)
        intervals = [b - a for a, b in zip(clock.ends[1:], clock.ends[2:])]
        cost = result.cost
        results[label] = {"median_step_seconds": statistics.median(intervals) if intervals else None,
                          "mean_step_seconds": statistics.fmean(intervals) if intervals else None,
                          "steps": cost["optimizer_steps"], "generated_tokens": cost["generated_tokens"],
                          "teacher_forward_tokens": cost["teacher_forward_tokens"],
                          "tokens_processed": cost["tokens_processed"]}
    base = results["kd"]
    lines = ["| method | median step s | × kd | mean step s | × kd | generated tokens / step | "
             "teacher fwd tokens / step | × kd |", "|---|---|---|---|---|---|---|---|"]
    for label, r in results.items():
        r["step_time_ratio"] = r["median_step_seconds"] / base["median_step_seconds"]
        r["mean_step_time_ratio"] = r["mean_step_seconds"] / base["mean_step_seconds"]
        r["teacher_tokens_ratio"] = r["teacher_forward_tokens"] / max(1, base["teacher_forward_tokens"])
        lines.append(f"| {label} | {r['median_step_seconds']:.3f} | {r['step_time_ratio']:.2f} | "
                     f"{r['mean_step_seconds']:.3f} | {r['mean_step_time_ratio']:.2f} | "
                     f"{r['generated_tokens'] / r['steps']:.0f} | {r['teacher_forward_tokens'] / r['steps']:.0f} | "
                     f"{r['teacher_tokens_ratio']:.2f} |")
    (out / "cost.json").write_text(json.dumps({"steps": options.steps, "batch": options.batch,
                                               "max_new_tokens": options.max_new_tokens, "methods": results}, indent=1))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
