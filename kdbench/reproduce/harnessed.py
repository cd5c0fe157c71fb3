"""lm-eval benchmarks (the Open LLM Leaderboard suites) of ``kdbench reproduce NAME --scale full``, through
:func:`kdbench.harness.evaluate_harness`, the function ``kdbench eval --suite oll`` calls.

Each model's run is an eval run directory ``<pair>/harness/<suite>/<row>[-seed<k>]``; a complete one is read
back, not rerun. The per-example scores handed to the comparison are the suite's tasks as they enter its
Average (``in_average`` records, x the benchmark's ``scale``): their mean is the leaderboard Average, and the
confidence interval is over training seeds x tasks.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from kdbench.reproduce.layout import slug
from kdbench.reproduce.table import Table


def harness_model_dir(table: Table, base: Path, row, seed, model_dir: str, *, log: Callable[[str], None],
                      command: list[str]) -> dict[str, list[float]]:
    """Every lm-eval benchmark of ``model_dir``: {benchmark suite: per-task scores in the Average, scaled}."""
    from kdbench.harness import evaluate_harness
    from kdbench.store import RunDir

    name = slug(row.label) if seed is None else f"{slug(row.label)}-seed{seed}"
    scores = {}
    for bench in table.benchmarks:
        if bench.kind != "lm_eval":
            continue
        target = base / "harness" / bench.suite / name
        if not ((target / "run.json").is_file() and RunDir(target).complete):
            log(f"{row.label}: lm-eval suite {bench.suite}")
            evaluate_harness(model_dir, bench.suite, output_dir=target.parent, run_name=target.name, label=row.label,
                             limit=table.eval.get("limit"), log=log, command=command)
        scores[bench.suite] = [float(r["value"]) * bench.scale for r in RunDir(target).metrics()
                               if r.get("in_average") and r.get("suite") == bench.suite]
    return scores


__all__ = ["harness_model_dir"]
