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
