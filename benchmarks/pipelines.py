"""Pipeline methods on the embedded benchmark (CPU): what stage reuse saves, what online pairs cost.

Measures, in one process, on the smoke world with its cached teacher:

* **Stage reuse**: ``dadpo`` on a fresh artifact store (teacher and student generations, the dSFT
  model, frozen log-probs, then training) against ``ddpo`` right after it on the same store (every
  stage reused, only training runs). Repeated ``--repeats`` times on fresh stores; medians and the
  warm/cold ratio are reported.
* **Online pairs**: DPKD's training seconds per optimizer step with online pairs (the student samples
  y_s every batch and the teacher scores it in the step) against offline pairs (y_s generated once,
  teacher log-probs cached), from the same SFT student; the ratio is the price of Alg. 1's online pairs.
* **ADPA+ stages**: the build time of each stage (DPO teacher, DCKD student, ŷ) against its training.

Usage: ``python benchmarks/pipelines.py [--out DIR] [--repeats 3] [--steps 60] [--threads 1]``. Prints a
Markdown table and writes ``pipelines.json`` into ``--out``.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import statistics
import tempfile
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None, help="Folder for the runs and the JSON result (default: a temp dir).")
    parser.add_argument("--repeats", type=int, default=3, help="Cold/warm pairs on fresh stores (medians reported).")
    parser.add_argument("--steps", type=int, default=60, help="Optimizer steps per method.")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest on a shared CPU).")
    parser.add_argument("--cache", default=None, help="Artifact store holding the smoke teacher (default: a temp dir).")
    options = parser.parse_args()

    import torch

    from kdbench.demo import PRESETS, build_student_init, build_teacher, stage_params
    from kdbench.store import ArtifactStore
    from kdbench.synthetic.corpus import FILES, build_corpus
    from kdbench.train import TrainConfig, train

    torch.set_num_threads(options.threads)
    out = Path(options.out) if options.out else Path(tempfile.mkdtemp(prefix="kdbench-pipelines-"))
    out.mkdir(parents=True, exist_ok=True)
    preset = PRESETS["smoke"]
    base = ArtifactStore(options.cache or out / "base-cache")
    corpus = base.get_or_build("demo-corpus", _to_dict(preset.corpus), lambda tmp: build_corpus(preset.corpus, tmp)).path
    teacher, _, _ = build_teacher(preset, corpus, base, print)
    student = build_student_init(preset, corpus, base, 1)

    def config(method: str, data: str, store: Path, run: str, **params) -> TrainConfig:
        return TrainConfig(method=method, student=str(student), teacher=str(teacher), data=str(corpus / FILES[data]),
                           valid_data=str(corpus / FILES["validation"]), output_dir=str(out / "runs"), run_name=run,
                           seed=1, learning_rate=preset.student_lr, max_steps=options.steps, batch_size=16,
                           max_length=256, max_prompt_length=128, prompt_style="compact", logging_steps=20,
                           save_steps=10_000, cache_dir=str(store),
                           params={"max_new_tokens": 64, **_stage_steps(stage_params(method, preset), options.steps),
                                   **params})

    results: dict = {"machine": platform.platform(), "threads": options.threads, "steps": options.steps, "reuse": []}
    for repeat in range(options.repeats):
        store = out / f"cache-{repeat}"
        shutil.rmtree(store, ignore_errors=True)
        shutil.rmtree(out / "runs", ignore_errors=True)
        started = time.perf_counter()
        cold = train(config("dadpo", "student_unlabelled", store, f"dadpo-{repeat}"), progress=False)
        cold_seconds = time.perf_counter() - started
        started = time.perf_counter()
        warm = train(config("ddpo", "student_unlabelled", store, f"ddpo-{repeat}"), progress=False)
        warm_seconds = time.perf_counter() - started
        assert warm.cost["dsft_reused"] and warm.cost["generation_reused"] and warm.cost["logprobs_reused"]
        results["reuse"].append({"dadpo_cold_seconds": round(cold_seconds, 2), "ddpo_warm_seconds": round(warm_seconds, 2),
                                 "cold_train_seconds": cold.cost["train_seconds"],
                                 "warm_train_seconds": warm.cost["train_seconds"]})
        print(results["reuse"][-1], flush=True)
    cold_median = statistics.median(r["dadpo_cold_seconds"] for r in results["reuse"])
    warm_median = statistics.median(r["ddpo_warm_seconds"] for r in results["reuse"])

    # DPKD online vs offline pairs, same SFT start (a shared stage)
    store = out / "cache-dpkd"
    per_step = {}
    for mode in ("offline", "online", "offline", "online"):  # interleaved: load drifts hit both alike
        result = train(config("dpkd", "student_train", store, f"dpkd-{mode}-{len(per_step.get(mode, []))}",
                              pairs=mode), progress=False)
        per_step.setdefault(mode, []).append(result.cost["train_seconds"] / max(result.cost["optimizer_steps"], 1))
        shutil.rmtree(result.run.path, ignore_errors=True)
    results["dpkd_seconds_per_step"] = {mode: [round(v, 4) for v in values] for mode, values in per_step.items()}

    # ADPA+ stage costs
    result = train(config("adpa_plus", "preferences", out / "cache-adpa", "adpa_plus"), progress=False)
    stages = json.loads((result.run.path / "stages.json").read_text())
    results["adpa_plus"] = {
        "dpo_teacher_build_seconds": stages["dpo_teacher"].get("build_seconds"),
        "dckd_build_seconds": stages["dckd_student"].get("build_seconds"),
        "yhat_generation_seconds": stages["policy_responses"].get("build_seconds"),
        "adpa_train_seconds": result.cost["train_seconds"], "wall_seconds": result.cost["wall_seconds"],
    }
    (out / "pipelines.json").write_text(json.dumps(results, indent=2))

    online = statistics.median(per_step["online"])
    offline = statistics.median(per_step["offline"])
    print()
    print("| measurement | median | ratio |")
    print("|---|---|---|")
    print(f"| dadpo, fresh store (all stages) | {cold_median:.1f} s | 1.00 |")
    print(f"| ddpo after it (stages reused) | {warm_median:.1f} s | {warm_median / cold_median:.2f} |")
    print(f"| DPKD offline pairs, s/step | {offline:.3f} | 1.00 |")
    print(f"| DPKD online pairs, s/step | {online:.3f} | {online / offline:.2f} |")
    adpa = results["adpa_plus"]
    print(f"| ADPA+: DPO teacher / DCKD / y-hat / ADPA training | {adpa['dpo_teacher_build_seconds']:.1f} / "
          f"{adpa['dckd_build_seconds']:.1f} / {adpa['yhat_generation_seconds']:.1f} / {adpa['adpa_train_seconds']:.1f} s | |")
    print(f"\n{options.repeats} cold/warm pairs, {options.steps} steps per method, {options.threads} thread(s); {out}")


def _stage_steps(stages: dict, steps: int) -> dict:
    """The preset's stage settings (its explicit learning rates) at this benchmark's steps and batch."""
    return {name: {**settings, "max_steps": steps, "batch_size": 16} for name, settings in stages.items()}


def _to_dict(value):
    from kdbench.config import to_dict

    return to_dict(value)


if __name__ == "__main__":
    main()
