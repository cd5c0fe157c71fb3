"""Issue 19, point 7: token-level KD across tokenizers as recipes (ULD), on the shared tokenizers of
``../shared/models/``: a tiny random Llama teacher built from SmolLM2-135M's config and tokenizer (49,152 tokens)
distils a tiny random GPT-2 student with GPT-2's tokenizer (50,257 tokens) from the CLI, and — to keep the
overfitting runs at a few seconds (ULD sorts every aligned row of both vocabularies) — the tiny benchmark student
with its own word-level tokenizer. The shared-vocabulary refusal is lifted for these methods only."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from typer.testing import CliRunner

from kdbench.cli import app
from tiny_models import build_tiny, write_tiny_data

runner = CliRunner()
MODELS = Path(__file__).resolve().parents[2] / "shared" / "models"
GPT2, SMOLLM2 = MODELS / "gpt2-tokenizer", MODELS / "smollm2-135m-instruct"


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """(root, student dir, teacher dir): GPT-2-tokenizer student, SmolLM2-tokenizer teacher, tiny and random."""
    if not (GPT2.is_dir() and SMOLLM2.is_dir()):
        pytest.skip(f"the shared tokenizers are not in {MODELS}")
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from kdbench.models import make_model

    root = tmp_path_factory.mktemp("cross_tokenizer")
    corpus, _ = build_tiny(root)
    write_tiny_data(root, corpus, n=5, n_pairs=5)  # 4 training rows, one held out: one batch to overfit
    student_tokenizer = AutoTokenizer.from_pretrained(str(GPT2))
    student = root / "gpt2-student"
    make_model("gpt2-nano", student_tokenizer, seed=0, max_positions=256).save_pretrained(str(student))
    student_tokenizer.save_pretrained(str(student))
    config = AutoConfig.from_pretrained(str(SMOLLM2), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                                        max_position_embeddings=512)
    torch.manual_seed(0)
    teacher = root / "smollm2-teacher"
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():  # a confident teacher: a random one is near uniform over 49k tokens, where ULD is flat
        model.model.norm.weight.mul_(40.0)
    model.save_pretrained(str(teacher))
    AutoTokenizer.from_pretrained(str(SMOLLM2)).save_pretrained(str(teacher))
    return root, student, teacher


@pytest.fixture(scope="module")
def word_student(pair):
    """The tiny benchmark student (its word-level tokenizer) for the SmolLM2-tokenizer teacher."""
    return pair[0] / "student"


def _train(root: Path, student: Path, teacher: Path, out: Path, method: str, params: dict | None = None, **settings):
    from kdbench.train import TrainConfig, train

    values = dict(method=method, student=str(student), teacher=str(teacher), data=str(root / "prompts.jsonl"),
                  valid_fraction=0.2, output_dir=str(out), max_steps=8, batch_size=4, learning_rate=5e-3,
                  warmup_ratio=0.0, lr_scheduler="constant", prompt_style="compact", logging_steps=1, save_steps=100,
                  seed=3, cache_dir=str(root / "cache"), params=dict(params or {}))
    values.update(settings)
    return train(TrainConfig(**values), progress=False)


def _log(result) -> list[dict]:
    return [r for r in map(json.loads, open(result.run.path / "train_log.jsonl")) if "loss" in r]


@pytest.mark.parametrize("params, term, rate", [({}, None, 5e-3), ({"ce_weight": 0.0}, "uld_per_token", 3e-2)])
def test_uld_overfits_one_batch_across_tokenizers_and_leaves_the_teacher_alone(pair, word_student, tmp_path, params,
                                                                               term, rate):
    from kdbench.store import hash_tree

    root, _, teacher = pair
    student = word_student
    hashes = {path: hash_tree(path) for path in (student, teacher)}
    result = _train(root, student, teacher, tmp_path, "uld", params, learning_rate=rate)
    log = _log(result)
    losses = [r["loss"] for r in log]
    assert len(losses) == 8 and all(math.isfinite(v) for v in losses), losses
    assert sum(losses[-3:]) / 3 < 0.85 * losses[0], losses
    if term:  # ULD alone: the student's sorted distribution moves to the teacher's
        assert sum(r[term] for r in log[-3:]) / 3 < 0.85 * log[0][term], [r[term] for r in log]
    assert {path: hash_tree(path) for path in hashes} == hashes
    assert result.cost["teacher_forward_tokens"] > 0 and result.run.complete


def test_uld_validates_with_the_teachers_own_rows(pair, word_student, tmp_path):
    root, _, teacher = pair
    student = word_student
    result = _train(root, student, teacher, tmp_path, "uld", max_steps=2, eval_steps=1, save_steps=1, select="best")
    evaluations = [r for r in map(json.loads, open(result.run.path / "train_log.jsonl")) if "eval_loss" in r]
    assert evaluations and all(math.isfinite(r["eval_loss"]) for r in evaluations)


def test_other_token_methods_still_refuse_different_vocabularies(pair, tmp_path):
    root, student, teacher = pair
    for method in ("kd", "atkd"):
        result = runner.invoke(app, ["train", method, "--student", str(student), "--teacher", str(teacher),
                                     "--data", str(root / "prompts.jsonl"), "--output-dir", str(tmp_path)])
        assert result.exit_code == 2 and "vocabularies differ" in result.output, (method, result.output)
    result = runner.invoke(app, ["train", "uld", "--student", str(student), "--teacher", str(teacher), "--data",
                                 str(root / "prompts.jsonl"), "--output-dir", str(tmp_path), "--set",
                                 "teacher_signal=topk"])
    assert result.exit_code == 2 and "own tokenization" in result.output
    assert not list(tmp_path.glob("*-seed1"))


@pytest.mark.parametrize("method", ["uld", "dskd"])
def test_cross_tokenizer_method_trains_from_the_cli(pair, tmp_path, method):
    """The GPT-2-tokenizer student from the SmolLM2-tokenizer teacher, as a user runs it."""
    root, student, teacher = pair
    result = runner.invoke(app, ["train", method, "--student", str(student), "--teacher", str(teacher), "--data",
                                 str(root / "prompts.jsonl"), "--output-dir", str(tmp_path), "--set", "max_steps=2",
                                 "--set", "batch_size=4", "--set", "prompt_style=compact", "--set",
                                 f"cache_dir={tmp_path / 'cache'}"])
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / f"{method}-seed1" / "run.json").read_text())["status"] == "complete"


# ------------------------------------------------------------------------------------------ DSKD
# Issue 19 point 7's dual-space method: its projectors are trained beside the student (Objective.trainable), saved
# with each checkpoint and restored on resume, and never in the saved model.
def _dskd_run(root, student, teacher, out, params=None, **settings):
    values = dict(max_steps=8, learning_rate=5e-3, params={"trainable_lr": 1e-2, **(params or {})})
    values.update(settings)
    return _train(root, student, teacher, out, "dskd", **values)


@pytest.mark.parametrize("params", [{}, {"kd_rate": 1.0, "accurate_only": False, "trainable_lr": 3e-2}])
def test_dskd_overfits_one_batch_across_tokenizers_and_leaves_the_teacher_alone(pair, word_student, tmp_path, params):
    """The recipe's defaults, and the DSKD term alone (KD in both spaces + the projector's CE) over every position:
    with accurate_only the student space distils more positions as the projector learns, so its term may rise."""
    from kdbench.store import hash_tree

    root, _, teacher = pair
    hashes = {path: hash_tree(path) for path in (word_student, teacher)}
    result = _dskd_run(root, word_student, teacher, tmp_path, params)
    log = _log(result)
    losses, terms = [r["loss"] for r in log], [r["dskd_per_token"] for r in log]
    assert len(losses) == 8 and all(math.isfinite(v) for v in losses + terms), losses
    assert sum(losses[-3:]) / 3 < 0.9 * losses[0], losses
    assert sum(terms[-3:]) / 3 < 0.9 * terms[0], terms
    teacher_space = [r["kd_teacher_space_per_token"] for r in log]  # moved by the s2t projector only
    assert teacher_space[-1] < teacher_space[0], teacher_space
    assert {path: hash_tree(path) for path in hashes} == hashes  # the frozen teacher and the input student
    assert result.cost["teacher_forward_tokens"] > 0 and result.run.complete


class _StopAfterStep3:
    """Interrupts a run after its third optimizer step, as a kill would (checkpoint 2 is the last complete one)."""

    def __new__(cls):
        from transformers import TrainerCallback

        class StopAt(TrainerCallback):
            def on_step_end(self, args, state, control, **kwargs):
                if state.global_step == 3:
                    raise KeyboardInterrupt

        return StopAt()


def _dskd_resumable(root, student, teacher, out, callbacks=None):
    from kdbench.train import TrainConfig, train

    config = TrainConfig(method="dskd", student=str(student), teacher=str(teacher), data=str(root / "prompts.jsonl"),
                         valid_fraction=0.2, output_dir=str(out), max_steps=4, save_steps=2, batch_size=4,
                         learning_rate=5e-3, warmup_ratio=0.0, lr_scheduler="constant", prompt_style="compact",
                         logging_steps=1, seed=3, cache_dir=str(root / "cache"), params={"trainable_lr": 3e-2})
    return train(config, progress=False, callbacks=callbacks)


def _weights(model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(model_dir)).state_dict()


def test_dskd_resumes_with_its_trained_projectors_and_saves_a_plain_student(pair, word_student, tmp_path):
    """A run stopped after step 3 (checkpoint 2 holds the projectors beside the model) and resumed ends where an
    uninterrupted run ends — a resume that re-initialised the projectors would distil through other ones — and
    its saved model/ is the student alone (from_pretrained, no projector weights)."""
    import torch

    root, _, teacher = pair
    uninterrupted = _dskd_resumable(root, word_student, teacher, tmp_path / "a")
    with pytest.raises(KeyboardInterrupt):
        _dskd_resumable(root, word_student, teacher, tmp_path / "b", [_StopAfterStep3()])
    checkpoint = next((tmp_path / "b").glob("*/checkpoints/checkpoint-2"))
    projectors = torch.load(checkpoint / "kdbench_objective_module.pt", weights_only=True)
    assert set(projectors) == {f"{name}.{kind}" for name in ("query", "t2s", "s2t") for kind in ("weight", "bias")}
    assert not any(key.startswith(("query", "t2s", "s2t")) for key in _weights(checkpoint))
    resumed = _dskd_resumable(root, word_student, teacher, tmp_path / "b")
    assert resumed.cost["resumed"]
    assert [r["loss"] for r in _log(resumed)] == pytest.approx([r["loss"] for r in _log(uninterrupted)], rel=1e-5)
    expected, got, plain = _weights(uninterrupted.model_dir), _weights(resumed.model_dir), _weights(word_student)
    assert set(got) == set(plain)  # the saved model is a plain student
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-5, atol=1e-6)
    assert any(not torch.equal(got[name], plain[name]) for name in plain)

