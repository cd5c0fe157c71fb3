"""The judgment cache: every successful judge response on disk (fsynced) the moment it arrives.

One append-only JSONL file per judge model, keyed by sha256 of (judge model, messages, parameters)
(:meth:`kdbench.judging.client.JudgeCall.cache_key`); a killed run loses at most the response it was
writing, and a rerun makes no call for what it had received. Failed calls are never cached.
"""

from __future__ import annotations

import os
from pathlib import Path

from kdbench.store import append_jsonl, default_cache_dir, file_lock, read_jsonl

CACHE_SCHEMA = 1


def default_cache_path(judge_model: str, cache_dir: str | os.PathLike | None = None) -> Path:
    """The judgment cache of ``judge_model``: one JSONL file per judge model, in ``cache_dir`` or
    ``<kdbench cache>/judgments/``."""
    safe = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in judge_model)
    folder = Path(cache_dir) if cache_dir is not None else default_cache_dir() / "judgments"
    return folder / f"{safe}.jsonl"


class JudgmentCache:
    """Append-only JSONL of successful judge responses, keyed by :meth:`JudgeCall.cache_key`.

    Records are appended with fsync under an inter-process lock, so several processes may share a file and a
    killed process loses at most the response it was writing (that one call is simply made again).
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._records: dict[str, dict] = {}
        for record in read_jsonl(self.path):
            if record.get("schema") == CACHE_SCHEMA and "key" in record:
                self._records[record["key"]] = record

    def __contains__(self, key: str) -> bool:
        return key in self._records

    def __len__(self) -> int:
        return len(self._records)

    def get(self, key: str) -> dict | None:
        return self._records.get(key)

    def put(self, record: dict) -> None:
        record = {"schema": CACHE_SCHEMA, **record}
        with file_lock(self.path.with_name(self.path.name + ".lock")):
            append_jsonl(self.path, record)
        self._records[record["key"]] = record
