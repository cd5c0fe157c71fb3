"""Rouge-L: kdbench.metrics.rouge_l_scores vs rouge_score's RougeScorer, on 10,000 real pairs.

The pairs are real model outputs and human references from the shared data folder
(``/work/shared/data``, or ``--data DIR``): Self-Instruct's text-davinci-003 predictions vs their
references, the five Vicuna-blog models' answers vs MiniLLM's Vicuna references, AlpacaEval model
outputs against each other (alpaca-7b / text-davinci-003 / gpt-4-1106-preview), and Dolly and S-NI
references against each other (S-NI within a task). Both implementations run in the same process on
the same pairs; kdbench's token caches are cleared before every repeat, so every kdbench timing is a
cold start (tokenizing and stemming included).

    python benchmarks/rouge.py [--pairs 10000] [--repeats 3] [--data /work/shared/data]

Prints the median time of each over the repeats, the speed-up, and the largest per-pair difference.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

DEFAULT_DATA = REPO.parent / "shared" / "data"


def _jsonl(path: Path) -> list[dict]:
    with path.open(encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


def real_pairs(data: Path, n_pairs: int = 10_000, seed: int = 0) -> tuple[list[str], list[list[str]]]:
    """(predictions, references) of ``n_pairs`` real pairs, deterministic for a given seed."""
    rng = random.Random(seed)
    predictions: list[str] = []
    references: list[list[str]] = []

    def add(prediction: str, reference: str) -> None:
        predictions.append(prediction)
        references.append([reference])

    for row in _jsonl(data / "self_instruct/predictions/text-davinci-003_predictions.jsonl"):
        add(row["response"], row["target"])
    vicuna_refs = [row["output"] for row in _jsonl(data / "vicuna80/minillm_processed/valid.jsonl")]
    for answer_file in sorted((data / "vicuna80/fastchat_eval_table/answer").glob("answer_*.jsonl")):
        for row, reference in zip(_jsonl(answer_file), vicuna_refs):
            add(row["text"], reference)
    alpaca = {
        name: [row["output"] for row in json.loads((data / f"alpaca_eval/results/{name}/model_outputs.json").read_text())]
        for name in ("alpaca-7b", "text_davinci_003", "gpt4_1106_preview")
    }
    for prediction_model, reference_model in (
        ("alpaca-7b", "text_davinci_003"),
        ("alpaca-7b", "gpt4_1106_preview"),
        ("text_davinci_003", "gpt4_1106_preview"),
    ):
        for prediction, reference in zip(alpaca[prediction_model], alpaca[reference_model]):
            add(prediction, reference)
    dolly = [row["output"] for row in _jsonl(data / "dolly/minillm_processed/valid.jsonl")]
    sinst_by_task: dict[str, list[str]] = defaultdict(list)
    for row in _jsonl(data / "sni/minillm_processed/11_/valid.jsonl"):
        sinst_by_task[row["topic"]].extend(row["output"])
    tasks = sorted(task for task, refs in sinst_by_task.items() if len(refs) > 1)
    remaining = n_pairs - len(predictions)
    for i in range(max(0, remaining)):
        if i % 2 == 0:
            add(rng.choice(dolly), rng.choice(dolly))
        else:
            prediction, reference = rng.sample(sinst_by_task[rng.choice(tasks)], 2)
            add(prediction, reference)
    return predictions[:n_pairs], references[:n_pairs]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=10_000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    args = parser.parse_args(argv)

    from rouge_score import rouge_scorer

    from kdbench import metrics

    predictions, references = real_pairs(args.data, args.pairs)
    words = [len(p.split()) + len(r[0].split()) for p, r in zip(predictions, references)]
    print(f"{len(predictions)} pairs, mean {statistics.mean(words) / 2:.0f} words per text")

    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    reference_times, kdbench_times = [], []
    expected = actual = None
    for repeat in range(args.repeats):
        start = time.perf_counter()
        expected = [scorer.score(r[0], p)["rougeL"].fmeasure for p, r in zip(predictions, references)]
        reference_times.append(time.perf_counter() - start)

        metrics.clear_caches()  # cold start every time: tokenizing and stemming are timed too
        start = time.perf_counter()
        actual = metrics.rouge_l_scores(predictions, references)
        kdbench_times.append(time.perf_counter() - start)
        print(f"repeat {repeat + 1}: rouge_score {reference_times[-1]:.2f} s, kdbench {kdbench_times[-1]:.3f} s")

    max_diff = max(abs(a - b) for a, b in zip(expected, actual))
    n_different = sum(a != b for a, b in zip(expected, actual))
    ref_median, ours_median = statistics.median(reference_times), statistics.median(kdbench_times)
    print(f"rouge_score median {ref_median:.2f} s | kdbench median {ours_median:.3f} s | "
          f"speed-up {ref_median / ours_median:.1f}x")
    print(f"max |difference| {max_diff:.3g}; pairs not bit-identical: {n_different}; "
          f"mean Rouge-L {100 * statistics.mean(actual):.4f} vs {100 * statistics.mean(expected):.4f}")
    return 0 if max_diff <= 1e-9 else 1


if __name__ == "__main__":
    raise SystemExit(main())
