"""The ``kdbench`` command line: a thin layer over the Python API.

Each command parses its options, calls one library function and prints the result. Errors a user
can cause (:class:`~kdbench.errors.KdbenchError`) print one sentence and exit with code 2; heavy
libraries are imported inside the commands so that ``kdbench --help`` stays fast.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import List, Optional

import typer
from typer.core import TyperGroup

from kdbench.errors import KdbenchError

# Typer may vendor its own click: take the usage-error classes from Typer's public BadParameter.
UsageError = typer.BadParameter.__mro__[1]
NoArgsIsHelpError = getattr(sys.modules[UsageError.__module__], "NoArgsIsHelpError", ())


class ErrorBoundary(TyperGroup):
    """The root command group: every ``kdbench`` command (and every ``kdbench judge`` subcommand) runs
    inside :meth:`invoke`, so no command can forget the rule of the house.

    * a :class:`~kdbench.errors.KdbenchError` (bad input the user can fix) prints its one sentence and
      exits with code 2; so does a malformed command line (an unknown option, a value of the wrong type);
    * Ctrl-C prints a resume hint and exits with 130;
    * whatever stops a command (those, or an unexpected exception, which keeps its traceback: it is a
      bug to report) first marks every run the command opened and did not finish as ``failed`` (with
      the sentence) or ``interrupted`` (:func:`kdbench.store.fail_open_runs`), never ``running``.
    """

    def make_context(self, info_name, args, parent=None, **extra):
        try:
            return super().make_context(info_name, args, parent=parent, **extra)
        except UsageError as err:
            _usage_error(err)

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except KdbenchError as err:
            _fail_open_runs(str(err))
            _say_error(str(err))
            raise typer.Exit(code=err.exit_code) from None
        except UsageError as err:
            _usage_error(err)
        except KeyboardInterrupt:
            _fail_open_runs("interrupted", status="interrupted")
            _console(stderr=True).print("interrupted: finished work is saved; rerun the same command to resume.")
            raise typer.Exit(code=130) from None
        except (typer.Exit, typer.Abort, SystemExit) as stop:
            code = getattr(stop, "exit_code", getattr(stop, "code", 1))
            if code not in (0, None):
                _fail_open_runs(f"the command exited with code {code}")
            raise
        except BaseException as err:  # a bug: keep its traceback, but leave no run "running"
            _fail_open_runs(f"unexpected {type(err).__name__}: {err}")
            raise


def _usage_error(err) -> None:
    """A malformed command line as one sentence (Typer's boxed usage message spans many lines)."""
    if isinstance(err, NoArgsIsHelpError):
        raise err  # `kdbench judge` alone prints its help, as intended
    where = err.ctx.command_path if err.ctx is not None else "kdbench"
    message = err.format_message().rstrip(".")
    _say_error(f"{message}; see `{where} --help`.")
    raise typer.Exit(code=2) from None


def _fail_open_runs(reason: str, status: str = "failed") -> None:
    store = sys.modules.get("kdbench.store")  # no run can be open unless the store was imported
    if store is not None:
        store.fail_open_runs(reason, status=status)


app = typer.Typer(
    name="kdbench",
    help="Benchmark-first knowledge distillation for LLMs: train any published KD method, evaluate, rank.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    cls=ErrorBoundary,
)
cache_app = typer.Typer(help="The artifact cache: where it is, what it holds, clear it.", no_args_is_help=True)
data_app = typer.Typer(help="Data utilities (contamination check).", no_args_is_help=True)
app.add_typer(cache_app, name="cache")
app.add_typer(data_app, name="data")
student_app = typer.Typer(help="Derive a student from a teacher (layer-pruned, narrower, or from scratch).",
                          no_args_is_help=True)
app.add_typer(student_app, name="student")


def _register_judge() -> None:
    """``kdbench judge ...``: a sub-group of the root group, so its commands run inside :class:`ErrorBoundary`
    like every other command."""
    from kdbench.cli_judge import app as judge_app

    app.add_typer(judge_app, name="judge")
    from kdbench.cli_reproduce import make_reproduce

    app.command("reproduce")(make_reproduce(_say, _quiet_libraries))


def _console(stderr: bool = False):
    from rich.console import Console

    return Console(stderr=stderr, highlight=False, soft_wrap=True)


def _say(message: str) -> None:
    _console(stderr=True).print(message, markup=False)


def _say_error(sentence: str) -> None:
    """The one line a stopped command prints: ``error: <sentence>`` on stderr (red on a terminal)."""
    from rich.markup import escape

    _console(stderr=True).print(f"[bold red]error:[/bold red] {escape(sentence)}")


def _quiet_libraries() -> None:
    """Keep transformers' own progress bars and info logs out of kdbench's output."""
    import os
    import warnings

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    warnings.filterwarnings("ignore", category=UserWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except ImportError:  # pragma: no cover
        pass


def _overrides_to_dict(overrides: list[str] | None) -> dict:
    from kdbench.config import apply_overrides

    return apply_overrides({}, overrides)


# ------------------------------------------------------------------------------------------------
# train
# ------------------------------------------------------------------------------------------------


@app.command()
def train(
    method: str = typer.Argument(..., help="Method recipe (see `kdbench list methods`)."),
    student: Optional[str] = typer.Option(None, "--student", help="Student model directory or Hugging Face id."),
    teacher: Optional[str] = typer.Option(None, "--teacher", help="Teacher model directory or id (KD methods)."),
    data: Optional[str] = typer.Option(None, "--data", help="Training data (JSONL/JSON/Parquet: instruction, input, output)."),
    valid_data: Optional[str] = typer.Option(None, "--valid-data", help="Validation data (default: hold out 5%)."),
    output_dir: Optional[str] = typer.Option(None, "--output-dir", help="Folder for run directories (default: runs)."),
    run_name: Optional[str] = typer.Option(None, "--run-name", help="Run directory name; rerunning it resumes."),
    continue_from: Optional[str] = typer.Option(None, "--continue-from", help="Start this new run from a checkpoint of an earlier run (RUN/checkpoints/checkpoint-N), e.g. the last sound one of a diverged run."),
    seed: Optional[int] = typer.Option(None, "--seed", help="Training seed."),
    config: Optional[Path] = typer.Option(None, "--config", help="YAML file of TrainConfig settings."),
    set_: List[str] = typer.Option([], "--set", help="Override a setting: --set learning_rate=1e-4, --set params.kd_ratio=0.3."),
    seeds: Optional[str] = typer.Option(None, "--seeds", help="Several training seeds, e.g. 1,2,3: one run each."),
    sweep: List[str] = typer.Option([], "--sweep", help="Grid over a setting, e.g. --sweep params.kd_ratio=0.1,0.5 (repeatable)."),
):
    """Train a student with one distillation method; writes a run directory with the model and its cost.

    With --seeds and/or --sweep, trains one run per seed and grid point (names carry the values)."""
    from kdbench.config import build, load_yaml
    from kdbench.train import TrainConfig
    from kdbench.train import train as run_train

    values = load_yaml(config)
    flags = {"student": student, "teacher": teacher, "data": data, "valid_data": valid_data, "output_dir": output_dir,
             "run_name": run_name, "seed": seed, "continue_from": continue_from}
    values.update({k: v for k, v in flags.items() if v is not None})
    values["method"] = method
    from kdbench.config import apply_overrides

    values = apply_overrides(values, set_)
    from kdbench.sweep import expand

    seed_list = _int_list(seeds, "--seeds") if seeds else None
    plan = expand(values, method=method, seeds=seed_list, sweeps=sweep,
                  run_name=run_name) if (seed_list or sweep) else [(None, values)]
    configs = [build(TrainConfig, settings) for _, settings in plan]  # validate every run before training any
    _quiet_libraries()
    for train_config in configs:
        result = run_train(train_config, log=_say, command=sys.argv)
        typer.echo(f"run: {result.run.path}")
        typer.echo(f"model: {result.model_dir}")
        typer.echo(f"final training loss: {result.final_train_loss}")


def _int_list(text: str, flag: str) -> list[int]:
    try:
        return [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise KdbenchError(f"{flag} {text!r} must be comma-separated integers, e.g. 1,2,3.") from None


# ------------------------------------------------------------------------------------------------
# eval
# ------------------------------------------------------------------------------------------------


@app.command("eval")
def eval_(
    suite: str = typer.Option(..., "--suite", help="Suite name, several comma-separated, or all (the five reference suites; see `kdbench list suites`)."),
    model: str = typer.Option(..., "--model", help="Model directory or Hugging Face id."),
    data: Optional[str] = typer.Option(None, "--data", help="Suite data: a file or folder (default: $KDBENCH_DATA, then the Hub)."),
    seeds: Optional[str] = typer.Option(None, "--seeds", help="Sampling seeds, comma-separated (default 10,20,30,40,50)."),
    greedy: bool = typer.Option(False, "--greedy", help="Greedy decoding instead of sampling."),
    limit: Optional[int] = typer.Option(None, "--limit", help="Evaluate only the first N examples."),
    buckets: Optional[str] = typer.Option(None, "--buckets", help="Length-bucket edges in words, e.g. 30,70, or auto."),
    output_dir: str = typer.Option("runs", "--output-dir", help="Folder for run directories."),
    run_name: Optional[str] = typer.Option(None, "--run-name", help="Run directory name; rerunning it resumes."),
    label: Optional[str] = typer.Option(None, "--label", help="Name of this model in leaderboards."),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", help="Prompts per generation batch (or harness batch size)."),
    prompt_style: Optional[str] = typer.Option(None, "--prompt-style", help="Prompt template: alpaca, chat (the model's chat template) or compact (default: the suite's)."),
    include_path: List[Path] = typer.Option([], "--include-path", help="lm_eval suites: a folder of local lm-eval task YAML files (repeatable), as lm-eval's own --include_path."),
    set_: List[str] = typer.Option([], "--set", help="Override a setting: --set decoding.no_repeat_ngram_size=6."),
    backend: str = typer.Option("transformers", "--backend", help="Inference backend: transformers, or vllm (GPU; pip install 'kdbench[vllm]')."),
):
    """Evaluate a model on a suite (reference-based: Rouge-L/EM; lm_eval: Open LLM Leaderboard tasks, or a suite
    file of your own: --suite my_suite.yaml --include-path my_tasks/)."""
    from kdbench import registry
    from kdbench.harness_suite import is_suite_file, read_suite_file

    if batch_size is not None and batch_size < 1:
        raise KdbenchError(f"--batch-size must be at least 1, not {batch_size}.")
    if limit is not None and limit < 1:
        raise KdbenchError(f"--limit must be a positive number of examples, not {limit}.")
    seed_list = _int_list(seeds, "--seeds") if seeds else None
    several = suite == "all" or "," in suite
    _quiet_libraries()
    if not several:
        body = read_suite_file(suite) if is_suite_file(suite) else registry.get("tasks", suite).body
        if body.get("type") == "lm_eval":
            _eval_harness(suite, model, limit, batch_size or 8, output_dir, run_name, label, include_path, backend)
            return
        if is_suite_file(suite):
            raise KdbenchError(f"{suite} is a reference-based suite file; put it in a tasks/ folder of a registry "
                               "folder (KDBENCH_REGISTRY_PATH) and pass its name, as for any suite.")
    if include_path:
        raise KdbenchError("--include-path adds lm-eval task folders; it only applies to lm_eval suites.")
    from kdbench.config import apply_overrides, build
    from kdbench.evaluate import EvalConfig, evaluate, evaluate_many
    from kdbench.report import leaderboard_markdown

    values: dict = {"suite": suite, "model": model, "data_path": data, "greedy": greedy, "limit": limit,
                    "buckets": buckets, "output_dir": output_dir, "run_name": run_name, "label": label,
                    "prompt_style": prompt_style, "backend": backend}
    if seed_list:
        values["seeds"] = seed_list
    if batch_size is not None:
        values["decoding"] = {"batch_size": batch_size}
    values = apply_overrides({k: v for k, v in values.items() if v is not None}, set_)
    config = build(EvalConfig, values)
    if several:
        result = evaluate_many(suite, config, log=_say, command=sys.argv)
    else:
        result = evaluate(config, log=_say, command=sys.argv)
    from kdbench.parallel.ranks import current_ranks

    if not current_ranks().is_main:  # under N processes rank 0 scores and prints
        return
    typer.echo(leaderboard_markdown([result.run], title=f"kdbench eval --suite {suite}", baseline_label=None,
                                    reference_label=None))
    typer.echo(f"run: {result.run.path}")


def _eval_harness(suite: str, model: str, limit, batch_size: int, output_dir: str, run_name, label,
                  include_path: list[Path], backend: str = "transformers") -> None:
    from kdbench.harness import evaluate_harness

    run, result = evaluate_harness(model, suite, output_dir=output_dir, run_name=run_name, label=label, limit=limit,
                                   batch_size=batch_size, include_path=[str(p) for p in include_path] or None,
                                   log=_say, command=sys.argv, backend=backend)
    for record in result.to_metric_records(run, result.suite.name):
        typer.echo(f"{record['subset']:<28} {record['metric']:<24} {record['value']:.4f}")
    typer.echo(f"{result.label}; run: {run.path}")


# ------------------------------------------------------------------------------------------------
# demo, check, report
# ------------------------------------------------------------------------------------------------


@app.command()
def demo(
    preset: str = typer.Option("smoke", "--preset", help="smoke (minutes), standard (larger, several seeds), full; smollm2-quick / smollm2: "
                                                  "the real SmolLM2-135M-Instruct teacher (docs/smollm2_example.md)."),
    out: Optional[Path] = typer.Option(None, "--out", help="Output folder (default: runs/demo-PRESET)."),
    cache_dir: Optional[Path] = typer.Option(None, "--cache-dir", help="Artifact cache (default: $KDBENCH_CACHE or ~/.cache/kdbench)."),
    set_: List[str] = typer.Option([], "--set", help="Override a preset setting: --set student_steps=200."),
):
    """Run the embedded benchmark end to end on CPU (no downloads) and print its leaderboard."""
    from kdbench.demo import preset_with, run_demo

    chosen = preset_with(preset, _overrides_to_dict(set_))
    _quiet_libraries()
    result = run_demo(chosen, out_dir=out, cache_dir=cache_dir, log=_say)
    typer.echo(result.leaderboard_md)
    typer.echo(f"leaderboard: {result.out_dir / 'leaderboard.md'}  (total {result.timings['total_seconds']:.0f}s, "
               f"teacher {'cached' if result.teacher_reused else 'trained'})")
    if result.report_html is not None:
        typer.echo(f"report: {result.report_html}")


@app.command()
def check(
    baseline: Path = typer.Option(Path("results/baseline"), "--baseline", help="Baseline folder (holds baseline.json)."),
    runs: List[Path] = typer.Option([], "--runs", help="Run directory or a folder of runs (repeatable)."),
    write: bool = typer.Option(False, "--write", help="Write a new baseline instead: each --runs folder is one seed."),
    note: str = typer.Option("", "--note", help="With --write: how the runs were produced."),
    controls: Optional[Path] = typer.Option(None, "--controls", help="Instead: gate on the controls of a `kdbench demo` "
                                            "folder (--preset control-gate; kdbench.synthetic.control_gate)."),
):
    """Regression gate: compare runs with the committed baseline; exit 1 if a metric regressed."""
    from kdbench.check import build_baseline, comparison_table, write_baseline
    from kdbench.check import check as run_check
    from kdbench.errors import ConfigError
    from kdbench.store import find_run_dirs

    if controls is not None:
        from kdbench.synthetic.control_gate import control_gate_report

        passed, text = control_gate_report(controls)
        typer.echo(text)
        raise typer.Exit(code=0 if passed else 1)
    if not runs:
        raise ConfigError("Give --runs (runs to check against --baseline) or --controls (a demo folder).")
    if write:
        baseline_data = build_baseline([find_run_dirs([r]) for r in runs], note=note)
        path = write_baseline(baseline, baseline_data)
        typer.echo(f"wrote {path} ({len(baseline_data['metrics'])} metrics from {len(runs)} seeds)")
        return
    passed, comparisons = run_check(baseline, runs)
    typer.echo(comparison_table(comparisons))
    bad = [c for c in comparisons if c.status in ("regressed", "missing")]
    if bad:
        typer.echo(f"FAILED: {len(bad)} metric(s) regressed or missing: " + ", ".join(c.name for c in bad))
        raise typer.Exit(code=1)
    typer.echo(f"passed: {len(comparisons)} metrics within tolerance of {baseline}")


@app.command()
def report(
    run_dirs: List[Path] = typer.Argument(..., help="Run directories (train, eval and judge runs) or folders holding them."),
    out: Optional[Path] = typer.Option(None, "--out", help="Write leaderboard.md, report.html, metrics.csv and plots/*.png here."),
    format_: str = typer.Option("md,html,csv", "--format", help="Comma-separated formats to write: md, html, csv."),
    compare_papers: bool = typer.Option(False, "--compare-papers", help="Add published numbers of the same methods beside (never inside) the rankings."),
    baseline_label: str = typer.Option("sft", "--baseline-label", help="Row the paired tests compare against."),
    suite: Optional[str] = typer.Option(None, "--suite", help="Only this suite (default: every suite found)."),
):
    """Leaderboards with CIs and Holm-corrected paired tests, breakdowns, cost and plots; Markdown, HTML, CSV."""
    from kdbench.report import build_report
    from kdbench.store import find_run_dirs

    if out is not None and out.exists() and not out.is_dir():
        raise KdbenchError(f"--out {out} is a file; give a folder for leaderboard.md, report.html and metrics.csv.")
    unfinished = [(run, run.info().get("status", "unknown")) for run in find_run_dirs(run_dirs) if not run.complete]
    if unfinished:
        shown = ", ".join(f"{run.path} ({status})" for run, status in unfinished[:3])
        _say(f"warning: {len(unfinished)} run(s) did not finish and may lack metrics: {shown}"
             f"{' ...' if len(unfinished) > 3 else ''}; rerun their commands to complete them.")
    result = build_report(run_dirs, out=out, formats=format_.split(","), compare_papers=compare_papers,
                          baseline_label=baseline_label, suite=suite)
    typer.echo(result.markdown)
    for kind, path in result.paths.items():
        if not kind.startswith("plot:"):
            typer.echo(f"wrote {path}")


# ------------------------------------------------------------------------------------------------
# list, cache, data
# ------------------------------------------------------------------------------------------------

_KIND_NAMES = {"methods": "trainers", "suites": "tasks", "judges": "judges", "reproductions": "reproductions"}


@app.command("list")
def list_(what: Optional[str] = typer.Argument(None, help="methods, suites or judges (default: all three).")):
    """List the registered methods, suites and judges, one line each."""
    from kdbench import registry

    kinds = [what] if what else list(_KIND_NAMES)
    for name in kinds:
        if name not in _KIND_NAMES:
            raise KdbenchError(f"Unknown list {name!r}; choose methods, suites or judges.")
        entries = registry.entries(_KIND_NAMES[name])
        typer.echo(f"{name}:")
        width = max((len(n) for n in entries), default=4)
        for entry_name in sorted(entries):
            entry = entries[entry_name]
            alias = f" (alias of {entry.alias_of})" if entry.alias_of else ""
            typer.echo(f"  {entry_name:<{width}}  {entry.description}{alias}")


@cache_app.command("where")
def cache_where():
    """Print the cache folder."""
    from kdbench.store import ArtifactStore

    typer.echo(str(ArtifactStore().root))


@cache_app.command("list")
def cache_list(cache_dir: Optional[Path] = typer.Option(None, "--cache-dir", help="Cache folder (default: kdbench cache where).")):
    """List the complete artifacts in the cache (kind, key, size, when built)."""
    from kdbench.store import ArtifactStore

    store = ArtifactStore(cache_dir)
    entries = store.entries()
    if not entries:
        typer.echo(f"(empty) {store.root}")
        return
    for artifact in entries:
        size = sum(p.stat().st_size for p in artifact.path.rglob("*") if p.is_file())
        typer.echo(f"{artifact.kind:<20} {artifact.key}  {size / 2**20:8.1f} MiB  {artifact.meta.get('created', '')}")


@cache_app.command("clear")
def cache_clear(
    kind: Optional[str] = typer.Option(None, "--kind", help="Only artifacts of this kind (e.g. demo-teacher)."),
    cache_dir: Optional[Path] = typer.Option(None, "--cache-dir", help="Cache folder."),
    yes: bool = typer.Option(False, "--yes", help="Do not ask for confirmation."),
):
    """Delete cached artifacts (all, or one kind)."""
    from kdbench.store import ArtifactStore

    store = ArtifactStore(cache_dir)
    store.check_kind(kind)
    if not yes and not typer.confirm(f"Delete {'all' if not kind else kind} artifacts under {store.root}?"):
        raise typer.Exit(code=1)
    typer.echo(f"removed {store.clear(kind)} artifact(s) from {store.root}")


@data_app.command("overlap")
def data_overlap(
    train_path: Path = typer.Argument(..., help="Training data (JSONL or plain text)."),
    suite: str = typer.Argument(..., help="Evaluation suite name."),
    data: Optional[str] = typer.Option(None, "--data", help="Suite data path."),
    n: int = typer.Option(13, "--n", help="n-gram size."),
    out: Optional[Path] = typer.Option(None, "--out", help="Write the per-example report as JSON here."),
):
    """Contamination check: n-gram overlap between a training set and an evaluation suite."""
    from kdbench.overlap import overlap_report
    from kdbench.store import atomic_write_json

    report_data = overlap_report(train_path, suite, data_path=data, n=n)
    for key, value in report_data["summary"].items():
        typer.echo(f"{key}: {value}")
    if out:
        atomic_write_json(out, report_data)
        typer.echo(f"wrote {out}")


@student_app.command("derive")
def student_derive(
    teacher: str = typer.Argument(..., help="Teacher: a model directory, a .gguf file or an alias (smollm2-135m-instruct)."),
    out: Path = typer.Argument(..., help="Folder for the student checkpoint."),
    layers: int = typer.Option(..., "--layers", help="Transformer blocks the student keeps."),
    selection: str = typer.Option("even", "--selection", help="Which blocks: even (spread, first and last kept) or first."),
    hidden_size: Optional[int] = typer.Option(None, "--hidden-size", help="Narrower residual width (leading dimensions kept)."),
    intermediate_size: Optional[int] = typer.Option(None, "--intermediate-size", help="Fewer MLP neurons (leading ones kept)."),
    from_scratch: bool = typer.Option(False, "--from-scratch", help="Same shape, random initialisation (no weights copied)."),
    seed: int = typer.Option(0, "--seed", help="Seed of a from-scratch initialisation."),
):
    """A smaller student from a teacher, as daDPO's pruned students: kept weights are copied."""
    from kdbench.models import resolve_model_path
    from kdbench.students import derive_student, read_student_record

    _quiet_libraries()
    path = derive_student(resolve_model_path(teacher), out, layers=layers, selection=selection,
                          hidden_size=hidden_size, intermediate_size=intermediate_size, from_scratch=from_scratch,
                          seed=seed)
    record = read_student_record(path)
    typer.echo(f"student: {path} (kept layers {record.get('kept_layers')}, "
               f"{record['parameters']['student']:,} of the teacher's {record['parameters']['teacher']:,} parameters)")


_register_judge()


def main() -> None:
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
