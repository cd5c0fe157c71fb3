"""The regression gate: compare runs with a committed baseline, metric by metric.

A baseline (``results/baseline/baseline.json``) holds, for every (model label, suite, metric,
subset), the mean and the standard deviation over several seeds of the same pipeline, and a
tolerance derived from that spread: ``max(k * std, floor)``. Absolute times are never compared and
floats are never compared bit for bit (they differ across CPUs and thread counts); a metric
*regresses* when it falls more than its tolerance below the baseline mean. Improvements beyond the
tolerance are reported too (time to refresh the baseline), but do not fail the gate.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from kdbench.errors import DataError
from kdbench.store import RunDir, atomic_write_json, find_run_dirs

BASELINE_FILE = "baseline.json"
DEFAULT_K = 3.0
DEFAULT_FLOOR = 2.0  # points on a 0-100 scale
DEFAULT_SUBSETS = ("all", "bucket:")


@dataclass
class Comparison:
    key: tuple[str, str, str, str]  # (label, suite, metric, subset)
    baseline: float
    current: float | None
    tolerance: float

    @property
    def delta(self) -> float | None:
        return None if self.current is None else self.current - self.baseline

    @property
    def status(self) -> str:
        if self.current is None or math.isnan(self.current):
            return "missing"
        if self.delta < -self.tolerance:
            return "regressed"
        if self.delta > self.tolerance:
            return "improved"
        return "ok"

    @property
    def name(self) -> str:
        label, suite, metric, subset = self.key
        return f"{label}/{suite}/{metric}" + ("" if subset == "all" else f"[{subset}]")


def _tracked(subset: str, subsets: tuple[str, ...]) -> bool:
    return any(subset == s or (s.endswith(":") and subset.startswith(s)) for s in subsets)


def run_values(runs: list[RunDir], subsets: tuple[str, ...] = DEFAULT_SUBSETS) -> dict[tuple, list[float]]:
    """(label, suite, metric, subset) -> the seed-mean value of each run with that label."""
    values: dict[tuple, list[float]] = {}
    for run in runs:
        label = run.info().get("label") or run.config().get("label") or run.path.name
        for record in run.metrics():
            if record.get("seed") != "mean" or not _tracked(record.get("subset", "all"), subsets):
                continue
            key = (label, record["suite"], record["metric"], record.get("subset", "all"))
            values.setdefault(key, []).append(float(record["value"]))
    return values


def build_baseline(run_groups: list[list[RunDir]], *, k: float = DEFAULT_K, floor: float = DEFAULT_FLOOR,
                   subsets: tuple[str, ...] = DEFAULT_SUBSETS, note: str = "") -> dict:
    """A baseline from several repetitions of the same pipeline (one list of runs per seed)."""
    if len(run_groups) < 2:
        raise DataError("A baseline needs runs from at least two seeds to measure the spread; pass several --runs.")
    per_group = [run_values(group, subsets) for group in run_groups]
    keys = sorted(set().union(*per_group))
    entries = []
    for key in keys:
        samples = [sum(g[key]) / len(g[key]) for g in per_group if key in g]
        mean = sum(samples) / len(samples)
        std = math.sqrt(sum((s - mean) ** 2 for s in samples) / (len(samples) - 1)) if len(samples) > 1 else 0.0
        label, suite, metric, subset = key
        entries.append({"label": label, "suite": suite, "metric": metric, "subset": subset, "mean": round(mean, 4),
                        "std": round(std, 4), "n_seeds": len(samples), "tolerance": round(max(k * std, floor), 4)})
    return {"schema": 1, "tolerance_rule": f"max({k:g} * std over seeds, {floor:g})", "n_seeds": len(run_groups),
            "note": note, "metrics": entries}


def write_baseline(path: str | Path, baseline: dict) -> Path:
    path = Path(path)
    return atomic_write_json(path / BASELINE_FILE if path.suffix != ".json" else path, baseline)


def load_baseline(path: str | Path) -> dict:
    path = Path(path)
    file = path / BASELINE_FILE if path.is_dir() else path
    if not file.is_file():
        raise DataError(f"No baseline at {file}; pass the folder holding {BASELINE_FILE} (e.g. results/baseline).")
    from kdbench.textfile import read_json

    return read_json(file)


def compare(baseline: dict, runs: list[RunDir]) -> list[Comparison]:
    """Compare each baseline metric with the runs' value (mean over runs with the same label)."""
    current = run_values(runs, subsets=tuple({e["subset"] if e["subset"] == "all" else e["subset"].split(":")[0] + ":"
                                              for e in baseline["metrics"]}) or DEFAULT_SUBSETS)
    comparisons = []
    for entry in baseline["metrics"]:
        key = (entry["label"], entry["suite"], entry["metric"], entry["subset"])
        values = current.get(key)
        comparisons.append(Comparison(key, entry["mean"], sum(values) / len(values) if values else None,
                                      entry["tolerance"]))
    return comparisons


def check(baseline_path: str | Path, run_paths: list[str | Path]) -> tuple[bool, list[Comparison]]:
    """(passed, comparisons): passed is False when any baseline metric regressed or is missing."""
    baseline = load_baseline(baseline_path)
    runs = find_run_dirs(run_paths)
    if not runs:
        raise DataError(f"No run directories under {', '.join(map(str, run_paths))}; run kdbench demo or eval first.")
    comparisons = compare(baseline, runs)
    passed = all(c.status in ("ok", "improved") for c in comparisons)
    return passed, comparisons
