"""Sequence-level preference forms: one :class:`PreferenceForm` record per loss (METHODS.md, "Sequence-level
preference losses"), chosen by a recipe's ``preference_form`` parameter.

A record says everything the pipeline needs about its loss: the per-pair loss on summed sequence
log-probs (:mod:`kdbench.losses.sequence`), the implicit rewards logged as diagnostics, the frozen
log-probs it reads (a reference model's, the teacher's, or none) — the pipeline computes exactly those —
and its typed parameters. Adding a form is one :func:`register_preference_form` call; every preference
recipe can then select it with ``preference_form: NAME`` (its parameters become valid recipe keys).

The frozen log-probs come in two slots of :class:`PairBatch`: ``ref`` (the policy's starting point — the
dSFT model — or the original student) and ``teacher``; a form's ``frozen(params)`` maps each slot it reads
to the model that fills it (:data:`REFERENCE_ROLES`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Literal

from kdbench.config import option
from kdbench.errors import ConfigError
from kdbench.train.objectives import Objective, register_objective
from kdbench.train.params import DropoutParams, not_negative, positive

#: What a ``ref`` slot can hold: ``start`` = the policy's starting point (the dSFT model of dDPO / daDPO),
#: ``student`` = the original student before any stage; the ``teacher`` slot holds the teacher.
REFERENCE_ROLES = ("start", "student", "teacher")
#: The ``reference`` parameter of DPO / IPO: dsft = the frozen starting point, student, teacher.
_REFERENCE_OF = {"dsft": ("ref", "start"), "student": ("ref", "student"), "teacher": ("teacher", "teacher")}


@dataclass
class PairBatch:
    """Summed sequence log-probs of P preference pairs, all [P].

    ``policy_*``: the trained model, with gradient; ``*_lengths``: response tokens (EOS included);
    ``ref_*`` / ``teacher_*``: frozen log-probs computed once before training, or by the teacher in the
    step for DPKD's online pairs (``None`` when the form does not read them). Each model scored the
    response text with its own tokenizer. ``reward_*``: a reward model's scores of each response (the
    ``reward_scores`` stage; DDPO-RM). ``extras``: what the form's :attr:`PreferenceForm.policy_stats` and
    :attr:`PreferenceForm.step_stats` computed, by name ([P] per side as ``NAME_chosen`` / ``NAME_rejected``,
    or a scalar).
    """

    policy_chosen: Any
    policy_rejected: Any
    chosen_lengths: Any
    rejected_lengths: Any
    ref_chosen: Any | None = None
    ref_rejected: Any | None = None
    teacher_chosen: Any | None = None
    teacher_rejected: Any | None = None
    reward_chosen: Any | None = None
    reward_rejected: Any | None = None
    extras: dict = field(default_factory=dict)

    def frozen(self, slot: str) -> tuple[Any, Any]:
        """(chosen, rejected) frozen log-probs of ``slot`` (``ref`` or ``teacher``)."""
        return getattr(self, f"{slot}_chosen"), getattr(self, f"{slot}_rejected")


@dataclass
class PreferenceParams:
    """The preference family's own parameters (each form adds its own)."""

    preference_form: str = option("dpo", "The sequence-level loss (kdbench.train.preference_forms).")
    kl_weight: float = option(0.0, "lambda of a token divergence to the teacher on the chosen responses (the teacher "
                                   "runs in every step; shared vocabulary); 0 = off.")
    kl_divergence: str = option("rkl", "That divergence (kdbench.losses.DIVERGENCES): rkl as the daDPO paper writes "
                                       "it, fkl as its code base computes.")

    def __post_init__(self):
        from kdbench.losses.divergences import get_divergence

        if self.preference_form not in PREFERENCE_FORMS:
            raise ConfigError(f"Parameter preference_form must be one of {', '.join(PREFERENCE_FORMS)} "
                              f"(got {self.preference_form!r}).")
        not_negative("kl_weight", self.kl_weight)
        get_divergence(self.kl_divergence)


# ------------------------------------------------------------------------------------------ form parameters
@dataclass
class DPOParams:
    beta: float = option(0.1, "beta of the log-ratio margin.")
    reference: Literal["dsft", "teacher", "student"] = option(
        "teacher", "The frozen reference: dsft (the policy's starting point), teacher, or student (the original).")

    def __post_init__(self):
        positive("beta", self.beta)


@dataclass
class IPOParams:
    tau: float = option(0.1, "IPO's tau (the target margin is 1/(2 tau)).")
    reference: Literal["dsft", "teacher", "student"] = option("teacher", "As DPO's reference.")
    length_normalize: bool | None = option(None, "null/false = summed log-ratios (IPO Eq. 17); true = divided by "
                                                 "|y| (TRL's loss_type='ipo').")

    def __post_init__(self):
        positive("tau", self.tau)


@dataclass
class SimPOParams:
    beta: float = option(2.0, "beta (the SimPO paper recommends 2.0-2.5).")
    gamma: float = option(1.0, "The target margin.")

    def __post_init__(self):
        positive("beta", self.beta)
        not_negative("gamma", self.gamma)


@dataclass
class CPOParams:
    beta: float = option(0.1, "beta of the reference-free margin.")
    cpo_nll: Literal["token_mean", "sequence_sum"] = option("token_mean", "CPO's NLL on the chosen responses.")

    def __post_init__(self):
        positive("beta", self.beta)


@dataclass
class DPKDParams:
    beta: float = option(0.1, "beta (the authors' code default).")
    length_normalize: bool | None = option(None, "null/true = each log-ratio divided by |y| (DPKD Eq. 9); false = "
                                                 "DPO with the teacher as reference.")

    def __post_init__(self):
        positive("beta", self.beta)


@dataclass
class DaDPOParams:
    beta1: float = option(0.1, "Weight of the margin to the frozen starting point (dSFT).")
    beta2: float = option(0.1, "Weight of the margin to the teacher.")

    def __post_init__(self):
        not_negative("beta1", self.beta1)
        not_negative("beta2", self.beta2)
        if self.beta1 == 0 and self.beta2 == 0:
            raise ConfigError("Parameters beta1 and beta2 cannot both be 0 (the loss would be constant).")


# ------------------------------------------------------------------------------------------ the forms
@dataclass(frozen=True)
class PreferenceForm:
    """One sequence-level preference loss.

    ``params``: its typed parameters (a dataclass; instances are passed to the functions below).
    ``loss(pairs, p) -> [P]``: the per-pair loss. ``rewards(pairs, p) -> ([P], [P])``: the implicit rewards of
    chosen and rejected (diagnostics; their margin gives reward_margin / reward_accuracy). ``frozen(p)``:
    the frozen log-prob slots it reads, each with the model that fills it (``{"ref": "start"}``, ...).

    Optional, for losses that read more than summed log-probs:

    * ``policy_stats(logits [2P, T, V], targets [2P, T], p) -> {name: [2P]}``: statistics of the policy's own
      distribution on each row (chosen rows first), computed without gradient in the step (WPO's weights);
    * ``step_stats(trainer, micro_batches, p, reduce) -> {name: scalar}``: a no-gradient pass over the whole
      optimizer step's micro-batches (summed over processes when ``reduce``), so that a batch statistic does
      not depend on how the step is split (dKTO's reference point);
    * ``mismatched``: the form reads rows pairing prompt i with pair i+1's responses (KTO's mismatched
      pairs); the dataset carries them and ``frozen_logps`` scores them under ``SLOT_mismatched``;
    * ``needs_rewards``: the form reads ``reward_chosen`` / ``reward_rejected`` (the ``reward_scores`` stage).
    """

    name: str
    params: type
    loss: Callable[[PairBatch, Any], Any]
    rewards: Callable[[PairBatch, Any], tuple[Any, Any]]
    frozen: Callable[[Any], dict[str, str]] = lambda p: {}
    help: str = ""
    policy_stats: Callable[..., dict] | None = None
    step_stats: Callable[..., dict] | None = None
    mismatched: bool = False
    needs_rewards: bool = False


def _lengths(pairs: PairBatch):
    return pairs.chosen_lengths.to(pairs.policy_chosen), pairs.rejected_lengths.to(pairs.policy_rejected)


def _reference_slot(p) -> dict[str, str]:
    slot, role = _REFERENCE_OF[p.reference]
    return {slot: role}


def reference_slot(p) -> str:
    """The frozen log-prob slot (``ref`` or ``teacher``) a form's ``reference`` parameter reads."""
    return _REFERENCE_OF[p.reference][0]


def reference_frozen(p) -> dict[str, str]:
    """``frozen`` of a form with a ``reference`` parameter (dsft, student or teacher): {slot: role}."""
    return _reference_slot(p)


def _dpo_loss(pairs: PairBatch, p: DPOParams):
    from kdbench.losses.sequence import dpo

    ref_c, ref_r = pairs.frozen(_REFERENCE_OF[p.reference][0])
    return dpo(pairs.policy_chosen, pairs.policy_rejected, ref_c, ref_r, beta=p.beta, reduction="none")


def _dpo_rewards(pairs: PairBatch, p: DPOParams):
    ref_c, ref_r = pairs.frozen(_REFERENCE_OF[p.reference][0])
    return p.beta * (pairs.policy_chosen - ref_c), p.beta * (pairs.policy_rejected - ref_r)


def _ipo_normalized(p: IPOParams) -> bool:
    return bool(p.length_normalize)  # summed by default (IPO Eq. 17); true: TRL's per-token form


def _ipo_loss(pairs: PairBatch, p: IPOParams):
    from kdbench.losses.sequence import ipo

    ref_c, ref_r = pairs.frozen(_REFERENCE_OF[p.reference][0])
    lengths = ({"chosen_lengths": pairs.chosen_lengths, "rejected_lengths": pairs.rejected_lengths}
               if _ipo_normalized(p) else {})
    return ipo(pairs.policy_chosen, pairs.policy_rejected, ref_c, ref_r, tau=p.tau, reduction="none", **lengths)


def _ipo_rewards(pairs: PairBatch, p: IPOParams):
    ref_c, ref_r = pairs.frozen(_REFERENCE_OF[p.reference][0])
    c_len, r_len = _lengths(pairs)
    normalize = _ipo_normalized(p)
    return (pairs.policy_chosen - ref_c) / (c_len if normalize else 1.0), \
        (pairs.policy_rejected - ref_r) / (r_len if normalize else 1.0)


def _simpo_loss(pairs: PairBatch, p: SimPOParams):
    from kdbench.losses.sequence import simpo

    return simpo(pairs.policy_chosen, pairs.policy_rejected, pairs.chosen_lengths, pairs.rejected_lengths,
                 beta=p.beta, gamma=p.gamma, reduction="none")


def _simpo_rewards(pairs: PairBatch, p: SimPOParams):
    c_len, r_len = _lengths(pairs)
    return p.beta * pairs.policy_chosen / c_len, p.beta * pairs.policy_rejected / r_len


def _cpo_loss(pairs: PairBatch, p: CPOParams):
    from kdbench.losses.sequence import cpo

    return cpo(pairs.policy_chosen, pairs.policy_rejected, pairs.chosen_lengths, beta=p.beta, nll=p.cpo_nll,
               reduction="none")


def _cpo_rewards(pairs: PairBatch, p: CPOParams):
    return p.beta * pairs.policy_chosen, p.beta * pairs.policy_rejected


def _dpkd_normalized(p: DPKDParams) -> bool:
    return True if p.length_normalize is None else bool(p.length_normalize)  # DPKD Eq. 9 divides by |y|


def _dpkd_loss(pairs: PairBatch, p: DPKDParams):
    from kdbench.losses.sequence import dpkd

    return dpkd(pairs.policy_chosen, pairs.policy_rejected, pairs.teacher_chosen, pairs.teacher_rejected,
                pairs.chosen_lengths, pairs.rejected_lengths, beta=p.beta, length_normalize=_dpkd_normalized(p),
                reduction="none")


def _dpkd_rewards(pairs: PairBatch, p: DPKDParams):
    c_len, r_len = _lengths(pairs)
    normalize = _dpkd_normalized(p)
    return (p.beta * (pairs.policy_chosen - pairs.teacher_chosen) / (c_len if normalize else 1.0),
            p.beta * (pairs.policy_rejected - pairs.teacher_rejected) / (r_len if normalize else 1.0))


def _dadpo_loss(pairs: PairBatch, p: DaDPOParams):
    from kdbench.losses.sequence import dadpo

    return dadpo(pairs.policy_chosen, pairs.policy_rejected, pairs.ref_chosen, pairs.ref_rejected,
                 pairs.teacher_chosen, pairs.teacher_rejected, beta1=p.beta1, beta2=p.beta2, reduction="none")


def _dadpo_rewards(pairs: PairBatch, p: DaDPOParams):
    pc, pr = pairs.policy_chosen, pairs.policy_rejected
    return (p.beta1 * (pc - pairs.ref_chosen) + p.beta2 * (pc - pairs.teacher_chosen),
            p.beta1 * (pr - pairs.ref_rejected) + p.beta2 * (pr - pairs.teacher_rejected))


#: Every preference form by name; extend with :func:`register_preference_form`.
PREFERENCE_FORMS: dict[str, PreferenceForm] = {}


def register_preference_form(form: PreferenceForm, *, replace: bool = False) -> PreferenceForm:
    """Add ``form`` under its name (``replace=True`` redefines one); returns it."""
    if form.name in PREFERENCE_FORMS and not replace:
        raise ConfigError(f"A preference form named {form.name!r} is already registered; pick another name.")
    PREFERENCE_FORMS[form.name] = form
    return form


def get_preference_form(name: str) -> PreferenceForm:
    if name not in PREFERENCE_FORMS:
        raise ConfigError(f"Parameter preference_form must be one of {', '.join(PREFERENCE_FORMS)} (got {name!r}).")
    return PREFERENCE_FORMS[name]


def preference_parts(form: PreferenceForm, params, pairs: PairBatch) -> dict:
    """Σ over pairs of ``form``'s loss, plus diagnostics summed over pairs: the implicit rewards of chosen and
    rejected (``reward_chosen`` / ``reward_rejected``), ``reward_margin`` and ``reward_accuracy`` (margin > 0)."""
    import torch

    per_pair = form.loss(pairs, params)
    reward_c, reward_r = form.rewards(pairs, params)
    reward_c, reward_r = reward_c.detach(), reward_r.detach()
    margin = reward_c - reward_r
    return {"loss": per_pair.sum(), "reward_chosen": reward_c.sum(), "reward_rejected": reward_r.sum(),
            "reward_margin": margin.sum(), "reward_accuracy": (margin > 0).to(torch.float32).sum()}


for _form in (
    PreferenceForm("dpo", DPOParams, _dpo_loss, _dpo_rewards, _reference_slot, "DPO (Rafailov et al. Eq. 7)."),
    PreferenceForm("ipo", IPOParams, _ipo_loss, _ipo_rewards, _reference_slot, "IPO (Azar et al. Eq. 17)."),
    PreferenceForm("simpo", SimPOParams, _simpo_loss, _simpo_rewards, help="SimPO (Meng et al. Eq. 6)."),
    PreferenceForm("cpo", CPOParams, _cpo_loss, _cpo_rewards, help="CPO (Xu et al.)."),
    PreferenceForm("dpkd", DPKDParams, _dpkd_loss, _dpkd_rewards, lambda p: {"teacher": "teacher"},
                   "DPKD (dpkd_v1.md Eq. 9): the teacher as reference, length-normalized."),
    PreferenceForm("dadpo", DaDPOParams, _dadpo_loss, _dadpo_rewards, lambda p: {"ref": "start", "teacher": "teacher"},
                   "daDPO (dadpo.md Alg. 1): margins to the frozen starting point and to the teacher."),
):
    register_preference_form(_form)

register_objective(Objective("preference", "preference", params=(PreferenceParams, DropoutParams),
                             help="A sequence-level preference form on pairs (params.preference_form)."))
