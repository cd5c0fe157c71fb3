"""The ``reward_scores`` stage: a reward model's score of every chosen and rejected response, for forms that
read them (DDPO-RM, Fisch et al. 2024: the policy's implicit reward is fitted to a reward model's margin).

Two sources, one per run:

* **the data**: a preference file whose rows carry numeric ``score_chosen`` and ``score_rejected`` (the
  UltraFeedback-binarized convention) — the scores of a reward model someone already ran;
* **a reward model** (``params.reward_model``): a Hugging Face sequence-classification checkpoint with one
  output (``AutoModelForSequenceClassification``, ``num_labels=1``) scoring prompt + response with its own
  tokenizer; once per (model, texts) in the artifact store. This works for generated pairs too.

The scores land in the frozen slot ``reward`` (``reward_chosen`` / ``reward_rejected`` of the batch).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from kdbench.config import option
from kdbench.errors import ConfigError
from kdbench.train.pair_stages import training_pairs, validation_pairs
from kdbench.train.stage_runner import Stage, StageContext, register_stage


@dataclass
class RewardParams:
    reward_model: str | None = option(None, "A reward model (sequence-classification checkpoint with one output) "
                                            "scoring prompt + response; null = the data's score_chosen / score_rejected.")


def _missing_scores(pairs) -> int:
    return sum(1 for p in pairs or [] if p.score_chosen is None or p.score_rejected is None)


def _check(ctx: StageContext) -> None:
    params = ctx.typed(RewardParams)
    if params.reward_model is None:
        if not ctx.pairs_from_data:
            raise ConfigError(f"Method {ctx.config.method} generates its pairs, so no scores come with the data; give "
                              "a reward model with --set params.reward_model=PATH.")
        missing = _missing_scores(ctx.pairs) + _missing_scores(ctx.valid_pairs)
        if missing:
            raise ConfigError(f"{missing} preference pairs have no numeric score_chosen and score_rejected; add them "
                              "to the data or give a reward model with --set params.reward_model=PATH.")
        return
    from transformers import AutoConfig

    from kdbench.models import resolve_model_path

    try:
        config = AutoConfig.from_pretrained(resolve_model_path(params.reward_model))
    except (OSError, ValueError) as error:
        raise ConfigError(f"params.reward_model {params.reward_model} is not a model folder or hub id "
                          f"({str(error).splitlines()[0]}); give a sequence-classification checkpoint.") from None
    if getattr(config, "num_labels", None) != 1:
        raise ConfigError(f"params.reward_model {params.reward_model} has {getattr(config, 'num_labels', '?')} "
                          "outputs; a reward model has exactly one (num_labels=1).")


def score_pairs(model, tokenizer, tokenized: list[dict], batch_size: int) -> dict:
    """A sequence-classification ``model``'s score of every chosen and rejected row of ``tokenized``
    (:func:`kdbench.train.pairs.tokenize_pairs` with its tokenizer): {"chosen": [P], "rejected": [P]} floats."""
    import torch

    from kdbench.train.pairs import pad_rows

    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = pad  # the model finds each row's last token by it (right padding)
    model.eval()
    device = next(model.parameters()).device
    out: dict = {"chosen": [], "rejected": []}
    with torch.no_grad():
        for side in out:
            for start in range(0, len(tokenized), batch_size):
                batch = pad_rows([row[side] for row in tokenized[start:start + batch_size]], pad)
                logits = model(input_ids=batch["input_ids"].to(device),
                               attention_mask=batch["attention_mask"].to(device)).logits
                out[side].extend(float(v) for v in logits[:, 0].float())
    return out


def _model_scores(ctx: StageContext, pairs, label: str) -> tuple[dict, dict]:
    from transformers import AutoModelForSequenceClassification

    from kdbench.models import load_tokenizer, resolve_model_path
    from kdbench.store import atomic_write_json, hash_obj
    from kdbench.teacher_cache import model_fingerprint
    from kdbench.train.pairs import tokenize_pairs

    name = ctx.typed(RewardParams).reward_model
    tokenizer = load_tokenizer(name)
    config = ctx.config
    tokenized = tokenize_pairs(pairs, tokenizer, style=config.prompt_style, max_prompt_length=config.max_prompt_length,
                               max_length=config.max_length)

    def build(tmp: Path) -> dict:
        model = AutoModelForSequenceClassification.from_pretrained(resolve_model_path(name))
        atomic_write_json(tmp / "scores.json", score_pairs(model, tokenizer, tokenized, config.generation_batch_size))
        return {"pairs": len(pairs), "forward_tokens": sum(len(r[s][0]) for r in tokenized for s in ("chosen", "rejected"))}

    ctx.say(f"{label}reward-model scores of {len(pairs)} pairs")
    artifact = ctx.store.get_or_build("reward-scores", {"model": model_fingerprint(name), "sequences": hash_obj(tokenized)},
                                      build, log=ctx.say)
    scores = json.loads((artifact.path / "scores.json").read_text())
    return scores, {"source": name, "reused": artifact.reused, "pairs": len(pairs),
                    "forward_tokens": int(artifact.meta.get("forward_tokens", 0))}


def _reward_scores(ctx: StageContext) -> dict:
    facts = {}
    for prefix, pairs, target in (("", training_pairs(ctx), ctx.frozen), ("valid_", validation_pairs(ctx), ctx.valid_frozen)):
        if not pairs:
            continue
        if ctx.typed(RewardParams).reward_model is None:
            target["reward"] = {"chosen": [p.score_chosen for p in pairs], "rejected": [p.score_rejected for p in pairs]}
            facts[f"{prefix}reward"] = {"source": "data (score_chosen, score_rejected)", "pairs": len(pairs)}
        else:
            target["reward"], facts[f"{prefix}reward"] = _model_scores(ctx, pairs, "validation " if prefix else "")
        margins = [c - r for c, r in zip(target["reward"]["chosen"], target["reward"]["rejected"])]
        facts[f"{prefix}reward"]["mean_margin"] = round(sum(margins) / len(margins), 6)
    return facts


register_stage(Stage("reward_scores", _reward_scores, params=(RewardParams,), check=_check,
                     help="A reward model's scores of every chosen and rejected response (the data's, or a given model's)."))
