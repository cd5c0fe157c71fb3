"""The offline top-k teacher cache: its rows equal the teacher's top-k recomputed example by example,
it is memory-mapped (no per-token Python objects), k = |V| reproduces dense KD exactly (loss and
trained parameters), it is reused from the artifact store, and a stale cache is a clear error."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from kdbench.synthetic.corpus import FILES, CorpusConfig, build_corpus


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from transformers import AutoTokenizer

    from kdbench.models import make_model

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("cache")
    corpus = root / "corpus"
    corpus.mkdir()
    build_corpus(CorpusConfig(n_people=16, n_cities=4), corpus)
    tokenizer = AutoTokenizer.from_pretrained(str(corpus / "tokenizer"))
    for name, size in (("teacher", "gpt2-micro"), ("student", "gpt2-nano")):
        make_model(size, tokenizer, seed=1, max_positions=256).save_pretrained(str(root / name))
        tokenizer.save_pretrained(str(root / name))
    rows = [json.loads(line) for line in open(corpus / FILES["student_train"])][:10]
    (root / "train.jsonl").write_text("".join(json.dumps({k: r[k] for k in ("instruction", "input", "output")}) + "\n"
                                              for r in rows))
    yield root
    torch.set_num_threads(threads)


def _dataset(tiny, path="train.jsonl"):
    from kdbench.data import build_dataset, load_examples
    from kdbench.models import load_tokenizer

    tokenizer = load_tokenizer(tiny / "student")
    return build_dataset(load_examples(tiny / path), tokenizer, style="compact", max_prompt_length=128,
                         max_length=256), tokenizer


def _build(tiny, tmp_path, k, dataset=None, tokenizer=None):
    from kdbench.models import load_model
    from kdbench.store import ArtifactStore
    from kdbench.teacher_cache import build_topk_cache

    if dataset is None:
        dataset, tokenizer = _dataset(tiny)
    teacher = load_model(tiny / "teacher", trainable=False)
    return build_topk_cache(teacher, dataset, teacher_name=str(tiny / "teacher"), k=k, temperature=1.0,
                            vocab_size=len(tokenizer), store=ArtifactStore(tmp_path / "store"), batch_size=3,
                            pad_token_id=tokenizer.pad_token_id)


def test_cache_rows_equal_the_teachers_topk_per_example(tiny, tmp_path):
    from transformers import AutoModelForCausalLM

    dataset, tokenizer = _dataset(tiny)
    cache, info = _build(tiny, tmp_path, k=16)
    assert not info["reused"] and info["build_seconds"] > 0
    assert isinstance(cache.ids, np.memmap) and cache.ids.dtype == np.dtype("<u2")
    assert isinstance(cache.logprobs, np.memmap) and isinstance(cache.rest, np.memmap)
    n_positions = dataset.n_response_tokens
    assert cache.n_examples == len(dataset) and cache.n_positions == n_positions
    assert (cache.path / "ids.u16").stat().st_size == n_positions * 16 * 2
    assert (cache.path / "logprobs.f32").stat().st_size == n_positions * 16 * 4

    teacher = AutoModelForCausalLM.from_pretrained(str(tiny / "teacher"))
    for index in (0, 3, len(dataset) - 1):  # each example alone, unpadded: batching must not matter
        item = dataset[index]
        with torch.no_grad():
            logits = teacher(input_ids=torch.tensor([item["input_ids"]])).logits[0, :-1]
        counted = torch.tensor(item["labels"][1:]) != -100
        logprobs = torch.log_softmax(logits[counted], -1)
        top, ids = logprobs.topk(16, -1)
        start, end = int(cache.offsets[index]), int(cache.offsets[index + 1])
        assert end - start == int(counted.sum())
        got_ids = torch.from_numpy(np.array(cache.ids[start:end], dtype=np.int64))
        got_lp = torch.from_numpy(np.array(cache.logprobs[start:end]))
        # ids may tie-break differently; compare the log-probs sorted and the ids' own log-probs
        assert torch.allclose(got_lp.sort(-1, descending=True).values, top, atol=1e-5)
        assert torch.allclose(logprobs.gather(-1, got_ids), got_lp, atol=1e-5)
        rest = torch.log1p(-top.exp().sum(-1))
        assert torch.allclose(torch.from_numpy(np.array(cache.rest[start:end])), rest, atol=1e-4)


def test_full_vocabulary_cache_reproduces_dense_kd_and_is_reused(tiny, tmp_path):
    from kdbench.data import PadCollator
    from kdbench.losses import fkl
    from kdbench.models import load_model

    dataset, tokenizer = _dataset(tiny)
    vocab = len(tokenizer)
    cache, _ = _build(tiny, tmp_path, k=vocab)
    batch = PadCollator(tokenizer.pad_token_id)([dataset[i] for i in (1, 4, 7)])
    mask = (batch["labels"][:, 1:] != -100).float()
    student = load_model(tiny / "student", trainable=False)
    teacher = load_model(tiny / "teacher", trainable=False)
    with torch.no_grad():
        s = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1, :vocab]
        t = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1, :vocab]
    sparse = cache.sparse_batch([1, 4, 7], mask, temperature=1.0)
    assert float(fkl(s, sparse, mask)) == pytest.approx(float(fkl(s, t, mask)), rel=1e-5)
    again, info = _build(tiny, tmp_path, k=vocab)
    assert info["reused"] and info["build_seconds"] == 0 and again.path == cache.path


def test_training_on_a_full_vocabulary_cache_equals_online_training(tiny, tmp_path):
    from safetensors.torch import load_file

    from kdbench.train import TrainConfig, train

    def run(name, **extra):
        return train(TrainConfig(method="rkl", student=str(tiny / "student"), teacher=str(tiny / "teacher"),
                                 data=str(tiny / "train.jsonl"), valid_data=str(tiny / "train.jsonl"),
                                 output_dir=str(tmp_path), run_name=name, max_steps=3, batch_size=4,
                                 learning_rate=3e-3, prompt_style="compact", save_steps=100, logging_steps=1,
                                 max_prompt_length=128, max_length=256, cache_dir=str(tmp_path / "store"), **extra),
                     progress=False)

    online = run("online")
    cached = run("cached", teacher_signal="topk", teacher_topk=online.trainer.logit_rows)
    assert cached.cost["teacher_forward_tokens"] == 0 and cached.cost["teacher_cache_forward_tokens"] > 0
    a, b = load_file(str(online.model_dir / "model.safetensors")), load_file(str(cached.model_dir / "model.safetensors"))
    for key in a:
        assert torch.allclose(a[key], b[key], atol=1e-5), key
    assert cached.validation["loss"] == pytest.approx(online.validation["loss"], rel=1e-4)


def test_stale_cache_is_a_clear_error(tiny, tmp_path):
    from kdbench.errors import ConfigError, DataError

    cache, _ = _build(tiny, tmp_path, k=4)
    dataset, _ = _dataset(tiny)
    item = dataset[0]
    n = sum(1 for t in item["labels"][1:] if t != -100)
    wrong = torch.zeros((1, len(item["labels"]) - 1))
    wrong[0, :n + 1] = 1  # one position more than the cache holds
    with pytest.raises(DataError, match="rebuild the cache"):
        cache.sparse_batch([0], wrong, temperature=1.0)
    with pytest.raises(ConfigError, match="temperature"):
        cache.sparse_batch([0], wrong, temperature=2.0)
    assert math.isfinite(float(cache.logprobs[0, 0]))
