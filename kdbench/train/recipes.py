"""Recipes: a ``trainers/`` file resolved into a typed :class:`Recipe`.

A recipe file declares what a method is made of (its schema: :mod:`kdbench.train.recipe_schema`)::

    name: ddpo
    objective: preference          # kdbench.train.objectives: the trainer family (kind) and its loss
    data: prompts                  # what --data holds: responses | prompts | pairs
    stages: [dsft_model, teacher_responses, student_responses, frozen_logps, train]
    sampling: online_rejected      # optional: what is sampled from whom during training (kdbench.train.sampling)
    lm: {weight: 0.5, data: gold}  # optional: the LM-loss term's default weight and its data without --lm-data
    params: {preference_form: dpo, beta: 0.1, ...}

Its ``params`` are exactly the fields of the typed parameter groups of its objective (or its family and the
family's forms), its stages and its sampling form (:mod:`kdbench.train.params`): :func:`resolve_recipe` fills
each group's defaults, the file's values and the user's overrides (``--set params.NAME=VALUE``), rejects an
unknown name listing the valid ones, and checks every group.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kdbench import registry
from kdbench.errors import ConfigError
from kdbench.train.guided_forms import get_guided_form
from kdbench.train.objectives import Objective
from kdbench.train.params import check_group, group_defaults, group_fields
from kdbench.train.preference_forms import get_preference_form
from kdbench.train.recipe_schema import (FORM_PARAMETER, check_structure, family_forms, recipe_groups,
                                         valid_parameters)
from kdbench.train.sampling import SamplingSpec, get_sampling_form

@dataclass(frozen=True)
class LMTerm:
    """The LM-loss term: ``weight`` when ``--lm-weight`` / ``lm_weight`` is not set; ``data``: ``corpus`` (only
    with ``--lm-data``) or ``gold`` (without ``--lm-data``, the gold responses: DPKD)."""

    weight: float = 0.5
    data: str = "corpus"


@dataclass
class Recipe:
    """A resolved recipe (module docstring): the registry entry's declarations and its checked parameters."""

    name: str
    description: str
    citation: str
    path: Path
    objective: Objective
    data: str
    stages: tuple[str, ...]
    sampling: str | None
    lm: LMTerm
    params: dict
    alias_of: str | None = None
    _typed: dict = field(default_factory=dict, repr=False)

    @property
    def kind(self) -> str:
        return self.objective.kind

    def typed(self, group: type) -> Any:
        """The recipe's parameters of ``group`` as a checked instance."""
        if group not in self._typed:
            self._typed[group] = check_group(group, self.params)
        return self._typed[group]

    @property
    def objective_params(self) -> Any:
        """The typed parameters a token objective's loss takes (None without any)."""
        return self.typed(self.objective.params[0]) if self.objective.params and self.kind == "token" else None

    @property
    def form_name(self) -> str | None:
        parameter = FORM_PARAMETER.get(self.kind)
        return self.params.get(parameter) if parameter else None

    @property
    def preference_form(self):
        return get_preference_form(self.form_name)

    @property
    def guided_form(self):
        return get_guided_form(self.form_name)

    @property
    def form(self):
        return self.preference_form if self.kind == "preference" else self.guided_form

    @property
    def form_params(self) -> Any:
        """The chosen form's typed parameters."""
        return self.typed(self.form.params)

    @property
    def sampling_spec(self) -> SamplingSpec | None:
        return get_sampling_form(self.sampling) if self.sampling else None

    @property
    def sampling_active(self) -> bool:
        """Whether the recipe samples during training with these parameters (DPKD's ``pairs: online``)."""
        return self.sampling is not None and self.sampling_spec.enabled(self.params)

    @property
    def training_data(self) -> str:
        """What ``--data`` holds for this recipe with these parameters: ``responses`` (instruction, input,
        output), ``prompts`` (outputs not needed) or ``pairs`` (chosen, rejected)."""
        return "pairs" if self.params.get("pairs") == "preference_data" else self.data

    def lm_weight(self, config) -> float:
        """The LM term's weight for a run: ``config.lm_weight`` when set, else the recipe's."""
        return float(self.lm.weight if config.lm_weight is None else config.lm_weight)


def _merge(params: dict, overrides: dict) -> dict:
    out = dict(params)
    for key, value in overrides.items():
        out[key] = {**out[key], **value} if isinstance(out.get(key), dict) and isinstance(value, dict) else value
    return out


def resolve_recipe(method: str, overrides: dict | None = None) -> Recipe:
    """The recipe ``method`` with the user's parameter ``overrides`` (unknown names rejected, every typed group
    checked, each stage's ``*_settings`` checked as training settings)."""
    from kdbench.config import build
    from kdbench.train.settings import TrainConfig

    entry = registry.get("trainers", method)
    body = entry.body
    objective, stages, sampling = check_structure(body, f"Recipe {entry.path.name}")
    overrides = dict(overrides or {})
    valid = valid_parameters(objective, stages, sampling)
    unknown = sorted(set(overrides) - set(valid))
    if unknown:
        raise ConfigError(f"Method {method} has no parameter {unknown[0]!r}; its parameters are: "
                          f"{', '.join(valid) or '(none)'}.")
    groups = recipe_groups(objective, stages, sampling)
    params = _merge(body.get("params") or {}, overrides)
    defaults: dict = {}
    for group in groups:
        defaults.update(group_defaults(group))
    params = _merge(defaults, params)
    parameter = FORM_PARAMETER.get(objective.kind)
    if parameter:
        for group in groups:  # the family's own group checks the form's name before its defaults are read
            check_group(group, params)
        form = family_forms(objective.kind)[params[parameter]]
        params = _merge(group_defaults(form.params), params)
        groups.append(form.params)
        for name, value in params.items():  # a parameter only some forms take, set for another one
            if name == "length_normalize" and value is not None and name not in group_fields(form.params):
                takers = sorted(f.name for f in family_forms(objective.kind).values() if name in group_fields(f.params))
                named = ", ".join(takers[:-1]) + " and " + takers[-1] if len(takers) > 1 else takers[0]
                raise ConfigError(f"Parameter length_normalize applies to the {named} forms, not "
                                  f"{form.name}; leave it null.")
    recipe = Recipe(entry.name, entry.description, str(body.get("citation", "")), entry.path, objective,
                    str(body.get("data")), stages, sampling, LMTerm(**(body.get("lm") or {})), params, entry.alias_of)
    for group in groups:
        recipe.typed(group)
    for name, settings in params.items():  # a stage's settings: known names, valid values, before any work
        if name.endswith("_settings") and isinstance(settings, dict):
            build(TrainConfig, settings, prefix=f"params.{name}")
    return recipe


def recipe_data(method: str, overrides: dict | None = None) -> str:
    """What ``--data`` must hold for ``method`` (``responses``, ``prompts`` or ``pairs``): what a caller that
    prepares data — the embedded benchmark — asks instead of reading recipe bodies."""
    return resolve_recipe(method, overrides).training_data
