"""Sequence log-probabilities and sequence-level preference losses (METHODS.md).

Log-probabilities: :func:`token_logps` / :func:`sequence_logps` / :func:`cross_entropy` read the
logit of the actual token, chunked like the divergences (no float32 copy of [B, T, V]).

Preference losses take per-sequence *summed* log-probabilities [B] (``sequence_logps``) and, where
needed, response lengths in tokens [B]; ``reduction`` is "mean" over pairs or "none" → [B].
Notation: c = chosen, r = rejected, π = policy, ref = reference, te = teacher, σ = sigmoid.
"""

from __future__ import annotations

from kdbench.errors import ConfigError, DataError
from kdbench.losses.chunking import default_chunk_rows, rowwise_loss
from kdbench.losses.reduction import check_reduction, compute_dtype, counted_mask, counted_rows, reduce_pairs


def token_logps(logits, labels, mask=None, *, temperature=1.0, chunk_rows=None):
    """log softmax(logits / τ)[label] at every counted position: [B, T, V], [B, T] → [B, T].

    ``labels[b, t]`` is the token that ``logits[b, t]`` predicts (already shifted: position t predicts
    token t+1). ``mask`` [B, T] selects the counted positions; ``None`` counts every position whose
    label is not −100. Uncounted positions are 0.
    """
    import torch

    if logits.dim() != 3 or tuple(labels.shape) != tuple(logits.shape[:2]):
        raise DataError(f"logits must be [B, T, V] and labels [B, T] (got {tuple(logits.shape)} and "
                        f"{tuple(labels.shape)}).")
    batch_shape = tuple(labels.shape)
    vocab_size = logits.shape[-1]
    mask_bool = labels != -100 if mask is None else counted_mask(mask, batch_shape)
    n_rows = batch_shape[0] * batch_shape[1]
    rows = counted_rows(mask_bool, n_rows, logits.device)
    labels_flat = labels.reshape(n_rows).long()
    if rows.numel():
        counted_labels = labels_flat.index_select(0, rows)
        if int(counted_labels.min()) < 0 or int(counted_labels.max()) >= vocab_size:
            raise DataError(f"a counted position has a label outside [0, {vocab_size}); mask out prompt and "
                            "padding positions (label -100) or fix the labels.")
    dtype = compute_dtype(logits)
    tau = float(temperature)

    def rows_fn(logit_chunk, label_chunk):
        scaled = logit_chunk.to(dtype) / tau
        return scaled.gather(-1, label_chunk.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(scaled, dim=-1)

    chunk = chunk_rows if chunk_rows is not None else default_chunk_rows(vocab_size)
    per_row = rowwise_loss(rows_fn, [logits.reshape(n_rows, vocab_size), labels_flat], rows, chunk, dtype)
    return per_row.reshape(batch_shape)


def sequence_logps(logits, labels, mask=None, *, temperature=1.0, chunk_rows=None):
    """log π(y | x) = Σ_t over counted positions of log π(y_t | ·): [B, T, V], [B, T], [B, T] → [B].

    Labels aligned with the logits as in :func:`token_logps`; the response length |y| is ``mask.sum(-1)``.
    """
    return token_logps(logits, labels, mask, temperature=temperature, chunk_rows=chunk_rows).sum(-1)


def cross_entropy_sum(logits, targets):
    """Σ over counted positions (``targets`` ≠ −100) of −log q(target): ``logits`` [B, T, V] upcast to float32,
    ``targets`` [B, T] (METHODS.md conventions; the training objectives' CE term)."""
    import torch.nn.functional as F

    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=-100,
                           reduction="sum")


def cross_entropy(logits, labels, mask=None, *, reduction="mean", chunk_rows=None):
    """Token cross-entropy −log π(y_t | ·): mean over counted positions, sum, or "none" → [B, T].

    Shapes as :func:`token_logps`.
    """
    check_reduction(reduction)
    per_position = -token_logps(logits, labels, mask, chunk_rows=chunk_rows)
    if reduction == "none":
        return per_position
    total = per_position.sum()
    if reduction == "sum":
        return total
    count = int((labels != -100).sum()) if mask is None else int((mask != 0).sum())
    return total / max(count, 1)


def _neg_logsigmoid(x):
    import torch.nn.functional as F

    return -F.logsigmoid(x)


def _lengths(lengths, name: str):
    import torch

    lengths = torch.as_tensor(lengths)
    if bool((lengths <= 0).any()):
        raise DataError(f"{name} must be positive token counts (a response with no tokens cannot be scored).")
    return lengths


def dpo(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, *, beta,
        reduction="mean"):
    """DPO (Rafailov et al. Eq. 7): −log σ(β[(log π(c) − log ref(c)) − (log π(r) − log ref(r))]).

    All inputs [B] summed log-probs; → scalar or [B].
    """
    margin = (policy_chosen_logps - ref_chosen_logps) - (policy_rejected_logps - ref_rejected_logps)
    return reduce_pairs(_neg_logsigmoid(beta * margin), reduction)


def ipo(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, *, tau,
        chosen_lengths=None, rejected_lengths=None, reduction="mean"):
    """IPO (Azar et al. Eq. 17): (h − 1/(2τ))², h = (log π(c) − log ref(c)) − (log π(r) − log ref(r)).

    With ``chosen_lengths`` / ``rejected_lengths`` [B] each log-ratio is divided by its response length
    (TRL's ``loss_type="ipo"``, confirmed with the IPO authors); without them, the paper's summed form.
    """
    if tau <= 0:
        raise ConfigError(f"IPO's tau must be > 0 (got {tau}).")
    chosen_ratio = policy_chosen_logps - ref_chosen_logps
    rejected_ratio = policy_rejected_logps - ref_rejected_logps
    if (chosen_lengths is None) != (rejected_lengths is None):
        raise ConfigError("pass both chosen_lengths and rejected_lengths to IPO, or neither.")
    if chosen_lengths is not None:
        chosen_ratio = chosen_ratio / _lengths(chosen_lengths, "chosen_lengths").to(chosen_ratio)
        rejected_ratio = rejected_ratio / _lengths(rejected_lengths, "rejected_lengths").to(rejected_ratio)
    return reduce_pairs((chosen_ratio - rejected_ratio - 1.0 / (2.0 * tau)) ** 2, reduction)


def simpo(policy_chosen_logps, policy_rejected_logps, chosen_lengths, rejected_lengths, *, beta, gamma,
          reduction="mean"):
    """SimPO (Meng et al. Eq. 6): −log σ(β/|c|·log π(c) − β/|r|·log π(r) − γ). Inputs [B]; → scalar or [B]."""
    chosen = policy_chosen_logps / _lengths(chosen_lengths, "chosen_lengths").to(policy_chosen_logps)
    rejected = policy_rejected_logps / _lengths(rejected_lengths, "rejected_lengths").to(policy_rejected_logps)
    return reduce_pairs(_neg_logsigmoid(beta * chosen - beta * rejected - gamma), reduction)


CPO_NLL_FORMS = ("token_mean", "sequence_sum")


def cpo(policy_chosen_logps, policy_rejected_logps, chosen_lengths, *, beta, nll="token_mean",
        nll_weight=1.0, reduction="mean"):
    """CPO (Xu et al. Eq. 3 + NLL): −log σ(β log π(c) − β log π(r)) − w·log π(c)/|c|.

    ``nll="token_mean"`` (default, TRL's form) divides the chosen NLL by |c|; ``"sequence_sum"`` is the
    CPO paper's sequence-sum NLL. Per pair the token mean is per sequence; TRL instead averages over all
    chosen tokens of the batch (the same when lengths are equal). Inputs [B]; → scalar or [B].
    """
    if nll not in CPO_NLL_FORMS:
        raise ConfigError(f"nll must be one of {', '.join(CPO_NLL_FORMS)} (got {nll!r}).")
    preference = _neg_logsigmoid(beta * (policy_chosen_logps - policy_rejected_logps))
    nll_term = -policy_chosen_logps
    if nll == "token_mean":
        nll_term = nll_term / _lengths(chosen_lengths, "chosen_lengths").to(policy_chosen_logps)
    return reduce_pairs(preference + nll_weight * nll_term, reduction)


def dpkd(policy_chosen_logps, policy_rejected_logps, teacher_chosen_logps, teacher_rejected_logps,
         chosen_lengths, rejected_lengths, *, beta, length_normalize=True, reduction="mean"):
    """DPKD (dpkd_v1.md Eq. 9): DPO whose reference is the teacher p, length-normalized.

    −log σ(β/|y_t|·(log q(y_t) − log p(y_t)) − β/|y_s|·(log q(y_s) − log p(y_s))), chosen = teacher
    response y_t, rejected = student response y_s, q = student. ``length_normalize=False`` drops the
    1/|y| factors (= :func:`dpo` with the teacher as reference). Inputs [B]; → scalar or [B].
    """
    chosen_ratio = policy_chosen_logps - teacher_chosen_logps
    rejected_ratio = policy_rejected_logps - teacher_rejected_logps
    if length_normalize:
        chosen_ratio = chosen_ratio / _lengths(chosen_lengths, "chosen_lengths").to(chosen_ratio)
        rejected_ratio = rejected_ratio / _lengths(rejected_lengths, "rejected_lengths").to(rejected_ratio)
    return reduce_pairs(_neg_logsigmoid(beta * (chosen_ratio - rejected_ratio)), reduction)


def dadpo(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps,
          teacher_chosen_logps, teacher_rejected_logps, *, beta1, beta2, reduction="mean"):
    """daDPO (dadpo.md Alg. 1): −log σ(β1·[ref margin] + β2·[teacher margin]).

    ref margin = (log π(c) − log ref(c)) − (log π(r) − log ref(r)); teacher margin likewise with te.
    β2 = 0 is dDPO, β1 = 0 is rDPO (DPO with the teacher as reference). Inputs [B]; → scalar or [B].
    """
    ref_margin = (policy_chosen_logps - ref_chosen_logps) - (policy_rejected_logps - ref_rejected_logps)
    teacher_margin = ((policy_chosen_logps - teacher_chosen_logps)
                      - (policy_rejected_logps - teacher_rejected_logps))
    return reduce_pairs(_neg_logsigmoid(beta1 * ref_margin + beta2 * teacher_margin), reduction)

