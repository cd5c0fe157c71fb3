"""Shared test setup: a small synthetic corpus and tiny teacher/student models that share its tokenizer."""

from __future__ import annotations

from pathlib import Path

from kdbench.synthetic.corpus import CorpusConfig, build_corpus


def build_tiny(root: Path, *, teacher_name: str = "teacher", student_name: str = "student"):
    """Write ``root/corpus`` (16 people, 4 cities) and ``root/<teacher_name>`` (gpt2-micro) and
    ``root/<student_name>`` (gpt2-nano); returns (corpus folder, tokenizer)."""
    from transformers import AutoTokenizer

    from kdbench.models import make_model

    corpus = root / "corpus"
    corpus.mkdir(parents=True, exist_ok=True)
    build_corpus(CorpusConfig(n_people=16, n_cities=4), corpus)
    tokenizer = AutoTokenizer.from_pretrained(str(corpus / "tokenizer"))
    for name, size in ((teacher_name, "gpt2-micro"), (student_name, "gpt2-nano")):
        make_model(size, tokenizer, seed=0, max_positions=256).save_pretrained(str(root / name))
        tokenizer.save_pretrained(str(root / name))
    return corpus, tokenizer


def write_tiny_data(root: Path, corpus: Path, *, n: int = 8, n_pairs: int = 8,
                    prompts_name: str = "prompts.jsonl") -> list[dict]:
    """Write ``root/<prompts_name>`` (the corpus's first ``n`` labelled student rows: instruction, input,
    output) and ``root/prefs.jsonl`` (its first ``n_pairs`` preference pairs); return those rows."""
    import json

    from kdbench.synthetic.corpus import FILES

    rows = [json.loads(line) for line in open(corpus / FILES["student_train"])][:n]
    (root / prompts_name).write_text("".join(json.dumps({k: r[k] for k in ("instruction", "input", "output")}) + "\n"
                                             for r in rows))
    prefs = [json.loads(line) for line in open(corpus / FILES["preferences"])][:n_pairs]
    (root / "prefs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in prefs))
    return rows


def train_tiny(root: Path, out: Path, method: str, params: dict | None = None, **settings):
    """One run of ``method`` on the tiny models and prompts of ``root`` (as the CLI calls ``train``): 12 steps of
    8 at 1e-3, constant schedule, validation on 20%; ``settings`` override any of it."""
    from kdbench.train import TrainConfig, train

    values = dict(method=method, student=str(root / "student"), teacher=str(root / "teacher"),
                  data=str(root / "prompts.jsonl"), valid_fraction=0.2, output_dir=str(out), max_steps=12,
                  batch_size=8, learning_rate=1e-3, warmup_ratio=0.0, lr_scheduler="constant", prompt_style="compact",
                  logging_steps=1, save_steps=100, generation_batch_size=64, seed=3, cache_dir=str(root / "cache"),
                  params=dict(params or {}))
    values.update(settings)
    return train(TrainConfig(**values), progress=False)


def loss_log(result) -> list[dict]:
    """The training-loss rows of a run's train_log.jsonl."""
    import json

    return [r for r in map(json.loads, open(result.run.path / "train_log.jsonl")) if "loss" in r]
