"""The guided kind: teacher-guided recipes on preference data (DCKD, ADPA, ADPA+; adpa_dckd.md §3.2–3.3)
train with :class:`~kdbench.train.guided_trainer.GuidedTrainer`.

Their stages (:mod:`kdbench.train.guided_stages`): the teachers π_ref and π_dpo, the student's starting point
(its SFT checkpoint, or ADPA+'s DCKD student), ADPA's ŷ (``policy_responses``: the starting student's
responses, generated once); then CE on y_w plus the guided form's teacher-guided term, the teachers running in
the same step. Teachers and student must share a vocabulary (token-level signals); a mismatch stops the run
before any file is written.
"""

from __future__ import annotations

import dataclasses

from kdbench.errors import ConfigError
from kdbench.train.guided_forms import GuidedParams
from kdbench.train.params import DropoutParams
from kdbench.train.settings import require_inputs, split_validation
from kdbench.train.stage_runner import StageContext


def load(ctx: StageContext) -> None:
    """Everything the user gave, checked and loaded before any heavy work or any file is written."""
    from kdbench.models import check_same_vocabulary, load_model, load_tokenizer
    from kdbench.train.data_sources import resolve_data_path
    from kdbench.train.pairs import load_preference_pairs

    config = ctx.config
    require_inputs(config, True)
    if config.select != "last" or config.eval_steps:
        raise ConfigError(f"Method {config.method} has no validation metric yet (its loss needs the teachers on "
                          "held-out responses); use select=last and eval_steps=0.")
    if config.lm_data:
        raise ConfigError(f"Method {config.method} has no LM-loss term; leave out --lm-data.")
    if getattr(ctx.recipe.form_params, "q_beta", 0.0) is None and not ctx.recipe.params.get("teacher_dpo_beta"):
        raise ConfigError(f"Method {config.method} takes softmax(beta x A) with the DPO teacher's beta, and its recipe "
                          "sets none; give --set params.q_beta=BETA.")
    ctx.data_path = resolve_data_path(config.data, store=ctx.store, log=ctx.say)
    pairs = load_preference_pairs(ctx.data_path)
    if not config.valid_data:  # the same split as the stages' own runs make: the same training prompts
        kept = {id(e) for e in split_validation([p.example for p in pairs], config.valid_fraction, config.seed)[0]}
        pairs = [p for p in pairs if id(p.example) in kept]
    ctx.pairs, ctx.prompts = pairs, [p.example for p in pairs]
    ctx.tokenizer = load_tokenizer(config.student)
    ctx.teacher_tokenizer = load_tokenizer(config.teacher)
    ctx.logit_rows = check_same_vocabulary(load_model(config.teacher, trainable=False), ctx.teacher_tokenizer,
                                           load_model(config.student, trainable=False), ctx.tokenizer)


def train(ctx: StageContext):
    """The ``train`` stage of a guided recipe; returns the run's result."""
    from kdbench.models import load_model
    from kdbench.train.guided_trainer import GuidedTrainer
    from kdbench.train.pairs import Pair, PairCollator, PairDataset, tokenize_pairs

    config, recipe, tokenizer = ctx.config, ctx.recipe, ctx.tokenizer
    form = recipe.guided_form
    pairs = ctx.pairs
    if "policy" in ctx.responses:  # ŷ as the student produced it: its text and the EOS it stopped with
        outputs, ends = ctx.responses["policy"]
        pairs = [Pair(p.example, p.chosen, o.output, rejected_end=end) for p, o, end in zip(pairs, outputs, ends)]
    tokenized = tokenize_pairs(pairs, tokenizer, style=config.prompt_style, max_prompt_length=config.max_prompt_length,
                               max_length=config.max_length)
    policy = ctx.policy or config.student
    ref, dpo = ctx.extra.get("ref_teacher", config.teacher), ctx.extra.get("dpo_teacher", config.teacher)
    ctx.run.log(f"method={config.method} pairs={len(pairs)} form={form.name} start={policy} pi_ref={ref} pi_dpo={dpo}")
    uses_ref = any(model == "ref" for model, _ in form.teachers)
    params = recipe.form_params
    if getattr(params, "q_beta", 0.0) is None:  # Q-softmax-KD's beta is the DPO teacher's unless set
        params = dataclasses.replace(params, q_beta=float(recipe.params.get("teacher_dpo_beta") or 0.0) or None)
    trainer = GuidedTrainer(
        model=load_model(policy), args=ctx.run.arguments(evaluate=False, group_by_length=False),
        train_dataset=PairDataset(tokenized, {}), data_collator=PairCollator(tokenizer.pad_token_id),
        callbacks=ctx.run.callbacks(ctx.callbacks, ctx.progress), params=params, form=form,
        family=recipe.typed(GuidedParams), tokenizer=tokenizer,
        teacher=load_model(dpo, trainable=False, dtype=config.teacher_dtype),
        ref_teacher=load_model(ref, trainable=False, dtype=config.teacher_dtype) if uses_ref else None,
        dropout=not recipe.typed(DropoutParams).disable_dropout, logit_rows=ctx.logit_rows, sharding=config.sharding)
    cost = {"generated_tokens": ctx.cost.get("generated_tokens", 0), "train_pairs": len(pairs)}
    return ctx.run.train(trainer, tokenizer, validate=False, cost=cost)
