"""``kdbench judge ...``: a thin layer over :mod:`kdbench.judging.api` (MT-Bench, AlpacaEval, the win rate ω).

Each command turns its options into the protocol's settings (:mod:`kdbench.judging.settings`), calls the
library, and prints the result; the library writes the run directory. The main CLI (:mod:`kdbench.cli`) wraps
these commands in the same error handling as every command: a user error is one sentence and exit code 2.
The judge's API key is read from ``KDBENCH_JUDGE_API_KEY`` or ``OPENAI_API_KEY`` and its base URL from
``--base-url``, ``KDBENCH_JUDGE_BASE_URL`` or ``OPENAI_BASE_URL``; no key is ever written to a file.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import List, Optional

import typer

app = typer.Typer(help="Judged evaluation: MT-Bench, AlpacaEval, pairwise win rate (omega).", no_args_is_help=True)

_JUDGE_MODEL = typer.Option(None, "--judge-model", help="Judge model name as the endpoint knows it (recorded in every result).")
_BASE_URL = typer.Option(None, "--base-url", help="OpenAI-compatible endpoint (default: $KDBENCH_JUDGE_BASE_URL / $OPENAI_BASE_URL / OpenAI).")
_CONCURRENCY = typer.Option(16, "--concurrency", help="Judge requests in flight at once.")
_RPM = typer.Option(None, "--rpm", help="At most this many requests per minute (default: no limit).")
_RETRIES = typer.Option(6, "--max-retries", help="Retries per call on 429 / 5xx / timeouts / connection errors / malformed replies.")
_TIMEOUT = typer.Option(120.0, "--timeout-s", help="Timeout of one judge call, seconds.")
_BACKOFF = typer.Option(1.0, "--backoff-s", help="Initial backoff before a retry, seconds (doubles, with jitter).")
_CACHE = typer.Option(None, "--cache-dir", help="Folder of the judgment cache (default: <kdbench cache>/judgments).")
_DRY = typer.Option(False, "--dry-run", help="Print how many calls and tokens the run needs, and stop.")
_OUT = typer.Option(None, "--out", help="The run directory to write (run.json, judgments.jsonl, metrics.jsonl, ...).")
_LIMIT = typer.Option(None, "--limit", help="Only the first N items (quick checks).")
_PRICE_IN = typer.Option(None, "--price-in", help="USD per million prompt tokens (for the cost estimate).")
_PRICE_OUT = typer.Option(None, "--price-out", help="USD per million completion tokens (for the cost estimate).")


def _settings(**values) -> dict:
    """The options given (None = the protocol's default), with paths as text."""
    return {k: (str(v) if isinstance(v, Path) else [str(x) for x in v] if isinstance(v, list) else v)
            for k, v in values.items() if v is not None}


def _progress():
    from rich.progress import Progress

    progress = Progress(transient=True)
    state: dict = {}

    def report(done: int, total: int) -> None:
        if "task" not in state:
            progress.start()
            state["task"] = progress.add_task("judging", total=total)
        progress.update(state["task"], completed=done, total=total)
        if done >= total:
            progress.stop()

    return report


def _run(protocol: str, values: dict) -> None:
    from kdbench.config import build
    from kdbench.judging.api import PROTOCOLS

    config_class, run = PROTOCOLS[protocol]
    config = build(config_class, values)  # every option checked before any work

    def say(message: str) -> None:
        typer.echo(message, err=True)

    outcome = run(config, log=say, command=sys.argv, progress=_progress())
    typer.echo(outcome.message)
    if outcome.usage_line:
        typer.echo(outcome.usage_line)
    if outcome.run is not None:
        typer.echo(f"run: {outcome.run.path}")


@app.command("mt-bench")
def mt_bench(
    answers: List[Path] = typer.Option([], "--answers", help="FastChat model_answer JSONL, a folder of them, or a kdbench run directory; repeatable."),
    model: Optional[str] = typer.Option(None, "--model", help="Generate answers first with this model (directory, Hub id or GGUF alias)."),
    model_id: Optional[str] = typer.Option(None, "--model-id", help="Name of the generated answers' model (fastchat protocol: also picks FastChat's template)."),
    answer_protocol: str = typer.Option("kdbench", "--answer-protocol", help="kdbench (the tokenizer's chat template, explicit sampling) or fastchat (FastChat's template, seeding and generation defaults)."),
    chat_template: Optional[str] = typer.Option(None, "--chat-template", help="fastchat protocol: a FastChat template name instead of the one --model-id picks, or 'tokenizer'."),
    batch_size: int = typer.Option(8, "--batch-size", help="Questions generated together."),
    data_dir: Optional[Path] = typer.Option(None, "--data-dir", help="Folder with FastChat's question.jsonl, judge_prompts.jsonl, reference_answer/ (default: $KDBENCH_DATA/mt_bench, else download)."),
    reference: Optional[str] = typer.Option(None, "--reference", help="Reference answers for math/reasoning/coding: gpt-4, gpt-4-0125-preview, or a JSONL path."),
    mode: str = typer.Option("single", "--mode", help="single (1-10 grading) or pairwise (two models, both orders)."),
    limit: Optional[int] = _LIMIT, judge_model: Optional[str] = _JUDGE_MODEL, base_url: Optional[str] = _BASE_URL,
    concurrency: int = _CONCURRENCY, rpm: Optional[float] = _RPM, max_retries: int = _RETRIES,
    timeout_s: float = _TIMEOUT, backoff_s: float = _BACKOFF, cache_dir: Optional[Path] = _CACHE,
    dry_run: bool = _DRY, out: Optional[Path] = _OUT, price_in: Optional[float] = _PRICE_IN,
    price_out: Optional[float] = _PRICE_OUT,
):
    """MT-Bench: FastChat's single-answer grading (or pairwise), turn 1 / turn 2 / overall / per category."""
    _run("mt_bench", _settings(answers=list(answers), model=model, model_id=model_id, answer_protocol=answer_protocol,
                               chat_template=chat_template, batch_size=batch_size, data_dir=data_dir,
                               reference=reference, mode=mode, limit=limit, judge_model=judge_model,
                               base_url=base_url, concurrency=concurrency, rpm=rpm, max_retries=max_retries,
                               timeout_s=timeout_s, backoff_s=backoff_s, cache_dir=cache_dir, dry_run=dry_run,
                               out=out, price_in=price_in, price_out=price_out))


@app.command("alpaca-eval")
def alpaca_eval(
    outputs: Optional[Path] = typer.Option(None, "--outputs", help="Model outputs: AlpacaEval model_outputs.json, JSONL, or a kdbench run directory."),
    version: str = typer.Option("2", "--version", help="1 (alpaca_eval_gpt4 vs text_davinci_003) or 2 (weighted_alpaca_eval_gpt4_turbo vs gpt4_1106_preview)."),
    reference: Optional[Path] = typer.Option(None, "--reference", help="Reference outputs (default: $KDBENCH_DATA/alpaca_eval/results/<reference>/model_outputs.json); any outputs file or run works."),
    templates_dir: Optional[Path] = typer.Option(None, "--templates-dir", help="alpaca_eval evaluators_configs folder (default: the installed package's)."),
    suite: Optional[str] = typer.Option(None, "--suite", help="Suite of a run directory's generations."),
    seed: Optional[str] = typer.Option(None, "--seed", help="Seed of a run directory's generations."),
    instruction_difficulty: Optional[Path] = typer.Option(None, "--instruction-difficulty", help="alpaca_eval instruction_difficulty.csv (for the LC win rate without the package)."),
    glm_weights: Optional[Path] = typer.Option(None, "--glm-weights", help="alpaca_eval GLM weights CSV (with --instruction-difficulty)."),
    limit: Optional[int] = _LIMIT, judge_model: Optional[str] = _JUDGE_MODEL, base_url: Optional[str] = _BASE_URL,
    concurrency: int = _CONCURRENCY, rpm: Optional[float] = _RPM, max_retries: int = _RETRIES,
    timeout_s: float = _TIMEOUT, backoff_s: float = _BACKOFF, cache_dir: Optional[Path] = _CACHE,
    dry_run: bool = _DRY, out: Optional[Path] = _OUT, price_in: Optional[float] = _PRICE_IN,
    price_out: Optional[float] = _PRICE_OUT,
):
    """AlpacaEval 1.0 / 2.0: win rate, standard error, W/L/D, average length and (2.0) the length-controlled win rate."""
    _run("alpaca_eval", _settings(outputs=outputs, version=version, reference=reference, templates_dir=templates_dir,
                                  suite=suite, seed=seed, instruction_difficulty=instruction_difficulty,
                                  glm_weights=glm_weights, limit=limit, judge_model=judge_model, base_url=base_url,
                                  concurrency=concurrency, rpm=rpm, max_retries=max_retries, timeout_s=timeout_s,
                                  backoff_s=backoff_s, cache_dir=cache_dir, dry_run=dry_run, out=out,
                                  price_in=price_in, price_out=price_out))


@app.command("pairwise")
def pairwise(
    student: Optional[Path] = typer.Option(None, "--student", help="Student answers: a kdbench run directory or an outputs file."),
    teacher: Optional[Path] = typer.Option(None, "--teacher", help="Teacher (or any other) answers on the same prompts."),
    suite: Optional[str] = typer.Option(None, "--suite", help="Suite of the run directories' generations."),
    seed: Optional[str] = typer.Option(None, "--seed", help="Seed of the run directories' generations."),
    single_order: bool = typer.Option(False, "--single-order", help="Judge one order only (student as A)."),
    offline: Optional[str] = typer.Option(None, "--offline", help="Use the deterministic offline judge: exact or rouge (never an LLM judgment)."),
    tie_margin: Optional[float] = typer.Option(None, "--tie-margin", help="Offline rouge judge: Rouge-L differences up to this are ties (default 0.05, judges/offline.yaml)."),
    references: Optional[Path] = typer.Option(None, "--references", help="JSONL of {id, references} for the offline judge."),
    data_dir: Optional[Path] = typer.Option(None, "--data-dir", help="Folder with FastChat's judge_prompts.jsonl."),
    limit: Optional[int] = _LIMIT, judge_model: Optional[str] = _JUDGE_MODEL, base_url: Optional[str] = _BASE_URL,
    concurrency: int = _CONCURRENCY, rpm: Optional[float] = _RPM, max_retries: int = _RETRIES,
    timeout_s: float = _TIMEOUT, backoff_s: float = _BACKOFF, cache_dir: Optional[Path] = _CACHE,
    dry_run: bool = _DRY, out: Optional[Path] = _OUT, price_in: Optional[float] = _PRICE_IN,
    price_out: Optional[float] = _PRICE_OUT,
):
    """In-domain win rate: W / T / L of the student against the teacher and omega = (W - L)/(W + T + L) x 100."""
    _run("pairwise", _settings(student=student, teacher=teacher, suite=suite, seed=seed, single_order=single_order,
                               offline=offline, tie_margin=tie_margin, references=references, data_dir=data_dir,
                               limit=limit, judge_model=judge_model, base_url=base_url, concurrency=concurrency,
                               rpm=rpm, max_retries=max_retries, timeout_s=timeout_s, backoff_s=backoff_s,
                               cache_dir=cache_dir, dry_run=dry_run, out=out, price_in=price_in, price_out=price_out))
