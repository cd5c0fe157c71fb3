"""Judged benchmarks of ``kdbench reproduce NAME --scale full``: MT-Bench, AlpacaEval and the pairwise ω through
the judging library (:mod:`kdbench.judging.api`, the same functions ``kdbench judge`` calls).

The judge is any OpenAI-compatible endpoint: its key comes from ``KDBENCH_JUDGE_API_KEY`` / ``OPENAI_API_KEY`` and
its base URL from ``KDBENCH_JUDGE_BASE_URL`` / ``OPENAI_BASE_URL`` (default: OpenAI); the key is never written
anywhere. The judge model is the table's (the paper's) ``judge_model``. An AlpacaEval benchmark with a
``reference_row`` (ADPA's win rate against its own ADPA student) is judged once every row is trained, against
that row's answers at the same training seed (the row itself scores 50: identical outputs are ties, no call). Each model's judge run is a run
directory under ``<pair>/judge/``; answers are generated once and appended as they finish, and every judge
request is cached (:class:`kdbench.judging.client.JudgeClient`), so a rerun resumes without redoing work.

Per-example scores handed to the comparison: MT-Bench, each valid 1-10 turn rating (FastChat's overall score is
their mean); AlpacaEval, (preference - 1) x 100 per instruction (the win rate is their mean); the pairwise
ω (the student against the prepared teacher on a benchmark's held-out ``prompts``, both orders), the student's
outcome per prompt; a pairwise benchmark without ``prompts`` is not run at full scale.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

from kdbench.errors import ConfigError
from kdbench.reproduce.layout import slug
from kdbench.reproduce.table import Table

RUN_AT_FULL_SCALE = ("mt_bench", "alpaca_eval_1", "alpaca_eval_2", "pairwise")


def judged_at_full_scale(table: Table) -> list:
    """The table's judged benchmarks that a full-scale run evaluates (a pairwise one only with its prompts)."""
    return [b for b in table.benchmarks if b.kind == "judge" and b.suite in RUN_AT_FULL_SCALE
            and (b.suite != "pairwise" or b.prompts)]


def judge_requirement(table: Table) -> str:
    """One line for the plan: what the judged benchmarks need (empty when the table has none)."""
    from kdbench.judging.client import API_KEY_VARIABLES, BASE_URL_VARIABLES

    judged = judged_at_full_scale(table)
    if not judged:
        return ""
    return (f"judge required: {', '.join(sorted({b.judge_model or '?' for b in judged}))} on an OpenAI-compatible "
            f"endpoint (key from {API_KEY_VARIABLES[0]} or {API_KEY_VARIABLES[1]}, base URL from "
            f"{BASE_URL_VARIABLES[0]} / {BASE_URL_VARIABLES[1]}, default OpenAI)")


def full_scale_note(table: Table) -> str:
    """The comparison's note on how a full run's judged benchmarks were scored (empty without any)."""
    from kdbench.judging.client import redact_url, resolve_base_url

    judged = [b for b in table.benchmarks if b.kind == "judge"]
    if not judged:
        return ""
    ran = judged_at_full_scale(table)
    note = ""
    if ran:
        note = ("Judged benchmarks: " + ", ".join(f"{b.benchmark} by {b.judge_model}" for b in ran)
                + f" on {redact_url(resolve_base_url()) if resolve_base_url() else 'the OpenAI API'} (judgments and "
                  "answers in each pair's judge/ folder).")
    skipped = [b.benchmark for b in judged if b not in ran]
    if skipped:
        note += (" " if note else "") + (f"Not run at full scale: {', '.join(skipped)} (a pairwise win rate needs its "
                                         "held-out in-domain prompts, which the table does not name).")
    return note


def check_judge_configuration(table: Table) -> None:
    """Before any work: a full run with a judged benchmark needs the judge's API key in the environment."""
    from kdbench.judging.client import API_KEY_VARIABLES, redact_url, resolve_api_key, resolve_base_url

    judged = judged_at_full_scale(table)
    if judged and not resolve_api_key():
        where = redact_url(resolve_base_url()) or "OpenAI"
        raise ConfigError(f"Reproduction {table.name} is judged by {judged[0].judge_model} ({judged[0].benchmark}) "
                          f"and no judge API key is set: set {API_KEY_VARIABLES[0]} (and KDBENCH_JUDGE_BASE_URL for "
                          f"an endpoint other than {where}) before a full run, or use --scale mini.")


def _mt_bench(bench, model_dir: str, label: str, target: Path, limit: int | None, say, command) -> list:
    from kdbench.judging.api import judge_mt_bench
    from kdbench.judging.settings import MTBenchConfig

    config = MTBenchConfig(model=model_dir, model_id=slug(label), judge_model=bench.judge_model, out=str(target),
                           limit=limit, data_dir=_data_dir("mt_bench"))
    outcome = judge_mt_bench(config, log=say, command=command)
    say(outcome.message)
    return [None if float(r["score"]) == -1 else float(r["score"]) for r in outcome.judgments]  # -1: no rating


def _alpaca_prompts(bench) -> tuple[Path, list[dict]]:
    """The protocol's reference outputs file and its instructions."""
    from kdbench import registry
    from kdbench.judging.data import load_outputs

    protocol = registry.get("judges", bench.suite).body
    if not os.environ.get("KDBENCH_DATA"):
        raise ConfigError(f"{bench.benchmark} asks AlpacaEval's instructions from the {protocol['reference']} outputs: "
                          "set KDBENCH_DATA to the folder holding alpaca_eval/results/<reference>/model_outputs.json.")
    reference = Path(os.environ["KDBENCH_DATA"]) / "alpaca_eval" / "results" / protocol["reference"] / "model_outputs.json"
    return reference, [{"instruction": r["instruction"]} for r in load_outputs(reference)]


def alpaca_outputs(target: Path) -> Path:
    """Where the answers of the model judged into run ``target`` go."""
    return target.parent / f"{target.name}-outputs" / "outputs.jsonl"


def _alpaca_eval(bench, model_dir: str | None, label: str, target: Path, limit: int | None, decoding, say, command,
                 reference: Path | None = None) -> list:
    """Answers to AlpacaEval's instructions (the tokenizer's chat template, the table's decoding), appended to
    ``<target>-outputs/outputs.jsonl`` as they finish, then AlpacaEval against ``reference`` (default: the
    protocol's reference outputs). ``model_dir`` None: the answers are already there."""
    from kdbench.judging.api import judge_alpaca_eval
    from kdbench.judging.settings import AlpacaEvalConfig

    default_reference, prompts = _alpaca_prompts(bench)
    outputs = alpaca_outputs(target)
    if model_dir is not None:
        _generate(model_dir, prompts[:limit], outputs, label, decoding, say)
    config = AlpacaEvalConfig(outputs=str(outputs), version=bench.suite.rsplit("_", 1)[1],
                              reference=str(reference or default_reference),
                              templates_dir=_data_dir("alpaca_eval/evaluators_configs"), judge_model=bench.judge_model,
                              out=str(target), limit=limit)
    outcome = judge_alpaca_eval(config, log=say, command=command)
    say(outcome.message)
    return [None if r.get("preference") is None else (float(r["preference"]) - 1.0) * 100.0 for r in outcome.judgments]


def _generate(model_dir: str, prompts: list[dict], path: Path, label: str, decoding, say) -> None:
    """Append {id, instruction, input, output, generator} for every prompt ({instruction, input}) not yet in
    ``path`` (resumable: a rerun generates only the missing ones)."""
    from kdbench.data import format_prompt
    from kdbench.generate import HFBackend
    from kdbench.models import load_model, load_tokenizer
    from kdbench.store import append_jsonl, read_jsonl

    done = {r["id"] for r in read_jsonl(path)} if path.is_file() else set()
    todo = {str(i): p for i, p in enumerate(prompts) if str(i) not in done}
    if not todo:
        return
    say(f"{label}: answers to {len(todo)} prompts ({path.parent.name})")
    tokenizer = load_tokenizer(model_dir)
    backend = HFBackend(load_model(model_dir, trainable=False), tokenizer)
    style = "chat" if getattr(tokenizer, "chat_template", None) else "alpaca"
    path.parent.mkdir(parents=True, exist_ok=True)

    def write(batch) -> None:
        append_jsonl(path, [{"id": g.id, "instruction": todo[g.id]["instruction"], "input": todo[g.id].get("input", ""),
                             "output": g.text, "generator": slug(label)} for g in batch])

    backend.generate([format_prompt(p["instruction"], p.get("input", ""), style=style, tokenizer=tokenizer)
                      for p in todo.values()], list(todo), decoding, seed=0, on_batch=write)


def _in_domain_prompts(table: Table, bench, limit: int | None) -> list[dict]:
    from kdbench.errors import DataError
    from kdbench.reproduce.fetch import fetch_data
    from kdbench.store import read_jsonl

    path = fetch_data(table.datasets[bench.prompts])
    rows = read_jsonl(path, strict=True)[:limit or bench.examples]
    if not rows or any(not isinstance(r, dict) or not r.get("instruction") for r in rows):
        raise DataError(f"{path}: the in-domain prompts of {bench.benchmark} need an instruction in every row.")
    return [{"instruction": r["instruction"], "input": r.get("input") or ""} for r in rows]


def _pairwise(bench, table: Table, model_dir: str, teacher_dir: str, label: str, target: Path, limit, decoding,
              say, command) -> list:
    """The student's answers against the teacher's on the benchmark's held-out prompts, judged in both orders
    (judges/pairwise.yaml); per prompt the student's outcome (win / tie / loss)."""
    from kdbench.judging.api import judge_pairwise
    from kdbench.judging.settings import PairwiseConfig

    prompts = _in_domain_prompts(table, bench, limit)
    teacher = target.parent / "teacher-outputs" / "outputs.jsonl"
    _generate(teacher_dir, prompts, teacher, "teacher", decoding, say)
    student = target.parent / f"{target.name}-outputs" / "outputs.jsonl"
    _generate(model_dir, prompts, student, label, decoding, say)
    config = PairwiseConfig(student=str(student), teacher=str(teacher), judge_model=bench.judge_model,
                            data_dir=_data_dir("mt_bench"), out=str(target), labels={"student": label})
    outcome = judge_pairwise(config, log=say, command=command)
    say(outcome.message)
    return [None if r["outcome"] == "failed" else r["outcome"] for r in outcome.judgments]


def _data_dir(name: str) -> str | None:
    root = os.environ.get("KDBENCH_DATA")
    return str(Path(root) / name) if root and (Path(root) / name).is_dir() else None


def judge_model_dir(table: Table, base: Path, row, seed, model_dir: str, teacher_dir: str, decoding, *,
                    log: Callable[[str], None], command: list[str]) -> dict[str, list]:
    """Every full-scale judged benchmark of ``model_dir`` (row ``row`` at training ``seed``; None for an
    evaluated-only row; ``teacher_dir``: the prepared teacher, the pairwise opponent): {benchmark suite:
    per-example scores (MT-Bench ratings, AlpacaEval (preference - 1) x 100, pairwise outcomes)}."""
    name = slug(row.label) if seed is None else f"{slug(row.label)}-seed{seed}"
    limit = table.eval.get("limit")
    scores: dict[str, list] = {}
    for bench in judged_at_full_scale(table):
        target = base / "judge" / bench.suite / name
        if bench.suite == "mt_bench":
            scores[bench.suite] = _mt_bench(bench, model_dir, row.label, target, limit, log, command)
        elif bench.suite == "pairwise":
            if row.evaluate == "teacher":  # the teacher against itself: ties by definition (ω = 0, as printed)
                scores[bench.suite] = ["tie"] * len(_in_domain_prompts(table, bench, limit))
                continue
            scores[bench.suite] = _pairwise(bench, table, model_dir, teacher_dir, row.label, target, limit, decoding,
                                            log, command)
        elif bench.reference_row:  # answers now; judged against the reference row's once it is trained
            _generate(model_dir, _alpaca_prompts(bench)[1][:limit], alpaca_outputs(target), row.label, decoding, log)
        else:
            scores[bench.suite] = _alpaca_eval(bench, model_dir, row.label, target, limit, decoding, log, command)
    return scores


def judge_against_reference_rows(table: Table, base: Path, evaluated: list[tuple], *, log: Callable[[str], None],
                                 command: list[str]) -> dict:
    """AlpacaEval benchmarks whose reference is one of the table's rows (``reference_row``), after every row is
    trained: each evaluated (row, training seed) against the reference row's answers at the same seed (an
    evaluated-only row: at the first training seed). {row label: {suite: {seed: per-example scores}}}."""
    scores: dict = {}
    first_seed = (table.eval.get("train_seeds") or [1])[0]
    for bench in judged_at_full_scale(table):
        if not bench.reference_row:
            continue
        reference_row = next(r for r in table.rows if r.label == bench.reference_row)
        for row, seed in evaluated:
            target = base / "judge" / bench.suite / (slug(row.label) if seed is None else f"{slug(row.label)}-seed{seed}")
            ref_seed = None if reference_row.method is None else (first_seed if seed is None else seed)
            ref_name = slug(reference_row.label) if ref_seed is None else f"{slug(reference_row.label)}-seed{ref_seed}"
            reference = alpaca_outputs(base / "judge" / bench.suite / ref_name)
            if not reference.is_file():
                log(f"{bench.benchmark}: no answers of reference row {reference_row.label} (not trained): not judged")
                continue
            scores.setdefault(row.label, {}).setdefault(bench.suite, {})[str(seed)] = _alpaca_eval(
                bench, None, row.label, target, table.eval.get("limit"), None, log, command, reference=reference)
    return scores


__all__ = ["RUN_AT_FULL_SCALE", "judged_at_full_scale", "judge_requirement", "full_scale_note", "check_judge_configuration",
           "judge_model_dir", "judge_against_reference_rows"]
