"""Inputs of the judged protocols: FastChat / AlpacaEval files and the answers to judge.

Protocol files (MT-Bench questions, judge prompts, reference answers) are found in a local folder
(``--data-dir`` or ``$KDBENCH_DATA/mt_bench``) or downloaded once from the commit pinned in
``judges/mt_bench.yaml`` and checked against their git blob ids. A ``--data-dir`` that lacks a file is an
error (never a silent download). AlpacaEval's prompt templates are read from the files of an installed
``alpaca-eval`` package, located with ``importlib.util.find_spec`` (which does not import it), or from a
local folder. A local protocol file or template whose git blob id differs from the pinned one is used, with
a warning naming the file (a modified judge prompt changes every score).

Answers come from kdbench run directories (``generations/<suite>/seed<k>.jsonl`` as ``kdbench eval`` writes
them, with ``id``, ``question`` (or ``instruction`` / ``prompt``), ``output``, ``references``), FastChat
``model_answer`` JSONL, or AlpacaEval ``model_outputs.json``.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
from pathlib import Path
from typing import Callable

from kdbench.errors import DataError
from kdbench.store import atomic_write_bytes, default_cache_dir, read_jsonl

log = logging.getLogger(__name__)
Warn = Callable[[str], None]


def check_pinned(path: Path, blob: str | None, what: str, warn: Warn | None = None) -> bool:
    """Whether the local file ``path`` has the pinned git blob id (prefix ``blob``); warns naming the file when
    it does not (the file is still used: a deliberate local edit is allowed, but never silent)."""
    if not blob:
        return True
    try:
        actual = git_blob_id(path.read_bytes())
    except OSError as err:
        raise DataError(f"Cannot read {path} ({type(err).__name__}); check the file.") from None
    if actual.startswith(blob):
        return True
    (warn or log.warning)(f"warning: {path} differs from the pinned {what} (git blob {actual[:12]}, expected "
                          f"{blob}); results will not be comparable with published ones.")
    return False


def git_blob_id(data: bytes) -> str:
    """The git blob sha1 of ``data`` (``sha1(b"blob <size>\\0" + data)``), as ``git hash-object`` prints."""
    return hashlib.sha1(b"blob %d\x00" % len(data) + data).hexdigest()


def _registry_body(name: str) -> dict:
    from kdbench import registry

    return registry.get("judges", name).body


def mt_bench_file(name: str, data_dir: str | os.PathLike | None = None, *, download: bool = True,
                  warn: Warn | None = None, source: str = "mt_bench") -> Path:
    """Path of the MT-Bench protocol file ``name`` (e.g. ``"judge_prompts.jsonl"``).

    With ``data_dir``, the file must be there (``DIR/name`` or ``DIR/mt_bench/name``): a folder without it is
    a DataError, never a silent download. Otherwise looks in ``$KDBENCH_DATA/mt_bench``, then the download
    cache, then downloads from the pinned FastChat commit when allowed. Downloads are verified against the
    blob id in the judge file ``source`` (``judges/mt_bench.yaml``, or the one another file ``uses``); a local copy
    that differs is used with a warning naming it.
    """
    body = _registry_body(source)
    spec = body["files"].get(name)
    blob = spec.get("blob") if spec else None
    if data_dir is not None:
        folder = Path(data_dir).expanduser()
        if not folder.is_dir():
            raise DataError(f"--data-dir {folder} is not a folder; pass the folder holding FastChat's llm_judge data "
                            "(question.jsonl, judge_prompts.jsonl, reference_answer/), or leave it out to download "
                            "the pinned files.")
        for path in (folder / name, folder / "mt_bench" / name):
            if path.is_file():
                check_pinned(path, blob, "FastChat file", warn)
                return path
        raise DataError(f"MT-Bench file {name} is not in --data-dir {folder} (looked for {folder / name}); copy it "
                        "there, or leave out --data-dir to download the pinned files.")
    if os.environ.get("KDBENCH_DATA"):
        path = Path(os.environ["KDBENCH_DATA"]) / "mt_bench" / name
        if path.is_file():
            check_pinned(path, blob, "FastChat file", warn)
            return path
    if spec is None:
        raise DataError(f"MT-Bench file {name} not found in $KDBENCH_DATA/mt_bench; pass --data-dir.")
    commit = spec.get("commit", body["source"]["commit"])
    cached = default_cache_dir() / "downloads" / f"fastchat-{commit[:12]}" / name
    if cached.is_file():
        return cached
    if not download:
        raise DataError(f"MT-Bench file {name} is not available offline; pass --data-dir with FastChat's llm_judge data.")
    url = body["source"]["base_url"].format(commit=commit) + spec["path"]
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(url, timeout=60) as response:  # noqa: S310 - a pinned https URL
            data = response.read()
    except (urllib.error.URLError, OSError) as err:
        raise DataError(f"Could not download {url} ({err}); pass --data-dir with a local copy of the file.") from None
    if not git_blob_id(data).startswith(spec["blob"]):
        raise DataError(f"Downloaded {url} does not match its pinned blob id {spec['blob']}; pass --data-dir.")
    atomic_write_bytes(cached, data)
    return cached


def _rows(path, fields: tuple[str, ...], what: str) -> list[dict]:
    rows = read_jsonl(path, strict=True)
    for number, row in enumerate(rows, start=1):
        missing = [f for f in fields if not isinstance(row, dict) or f not in row]
        if missing:
            raise DataError(f"{path}: record {number} has no {missing[0]!r}; pass FastChat's {what}.")
    if not rows:
        raise DataError(f"{path} holds no records; pass FastChat's {what}.")
    return rows


def load_judge_prompts(path: str | os.PathLike) -> dict[str, dict]:
    """FastChat's ``judge_prompts.jsonl`` as ``{name: {system_prompt, prompt_template, type, output_format, ...}}``."""
    rows = _rows(path, ("name", "system_prompt", "prompt_template"), "judge_prompts.jsonl")
    return {row["name"]: row for row in rows}


def load_questions(path: str | os.PathLike) -> list[dict]:
    """MT-Bench ``question.jsonl`` rows: ``question_id``, ``category``, ``turns``."""
    rows = _rows(path, ("question_id", "turns"), "MT-Bench question.jsonl")
    for number, row in enumerate(rows, start=1):
        if not isinstance(row["turns"], list) or not row["turns"] or not all(isinstance(t, str) for t in row["turns"]):
            raise DataError(f"{path}: record {number} needs 'turns': a list of question strings.")
    return rows


def load_reference_answers(path: str | os.PathLike) -> dict[int, list[str]]:
    """A FastChat ``reference_answer/*.jsonl`` as ``{question_id: [turn_1_reference, turn_2_reference]}``."""
    references = {}
    for number, row in enumerate(_rows(path, ("question_id", "choices"), "reference answers"), start=1):
        try:
            references[row["question_id"]] = [str(t) for t in row["choices"][0]["turns"]]
        except (TypeError, KeyError, IndexError):
            raise DataError(f"{path}: record {number} needs choices[0].turns; pass FastChat's reference answers.") from None
    return references


# --- AlpacaEval templates -----------------------------------------------------------------------------


def alpaca_eval_package_dir() -> Path | None:
    """The installed alpaca_eval package folder, found without importing it (its import runs load_dotenv())."""
    try:
        spec = importlib.util.find_spec("alpaca_eval")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def alpaca_eval_template(relative: str, templates_dir: str | os.PathLike | None = None, *, blob: str | None = None,
                         warn: Warn | None = None) -> str:
    """The text of AlpacaEval's prompt template ``relative`` (``"<config>/<file>.txt"``).

    ``templates_dir`` may hold ``<config>/<file>`` (the package layout) or ``<config>__<file>`` (a flat copy);
    when given, the template must be there. A file whose git blob id differs from ``blob`` is used with a
    warning naming it.
    """
    config, filename = relative.split("/", 1)
    if templates_dir is not None:
        folder = Path(templates_dir).expanduser()
        if not folder.is_dir():
            raise DataError(f"--templates-dir {folder} is not a folder; pass alpaca_eval's evaluators_configs folder.")
        candidates = [folder / config / filename, folder / f"{config}__{filename}"]
    else:
        package = alpaca_eval_package_dir()
        candidates = [package / "evaluators_configs" / config / filename] if package is not None else []
    for path in candidates:
        if path.is_file():
            check_pinned(path, blob, "AlpacaEval prompt template", warn)
            try:
                return path.read_text(encoding="utf-8")
            except UnicodeDecodeError:
                raise DataError(f"{path} is not UTF-8 text; pass alpaca_eval's prompt template.") from None
    where = f"in --templates-dir {templates_dir}" if templates_dir is not None else "(alpaca-eval is not installed)"
    raise DataError(
        f"AlpacaEval prompt template {relative} not found {where}; install the extra (pip install 'kdbench[alpaca]') "
        "or pass --templates-dir with alpaca_eval's evaluators_configs folder.")


# --- answers ------------------------------------------------------------------------------------------


def run_label(run_dir: Path) -> str:
    """The name a run is shown under (run.json's label, the config's label, its method, the folder name)."""
    from kdbench.store import RunDir

    run = RunDir(run_dir)
    info, config = run.info(), (run.config() or {})
    return str(info.get("label") or config.get("label") or config.get("method") or run_dir.name)


def generation_file(run_dir: Path, suite: str | None, seed: int | str | None) -> tuple[str, Path]:
    """(suite, file) of a run's generations: ``generations/<suite>/seed<k>.jsonl``, the only suite when
    ``suite`` is None, the first seed (in file-name order) when ``seed`` is None."""
    gen_root = run_dir / "generations"
    suites = sorted(p.name for p in gen_root.iterdir() if p.is_dir()) if gen_root.is_dir() else []
    if suite is None:
        if len(suites) != 1:
            raise DataError(f"Run {run_dir} has generations for {', '.join(suites) or 'no suite'}; pass --suite to "
                            "choose one." if suites else f"Run {run_dir} has no generations; run kdbench eval on it first.")
        suite = suites[0]
    folder = gen_root / suite
    files = sorted(folder.glob("seed*.jsonl"))
    if not files:
        raise DataError(f"Run {run_dir} has no generations for suite {suite!r} (it has: {', '.join(suites) or 'none'}); "
                        "run kdbench eval on it first or pass another --suite.")
    if seed is not None:
        files = [f for f in files if f.stem == f"seed{seed}"]
        if not files:
            raise DataError(f"Run {run_dir} has no generations for suite {suite!r} and seed {seed}.")
    return suite, files[0]


def _eval_examples(run_dir: Path, suite: str) -> dict:
    """The examples an older eval run generated for (its generations lack the question): read back from the
    data file recorded in its config, by example id. Empty when the run does not say."""
    from kdbench.store import RunDir
    from kdbench.suites import load_examples_file, suite_spec

    config = RunDir(run_dir).config() or {}
    data_file = (config.get("suites") or {}).get(suite, {}).get("data_file") or config.get("data_file")
    if not data_file or not Path(data_file).is_file():
        return {}
    try:
        spec = suite_spec(suite)
    except DataError:
        return {}
    examples = load_examples_file(data_file, id_prefix=spec.name, category_field=spec.category_field, limit=spec.limit)
    return {e.id: e for e in examples}


def _question(row: dict, example=None) -> str | None:
    """The question a judge sees: kdbench eval's ``question``, else ``instruction`` (with a non-empty ``input``
    after a blank line), else ``prompt``; for older eval runs the example read back from the data file."""
    if isinstance(row.get("question"), str):
        return row["question"]
    if isinstance(row.get("instruction"), str):
        extra = row.get("input")
        return row["instruction"] + (f"\n\n{extra}" if isinstance(extra, str) and extra else "")
    if isinstance(row.get("prompt"), str):
        return row["prompt"]
    if example is not None:
        return example.instruction + (f"\n\n{example.input}" if example.input else "")
    return None


def load_outputs(path: str | os.PathLike, *, suite: str | None = None, seed: int | str | None = None) -> list[dict]:
    """Model outputs as ``[{id, instruction, output, generator, references, category, suite}]`` from any source.

    * a kdbench run directory (``run.json``), as ``kdbench eval`` writes it: ``generations/<suite>/seed<k>.jsonl``
      (the only suite unless ``suite`` is given; the first seed unless ``seed`` is); ``generator`` is the run's
      label and ``suite`` the suite;
    * an AlpacaEval JSON list (``instruction``, ``output``, ``generator``);
    * a JSONL file with ``id`` / ``question``, ``instruction`` (and ``input``) or ``prompt`` / ``output``.

    ``instruction`` is the text shown to a judge. A record without one, or without an output, is a DataError
    naming the file and record.
    """
    path = Path(path).expanduser()
    if not path.exists():
        raise DataError(f"Answers not found: {path}; pass a kdbench run directory or an outputs file.")
    examples: dict = {}
    source_suite = None
    if path.is_dir():
        if not (path / "run.json").exists():
            raise DataError(f"{path} is a folder but not a kdbench run directory (no run.json); pass a file or a run.")
        generator = run_label(path)
        source_suite, file = generation_file(path, suite, seed)
        rows = read_jsonl(file, strict=True)
        if rows and _question(rows[0]) is None:
            examples = _eval_examples(path, source_suite)
    elif path.suffix == ".json":
        try:
            rows = json.loads(path.read_text(encoding="utf-8-sig"))
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            reason = err.msg if isinstance(err, json.JSONDecodeError) else "not UTF-8 text"
            raise DataError(f"{path} is not valid JSON ({reason}); pass an AlpacaEval outputs file.") from None
        if not isinstance(rows, list):
            raise DataError(f"{path} must hold a JSON list of {{instruction, output}} records.")
        file = path
        generator = path.parent.name if path.name == "model_outputs.json" else path.stem
    else:
        rows = read_jsonl(path, strict=True)
        file, generator = path, path.stem
    if not rows:
        raise DataError(f"{file} holds no outputs; pass a file or run with at least one answer.")
    outputs = []
    for index, row in enumerate(rows):
        if not isinstance(row, dict):
            raise DataError(f"{file}: record {index} is not a JSON object; each record needs an instruction and an output.")
        example = examples.get(str(row.get("id")))
        instruction = _question(row, example)
        if instruction is None or "output" not in row:
            raise DataError(f"{file}: record {index} needs an instruction (or question, or prompt) and an output.")
        output = row["output"]
        if isinstance(output, list):  # several samples: judge the first
            output = output[0] if output else ""
        if not isinstance(output, (str, int, float)):
            raise DataError(f"{file}: record {index} has an output that is not text.")
        refs = row.get("references", row.get("reference"))
        if refs is None and example is not None:
            refs = list(example.references)
        if isinstance(refs, str):
            refs = [refs]
        category = row.get("category", row.get("topic", example.category if example is not None else None))
        outputs.append({"id": str(row.get("id", index)), "instruction": instruction, "output": str(output),
                        "generator": row.get("generator", generator) if source_suite is None else generator,
                        "references": refs, "category": category, "suite": source_suite,
                        "dataset": row.get("dataset")})
    return outputs


def load_mt_bench_answers(path: str | os.PathLike, model_id: str | None = None) -> dict[str, dict[int, list[str]]]:
    """MT-Bench answers as ``{model_id: {question_id: [turn_1, turn_2]}}``.

    Accepts a FastChat ``model_answer/<model>.jsonl`` (``choices[0].turns``), a folder of them, or a kdbench
    run directory (``generations/mt_bench/seed*.jsonl`` as ``kdbench judge mt-bench --model`` writes them).
    """
    path = Path(path).expanduser()
    if not path.exists():
        raise DataError(f"MT-Bench answers not found: {path}; pass a FastChat answer file or a kdbench run directory.")
    if path.is_dir() and (path / "run.json").exists():
        files = [generation_file(path, "mt_bench", None)[1]]
        default_model = model_id or run_label(path)
    elif path.is_dir():
        files = sorted(path.glob("*.jsonl"))
        default_model = None
    else:
        files, default_model = [path], model_id or path.stem
    answers: dict[str, dict[int, list[str]]] = {}
    for file in files:
        for number, row in enumerate(read_jsonl(file, strict=True), start=1):
            name = default_model or file.stem
            turns = None
            if isinstance(row, dict) and "choices" in row:
                try:
                    turns = row["choices"][0]["turns"]
                except (TypeError, KeyError, IndexError):
                    turns = None
            elif isinstance(row, dict):
                turns = row.get("turns")
            if not isinstance(turns, list) or not all(isinstance(t, str) for t in turns):
                raise DataError(f"{file}, line {number}: an answer needs choices[0].turns (or turns), a list of "
                                "strings; fix the answers file.")
            try:
                qid = int(row.get("question_id", row.get("id")))
            except (TypeError, ValueError):
                raise DataError(f"{file}, line {number}: an answer needs an integer question_id.") from None
            answers.setdefault(name, {})[qid] = list(turns)
    if not answers:
        raise DataError(f"No MT-Bench answers in {path}; pass FastChat model_answer JSONL or a kdbench run.")
    return answers
