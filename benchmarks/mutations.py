"""Does the regression gate catch the bugs it exists for? Plant known bugs one at a time in a copy of
the code, run the smoke demo and ``kdbench check`` on each, and report which the gate catches.

    python benchmarks/mutations.py --out DIR [--only NAME ...] [--preset smoke] [--baseline results/baseline] [--recheck]

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
             'rejected, chosen = row.get("chosen"), row.get("rejected")'),
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


def run_one(name: str, work: Path, preset: str, baseline: Path, overrides: list[str]) -> dict:
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
    command = [sys.executable, "-m", "kdbench", "demo", "--preset", preset, "--out", str(root / "out"),
               "--cache-dir", str(root / "cache")] + [arg for o in overrides for arg in ("--set", o)]
    started = time.perf_counter()
    demo = subprocess.run(command, env=env, cwd=code, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    (root / "demo.log").write_text(demo.stdout + demo.stderr)
    result = {"mutation": name, "demo_seconds": round(seconds, 1), "demo_exit": demo.returncode}
    if demo.returncode != 0:
        last = [line for line in (demo.stdout + demo.stderr).splitlines() if line.strip()][-1:]
        return {**result, "caught": True, "by": f"the demo failed: {last[0][:160] if last else '?'}", "regressed": []}
    return gate(result, root / "out" / "eval", baseline)


def gate(result: dict, eval_dir: Path, baseline: Path) -> dict:
    """``result`` with what ``kdbench check`` of ``eval_dir`` against ``baseline`` says."""
    from kdbench.check import check

    passed, comparisons = check(baseline, [eval_dir])
    failing = [c for c in comparisons if c.status in ("regressed", "missing")]
    failing.sort(key=lambda c: -abs(c.delta or 0) / max(c.tolerance, 1e-9))
    return {**result, "caught": not passed, "regressed": [
        {"name": c.name, "baseline": c.baseline, "current": c.current, "tolerance": c.tolerance} for c in failing]}


def _value(value: float | None) -> str:
    return "missing" if value is None else f"{value:.1f}"


def markdown(results: list[dict]) -> str:
    lines = ["| mutation | what it breaks | caught | by (largest moves in tolerances) | demo s |",
             "|---|---|---|---|---|"]
    for r in results:
        what = "(unmutated copy: must pass)" if r["mutation"] == "none" else BY_NAME[r["mutation"]].description
        if r.get("by"):
            by = r["by"]
        else:
            by = "; ".join(f"{m['name']} {m['baseline']:.1f} → {_value(m['current'])} (tol {m['tolerance']:.1f})"
                           for m in r["regressed"][:3])
            if len(r["regressed"]) > 3:
                by += f"; +{len(r['regressed']) - 3} more"
        caught = ("**yes**" if r["caught"] else "no") if r["mutation"] != "none" else (
            "passes" if not r["caught"] else "**FAILS**")
        lines.append(f"| `{r['mutation']}` | {what} | {caught} | {by or '-'} | {r['demo_seconds']:.0f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="work folder (copies, caches, results)")
    parser.add_argument("--only", nargs="*", default=None, help="mutation names (default: none + every mutation)")
    parser.add_argument("--preset", default="smoke")
    parser.add_argument("--baseline", type=Path, default=REPO / "results" / "baseline")
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="preset override for every run")
    parser.add_argument("--keep", action="store_true", help="keep each mutation's copy, cache and runs")
    parser.add_argument("--recheck", action="store_true",
                        help="no training: check the evaluations a previous run left in --out against --baseline "
                             "(e.g. after the baseline was rebuilt)")
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
            kept = {k: previous[name][k] for k in ("mutation", "demo_seconds", "demo_exit")}
            result = previous[name] if previous[name].get("by") else gate(kept, args.out / name / "out" / "eval",
                                                                         args.baseline)
        else:
            result = run_one(name, args.out, args.preset, args.baseline, args.overrides)
        results.append(result)
        print(json.dumps(result), flush=True)
        (args.out / "mutations.json").write_text(json.dumps(results, indent=1))
        (args.out / "mutations.md").write_text(markdown(results))
        if not args.keep:
            shutil.rmtree(args.out / name / "cache", ignore_errors=True)
            shutil.rmtree(args.out / name / "src", ignore_errors=True)
    print(markdown(results))
    missed = [r["mutation"] for r in results if r["mutation"] != "none" and not r["caught"]]
    false_alarm = any(r["mutation"] == "none" and r["caught"] for r in results)
    print(f"caught {sum(r['caught'] for r in results if r['mutation'] != 'none')} of "
          f"{sum(r['mutation'] != 'none' for r in results)} mutations; unmutated copy "
          f"{'FAILS the gate' if false_alarm else 'passes'}" + (f"; missed: {', '.join(missed)}" if missed else ""))
    sys.exit(1 if missed or false_alarm else 0)


if __name__ == "__main__":
    main()
