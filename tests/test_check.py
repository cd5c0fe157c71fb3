"""The regression gate: tolerances from the spread over seeds; passes unchanged runs, fails (naming the
metric) on a run degraded beyond tolerance."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from kdbench.check import build_baseline, check, write_baseline
from kdbench.cli import app
from kdbench.store import RunDir, find_run_dirs

runner = CliRunner()


def _eval_run(root: Path, label: str, values: dict[tuple[str, str], float]) -> RunDir:
    run = RunDir.create(root, f"eval-{label}", kind="eval", config={"label": label})
    run.write_metrics([run.metric_record("synthetic", metric, value, seed="mean", subset=subset, n=100, std=0.0)
                       for (metric, subset), value in values.items()])
    run.finish("complete", label=label)
    return run


def _seed_runs(root: Path, shift: float) -> Path:
    _eval_run(root, "teacher", {("rougeL", "all"): 80.0 + shift, ("exact_match", "all"): 60.0 + shift,
                                ("rougeL", "bucket:(70,inf)"): 90.0 + 3 * shift})
    _eval_run(root, "sft", {("rougeL", "all"): 40.0 + 2 * shift, ("exact_match", "all"): 20.0 + shift,
                            ("rougeL", "bucket:(70,inf)"): 30.0 + 5 * shift})
    return root


@pytest.fixture()
def baseline(tmp_path):
    groups = [find_run_dirs([_seed_runs(tmp_path / f"seed{i}", shift)]) for i, shift in enumerate((-0.5, 0.0, 0.5))]
    data = build_baseline(groups, k=3.0, floor=1.0)
    write_baseline(tmp_path / "baseline", data)
    return tmp_path / "baseline", data


def test_tolerance_comes_from_the_spread(baseline):
    _, data = baseline
    by_key = {(e["label"], e["metric"], e["subset"]): e for e in data["metrics"]}
    # sft rougeL moved by ±1.0 over seeds (std 1.0) -> tolerance 3.0; teacher EM by ±0.5 -> floor 1.5 vs 1.0
    assert by_key[("sft", "rougeL", "all")]["tolerance"] == pytest.approx(3.0)
    assert by_key[("teacher", "exact_match", "all")]["tolerance"] == pytest.approx(1.5)
    assert by_key[("sft", "rougeL", "bucket:(70,inf)")]["tolerance"] == pytest.approx(7.5)


def test_unchanged_run_passes(baseline, tmp_path):
    path, _ = baseline
    passed, comparisons = check(path, [_seed_runs(tmp_path / "now", 0.2)])
    assert passed and {c.status for c in comparisons} == {"ok"}
    result = runner.invoke(app, ["check", "--baseline", str(path), "--runs", str(tmp_path / "now")])
    assert result.exit_code == 0 and "passed" in result.output


def test_degraded_metric_fails_and_is_named(baseline, tmp_path):
    path, _ = baseline
    now = _seed_runs(tmp_path / "now", 0.0)
    run = RunDir(now / "eval-sft")
    records = run.metrics()
    for record in records:
        if record["metric"] == "exact_match":
            record["value"] -= 5.0  # beyond its 1.5 tolerance
    run.write_metrics(records, replace_suite="synthetic")
    passed, comparisons = check(path, [now])
    assert not passed
    assert [c.name for c in comparisons if c.status == "regressed"] == ["sft/synthetic/exact_match"]
    result = runner.invoke(app, ["check", "--baseline", str(path), "--runs", str(now)])
    assert result.exit_code == 1 and "sft/synthetic/exact_match" in result.output and "regressed" in result.output


def test_small_moves_within_tolerance_and_improvements_pass(baseline, tmp_path):
    path, _ = baseline
    now = _seed_runs(tmp_path / "now", 0.0)
    run = RunDir(now / "eval-teacher")
    records = run.metrics()
    records[0]["value"] -= 1.0   # within tolerance
    records[1]["value"] += 10.0  # an improvement
    run.write_metrics(records, replace_suite="synthetic")
    passed, comparisons = check(path, [now])
    assert passed and {c.status for c in comparisons} == {"ok", "improved"}


def test_missing_metric_fails(baseline, tmp_path):
    path, _ = baseline
    now = _seed_runs(tmp_path / "now", 0.0)
    import shutil

    shutil.rmtree(now / "eval-teacher")
    passed, comparisons = check(path, [now])
    assert not passed and any(c.status == "missing" and c.name.startswith("teacher/") for c in comparisons)


def test_bad_paths_are_clear_errors(tmp_path):
    result = runner.invoke(app, ["check", "--baseline", str(tmp_path / "none"), "--runs", str(tmp_path)])
    assert result.exit_code == 2 and "No baseline" in result.output
    result = runner.invoke(app, ["check", "--baseline", str(tmp_path), "--runs", str(tmp_path / "missing")])
    assert result.exit_code == 2
