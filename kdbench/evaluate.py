"""``evaluate()``: generate on a reference-based suite and score it into a run directory.

Per PROTOCOLS.md §1: the Alpaca prompt (or the suite's / model's template), sampling at
temperature 1 with seeds 10..50 by default (or greedy), Rouge-L and exact match per example, then
per seed, mean ± sample std over seeds, per length bucket and per category with counts, and a 95%
bootstrap CI over examples (of the per-example mean over seeds).

Generations are appended per seed (``generations/<suite>/seed<k>.jsonl``) batch by batch with fsync;
a rerun skips every example already generated, and sampling is seeded per (seed, example), so a
resumed evaluation equals an uninterrupted one.
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

    def __post_init__(self):
        if self.limit is not None and self.limit < 1:
            raise ConfigError("Setting limit must be a positive number of examples.")
        if not self.greedy and not self.seeds:
            raise ConfigError("Give at least one sampling seed, or use greedy decoding.")
        if self.n_bootstrap < 100:
            raise ConfigError("Setting n_bootstrap must be at least 100.")


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
        return tuple(float(x) for x in text.split(","))
    except ValueError:
        raise ConfigError(f"Buckets {text!r} must be comma-separated numbers (e.g. 30,70) or 'auto'.") from None


def evaluate(config: EvalConfig, *, model=None, tokenizer=None, log: Callable[[str], None] | None = None,
             command: list[str] | None = None, progress: bool = True) -> EvalResult:
    """Evaluate ``config.model`` (or an already-loaded ``model`` + ``tokenizer``) on ``config.suite``."""
    from kdbench import registry

    say = log or (lambda message: None)
    entry = registry.get("tasks", config.suite)
    kind = entry.body.get("type")
    if kind != "reference":
        raise ConfigError(f"Suite {config.suite} is of type {kind!r}; this evaluator runs reference-based suites.")
    from kdbench.suites import load_suite, suite_spec

    spec = suite_spec(config.suite)
    examples = load_suite(config.suite, config.data_path, limit=config.limit)  # validates the data first
    if model is None:
        if not config.model:
            raise ConfigError("Give the model to evaluate (--model DIR or a Hugging Face id).")
        from kdbench.models import load_model, load_tokenizer

        tokenizer = load_tokenizer(config.model)
        model = load_model(config.model, trainable=False)
    style = config.prompt_style or spec.prompt
    decoding = _suite_decoding(config, entry.body)
    seeds: list[int | str] = ["greedy"] if config.greedy else list(config.seeds)
    label = config.label or Path(str(config.model or "model")).name
    run_name = config.run_name or f"eval-{config.suite}-{label}"
    run = RunDir.create(config.output_dir, run_name, kind="eval",
                        config={**to_dict(config), "decoding": to_dict(decoding), "prompt_style": style,
                                "label": label, "suite_file": entry.path.name,
                                "decoding_summary": decoding.describe() + (" (greedy)" if config.greedy else
                                                                           f", seeds {','.join(map(str, seeds))}")},
                        command=command or sys.argv)
    _warn_template(model, tokenizer, style, say)

    from kdbench.data import format_prompt
    from kdbench.generate import HFBackend

    prompts = [format_prompt(e.instruction, e.input, style=style, tokenizer=tokenizer) for e in examples]
    ids = [e.id for e in examples]
    backend = HFBackend(model, tokenizer)
    outputs: dict[str, dict[str, str]] = {}
    for seed in seeds:
        path = run.generations_path(config.suite, seed)
        done = {r["id"]: r for r in read_jsonl(path)}
        todo = [i for i, example_id in enumerate(ids) if example_id not in done]
        if done and todo:
            say(f"seed {seed}: resuming, {len(done)} of {len(ids)} generations already on disk")
        if todo:
            decoding_for_seed = decoding if seed != "greedy" else DecodingConfig(**{**to_dict(decoding), "greedy": True})

            def write(batch, seed=seed, path=path):
                append_jsonl(path, [{"id": g.id, "seed": seed, "output": g.text, "new_tokens": g.new_tokens,
                                     "prompt_tokens": g.prompt_tokens, "prompt_truncated": g.prompt_truncated,
                                     "finished": g.finished} for g in batch])

            with _progress(progress, f"{label} {config.suite} seed {seed}", len(todo)) as advance:
                backend.generate([prompts[i] for i in todo], [ids[i] for i in todo], decoding_for_seed,
                                 seed=None if seed == "greedy" else int(seed), on_batch=write, progress=advance)
            done = {r["id"]: r for r in read_jsonl(path)}
        outputs[str(seed)] = {example_id: done[example_id]["output"] for example_id in ids}

    records, per_example = score(run, config.suite, examples, outputs, spec, _parse_buckets(config.buckets, spec.bucket_edges),
                                 n_bootstrap=config.n_bootstrap)
    run.write_metrics(records, replace_suite=config.suite)
    truncated = sum(r.get("prompt_truncated", False) for r in read_jsonl(run.generations_path(config.suite, seeds[0])))
    run.finish("complete", suite=config.suite, n_examples=len(examples), prompts_truncated=truncated, label=label)
    return EvalResult(run, records, per_example)


def score(run: RunDir, suite: str, examples, outputs: dict[str, dict[str, str]], spec, edges, *,
          n_bootstrap: int = 1000) -> tuple[list[dict], dict]:
    """Metric records for generations ``outputs`` (seed -> example id -> text); also writes
    ``scores/<suite>.json`` with every per-example score (for paired tests in reports)."""
    from kdbench.metrics import bootstrap_ci, exact_match_scores, length_buckets, mean_std, rouge_l_scores

    references = [e.references for e in examples]
    ids = [e.id for e in examples]
    buckets = length_buckets(references, edges)
    categories = [e.category for e in examples]
    metric_fns = {"rougeL": rouge_l_scores, "exact_match": exact_match_scores}
    per_example: dict[str, dict[str, list[float]]] = {}
    records: list[dict] = []
    for metric, fn in metric_fns.items():
        per_seed = {}
        for seed, texts in outputs.items():
            values = [100.0 * v for v in fn([texts[i] for i in ids], references)]
            per_seed[seed] = values
            records.append(run.metric_record(suite, metric, _mean(values), seed=seed, n=len(values)))
            for group_name, labels in (("bucket", buckets), ("category", categories)):
                for label in dict.fromkeys(x for x in labels if x is not None):
                    subset = [v for v, g in zip(values, labels) if g == label]
                    records.append(run.metric_record(suite, metric, _mean(subset), seed=seed,
                                                     subset=f"{group_name}:{label}", n=len(subset)))
        per_example[metric] = per_seed
        # across seeds: mean ± sample std of the per-seed means; CI over examples of the seed-averaged score
        example_means = [_mean([per_seed[s][i] for s in per_seed]) for i in range(len(ids))]
        seed_means = [_mean(v) for v in per_seed.values()]
        mean, std = mean_std(seed_means)
        low, high = bootstrap_ci(example_means, n_resamples=n_bootstrap)
        records.append(run.metric_record(suite, metric, mean, seed="mean", n=len(ids), std=std, ci_low=low,
                                         ci_high=high, n_seeds=len(seed_means)))
        for group_name, labels in (("bucket", buckets), ("category", categories)):
            for label in dict.fromkeys(x for x in labels if x is not None):
                members = [i for i, g in enumerate(labels) if g == label]
                group_seed_means = [_mean([per_seed[s][i] for i in members]) for s in per_seed]
                g_mean, g_std = mean_std(group_seed_means)
                g_low, g_high = bootstrap_ci([example_means[i] for i in members], n_resamples=n_bootstrap)
                records.append(run.metric_record(suite, metric, g_mean, seed="mean", subset=f"{group_name}:{label}",
                                                 n=len(members), std=g_std, ci_low=g_low, ci_high=g_high,
                                                 n_seeds=len(group_seed_means)))
    atomic_write_json(run.path / "scores" / f"{suite}.json",
                      {"ids": ids, "buckets": buckets, "categories": categories, "scores": per_example})
    return records, per_example


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


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


def _warn_template(model, tokenizer, style: str, say) -> None:
    """Warn when the prompt template differs from the one the model was trained with (if recorded)."""
    trained_with = getattr(getattr(model, "config", None), "kdbench_prompt_style", None)
    if trained_with and trained_with != style:
        say(f"warning: the model was trained with the {trained_with!r} prompt template but is evaluated with {style!r}")


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
