"""Judging as a library: :func:`judge` (or one function per protocol) checks every input, judges, and writes a
run directory like :func:`kdbench.evaluate.evaluate` (see :mod:`kdbench.judging.runs`).

>>> from kdbench import judge
>>> result = judge("pairwise", student="runs/eval/kd", teacher="runs/eval/teacher", offline="exact",
...                out="runs/judge/kd-vs-teacher")
>>> result.summary["omega"]

Errors a user can cause (a missing answers file, a bad option, an unreachable endpoint, a rejected key) are
:class:`~kdbench.errors.KdbenchError` sentences; inputs are checked before anything is written, and a run that
stops later is marked ``failed``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

from kdbench.errors import ConfigError, DataError, KdbenchError
from kdbench.judging.runs import failing, finish_run, open_run
from kdbench.judging.settings import AlpacaEvalConfig, JudgeOutcome, JudgeSettings, MTBenchConfig, PairwiseConfig


def _say(log):
    return log or (lambda message: None)


def _client(settings: JudgeSettings, judge_model: str, progress: Callable[[int, int], None] | None):
    from kdbench.judging.client import JudgeClient, default_cache_path

    client_settings = settings.client_settings(judge_model)
    return JudgeClient(client_settings, cache_path=default_cache_path(judge_model, settings.cache_dir),
                       progress=progress)


def _require_model(judge_model: str | None) -> str:
    if not judge_model:
        raise ConfigError("Pass --judge-model (for example gpt-4o-2024-08-06), or --offline for the offline judge.")
    return judge_model


def _require_key(client, calls=None) -> None:
    """No judge API key and calls still to make (any, when ``calls`` is None): one sentence now, before any run
    directory is written or any answer generated."""
    from kdbench.judging.client import API_KEY_VARIABLES

    if client.has_api_key:
        return
    if calls is None or any(key not in client.cache for key in client.keys(calls)):
        raise KdbenchError(f"No judge API key: set {API_KEY_VARIABLES[0]} or {API_KEY_VARIABLES[1]} in the "
                           "environment (or use --dry-run / the offline judge).")


def usage_line(client) -> str:
    stats = client.stats
    cost = stats.estimated_cost_usd(client.settings.prices())
    line = (f"judge calls: {stats.calls_made} made, {stats.calls_cached} from cache, {stats.calls_failed} failed "
            f"({stats.retries} retries); tokens {stats.prompt_tokens:,} in / {stats.completion_tokens:,} out"
            + (f"; estimated cost ${cost:.2f}" if cost is not None else ""))
    if stats.models_reported:
        line += "\njudge snapshot(s) reported: " + ", ".join(f"{m} ({n})" for m, n in stats.models_reported.items())
    return line


def _fmt(value) -> str:
    return "n/a" if value is None else f"{value:.4f}"


# --- MT-Bench -------------------------------------------------------------------------------------


def judge_mt_bench(config: MTBenchConfig, *, log=None, command=None, progress=None, model=None,
                   tokenizer=None) -> JudgeOutcome:
    """MT-Bench single-answer grading (or pairwise) of the given answers and/or of answers generated with
    ``config.model`` (or an already loaded ``model`` + ``tokenizer``) into the run directory."""
    from kdbench.judging import data as judge_data
    from kdbench.judging import mt_bench as mtb

    say = _say(log)
    judge_model = _require_model(config.judge_model)
    protocol = mtb.protocol_file("mt_bench")
    pair_protocol = mtb.protocol_file("mt_bench_pairwise") if config.mode == "pairwise" else None

    def find(name: str) -> Path:
        return judge_data.mt_bench_file(name, config.data_dir, warn=say, source="mt_bench")

    questions = judge_data.load_questions(find("question.jsonl"))[:config.limit]
    prompts = judge_data.load_judge_prompts(find("judge_prompts.jsonl"))
    reference = config.reference or protocol["default_reference"]
    reference_file = protocol["reference_sets"].get(reference)
    reference_path = find(reference_file) if reference_file else Path(reference).expanduser()
    if not reference_path.is_file():
        raise ConfigError(f"Unknown reference set {reference!r}; use {', '.join(protocol['reference_sets'])} or a "
                          "JSONL path.")
    references = judge_data.load_reference_answers(reference_path)
    all_answers: dict[str, dict[int, list[str]]] = {}
    for path in config.answers:
        all_answers.update(judge_data.load_mt_bench_answers(path))
    client = _client(config, judge_model, progress)
    holder: dict = {}
    run_config = {"mode": config.mode, "reference": reference, "judge": client.settings.record(),
                  "answers": [str(p) for p in config.answers], "n_questions": len(questions),
                  "model": config.model, "answer_protocol": config.answer_protocol if config.model else None,
                  "data_dir": config.data_dir, "limit": config.limit,
                  "inputs": [str(p) for p in config.answers] + ([f"answers generated with {config.model}"]
                                                                 if config.model else [])}
    with failing(holder):
        if config.model or model is not None:
            if not config.dry_run:
                _require_key(client)
            generated = _mt_bench_answers(config, questions, holder, run_config, command, say, model, tokenizer)
            all_answers.update(generated)
        if config.mode == "single":
            items = []
            for name, model_answers in sorted(all_answers.items()):
                items += mtb.single_judge_calls(questions, model_answers, prompts, references, model=name,
                                                protocol=protocol)
        else:
            if len(all_answers) != 2:
                raise ConfigError("Pairwise MT-Bench compares exactly two models; the answers given hold "
                                  f"{len(all_answers)} ({', '.join(sorted(all_answers))}).")
            (name_1, answers_1), (name_2, answers_2) = sorted(all_answers.items())
            items = mtb.pairwise_judge_calls(questions, answers_1, answers_2, prompts, references,
                                             protocol=pair_protocol, questions_protocol=protocol)
        if not items:
            raise DataError("No answer matches an MT-Bench question (check the question ids, --limit and the "
                            "answers files).")
        calls = [call for _, call in items]
        if config.dry_run:
            return JudgeOutcome("mt_bench", None, message=client.dry_run(calls).describe())
        _require_key(client, calls)
        if "run" not in holder:
            holder["run"] = open_run(config.out, protocol="mt_bench", config=run_config, command=command)
        run = holder["run"]
        replies = client.complete(calls)
        usage = client.stats.record(client.settings.prices())
        if config.mode == "single":
            judgments = mtb.single_records(items, replies, judge_model, protocol["rating_patterns"])
            summary = mtb.summarize(judgments, questions)
            metrics = mtb.metric_records(run, summary, judge=judge_model, protocol="mt_bench")
            lines = [f"{name}: turn 1 {_fmt(row['turn_1'])}  turn 2 {_fmt(row['turn_2'])}  overall "
                     f"{_fmt(row['overall'])}  (n={row['n_valid']}, failed judgments {row['n_failed']})"
                     for name, row in summary.items()]
            label = "+".join(summary) or "mt_bench"
        else:
            judgments = mtb.pairwise_records(items, replies, model_1=name_1, model_2=name_2, judge_model=judge_model,
                                             verdicts=pair_protocol["verdicts"])
            summary = {name_1: mtb.summarize_pairwise(judgments, name_1)}
            metrics = mtb.pairwise_metric_records(run, summary[name_1], model=name_1, opponent=name_2,
                                                  judge=judge_model, protocol="mt_bench_pairwise")
            row = summary[name_1]["all"]
            lines = [f"{name_1} vs {name_2}: W {row['wins']} T {row['ties']} L {row['losses']} "
                     f"(failed {row['failed']}, n={row['n']})"]
            label = name_1
        finish_run(run, judgments=judgments, metrics=metrics, usage=usage, label=label, protocol=
                   "mt_bench" if config.mode == "single" else "mt_bench_pairwise", judge=judge_model,
                   judge_label=f"LLM judge {judge_model} (FastChat {'single' if config.mode == 'single' else 'pair'} "
                               "prompts)", judge_models_reported=client.stats.models_reported)
    return JudgeOutcome("mt_bench", run, summary, judgments, metrics, usage, "\n".join(lines), usage_line(client))


def _mt_bench_answers(config: MTBenchConfig, questions, holder: dict, run_config: dict, command, say, model,
                      tokenizer) -> dict[str, dict[int, list[str]]]:
    """Generate (or resume) the answers of ``config.model`` into the run's generations/mt_bench/."""
    import json

    from kdbench.judging.answers import generate_answers, plan_answers, settings_record

    model_name = config.model or getattr(getattr(model, "config", None), "_name_or_path", "model")
    if model is None:
        from kdbench.models import load_model, load_tokenizer

        tokenizer = load_tokenizer(config.model)
        model = load_model(config.model, trainable=False)
    model_id = config.model_id or Path(str(model_name)).name
    plan = plan_answers(model, tokenizer, model_id=model_id, protocol=config.answer_protocol,
                        chat_template=config.chat_template)
    for note in plan.notes:
        say(f"warning: {note}")
    if config.dry_run:
        raise ConfigError("--dry-run counts judge calls, which need the answers; generate them first (run without "
                          "--dry-run, or pass --answers).")
    run_config.update(model_id=model_id, answer_plan=plan.record())
    holder["run"] = run = open_run(config.out, protocol="mt_bench", config=run_config, command=command)
    folder = run.path / "generations" / "mt_bench"
    settings_file = folder / "settings.json"
    current = settings_record(plan, str(model_name))
    path = run.generations_path("mt_bench", plan.seed)
    if settings_file.is_file() and path.is_file() and path.stat().st_size:
        previous = json.loads(settings_file.read_text())
        if previous != current:
            changed = sorted(k for k in set(previous) | set(current) if previous.get(k) != current.get(k))
            raise ConfigError(f"{run.path} already holds MT-Bench answers made with other settings ({', '.join(changed)}); "
                              f"use another --out, or delete {folder} to regenerate.")
    from kdbench.store import atomic_write_json

    atomic_write_json(settings_file, current)
    say(f"MT-Bench answers of {model_id}: {config.answer_protocol} protocol, template {plan.template}")
    records = generate_answers(model, tokenizer, questions, plan, path=path, batch_size=config.batch_size)
    return {model_id: {int(r["question_id"]): r["choices"][0]["turns"] for r in records}}


# --- AlpacaEval -----------------------------------------------------------------------------------


def judge_alpaca_eval(config: AlpacaEvalConfig, *, log=None, command=None, progress=None) -> JudgeOutcome:
    """AlpacaEval 1.0 / 2.0: win rate, standard error, W / L / D, average length and (2.0) the LC win rate."""
    from kdbench import registry
    from kdbench.judging import alpaca_eval as ae
    from kdbench.judging.data import alpaca_eval_template, check_pinned, load_outputs

    say = _say(log)
    protocol = registry.get("judges", f"alpaca_eval_{config.version}").body
    name = protocol["name"]
    judge_model = config.judge_model or protocol["default_judge_model"]
    reference_name = protocol["reference"]
    reference = config.reference
    if reference is None:
        if not os.environ.get("KDBENCH_DATA"):
            raise DataError(f"Pass --reference (the {reference_name} outputs, alpaca_eval results/{reference_name}/"
                            "model_outputs.json) or set KDBENCH_DATA.")
        reference = str(Path(os.environ["KDBENCH_DATA"]) / "alpaca_eval" / "results" / reference_name /
                        "model_outputs.json")
    reference_rows = load_outputs(reference)
    if Path(reference).is_file() and reference_rows[0].get("generator") == reference_name:
        check_pinned(Path(reference), protocol.get("reference_blob"), f"{reference_name} outputs", say)
    if reference_rows and reference_rows[0].get("generator"):
        reference_name = reference_rows[0]["generator"]
    model_rows = load_outputs(config.outputs, suite=config.suite, seed=config.seed)
    for path in (config.instruction_difficulty, config.glm_weights):
        if path is not None and not Path(path).is_file():
            raise DataError(f"{path} does not exist; pass alpaca_eval's CSV file.")
    template = alpaca_eval_template(protocol["prompt_template"], config.templates_dir,
                                    blob=protocol.get("prompt_template_blob"), warn=say)
    client = _client(config, judge_model, progress)
    reference_rows = reference_rows[:config.limit]
    pairs = ae.match_outputs(model_rows, reference_rows)
    items = ae.build_calls(pairs, protocol, template, seed=protocol["randomize_order"]["seed"])
    calls = [c for _, c in items if c is not None]
    if config.dry_run:
        return JudgeOutcome(name, None, message=client.dry_run(calls).describe())
    _require_key(client, calls)
    label = model_rows[0]["generator"]
    run_config = {"annotator": protocol["annotator"], "judge": client.settings.record(), "outputs": str(config.outputs),
                  "reference": str(reference), "reference_generator": reference_name, "limit": config.limit,
                  "suite": config.suite, "seed": config.seed, "inputs": [str(config.outputs), str(reference)]}
    holder = {"run": open_run(config.out, protocol=name, config=run_config, command=command)}
    with failing(holder):
        run = holder["run"]
        records, metrics = ae.evaluate(client, model_rows, reference_rows, protocol, template)
        lc, lc_note = ae.length_controlled(records, protocol, reference_name=reference_name,
                                           difficulty_path=config.instruction_difficulty,
                                           weights_path=config.glm_weights, model_name=records[0]["generator_2"])
        metrics["length_controlled_winrate"], metrics["length_controlled_note"] = lc, lc_note
        usage = client.stats.record(client.settings.prices())
        metric_records = ae.metric_records(run, metrics, label=label, judge=judge_model, protocol=name,
                                           reference=reference_name)
        finish_run(run, judgments=records, metrics=metric_records, usage=usage, label=label, protocol=name,
                   judge=judge_model, judge_label=f"{protocol['annotator']} via {judge_model} vs {reference_name}",
                   judge_models_reported=client.stats.models_reported, length_controlled_note=lc_note)
    message = (f"AlpacaEval {config.version}.0 ({protocol['annotator']} via {judge_model}, reference {reference_name}): "
               f"win rate {metrics['win_rate']:.2f} ± {metrics['standard_error']:.2f} "
               f"(W {metrics['n_wins']} / L {metrics['n_wins_base']} / D {metrics['n_draws']}, n={metrics['n_total']}, "
               f"failed {metrics['n_failed']}); avg length {metrics['avg_length']}; "
               + (f"LC {lc:.2f}" if lc is not None else lc_note))
    return JudgeOutcome(name, run, metrics, records, metric_records, usage, message, usage_line(client))


# --- pairwise ω -----------------------------------------------------------------------------------


def judge_pairwise(config: PairwiseConfig, *, log=None, command=None, progress=None) -> JudgeOutcome:
    """W / T / L of the student against the teacher and ω = (W − L)/(W + T + L) × 100."""
    from kdbench import registry
    from kdbench.judging import pairwise as pw
    from kdbench.judging.data import load_judge_prompts, load_outputs, mt_bench_file
    from kdbench.judging.offline import OfflineJudge
    from kdbench.store import read_jsonl

    say = _say(log)
    protocol = registry.get("judges", "pairwise").body
    refs = None
    if config.references is not None:
        refs = {}
        for number, row in enumerate(read_jsonl(config.references, strict=True), start=1):
            if not isinstance(row, dict) or "id" not in row or not isinstance(row.get("references"), (str, list)):
                raise DataError(f"{config.references}, line {number}: each row needs an id and references.")
            refs[str(row["id"])] = [row["references"]] if isinstance(row["references"], str) else row["references"]
    student = load_outputs(config.student, suite=config.suite, seed=config.seed)
    teacher = load_outputs(config.teacher, suite=config.suite, seed=config.seed)
    pairs = pw.pair_up(student, teacher, refs)[:config.limit]
    both = protocol["both_orders"] and not config.single_order
    label = config.labels.get("student") or student[0]["generator"]
    opponent = config.labels.get("teacher") or teacher[0]["generator"]
    suite = student[0].get("suite") or teacher[0].get("suite") or "pairwise"
    run_config = {"student": str(config.student), "teacher": str(config.teacher), "both_orders": both,
                  "suite": suite, "seed": config.seed, "limit": config.limit, "opponent": opponent,
                  "inputs": [str(config.student), str(config.teacher)]}
    if config.offline:
        offline_judge = OfflineJudge(mode=config.offline, tie_margin=config.tie_margin)
        if any(not p["references"] for p in pairs):
            raise DataError("The offline judge needs reference answers for every prompt; pass --references or use "
                            "generations that carry them (kdbench eval writes them).")
        if config.dry_run:
            return JudgeOutcome("pairwise", None, message=f"0 judge calls to make: the offline judge scores "
                                                          f"{len(pairs)} prompts locally")
        judge_name, judge_label, client = offline_judge.name(), offline_judge.label, None
        run_config["judge"] = {"offline": config.offline, "tie_margin": offline_judge.tie_margin,
                               "label": offline_judge.label}
        calls: list = []
    else:
        judge_model = _require_model(config.judge_model)
        prompts_file = mt_bench_file("judge_prompts.jsonl", config.data_dir, warn=say, source=protocol["uses"])
        prompt = load_judge_prompts(prompts_file).get(protocol["prompt"])
        if prompt is None:
            raise DataError(f"The judge prompts file has no {protocol['prompt']!r} prompt; pass FastChat's "
                            "judge_prompts.jsonl with --data-dir.")
        client = _client(config, judge_model, progress)
        calls = [c for _, c in pw.judge_calls(pairs, prompt, both_orders=both, judge_params=protocol["judge_params"])]
        if config.dry_run:
            return JudgeOutcome("pairwise", None, message=client.dry_run(calls).describe())
        _require_key(client, calls)
        judge_name, judge_label = judge_model, f"LLM judge {judge_model} ({protocol['prompt']})"
        run_config["judge"] = client.settings.record()
    holder = {"run": open_run(config.out, protocol="pairwise", config=run_config, command=command)}
    with failing(holder):
        run = holder["run"]
        if client is None:
            records = pw.judge_offline(offline_judge, pairs, both_orders=both)
            usage, reported = None, {judge_name: len(records)}
        else:
            records = pw.judge_with_llm(client, pairs, prompt, both_orders=both, protocol=protocol)
            usage, reported = client.stats.record(client.settings.prices()), client.stats.models_reported
        summary = pw.summarize(records)
        metrics = pw.metric_records(run, summary, suite=suite, label=label, opponent=opponent, judge=judge_name)
        finish_run(run, judgments=records, metrics=metrics, usage=usage, label=label, protocol="pairwise",
                   judge=judge_name, judge_label=judge_label, judge_models_reported=reported, both_orders=both,
                   opponent=opponent)
    omega_text = "n/a" if summary["omega"] is None else f"{summary['omega']:+.1f}"
    message = (f"[{judge_label}] {label} vs {opponent}: W {summary['wins']} T {summary['ties']} L {summary['losses']} "
               f"(n={summary['n']}; judge failures {summary['failed']}); omega {omega_text} "
               f"({'both orders' if both else 'single order'})")
    return JudgeOutcome("pairwise", run, summary, records, metrics, usage, message,
                        usage_line(client) if client is not None else "")


# --- one entry point ------------------------------------------------------------------------------

PROTOCOLS: dict[str, tuple[type, Callable]] = {
    "mt_bench": (MTBenchConfig, judge_mt_bench),
    "alpaca_eval": (AlpacaEvalConfig, judge_alpaca_eval),
    "pairwise": (PairwiseConfig, judge_pairwise),
}


def judge(protocol: str, *, log: Callable[[str], None] | None = None, command: list[str] | None = None,
          **settings) -> JudgeOutcome:
    """Run a judged protocol (``"mt_bench"``, ``"alpaca_eval"`` or ``"pairwise"``; dashes allowed) with the
    settings of its config class (:mod:`kdbench.judging.settings`) and write its run directory ``out``."""
    from kdbench.config import build

    key = protocol.replace("-", "_")
    if key not in PROTOCOLS:
        raise ConfigError(f"Unknown judged protocol {protocol!r}; choose one of: {', '.join(PROTOCOLS)}.")
    config_class, run = PROTOCOLS[key]
    return run(build(config_class, settings), log=log, command=command)


__all__ = ["judge", "judge_mt_bench", "judge_alpaca_eval", "judge_pairwise", "PROTOCOLS", "usage_line"]
