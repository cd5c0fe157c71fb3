"""Local lm-eval tasks over JSONL files (offline evaluation): write a task folder, pass it as ``include_path``."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

from kdbench.errors import ConfigError, DataError
from kdbench.harness_suite import TASK_NAME_PATTERN


# ----------------------------------------------------------------------------------------------
# Local lm-eval tasks (offline evaluation over JSONL files)
# ----------------------------------------------------------------------------------------------
def _check_task_name(name: str) -> None:
    if not isinstance(name, str) or not TASK_NAME_PATTERN.match(name):
        raise ConfigError(f"Task name {name!r} must start with a letter or digit and contain only letters, digits, "
                          "'_', '-' or '.'.")


def _write_local_task(name: str, out_dir: str | os.PathLike, config: dict, splits: dict[str, list[dict]]) -> str:
    """Write ``out_dir/<name>/<name>.yaml`` and one JSONL per split; return ``out_dir`` (the include path)."""
    import yaml

    from kdbench.store import atomic_write_text

    folder = Path(out_dir).expanduser().resolve() / name
    folder.mkdir(parents=True, exist_ok=True)
    data_files = {}
    for split, rows in splits.items():
        path = folder / f"{split}.jsonl"
        atomic_write_text(path, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))
        data_files[split] = str(path)
    body = {
        "task": name,
        "dataset_path": "json",
        # a private datasets cache next to the data: nothing is written to the user's HF cache
        "dataset_kwargs": {"data_files": data_files, "cache_dir": str(folder / ".hf_datasets_cache")},
        "test_split": "test",
        **({"fewshot_split": "train", "training_split": "train"} if "train" in splits else {}),
        **config,
    }
    atomic_write_text(folder / f"{name}.yaml", yaml.safe_dump(body, sort_keys=False, allow_unicode=True))
    return str(Path(out_dir).expanduser().resolve())


def _mc_rows(records: list[dict], what: str) -> list[dict]:
    if not isinstance(records, list) or not records:
        raise DataError(f"Pass a non-empty list of {what} records (question, choices, answer).")
    rows = []
    for i, record in enumerate(records):
        question, choices, answer = (record.get(k) for k in ("question", "choices", "answer")) \
            if isinstance(record, dict) else (None, None, None)
        if not isinstance(question, str) or not question.strip():
            raise DataError(f"{what} record {i} needs a non-empty 'question' string.")
        if (not isinstance(choices, list) or len(choices) < 2
                or not all(isinstance(c, str) and c.strip() for c in choices)):
            raise DataError(f"{what} record {i} needs 'choices': a list of at least two non-empty strings.")
        if isinstance(answer, bool) or not isinstance(answer, int) or not 0 <= answer < len(choices):
            raise DataError(f"{what} record {i} needs 'answer': the index (0-{len(choices) - 1}) of the right choice.")
        rows.append({"question": question, "choices": list(choices), "answer": answer})
    return rows


def local_multiple_choice_task(name: str, records: list[dict], out_dir: str | os.PathLike, *,
                               fewshot_records: list[dict] | None = None,
                               prompt_template: str = "Question: {{question}}\nAnswer:") -> str:
    """Write an lm-eval multiple-choice task over local records; return its ``include_path``.

    Each record is ``{"question": str, "choices": [str, ...] (at least 2, e.g. 4), "answer": int}``.
    The model scores each choice as the continuation ``" " + choice`` of the rendered prompt
    (``prompt_template``, a Jinja template over the record's fields); lm-eval reports ``acc``
    (highest log-likelihood) and ``acc_norm`` (log-likelihood per character of the choice).
    ``fewshot_records`` (same shape) become the split few-shot examples are drawn from; without
    them, lm-eval draws them from the test records themselves.
    Pass the returned folder as ``run_harness(..., include_path=...)``; several tasks may share it.
    """
    _check_task_name(name)
    splits = {"test": _mc_rows(records, "Multiple-choice")}
    if fewshot_records:
        splits["train"] = _mc_rows(fewshot_records, "Few-shot")
    config = {
        "output_type": "multiple_choice",
        "doc_to_text": prompt_template,
        "doc_to_choice": "{{choices}}",
        "doc_to_target": "answer",
        "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True},
                        {"metric": "acc_norm", "aggregation": "mean", "higher_is_better": True}],
        "metadata": {"version": 1.0, "source": "kdbench.harness.local_multiple_choice_task"},
    }
    return _write_local_task(name, out_dir, config, splits)


def local_generation_task(name: str, records: list[dict], out_dir: str | os.PathLike, *,
                          until: tuple[str, ...] | list[str] = ("\n",), max_gen_toks: int = 32,
                          filters: dict[str, str] | None = None, prompt_template: str = "{{prompt}}") -> str:
    """Write an lm-eval greedy-generation task scored by exact match; return its ``include_path``.

    Each record is ``{"prompt": str, "answer": str}``. Generation stops at any string of ``until`` or
    after ``max_gen_toks`` tokens. ``filters`` maps a filter name to a regex: the first match (first
    group if the regex has one, stripped) is compared with the answer, ``"[invalid]"`` when nothing
    matches - like lm-eval's gsm8k ``strict-match``. Without ``filters`` the raw completion is
    compared (filter ``none``).
    """
    _check_task_name(name)
    if not isinstance(records, list) or not records:
        raise DataError("Pass a non-empty list of generation records (prompt, answer).")
    rows = []
    for i, record in enumerate(records):
        if not isinstance(record, dict) or not isinstance(record.get("prompt"), str) \
                or not isinstance(record.get("answer"), str):
            raise DataError(f"Generation record {i} needs string fields 'prompt' and 'answer'.")
        rows.append({"prompt": record["prompt"], "answer": record["answer"]})
    if isinstance(max_gen_toks, bool) or not isinstance(max_gen_toks, int) or max_gen_toks < 1:
        raise ConfigError(f"max_gen_toks must be a positive integer (got {max_gen_toks!r}).")
    config: dict[str, Any] = {
        "output_type": "generate_until",
        "doc_to_text": prompt_template,
        "doc_to_target": "{{answer}}",
        "generation_kwargs": {"until": list(until), "do_sample": False, "max_gen_toks": max_gen_toks},
        "metric_list": [{"metric": "exact_match", "aggregation": "mean", "higher_is_better": True}],
        "metadata": {"version": 1.0, "source": "kdbench.harness.local_generation_task"},
    }
    if filters:
        for filter_name, pattern in filters.items():
            try:
                re.compile(pattern)
            except re.error as err:
                raise ConfigError(f"Filter {filter_name!r} has an invalid regex ({err}); fix the pattern.") from None
        config["filter_list"] = [
            {"name": filter_name, "filter": [{"function": "regex", "regex_pattern": pattern},
                                              {"function": "take_first"}]}
            for filter_name, pattern in filters.items()]
    return _write_local_task(name, out_dir, config, {"test": rows})
