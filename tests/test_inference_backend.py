"""Inference backend selection (kdbench.inference), as far as a CPU machine without vLLM allows: the
setting, the one-sentence error (exit 2, nothing written) when vLLM is missing, the mapping of the
papers' decoding settings and of vLLM's completions onto kdbench's records. The vLLM generation
itself needs a GPU (docs/scaling.md gives the commands)."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import SimpleNamespace

import pytest
from typer.testing import CliRunner

from kdbench.cli import app
from kdbench.errors import ConfigError
from kdbench.generate import DecodingConfig, HFBackend, example_seed
from kdbench.inference import VLLMBackend, check_backend, make_backend, sampling_params

VLLM_MISSING = importlib.util.find_spec("vllm") is None
runner = CliRunner()


def test_unknown_backend_is_one_sentence():
    with pytest.raises(ConfigError, match="Unknown inference backend 'tgi'; choose one of: transformers, vllm."):
        check_backend("tgi")


@pytest.mark.skipif(not VLLM_MISSING, reason="vLLM is installed here")
def test_missing_vllm_is_one_sentence():
    with pytest.raises(ConfigError, match=r"pip install 'kdbench\[vllm\]'"):
        check_backend("vllm")


@pytest.mark.skipif(not VLLM_MISSING, reason="vLLM is installed here")
@pytest.mark.parametrize("suite", ["dolly", "oll"])
def test_eval_with_missing_vllm_exits_2_before_writing(tmp_path, suite):
    model = tmp_path / "no-model-needed"
    result = runner.invoke(app, ["eval", "--suite", suite, "--model", str(model), "--backend", "vllm",
                                 "--output-dir", str(tmp_path / "runs")])
    assert result.exit_code == 2, result.output
    assert "pip install 'kdbench[vllm]'" in result.output
    assert "Traceback" not in result.output
    assert not (tmp_path / "runs").exists()


def test_eval_setting_selects_backend():
    from kdbench.config import build
    from kdbench.evaluate import EvalConfig

    assert build(EvalConfig, {"model": "m"}).backend == "transformers"
    with pytest.raises(ConfigError, match="Unknown inference backend"):
        build(EvalConfig, {"model": "m", "backend": "nope"})


def test_transformers_backend_is_the_default_hf_backend():
    from transformers import GPT2Config, GPT2LMHeadModel

    class Tokenizer:
        eos_token_id, pad_token_id = 2, 0

        def __len__(self):
            return 10

    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=8, n_head=2, vocab_size=10))
    backend = make_backend("transformers", model=model, tokenizer=Tokenizer())
    assert isinstance(backend, HFBackend) and backend.model is model and 2 in backend.eos_ids


def test_sampling_params_carry_the_per_example_seed():
    sampling = DecodingConfig(temperature=0.7, top_p=0.9, top_k=0)
    params = sampling_params(sampling, 10, "ex-3", [2, 7], 256)
    assert params["seed"] == example_seed(10, "ex-3") != sampling_params(sampling, 10, "ex-4", [2], 256)["seed"]
    assert params["temperature"] == 0.7 and params["top_p"] == 0.9 and params["top_k"] == -1  # vLLM's "off"
    assert params["stop_token_ids"] == [2, 7] and params["max_tokens"] == 256
    greedy = sampling_params(DecodingConfig(greedy=True), None, "ex-3", [2], 16)
    assert greedy["temperature"] == 0.0 and "seed" not in greedy
    with pytest.raises(ConfigError, match="no_repeat_ngram_size"):
        sampling_params(DecodingConfig(no_repeat_ngram_size=6), 10, "ex-3", [2], 16)


def test_vllm_completions_become_kdbench_generations():
    from transformers import AutoTokenizer

    tokenizer_dir = Path(__file__).resolve().parents[2] / "shared" / "models" / "gpt2-tokenizer"
    if not tokenizer_dir.is_dir():
        pytest.skip("shared GPT-2 tokenizer not found")
    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    backend = VLLMBackend.__new__(VLLMBackend)  # no vLLM engine: only the record mapping is exercised
    backend.tokenizer = tokenizer
    backend._text = HFBackend(SimpleNamespace(generation_config=None, forward=lambda input_ids=None: None), tokenizer)
    hello = tokenizer("Hello world", add_special_tokens=False)["input_ids"]
    eos = tokenizer.eos_token_id
    ended = backend._generation("a", (hello, False), SimpleNamespace(token_ids=hello + [eos], finish_reason="stop",
                                                                        stop_reason=None))
    assert (ended.text, ended.finished, ended.eos_token_id, ended.token_ids, ended.new_tokens) == \
        ("Hello world", True, eos, hello, len(hello))
    cut = backend._generation("b", (hello, True), SimpleNamespace(token_ids=hello, finish_reason="length",
                                                                     stop_reason=None))
    assert (cut.finished, cut.eos_token_id, cut.new_tokens, cut.prompt_truncated) == (False, None, len(hello), True)
