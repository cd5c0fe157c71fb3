"""The regression gate: tolerances from the spread over seeds; passes unchanged runs, fails (naming the
metric) on a run degraded beyond tolerance."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from kdbench.check import build_baseline, check, load_baseline, tolerance_bound, write_baseline
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
    by_key = {(e["label"], e.get("versus"), e["metric"], e["subset"]): e for e in data["metrics"]}
    # sft rougeL moved by ±1.0 over seeds (std 1.0) -> tolerance 3.0; teacher EM by ±0.5 -> floor 1.5 vs 1.0
    assert by_key[("sft", None, "rougeL", "all")]["tolerance"] == pytest.approx(3.0)
    assert by_key[("teacher", None, "exact_match", "all")]["tolerance"] == pytest.approx(1.5)
    assert by_key[("sft", None, "rougeL", "bucket:(70,inf)")]["tolerance"] == pytest.approx(7.5)
    # the paired contrast teacher - sft moved by -/+0.5 (rougeL: 80+s - (40+2s) = 40-s): std 0.5 -> 1.5
    assert by_key[("teacher", "sft", "rougeL", "all")]["mean"] == pytest.approx(40.0)
    assert by_key[("teacher", "sft", "rougeL", "all")]["tolerance"] == pytest.approx(1.5)
    assert by_key[("teacher", "sft", "exact_match", "all")]["tolerance"] == pytest.approx(1.0)  # std 0: the floor


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
    # SFT's own value and its contrast with the teacher (which moved by the same 5 points)
    assert [c.name for c in comparisons if c.status == "regressed"] == ["sft/synthetic/exact_match",
                                                                        "teacher-sft/synthetic/exact_match"]
    result = runner.invoke(app, ["check", "--baseline", str(path), "--runs", str(now)])
    assert result.exit_code == 1 and "sft/synthetic/exact_match" in result.output and "regressed" in result.output


def test_small_moves_within_tolerance_and_improvements_pass(baseline, tmp_path):
    path, _ = baseline
    now = _seed_runs(tmp_path / "now", 0.0)
    for label in ("teacher", "sft"):
        run = RunDir(now / f"eval-{label}")
        records = run.metrics()
        records[0]["value"] -= 1.0 if label == "teacher" else 0.0  # within tolerance
        records[1]["value"] += 10.0  # an improvement of both models: their contrast stays
        run.write_metrics(records, replace_suite="synthetic")
    passed, comparisons = check(path, [now])
    assert passed and {c.status for c in comparisons} == {"ok", "improved"}
    assert {c.name for c in comparisons if c.status == "improved"} == {"teacher/synthetic/exact_match",
                                                                       "sft/synthetic/exact_match"}


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


def _with_kd(root: Path, shift: float, kd_gain: float) -> Path:
    """Seed runs plus a KD row that scores ``kd_gain`` above SFT; SFT's seed spread (2 × shift) is wider
    than its gain, so only the paired contrast can see the gain vanish."""
    _seed_runs(root, shift)
    _eval_run(root, "kd", {("rougeL", "all"): 40.0 + 2 * shift + kd_gain, ("exact_match", "all"): 20.0 + shift,
                           ("rougeL", "bucket:(70,inf)"): 30.0 + 5 * shift})
    return root


def test_a_contrast_catches_what_absolute_tolerances_cannot(tmp_path):
    groups = [find_run_dirs([_with_kd(tmp_path / f"seed{i}", shift, 4.0 + 0.1 * i)])
              for i, shift in enumerate((-1.5, 0.0, 1.5))]
    path = tmp_path / "baseline"
    write_baseline(path, build_baseline(groups, k=3.0, floor=1.0, contrast_floor=1.0))
    # KD that lost its gain (scores SFT's value) stays inside KD's absolute tolerance (3 x std 3.0) ...
    passed, comparisons = check(path, [_with_kd(tmp_path / "dropped", 0.0, 0.0)])
    by_name = {c.name: c for c in comparisons}
    assert by_name["kd/synthetic/rougeL"].status == "ok"
    # ... but not inside the paired contrast's (std 0.1 -> the 1.0 floor)
    assert by_name["kd-sft/synthetic/rougeL"].status == "regressed" and not passed
    # a contrast also fails when it grows: a relation between two methods that changed
    passed, comparisons = check(path, [_with_kd(tmp_path / "grown", 0.0, 9.0)])
    assert not passed and {c.name for c in comparisons if c.status == "regressed"} == {"kd-sft/synthetic/rougeL"}
    passed, _ = check(path, [_with_kd(tmp_path / "same", 0.7, 4.1)])
    assert passed


def test_tolerance_bound_is_a_fraction_of_the_teacher_student_gap(baseline):
    _, data = baseline
    entry = next(e for e in data["metrics"] if e["label"] == "sft" and e["metric"] == "rougeL" and e["subset"] == "all")
    assert tolerance_bound(data, entry) == pytest.approx(0.5 * (80.0 - 40.0))
    bucket = next(e for e in data["metrics"] if e["label"] == "sft" and e["subset"] == "bucket:(70,inf)")
    assert tolerance_bound(data, bucket) == pytest.approx(0.5 * (90.0 - 30.0))
    assert tolerance_bound({"metrics": [entry]}, entry) is None  # no teacher row: no bound


REPO = Path(__file__).resolve().parents[1]


def test_committed_baseline_has_no_tolerance_wider_than_its_bound():
    """A gate that cannot fail is caught when the baseline is rebuilt: every tolerance of
    results/baseline is below half the teacher-SFT gap on its suite, metric and subset."""
    data = load_baseline(REPO / "results" / "baseline")
    entries = data["metrics"]
    assert any(e.get("versus") for e in entries), "the baseline tracks paired contrasts"
    too_wide = []
    for entry in entries:
        bound = tolerance_bound(data, entry)
        assert bound is not None, f"no teacher and sft rows to bound {entry}"
        if not entry["tolerance"] <= bound:
            who = entry["label"] + (f"-{entry['versus']}" if entry.get("versus") else "")
            too_wide.append(f"{who}/{entry['suite']}/{entry['metric']}[{entry['subset']}]: "
                            f"{entry['tolerance']} > {bound:.2f}")
    assert not too_wide, too_wide
