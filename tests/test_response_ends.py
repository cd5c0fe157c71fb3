"""Issue 14, point 1: a generated response keeps the end-of-sequence id its model actually emitted, and a
response cut at ``max_new_tokens`` carries none — online (GKD's on-policy batches, DPKD's y_s) and cached
(dSFT / SeqKD's teacher responses, daDPO's y_t and y_s, ADPA's ŷ), for teacher and student alike.

The models declare two EOS ids, as Qwen2.5-Instruct (151645, 151643) and Llama-3-Instruct (128009,
128001) do: the tokenizer's EOS and, in ``generation_config``, a second, larger id chosen so that the
model's own continuation of a prompt stops at it. The old code scored such a response with the smaller
id (or always with the tokenizer's EOS), a token the model never produced.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from tiny_models import build_tiny, write_tiny_data

MAX_NEW_TOKENS = 8


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("ends")
    corpus, tokenizer = build_tiny(root)
    write_tiny_data(root, corpus, n=6, n_pairs=6)
    return root, tokenizer


def _train(root: Path, out: Path, method: str, params: dict, **settings):
    from kdbench.train import TrainConfig, train

    values = dict(method=method, student=str(root / "student"), teacher=str(root / "teacher"),
                  data=str(root / "prompts.jsonl"), valid_data=str(root / "prompts.jsonl"), output_dir=str(out),
                  max_steps=1, batch_size=6, learning_rate=1e-3, prompt_style="compact", max_prompt_length=128,
                  max_length=256, logging_steps=1, save_steps=100, cache_dir=str(out / "cache"), params=params)
    values.update(settings)
    return train(TrainConfig(**values), progress=False)


def _greedy_continuation(model_dir: Path, tokenizer, row: dict, n: int) -> list[int]:
    """The model's greedy continuation (Hugging Face ``generate``, stopping only at the tokenizer's EOS) of
    ``row``'s prompt as the generation stage encodes it (compact prompt, ≤ 128 prompt tokens)."""
    from kdbench.data import format_prompt
    from kdbench.generate import HFBackend
    from kdbench.models import load_model

    model = load_model(str(model_dir), trainable=False)
    prompt = format_prompt(row["instruction"], row.get("input") or "", style="compact")
    ids, _ = HFBackend(model, tokenizer).encode([prompt], 128)[0]
    out = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                         max_new_tokens=n, do_sample=False, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)
    return out[0, len(ids):].tolist()


def _second_eos(continuation: list[int], eos: int, first: int = 0) -> tuple[int, int]:
    """(k, token): the first position k ≥ ``first`` whose token is larger than ``eos`` and new in the
    continuation, so a model that also stops at ``token`` ends its response there, after k tokens. (A
    random tiny model's greedy continuation repeats one token: k is then 0 and the response is that EOS.)"""
    for k, token in enumerate(continuation):
        if k >= first and token > eos and token not in continuation[:k] and eos not in continuation[:k + 1]:
            return k, token
    raise AssertionError(f"no usable second EOS in {continuation}")


def _with_two_eos(source: Path, target: Path, second: int, tokenizer) -> Path:
    """A copy of ``source`` whose generation_config declares [tokenizer EOS, ``second``]."""
    from transformers import GenerationConfig

    shutil.copytree(source, target)
    GenerationConfig(bos_token_id=tokenizer.bos_token_id, pad_token_id=tokenizer.pad_token_id,
                     eos_token_id=[tokenizer.eos_token_id, second]).save_pretrained(str(target))
    return target


def _response(labels: list[int]) -> list[int]:
    return [label for label in labels if label != -100]


def _records(path: Path) -> list[dict]:
    return [json.loads(line) for line in open(path / "generations.jsonl")]


def test_cached_generations_keep_the_emitted_eos_and_cut_ones_have_none(tiny, tmp_path):
    """dSFT / SeqKD (the teacher's cached responses) and daDPO's y_t and y_s: the response of prompt 0 stops
    at the second, larger EOS id and is trained and scored with exactly that id; with max_new_tokens = 1
    the same response is cut and carries no EOS; every stored generation records ``finished``."""
    root, tokenizer = tiny
    eos = tokenizer.eos_token_id
    row = json.loads((root / "prompts.jsonl").read_text().splitlines()[0])
    k_t, teacher_eos = _second_eos(_greedy_continuation(root / "teacher", tokenizer, row, MAX_NEW_TOKENS), eos)
    k_s, student_eos = _second_eos(_greedy_continuation(root / "student", tokenizer, row, MAX_NEW_TOKENS), eos)
    teacher = _with_two_eos(root / "teacher", tmp_path / "teacher2", teacher_eos, tokenizer)
    student = _with_two_eos(root / "student", tmp_path / "student2", student_eos, tokenizer)

    dsft = _train(root, tmp_path / "dsft", "dsft", {"max_new_tokens": MAX_NEW_TOKENS}, teacher=str(teacher))
    stored = _records(Path(json.loads((dsft.run.path / "stages.json").read_text())["teacher_responses"]["path"]))
    assert all(isinstance(r["finished"], bool) for r in stored)
    assert stored[0]["finished"] and stored[0]["eos_token"] == tokenizer.convert_ids_to_tokens(teacher_eos)
    assert teacher_eos > eos  # the old code appended min(EOS ids) or the tokenizer's EOS: never this one
    for record, index in zip(stored, range(len(stored))):
        response = _response(dsft.trainer.train_dataset[index]["labels"])
        if record["finished"]:
            assert response[-1] == tokenizer.convert_tokens_to_ids(record["eos_token"]), record
        else:
            assert response[-1] not in (eos, teacher_eos), record
    assert _response(dsft.trainer.train_dataset[0]["labels"])[-1] == teacher_eos

    # the teacher without the second EOS, one new token: every response is cut and ends with no EOS
    cut = _train(root, tmp_path / "cut", "dsft", {"max_new_tokens": 1})
    stored = _records(Path(json.loads((cut.run.path / "stages.json").read_text())["teacher_responses"]["path"]))
    assert not any(r["finished"] for r in stored) and all(r["eos_token"] is None for r in stored)
    for index in range(len(stored)):
        assert _response(cut.trainer.train_dataset[index]["labels"])[-1] != eos

    ddpo = _train(root, tmp_path / "ddpo", "ddpo", {"max_new_tokens": MAX_NEW_TOKENS, "dsft_settings": {"max_steps": 1}},
                  teacher=str(teacher), student=str(student))
    pair = ddpo.trainer.train_dataset.tokenized[0]
    assert _response(pair["chosen"][1])[-1] == teacher_eos  # y_t as the teacher ended it
    assert _response(pair["rejected"][1])[-1] == student_eos  # y_s as the original student ended it
    assert len(_response(pair["chosen"][1])) == k_t + 1 and len(_response(pair["rejected"][1])) == k_s + 1


def test_adpa_student_responses_keep_the_emitted_eos(tiny, tmp_path):
    """ADPA's ŷ (the starting student's response, generated once and cached) ends with the id it emitted."""
    root, tokenizer = tiny
    eos = tokenizer.eos_token_id
    pref = json.loads((root / "prefs.jsonl").read_text().splitlines()[0])
    k, second = _second_eos(_greedy_continuation(root / "student", tokenizer, pref, MAX_NEW_TOKENS), eos)
    student = _with_two_eos(root / "student", tmp_path / "student2", second, tokenizer)
    result = _train(root, tmp_path, "adpa", {"max_new_tokens": MAX_NEW_TOKENS, "init": "student",
                                             "teacher_dpo_settings": {"max_steps": 1}},
                    student=str(student), data=str(root / "prefs.jsonl"), valid_data=str(root / "prefs.jsonl"))
    y_hat = _response(result.trainer.train_dataset.tokenized[0]["rejected"][1])
    assert second > eos and y_hat[-1] == second and len(y_hat) == k + 1


def test_online_responses_keep_the_emitted_eos(tiny, tmp_path):
    """GKD's on-policy batches and DPKD's online y_s: the student samples in the step; a row that stops at
    the second (larger) EOS id is trained and scored with it, a row cut at the limit carries no EOS."""
    from kdbench.train.pairs import PairCollator
    from kdbench.train.data_sources import TrainCollator

    root, tokenizer = tiny
    eos = tokenizer.eos_token_id

    def check(trainer, replace, rows):
        first = replace()  # the sampled responses with the tokenizer's EOS only
        k, second = _second_eos(first[0], eos, first=1)
        trainer.model.generation_config.eos_token_id = [eos, second]
        again = replace()  # the same draws (per-row seeds), now stopping at the second EOS
        assert again[0] == first[0][:k] + [second], (first[0], again[0])
        for response in again[:rows]:
            if len(response) == MAX_NEW_TOKENS:  # cut at the limit: no EOS appended
                assert response[-1] not in (eos, second)

    gkd = _train(root, tmp_path / "gkd", "gkd", {"max_new_tokens": MAX_NEW_TOKENS, "on_policy_fraction": 1.0})
    trainer = gkd.trainer
    batch = TrainCollator(tokenizer.pad_token_id)([trainer.train_dataset[i] for i in range(len(trainer.train_dataset))])

    def gkd_responses():
        out = trainer.sampling.transform(trainer, dict(batch), 0)
        return [_response(row) for row in out["labels"].tolist()]

    check(trainer, gkd_responses, len(trainer.train_dataset))

    dpkd = _train(root, tmp_path / "dpkd", "dpkd", {"max_new_tokens": MAX_NEW_TOKENS, "init": "student"},
                  lm_weight=0.0)
    trainer = dpkd.trainer
    pairs = PairCollator(tokenizer.pad_token_id)([trainer.train_dataset[i] for i in range(len(trainer.train_dataset))])
    n = pairs["example_index"].numel()

    def dpkd_responses():
        out = trainer.sampling.transform(trainer, dict(pairs), 0)
        return [_response(row) for row in out["labels"][n:].tolist()]

    check(trainer, dpkd_responses, n)
