"""Where training data comes from: local files or the Hugging Face hub (pinned revision), plain-text
corpora for LM-loss terms, and the dataset/collator wrappers the engine needs.

Data specs:

* a local ``.jsonl`` / ``.json`` / ``.parquet`` file (:func:`kdbench.data.load_examples`);
* ``hf://OWNER/NAME@REVISION`` or ``hf://OWNER/NAME@REVISION:SPLIT`` — a hub dataset at a pinned
  revision (a commit sha or tag; required, so a run is reproducible). It is downloaded once through
  ``datasets`` and stored as JSONL in the artifact store, then read like a local file.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from kdbench.errors import ConfigError, DataError

HUB_PREFIX = "hf://"


@dataclass(frozen=True)
class HubSpec:
    repo: str
    revision: str
    split: str


def parse_hub_spec(spec: str, default_split: str = "train") -> HubSpec:
    """``hf://OWNER/NAME@REVISION[:SPLIT]`` → :class:`HubSpec`; a missing revision is a ConfigError."""
    body = spec[len(HUB_PREFIX):]
    if "@" not in body:
        raise ConfigError(f"Hub data {spec!r} has no pinned revision; write hf://OWNER/NAME@REVISION (a commit sha or "
                          "tag) so the run can be reproduced.")
    repo, rest = body.split("@", 1)
    revision, _, split = rest.partition(":")
    if repo.count("/") != 1 or not all(repo.split("/")) or not revision:
        raise ConfigError(f"Hub data {spec!r} must look like hf://OWNER/NAME@REVISION or hf://OWNER/NAME@REVISION:SPLIT.")
    return HubSpec(repo, revision, split or default_split)


def hub_to_jsonl(spec: HubSpec, store=None, log: Callable[[str], None] | None = None) -> Path:
    """Download ``spec`` with ``datasets`` (once, into the artifact store) and return its JSONL file."""
    from kdbench.store import ArtifactStore

    def build(tmp: Path) -> dict:
        try:
            import datasets
        except ImportError:  # pragma: no cover - a declared dependency
            raise DataError("Reading hub datasets needs the datasets package: pip install datasets.") from None
        try:
            rows = datasets.load_dataset(spec.repo, revision=spec.revision, split=spec.split)
        except Exception as err:  # datasets raises many unrelated types for a bad repo/revision/split
            raise DataError(f"Could not load {spec.repo}@{spec.revision} split {spec.split} from the hub "
                            f"({str(err).strip().splitlines()[0][:160] if str(err).strip() else type(err).__name__}); "
                            "check the name, revision and split.") from None
        with open(tmp / "data.jsonl", "w", encoding="utf-8") as handle:
            for row in rows:
                handle.write(json.dumps(row, default=str) + "\n")
        return {"rows": len(rows)}

    store = store or ArtifactStore()
    artifact = store.get_or_build("hub-data", {"repo": spec.repo, "revision": spec.revision, "split": spec.split},
                                  build, log=log)
    return artifact.path / "data.jsonl"


def resolve_data_path(spec: str, *, default_split: str = "train", store=None, log=None) -> str:
    """A local path for a data spec (hub specs are materialized as JSONL)."""
    if spec.startswith(HUB_PREFIX):
        return str(hub_to_jsonl(parse_hub_spec(spec, default_split), store=store, log=log))
    return spec


def load_text_corpus(path: str | Path, tokenizer, block_size: int) -> list[list[int]]:
    """A plain-text corpus as token blocks for an LM-loss term.

    ``.txt``: documents separated by blank lines; ``.jsonl``: one ``{"text": ...}`` per line. Each
    document is tokenized with EOS appended, the documents are concatenated, and the stream is cut
    into blocks of ``block_size`` tokens (the last, shorter block is kept if it has ≥ 2 tokens).
    """
    from kdbench.data import iter_jsonl_records

    path = Path(path)
    if not path.is_file():
        raise DataError(f"Plain-text corpus not found: {path}; pass a .txt or .jsonl file.")
    if path.suffix == ".jsonl":
        documents = []
        for number, row in iter_jsonl_records(path):
            text = row.get("text")
            if not isinstance(text, str):
                raise DataError(f"{path}, line {number} has no 'text' string; each line must be {{\"text\": ...}}.")
            documents.append(text)
    else:
        from kdbench.textfile import read_text

        documents = [d.strip() for d in read_text(path).split("\n\n") if d.strip()]
    if not documents:
        raise DataError(f"{path} holds no text; give a corpus with at least one document.")
    stream: list[int] = []
    for document in documents:
        stream.extend(tokenizer(document, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id])
    blocks = [stream[i:i + block_size] for i in range(0, len(stream), block_size)]
    return [b for b in blocks if len(b) >= 2]


class IndexedDataset:
    """Wraps a tokenized data set: each item also carries its ``example_index`` (row of the teacher
    cache) and ``prompt_length`` (for on-policy generation)."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict:
        item = self.dataset.items[index]
        return {"input_ids": item.input_ids, "labels": item.labels, "example_index": index,
                "prompt_length": item.prompt_length}


class TrainCollator:
    """Right-pads ``input_ids`` / ``labels`` (:class:`kdbench.data.PadCollator`) and stacks the
    per-example ``example_index`` and ``prompt_length``."""

    def __init__(self, pad_token_id: int):
        from kdbench.data import PadCollator

        self.pad = PadCollator(pad_token_id)

    def __call__(self, features: list[dict]) -> dict:
        import torch

        batch = self.pad([{"input_ids": f["input_ids"], "labels": f["labels"]} for f in features])
        batch["example_index"] = torch.tensor([f["example_index"] for f in features], dtype=torch.long)
        batch["prompt_length"] = torch.tensor([f["prompt_length"] for f in features], dtype=torch.long)
        return batch


@dataclass
class LMSource:
    """A tokenized plain-text corpus ([n_blocks] lists of token ids) for an LM-loss term."""

    blocks: list
    batch_size: int
    seed: int
    pad_token_id: int
    order: list = field(default_factory=list)

    def __post_init__(self):
        import random

        self.order = list(range(len(self.blocks)))
        random.Random(self.seed).shuffle(self.order)

    def batch(self, global_micro_index: int):
        """(input_ids, attention_mask, labels) [b, L] of micro-batch ``global_micro_index`` (a pure
        function of the index, so resuming draws the same LM batches)."""
        import torch

        n = len(self.order)
        picks = [self.blocks[self.order[(global_micro_index * self.batch_size + j) % n]] for j in range(self.batch_size)]
        longest = max(len(p) for p in picks)
        ids = torch.full((len(picks), longest), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(picks), longest), -100, dtype=torch.long)
        attention = torch.zeros((len(picks), longest), dtype=torch.long)
        for row, block in enumerate(picks):
            ids[row, :len(block)] = torch.tensor(block)
            labels[row, :len(block)] = torch.tensor(block)
            attention[row, :len(block)] = 1
        return ids, attention, labels
