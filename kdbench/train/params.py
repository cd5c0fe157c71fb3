"""Typed recipe parameters: every ``params`` key of a recipe belongs to one typed parameter group.

A group is a dataclass whose fields carry ``metadata={"help": ...}`` and whose ``__post_init__`` checks
ranges (TRL's ``*Config`` style). The pieces a recipe is made of each declare their groups — its objective
(:mod:`kdbench.train.objectives`), its family's forms (:mod:`kdbench.train.preference_forms`,
:mod:`kdbench.train.guided_forms`), its stages (:mod:`kdbench.train.stage_runner`) and its sampling form
(:mod:`kdbench.train.sampling`) — so the keys a recipe may hold are exactly the fields of those groups:
an unknown key (in the recipe file or in ``--set params.NAME=...``) is one sentence listing the valid
ones, a value of the wrong type or out of range is one sentence naming the parameter
(:func:`check_group`). Two groups may declare the same field only with the same meaning (the teacher's
SFT settings are one field of the teacher-preparation and the π_ref stages).
"""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any, Literal

from kdbench.config import option
from kdbench.errors import ConfigError

_TYPE_WORDS = {float: "a number", int: "a whole number", bool: "true or false", str: "a string",
               dict: "a mapping (e.g. {learning_rate: 1e-4})"}


def _check_value(name: str, value: Any, annotation: Any) -> Any:
    """``value`` of parameter ``name`` as ``annotation`` says (an int is a valid float; YAML ``true`` is not a
    number); one sentence otherwise."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(annotation)
        if value is None and type(None) in options:
            return None
        annotation = next(a for a in options if a is not type(None))
        origin = typing.get_origin(annotation)
    if origin is Literal:
        allowed = typing.get_args(annotation)
        if value not in allowed:
            raise ConfigError(f"Parameter {name} must be one of {', '.join(map(str, allowed))} (got {value!r}).")
        return value
    if annotation is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"Parameter {name} must be a number (got {value!r}).")
        return float(value)
    if annotation is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"Parameter {name} must be a whole number (got {value!r}).")
        return value
    if annotation in (bool, str, dict) and not (isinstance(value, annotation)
                                                and not (annotation is not bool and isinstance(value, bool))):
        raise ConfigError(f"Parameter {name} must be {_TYPE_WORDS[annotation]} (got {value!r}).")
    return value


def group_fields(group: type) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(group)}


def group_defaults(group: type) -> dict[str, Any]:
    """Each field's default (a fresh copy of mutable defaults)."""
    out = {}
    for f in dataclasses.fields(group):
        if f.default is not dataclasses.MISSING:
            out[f.name] = f.default
        elif f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
            out[f.name] = f.default_factory()  # type: ignore[misc]
    return out


def check_group(group: type, values: dict) -> Any:
    """An instance of ``group`` from the fields of ``values`` it declares (other keys are ignored): types
    checked here, ranges by the group's ``__post_init__``; each problem is one ConfigError sentence."""
    hints = typing.get_type_hints(group)
    kwargs = {name: _check_value(name, values[name], hints[name]) for name in group_fields(group) if name in values}
    return group(**kwargs)


def positive(name: str, value: float) -> None:
    if not value > 0:
        raise ConfigError(f"Parameter {name} must be greater than 0 (got {value}).")


def not_negative(name: str, value: float) -> None:
    if value < 0:
        raise ConfigError(f"Parameter {name} must not be negative (got {value}).")


def unit_interval(name: str, value: float) -> None:
    if not 0.0 <= value <= 1.0:
        raise ConfigError(f"Parameter {name} must be between 0 and 1 (got {value}).")


def settings_mapping(name: str, value: Any) -> None:
    if not isinstance(value, dict):
        raise ConfigError(f"Parameter {name} must be a mapping of training settings, e.g. {{learning_rate: 1e-4}}.")


# ------------------------------------------------------------------------------------------ groups
@dataclasses.dataclass
class GenerationParams:
    """How a stage or a sampling form generates responses (greedy or sampled)."""

    greedy: bool = option(False, "Greedy decoding; false = sampling at generation_temperature, top_p, top_k.")
    generation_temperature: float = option(1.0, "Sampling temperature (> 0; use greedy: true instead of 0).")
    top_p: float = option(1.0, "Nucleus sampling mass, in (0, 1] (1 = off).")
    top_k: int = option(0, "Top-k sampling (0 = off).")
    max_new_tokens: int = option(256, "Generation limit; a response cut there carries no EOS.")
    generation_seed: int = option(0, "Seed of cached generations (one data set per model and prompts, shared by "
                                     "every training seed).")

    def __post_init__(self):
        if not self.generation_temperature > 0:
            raise ConfigError("Parameter generation_temperature must be greater than 0 (use greedy: true instead of 0).")
        if self.max_new_tokens < 1:
            raise ConfigError(f"Parameter max_new_tokens must be a whole number of at least 1 (got {self.max_new_tokens}).")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"Parameter top_p must be in (0, 1] (got {self.top_p}).")
        if self.top_k < 0:
            raise ConfigError(f"Parameter top_k must be a whole number >= 0 (got {self.top_k}).")


@dataclasses.dataclass
class TeacherInitParams:
    """Teacher preparation (METHODS.md, "Teacher preparation")."""

    teacher_init: str = option("given", "given: --teacher is already fine-tuned on the task; sft: fine-tune it on "
                                        "--data first (once per teacher and data, cached).")
    teacher_sft_settings: dict = option(factory=dict, help="The teacher's SFT stage settings (TrainConfig fields).")

    def __post_init__(self):
        if self.teacher_init not in ("given", "sft"):
            raise ConfigError("Parameter teacher_init must be given (--teacher is already fine-tuned on the task) or "
                              "sft (fine-tune it on --data first, once, cached).")
        settings_mapping("teacher_sft_settings", self.teacher_sft_settings)


@dataclasses.dataclass
class PolicyStartParams:
    """Where the trained policy starts: the student's SFT checkpoint (trained once, cached) or --student."""

    init: str = option("sft", "sft: start from the student's SFT checkpoint (trained once, cached); student: "
                              "start from --student as given.")
    sft_model: str | None = option(None, "A ready SFT checkpoint of the student (skips the SFT stage).")
    sft_settings: dict = option(factory=dict, help="The student's SFT stage settings (TrainConfig fields).")

    def __post_init__(self):
        if self.init not in ("sft", "student"):
            raise ConfigError(f"Parameter init must be sft (train the student's SFT checkpoint first) or student "
                              f"(start from --student as given); got {self.init!r}.")
        settings_mapping("sft_settings", self.sft_settings)


@dataclasses.dataclass
class DSFTParams:
    """The dSFT model (daDPO Alg. 1): the student fine-tuned on the teacher's responses."""

    dsft_model: str | None = option(None, "A ready dSFT checkpoint (skips the dSFT stage).")
    dsft_settings: dict = option(factory=dict, help="The dSFT stage settings (TrainConfig fields).")

    def __post_init__(self):
        settings_mapping("dsft_settings", self.dsft_settings)


@dataclasses.dataclass
class RefTeacherParams:
    """π_ref of DCKD / ADPA: --teacher as given or fine-tuned on the chosen responses."""

    ref_teacher: str = option("given", "given: --teacher is pi_ref (already fine-tuned on the task); sft: fine-tune "
                                       "it on the chosen responses first (cached).")
    teacher_sft_settings: dict = option(factory=dict, help="The teacher's SFT stage settings (TrainConfig fields).")

    def __post_init__(self):
        if self.ref_teacher not in ("given", "sft"):
            raise ConfigError("Parameter ref_teacher must be given (--teacher is already fine-tuned on the task) or "
                              "sft (fine-tune it on the chosen responses first).")
        settings_mapping("teacher_sft_settings", self.teacher_sft_settings)


@dataclasses.dataclass
class DPOTeacherParams:
    """π_dpo of DCKD / ADPA: π_ref after DPO on the preference data (or a ready checkpoint)."""

    dpo_teacher: str | None = option(None, "A ready pi_dpo checkpoint; empty = DPO of pi_ref on --data (cached).")
    teacher_dpo_beta: float = option(0.05, "The DPO teacher's beta (adpa_dckd.md §4.1).")
    teacher_dpo_settings: dict = option(factory=dict, help="The DPO teacher stage settings (TrainConfig fields).")

    def __post_init__(self):
        positive("teacher_dpo_beta", self.teacher_dpo_beta)
        settings_mapping("teacher_dpo_settings", self.teacher_dpo_settings)


@dataclasses.dataclass
class DCKDStudentParams:
    """ADPA+'s starting point: the DCKD student (adpa_dckd.md Alg. 2), trained as a cached stage."""

    dckd_model: str | None = option(None, "A ready DCKD student; empty = train it with the dckd recipe (cached).")
    dckd_settings: dict = option(factory=dict, help="The DCKD stage settings (TrainConfig fields).")
    dckd_loss_topk: int | None = option(None, "The DCKD stage's loss_topk (empty = the dense teacher).")

    def __post_init__(self):
        settings_mapping("dckd_settings", self.dckd_settings)
        if self.dckd_loss_topk is not None and self.dckd_loss_topk < 1:
            raise ConfigError(f"Parameter dckd_loss_topk must be a whole number >= 1, or null for the dense teacher "
                              f"(got {self.dckd_loss_topk!r}).")


@dataclasses.dataclass
class DropoutParams:
    """Dropout of the trained policy (kdbench.train.policy)."""

    disable_dropout: bool = option(True, "The policy trains without dropout (TRL's disable_dropout); false keeps "
                                         "the checkpoint's.")


__all__ = ["GenerationParams", "TeacherInitParams", "PolicyStartParams", "DSFTParams", "RefTeacherParams",
           "DPOTeacherParams", "DCKDStudentParams", "DropoutParams", "check_group", "group_defaults", "group_fields",
           "positive", "not_negative", "unit_interval", "settings_mapping"]
