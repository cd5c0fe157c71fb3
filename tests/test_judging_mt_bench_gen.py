"""MT-Bench answer generation with a tiny randomly initialised Llama and SmolLM2's chat template."""

from __future__ import annotations

from pathlib import Path

import pytest

TOKENIZER = Path(__file__).resolve().parents[2] / "shared" / "models" / "smollm2-135m-instruct"
pytestmark = pytest.mark.skipif(not TOKENIZER.is_dir(), reason=f"tokenizer not found at {TOKENIZER}")

QUESTIONS = [
    {"question_id": 81, "category": "writing", "turns": ["Write a haiku.", "Now make it rhyme."]},
    {"question_id": 111, "category": "math", "turns": ["What is 2+2?", "And times 3?"]},
]


@pytest.fixture(scope="module")
def tiny():
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(TOKENIZER)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    return LlamaForCausalLM(config).eval(), tokenizer


def _greedy(model, tokenizer, messages, max_new_tokens):
    import torch

    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)["input_ids"]
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=tokenizer.eos_token_id)
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip()


def test_two_turns_with_chat_template_and_category_temperatures(tiny, tmp_path):
    from kdbench.judging import answers

    model, tokenizer = tiny
    plan = answers.plan_answers(model, tokenizer, model_id="tiny", protocol="kdbench")
    plan.max_new_tokens = 6
    records = answers.generate_answers(model, tokenizer, QUESTIONS, plan, path=tmp_path / "seed0.jsonl")
    assert [r["question_id"] for r in records] == [81, 111]
    assert all(len(r["choices"][0]["turns"]) == 2 and len(r["prompts"]) == 2 for r in records)
    # writing samples at 0.7 with the protocol's explicit top_p / top_k; math is greedy (FastChat temperature_config)
    assert records[0]["sampling"] == {"greedy": False, "temperature": 0.7, "top_p": 1.0, "top_k": 0}
    assert records[1]["sampling"] == {"greedy": True, "temperature": 0.0}

    # the greedy (math) answers equal an independent two-turn computation through the chat template
    q = QUESTIONS[1]
    first = _greedy(model, tokenizer, [{"role": "user", "content": q["turns"][0]}], 6)
    second = _greedy(model, tokenizer, [{"role": "user", "content": q["turns"][0]},
                                        {"role": "assistant", "content": first},
                                        {"role": "user", "content": q["turns"][1]}], 6)
    assert records[1]["choices"][0]["turns"] == [first, second]

    # sampled answers are reproducible (seed + question id) and a rerun keeps what is on disk
    again = answers.generate_answers(model, tokenizer, QUESTIONS, plan)
    assert [r["choices"] for r in again] == [r["choices"] for r in records]
    kept = answers.generate_answers(model, tokenizer, QUESTIONS, plan, path=tmp_path / "seed0.jsonl")
    assert [r["tstamp"] for r in kept] == [r["tstamp"] for r in records]


def test_default_limit_and_temperatures_are_fastchat_s():
    from kdbench import registry

    body = registry.get("judges", "mt_bench_answers").body
    assert body["max_new_tokens"] == 1024 and body["default_temperature"] == 0.7
    assert body["temperature"]["stem"] == body["temperature"]["humanities"] == 0.1
    assert body["temperature"]["roleplay"] == 0.7
