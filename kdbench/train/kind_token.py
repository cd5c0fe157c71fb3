"""The token kind: recipes whose objective is token-level (SFT, KD and its divergences, SeqKD / dSFT, GKD,
DPKD's token form) train on response tokens with :class:`~kdbench.train.token_trainer.TokenTrainer`.

:func:`load` checks the settings and loads the data, tokenizers, the student and (where a stage or the
objective needs one) the teacher before the run directory exists; :func:`train` is the recipe's ``train``
stage: the training set — the data's responses, or the teacher's when a ``teacher_responses`` stage ran —,
the sampling form (GKD's on-policy batches), the LM corpus, the teacher signal (online, or the top-k cache of a
``teacher_topk_cache`` stage), and the trainer.
"""

from __future__ import annotations

import functools

from kdbench.errors import ConfigError, DataError
from kdbench.train.settings import TOKEN_SELECT_METRICS, require_inputs, split_validation
from kdbench.train.stage_runner import StageContext, get_stage


def declared_stages(ctx: StageContext) -> list:
    return [get_stage(name) for name in ctx.recipe.stages if name != "train"]


def load(ctx: StageContext) -> None:
    """Everything the user gave, checked and loaded before any heavy work or any file is written."""
    from kdbench.data import load_examples
    from kdbench.models import check_same_vocabulary, load_model, load_tokenizer
    from kdbench.train.data_sources import load_text_corpus, resolve_data_path

    config, recipe, objective = ctx.config, ctx.recipe, ctx.recipe.objective
    if config.select_metric not in TOKEN_SELECT_METRICS:
        raise ConfigError(f"select_metric {config.select_metric} is measured on held-out preference pairs; method "
                          f"{config.method} trains on responses, so use loss, ce or token_accuracy.")
    stages = declared_stages(ctx)
    needs_teacher = objective.needs_teacher or any(stage.needs_teacher(ctx) for stage in stages)
    require_inputs(config, needs_teacher)
    use_cache = objective.needs_teacher and config.teacher_signal == "topk"
    if use_cache and recipe.sampling_active and recipe.sampling_spec.generates:
        raise ConfigError(f"Method {config.method} trains on fresh student samples, which no offline cache can cover; "
                          "use --set teacher_signal=online.")
    if use_cache and objective.cross_tokenizer:
        raise ConfigError(f"Method {config.method} reads the teacher's logits on the teacher's own tokenization, which "
                          "the top-k cache (kept at the student's positions) does not hold; use --set teacher_signal=online.")
    if use_cache and objective.dense_teacher:
        raise ConfigError(f"Method {config.method} needs the teacher's probability of every target token, which the "
                          "top-k cache does not keep for targets outside the top k; use --set teacher_signal=online.")
    if use_cache and "teacher_topk_cache" not in recipe.stages:
        raise ConfigError(f"Method {config.method} declares no teacher_topk_cache stage, so it cannot read an offline "
                          "teacher cache; use --set teacher_signal=online.")
    ctx.data_path = resolve_data_path(config.data, store=ctx.store, log=ctx.say)
    # gold responses: for the training itself, or for a stage that trains on them (teacher_init: sft)
    needs_gold = not any(stage.replaces_responses for stage in stages) or any(stage.needs_gold(ctx) for stage in stages)
    examples = load_examples(ctx.data_path, require_output=needs_gold)
    if config.valid_data:
        train_examples = examples
        valid_examples = load_examples(resolve_data_path(config.valid_data, default_split="validation",
                                                         store=ctx.store, log=ctx.say))
    else:
        train_examples, valid_examples = split_validation(examples, config.valid_fraction, config.seed)
    ctx.prompts = train_examples
    ctx.valid_examples = [e for e in valid_examples if e.output.strip()]  # prompts without gold cannot be scored
    eval_steps = config.eval_steps or config.save_steps
    if config.select == "best" and ctx.valid_examples and config.save_steps % eval_steps:
        raise ConfigError(f"With select=best, save_steps ({config.save_steps}) must be a multiple of eval_steps ({eval_steps}).")
    ctx.tokenizer = load_tokenizer(config.student)
    ctx.extra["student"] = student = load_model(config.student)
    if needs_teacher:
        ctx.teacher_tokenizer = load_tokenizer(config.teacher)
        teacher = ctx.teacher_model().loaded()
        if objective.cross_tokenizer:  # ULD / DSKD: any two tokenizers, each model's own rows
            from kdbench.train.cross_tokenizer import vocabulary_rows

            ctx.logit_rows, ctx.extra["teacher_rows"] = vocabulary_rows(teacher, ctx.teacher_tokenizer, student,
                                                                         ctx.tokenizer)
        elif objective.needs_teacher:  # token-level signal; a generating-only teacher (seqkd, dsft) may differ
            ctx.logit_rows = check_same_vocabulary(teacher, ctx.teacher_tokenizer, student, ctx.tokenizer)
    ctx.extra["lm_blocks"] = load_text_corpus(config.lm_data, ctx.tokenizer, config.max_length) if config.lm_data else None
    if use_cache and config.teacher_topk > ctx.logit_rows:
        raise ConfigError(f"Setting teacher_topk ({config.teacher_topk}) exceeds the vocabulary size {ctx.logit_rows}.")
    ctx.extra["token_datasets"] = functools.cache(lambda: datasets(ctx))


def datasets(ctx: StageContext):
    """(training set, validation set or None): the responses trained on — each ending with the EOS its model
    emitted (none if cut) — tokenized with the student's tokenizer; the validation set keeps the gold."""
    from kdbench.data import SFTDataset, build_dataset
    from kdbench.train.responses import GOLD_END, tokenize_response

    config = ctx.config
    examples, ends = ctx.responses.get("teacher", (ctx.prompts, [GOLD_END] * len(ctx.prompts)))
    train_set = SFTDataset([tokenize_response(e, ctx.tokenizer, style=config.prompt_style,
                                              max_prompt_length=config.max_prompt_length,
                                              max_length=config.max_length, end=end)
                            for e, end in zip(examples, ends)])
    valid_set = build_dataset(ctx.valid_examples, ctx.tokenizer, style=config.prompt_style,
                              max_prompt_length=config.max_prompt_length,
                              max_length=config.max_length) if ctx.valid_examples else None
    if not train_set.n_response_tokens:
        raise DataError(f"The {len(train_set)} training examples hold no response tokens after tokenization "
                        f"(max_length={config.max_length}); check the data's outputs and the student's tokenizer.")
    if train_set.n_truncated:
        ctx.say(f"warning: {train_set.n_truncated} of {len(train_set)} training examples were truncated "
                f"(max_prompt_length={config.max_prompt_length}, max_length={config.max_length})")
    if ctx.recipe.objective.cross_tokenizer:  # the teacher's own tokenization of the same examples
        from kdbench.train.cross_tokenizer import CrossTokenizerDataset, teacher_items

        shape = dict(style=config.prompt_style, max_prompt_length=config.max_prompt_length, max_length=config.max_length)
        train_set = CrossTokenizerDataset(train_set, teacher_items(examples, ends, ctx.teacher_tokenizer, **shape))
        if valid_set is not None:
            valid_set = CrossTokenizerDataset(valid_set, teacher_items(ctx.valid_examples, [GOLD_END] * len(valid_set),
                                                                       ctx.teacher_tokenizer, **shape))
    signal = config.teacher_signal if ctx.recipe.objective.needs_teacher else "-"
    ctx.run.log(f"method={config.method} train={len(train_set)} valid={len(valid_set) if valid_set else 0} "
                f"truncated={train_set.n_truncated} teacher_signal={signal}")
    return train_set, valid_set


def cross_tokenizer_collator(ctx: StageContext):
    from kdbench.train.cross_tokenizer import CrossTokenizerCollator

    teacher = ctx.teacher_tokenizer
    pad = teacher.pad_token_id if teacher.pad_token_id is not None else teacher.eos_token_id
    return CrossTokenizerCollator(ctx.tokenizer.pad_token_id, pad)


def train(ctx: StageContext):
    """The ``train`` stage of a token recipe; returns the run's :class:`~kdbench.train.settings.TrainResult`."""
    from kdbench.train.data_sources import IndexedDataset, LMSource, TrainCollator
    from kdbench.train.params import GenerationParams
    from kdbench.train.stages import recipe_decoding
    from kdbench.train.token_trainer import TokenTrainer

    config, recipe, objective, tokenizer = ctx.config, ctx.recipe, ctx.recipe.objective, ctx.tokenizer
    train_set, valid_set = ctx.extra["token_datasets"]()
    evaluate = valid_set is not None and config.evaluates
    sampling = None
    if recipe.sampling_active:
        decoding = recipe_decoding(config, recipe.typed(GenerationParams))
        sampling = recipe.sampling_spec.build(recipe, config, decoding, tokenizer)
    lm_blocks = ctx.extra["lm_blocks"]
    lm_source = LMSource(lm_blocks, config.batch_size, config.seed, tokenizer.pad_token_id) if lm_blocks else None
    train_cache, valid_cache = ctx.caches
    teacher = ctx.teacher_model().loaded() if objective.needs_teacher and train_cache is None else None
    if objective.cross_tokenizer:  # the datasets carry the teacher's rows already
        wrap, collator = (lambda data: data), cross_tokenizer_collator(ctx)
    else:
        wrap, collator = IndexedDataset, TrainCollator(tokenizer.pad_token_id)
    trainer = TokenTrainer(model=ctx.extra.pop("student"), args=ctx.run.arguments(evaluate=evaluate),
                           train_dataset=wrap(train_set),
                           eval_dataset=wrap(valid_set) if valid_set is not None else None,
                           data_collator=collator, teacher_rows=ctx.extra.get("teacher_rows"),
                           callbacks=ctx.run.callbacks(ctx.callbacks, ctx.progress), objective=objective,
                           params=recipe.objective_params, teacher=teacher, teacher_cache=train_cache,
                           eval_teacher_cache=valid_cache, sampling=sampling, lm_source=lm_source,
                           lm_weight=recipe.lm_weight(config), tokenizer=tokenizer, logit_rows=ctx.logit_rows,
                           sharding=config.sharding)
    cost = {**ctx.cost, "train_examples": len(train_set), "response_tokens_per_epoch": train_set.n_response_tokens,
            "teacher_signal": config.teacher_signal if objective.needs_teacher else None}
    loaded_teacher = ctx.teacher_model().loaded() if objective.needs_teacher or "teacher_responses" in recipe.stages \
        else None
    return ctx.run.train(trainer, tokenizer, validate=valid_set is not None, cost=cost, teacher=loaded_teacher)
