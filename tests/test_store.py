"""The run store: crash-safe writes, torn appends, content-addressed artifacts, run directories."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from kdbench.errors import DataError
from kdbench.store import (COMPLETE_MARKER, ArtifactStore, RunDir, append_jsonl, atomic_write_bytes, atomic_write_json,
                           find_run_dirs, read_jsonl)


def _kill_when(path_exists: Path, proc: subprocess.Popen, timeout_s: float = 30.0) -> None:
    deadline = time.time() + timeout_s
    while not path_exists.exists():
        if time.time() > deadline or proc.poll() is not None:
            proc.kill()
            pytest.fail("the child never reached the point where it should be killed")
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()


def test_atomic_write_replaces_whole_file(tmp_path):
    target = tmp_path / "a.json"
    atomic_write_json(target, {"x": 1})
    atomic_write_json(target, {"x": 2})
    assert json.loads(target.read_text()) == {"x": 2}
    assert [p.name for p in tmp_path.iterdir()] == ["a.json"]  # no temporary left behind


def test_write_killed_midway_is_never_read_as_complete(tmp_path):
    """A process killed while writing leaves the old content (or nothing), never a partial file."""
    target = tmp_path / "result.bin"
    atomic_write_bytes(target, b"old")
    started = tmp_path / "started"
    child = textwrap.dedent(f"""
        import os, time
        from pathlib import Path
        import kdbench.store.files as store

        real_fdopen = os.fdopen

        class SlowHandle:
            def __init__(self, handle):
                self.handle = handle
            def __enter__(self):
                return self
            def __exit__(self, *exc):
                return self.handle.__exit__(*exc)
            def write(self, data):
                half = len(data) // 2
                self.handle.write(data[:half]); self.handle.flush()
                Path({str(started)!r}).write_text("1")
                time.sleep(60)  # killed here, half-way through the write
                self.handle.write(data[half:])
            def flush(self):
                self.handle.flush()
            def fileno(self):
                return self.handle.fileno()

        store.os.fdopen = lambda fd, mode: SlowHandle(real_fdopen(fd, mode))
        store.atomic_write_bytes({str(target)!r}, b"new" * 100000)
    """)
    proc = subprocess.Popen([sys.executable, "-c", child])
    _kill_when(started, proc)
    assert target.read_bytes() == b"old"


def test_torn_jsonl_tail_is_ignored(tmp_path):
    path = tmp_path / "gen.jsonl"
    append_jsonl(path, [{"id": 1}, {"id": 2}])
    with open(path, "a") as handle:
        handle.write('{"id": 3, "out')  # a killed append
    assert [r["id"] for r in read_jsonl(path)] == [1, 2]
    with pytest.raises(DataError, match="line 3"):
        read_jsonl(path, strict=True)


def test_artifact_built_once_and_reused(tmp_path):
    store = ArtifactStore(tmp_path)
    calls = []

    def build(folder: Path):
        calls.append(1)
        (folder / "data.txt").write_text("hello")
        return {"rows": 1}

    first = store.get_or_build("thing", {"a": 1}, build)
    second = store.get_or_build("thing", {"a": 1}, build)
    other = store.get_or_build("thing", {"a": 2}, build)
    assert len(calls) == 2 and not first.reused and second.reused and other.key != first.key
    assert (second.path / "data.txt").read_text() == "hello" and second.meta["rows"] == 1
    assert len(store.entries()) == 2
    assert store.clear("thing") == 2 and store.entries() == []


def test_artifact_build_killed_midway_is_rebuilt(tmp_path):
    started = tmp_path / "started"
    child = textwrap.dedent(f"""
        import time
        from pathlib import Path
        from kdbench.store import ArtifactStore

        def build(folder):
            (folder / "part.txt").write_text("half")
            Path({str(started)!r}).write_text("1")
            time.sleep(60)

        ArtifactStore({str(tmp_path / 'cache')!r}).get_or_build("slow", {{"k": 1}}, build)
    """)
    proc = subprocess.Popen([sys.executable, "-c", child])
    _kill_when(started, proc)
    store = ArtifactStore(tmp_path / "cache")
    assert store.lookup("slow", {"k": 1}) is None  # the killed build does not count
    artifact = store.get_or_build("slow", {"k": 1}, lambda folder: (folder / "part.txt").write_text("full") and None)
    assert (artifact.path / "part.txt").read_text() == "full"
    assert (artifact.path / COMPLETE_MARKER).is_file()


def test_run_dir_is_self_describing_and_keeps_secrets_out(tmp_path, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-secret-value-123")
    run = RunDir.create(tmp_path, "r1", kind="eval", config={"suite": "synthetic"}, command=["kdbench", "eval"])
    run.write_metrics([run.metric_record("synthetic", "rougeL", 50.0, seed=10, n=3)])
    run.finish("complete")
    assert run.complete and run.metrics()[0]["schema"] == 1
    env = json.loads((run.path / "env.json").read_text())
    assert "OPENAI_API_KEY" in env["machine"]["env_set"]
    for file in run.path.rglob("*"):
        if file.is_file():
            assert "sk-secret-value-123" not in file.read_text()
    assert [r.path for r in find_run_dirs([tmp_path])] == [run.path]
    with pytest.raises(DataError):
        find_run_dirs([tmp_path / "missing"])


def test_reopening_a_finished_run_keeps_it_finished(tmp_path):
    run = RunDir.create(tmp_path, "r", kind="train", config={})
    assert not run.complete
    run.finish("complete")
    again = RunDir.create(tmp_path, "r", kind="train", config={})
    assert again.complete and again.info()["resumed"]


def test_append_after_a_torn_tail_starts_a_clean_line(tmp_path):
    path = tmp_path / "gen.jsonl"
    append_jsonl(path, {"id": 1})
    with open(path, "a") as handle:
        handle.write('{"id": 2, "partial')
    append_jsonl(path, {"id": 3})
    assert [r["id"] for r in read_jsonl(path, strict=True)] == [1, 3]
