"""kdbench.suites on the real MiniLLM files: sizes, categories, prompts equal to the files' own
``prompt`` field, the three data sources in priority order, and DataError on bad data."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from kdbench import registry, suites
from kdbench.errors import ConfigError, DataError

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
needs_data = pytest.mark.skipif(not DATA.is_dir(), reason=f"shared test data not found at {DATA}")

FILES = {
    "dolly": "dolly/minillm_processed/valid.jsonl",
    "selfinst": "self_instruct/minillm_processed/valid.jsonl",
    "vicuna": "vicuna80/minillm_processed/valid.jsonl",
    "sinst": "sni/minillm_processed/11_/valid.jsonl",
}
SIZES = {"dolly": 500, "selfinst": 242, "vicuna": 80, "sinst": 1694}


@pytest.fixture(autouse=True)
def _no_data_env(monkeypatch):
    monkeypatch.delenv(suites.DATA_ENV_VAR, raising=False)


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def test_alpaca_prompt_template():
    assert suites.alpaca_prompt("Say hi.", "") == (
        "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
        "### Instruction:\nSay hi.\n\n### Response:\n"
    )
    assert suites.alpaca_prompt("Translate.", "Bonjour") == (
        "Below is an instruction that describes a task, paired with an input that provides further context. "
        "Write a response that appropriately completes the request.\n\n"
        "### Instruction:\nTranslate.\n\n### Input:\nBonjour\n\n### Response:\n"
    )
    assert suites.alpaca_prompt("x", None) == suites.alpaca_prompt("x", "")


def test_task_files_declare_reference_suites():
    assert set(suites.reference_suites()) >= {"dolly", "selfinst", "vicuna", "sinst", "uinst"}
    for name in ("dolly", "selfinst", "vicuna", "sinst", "uinst"):
        entry = registry.get("tasks", name)
        assert entry.body["type"] == "reference"
        assert entry.description and "\n" not in entry.description
        spec = suites.suite_spec(name)
        assert spec.hf_dataset.startswith("MiniLLM/") and spec.revision and spec.hf_file.endswith("valid.jsonl")
        assert spec.expected_size and spec.local_files
        assert set(spec.metrics) == {"rouge_l", "exact_match"}
        assert spec.prompt == "alpaca"
        assert spec.bucket_edges == (30, 70)
    assert suites.suite_spec("uinst").limit == 10_000
    with pytest.raises(ConfigError):
        suites.suite_spec("no-such-suite")


@needs_data
@pytest.mark.parametrize("name", sorted(SIZES))
def test_suite_loads_from_shared_data_with_expected_size(name, monkeypatch):
    from_folder = suites.load_suite(name, DATA)
    assert len(from_folder) == SIZES[name]
    monkeypatch.setenv(suites.DATA_ENV_VAR, str(DATA))
    from_env = suites.load_suite(name)
    assert from_env == from_folder
    # the prompt kdbench builds is the one MiniLLM stored with every example
    rows = _jsonl(DATA / FILES[name])
    for example, row in zip(from_env, rows):
        assert example.prompt == row["prompt"]
        expected_refs = row["output"] if isinstance(row["output"], list) else [row["output"]]
        assert example.references == expected_refs
    assert len({e.id for e in from_env}) == len(from_env)
    assert suites.load_suite(name, DATA, limit=7) == from_folder[:7]


@needs_data
def test_dolly_categories_match_source_counts():
    counts = Counter(e.category for e in suites.load_suite("dolly", DATA))
    assert counts == {
        "open_qa": 141, "general_qa": 99, "classification": 73, "brainstorming": 71,
        "closed_qa": 36, "summarization": 28, "information_extraction": 27, "creative_writing": 25,
    }
    assert set(counts) == set(suites.suite_spec("dolly").categories)


@needs_data
def test_sinst_has_multiple_references_and_vicuna_categories():
    sinst = suites.load_suite("sinst", DATA)
    assert sum(len(e.references) > 1 for e in sinst) == 388
    assert len({e.category for e in sinst}) == 37
    vicuna = suites.load_suite("vicuna", DATA)
    assert all(e.input == "" for e in vicuna)
    assert Counter(e.category for e in vicuna)["coding"] == 7


@needs_data
def test_raw_self_instruct_file_gives_all_252():
    examples = suites.load_suite("selfinst", DATA / "self_instruct/user_oriented_instructions.jsonl")
    assert len(examples) == 252
    assert examples[0].id == "user_oriented_task_0" and examples[0].category == "Grammarly"
    processed = {e.instruction for e in suites.load_suite("selfinst", DATA)}
    assert processed <= {e.instruction for e in examples}


def _write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def test_uinst_keeps_first_10000_rows(tmp_path):
    rows = [{"instruction": f"task {i}", "input": "", "output": f"answer {i}"} for i in range(10_005)]
    folder = tmp_path / "data"
    (folder / "uinst/11_").mkdir(parents=True)
    _write_jsonl(folder / "uinst/11_/valid.jsonl", rows)
    examples = suites.load_suite("uinst", folder)
    assert len(examples) == 10_000 and examples[-1].instruction == "task 9999"


def test_explicit_hub_snapshot_folder(tmp_path):
    # `huggingface-cli download MiniLLM/sinst --local-dir DIR` puts the file at DIR/11_/valid.jsonl
    (tmp_path / "11_").mkdir()
    _write_jsonl(tmp_path / "11_/valid.jsonl", [{"instruction": "i", "input": "x", "output": ["a", "b"]}])
    [example] = suites.load_suite("sinst", tmp_path)
    assert example.references == ["a", "b"] and example.input == "x"


def test_data_path_beats_env_and_env_beats_hub(tmp_path, monkeypatch):
    explicit = _write_jsonl(tmp_path / "mine.jsonl", [{"instruction": "explicit", "output": "o"}])
    env_folder = tmp_path / "env"
    (env_folder / "dolly").mkdir(parents=True)
    _write_jsonl(env_folder / "dolly/valid.jsonl", [{"instruction": "from env", "output": "o"}])

    def no_network(**kwargs):
        raise AssertionError("the Hub must not be contacted when local data is given")

    monkeypatch.setattr("huggingface_hub.hf_hub_download", no_network)
    monkeypatch.setenv(suites.DATA_ENV_VAR, str(env_folder))
    assert suites.load_suite("dolly", explicit)[0].instruction == "explicit"
    assert suites.load_suite("dolly")[0].instruction == "from env"


def test_hub_download_uses_pinned_revision(tmp_path, monkeypatch):
    calls = []
    downloaded = _write_jsonl(tmp_path / "valid.jsonl", [{"instruction": "hub", "output": "o", "topic": "open_qa"}])

    def fake_download(**kwargs):
        calls.append(kwargs)
        return str(downloaded)

    monkeypatch.setattr("huggingface_hub.hf_hub_download", fake_download)
    [example] = suites.load_suite("dolly")
    assert example.category == "open_qa"
    spec = suites.suite_spec("dolly")
    assert calls == [{"repo_id": "MiniLLM/dolly", "filename": "valid.jsonl", "repo_type": "dataset",
                      "revision": spec.revision}]

    def offline(**kwargs):
        raise OSError("no network")

    monkeypatch.setattr("huggingface_hub.hf_hub_download", offline)
    with pytest.raises(DataError, match="KDBENCH_DATA"):
        suites.load_suite("sinst")


@pytest.mark.parametrize(
    "bad_row, message",
    [
        ("{not json", "line 2 is not valid JSON"),
        ({"input": "x", "output": "o"}, "line 2: the row has no 'instruction'"),
        ({"instruction": "i", "input": "x"}, "line 2: the row has no 'output'"),
        ({"instruction": "i", "output": 3}, "line 2: 'output' must be"),
        ({"instruction": "i", "output": []}, "line 2: 'output' must be"),
        ({"instruction": ["i"], "output": "o"}, "line 2: 'instruction' must be a string"),
        ([1, 2], "line 2 is not a JSON object"),
    ],
)
def test_malformed_rows_raise_data_error_naming_file_and_line(tmp_path, bad_row, message):
    path = _write_jsonl(tmp_path / "bad.jsonl", [{"instruction": "ok", "output": "fine"}, bad_row])
    with pytest.raises(DataError) as info:
        suites.load_suite("dolly", path)
    assert str(path) in str(info.value) and message in str(info.value)
    assert "\n" not in str(info.value)


def test_missing_data_raises_data_error(tmp_path, monkeypatch):
    with pytest.raises(DataError, match="does not exist"):
        suites.load_suite("dolly", tmp_path / "nowhere.jsonl")
    monkeypatch.setenv(suites.DATA_ENV_VAR, str(tmp_path))
    with pytest.raises(DataError, match="No vicuna data found"):
        suites.load_suite("vicuna")
    with pytest.raises(DataError, match="does not exist"):
        suites.load_examples_file(tmp_path / "missing.jsonl")
    empty = _write_jsonl(tmp_path / "empty.jsonl", [])
    with pytest.raises(DataError, match="no examples"):
        suites.load_suite("dolly", empty)


@needs_data
def test_score_predictions_on_selfinst_davinci():
    from rouge_score import rouge_scorer

    examples = suites.load_suite("selfinst", DATA / "self_instruct/user_oriented_instructions.jsonl")
    predictions = [json.loads(line)["response"] for line in
                   (DATA / "self_instruct/predictions/text-davinci-003_predictions.jsonl").open()]
    rows = suites.score_predictions(examples, predictions)
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    for row, example, prediction in zip(rows, examples, predictions):
        assert row["id"] == example.id
        assert abs(row["rouge_l"] - scorer.score(example.references[0], prediction)["rougeL"].fmeasure) <= 1e-9
        assert row["bucket"] in ("(0,30]", "(30,70]", "(70,inf)")
    with pytest.raises(DataError):
        suites.score_predictions(examples, predictions[:-1])
