"""The token-level trainer: a recipe's token objective (:mod:`kdbench.train.objectives`) on response tokens,
normalised over the optimizer step's counted response tokens (:class:`~kdbench.train.trainer_base.StepTrainer`).

The teacher signal is the frozen teacher's logits in the same step, or an offline top-k cache
(:mod:`kdbench.teacher_cache`) gathered per batch from memory-mapped files.
"""

from __future__ import annotations

import torch

from kdbench.errors import TrainingError
from kdbench.losses.sequence import cross_entropy_sum
from kdbench.train.objectives import Batch, Objective
from kdbench.train.trainer_base import StepTrainer, n_tokens, rollout_extras

class TokenTrainer(StepTrainer):
    """:class:`StepTrainer` for token objectives; counts response tokens and LM tokens."""

    COUNTS = ("tokens", "lm_tokens")
    LOGGED_COUNTS = {"tokens": "response_tokens"}

    def __init__(self, *args, objective: Objective, teacher_cache=None, eval_teacher_cache=None,
                 teacher_rows: int | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.teacher_rows = teacher_rows  # the teacher's logit rows when its tokenizer differs (cross_tokenizer)
        self.objective = objective
        self.teacher_cache = teacher_cache
        self.eval_teacher_cache = eval_teacher_cache
        self._objective_step: dict = {}
        if objective.trainable is not None:  # e.g. DSKD's projectors: optimised, checkpointed, never saved in model/
            module = objective.trainable(self.model, self.teacher, self.params)
            self.attach_objective_module(module, getattr(self.params, "trainable_lr", None))

    def get_batch_samples(self, epoch_iterator, num_batches: int, device):
        """The step's micro-batches and counts (:class:`StepTrainer`), then the objective's statistics over the
        whole step (:attr:`~kdbench.train.objectives.Objective.step_stats`, e.g. ATKD's split)."""
        batch_samples, total = super().get_batch_samples(epoch_iterator, num_batches, device)
        if self.objective.step_stats is not None and batch_samples:
            self._objective_step = self.objective.step_stats(self, batch_samples, self.params, True)
        return batch_samples, total

    @property
    def temperature(self) -> float:
        return float(getattr(self.params, "temperature", 1.0))

    def micro_batch_counts(self, batch: dict) -> list[float]:
        lm = int((batch["lm_labels"][:, 1:] != -100).sum()) if "lm_labels" in batch else 0
        return [int((batch["labels"][:, 1:] != -100).sum()), lm]

    def _teacher_signal(self, inputs, mask, vocab):
        if self.objective.cross_tokenizer:  # the teacher reads its own tokenization of the same example
            return self.teacher_logits(self.teacher, inputs["teacher_input_ids"], inputs["teacher_attention_mask"],
                                       self.teacher_rows)
        if self.teacher_cache is not None:
            if inputs.get("on_policy"):
                raise TrainingError("The top-k teacher cache covers the gold responses only; on-policy methods need "
                                    "--set teacher_signal=online.")
            return self.teacher_cache.sparse_batch(inputs["example_index"].tolist(), mask, temperature=self.temperature)
        return self.teacher_logits(self.teacher, inputs["input_ids"], inputs.get("attention_mask"), vocab)

    def _hidden_inputs(self, model, inputs, outputs, vocab) -> tuple[object, dict]:
        """(teacher logits [B, Tt-1, Vt], :attr:`Batch.hidden`) for an objective reading hidden states (DSKD):
        the teacher runs once on its own rows, both models' last layers aligned like the logits."""
        student = self.accelerator.unwrap_model(model)
        ids, attention = inputs["teacher_input_ids"], inputs["teacher_attention_mask"]
        with torch.no_grad():
            teacher_out = self.teacher(input_ids=ids, attention_mask=attention, output_hidden_states=True)
        self.counters["teacher_forward_tokens"] += int(attention.sum())
        teacher_vocab = self.teacher_rows
        hidden = {"student_hidden": outputs.hidden_states[-1][:, :-1], "student_input_ids": inputs["input_ids"][:, :-1],
                  "teacher_hidden": teacher_out.hidden_states[-1][:, :-1], "teacher_input_ids": ids[:, :-1],
                  "student_embeddings": student.get_input_embeddings().weight[:vocab],
                  "student_head": student.get_output_embeddings().weight[:vocab],
                  "teacher_embeddings": self.teacher.get_input_embeddings().weight[:teacher_vocab],
                  "teacher_head": self.teacher.get_output_embeddings().weight[:teacher_vocab]}
        return teacher_out.logits[:, :-1, :teacher_vocab], hidden

    def objective_batch(self, model, inputs, step: dict, with_extras: bool) -> tuple[Batch, object]:
        """(the objective's :class:`Batch` for one micro-batch, the student's outputs)."""
        hidden_states = self.objective.hidden_states
        outputs = model(input_ids=inputs["input_ids"], attention_mask=inputs.get("attention_mask"),
                        **({"output_hidden_states": True} if hidden_states else {}))
        vocab = self.logit_rows or outputs.logits.shape[-1]
        student_logits = outputs.logits[:, :-1, :vocab]  # position t predicts token t+1
        targets = inputs["labels"][:, 1:]
        mask = (targets != -100).to(torch.float32)
        hidden: dict = {}
        if hidden_states:
            teacher_signal, hidden = self._hidden_inputs(model, inputs, outputs, vocab)
        elif self.objective.needs_teacher:
            teacher_signal = self._teacher_signal(inputs, mask, vocab)
        else:
            teacher_signal = None
        batch = Batch(student_logits, teacher_signal, targets, mask, step, self._teacher_targets(inputs),
                      rollout_extras(inputs) if with_extras else {}, hidden, self.objective_module)
        return batch, outputs

    def step_loss(self, model, inputs, totals, num_items_in_batch):
        step = self._objective_step if num_items_in_batch is not None else {}
        batch, outputs = self.objective_batch(model, inputs, step, True)
        student_logits, teacher_signal, mask = batch.student_logits, batch.teacher_logits, batch.mask
        vocab = student_logits.shape[-1]
        parts = self.objective.loss(batch, self.params)
        counted = mask.sum()
        if num_items_in_batch is None:  # evaluation, or a caller outside the training loop
            denominator = counted.clamp(min=1)
        else:
            denominator = torch.as_tensor(num_items_in_batch, dtype=torch.float32, device=counted.device).clamp(min=1)
        loss = parts["loss"] / denominator

        lm_sum = None
        if self.lm_source is not None and model.training and "lm_input_ids" in inputs and self.lm_weight > 0:
            lm_out = model(input_ids=inputs["lm_input_ids"], attention_mask=inputs["lm_attention_mask"])
            lm_sum = cross_entropy_sum(lm_out.logits[:, :-1, :vocab], inputs["lm_labels"][:, 1:])
            loss = loss + self.lm_weight * lm_sum / torch.as_tensor(totals["lm_tokens"], dtype=torch.float32).clamp(min=1)
            self.counters["lm_tokens"] += int((inputs["lm_labels"][:, 1:] != -100).sum())
        if model.training:
            self._record(parts, int(counted), lm_sum, inputs, student_logits, teacher_signal, mask)
        return loss, outputs

    def _teacher_targets(self, inputs):
        """The teacher's own targets [B, Tt] for an objective across tokenizers, else None."""
        return inputs["teacher_labels"][:, 1:] if self.objective.cross_tokenizer else None

    def _record(self, parts, counted, lm_sum, inputs, student_logits, teacher_signal, mask) -> None:
        with torch.no_grad():
            for name, value in parts.items():
                self.record(name, value, "tokens")
            self.record_count("tokens", counted)
            if lm_sum is not None:
                self.record("lm_ce", lm_sum, "lm_tokens")
                self.record_count("lm_tokens", float((inputs["lm_labels"][:, 1:] != -100).sum()))
            self._record_diagnostics(student_logits, teacher_signal, mask, counted)
        self.counters["tokens_processed"] += n_tokens(inputs)
        self.counters["response_tokens"] += counted

    def _record_diagnostics(self, student_logits, teacher_signal, mask, counted) -> None:
        """The divergence's per-position diagnostics (AKL's head weight), on logging steps only."""
        from kdbench.losses.divergences import get_divergence

        name = getattr(self.params, "divergence", None)
        logging_now = (self.state.global_step + 1) % max(1, self.args.logging_steps) == 0
        if name is None or teacher_signal is None or not logging_now or not counted:
            return
        divergence = get_divergence(name)
        if divergence.diagnose is None:
            return
        extra = getattr(self.params, "divergence_params", None) or {}
        for key, values in divergence.diagnose(student_logits, teacher_signal, self.temperature, extra).items():
            self.record(key, (values * mask).sum(), "diagnosed_tokens", label=key)
        self.record_count("diagnosed_tokens", counted)

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval") -> dict:
        """Validation metrics as exact means over every counted token of the set: ``loss`` (the
        recipe's objective), ``ce`` (gold cross-entropy) and ``token_accuracy`` (argmax = gold)."""

        def sums(model, inputs) -> list[float]:
            if self.objective.hidden_states:
                batch, _ = self.objective_batch(model, inputs, {}, False)
                student_logits, teacher_signal, targets, mask = (batch.student_logits, batch.teacher_logits,
                                                                 batch.targets, batch.mask)
                parts = self.objective.loss(batch, self.params)
                ce = cross_entropy_sum(student_logits, targets)
                correct = ((student_logits.argmax(-1) == targets) & (targets != -100)).sum()
                return [float(parts["loss"]), float(ce), float(correct), float(mask.sum())]
            outputs = model(input_ids=inputs["input_ids"], attention_mask=inputs.get("attention_mask"))
            vocab = self.logit_rows or outputs.logits.shape[-1]
            student_logits = outputs.logits[:, :-1, :vocab]
            targets = inputs["labels"][:, 1:]
            mask = (targets != -100).to(torch.float32)
            teacher_signal = None
            if self.objective.needs_teacher and self.eval_teacher_cache is not None:
                teacher_signal = self.eval_teacher_cache.sparse_batch(inputs["example_index"].tolist(), mask,
                                                                      temperature=self.temperature)
            elif self.objective.needs_teacher:
                ids, attention = ((inputs["teacher_input_ids"], inputs["teacher_attention_mask"])
                                  if self.objective.cross_tokenizer else (inputs["input_ids"], inputs.get("attention_mask")))
                teacher_logits = self.teacher(input_ids=ids, attention_mask=attention).logits
                teacher_signal = teacher_logits[:, :-1, :self.teacher_rows if self.objective.cross_tokenizer else vocab]
            parts = self.objective.loss(Batch(student_logits, teacher_signal, targets, mask,
                                              teacher_targets=self._teacher_targets(inputs)), self.params)
            ce = cross_entropy_sum(student_logits, targets)
            correct = ((student_logits.argmax(-1) == targets) & (targets != -100)).sum()
            return [float(parts["loss"]), float(ce), float(correct), float(mask.sum())]

        return self.exact_evaluation(eval_dataset, metric_key_prefix, sums, ("loss", "ce", "token_accuracy"), "tokens")
