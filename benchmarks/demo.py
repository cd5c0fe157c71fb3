"""Time the embedded smoke demo cold (empty cache: corpus + teacher built) and warm (teacher cached),
in one run, each in a fresh subprocess; prints the times and the warm/cold ratio.

    python benchmarks/demo.py [--preset smoke] [--repeats 1]

Targets (issue: foundation): smoke under 8 minutes cold and under 5 minutes warm on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def timed_demo(preset: str, cache: Path, out: Path) -> tuple[float, dict]:
    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", "kdbench", "demo", "--preset", preset, "--cache-dir", str(cache),
                    "--out", str(out)], check=True, stdout=subprocess.DEVNULL)
    elapsed = time.perf_counter() - started
    return elapsed, json.loads((out / "demo.json").read_text())["timings"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="smoke")
    parser.add_argument("--repeats", type=int, default=1, help="cold/warm pairs (medians are reported)")
    args = parser.parse_args()
    cold, warm = [], []
    for repeat in range(args.repeats):
        with tempfile.TemporaryDirectory() as tmp:
            root = Path(tmp)
            seconds, timings = timed_demo(args.preset, root / "cache", root / "cold")
            cold.append(seconds)
            print(f"repeat {repeat}: cold {seconds:.1f}s  (teacher {timings['teacher_seconds']:.1f}s)")
            seconds, timings = timed_demo(args.preset, root / "cache", root / "warm")
            warm.append(seconds)
            print(f"repeat {repeat}: warm {seconds:.1f}s  {timings}")
    cold_s, warm_s = statistics.median(cold), statistics.median(warm)
    print(f"median cold {cold_s:.1f}s ({cold_s / 60:.2f} min), warm {warm_s:.1f}s ({warm_s / 60:.2f} min), "
          f"warm/cold {warm_s / cold_s:.2f}")


if __name__ == "__main__":
    main()
