"""The preference kind: sequence-level preference recipes (dDPO, rDPO, daDPO, DPKD, DPO / SimPO on a file)
train on (chosen, rejected) pairs with :class:`~kdbench.train.pair_trainer.PairTrainer`.

Where the pairs come from is what the recipe declares (:mod:`kdbench.train.pair_stages`): a pairs file
(``data: pairs``, or DPKD's ``pairs: preference_data``), or the teacher's responses against the original
student's / the starting policy's, or against samples of the policy in every step (DPKD's ``pairs: online``).
The frozen log-probs are the ones the preference form reads (``frozen_logps``); the policy starts where a
``dsft_model`` or ``sft_student`` stage puts it, else at ``--student``.

``pairs: file`` recipes read (prompt, chosen, rejected) from ``--data`` (fields ``instruction`` or ``prompt``,
optional ``input``, ``chosen``, ``rejected``).
"""

from __future__ import annotations

from kdbench.errors import ConfigError
from kdbench.train.pair_stages import check_pair_sources, training_pairs, validation_pairs
from kdbench.train.params import DropoutParams
from kdbench.train.preference_forms import PreferenceParams
from kdbench.train.settings import PAIR_SELECT_METRICS, require_inputs, split_validation
from kdbench.train.stage_runner import StageContext, get_stage

START_STAGES = ("dsft_model", "sft_student")


def keeps_teacher(ctx: StageContext) -> bool:
    """The teacher runs in the training step: the sampling form scores in-step, or a KL term to it."""
    recipe = ctx.recipe
    return (recipe.sampling_active and recipe.sampling_spec.needs_teacher) or recipe.typed(PreferenceParams).kl_weight > 0


def load(ctx: StageContext) -> None:
    """Everything the user gave, checked and loaded before any heavy work or any file is written."""
    from kdbench.data import load_examples
    from kdbench.models import check_same_vocabulary, load_model, load_tokenizer
    from kdbench.train.data_sources import load_text_corpus, resolve_data_path
    from kdbench.train.pairs import load_preference_pairs

    config, recipe = ctx.config, ctx.recipe
    roles = recipe.preference_form.frozen(recipe.form_params)
    from_data = recipe.training_data == "pairs"
    if from_data and "start" in roles.values() and not set(START_STAGES) & set(recipe.stages):
        raise ConfigError(f"Method {config.method} reads pairs from a file, so its reference cannot be the dSFT model; "
                          "use params.reference=student or teacher.")
    stages = [get_stage(name) for name in recipe.stages if name != "train"]
    if recipe.preference_form.needs_rewards and "reward_scores" not in recipe.stages:
        raise ConfigError(f"The {recipe.form_name} form reads reward scores; add the reward_scores stage to recipe "
                          f"{recipe.path.name}'s stages (before train).")
    if recipe.preference_form.mismatched and recipe.sampling_active and recipe.sampling_spec.samples_rejected:
        raise ConfigError(f"The {recipe.form_name} form pairs each prompt with another pair's fixed responses, which "
                          "responses sampled in every step do not have; use params.pairs=offline or preference_data.")
    if recipe.preference_form.mismatched and "frozen_logps" not in recipe.stages:
        raise ConfigError(f"The {recipe.form_name} form reads frozen log-probs of mismatched pairs; add the "
                          f"frozen_logps stage to recipe {recipe.path.name}'s stages (before train).")
    needs_teacher = keeps_teacher(ctx) or "teacher" in roles.values() or any(s.needs_teacher(ctx) for s in stages)
    require_inputs(config, needs_teacher)
    evaluate = config.evaluates
    if evaluate and config.select_metric not in PAIR_SELECT_METRICS:
        raise ConfigError(f"select_metric {config.select_metric} is not measured on preference pairs; use one of "
                          f"{', '.join(PAIR_SELECT_METRICS)}.")
    if config.select == "best" and config.save_steps % (config.eval_steps or config.save_steps):
        raise ConfigError(f"With select=best, save_steps ({config.save_steps}) must be a multiple of eval_steps "
                          f"({config.eval_steps}).")
    weight = recipe.lm_weight(config)
    lm_rows = None
    if weight > 0:
        lm_rows = "corpus" if config.lm_data else ("chosen" if from_data else "gold") if recipe.lm.data == "gold" else None
    ctx.extra["lm_rows"] = lm_rows

    ctx.data_path = resolve_data_path(config.data, store=ctx.store, log=ctx.say)
    pairs = valid_pairs = valid_prompts = None
    if from_data:
        pairs = load_preference_pairs(ctx.data_path)
        prompts = [p.example for p in pairs]
    else:
        ctx.pairs = None
        check_pair_sources(ctx)
        gold = lm_rows == "gold" or any(stage.needs_gold(ctx) for stage in stages)
        prompts = load_examples(ctx.data_path, require_output=gold)
    if not config.valid_data:  # the same split as train() makes for the dSFT / SFT stages: the same prompts
        kept = {id(e) for e in split_validation(prompts, config.valid_fraction, config.seed)[0]}
        if from_data:
            valid_pairs = [p for p in pairs if id(p.example) not in kept]
            pairs = [p for p in pairs if id(p.example) in kept]
        else:
            valid_prompts = [e for e in prompts if id(e) not in kept]
        prompts = [e for e in prompts if id(e) in kept]
    elif evaluate:
        valid_path = resolve_data_path(config.valid_data, default_split="validation", store=ctx.store, log=ctx.say)
        if from_data:
            valid_pairs = load_preference_pairs(valid_path)
        else:
            valid_prompts = load_examples(valid_path, require_output=False)
    if not evaluate:
        valid_pairs = valid_prompts = None
    elif not (valid_pairs or valid_prompts):
        raise ConfigError("select=best and eval_steps need held-out pairs; give --valid-data or a larger valid_fraction.")
    ctx.pairs, ctx.prompts, ctx.valid_pairs, ctx.valid_prompts = pairs, prompts, valid_pairs, valid_prompts
    ctx.tokenizer = load_tokenizer(config.student)
    ctx.teacher_tokenizer = load_tokenizer(config.teacher) if needs_teacher else None
    ctx.extra["lm_blocks"] = load_text_corpus(config.lm_data, ctx.tokenizer, config.max_length) if config.lm_data else None
    if keeps_teacher(ctx):  # the teacher scores the student's own token ids: one vocabulary
        ctx.logit_rows = check_same_vocabulary(ctx.teacher_model().loaded(), ctx.teacher_tokenizer,
                                               load_model(config.student), ctx.tokenizer)


def train(ctx: StageContext):
    """The ``train`` stage of a preference recipe; returns the run's result."""
    from kdbench.data import tokenize_example
    from kdbench.models import load_model
    from kdbench.train.data_sources import LMSource
    from kdbench.train.pair_trainer import PairTrainer
    from kdbench.train.pairs import PairCollator, PairDataset, mismatched_pairs, tokenize_pairs
    from kdbench.train.params import GenerationParams
    from kdbench.train.stages import recipe_decoding

    config, recipe, tokenizer = ctx.config, ctx.recipe, ctx.tokenizer
    family = recipe.typed(PreferenceParams)
    pairs, valid = training_pairs(ctx), validation_pairs(ctx)
    shape = dict(style=config.prompt_style, max_prompt_length=config.max_prompt_length, max_length=config.max_length)
    tokenized = tokenize_pairs(pairs, tokenizer, **shape)
    lm_rows = ctx.extra["lm_rows"]
    gold = None
    if lm_rows == "gold":
        gold = []
        for example in ctx.prompts:
            item = tokenize_example(example, tokenizer, **shape)
            gold.append((item.input_ids, item.labels))
    source = "data" if ctx.pairs_from_data else "online" if recipe.sampling_active else "generated"
    ctx.run.log(f"method={config.method} pairs={len(pairs)} source={source} form={recipe.form_name} "
                f"frozen={','.join(sorted(ctx.frozen)) or '-'} lm={lm_rows or '-'} kl_weight={family.kl_weight}")
    form = recipe.preference_form

    def mismatched(texts):  # KTO's reference point reads (prompt i, pair i+1's responses) rows
        return tokenize_pairs(mismatched_pairs(texts), tokenizer, **shape) if form.mismatched else None

    eval_dataset = PairDataset(tokenize_pairs(valid, tokenizer, **shape), ctx.valid_frozen,
                               mismatched=mismatched(valid)) if valid else None
    sampling = None
    if recipe.sampling_active:
        sampling = recipe.sampling_spec.build(recipe, config, recipe_decoding(config, recipe.typed(GenerationParams)),
                                              tokenizer)
    if keeps_teacher(ctx):
        teacher = ctx.teacher_model().loaded()
    else:
        teacher = None
        ctx.release_models()  # training never runs the teacher
    lm_blocks = ctx.extra["lm_blocks"]
    trainer = PairTrainer(
        model=load_model(ctx.policy), args=ctx.run.arguments(evaluate=bool(valid), group_by_length=False),
        train_dataset=PairDataset(tokenized, ctx.frozen, gold, mismatched(pairs)), eval_dataset=eval_dataset,
        data_collator=PairCollator(tokenizer.pad_token_id), callbacks=ctx.run.callbacks(ctx.callbacks, ctx.progress),
        params=recipe.form_params, form=recipe.preference_form, tokenizer=tokenizer, teacher=teacher,
        sampling=sampling, lm_rows=lm_rows, lm_weight=recipe.lm_weight(config),
        lm_source=LMSource(lm_blocks, config.batch_size, config.seed, tokenizer.pad_token_id) if lm_rows == "corpus" else None,
        kl_weight=family.kl_weight, kl_divergence=family.kl_divergence,
        dropout=not recipe.typed(DropoutParams).disable_dropout, logit_rows=ctx.logit_rows, sharding=config.sharding)
    cost = {"generated_tokens": 0, "frozen_forward_tokens": 0, **ctx.cost, "train_pairs": len(pairs)}
    return ctx.run.train(trainer, tokenizer, validate=eval_dataset is not None, cost=cost)
