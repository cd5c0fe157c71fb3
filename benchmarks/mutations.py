"""Do the regression gates catch the bugs they exist for? Plant known bugs one at a time in a copy of
the code, run each gate the mutation lists on it, and report which gate catches it.

    python benchmarks/mutations.py --out DIR [--only NAME ...] [--gates smoke controls] [--preset smoke]
                                   [--baseline results/baseline] [--recheck]

Two gates (``GATES``): ``smoke`` runs the smoke demo and ``kdbench check`` against the committed baseline
(every mutation); ``controls`` runs ``kdbench demo --preset control-gate`` and ``kdbench check --controls``
(:mod:`kdbench.synthetic.control_gate`: DPO must beat DPO on swapped pairs), the slow suite's second gate
for a bug the smoke world cannot resolve (a mutation lists it in ``gates``). The unmutated copy runs
through every gate: each must pass it, or its column means nothing.

Each mutation is a literal source replacement applied to a fresh copy of the package (``kdbench/``
and the registry folders); the copy runs in its own process (``PYTHONPATH`` = the copy, checked in
the child) with a **fresh artifact cache**: artifact keys hash a stage's inputs, not the code, so a
teacher or a generation cached by correct code would hide a mutation. ``none`` (the unmutated copy)
must pass the gate, or the table means nothing. A mutation whose anchor text is not found exactly once
is an error, not a silent "not caught" (tests/test_mutations.py checks every anchor in the fast suite).

Writes ``DIR/mutations.md`` (the table for docs/BENCHMARKS.md) and ``DIR/mutations.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
COPIED = ("kdbench", "trainers", "tasks", "judges")


@dataclass(frozen=True)
class Mutation:
    name: str
    description: str
    file: str   # path inside the repository
    old: str    # text that occurs exactly once in the file
    new: str
    gates: tuple[str, ...] = ("smoke",)  # the gates run on it (GATES); the unmutated copy runs every gate


GATES = ("smoke", "controls")
CONTROL_PRESET = "control-gate"

MUTATIONS = (
    Mutation("kd_teacher_term_dropped", "token-level KD loses its teacher term: (1-r)·CE only",
             "kdbench/train/objectives.py",
             'loss = (1 - ratio) * ce + ratio * div if params.kd_weighting == "mix" else ce + ratio * div',
             'loss = (1 - ratio) * ce if params.kd_weighting == "mix" else ce'),
    Mutation("divergence_sign_flipped", "forward KL returns −KL (the student is pushed away from the teacher)",
             "kdbench/losses/divergences.py",  # the one record every path reads (its closed-form gradient dropped)
             'Divergence("fkl", _rows_fkl, analytic=_analytic_fkl,',
             'Divergence("fkl", lambda *rows: -_rows_fkl(*rows),'),
    Mutation("prompt_tokens_in_loss", "prompt tokens are labelled, so every loss also trains on the prompt",
             "kdbench/data.py",
             "return TokenizedExample(ids, [-100] * len(prompt_ids) + response_ids, len(prompt_ids), truncated)",
             "return TokenizedExample(ids, list(prompt_ids) + response_ids, len(prompt_ids), truncated)"),
    Mutation("teacher_is_student", "the trainer loads the student where it should load the teacher",
             "kdbench/train/stage_runner.py",
             "return self.model(self.teacher, dtype=self.config.teacher_dtype)",
             "return self.model(self.config.student, dtype=self.config.teacher_dtype)"),
    Mutation("dpo_chosen_rejected_swapped", "preference files are read with chosen and rejected swapped",
             "kdbench/train/pairs.py",
             'chosen, rejected = row.get("chosen"), row.get("rejected")',
             'rejected, chosen = row.get("chosen"), row.get("rejected")', gates=("smoke", "controls")),
    Mutation("generation_eos_dropped", "generation does not stop at end-of-sequence",
             "kdbench/generate.py",
             "eos_set = set(self.eos_ids) | set(stop_token_ids or ())",
             "eos_set = set()"),
)
BY_NAME = {m.name: m for m in MUTATIONS}


def apply(mutation: Mutation, root: Path) -> None:
    """Apply ``mutation`` to the copy at ``root`` (its anchor must occur exactly once)."""
    path = root / mutation.file
    text = path.read_text(encoding="utf-8")
    count = text.count(mutation.old)
    if count != 1:
        raise SystemExit(f"mutation {mutation.name}: its anchor occurs {count} times in {mutation.file} "
                         "(the code changed: update the mutation)")
    path.write_text(text.replace(mutation.old, mutation.new), encoding="utf-8")


def copy_code(destination: Path) -> Path:
    for name in COPIED:
        shutil.copytree(REPO / name, destination / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    return destination


def gates_of(name: str, wanted: list[str]) -> list[str]:
    """The gates ``name`` runs: the mutation's own (every gate for the unmutated copy), among ``wanted``."""
    listed = GATES if name == "none" else BY_NAME[name].gates
    return [g for g in listed if g in wanted]


def run_one(name: str, work: Path, gates: list[str], preset: str, baseline: Path, overrides: list[str]) -> dict:
    """Copy the code, plant ``name`` and run each of ``gates`` on the copy with a fresh artifact cache."""
    root = (work / name).resolve()
    shutil.rmtree(root, ignore_errors=True)
    code = copy_code(root / "src")
    if name != "none":
        apply(BY_NAME[name], code)
    env = {**os.environ, "PYTHONPATH": str(code), "KDBENCH_CACHE": str(root / "cache"),
           "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    probe = subprocess.run([sys.executable, "-c", "import kdbench, sys; print(kdbench.__file__)"], env=env,
                           capture_output=True, text=True, cwd=code, check=True)
    if not probe.stdout.strip().startswith(str(code)):
        raise SystemExit(f"the child imported {probe.stdout.strip()}, not the mutated copy under {code}")
    results = {}
    for gate_name in gates:
        # one fresh cache per mutation, shared by its gates: everything in it was built by the mutated copy
        smoke = gate_name == "smoke"
        out = root / ("out" if smoke else f"out-{gate_name}")
        command = [sys.executable, "-m", "kdbench", "demo", "--preset", preset if smoke else CONTROL_PRESET,
                   "--out", str(out), "--cache-dir", str(root / "cache")]
        command += [arg for o in overrides for arg in ("--set", o)] if smoke else []
        started = time.perf_counter()
        demo = subprocess.run(command, env=env, cwd=code, capture_output=True, text=True)
        seconds = time.perf_counter() - started
        (root / f"demo-{gate_name}.log").write_text(demo.stdout + demo.stderr)
        result = {"demo_seconds": round(seconds, 1), "demo_exit": demo.returncode}
        if demo.returncode != 0:
            last = [line for line in (demo.stdout + demo.stderr).splitlines() if line.strip()][-1:]
            result = {**result, "caught": True, "by": f"the demo failed: {last[0][:160] if last else '?'}",
                      "regressed": []}
        elif smoke:
            result = gate(result, out / "eval", baseline)
        else:
            result = control_gate_result(result, out, env, code)
        results[gate_name] = result
    return summary(name, results)


def summary(name: str, gates: dict) -> dict:
    return {"mutation": name, "caught": any(g["caught"] for g in gates.values()), "gates": gates}


def gate(result: dict, eval_dir: Path, baseline: Path) -> dict:
    """``result`` with what ``kdbench check`` of ``eval_dir`` against ``baseline`` says."""
    from kdbench.check import check

    passed, comparisons = check(baseline, [eval_dir])
    failing = [c for c in comparisons if c.status in ("regressed", "missing")]
    failing.sort(key=lambda c: -abs(c.delta or 0) / max(c.tolerance, 1e-9))
    return {**result, "caught": not passed, "regressed": [
        {"name": c.name, "baseline": c.baseline, "current": c.current, "tolerance": c.tolerance} for c in failing]}


def control_gate_result(result: dict, out: Path, env: dict, code: Path) -> dict:
    """``result`` with what ``kdbench check --controls`` of the demo folder ``out`` says (run by the copy, as
    CI would run it; the verdicts' figures are read with this checkout's statistics)."""
    from kdbench.synthetic.control_gate import control_gate

    check = subprocess.run([sys.executable, "-m", "kdbench", "check", "--controls", str(out)], env=env, cwd=code,
                           capture_output=True, text=True)
    (out / "check-controls.log").write_text(check.stdout + check.stderr)
    if check.returncode not in (0, 1):
        raise SystemExit(f"kdbench check --controls {out} exited with {check.returncode}: {check.stdout + check.stderr}")
    passed, verdicts = control_gate(out)
    if passed != (check.returncode == 0):
        raise SystemExit(f"the copy's control gate and this checkout's disagree on {out}")
    return {**result, "caught": not passed, "verdicts": [
        {"name": v.name, "a": v.contrast.a, "b": v.contrast.b, "effect": v.contrast.effect,
         "ci": list(v.contrast.ci), "p_holm": v.contrast.p_holm, "passed": v.passed,
         "per_seed": {str(e.seed): e.effect for e in v.contrast.per_seed}} for v in verdicts]}


def _value(value: float | None) -> str:
    return "missing" if value is None else f"{value:.1f}"


def _smoke_cell(g: dict) -> str:
    if g.get("by"):
        return g["by"]
    by = "; ".join(f"{m['name']} {m['baseline']:.1f} → {_value(m['current'])} (tol {m['tolerance']:.1f})"
                   for m in g["regressed"][:3])
    return by + (f"; +{len(g['regressed']) - 3} more" if len(g["regressed"]) > 3 else "")


def _controls_cell(g: dict) -> str:
    if g.get("by"):
        return g["by"]
    return "; ".join(f"{v['a']} − {v['b']} {v['effect']:+.1f} [{v['ci'][0]:+.1f}, {v['ci'][1]:+.1f}], Holm p "
                     f"{v['p_holm']:.3g}, per seed " + ", ".join(f"{e:+.1f}" for e in v["per_seed"].values())
                     for v in g["verdicts"])


def markdown(results: list[dict]) -> str:
    lines = ["| mutation | what it breaks | caught | smoke gate: `kdbench check` (largest moves in tolerances) | "
             "control gate: `kdbench check --controls` (effect [95% CI]) | demo s |",
             "|---|---|---|---|---|---|"]
    for r in results:
        unmutated = r["mutation"] == "none"
        what = "(unmutated copy: must pass every gate)" if unmutated else BY_NAME[r["mutation"]].description
        cells = []
        for name, describe in (("smoke", _smoke_cell), ("controls", _controls_cell)):
            g = r["gates"].get(name)
            if g is None:
                cells.append("not run")
                continue
            verdict = ("**FAILS**" if g["caught"] else "passes") if unmutated else (
                "**caught**" if g["caught"] else "not caught")
            detail = describe(g)
            cells.append(f"{verdict}: {detail}" if detail else verdict)
        caught = ("passes" if not r["caught"] else "**FAILS**") if unmutated else (
            f"**yes** ({', '.join(n for n, g in r['gates'].items() if g['caught'])})" if r["caught"] else "no")
        seconds = " + ".join(f"{g['demo_seconds']:.0f}" for g in r["gates"].values())
        lines.append(f"| `{r['mutation']}` | {what} | {caught} | {cells[0]} | {cells[1]} | {seconds} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=" ".join(__doc__.split("\n\n")[0].split()))
    parser.add_argument("--out", type=Path, required=True, help="work folder (copies, caches, results)")
    parser.add_argument("--only", nargs="*", default=None, help="mutation names (default: none + every mutation)")
    parser.add_argument("--gates", nargs="*", default=list(GATES), choices=GATES,
                        help="gates to run (each mutation runs those it lists; default: all)")
    parser.add_argument("--preset", default="smoke", help="the smoke gate's preset")
    parser.add_argument("--baseline", type=Path, default=REPO / "results" / "baseline")
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        help="override of the smoke gate's preset, for every run")
    parser.add_argument("--keep", action="store_true", help="keep each mutation's copy, cache and runs")
    parser.add_argument("--recheck", action="store_true",
                        help="no training: re-gate the smoke evaluations a previous run left in --out against "
                             "--baseline (e.g. after the baseline was rebuilt)")
    args = parser.parse_args()
    names = args.only or ["none"] + [m.name for m in MUTATIONS]
    unknown = [n for n in names if n != "none" and n not in BY_NAME]
    if unknown:
        raise SystemExit(f"unknown mutation {unknown[0]}; choose from: none, {', '.join(BY_NAME)}")
    args.out.mkdir(parents=True, exist_ok=True)
    results = []
    previous = {r["mutation"]: r for r in json.loads((args.out / "mutations.json").read_text())} \
        if args.recheck and (args.out / "mutations.json").is_file() else {}
    for name in names:
        if args.recheck:   # the demo's time and exit come from the previous run; a failed demo stays caught
            if name not in previous:
                continue
            gates = dict(previous[name]["gates"])
            if "smoke" in gates and not gates["smoke"].get("by"):
                kept = {k: gates["smoke"][k] for k in ("demo_seconds", "demo_exit")}
                gates["smoke"] = gate(kept, args.out / name / "out" / "eval", args.baseline)
            result = summary(name, gates)
        else:
            wanted = gates_of(name, args.gates)
            if not wanted:
                continue
            result = run_one(name, args.out, wanted, args.preset, args.baseline, args.overrides)
        results.append(result)
        print(json.dumps(result), flush=True)
        (args.out / "mutations.json").write_text(json.dumps(results, indent=1))
        (args.out / "mutations.md").write_text(markdown(results))
        if not args.keep:
            shutil.rmtree(args.out / name / "cache", ignore_errors=True)
            shutil.rmtree(args.out / name / "src", ignore_errors=True)
    print(markdown(results))
    missed = [r["mutation"] for r in results if r["mutation"] != "none" and not r["caught"]]
    false_alarm = [g for r in results if r["mutation"] == "none" for g, v in r["gates"].items() if v["caught"]]
    print(f"caught {sum(r['caught'] for r in results if r['mutation'] != 'none')} of "
          f"{sum(r['mutation'] != 'none' for r in results)} mutations; unmutated copy "
          f"{'FAILS the ' + ', '.join(false_alarm) + ' gate' if false_alarm else 'passes'}"
          + (f"; missed: {', '.join(missed)}" if missed else ""))
    sys.exit(1 if missed or false_alarm else 0)


if __name__ == "__main__":
    main()
