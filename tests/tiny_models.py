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
