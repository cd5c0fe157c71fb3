"""Build the embedded benchmark's data: splits, the student's labelled / unlabelled sets, preference
pairs, a multiple-choice set, and a word-level tokenizer saved in Hugging Face format.

Everything is a pure function of :class:`CorpusConfig`, built once into a content-addressed
artifact of the run store.
"""

from __future__ import annotations

import json
import random
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from kdbench.config import option
from kdbench.errors import ConfigError
from kdbench.synthetic.world import fact_sentences, instances, make_world, multiple_choice_questions, split_of

SPECIAL_TOKENS = {"pad_token": "<pad>", "unk_token": "<unk>", "bos_token": "<bos>", "eos_token": "<eos>"}


@dataclass
class CorpusConfig:
    n_people: int = option(60, "People in the generated world (each brings ~19 instances).")
    n_cities: int = option(12, "Cities in the world (people are spread evenly over them).")
    seed: int = option(0, "Seed of the world and of the split assignment.")
    valid_fraction: float = option(0.1, "Fraction of instances in the validation split.")
    test_fraction: float = option(0.2, "Fraction of instances in the test split.")
    student_label_fraction: float = option(
        0.3, "Fraction of the training instances whose responses the student may see; the rest are "
             "unlabelled prompts (usable by SeqKD / on-policy methods).")

    def __post_init__(self):
        if self.n_people < 8 or self.n_cities < 2 or self.n_people < 4 * self.n_cities:
            raise ConfigError("The world needs n_people >= 8, n_cities >= 2 and at least 4 people per city.")
        for name in ("valid_fraction", "test_fraction", "student_label_fraction"):
            if not 0.0 < getattr(self, name) < 1.0:
                raise ConfigError(f"Setting {name} must be between 0 and 1 (exclusive).")
        if self.valid_fraction + self.test_fraction >= 0.9:
            raise ConfigError("valid_fraction + test_fraction must leave at least 10% of the data for training.")


FILES = {
    "teacher_train": "teacher_train.jsonl",      # all labelled training instances + world documents
    "student_train": "student_train.jsonl",      # the student's labelled subset
    "student_unlabelled": "student_unlabelled.jsonl",  # prompts only
    "preferences": "preferences.jsonl",          # chosen / rejected on the student's labelled prompts
    "validation": "validation.jsonl",
    "test": "test.jsonl",
    "multiple_choice": "multiple_choice.jsonl",  # four-option questions on held-out facts
}


def world_documents(world) -> list[dict]:
    """The world as text: every person's facts and every city's facts, as instruction rows."""
    rng = random.Random(0)
    docs = []
    for p in world.people:
        sentences = list(fact_sentences(p).values())
        rng.shuffle(sentences)
        docs.append({"key": f"world/{p.name}", "category": "world", "instruction": f"state the facts about {p.name} .",
                     "input": "", "output": " ".join(sentences)})
    for c in world.cities:
        docs.append({"key": f"world/{c.name}", "category": "world",
                     "instruction": f"state the facts about the city of {c.name} .", "input": "",
                     "output": f"{c.name} is a city in the {c.region} . {c.name} is famous for its {c.product} . "
                               + " ".join(f"{r} lives in {c.name} ." for r in c.residents)})
    return docs


def build_corpus(config: CorpusConfig, out_dir: Path) -> dict:
    """Write the corpus files and the tokenizer into ``out_dir``; returns counts."""
    out_dir = Path(out_dir)
    world = make_world(config.n_people, config.n_cities, config.seed)
    rows = instances(world, config.seed)
    keys = [r["key"] for r in rows]
    assert len(keys) == len(set(keys)), "instance keys must be unique"
    fractions = (1 - config.valid_fraction - config.test_fraction, config.valid_fraction, config.test_fraction)
    splits: dict[str, list[dict]] = {"train": [], "validation": [], "test": []}
    for row in rows:
        splits[split_of(row["key"], config.seed, fractions)].append(row)

    rng = random.Random(f"student-{config.seed}")
    train = sorted(splits["train"], key=lambda r: r["key"])
    labelled_keys = set(rng.sample([r["key"] for r in train], k=max(1, round(config.student_label_fraction * len(train)))))
    student_train = [r for r in train if r["key"] in labelled_keys]
    unlabelled = [{k: r[k] for k in ("key", "category", "instruction", "input")} for r in train
                  if r["key"] not in labelled_keys]
    preferences = [{"key": r["key"], "instruction": r["instruction"], "input": r["input"], "chosen": r["output"],
                    "rejected": r["rejected"]} for r in student_train if r["rejected"] != r["output"]]
    teacher_train = train + world_documents(world)
    mc = multiple_choice_questions(world, config.seed, sorted(r["key"] for r in splits["test"]
                                                              if r["category"] == "open_qa"))

    # evaluation files list every valid reference in ``output`` (MiniLLM's format allows a list)
    evaluation = {name: [{**r, "output": r["references"]} for r in splits[name]] for name in ("validation", "test")}
    outputs = {"teacher_train": teacher_train, "student_train": student_train, "student_unlabelled": unlabelled,
               "preferences": preferences, "validation": evaluation["validation"], "test": evaluation["test"],
               "multiple_choice": mc}
    for name, records in outputs.items():
        with open(out_dir / FILES[name], "w", encoding="utf-8") as handle:
            for record in records:
                handle.write(json.dumps(record, sort_keys=True) + "\n")
    train_tokenizer([r for recs in outputs.values() for r in recs], out_dir / "tokenizer")
    return {"counts": {name: len(records) for name, records in outputs.items()},
            "categories": dict(Counter(r["category"] for r in splits["test"]))}


def _texts(record: dict) -> list[str]:
    texts = [record.get(k, "") for k in ("instruction", "input", "output", "chosen", "rejected", "question")]
    texts += record.get("references", []) + record.get("choices", [])
    return [t for t in texts if isinstance(t, str) and t]


def train_tokenizer(records: list[dict], out_dir: Path) -> None:
    """A word-level tokenizer (``tokenizers`` library) saved as a Hugging Face fast tokenizer, so the
    embedded benchmark runs the same code path as a real model."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from tokenizers.trainers import WordLevelTrainer
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.WordLevel(unk_token=SPECIAL_TOKENS["unk_token"]))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    # prompt-template words are part of the vocabulary too
    template_words = ["instruction", ":", "input", "response", "###", "below", "is", "an", "that", "describes",
                      "a", "task", "write", "appropriately", "completes", "the", "request", "."]
    trainer = WordLevelTrainer(special_tokens=list(SPECIAL_TOKENS.values()), min_frequency=1)
    corpus = [text for record in records for text in _texts(record)] + [" ".join(template_words)]
    tokenizer.train_from_iterator(corpus, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, **SPECIAL_TOKENS)
    fast.model_max_length = 512
    fast.save_pretrained(str(out_dir))


def load_corpus_rows(corpus_dir: Path, name: str) -> list[dict]:
    path = Path(corpus_dir) / FILES[name]
    with open(path, encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]
