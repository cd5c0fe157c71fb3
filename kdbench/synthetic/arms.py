"""The arms of an embedded-benchmark run: which recipe trains on which data, from which start, against
which teacher, for how long — one rule for every arm.

Fair starts (as the papers did): recipes that train a student from its pretrained state (SFT, the
token-level KD family, SeqKD / dSFT, GKD, pipelines that build their own SFT or dSFT stage) start from
the same initial student; recipes that assume an SFT student and have no SFT stage of their own (DPO,
SimPO on a preference file) start from the ``sft`` arm's model of the same training seed, and
pipelines that accept a ready SFT / dSFT checkpoint (``sft_model`` / ``dsft_model``) get that arm's.

Fair budgets: with ``student_epochs`` set, every arm trains for that many passes over *its own*
training set, and with ``select=best`` keeps its best checkpoint on held-out data (validation token
cross-entropy for arms that train on responses, the held-out pairs' loss for preference arms); the
budget therefore follows the data, not a fixed step count that would rank methods by how many passes
each gets. Arms with a sequence-level preference loss (DPO, SimPO, dDPO / rDPO / daDPO, DPKD, DCKD,
ADPA) train ``preference_epochs`` at ``preference_lr`` instead: at the token methods' rate they collapse
the policy. DCKD and ADPA have no held-out measure to select on and keep their last checkpoint.

Controls are arms too (``Preset.controls``): ``sft_all`` (positive: SFT on every labelled training
instance), ``kd_permuted`` / ``kd_untrained`` (negative: KD against a meaningless teacher,
:mod:`kdbench.synthetic.controls`) and ``dpo_swapped`` (negative: DPO with chosen and rejected swapped).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from kdbench.errors import ConfigError

CONTROLS = ("sft_all", "kd_permuted", "kd_untrained", "dpo_swapped")


@dataclass
class Arm:
    """One trained row of the leaderboard (a method or a control)."""

    label: str                     # leaderboard label: the method name, or the control's name
    method: str                    # the recipe that trains it
    data: str                      # the corpus file it trains on (kdbench.synthetic.corpus.FILES key)
    valid: str = "validation"      # held-out data for select=best
    start: str = "init"            # "init" (the initial student) or the label of the arm whose model it starts from
    teacher: str = "teacher"       # "teacher", or a control teacher: "permuted" / "untrained"
    stage: str = "student"         # "student" (trains from the initial student) or "preference" (after SFT)
    params: dict = field(default_factory=dict)  # recipe parameters set by the plan (e.g. sft_model: "@sft")
    control: str | None = None     # the control this arm implements, if any


def arm_for(method: str) -> Arm:
    """The arm of a registered recipe: its data and start by the fair-start rule (module docstring), from what
    the resolved recipe declares (its data, its kind, the stages whose checkpoints it accepts)."""
    from kdbench.train.recipes import resolve_recipe

    recipe = resolve_recipe(method)
    data, valid = {"pairs": ("preferences", "validation_preferences"), "prompts": ("student_unlabelled", "validation"),
                   "responses": ("student_train", "validation")}[recipe.training_data]
    start, stage, arm_params = "init", "student", {}
    if recipe.kind == "preference" or (recipe.kind == "guided" and recipe.data == "pairs"):  # preference losses
        stage = "preference"
        if recipe.kind == "preference" and recipe.data == "pairs":
            start = "sft"  # DPO / SimPO: no SFT stage of their own
    if "sft_model" in recipe.params:
        arm_params["sft_model"] = "@sft"
    if "dsft_model" in recipe.params:
        arm_params["dsft_model"] = "@dsft"
    return Arm(label=method, method=method, data=data, valid=valid, start=start, stage=stage, params=arm_params)


def control_arm(name: str) -> Arm:
    if name == "sft_all":
        return Arm(label=name, method="sft", data="student_all", control=name)
    if name in ("kd_permuted", "kd_untrained"):
        return Arm(label=name, method="kd", data="student_train", teacher=name.split("_")[1], control=name)
    if name == "dpo_swapped":
        return Arm(label=name, method="dpo", data="preferences_swapped", valid="validation_preferences_swapped",
                   start="sft",
                   stage="preference", control=name)
    raise ConfigError(f"Unknown control {name!r}; choose from: {', '.join(CONTROLS)}.")


def plan_arms(methods: list[str], controls: list[str]) -> list[Arm]:
    """The arms in training order: every arm after the arms it starts from or takes a model of."""
    arms = [arm_for(m) for m in methods] + [control_arm(c) for c in controls]
    labels = [a.label for a in arms]
    if len(set(labels)) != len(labels):
        raise ConfigError(f"Each method and control may appear once; got {', '.join(labels)}.")
    needed = {a.start for a in arms if a.start != "init"}
    needed |= {v[1:] for a in arms for v in a.params.values() if isinstance(v, str) and v.startswith("@")}
    for label in sorted(needed - set(labels)):
        if label not in ("sft", "dsft"):
            raise ConfigError(f"An arm starts from {label!r}, which the preset does not train.")
        arms.insert(0, arm_for(label))  # the start a fair comparison needs, trained first
    ordered: list[Arm] = []
    pending = list(arms)
    while pending:
        done = {a.label for a in ordered}
        ready = [a for a in pending if _dependencies(a) <= done]
        if not ready:
            raise ConfigError("The preset's arms depend on each other in a cycle: "
                              + ", ".join(a.label for a in pending))
        ordered.append(ready[0])
        pending.remove(ready[0])
    return ordered


def _dependencies(arm: Arm) -> set[str]:
    deps = {arm.start} - {"init"}
    deps |= {v[1:] for v in arm.params.values() if isinstance(v, str) and v.startswith("@")}
    return deps


def budget_steps(n_rows: int, batch_size: int, epochs: float, checkpoints: int) -> tuple[int, int]:
    """(max_steps, save_steps) for ``epochs`` passes over ``n_rows`` in batches of ``batch_size``, rounded up
    to a whole number of ``checkpoints`` equal intervals (validation and selection points)."""
    steps = max(checkpoints, math.ceil(epochs * n_rows / batch_size))
    save = math.ceil(steps / checkpoints)
    return save * checkpoints, save


__all__ = ["Arm", "CONTROLS", "arm_for", "control_arm", "plan_arms", "budget_steps"]


def stage_params(method: str, preset) -> dict:
    """The preset's own training settings for every stage ``method`` builds itself (its ``*_settings``
    params; ``preset`` is a :class:`kdbench.demo.Preset`).

    The recipes' stage defaults are the papers' settings for pretrained LLMs (an SFT stage at 2e-5 for
    three epochs of batch 128, pi_dpo at 5e-7: docs/methods.md, "Stage settings"); they would leave the
    embedded benchmark's small models untrained. The preset states each stage's learning rate, length and
    batch instead: student stages (the SFT student, dSFT, ADPA+'s DCKD student) as a student run, an SFT
    teacher at the teacher's rate, pi_dpo at ``teacher_dpo_lr``. The length follows the preset's budget
    rule: ``student_epochs`` passes over the stage's data (``preference_epochs`` for pi_dpo), or
    ``student_steps`` steps when the preset has a fixed budget."""
    import dataclasses

    from kdbench.train import TrainConfig
    from kdbench.train.recipes import resolve_recipe
    from kdbench.train.stage_settings import OPTIMIZATION_SETTINGS

    recipe = resolve_recipe(method).params  # the stages it declares bring their *_settings
    # every optimisation setting, so none of the recipe's paper values (warmup, weight decay, ...) mixes in:
    # the demo's own runs' values (TrainConfig's defaults), the preset's length and batch
    defaults = {f.name: f.default for f in dataclasses.fields(TrainConfig) if f.name in OPTIMIZATION_SETTINGS}
    run = {**defaults, "batch_size": preset.batch_size, "grad_accum": 1}

    def length(epochs: float) -> dict:
        if preset.student_epochs > 0:
            return {"max_steps": -1, "num_epochs": float(epochs)}
        return {"max_steps": preset.student_steps}

    student = {**run, **length(preset.student_epochs), "learning_rate": preset.student_lr}
    stages = {"sft_settings": student, "dsft_settings": student, "dckd_settings": student,
              "teacher_sft_settings": {**run, **length(preset.student_epochs), "learning_rate": preset.teacher_lr},
              "teacher_dpo_settings": {**run, **length(preset.preference_epochs),
                                       "learning_rate": preset.teacher_dpo_lr}}
    return {name: dict(settings) for name, settings in stages.items() if name in recipe}


def count_rows(path) -> int:
    with open(path, encoding="utf-8") as handle:
        return sum(1 for line in handle if line.strip())


def arm_train_config(arm: Arm, preset, *, seed: int, corpus_dir, init_dir, teachers: dict, models: dict,
                     output_dir, cache_dir: str | None):
    """The :class:`~kdbench.train.TrainConfig` of ``arm`` at training ``seed``.

    ``preset``: the :class:`kdbench.demo.Preset`; ``teachers``: {"teacher" | control kind: model dir};
    ``models``: {(label, seed): model dir} of the arms trained so far (starts and ``@label`` parameters).
    With ``preset.student_epochs`` the budget is data-scaled (module docstring); otherwise every arm gets
    ``preset.student_steps``, the fixed budget of earlier kdbench versions.
    """
    from kdbench.synthetic.corpus import FILES
    from kdbench.train import TrainConfig
    from kdbench.train.recipes import resolve_recipe

    def model_of(label: str) -> str:
        return str(models[(label, seed)])

    data = corpus_dir / FILES[arm.data]
    preference = arm.stage == "preference"
    epochs = preset.preference_epochs if preference else preset.student_epochs
    if preset.student_epochs > 0:
        max_steps, save_steps = budget_steps(count_rows(data), preset.batch_size, epochs, preset.checkpoints)
    else:
        max_steps, save_steps = preset.student_steps, max(1, preset.student_steps // preset.checkpoints)
    recipe = resolve_recipe(arm.method)
    params = {**stage_params(arm.method, preset),
              **{k: (model_of(v[1:]) if isinstance(v, str) and v.startswith("@") else v) for k, v in arm.params.items()}}
    if "max_new_tokens" in recipe.params:  # no stage generates past what the preset evaluates
        params["max_new_tokens"] = preset.max_new_tokens
    select_metric = "loss" if recipe.kind in ("preference", "guided") else "ce"
    # guided recipes (DCKD, ADPA) have no held-out measure to select on: they keep their last checkpoint
    select = "last" if recipe.kind == "guided" else preset.select
    # an offline top-k teacher covers the gold responses only, not what a sampling form generates (DistiLLM)
    token_level_on_gold = (recipe.objective.name == "token_kd" and recipe.training_data == "responses"
                           and not recipe.sampling_active)
    # MiniLLM's LM term (lm.data: corpus) reads the language world as plain text: the benchmark's language and
    # templates with none of its world's facts (docs/design.md, "What makes it a measuring instrument")
    from kdbench import registry

    declared_lm = registry.get("trainers", arm.method).body.get("lm") or {}
    lm_data = language_text(corpus_dir, output_dir) if declared_lm.get("data") == "corpus" else None
    return TrainConfig(
        method=arm.method, student=str(init_dir) if arm.start == "init" else model_of(arm.start),
        teacher=str(teachers[arm.teacher]), data=str(data), valid_data=str(corpus_dir / FILES[arm.valid]),
        output_dir=str(output_dir), run_name=f"{arm.label}-seed{seed}", seed=seed,
        learning_rate=preset.preference_lr if preference else preset.student_lr, max_steps=max_steps,
        batch_size=preset.batch_size, max_length=256, max_prompt_length=128, prompt_style="compact",
        logging_steps=25, group_by_length=True, cache_dir=cache_dir, save_steps=save_steps,
        select=select, select_metric=select_metric,
        teacher_signal=preset.teacher_signal if token_level_on_gold else "online", lm_data=lm_data, params=params)


def language_text(corpus_dir, output_dir) -> str:
    """The corpus's language world (``language.jsonl``: another world's instances, disjoint names) as a plain-text
    LM corpus ``{"text": prompt + response}`` per line, in the compact prompt style the arms train with; written
    once under ``output_dir``. None of the benchmark world's facts are in it, so an LM term on it teaches
    language without leaking the held-out facts."""
    import json
    from pathlib import Path

    from kdbench.data import format_prompt
    from kdbench.store import atomic_write_text
    from kdbench.synthetic.corpus import FILES

    target = Path(output_dir) / "lm-corpus" / "language_text.jsonl"
    if not target.is_file():
        rows = [json.loads(line) for line in open(Path(corpus_dir) / FILES["language"], encoding="utf-8") if line.strip()]
        text = "".join(json.dumps({"text": format_prompt(r["instruction"], r.get("input", ""), style="compact")
                                           + r["output"]}) + "\n" for r in rows)
        target.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(target, text)
    return str(target)
