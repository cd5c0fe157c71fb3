"""Declared stages and the one runner that executes them.

A recipe lists its stages in order (``stages: [prepare_teacher, teacher_responses, train]``); each name is a
:class:`Stage` record of :data:`STAGES`. :func:`run_stages` runs them on one :class:`StageContext` — the run's
settings, recipe, data and the models each role currently points at — and records each stage's facts under
its name in the run's ``stages.json`` (:class:`kdbench.store.StageRecords`). The last stage is always
``train``: the recipe's kind builds its trainer there (:data:`kdbench.train.api.KINDS`, ``kind_*.py``).

The building blocks the stages call are cached in the artifact store by their inputs
(:mod:`kdbench.train.stages`), so a rerun — or another method on the same data — reuses them. A stage with
nothing to do for the recipe's parameters (``teacher_init: given``, pairs read from the data) records why it
was skipped. The shared stages are here; a family's own live with it (``frozen_logps`` in
:mod:`kdbench.train.pair_stages`, the π_ref / π_dpo / DCKD-student stages in :mod:`kdbench.train.guided_stages`);
adding one is a :func:`register_stage` call.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Callable

from kdbench.errors import ConfigError
from kdbench.train.params import DSFTParams, GenerationParams, PolicyStartParams, TeacherInitParams


@dataclass
class StageContext:
    """Everything the stages of one run share. The recipe's kind fills the data before the run directory
    exists (``prompts`` are the training examples — with gold outputs where the stages need them —,
    ``pairs`` the preference pairs of a pairs file); stages update the model roles (``teacher``, ``policy``)
    and add their outputs (``responses``, ``frozen``, ``caches``, ``cost``)."""

    config: Any  # TrainConfig
    recipe: Any  # kdbench.train.recipes.Recipe
    store: Any  # ArtifactStore
    say: Callable[[str], None]
    train_recipe: Callable  # kdbench.train.api.train: a model stage trains another recipe
    run: Any = None  # kdbench.train.run.TrainRun, once opened
    command: list | None = None
    progress: bool = True
    callbacks: list | None = None
    clock: Any = None
    data_path: str = ""
    prompts: list = field(default_factory=list)
    valid_prompts: list | None = None  # held-out prompts whose responses a stage generates too
    valid_examples: list | None = None
    pairs: list | None = None  # (prompt, chosen, rejected) pairs read from the data
    valid_pairs: list | None = None
    tokenizer: Any = None
    teacher_tokenizer: Any = None
    logit_rows: int | None = None
    teacher: str | None = None  # the teacher every later stage and the step use
    policy: str = ""  # where the trained model starts
    responses: dict = field(default_factory=dict)  # role -> (examples with generated outputs, ends)
    valid_responses: dict = field(default_factory=dict)
    frozen: dict = field(default_factory=dict)  # slot -> {"chosen": [...], "rejected": [...]}
    valid_frozen: dict = field(default_factory=dict)
    caches: list = field(default_factory=lambda: [None, None])
    cost: dict = field(default_factory=dict)
    extra: dict = field(default_factory=dict)  # a family's own state between its stages
    _models: dict = field(default_factory=dict)

    @property
    def pairs_from_data(self) -> bool:
        return self.pairs is not None

    def model(self, path: str, **load_kwargs):
        """The frozen model at ``path``, loaded on first use and shared by the stages (a cached stage whose
        artifact exists never loads it)."""
        from kdbench.models import lazy_model

        key = (str(path), tuple(sorted(load_kwargs.items())))
        if key not in self._models:
            self._models[key] = lazy_model(str(path), **{"trainable": False, **load_kwargs})
        return self._models[key]

    def teacher_model(self):
        """The current teacher (``teacher`` role), frozen, in the run's teacher dtype."""
        return self.model(self.teacher, dtype=self.config.teacher_dtype)

    def release_models(self) -> None:
        """Drop every frozen model loaded so far (training keeps only what it needs)."""
        self._models.clear()

    def typed(self, group: type):
        return self.recipe.typed(group)

    def gold_file(self) -> str:
        """The data a stage that fine-tunes on gold responses trains on: ``--data``, or the pairs' (prompt,
        chosen) when the pairs come from the data."""
        from kdbench.train.stages import chosen_as_examples

        return chosen_as_examples(self.pairs, self.run.dir) if self.pairs_from_data else self.config.data


@dataclass(frozen=True)
class Stage:
    """One stage a recipe can declare.

    ``run(ctx) -> facts`` does the work (through the cached building blocks) and returns what is recorded in
    ``stages.json`` (``{"skipped": reason}`` when there was nothing to do). ``check(ctx)`` validates what the
    user gave before any file is written. ``params``: its typed parameter groups (they become valid keys of
    the recipe's ``params``). ``needs_teacher(ctx)``: the stage runs the teacher. ``needs_gold(ctx)``: it
    trains on the data's gold responses. ``replaces_responses``: it produces the responses the recipe trains
    on (the data's outputs are not needed).
    """

    name: str
    run: Callable[[StageContext], dict]
    params: tuple[type, ...] = ()
    check: Callable[[StageContext], None] | None = None
    needs_teacher: Callable[[StageContext], bool] = lambda ctx: False
    needs_gold: Callable[[StageContext], bool] = lambda ctx: False
    replaces_responses: bool = False
    help: str = ""


#: Every stage a recipe can declare; extend with :func:`register_stage`. ``train`` is always last.
STAGES: dict[str, Stage] = {}


def register_stage(stage: Stage, *, replace: bool = False) -> Stage:
    if stage.name in STAGES and not replace:
        raise ConfigError(f"A stage named {stage.name!r} is already registered; pick another name.")
    STAGES[stage.name] = stage
    return stage


def get_stage(name: str) -> Stage:
    if name not in STAGES:
        raise ConfigError(f"Recipe names unknown stage {name!r}; known: {', '.join(STAGES)}.")
    return STAGES[name]


def run_stages(ctx: StageContext, train: Callable[[StageContext], Any]):
    """Run the recipe's declared stages in order, recording each one's facts; ``train`` runs the final
    ``train`` stage and returns the run's result."""
    for name in ctx.recipe.stages:
        if name == "train":
            return train(ctx)
        facts = get_stage(name).run(ctx)
        ctx.run.mark(name, facts if facts is not None else {})
    raise ConfigError(f"Recipe {ctx.recipe.name} declares no train stage; end its stages with train.")


def skipped(reason: str) -> dict:
    return {"skipped": reason}


# ------------------------------------------------------------------------------------------ teacher preparation
def _prepare_teacher(ctx: StageContext) -> dict:
    from kdbench.train.stages import prepared_teacher

    init = ctx.typed(TeacherInitParams)
    if init.teacher_init != "sft":
        return skipped("teacher_init: given (--teacher is already fine-tuned on the task)")
    ctx.teacher, facts = prepared_teacher(ctx.config, init, ctx.store, ctx.run.dir, ctx.say, ctx.gold_file(),
                                          train_recipe=ctx.train_recipe)
    ctx.release_models()  # every later stage and the step use the prepared teacher
    return facts


register_stage(Stage("prepare_teacher", _prepare_teacher, (TeacherInitParams,), needs_teacher=lambda ctx: True,
                     needs_gold=lambda ctx: ctx.typed(TeacherInitParams).teacher_init == "sft",
                     help="teacher_init: sft fine-tunes --teacher on the task first (cached, shared)."))


# ------------------------------------------------------------------------------------------ generated responses
def _generate(ctx: StageContext, role: str, generator: str, tokenizer, kind: str) -> dict:
    """Responses of ``generator`` to the training prompts (unless sampled online) and the held-out prompts."""
    from kdbench.train.stages import generation_stage, recipe_decoding

    generation = ctx.typed(GenerationParams)
    decoding = recipe_decoding(ctx.config, generation)
    model = ctx.teacher_model() if role == "teacher" else ctx.model(generator)
    facts: dict = {}
    online = role != "teacher" and ctx.recipe.sampling_active and ctx.recipe.sampling_spec.samples_rejected
    if not online:
        outputs, ends, facts = generation_stage(ctx.config, generation.generation_seed, decoding, model, tokenizer,
                                                ctx.prompts, ctx.run.dir, ctx.store, ctx.say, model_name=generator,
                                                kind=kind)
        ctx.responses[role] = (outputs, ends)
        ctx.cost["generated_tokens"] = ctx.cost.get("generated_tokens", 0) + facts["generated_tokens"]
        ctx.cost["generation_reused"] = ctx.cost.get("generation_reused", True) and facts["reused"]
        ctx.cost["generation_seconds"] = ctx.cost.get("generation_seconds", 0.0) + facts["build_seconds"]
    if ctx.valid_prompts:
        outputs, ends, valid = generation_stage(ctx.config, generation.generation_seed, decoding, model, tokenizer,
                                                ctx.valid_prompts, ctx.run.dir, ctx.store, ctx.say,
                                                model_name=generator, kind=kind)
        ctx.valid_responses[role] = (outputs, ends)
        ctx.cost["generated_tokens"] = ctx.cost.get("generated_tokens", 0) + valid["generated_tokens"]
        facts = {**facts, "validation": valid}
    if online and not ctx.valid_prompts:
        return skipped(f"the rejected responses are sampled from the policy in every step ({ctx.recipe.sampling})")
    return facts


def _teacher_responses(ctx: StageContext) -> dict:
    if ctx.pairs_from_data:
        return skipped("the pairs come from the data")
    return _generate(ctx, "teacher", ctx.teacher, ctx.teacher_tokenizer, "teacher-generations")


def _student_responses(ctx: StageContext) -> dict:
    if ctx.pairs_from_data:
        return skipped("the pairs come from the data")
    return _generate(ctx, "student", ctx.config.student, ctx.tokenizer, "student-generations")


def _policy_responses(ctx: StageContext) -> dict:
    if ctx.pairs_from_data and ctx.recipe.kind != "guided":
        return skipped("the pairs come from the data")
    return _generate(ctx, "policy", ctx.policy, ctx.tokenizer, "student-generations")


register_stage(Stage("teacher_responses", _teacher_responses, (GenerationParams,), needs_teacher=lambda ctx: True,
                     replaces_responses=True,
                     help="The teacher's responses to the training prompts (y_t; SeqKD's data), generated once."))
register_stage(Stage("student_responses", _student_responses, (GenerationParams,),
                     help="The original student's responses (y_s of dDPO / daDPO), generated once."))
register_stage(Stage("policy_responses", _policy_responses, (GenerationParams,),
                     help="The starting policy's responses (ADPA's y-hat; DPKD's offline y_s), generated once."))


# ------------------------------------------------------------------------------------------ the policy's start
def _sft_student(ctx: StageContext) -> dict:
    from kdbench.train.stages import policy_start

    ctx.policy, facts = policy_start(ctx.config, ctx.typed(PolicyStartParams), ctx.store, ctx.run.dir, ctx.say,
                                     ctx.gold_file(), train_recipe=ctx.train_recipe)
    return facts


def _check_sft_student(ctx: StageContext) -> None:
    from kdbench.train.stages import given_model

    given_model(ctx.typed(PolicyStartParams).sft_model, "sft_model", "an SFT student checkpoint", ctx.tokenizer)


def _dsft_model(ctx: StageContext) -> dict:
    from kdbench.train.stages import dsft_model

    config = dataclasses.replace(ctx.config, teacher=ctx.teacher)
    path, facts = dsft_model(config, ctx.typed(DSFTParams), ctx.typed(GenerationParams), ctx.store, ctx.run.dir,
                             ctx.say, train_recipe=ctx.train_recipe)
    ctx.policy = str(path)
    ctx.cost["dsft_reused"] = bool(facts.get("reused", True))
    return facts


def _check_dsft_model(ctx: StageContext) -> None:
    from kdbench.train.stages import given_model

    given_model(ctx.typed(DSFTParams).dsft_model, "dsft_model", "a dSFT checkpoint", ctx.tokenizer)


register_stage(Stage("sft_student", _sft_student, (PolicyStartParams,), check=_check_sft_student,
                     needs_gold=lambda ctx: (ctx.typed(PolicyStartParams).init == "sft"
                                             and not ctx.typed(PolicyStartParams).sft_model),
                     help="The policy starts from the student's SFT checkpoint (init: sft, cached) or --student."))
register_stage(Stage("dsft_model", _dsft_model, (DSFTParams, GenerationParams), check=_check_dsft_model,
                     needs_teacher=lambda ctx: True,
                     help="The policy starts from the dSFT model: the student fine-tuned on the teacher's responses."))


# ------------------------------------------------------------------------------------------ the teacher's signal
def _teacher_topk_cache(ctx: StageContext) -> dict:
    """The offline top-k teacher signal on the token kind's training and validation sets (teacher_signal:
    topk); training then reads the cache only."""
    from kdbench.train.stages import topk_cache_stage

    if ctx.config.teacher_signal != "topk" or not ctx.recipe.objective.needs_teacher:
        return skipped("teacher_signal: online (the teacher runs in every step)")
    train_set, valid_set = ctx.extra["token_datasets"]()
    ctx.caches, facts, cost = topk_cache_stage(ctx.config, ctx.teacher_model(), ctx.teacher, [train_set, valid_set],
                                               temperature=float(getattr(ctx.recipe.objective_params, "temperature", 1.0)),
                                               vocab_size=ctx.logit_rows, pad_token_id=ctx.tokenizer.pad_token_id,
                                               store=ctx.store, say=ctx.say)
    ctx.cost.update(cost)
    return facts


register_stage(Stage("teacher_topk_cache", _teacher_topk_cache, needs_teacher=lambda ctx: True,
                     help="teacher_signal: topk runs the teacher once over the data into an offline top-k cache."))
