"""Reference-based evaluation suites (PROTOCOLS.md §1): dolly, selfinst, vicuna, sinst, uinst.

Each suite is one declarative task file ``tasks/<name>.yaml`` with ``type: reference``: the
canonical Hugging Face dataset (id, pinned revision, file), the relative paths it may have inside a
local data folder, the expected size, the prompt style, the metrics, the length buckets and the
field that holds the category.

Where the data comes from, first match wins:

1. an explicit ``data_path`` (a JSONL file, or a folder searched like ``KDBENCH_DATA``);
2. the folder in the ``KDBENCH_DATA`` environment variable (per-suite sub-folders, e.g.
   ``dolly/minillm_processed/valid.jsonl`` or a ``huggingface-cli download`` into ``dolly/``);
3. the Hugging Face Hub: the pinned file of the suite's dataset repository, downloaded once into the
   Hub cache (needs network the first time).

Files are MiniLLM's JSONL (one object per line: ``instruction``, ``input`` (may be absent or ""),
``output`` (a string or a list of acceptable references), and a category field such as Dolly's
``topic``) or the raw Self-Instruct format (``id``, ``motivation_app``, ``instruction``,
``instances=[{input, output}]``, one example per instance).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

from kdbench.data import alpaca_prompt
from kdbench.errors import ConfigError, DataError

log = logging.getLogger(__name__)

DATA_ENV_VAR = "KDBENCH_DATA"


@dataclass(frozen=True)
class Example:
    """One evaluation example: prompt parts, the acceptable references (≥ 1) and an optional category."""

    id: str
    instruction: str
    input: str
    references: list[str] = field(hash=False)
    category: str | None = None

    @property
    def prompt(self) -> str:
        """The Alpaca prompt of this example (see :func:`alpaca_prompt`)."""
        return alpaca_prompt(self.instruction, self.input)


@dataclass(frozen=True)
class SuiteSpec:
    """A reference-based suite as declared in ``tasks/<name>.yaml``."""

    name: str
    description: str
    hf_dataset: str | None
    revision: str | None
    hf_file: str | None
    local_files: tuple[str, ...]
    expected_size: int | None
    limit: int | None
    prompt: str
    metrics: tuple[str, ...]
    bucket_edges: tuple[float, ...] | str
    category_field: str | None
    categories: tuple[str, ...]
    path: Path | None = None


def suite_spec(name: str) -> SuiteSpec:
    """The declared spec of the reference-based suite ``name`` (ConfigError if unknown or not reference-based)."""
    from kdbench import registry

    entry = registry.get("tasks", name)
    body = entry.body
    if body.get("type") != "reference":
        raise ConfigError(
            f"Suite {name!r} is not a reference-based suite (type: {body.get('type')!r}); "
            f"choose one of: {', '.join(reference_suites())}."
        )
    source = body.get("source") or {}
    buckets = body.get("buckets") or {}
    edges = buckets.get("edges", [30, 70])
    if not (edges == "auto" or (isinstance(edges, list) and all(isinstance(e, (int, float)) for e in edges))):
        raise ConfigError(f"Task file {entry.path}: buckets.edges must be a list of numbers or 'auto'.")
    return SuiteSpec(
        name=entry.name,
        description=entry.description,
        hf_dataset=source.get("hf_dataset"),
        revision=None if source.get("revision") is None else str(source.get("revision")),
        hf_file=source.get("hf_file"),
        local_files=tuple(body.get("local_files") or ()),
        expected_size=body.get("expected_size"),
        limit=body.get("limit"),
        prompt=body.get("prompt", "alpaca"),
        metrics=tuple(body.get("metrics") or ("rouge_l", "exact_match")),
        bucket_edges=edges if edges == "auto" else tuple(edges),
        category_field=body.get("category_field"),
        categories=tuple(body.get("categories") or ()),
        path=entry.path,
    )


def reference_suites() -> list[str]:
    """Names of all registered suites with ``type: reference``."""
    from kdbench import registry

    return sorted(name for name, entry in registry.entries("tasks").items() if entry.body.get("type") == "reference")


# --- reading files ------------------------------------------------------------------------------


def _references(output, path: Path, line_number: int) -> list[str]:
    if isinstance(output, str):
        return [output]
    if isinstance(output, list) and output and all(isinstance(item, str) for item in output):
        return list(output)
    raise DataError(
        f"{path}, line {line_number}: 'output' must be a string or a non-empty list of strings; fix or remove that row."
    )


def _text_field(row: dict, key: str, path: Path, line_number: int, *, required: bool) -> str:
    value = row.get(key)
    if value is None:
        if required:
            raise DataError(f"{path}, line {line_number}: the row has no {key!r} field; every row needs one.")
        return ""
    if not isinstance(value, str):
        raise DataError(f"{path}, line {line_number}: {key!r} must be a string, not {type(value).__name__}.")
    return value


def load_examples_file(
    path: str | os.PathLike,
    *,
    id_prefix: str | None = None,
    category_field: str | None = None,
    limit: int | None = None,
) -> list[Example]:
    """Read a MiniLLM JSONL or raw Self-Instruct JSONL file into examples (file order).

    ``limit`` keeps the first ``limit`` rows. Blank lines are skipped. A missing file, bad JSON, or
    a row without ``instruction`` / ``output`` raises :class:`DataError` naming the file and line.
    Example ids are ``<id_prefix>-<row index>`` (0-based; the file name when no prefix is given),
    or the file's own ``id`` for raw Self-Instruct rows.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"Data file {path} does not exist; check the path or set {DATA_ENV_VAR}.")
    prefix = id_prefix or path.stem
    examples: list[Example] = []
    from kdbench.data import iter_jsonl_records

    for line_number, row in iter_jsonl_records(path):
        if limit is not None and len(examples) >= limit:
            break
        if "instances" in row and "output" not in row:
            examples.extend(_self_instruct_raw_examples(row, path, line_number))
            continue
        instruction = _text_field(row, "instruction", path, line_number, required=True)
        if "output" not in row:
            raise DataError(f"{path}, line {line_number}: the row has no 'output' field; every row needs one.")
        category = row.get(category_field) if category_field else None
        examples.append(
            Example(
                id=f"{prefix}-{len(examples)}",
                instruction=instruction,
                input=_text_field(row, "input", path, line_number, required=False),
                references=_references(row["output"], path, line_number),
                category=None if category is None else str(category),
            )
        )
    return examples[:limit] if limit is not None else examples


def _self_instruct_raw_examples(row: dict, path: Path, line_number: int) -> list[Example]:
    """yizhongw/self-instruct user_oriented_instructions.jsonl: one example per instance."""
    instruction = _text_field(row, "instruction", path, line_number, required=True)
    instances = row.get("instances")
    if not isinstance(instances, list) or not instances:
        raise DataError(f"{path}, line {line_number}: 'instances' must be a non-empty list of {{input, output}} objects.")
    base_id = str(row.get("id", f"{path.stem}-{line_number - 1}"))
    examples = []
    for index, instance in enumerate(instances):
        if not isinstance(instance, dict) or "output" not in instance:
            raise DataError(f"{path}, line {line_number}: instance {index} has no 'output' field.")
        examples.append(
            Example(
                id=base_id if len(instances) == 1 else f"{base_id}-{index}",
                instruction=instruction,
                input=_text_field(instance, "input", path, line_number, required=False),
                references=_references(instance["output"], path, line_number),
                category=None if row.get("motivation_app") is None else str(row["motivation_app"]),
            )
        )
    return examples


# --- finding the data ---------------------------------------------------------------------------


def _candidate_files(spec: SuiteSpec, folder: Path, *, snapshot: bool) -> list[Path]:
    relative = list(spec.local_files)
    if snapshot and spec.hf_file:
        # an explicit folder may be a snapshot of the suite's own Hub repository; not tried for the
        # shared KDBENCH_DATA root, where "11_/valid.jsonl" or "valid.jsonl" would be ambiguous
        relative.append(spec.hf_file)
    return [folder / rel for rel in relative]


def resolve_data_file(spec: SuiteSpec, data_path: str | os.PathLike | None = None) -> Path:
    """The local file for ``spec``: explicit path > ``$KDBENCH_DATA`` > Hugging Face Hub download."""
    if data_path is not None:
        data_path = Path(data_path).expanduser()
        if data_path.is_file():
            return data_path
        if data_path.is_dir():
            return _find_in_folder(spec, data_path, origin="--data", snapshot=True)
        raise DataError(f"--data {data_path} does not exist; give a JSONL file or a folder holding the {spec.name} data.")
    env_folder = os.environ.get(DATA_ENV_VAR)
    if env_folder:
        folder = Path(env_folder).expanduser()
        if not folder.is_dir():
            raise DataError(f"{DATA_ENV_VAR}={env_folder} is not a folder; point it at the folder holding per-suite data.")
        return _find_in_folder(spec, folder, origin=DATA_ENV_VAR, snapshot=False)
    return _download_from_hub(spec)


def _find_in_folder(spec: SuiteSpec, folder: Path, *, origin: str, snapshot: bool) -> Path:
    candidates = _candidate_files(spec, folder, snapshot=snapshot)
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    tried = ", ".join(str(c) for c in candidates) or "(the task file lists no local_files)"
    raise DataError(f"No {spec.name} data found under {folder} ({origin}); expected one of: {tried}.")


def _download_from_hub(spec: SuiteSpec) -> Path:
    """Fetch the suite's pinned file from the Hub (cached in the Hub cache after the first call).

    The raw JSONL file is downloaded rather than read through ``datasets.load_dataset`` so that the
    Hub copy goes through exactly the same parser and checks as a local file (Arrow would also have
    to unify ``output`` as a string in one suite and a list in another).
    """
    if not spec.hf_dataset or not spec.hf_file:
        raise DataError(
            f"Suite {spec.name} has no Hugging Face source; pass --data or set {DATA_ENV_VAR}."
        )
    try:
        from huggingface_hub import hf_hub_download
    except ImportError:  # pragma: no cover - huggingface_hub comes with transformers/datasets
        raise DataError(
            f"huggingface_hub is not installed; install it or pass --data / set {DATA_ENV_VAR} for suite {spec.name}."
        ) from None
    try:
        local = hf_hub_download(
            repo_id=spec.hf_dataset, filename=spec.hf_file, repo_type="dataset", revision=spec.revision
        )
    except Exception as err:  # network, auth, missing revision: all user-fixable
        raise DataError(
            f"Could not download {spec.hf_file} of {spec.hf_dataset}@{spec.revision} for suite {spec.name} "
            f"({type(err).__name__}); connect to the internet once, or pass --data / set {DATA_ENV_VAR}."
        ) from None
    return Path(local)


def load_suite(
    name: str, data_path: str | os.PathLike | None = None, *, limit: int | None = None
) -> list[Example]:
    """The examples of reference-based suite ``name`` in file order.

    ``data_path``: a JSONL file or a data folder (see module docstring); ``limit`` keeps only the
    first ``limit`` examples (after the suite's own limit, e.g. uinst's 10,000). Logs a warning when
    the full suite's size differs from the declared ``expected_size``.
    """
    spec = suite_spec(name)
    path = resolve_data_file(spec, data_path)
    suite_limit = spec.limit
    examples = load_examples_file(path, id_prefix=spec.name, category_field=spec.category_field, limit=suite_limit)
    if not examples:
        raise DataError(f"{path} holds no examples; check that it is the {spec.name} evaluation file.")
    if spec.expected_size is not None and len(examples) != spec.expected_size:
        log.warning("suite %s: %s has %d examples, the published suite has %d", name, path, len(examples), spec.expected_size)
    if limit is not None:
        if limit <= 0:
            raise ConfigError(f"limit must be a positive number of examples, got {limit}.")
        examples = examples[:limit]
    return examples


def score_predictions(
    examples: list[Example],
    predictions: list[str],
    *,
    bucket_edges: tuple[float, ...] | str = (30, 70),
    drop_articles: bool = False,
) -> list[dict]:
    """Per-example scores of one run: ``id``, ``rouge_l`` and ``exact_match`` in [0, 1], ``bucket``, ``category``.

    ``predictions[i]`` answers ``examples[i]``. Averages, × 100, per bucket or category, go through
    :func:`kdbench.metrics.summarize_scores`.
    """
    from kdbench import metrics

    if len(examples) != len(predictions):
        raise DataError(f"Got {len(predictions)} predictions for {len(examples)} examples; generate one per example.")
    references = [e.references for e in examples]
    rouge = metrics.rouge_l_scores(predictions, references)
    exact = metrics.exact_match_scores(predictions, references, drop_articles=drop_articles)
    buckets = metrics.length_buckets(references, bucket_edges)
    return [
        {"id": e.id, "rouge_l": r, "exact_match": m, "bucket": b, "category": e.category}
        for e, r, m, b in zip(examples, rouge, exact, buckets)
    ]
