"""kdbench.report on fixture run directories (real RunDir files, synthetic per-example scores whose
seed- and run-averages are known by construction; see report_fixtures.py)."""

from __future__ import annotations

import base64
import csv
import json
import math
import re
import statistics
from pathlib import Path

import numpy as np
import pytest

from kdbench.errors import ConfigError, DataError
from kdbench.metrics import bootstrap_ci, paired_test
from kdbench.report import build_report, build_sections, holm, leaderboard_markdown, write_long_csv
from kdbench.report.collect import load, reference_stat
from kdbench.report.papers import judge_of, load_paper_results
from report_fixtures import (N, SUITE, build_judge_results, build_oll_run, build_reference_runs, targets)

SHARED_CSV = Path(__file__).resolve().parents[2] / "shared" / "spec" / "paper_results.csv"


@pytest.fixture(scope="module")
def fixture_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("report")
    runs = build_reference_runs(root)
    build_oll_run(root / "oll", "kd", arc=0.40)
    build_oll_run(root / "oll", "sft", arc=0.35)
    build_judge_results(root / "judge", runs["kd"][0].path, runs["teacher"][0].path)
    return root


@pytest.fixture(scope="module")
def report(fixture_root):
    return build_report([fixture_root], out=fixture_root / "out", compare_papers=True)


@pytest.fixture(scope="module")
def data(fixture_root):
    return load([fixture_root])


def _table(report_sections, table_id):
    for section in report_sections:
        for table in section.tables:
            if table.id == table_id:
                return table
    raise AssertionError(f"no table {table_id}")


def _row(table, label):
    return next(row for row in table.rows if row[0].text == label)


# --- statistics ---------------------------------------------------------------------------------


def test_holm_against_hand_computed_values():
    # sorted p: 0.01 (x3), 0.03 (x2), 0.04 (x1) -> 0.03, 0.06, 0.06 after the monotone step-down
    assert holm([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])
    assert holm([0.5]) == [0.5]
    assert holm([0.02, 0.02]) == pytest.approx([0.04, 0.04])
    assert holm([0.9, 0.001, 0.6]) == pytest.approx([1.0, 0.003, 1.0])


def test_row_statistics_recover_the_constructed_values(data, fixture_root):
    goal = targets()
    stat = reference_stat(data.runs_of("kd"), SUITE, "rougeL")
    # the seed- and run-averaged per-example scores are the construction's targets
    assert stat.n_runs == 2 and stat.n_seeds == 2 and stat.n == N
    np.testing.assert_allclose([stat.per_example[f"ex{i:03d}"] for i in range(N)], goal["kd"], atol=1e-9)
    # independent recomputation from the raw score files: mean over runs of mean over seeds of mean over examples
    run_means = []
    for name in ("kd-seed1", "kd-seed2"):
        scores = json.loads((fixture_root / "eval" / name / "scores" / f"{SUITE}.json").read_text())
        run_means.append(statistics.fmean(statistics.fmean(v) for v in scores["scores"]["rougeL"].values()))
    assert stat.mean == pytest.approx(statistics.fmean(run_means))
    assert stat.std_train == pytest.approx(statistics.stdev(run_means))
    assert stat.std_train > 0.3  # the two training runs differ by about a point
    assert stat.ci == pytest.approx(bootstrap_ci(list(goal["kd"]), n_resamples=1000))
    single = reference_stat(data.runs_of("sft"), SUITE, "rougeL")
    assert single.std_train is None and single.std_gen > 0


def test_noise_level_difference_is_a_tie_and_a_clear_one_is_marked(data):
    goal = targets()
    sections, _ = build_sections(data, baseline_label="sft", plots=False)
    table = _table(sections, f"leaderboard-{SUITE}-rougeL")
    verdict = {row[0].text: row[-1] for row in table.rows}
    assert verdict["kd"].text == "tie" and verdict["kd"].kind == "tie"
    assert verdict["akl"].text == "better"
    assert verdict["sft"].text == "baseline"
    # p-values: independent paired tests on the constructed targets, then Holm over the three rows
    raw = {label: paired_test(list(goal[label]), list(goal["sft"])) for label in ("kd", "akl", "teacher")}
    adjusted = dict(zip(raw, holm(list(raw.values()))))
    assert adjusted["kd"] >= 0.05 and adjusted["akl"] < 0.05
    p_column = [c.title for c in table.columns].index("p Holm")
    assert float(_row(table, "kd")[p_column].text) == pytest.approx(adjusted["kd"], abs=1e-3)
    # the other direction: against akl, sft and kd are significantly worse
    sections, _ = build_sections(data, baseline_label="akl", plots=False)
    table = _table(sections, f"leaderboard-{SUITE}-rougeL")
    assert {row[0].text: row[-1].text for row in table.rows}["sft"] == "worse"


def test_markdown_marks_ties_and_differences(report):
    lines = report.markdown.splitlines()
    start = lines.index(f"### {SUITE}: Rouge-L")
    block = lines[start:start + 8]
    kd = next(line for line in block if line.startswith("| kd "))
    akl = next(line for line in block if line.startswith("| akl "))
    assert kd.rstrip(" |").endswith("tie") and akl.rstrip(" |").endswith("better")
    assert "**" in akl and "**" not in next(line for line in block if line.startswith("| teacher "))


def test_best_entry_per_column_excludes_the_teacher(data):
    sections, _ = build_sections(data, plots=False)
    table = _table(sections, f"bucket-{SUITE}-rougeL")
    for column in range(1, len(table.columns)):
        best = [row[0].text for row in table.rows if row[column].best]
        assert best == ["akl"]
    cost = _table(sections, "cost")
    seconds = [c.title for c in cost.columns].index("train s")
    assert [row[0].text for row in cost.rows if row[seconds].best] == ["sft"]  # lower is better


# --- Markdown -----------------------------------------------------------------------------------


def test_markdown_fits_100_columns_and_every_table_names_its_settings(report, data):
    assert max(len(line) for line in report.markdown.splitlines()) <= 100
    sections, _ = build_sections(data, compare_papers=True, plots=False)
    for section in sections:
        for table in section.tables:
            if table.id in ("cost", "methods"):  # training facts, not an evaluation's settings
                continue
            notes = " ".join(table.notes).lower()
            for word in ("judge", "decoding", "seed", "data"):
                assert word in notes, f"table {table.id} does not state its {word}"
    assert "Generation seeds: 10,20." in report.markdown


def test_wide_tables_are_split_not_truncated(data):
    from kdbench.report.render import table_markdown
    from kdbench.report.tables import Column, Table, cell

    wide = Table("w", "wide", [Column("model", align="left")] + [Column(f"column number {i}") for i in range(12)],
                 [[cell("a-rather-long-label")] + [cell(f"{i}.0") for i in range(12)]])
    lines = table_markdown(wide, width=100)
    assert max(len(line) for line in lines) <= 100
    assert sum(line.startswith("| model") for line in lines) > 1  # the first column repeats in each part
    assert all(f"column number {i}" in "\n".join(lines) for i in range(12))


def test_leaderboard_markdown_keeps_the_demo_signature(data, fixture_root):
    runs = [run.run for run in data.eval_runs]
    text = leaderboard_markdown(runs, title="kdbench demo --preset smoke", baseline_label="sft",
                                reference_label="teacher", data_note="embedded synthetic world (seed 0)")
    assert text.startswith("# kdbench demo --preset smoke")
    assert "Data: embedded synthetic world (seed 0)." in text
    assert "teacher vs sft rougeL 95% CIs" in text
    assert max(len(line) for line in text.splitlines()) <= 100
    assert "| kd " in text and "tie" in text
    single = leaderboard_markdown(runs[:1], title="eval", baseline_label=None, reference_label=None)
    assert "p Holm" not in single


# --- HTML ---------------------------------------------------------------------------------------


def test_html_is_self_contained_with_every_table_and_image(report):
    page = report.html
    assert page is not None and (report.paths["html"]).read_text() == page
    text = re.sub(r'"data:[^"]*"', '"data:"', page)  # base64 payloads may contain "//"
    assert not re.search(r"(?:https?|ftp|wss?|file):|//[a-z0-9]", text, re.IGNORECASE), "external address in the page"
    assert "<script" not in text.lower() and "@import" not in text and "url(" not in text
    for attribute, value in re.findall(r'\b(src|href)="([^"]*)"', page):
        assert value.startswith("data:") or value.startswith("#"), f"{attribute}={value[:40]}"
    images = re.findall(r'<img [^>]*src="([^"]+)"', page)
    assert len(images) == len(report.figures) >= 4
    for uri in images:
        assert uri.startswith("data:image/png;base64,")
        png = base64.b64decode(uri.split(",", 1)[1], validate=True)
        assert png[:8] == b"\x89PNG\r\n\x1a\n" and b"matplotlib.org" not in png
    table_ids = re.findall(r'<table class="kd" id="([^"]+)"', page)
    assert table_ids == report.tables
    expected = {f"leaderboard-{SUITE}-rougeL", f"leaderboard-{SUITE}-exact_match", f"bucket-{SUITE}-rougeL",
                f"category-{SUITE}-rougeL", f"wtl-{SUITE}-rougeL", "oll-oll", "judged-mt_bench", f"judged-{SUITE}",
                "judged-alpaca_eval_2", "judged-mt_bench-category", "cost"}
    assert expected <= set(table_ids) and any(t.startswith("paper-") for t in table_ids)
    assert {f"fig-bucket-{SUITE}-rougeL", f"fig-forest-{SUITE}-rougeL", f"fig-forest-{SUITE}-exact_match",
            f"fig-cost-{SUITE}-rougeL", f"fig-wtl-{SUITE}", "fig-wtl-alpaca_eval_2", "fig-training"} <= set(report.figures)
    for figure in report.figures:
        assert report.paths[f"plot:{figure}"].read_bytes()[:4] == b"\x89PNG"


def test_user_text_is_escaped_in_html(tmp_path):
    from report_fixtures import write_eval_run

    rng = np.random.default_rng(0)
    values = rng.uniform(0, 50, N)
    write_eval_run(tmp_path, "evil", '<img src="x">', {"10": values, "20": values})
    result = build_report([tmp_path], formats=["html"])
    assert '<img src="x">' not in result.html and "&lt;img src=&quot;x&quot;&gt;" in result.html


# --- CSV ----------------------------------------------------------------------------------------


def test_csv_is_long_format_and_pivots(report, data):
    pd = pytest.importorskip("pandas")
    frame = pd.read_csv(report.paths["csv"], dtype={"seed": str})
    local = frame[frame["kind"] != "judge"]
    assert len(local) == sum(len(run.metrics) for run in data.eval_runs + data.train_runs if run.kind != "judge")
    keys = ["run", "suite", "metric", "seed", "subset"]
    assert not local.duplicated(keys).any()
    overall = local[(local["suite"] == SUITE) & (local["seed"] == "mean") & (local["subset"] == "all")]
    pivot = overall.pivot_table(index="label", columns="metric", values="value", aggfunc="mean")
    assert pivot.loc["kd", "rougeL"] == pytest.approx(reference_stat(data.runs_of("kd"), SUITE, "rougeL").mean)
    per_seed = local[(local["suite"] == SUITE) & (local["metric"] == "rougeL") & (local["subset"] == "all")
                     & (local["seed"] != "mean")]
    assert sorted(per_seed["seed"].unique()) == ["10", "20"]
    judged = frame[frame["kind"] == "judge"]
    assert set(judged["suite"]) == {"mt_bench", SUITE, "alpaca_eval_2"}
    assert set(judged["judge"]) == {"gpt-4o-2024-08-06", "offline-rouge-margin0.05", "gpt-4-1106-preview"}
    omega = judged[(judged["suite"] == SUITE) & (judged["metric"] == "omega")]
    assert omega["value"].item() == pytest.approx((7 - 3) / 12 * 100)
    assert (omega["wins"].item(), omega["ties"].item(), omega["losses"].item(), omega["n_failed"].item()) == (7, 2, 3, 1)
    mt = judged[(judged["suite"] == "mt_bench") & (judged["metric"] == "overall") & (judged["subset"] == "all")]
    assert sorted(mt["label"]) == ["kd", "sft"]


def test_write_long_csv_without_pandas(tmp_path, data):
    path = write_long_csv([run.run for run in data.eval_runs], tmp_path / "m.csv")
    with open(path, newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == sum(len(run.metrics) for run in data.eval_runs)
    assert {"run", "label", "suite", "metric", "seed", "subset", "value"} <= set(rows[0])


# --- other tables -------------------------------------------------------------------------------


def test_oll_judged_and_cost_tables(data):
    sections, _ = build_sections(data, plots=False)
    oll = _table(sections, "oll-oll")
    titles = [c.title for c in oll.columns]
    assert titles[2].startswith("arc_challenge") and titles[-1] == "average"
    assert _row(oll, "kd")[2].value == pytest.approx(40.0)
    expected_average = 100 * statistics.fmean([0.40] + [0.3 + 0.05 * i for i in range(1, 6)])
    assert _row(oll, "kd")[-1].value == pytest.approx(expected_average)
    assert _row(oll, "kd")[-1].best and not _row(oll, "sft")[-1].best
    pairwise = _table(sections, f"judged-{SUITE}")
    titles = [c.title for c in pairwise.columns]
    row = pairwise.rows[0]
    assert [c.text for c in row[:6]] == ["kd", "teacher", "33.33", "7", "2", "3"]
    assert [row[titles.index(t)].text for t in ("failed", "n", "judge")] == ["1", "12", "offline-rouge-margin0.05"]
    ae = _table(sections, "judged-alpaca_eval_2")
    assert [c.text for c in ae.rows[0][:3]] == ["kd", "12.50", "1.10"]
    assert "length_controlled_winrate" not in [c.title for c in ae.columns]
    assert any("gpt-4-1106-preview vs gpt4_1106_preview" in note for note in ae.notes)
    mt = _table(sections, "judged-mt_bench")
    assert {r[0].text for r in mt.rows} == {"kd", "sft"}
    assert [c.title for c in mt.columns][1:4] == ["turn_1", "turn_2", "overall"]
    cost = _table(sections, "cost")
    titles = [c.title for c in cost.columns]
    kd = _row(cost, "kd")
    assert kd[titles.index("runs")].text == "2"
    assert kd[titles.index("train s")].value == pytest.approx(45.0)  # mean of 40 s and 50 s
    assert kd[titles.index("infer tok/s")].value == pytest.approx(2 * N * 50 / 20.0)


def test_training_curves_need_no_matplotlib_for_the_rest(monkeypatch, fixture_root):
    from kdbench.report import plots

    monkeypatch.setattr(plots, "available", lambda: False)
    result = build_report([fixture_root], formats=["md", "html"])
    assert result.figures == [] and "matplotlib cannot be imported" in result.markdown
    assert "<img" not in result.html


# --- published numbers --------------------------------------------------------------------------


def test_paper_results_are_shipped_verbatim():
    rows = load_paper_results()
    if SHARED_CSV.is_file():
        with open(SHARED_CSV, newline="") as handle:
            shared = list(csv.DictReader(handle))
        assert len(rows) == len(shared)
        assert [(r.paper, r.method, r.benchmark, r.metric, r.text) for r in rows] == [
            (r["paper"], r["method"], r["benchmark"], r["metric"], r["value"]) for r in shared]
    else:
        assert len(rows) > 400
    by_key = {(r.paper, r.benchmark, r.method): r for r in rows}
    assert "GPT-4o-2024-08-06" in judge_of(by_key[("daDPO", "mt_bench", "daDPO")])
    assert "GPT-4-0125-preview" in judge_of(next(r for r in rows if r.paper == "ADPA" and r.base_benchmark == "mt_bench"))
    assert judge_of(by_key[("DPKD", "dolly", "SFT")]).startswith("none")


def test_compare_papers_shows_published_numbers_beside_not_inside_rankings(report, data):
    local_labels = set(data.labels())
    sections, _ = build_sections(data, compare_papers=True, plots=False)
    papers = [s for s in sections if s.id == "papers"]
    assert len(papers) == 1 and papers[0].tables
    for section in sections:
        if section.id == "papers":
            continue
        for table in section.tables:
            if table.id.startswith("leaderboard-"):
                assert {row[0].text for row in table.rows} <= local_labels
    dpkd = next(t for t in papers[0].tables if t.title.startswith("DPKD Table 1 · teacher gpt2-1.5B · dolly"))
    sft = next(row for row in dpkd.rows if row[0].text == "SFT" and row[1].text == "gpt2-120M")
    assert sft[2].text == "23.3"
    assert "judge: none" in dpkd.notes[0] and "DPKD, Table 1" in dpkd.notes[0]
    akl = next(t for t in papers[0].tables if t.title.startswith("AKL Table 1 · teacher gpt2-1.5B · dolly"))
    assert next(r for r in akl.rows if r[0].text == "SFT")[2].text == "23.01 ±0.18"
    assert "Published results" in report.markdown
    plain = build_report([Path(report.paths["md"]).parents[1]], formats=["md"])
    assert "Published results" not in plain.markdown


# --- errors -------------------------------------------------------------------------------------


def test_user_errors_are_one_sentence(tmp_path, fixture_root):
    with pytest.raises(ConfigError, match="format"):
        build_report([fixture_root], formats=["pdf"])
    with pytest.raises(ConfigError, match="suite"):
        build_report([fixture_root], suite="nope", formats=["md"])
    with pytest.raises(DataError):
        build_report([tmp_path / "missing"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="No run"):
        build_report([tmp_path / "empty"])


def test_missing_baseline_is_explained(data):
    sections, _ = build_sections(data, baseline_label="nonexistent", plots=False)
    assert any("No row is labelled 'nonexistent'" in p for s in sections for p in s.intro)
    table = _table(sections, f"leaderboard-{SUITE}-rougeL")
    assert "verdict" not in [c.title for c in table.columns]
    assert not math.isnan(_row(table, "kd")[3].value)


def test_method_table_names_each_trained_recipe_with_its_citation(data):
    from kdbench import registry

    sections, _ = build_sections(data, plots=False)
    methods = _table(sections, "methods")
    assert {r[0].text for r in methods.rows} >= {"kd", "sft"}
    entry = registry.get("trainers", "kd")
    assert f"kd: {entry.description} Source: {entry.body['citation']}" in methods.notes
