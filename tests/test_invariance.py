"""The engine's invariances for each family docs/training.md claims them for: a token method (kd, pinned in
tests/test_engine.py), a pair method (DPO on a preference file), a guided method (DCKD), and DPKD with
offline pairs.

* Fast: micro-batches of 2 + 2 + 1 accumulated end with the same parameters and loss curve as one
  micro-batch of 5 (3 SGD steps, pairs of different lengths): every denominator is the whole optimizer
  step's count.
* Slow: 2 processes (torchrun, gloo) give the 1-process loss curve and parameters with the same global
  batch; a run SIGKILLed mid-training and rerun with the same command ends where an uninterrupted run does.
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

import wiring_reference as ref

FAMILIES = {
    "dpo": ("dpo", "prefs", {}),
    "dckd": ("dckd", "prefs", {"dpo_teacher": "dpo_teacher"}),
    "dpkd-offline": ("dpkd", "batch", {"pairs": "offline", "sft_model": "student_sft",
                                       "max_new_tokens": ref.MAX_NEW_TOKENS}),
}


def _family(world, case):
    method, data, params = FAMILIES[case]
    paths = {"dpo_teacher": world.dpo_teacher, "student_sft": world.student_sft}
    params = {k: str(paths[v]) if v in paths else v for k, v in params.items()}
    return method, getattr(world, data), params


def _curve(run_dir: Path) -> list[tuple[int, float]]:
    rows = [json.loads(line) for line in open(run_dir / "train_log.jsonl")]
    return [(r["step"], r["loss"]) for r in rows if "loss" in r]


def _assert_same_model(a: Path, b: Path, atol=1e-5) -> None:
    pa, pb = ref.saved_parameters(a), ref.saved_parameters(b)
    for key in pa:
        torch.testing.assert_close(pb[key], pa[key], atol=atol, rtol=1e-4, msg=lambda m: f"{key}: {m}")


# SGD: an update linear in the gradient. (AdamW divides by the gradient's running scale, so on attention's key
# biases — whose gradient is exactly 0 in theory and float noise in practice — noise becomes ±lr steps.)
STEPS = dict(optim="sgd", learning_rate=0.5, max_steps=3)


@pytest.mark.parametrize("case", sorted(FAMILIES))
def test_accumulation_invariance(wiring_world, tmp_path, case):
    world = wiring_world
    method, data, params = _family(world, case)
    rows = ref.rows_of(data)
    lengths = {len(r.get("chosen", r.get("output", ""))) for r in rows}
    assert len(lengths) > 1  # per-micro-batch token means would weight the pairs differently
    # 5 rows: one step is the whole file, split 2 + 2 + 1 — per-micro-batch means would also weight the lone
    # pair of the last micro-batch twice (a pair mean is split-invariant only over equal micro-batches)
    data = tmp_path / f"five{data.suffix}"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows + rows[1:2]))
    whole = ref.run(world, tmp_path / "whole", method, data, params, batch_size=5, grad_accum=1, **STEPS)
    split = ref.run(world, tmp_path / "split", method, data, params, batch_size=2, grad_accum=3, **STEPS)
    start = ref.saved_parameters(world.student_sft if "sft_model" in params else world.student)
    moved = max(float((v - start[k]).abs().max()) for k, v in ref.saved_parameters(whole.model_dir).items())
    assert moved > 1e-3
    _assert_same_model(whole.model_dir, split.model_dir)
    (a, b) = _curve(whole.run.path), _curve(split.run.path)
    assert [s for s, _ in a] == [s for s, _ in b] == [1, 2, 3]
    assert [v for _, v in b] == pytest.approx([v for _, v in a], rel=1e-5)


# ------------------------------------------------------------------------------------------ slow: processes
def _env() -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[1]) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def _cli_args(world, case, out: Path, **settings) -> list[str]:
    method, data, params = _family(world, case)
    values = dict(prompt_style="compact", logging_steps=1, save_steps=2, seed=3, warmup_ratio=0.0,
                  lr_scheduler="constant", optim="sgd", learning_rate=0.5, max_steps=6, batch_size=4,
                  cache_dir=str(out / "cache"), generation_batch_size=64)
    values.update(settings)
    sets = [f"{k}={v}" for k, v in values.items()] + [f"params.{k}={v}" for k, v in params.items()]
    return ["train", method, "--student", str(world.student), "--teacher", str(world.teacher), "--data", str(data),
            "--valid-data", str(data), "--output-dir", str(out), *[x for s in sets for x in ("--set", s)]]


@pytest.mark.slow
@pytest.mark.parametrize("case", sorted(FAMILIES))
def test_two_processes_match_one_process(wiring_world, tmp_path, case):
    world = wiring_world
    method = FAMILIES[case][0]
    one = subprocess.run([sys.executable, "-m", "kdbench", *_cli_args(world, case, tmp_path / "one")],
                         capture_output=True, text=True, env=_env(), timeout=900)
    assert one.returncode == 0, one.stderr[-2000:]
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent)) or "torchrun"
    two = subprocess.run([torchrun, "--nproc_per_node", "2", "--standalone", "-m", "kdbench",
                          *_cli_args(world, case, tmp_path / "two", batch_size=2)],
                         capture_output=True, text=True, env=_env(), timeout=900)
    assert two.returncode == 0, two.stderr[-2000:]
    run_one, run_two = tmp_path / "one" / f"{method}-seed3", tmp_path / "two" / f"{method}-seed3"
    curve_one, curve_two = _curve(run_one), _curve(run_two)
    assert [s for s, _ in curve_one] == [s for s, _ in curve_two] == list(range(1, 7))
    assert [v for _, v in curve_two] == pytest.approx([v for _, v in curve_one], rel=1e-4)
    _assert_same_model(run_one / "model", run_two / "model", atol=1e-4)
    assert json.loads((run_two / "cost.json").read_text())["processes"] == 2


@pytest.mark.slow
@pytest.mark.parametrize("case", sorted(FAMILIES))
def test_sigkill_mid_training_and_rerun_equals_uninterrupted(wiring_world, tmp_path, case):
    world = wiring_world
    method = FAMILIES[case][0]
    reference = subprocess.run([sys.executable, "-m", "kdbench", *_cli_args(world, case, tmp_path / "ref")],
                               capture_output=True, text=True, env=_env(), timeout=900)
    assert reference.returncode == 0, reference.stderr[-2000:]
    out = tmp_path / "crash"
    run_dir = out / f"{method}-seed3"
    proc = subprocess.Popen([sys.executable, "-m", "kdbench", *_cli_args(world, case, out)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=_env())
    deadline = time.time() + 600
    killed = False
    while proc.poll() is None and time.time() < deadline:
        complete = list((run_dir / "checkpoints").glob("checkpoint-*/kdbench_complete.json"))
        if complete:  # a complete checkpoint exists and training goes on past it
            proc.send_signal(signal.SIGKILL)
            killed = True
            break
        time.sleep(0.02)
    proc.wait(timeout=60)
    assert killed and proc.returncode == -signal.SIGKILL
    assert not (run_dir / "model").exists()  # the run did not finish before the kill
    final = subprocess.run([sys.executable, "-m", "kdbench", *_cli_args(world, case, out)], capture_output=True,
                           text=True, env=_env(), timeout=900)
    assert final.returncode == 0, final.stderr[-2000:]
    assert "resuming from" in (run_dir / "log.txt").read_text()
    _assert_same_model(tmp_path / "ref" / f"{method}-seed3" / "model", run_dir / "model", atol=1e-6)
    got, expected = _curve(run_dir), _curve(tmp_path / "ref" / f"{method}-seed3")
    assert [s for s, _ in got] == [s for s, _ in expected] == list(range(1, 7))  # each step logged once
    assert [v for _, v in got] == pytest.approx([v for _, v in expected], rel=1e-5)
