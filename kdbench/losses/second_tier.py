"""Second-tier sequence-level objectives (METHODS.md, "Second tier"): WPO, PLaD, DDPO-RM and dKTO.

Every loss takes per-sequence *summed* log-probabilities [B] (:func:`~kdbench.losses.sequence.sequence_logps`)
like :mod:`kdbench.losses.sequence`, and ``reduction`` is "mean" over pairs/examples or "none" → [B].
Notation: c = chosen (y_w), r = rejected (y_l), π = policy (the student), ref = reference, σ = sigmoid.

Quantities that the papers take over a whole batch (WPO's weights are per pair, but dKTO's reference
point z0 is a batch statistic) come in as arguments computed by the helpers here, so that a trainer can
compute them once over the optimizer step (every micro-batch, every process) and the loss does not
depend on how the step is split.
"""

from __future__ import annotations

from kdbench.errors import ConfigError, DataError
from kdbench.losses.chunking import default_chunk_rows, rowwise_loss
from kdbench.losses.reduction import compute_dtype, counted_mask, counted_rows, reduce_pairs
from kdbench.losses.sequence import token_logps


def _neg_logsigmoid(x):
    import torch.nn.functional as F

    return -F.logsigmoid(x)


def _positive_lengths(lengths, name: str, like):
    import torch

    lengths = torch.as_tensor(lengths)
    if bool((lengths <= 0).any()):
        raise DataError(f"{name} must be positive token counts (a response with no tokens cannot be scored).")
    return lengths.to(like)


# ------------------------------------------------------------------ WPO (Zhou et al. 2024)


def wpo_log_weight(logits, labels, mask=None, *, chunk_rows=None):
    """WPO's per-sequence log-weight w(y) = mean_t [log π(y_t) − log Σ_v π(v)²] (no gradient): → [B].

    ``logits`` [B, T, V] are the policy's own logits on y (position t predicts ``labels[b, t]``), ``mask``
    [B, T] the response positions (``None``: labels ≠ −100). Σ_v π(v)² is the probability that the policy
    samples the same token twice, so w(y) = 0 when y is the policy's own greedy-like sample and < 0 for
    off-policy text (WPO §3, "sampled alignment"). Computed chunk by chunk, under ``no_grad``.
    """
    import torch

    with torch.no_grad():
        detached = logits.detach()
        per_token = token_logps(detached, labels, mask, chunk_rows=chunk_rows)  # log π(y_t), 0 where uncounted
        batch_shape = tuple(labels.shape)
        mask_bool = labels != -100 if mask is None else counted_mask(mask, batch_shape)
        vocab_size = detached.shape[-1]
        n_rows = batch_shape[0] * batch_shape[1]
        rows = counted_rows(mask_bool, n_rows, detached.device)
        dtype = compute_dtype(detached)

        def log_sum_squares(chunk):  # log Σ_v π(v)² = logsumexp(2 log π)
            return torch.logsumexp(2.0 * torch.log_softmax(chunk.to(dtype), dim=-1), dim=-1)

        chunk = chunk_rows if chunk_rows is not None else default_chunk_rows(vocab_size)
        collision = rowwise_loss(log_sum_squares, [detached.reshape(n_rows, vocab_size)], rows, chunk, dtype)
        lengths = mask_bool.sum(-1)
        if bool((lengths == 0).any()):
            raise DataError("a sequence has no response positions; WPO's weight is a mean over its tokens.")
        return (per_token - collision.reshape(batch_shape)).sum(-1) / lengths.to(per_token)


def wpo(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, chosen_log_weight,
        rejected_log_weight, *, beta, reduction="mean"):
    """WPO (Zhou et al. 2024, Eq. 4 with METHODS.md's clamp): DPO × stop-grad clamp(exp(w(c) + w(r)), max 1).

    ``chosen_log_weight`` / ``rejected_log_weight`` [B] are :func:`wpo_log_weight` of each response (they
    are detached here in any case). With both weights 0 (weight 1) this is :func:`~kdbench.losses.dpo`.
    Inputs [B]; → scalar (mean of the weighted losses over pairs) or [B].
    """
    import torch

    margin = (policy_chosen_logps - ref_chosen_logps) - (policy_rejected_logps - ref_rejected_logps)
    weight = torch.exp(chosen_log_weight.detach() + rejected_log_weight.detach()).clamp(max=1.0)
    return reduce_pairs(weight.to(margin) * _neg_logsigmoid(beta * margin), reduction)


# ------------------------------------------------------------------ PLaD (Zhang et al. 2024)


def plad(policy_chosen_logps, policy_rejected_logps, chosen_lengths, rejected_lengths, *, margin=1.0,
         length_normalize=True, reduction="mean"):
    """PLaD's calibration loss (Zhang et al. 2024, Eq. 4): max(0, δ − s(c) + s(r)).

    s(y) = log π(y) / |y| (length-normalized student log-likelihood); ``length_normalize=False`` uses the
    summed log-likelihood. In the paper's pseudo-preference pairs c is the teacher's response and r the
    student's. ``margin`` is δ. Inputs [B]; → scalar or [B].
    """
    import torch

    if margin < 0:
        raise ConfigError(f"PLaD's margin must be >= 0 (got {margin}).")
    chosen, rejected = policy_chosen_logps, policy_rejected_logps
    if length_normalize:
        chosen = chosen / _positive_lengths(chosen_lengths, "chosen_lengths", chosen)
        rejected = rejected / _positive_lengths(rejected_lengths, "rejected_lengths", rejected)
    return reduce_pairs(torch.clamp(margin - chosen + rejected, min=0.0), reduction)


# ------------------------------------------------------------------ DDPO-RM (Fisch et al. 2024)


def ddpo_rm(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, reward_chosen,
            reward_rejected, *, beta, reduction="mean"):
    """Reward-model distillation ("DDPO" of Fisch et al. 2024, Eq. 7): (β·h − (r(c) − r(r)))².

    h = (log π(c) − log ref(c)) − (log π(r) − log ref(r)); ``reward_chosen`` / ``reward_rejected`` [B] are
    the reward model's scores (constants: detached). The minimiser is the policy whose implicit reward
    β·log π/ref matches the reward model's margin. Inputs [B]; → scalar or [B].
    """
    if beta <= 0:
        raise ConfigError(f"ddpo_rm's beta must be > 0 (got {beta}).")
    margin = (policy_chosen_logps - ref_chosen_logps) - (policy_rejected_logps - ref_rejected_logps)
    reward_margin = (reward_chosen.detach() - reward_rejected.detach()).to(margin)
    return reduce_pairs((beta * margin - reward_margin) ** 2, reduction)


# ------------------------------------------------------------------ dKTO (KTO on daDPO's stages)


def mismatched_order(batch_size: int, *, device=None):
    """Index [B] pairing example i's prompt with example (i + 1) mod B's response (KTO's KL estimate, as
    TRL builds its mismatched "KL completions"). B = 1 has no mismatched pair: a :class:`DataError`."""
    import torch

    if batch_size < 2:
        raise DataError("KTO's reference point needs at least 2 examples per step (mismatched prompt/response pairs).")
    return torch.roll(torch.arange(batch_size, device=device), shifts=-1)


def kto_reference_point(policy_mismatched_logps, ref_mismatched_logps):
    """KTO's z0 (Ethayarajh et al. 2024, Eq. 7): max(0, mean over mismatched pairs of log π(y'|x) − log ref(y'|x)).

    Inputs [M] summed log-probs of responses y' under prompts x they do not answer; pass those of the
    whole optimizer step (all micro-batches, all processes) so that z0 does not depend on accumulation.
    Detached: → scalar tensor.
    """
    if policy_mismatched_logps.numel() == 0:
        raise DataError("KTO's reference point needs at least one mismatched pair.")
    estimate = (policy_mismatched_logps.detach() - ref_mismatched_logps.detach()).mean()
    return estimate.clamp(min=0.0)


def dkto(policy_logps, ref_logps, desirable, *, beta, reference_point, desirable_weight=1.0,
         undesirable_weight=1.0, reduction="mean"):
    """dKTO: KTO (Ethayarajh et al. 2024, Eq. 8) with the teacher's response desirable, the student's undesirable.

    r = log π(y) − log ref(y) per example; value v = λ_D·σ(β(r − z0)) if desirable else λ_U·σ(β(z0 − r));
    loss = λ_y − v. ``policy_logps``, ``ref_logps`` [B] summed log-probs; ``desirable`` bool [B];
    ``reference_point`` = z0 (a scalar, detached: :func:`kto_reference_point` over the step, or 0).
    → scalar (mean over examples) or [B].
    """
    import torch

    if beta <= 0:
        raise ConfigError(f"dkto's beta must be > 0 (got {beta}).")
    if desirable_weight < 0 or undesirable_weight < 0:
        raise ConfigError("dkto's desirable_weight and undesirable_weight must be >= 0.")
    desirable = torch.as_tensor(desirable, device=policy_logps.device).bool()
    if tuple(desirable.shape) != tuple(policy_logps.shape):
        raise DataError(f"desirable has shape {tuple(desirable.shape)} but the log-probs {tuple(policy_logps.shape)}.")
    z0 = torch.as_tensor(reference_point).detach().to(policy_logps)
    ratio = policy_logps - ref_logps
    value = torch.where(desirable, desirable_weight * torch.sigmoid(beta * (ratio - z0)),
                        undesirable_weight * torch.sigmoid(beta * (z0 - ratio)))
    lam = torch.where(desirable, torch.full_like(ratio, desirable_weight), torch.full_like(ratio, undesirable_weight))
    return reduce_pairs(lam - value, reduction)
