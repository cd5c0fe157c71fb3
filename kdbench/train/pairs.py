"""Preference pairs: loading them, tokenizing them with any model's tokenizer, their frozen log-probs, and
the dataset / collator the pair and guided trainers read.

A :class:`Pair` holds the prompt's example, the chosen and rejected texts and how each ends (a generated
response keeps the EOS its model emitted, or none when it was cut: :mod:`kdbench.train.responses`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from kdbench.errors import DataError
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
    score_chosen: float | None = None  # a reward model's scores given in the data (DDPO-RM's reward_scores stage)
    score_rejected: float | None = None


def mismatched_pairs(pairs: list[Pair]) -> list[Pair]:
    """Pair i's prompt with pair (i + 1) mod N's chosen and rejected responses: responses that do not answer
    their prompt, KTO's estimate of KL(π‖ref) (Ethayarajh et al. 2024, §4.1; TRL's shifted "KL completions").
    The pairing follows the data's order, so a step's mismatched rows do not depend on its micro-batches."""
    if len(pairs) < 2:
        raise DataError("KTO's reference point needs at least 2 prompts (mismatched prompt/response pairs); give "
                        "more data.")
    return [Pair(pair.example, other.chosen, other.rejected, other.chosen_end, other.rejected_end)
            for pair, other in zip(pairs, pairs[1:] + pairs[:1])]


def _score(row: dict, key: str, path, number: int) -> float | None:
    value = row.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value or abs(value) == float("inf"):
        raise DataError(f"{path}, record {number} has {key}={value!r}; reward scores must be finite numbers.")
    return float(value)


def load_preference_pairs(path: str | Path) -> list[Pair]:
    """(prompt, chosen, rejected) rows of a JSONL / JSON / Parquet preference file; optional numeric
    ``score_chosen`` / ``score_rejected`` (a reward model's scores, as in UltraFeedback-binarized) are kept."""
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

        pairs.append(Pair(prompt_example(row, path, number, check_response=check_pair, what="pair"), chosen, rejected,
                          score_chosen=_score(row, "score_chosen", path, number),
                          score_rejected=_score(row, "score_rejected", path, number)))
    return pairs


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


def pad_rows(sequences: list[tuple[list[int], list[int]]], pad_token_id: int) -> dict:
    """(ids, labels) rows right-padded into ``input_ids`` / ``labels`` / ``attention_mask`` [N, L]."""
    from kdbench.data import PadCollator

    return PadCollator(pad_token_id)([{"input_ids": ids, "labels": labels} for ids, labels in sequences])


def frozen_sequence_logps(model, tokenized: list[dict], pad_token_id: int, batch_size: int,
                          vocab_size: int | None = None) -> dict:
    """Summed log-probs of every chosen and rejected response under a frozen ``model``: {"chosen": [P],
    "rejected": [P]} lists of floats (float32 math, eval mode, no gradient).

    ``vocab_size``: the output rows the log-softmax is taken over — the tokenizer's vocabulary, the same
    rows as the policy's log-probs in the step (the pair trainer's ``logit_rows``); the padded rows a
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
                    batch = pad_rows([row[side] for row in tokenized[start:start + batch_size]], pad_token_id)
                    logits = model(input_ids=batch["input_ids"].to(device),
                                   attention_mask=batch["attention_mask"].to(device)).logits
                    logps = sequence_logps(logits[:, :-1, :vocab_size], batch["labels"][:, 1:].to(device))
                    out[side].extend(float(v) for v in logps)
    finally:
        model.train(was_training)
    return out


class PairDataset:
    """Tokenized pairs (student tokenizer) with their frozen log-probs; item i is pair i. ``gold``: the
    pairs' gold rows (prompt + gold response) for an LM term on gold responses (DPKD). ``mismatched``: the
    tokenized :func:`mismatched_pairs` (KTO's reference point)."""

    def __init__(self, tokenized: list[dict], frozen: dict[str, dict], gold: list | None = None,
                 mismatched: list[dict] | None = None):
        self.tokenized = tokenized
        self.frozen = frozen  # {"ref": {"chosen": [...], "rejected": [...]}, "teacher": {...}}
        self.gold = gold
        self.mismatched = mismatched

    def __len__(self) -> int:
        return len(self.tokenized)

    def __getitem__(self, index: int) -> dict:
        item = {"chosen": self.tokenized[index]["chosen"], "rejected": self.tokenized[index]["rejected"],
                "example_index": index}
        if self.gold is not None:
            item["gold"] = self.gold[index]
        if self.mismatched is not None:
            item["mismatched"] = self.mismatched[index]
        for name, logps in self.frozen.items():
            item[f"{name}_chosen"] = logps["chosen"][index]
            item[f"{name}_rejected"] = logps["rejected"][index]
        return item


def response_start(labels: list[int]) -> int:
    """The first response position of a row (its prompt length): the first label that is not −100."""
    for position, label in enumerate(labels):
        if label != -100:
            return position
    return len(labels)


class PairCollator:
    """P pairs → ``input_ids`` / ``labels`` / ``attention_mask`` [2P, L] (chosen rows first, then
    rejected), ``example_index`` and ``prompt_length`` [P], the frozen log-prob columns [P] (float32),
    when the items carry gold rows ``lm_input_ids`` / ``lm_labels`` / ``lm_attention_mask``, and when they carry
    mismatched rows ``mismatched_input_ids`` / ``mismatched_labels`` / ``mismatched_attention_mask`` [2P, L']."""

    def __init__(self, pad_token_id: int):
        self.pad_token_id = pad_token_id

    def __call__(self, features: list[dict]) -> dict:
        batch = pad_rows([f["chosen"] for f in features] + [f["rejected"] for f in features], self.pad_token_id)
        batch["example_index"] = torch.tensor([f["example_index"] for f in features], dtype=torch.long)
        batch["prompt_length"] = torch.tensor([response_start(f["chosen"][1]) for f in features], dtype=torch.long)
        for key in features[0]:
            if key.endswith(("_chosen", "_rejected")):
                batch[key] = torch.tensor([f[key] for f in features], dtype=torch.float32)
        if "gold" in features[0]:
            gold = pad_rows([f["gold"] for f in features], self.pad_token_id)
            batch["lm_input_ids"], batch["lm_labels"] = gold["input_ids"], gold["labels"]
            batch["lm_attention_mask"] = gold["attention_mask"]
        if "mismatched" in features[0]:
            rows = pad_rows([f["mismatched"]["chosen"] for f in features]
                            + [f["mismatched"]["rejected"] for f in features], self.pad_token_id)
            for key in ("input_ids", "labels", "attention_mask"):
                batch[f"mismatched_{key}"] = rows[key]
        return batch


def rows_of(batch: dict, start: int, stop: int) -> list[tuple[list[int], list[int]]]:
    """(ids, labels) of rows ``start:stop`` of a right-padded batch, padding removed."""
    out = []
    for row in range(start, stop):
        length = int(batch["attention_mask"][row].sum())
        out.append((batch["input_ids"][row, :length].tolist(), batch["labels"][row, :length].tolist()))
    return out
