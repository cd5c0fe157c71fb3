"""The schema of a ``trainers/`` file: every key documented, checked, and read by the training package.

The top-level keys are fixed (:data:`TRAINERS`); which ``params`` a file may hold depends on what it declares —
its objective (or family and the family's forms), its stages and its sampling form each bring their typed
parameter groups (:func:`kdbench.train.recipes.valid_parameters`) — so a ``params`` key nobody reads is an
unknown key, one sentence naming the file and the valid keys. The registry validates every recipe file
against this when it loads the kind (:data:`kdbench.registry_schemas.SCHEMAS`).
"""

from __future__ import annotations

from kdbench.errors import ConfigError
from kdbench.schema import DESCRIPTION, NAME, Key, Schema, mapping, number, text, text_list
from kdbench.train import guided_stages, pair_stages, reward_stage  # noqa: F401 - their stages join the stage registry
from kdbench.train import second_tier_forms  # noqa: F401 - WPO, PLaD, DDPO-RM, dKTO join the preference forms
from kdbench.train import second_tier_token_forms  # noqa: F401 - the atkd objective, the Q-KD guided forms
from kdbench.train import cross_tokenizer  # noqa: F401 - the uld objective (token-level KD across tokenizers)
from kdbench.train import distillm, distillm2, dppo, minillm  # noqa: F401 - their objectives and sampling forms join the registries
from kdbench.train.guided_forms import GUIDED_FORMS
from kdbench.train.objectives import Objective, get_objective
from kdbench.train.params import group_fields
from kdbench.train.preference_forms import PREFERENCE_FORMS
from kdbench.train.sampling import get_sampling_form
from kdbench.train.stage_runner import get_stage

#: The parameter choosing the form of a family with several losses.
FORM_PARAMETER = {"preference": "preference_form", "guided": "guided_form"}


def family_forms(kind: str) -> dict:
    """The forms of a family (name -> record with a ``params`` dataclass); none for token objectives."""
    return {"preference": PREFERENCE_FORMS, "guided": GUIDED_FORMS}.get(kind, {})


def recipe_groups(objective: Objective, stages, sampling: str | None) -> list[type]:
    """The typed parameter groups of a recipe, its family's forms excepted (those depend on the chosen form)."""
    groups = list(objective.params)
    for name in stages:
        if name != "train":
            groups += get_stage(name).params
    if sampling:
        groups += get_sampling_form(sampling).params
    return list(dict.fromkeys(groups))


def valid_parameters(objective: Objective, stages, sampling: str | None) -> list[str]:
    """Every parameter name a recipe made of these pieces may hold (sorted)."""
    names = set()
    for group in recipe_groups(objective, stages, sampling) + [f.params for f in family_forms(objective.kind).values()]:
        names |= set(group_fields(group))
    return sorted(names)


def check_structure(body: dict, where: str) -> tuple[Objective, tuple[str, ...], str | None]:
    """The objective, stages and sampling form a recipe body names, checked (one sentence each)."""
    objective = get_objective(str(body.get("objective")))
    stages = tuple(body.get("stages") or ())
    for name in stages:
        if name != "train":
            get_stage(name)
    if not stages or stages[-1] != "train" or stages.count("train") != 1:
        raise ConfigError(f"{where} must end its stages with train (once), e.g. stages: [train].")
    sampling = body.get("sampling")
    if sampling:
        spec = get_sampling_form(sampling)
        if objective.kind not in spec.kinds:
            raise ConfigError(f"{where} uses sampling {sampling}, which works with {', '.join(spec.kinds)} objectives, "
                              f"not {objective.kind}.")
    return objective, stages, sampling




def _objectives() -> list[str]:
    from kdbench.train.objectives import OBJECTIVES

    return list(OBJECTIVES)


def _stages() -> list[str]:
    from kdbench.train.stage_runner import STAGES

    return [*STAGES, "train"]


def _sampling_forms() -> list[str]:
    from kdbench.train.sampling import SAMPLING_FORMS

    return list(SAMPLING_FORMS)


def check_recipe(body: dict) -> str | None:
    """The recipe's structure (objective, stages ending with train, sampling for its kind) and its ``params``
    (and each alias's) against the parameters its pieces declare."""
    try:
        objective, stages, sampling = check_structure(body, "the recipe")
    except ConfigError as err:
        return str(err)
    valid = valid_parameters(objective, stages, sampling)
    sources = [("params", body.get("params") or {})]
    sources += [(f"aliases.{alias}.params", (spec or {}).get("params") or {})
                for alias, spec in (body.get("aliases") or {}).items()]
    for where, params in sources:
        for name in params:
            if name not in valid:
                return (f"unknown key '{where}.{name}'; valid keys here are {', '.join(valid) or '(none)'} "
                        "(the parameters of the recipe's objective, forms, stages and sampling form).")
    return None


ALIAS = Schema({
    "description": text("One-line description of the alias (a method name of its own)."),
    "params": Key((dict,), "Parameter overrides of the alias (checked like params)."),
})

TRAINERS = Schema({
    "name": NAME,
    "description": DESCRIPTION,
    "citation": text("The papers and code the recipe follows (shown in the model card and the report)."),
    "objective": text("The objective (kdbench.train.objectives): the trainer family and, for token-level "
                      "objectives, the loss.", required=True, choices=_objectives),
    "data": text("What --data holds: responses (instruction, input, output), prompts (outputs not needed) or pairs "
                 "(chosen, rejected); the embedded benchmark gives each recipe this.", required=True,
                 choices=("responses", "prompts", "pairs")),
    "stages": text_list("The stages, in order, ending with train (kdbench.train.stage_runner).", required=True,
                        choices=_stages),
    "sampling": text("What is sampled from whom during training (kdbench.train.sampling).", choices=_sampling_forms),
    "lm": mapping("The LM-loss term.", {
        "weight": number("Its weight when the run sets none (lm_weight)."),
        "data": text("corpus: only with --lm-data; gold: without --lm-data, the gold responses.",
                     choices=("corpus", "gold")),
    }),
    "params": Key((dict,), "The method's parameters (those of its objective, forms, stages and sampling form)."),
    "aliases": Key((dict,), "Further method names defined by parameter overrides of this recipe.", values=ALIAS),
}, check=check_recipe)
