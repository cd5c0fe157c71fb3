"""kdbench's losses against TRL's implementations of the same objectives (skipped without TRL, a
failure in CI, which installs it: KDBENCH_REQUIRE_ALL=1; a change in TRL's internals fails).

Intended differences, documented in docs/methods.md:
* CPO's NLL: kdbench divides each chosen sequence's NLL by its own length (per-pair token mean);
  TRL averages over all chosen tokens of the batch. Equal when the chosen lengths are equal, which
  is how the comparison below is set up.
* IPO: kdbench's ``ipo`` with lengths is TRL's DPOTrainer ``loss_type="ipo"`` (length-normalized);
  without lengths it is the IPO paper's summed form (TRL's CPOTrainer ``"ipo"`` on summed log-probs).
"""

from __future__ import annotations

import os
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

from kdbench.losses import cpo, dpo, ipo, jsd, simpo

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
pytest.importorskip("trl", reason="TRL is not installed (pip install -e '.[dev]')")


def test_generalized_jsd_matches_trl():
    from trl.experimental.gkd.gkd_trainer import GKDTrainer

    g = torch.Generator().manual_seed(0)
    s = torch.randn(2, 6, 19, generator=g, dtype=torch.float64) * 2
    t = torch.randn(2, 6, 19, generator=g, dtype=torch.float64) * 2
    labels = torch.randint(0, 19, (2, 6), generator=g)
    labels[0, :2] = -100
    mask = labels != -100
    for beta in (0.0, 0.3, 0.5, 1.0):
        want = GKDTrainer.generalized_jsd_loss(s, t, labels=labels, beta=beta, temperature=1.3)
        got = jsd(s, t, mask, beta=beta, temperature=1.3)
        torch.testing.assert_close(got, want, atol=1e-10, rtol=1e-10)


def _cpo_self(loss_type, beta, gamma=0.0):
    return SimpleNamespace(alpha=0.0, loss_type=loss_type, beta=beta, label_smoothing=0.0, simpo_gamma=gamma,
                           accelerator=SimpleNamespace(device=torch.device("cpu")))


def _logps(seed, B=4):
    g = torch.Generator().manual_seed(seed)
    return [-(torch.rand(B, generator=g, dtype=torch.float64) * 20 + 1) for _ in range(4)]


def test_simpo_and_cpo_match_trl_cpo_trainer():
    from trl.experimental.cpo.cpo_trainer import CPOTrainer

    pc, pr, _, _ = _logps(1)
    lc, lr = torch.tensor([3.0, 4, 5, 6], dtype=torch.float64), torch.tensor([2.0, 7, 1, 3], dtype=torch.float64)
    # SimPO: TRL feeds length-averaged log-probs (average_log_prob for "simpo") and subtracts γ/β inside.
    losses, _, _ = CPOTrainer.cpo_loss(_cpo_self("simpo", beta=2.0, gamma=0.7), pc / lc, pr / lr)
    torch.testing.assert_close(simpo(pc, pr, lc, lr, beta=2.0, gamma=0.7, reduction="none"), losses)
    # CPO: preference term on summed log-probs + cpo_alpha(=1)·NLL; TRL's NLL is the token mean over all
    # chosen tokens of the batch, equal to kdbench's per-pair token mean when the lengths are equal.
    equal = torch.full_like(pc, 5.0)
    losses, _, _ = CPOTrainer.cpo_loss(_cpo_self("sigmoid", beta=0.1), pc, pr)
    trl_total = losses.mean() + (-pc).sum() / equal.sum()
    torch.testing.assert_close(cpo(pc, pr, equal, beta=0.1), trl_total)
    # IPO without lengths = the paper's form = TRL CPOTrainer's "ipo" on summed log-probs (no reference).
    losses, _, _ = CPOTrainer.cpo_loss(_cpo_self("ipo", beta=0.3), pc, pr)
    zeros = torch.zeros_like(pc)
    torch.testing.assert_close(ipo(pc, pr, zeros, zeros, tau=0.3, reduction="none"), losses)


class _FakePolicy:
    """Stands in for the policy model inside DPOTrainer._compute_loss: returns fixed per-token log-probs."""

    def __init__(self, per_token_logps):
        self.per_token_logps = per_token_logps
        self.training = False

    def __call__(self, **kwargs):
        n, t = self.per_token_logps.shape
        return SimpleNamespace(log_probs=self.per_token_logps, entropy=torch.zeros(n, t),
                               mean_logits=torch.zeros(n, t), is_top1=torch.zeros(n, t, dtype=torch.bool))


def _trl_dpo_loss(loss_type, beta, chosen_tokens, rejected_tokens, completion_mask, ref_chosen, ref_rejected):
    from trl.trainer.dpo_trainer import DPOTrainer

    per_token = torch.cat([chosen_tokens, rejected_tokens]) * completion_mask[:, 1:]
    policy = _FakePolicy(per_token)
    fake = SimpleNamespace(
        model=policy, accelerator=SimpleNamespace(device=torch.device("cpu"), gather_for_metrics=lambda x: x,
                                                  gather=lambda x: x),
        aux_loss_enabled=False, ld_alpha=None, precompute_ref_logps=True, f_divergence_type="reverse_kl",
        loss_types=[loss_type], loss_weights=[1.0], beta=beta, use_weighting=False, label_smoothing=0.0,
        _metrics={"train": defaultdict(list), "eval": defaultdict(list)}, _total_train_tokens=0, _tp_size=1)
    inputs = {"input_ids": torch.zeros_like(completion_mask), "attention_mask": completion_mask,
              "completion_mask": completion_mask, "ref_chosen_logps": ref_chosen, "ref_rejected_logps": ref_rejected}
    return DPOTrainer._compute_loss(fake, policy, inputs, return_outputs=False)


def test_dpo_and_length_normalized_ipo_match_trl_dpo_trainer():
    g = torch.Generator().manual_seed(2)
    B, T = 3, 8
    completion_mask = torch.zeros(2 * B, T + 1, dtype=torch.long)
    lengths = torch.tensor([3, 5, 8, 2, 7, 4])
    for row, n in enumerate(lengths):
        completion_mask[row, T + 1 - n:] = 1
    chosen_tokens = -torch.rand(B, T, generator=g, dtype=torch.float64)
    rejected_tokens = -torch.rand(B, T, generator=g, dtype=torch.float64)
    ref_chosen = -torch.rand(B, generator=g, dtype=torch.float64) * 5
    ref_rejected = -torch.rand(B, generator=g, dtype=torch.float64) * 5
    shifted = completion_mask[:, 1:].to(torch.float64)
    chosen_logps = (chosen_tokens * shifted[:B]).sum(1)
    rejected_logps = (rejected_tokens * shifted[B:]).sum(1)
    try:
        trl_dpo = _trl_dpo_loss("sigmoid", 0.1, chosen_tokens, rejected_tokens, completion_mask, ref_chosen,
                                ref_rejected)
        trl_ipo = _trl_dpo_loss("ipo", 0.4, chosen_tokens, rejected_tokens, completion_mask, ref_chosen,
                                ref_rejected)
    except (AttributeError, KeyError, TypeError) as err:  # TRL's private loss plumbing moved
        # constraints.txt pins TRL and CI installs it: a change there must be looked at, not skipped
        pytest.fail(f"this TRL version's DPOTrainer._compute_loss needs other internals ({err}); update "
                    "_trl_dpo_loss to the pinned TRL's plumbing")
    torch.testing.assert_close(dpo(chosen_logps, rejected_logps, ref_chosen, ref_rejected, beta=0.1), trl_dpo)
    got = ipo(chosen_logps, rejected_logps, ref_chosen, ref_rejected, tau=0.4,
              chosen_lengths=lengths[:B].double(), rejected_lengths=lengths[B:].double())
    torch.testing.assert_close(got, trl_ipo)
