"""kdbench.parallel.split_generation in one process: what a rank generates, merging partial files,
resuming from partial files of an earlier run with another number of processes, torn lines.
(The 2-process runs are in tests/test_eval_parallel.py.)"""

from __future__ import annotations

import json

from kdbench.parallel.ranks import Ranks
from kdbench.parallel.split_generation import finished_records, generate_split, partial_paths, rank_partial_path
from kdbench.store import append_jsonl, read_jsonl


def _generator(asked: list):
    def generate(indices, write):
        asked.extend(indices)
        for start in range(0, len(indices), 2):
            write([{"id": f"e{i}", "output": f"answer {i}"} for i in indices[start:start + 2]])
    return generate


def test_ranks_share_is_strided_and_covers_everything():
    items = list(range(11))
    shares = [Ranks(rank=r, world_size=3).share(items) for r in range(3)]
    assert shares[0] == [0, 3, 6, 9] and sorted(sum(shares, [])) == items
    assert Ranks().share(items) == items and Ranks().on_main(lambda: 5) == 5


def test_one_process_writes_the_final_file_in_example_order(tmp_path):
    path = tmp_path / "seed10.jsonl"
    ids = [f"e{i}" for i in range(5)]
    asked: list = []
    done = generate_split(Ranks(), path, ids, _generator(asked))
    assert asked == [0, 1, 2, 3, 4]
    assert [r["id"] for r in read_jsonl(path)] == ids and set(done) == set(ids)
    assert not partial_paths(path)
    asked.clear()
    generate_split(Ranks(), path, ids, _generator(asked))  # everything on disk: nothing generated again
    assert asked == []


def test_resume_reads_partial_files_of_any_world_size_and_a_torn_line(tmp_path):
    path = tmp_path / "seed10.jsonl"
    ids = [f"e{i}" for i in range(8)]
    append_jsonl(path, [{"id": "e0", "output": "answer 0"}])  # merged by an earlier run
    append_jsonl(rank_partial_path(path, 0), [{"id": "e2", "output": "answer 2"}])  # a 3-process run, killed
    append_jsonl(rank_partial_path(path, 2), [{"id": "e5", "output": "answer 5"}])
    with open(rank_partial_path(path, 1), "a") as handle:
        handle.write(json.dumps({"id": "e1", "output": "answer 1"}) + "\n" + '{"id": "e4", "outp')  # killed mid-write
    assert set(finished_records(path)) == {"e0", "e1", "e2", "e5"}
    asked: list = []
    resumed: list = []
    done = generate_split(Ranks(), path, ids, _generator(asked), on_resume=lambda n, total: resumed.append((n, total)))
    assert asked == [3, 4, 6, 7]  # e4's torn line is not a record: generated again
    assert resumed == [(4, 8)]
    assert [r["id"] for r in read_jsonl(path)] == ids and not partial_paths(path)
    assert {i: r["output"] for i, r in done.items()} == {f"e{i}": f"answer {i}" for i in range(8)}
