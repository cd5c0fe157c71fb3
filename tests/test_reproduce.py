"""``kdbench reproduce``: the reproduction files (schema, keys into paper_results.csv, rows that light up when
their recipe lands), the dry-run plan, the checks before any work (unknown table, unpinned revision, disk), the
confidence interval over training seeds x examples; and (slow) every table's miniature end to end."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from typer.testing import CliRunner

from kdbench.cli import app
from kdbench.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]
TABLES = ["dpkd-table1", "dadpo-main", "akl-table1", "adpa-table1"]
runner = CliRunner()


@pytest.fixture()
def user_registry(tmp_path, monkeypatch):
    """edit(kind, name, change, new_name=None) writes an edited copy of a built-in file into a user registry."""
    monkeypatch.setenv("KDBENCH_REGISTRY_PATH", str(tmp_path / "reg"))

    def edit(kind: str, name: str, change, new_name: str | None = None) -> Path:
        body = yaml.safe_load((REPO / kind / f"{name}.yaml").read_text())
        change(body)
        if new_name:
            body["name"] = new_name
        path = tmp_path / "reg" / kind / f"{new_name or name}.yaml"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(yaml.safe_dump(body, sort_keys=False, allow_unicode=True))
        return path

    return edit


def _invoke(*args):
    result = runner.invoke(app, list(args))
    return result, result.output


def test_every_table_is_registered_and_listed():
    from kdbench import registry

    assert set(TABLES) <= set(registry.names("reproductions"))
    result, out = _invoke("list", "reproductions")
    assert result.exit_code == 0 and all(f"  {name} " in out for name in TABLES)


@pytest.mark.parametrize("name", TABLES)
def test_every_row_and_benchmark_has_published_numbers(name):
    from kdbench.reproduce.table import load_table
    from kdbench.report.papers import load_paper_results

    table = load_table(name)
    published = {(r.paper, r.table, r.teacher, r.student, r.method, r.benchmark, r.metric) for r in load_paper_results()}
    for row in table.rows:  # every row has a published number in some pair; every benchmark too
        assert any(table.paper_key(p, row, b) in published for p in table.pairs for b in table.benchmarks), row.label
    for bench in table.benchmarks:
        assert any(table.paper_key(p, r, bench) in published for p in table.pairs for r in table.rows), bench.benchmark
    for pair in table.pairs:
        for key in (pair.teacher, pair.student):
            assert key in table.models
    for row in table.rows:
        assert row.source  # every row says where its hyper-parameters come from


def test_a_row_lights_up_when_its_recipe_lands(user_registry):
    """A row whose recipe this version lacks is planned as "not available" and runs once the recipe lands
    (every row of the built-in tables has its recipe now, so a user table names one that does not exist)."""
    from kdbench.reproduce.plan import build_plan
    from kdbench.reproduce.table import load_table

    def future_atkd(body):
        for row in body["rows"]:
            if row["label"] == "ATKD":
                row["method"] = "atkd_next"

    user_registry("reproductions", "adpa-table1", future_atkd)
    before = {r.label: r.available for r in load_table("adpa-table1").rows}
    assert before["ATKD"] is False and before["DCKD"] is True
    stage = next(s for s in build_plan(load_table("adpa-table1"), "full", Path("x")).stages if "ATKD" in s.name)
    assert stage.status == "not available" and "not available in this version" in stage.note
    user_registry("trainers", "atkd", lambda body: body.pop("aliases", None), new_name="atkd_next")
    table = load_table("adpa-table1")
    assert {r.label: r.available for r in table.rows}["ATKD"] is True
    stages = [s for s in build_plan(table, "full", Path("x")).stages if "ATKD" in s.name]
    assert stages and all(s.status == "to run" for s in stages)


@pytest.mark.parametrize("name", TABLES)
def test_full_dry_run_prints_every_stage_with_compute(name, tmp_path):
    from kdbench.reproduce.table import load_table

    result, out = _invoke("reproduce", name, "--scale", "full", "--dry-run", "--out", str(tmp_path / "out"))
    assert result.exit_code == 0, out
    table = load_table(name)
    for row in table.rows:
        assert row.label in out
    for pair in table.pairs:
        assert f"pair {pair.name}" in out
    assert "GPU-h" in out and "CPU-hours from measured throughput" in out and "NOT measured" in out
    assert "total still to run:" in out and "deviations from the paper:" in out
    for gap in table.gaps:
        assert gap[:40] in out
    if any(not r.available for r in table.rows):
        assert "method not available in this version" in out
    assert not (tmp_path / "out").exists()  # a dry run writes nothing


def test_dry_run_totals_follow_the_models_sizes(user_registry):
    from kdbench.reproduce.plan import build_plan
    from kdbench.reproduce.table import load_table

    small = build_plan(load_table("akl-table1"), "full", Path("x")).total()

    def grow(body):
        for spec in body["models"].values():
            spec["params_b"] *= 10
    user_registry("reproductions", "akl-table1", grow)
    big = build_plan(load_table("akl-table1"), "full", Path("x")).total()
    assert big.train_flops == pytest.approx(10 * small.train_flops)
    assert big.gpu_hours() == pytest.approx(10 * small.gpu_hours())


def test_dry_run_shows_finished_stages_as_done(tmp_path):
    from kdbench.reproduce.layout import train_dir
    from kdbench.reproduce.plan import build_plan
    from kdbench.reproduce.table import load_table
    from kdbench.store import RunDir

    table = load_table("akl-table1")
    row = next(r for r in table.rows if r.label == "FKL")
    target = train_dir(tmp_path, row, table.mini["train_seeds"][0])
    run = RunDir.create(target.parent, target.name, kind="train", config={})
    plan = build_plan(table, "mini", tmp_path)
    fkl = next(s for s in plan.stages if s.kind == "train" and s.name.startswith("FKL "))
    assert fkl.status == "to run"  # created, not finished
    run.finish()
    fkl = next(s for s in build_plan(table, "mini", tmp_path).stages if s.kind == "train" and s.name.startswith("FKL "))
    assert fkl.status == "done"


def test_unknown_table_is_one_sentence_exit_2(tmp_path):
    result, out = _invoke("reproduce", "dpkd-table9", "--out", str(tmp_path / "out"))
    assert result.exit_code == 2
    assert "Unknown reproduction 'dpkd-table9'" in out and "dpkd-table1" in out and "Traceback" not in out
    assert not (tmp_path / "out").exists()


def test_unpinned_revision_refuses_a_full_run_before_any_work(tmp_path):
    result, out = _invoke("reproduce", "dpkd-table1", "--scale", "full", "--out", str(tmp_path / "out"))
    assert result.exit_code == 2
    assert "no pinned hub revision for model gpt2-xl" in out and "Traceback" not in out
    assert not (tmp_path / "out").exists()


def test_a_file_without_a_revision_key_is_rejected(user_registry, tmp_path):
    user_registry("reproductions", "akl-table1", lambda body: body["models"]["gpt2"].pop("revision"))
    result, out = _invoke("reproduce", "akl-table1", "--dry-run")
    assert result.exit_code == 2 and "revision" in out and "Traceback" not in out


def test_insufficient_disk_is_one_sentence_before_any_work(user_registry, tmp_path):
    def pinned_and_huge(body):
        for group in ("models", "datasets"):
            for spec in body[group].values():
                spec["revision"] = "0123456789abcdef0123456789abcdef01234567"
        for spec in body["models"].values():
            spec["params_b"] = 1e7  # 10^16 parameters: more disk than any machine has
    user_registry("reproductions", "akl-table1", pinned_and_huge)
    result, out = _invoke("reproduce", "akl-table1", "--scale", "full", "--out", str(tmp_path / "out"),
                          "--cache-dir", str(tmp_path / "cache"))
    assert result.exit_code == 2 and "GB of disk" in out and "free" in out and "Traceback" not in out
    assert not (tmp_path / "out").exists() and not (tmp_path / "cache").exists()


def test_a_dataset_without_a_training_file_refuses_a_full_run(user_registry, tmp_path):
    def pinned(body):
        for group in ("models", "datasets"):
            for spec in body[group].values():
                spec["revision"] = "0123456789abcdef0123456789abcdef01234567"
    user_registry("reproductions", "adpa-table1", pinned)
    result, out = _invoke("reproduce", "adpa-table1", "--scale", "full", "--out", str(tmp_path / "out"))
    assert result.exit_code == 2 and "names no file in kdbench's training format" in out and "Traceback" not in out
    assert not (tmp_path / "out").exists()


def test_unknown_scale_is_one_sentence():
    result, out = _invoke("reproduce", "akl-table1", "--scale", "huge", "--dry-run")
    assert result.exit_code == 2 and "Unknown scale 'huge'" in out


def test_a_row_pointing_at_an_unknown_stage_is_rejected(user_registry):
    from kdbench.reproduce.table import load_table

    user_registry("reproductions", "akl-table1", lambda body: body["rows"][2].update(teacher="teacher_dpo"))
    with pytest.raises(ConfigError, match="teacher_dpo"):
        load_table("akl-table1")


def test_row_folders_never_collide():
    from kdbench.reproduce.layout import slug

    assert slug("ADPA") != slug("ADPA+") and slug("FKL+RKL") == "fkl-plus-rkl"


def test_seeds_examples_ci_covers_seed_spread():
    from kdbench.reproduce.compare import seeds_examples_ci

    rng = np.random.default_rng(0)
    one = [list(rng.normal(50, 10, 200))]
    mean, low, high = seeds_examples_ci(one)
    assert low < mean < high and mean == pytest.approx(np.mean(one))
    # two training seeds far apart: the interval must be wider than pooling their examples as one seed
    apart = [list(rng.normal(40, 10, 200)), list(rng.normal(60, 10, 200))]
    _, low2, high2 = seeds_examples_ci(apart)
    pooled = seeds_examples_ci([apart[0] + apart[1]])
    assert (high2 - low2) > 3 * (pooled[2] - pooled[1])
    assert low2 <= 45 and high2 >= 55


def test_comparison_marks_unavailable_rows_and_the_paper_inside_ci(user_registry):
    from kdbench.reproduce.compare import compare
    from kdbench.reproduce.table import load_table

    def future_minillm(body):  # a row whose recipe this version lacks
        for row in body["rows"]:
            if row["label"] == "MiniLLM":
                row["method"] = "minillm_next"

    user_registry("reproductions", "dpkd-table1", future_minillm)
    table = load_table("dpkd-table1")
    pair = table.pairs[0]
    scores = {"SFT": {"reference": {"1": [21.3] * 10 + [25.5] * 10}},      # mean 23.4, CI about +-0.9
              "SeqKD": {"reference": {"1": [30.0] * 10 + [30.2] * 10}}}    # far above the paper's number
    rows = {(r.row, r.benchmark): r for r in compare(table, pair, scores)}
    sft = rows[("SFT", "dolly")]
    assert sft.paper == 23.3 and sft.inside is True and sft.difference == pytest.approx(0.1)
    assert rows[("SeqKD", "dolly")].inside is False and rows[("SeqKD", "dolly")].difference > 0
    assert rows[("MiniLLM", "dolly")].status.startswith("method not available in this version")
    assert rows[("KD", "dolly")].status == "not run"



def test_a_failed_judgment_drops_that_example_from_every_training_seed():
    """Full-scale judge scores: a failed judgment (None) in one seed removes that example from all seeds, so
    the CI's seeds x examples rectangle holds; numbers (MT-Bench ratings) and outcomes (ω) both count."""
    from kdbench.reproduce.compare import compare
    from kdbench.reproduce.table import load_table

    table = load_table("adpa-table1")
    scores = {"ADPA": {"mt_bench": {"1": [8.0, None, 6.0, 7.0], "2": [6.0, 9.0, None, 5.0]}}}
    row = next(r for r in compare(table, table.pairs[0], scores) if r.row == "ADPA" and r.benchmark.startswith("mt_bench"))
    assert (row.n_seeds, row.n_examples) == (2, 2) and row.kdbench == pytest.approx((8 + 7 + 6 + 5) / 4)
    dadpo = load_table("dadpo-main")
    label = next(r.label for r in dadpo.rows if r.method)
    outcomes = {label: {"pairwise": {"1": ["win", "failed", "loss", "tie"], "2": ["win", "win", None, "win"]}}}
    omega = next(r for r in compare(dadpo, dadpo.pairs[0], outcomes) if r.row == label
                 and r.benchmark.startswith("in_domain"))
    assert (omega.n_seeds, omega.n_examples) == (2, 2) and omega.kdbench == pytest.approx((100 + 0 + 100 + 100) / 4)

# --- every table's miniature, end to end (slow) ---------------------------------------------------------------


@pytest.fixture(scope="module")
def stand_in_cache(tmp_path_factory):
    """One artifact cache for the four miniatures (per process, so parallel workers never share it): the
    stand-in world, teacher and student are built once and reused, as a user's cache would."""
    return tmp_path_factory.mktemp("reproduce-cache")


@pytest.mark.slow
@pytest.mark.parametrize("name", TABLES)
def test_mini_runs_every_row_evaluation_and_report(name, tmp_path, stand_in_cache):
    import csv

    from kdbench.reproduce import run_reproduction
    from kdbench.reproduce.table import load_table

    table = load_table(name)
    out = tmp_path / "out"
    result = run_reproduction(name, scale="mini", out_dir=out, cache_dir=stand_in_cache, progress=False)
    rows = list(csv.DictReader(open(out / "comparison.csv")))
    benchmarks = {b.benchmark + table.pairs[0].benchmark_suffix for b in table.benchmarks}
    assert {r["benchmark"] for r in rows} == benchmarks
    for row in table.rows:  # every row is in the report: measured on every benchmark, or marked unavailable
        mine = [r for r in rows if r["row"] == row.label]
        assert len(mine) == len(table.benchmarks)
        if row.available:
            assert all(r["kdbench"] not in ("", "None") and r["ci_low"] not in ("", "None") for r in mine), row.label
            assert all(int(r["n_seeds"]) == (1 if row.method is None else len(table.mini["train_seeds"])) for r in mine)
        else:
            assert all(r["status"].startswith("method not available in this version") for r in mine)
    compared = [r for r in rows if r["status"] == "compared"]
    assert compared and all(r["paper"] not in ("", "None") and r["difference"] not in ("", "None") for r in compared)
    md = (out / "reproduce.md").read_text()
    assert "| row | method | paper | kdbench | 95% CI | difference | paper inside CI |" in md
    assert "not comparable" in md and "Deviations from the paper" in md
    assert (out / "report" / "report.html").is_file()
    # rerunning reuses every finished stage: the dry-run of the same folder shows them as done
    from kdbench.reproduce import plan_reproduction

    plan, _ = plan_reproduction(name, scale="mini", out_dir=out)
    assert all(s.status in ("done", "not available") for s in plan.stages), [
        (s.name, s.status) for s in plan.stages if s.status not in ("done", "not available")]
    assert result.timings["total_seconds"] > 0


@pytest.mark.slow
def _local_models(tmp_path: Path, paper_teacher: str, paper_student: str) -> dict:
    """A table's teacher "t" and student "s" as local mirror folders (tmp_path/teacher, tmp_path/student)."""
    return {"t": {"hub": str(tmp_path / "teacher"), "revision": "local", "params_b": 0.001, "paper_name": paper_teacher},
            "s": {"hub": str(tmp_path / "student"), "revision": "local", "params_b": 0.0005, "paper_name": paper_student}}


def _local_dataset(tmp_path: Path, file: str, rows: int) -> dict:
    return {"hub": str(tmp_path), "revision": "local", "file": file, "rows": rows, "prompt_tokens": 10,
            "response_tokens": 10}


def test_full_scale_runs_on_local_mirrors_and_resumes(tmp_path, monkeypatch):
    """--scale full through the same code as on a GPU node, with the hub replaced by local mirror folders (tiny
    models, a tiny training file) and the real Dolly test file, three examples."""
    import csv

    from kdbench.reproduce import plan_reproduction, run_reproduction
    from tiny_models import build_tiny, write_tiny_data

    corpus, _ = build_tiny(tmp_path)
    write_tiny_data(tmp_path, corpus, n=8)
    monkeypatch.setenv("KDBENCH_DATA", str(REPO.parent / "shared" / "data"))
    monkeypatch.setenv("KDBENCH_REGISTRY_PATH", str(tmp_path / "reg"))
    quick = {"max_steps": 2, "batch_size": 4, "learning_rate": 1.0e-3, "max_length": 128, "max_prompt_length": 64}
    body = {
        "name": "local-table", "description": "DPKD Table 1 on local mirrors.", "paper": "DPKD", "table": "1",
        "source": "test", "train_data": "train",
        "models": _local_models(tmp_path, "gpt2-1.5B", "gpt2-120M"),
        "datasets": {"train": _local_dataset(tmp_path, "prompts.jsonl", 8)},
        "pairs": [{"teacher": "t", "student": "s", "paper_teacher": "gpt2-1.5B", "paper_student": "gpt2-120M"}],
        "preparation": [{"name": "teacher_sft", "of": "teacher", "kind": "sft", "settings": quick, "source": "test"}],
        "rows": [{"label": "teacher", "evaluate": "teacher", "paper_student": "teacher", "source": "test"},
                 {"label": "SFT", "method": "sft", "settings": quick, "source": "test"},
                 {"label": "KD", "method": "kd", "teacher": "teacher_sft", "settings": quick, "source": "test"},
                 {"label": "MiniLLM", "method": "minillm", "teacher": "teacher_sft", "settings": quick, "source": "test"},
                 {"label": "ImitKD", "method": "imitkd", "teacher": "teacher_sft", "settings": quick, "source": "test"}],
        "eval": {"benchmarks": [{"benchmark": "dolly", "metric": "rougeL", "kind": "reference", "suite": "dolly",
                                 "examples": 3}],
                 "seeds": [], "decoding": {"greedy": True, "max_new_tokens": 4, "max_prompt_length": 64}, "limit": 3,
                 "train_seeds": [1, 2], "source": "test"},
        "mini": yaml.safe_load((REPO / "reproductions" / "akl-table1.yaml").read_text())["mini"],
    }
    (tmp_path / "reg" / "reproductions").mkdir(parents=True)
    (tmp_path / "reg" / "reproductions" / "local-table.yaml").write_text(yaml.safe_dump(body))
    out = tmp_path / "out"
    run_reproduction("local-table", scale="full", out_dir=out, cache_dir=tmp_path / "cache", progress=False)
    rows = {r["row"]: r for r in csv.DictReader(open(out / "comparison.csv"))}
    assert rows["teacher"]["paper"] == "27.6" and rows["teacher"]["status"] == "compared"
    assert rows["SFT"]["n_seeds"] == "2" and rows["SFT"]["n_examples"] == "3" and rows["KD"]["kdbench"] != ""
    assert rows["MiniLLM"]["kdbench"] != ""  # its rollouts stop at the tiny models' last position
    assert rows["ImitKD"]["status"].startswith("method not available in this version")  # no trainers/imitkd.yaml
    plan, _ = plan_reproduction("local-table", scale="full", out_dir=out)
    assert {s.status for s in plan.stages if s.kind in ("prepare", "train", "evaluate")} == {"done", "not available"}


def _judged_local_table(tmp_path: Path, *, limit: int = 2, in_domain_prompts: bool = True) -> None:
    """A judged table (MT-Bench, AlpacaEval 1.0, AlpacaEval 2.0 against the SFT row, the pairwise ω on held-out
    prompts, a tiny lm-eval suite) on
    tiny local models, registered on KDBENCH_REGISTRY_PATH=tmp_path/reg (the caller sets it)."""
    from kdbench import harness
    from tiny_models import build_tiny, write_tiny_data

    corpus, tokenizer = build_tiny(tmp_path)
    tokenizer.chat_template = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                               "{% if add_generation_prompt %}assistant:{% endif %}")
    for name in ("teacher", "student"):  # a chat model: MT-Bench answers use the tokenizer's chat template
        tokenizer.save_pretrained(str(tmp_path / name))
    write_tiny_data(tmp_path, corpus, n=8)
    (tmp_path / "held.jsonl").write_text("".join(json.dumps({"instruction": f"Where does person {i} live?",
                                                              "input": ""}) + "\n" for i in range(3)))
    tasks = tmp_path / "lm_eval_tasks"
    records = [{"question": f"Which number follows {i}?", "choices": [str(i + 1), str(i + 2), str(i * 3)],
                "answer": 0} for i in range(4)]
    harness.local_multiple_choice_task("tiny_mc", records, tasks)
    reg = tmp_path / "reg"
    (reg / "tasks").mkdir(parents=True)
    (reg / "tasks" / "tiny-oll.yaml").write_text(yaml.safe_dump({
        "name": "tiny-oll", "description": "one tiny multiple-choice task", "type": "lm_eval", "protocol": "TINY",
        "include_path": [str(tasks)], "tasks": [{"task": "tiny_mc", "num_fewshot": 0, "metric": "acc"}]}))
    quick = {"max_steps": 1, "batch_size": 4, "learning_rate": 1.0e-3, "max_length": 128, "max_prompt_length": 64}
    body = {
        "name": "judged-table", "description": "ADPA Table 1 on local mirrors.", "paper": "ADPA", "table": "1",
        "source": "test", "train_data": "train",
        "models": _local_models(tmp_path, "t", "s"),
        "datasets": {"train": _local_dataset(tmp_path, "prompts.jsonl", 8),
                     "held": _local_dataset(tmp_path, "held.jsonl", 3)},
        "pairs": [{"teacher": "t", "student": "s", "paper_teacher": "t", "paper_student": "s"}],
        "preparation": [],
        "rows": [{"label": "teacher", "evaluate": "teacher", "paper_student": "teacher", "source": "test"},
                 {"label": "SFT", "method": "sft", "settings": quick, "source": "test"}],
        "eval": {"benchmarks": [
            {"benchmark": "mt_bench", "metric": "score", "kind": "judge", "suite": "mt_bench", "examples": limit,
             "judge_model": "fake-judge"},
            {"benchmark": "alpaca_eval_1", "metric": "win_rate", "kind": "judge", "suite": "alpaca_eval_1",
             "examples": limit, "judge_model": "fake-judge"},
            {"benchmark": "alpaca_eval_vs_sft", "metric": "win_rate", "kind": "judge", "suite": "alpaca_eval_2",
             "examples": limit, "judge_model": "fake-judge", "reference_row": "SFT"},
            {"benchmark": "in_domain", "metric": "omega", "kind": "judge", "suite": "pairwise", "examples": limit,
             "judge_model": "fake-judge", **({"prompts": "held"} if in_domain_prompts else {})},
            {"benchmark": "oll_v1", "metric": "average", "kind": "lm_eval", "suite": "tiny-oll", "examples": 4,
             "scale": 100}],
            "seeds": [], "decoding": {"greedy": True, "max_new_tokens": 4, "max_prompt_length": 64}, "limit": limit,
            "train_seeds": [1], "source": "test"},
        "mini": yaml.safe_load((REPO / "reproductions" / "akl-table1.yaml").read_text())["mini"],
    }
    (reg / "reproductions").mkdir(parents=True)
    (reg / "reproductions" / "judged-table.yaml").write_text(yaml.safe_dump(body))


def test_a_judged_table_without_a_judge_key_refuses_a_full_run_before_any_work(tmp_path, monkeypatch):
    """The full dry-run names the judge it needs; a run without a judge API key is one sentence, exit 2, and
    writes nothing (no training starts)."""
    monkeypatch.setenv("KDBENCH_REGISTRY_PATH", str(tmp_path / "reg"))
    for name in ("KDBENCH_JUDGE_API_KEY", "OPENAI_API_KEY"):
        monkeypatch.delenv(name, raising=False)
    _judged_local_table(tmp_path, in_domain_prompts=False)
    out = tmp_path / "out"
    result, text = _invoke("reproduce", "judged-table", "--scale", "full", "--dry-run", "--out", str(out))
    assert result.exit_code == 0, text
    assert "judge required: fake-judge" in text and "KDBENCH_JUDGE_API_KEY" in text
    assert "in_domain by fake-judge (2 prompts) - not run at full scale" in text
    result, text = _invoke("reproduce", "judged-table", "--scale", "full", "--out", str(out))
    assert result.exit_code == 2, text
    assert "no judge API key is set" in text and "Traceback" not in text
    assert not out.exists()


@pytest.mark.slow
def test_full_scale_judges_and_runs_lm_eval_through_the_existing_machinery(tmp_path, monkeypatch):
    """--scale full with MT-Bench, AlpacaEval (against its reference and against a row) and the pairwise ω judged
    by a local OpenAI-compatible server (real HTTP) and an lm-eval suite: every row gets a number, the key is written nowhere, and a rerun makes no new judge call."""
    import csv

    from judge_server import FakeJudgeServer
    from kdbench.reproduce import run_reproduction

    key = "sk-reproduce-SECRET-5e6f"
    monkeypatch.setenv("KDBENCH_DATA", str(REPO.parent / "shared" / "data"))
    monkeypatch.setenv("KDBENCH_REGISTRY_PATH", str(tmp_path / "reg"))
    monkeypatch.setenv("KDBENCH_JUDGE_API_KEY", key)
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    monkeypatch.setenv("KDBENCH_CACHE", str(tmp_path / "cache"))
    _judged_local_table(tmp_path)
    out = tmp_path / "out"
    with FakeJudgeServer(api_key=key) as server:
        monkeypatch.setenv("KDBENCH_JUDGE_BASE_URL", server.url)
        run_reproduction("judged-table", scale="full", out_dir=out, cache_dir=tmp_path / "cache", progress=False)
        calls = server.total_calls()
        assert calls > 0
        run_reproduction("judged-table", scale="full", out_dir=out, cache_dir=tmp_path / "cache", progress=False)
        assert server.total_calls() == calls  # answers and judgments are reused, not redone
    rows = {(r["row"], r["benchmark"]): r for r in csv.DictReader(open(out / "comparison.csv"))}
    for row in ("teacher", "SFT"):
        mt = rows[(row, "mt_bench")]
        assert mt["status"] != "not run" and 1 <= float(mt["kdbench"]) <= 10 and mt["n_examples"] == "4"  # 2 x 2 turns
        for name in ("alpaca_eval_1", "alpaca_eval_vs_sft"):
            ae = rows[(row, name)]
            assert ae["status"] != "not run" and 0 <= float(ae["kdbench"]) <= 100 and ae["n_examples"] == "2"
        oll = rows[(row, "oll_v1")]
        assert oll["status"] != "not run" and 0 <= float(oll["kdbench"]) <= 100
        omega = rows[(row, "in_domain")]
        assert omega["status"] != "not run" and -100 <= float(omega["kdbench"]) <= 100 and omega["n_examples"] == "2"
    assert float(rows[("teacher", "in_domain")]["kdbench"]) == 0.0  # the teacher against itself: ties
    assert float(rows[("SFT", "alpaca_eval_vs_sft")]["kdbench"]) == 50.0  # the reference row against itself
    judgments = [json.loads(line) for line in open(out / "t-s" / "judge" / "pairwise" / "sft-seed1" / "judgments.jsonl")]
    assert len(judgments) == 2 and all(len(j["verdicts"]) == 2 for j in judgments)  # both orders, by the LLM judge
    for path in out.rglob("*"):
        if path.is_file():
            assert key not in path.read_text(errors="replace"), path
