"""Teacher-guided forms on preference data: one :class:`GuidedForm` record per loss (METHODS.md: DCKD, ADPA),
chosen by a recipe's ``guided_form`` parameter.

Each row pair of a micro-batch is (x, y_w) and (x, y_other): y_other is the data's rejected response y_l
(DCKD) or, when the recipe declares a ``policy_responses`` stage, the starting student's own response ŷ
(ADPA). A form declares which frozen teachers the step runs on which rows (``teachers``), computes its loss
already normalised over the optimizer step (the trainer passes the step's token and sequence counts), and
returns named parts, each logged per token of the rows it is counted on (``parts``). Adding a form is one
:func:`register_guided_form` call.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Literal, Mapping

from kdbench.config import option
from kdbench.errors import ConfigError
from kdbench.losses.sequence import cross_entropy_sum
from kdbench.train.objectives import Objective, register_objective
from kdbench.train.params import DropoutParams, not_negative, positive

#: The frozen teachers a guided step can run: π_dpo (``--teacher`` after DPO) and π_ref (``--teacher``).
TEACHER_MODELS = ("dpo", "ref")
#: Rows a teacher runs on: every row of the micro-batch (chosen then other) or the other rows only.
TEACHER_ROWS = ("all", "other")


@dataclass
class GuidedBatch:
    """One micro-batch of (x, y_w, y_other) rows, logits aligned as in :class:`kdbench.train.objectives.Batch`.

    ``chosen_*``: the y_w rows ([P, T, V] student logits, [P, T] targets and mask). ``other_*``: the y_other
    rows. ``teachers``: the dense logits the form asked for, by (model, rows) — [2P, T, V] for ``all``,
    [P, T, V] for ``other``. ``chosen_tokens`` / ``other_tokens`` / ``sequences``: the optimizer step's totals
    (at least 1). ``progress``: the fraction of optimizer steps done before this step. ``other_targets``: the
    other rows' targets; ``extras``: per-token tensors of the other rows a sampling form attached (DPPO's rollouts).
    """

    chosen_logits: Any
    chosen_targets: Any
    chosen_mask: Any
    other_logits: Any
    other_mask: Any
    teachers: dict
    chosen_tokens: Any
    other_tokens: Any
    sequences: Any
    progress: float = 0.0  # fraction of the run's optimizer steps done (a curriculum's clock)
    other_targets: Any = None  # [P, T] the other rows' targets (−100 = not counted)
    extras: dict = field(default_factory=dict)  # the other rows' rollout_* tensors [P, T] (a sampling form's)


@dataclass
class GuidedParams:
    """The guided family's own parameters (each form adds its own)."""

    guided_form: str = option("dckd", "The teacher-guided loss (kdbench.train.guided_forms).")
    loss_topk: int | None = option(None, "k of the top-k approximation the loss takes of the teachers (null: exact "
                                         "over the vocabulary; 50 = the paper's).")

    def __post_init__(self):
        if self.guided_form not in GUIDED_FORMS:
            raise ConfigError(f"Parameter guided_form must be one of {', '.join(GUIDED_FORMS)} "
                              f"(got {self.guided_form!r}).")
        if self.loss_topk is not None and self.loss_topk < 1:
            raise ConfigError(f"Parameter loss_topk must be a whole number >= 1, or null for the dense teacher "
                              f"(got {self.loss_topk!r}).")


@dataclass
class DCKDParams:
    alpha: float = option(0.2, "Weight of the FKL terms (the paper's best, Fig. 5).")
    kl_reduction: Literal["token_mean", "sequence_sum"] = option(
        "token_mean", "token_mean (the authors' code) or sequence_sum (the paper's Eqs. 5-6).")
    temperature: float = option(1.0, "Divides the logits inside the FKL terms (and the sparse teacher's).")

    def __post_init__(self):
        not_negative("alpha", self.alpha)
        positive("temperature", self.temperature)


@dataclass
class ADPAParams:
    gamma: float = option(1.6, "Weight of the advantage loss (the authors' recipe).")
    adpa_reduction: Literal["token_mean", "sequence_sum"] = option(
        "token_mean", "token_mean (the authors' code) or sequence_sum (the paper's Eq. 10).")
    missing_ref: Literal["ref_lowest", "dpo_lowest"] = option(
        "ref_lowest", "Top-k only: a token missing from pi_ref's top-k takes pi_ref's lowest (dpo_lowest: the code's).")

    def __post_init__(self):
        not_negative("gamma", self.gamma)


@dataclass(frozen=True)
class GuidedForm:
    """One teacher-guided loss.

    ``params``: its typed parameters. ``teachers``: (model, rows) pairs the step runs under ``no_grad``
    (:data:`TEACHER_MODELS` × :data:`TEACHER_ROWS`). ``loss(batch, p, family) -> {"loss": the step-normalised
    loss, part: summed value, ...}`` (``family``: the :class:`GuidedParams`). ``parts``: each part's rows
    (``chosen`` or ``other``), whose counted tokens it is logged per.
    """

    name: str
    params: type
    teachers: tuple[tuple[str, str], ...]
    loss: Callable[[GuidedBatch, Any, GuidedParams], dict]
    parts: Mapping[str, str] = field(default_factory=dict)
    help: str = ""


def _dckd(batch: GuidedBatch, p: DCKDParams, family: GuidedParams) -> dict:
    """CE(y_w) + α·(FKL(π_dpo‖π_θ) on y_w + FKL on y_l) (adpa_dckd.md Eqs. 5-6)."""
    from kdbench.losses import SparseTeacher
    from kdbench.losses.guided import dckd

    n = batch.chosen_logits.shape[0]
    dpo = batch.teachers["dpo", "all"]
    if family.loss_topk:  # the paper's top-50 teacher: k+1 bins (METHODS.md, "Sparse teacher")
        dpo = SparseTeacher.from_logits(dpo, int(family.loss_topk), temperature=p.temperature)
        dpo_chosen, dpo_other = (dpo._replace(ids=dpo.ids[rows], logprobs=dpo.logprobs[rows],
                                              rest_logprob=None if dpo.rest_logprob is None else dpo.rest_logprob[rows])
                                 for rows in (slice(0, n), slice(n, None)))
    else:
        dpo_chosen, dpo_other = dpo[:n], dpo[n:]
    loss, parts = dckd(batch.chosen_logits, dpo_chosen, batch.chosen_targets, batch.chosen_mask, batch.other_logits,
                       dpo_other, batch.other_mask, alpha=p.alpha, temperature=p.temperature,
                       kl_reduction=p.kl_reduction, chosen_token_count=batch.chosen_tokens,
                       rejected_token_count=batch.other_tokens, sequence_count=batch.sequences, return_parts=True)
    return {"loss": loss, **parts}


def _adpa(batch: GuidedBatch, p: ADPAParams, family: GuidedParams) -> dict:
    """CE(y_w) + γ·advantage loss on ŷ (adpa_dckd.md Eq. 10); token means by default, ``adpa_reduction:
    sequence_sum`` sums over positions then averages over the step's sequences."""
    from kdbench.losses.guided import adpa

    ce = cross_entropy_sum(batch.chosen_logits, batch.chosen_targets)
    top_k = family.loss_topk
    advantage = adpa(batch.other_logits, batch.teachers["dpo", "other"], batch.teachers["ref", "other"],
                     batch.other_mask, reduction="sum", top_k=int(top_k) if top_k else None, missing_ref=p.missing_ref)
    denominator = batch.sequences if p.adpa_reduction == "sequence_sum" else batch.other_tokens
    loss = ce / batch.chosen_tokens + p.gamma * advantage / denominator
    return {"loss": loss, "ce": ce, "adpa": advantage}


#: Every guided form by name; extend with :func:`register_guided_form`.
GUIDED_FORMS: dict[str, GuidedForm] = {}


def register_guided_form(form: GuidedForm, *, replace: bool = False) -> GuidedForm:
    """Add ``form`` under its name (``replace=True`` redefines one); returns it."""
    bad = [t for t in form.teachers if t[0] not in TEACHER_MODELS or t[1] not in TEACHER_ROWS]
    if bad:
        raise ConfigError(f"Guided form {form.name} asks for teacher {bad[0]}; models are {', '.join(TEACHER_MODELS)}, "
                          f"rows {', '.join(TEACHER_ROWS)}.")
    if form.name in GUIDED_FORMS and not replace:
        raise ConfigError(f"A guided form named {form.name!r} is already registered; pick another name.")
    GUIDED_FORMS[form.name] = form
    return form


def get_guided_form(name: str) -> GuidedForm:
    if name not in GUIDED_FORMS:
        raise ConfigError(f"Parameter guided_form must be one of {', '.join(GUIDED_FORMS)} (got {name!r}).")
    return GUIDED_FORMS[name]


register_guided_form(GuidedForm("dckd", DCKDParams, (("dpo", "all"),), _dckd,
                                {"ce": "chosen", "fkl_chosen": "chosen", "fkl_rejected": "other"},
                                "DCKD (adpa_dckd.md §3.2): CE + alpha x FKL(pi_dpo || student) on y_w and y_l."))
register_guided_form(GuidedForm("adpa", ADPAParams, (("dpo", "other"), ("ref", "other")), _adpa,
                                {"ce": "chosen", "adpa": "other"},
                                "ADPA (adpa_dckd.md §3.3, Eq. 10): CE + gamma x advantage loss on y-hat."))

register_objective(Objective("guided", "guided", params=(GuidedParams, DropoutParams), needs_teacher=True,
                             help="A teacher-guided form on preference data (params.guided_form)."))
