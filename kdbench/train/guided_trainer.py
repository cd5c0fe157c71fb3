"""The guided trainer: a teacher-guided form (:mod:`kdbench.train.guided_forms`) on (x, y_w, y_other) rows,
normalised by the optimizer step's token and sequence counts (:class:`~kdbench.train.trainer_base.StepTrainer`).

The frozen teachers — π_dpo (``teacher``) and π_ref (``ref_teacher``) — run in the same step on the rows the
form asks for, never wrapped or checkpointed. Each part the form returns is logged per token of the rows it is
counted on. The policy trains without dropout unless ``disable_dropout: false``.
"""

from __future__ import annotations

import torch

from kdbench.train.guided_forms import GuidedBatch, GuidedForm
from kdbench.train.policy import disable_dropout
from kdbench.train.trainer_base import StepTrainer, positive, rollout_extras


class GuidedTrainer(StepTrainer):
    """``form`` / ``params``: the guided form and its typed parameters; ``family``: the guided family's
    parameters (:class:`~kdbench.train.guided_forms.GuidedParams`)."""

    COUNTS = ("pairs", "chosen_tokens", "other_tokens")
    LOGGED_COUNTS = {"pairs": "pairs"}

    def __init__(self, *args, form: GuidedForm, family, ref_teacher=None, dropout: bool = False, **kwargs):
        super().__init__(*args, **kwargs)
        if not dropout:
            disable_dropout(self.model)
        self.form = form
        self.family = family
        self.ref_teacher = self.prepare_frozen(ref_teacher)

    def micro_batch_counts(self, batch: dict) -> list[float]:
        n = batch["example_index"].numel()
        counted = batch["labels"][:, 1:] != -100
        return [n, int(counted[:n].sum()), int(counted[n:].sum())]

    def step_loss(self, model, inputs, totals, num_items_in_batch):
        n = inputs["example_index"].numel()
        outputs = model(input_ids=inputs["input_ids"], attention_mask=inputs.get("attention_mask"))
        vocab = self.logit_rows
        logits = outputs.logits[:, :-1, :vocab]
        targets = inputs["labels"][:, 1:]
        mask = (targets != -100).to(torch.float32)
        ids, attention = inputs["input_ids"], inputs["attention_mask"]
        teachers = {}
        for model_name, rows in self.form.teachers:
            frozen = self.teacher if model_name == "dpo" else self.ref_teacher
            selected = slice(None) if rows == "all" else slice(n, None)
            teachers[model_name, rows] = self.teacher_logits(frozen, ids[selected], attention[selected], vocab)
        batch = GuidedBatch(logits[:n], targets[:n], mask[:n], logits[n:], mask[n:], teachers,
                            chosen_tokens=positive(totals["chosen_tokens"], logits),
                            other_tokens=positive(totals["other_tokens"], logits),
                            sequences=positive(totals["pairs"], logits),
                            progress=min(1.0, self.state.global_step / max(1, int(self.state.max_steps or 1))),
                            other_targets=targets[n:],
                            extras={key: value[n:] for key, value in rollout_extras(inputs).items()})
        parts = self.form.loss(batch, self.params, self.family)
        loss = parts.pop("loss")
        if model.training:
            counts = {"chosen": mask[:n].sum(), "other": mask[n:].sum()}
            for name, value in parts.items():
                rows = self.form.parts.get(name, "chosen")
                self.record(name, value.detach(), f"{name}_tokens", label=f"{name}_per_token")
                self.record_count(f"{name}_tokens", float(counts[rows]))
            self.record_count("pairs", n)
            self.counters["tokens_processed"] += int(attention.sum())
            self.counters["response_tokens"] += int(mask.sum())
        return loss, outputs
