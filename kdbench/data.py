"""Training data: prompt/response files, prompt templates, tokenization and collation.

A training row has ``instruction``, optional ``input`` and ``output`` (MiniLLM / Alpaca format);
``prompt`` + ``response`` is accepted too. Rows are validated up front: a malformed row is one
:class:`~kdbench.errors.DataError` naming the file and line.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kdbench.errors import DataError

# A compact template for the embedded benchmark's word-level models (short sequences on a CPU).
COMPACT_NO_INPUT = "instruction : {instruction} response :"
COMPACT_WITH_INPUT = "instruction : {instruction} input : {input} response :"

PROMPT_STYLES = ("alpaca", "compact", "chat")

# MiniLLM's prompt (microsoft/LMOps minillm/tools/process_data_dolly.py, Stanford Alpaca's template):
# the "### Input:" block appears only when the input is non-empty.
ALPACA_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
ALPACA_NO_INPUT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)


def alpaca_prompt(instruction: str, input: str | None = None) -> str:
    """MiniLLM's Alpaca prompt; the ``### Input:`` block only when ``input`` is a non-empty string.

    Like MiniLLM, a whitespace-only input still counts as non-empty (``len(input) == 0`` is its test).
    """
    if input:
        return ALPACA_WITH_INPUT.format(instruction=instruction, input=input)
    return ALPACA_NO_INPUT.format(instruction=instruction)


def format_prompt(instruction: str, input_text: str = "", *, style: str = "alpaca", tokenizer: Any = None) -> str:
    """The prompt text for one example.

    ``alpaca``: MiniLLM's Alpaca template (an ``### Input:`` block only when ``input`` is non-empty).
    ``compact``: the embedded benchmark's short template. ``chat``: the tokenizer's own chat template
    (one user turn; instruction and input joined by a blank line), with the generation prompt added.
    """
    if style == "alpaca":
        return alpaca_prompt(instruction, input_text)
    input_text = (input_text or "").strip()
    if style == "compact":
        template = COMPACT_WITH_INPUT if input_text else COMPACT_NO_INPUT
        return template.format(instruction=instruction.strip(), input=input_text)
    if style == "chat":
        if tokenizer is None or not getattr(tokenizer, "chat_template", None):
            raise DataError("The model's tokenizer has no chat template; use --prompt-style alpaca instead.")
        content = instruction.strip() + (f"\n\n{input_text}" if input_text else "")
        return tokenizer.apply_chat_template([{"role": "user", "content": content}], tokenize=False,
                                             add_generation_prompt=True)
    raise DataError(f"Unknown prompt style {style!r}; choose one of: {', '.join(PROMPT_STYLES)}.")


@dataclass
class Example:
    """One prompt/response example (``output`` may be empty for unlabelled prompts)."""

    instruction: str
    input: str
    output: str
    id: str = ""
    extra: dict | None = None


def read_rows(path: str | Path) -> list[dict]:
    """Rows of a JSONL, JSON (list) or Parquet file, each a dict; clear errors for bad files (read through
    :mod:`kdbench.textfile`: a BOM, CRLF line ends and non-UTF-8 bytes are handled there)."""
    from kdbench.textfile import read_json

    path = Path(path)
    if not path.exists():
        raise DataError(f"Data file not found: {path}; check the path.")
    if path.is_dir():
        raise DataError(f"{path} is a directory; pass a .jsonl, .json or .parquet file.")
    if path.suffix == ".parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise DataError("Reading Parquet needs pyarrow: pip install pyarrow.") from None
        try:
            return pq.read_table(path).to_pylist()
        except Exception as err:  # pyarrow raises its own error types for a damaged file
            raise DataError(f"{path} is not a readable Parquet file ({type(err).__name__}); re-export it.") from None
    if path.suffix == ".json":
        data = read_json(path)
        if not isinstance(data, list) or not all(isinstance(row, dict) for row in data):
            raise DataError(f"{path} must hold a JSON list of objects.")
        return data
    return [row for _, row in iter_jsonl_records(path)]


def iter_jsonl_records(path: str | Path):
    """(line number, record) for each non-blank line of a JSONL file (:func:`kdbench.textfile.iter_jsonl`):
    a line that is not a JSON object, or not UTF-8, is a :class:`DataError` naming the file and line."""
    from kdbench.textfile import iter_jsonl

    return iter_jsonl(path)


def load_examples(path: str | Path, *, require_output: bool = True) -> list[Example]:
    """Prompt/response examples from a file; every row checked for its fields."""
    rows = read_rows(path)
    if not rows:
        raise DataError(f"{path} holds no records; give a file with at least one example.")
    examples = []
    for number, row in enumerate(rows, start=1):
        output = row.get("output", row.get("response", row.get("chosen")))
        if isinstance(output, list):
            output = output[0] if output else None

        def check_output() -> None:
            if require_output and (not isinstance(output, str) or not output.strip()):
                raise DataError(f"{path}, record {number} has no 'output' (or 'response') text; every record needs one.")

        examples.append(prompt_example(row, path, number, output=output or "", check_response=check_output, extra=row))
    return examples


def prompt_example(row: dict, path, number: int, *, output: str = "", check_response=None, extra=None,
                   what: str = "record") -> Example:
    """The :class:`Example` of one data row: its ``instruction`` (or ``prompt``) and optional text ``input``
    checked, each fault one sentence naming the file and record; ``check_response`` checks the row's
    response fields in between (so a row's first fault is the one reported)."""
    instruction = row.get("instruction", row.get("prompt"))
    if not isinstance(instruction, str) or not instruction.strip():
        raise DataError(f"{path}, record {number} has no 'instruction' (or 'prompt') text; every {what} needs one.")
    if check_response is not None:
        check_response()
    input_text = row.get("input") or ""
    if not isinstance(input_text, str):
        raise DataError(f"{path}, record {number} has a non-text 'input'; it must be a string.")
    return Example(instruction=instruction, input=input_text, output=output,
                   id=str(row.get("id", row.get("key", number - 1))), extra=extra)


@dataclass
class TokenizedExample:
    input_ids: list[int]
    labels: list[int]
    prompt_length: int
    truncated: bool


def tokenize_example(example: Example, tokenizer, *, style: str, max_prompt_length: int, max_length: int,
                     response: str | None = None, append_eos: bool = True,
                     eos_token_id: int | None = None) -> TokenizedExample:
    """Prompt + response + EOS; labels are -100 on the prompt. The prompt is cut from the left to
    ``max_prompt_length`` tokens and the whole to ``max_length``; ``truncated`` records either cut.
    ``eos_token_id``: the end token (default the tokenizer's; a generated response keeps the one its
    model emitted); ``append_eos=False`` for a generated response cut at its token limit."""
    prompt = format_prompt(example.instruction, example.input, style=style, tokenizer=tokenizer)
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    text = example.output if response is None else response
    separator = " " if style == "compact" else ""
    end = [tokenizer.eos_token_id if eos_token_id is None else eos_token_id] if append_eos else []
    response_ids = tokenizer(separator + text, add_special_tokens=False)["input_ids"] + end
    if tokenizer.bos_token_id is not None and style != "chat" and getattr(tokenizer, "add_bos_token", False):
        prompt_ids = [tokenizer.bos_token_id] + prompt_ids
    truncated = False
    if len(prompt_ids) > max_prompt_length:
        prompt_ids, truncated = prompt_ids[-max_prompt_length:], True
    room = max_length - len(prompt_ids)
    if len(response_ids) > room:
        response_ids, truncated = response_ids[: max(room, 1)], True
    ids = prompt_ids + response_ids
    return TokenizedExample(ids, [-100] * len(prompt_ids) + response_ids, len(prompt_ids), truncated)


class SFTDataset:
    """A list of tokenized examples usable as a torch Dataset (``__getitem__`` gives a dict)."""

    def __init__(self, items: list[TokenizedExample]):
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict:
        item = self.items[index]
        return {"input_ids": item.input_ids, "labels": item.labels}

    @property
    def n_truncated(self) -> int:
        return sum(item.truncated for item in self.items)

    @property
    def n_response_tokens(self) -> int:
        """Response tokens a step trains on: labels after the first position (nothing predicts token 0)."""
        return sum(sum(1 for label in item.labels[1:] if label != -100) for item in self.items)


def build_dataset(examples: list[Example], tokenizer, *, style: str, max_prompt_length: int, max_length: int) -> SFTDataset:
    return SFTDataset([tokenize_example(e, tokenizer, style=style, max_prompt_length=max_prompt_length,
                                        max_length=max_length) for e in examples])


class PadCollator:
    """Right-pads ``input_ids`` (pad id) and ``labels`` (-100); adds ``attention_mask``."""

    def __init__(self, pad_token_id: int):
        self.pad_token_id = pad_token_id

    def __call__(self, features: list[dict]) -> dict:
        import torch

        longest = max(len(f["input_ids"]) for f in features)
        batch = {"input_ids": [], "labels": [], "attention_mask": []}
        for f in features:
            pad = longest - len(f["input_ids"])
            batch["input_ids"].append(list(f["input_ids"]) + [self.pad_token_id] * pad)
            batch["labels"].append(list(f["labels"]) + [-100] * pad)
            batch["attention_mask"].append([1] * len(f["input_ids"]) + [0] * pad)
        return {k: torch.tensor(v, dtype=torch.long) for k, v in batch.items()}
