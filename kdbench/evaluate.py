"""``evaluate()``: generate on a reference-based suite and score it into a run directory;
``evaluate_many()``: several suites (``"all"``: the five of PROTOCOLS.md §1) into one run directory.

Per PROTOCOLS.md §1: the Alpaca prompt (or the suite's / model's template), sampling at
temperature 1 with seeds 10..50 by default (or greedy), Rouge-L and exact match per example, then
per seed, mean ± sample std over seeds, per length bucket and per category with counts, and a 95%
bootstrap CI over examples (of the per-example mean over seeds).

Generations are appended per seed (``generations/<suite>/seed<k>.jsonl``) batch by batch with fsync;
a rerun skips every example already generated, and sampling is seeded per (seed, example), so a
resumed evaluation equals an uninterrupted one. ``generations/<suite>/settings.json`` records what
decided the generations (model, data sha256, prompt template, decoding); a rerun with other settings
is refused rather than mixing two kinds of answers in one run. See docs/evaluation.md.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from kdbench.config import option, to_dict
from kdbench.errors import ConfigError
from kdbench.generate import DecodingConfig
from kdbench.store import RunDir, append_jsonl, atomic_write_json, read_jsonl

DEFAULT_SEEDS = [10, 20, 30, 40, 50]


@dataclass
class EvalConfig:
    suite: str = option("synthetic", "Suite name (kdbench list suites).")
    model: str = option("", "Model directory or Hugging Face id to evaluate.")
    data_path: str | None = option(None, "Suite data: a file or a folder (default: $KDBENCH_DATA, then the Hub).")
    seeds: list[int] = option(factory=lambda: list(DEFAULT_SEEDS), help="Sampling seeds (ignored with greedy).")
    greedy: bool = option(False, "Greedy decoding (one deterministic pass) instead of sampling.")
    limit: int | None = option(None, "Evaluate only the first N examples.")
    prompt_style: str | None = option(None, "Prompt template: alpaca, compact or chat (default: the suite's).")
    buckets: str | None = option(None, "Length-bucket edges, e.g. '30,70', or 'auto' (default: the suite's).")
    decoding: DecodingConfig = option(factory=DecodingConfig, help="Decoding settings.")
    output_dir: str = option("runs", "Folder in which the run directory is created.")
    run_name: str | None = option(None, "Run directory name (default: eval-SUITE-MODELNAME). Rerunning resumes.")
    label: str | None = option(None, "Name shown for this model in leaderboards (default: the model folder's name).")
    n_bootstrap: int = option(1000, "Bootstrap resamples for confidence intervals.")
    backend: str = option("transformers", "Inference backend: transformers, or vllm (GPU; pip install 'kdbench[vllm]').")

    def __post_init__(self):
        if self.limit is not None and self.limit < 1:
            raise ConfigError("Setting limit must be a positive number of examples.")
        if not self.greedy and not self.seeds:
            raise ConfigError("Give at least one sampling seed, or use greedy decoding.")
        if self.n_bootstrap < 100:
            raise ConfigError("Setting n_bootstrap must be at least 100.")
        _parse_buckets(self.buckets, None)  # a malformed --buckets fails here, before any model is loaded
        from kdbench.inference import check_backend

        check_backend(self.backend)  # a missing vLLM fails here too


@dataclass
class EvalResult:
    run: RunDir
    records: list[dict]
    per_example: dict[str, dict[str, list[float]]] = field(default_factory=dict)  # metric -> seed -> scores

    def value(self, metric: str, subset: str = "all", seed: str = "mean") -> float:
        for record in self.records:
            if record["metric"] == metric and record["subset"] == subset and str(record["seed"]) == str(seed):
                return record["value"]
        raise KeyError((metric, subset, seed))


def _parse_buckets(text: str | None, default) -> tuple | str:
    if text is None:
        return default
    if text == "auto":
        return "auto"
    try:
        edges = tuple(float(x) for x in text.split(","))
    except ValueError:
        raise ConfigError(f"--buckets {text!r} must be comma-separated numbers (e.g. 30,70) or 'auto'.") from None
    if any(e <= 0 for e in edges) or list(edges) != sorted(set(edges)):
        raise ConfigError(f"--buckets {text!r} must be increasing positive word counts, e.g. 30,70.")
    return edges


# The five reference suites of PROTOCOLS.md §1, in the order the papers' tables list them.
ALL_SUITES = ("dolly", "selfinst", "vicuna", "sinst", "uinst")

# Settings that change what is generated; a resumed run must use the same ones (batch_size does not).
_GENERATION_KEYS = ("greedy", "temperature", "top_p", "top_k", "max_new_tokens", "max_prompt_length",
                    "no_repeat_ngram_size")


@dataclass
class MultiEvalResult:
    """Several suites evaluated into one run directory."""

    run: RunDir
    results: dict[str, EvalResult]  # suite -> its records and per-example scores

    @property
    def records(self) -> list[dict]:
        return [record for result in self.results.values() for record in result.records]

    def value(self, suite: str, metric: str, subset: str = "all", seed: str = "mean") -> float:
        return self.results[suite].value(metric, subset, seed)


def resolve_suites(suites: str | list[str] | tuple[str, ...]) -> list[str]:
    """Suite names from ``"all"`` (the five reference suites), ``"dolly,vicuna"`` or a list; each must be a
    registered reference-based suite (ConfigError naming the bad one otherwise)."""
    from kdbench.suites import suite_spec

    names = [suites] if isinstance(suites, str) else list(suites)
    expanded: list[str] = []
    for name in names:
        for part in str(name).split(","):
            part = part.strip()
            if not part:
                continue
            expanded.extend(ALL_SUITES if part == "all" else [part])
    if not expanded:
        raise ConfigError("Give at least one suite (e.g. --suite dolly, --suite dolly,vicuna or --suite all).")
    resolved = []
    for name in dict.fromkeys(expanded):
        resolved.append(suite_spec(name).name)  # ConfigError for an unknown or non-reference suite
    return list(dict.fromkeys(resolved))


@dataclass
class _SuitePlan:
    """One suite's examples and prompts, prepared before anything is generated."""

    name: str
    spec: object
    entry: object
    examples: list
    prompts: list[str]
    style: str
    decoding: DecodingConfig
    data_file: str
    data_sha256: str


def evaluate(config: EvalConfig, *, model=None, tokenizer=None, log: Callable[[str], None] | None = None,
             command: list[str] | None = None, progress: bool = True, ranks=None) -> EvalResult:
    """Evaluate ``config.model`` (or an already-loaded ``model`` + ``tokenizer``) on ``config.suite``."""
    many = evaluate_many([config.suite], config, model=model, tokenizer=tokenizer, log=log, command=command,
                         progress=progress, ranks=ranks)
    return next(iter(many.results.values()))


def evaluate_many(suites: str | list[str], config: EvalConfig, *, model=None, tokenizer=None,
                  log: Callable[[str], None] | None = None, command: list[str] | None = None,
                  progress: bool = True, ranks=None) -> MultiEvalResult:
    """Evaluate one model on several reference suites (``"all"``: the five of PROTOCOLS.md §1) into one
    run directory (``eval-all-LABEL`` by default). ``config.suite`` is ignored; every other setting
    applies to every suite. Every suite's data is loaded and checked, and every prompt built,
    before the model is loaded or anything is generated, so a missing or malformed file fails in
    seconds. Each suite's metrics are written as soon as that suite is scored; rerunning resumes.

    Under ``torchrun`` / ``accelerate launch`` (``ranks``: by default :func:`kdbench.parallel.ranks.current_ranks`)
    every rank must call this: each generates a share of the prompts, rank 0 writes the run and its
    metrics (the other ranks get results without records). Pass ``ranks=Ranks()`` to evaluate in one
    process of a multi-process job."""
    from kdbench import registry
    from kdbench.store import hash_file
    from kdbench.suites import load_suite, resolve_data_file, suite_spec

    say = log or (lambda message: None)
    names = resolve_suites(suites)
    several = len(names) > 1
    if several and config.data_path is not None and Path(config.data_path).expanduser().is_file():
        raise ConfigError(f"--data {config.data_path} is a file, but {len(names)} suites were asked for; give a "
                          f"folder holding every suite's data (e.g. dolly/minillm_processed/valid.jsonl).")
    loaded = []
    for name in names:
        entry = registry.get("tasks", name)
        spec = suite_spec(name)
        data_file = resolve_data_file(spec, config.data_path)
        examples = load_suite(name, config.data_path, limit=config.limit)  # validates every row
        loaded.append((name, entry, spec, examples, data_file))
    from kdbench.parallel.ranks import current_ranks

    ranks = ranks or current_ranks()  # under torchrun / accelerate launch: every rank generates a share of the prompts
    if ranks.distributed and config.backend != "transformers":
        raise ConfigError(f"Run the {config.backend} backend as one process (it spreads a model over GPUs itself); "
                          "torchrun / accelerate launch data parallelism is for backend=transformers.")
    if model is None:
        if not config.model:
            raise ConfigError("Give the model to evaluate (--model DIR or a Hugging Face id).")
        from kdbench.models import load_model, load_tokenizer

        tokenizer = load_tokenizer(config.model)
        if config.backend == "transformers":
            model = load_model(config.model, trainable=False)
            if ranks.distributed:
                model.to(ranks.device())
    elif config.backend != "transformers":
        raise ConfigError(f"The {config.backend} backend loads the model itself: pass config.model, not a loaded model.")
    from kdbench.data import format_prompt

    plans: list[_SuitePlan] = []
    for name, entry, spec, examples, data_file in loaded:
        style = config.prompt_style or spec.prompt
        prompts = [format_prompt(e.instruction, e.input, style=style, tokenizer=tokenizer) for e in examples]
        plans.append(_SuitePlan(name, spec, entry, examples, prompts, style, _suite_decoding(config, entry.body),
                                str(data_file), hash_file(data_file)))

    seeds: list[int | str] = ["greedy"] if config.greedy else list(config.seeds)
    label = config.label or Path(str(config.model or "model")).name
    suite_name = ("all" if tuple(names) == ALL_SUITES else "+".join(names)) if several else names[0]
    run_name = config.run_name or f"eval-{suite_name}-{label}"
    first = plans[0]
    template = prompt_template_info(tokenizer, first.style)
    trained_with = trained_prompt_style(model)
    run_config = {**to_dict(config), "suite": suite_name, "decoding": to_dict(first.decoding),
                  "prompt_style": first.style, "prompt_template": template, "trained_prompt_style": trained_with,
                  "label": label, "suite_file": first.entry.path.name,
                  "decoding_summary": first.decoding.describe() + (" (greedy)" if config.greedy else
                                                                   f", seeds {','.join(map(str, seeds))}")}
    if several:
        run_config["suites"] = {plan.name: _suite_settings(plan, tokenizer) for plan in plans}
    else:
        run_config.update({"data_file": first.data_file, "data_sha256": first.data_sha256,
                           "prompt_example": first.prompts[0]})
    def open_run() -> RunDir:  # rank 0 only; the other ranks get the same directory or the same error
        opened = RunDir.create(config.output_dir, run_name, kind="eval", config=run_config, command=command or sys.argv)
        for plan in plans:
            _check_resumable(opened, plan, config, tokenizer)
        for style in dict.fromkeys(plan.style for plan in plans):
            message = template_warning(trained_with, style)
            if message:
                say(message)
                opened.log(message)
        return opened

    run = ranks.on_main(open_run)

    from kdbench.inference import make_backend
    from kdbench.scoring import score

    backend = make_backend(config.backend, config.model, model=model, tokenizer=tokenizer)
    results: dict[str, EvalResult] = {}
    for plan in plans:
        outputs = _generate_suite(run, plan, seeds, backend, label, say, progress and ranks.is_main, ranks)
        if not ranks.is_main:  # rank 0 scores and writes the metrics
            results[plan.name] = EvalResult(run, [], {})
            continue
        records, per_example = score(run, plan.name, plan.examples, outputs, plan.spec,
                                     _parse_buckets(config.buckets, plan.spec.bucket_edges),
                                     n_bootstrap=config.n_bootstrap)
        run.write_metrics(records, replace_suite=plan.name)  # each suite's numbers land as soon as they exist
        results[plan.name] = EvalResult(run, records, per_example)

    def truncated(plan):
        return sum(r.get("prompt_truncated", False) for r in read_jsonl(run.generations_path(plan.name, seeds[0])))

    if not ranks.is_main:
        return MultiEvalResult(run, results)
    if several:
        run.finish("complete", suite=suite_name, suites=names, label=label,
                   n_examples={plan.name: len(plan.examples) for plan in plans},
                   prompts_truncated={plan.name: truncated(plan) for plan in plans})
    else:
        run.finish("complete", suite=first.name, n_examples=len(first.examples), prompts_truncated=truncated(first),
                   label=label)
    return MultiEvalResult(run, results)


def _generate_suite(run: RunDir, plan: _SuitePlan, seeds: list, backend, label: str, say, progress: bool,
                    ranks=None):
    """Generations (seed -> example id -> text) of one suite: those on disk are kept as they are, the
    rest generated and appended batch by batch (fsync) to ``generations/<suite>/seed<k>.jsonl`` — under
    N processes split across the ranks through per-rank partial files merged once
    (:func:`kdbench.parallel.split_generation.generate_split`)."""
    from kdbench.parallel.ranks import Ranks
    from kdbench.parallel.split_generation import generate_split

    ranks = ranks or Ranks()
    ids = [e.id for e in plan.examples]
    by_id = {e.id: e for e in plan.examples}
    outputs: dict[str, dict[str, str]] = {}
    for seed in seeds:
        path = run.generations_path(plan.name, seed)
        if ranks.is_main:
            _drop_torn_tail(path)
        decoding = plan.decoding if seed != "greedy" else DecodingConfig(**{**to_dict(plan.decoding), "greedy": True})

        def generate(indices, write, seed=seed, decoding=decoding):
            def on_batch(batch):
                # each generation carries its question and references, so judging reads the run alone
                write([{"id": g.id, "seed": seed, "output": g.text, "new_tokens": g.new_tokens,
                        "prompt_tokens": g.prompt_tokens, "prompt_truncated": g.prompt_truncated,
                        "finished": g.finished, **judging_fields(by_id[g.id])} for g in batch])

            if not indices:
                return
            with _progress(progress, f"{label} {plan.name} seed {seed}", len(indices)) as advance:
                backend.generate([plan.prompts[i] for i in indices], [ids[i] for i in indices], decoding,
                                 seed=None if seed == "greedy" else int(seed), on_batch=on_batch, progress=advance)

        def resuming(n_done, total, seed=seed):
            say(f"{plan.name} seed {seed}: resuming, {n_done} of {total} generations already on disk")

        done = generate_split(ranks, path, ids, generate, on_resume=resuming)
        outputs[str(seed)] = {example_id: done[example_id]["output"] for example_id in ids}
    return outputs


def judging_fields(example) -> dict:
    """What a judge needs besides the output: the instruction and input as the user wrote them, the
    question shown to a judge (instruction, then the input after a blank line when there is one), the
    references and the category."""
    question = example.instruction + (f"\n\n{example.input}" if example.input else "")
    return {"instruction": example.instruction, "input": example.input, "question": question,
            "references": list(example.references), "category": example.category}


def _drop_torn_tail(path: Path) -> None:
    """Cut a last line without its newline (a write killed midway) so the next append starts on a
    line of its own; otherwise the torn text would swallow the first appended record."""
    if not path.is_file():
        return
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        with open(path, "r+b") as handle:
            handle.truncate(data.rfind(b"\n") + 1)
            handle.flush()
            import os

            os.fsync(handle.fileno())


def _generation_settings(plan: _SuitePlan, config: EvalConfig, tokenizer) -> dict:
    """What decides a suite's generations (compared on resume): model, data, prompt, decoding."""
    decoding = to_dict(plan.decoding)
    settings = {"model": str(config.model), "data_sha256": plan.data_sha256,
                "prompt_template": prompt_template_info(tokenizer, plan.style),
                "decoding": {key: decoding[key] for key in _GENERATION_KEYS}}
    if config.backend != "transformers":  # another backend draws other samples (runs before it had none)
        settings["backend"] = config.backend
    return settings


def _check_resumable(run: RunDir, plan: _SuitePlan, config: EvalConfig, tokenizer) -> None:
    """Refuse to mix generations made with different settings in one run directory; record the
    settings the first time (``generations/<suite>/settings.json``)."""
    folder = run.path / "generations" / plan.name
    settings_file = folder / "settings.json"
    current = _generation_settings(plan, config, tokenizer)
    has_generations = folder.is_dir() and any(p.stat().st_size > 0 for p in folder.glob("seed*.jsonl"))
    if settings_file.is_file() and has_generations:
        import json

        try:
            previous = json.loads(settings_file.read_text())
        except (OSError, json.JSONDecodeError):
            previous = None
        if previous is not None and previous != current:
            changed = _first_difference(previous, current)
            raise ConfigError(f"{run.path} already holds {plan.name} generations made with different settings "
                              f"({changed}); use another --run-name, or delete {folder} to regenerate.")
    atomic_write_json(settings_file, current)


def _first_difference(old: dict, new: dict, prefix: str = "") -> str:
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            if a != b:
                return _first_difference(a, b, f"{prefix}{key}.")
        elif a != b:
            return f"{prefix}{key}: {a!r} before, {b!r} now"
    return "settings differ"


def _suite_settings(plan: _SuitePlan, tokenizer) -> dict:
    return {"prompt_style": plan.style, "prompt_template": prompt_template_info(tokenizer, plan.style),
            "decoding": to_dict(plan.decoding), "suite_file": plan.entry.path.name, "data_file": plan.data_file,
            "data_sha256": plan.data_sha256, "n_examples": len(plan.examples), "prompt_example": plan.prompts[0]}


def prompt_template_info(tokenizer, style: str) -> dict:
    """Which template made the prompts: the style, and for ``chat`` the tokenizer it came from and
    the sha256 of its chat template text (two models' "chat" templates are rarely the same)."""
    info: dict = {"style": style}
    if style == "chat":
        import hashlib

        template = getattr(tokenizer, "chat_template", None)
        if isinstance(template, dict):  # several named templates: the default one is used
            template = template.get("default")
        info["tokenizer"] = str(getattr(tokenizer, "name_or_path", "") or "")
        info["chat_template_sha256"] = hashlib.sha256(str(template or "").encode()).hexdigest()
    return info


def trained_prompt_style(model) -> str | None:
    """The prompt style kdbench training recorded in the model's config (None for other models)."""
    value = getattr(getattr(model, "config", None), "kdbench_prompt_style", None)
    return str(value) if value else None


def template_warning(trained_with: str | None, style: str) -> str | None:
    """The warning for evaluating with another prompt template than the model was trained with."""
    if trained_with and trained_with != style:
        return (f"warning: the model was trained with the {trained_with!r} prompt template but is evaluated with "
                f"{style!r}; scores will be lower than with the template it learned (set prompt_style={trained_with}).")
    return None


def _suite_decoding(config: EvalConfig, body: dict) -> DecodingConfig:
    """The suite's decoding defaults (e.g. shorter limits for the embedded benchmark) under the user's."""
    defaults = to_dict(DecodingConfig())
    chosen = to_dict(config.decoding)
    merged = dict(chosen)
    for key, value in (body.get("decoding") or {}).items():
        if chosen.get(key) == defaults.get(key):  # the user left it at the default
            merged[key] = value
    merged["greedy"] = config.greedy or chosen["greedy"]
    return DecodingConfig(**merged)


class _progress:
    """A rich progress bar (or nothing) yielding an ``advance(n)`` callback."""

    def __init__(self, enabled: bool, description: str, total: int):
        self.enabled, self.description, self.total = enabled, description, total
        self.bar = None

    def __enter__(self):
        if not self.enabled:
            return lambda n: None
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self.bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                            transient=True)
        self.bar.start()
        task = self.bar.add_task(self.description, total=self.total)
        return lambda n: self.bar.update(task, advance=n)

    def __exit__(self, *exc):
        if self.bar is not None:
            self.bar.stop()
        return False
