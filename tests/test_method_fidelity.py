"""Issue 14, points 2–9: the pipelines feed the losses what the papers fed them, and every reading is an
option. (Point 1, the ends of generated responses: ``tests/test_response_ends.py``.)

2. ``reference: student`` in dDPO is the original student, not the dSFT model.
3. Policy and frozen log-probs share one normaliser (the tokenizer's vocabulary rows), even when the
   output layer has padded rows that carry probability (Qwen2.5-style checkpoints).
4. ``--lm-data`` reaches the method's loss only: a stage trains on its own objective and its cache key
   does not change with it.
5. IPO sums the log-ratios by default (METHODS.md); ``length_normalize: true`` gives TRL's form.
6. ADPA+ = SFT student → DCKD → ADPA: its DCKD stage starts from the same SFT student as ADPA.
7. Stages train with their own (paper) settings, never the main run's learning rate.
8. ``teacher_init: sft`` fine-tunes the teacher once and shares it across methods and seeds.
9. Preference and guided training disable the policy's dropout by default.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import torch

from tiny_models import build_tiny, write_tiny_data

LOG2 = math.log(2)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("fidelity")
    corpus, tokenizer = build_tiny(root)
    rows = write_tiny_data(root, corpus, n=8, n_pairs=8)
    (root / "corpus.txt").write_text("\n\n".join(r["output"] for r in rows) + "\n")
    return root, tokenizer


def _train(root: Path, out: Path, method: str, params: dict | None = None, *, log: list | None = None, **settings):
    from kdbench.train import TrainConfig, train

    values = dict(method=method, student=str(root / "student"), teacher=str(root / "teacher"),
                  data=str(root / "prompts.jsonl"), valid_fraction=0.25, output_dir=str(out), max_steps=2,
                  batch_size=8, learning_rate=1e-3, warmup_ratio=0.0, lr_scheduler="constant", prompt_style="compact",
                  logging_steps=1, save_steps=100, seed=3, cache_dir=str(out / "cache"), params=dict(params or {}))
    values.update(settings)
    return train(TrainConfig(**values), log=(log if log is not None else []).append, progress=False)


def _first_log(result) -> dict:
    return next(r for r in map(json.loads, open(result.run.path / "train_log.jsonl")) if "loss" in r)


def _weights(model_dir) -> dict:
    from safetensors.torch import load_file

    return load_file(str(Path(model_dir) / "model.safetensors"))


def _stage_model(result, *keys) -> Path:
    node = json.loads((result.run.path / "stages.json").read_text())
    for key in keys:
        node = node[key]
    return Path(node["path"]) / "model"


def _max_difference(a: dict, b: dict) -> float:
    return max(float((a[name] - b[name]).abs().max()) for name in a)


# ------------------------------------------------------------------------------------------ point 2
def test_ddpo_reference_student_is_the_original_student(tiny, tmp_path):
    """The cached reference log-probs of ``reference: student`` equal the original student's sequence
    log-probs of the pairs (not the dSFT model's, which moved away from it)."""
    from kdbench.models import load_model
    from kdbench.train.pairs import frozen_sequence_logps

    root, tokenizer = tiny
    result = _train(root, tmp_path, "ddpo", {"reference": "student", "max_new_tokens": 8,
                                             "dsft_settings": {"max_steps": 3, "learning_rate": 1e-2}})
    stages = json.loads((result.run.path / "stages.json").read_text())
    cached = json.loads((Path(stages["frozen_logps"]["ref"]["path"]) / "logps.json").read_text())
    pairs = result.trainer.train_dataset.tokenized
    original = frozen_sequence_logps(load_model(str(root / "student"), trainable=False), pairs,
                                     tokenizer.pad_token_id, 8)
    dsft = frozen_sequence_logps(load_model(str(_stage_model(result, "dsft_model")), trainable=False), pairs,
                                 tokenizer.pad_token_id, 8)
    assert max(abs(a - b) for a, b in zip(dsft["chosen"], original["chosen"])) > 1e-3  # the dSFT model did move
    for side in ("chosen", "rejected"):
        assert cached[side] == pytest.approx(original[side], abs=1e-5), side


# ------------------------------------------------------------------------------------------ point 3
def _padded_model(root: Path, name: str, size: str, tokenizer, extra_rows: int = 16) -> Path:
    """A model whose output layer has ``extra_rows`` rows beyond the tokenizer (as Qwen2.5 checkpoints
    ship), copies of real rows scaled up so that they carry a good part of the probability mass."""
    from transformers import AutoModelForCausalLM

    from kdbench.models import make_config

    config = make_config(size, len(tokenizer) + extra_rows, max_positions=256, pad_token_id=tokenizer.pad_token_id,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        embedding = model.get_input_embeddings().weight
        embedding[len(tokenizer):] = 3.0 * embedding[len(tokenizer) - extra_rows:len(tokenizer)]
    path = root / name
    model.save_pretrained(str(path))
    tokenizer.save_pretrained(str(path))
    return path


def test_policy_and_frozen_logprobs_share_the_tokenizer_rows(tiny, tmp_path):
    """With padded output rows carrying probability, a policy equal to its frozen reference has log-ratios
    of exactly 0 and DPO loss log 2 (ddpo_kl: the dSFT reference), and online DPKD's held-out teacher
    log-probs (cached) match the policy's: reward margin 0, loss log 2 against a teacher equal to it."""
    from kdbench.models import load_model

    root, tokenizer = tiny
    student = _padded_model(tmp_path, "student-padded", "gpt2-nano", tokenizer)
    teacher = _padded_model(tmp_path, "teacher-padded", "gpt2-micro", tokenizer)
    model = load_model(str(student), trainable=False)
    ids = torch.tensor([tokenizer("Alice lives in", add_special_tokens=False)["input_ids"]])
    probs = torch.softmax(model(input_ids=ids).logits[0, -1].float(), dim=-1)
    assert float(probs[len(tokenizer):].sum()) > 0.05  # the padded rows matter

    result = _train(root, tmp_path / "ddpo_kl", "ddpo_kl", {"dsft_model": str(student), "max_new_tokens": 8},
                    student=str(student), teacher=str(teacher), max_steps=1)
    first = _first_log(result)
    assert first["loss_per_pair"] == pytest.approx(LOG2, abs=1e-6)
    for name in ("reward_chosen_per_pair", "reward_rejected_per_pair", "reward_margin_per_pair"):
        assert first[name] == pytest.approx(0.0, abs=1e-6), name

    dpkd = _train(root, tmp_path / "dpkd", "dpkd", {"init": "student", "max_new_tokens": 8},
                  lm_weight=0.0, student=str(student), teacher=str(student), max_steps=1, learning_rate=1e-12, eval_steps=1)
    assert dpkd.validation["reward_margin"] == pytest.approx(0.0, abs=1e-6)
    assert dpkd.validation["loss"] == pytest.approx(LOG2, abs=1e-6)


# ------------------------------------------------------------------------------------------ point 4
def test_lm_data_stays_in_the_method_loss(tiny, tmp_path):
    """DPKD with --lm-data: its SFT stage trains on its own objective (the same model as without the
    corpus) and the stage's cache key does not change with the corpus (the second run reuses it)."""
    root, _ = tiny
    stage = {"init": "sft", "max_new_tokens": 8, "pairs": "offline",
             "sft_settings": {"max_steps": 3, "learning_rate": 1e-2, "batch_size": 4}}
    with_corpus: list[str] = []
    a = _train(root, tmp_path / "a", "dpkd", stage, lm_data=str(root / "corpus.txt"), log=with_corpus)
    b = _train(root, tmp_path / "b", "dpkd", stage)
    assert a.cost["lm_tokens"] > 0  # the method's own loss does use the corpus
    assert any(m.startswith("building sft-model artifact") for m in with_corpus)
    assert _max_difference(_weights(_stage_model(a, "sft_student")), _weights(_stage_model(b, "sft_student"))) == 0.0
    again: list[str] = []
    _train(root, tmp_path / "b", "dpkd", stage, lm_data=str(root / "corpus.txt"), run_name="again", log=again)
    assert any(m.startswith("reusing cached sft-model artifact") for m in again)


# ------------------------------------------------------------------------------------------ point 5
def _pairs_batch():
    from kdbench.train.preference_forms import PairBatch

    return PairBatch(torch.tensor([-4.0, -9.0]), torch.tensor([-7.0, -6.0]), torch.tensor([2, 6]),
                     torch.tensor([4, 3]), ref_chosen=torch.tensor([-5.0, -8.0]), ref_rejected=torch.tensor([-6.5, -6.2]),
                     teacher_chosen=torch.tensor([-5.0, -8.0]), teacher_rejected=torch.tensor([-6.5, -6.2]))


@pytest.mark.parametrize("method, overrides", [("dpo", {"preference_form": "ipo"}), ("ddpo", {"preference_form": "ipo"}),
                                               ("dpkd", {"preference_form": "ipo"})])
def test_ipo_sums_the_log_ratios_by_default_and_normalizes_as_an_option(method, overrides):
    from kdbench.losses.sequence import ipo
    from kdbench.train.recipes import resolve_recipe
    from kdbench.train.preference_forms import preference_parts

    batch = _pairs_batch()
    tau = 0.1
    args = (batch.policy_chosen, batch.policy_rejected, batch.ref_chosen, batch.ref_rejected)
    summed = ipo(*args, tau=tau, reduction="none").sum()
    per_token = ipo(*args, tau=tau, chosen_lengths=batch.chosen_lengths, rejected_lengths=batch.rejected_lengths,
                    reduction="none").sum()
    assert float(summed - per_token) != pytest.approx(0.0, abs=1e-3)
    recipe = resolve_recipe(method, {**overrides, "tau": tau})
    assert float(preference_parts(recipe.form, recipe.form_params, batch)["loss"]) == pytest.approx(float(summed),
                                                                                                   rel=1e-6)
    recipe = resolve_recipe(method, {**overrides, "tau": tau, "length_normalize": True})
    assert float(preference_parts(recipe.form, recipe.form_params, batch)["loss"]) == pytest.approx(float(per_token),
                                                                                                   rel=1e-6)


def test_dpkd_form_stays_length_normalized_by_default():
    from kdbench.losses.sequence import dpkd
    from kdbench.train.recipes import resolve_recipe
    from kdbench.train.preference_forms import preference_parts

    batch = _pairs_batch()
    recipe = resolve_recipe("dpkd", {})
    expected = dpkd(batch.policy_chosen, batch.policy_rejected, batch.teacher_chosen, batch.teacher_rejected,
                    batch.chosen_lengths, batch.rejected_lengths, beta=0.1, reduction="none").sum()
    assert float(preference_parts(recipe.form, recipe.form_params, batch)["loss"]) == pytest.approx(float(expected),
                                                                                                   rel=1e-6)


# ------------------------------------------------------------------------------------------ point 6
def test_adpa_plus_starts_its_dckd_stage_from_the_sft_student_adpa_uses(tiny, tmp_path):
    root, _ = tiny
    stages = {"teacher_dpo_settings": {"max_steps": 1}, "sft_settings": {"max_steps": 2},
              "dckd_settings": {"max_steps": 2}, "max_new_tokens": 8}
    plus_log: list[str] = []
    _train(root, tmp_path, "adpa_plus", stages, data=str(root / "prefs.jsonl"), max_steps=1, log=plus_log)
    assert any(m.startswith("building sft-model artifact") for m in plus_log)  # the DCKD stage's start
    adpa_log: list[str] = []
    _train(root, tmp_path, "adpa", {k: v for k, v in stages.items() if k != "dckd_settings"},
           data=str(root / "prefs.jsonl"), max_steps=1, log=adpa_log)
    assert any(m.startswith("reusing cached sft-model artifact") for m in adpa_log)  # the same SFT student


# ------------------------------------------------------------------------------------------ point 7
def test_stages_train_with_their_own_settings_not_the_main_runs(tiny, tmp_path):
    """DCKD's π_dpo trains at the paper's 5e-7 (adpa_dckd.md §4.1), whatever the main run's learning rate:
    two runs with different main learning rates share one π_dpo, and it stays close to π_ref; overriding
    the stage's own learning rate changes it."""
    root, _ = tiny
    prefs = str(root / "prefs.jsonl")
    params = {"teacher_dpo_settings": {"max_steps": 2}}
    first = _train(root, tmp_path, "dckd", params, data=prefs, learning_rate=1e-3, max_steps=1)
    second_log: list[str] = []
    _train(root, tmp_path, "dckd", params, data=prefs, learning_rate=5e-3, max_steps=1, run_name="other-lr",
           log=second_log)
    assert any(m.startswith("reusing cached dpo-teacher artifact") for m in second_log)
    teacher = _weights(root / "teacher")
    assert _max_difference(_weights(_stage_model(first, "dpo_teacher")), teacher) < 1e-5
    fast = _train(root, tmp_path, "dckd", {"teacher_dpo_settings": {"max_steps": 2, "learning_rate": 1e-3}},
                  data=prefs, max_steps=1, run_name="stage-lr")
    assert _max_difference(_weights(_stage_model(fast, "dpo_teacher")), teacher) > 1e-4


def _lr_text(value: float) -> str:
    mantissa, exponent = f"{value:.1e}".split("e")
    return f"{mantissa.rstrip('0').rstrip('.')}e-{int(exponent[1:])}"


def test_every_stage_default_is_a_paper_setting_listed_in_the_docs():
    """Each recipe's stage settings name a learning rate, epochs and a batch (the papers' values), and
    docs/methods.md lists each with its recipe, learning rate, epochs and source."""
    from kdbench import registry

    docs = (Path(__file__).resolve().parents[1] / "docs" / "methods.md").read_text()
    rows = [line for line in docs.splitlines() if line.startswith("|")]
    found = 0
    for name in registry.names("trainers"):
        for key, settings in (registry.get("trainers", name).body.get("params") or {}).items():
            if not key.endswith("_settings") or key == "divergence_params":
                continue
            found += 1
            assert {"learning_rate", "num_epochs", "batch_size"} <= set(settings), (name, key)
            matching = [r for r in rows if f"`{key}`" in r and re.search(rf"`{name}`", r)]
            assert matching, f"docs/methods.md has no stage row for {name} {key}"
            row = matching[0]
            assert _lr_text(float(settings["learning_rate"])) in row, (name, key, row)
            assert re.search(r"\.md §|App\. |\.sh", row), (name, key, row)  # the source
    assert found >= 20


def test_demo_presets_set_every_stage_explicitly():
    """The embedded benchmark's small random-init models need other settings than the papers' LLMs: the
    presets give every stage of every recipe its learning rate, steps and batch explicitly."""
    from kdbench import registry
    from kdbench.demo import PRESETS, stage_params
    from kdbench.train.recipes import resolve_recipe
    from kdbench.train.stage_settings import OPTIMIZATION_SETTINGS

    preset = PRESETS["full"]
    for name in registry.names("trainers"):
        recipe = registry.get("trainers", name).body.get("params") or {}
        given = stage_params(name, preset)
        resolved = resolve_recipe(name, given).params
        for key in (k for k in recipe if k.endswith("_settings")):
            assert set(OPTIMIZATION_SETTINGS) <= set(given[key]), (name, key)
            assert resolved[key] == given[key], (name, key)  # no paper default (warmup, decay, ...) mixes in
            if preset.student_epochs > 0:  # the preset's data-scaled budget: a number of passes, no fixed steps
                assert given[key]["max_steps"] == -1 and given[key]["num_epochs"] in (preset.student_epochs,
                                                                                     preset.preference_epochs)
            else:
                assert given[key]["max_steps"] == preset.student_steps
    assert stage_params("dckd", preset)["teacher_dpo_settings"]["learning_rate"] < preset.student_lr


# ------------------------------------------------------------------------------------------ point 8
def test_teacher_init_sft_fine_tunes_the_teacher_once_for_every_method_and_seed(tiny, tmp_path):
    root, _ = tiny
    params = {"teacher_init": "sft", "teacher_sft_settings": {"max_steps": 2, "learning_rate": 1e-2, "batch_size": 4}}
    logs: dict[str, list[str]] = {"kd": [], "akl": [], "kd-seed4": []}
    kd = _train(root, tmp_path, "kd", params, log=logs["kd"])
    _train(root, tmp_path, "akl", params, log=logs["akl"])
    _train(root, tmp_path, "kd", params, seed=4, run_name="kd-seed4", log=logs["kd-seed4"])
    assert sum(m.startswith("building sft-model artifact") for m in logs["kd"]) == 1
    for name in ("akl", "kd-seed4"):
        assert any(m.startswith("reusing cached sft-model artifact") for m in logs[name]), name
        assert not any(m.startswith("building sft-model") for m in logs[name]), name
    prepared = _weights(_stage_model(kd, "prepare_teacher"))
    assert _max_difference(prepared, _weights(root / "teacher")) > 1e-4  # it was fine-tuned
    used = {name: p.detach() for name, p in kd.teacher.state_dict().items()}
    assert _max_difference(prepared, {k: used[k] for k in prepared}) == 0.0  # and it is the teacher KD used
    given: list[str] = []
    _train(root, tmp_path, "kd", {}, run_name="given", log=given)
    assert not any("sft-model" in m for m in given)  # teacher_init: given (default) takes --teacher as is


# ------------------------------------------------------------------------------------------ point 9
def _dropout_student(root: Path, tokenizer) -> Path:
    from kdbench.models import make_model

    path = root / "student-dropout"
    if not path.exists():
        make_model("gpt2-nano", tokenizer, seed=0, max_positions=256, dropout=0.1).save_pretrained(str(path))
        tokenizer.save_pretrained(str(path))
    return path


def test_preference_training_disables_the_policys_dropout(tiny, tmp_path):
    """DPO from a student with dropout 0.1: the first step has policy = reference, so the loss is exactly
    log 2 without dropout; ``disable_dropout: false`` keeps the checkpoint's dropout (a noisy loss)."""
    root, tokenizer = tiny
    student = _dropout_student(tmp_path, tokenizer)
    prefs = str(root / "prefs.jsonl")
    off = _train(root, tmp_path, "dpo", {}, student=str(student), data=prefs, max_steps=1)
    assert _first_log(off)["loss_per_pair"] == pytest.approx(LOG2, abs=1e-6)
    assert _first_log(off)["reward_margin_per_pair"] == pytest.approx(0.0, abs=1e-6)
    kept = _train(root, tmp_path, "dpo", {"disable_dropout": False}, student=str(student), data=prefs, max_steps=1,
                  run_name="kept")
    assert abs(_first_log(kept)["loss_per_pair"] - LOG2) > 1e-4
    assert json.loads((off.model_dir / "config.json").read_text())["resid_pdrop"] == 0.1  # the checkpoint's own


def test_guided_training_disables_the_policys_dropout(tiny, tmp_path):
    root, tokenizer = tiny
    student = _dropout_student(tmp_path, tokenizer)
    result = _train(root, tmp_path, "dckd", {"teacher_dpo_settings": {"max_steps": 1}}, student=str(student),
                    data=str(root / "prefs.jsonl"), max_steps=1)
    rates = [m.p for m in result.trainer.model.modules() if isinstance(m, torch.nn.Dropout)]
    assert rates and all(p == 0.0 for p in rates)


# ------------------------------------------------------------------------------------------ bad input
def test_new_options_reject_bad_input_in_one_sentence_before_writing(tiny, tmp_path):
    from typer.testing import CliRunner

    from kdbench.cli import app

    root, _ = tiny
    unlabelled = tmp_path / "prompts-only.jsonl"
    unlabelled.write_text("".join(json.dumps({"instruction": json.loads(line)["instruction"]}) + "\n"
                                  for line in (root / "prompts.jsonl").read_text().splitlines()))
    common = ["--student", str(root / "student"), "--teacher", str(root / "teacher"), "--output-dir",
              str(tmp_path / "runs")]
    cases = [
        # the teacher's SFT stage needs gold responses: a prompts-only file is refused before any stage runs
        (["seqkd", *common, "--data", str(unlabelled), "--set", "params.teacher_init=sft"], "has no 'output'"),
        (["kd", *common, "--data", str(root / "prompts.jsonl"), "--set", "params.teacher_init=finetune"],
         "teacher_init must be given"),
        (["dpo", *common, "--data", str(root / "prefs.jsonl"), "--set", "params.disable_dropout=maybe"],
         "disable_dropout must be true or false"),
        (["dpo", *common, "--data", str(root / "prefs.jsonl"), "--set", "params.length_normalize=true"],
         "length_normalize applies to the dpkd, ipo and plad forms"),
        # a stage setting: a known name with a valid value, checked before anything is written
        (["ddpo", *common, "--data", str(root / "prompts.jsonl"), "--set", "params.dsft_settings.lr=1e-4"],
         "Unknown setting params.dsft_settings.lr"),
        (["dckd", *common, "--data", str(root / "prefs.jsonl"),
          "--set", "params.teacher_dpo_settings.learning_rate=-1"], "learning_rate must be greater than 0"),
    ]
    for args, expected in cases:
        result = CliRunner().invoke(app, ["train", *args])
        assert result.exit_code == 2, (args[0], result.output)
        assert expected in result.output and "Traceback" not in result.output, (args[0], result.output)
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())
