"""Sequence-level preference pipelines: dDPO, rDPO, daDPO (dadpo.md Alg. 1) and DPO / SimPO on a file.

``kdbench train ddpo|rdpo|dadpo`` runs these stages, each an artifact of the store (keyed by its
inputs) and recorded in the run's ``stages.json``, so a rerun — or another method on the same
data — resumes or reuses stage by stage ("reusing cached ... artifact" in the log):

1. ``generate``: y_t = the teacher's greedy output on every training prompt (the same artifact as
   the ``dsft`` / ``seqkd`` generation stage) and y_s = the *original* student's greedy output
   (``student-generations``). One pair (chosen y_t, rejected y_s) per prompt; each response ends
   with the EOS its model emitted, or none when cut (:mod:`kdbench.train.responses`).
2. ``dsft``: the student fine-tuned on (x, y_t) with the ``dsft`` recipe (``dsft-model``
   artifact, its own ``dsft_settings``: :mod:`kdbench.train.stage_settings`), unless
   ``params.dsft_model`` names a ready checkpoint. It is the policy's starting point and the frozen
   reference (``reference: student``: the original student instead).
3. ``logprobs``: summed log-probs of chosen and rejected under the frozen reference and/or the
   teacher, computed once (``sequence-logprobs`` artifact, one per model and tokenized pair set).
   Each model scores the response *text* with its own tokenizer and prompt template, so the teacher
   may have another vocabulary than the student; every log-softmax runs over the tokenizer's
   vocabulary rows, the policy's in the step too.
4. ``train``: :class:`PreferenceTrainer` — the policy's log-probs in the step
   (:func:`kdbench.losses.sequence.sequence_logps`), the recipe's preference loss
   (:mod:`kdbench.train.objectives`, ``preference``), mean over all pairs of the optimizer step.

``pairs: file`` recipes (``dpo``, ``simpo``) read (prompt, chosen, rejected) from ``--data``
(fields ``instruction`` or ``prompt``, optional ``input``, ``chosen``, ``rejected``); DPO's
reference is the frozen initial student.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from kdbench.config import to_dict
from kdbench.errors import ConfigError, DataError
from kdbench.store import RunDir, atomic_write_json, atomic_write_text, hash_obj
from kdbench.train.engine import DistillTrainer, take_batches
from kdbench.train.objectives import PairBatch, cross_entropy_sum, preference_reference
from kdbench.train.policy import disable_dropout
from kdbench.train.responses import GOLD_END, ResponseEnd, tokenize_response

@dataclass
class Pair:
    """One preference pair: the prompt's example (``output`` unused), chosen and rejected texts and how
    each ends (a generated response keeps the EOS its model emitted, or none when it was cut)."""

    example: object  # kdbench.data.Example
    chosen: str
    rejected: str
    chosen_end: ResponseEnd = GOLD_END
    rejected_end: ResponseEnd = GOLD_END


def load_preference_pairs(path: str | Path) -> list[Pair]:
    """(prompt, chosen, rejected) rows of a JSONL / JSON / Parquet preference file."""
    from kdbench.data import prompt_example, read_rows

    rows = read_rows(path)
    if not rows:
        raise DataError(f"{path} holds no records; give a preference file with at least one pair.")
    pairs = []
    for number, row in enumerate(rows, start=1):
        chosen, rejected = row.get("chosen"), row.get("rejected")

        def check_pair() -> None:
            if not (isinstance(chosen, str) and chosen.strip() and isinstance(rejected, str) and rejected.strip()):
                raise DataError(f"{path}, record {number} has no 'chosen' and 'rejected' texts; preference methods "
                                "need a file with chosen and rejected responses for every prompt.")

        pairs.append(Pair(prompt_example(row, path, number, check_response=check_pair, what="pair"), chosen, rejected))
    return pairs


# ------------------------------------------------------------------------------------------ tokenized pairs
def tokenize_pairs(pairs: list[Pair], tokenizer, *, style: str, max_prompt_length: int, max_length: int) -> list[dict]:
    """Per pair: chosen and rejected as prompt + response + its end with ``tokenizer`` (labels −100 on
    the prompt); the end is the EOS the response's model emitted, none for a cut response, the
    tokenizer's EOS for a dataset response (:mod:`kdbench.train.responses`)."""
    out = []
    for pair in pairs:
        row = {}
        for side in ("chosen", "rejected"):
            item = tokenize_response(pair.example, tokenizer, style=style, max_prompt_length=max_prompt_length,
                                     max_length=max_length, response=getattr(pair, side),
                                     end=getattr(pair, f"{side}_end"))
            row[side] = (item.input_ids, item.labels)
        out.append(row)
    return out


def _pad(sequences: list[tuple[list[int], list[int]]], pad_token_id: int) -> dict:
    from kdbench.data import PadCollator

    return PadCollator(pad_token_id)([{"input_ids": ids, "labels": labels} for ids, labels in sequences])


def frozen_sequence_logps(model, tokenized: list[dict], pad_token_id: int, batch_size: int,
                          vocab_size: int | None = None) -> dict:
    """Summed log-probs of every chosen and rejected response under a frozen ``model``: {"chosen": [P],
    "rejected": [P]} lists of floats (float32 math, eval mode, no gradient).

    ``vocab_size``: the output rows the log-softmax is taken over — the tokenizer's vocabulary, the same
    rows as the policy's log-probs in the step (:attr:`PreferenceTrainer.logit_rows`); the padded rows a
    checkpoint may carry beyond it (Qwen2.5) are not tokens. ``None``: every row."""
    from kdbench.losses.sequence import sequence_logps

    was_training = model.training
    model.eval()
    out = {"chosen": [], "rejected": []}
    device = next(model.parameters()).device
    try:
        with torch.no_grad():
            for side in ("chosen", "rejected"):
                for start in range(0, len(tokenized), batch_size):
                    batch = _pad([row[side] for row in tokenized[start:start + batch_size]], pad_token_id)
                    logits = model(input_ids=batch["input_ids"].to(device),
                                   attention_mask=batch["attention_mask"].to(device)).logits
                    logps = sequence_logps(logits[:, :-1, :vocab_size], batch["labels"][:, 1:].to(device))
                    out[side].extend(float(v) for v in logps)
    finally:
        model.train(was_training)
    return out


def cached_logps(store, kind_label: str, model_name: str, model_loader: Callable, tokenizer, pairs: list[Pair],
                 config, say) -> tuple[dict, dict]:
    """:func:`frozen_sequence_logps` of ``model_name`` on ``pairs`` through the artifact store (its own
    tokenizer and prompt template; the log-softmax over its tokenizer's vocabulary rows, as the policy's).
    Returns (logps, facts)."""
    from kdbench.teacher_cache import model_fingerprint

    tokenized = tokenize_pairs(pairs, tokenizer, style=config.prompt_style, max_prompt_length=config.max_prompt_length,
                               max_length=config.max_length)
    rows = len(tokenizer)
    inputs = {"model": model_fingerprint(model_name), "sequences": hash_obj(tokenized), "logit_rows": rows}

    def build(tmp: Path) -> dict:
        logps = frozen_sequence_logps(model_loader(), tokenized, tokenizer.pad_token_id, config.generation_batch_size,
                                      vocab_size=rows)
        atomic_write_json(tmp / "logps.json", logps)
        return {"pairs": len(pairs), "forward_tokens": sum(len(r[s][0]) for r in tokenized for s in ("chosen", "rejected"))}

    say(f"{kind_label} sequence log-probs of {len(pairs)} pairs")
    artifact = store.get_or_build("sequence-logprobs", inputs, build, log=say)
    logps = json.loads((artifact.path / "logps.json").read_text())
    return logps, {"reused": artifact.reused, "path": str(artifact.path),
                   "build_seconds": artifact.meta.get("build_seconds", 0.0),
                   "forward_tokens": int(artifact.meta.get("forward_tokens", 0))}


# ------------------------------------------------------------------------------------------ the trainer
class PairDataset:
    """Tokenized pairs (student tokenizer) with their frozen log-probs; item i is pair i. ``gold``: the
    pairs' gold rows (prompt + gold response) for an LM term on gold responses (DPKD)."""

    def __init__(self, tokenized: list[dict], frozen: dict[str, dict], gold: list | None = None):
        self.tokenized = tokenized
        self.frozen = frozen  # {"ref": {"chosen": [...], "rejected": [...]}, "teacher": {...}}
        self.gold = gold

    def __len__(self) -> int:
        return len(self.tokenized)

    def __getitem__(self, index: int) -> dict:
        item = {"chosen": self.tokenized[index]["chosen"], "rejected": self.tokenized[index]["rejected"],
                "example_index": index}
        if self.gold is not None:
            item["gold"] = self.gold[index]
        for name, logps in self.frozen.items():
            item[f"{name}_chosen"] = logps["chosen"][index]
            item[f"{name}_rejected"] = logps["rejected"][index]
        return item


def _prompt_length(labels: list[int]) -> int:
    for position, label in enumerate(labels):
        if label != -100:
            return position
    return len(labels)


class PairCollator:
    """P pairs → ``input_ids`` / ``labels`` / ``attention_mask`` [2P, L] (chosen rows first, then
    rejected), ``example_index`` and ``prompt_length`` [P], the frozen log-prob columns [P] (float32)
    and, when the items carry gold rows, ``lm_input_ids`` / ``lm_labels`` / ``lm_attention_mask``."""

    def __init__(self, pad_token_id: int):
        self.pad_token_id = pad_token_id

    def __call__(self, features: list[dict]) -> dict:
        batch = _pad([f["chosen"] for f in features] + [f["rejected"] for f in features], self.pad_token_id)
        batch["example_index"] = torch.tensor([f["example_index"] for f in features], dtype=torch.long)
        batch["prompt_length"] = torch.tensor([_prompt_length(f["chosen"][1]) for f in features], dtype=torch.long)
        for key in features[0]:
            if key.endswith(("_chosen", "_rejected")):
                batch[key] = torch.tensor([f[key] for f in features], dtype=torch.float32)
        if "gold" in features[0]:
            gold = _pad([f["gold"] for f in features], self.pad_token_id)
            batch["lm_input_ids"], batch["lm_labels"] = gold["input_ids"], gold["labels"]
            batch["lm_attention_mask"] = gold["attention_mask"]
        return batch


@dataclass
class OnlinePairs:
    """DPKD's online pairs: every micro-batch's rejected responses are sampled from the current policy
    (on the unwrapped model) with ``decoding``; each row's seed derives from (seed, step, micro-batch,
    process, example), so a resumed run samples what an uninterrupted one would."""

    decoding: object  # kdbench.generate.DecodingConfig
    seed: int


def rows_of(batch: dict, start: int, stop: int) -> list[tuple[list[int], list[int]]]:
    """(ids, labels) of rows ``start:stop`` of a right-padded batch, padding removed."""
    out = []
    for row in range(start, stop):
        length = int(batch["attention_mask"][row].sum())
        out.append((batch["input_ids"][row, :length].tolist(), batch["labels"][row, :length].tolist()))
    return out


class PreferenceTrainer(DistillTrainer):
    """:class:`DistillTrainer` on preference pairs: the preference loss of a step is the mean over every
    pair of the optimizer step (all micro-batches and processes), like the token count of the token
    objectives. Optional terms, each normalized over the whole step:

    * ``online``: DPKD's rejected responses sampled from the current policy every micro-batch, scored by
      the teacher (kept outside the wrapped model) in the same step;
    * ``lm_mode``: λ·token-mean CE on the chosen rows (``"chosen"``), on the pairs' gold rows (``"gold"``)
      or on a plain-text corpus (``"corpus"``, ``lm_source``);
    * ``kl_weight``: λ·token-mean divergence (``kl_divergence``) to the teacher on the chosen rows (ddpo_kl).

    Diagnostics per pair (``train_log.jsonl``): the implicit rewards of chosen and rejected, their margin,
    the reward accuracy and, with online pairs, the sequence-level reverse KL estimate log q(y_s) − log p(y_s)
    and the exact reverse KL on the first response token (DPKD's Table 3).

    The policy trains without dropout unless ``params.disable_dropout`` is false (:mod:`kdbench.train.policy`).
    """

    def __init__(self, *args, online: OnlinePairs | None = None, lm_mode: str | None = None, kl_weight: float = 0.0,
                 kl_divergence: str = "rkl", **kwargs):
        super().__init__(*args, **kwargs)
        if self.params.get("disable_dropout", True):  # TRL's disable_dropout: no dropout noise in the rewards
            disable_dropout(self.model)
        self.online = online
        self.lm_mode = lm_mode
        self.kl_weight = float(kl_weight)
        self.kl_divergence = kl_divergence
        self._step_totals: dict | None = None

    @property
    def logit_rows(self) -> int:
        """The output rows every log-softmax of the step is taken over (policy, in-step teacher): the
        tokenizer's vocabulary, the same rows as the cached frozen log-probs (:func:`frozen_sequence_logps`).
        A checkpoint's padded output rows beyond it (Qwen2.5 ships them) are not tokens."""
        return int(self.params.get("vocab_size") or len(self.gen_tokenizer))

    # ---------------------------------------------------------------- the step's batches and counts
    def get_batch_samples(self, epoch_iterator, num_batches: int, device):
        batch_samples = take_batches(epoch_iterator, num_batches)
        if not batch_samples:
            return batch_samples, None
        for i, batch in enumerate(batch_samples):
            if self.online is not None:
                batch_samples[i] = batch = self._online_pairs(batch, i)
            self.attach_lm_batch(batch, i)
        totals = torch.tensor([float(sum(v)) for v in zip(*(self._counts(b) for b in batch_samples))],
                              dtype=torch.float64, device=device)
        if self.accelerator.num_processes > 1:
            totals = self.accelerator.reduce(totals, reduction="sum")
        self._step_totals = dict(zip(("pairs", "chosen_tokens", "rejected_tokens", "lm_tokens"),
                                     totals.to(torch.float32)))
        return batch_samples, self._step_totals["pairs"]

    def _counts(self, batch: dict) -> tuple[int, int, int, int]:
        n = batch["example_index"].numel()
        counted = batch["labels"][:, 1:] != -100
        chosen, rejected = int(counted[:n].sum()), int(counted[n:].sum())
        if self.lm_mode == "chosen":
            lm = chosen
        elif self.lm_mode in ("gold", "corpus") and "lm_labels" in batch:
            lm = int((batch["lm_labels"][:, 1:] != -100).sum())
        else:
            lm = 0
        return n, chosen, rejected, lm

    def _online_pairs(self, batch: dict, micro: int) -> dict:
        """Replace the rejected rows by the current policy's responses and score both sides with the
        teacher (summed log-probs and the first response token's log-probs)."""
        from kdbench.generate import example_seed
        from kdbench.losses.sequence import sequence_logps
        from kdbench.train.engine import sample_responses

        n = batch["example_index"].numel()
        chosen = rows_of(batch, 0, n)
        prompts = [ids[:int(batch["prompt_length"][row])] for row, (ids, _) in enumerate(chosen)]
        key = f"{self.online.seed}/{self.state.global_step}/{micro}/{self.accelerator.process_index}"
        ids = [f"{int(e)}@{self.state.global_step}" for e in batch["example_index"]]
        # y_s as sampled: its tokens and the EOS id the student emitted (none when cut at max_new_tokens)
        responses, generated = sample_responses(self.accelerator.unwrap_model(self.model), self.gen_tokenizer, prompts,
                                                ids, self.online.decoding, example_seed(self.online.seed, key) % (2**31))
        rejected = [(p + r, [-100] * len(p) + r) for p, r in zip(prompts, responses)]
        device = batch["input_ids"].device
        out = {k: v for k, v in batch.items() if k not in ("input_ids", "labels", "attention_mask")}
        out.update({k: v.to(device) for k, v in _pad(chosen + rejected, self.gen_tokenizer.pad_token_id).items()})
        with torch.no_grad():
            logits = self.teacher(input_ids=out["input_ids"], attention_mask=out["attention_mask"]).logits
            vocab = self.logit_rows
            logps = sequence_logps(logits[:, :-1, :vocab], out["labels"][:, 1:])
            first = logits[torch.arange(n, device=device), out["prompt_length"].to(device) - 1, :vocab]
        out["teacher_chosen"], out["teacher_rejected"] = logps[:n].float(), logps[n:].float()
        out["teacher_first_logp"] = torch.log_softmax(first.float(), dim=-1)
        self.counters["generated_tokens"] += generated
        self.counters["teacher_forward_tokens"] += int(out["attention_mask"].sum())
        self.counters["on_policy_batches"] += 1
        return out

    # ---------------------------------------------------------------- the loss
    def _denominators(self, inputs, num_items_in_batch) -> dict:
        if num_items_in_batch is not None and self._step_totals is not None:
            return self._step_totals
        counts = self._counts(inputs)
        return dict(zip(("pairs", "chosen_tokens", "rejected_tokens", "lm_tokens"),
                        (torch.tensor(float(c)) for c in counts)))

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        from kdbench.losses import DIVERGENCES
        from kdbench.losses.sequence import sequence_logps

        n_pairs = inputs["example_index"].numel()
        outputs = model(input_ids=inputs["input_ids"], attention_mask=inputs.get("attention_mask"))
        vocab = self.logit_rows
        logits = outputs.logits[:, :-1, :vocab]
        targets = inputs["labels"][:, 1:]
        logps = sequence_logps(logits, targets)  # [2P]
        lengths = (targets != -100).sum(-1)
        pairs = PairBatch(logps[:n_pairs], logps[n_pairs:], lengths[:n_pairs], lengths[n_pairs:],
                          ref_chosen=inputs.get("ref_chosen"), ref_rejected=inputs.get("ref_rejected"),
                          teacher_chosen=inputs.get("teacher_chosen"), teacher_rejected=inputs.get("teacher_rejected"))
        parts = self.objective.fn(pairs, self.params)
        totals = self._denominators(inputs, num_items_in_batch)
        loss = parts["loss"] / _positive(totals["pairs"], logps)
        token_parts: dict[str, tuple[torch.Tensor, int]] = {}
        if self.lm_mode and self.lm_weight > 0:
            if self.lm_mode == "chosen":
                lm_sum, lm_count = -logps[:n_pairs].sum(), int(lengths[:n_pairs].sum())
            else:
                lm_out = model(input_ids=inputs["lm_input_ids"], attention_mask=inputs["lm_attention_mask"])
                lm_sum = cross_entropy_sum(lm_out.logits[:, :-1, :vocab], inputs["lm_labels"][:, 1:])
                lm_count = int((inputs["lm_labels"][:, 1:] != -100).sum())
                self.counters["lm_tokens"] += lm_count
            loss = loss + self.lm_weight * lm_sum / _positive(totals["lm_tokens"], logps)
            token_parts["lm_ce"] = (lm_sum.detach(), lm_count)
        if self.kl_weight > 0:
            chosen_mask = (targets[:n_pairs] != -100).to(torch.float32)
            with torch.no_grad():
                teacher_logits = self.teacher(input_ids=inputs["input_ids"][:n_pairs],
                                              attention_mask=inputs["attention_mask"][:n_pairs]).logits[:, :-1, :vocab]
            self.counters["teacher_forward_tokens"] += int(inputs["attention_mask"][:n_pairs].sum())
            kl_sum = DIVERGENCES[self.kl_divergence](logits[:n_pairs], teacher_logits, chosen_mask, reduction="sum")
            loss = loss + self.kl_weight * kl_sum / _positive(totals["chosen_tokens"], logps)
            token_parts[f"{self.kl_divergence}_chosen"] = (kl_sum.detach(), int(chosen_mask.sum()))
        self.check_finite(loss)
        if model.training:
            with torch.no_grad():
                if "teacher_first_logp" in inputs:  # DPKD Table 3: exact KL(q‖p) at the first response token
                    rows = torch.arange(n_pairs, device=logits.device)
                    log_q = torch.log_softmax(logits[rows, inputs["prompt_length"] - 1].float(), dim=-1)
                    parts["rkl_first_token"] = (log_q.exp() * (log_q - inputs["teacher_first_logp"])).sum()
                if self.online is not None:  # log q(y_s) − log p(y_s), y_s ~ q: a sample of the sequence reverse KL
                    parts["rkl_sequence"] = (logps[n_pairs:].detach() - inputs["teacher_rejected"]).sum()
            for name, value in parts.items():
                self._window[name] = self._window.get(name, 0.0) + float(value.detach())
            for name, (value, count) in token_parts.items():
                self._window[name] = self._window.get(name, 0.0) + float(value)
                self._window[f"_tokens_{name}"] = self._window.get(f"_tokens_{name}", 0.0) + count
            self._window["_pairs"] = self._window.get("_pairs", 0.0) + n_pairs
            self.counters["tokens_processed"] += int(inputs["attention_mask"].sum())
            self.counters["response_tokens"] += int(lengths.sum())
        if num_items_in_batch is not None and self.accelerator.num_processes > 1:
            loss = loss * self.accelerator.num_processes  # DDP averages gradients; the denominators count all processes
        return (loss, outputs) if return_outputs else loss

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval") -> dict:
        """The preference loss, reward accuracy and mean reward margin over every held-out pair (exact
        means over all pairs and processes). The pairs are fixed (y_s of the starting policy for DPKD's
        online pairs) and their frozen log-probs precomputed; LM and KL terms are not part of it."""
        from kdbench.losses.sequence import sequence_logps

        def sums(model, inputs) -> list[float]:
            n = inputs["example_index"].numel()
            logits = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).logits
            vocab = self.logit_rows
            targets = inputs["labels"][:, 1:]
            logps = sequence_logps(logits[:, :-1, :vocab], targets)
            lengths = (targets != -100).sum(-1)
            pairs = PairBatch(logps[:n], logps[n:], lengths[:n], lengths[n:], ref_chosen=inputs.get("ref_chosen"),
                              ref_rejected=inputs.get("ref_rejected"), teacher_chosen=inputs.get("teacher_chosen"),
                              teacher_rejected=inputs.get("teacher_rejected"))
            parts = self.objective.fn(pairs, self.params)
            return [float(parts["loss"]), float(parts["reward_accuracy"]), float(parts["reward_margin"]), float(n)]

        return self.exact_evaluation(eval_dataset, metric_key_prefix, sums,
                                     ("loss", "reward_accuracy", "reward_margin"), "pairs")

    def log(self, logs: dict, start_time: float | None = None) -> None:
        if "loss" in logs and self._window:
            window = self._reduced_window()
            n_pairs = max(window.pop("_pairs", 0.0), 1.0)
            token_counts = {k[len("_tokens_"):]: window.pop(k) for k in list(window) if k.startswith("_tokens_")}
            for name, total in window.items():
                if name in token_counts:
                    logs[f"{name}_per_token"] = total / max(token_counts[name], 1.0)
                else:
                    logs[f"{name}_per_pair"] = total / n_pairs
            logs["pairs"] = int(n_pairs)
            self._window = {}
        super(DistillTrainer, self).log(logs, start_time)


def _positive(value, like):
    return torch.as_tensor(value, dtype=torch.float32, device=like.device).clamp(min=1)


# ------------------------------------------------------------------------------------------ model stages
def given_model(params: dict, name: str, what: str, tokenizer=None) -> Path | None:
    """``params[name]`` as a ready checkpoint folder (None when empty). A wrong path, or (with
    ``tokenizer``, the student's) a checkpoint with another tokenizer, is one sentence."""
    from kdbench.errors import ModelError

    value = params.get(name)
    if not value:
        return None
    path = Path(str(value))
    if not (path / "config.json").is_file():
        raise ConfigError(f"params.{name} {path} is not a model directory; give {what} folder (with config.json) "
                          "or leave it empty to train one.")
    if tokenizer is not None:
        from kdbench.models import load_tokenizer

        theirs = load_tokenizer(str(path))
        if theirs.get_vocab() != tokenizer.get_vocab():
            raise ModelError(f"params.{name} {path} uses another tokenizer than the student ({len(theirs)} vs "
                             f"{len(tokenizer)} tokens); give {what} fine-tuned from this student, or leave it "
                             "empty to train one.")
    return path


def model_stage(config, store, run: RunDir, say, *, kind: str, method: str, student: str, data: str,
                teacher: str | None = None, params: dict | None = None, settings: dict | None = None,
                description: str = "", teacher_stage: bool = False) -> tuple[Path, dict]:
    """A model another stage starts from (the dSFT model, an SFT student or teacher, a DPO-aligned
    teacher, a DCKD student): recipe ``method`` trained once per (models, data, settings) in the artifact
    store (``kind``). Its run lives under this run's ``stages/`` folder while it trains, so a killed stage
    resumes from its checkpoints; later runs with the same inputs reuse it ("reusing cached ...").

    ``settings``: the stage's training settings (the recipe's ``<stage>_settings``, the papers' values,
    merged with the user's); the main run's learning rate, epochs, batch size, LM corpus and method terms
    never reach it (:mod:`kdbench.train.stage_settings`). ``teacher_stage``: a teacher-preparation stage,
    trained with one fixed seed so every training seed shares it."""
    from kdbench.config import build
    from kdbench.store import hash_file
    from kdbench.teacher_cache import model_fingerprint
    from kdbench.train.api import TrainConfig, train
    from kdbench.train.stage_settings import STAGE_FORMAT, stage_key, stage_values

    values = stage_values(config, settings, kind=kind, teacher_stage=teacher_stage)
    values.update(method=method, student=student, teacher=teacher, data=data, params=dict(params or {}),
                  output_dir=str(run.path / "stages"), run_name=kind, select="last",
                  continue_from=None)  # a continued run's checkpoint belongs to its main stage, not this one
    stage_config = build(TrainConfig, values, prefix=f"the {kind} stage's settings")

    def data_key(value):
        return hash_file(value) if value and Path(value).is_file() else value

    inputs = {"format": STAGE_FORMAT, "method": method, "student": model_fingerprint(student),
              "teacher": model_fingerprint(teacher) if teacher else None, "data": data_key(data),
              "valid_data": data_key(stage_config.valid_data), "settings": stage_key(to_dict(stage_config)),
              "params": stage_config.params}

    def build_stage(tmp: Path) -> dict:
        result = train(stage_config, log=say, progress=False)
        shutil.copytree(result.model_dir, tmp / "model")
        shutil.rmtree(run.path / "stages" / kind, ignore_errors=True)
        return {"optimizer_steps": result.cost.get("optimizer_steps"), "final_train_loss": result.final_train_loss,
                "lm_tokens": result.cost.get("lm_tokens", 0), "learning_rate": stage_config.learning_rate}

    say(f"{kind} stage ({description or method}; learning rate {stage_config.learning_rate:g}, "
        f"{_stage_length(stage_config)}, batch {stage_config.batch_size} x {stage_config.grad_accum})")
    artifact = store.get_or_build(kind, inputs, build_stage, log=say)
    return artifact.path / "model", {"reused": artifact.reused, "path": str(artifact.path),
                                     "build_seconds": artifact.meta.get("build_seconds", 0.0),
                                     "settings": {k: getattr(stage_config, k) for k in
                                                  ("learning_rate", "num_epochs", "max_steps", "batch_size",
                                                   "grad_accum", "seed")}}


def _stage_length(stage_config) -> str:
    if stage_config.max_steps > 0:
        return f"{stage_config.max_steps} steps"
    return f"{stage_config.num_epochs:g} epochs"


def _dsft_stage(config, params: dict, store, run: RunDir, say) -> tuple[Path, dict]:
    """The dSFT checkpoint: ``params.dsft_model`` if given, else the ``dsft`` recipe (the teacher's
    generations with this recipe's decoding) as a cached :func:`model_stage`."""
    given = given_model(params, "dsft_model", "a dSFT checkpoint")
    if given is not None:
        say(f"using the given dSFT model {given}")
        return given, {"given": str(given)}
    generation = {k: params[k] for k in ("greedy", "generation_temperature", "top_p", "top_k", "max_new_tokens",
                                          "generation_seed")}
    return model_stage(config, store, run, say, kind="dsft-model", method="dsft", student=config.student,
                       teacher=config.teacher, data=config.data, params=generation,
                       settings=params.get("dsft_settings"), description="the dsft recipe on the teacher's outputs")


def chosen_as_examples(pairs: list[Pair], run: RunDir) -> str:
    """The pairs' (prompt, chosen) as an SFT file in the run's ``stages/`` folder (for an SFT student or
    teacher on a preference file's y_w); the same pairs give the same file, hence the same artifact key."""
    path = run.path / "stages" / "chosen.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    text = "".join(json.dumps({"id": p.example.id, "instruction": p.example.instruction, "input": p.example.input,
                               "output": p.chosen}, ensure_ascii=False) + "\n" for p in pairs)
    if not path.is_file() or path.read_text(encoding="utf-8") != text:
        atomic_write_text(path, text)
    return str(path)


def policy_start(config, params: dict, store, run: RunDir, say, sft_data: str) -> tuple[str, dict]:
    """Where a DPKD / ADPA / DCKD student starts: ``params.sft_model`` (a ready SFT checkpoint), the
    student's SFT checkpoint trained once on ``sft_data`` (``init: sft``, cached) or ``--student`` as given
    (``init: student``)."""
    given = given_model(params, "sft_model", "an SFT student checkpoint")
    if given is not None:
        say(f"using the given SFT student {given}")
        return str(given), {"given": str(given)}
    if params.get("init", "sft") == "student":
        return config.student, {"given": config.student}
    path, facts = model_stage(config, store, run, say, kind="sft-model", method="sft", student=config.student,
                              data=sft_data, settings=params.get("sft_settings"),
                              description="the student's SFT checkpoint")
    return str(path), facts


def prepared_teacher(config, params: dict, store, run: RunDir, say, data: str) -> tuple[str, dict]:
    """The teacher a recipe distils from (METHODS.md, "Teacher preparation"): ``--teacher`` as given
    (``teacher_init: given``, the default: it is already fine-tuned on the task) or, ``teacher_init: sft``,
    ``--teacher`` fine-tuned on ``data`` first — as MiniLLM, DistiLLM, AKL and DPKD prepared theirs — with
    ``teacher_sft_settings``, once per (teacher, data, settings): a cached ``sft-model`` stage with a fixed
    seed, shared by every method and training seed on that teacher and data."""
    if params.get("teacher_init", "given") != "sft":
        return config.teacher, {"given": config.teacher}
    path, facts = model_stage(config, store, run, say, kind="sft-model", method="sft", student=config.teacher,
                              data=data, settings=params.get("teacher_sft_settings"), teacher_stage=True,
                              description="the teacher fine-tuned on the task, teacher_init: sft")
    return str(path), facts


# ------------------------------------------------------------------------------------------ the pipeline
def train_preference(config, entry, params: dict, *, log: Callable[[str], None] | None = None,
                     command: list[str] | None = None, progress: bool = True, callbacks: list | None = None):
    """Run an ``objective: preference`` recipe end to end (module docstring); returns a
    :class:`kdbench.train.api.TrainResult`."""
    from kdbench.data import load_examples, tokenize_example
    from kdbench.models import LazyModel, check_same_vocabulary, lazy_model, load_model, load_tokenizer
    from kdbench.store import ArtifactStore
    from kdbench.train.api import (Stages, recipe_decoding, split_validation, generation_stage, finished_result,
                                   require_inputs)
    from kdbench.train.data_sources import load_text_corpus, resolve_data_path
    from kdbench.train.engine import LMSource, Stopwatch, train_resuming
    from kdbench.train.api import PAIR_SELECT_METRICS
    from kdbench.train.objectives import KL_DIRECTIONS, get_objective, preference_form

    say = log or (lambda message: None)
    clock = Stopwatch()
    source = entry.body.get("pairs")
    if source not in ("distill", "file", "dpkd"):
        raise ConfigError(f"Recipe {entry.path.name} has pairs {source!r}; use distill, file or dpkd.")
    form = preference_form(params)
    reference = preference_reference(params)
    mode = params.get("pairs", "online") if source == "dpkd" else source
    if source == "file" and reference == "dsft":
        raise ConfigError(f"Method {config.method} reads pairs from a file, so its reference cannot be the dSFT model; "
                          "use params.reference=student or teacher.")
    kl_weight = float(params.get("kl_weight", 0.0))
    needs_teacher = source in ("distill", "dpkd") or reference == "teacher" or kl_weight > 0
    require_inputs(config, needs_teacher)
    evaluate = config.select == "best" or config.eval_steps > 0
    if evaluate and config.select_metric not in PAIR_SELECT_METRICS:
        raise ConfigError(f"select_metric {config.select_metric} is not measured on preference pairs; use one of "
                          f"{', '.join(PAIR_SELECT_METRICS)}.")
    if config.select == "best" and config.save_steps % (config.eval_steps or config.save_steps):
        raise ConfigError(f"With select=best, save_steps ({config.save_steps}) must be a multiple of eval_steps "
                          f"({config.eval_steps}).")
    objective = get_objective("preference")
    store = ArtifactStore(config.cache_dir)

    # Everything the user gave is checked before any heavy work or any file is written.
    data_path = resolve_data_path(config.data, store=store, log=say)
    from_file = source == "file" or mode == "preference_data"
    valid_pairs: list[Pair] | None = None
    valid_prompts = None
    if from_file:
        pairs = load_preference_pairs(data_path)
        prompts = [p.example for p in pairs]
    else:
        sft_stage = params.get("init", "sft") == "sft" and not params.get("sft_model")
        gold_needed = source == "dpkd" and (sft_stage or params.get("teacher_init", "given") == "sft"
                                            or (not config.lm_data and float(params.get("lm_weight", 0)) > 0))
        prompts = load_examples(data_path, require_output=gold_needed)
    if not config.valid_data:  # the same split as train() makes for the dSFT / SFT stages: the same prompts
        kept = {id(e) for e in split_validation(prompts, config.valid_fraction, config.seed)[0]}
        if from_file:
            valid_pairs = [p for p in pairs if id(p.example) not in kept]
            pairs = [p for p in pairs if id(p.example) in kept]
        else:
            valid_prompts = [e for e in prompts if id(e) not in kept]
        prompts = [e for e in prompts if id(e) in kept]
    elif evaluate:
        valid_path = resolve_data_path(config.valid_data, default_split="validation", store=store, log=say)
        if from_file:
            valid_pairs = load_preference_pairs(valid_path)
        else:
            valid_prompts = load_examples(valid_path, require_output=False)
    if not evaluate:
        valid_pairs = valid_prompts = None
    elif not (valid_pairs or valid_prompts):
        raise ConfigError("select=best and eval_steps need held-out pairs; give --valid-data or a larger valid_fraction.")
    tokenizer = load_tokenizer(config.student)
    teacher_tokenizer = load_tokenizer(config.teacher) if needs_teacher else None
    online = source == "dpkd" and mode == "online"
    lm_blocks = load_text_corpus(config.lm_data, tokenizer, config.max_length) if config.lm_data else None
    decoding = recipe_decoding(config, params, "teacher") if source in ("distill", "dpkd") and not from_file else None

    given_model(params, "dsft_model", "a dSFT checkpoint", tokenizer)
    given_model(params, "sft_model", "an SFT student checkpoint", tokenizer)
    teacher_holder: dict = {}

    def teacher_model():
        if "model" not in teacher_holder:
            teacher_holder["model"] = load_model(config.teacher, trainable=False, dtype=config.teacher_dtype)
        return teacher_holder["model"]

    if online or kl_weight > 0:  # the teacher scores the student's own token ids: one vocabulary
        params["vocab_size"] = check_same_vocabulary(teacher_model(), teacher_tokenizer, load_model(config.student),
                                                     tokenizer)

    run = RunDir.create(config.output_dir, config.run_name or f"{config.method}-seed{config.seed}", kind="train",
                        config={**to_dict(config), "params": params, "recipe": entry.name,
                                "recipe_file": entry.path.name, "objective": "preference", "pairs": mode},
                        command=command or sys.argv)
    if (finished := finished_result(run, say)) is not None:
        return finished
    stages = Stages(run)
    extra_cost: dict = {"generated_tokens": 0, "frozen_forward_tokens": 0}
    # Stage (teacher_init: sft, DPKD's "fine-tuned teacher"): --teacher fine-tuned on the task first, cached
    if params.get("teacher_init", "given") == "sft":
        teacher_data = chosen_as_examples(pairs, run) if from_file else config.data
        prepared, t_facts = prepared_teacher(config, params, store, run, say, teacher_data)
        stages.mark("teacher", t_facts)
        config = dataclasses.replace(config, teacher=prepared)  # every later stage and the step use it
        teacher_holder.clear()
    # Stage: the policy's starting point (dSFT model; DPKD's SFT student)
    if source == "distill":
        dsft_dir, d_facts = _dsft_stage(config, params, store, run, say)
        stages.mark("dsft", d_facts)
        extra_cost["dsft_reused"] = bool(d_facts.get("reused", True))
        policy_source = str(dsft_dir)
    elif source == "dpkd":
        sft_data = chosen_as_examples(pairs, run) if from_file else config.data
        policy_source, p_facts = policy_start(config, params, store, run, say, sft_data)
        stages.mark("sft", p_facts)
    else:
        policy_source = config.student

    # Stage: generations (y_t: the teacher; y_s: the original student, or the SFT student for DPKD offline).
    # Each response keeps the EOS its model stopped with; one cut at max_new_tokens has none.
    if not from_file:
        teacher_outputs, teacher_ends, t_facts = generation_stage(config, params, decoding, LazyModel(teacher_model),
                                                                  teacher_tokenizer, prompts, run, store, say)
        facts_gen = {"teacher": t_facts}
        extra_cost["generated_tokens"] += t_facts["generated_tokens"]
        if online:  # y_s is sampled in every step; the pair's rejected text is a placeholder until then
            student_texts, student_ends = [t.output for t in teacher_outputs], teacher_ends
        else:
            generator = config.student if source == "distill" else policy_source
            student_outputs, student_ends, s_facts = generation_stage(
                config, params, decoding, lazy_model(generator, trainable=False), tokenizer, prompts,
                run, store, say, model_name=generator, kind="student-generations")
            student_texts = [s.output for s in student_outputs]
            facts_gen["student"] = s_facts
            extra_cost["generated_tokens"] += s_facts["generated_tokens"]
        pairs = [Pair(e, t.output, s, t_end, s_end)
                 for e, t, s, t_end, s_end in zip(prompts, teacher_outputs, student_texts, teacher_ends, student_ends)]
        if valid_prompts:  # held-out pairs: the teacher's and the starting policy's responses, generated once
            generator = config.student if source == "distill" else policy_source
            valid_teacher, valid_teacher_ends, v_facts = generation_stage(
                config, params, decoding, LazyModel(teacher_model), teacher_tokenizer, valid_prompts, run, store, say)
            valid_student, valid_student_ends, w_facts = generation_stage(
                config, params, decoding, lazy_model(generator, trainable=False), tokenizer,
                valid_prompts, run, store, say, model_name=generator, kind="student-generations")
            valid_pairs = [Pair(e, t.output, s.output, t_end, s_end) for e, t, s, t_end, s_end
                           in zip(valid_prompts, valid_teacher, valid_student, valid_teacher_ends, valid_student_ends)]
            facts_gen["validation"] = {"teacher": v_facts, "student": w_facts}
            extra_cost["generated_tokens"] += v_facts["generated_tokens"] + w_facts["generated_tokens"]
        stages.mark("generate", facts_gen)
        extra_cost["generation_reused"] = all(f["reused"] for k, f in facts_gen.items() if k != "validation")

    # Stage: frozen sequence log-probs (each model scores the texts with its own tokenizer)
    frozen: dict[str, dict] = {}
    facts: dict[str, dict] = {}
    uses_ref = form == "dadpo" or (form in ("dpo", "ipo") and reference in ("dsft", "student"))
    uses_teacher = (form == "dadpo" or reference == "teacher") and not online
    # the frozen reference: the dSFT model (the policy's start) or, reference: student, the *original*
    # student before any stage (for a preference file the policy starts there anyway)
    ref_source = config.student if reference == "student" else policy_source
    ref_label = "reference (the original student)" if ref_source == config.student else "reference (dSFT model)"
    if uses_ref:
        frozen["ref"], facts["ref"] = cached_logps(store, ref_label, ref_source,
                                                   lambda: load_model(ref_source, trainable=False), tokenizer,
                                                   pairs, config, say)
    if uses_teacher:
        frozen["teacher"], facts["teacher"] = cached_logps(store, "teacher", config.teacher, teacher_model,
                                                           teacher_tokenizer, pairs, config, say)
    valid_frozen: dict[str, dict] = {}
    if valid_pairs:  # the held-out pairs' frozen log-probs (the teacher's too for online DPKD)
        if uses_ref:
            valid_frozen["ref"], facts["valid_ref"] = cached_logps(
                store, f"validation {ref_label}", ref_source, lambda: load_model(ref_source, trainable=False),
                tokenizer, valid_pairs, config, say)
        if form == "dadpo" or reference == "teacher":
            valid_frozen["teacher"], facts["valid_teacher"] = cached_logps(
                store, "validation teacher", config.teacher, teacher_model, teacher_tokenizer, valid_pairs, config, say)
    stages.mark("logprobs", facts)
    extra_cost["frozen_forward_tokens"] = sum(f["forward_tokens"] for f in facts.values())
    extra_cost["logprobs_reused"] = all(f["reused"] for f in facts.values())
    keep_teacher = online or kl_weight > 0
    if not keep_teacher:
        teacher_holder.clear()  # training never runs the teacher

    # Stage: preference training
    tokenized = tokenize_pairs(pairs, tokenizer, style=config.prompt_style, max_prompt_length=config.max_prompt_length,
                               max_length=config.max_length)
    lm_weight = float(params.get("lm_weight", 0.0))
    lm_mode = None
    gold = None
    if lm_weight > 0:
        if lm_blocks:
            lm_mode = "corpus"
        elif from_file:
            lm_mode = "chosen"  # the preference data's gold responses are its chosen ones
        else:
            lm_mode = "gold"
            gold = []
            for example in prompts:
                item = tokenize_example(example, tokenizer, style=config.prompt_style,
                                        max_prompt_length=config.max_prompt_length, max_length=config.max_length)
                gold.append((item.input_ids, item.labels))
    run.log(f"method={config.method} pairs={len(pairs)} source={mode} form={form} reference={reference} "
            f"lm={lm_mode or '-'} kl_weight={kl_weight}")
    args, train_callbacks = pair_run_setup(config, run, callbacks, progress, evaluate=bool(valid_pairs))
    eval_dataset = None
    if valid_pairs:
        eval_dataset = PairDataset(tokenize_pairs(valid_pairs, tokenizer, style=config.prompt_style,
                                                  max_prompt_length=config.max_prompt_length,
                                                  max_length=config.max_length), valid_frozen)
    trainer = PreferenceTrainer(
        model=load_model(policy_source), args=args, train_dataset=PairDataset(tokenized, frozen, gold),
        eval_dataset=eval_dataset,
        data_collator=PairCollator(tokenizer.pad_token_id), callbacks=train_callbacks, objective=objective,
        params=params, tokenizer=tokenizer, teacher=teacher_model() if keep_teacher else None,
        online=OnlinePairs(decoding, config.seed) if online else None, lm_mode=lm_mode,
        lm_source=LMSource(lm_blocks, config.batch_size, config.seed, tokenizer.pad_token_id) if lm_mode == "corpus" else None,
        lm_weight=lm_weight, kl_weight=kl_weight,
        kl_divergence=KL_DIRECTIONS[params.get("kl_direction", "reverse")])
    output, resumed = train_resuming(trainer, run, run.path / "checkpoints", say)
    counters = trainer.cost_counters()
    cost = {
        **selection_facts(config, trainer, eval_dataset is not None),
        "teacher_forward_tokens": counters["teacher_forward_tokens"], "train_pairs": len(pairs),
        "online_batches": counters["on_policy_batches"], "lm_tokens": counters["lm_tokens"],
        **extra_cost, "generated_tokens": extra_cost["generated_tokens"] + counters["generated_tokens"],
    }
    return finish_pair_run(config, entry, params, run, trainer, tokenizer, output, resumed, clock, cost, stages, say)


def pair_run_setup(config, run: RunDir, callbacks: list | None, progress: bool,
                   evaluate: bool = False) -> tuple[object, list]:
    """``TrainingArguments`` and callbacks of a pair run: checkpoints under the run's ``checkpoints/``,
    validation on held-out pairs when ``evaluate``, no length-grouped sampler (a pair has no single
    ``input_ids`` length to group by), the run log and, with ``progress``, a progress bar."""
    from kdbench.train.api import training_arguments
    from kdbench.train.engine import RichProgressCallback, RunLogCallback

    eval_steps = config.eval_steps or config.save_steps
    pair_config = dataclasses.replace(config, group_by_length=False) if config.group_by_length else config
    args = training_arguments(pair_config, run.path / "checkpoints", evaluate=evaluate, eval_steps=eval_steps)
    train_callbacks = [RunLogCallback(run.path / "train_log.jsonl")] + list(callbacks or [])
    if progress:
        train_callbacks.append(RichProgressCallback(f"train {config.method}"))
    return args, train_callbacks


def selection_facts(config, trainer, evaluated: bool) -> dict:
    """What a pair run kept and its validation metrics (the held-out pairs; the kept model after
    ``select=best`` has loaded the best checkpoint)."""
    if not evaluated:
        return {}
    validation = {k[len("eval_"):]: v for k, v in trainer.evaluate().items() if k.startswith("eval_")}
    best = config.select == "best"
    return {"selected": config.select, "select_metric": config.select_metric if best else None,
            "selected_checkpoint": getattr(trainer.state, "best_model_checkpoint", None) if best else None,
            "best_metric": getattr(trainer.state, "best_metric", None) if best else None, "validation": validation}


def finish_pair_run(config, entry, params, run: RunDir, trainer, tokenizer, output, resumed: bool, clock, cost: dict,
                    stages, say):
    """Save the trained model, ``cost.json`` and the model card; mark the run complete (process 0)."""
    from kdbench.models import count_parameters
    from kdbench.train.api import TrainResult, _model_card, _save_model_atomically
    from kdbench.train.engine import peak_memory_mb

    model_dir = run.path / "model"
    checkpoints_dir = run.path / "checkpoints"
    final_loss = output.training_loss if output is not None else None
    trainer.model.config.kdbench_prompt_style = config.prompt_style
    counters = trainer.cost_counters()
    cost = {
        "wall_seconds": clock.seconds, "train_seconds": counters["train_seconds"],
        "optimizer_steps": trainer.state.global_step, "tokens_processed": counters["tokens_processed"],
        "response_tokens_trained": counters["response_tokens"], "teacher_forward_tokens": 0,
        **peak_memory_mb(), "student_parameters": count_parameters(trainer.model),
        "processes": trainer.accelerator.num_processes, "final_train_loss": final_loss, "selected": "last",
        "select_metric": None, "selected_checkpoint": None, "validation": None, "resumed": resumed,
        **cost,
    }
    if trainer.is_world_process_zero():
        _save_model_atomically(trainer.model, tokenizer, model_dir)
        atomic_write_json(run.path / "cost.json", cost)
        atomic_write_text(model_dir / "README.md", _model_card(config, entry, params, cost))
        stages.mark("train", {"optimizer_steps": trainer.state.global_step})
    trainer.accelerator.wait_for_everyone()
    if trainer.is_world_process_zero():
        shutil.rmtree(checkpoints_dir, ignore_errors=True)
        run.finish("complete", model_dir=str(model_dir))
    say(f"trained {config.method} in {cost['wall_seconds']:.1f}s ({cost['optimizer_steps']} steps); model at {model_dir}")
    return TrainResult(run, model_dir, cost, final_loss, cost.get("validation"), trainer=trainer)
