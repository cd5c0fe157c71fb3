"""`--answer-protocol fastchat`: the prompts a local model is given for MT-Bench (3 questions x 2 turns) equal what
FastChat 0.2.36's own conversation.py builds for the same model name, and the seeds and sampling settings equal
FastChat's gen_model_answer.py (prompts and settings are compared, not sampled text: CPU and CUDA samples differ).
fschat is the oracle (a dev dependency installed without its server dependencies); kdbench never imports it."""

from __future__ import annotations

import ast
import json
import re
from pathlib import Path

import pytest
from typer.testing import CliRunner

SHARED = Path(__file__).resolve().parents[2] / "shared"
TOKENIZER = SHARED / "models" / "smollm2-135m-instruct"
MT = SHARED / "data" / "mt_bench"
pytestmark = [pytest.mark.skipif(not TOKENIZER.is_dir() or not MT.is_dir(), reason="shared data not found"),
              pytest.mark.filterwarnings("ignore")]
QUESTION_IDS = (81, 111, 141)  # writing (T 0.7), math (greedy), stem (T 0.1)


def _fastchat():
    return pytest.importorskip("fastchat.model.model_adapter", reason="fschat 0.2.36 (the oracle) is not installed; "
                               "pip install --no-deps fschat==0.2.36")


def _fastchat_source(name: str) -> str:
    import fastchat

    return (Path(fastchat.__file__).parent / "llm_judge" / name).read_text()


def _fastchat_temperatures() -> dict:
    """temperature_config from FastChat's common.py (read from the source: the module imports API clients)."""
    tree = ast.parse(_fastchat_source("common.py"))
    for node in tree.body:
        if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", None) == "temperature_config":
            return ast.literal_eval(node.value)
    raise AssertionError("temperature_config not found")


@pytest.fixture(scope="module")
def tiny():
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(TOKENIZER)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    return LlamaForCausalLM(config).eval(), tokenizer


@pytest.fixture(scope="module")
def questions():
    rows = [json.loads(line) for line in (MT / "question.jsonl").read_text().splitlines()]
    return [r for r in rows if r["question_id"] in QUESTION_IDS]


@pytest.mark.parametrize("model_id", ["vicuna-7b-v1.5", "Llama-2-7b-chat-hf", "kd-student-seed1"])
def test_fastchat_prompts_seeds_and_sampling_equal_fastchat(tiny, questions, model_id):
    adapter = _fastchat()
    from kdbench.generate import HFBackend
    from kdbench.judging import answers

    model, tokenizer = tiny
    plan = answers.plan_answers(model, tokenizer, model_id=model_id, protocol="fastchat")
    assert plan.template == adapter.get_conversation_template(model_id).name  # one_shot for the unknown student
    plan.max_new_tokens = 6
    records = answers.generate_answers(model, tokenizer, questions, plan)
    temperatures = _fastchat_temperatures()
    backend = HFBackend(model, tokenizer)
    for question, record in zip(questions, records):
        conversation = adapter.get_conversation_template(model_id)
        for turn, text in enumerate(question["turns"]):
            conversation.append_message(conversation.roles[0], text)
            conversation.append_message(conversation.roles[1], None)
            prompt = conversation.get_prompt()
            assert record["prompts"][turn] == prompt, (model_id, question["question_id"], turn)
            # tokenized as gen_model_answer.py does: tokenizer([prompt]).input_ids
            ids, _ = backend.encode([prompt], 1 << 20, add_special_tokens=plan.add_special_tokens)[0]
            assert ids == tokenizer([prompt]).input_ids[0]
            conversation.update_last_message(record["choices"][0]["turns"][turn])
        # gen_model_answer.py: temperature_config (0.7 otherwise); do_sample iff temperature >= 1e-4; every other
        # setting is the model's generation default (transformers': top_k 50, top_p 1.0)
        temperature = temperatures.get(question["category"], 0.7)
        expected = {"greedy": temperature < 1e-4, "temperature": temperature}
        if temperature >= 1e-4:
            expected.update(top_p=1.0, top_k=50)
        assert record["sampling"] == expected
        # torch.manual_seed(i) for choice i at the start of each question: choice 0
        assert plan.generator_seed(question["question_id"]) == 0
        assert len(record["choices"][0]["turns"]) == 2
    source = _fastchat_source("gen_model_answer.py")
    assert "torch.manual_seed(i)" in source and "temperature < 1e-4" in source and "temperature = 0.7" in source
    assert plan.greedy_below == 1e-4 and plan.default_temperature == 0.7
    assert re.search(r'"--max-new-token",\s*type=int,\s*default=1024', source) and answers.answers_protocol()[
        "max_new_tokens"] == 1024
    conversation = adapter.get_conversation_template(model_id)
    template = answers.conversation_template(plan.template)
    assert (template.stop_str, list(template.stop_token_ids) or None) == (conversation.stop_str,
                                                                          conversation.stop_token_ids)


def test_template_rules_match_fastchat_for_many_model_names():
    adapter = _fastchat()
    from kdbench.judging.fastchat_templates import answers_protocol, template_name

    rules = answers_protocol()["model_rules"]
    names = ["gpt2", "SmolLM2-135M-Instruct", "vicuna-13b-v1.3", "vicuna-7b-v0", "lmsys/vicuna-7b-v1.5", "koala-7b",
             "alpaca-13b", "dolly-v2-12b", "tulu-2-dpo-7b", "mpt-7b-chat", "mpt-30b", "WizardLM-13B-V1.2",
             "wizardlm-7b", "guanaco-33b", "pythia-1.4b", "falcon-7b-instruct", "falcon-40b-chat", "Qwen1.5-0.5B-Chat",
             "Mistral-7B-Instruct-v0.2", "Mixtral-8x7B-Instruct", "zephyr-7b-beta", "TinyLlama-1.1B-Chat-v1.0",
             "openchat_3.5", "Starling-LM-7B-alpha", "Orca-2-7b", "starchat-beta", "codellama-7b-instruct",
             "Nous-Hermes-13b", "notus-7b-v1", "Yi-6B-Chat", "gpt-4", "claude-2", "baichuan2-13b-chat",
             "airoboros-l2-7b-3.1", "runs/kd-seed1/model", "student", "llava-v1.5-7b", "deepseek-llm-7b-chat"]
    for name in names:
        assert template_name(name, rules) == adapter.get_conversation_template(name).name, name


def test_fastchat_protocol_end_to_end_through_the_cli(tiny, tmp_path, monkeypatch):
    """kdbench judge mt-bench --model DIR --answer-protocol fastchat --model-id NAME: the answers are generated with
    FastChat's template into the judge run (generations/mt_bench), then judged; a rerun generates nothing."""
    _fastchat()
    from judge_server import FakeJudgeServer
    from kdbench.cli import app

    model, tokenizer = tiny
    model.generation_config.max_new_tokens = None
    model.save_pretrained(tmp_path / "student")
    tokenizer.save_pretrained(tmp_path / "student")
    data = tmp_path / "data"
    (data / "reference_answer").mkdir(parents=True)
    rows = [line for line in (MT / "question.jsonl").read_text().splitlines()
            if json.loads(line)["question_id"] in QUESTION_IDS]
    (data / "question.jsonl").write_text("\n".join(rows) + "\n")
    for name in ("judge_prompts.jsonl", "reference_answer/gpt-4.jsonl"):
        (data / name).write_text((MT / name).read_text())
    monkeypatch.setenv("KDBENCH_JUDGE_API_KEY", "sk-e2e")
    monkeypatch.setenv("KDBENCH_CACHE", str(tmp_path / "cache"))
    from kdbench import registry

    monkeypatch.setitem(registry.get("judges", "mt_bench_answers").body, "max_new_tokens", 6)
    args = ["judge", "mt-bench", "--model", str(tmp_path / "student"), "--model-id", "vicuna-7b-v1.5",
            "--answer-protocol", "fastchat", "--data-dir", str(data), "--judge-model", "gpt-4", "--out",
            str(tmp_path / "run"), "--timeout-s", "5", "--max-retries", "1"]
    with FakeJudgeServer(api_key="sk-e2e") as server:
        result = CliRunner().invoke(app, args + ["--base-url", server.url])
        assert result.exit_code == 0, result.output
        assert server.total_calls() == 6  # 3 questions x 2 turns
        assert "differs from the pinned FastChat file" in result.output  # the 3-question file is not FastChat's
        answers_file = tmp_path / "run" / "generations" / "mt_bench" / "seed0.jsonl"
        first = answers_file.read_text()
        result = CliRunner().invoke(app, args + ["--base-url", server.url])
        assert result.exit_code == 0 and answers_file.read_text() == first and server.total_calls() == 6
    records = [json.loads(line) for line in first.splitlines()]
    assert [r["question_id"] for r in records] == list(QUESTION_IDS)
    assert records[0]["prompts"][0].startswith("A chat between a curious user")  # vicuna_v1.1
    metrics = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert {r["label"] for r in metrics} == {"vicuna-7b-v1.5"}
    result = CliRunner().invoke(app, args[:-4] + ["--answer-protocol", "kdbench", "--out", str(tmp_path / "run")])
    assert result.exit_code == 2 and "other settings" in result.output
