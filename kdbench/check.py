"""The regression gate: compare runs with a committed baseline, metric by metric.

A baseline (``results/baseline/baseline.json``) holds, for every (model label, suite, metric,
subset), the mean and the standard deviation over several seeds of the same pipeline, and a
tolerance derived from that spread: ``max(k * std, floor)``. Absolute times are never compared and
floats are never compared bit for bit (they differ across CPUs and thread counts); a metric
*regresses* when it falls more than its tolerance below the baseline mean. Improvements beyond the
tolerance are reported too (time to refresh the baseline), but do not fail the gate.

Absolute values alone cannot see a bug that leaves a score within the spread of seeds (KD that
silently lost its teacher term scores what SFT scores). The baseline therefore also holds *paired
contrasts*: for every model label and the baseline label (``versus``, default ``sft``), the difference
of their values on the same examples, with its own tolerance from the spread of that difference over
seeds — usually much narrower than either model's, because what a seed does to one model it largely
does to the other. A contrast fails when it moves beyond its tolerance in *either* direction: a
relation between two methods that changes means one of them changed (rebuild the baseline when that
is intended).

Every tolerance is bounded (:func:`tolerance_bound`): at most a fraction of the teacher–baseline gap
on the same suite, metric and subset, so a subset too noisy to detect anything is not tracked by a
tolerance wider than the effects the benchmark exists to show.
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
DEFAULT_CONTRAST_FLOOR = 1.0  # a paired difference drifts less across CPUs than either of its two values
DEFAULT_SUBSETS = ("all", "bucket:")
DEFAULT_VERSUS = "sft"
DEFAULT_REFERENCE = "teacher"
BOUND_FRACTION = 0.5  # every tolerance <= BOUND_FRACTION x (reference - versus) on the same suite/metric/subset


@dataclass
class Comparison:
    key: tuple[str, str, str, str]  # (label, suite, metric, subset)
    baseline: float
    current: float | None
    tolerance: float
    versus: str | None = None  # a paired contrast: label − versus on the same examples

    @property
    def delta(self) -> float | None:
        return None if self.current is None else self.current - self.baseline

    @property
    def status(self) -> str:
        if self.current is None or math.isnan(self.current):
            return "missing"
        if self.delta < -self.tolerance or (self.versus is not None and self.delta > self.tolerance):
            return "regressed"  # a contrast fails in both directions (module docstring)
        if self.delta > self.tolerance:
            return "improved"
        return "ok"

    @property
    def name(self) -> str:
        label, suite, metric, subset = self.key
        who = label if self.versus is None else f"{label}-{self.versus}"
        return f"{who}/{suite}/{metric}" + ("" if subset == "all" else f"[{subset}]")


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


def contrast_values(values: dict[tuple, list[float]], versus: str) -> dict[tuple, float]:
    """(label, suite, metric, subset) -> mean(label) − mean(versus) for every label other than ``versus``
    measured on the same suite, metric and subset (runs with one label average first)."""
    means = {key: sum(v) / len(v) for key, v in values.items()}
    out = {}
    for (label, suite, metric, subset), value in means.items():
        other = means.get((versus, suite, metric, subset))
        if label != versus and other is not None:
            out[(label, suite, metric, subset)] = value - other
    return out


def _entry(key: tuple, samples: list[float], k: float, floor: float, versus: str | None = None) -> dict:
    mean = sum(samples) / len(samples)
    std = math.sqrt(sum((s - mean) ** 2 for s in samples) / (len(samples) - 1)) if len(samples) > 1 else 0.0
    label, suite, metric, subset = key
    entry = {"label": label, "suite": suite, "metric": metric, "subset": subset, "mean": round(mean, 4),
             "std": round(std, 4), "n_seeds": len(samples), "tolerance": round(max(k * std, floor), 4)}
    return entry if versus is None else {**entry, "versus": versus}


def build_baseline(run_groups: list[list[RunDir]], *, k: float = DEFAULT_K, floor: float = DEFAULT_FLOOR,
                   contrast_floor: float = DEFAULT_CONTRAST_FLOOR, subsets: tuple[str, ...] = DEFAULT_SUBSETS,
                   versus: str | None = DEFAULT_VERSUS, reference: str = DEFAULT_REFERENCE, note: str = "") -> dict:
    """A baseline from several repetitions of the same pipeline (one list of runs per seed): every
    model's values and, when runs labelled ``versus`` exist, every model's paired contrast with them."""
    if len(run_groups) < 2:
        raise DataError("A baseline needs runs from at least two seeds to measure the spread; pass several --runs.")
    per_group = [run_values(group, subsets) for group in run_groups]
    entries = [_entry(key, [sum(g[key]) / len(g[key]) for g in per_group if key in g], k, floor)
               for key in sorted(set().union(*per_group))]
    if versus:
        per_group_contrasts = [contrast_values(g, versus) for g in per_group]
        entries += [_entry(key, [g[key] for g in per_group_contrasts if key in g], k, contrast_floor, versus)
                    for key in sorted(set().union(*per_group_contrasts))]
    group_means = [{key: sum(v) / len(v) for key, v in g.items()} for g in per_group]
    means = {key: sum(g[key] for g in group_means if key in g) / sum(key in g for g in group_means)
             for key in set().union(*per_group)}
    gaps = [{"suite": suite, "metric": metric, "subset": subset, "reference": round(value, 4),
             "versus": round(means[(versus, suite, metric, subset)], 4)}
            for (label, suite, metric, subset), value in sorted(means.items())
            if label == reference and versus and (versus, suite, metric, subset) in means]
    baseline = {"schema": 2, "tolerance_rule": f"max({k:g} * std over seeds, {floor:g}); paired contrasts: "
                                              f"max({k:g} * std over seeds, {contrast_floor:g}), failing both ways",
                "bound_rule": f"tolerance <= {BOUND_FRACTION:g} x ({reference} - {versus}) on the same suite, "
                              f"metric and subset",
                "n_seeds": len(run_groups), "versus": versus, "reference": reference, "note": note, "metrics": entries,
                "gaps": gaps}
    return baseline


def tolerance_bound(baseline: dict, entry: dict) -> float | None:
    """The largest tolerance ``entry`` may have: ``BOUND_FRACTION`` × (reference − versus) on its suite,
    metric and subset — from the baseline's ``gaps`` (the two models' means, kept even for subsets that are
    not tracked), else from its entries; None when either model was not measured there."""
    where = (entry["suite"], entry["metric"], entry["subset"])
    for gap in baseline.get("gaps", []):
        if (gap["suite"], gap["metric"], gap["subset"]) == where:
            return BOUND_FRACTION * (gap["reference"] - gap["versus"])
    reference, versus = baseline.get("reference", DEFAULT_REFERENCE), baseline.get("versus") or DEFAULT_VERSUS
    means = {(e["label"], e["suite"], e["metric"], e["subset"]): e["mean"] for e in baseline["metrics"]
             if "versus" not in e}
    if (reference, *where) not in means or (versus, *where) not in means:
        return None
    return BOUND_FRACTION * (means[(reference, *where)] - means[(versus, *where)])


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
    """Compare each baseline metric (and paired contrast) with the runs' value (mean over runs with the
    same label)."""
    current = run_values(runs, subsets=tuple({e["subset"] if e["subset"] == "all" else e["subset"].split(":")[0] + ":"
                                              for e in baseline["metrics"]}) or DEFAULT_SUBSETS)
    contrasts = {versus: contrast_values(current, versus) for versus in {e["versus"] for e in baseline["metrics"]
                                                                          if e.get("versus")}}
    comparisons = []
    for entry in baseline["metrics"]:
        key = (entry["label"], entry["suite"], entry["metric"], entry["subset"])
        if entry.get("versus"):
            value = contrasts[entry["versus"]].get(key)
        else:
            values = current.get(key)
            value = sum(values) / len(values) if values else None
        comparisons.append(Comparison(key, entry["mean"], value, entry["tolerance"], entry.get("versus")))
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


def comparison_table(comparisons: list[Comparison]) -> str:
    """The gate's table as `kdbench check` prints it: every metric when there are at most 40, else only
    those not ``ok``."""
    width = max(len(c.name) for c in comparisons) if comparisons else 10
    lines = [f"{'metric':<{width}}  {'baseline':>8}  {'current':>8}  {'delta':>7}  {'tol':>5}  status"]
    for c in comparisons:
        current = "-" if c.current is None else f"{c.current:8.2f}"
        delta = "-" if c.delta is None else f"{c.delta:+7.2f}"
        if c.status != "ok" or len(comparisons) <= 40:
            lines.append(f"{c.name:<{width}}  {c.baseline:8.2f}  {current:>8}  {delta:>7}  {c.tolerance:5.2f}  {c.status}")
    return "\n".join(lines)
