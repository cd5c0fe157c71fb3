"""The one reader of user text files: JSONL, JSON, YAML and plain text.

Every file a user hands kdbench (training data, suite data, preference pairs, corpora, configs,
judge inputs) is read here, so every reader accepts the same things and fails the same way:

* a UTF-8 byte-order mark (written by spreadsheet and Windows tools) is dropped;
* Windows line ends (CRLF) read like ``\\n``; blank lines are skipped in JSONL;
* bytes that are not UTF-8 are a :class:`~kdbench.errors.DataError` naming the file, the line and the
  column, and saying to re-save the file as UTF-8 (never a ``UnicodeDecodeError`` traceback);
* a JSONL line that is not a JSON object is a :class:`DataError` naming the file and line.

Lines are split on ``\\n`` only (never ``str.splitlines``, which would also split inside a JSON string
holding U+2028 or U+0085). Reading is streamed line by line, so a large training file is never held
in memory twice.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Iterator

from kdbench.errors import DataError

BOM = b"\xef\xbb\xbf"


def _decode(raw: bytes, path: Path, number: int) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as err:
        byte = raw[err.start:err.start + 1].hex()
        column = len(raw[:err.start].decode("utf-8", errors="replace")) + 1
        raise DataError(f"{path}, line {number} is not UTF-8 text (byte 0x{byte} at column {column}); "
                        "re-save the file as UTF-8.") from None


def _check_file(path: Path) -> None:
    if not path.exists():
        raise DataError(f"File not found: {path}; check the path.")
    if path.is_dir():
        raise DataError(f"{path} is a folder; pass a file.")


def iter_lines(path: str | os.PathLike) -> Iterator[tuple[int, str, bool]]:
    """``(line number, text, terminated)`` for every line of a UTF-8 text file: the text has no line
    end (``\\n`` or ``\\r\\n``); ``terminated`` is False only for a last line without its newline."""
    path = Path(path)
    _check_file(path)
    with open(path, "rb") as handle:
        for number, raw in enumerate(handle, start=1):
            if number == 1 and raw.startswith(BOM):
                raw = raw[len(BOM):]
            terminated = raw.endswith(b"\n")
            if terminated:
                raw = raw[:-2] if raw.endswith(b"\r\n") else raw[:-1]
            yield number, _decode(raw, path, number), terminated


def read_text(path: str | os.PathLike) -> str:
    """The whole text of a UTF-8 file with ``\\n`` line ends (BOM dropped; see :func:`iter_lines`)."""
    return "".join(text + ("\n" if terminated else "") for _, text, terminated in iter_lines(path))


def parse_json_line(path: Path, number: int, text: str) -> Any:
    """One JSONL line parsed; invalid JSON is a :class:`DataError` naming the file and line."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise DataError(f"{path}, line {number} is not valid JSON ({err.msg}); fix or remove that line.") from None


def iter_jsonl(path: str | os.PathLike) -> Iterator[tuple[int, dict]]:
    """``(line number, record)`` for each non-blank line of a JSONL file; every line must be a JSON object."""
    path = Path(path)
    for number, text, _ in iter_lines(path):
        if not text.strip():
            continue
        row = parse_json_line(path, number, text)
        if not isinstance(row, dict):
            raise DataError(f"{path}, line {number} is not a JSON object; each line must be one record.")
        yield number, row


def read_json(path: str | os.PathLike) -> Any:
    """A JSON document; invalid JSON is a :class:`DataError` naming the file and line."""
    path = Path(path)
    text = read_text(path)
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise DataError(f"{path} is not valid JSON ({err.msg} at line {err.lineno}); fix the file.") from None


def read_yaml(path: str | os.PathLike) -> Any:
    """A YAML document; invalid YAML is a :class:`DataError` naming the file and the parser's first line."""
    import yaml

    path = Path(path)
    text = read_text(path)
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise DataError(f"{path} is not valid YAML ({str(err).splitlines()[0]}); fix the file.") from None
