"""A SIGKILLed ``minillm`` or ``distillm`` run, rerun with the same command, ends with the same weights and the
same loss curve as an uninterrupted run (slow: three CLI runs in subprocesses each).

The kill lands mid-training after a checkpoint: MiniLLM's checkpoints fall inside a round of rollouts (3 PPO
epochs, a checkpoint every 2 steps), so the rerun must continue from the saved rollout buffer; DistiLLM's
replay buffer, scheduler (its probability rises at validations) and step source are restored the same way."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tiny_models import build_tiny, write_tiny_data

pytestmark = pytest.mark.slow

SETTINGS = {"minillm": ["--set", "params.max_new_tokens=8", "--set", "params.ppo_epochs=3"],
            "distillm": ["--set", "params.max_new_tokens=8", "--set", "params.init_threshold=0.6",
                         "--set", "params.capacity=8", "--set", "params.loss_eps=1e-9"]}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("policy_resume")
    corpus, _ = build_tiny(root)
    write_tiny_data(root, corpus, n=12, n_pairs=4)
    return root


def _env() -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[1]) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def _command(tiny, out: Path, method: str) -> list[str]:
    return [sys.executable, "-m", "kdbench", "train", method, "--student", str(tiny / "student"),
            "--teacher", str(tiny / "teacher"), "--data", str(tiny / "prompts.jsonl"),
            "--valid-data", str(tiny / "prompts.jsonl"), "--output-dir", str(out), "--set", "max_steps=8",
            "--set", "batch_size=4", "--set", "save_steps=2", "--set", "eval_steps=2", "--set", "logging_steps=1",
            "--set", "learning_rate=3e-3", "--set", "prompt_style=compact", "--set", f"cache_dir={out / 'cache'}",
            *SETTINGS[method]]


def _params(model_dir: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(model_dir / "model.safetensors"))


def _losses(run: Path) -> list[tuple[int, float]]:
    return [(r["step"], r["loss"]) for r in map(json.loads, open(run / "train_log.jsonl")) if "loss" in r]


@pytest.mark.parametrize("method", ["minillm", "distillm"])
def test_sigkilled_run_resumes_to_the_uninterrupted_weights(tiny, tmp_path, method):
    reference = subprocess.run(_command(tiny, tmp_path / "ref", method), capture_output=True, text=True, env=_env(),
                               timeout=600)
    assert reference.returncode == 0, reference.stderr[-2000:]

    out = tmp_path / "crash"
    run = out / f"{method}-seed1"
    proc = subprocess.Popen(_command(tiny, out, method), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env=_env())
    deadline = time.time() + 300
    while proc.poll() is None and time.time() < deadline:
        log = run / "train_log.jsonl"
        steps = [json.loads(line).get("step", 0) for line in log.read_text().splitlines() if line.strip()] \
            if log.exists() else []
        if steps and max(steps) >= 5:  # checkpoint-4 is complete; the kill lands in a later step
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.02)
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL  # killed mid-training, not finished before the kill
    assert not (run / "model").exists()
    saved = sorted((run / "checkpoints").glob("checkpoint-*/kdbench_sampling-0.json"))
    assert saved, "the checkpoints hold the sampling form's state"

    final = subprocess.run(_command(tiny, out, method), capture_output=True, text=True, env=_env(), timeout=600)
    assert final.returncode == 0, final.stderr[-2000:]
    assert "resuming from" in (run / "log.txt").read_text()
    expected, got = _params(tmp_path / "ref" / f"{method}-seed1" / "model"), _params(run / "model")
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], atol=1e-6, rtol=1e-5, msg=key)
    assert [s for s, _ in _losses(run)] == list(range(1, 9))
    assert [loss for _, loss in _losses(run)] == pytest.approx(
        [loss for _, loss in _losses(tmp_path / "ref" / f"{method}-seed1")], rel=1e-5)
    cost = json.loads((run / "cost.json").read_text())
    cost_ref = json.loads((tmp_path / "ref" / f"{method}-seed1" / "cost.json").read_text())
    assert cost["resumed"] and cost["generated_tokens"] == cost_ref["generated_tokens"]
    if method == "distillm":
        assert cost["sgo_steps"] == cost_ref["sgo_steps"] and cost["sgo_probability"] == cost_ref["sgo_probability"]
