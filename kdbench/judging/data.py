"""Inputs of the judged protocols: FastChat / AlpacaEval files and the answers to judge.

Protocol files (MT-Bench questions, judge prompts, reference answers) are found in a local folder
(``--data-dir`` or ``$KDBENCH_DATA/mt_bench``) or downloaded once from the commit pinned in
``judges/mt_bench.yaml`` and checked against their git blob ids. AlpacaEval's prompt templates are read
from the files of an installed ``alpaca-eval`` package, located with ``importlib.util.find_spec``
(which does not import it), or from a local folder.

Answers come from kdbench run directories (``generations/<suite>/seed<k>.jsonl`` with ``id``, ``prompt``,
``output``), FastChat ``model_answer`` JSONL, or AlpacaEval ``model_outputs.json``.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
from pathlib import Path

from kdbench.errors import DataError
from kdbench.store import atomic_write_bytes, default_cache_dir, read_jsonl


def git_blob_id(data: bytes) -> str:
    """The git blob sha1 of ``data`` (``sha1(b"blob <size>\\0" + data)``), as ``git hash-object`` prints."""
    return hashlib.sha1(b"blob %d\x00" % len(data) + data).hexdigest()


def _registry_body(name: str) -> dict:
    from kdbench import registry

    return registry.get("judges", name).body


def mt_bench_file(name: str, data_dir: str | os.PathLike | None = None, *, download: bool = True) -> Path:
    """Path of the MT-Bench protocol file ``name`` (e.g. ``"judge_prompts.jsonl"``).

    Looks in ``data_dir``, then ``$KDBENCH_DATA/mt_bench``, then the download cache; downloads from the
    pinned FastChat commit when allowed. Downloads are verified against the blob id in the judge file.
    """
    body = _registry_body("mt_bench")
    spec = body["files"].get(name)
    candidates = []
    if data_dir is not None:
        candidates += [Path(data_dir) / name, Path(data_dir) / "mt_bench" / name]
    if os.environ.get("KDBENCH_DATA"):
        candidates.append(Path(os.environ["KDBENCH_DATA"]) / "mt_bench" / name)
    for path in candidates:
        if path.is_file():
            return path
    if spec is None:
        raise DataError(f"MT-Bench file {name} not found in {data_dir or '$KDBENCH_DATA/mt_bench'}; pass --data-dir.")
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


def load_judge_prompts(path: str | os.PathLike) -> dict[str, dict]:
    """FastChat's ``judge_prompts.jsonl`` as ``{name: {system_prompt, prompt_template, type, output_format, ...}}``."""
    return {row["name"]: row for row in read_jsonl(path, strict=True)}


def load_questions(path: str | os.PathLike) -> list[dict]:
    """MT-Bench ``question.jsonl`` rows: ``question_id``, ``category``, ``turns``."""
    return read_jsonl(path, strict=True)


def load_reference_answers(path: str | os.PathLike) -> dict[int, list[str]]:
    """A FastChat ``reference_answer/*.jsonl`` as ``{question_id: [turn_1_reference, turn_2_reference]}``."""
    return {row["question_id"]: list(row["choices"][0]["turns"]) for row in read_jsonl(path, strict=True)}


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


def alpaca_eval_template(relative: str, templates_dir: str | os.PathLike | None = None) -> str:
    """The text of AlpacaEval's prompt template ``relative`` (``"<config>/<file>.txt"``).

    ``templates_dir`` may hold ``<config>/<file>`` (the package layout) or ``<config>__<file>`` (a flat copy).
    """
    config, filename = relative.split("/", 1)
    candidates = []
    if templates_dir is not None:
        candidates += [Path(templates_dir) / config / filename, Path(templates_dir) / f"{config}__{filename}"]
    package = alpaca_eval_package_dir()
    if package is not None:
        candidates.append(package / "evaluators_configs" / config / filename)
    for path in candidates:
        if path.is_file():
            return path.read_text(encoding="utf-8")
    raise DataError(
        f"AlpacaEval prompt template {relative} not found; install the extra (pip install 'kdbench[alpaca]') "
        "or pass --templates-dir with alpaca_eval's evaluators_configs folder.")


# --- answers ------------------------------------------------------------------------------------------


def _generation_files(run_dir: Path, suite: str | None, seed: int | str | None) -> list[Path]:
    gen_root = run_dir / "generations"
    suites = sorted(p.name for p in gen_root.iterdir() if p.is_dir()) if gen_root.is_dir() else []
    if suite is None:
        if len(suites) != 1:
            raise DataError(f"Run {run_dir} has generations for {suites or 'no suite'}; pass --suite to choose one.")
        suite = suites[0]
    folder = gen_root / suite
    files = sorted(folder.glob("seed*.jsonl"))
    if not files:
        raise DataError(f"Run {run_dir} has no generations for suite {suite!r}; run kdbench eval on it first.")
    if seed is not None:
        files = [f for f in files if f.stem == f"seed{seed}"]
        if not files:
            raise DataError(f"Run {run_dir} has no generations for suite {suite!r} and seed {seed}.")
    return files[:1]


def load_outputs(path: str | os.PathLike, *, suite: str | None = None, seed: int | str | None = None) -> list[dict]:
    """Model outputs as ``[{id, instruction, output, generator, references?}]`` from any supported source.

    * a kdbench run directory (``run.json``): ``generations/<suite>/seed<k>.jsonl`` (the first seed unless
      ``seed`` is given);
    * an AlpacaEval JSON list (``instruction``, ``output``, ``generator``);
    * a JSONL file with ``id`` / ``prompt`` (or ``instruction``) / ``output``.
    """
    path = Path(path)
    if not path.exists():
        raise DataError(f"Answers not found: {path}; pass a kdbench run directory or an outputs file.")
    generator = path.name
    if path.is_dir():
        if not (path / "run.json").exists():
            raise DataError(f"{path} is a folder but not a kdbench run directory (no run.json); pass a file or a run.")
        generator = path.name
        rows = read_jsonl(_generation_files(path, suite, seed)[0], strict=True)
    elif path.suffix == ".json":
        try:
            rows = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as err:
            raise DataError(f"{path} is not valid JSON ({err.msg}); pass an AlpacaEval outputs file.") from None
        if not isinstance(rows, list):
            raise DataError(f"{path} must hold a JSON list of {{instruction, output}} records.")
        generator = path.parent.name if path.name == "model_outputs.json" else path.stem
    else:
        rows = read_jsonl(path, strict=True)
        generator = path.stem
    outputs = []
    for index, row in enumerate(rows):
        instruction = row.get("instruction", row.get("prompt"))
        if instruction is None or "output" not in row:
            raise DataError(f"{path}: record {index} needs an instruction (or prompt) and an output.")
        output = row["output"]
        if isinstance(output, list):  # several samples: judge the first
            output = output[0]
        refs = row.get("references", row.get("reference"))
        if isinstance(refs, str):
            refs = [refs]
        outputs.append({"id": str(row.get("id", index)), "instruction": instruction, "output": str(output),
                        "generator": row.get("generator", generator), "references": refs,
                        "category": row.get("category", row.get("topic"))})
    return outputs


def load_mt_bench_answers(path: str | os.PathLike, model_id: str | None = None) -> dict[str, dict[int, list[str]]]:
    """MT-Bench answers as ``{model_id: {question_id: [turn_1, turn_2]}}``.

    Accepts a FastChat ``model_answer/<model>.jsonl`` (``choices[0].turns``), a folder of them, or a kdbench
    run directory (``generations/mt_bench/seed*.jsonl`` written by :func:`kdbench.judging.mt_bench.generate_answers`).
    """
    path = Path(path)
    if not path.exists():
        raise DataError(f"MT-Bench answers not found: {path}; pass a FastChat answer file or a kdbench run directory.")
    if path.is_dir() and (path / "run.json").exists():
        files = _generation_files(path, "mt_bench", None)
        default_model = model_id or path.name
    elif path.is_dir():
        files = sorted(path.glob("*.jsonl"))
        default_model = None
    else:
        files, default_model = [path], model_id or path.stem
    answers: dict[str, dict[int, list[str]]] = {}
    for file in files:
        for row in read_jsonl(file, strict=True):
            name = default_model or file.stem
            if "choices" in row:
                turns = row["choices"][0]["turns"]
            elif "turns" in row:
                turns = row["turns"]
            else:
                raise DataError(f"{file}: answer {row.get('question_id')} has neither choices[0].turns nor turns.")
            qid = int(row.get("question_id", row.get("id")))
            answers.setdefault(name, {})[qid] = list(turns)
    if not answers:
        raise DataError(f"No MT-Bench answers in {path}.")
    return answers
