"""kdbench.evaluate on real suite files: chat templates (the real SmolLM2 tokenizer + a tiny random
Llama), several suites into one run directory, resuming, and refusing to mix settings in a run."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from kdbench.errors import ConfigError, DataError  # noqa: E402
from kdbench.evaluate import ALL_SUITES, EvalConfig, evaluate, evaluate_many, resolve_suites  # noqa: E402
from kdbench.generate import DecodingConfig  # noqa: E402
from kdbench.store import RunDir, read_jsonl  # noqa: E402

SHARED = Path(__file__).resolve().parents[2] / "shared"
DATA = SHARED / "data"
SMOLLM2 = SHARED / "models" / "smollm2-135m-instruct"
GPT2_TOKENIZER = SHARED / "models" / "gpt2-tokenizer"
DOLLY = DATA / "dolly" / "minillm_processed" / "valid.jsonl"
SUITE_FILES = {"dolly": "dolly/minillm_processed/valid.jsonl", "selfinst": "self_instruct/minillm_processed/valid.jsonl",
               "vicuna": "vicuna80/minillm_processed/valid.jsonl", "sinst": "sni/minillm_processed/11_/valid.jsonl"}

if not (SMOLLM2.is_dir() and GPT2_TOKENIZER.is_dir() and all((DATA / f).is_file() for f in SUITE_FILES.values())):
    pytest.skip(f"shared tokenizers / suite data not found under {SHARED}", allow_module_level=True)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)  # see tests/test_generate.py
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    """A tiny random Llama with the real SmolLM2 tokenizer (chat template included), saved as kdbench
    training saves a model: with the prompt style it was trained with in its config."""
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(SMOLLM2))
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                      max_position_embeddings=1024, bos_token_id=tokenizer.bos_token_id,
                                      eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    model = transformers.LlamaForCausalLM(config)
    model.config.kdbench_prompt_style = "alpaca"  # what kdbench.train writes
    path = tmp_path_factory.mktemp("llama") / "smol-random"
    model.save_pretrained(str(path))
    tokenizer.save_pretrained(str(path))
    return path


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory):
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(GPT2_TOKENIZER))
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=len(tokenizer), n_positions=1024)
    path = tmp_path_factory.mktemp("gpt2") / "gpt2-random"
    transformers.GPT2LMHeadModel(config).save_pretrained(str(path))
    tokenizer.save_pretrained(str(path))
    return path


def _config(tmp_path, model, **values) -> EvalConfig:
    decoding = DecodingConfig(max_new_tokens=values.pop("max_new_tokens", 4), batch_size=8)
    return EvalConfig(**{"suite": "dolly", "model": str(model), "data_path": str(DOLLY), "limit": 3, "greedy": True,
                         "decoding": decoding, "output_dir": str(tmp_path / "runs"), "n_bootstrap": 100, **values})


def test_chat_template_is_used_recorded_and_a_mismatch_warned(tmp_path, llama_dir):
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(SMOLLM2))
    saved = transformers.AutoConfig.from_pretrained(str(llama_dir))
    assert saved.kdbench_prompt_style == "alpaca"  # survives save_pretrained / from_pretrained
    messages: list[str] = []
    result = evaluate(_config(tmp_path, llama_dir, prompt_style="chat", run_name="chat"), log=messages.append,
                      progress=False)
    warnings = [m for m in messages if m.startswith("warning:")]
    assert len(warnings) == 1 and "'alpaca'" in warnings[0] and "'chat'" in warnings[0]
    assert warnings[0] in (result.run.path / "log.txt").read_text()

    config = result.run.config()
    assert config["prompt_style"] == "chat" and config["trained_prompt_style"] == "alpaca"
    template = config["prompt_template"]
    assert template["style"] == "chat"
    assert template["chat_template_sha256"] == hashlib.sha256(tokenizer.chat_template.encode()).hexdigest()
    first = json.loads(DOLLY.read_text().splitlines()[0])
    content = first["instruction"] + (f"\n\n{first['input']}" if first["input"] else "")
    expected_prompt = tokenizer.apply_chat_template([{"role": "user", "content": content}], tokenize=False,
                                                    add_generation_prompt=True)
    assert config["prompt_example"] == expected_prompt
    assert expected_prompt.startswith("<|im_start|>system") and expected_prompt.endswith("<|im_start|>assistant\n")
    # the prompt's own <|im_start|> (the BOS token) is not doubled
    records = {r["id"]: r for r in read_jsonl(result.run.generations_path("dolly", "greedy"))}
    assert records["dolly-0"]["prompt_tokens"] == len(tokenizer(expected_prompt, add_special_tokens=False)["input_ids"])

    messages.clear()
    alpaca = evaluate(_config(tmp_path, llama_dir, run_name="alpaca"), log=messages.append, progress=False)
    assert not [m for m in messages if m.startswith("warning:")]
    assert alpaca.run.config()["prompt_template"] == {"style": "alpaca"}
    assert alpaca.run.config()["prompt_example"].startswith("Below is an instruction")


def test_chat_style_without_a_chat_template_is_one_clear_error(tmp_path, gpt2_dir):
    with pytest.raises(DataError, match="no chat template"):
        evaluate(_config(tmp_path, gpt2_dir, prompt_style="chat", run_name="nochat"), progress=False)
    assert not (tmp_path / "runs" / "nochat").exists()  # nothing half-made


def test_resolve_suites():
    assert resolve_suites("all") == list(ALL_SUITES) == ["dolly", "selfinst", "vicuna", "sinst", "uinst"]
    assert resolve_suites("dolly, vicuna") == ["dolly", "vicuna"]
    assert resolve_suites(["vicuna", "all"]) == ["vicuna", "dolly", "selfinst", "sinst", "uinst"]
    with pytest.raises(ConfigError):
        resolve_suites("dolly,nosuch")
    with pytest.raises(ConfigError):
        resolve_suites("oll")  # an lm-eval suite, not reference-based
    with pytest.raises(ConfigError):
        resolve_suites(" , ")


@pytest.fixture
def data_folder(tmp_path):
    """A KDBENCH_DATA-style folder of links to the shared files, plus a uinst file (S-NI rows stand in:
    there is no Unnatural Instructions file in the shared data)."""
    root = tmp_path / "data"
    for rel in SUITE_FILES.values():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).symlink_to(DATA / rel)
    (root / "uinst" / "11_").mkdir(parents=True)
    (root / "uinst" / "11_" / "valid.jsonl").symlink_to(DATA / SUITE_FILES["sinst"])
    return root


def test_all_five_suites_into_one_run_directory_and_resume(tmp_path, gpt2_dir, data_folder):
    config = _config(tmp_path, gpt2_dir, data_path=str(data_folder), label="tiny")
    result = evaluate_many("all", config, progress=False)
    run = result.run
    assert run.path.name == "eval-all-tiny" and run.complete
    assert run.info()["suites"] == list(ALL_SUITES)
    assert run.info()["n_examples"] == {suite: 3 for suite in ALL_SUITES}
    metrics = run.metrics()
    for suite in ALL_SUITES:
        assert (run.path / "generations" / suite / "seedgreedy.jsonl").is_file()
        mean = [r for r in metrics if r["suite"] == suite and r["seed"] == "mean" and r["subset"] == "all"]
        assert sorted(r["metric"] for r in mean) == ["exact_match", "rougeL"]
        assert result.value(suite, "rougeL") == next(r["value"] for r in mean if r["metric"] == "rougeL")
    suites_config = run.config()["suites"]
    assert set(suites_config) == set(ALL_SUITES)
    assert suites_config["dolly"]["data_file"] == str(data_folder / SUITE_FILES["dolly"])
    assert suites_config["uinst"]["prompt_template"] == {"style": "alpaca"}
    # Dolly has categories, Unnatural Instructions does not
    assert any(r["subset"].startswith("category:") for r in metrics if r["suite"] == "dolly")
    assert not any(r["subset"].startswith("category:") for r in metrics if r["suite"] == "uinst")

    from kdbench.report import leaderboard_markdown

    board = leaderboard_markdown([run], baseline_label=None, reference_label=None)
    assert all(f"## Suite {suite}" in board for suite in ALL_SUITES)

    before = {p: p.read_bytes() for p in (run.path / "generations").rglob("seed*.jsonl")}
    again = evaluate_many("all", config, progress=False)
    assert {p: p.read_bytes() for p in (run.path / "generations").rglob("seed*.jsonl")} == before
    assert [r["value"] for r in again.records] == [r["value"] for r in result.records]


def test_several_suites_check_every_file_before_loading_the_model(tmp_path):
    # the shared folder has no uinst file: the error comes before the (nonexistent) model is loaded
    config = _config(tmp_path, tmp_path / "no-such-model", data_path=str(DATA))
    with pytest.raises(DataError, match="No uinst data found"):
        evaluate_many("all", config, progress=False)
    with pytest.raises(ConfigError, match="is a file"):
        evaluate_many("dolly,vicuna", _config(tmp_path, tmp_path / "no-such-model"), progress=False)
    assert not (tmp_path / "runs").exists()


def test_a_run_directory_never_mixes_generation_settings(tmp_path, gpt2_dir):
    first = evaluate(_config(tmp_path, gpt2_dir, run_name="r"), progress=False)
    path = first.run.generations_path("dolly", "greedy")
    lines = path.read_text()
    with pytest.raises(ConfigError, match="max_new_tokens: 4 before, 5 now"):
        evaluate(_config(tmp_path, gpt2_dir, run_name="r", max_new_tokens=5), progress=False)
    # more examples, another batch size: the same settings, so the run resumes and keeps what it has
    config = _config(tmp_path, gpt2_dir, run_name="r", limit=5)
    config.decoding.batch_size = 2
    messages: list[str] = []
    evaluate(config, log=messages.append, progress=False)
    assert path.read_text().startswith(lines) and len(read_jsonl(path)) == 5
    assert any("resuming, 3 of 5" in m for m in messages)
    assert RunDir(first.run.path).complete
