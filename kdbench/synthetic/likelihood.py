"""Teacher-forced readings of the test set: less noisy than decoding, and a direct test of preference.

Greedy Rouge-L scores one decoded answer per example, so a single token flipped early changes the
whole answer: the per-example noise between two training seeds of one method is large (σ ≈ 18 Rouge-L
points on the smoke world), and a method that moves probability between a right and a wrong answer
without changing the argmax is invisible. Two readings of the same test items, without decoding:

* ``token_accuracy``: at every position of the first reference's response (its EOS included), does the
  model's most likely next token equal the reference's? (percentage of the response's tokens, per example)
* ``pair_accuracy``: does the model give the right answer a higher likelihood (summed log-probability
  of the response) than the item's plausible wrong answer — the pairs the preference methods train on,
  here on held-out items? (100 or 0 per example; 50 where the two texts are the same.) DPO that
  learned its pairs backwards scores well below SFT here even when its Rouge-L does not move.

The demo records both as suite ``synthetic-ref`` beside Rouge-L in the same evaluation run, with the same
example ids, length buckets and categories; the leaderboard and the regression gate read them like any
other metric. The response positions come from the prompt's length, never from training labels, so the
measure does not change with the training data path.
"""

from __future__ import annotations

import json
from pathlib import Path

from kdbench.store import RunDir, atomic_write_json

REF_SUITE = "synthetic-ref"
REF_METRICS = ("token_accuracy", "pair_accuracy")
SEED_KEY = "teacher_forced"


def response_readings(model, tokenizer, items: list, *, batch_size: int = 64) -> tuple[list[float], list[float]]:
    """Per tokenized item (``kdbench.data.TokenizedExample``): (% of response tokens predicted top-1,
    summed log-probability of the response tokens), teacher-forced."""
    import torch

    accuracy: list[float] = []
    logprob: list[float] = []
    with torch.inference_mode():
        for start in range(0, len(items), batch_size):
            chunk = items[start:start + batch_size]
            longest = max(len(item.input_ids) for item in chunk)
            ids = torch.full((len(chunk), longest), tokenizer.pad_token_id, dtype=torch.long)
            attention = torch.zeros_like(ids)
            counted = torch.zeros_like(ids, dtype=torch.bool)
            for row, item in enumerate(chunk):
                ids[row, :len(item.input_ids)] = torch.tensor(item.input_ids)
                attention[row, :len(item.input_ids)] = 1
                counted[row, item.prompt_length:len(item.input_ids)] = True
            logits = model(input_ids=ids, attention_mask=attention).logits[:, :-1].float()  # [B, T-1, V]
            targets, mask = ids[:, 1:], counted[:, 1:]  # position t predicts token t + 1
            hits = (logits.argmax(-1) == targets) & mask
            token_logps = logits.log_softmax(-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1) * mask
            accuracy += (100.0 * hits.sum(-1) / mask.sum(-1).clamp(min=1)).tolist()
            logprob += token_logps.sum(-1).tolist()
    return accuracy, logprob


def reference_readings(model_dir: Path, rows: list[dict], *, max_prompt_length: int = 128,
                       max_length: int = 256) -> dict[str, list[float]]:
    """``{"token_accuracy": [...], "pair_accuracy": [...]}`` per example of ``rows`` (test-file records:
    instruction, input, output = list of references, rejected = the plausible wrong answer)."""
    from kdbench.data import Example, tokenize_example
    from kdbench.models import load_model, load_tokenizer

    tokenizer = load_tokenizer(str(model_dir))
    model = load_model(str(model_dir))
    model.eval()

    def tokenized(response_of) -> list:
        return [tokenize_example(Example(r["instruction"], r.get("input", ""), response_of(r)), tokenizer,
                                 style="compact", max_prompt_length=max_prompt_length, max_length=max_length)
                for r in rows]

    accuracy, right = response_readings(model, tokenizer, tokenized(lambda r: _first(r["output"])))
    _, wrong = response_readings(model, tokenizer, tokenized(lambda r: r.get("rejected") or _first(r["output"])))
    pairs = [50.0 if (r.get("rejected") or _first(r["output"])) == _first(r["output"]) else 100.0 * (a > b)
             for r, a, b in zip(rows, right, wrong)]
    return {"token_accuracy": accuracy, "pair_accuracy": pairs}


def _first(output) -> str:
    return output[0] if isinstance(output, list) else output


def score_references(corpus_dir: Path, eval_runs: list[Path], model_dirs: list[Path], *, limit: int | None = None,
                     n_bootstrap: int = 1000) -> None:
    """Add suite ``synthetic-ref`` to each evaluation run (its model in ``model_dirs``, same order), with the
    synthetic suite's example ids, buckets and categories (``scores/synthetic.json`` of the run)."""
    from kdbench.metrics import bootstrap_ci
    from kdbench.synthetic.corpus import load_corpus_rows

    rows = load_corpus_rows(corpus_dir, "test")[:limit] if limit else load_corpus_rows(corpus_dir, "test")
    for run_path, model_dir in zip(eval_runs, model_dirs):
        run = RunDir(run_path)
        layout = json.loads((run.path / "scores" / "synthetic.json").read_text())
        if len(layout["ids"]) != len(rows):
            raise ValueError(f"{run.path} scored {len(layout['ids'])} examples, the test file has {len(rows)}")
        readings = reference_readings(Path(model_dir), rows)
        records = []
        for metric, values in readings.items():
            for group, labels in (("all", ["all"] * len(values)), ("bucket", layout["buckets"]),
                                  ("category", layout["categories"])):
                for label in dict.fromkeys(x for x in labels if x is not None):
                    members = [v for v, g in zip(values, labels) if g == label]
                    subset = "all" if group == "all" else f"{group}:{label}"
                    mean = sum(members) / len(members)
                    low, high = bootstrap_ci(members, n_resamples=n_bootstrap)
                    records.append(run.metric_record(REF_SUITE, metric, mean, seed=SEED_KEY, subset=subset,
                                                     n=len(members)))
                    records.append(run.metric_record(REF_SUITE, metric, mean, seed="mean", subset=subset,
                                                     n=len(members), std=0.0, ci_low=low, ci_high=high, n_seeds=1))
        run.write_metrics(records, replace_suite=REF_SUITE)
        atomic_write_json(run.path / "scores" / f"{REF_SUITE}.json",
                          {"ids": layout["ids"], "buckets": layout["buckets"], "categories": layout["categories"],
                           "scores": {metric: {SEED_KEY: values} for metric, values in readings.items()}})
