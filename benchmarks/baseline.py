"""Rebuild the regression baseline (results/baseline) from several training seeds of the smoke preset.

    python benchmarks/baseline.py --out runs/baseline-build [--seeds 1,2,3,4,5] [--write results/baseline]

Runs ``kdbench demo --preset smoke`` once with every seed (the teacher and the students' starting
point are trained once and shared, as in CI), groups the evaluation runs by training seed (the
teacher's run belongs to every group), and builds the baseline: every model's values and its paired
contrast with SFT, each with a tolerance from its spread over the seeds. Before writing, every
tolerance is checked against its bound (``kdbench.check.tolerance_bound``: half the teacher-SFT gap on
the same suite, metric and subset); subsets whose tolerance exceeds it are listed and left out, so the
committed gate never tracks a number it cannot fail on (tests/test_check.py checks the committed file).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    from kdbench.check import build_baseline, tolerance_bound, write_baseline
    from kdbench.demo import preset_with, run_demo
    from kdbench.store import RunDir

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="folder for the demo run")
    parser.add_argument("--preset", default="smoke")
    parser.add_argument("--seeds", default="1,2,3,4,5", help="training seeds (the baseline's spread)")
    parser.add_argument("--write", type=Path, default=None, help="baseline folder to write (e.g. results/baseline)")
    parser.add_argument("--cache-dir", type=Path, default=None)
    parser.add_argument("--reuse", action="store_true", help="build from the finished demo folder --out, no training")
    args = parser.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    if not args.reuse:
        result = run_demo(preset_with(args.preset, {"train_seeds": seeds}), out_dir=args.out,
                          cache_dir=args.cache_dir, log=print, progress=False)
        print(f"demo: {result.timings.get('total_seconds')} s")
    listed = json.loads((args.out / "demo.json").read_text())["runs"]
    teacher = [RunDir(Path(r["eval"])) for r in listed if r["label"] == "teacher"]
    groups = [teacher + [RunDir(Path(r["eval"])) for r in listed if r["seed"] == seed and r["label"] != "teacher"]
              for seed in seeds]
    note = (f"python benchmarks/baseline.py --preset {args.preset} --seeds {args.seeds}: kdbench demo --preset "
            f"{args.preset}, training seeds {args.seeds} (CI runs seed {seeds[0]})")
    baseline = build_baseline(groups, note=note)
    kept, dropped = [], []
    for entry in baseline["metrics"]:
        bound = tolerance_bound(baseline, entry)
        (kept if bound is not None and entry["tolerance"] <= bound else dropped).append((entry, bound))
    baseline["metrics"] = [entry for entry, _ in kept]
    baseline["left_out"] = [f"{e['label']}{'-' + e['versus'] if e.get('versus') else ''}/{e['suite']}/{e['metric']}"
                            f"[{e['subset']}]: tolerance {e['tolerance']:.2f} > bound "
                            f"{'none' if b is None else f'{b:.2f}'}" for e, b in dropped]
    for line in baseline["left_out"]:
        print("left out:", line)
    print(f"{len(kept)} entries kept, {len(dropped)} left out")
    if args.write:
        path = write_baseline(args.write, baseline)
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
