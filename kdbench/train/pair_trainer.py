"""The pair trainer: a preference form (:mod:`kdbench.train.preference_forms`) on (chosen, rejected) rows, the
loss the mean over every pair of the optimizer step (all micro-batches and processes), like the token count of
the token objectives (:class:`~kdbench.train.trainer_base.StepTrainer`).

Optional terms, each normalised over the whole step:

* an LM term: λ·token-mean CE on the chosen rows (``lm_rows="chosen"``: a preference file's gold responses),
  on the pairs' gold rows (``"gold"``) or on a plain-text corpus (``"corpus"``, ``lm_source``);
* ``kl_weight``: λ·token-mean divergence (``kl_divergence``) to the teacher on the chosen rows (ddpo_kl).

Diagnostics per pair (``train_log.jsonl``): the implicit rewards of chosen and rejected, their margin and the
reward accuracy; with rejected responses sampled online (DPKD), the sequence-level reverse KL estimate
log q(y_s) − log p(y_s) and the exact reverse KL on the first response token (DPKD's Table 3).

The policy trains without dropout unless ``params.disable_dropout`` is false (:mod:`kdbench.train.policy`).
"""

from __future__ import annotations

import torch

from kdbench.losses.sequence import cross_entropy_sum
from kdbench.train.policy import disable_dropout
from kdbench.train.preference_forms import PairBatch, PreferenceForm, preference_parts
from kdbench.train.trainer_base import StepTrainer, positive


class PairTrainer(StepTrainer):
    """:class:`StepTrainer` on preference pairs. ``form`` / ``params``: the preference form and its typed
    parameters; ``lm_rows``: where the LM term reads (None: no LM term); ``kl_weight`` / ``kl_divergence``: the
    token divergence to the teacher on the chosen rows."""

    COUNTS = ("pairs", "chosen_tokens", "rejected_tokens", "lm_tokens")
    LOGGED_COUNTS = {"pairs": "pairs"}

    def __init__(self, *args, form: PreferenceForm, lm_rows: str | None = None, kl_weight: float = 0.0,
                 kl_divergence: str = "rkl", dropout: bool = False, **kwargs):
        super().__init__(*args, **kwargs)
        if not dropout:  # TRL's disable_dropout: no dropout noise in the rewards
            disable_dropout(self.model)
        self.form = form
        self.lm_rows = lm_rows
        self.kl_weight = float(kl_weight)
        self.kl_divergence = kl_divergence
        if self.logit_rows is None:
            self.logit_rows = len(self.gen_tokenizer)
        self._form_step_stats: dict = {}

    def get_batch_samples(self, epoch_iterator, num_batches: int, device):
        """The step's micro-batches and counts (:class:`StepTrainer`), then the form's statistics over the whole
        step (:attr:`~kdbench.train.preference_forms.PreferenceForm.step_stats`: a no-gradient pass, summed over
        processes), so they do not depend on how the step is split."""
        batch_samples, total = super().get_batch_samples(epoch_iterator, num_batches, device)
        if self.form.step_stats is not None and batch_samples:
            self._form_step_stats = self.form.step_stats(self, batch_samples, self.params, True)
        return batch_samples, total

    def form_step_stats(self, inputs: dict, num_items_in_batch) -> dict:
        """The form's step statistics: the optimizer step's in training, the micro-batch's own otherwise."""
        if self.form.step_stats is None:
            return {}
        if num_items_in_batch is not None and self._form_step_stats:
            return self._form_step_stats
        return self.form.step_stats(self, [inputs], self.params, False)

    def micro_batch_counts(self, batch: dict) -> list[float]:
        n = batch["example_index"].numel()
        counted = batch["labels"][:, 1:] != -100
        chosen, rejected = int(counted[:n].sum()), int(counted[n:].sum())
        if self.lm_rows == "chosen":
            lm = chosen
        elif self.lm_rows in ("gold", "corpus") and "lm_labels" in batch:
            lm = int((batch["lm_labels"][:, 1:] != -100).sum())
        else:
            lm = 0
        return [n, chosen, rejected, lm]

    def pair_batch(self, logits, inputs, step_stats: dict | None = None) -> tuple[PairBatch, torch.Tensor, torch.Tensor]:
        """The micro-batch's :class:`PairBatch` from the policy's logits [2P, T, V] (chosen rows first), and
        its summed log-probs [2P] and response lengths [2P]. ``step_stats``: the form's statistics of the step."""
        from kdbench.losses.sequence import sequence_logps

        n = inputs["example_index"].numel()
        targets = inputs["labels"][:, 1:]
        logps = sequence_logps(logits, targets)  # [2P]
        lengths = (targets != -100).sum(-1)
        extras = dict(step_stats or {})
        if self.form.policy_stats is not None:
            with torch.no_grad():
                for name, values in self.form.policy_stats(logits, targets, self.params).items():
                    extras[f"{name}_chosen"], extras[f"{name}_rejected"] = values[:n], values[n:]
        pairs = PairBatch(logps[:n], logps[n:], lengths[:n], lengths[n:],
                          ref_chosen=inputs.get("ref_chosen"), ref_rejected=inputs.get("ref_rejected"),
                          teacher_chosen=inputs.get("teacher_chosen"), teacher_rejected=inputs.get("teacher_rejected"),
                          reward_chosen=inputs.get("reward_chosen"), reward_rejected=inputs.get("reward_rejected"),
                          extras=extras)
        return pairs, logps, lengths

    def step_loss(self, model, inputs, totals, num_items_in_batch):
        from kdbench.losses import DIVERGENCES

        n_pairs = inputs["example_index"].numel()
        outputs = model(input_ids=inputs["input_ids"], attention_mask=inputs.get("attention_mask"))
        vocab = self.logit_rows
        logits = outputs.logits[:, :-1, :vocab]
        targets = inputs["labels"][:, 1:]
        pairs, logps, lengths = self.pair_batch(logits, inputs, self.form_step_stats(inputs, num_items_in_batch))
        parts = preference_parts(self.form, self.params, pairs)
        loss = parts["loss"] / positive(totals["pairs"], logps)
        token_parts: dict[str, tuple[torch.Tensor, int]] = {}
        if self.lm_rows and self.lm_weight > 0:
            if self.lm_rows == "chosen":
                lm_sum, lm_count = -logps[:n_pairs].sum(), int(lengths[:n_pairs].sum())
            else:
                lm_out = model(input_ids=inputs["lm_input_ids"], attention_mask=inputs["lm_attention_mask"])
                lm_sum = cross_entropy_sum(lm_out.logits[:, :-1, :vocab], inputs["lm_labels"][:, 1:])
                lm_count = int((inputs["lm_labels"][:, 1:] != -100).sum())
                self.counters["lm_tokens"] += lm_count
            loss = loss + self.lm_weight * lm_sum / positive(totals["lm_tokens"], logps)
            token_parts["lm_ce"] = (lm_sum.detach(), lm_count)
        if self.kl_weight > 0:
            chosen_mask = (targets[:n_pairs] != -100).to(torch.float32)
            teacher_logits = self.teacher_logits(self.teacher, inputs["input_ids"][:n_pairs],
                                                 inputs["attention_mask"][:n_pairs], vocab)
            kl_sum = DIVERGENCES[self.kl_divergence](logits[:n_pairs], teacher_logits, chosen_mask, reduction="sum")
            loss = loss + self.kl_weight * kl_sum / positive(totals["chosen_tokens"], logps)
            token_parts[f"{self.kl_divergence}_chosen"] = (kl_sum.detach(), int(chosen_mask.sum()))
        if model.training:
            self._record(parts, token_parts, inputs, logits, logps, lengths, n_pairs,
                         {k: v for k, v in pairs.extras.items() if torch.is_tensor(v) and v.dim() == 0})
        return loss, outputs

    def _record(self, parts, token_parts, inputs, logits, logps, lengths, n_pairs, pairs_stats: dict) -> None:
        with torch.no_grad():
            if "teacher_first_logp" in inputs:  # rejected sampled from the policy in the step (DPKD's Table 3):
                rows = torch.arange(n_pairs, device=logits.device)  # the exact KL(q‖p) at the first response token
                log_q = torch.log_softmax(logits[rows, inputs["prompt_length"] - 1].float(), dim=-1)
                parts["rkl_first_token"] = (log_q.exp() * (log_q - inputs["teacher_first_logp"])).sum()
                # log q(y_s) − log p(y_s), y_s ~ q: a sample of the sequence-level reverse KL
                parts["rkl_sequence"] = (logps[n_pairs:].detach() - inputs["teacher_rejected"]).sum()
        for name, value in pairs_stats.items():  # the form's step statistics (dKTO's z0), logged as window means
            parts[name] = value.detach() * n_pairs
        for name, value in parts.items():
            self.record(name, value.detach(), "pairs")
        for name, (value, count) in token_parts.items():
            self.record(name, value, f"{name}_tokens", label=f"{name}_per_token")
            self.record_count(f"{name}_tokens", count)
        self.record_count("pairs", n_pairs)
        self.counters["tokens_processed"] += int(inputs["attention_mask"].sum())
        self.counters["response_tokens"] += int(lengths.sum())

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval") -> dict:
        """The preference loss, reward accuracy and mean reward margin over every held-out pair (exact
        means over all pairs and processes). The pairs are fixed (y_s of the starting policy for DPKD's
        online pairs) and their frozen log-probs precomputed; LM and KL terms are not part of it."""

        def sums(model, inputs) -> list[float]:
            logits = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).logits
            pairs, _, _ = self.pair_batch(logits[:, :-1, :self.logit_rows], inputs, self.form_step_stats(inputs, None))
            parts = preference_parts(self.form, self.params, pairs)
            return [float(parts["loss"]), float(parts["reward_accuracy"]), float(parts["reward_margin"]),
                    float(inputs["example_index"].numel())]

        return self.exact_evaluation(eval_dataset, metric_key_prefix, sums,
                                     ("loss", "reward_accuracy", "reward_margin"), "pairs")
