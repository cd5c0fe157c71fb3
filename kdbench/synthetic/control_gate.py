"""The second regression gate: validity controls of one run, as pass / fail.

The smoke gate (:mod:`kdbench.check` against ``results/baseline``) compares a run with earlier runs of the
same pipeline: it sees a bug only when the bug moves a value further than the seeds' spread. Some bugs
move nothing the smoke world resolves — DPO trained on its pairs backwards moves smoke DPO's held-out
pair accuracy by less than the tolerance of that entry. A control asks instead whether two arms *of the
same run* stand in the order they must: DPO on the right pairs against DPO on the same pairs swapped
(the ``dpo_swapped`` control, :mod:`kdbench.synthetic.arms`). Both arms run through the same code, so a
bug that reverses the preference direction anywhere they share (reading the files, the loss's sign, the
reference's log-probabilities) turns the "DPO" arm into the swapped one and the control into the right
one: the order flips and the gate fails, whatever the absolute values.

A requirement holds when arm A beats arm B on its reading (per-example scores) with a paired test over
examples on the seed-averaged differences, Holm-adjusted across the requirements the run has, p < 0.05,
and with the same sign in every training seed (:class:`kdbench.validity.ControlVerdict`, kind "positive").
The gated reading is ``training_pair_accuracy``: on the pairs the preference arms trained on, does the
model give the *right* answer a higher likelihood than the wrong one (:mod:`kdbench.synthetic.likelihood`)?
Right and wrong come from the world's own instances (``teacher_train.jsonl``: the instance's answer and
its plausible wrong answer), never from the preference file's chosen / rejected fields nor through the
trainers' pair reader, so a bug in either is seen. The held-out reading (``pair_accuracy`` on the test
items) is reported beside it but not gated: whether preference training on a few hundred pairs moves it,
and which way, depends on how much the student already knows — measured on a weak student, DPO on the
right pairs scored 13.5 points *below* its swapped control there (docs/BENCHMARKS.md, "Planted bugs"),
while the training pairs ordered the arms by +60 points. The ``control-gate`` preset of
:mod:`kdbench.demo` trains what the requirements need; ``kdbench check --controls DIR`` runs the gate.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from kdbench.errors import DataError
from kdbench.validity import ControlVerdict, contrast, holm_adjust


@dataclass(frozen=True)
class Requirement:
    """Arm ``a`` must beat arm ``b`` on ``metric``: ``training_pair_accuracy`` (:func:`training_pair_scores`),
    or a reading the evaluation runs hold (``pair_accuracy``, ``token_accuracy``, ``rougeL``)."""

    name: str
    a: str
    b: str
    metric: str


TRAINING_PAIRS = "training_pair_accuracy"
REQUIREMENTS = (
    Requirement("DPO puts the right answer of its training pairs above the wrong one more often than DPO on "
                "swapped pairs", "dpo", "dpo_swapped", TRAINING_PAIRS),
)
REPORTED = (  # shown by `kdbench check --controls`, not gated (module docstring)
    Requirement("held-out pairs: DPO above DPO on swapped pairs", "dpo", "dpo_swapped", "pair_accuracy"),
)


def training_pairs(corpus_dir: Path) -> list[dict]:
    """The preference arms' training pairs as test-file records (instruction, input, output = [right answer],
    rejected = wrong answer): the keys of ``preferences.jsonl``, right and wrong from the world's instances."""
    import json

    from kdbench.synthetic.corpus import FILES

    def rows(name: str) -> list[dict]:
        with open(Path(corpus_dir) / FILES[name], encoding="utf-8") as handle:
            return [json.loads(line) for line in handle if line.strip()]

    instances = {r["key"]: r for r in rows("teacher_train") if r.get("rejected")}
    keys = [r["key"] for r in rows("preferences")]
    missing = [k for k in keys if k not in instances]
    if missing:
        raise DataError(f"{corpus_dir}: preference pair {missing[0]} is not a training instance of the world; "
                        "rebuild the corpus (kdbench demo with a fresh --cache-dir).")
    return [{"instruction": instances[k]["instruction"], "input": instances[k]["input"],
             "output": [instances[k]["output"]], "rejected": instances[k]["rejected"]} for k in keys]


def training_pair_scores(arm, corpus_dir: Path) -> dict[int, list[float]]:
    """Training seed -> per training pair: 100 if ``arm``'s model (``kdbench.synthetic.assess.ArmRuns``) gives
    the right answer a higher likelihood than the wrong one, else 0."""
    from kdbench.synthetic.likelihood import reference_readings

    records = training_pairs(corpus_dir)
    return {seed: reference_readings(Path(runs["train"]) / "model", records)["pair_accuracy"]
            for seed, runs in sorted(arm.seeds.items())}


def gate_verdicts(scores: dict[str, dict[str, dict[int, Sequence[float]]]],
                  requirements: Sequence[Requirement] = REQUIREMENTS) -> list[ControlVerdict]:
    """One verdict per requirement whose two arms are in ``scores`` ({metric: {arm label: {training seed:
    [score per test example]}}}), Holm-adjusted across them; raises :class:`DataError` if none applies."""
    applicable = [r for r in requirements if r.a in scores.get(r.metric, {}) and r.b in scores.get(r.metric, {})]
    if not applicable:
        wanted = ", ".join(f"{r.a} and {r.b}" for r in requirements)
        raise DataError(f"The run has none of the arms the control gate compares ({wanted}); run "
                        "`kdbench demo --preset control-gate` and check its folder.")
    contrasts = holm_adjust([contrast(r.a, scores[r.metric][r.a], r.b, scores[r.metric][r.b]) for r in applicable])
    return [ControlVerdict(r.name, "positive", c) for r, c in zip(applicable, contrasts)]


def control_gate(out_dir: str | Path, requirements: Sequence[Requirement] = REQUIREMENTS
                 ) -> tuple[bool, list[ControlVerdict]]:
    """(passed, verdicts) of the requirements a ``kdbench demo`` folder's arms allow."""
    verdicts = control_verdicts(out_dir, requirements)
    return all(v.passed for v in verdicts), verdicts


def control_verdicts(out_dir: str | Path, requirements: Sequence[Requirement]) -> list[ControlVerdict]:
    """:func:`gate_verdicts` of the ``requirements`` on the arms of the ``kdbench demo`` folder ``out_dir``."""
    import json

    from kdbench.synthetic.assess import arm_scores, load_arms

    out = Path(out_dir)
    if not (out / "demo.json").is_file():
        raise DataError(f"{out} is not a `kdbench demo` folder (no demo.json); give the --out folder of a demo run.")
    arms = {a.label: a for a in load_arms(out)}
    corpus_dir = Path(json.loads((out / "demo.json").read_text())["corpus_dir"])
    if not corpus_dir.is_dir():
        raise DataError(f"The corpus of {out} ({corpus_dir}) is gone (its artifact cache was cleared); rerun "
                        "the demo into this folder and check it again.")
    scores: dict[str, dict] = {}
    for r in requirements:
        for label in (r.a, r.b):
            if label in arms and label not in scores.get(r.metric, {}):
                scores.setdefault(r.metric, {})[label] = (
                    training_pair_scores(arms[label], corpus_dir) if r.metric == TRAINING_PAIRS
                    else arm_scores(arms[label], r.metric))
    return gate_verdicts(scores, requirements)


def verdict_line(verdict: ControlVerdict, gated: bool = True) -> str:
    """One line: the effect with its CI, Holm p, each seed's effect and the verdict (for a reading that is
    not gated, whether the arms are in order)."""
    from kdbench.validity import fmt_p

    c = verdict.contrast
    seeds = "; ".join(f"s{e.seed} {e.effect:+.1f}" for e in c.per_seed)
    return (f"{verdict.name}: {c.a} − {c.b} {c.effect:+.1f} [{c.ci[0]:+.1f}, {c.ci[1]:+.1f}], Holm p {fmt_p(c.p_holm)}, "
            f"per seed {seeds} ({c.n} examples) — "
            + (("pass" if verdict.passed else "FAIL") if gated else ("in order" if verdict.passed else "not in order")))


def control_gate_report(out_dir: str | Path) -> tuple[bool, str]:
    """(passed, what ``kdbench check --controls`` prints): every gated verdict, the reported readings, and
    the outcome."""
    passed, verdicts = control_gate(out_dir)
    lines = [verdict_line(v) for v in verdicts]
    lines += [f"(reported, not gated) {verdict_line(v, gated=False)}" for v in control_verdicts(out_dir, REPORTED)]
    failed = sum(not v.passed for v in verdicts)
    lines.append(f"FAILED: {failed} control(s) of {out_dir} out of order" if failed
                 else f"passed: {len(verdicts)} control(s) of {out_dir} in order")
    return passed, "\n".join(lines)


__all__ = ["REPORTED", "REQUIREMENTS", "Requirement", "TRAINING_PAIRS", "control_gate", "control_gate_report",
           "control_verdicts", "gate_verdicts", "training_pair_scores", "training_pairs", "verdict_line"]
