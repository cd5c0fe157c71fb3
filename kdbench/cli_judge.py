"""``kdbench judge ...``: MT-Bench, AlpacaEval and the in-domain win rate through any OpenAI-compatible judge.

The judge's API key is read from ``KDBENCH_JUDGE_API_KEY`` or ``OPENAI_API_KEY`` and its base URL from
``--base-url``, ``KDBENCH_JUDGE_BASE_URL`` or ``OPENAI_BASE_URL``; neither is ever written to a file.
Heavy imports (openai, numpy, torch, transformers) happen inside the commands.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Optional

import typer

app = typer.Typer(help="Judged evaluation: MT-Bench, AlpacaEval, pairwise win rate (omega).", no_args_is_help=True)

_JUDGE_MODEL = typer.Option(None, "--judge-model", help="Judge model name as the endpoint knows it (recorded in every result).")
_BASE_URL = typer.Option(None, "--base-url", help="OpenAI-compatible endpoint (default: $KDBENCH_JUDGE_BASE_URL / $OPENAI_BASE_URL / OpenAI).")
_CONCURRENCY = typer.Option(16, "--concurrency", help="Judge requests in flight at once.")
_RPM = typer.Option(None, "--rpm", help="At most this many requests per minute (default: no limit).")
_RETRIES = typer.Option(6, "--max-retries", help="Retries per call on 429 / 5xx / timeouts / connection errors.")
_TIMEOUT = typer.Option(120.0, "--timeout-s", help="Timeout of one judge call, seconds.")
_BACKOFF = typer.Option(1.0, "--backoff-s", help="Initial backoff before a retry, seconds (doubles, with jitter).")
_CACHE = typer.Option(None, "--cache-dir", help="Folder of the judgment cache (default: <kdbench cache>/judgments).")
_DRY = typer.Option(False, "--dry-run", help="Print how many calls and tokens the run needs, and stop.")
_OUT = typer.Option(..., "--out", help="Folder for judgments.jsonl, results.json and config.json.")
_PRICE_IN = typer.Option(None, "--price-in", help="USD per million prompt tokens (for the cost estimate).")
_PRICE_OUT = typer.Option(None, "--price-out", help="USD per million completion tokens (for the cost estimate).")


def _client(judge_model, base_url, concurrency, rpm, max_retries, timeout_s, backoff_s, cache_dir, price_in, price_out):
    from rich.progress import Progress

    from kdbench.judging.client import ClientSettings, JudgeClient, default_cache_path

    settings = ClientSettings(model=judge_model, base_url=base_url, concurrency=concurrency, requests_per_minute=rpm,
                              max_retries=max_retries, timeout_s=timeout_s, backoff_initial_s=backoff_s,
                              backoff_max_s=max(60.0, backoff_s), price_input_per_mtok=price_in,
                              price_output_per_mtok=price_out)
    progress = Progress(transient=True)
    state = {}

    def report(done: int, total: int) -> None:
        if "task" not in state:
            progress.start()
            state["task"] = progress.add_task("judging", total=total)
        progress.update(state["task"], completed=done, total=total)
        if done >= total:
            progress.stop()

    return JudgeClient(settings, cache_path=default_cache_path(judge_model, cache_dir), progress=report)


def _require_model(judge_model: str | None) -> str:
    from kdbench.errors import ConfigError

    if not judge_model:
        raise ConfigError("Pass --judge-model (for example gpt-4o-2024-08-06), or --offline for the offline judge.")
    return judge_model


def _write_outputs(out: Path, records: list[dict], results: dict, config: dict) -> None:
    from kdbench.store import atomic_write_json, atomic_write_text
    import json

    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "judgments.jsonl", "".join(json.dumps(r, sort_keys=True) + "\n" for r in records))
    atomic_write_json(out / "results.json", results)
    atomic_write_json(out / "config.json", config)


def _usage(client) -> dict:
    return client.stats.record(client.settings.prices())


def _print_usage(client) -> None:
    stats = client.stats
    cost = stats.estimated_cost_usd(client.settings.prices())
    typer.echo(f"judge calls: {stats.calls_made} made, {stats.calls_cached} from cache, {stats.calls_failed} failed "
               f"({stats.retries} retries); tokens {stats.prompt_tokens:,} in / {stats.completion_tokens:,} out"
               + (f"; estimated cost ${cost:.2f}" if cost is not None else ""))
    if stats.models_reported:
        typer.echo("judge snapshot(s) reported: " + ", ".join(f"{m} ({n})" for m, n in stats.models_reported.items()))


def _fmt(value) -> str:
    return "n/a" if value is None else f"{value:.4f}"


@app.command("mt-bench")
def mt_bench(
    answers: list[Path] = typer.Option([], "--answers", help="FastChat model_answer JSONL, a folder of them, or a kdbench run directory; repeatable."),
    model: Optional[str] = typer.Option(None, "--model", help="Generate answers first with this Hugging Face model (path or id)."),
    model_id: Optional[str] = typer.Option(None, "--model-id", help="Name of the generated answers' model."),
    data_dir: Optional[Path] = typer.Option(None, "--data-dir", help="Folder with FastChat's question.jsonl, judge_prompts.jsonl, reference_answer/ (default: $KDBENCH_DATA/mt_bench, else download)."),
    reference: str = typer.Option("gpt-4", "--reference", help="Reference answers for math/reasoning/coding: gpt-4, gpt-4-0125-preview, or a JSONL path."),
    mode: str = typer.Option("single", "--mode", help="single (1-10 grading) or pairwise (two models, both orders)."),
    limit: Optional[int] = typer.Option(None, "--limit", help="Only the first N questions (quick checks)."),
    judge_model: Optional[str] = _JUDGE_MODEL, base_url: Optional[str] = _BASE_URL, concurrency: int = _CONCURRENCY,
    rpm: Optional[float] = _RPM, max_retries: int = _RETRIES, timeout_s: float = _TIMEOUT, backoff_s: float = _BACKOFF,
    cache_dir: Optional[Path] = _CACHE, dry_run: bool = _DRY, out: Path = _OUT, price_in: Optional[float] = _PRICE_IN,
    price_out: Optional[float] = _PRICE_OUT,
):
    """MT-Bench: FastChat's single-answer grading (or pairwise), turn 1 / turn 2 / overall / per category."""
    from kdbench import registry
    from kdbench.errors import ConfigError
    from kdbench.judging import data as judge_data
    from kdbench.judging import mt_bench as mtb

    judge_model = _require_model(judge_model)
    protocol = registry.get("judges", "mt_bench").body
    if mode not in ("single", "pairwise"):
        raise ConfigError(f"--mode must be single or pairwise, not {mode!r}.")
    questions = judge_data.load_questions(judge_data.mt_bench_file("question.jsonl", data_dir))[:limit]
    prompts = judge_data.load_judge_prompts(judge_data.mt_bench_file("judge_prompts.jsonl", data_dir))
    reference_file = protocol["reference_sets"].get(reference)
    reference_path = judge_data.mt_bench_file(reference_file, data_dir) if reference_file else Path(reference)
    if not reference_path.is_file():
        raise ConfigError(f"Unknown reference set {reference!r}; use gpt-4, gpt-4-0125-preview or a JSONL path.")
    references = judge_data.load_reference_answers(reference_path)

    all_answers: dict[str, dict[int, list[str]]] = {}
    for path in answers:
        all_answers.update(judge_data.load_mt_bench_answers(path))
    if model:
        all_answers.update(_generate_mt_bench(model, model_id or Path(model).name, questions, out))
    if not all_answers:
        raise ConfigError("Pass --answers (FastChat answers or a kdbench run) or --model to generate them.")

    client = _client(judge_model, base_url, concurrency, rpm, max_retries, timeout_s, backoff_s, cache_dir, price_in, price_out)
    config = {"protocol": "mt_bench", "mode": mode, "reference": reference, "judge": client.settings.record(),
              "models": sorted(all_answers), "n_questions": len(questions), "answers": [str(p) for p in answers]}
    if mode == "single":
        items = []
        for name, model_answers in sorted(all_answers.items()):
            items += mtb.single_judge_calls(questions, model_answers, prompts, references, model=name)
    else:
        if len(all_answers) != 2:
            raise ConfigError("Pairwise MT-Bench compares exactly two models; pass two --answers.")
        (name_1, answers_1), (name_2, answers_2) = sorted(all_answers.items())
        items = mtb.pairwise_judge_calls(questions, answers_1, answers_2, prompts, references)
    calls = [call for _, call in items]
    if dry_run:
        typer.echo(client.dry_run(calls).describe())
        return
    replies = client.complete(calls)
    if mode == "single":
        records = mtb.single_records(items, replies, judge_model)
        summary = mtb.summarize(records, questions)
        for name, row in summary.items():
            typer.echo(f"{name}: turn 1 {_fmt(row['turn_1'])}  turn 2 {_fmt(row['turn_2'])}  overall "
                       f"{_fmt(row['overall'])}  (n={row['n_valid']}, failed judgments {row['n_failed']})")
    else:
        records = mtb.pairwise_records(items, replies, model_1=name_1, model_2=name_2, judge_model=judge_model)
        summary = {name_1: mtb.summarize_pairwise(records, name_1)}
        row = summary[name_1]["all"]
        typer.echo(f"{name_1} vs {name_2}: W {row['wins']} T {row['ties']} L {row['losses']} "
                   f"(failed {row['failed']}, n={row['n']})")
    _print_usage(client)
    _write_outputs(out, records, {"protocol": "mt_bench", "mode": mode, "judge_model": judge_model,
                                  "judge_models_reported": client.stats.models_reported, "scores": summary,
                                  "usage": _usage(client), "finished": time.time()}, config)


def _generate_mt_bench(model_path: str, model_id: str, questions: list[dict], out: Path) -> dict[str, dict[int, list[str]]]:
    from kdbench.errors import ModelError
    from kdbench.judging.mt_bench import generate_answers
    from kdbench.store import atomic_write_text
    import json

    try:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(model_path)
        hf_model = AutoModelForCausalLM.from_pretrained(model_path)
    except (OSError, ValueError) as err:
        raise ModelError(f"Could not load model {model_path!r} ({type(err).__name__}); pass a local path or a Hub id.") from None
    records = generate_answers(hf_model, tokenizer, questions, model_id=model_id)
    atomic_write_text(out / "model_answer" / f"{model_id}.jsonl", "".join(json.dumps(r) + "\n" for r in records))
    return {model_id: {r["question_id"]: r["choices"][0]["turns"] for r in records}}


@app.command("alpaca-eval")
def alpaca_eval(
    outputs: Path = typer.Option(..., "--outputs", help="Model outputs: AlpacaEval model_outputs.json, JSONL, or a kdbench run directory."),
    version: str = typer.Option("2", "--version", help="1 (alpaca_eval_gpt4 vs text_davinci_003) or 2 (weighted_alpaca_eval_gpt4_turbo vs gpt4_1106_preview)."),
    reference: Optional[Path] = typer.Option(None, "--reference", help="Reference outputs (default: $KDBENCH_DATA/alpaca_eval/results/<reference>/model_outputs.json); any outputs file or run works."),
    templates_dir: Optional[Path] = typer.Option(None, "--templates-dir", help="alpaca_eval evaluators_configs folder (default: the installed package's)."),
    suite: Optional[str] = typer.Option(None, "--suite", help="Suite of a run directory's generations."),
    seed: Optional[str] = typer.Option(None, "--seed", help="Seed of a run directory's generations."),
    instruction_difficulty: Optional[Path] = typer.Option(None, "--instruction-difficulty", help="alpaca_eval instruction_difficulty.csv (for the LC win rate without the package)."),
    glm_weights: Optional[Path] = typer.Option(None, "--glm-weights", help="alpaca_eval GLM weights CSV (with --instruction-difficulty)."),
    limit: Optional[int] = typer.Option(None, "--limit", help="Only the first N instructions (quick checks; no LC)."),
    judge_model: Optional[str] = _JUDGE_MODEL, base_url: Optional[str] = _BASE_URL, concurrency: int = _CONCURRENCY,
    rpm: Optional[float] = _RPM, max_retries: int = _RETRIES, timeout_s: float = _TIMEOUT, backoff_s: float = _BACKOFF,
    cache_dir: Optional[Path] = _CACHE, dry_run: bool = _DRY, out: Path = _OUT, price_in: Optional[float] = _PRICE_IN,
    price_out: Optional[float] = _PRICE_OUT,
):
    """AlpacaEval 1.0 / 2.0: win rate, standard error, W/L/D and (2.0) the length-controlled win rate."""
    import os

    from kdbench import registry
    from kdbench.errors import ConfigError, DataError
    from kdbench.judging import alpaca_eval as ae
    from kdbench.judging.data import alpaca_eval_template, load_outputs

    if version not in ("1", "2"):
        raise ConfigError(f"--version must be 1 or 2, not {version!r}.")
    protocol = registry.get("judges", f"alpaca_eval_{version}").body
    judge_model = judge_model or protocol["default_judge_model"]
    reference_name = protocol["reference"]
    if reference is None:
        if not os.environ.get("KDBENCH_DATA"):
            raise DataError(f"Pass --reference (the {reference_name} outputs, alpaca_eval results/{reference_name}/"
                            "model_outputs.json) or set KDBENCH_DATA.")
        reference = Path(os.environ["KDBENCH_DATA"]) / "alpaca_eval" / "results" / reference_name / "model_outputs.json"
    reference_rows = load_outputs(reference)
    if reference_rows and reference_rows[0].get("generator"):
        reference_name = reference_rows[0]["generator"]
    model_rows = load_outputs(outputs, suite=suite, seed=seed)
    template = alpaca_eval_template(protocol["prompt_template"], templates_dir)
    client = _client(judge_model, base_url, concurrency, rpm, max_retries, timeout_s, backoff_s, cache_dir, price_in, price_out)
    config = {"protocol": protocol["name"], "annotator": protocol["annotator"], "judge": client.settings.record(),
              "outputs": str(outputs), "reference": str(reference), "reference_generator": reference_name}
    reference_rows = reference_rows[:limit]
    if dry_run:
        items = ae.build_calls(ae.match_outputs(model_rows, reference_rows), protocol, template)
        typer.echo(client.dry_run([c for _, c in items if c is not None]).describe())
        return
    records, metrics = ae.evaluate(client, model_rows, reference_rows, protocol, template)
    model_name = records[0]["generator_2"] if records else None
    lc, lc_note = ae.length_controlled(records, protocol, reference_name=reference_name,
                                       difficulty_path=instruction_difficulty, weights_path=glm_weights,
                                       model_name=model_name)
    metrics["length_controlled_winrate"] = lc
    metrics["length_controlled_note"] = lc_note
    typer.echo(f"AlpacaEval {version}.0 ({protocol['annotator']} via {judge_model}, reference {reference_name}): "
               f"win rate {metrics['win_rate']:.2f} ± {metrics['standard_error']:.2f} "
               f"(W {metrics['n_wins']} / L {metrics['n_wins_base']} / D {metrics['n_draws']}, n={metrics['n_total']}, "
               f"failed {metrics['n_failed']}); " + (f"LC {lc:.2f}" if lc is not None else lc_note))
    _print_usage(client)
    _write_outputs(out, records, {"protocol": protocol["name"], "judge_model": judge_model,
                                  "judge_models_reported": client.stats.models_reported, "metrics": metrics,
                                  "usage": _usage(client), "finished": time.time()}, config)


@app.command("pairwise")
def pairwise(
    student: Path = typer.Option(..., "--student", help="Student answers: a kdbench run directory or an outputs file."),
    teacher: Path = typer.Option(..., "--teacher", help="Teacher (or any other) answers on the same prompts."),
    suite: Optional[str] = typer.Option(None, "--suite", help="Suite of the run directories' generations."),
    seed: Optional[str] = typer.Option(None, "--seed", help="Seed of the run directories' generations."),
    single_order: bool = typer.Option(False, "--single-order", help="Judge one order only (student as A)."),
    offline: Optional[str] = typer.Option(None, "--offline", help="Use the deterministic offline judge: exact or rouge (never an LLM judgment)."),
    tie_margin: float = typer.Option(0.05, "--tie-margin", help="Offline rouge judge: Rouge-L differences up to this are ties."),
    references: Optional[Path] = typer.Option(None, "--references", help="JSONL of {id, references} for the offline judge."),
    data_dir: Optional[Path] = typer.Option(None, "--data-dir", help="Folder with FastChat's judge_prompts.jsonl."),
    judge_model: Optional[str] = _JUDGE_MODEL, base_url: Optional[str] = _BASE_URL, concurrency: int = _CONCURRENCY,
    rpm: Optional[float] = _RPM, max_retries: int = _RETRIES, timeout_s: float = _TIMEOUT, backoff_s: float = _BACKOFF,
    cache_dir: Optional[Path] = _CACHE, dry_run: bool = _DRY, out: Path = _OUT, price_in: Optional[float] = _PRICE_IN,
    price_out: Optional[float] = _PRICE_OUT,
):
    """In-domain win rate: W / T / L of the student against the teacher and omega = (W - L)/(W + T + L) x 100."""
    from kdbench import registry
    from kdbench.judging import pairwise as pw
    from kdbench.judging.data import load_judge_prompts, load_outputs, mt_bench_file
    from kdbench.judging.offline import OfflineJudge
    from kdbench.store import read_jsonl

    protocol = registry.get("judges", "pairwise").body
    refs = None
    if references is not None:
        refs = {str(r["id"]): ([r["references"]] if isinstance(r["references"], str) else r["references"])
                for r in read_jsonl(references, strict=True)}
    pairs = pw.pair_up(load_outputs(student, suite=suite, seed=seed), load_outputs(teacher, suite=suite, seed=seed), refs)
    both = not single_order
    config = {"protocol": "pairwise", "student": str(student), "teacher": str(teacher), "both_orders": both,
              "suite": suite, "seed": seed}
    if offline:
        judge = OfflineJudge(mode=offline, tie_margin=tie_margin)
        records = pw.judge_offline(judge, pairs, both_orders=both)
        summary = pw.summarize(records)
        label, usage, reported = judge.label, None, {judge.name(): len(records)}
        config["judge"] = {"offline": offline, "tie_margin": tie_margin, "label": judge.label}
    else:
        judge_model = _require_model(judge_model)
        prompt = load_judge_prompts(mt_bench_file("judge_prompts.jsonl", data_dir))[protocol["prompt"]]
        client = _client(judge_model, base_url, concurrency, rpm, max_retries, timeout_s, backoff_s, cache_dir, price_in, price_out)
        config["judge"] = client.settings.record()
        if dry_run:
            typer.echo(client.dry_run([c for _, c in pw.judge_calls(pairs, prompt, both_orders=both)]).describe())
            return
        records = pw.judge_with_llm(client, pairs, prompt, both_orders=both)
        summary = pw.summarize(records)
        label, usage, reported = f"LLM judge {judge_model} ({protocol['prompt']})", _usage(client), client.stats.models_reported
    omega_text = "n/a" if summary["omega"] is None else f"{summary['omega']:+.1f}"
    typer.echo(f"[{label}] W {summary['wins']} T {summary['ties']} L {summary['losses']} (n={summary['n']}; "
               f"judge failures {summary['failed']}); omega {omega_text} ({'both orders' if both else 'single order'})")
    if not offline:
        _print_usage(client)
    _write_outputs(out, records, {"protocol": "pairwise", "judge": label, "judge_models_reported": reported,
                                  "both_orders": both, "summary": summary, "usage": usage, "finished": time.time()},
                   config)
