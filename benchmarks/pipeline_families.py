"""Pipeline families on the smoke world, one training seed: Rouge-L of every pipeline and of its stages.

Reproduces the table "Pipeline families on the smoke world" of ``docs/BENCHMARKS.md``. The smoke preset's
cached teacher and random-init student (``gpt2-nano``); every run trained as ``kdbench demo --preset
smoke`` trains a method (300 optimizer steps of 32, the preset's explicit stage settings from
``kdbench.demo.stage_params``: student stages at 2e-3 for 300 steps, pi_dpo at 1e-5), plus variants at
another main learning rate; every model, and the stage models the pipelines built (dSFT, pi_dpo, ADPA+'s
DCKD student), evaluated like the smoke preset: 226 test examples, greedy, <= 128 new tokens, Rouge-L
with a bootstrap 95% CI over examples.

Usage: ``python benchmarks/pipeline_families.py [--out DIR] [--cache DIR] [--rows a,b,...]``. Runs and
evaluations resume when rerun with the same ``--out``; stages come from the artifact store (``--cache``,
default the kdbench cache), so they are shared with ``kdbench demo`` runs on the same store. Prints a
Markdown table and writes ``families.json`` into ``--out``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

#: label -> (method, main-run settings that differ from the preset's, method params added to the preset's)
ROWS: dict[str, tuple[str, dict, dict]] = {
    "dpkd": ("dpkd", {}, {}),
    "sft-600": ("sft", {"max_steps": 600}, {}),
    "kd": ("kd", {}, {}),
    "sft": ("sft", {}, {}),
    "dckd": ("dckd", {}, {}),
    "dadpo-1e-4": ("dadpo", {"learning_rate": 1e-4}, {}),
    "adpa_plus-top50-1e-4": ("adpa_plus", {"learning_rate": 1e-4}, {"teacher_topk": 50}),
    "adpa_plus-exact-1e-4": ("adpa_plus", {"learning_rate": 1e-4}, {}),
    "dadpo": ("dadpo", {}, {}),
}
#: stage models evaluated too: label -> (row whose run built it, path of its facts in stages.json)
STAGES: dict[str, tuple[str, tuple[str, ...]]] = {
    "dsft (stage of dadpo)": ("dadpo", ("dsft",)),
    "pi_dpo (stage of dckd)": ("dckd", ("teachers", "dpo")),
    "dckd student (stage of adpa_plus)": ("adpa_plus-exact-1e-4", ("student",)),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/pipeline-families", help="Folder for the runs and the JSON result.")
    parser.add_argument("--cache", default=None, help="Artifact store (default: the kdbench cache).")
    parser.add_argument("--rows", default=",".join(ROWS), help="Comma-separated row labels to run.")
    options = parser.parse_args()

    from kdbench.demo import PRESETS, build_student_init, build_teacher
    from kdbench.synthetic.arms import arm_for, stage_params
    from kdbench.train.recipes import resolve_recipe
    from kdbench.config import to_dict
    from kdbench.evaluate import EvalConfig, evaluate
    from kdbench.generate import DecodingConfig
    from kdbench.store import ArtifactStore
    from kdbench.synthetic.corpus import FILES, build_corpus
    from kdbench.train import TrainConfig, train

    preset = PRESETS["smoke"]
    out = Path(options.out)
    store = ArtifactStore(options.cache)
    corpus = store.get_or_build("demo-corpus", to_dict(preset.corpus), lambda tmp: build_corpus(preset.corpus, tmp)).path
    teacher, _, _ = build_teacher(preset, corpus, store, print)
    decoding = DecodingConfig(greedy=True, max_new_tokens=preset.max_new_tokens, max_prompt_length=128, batch_size=64)

    def score(label: str, model_dir: Path) -> dict:
        result = evaluate(EvalConfig(suite="synthetic", model=str(model_dir), data_path=str(corpus), seeds=[0],
                                     greedy=True, decoding=decoding, output_dir=str(out / "eval"), run_name=label,
                                     label=label), progress=False)
        record = next(r for r in result.records if r["metric"] == "rougeL" and r["subset"] == "all"
                      and str(r["seed"]) == "mean")
        return {"rougeL": round(record["value"], 1), "ci": [round(record["ci_low"], 1), round(record["ci_high"], 1)]}

    results: dict[str, dict] = {"teacher": score("teacher", teacher)}
    runs: dict[str, Path] = {}
    for label in options.rows.split(","):
        method, settings, params = ROWS[label]
        started = time.time()
        config = dict(method=method, student=str(build_student_init(preset, corpus, store, 1)), teacher=str(teacher),
                      data=str(corpus / FILES[arm_for(method).data]), valid_data=str(corpus / FILES["validation"]),
                      output_dir=str(out / "train"), run_name=f"{label}-seed1", seed=1, learning_rate=preset.student_lr,
                      max_steps=preset.student_steps, batch_size=preset.batch_size, max_length=256,
                      max_prompt_length=128, prompt_style="compact", logging_steps=25, group_by_length=True,
                      cache_dir=str(store.root), save_steps=max(50, preset.student_steps // 3),
                      params={**({"max_new_tokens": preset.max_new_tokens} if "max_new_tokens" in resolve_recipe(method).params else {}),
                              **stage_params(method, preset),
                              **params})
        config.update(settings)
        result = train(TrainConfig(**config), log=print, progress=False)
        runs[label] = result.run.path
        results[label] = {**score(label, result.model_dir), "train_seconds": round(time.time() - started, 1),
                          "learning_rate": config["learning_rate"], "steps": config["max_steps"]}
        print(label, results[label], flush=True)
    for label, (row, keys) in STAGES.items():
        if row not in runs:
            continue
        node = json.loads((runs[row] / "stages.json").read_text())
        for key in keys:
            node = node[key]
        results[label] = score(label.split(" ")[0] + "-stage", Path(node["path"]) / "model")
    (out / "families.json").write_text(json.dumps(results, indent=2))
    print("\n| model | Rouge-L | 95% CI |\n|---|---|---|")
    for label, row in sorted(results.items(), key=lambda item: -item[1]["rougeL"]):
        print(f"| {label} | {row['rougeL']} | [{row['ci'][0]}, {row['ci'][1]}] |")


if __name__ == "__main__":
    main()
