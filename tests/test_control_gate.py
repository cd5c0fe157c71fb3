"""The second regression gate (kdbench.synthetic.control_gate): two arms of one run must stand in the
order they must — DPO above DPO on swapped pairs in how often it puts the right answer of its training
pairs above the wrong one, significantly and in every training seed. The slow test runs the ``control-gate`` preset on today's code and requires it to pass
(benchmarks/mutations.py shows the same gate failing when the code reads preference pairs backwards)."""

from __future__ import annotations

import random

import pytest
from typer.testing import CliRunner

from kdbench.cli import app
from kdbench.errors import DataError
from kdbench.synthetic.control_gate import REQUIREMENTS, TRAINING_PAIRS, gate_verdicts


def _pairs(accuracy: float, n: int, seed: int) -> list[float]:
    """Per-example pair accuracy (100 or 0) with about ``accuracy`` % right, one draw per example."""
    rng = random.Random(seed)
    return [100.0 if rng.random() < accuracy / 100 else 0.0 for _ in range(n)]


def _scores(dpo: float, swapped: float, seeds=(1, 2, 3), n: int = 200) -> dict:
    return {TRAINING_PAIRS: {"dpo": {s: _pairs(dpo, n, 10 * s) for s in seeds},
                              "dpo_swapped": {s: _pairs(swapped, n, 10 * s + 1) for s in seeds}}}


def test_dpo_above_its_swapped_control_passes_and_the_reverse_order_fails():
    (right,) = gate_verdicts(_scores(dpo=75, swapped=40))
    assert right.passed and right.contrast.effect > 20 and right.contrast.same_sign_in_every_seed
    (backwards,) = gate_verdicts(_scores(dpo=40, swapped=75))  # what a swapped-pairs bug produces
    assert not backwards.passed and backwards.contrast.effect < -20
    (tied,) = gate_verdicts(_scores(dpo=60, swapped=60))  # no order: not significant, so the gate fails too
    assert not tied.passed


def test_a_seed_with_the_wrong_sign_fails_the_gate():
    scores = _scores(dpo=80, swapped=40, seeds=(1, 2))
    scores[TRAINING_PAIRS]["dpo"][3] = _pairs(40, 200, 30)
    scores[TRAINING_PAIRS]["dpo_swapped"][3] = _pairs(60, 200, 31)
    (verdict,) = gate_verdicts(scores)
    assert verdict.contrast.effect > 0 and not verdict.passed


def test_a_run_without_the_gate_s_arms_is_a_clear_error(tmp_path):
    with pytest.raises(DataError, match="control-gate"):
        gate_verdicts({TRAINING_PAIRS: {"sft": {1: [100.0, 0.0]}}})
    result = CliRunner().invoke(app, ["check", "--controls", str(tmp_path)])
    assert result.exit_code == 2 and "demo.json" in result.output
    result = CliRunner().invoke(app, ["check"])
    assert result.exit_code == 2 and "--controls" in result.output
    (tmp_path / "demo.json").write_text('{"runs": [], "corpus_dir": "%s"}' % (tmp_path / "cleared-cache"))
    result = CliRunner().invoke(app, ["check", "--controls", str(tmp_path)])
    assert result.exit_code == 2 and "is gone" in result.output


def test_requirements_name_arms_the_presets_can_train():
    from kdbench.synthetic.arms import CONTROLS

    for requirement in REQUIREMENTS:
        assert requirement.b in CONTROLS and requirement.metric in (TRAINING_PAIRS, "pair_accuracy",
                                                                     "token_accuracy", "rougeL")


@pytest.mark.slow
def test_control_gate_preset_passes_on_today_s_code(tmp_path):
    """The second gate itself: on correct code DPO orders its training pairs right more often than DPO on
    swapped pairs, significantly and in every training seed, and `kdbench check --controls` exits 0. (The same run on a
    copy that reads preference files backwards fails: benchmarks/mutations.py, docs/BENCHMARKS.md.)"""
    from kdbench.demo import run_demo
    from kdbench.synthetic.control_gate import control_gate

    run_demo("control-gate", out_dir=tmp_path / "gate", cache_dir=tmp_path / "cache", progress=False)
    passed, verdicts = control_gate(tmp_path / "gate")
    (verdict,) = verdicts
    assert passed, verdict.contrast
    result = CliRunner().invoke(app, ["check", "--controls", str(tmp_path / "gate")])
    assert result.exit_code == 0 and "passed: 1 control(s)" in result.output, result.output


def test_training_pairs_take_right_and_wrong_from_the_world_not_from_the_preference_file(tmp_path):
    """A preference file written backwards (or read backwards) must not redefine what is right: the
    gate's reading takes the answers from the world's instances, by key."""
    import json

    from kdbench.synthetic.control_gate import training_pairs
    from kdbench.synthetic.corpus import FILES

    instance = {"key": "open_qa/bavo/job", "category": "open_qa", "instruction": "what is bavo 's job ?",
                "input": "", "output": "bavo is a baker .", "references": ["bavo is a baker ."],
                "rejected": "bavo is a pilot ."}
    document = {"key": "world/bavo", "category": "world", "instruction": "state the facts about bavo .",
                "input": "", "output": "bavo is a baker ."}
    (tmp_path / FILES["teacher_train"]).write_text(json.dumps(instance) + "\n" + json.dumps(document) + "\n")
    backwards = {"key": instance["key"], "instruction": instance["instruction"], "input": "",
                 "chosen": "bavo is a pilot .", "rejected": "bavo is a baker ."}
    (tmp_path / FILES["preferences"]).write_text(json.dumps(backwards) + "\n")
    assert training_pairs(tmp_path) == [{"instruction": instance["instruction"], "input": "",
                                         "output": ["bavo is a baker ."], "rejected": "bavo is a pilot ."}]
    (tmp_path / FILES["preferences"]).write_text(json.dumps({**backwards, "key": "open_qa/nobody/job"}) + "\n")
    with pytest.raises(DataError, match="not a training instance"):
        training_pairs(tmp_path)
