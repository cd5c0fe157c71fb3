"""Build the embedded benchmark's data: splits, the student's labelled / unlabelled sets, preference
pairs, a multiple-choice set, and a word-level tokenizer saved in Hugging Face format.

Everything is a pure function of :class:`CorpusConfig`, built once into a content-addressed
artifact of the run store.
"""

from __future__ import annotations

import hashlib
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
    label_noise: float = option(
        0.0, "Fraction of the student's labelled responses written by a careless annotator: the instance's "
             "plausible wrong answer instead of the right one (the teacher, which read the world, knows better; "
             "preference pairs, validation and test keep the right answers).")
    language_people: int = option(
        0, "People in a second world with disjoint names whose instances teach the student the world's language "
           "(templates, passages, formats) but none of its facts; 0 = no such corpus (students start untrained).")

    def __post_init__(self):
        if self.n_people < 8 or self.n_cities < 2 or self.n_people < 4 * self.n_cities:
            raise ConfigError("The world needs n_people >= 8, n_cities >= 2 and at least 4 people per city.")
        for name in ("valid_fraction", "test_fraction", "student_label_fraction"):
            if not 0.0 < getattr(self, name) < 1.0:
                raise ConfigError(f"Setting {name} must be between 0 and 1 (exclusive).")
        if not 0.0 <= self.label_noise < 0.5:
            raise ConfigError("Setting label_noise must be in [0, 0.5): a majority of the labels must be right.")
        if self.language_people and self.language_people < 8:
            raise ConfigError("Setting language_people must be 0 (no language corpus) or at least 8.")
        if self.valid_fraction + self.test_fraction >= 0.9:
            raise ConfigError("valid_fraction + test_fraction must leave at least 10% of the data for training.")


FILES = {
    "teacher_train": "teacher_train.jsonl",      # all labelled training instances + world documents
    "student_train": "student_train.jsonl",      # the student's labelled subset
    "student_unlabelled": "student_unlabelled.jsonl",  # prompts only
    "student_all": "student_all.jsonl",          # every training instance, labelled as the student's subset is
    "preferences": "preferences.jsonl",          # chosen / rejected on the student's labelled prompts
    "preferences_swapped": "preferences_swapped.jsonl",  # the same pairs, chosen and rejected swapped (a control)
    "validation": "validation.jsonl",
    "validation_preferences": "validation_preferences.jsonl",  # held-out pairs for preference runs' selection
    "validation_preferences_swapped": "validation_preferences_swapped.jsonl",  # the control's held-out pairs
    "test": "test.jsonl",
    "multiple_choice": "multiple_choice.jsonl",  # four-option questions on held-out facts
    "language": "language.jsonl",                # another world's instances: language without this world's facts
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


def noisy_label(key: str, seed: int, rate: float) -> bool:
    """Whether the careless annotator got instance ``key`` wrong (a deterministic draw per key)."""
    digest = int(hashlib.sha256(f"noise:{seed}:{key}".encode()).hexdigest()[:12], 16) / float(16 ** 12)
    return digest < rate


def language_rows(config: CorpusConfig, exclude_names: set[str]) -> list[dict]:
    """Every instance and document of a second world (its own seed, names disjoint from ``exclude_names``):
    the language and skills of the benchmark's tasks with none of the benchmark world's facts."""
    cities = max(2, min(config.n_cities, config.language_people // 4))
    world = make_world(config.language_people, cities, seed=config.seed + 10_000, exclude_names=exclude_names)
    rows = instances(world, config.seed + 10_000) + world_documents(world)
    return [{k: r[k] for k in ("key", "category", "instruction", "input", "output")} for r in rows]


#: The reward model the embedded benchmark's preference pairs are scored by (``score_chosen`` / ``score_rejected``,
#: DDPO-RM's reward margin): the world knows every instance's right answer, so its reward of a response is the
#: Rouge-L F1 of the response against that answer (1 for the right answer, less for the plausible wrong one).
ORACLE_REWARD = "world oracle: Rouge-L F1 of the response against the world's right answer"


def oracle_reward(response: str, right_answer: str) -> float:
    """The embedded world's reward of ``response`` (:data:`ORACLE_REWARD`), in [0, 1]."""
    from kdbench.metrics import rouge_l

    return round(rouge_l(response, right_answer), 6)


def _scored_pair(row: dict) -> dict:
    """A preference pair of the world (the right answer chosen, the plausible wrong one rejected) with the oracle
    reward of each response."""
    return {"key": row["key"], "instruction": row["instruction"], "input": row["input"], "chosen": row["output"],
            "rejected": row["rejected"], "score_chosen": oracle_reward(row["output"], row["output"]),
            "score_rejected": oracle_reward(row["rejected"], row["output"])}


def _swapped(pair: dict) -> dict:
    """The same pair with chosen and rejected swapped, each keeping its score (the dpo_swapped control)."""
    return {**pair, "chosen": pair["rejected"], "rejected": pair["chosen"], "score_chosen": pair["score_rejected"],
            "score_rejected": pair["score_chosen"]}


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
    # the student's labels: right, or (at rate label_noise, one draw per instance) the plausible wrong answer
    noisy = {r["key"] for r in train
             if r["rejected"] != r["output"] and noisy_label(r["key"], config.seed, config.label_noise)}
    # the student's files hold only what an annotated instruction set holds: no references, no wrong answers
    student_all = [{**{k: r[k] for k in ("key", "category", "instruction", "input")},
                    "output": r["rejected"] if r["key"] in noisy else r["output"]} for r in train]
    student_train = [r for r in student_all if r["key"] in labelled_keys]
    unlabelled = [{k: r[k] for k in ("key", "category", "instruction", "input")} for r in train
                  if r["key"] not in labelled_keys]
    preferences = [_scored_pair(r) for r in train if r["key"] in labelled_keys and r["rejected"] != r["output"]]
    swapped = [_swapped(p) for p in preferences]
    valid_pairs = [_scored_pair(r) for r in splits["validation"] if r["rejected"] != r["output"]]
    teacher_train = train + world_documents(world)
    names = {p.name for p in world.people} | {c.name for c in world.cities}
    language = language_rows(config, names) if config.language_people else []
    mc = multiple_choice_questions(world, config.seed, sorted(r["key"] for r in splits["test"]
                                                              if r["category"] == "open_qa"))

    # evaluation files list every valid reference in ``output`` (MiniLLM's format allows a list)
    evaluation = {name: [{**r, "output": r["references"]} for r in splits[name]] for name in ("validation", "test")}
    outputs = {"teacher_train": teacher_train, "student_train": student_train, "student_unlabelled": unlabelled,
               "student_all": student_all, "preferences": preferences, "preferences_swapped": swapped,
               "validation": evaluation["validation"], "validation_preferences": valid_pairs,
               "validation_preferences_swapped": [_swapped(p)
                                                  for p in valid_pairs],
               "test": evaluation["test"], "multiple_choice": mc, "language": language}
    for name, records in outputs.items():
        with open(out_dir / FILES[name], "w", encoding="utf-8") as handle:
            for record in records:
                handle.write(json.dumps(record, sort_keys=True) + "\n")
    train_tokenizer([r for recs in outputs.values() for r in recs], out_dir / "tokenizer")
    return {"counts": {name: len(records) for name, records in outputs.items()},
            "noisy_labels": {"student_train": len(noisy & labelled_keys), "student_all": len(noisy)},
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
