"""Ranking stability across worlds (issue 16, point 5): the sign-agreement table and the compose step of
benchmarks/validity.py, on hand-made demo folders whose effects are known."""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
N = 120


def _scores(mean: float, rng: random.Random) -> list[float]:
    return [min(100.0, max(0.0, mean + rng.gauss(0, 4))) for _ in range(N)]


def _world(folder: Path, means: dict[str, float], seed: int) -> Path:
    """A finished demo folder: teacher + students, two training seeds, every reading's per-example scores."""
    rng = random.Random(seed)
    runs = []
    for label, mean in means.items():
        for train_seed in ([0] if label == "teacher" else [1, 2]):
            name = label if label == "teacher" else f"{label}-seed{train_seed}"
            for suite, metrics in (("synthetic", ("rougeL", "exact_match")),
                                   ("synthetic-ref", ("token_accuracy", "pair_accuracy"))):
                scores = {"ids": [f"ex{i}" for i in range(N)],
                          "scores": {m: {"0": _scores(mean, rng)} for m in metrics}}
                path = folder / "eval" / name / "scores" / f"{suite}.json"
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text(json.dumps(scores))
            runs.append({"label": label, "seed": train_seed, "method": label, "start": "-", "control": None,
                         "train": None, "eval": str(folder / "eval" / name)})
    (folder / "demo.json").write_text(json.dumps({"runs": runs, "timings": {"total_seconds": 60.0}}))
    return folder


def test_sign_agreement_names_the_worlds_and_finds_the_flipped_pair(tmp_path):
    from kdbench.synthetic.assess import sign_agreement_markdown

    first = _world(tmp_path / "world0", {"teacher": 90, "sft": 60, "kd": 70, "rkl": 50}, seed=1)
    second = _world(tmp_path / "world1", {"teacher": 90, "sft": 60, "kd": 70, "rkl": 66}, seed=2)
    text = sign_agreement_markdown(first, second, labels=("world 0", "world 1"))
    rows = {cells[0]: cells for cells in ([c.strip() for c in line.strip().strip("|").split("|")]
                                          for line in text.splitlines() if " − " in line)}
    assert "| contrast | world 0 | world 1 | same sign | significant in both |" in text
    assert rows["kd − sft"][3:5] == ["yes", "yes"]  # +10 in both worlds
    assert rows["rkl − sft"][3:5] == ["**no**", "opposite signs"]  # −10 then +6
    assert rows["rkl − kd"][3] == "yes"  # −20 then −4
    assert "2 of 3 signs agree" in text


def test_compose_reads_finished_worlds_without_training(tmp_path):
    out = tmp_path / "validity"
    _world(out / "world3", {"teacher": 90, "sft": 60, "kd": 70}, seed=3)
    _world(out / "world4", {"teacher": 90, "sft": 60, "kd": 71}, seed=4)
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "validity.py"), "--out", str(out),
                           "--world-seeds", "3,4", "--compose"], capture_output=True, text=True, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    text = (out / "validity.md").read_text()
    assert "## World 3" in text and "## World 4" in text
    assert "| contrast | world 3 | world 4 | same sign | significant in both |" in text
    assert "1 of 1 signs agree" in text
    assert not (tmp_path / "runs").exists() and sorted(p.name for p in out.iterdir()) == ["validity.md", "world3",
                                                                                        "world4"]


def test_compose_refuses_a_world_that_has_not_run(tmp_path):
    out = tmp_path / "validity"
    _world(out / "world0", {"teacher": 90, "sft": 60, "kd": 70}, seed=3)
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "validity.py"), "--out", str(out),
                           "--world-seeds", "0,1", "--compose"], capture_output=True, text=True, cwd=tmp_path)
    assert done.returncode != 0
    assert "world1 holds no finished run" in done.stderr and "Traceback" not in done.stderr
    assert not (out / "validity.md").exists()
