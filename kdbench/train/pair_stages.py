"""The preference family's pairs and its ``frozen_logps`` stage.

A preference recipe trains on (chosen, rejected) pairs: read from the data (a pairs file), or assembled from
its response stages — chosen = the teacher's responses (``teacher_responses``), rejected = the original
student's (``student_responses``) or the starting policy's (``policy_responses``), or sampled from the policy
in every step by the recipe's sampling form (``online_rejected``: a placeholder until then).

``frozen_logps`` computes exactly the frozen log-probs the recipe's preference form declares it reads
(:attr:`kdbench.train.preference_forms.PreferenceForm.frozen`), each model scoring the texts with its own
tokenizer, once per model and pair set (artifact store) — except those the sampling form computes in the step.
"""

from __future__ import annotations

from kdbench.errors import ConfigError
from kdbench.train.stage_runner import Stage, StageContext, register_stage, skipped

REJECTED_ROLES = ("student", "policy")


def rejected_role(ctx: StageContext) -> str | None:
    """Which response stage gives the pairs' rejected responses (None: sampled online or from the data)."""
    declared = [role for role in REJECTED_ROLES if f"{role}_responses" in ctx.recipe.stages]
    return declared[0] if declared else None


def _pairs_of(prompts, responses: dict, online: bool):
    from kdbench.train.pairs import Pair

    teacher_outputs, teacher_ends = responses["teacher"]
    role = next((r for r in REJECTED_ROLES if r in responses), None)
    if role is None or online:  # y_s is sampled in every step; the pair's rejected text is a placeholder until then
        rejected, rejected_ends = [t.output for t in teacher_outputs], teacher_ends
    else:
        outputs, rejected_ends = responses[role]
        rejected = [s.output for s in outputs]
    return [Pair(e, t.output, s, t_end, s_end)
            for e, t, s, t_end, s_end in zip(prompts, teacher_outputs, rejected, teacher_ends, rejected_ends)]


def training_pairs(ctx: StageContext) -> list:
    """The pairs the policy trains on (each response ending with the EOS its model emitted, none if cut)."""
    if ctx.pairs_from_data:
        return ctx.pairs
    online = ctx.recipe.sampling_active and ctx.recipe.sampling_spec.samples_rejected
    return _pairs_of(ctx.prompts, ctx.responses, online)


def validation_pairs(ctx: StageContext) -> list | None:
    """The held-out pairs: from the data, or the teacher's and the generating stage's responses to the held-out
    prompts (fixed: y_s of the starting policy even when training samples it online)."""
    if ctx.valid_pairs is not None:
        return ctx.valid_pairs
    if ctx.valid_prompts:
        return _pairs_of(ctx.valid_prompts, ctx.valid_responses, False)
    return None


def check_pair_sources(ctx: StageContext) -> None:
    """A recipe that generates its pairs needs the teacher's responses and a source of rejected responses."""
    if ctx.pairs_from_data:
        return
    online = ctx.recipe.sampling_active and ctx.recipe.sampling_spec.samples_rejected
    if "teacher_responses" not in ctx.recipe.stages or not (online or rejected_role(ctx)):
        raise ConfigError(f"Recipe {ctx.recipe.path.name} generates its pairs but declares no teacher_responses stage "
                          "and student_responses / policy_responses stage (or online sampling); add them to its "
                          "stages, or give a preference file with data: pairs.")


def frozen_model(ctx: StageContext, role: str):
    """(model name, loader, tokenizer, label) of the model a frozen-log-prob slot role names."""
    if role == "teacher":
        return ctx.teacher, ctx.teacher_model, ctx.teacher_tokenizer, "teacher"
    source = ctx.config.student if role == "student" else ctx.policy
    label = "reference (the original student)" if source == ctx.config.student else "reference (dSFT model)"
    return source, ctx.model(source).loaded, ctx.tokenizer, label


def _frozen_logps(ctx: StageContext) -> dict:
    from kdbench.train.pairs import mismatched_pairs
    from kdbench.train.stages import frozen_logps

    recipe = ctx.recipe
    form = recipe.preference_form
    slots = form.frozen(recipe.form_params)
    in_step = recipe.sampling_spec.computes if recipe.sampling_active else frozenset()
    pairs, valid = training_pairs(ctx), validation_pairs(ctx)
    sets = [("", "", pairs, ctx.frozen)] + ([("valid_", "validation ", valid, ctx.valid_frozen)] if valid else [])
    if form.mismatched:  # KTO's mismatched rows (prompt i, pair i+1's responses), scored by the same models
        sets += [("", "mismatched ", mismatched_pairs(pairs), ctx.frozen)]
        sets += [("valid_", "validation mismatched ", mismatched_pairs(valid), ctx.valid_frozen)] if valid else []
    facts: dict = {}
    for slot, role in slots.items():
        source, loader, tokenizer, label = frozen_model(ctx, role)
        for prefix, what, texts, target in sets:
            name = f"{slot}_mismatched" if "mismatched" in what else slot
            if slot in in_step and not prefix:
                continue
            target[name], facts[f"{prefix}{name}"] = frozen_logps(ctx.store, f"{what}{label}", source, loader,
                                                                   tokenizer, texts, ctx.config, ctx.say)
    ctx.cost["frozen_forward_tokens"] = sum(f["forward_tokens"] for f in facts.values())
    ctx.cost["logprobs_reused"] = all(f["reused"] for f in facts.values())
    if not facts:
        return skipped(f"the {recipe.form_name} form reads no frozen log-probs before training")
    return facts


register_stage(Stage("frozen_logps", _frozen_logps,
                     needs_teacher=lambda ctx: "teacher" in ctx.recipe.preference_form.frozen(ctx.recipe.form_params).values(),
                     help="The frozen log-probs the preference form reads (reference and / or teacher), once."))
