"""Data parallelism and crash safety, through the real CLI in subprocesses (slow).

* 2 CPU processes (torchrun, gloo), dropout off, 20 steps, different sequence lengths on each rank:
  the logged loss curve equals the 1-process curve with the same global batch (rtol 1e-4).
* A run SIGKILLed during a checkpoint write, then SIGKILLed again mid-training, then restarted
  with the same command ends with the same parameters as an uninterrupted run.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from kdbench.synthetic.corpus import FILES, CorpusConfig, build_corpus

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from transformers import AutoTokenizer

    from kdbench.models import make_model

    root = tmp_path_factory.mktemp("parallel")
    corpus = root / "corpus"
    corpus.mkdir()
    build_corpus(CorpusConfig(n_people=16, n_cities=4), corpus)
    tokenizer = AutoTokenizer.from_pretrained(str(corpus / "tokenizer"))
    for name, size in (("teacher", "gpt2-micro"), ("student", "gpt2-nano")):
        make_model(size, tokenizer, seed=0, max_positions=256, dropout=0.0).save_pretrained(str(root / name))
        tokenizer.save_pretrained(str(root / name))
    rows = [json.loads(line) for line in open(corpus / FILES["student_train"])][:24]
    (root / "train.jsonl").write_text("".join(json.dumps({k: r[k] for k in ("instruction", "input", "output")}) + "\n"
                                              for r in rows))
    # 3 validation rows: an odd count, which 2 processes cannot split evenly
    (root / "valid.jsonl").write_text("".join(line + "\n" for line in (root / "train.jsonl").read_text().splitlines()[:3]))
    return root


def _env() -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[1]) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def _args(tiny, out, *extra) -> list[str]:
    return ["train", "kd", "--student", str(tiny / "student"), "--teacher", str(tiny / "teacher"),
            "--data", str(tiny / "train.jsonl"), "--valid-data", str(tiny / "valid.jsonl"), "--output-dir", str(out),
            "--set", "prompt_style=compact", "--set", "logging_steps=1", "--set", "learning_rate=2e-3",
            "--set", "warmup_ratio=0.1", *extra]


def _losses(run: Path) -> list[tuple[int, float, int]]:
    rows = [json.loads(line) for line in open(run / "train_log.jsonl")]
    return [(r["step"], r["loss"], r["response_tokens"]) for r in rows if "loss" in r]


def test_two_processes_match_one_process(tiny, tmp_path):
    one = subprocess.run([sys.executable, "-m", "kdbench", *_args(tiny, tmp_path / "one", "--set", "max_steps=20",
                                                                  "--set", "batch_size=4", "--set", "eval_steps=10")],
                         capture_output=True, text=True, env=_env(), timeout=600)
    assert one.returncode == 0, one.stderr[-2000:]
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent)) or "torchrun"
    two = subprocess.run([torchrun, "--nproc_per_node", "2", "--standalone", "-m", "kdbench",
                          *_args(tiny, tmp_path / "two", "--set", "max_steps=20", "--set", "batch_size=2",
                                 "--set", "eval_steps=10")],
                         capture_output=True, text=True, env=_env(), timeout=600)
    assert two.returncode == 0, two.stderr[-6000:]
    curve_one, curve_two = _losses(tmp_path / "one" / "kd-seed1"), _losses(tmp_path / "two" / "kd-seed1")
    assert len(curve_one) == len(curve_two) == 20
    assert [c[2] for c in curve_one] == [c[2] for c in curve_two]  # the same global batches
    assert len({c[2] for c in curve_one}) > 1  # batches of different token counts
    for (step, a, _), (_, b, _) in zip(curve_one, curve_two):
        assert b == pytest.approx(a, rel=1e-4), f"step {step}"
    cost = json.loads((tmp_path / "two" / "kd-seed1" / "cost.json").read_text())
    assert cost["processes"] == 2
    # validation over 3 examples: each counted once on 2 processes (no padded duplicate), the same exact mean
    evals_one, evals_two = _evals(tmp_path / "one" / "kd-seed1"), _evals(tmp_path / "two" / "kd-seed1")
    assert len(evals_one) == len(evals_two) >= 2
    for a, b in zip(evals_one, evals_two):
        assert a.keys() == b.keys() and a["eval_tokens"] == b["eval_tokens"], (a, b)  # 2 processes counted 27 of 20
        assert b == pytest.approx(a, rel=1e-5), (a, b)


def _evals(run: Path) -> list[dict]:
    """Each validation's loss and its counts (the examples and tokens it averaged over)."""
    rows = [json.loads(line) for line in open(run / "train_log.jsonl")]
    return [{k: v for k, v in r.items() if k.startswith("eval_") and not k.endswith(("runtime", "per_second"))}
            for r in rows if "eval_loss" in r]


KILL_DURING_SAVE = """
import os, signal, sys
from transformers import Trainer
original = Trainer._save_optimizer_and_scheduler
def killed_midway(self, output_dir):
    if self.state.global_step == int(os.environ["KILL_AT_SAVE"]):
        os.kill(os.getpid(), signal.SIGKILL)  # the model files are written, the optimizer and marker are not
    return original(self, output_dir)
Trainer._save_optimizer_and_scheduler = killed_midway
from kdbench.cli import app
sys.argv = ["kdbench", *sys.argv[1:]]
app()
"""


def _params(model_dir: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(model_dir / "model.safetensors"))


def test_sigkill_and_restart_equals_uninterrupted(tiny, tmp_path):
    settings = ["--set", "max_steps=12", "--set", "batch_size=3", "--set", "save_steps=2"]
    reference = subprocess.run([sys.executable, "-m", "kdbench", *_args(tiny, tmp_path / "ref", *settings)],
                               capture_output=True, text=True, env=_env(), timeout=600)
    assert reference.returncode == 0, reference.stderr[-2000:]

    out = tmp_path / "crash"
    run = out / "kd-seed1"
    # 1. killed while writing checkpoint-6
    script = tmp_path / "kill_during_save.py"
    script.write_text(KILL_DURING_SAVE)
    first = subprocess.run([sys.executable, str(script), *_args(tiny, out, *settings)], capture_output=True, text=True,
                           env=dict(_env(), KILL_AT_SAVE="6"), timeout=600)
    assert first.returncode == -signal.SIGKILL
    assert (run / "checkpoints" / "checkpoint-6").is_dir()
    assert not (run / "checkpoints" / "checkpoint-6" / "kdbench_complete.json").exists()

    # 2. restarted, then killed at an arbitrary moment after step 8
    proc = subprocess.Popen([sys.executable, "-m", "kdbench", *_args(tiny, out, *settings)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env=_env())
    deadline = time.time() + 300
    while proc.poll() is None and time.time() < deadline:
        log = run / "train_log.jsonl"
        steps = [json.loads(line).get("step", 0) for line in log.read_text().splitlines() if line.strip()] \
            if log.exists() else []
        if steps and max(steps) >= 8:
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.02)
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL  # killed mid-training, not finished before the kill
    assert not (run / "model").exists()

    # 3. the same command again, to the end
    final = subprocess.run([sys.executable, "-m", "kdbench", *_args(tiny, out, *settings)], capture_output=True,
                           text=True, env=_env(), timeout=600)
    assert final.returncode == 0, final.stderr[-2000:]
    assert "removed incomplete checkpoint" in (run / "log.txt").read_text()
    assert "resuming from" in (run / "log.txt").read_text()
    expected, got = _params(tmp_path / "ref" / "kd-seed1" / "model"), _params(run / "model")
    for key in expected:
        assert torch.allclose(got[key], expected[key], atol=1e-6, rtol=1e-5), key
    steps = [s for s, _, _ in _losses(run)]
    assert steps == list(range(1, 13))  # the log has each step once
    ref_curve = [loss for _, loss, _ in _losses(tmp_path / "ref" / "kd-seed1")]
    assert [loss for _, loss, _ in _losses(run)] == pytest.approx(ref_curve, rel=1e-5)
    cost_ref = json.loads((tmp_path / "ref" / "kd-seed1" / "cost.json").read_text())
    cost = json.loads((run / "cost.json").read_text())
    assert cost["resumed"] and cost["tokens_processed"] == cost_ref["tokens_processed"]
