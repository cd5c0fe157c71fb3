"""Data-parallel generation into one JSON-lines file: prompts split across ranks, per-rank partial
files, one merge, resume per rank.

Under N processes, :func:`generate_split` gives each rank a strided share of the examples that are
not yet generated; rank r appends its batches (flushed and fsynced by the run store's
``append_jsonl``) to ``<stem>.rank<r>.jsonl`` beside the final file; after a barrier rank 0 merges
the final file (records in example order, written atomically) and removes the partial files. A
killed run resumes from the final file plus every partial file, whatever world size wrote them: the
examples already generated are never redone, and the rest is split again over the ranks of the
rerun. Sampling is seeded per (seed, example id) by the backend, so every answer equals the one a
single process gives, whichever rank or batch it lands in.

With one process this is the same work without partial files: batches are appended to the final
file directly (as kdbench always did), and a merge only reorders it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

from kdbench.parallel.ranks import Ranks
from kdbench.store import append_jsonl, atomic_write_text, read_jsonl


def rank_partial_path(path: Path, rank: int) -> Path:
    """The partial file rank ``rank`` appends to before the merge into ``path``."""
    return path.with_name(f"{path.stem}.rank{rank}{path.suffix}")


def partial_paths(path: Path) -> list[Path]:
    """Every partial file beside ``path`` (from any rank of any earlier world size)."""
    return sorted(path.parent.glob(f"{path.stem}.rank*{path.suffix}"))


def finished_records(path: Path) -> dict[str, dict]:
    """Example id -> record of everything generated so far: the final file and every partial file (a
    torn last line, from a write killed midway, is not a record)."""
    done: dict[str, dict] = {}
    for source in [path, *partial_paths(path)]:
        for record in read_jsonl(source):
            done.setdefault(str(record["id"]), record)
    return done


def merge_partials(path: Path, ids: list[str]) -> None:
    """Write ``path`` with one record per example in ``ids`` order (those generated so far), atomically,
    then remove the partial files. A crash between the two leaves duplicates that
    :func:`finished_records` reads once."""
    done = finished_records(path)
    order = {example_id: position for position, example_id in enumerate(ids)}
    records = sorted(done.values(), key=lambda r: (order.get(str(r["id"]), len(order)), str(r["id"])))
    atomic_write_text(path, "".join(json.dumps(r, sort_keys=True, ensure_ascii=False) + "\n" for r in records))
    for partial in partial_paths(path):
        partial.unlink(missing_ok=True)


def generate_split(ranks: Ranks, path: Path, ids: list[str], generate: Callable[[list[int], Callable], None], *,
                   on_resume: Callable[[int, int], None] | None = None) -> dict[str, dict]:
    """Generate every example of ``ids`` missing from ``path``, split across ``ranks``; return id -> record
    (every rank, after the merge).

    ``generate(indices, write)`` generates the examples at ``indices`` (positions in ``ids``) and calls
    ``write(records)`` with each finished batch's records (dicts with an ``"id"``); it runs on every
    rank with that rank's share (possibly empty: it is still called, so that a backend whose forward
    is collective can keep the ranks in step). ``on_resume(done, total)`` is called on rank 0 when some
    examples were already on disk. Every rank must call this with the same ``path`` and ``ids``."""
    path = Path(path)
    done = ranks.on_main(lambda: set(finished_records(path)))  # one reading, the same on every rank
    todo = [index for index, example_id in enumerate(ids) if example_id not in done]
    if done and todo and on_resume is not None and ranks.is_main:
        on_resume(len(ids) - len(todo), len(ids))
    target = rank_partial_path(path, ranks.rank) if ranks.distributed else path

    def write(records: list[dict]) -> None:
        append_jsonl(target, records)

    generate(ranks.share(todo), write)
    ranks.barrier()
    # one process appends to the final file itself, so a resumed run never rewrites what is on disk; the
    # merge (in example order) runs only when ranks wrote partial files, now or in an earlier run (read
    # once, on rank 0, so every rank takes the same branch)
    if ranks.on_main(lambda: bool(partial_paths(path))):
        ranks.on_main(lambda: merge_partials(path, ids))
    return finished_records(path)
