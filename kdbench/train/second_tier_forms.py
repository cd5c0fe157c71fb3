"""Second-tier preference forms (METHODS.md, "Second tier"): WPO, PLaD, DDPO-RM and dKTO, each a
:class:`~kdbench.train.preference_forms.PreferenceForm` on the losses of :mod:`kdbench.losses.second_tier`.

Registered like the first-tier forms, so every preference recipe can select them (``preference_form: wpo`` in
``dpo``, ``ddpo``, ``dpkd``, ... — WPO's weighting wherever DPO is, an extension of the WPO paper, which weights
DPO on preference data only). What they read beyond summed log-probs:

* **WPO**: w(y) = mean_t [log π(y_t) − log Σ_v π(v)²] of each response under the current policy, computed in
  the step without gradient (``policy_stats``): one log-sum-exp over the vocabulary per response token, on the
  logits the step already has.
* **DDPO-RM**: a reward model's scores of chosen and rejected (the ``reward_scores`` stage: from the data or
  a given reward model).
* **dKTO**: the reference point z0 over the whole optimizer step (``step_stats``): a no-gradient forward of the
  policy over the step's mismatched rows (prompt i with pair i+1's two responses: 2P rows per micro-batch of
  P pairs, about one third of a step's compute on top of the forward + backward over the 2P pair rows) and
  one all-reduce of two numbers; the reference's log-probs of those rows are frozen once (``frozen_logps``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from kdbench.config import option
from kdbench.train.params import not_negative, positive
from kdbench.train.preference_forms import (PairBatch, PreferenceForm, reference_frozen, reference_slot,
                                            register_preference_form)

Reference = Literal["dsft", "teacher", "student"]


# ------------------------------------------------------------------------------------------ parameters
@dataclass
class WPOParams:
    beta: float = option(0.1, "beta of DPO's log-ratio margin.")
    reference: Reference = option("student", "The frozen reference: dsft (the policy's starting point), teacher, "
                                             "or student (the original).")

    def __post_init__(self):
        positive("beta", self.beta)


@dataclass
class PLaDParams:
    delta: float = option(1.0, "PLaD's margin (Eq. 4's delta).")
    length_normalize: bool | None = option(None, "null/true = s(y) is the student's log-likelihood divided by |y| "
                                                 "(PLaD's score function); false = summed.")

    def __post_init__(self):
        not_negative("delta", self.delta)


@dataclass
class DDPORMParams:
    beta: float = option(0.1, "beta of the policy-vs-reference log-ratio margin (Fisch et al. Eq. 7).")
    reference: Reference = option("student", "The frozen reference: dsft, teacher, or student (the original).")

    def __post_init__(self):
        positive("beta", self.beta)


@dataclass
class DKTOParams:
    beta: float = option(0.1, "KTO's beta.")
    reference: Reference = option("dsft", "The frozen reference: dsft (daDPO's dSFT model), teacher or student.")
    desirable_weight: float = option(1.0, "lambda_D, the weight of the desirable (teacher) responses.")
    undesirable_weight: float = option(1.0, "lambda_U, the weight of the undesirable (student) responses.")
    kto_reference_point: Literal["batch", "zero"] = option(
        "batch", "batch: z0 = the step's mismatched-pair KL estimate, clamped >= 0 (KTO Eq. 7); zero: z0 = 0.")

    def __post_init__(self):
        positive("beta", self.beta)
        not_negative("desirable_weight", self.desirable_weight)
        not_negative("undesirable_weight", self.undesirable_weight)


# ------------------------------------------------------------------------------------------ WPO
def _dpo_rewards(pairs: PairBatch, p):
    ref_c, ref_r = pairs.frozen(reference_slot(p))
    return p.beta * (pairs.policy_chosen - ref_c), p.beta * (pairs.policy_rejected - ref_r)


def _wpo_weights(logits, targets, p: WPOParams) -> dict:
    from kdbench.losses.second_tier import wpo_log_weight

    return {"wpo_log_weight": wpo_log_weight(logits, targets)}


def _wpo_loss(pairs: PairBatch, p: WPOParams):
    from kdbench.losses.second_tier import wpo

    ref_c, ref_r = pairs.frozen(reference_slot(p))
    return wpo(pairs.policy_chosen, pairs.policy_rejected, ref_c, ref_r, pairs.extras["wpo_log_weight_chosen"],
               pairs.extras["wpo_log_weight_rejected"], beta=p.beta, reduction="none")


# ------------------------------------------------------------------------------------------ PLaD
def _plad_normalized(p: PLaDParams) -> bool:
    return True if p.length_normalize is None else bool(p.length_normalize)


def _plad_scores(pairs: PairBatch, p: PLaDParams):
    chosen, rejected = pairs.policy_chosen, pairs.policy_rejected
    if _plad_normalized(p):
        chosen = chosen / pairs.chosen_lengths.to(chosen).clamp(min=1)
        rejected = rejected / pairs.rejected_lengths.to(rejected).clamp(min=1)
    return chosen, rejected


def _plad_loss(pairs: PairBatch, p: PLaDParams):
    from kdbench.losses.second_tier import plad

    return plad(pairs.policy_chosen, pairs.policy_rejected, pairs.chosen_lengths, pairs.rejected_lengths,
                margin=p.delta, length_normalize=_plad_normalized(p), reduction="none")


# ------------------------------------------------------------------------------------------ DDPO-RM
def _ddpo_rm_loss(pairs: PairBatch, p: DDPORMParams):
    from kdbench.losses.second_tier import ddpo_rm

    ref_c, ref_r = pairs.frozen(reference_slot(p))
    return ddpo_rm(pairs.policy_chosen, pairs.policy_rejected, ref_c, ref_r, pairs.reward_chosen,
                   pairs.reward_rejected, beta=p.beta, reduction="none")


# ------------------------------------------------------------------------------------------ dKTO
def kto_step_reference(trainer, micro_batches: list, p: DKTOParams, reduce: bool) -> dict:
    """dKTO's z0 over ``micro_batches`` (the optimizer step's, or one batch in evaluation): max(0, mean over
    every mismatched row of log π − log ref), without gradient, summed over processes when ``reduce``
    (KTO Eq. 7; Ethayarajh et al. §4.1). → {"kto_z0": scalar}."""
    import torch

    from kdbench.losses.sequence import sequence_logps

    device = trainer.args.device
    if p.kto_reference_point == "zero":
        return {"kto_z0": torch.zeros((), device=device)}
    slot = f"{reference_slot(p)}_mismatched"
    model = trainer.model
    sums = torch.zeros(2, dtype=torch.float64, device=device)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for batch in micro_batches:
                ids, mask = batch["mismatched_input_ids"].to(device), batch["mismatched_attention_mask"].to(device)
                logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1, :trainer.logit_rows]
                policy = sequence_logps(logits, batch["mismatched_labels"][:, 1:].to(device))  # [2P]
                ref = torch.cat([batch[f"{slot}_chosen"], batch[f"{slot}_rejected"]]).to(device)
                sums += torch.stack([(policy.double() - ref.double()).sum(),
                                     torch.tensor(float(policy.numel()), dtype=torch.float64, device=device)])
                if was_training:
                    trainer.counters["tokens_processed"] += int(mask.sum())
    finally:
        model.train(was_training)
    if reduce and trainer.accelerator.num_processes > 1:
        sums = trainer.accelerator.reduce(sums, reduction="sum")
    return {"kto_z0": (sums[0] / sums[1].clamp(min=1.0)).clamp(min=0.0).to(torch.float32)}


def _dkto_per_example(pairs: PairBatch, p: DKTOParams):
    """The KTO loss of every chosen (desirable) and rejected (undesirable) response: ([P], [P])."""
    import torch

    from kdbench.losses.second_tier import dkto

    ref_c, ref_r = pairs.frozen(reference_slot(p))
    n = pairs.policy_chosen.shape[0]
    desirable = torch.cat([torch.ones(n, dtype=torch.bool), torch.zeros(n, dtype=torch.bool)])
    losses = dkto(torch.cat([pairs.policy_chosen, pairs.policy_rejected]), torch.cat([ref_c, ref_r]).to(pairs.policy_chosen),
                  desirable, beta=p.beta, reference_point=pairs.extras["kto_z0"],
                  desirable_weight=p.desirable_weight, undesirable_weight=p.undesirable_weight, reduction="none")
    return losses[:n], losses[n:]


def _dkto_loss(pairs: PairBatch, p: DKTOParams):
    chosen, rejected = _dkto_per_example(pairs, p)
    return 0.5 * (chosen + rejected)  # per pair: the mean over its two examples, so the step mean is KTO's mean


def _dkto_rewards(pairs: PairBatch, p: DKTOParams):
    return _dpo_rewards(pairs, p)


for _form in (
    PreferenceForm("wpo", WPOParams, _wpo_loss, _dpo_rewards, reference_frozen,
                   "WPO (Zhou et al. 2024, Eq. 4): DPO x stop-grad clamp(exp(w(y_w) + w(y_l)), max 1).",
                   policy_stats=_wpo_weights),
    PreferenceForm("plad", PLaDParams, _plad_loss, _plad_scores,
                   help="PLaD (Zhang et al. 2024, Eq. 4): max(0, delta - s(y_w) + s(y_l)), s = length-normalized "
                        "student log-likelihood."),
    PreferenceForm("ddpo_rm", DDPORMParams, _ddpo_rm_loss, _dpo_rewards, reference_frozen,
                   "DDPO (Fisch et al. 2024, Eq. 7): (beta x log-ratio margin - reward-model margin)^2.",
                   needs_rewards=True),
    PreferenceForm("dkto", DKTOParams, _dkto_loss, _dkto_rewards, reference_frozen,
                   "dKTO: KTO (Ethayarajh et al. 2024, Eq. 8) with y_t desirable and y_s undesirable.",
                   step_stats=kto_step_reference, mismatched=True),
):
    register_preference_form(_form)
