"""The embedded benchmark: ``kdbench demo`` trains a teacher and distils it into students on a CPU,
evaluates everything and prints a leaderboard, with no download.

1. A seeded synthetic corpus and word-level tokenizer (:mod:`kdbench.synthetic`), cached.
2. The teacher: a larger model trained on the whole world (all labelled training instances plus the
   world's facts) for more steps. Cached as an artifact keyed by everything that determines it.
3. The student: a smaller model that only sees a labelled subset; each method in the preset trains
   it from the same initialisation through the same engine as real models (``kdbench.train``).
4. Teacher and students are evaluated on the test split (Rouge-L, exact match, per length bucket
   and category, bootstrap CIs) and ranked in a Markdown leaderboard (``kdbench.report``).
5. Each student is judged against the teacher on the same test prompts with the offline exact-match
   judge (:func:`kdbench.judge`, judge runs under ``judge/``), and ``report.html`` (tables and figures
   of every run) is written next to ``leaderboard.md``.
"""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from kdbench.config import option, to_dict
from kdbench.errors import ConfigError
from kdbench.demo_report import DemoResult, judge_against_teacher, write_report_html
from kdbench.store import ArtifactStore, atomic_write_json, atomic_write_text
from kdbench.synthetic.arms import stage_params
from kdbench.synthetic.corpus import FILES, CorpusConfig, build_corpus


@dataclass
class Preset:
    name: str = option("smoke", "Preset name.")
    corpus: CorpusConfig = option(factory=CorpusConfig, help="The generated world and its splits.")
    teacher_size: str = option("gpt2-mini", "Teacher size (kdbench.models.SIZES).")
    teacher_steps: int = option(800, "Teacher optimizer steps.")
    teacher_lr: float = option(1e-3, "Teacher learning rate.")
    student_size: str = option("gpt2-nano", "Student size.")
    student_pretrain_steps: int = option(
        0, "Steps of language pretraining of the student on the corpus's language world (needs "
           "corpus.language_people); 0 = every training seed starts from its own random initialisation.")
    student_steps: int = option(300, "Student optimizer steps per arm when student_epochs is 0 (a fixed budget).")
    student_epochs: float = option(
        0.0, "Data-scaled budget: every arm trains for this many passes over its own training set "
             "(kdbench.synthetic.arms); 0 = student_steps for every arm.")
    preference_epochs: float = option(10.0, "Passes over their data for arms with a sequence-level preference loss "
                                            "(DPO, SimPO, dDPO / rDPO / daDPO, DPKD, DCKD, ADPA).")
    student_lr: float = option(2e-3, "Student learning rate (every student run and student stage).")
    preference_lr: float = option(2e-5, "Learning rate of those arms (DPO-type training at the token methods' "
                                        "rate collapses the policy).")
    select: str = option("last", "Checkpoint each arm keeps: last, or best on held-out data (validation CE; "
                                 "held-out pairs' loss for preference arms).")
    teacher_dpo_lr: float = option(1e-5, "Learning rate of the DPO-aligned teacher stage (pi_dpo of DCKD / ADPA); "
                                         "DPO at the student's rate destroys the teacher.")
    checkpoints: int = option(4, "Checkpoints (validation and selection points) per training run.")
    teacher_signal: str = option("online", "Teacher signal of token-level KD arms: online or topk (kdbench train).")
    batch_size: int = option(32, "Micro-batch size.")
    methods: list[str] = option(factory=lambda: ["sft", "kd"], help="Methods trained on the student.")
    controls: list[str] = option(
        factory=list, help="Validity controls trained as extra arms: sft_all, kd_permuted, kd_untrained, dpo_swapped "
                           "(kdbench.synthetic.arms).")
    train_seeds: list[int] = option(factory=lambda: [1], help="Training seeds per method.")
    eval_seeds: list[int] = option(factory=list, help="Sampling seeds for evaluation; empty = greedy decoding.")
    max_new_tokens: int = option(128, "Generation limit.")
    eval_limit: int | None = option(None, "Evaluate only the first N test examples.")
    multiple_choice: bool = option(False, "Also score the four-option questions on held-out facts (lm-eval).")
    full_report: bool = option(False, "End with the full report (Markdown, HTML with plots, CSV) in the output folder.")

    def __post_init__(self):
        from kdbench.synthetic.arms import CONTROLS

        checks = [
            (self.select in ("last", "best"), "select must be 'last' or 'best'."),
            (self.teacher_signal in ("online", "topk"), "teacher_signal must be 'online' or 'topk'."),
            (self.checkpoints >= 1, "checkpoints must be at least 1."),
            (self.student_epochs >= 0 and self.preference_epochs > 0,
             "student_epochs must be 0 (fixed steps) or more, preference_epochs more than 0."),
            (self.student_steps >= 1 and self.student_pretrain_steps >= 0, "student_steps must be at least 1."),
            (not self.student_pretrain_steps or self.corpus.language_people,
             "student_pretrain_steps needs a language corpus: set corpus.language_people too."),
            (self.train_seeds and len(set(self.train_seeds)) == len(self.train_seeds),
             "train_seeds must list at least one seed, each once."),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(f"Setting {message}")
        unknown = [c for c in self.controls if c not in CONTROLS]
        if unknown:
            raise ConfigError(f"Unknown control {unknown[0]!r}; choose from: {', '.join(CONTROLS)}.")


# The embedded benchmark's settings (docs/design.md, "The embedded benchmark"): students pretrained on a
# language world, noisy labels, data-scaled budgets with model selection, fair starts.
SMOKE_WORLD = CorpusConfig(n_people=60, n_cities=12, label_noise=0.25, language_people=60)
STANDARD_WORLD = CorpusConfig(n_people=100, n_cities=16, test_fraction=0.25, label_noise=0.25, language_people=100)
MEASURED = dict(student_epochs=60.0, preference_epochs=10.0, preference_lr=1e-4, select="best", checkpoints=8)

PRESETS: dict[str, Preset] = {
    "smoke": Preset(name="smoke", corpus=SMOKE_WORLD, student_pretrain_steps=600, **MEASURED,
                    methods=["sft", "kd", "dpo"]),
    "standard": Preset(
        name="standard", corpus=STANDARD_WORLD, teacher_steps=1500, student_pretrain_steps=1000, **MEASURED,
        methods=["sft", "kd", "rkl", "akl", "dsft", "dpo"], controls=["sft_all", "kd_permuted", "dpo_swapped"],
        train_seeds=[1, 2, 3], multiple_choice=True,
    ),
    # every recipe registered in trainers/ (resolved at run time) on the smoke world, fair starts, the
    # offline suites, the full report
    "full": Preset(name="full", corpus=SMOKE_WORLD, student_pretrain_steps=600, **MEASURED, methods=["*"],
                   multiple_choice=True, full_report=True),
}
# The slow suite's second regression gate (kdbench.synthetic.control_gate, `kdbench check --controls`): SFT,
# DPO and DPO on swapped pairs for three training seeds on a small world; the gate reads which way each
# preference arm orders its training pairs, an effect of tens of points that needs little training
# (docs/BENCHMARKS.md, "Planted bugs"). Generation is cut short: the gate reads teacher-forced likelihoods.
PRESETS["control-gate"] = Preset(
    name="control-gate", corpus=CorpusConfig(n_people=40, n_cities=8, label_noise=0.25, language_people=40),
    teacher_size="gpt2-nano", teacher_steps=40, student_pretrain_steps=200, student_epochs=10.0, checkpoints=1,
    select="last", preference_epochs=5.0, preference_lr=5e-4, max_new_tokens=8, methods=["sft", "dpo"],
    controls=["dpo_swapped"], train_seeds=[1, 2, 3])


def build_teacher(preset: Preset, corpus_dir: Path, store: ArtifactStore, log: Callable[[str], None]) -> tuple[Path, bool, float]:
    """Train (or reuse) the teacher; returns (model dir, reused, seconds)."""
    from kdbench.models import make_model
    from kdbench.train import TrainConfig, train

    inputs = {"corpus": to_dict(preset.corpus), "size": preset.teacher_size, "steps": preset.teacher_steps,
              "lr": preset.teacher_lr, "batch_size": preset.batch_size, "seed": 0}

    def build(tmp: Path) -> dict:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(corpus_dir / "tokenizer"))
        init_dir = tmp / "init"
        make_model(preset.teacher_size, tokenizer, seed=0, max_positions=256).save_pretrained(str(init_dir))
        tokenizer.save_pretrained(str(init_dir))
        result = train(TrainConfig(method="sft", student=str(init_dir), data=str(corpus_dir / FILES["teacher_train"]),
                                   valid_data=str(corpus_dir / FILES["validation"]), output_dir=str(tmp / "runs"),
                                   run_name="teacher", seed=0, learning_rate=preset.teacher_lr,
                                   max_steps=preset.teacher_steps, batch_size=preset.batch_size, max_length=256,
                                   max_prompt_length=128, prompt_style="compact", logging_steps=50, group_by_length=True,
                                   save_steps=max(100, preset.teacher_steps // 4)),
                       log=log, command=["kdbench", "demo", "(teacher)"])
        shutil.move(str(result.model_dir), str(tmp / "model"))
        shutil.rmtree(init_dir)
        return {"train_cost": result.cost}

    started = time.time()
    artifact = store.get_or_build("demo-teacher", inputs, build, log=log)
    return artifact.path / "model", artifact.reused, time.time() - started


def build_student_init(preset: Preset, corpus_dir: Path, store: ArtifactStore, seed: int,
                       log: Callable[[str], None] | None = None) -> Path:
    """The students' starting point. With a language corpus and ``student_pretrain_steps`` it is one model
    pretrained on the language world (the world's templates and skills, none of its facts) and shared by
    every training seed, as a pretrained checkpoint is; otherwise a random initialisation per seed."""
    from kdbench.models import make_model
    from kdbench.train import TrainConfig, train

    pretrained = bool(preset.corpus.language_people and preset.student_pretrain_steps)

    def build(tmp: Path) -> dict:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(corpus_dir / "tokenizer"))
        init_dir = tmp / ("init" if pretrained else "model")
        make_model(preset.student_size, tokenizer, seed=0 if pretrained else seed,
                   max_positions=256).save_pretrained(str(init_dir))
        tokenizer.save_pretrained(str(init_dir))
        if not pretrained:
            return {}
        result = train(TrainConfig(method="sft", student=str(init_dir), data=str(corpus_dir / FILES["language"]),
                                   valid_fraction=0.05, output_dir=str(tmp / "runs"), run_name="student-language",
                                   seed=0, learning_rate=preset.teacher_lr, max_steps=preset.student_pretrain_steps,
                                   batch_size=preset.batch_size, max_length=256, max_prompt_length=128,
                                   prompt_style="compact", logging_steps=50, group_by_length=True,
                                   save_steps=max(100, preset.student_pretrain_steps // 4)),
                       log=log, command=["kdbench", "demo", "(student language pretraining)"], progress=False)
        shutil.move(str(result.model_dir), str(tmp / "model"))
        shutil.rmtree(init_dir)
        return {"train_cost": result.cost}

    inputs = {"corpus": to_dict(preset.corpus), "size": preset.student_size, "seed": 0 if pretrained else seed}
    if pretrained:
        inputs.update(pretrain_steps=preset.student_pretrain_steps, lr=preset.teacher_lr, batch_size=preset.batch_size)
    return store.get_or_build("demo-student-init", inputs, build, log=log).path / "model"


def run_demo(preset: Preset | str = "smoke", *, out_dir: str | Path | None = None, cache_dir: str | Path | None = None,
             log: Callable[[str], None] | None = None, progress: bool = True) -> DemoResult:
    """Run the embedded benchmark end to end; returns the leaderboard (also written under ``out_dir``)."""
    from kdbench.evaluate import EvalConfig, evaluate
    from kdbench.generate import DecodingConfig
    from kdbench.report import leaderboard_markdown
    from kdbench.store import find_run_dirs
    from kdbench.synthetic.assess import compute_markdown, load_arms, validity_markdown
    from kdbench.synthetic.likelihood import score_references
    from kdbench.train import train

    from kdbench.real_demo import REAL_PRESETS, RealPreset, run_real_demo

    if isinstance(preset, str) and preset in REAL_PRESETS:
        preset = REAL_PRESETS[preset]
    if isinstance(preset, RealPreset):  # a real pretrained teacher: kdbench.real_demo
        return run_real_demo(preset, out_dir=out_dir, cache_dir=cache_dir, log=log, progress=progress)
    if isinstance(preset, str):
        if preset not in PRESETS:
            raise ConfigError(f"Unknown preset {preset!r}; choose one of: {', '.join(preset_names())}.")
        preset = PRESETS[preset]
    say = log or (lambda message: None)
    out = Path(out_dir) if out_dir else Path("runs") / f"demo-{preset.name}"
    out.mkdir(parents=True, exist_ok=True)
    store = ArtifactStore(cache_dir)
    timings: dict[str, float] = {}
    started = time.time()

    corpus = store.get_or_build("demo-corpus", to_dict(preset.corpus), lambda tmp: build_corpus(preset.corpus, tmp))
    corpus_dir = corpus.path
    counts = corpus.meta.get("counts", {})
    say(f"corpus: {counts.get('teacher_train')} teacher rows, {counts.get('student_train')} labelled student rows, "
        f"{counts.get('student_unlabelled')} unlabelled prompts, {counts.get('test')} test examples ({corpus_dir})")

    teacher_dir, reused, seconds = build_teacher(preset, corpus_dir, store, say)
    timings["teacher_seconds"] = round(seconds, 1)
    say(f"teacher: {'reused from cache' if reused else 'trained'} in {seconds:.1f}s ({teacher_dir})")

    from kdbench.synthetic.arms import arm_train_config, plan_arms
    from kdbench.synthetic.controls import control_teacher

    arms = plan_arms(_methods(preset), list(preset.controls))
    teachers = {"teacher": teacher_dir}
    for kind in sorted({a.teacher for a in arms} - {"teacher"}):
        teachers[kind] = control_teacher(kind, teacher_dir, size=preset.teacher_size, store=store)
    models: dict[tuple[str, int], Path] = {}
    trained: list[tuple[str, int, Path]] = []
    train_runs: dict[tuple[str, int], str] = {}
    for seed in preset.train_seeds:
        init_dir = build_student_init(preset, corpus_dir, store, seed, log=say)
        for arm in arms:
            t0 = time.time()
            config = arm_train_config(arm, preset, seed=seed, corpus_dir=corpus_dir, init_dir=init_dir,
                                      teachers=teachers, models=models, output_dir=out / "train",
                                      cache_dir=str(store.root))
            result = train(config, log=say, command=["kdbench", "demo", preset.name], progress=progress)
            timings[f"train_{arm.label}_seed{seed}_seconds"] = round(time.time() - t0, 1)
            models[(arm.label, seed)] = result.model_dir
            train_runs[(arm.label, seed)] = str(result.run.path)
            trained.append((arm.label, seed, result.model_dir))
    trained.sort(key=lambda item: ([a.label for a in arms].index(item[0]), item[1]))

    decoding = DecodingConfig(greedy=not preset.eval_seeds, max_new_tokens=preset.max_new_tokens,
                              max_prompt_length=128, batch_size=64)
    to_evaluate = [("teacher", None, teacher_dir)] + trained
    for label, seed, model_dir in to_evaluate:
        t0 = time.time()
        name = label if seed is None else f"{label}-seed{seed}"
        evaluate(EvalConfig(suite="synthetic", model=str(model_dir), data_path=str(corpus_dir),
                            seeds=list(preset.eval_seeds) or [0], greedy=not preset.eval_seeds,
                            limit=preset.eval_limit, decoding=decoding, output_dir=str(out / "eval"),
                            run_name=name, label=label),
                 log=say, command=["kdbench", "demo", preset.name], progress=progress)
        timings[f"eval_{name}_seconds"] = round(time.time() - t0, 1)
    t0 = time.time()  # teacher-forced readings of the same test items (kdbench.synthetic.likelihood)
    score_references(corpus_dir, [out / "eval" / (label if seed is None else f"{label}-seed{seed}")
                                  for label, seed, _ in to_evaluate], [model for _, _, model in to_evaluate],
                     limit=preset.eval_limit)
    timings["reference_readings_seconds"] = round(time.time() - t0, 1)
    if preset.multiple_choice:
        t0 = time.time()
        score_multiple_choice(corpus_dir, to_evaluate, out, log=say)
        timings["multiple_choice_seconds"] = round(time.time() - t0, 1)

    t0 = time.time()
    judge_against_teacher(out, [(label, f"{label}-seed{seed}") for label, seed, _ in trained], "exact", log=say)
    timings["judge_seconds"] = round(time.time() - t0, 1)
    timings["total_seconds"] = round(time.time() - started, 1)

    if preset.full_report:
        from kdbench.report import build_report

        t0 = time.time()
        from kdbench.demo_report import demo_run_folders

        build_report(demo_run_folders(out), out=out / "report", title=f"kdbench demo --preset {preset.name}")
        timings["report_seconds"] = round(time.time() - t0, 1)
        say(f"full report: {out / 'report'}")
    t0 = time.time()
    report_html = write_report_html(out, f"kdbench demo --preset {preset.name}")
    timings["report_html_seconds"] = round(time.time() - t0, 1)
    by_label = {a.label: a for a in arms}
    listed = [{"label": "teacher", "seed": 0, "method": "sft", "start": "-", "control": None, "train": None,
               "eval": str(out / "eval" / "teacher")}]
    listed += [{"label": label, "seed": seed, "method": by_label[label].method, "start": by_label[label].start,
                "control": by_label[label].control, "train": train_runs[(label, seed)],
                "eval": str(out / "eval" / f"{label}-seed{seed}")} for label, seed, _ in trained]
    atomic_write_json(out / "demo.json", {"preset": to_dict(preset), "timings": timings, "teacher_reused": reused,
                                          "corpus_dir": str(corpus_dir), "teacher_dir": str(teacher_dir),
                                          "report_html": str(report_html), "runs": listed})
    runs = find_run_dirs([out / "eval"])
    markdown = leaderboard_markdown(runs, title=f"kdbench demo --preset {preset.name}", baseline_label="sft",
                                    reference_label="teacher",
                                    data_note=f"embedded synthetic world (seed {preset.corpus.seed}, "
                                              f"{counts.get('test')} test examples)")
    markdown = markdown.rstrip("\n") + "\n\n" + compute_markdown(load_arms(out))
    atomic_write_text(out / "leaderboard.md", markdown)
    if preset.controls or len(preset.train_seeds) > 1:
        atomic_write_text(out / "validity.md", validity_markdown(out))
        say(f"validity: {out / 'validity.md'}")
    return DemoResult(out, markdown, timings, reused, report_html)


def _methods(preset: Preset) -> list[str]:
    """The preset's methods; ``*`` means every registered recipe (aliases included)."""
    from kdbench import registry

    if preset.methods == ["*"]:
        names = registry.names("trainers")
        return ["sft"] + [n for n in names if n != "sft"]
    return list(preset.methods)


MC_SUITE = {"name": "synthetic-mc", "type": "lm_eval", "protocol": "kdbench synthetic multiple choice",
             "description": "Four-option questions on held-out facts of the generated world (chance = 25%).",
             "tasks": [{"task": "kdbench_synthetic_mc", "num_fewshot": 0, "metric": "acc"}]}


def score_multiple_choice(corpus_dir: Path, models: list[tuple[str, int | None, Path]], out: Path,
                          log: Callable[[str], None] | None = None) -> None:
    """Score each model on the world's multiple-choice questions through lm-eval; the records go into
    the model's eval run (suite ``synthetic-mc``) beside its Rouge-L."""
    from kdbench.harness import harness_into_run, local_multiple_choice_task
    from kdbench.store import RunDir
    from kdbench.synthetic.corpus import load_corpus_rows

    include = local_multiple_choice_task(MC_SUITE["tasks"][0]["task"], load_corpus_rows(corpus_dir, "multiple_choice"),
                                         out / "mc_task", prompt_template="instruction : {{question}} response :")
    for label, seed, model_dir in models:
        run = RunDir(out / "eval" / (label if seed is None else f"{label}-seed{seed}"))
        harness_into_run(run, str(model_dir), suite=MC_SUITE, include_path=include, batch_size=32, log=log)


def preset_names() -> list[str]:
    """The embedded presets and the real-model ones (kdbench.real_demo)."""
    from kdbench.real_demo import REAL_PRESETS

    return [*PRESETS, *REAL_PRESETS]


def preset_with(name: str, overrides: dict):
    """The preset ``name`` with ``--set`` overrides: a :class:`Preset`, or a
    :class:`kdbench.real_demo.RealPreset` for ``smollm2`` / ``smollm2-quick``."""
    from kdbench.config import build
    from kdbench.real_demo import REAL_PRESETS, RealPreset

    if name in REAL_PRESETS:
        return build(RealPreset, {**to_dict(REAL_PRESETS[name]), **overrides}) if overrides else REAL_PRESETS[name]
    if name not in PRESETS:
        raise ConfigError(f"Unknown preset {name!r}; choose one of: {', '.join(preset_names())}.")
    if not overrides:
        return PRESETS[name]
    merged = {**to_dict(PRESETS[name])}
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = {**merged[key], **value}
        else:
            merged[key] = value
    return build(Preset, merged)


__all__ = ["PRESETS", "Preset", "DemoResult", "run_demo", "preset_with", "stage_params"]
