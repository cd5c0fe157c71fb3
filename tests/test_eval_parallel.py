"""Data-parallel `kdbench eval` over 2 CPU processes (torchrun, gloo), through the real CLI (slow).

* The generations of a 2-process evaluation equal a 1-process evaluation's, example by example and
  seed by seed, and so do its metrics; no per-rank partial file is left behind.
* A 2-process evaluation killed (SIGKILL on rank 1 after its first written batch) and rerun with
  the same command redoes no example that was on disk when it was killed, and ends with the same
  generations as the uninterrupted run.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from kdbench.store import read_jsonl  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
DOLLY = SHARED / "data" / "dolly" / "minillm_processed" / "valid.jsonl"
GPT2_TOKENIZER = SHARED / "models" / "gpt2-tokenizer"

if not (DOLLY.is_file() and GPT2_TOKENIZER.is_dir()):
    pytest.skip(f"shared GPT-2 tokenizer / Dolly data not found under {SHARED}", allow_module_level=True)

# Rank 1 is killed right after its first batch is on disk; every rank records the ids it was asked to
# generate (GENERATED_LOG), so the test can tell what a rerun redid.
WRAPPED_EVAL = """
import json, os, signal, sys
from kdbench import generate as generation

original = generation.HFBackend.generate
def recorded(self, prompts, ids, decoding, seed=None, on_batch=None, **kwargs):
    rank = int(os.environ.get("RANK", "0"))
    with open(os.environ["GENERATED_LOG"], "a") as handle:
        handle.write(json.dumps({"rank": rank, "seed": seed, "ids": list(ids)}) + "\\n")
    def written(batch):
        on_batch(batch)
        if rank == int(os.environ.get("KILL_RANK", "-1")):
            os.kill(os.getpid(), signal.SIGKILL)
    return original(self, prompts, ids, decoding, seed, on_batch=written, **kwargs)
generation.HFBackend.generate = recorded
from kdbench.cli import app
sys.argv = ["kdbench", *sys.argv[1:]]
app()
"""


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(GPT2_TOKENIZER))
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=len(tokenizer), n_positions=1024)
    path = tmp_path_factory.mktemp("model") / "tiny-gpt2"
    transformers.GPT2LMHeadModel(config).save_pretrained(str(path))
    tokenizer.save_pretrained(str(path))
    return path


def _env(**extra) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", **extra)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def _eval_args(model_dir: Path, out: Path) -> list[str]:
    return ["eval", "--suite", "dolly", "--model", str(model_dir), "--data", str(DOLLY), "--limit", "14",
            "--seeds", "10,20", "--batch-size", "3", "--set", "decoding.max_new_tokens=12", "--output-dir", str(out),
            "--run-name", "run", "--label", "tiny"]


def _torchrun(*args: str) -> list[str]:
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent)) or "torchrun"
    return [torchrun, "--nproc_per_node", "2", "--standalone", *args]


def _generations(run: Path) -> dict:
    return {seed: {r["id"]: (r["output"], r["new_tokens"], r["finished"]) for r in read_jsonl(run / "generations" / "dolly" / f"seed{seed}.jsonl")}
            for seed in (10, 20)}


def _metrics(run: Path) -> dict:
    return {(r["metric"], str(r["seed"]), r["subset"]): r["value"] for r in read_jsonl(run / "metrics.jsonl")}


@pytest.fixture(scope="module")
def one_process(model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("one")
    done = subprocess.run([sys.executable, "-m", "kdbench", *_eval_args(model_dir, out)], capture_output=True,
                          text=True, env=_env(), timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    return out / "run"


def test_two_processes_generate_what_one_process_does(model_dir, one_process, tmp_path):
    done = subprocess.run(_torchrun("-m", "kdbench", *_eval_args(model_dir, tmp_path)), capture_output=True, text=True,
                          env=_env(), timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    run = tmp_path / "run"
    expected = _generations(one_process)
    assert all(len(by_id) == 14 for by_id in expected.values())
    assert _generations(run) == expected
    assert _metrics(run) == pytest.approx(_metrics(one_process))
    assert json.loads((run / "run.json").read_text())["status"] == "complete"
    assert not list((run / "generations" / "dolly").glob("*.rank*.jsonl"))
    assert done.stdout.count("# kdbench eval --suite dolly") == 1  # rank 0 alone prints the results
    assert "resuming" not in done.stdout + done.stderr  # the ranks shared the work, none redid the other's


def test_killed_two_process_eval_resumes_without_redoing_examples(model_dir, one_process, tmp_path):
    script = tmp_path / "wrapped_eval.py"
    script.write_text(WRAPPED_EVAL)
    log = tmp_path / "generated.jsonl"
    out = tmp_path / "out"
    killed = subprocess.run(_torchrun(str(script), *_eval_args(model_dir, out)), capture_output=True, text=True,
                            env=_env(GENERATED_LOG=str(log), KILL_RANK="1"), timeout=600)
    assert killed.returncode != 0
    folder = out / "run" / "generations" / "dolly"
    on_disk = {(str(r["seed"]), r["id"]) for path in folder.glob("seed*.jsonl") for r in read_jsonl(path)}
    assert on_disk and list(folder.glob("seed10.rank*.jsonl"))  # killed before the merge: partial files
    log.unlink()
    resumed = subprocess.run(_torchrun(str(script), *_eval_args(model_dir, out)), capture_output=True, text=True,
                             env=_env(GENERATED_LOG=str(log)), timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    redone = {(str(row["seed"]), example_id) for row in read_jsonl(log) for example_id in row["ids"]}
    assert not redone & on_disk
    assert {rank for rank in (row["rank"] for row in read_jsonl(log))} == {0, 1}  # both ranks shared the rest
    assert _generations(out / "run") == _generations(one_process)
    assert not list(folder.glob("*.rank*.jsonl"))
