"""The mutation check (benchmarks/mutations.py) stays meaningful: every planted bug's anchor text is in
today's code exactly once, and applying it changes the copy (a refactor that moves the code fails here,
in the fast suite, instead of turning the mutation into a silent "not caught")."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _mutations_module():
    spec = importlib.util.spec_from_file_location("kdbench_mutations", REPO / "benchmarks" / "mutations.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve their module by name
    spec.loader.exec_module(module)
    return module


MODULE = _mutations_module()


def test_the_issue_s_six_bugs_are_planted():
    assert {m.name for m in MODULE.MUTATIONS} >= {"kd_teacher_term_dropped", "divergence_sign_flipped",
                                                  "prompt_tokens_in_loss", "teacher_is_student",
                                                  "dpo_chosen_rejected_swapped", "generation_eos_dropped"}


@pytest.mark.parametrize("mutation", MODULE.MUTATIONS, ids=lambda m: m.name)
def test_each_mutation_applies_to_exactly_one_place(mutation, tmp_path):
    source = (REPO / mutation.file).read_text(encoding="utf-8")
    assert source.count(mutation.old) == 1, f"{mutation.name}: anchor not found exactly once in {mutation.file}"
    target = tmp_path / mutation.file
    target.parent.mkdir(parents=True)
    target.write_text(source, encoding="utf-8")
    MODULE.apply(mutation, tmp_path)
    mutated = target.read_text(encoding="utf-8")
    assert mutated != source and mutation.new in mutated
    compile(mutated, str(target), "exec")  # still Python: the bug is semantic, not a syntax error


def test_the_dpo_swap_runs_the_control_gate_and_the_unmutated_copy_runs_every_gate():
    """The swapped-pairs bug is beyond the smoke world's resolution: it must run the second gate
    (kdbench.synthetic.control_gate), and the unmutated copy must pass every gate the table reports."""
    assert "controls" in MODULE.BY_NAME["dpo_chosen_rejected_swapped"].gates
    assert MODULE.gates_of("none", list(MODULE.GATES)) == list(MODULE.GATES)
    assert MODULE.gates_of("kd_teacher_term_dropped", ["controls"]) == []
    from kdbench.demo import PRESETS

    assert MODULE.CONTROL_PRESET in PRESETS and "dpo_swapped" in PRESETS[MODULE.CONTROL_PRESET].controls
    caught = MODULE.summary("dpo_chosen_rejected_swapped", {
        "smoke": {"demo_seconds": 900.0, "demo_exit": 0, "caught": False, "regressed": []},
        "controls": {"demo_seconds": 200.0, "demo_exit": 0, "caught": True, "verdicts": [
            {"name": "n", "a": "dpo", "b": "dpo_swapped", "effect": -20.0, "ci": [-25.0, -15.0], "p_holm": 0.001,
             "passed": False, "per_seed": {"1": -19.0, "2": -21.0}}]}})
    row = MODULE.markdown([caught]).splitlines()[-1]
    assert caught["caught"] and "**yes** (controls)" in row and "dpo − dpo_swapped -20.0" in row
