"""AlpacaEval 1.0 / 2.0 (PROTOCOLS.md §3), computed natively; the alpaca-eval package is never imported here.

Why not import it: alpaca-eval 0.6.6 imports ``pkg_resources`` (setuptools < 82), runs ``load_dotenv()`` on
import (which could silently replace the judge's key or URL in this process) and downloads data at call
time. kdbench therefore reads its prompt templates from its installed files, builds the same prompts,
parses the judge's answers with the same rules and computes the same metrics; only the length-controlled
win rate (a GLM fitted against data downloaded at call time) runs alpaca-eval, in a subprocess with the
judge's credentials removed from its environment.

Faithful details (alpaca_eval ``annotators/pairwise_evaluator.py``, ``processors.py``,
``completion_parsers.py``, ``metrics/winrate.py``):

* ``output_1`` is the reference (baseline), ``output_2`` the evaluated model; preference 2 = model wins.
* The order shown to the judge is switched when
  ``random.Random("is_switched_outputs" + instruction + "0").choices([False, True])[0]`` (checked against
  the real annotation files), and the preference mapped back with ``3 − p``.
* Identical outputs get preference 1.5 without a call.
* AE1 (``alpaca_eval_gpt4``): the rank of ``model_1`` in the judge's Python-literal list (1 or 2).
  AE2 (``weighted_alpaca_eval_gpt4_turbo``): ``2 − P(m) / (P(m) + P(M))`` from the first token's top-5
  logprobs; neither token present → failed (None).
"""

from __future__ import annotations

import ast
import json
import math
import os
import random
import re
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, Sequence

from kdbench.errors import DataError
from kdbench.judging.client import API_KEY_VARIABLES, BASE_URL_VARIABLES, JudgeCall, JudgeReply

STANDARD_LC_BASELINE = "gpt4_1106_preview"  # only a default for lc_from_weights; the judge file names its own


# --- metrics ------------------------------------------------------------------------------------


def win_rate(preferences: Sequence[float | int | str | None]) -> dict[str, float | int]:
    """AlpacaEval's head-to-head metrics from preferences in [1, 2] (2 = the evaluated model wins).

    The legacy preference 0 is a draw (1.5); None or NaN (a failed annotation) is dropped. Returns
    ``win_rate`` = mean(p − 1) × 100, ``standard_error`` = sample standard error (ddof 1) × 100,
    ``n_wins`` (p > 1.5), ``n_wins_base`` (p < 1.5), ``n_draws`` (p = 1.5), ``n_total`` and
    ``discrete_win_rate`` = (wins + draws / 2) / n × 100 (alpaca_eval ``metrics/winrate.py``).
    """
    import numpy as np

    values = []
    for preference in preferences:
        if preference is None:
            continue
        value = float(preference)
        if math.isnan(value):
            continue
        values.append(1.5 if value == 0 else value)
    shifted = np.asarray(values, dtype=np.float64) - 1.0  # (n,) in [0, 1]
    n = int(shifted.size)
    if n == 0:
        raise DataError("No valid preferences to compute a win rate from (every annotation failed).")
    n_wins = int(np.sum(shifted > 0.5))
    n_wins_base = int(np.sum(shifted < 0.5))
    n_draws = n - n_wins - n_wins_base
    standard_error = float(np.std(shifted, ddof=1) / math.sqrt(n) * 100) if n > 1 else float("nan")
    return {
        "win_rate": float(np.mean(shifted) * 100),
        "standard_error": standard_error,
        "n_wins": n_wins,
        "n_wins_base": n_wins_base,
        "n_draws": n_draws,
        "n_total": n,
        "discrete_win_rate": (n_wins + n_draws / 2) / n * 100,
    }


# --- prompts ------------------------------------------------------------------------------------


def prompt_to_chatml(prompt: str, start_token: str = "<|im_start|>", end_token: str = "<|im_end|>") -> list[dict]:
    """alpaca_eval ``utils.prompt_to_chatml``: split a ``<|im_start|>role\\n...<|im_end|>`` prompt into messages."""
    prompt = prompt.strip()
    if not (prompt.startswith(start_token) and prompt.endswith(end_token)):
        raise DataError("An AlpacaEval prompt template must start with <|im_start|> and end with <|im_end|>.")
    messages = []
    for part in prompt.split(start_token)[1:]:
        role, _, rest = part.partition("\n")
        messages.append({"role": role.strip(), "content": rest.split(end_token, 1)[0].strip()})
    return messages


def fill_template(template: str, fields: dict[str, str]) -> str:
    """alpaca_eval ``utils.make_prompts``: each ``{name}`` placeholder (no spaces inside the braces) is replaced
    once, first occurrence, in order of first appearance; the template's literal JSON braces stay as they are."""
    text = template
    for name in dict.fromkeys(re.findall(r"{([^ \s]+?)}", template)):
        if name in fields:
            text = text.replace("{" + name + "}", str(fields[name]), 1)
    return text


def is_switched(instruction: str, seed: int = 0) -> bool:
    """Whether AlpacaEval shows the model's output first (``RandomSwitchTwoColumnsProcessor``)."""
    return random.Random("is_switched_outputs" + instruction + str(seed)).choices([False, True], k=1)[0]


def parse_ranking(completion: str | None) -> float | None:
    """``ranking_parser``: the rank (1 or 2) of ``model_1`` in a list like ``[{'model': 'model_1', 'rank': 1}, ...]``.

    Uses ``ast.literal_eval`` (literals only, never ``eval``); anything else is a failed annotation (None).
    """
    if not completion:
        return None
    try:
        ranking = ast.literal_eval(completion.strip())
        rank = [entry for entry in ranking if entry["model"] == "model_1"][0]["rank"]
    except (ValueError, SyntaxError, TypeError, KeyError, IndexError, MemoryError, RecursionError):
        return None
    return float(rank) if rank in (1, 2) else None


def parse_logprob(top_logprobs: Sequence[dict] | None, numerator_token: str = "m",
                  denominator_tokens: Sequence[str] = ("m", "M")) -> float | None:
    """``logprob_parser`` (``is_binarize=False``): ``2 − P(numerator) / Σ P(denominators)`` over the first token's
    top logprobs, with logsumexp; None when no denominator token is among them."""
    if not top_logprobs:
        return None
    found = {t["token"]: float(t["logprob"]) for t in top_logprobs if t["token"] in (*denominator_tokens, numerator_token)}
    if not found:
        return None
    logs = [found.get(token, -math.inf) for token in denominator_tokens]
    top = max(logs)
    log_denominator = top + math.log(sum(math.exp(value - top) for value in logs))
    return 2 - math.exp(found.get(numerator_token, -math.inf) - log_denominator)


# --- annotation ---------------------------------------------------------------------------------


def match_outputs(model_outputs: Sequence[dict], reference_outputs: Sequence[dict]) -> list[tuple[dict, dict]]:
    """Pairs (reference, model) by instruction text, in the reference's order (AlpacaEval merges on instruction)."""
    by_instruction = {row["instruction"]: row for row in model_outputs}
    pairs = [(ref, by_instruction[ref["instruction"]]) for ref in reference_outputs if ref["instruction"] in by_instruction]
    if not pairs:
        raise DataError("No instruction of the model outputs matches the reference outputs; check both files.")
    return pairs


def build_calls(pairs: Sequence[tuple[dict, dict]], protocol: dict, template: str, *,
                seed: int = 0) -> list[tuple[dict, JudgeCall | None]]:
    """(metadata, call) per instruction; the call is None when the two outputs are identical (preference 1.5)."""
    items = []
    for reference, model in pairs:
        instruction = reference["instruction"]
        switched = is_switched(instruction, seed)
        output_1, output_2 = reference["output"], model["output"]
        meta = {"instruction": instruction, "output_1": output_1, "generator_1": reference.get("generator"),
                "output_2": output_2, "generator_2": model.get("generator"), "is_switched_outputs": switched,
                "dataset": reference.get("dataset") or model.get("dataset")}
        if output_1 == output_2:
            items.append((meta, None))
            continue
        shown_1, shown_2 = (output_2, output_1) if switched else (output_1, output_2)
        prompt = fill_template(template, {"instruction": instruction, "output_1": shown_1, "output_2": shown_2})
        items.append((meta, JudgeCall.make(prompt_to_chatml(prompt), **protocol["judge_params"])))
    return items


def annotations(items: Sequence[tuple[dict, JudgeCall | None]], replies: Sequence[JudgeReply | None],
                protocol: dict) -> list[dict]:
    """AlpacaEval-format annotation records with the preference mapped back to (reference, model) order."""
    records = []
    parser_args = protocol.get("parser_args") or {}
    for (meta, call), reply in zip(items, replies):
        record = {**meta, "annotator": protocol["annotator"], "preference": None, "raw_completion": None,
                  "judge_model_reported": None, "error": None}
        if call is None:
            record["preference"] = 1.5
        elif reply is None or not reply.ok:
            record["error"] = reply.error if reply is not None else "not judged"
        else:
            record["judge_model_reported"] = reply.model_reported
            record["raw_completion"] = {"content": reply.content, "top_logprobs": reply.top_logprobs}
            if protocol["parser"] == "logprob":
                shown = parse_logprob(reply.top_logprobs, parser_args.get("numerator_token", "m"),
                                      tuple(parser_args.get("denominator_tokens", ("m", "M"))))
            else:
                shown = parse_ranking(reply.content)
            if shown is None:
                record["error"] = "unparseable verdict"
            else:
                record["preference"] = 3 - shown if meta["is_switched_outputs"] else shown
        records.append(record)
    return records


# --- length-controlled win rate -----------------------------------------------------------------


def _logistic(x):
    import numpy as np

    return np.exp(-np.logaddexp(0, -x))


def read_glm_weights(path: str | os.PathLike) -> dict[str, dict[str, float]]:
    """alpaca_eval GLM weights CSV: ``{model: {column: weight}}``."""
    import csv

    with open(path, newline="", encoding="utf-8") as handle:
        rows = list(csv.reader(handle))
    header = rows[0][1:]
    return {row[0]: dict(zip(header, map(float, row[1:]))) for row in rows[1:]}


def read_instruction_difficulty(path: str | os.PathLike) -> list[float]:
    """alpaca_eval's ``instruction_difficulty.csv`` (index, difficulty per instruction, in eval-set order)."""
    import csv

    with open(path, newline="", encoding="utf-8") as handle:
        rows = [row for row in csv.reader(handle) if row]
    start = 1 if rows and not _is_number(rows[0][-1]) else 0
    return [float(row[-1]) for row in rows[start:]]


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def lc_from_weights(weights: dict[str, dict[str, float]], model: str, difficulty: Sequence[float],
                    baseline: str = STANDARD_LC_BASELINE) -> float:
    """``glm_winrate.predict_winrate``: mean_i σ(Δw_not_gamed + Δw_difficulty · d_i) × 100 at zero length difference."""
    import numpy as np

    if model not in weights or baseline not in weights:
        missing = model if model not in weights else baseline
        raise DataError(f"No GLM weights for {missing!r}; fit them with alpaca-eval (kdbench[alpaca]) first.")
    delta = {k: weights[model][k] - weights[baseline][k] for k in weights[model]}
    logits = delta["not_gamed_baseline.astype(float)"] + delta["instruction_difficulty"] * np.asarray(difficulty)
    return float(_logistic(logits).mean() * 100)


_LC_SCRIPT = r"""
import json, sys
import pandas as pd
from alpaca_eval.metrics.glm_winrate import get_length_controlled_winrate
annotations = pd.DataFrame(json.load(open(sys.argv[1], encoding="utf-8")))
metrics = get_length_controlled_winrate(annotations, save_weights_dir=sys.argv[2], is_add_glm_preference_inplace=False)
print("KDBENCH_LC_RESULT " + json.dumps({k: float(v) for k, v in metrics.items() if k == "length_controlled_winrate"}))
"""


def lc_via_subprocess(records: Sequence[dict], *, n_instructions: int = 805, python: str | None = None,
                      timeout_s: float = 900) -> tuple[float | None, str]:
    """Length-controlled win rate from alpaca-eval run in a separate interpreter (it downloads the instruction
    difficulties at call time). Its environment has the judge's key and URL variables removed, and it runs in
    an empty temporary folder. Returns (value or None, note)."""
    if len(records) != n_instructions:
        return None, f"LC n/a: needs all {n_instructions} AlpacaEval instructions in order (got {len(records)})"
    env = {k: v for k, v in os.environ.items() if k not in (*API_KEY_VARIABLES, *BASE_URL_VARIABLES)}
    rows = [{"instruction": r["instruction"], "output_1": r["output_1"], "output_2": r["output_2"],
             "generator_1": r["generator_1"], "generator_2": r["generator_2"], "annotator": r["annotator"],
             "preference": r["preference"]} for r in records]
    with tempfile.TemporaryDirectory(prefix="kdbench-lc-") as tmp:
        data_path = Path(tmp) / "annotations.json"
        data_path.write_text(json.dumps(rows), encoding="utf-8")
        try:
            done = subprocess.run([python or sys.executable, "-c", _LC_SCRIPT, str(data_path), str(Path(tmp) / "w")],
                                  cwd=tmp, env=env, capture_output=True, text=True, timeout=timeout_s)
        except (OSError, subprocess.TimeoutExpired) as err:
            return None, f"LC n/a: alpaca-eval subprocess failed ({type(err).__name__})"
    for line in done.stdout.splitlines():
        if line.startswith("KDBENCH_LC_RESULT "):
            return json.loads(line.split(" ", 1)[1])["length_controlled_winrate"], "LC from alpaca-eval's GLM (subprocess)"
    tail = (done.stderr.strip().splitlines() or ["no output"])[-1][:200]
    return None, f"LC n/a: alpaca-eval subprocess failed ({tail})"


def length_controlled(records: Sequence[dict], protocol: dict, *, reference_name: str | None,
                      difficulty_path: str | os.PathLike | None = None, weights_path: str | os.PathLike | None = None,
                      model_name: str | None = None) -> tuple[float | None, str]:
    """The length-controlled win rate and a note saying how it was obtained, or None and why it is n/a."""
    from kdbench.judging.data import alpaca_eval_package_dir

    settings = protocol.get("length_controlled")
    if not settings:
        return None, (f"LC n/a: {protocol.get('name', 'this protocol')} has no length-controlled win rate in kdbench "
                      "(its judge file sets length_controlled: false)")
    baseline = settings["baseline"]
    if reference_name != baseline:
        return None, (f"LC n/a: the GLM is fitted against {baseline}; a custom reference "
                      f"({reference_name}) has no length-controlled win rate")
    if difficulty_path is not None and weights_path is not None and model_name is not None:
        weights = read_glm_weights(weights_path)
        if model_name in weights:
            return lc_from_weights(weights, model_name, read_instruction_difficulty(difficulty_path), baseline), \
                "LC from the GLM weights and the instruction-difficulty file given"
    if alpaca_eval_package_dir() is None:
        return None, ("LC n/a: the alpaca-eval package is not installed (pip install 'kdbench[alpaca]'), and no "
                      "instruction-difficulty file with GLM weights for this model was given")
    return lc_via_subprocess(records, n_instructions=int(settings["n_instructions"]))


def evaluate(client, model_outputs: Sequence[dict], reference_outputs: Sequence[dict], protocol: dict, template: str,
             *, seed: int = 0) -> tuple[list[dict], dict[str, Any]]:
    """Annotate every (reference, model) pair with the judge and compute the win-rate metrics.

    ``client`` is a :class:`~kdbench.judging.client.JudgeClient`. Returns (annotation records, metrics).
    """
    pairs = match_outputs(model_outputs, reference_outputs)
    seed = protocol.get("randomize_order", {}).get("seed", seed)
    items = build_calls(pairs, protocol, template, seed=seed)
    to_call = [(i, call) for i, (_, call) in enumerate(items) if call is not None]
    replies: list[JudgeReply | None] = [None] * len(items)
    for (i, _), reply in zip(to_call, client.complete([call for _, call in to_call])):
        replies[i] = reply
    records = annotations(items, replies, protocol)
    metrics = win_rate([r["preference"] for r in records])
    metrics["n_failed"] = sum(r["preference"] is None for r in records)
    metrics["n_instructions"] = len(records)
    metrics["n_unmatched_model_outputs"] = len(model_outputs) - len(pairs)
    metrics["avg_length"] = avg_length([r["output_2"] for r in records])
    return records, metrics


def avg_length(outputs: Sequence[str]) -> int:
    """alpaca_eval's ``avg_length``: the mean number of characters of the model's outputs, truncated to an
    integer (``int(model_outputs["output"].str.len().mean())`` in its ``main.evaluate``), not rounded."""
    if not outputs:
        raise DataError("No outputs to measure; give at least one model output.")
    return int(sum(len(text) for text in outputs) / len(outputs))


def metric_records(run, metrics: dict, *, label: str, judge: str, protocol: str, reference: str) -> list[dict]:
    """The run's ``metrics.jsonl`` records (suite = protocol): win rate with its standard error and W / L /
    draws (as ``wins`` / ``losses`` / ``ties``), the length-controlled and discrete win rates, and the
    average output length."""
    common = {"label": label, "judge": judge, "protocol": protocol, "reference": reference,
              "n_failed": metrics["n_failed"]}
    counts = {"wins": metrics["n_wins"], "ties": metrics["n_draws"], "losses": metrics["n_wins_base"]}
    n = metrics["n_total"]
    records = [run.metric_record(protocol, "win_rate", metrics["win_rate"], n=n, stderr=metrics["standard_error"],
                                 **counts, **common)]
    if metrics.get("length_controlled_winrate") is not None:
        records.append(run.metric_record(protocol, "length_controlled_winrate", metrics["length_controlled_winrate"],
                                         n=n, **common))
    records.append(run.metric_record(protocol, "discrete_win_rate", metrics["discrete_win_rate"], n=n, **counts,
                                     **common))
    records.append(run.metric_record(protocol, "avg_length", metrics["avg_length"], n=n, higher_is_better=None,
                                     **common))
    return records
