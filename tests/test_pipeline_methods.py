"""Issue 5's pipeline methods on tiny models: DPKD (online, offline and preference-data pairs; the IPO /
CPO / SimPO forms), dpkd_token, dsft_kl, ddpo_kl, DCKD, ADPA and ADPA+.

Each recipe trains from the same call the CLI makes and must overfit one batch (the loss falls); frozen
models stay unchanged; the DPKD diagnostics are exact where they can be checked (a student equal to its
teacher has zero reverse KL and loss log 2); the pipeline identity dpkd(no length normalization, ref =
teacher) = dpo(reference = teacher); stages are reused across methods; bad input is one sentence."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from kdbench.cli import app
from tiny_models import build_tiny, write_tiny_data

runner = CliRunner()
SHARED = Path(__file__).resolve().parents[2] / "shared"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("methods")
    corpus, _ = build_tiny(root)
    write_tiny_data(root, corpus, n=8, n_pairs=8)
    return root


def _train(root: Path, out: Path, method: str, params: dict | None = None, **settings):
    from kdbench.train import TrainConfig, train

    messages: list[str] = []
    values = dict(method=method, student=str(root / "student"), teacher=str(root / "teacher"),
                  data=str(root / "prompts.jsonl"), valid_fraction=0.2, output_dir=str(out), max_steps=12,
                  batch_size=8, learning_rate=1e-3, warmup_ratio=0.0, lr_scheduler="constant", prompt_style="compact",
                  logging_steps=1, save_steps=100, generation_batch_size=64, seed=3, cache_dir=str(root / "cache"),
                  group_by_length=True,  # as the demo trains: pair runs must ignore it
                  params=dict(params or {}))
    values.update(settings)
    result = train(TrainConfig(**values), log=messages.append, progress=False)
    return result, messages


def _log(result) -> list[dict]:
    return [r for r in map(json.loads, open(result.run.path / "train_log.jsonl")) if "loss" in r]


def _params(model_dir: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(Path(model_dir) / "model.safetensors"))


STAGE_STEPS = {"sft_settings": {"max_steps": 4}, "teacher_dpo_settings": {"max_steps": 4},
               "dsft_settings": {"max_steps": 4}, "dckd_settings": {"max_steps": 4}}

CASES = {
    "dpkd-online": ("dpkd", {"max_new_tokens": 8}, "prompts"),
    "dpkd-offline": ("dpkd", {"pairs": "offline", "max_new_tokens": 8}, "prompts"),
    "dpkd-preference-data": ("dpkd", {"pairs": "preference_data"}, "prefs"),
    "dpkd-ipo": ("dpkd", {"preference_form": "ipo", "max_new_tokens": 8}, "prompts"),
    "dpkd-cpo": ("dpkd", {"preference_form": "cpo", "max_new_tokens": 8}, "prompts"),
    "dpkd-simpo": ("dpkd", {"preference_form": "simpo", "beta": 2.0, "max_new_tokens": 8}, "prompts"),
    "dpkd_token": ("dpkd_token", {}, "prompts"),
    "dsft_kl": ("dsft_kl", {"max_new_tokens": 8}, "prompts"),
    "dsft_kl-forward": ("dsft_kl", {"max_new_tokens": 8, "divergence": "fkl"}, "prompts"),
    "ddpo_kl": ("ddpo_kl", {"max_new_tokens": 8}, "prompts"),
    "dckd": ("dckd", {}, "prefs"),
    "dckd-top5": ("dckd", {"loss_topk": 5}, "prefs"),
    "adpa": ("adpa", {"max_new_tokens": 8}, "prefs"),
    "adpa-top5": ("adpa", {"max_new_tokens": 8, "loss_topk": 5}, "prefs"),
    "adpa_plus": ("adpa_plus", {"max_new_tokens": 8}, "prefs"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_each_recipe_overfits_one_batch_and_leaves_frozen_models_alone(tiny, tmp_path, case):
    from kdbench import registry
    from kdbench.store import hash_tree

    method, params, data = CASES[case]
    recipe_params = registry.get("trainers", method).body.get("params") or {}
    params = {**{k: v for k, v in STAGE_STEPS.items() if k in recipe_params}, **params}
    teacher_hash = hash_tree(tiny / "teacher")
    result, messages = _train(tiny, tmp_path, method, params, data=str(tiny / f"{data}.jsonl"))
    log = _log(result)
    losses = [r["loss"] for r in log]
    assert len(losses) == 12 and all(math.isfinite(v) for v in losses), (case, losses)
    assert sum(losses[-3:]) / 3 < 0.85 * losses[0], (case, losses)  # one batch of 6 pairs/examples, overfit
    if "reward_margin_per_pair" in log[0] and params.get("pairs") in ("offline", "preference_data"):
        # fixed pairs: the preference term itself must push the chosen response's implicit reward up
        assert log[-1]["reward_margin_per_pair"] > log[0]["reward_margin_per_pair"] + 1e-3, case
    assert result.run.complete and (result.model_dir / "model.safetensors").is_file()
    assert hash_tree(tiny / "teacher") == teacher_hash
    stage_models = [Path(f["path"]) / "model" for f in _facts(json.loads((result.run.path / "stages.json").read_text()))
                    if f.get("path") and (Path(f["path"]) / "model").is_dir()]
    after = _params(result.model_dir)
    assert stage_models or method in ("dpkd_token", "dsft_kl"), case
    for stage_model in stage_models:  # the policy moved away from every stage model it was built from
        before = _params(stage_model)
        assert any(not before[n].equal(after[n]) for n in before if n in after), stage_model


def _facts(node) -> list[dict]:
    """Every fact dict of stages.json (nested: teachers -> ref / dpo)."""
    if not isinstance(node, dict):
        return []
    found = [node] if "path" in node or "given" in node else []
    for value in node.values():
        found += _facts(value)
    return found


def test_dpkd_diagnostics_are_exact_when_the_student_is_its_teacher(tiny, tmp_path):
    """With q = p at the start, every implicit reward is 0, the loss per pair is log 2, and both reverse
    KL diagnostics (first response token, exact; sequence, sampled) are 0; they move once training does."""
    result, _ = _train(tiny, tmp_path, "dpkd", {"init": "student", "max_new_tokens": 8},
                       lm_weight=0.0, teacher=str(tiny / "student"), max_steps=6)
    log = _log(result)
    first = log[0]
    assert first["loss_per_pair"] == pytest.approx(math.log(2), abs=1e-6)
    for name in ("reward_chosen_per_pair", "reward_rejected_per_pair", "reward_margin_per_pair",
                 "rkl_first_token_per_pair", "rkl_sequence_per_pair"):
        assert first[name] == pytest.approx(0.0, abs=1e-5), name
    assert first["reward_accuracy_per_pair"] == 0.0  # a margin of exactly 0 is not a win
    assert log[-1]["rkl_first_token_per_pair"] > 1e-6  # the student moved away from the frozen copy
    assert result.cost["online_batches"] == 6 and result.cost["generated_tokens"] > 0


def test_dpkd_offline_pairs_equal_dpo_with_the_teacher_as_reference(tiny, tmp_path):
    """dpkd without length normalization, no LM term, on a preference file = dpo(reference = teacher)."""
    prefs = str(tiny / "prefs.jsonl")
    dpkd, _ = _train(tiny, tmp_path, "dpkd", {"pairs": "preference_data", "length_normalize": False,
                                              "init": "student", "beta": 0.1},
                     lm_weight=0.0, data=prefs, run_name="dpkd")
    dpo, _ = _train(tiny, tmp_path, "dpo", {"reference": "teacher", "beta": 0.1}, data=prefs, run_name="dpo")
    a, b = _params(dpkd.model_dir), _params(dpo.model_dir)
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=1e-6, msg=name)


def test_adpa_reuses_the_dpo_teacher_dckd_built(tiny, tmp_path):
    cache = tmp_path / "cache"
    prefs = str(tiny / "prefs.jsonl")
    stage = {"teacher_dpo_settings": {"max_steps": 4}}
    from kdbench.store import hash_tree

    dckd, first = _train(tiny, tmp_path, "dckd", stage, data=prefs, cache_dir=str(cache), max_steps=2)
    dpo_hash = hash_tree(Path(json.loads((dckd.run.path / "stages.json").read_text())["dpo_teacher"]["path"]) / "model")
    _, second = _train(tiny, tmp_path, "adpa", {**stage, "sft_settings": {"max_steps": 2}, "max_new_tokens": 8},
                       data=prefs, cache_dir=str(cache), max_steps=2)
    assert any(m.startswith("building dpo-teacher artifact") for m in first)
    assert any(m.startswith("reusing cached dpo-teacher artifact") for m in second)
    dpo_dir = Path(json.loads((dckd.run.path / "stages.json").read_text())["dpo_teacher"]["path"]) / "model"
    assert hash_tree(dpo_dir) == dpo_hash  # ADPA ran pi_dpo in every step and left it unchanged
    assert any(m.startswith("building student-generations artifact") for m in second)  # ŷ, once


def test_dpkd_token_loss_matches_its_definition():
    from kdbench.losses import dpkd_token

    torch.manual_seed(0)
    student = torch.randn(2, 5, 11, requires_grad=True)
    teacher = torch.randn(2, 5, 11)
    mask = torch.tensor([[0, 1, 1, 1, 0], [1, 1, 0, 0, 0]], dtype=torch.float32)
    got = dpkd_token(student, teacher, mask, beta=0.7, reduction="none").detach()
    log_q, log_p = torch.log_softmax(student, -1), torch.log_softmax(teacher, -1)
    for b in range(2):
        for t in range(5):
            if not mask[b, t]:
                assert got[b, t] == 0
                continue
            a_t, a_s = int(log_p[b, t].argmax()), int(log_q[b, t].argmax())
            margin = (log_q[b, t, a_t] - log_p[b, t, a_t]) - (log_q[b, t, a_s] - log_p[b, t, a_s])
            expected = -torch.nn.functional.logsigmoid(0.7 * margin)
            assert float(got[b, t]) == pytest.approx(float(expected), abs=1e-6)
    mean = dpkd_token(student, teacher, mask, beta=0.7)
    assert float(mean) == pytest.approx(float(got.sum() / mask.sum()), abs=1e-6)
    mean.backward()
    assert student.grad[mask == 0].abs().sum() == 0 and student.grad.abs().sum() > 0
    same = dpkd_token(teacher.clone(), teacher, mask)  # both argmaxes agree: log 2 at every position
    assert float(same) == pytest.approx(math.log(2), abs=1e-6)


def _cli(args: list[str]):
    return runner.invoke(app, ["train", *args])


def _other_tokenizer_model(tmp_path: Path) -> Path:
    if not (SHARED / "models" / "gpt2-tokenizer").is_dir():
        pytest.skip(f"{SHARED / 'models' / 'gpt2-tokenizer'} is absent")
    from transformers import AutoTokenizer

    from kdbench.models import make_model

    gpt2 = AutoTokenizer.from_pretrained(str(SHARED / "models" / "gpt2-tokenizer"))
    path = tmp_path / "gpt2-model"
    make_model("gpt2-nano", gpt2, seed=0, max_positions=256).save_pretrained(str(path))
    gpt2.save_pretrained(str(path))
    return path


def _assert_one_sentence_and_nothing_written(cases, runs: Path) -> None:
    for args, expected in cases:
        result = _cli(args)
        assert result.exit_code == 2, (args[0], result.output)
        assert expected in result.output and "Traceback" not in result.output, (args[0], result.output)
    assert not runs.exists() or not any(runs.iterdir())


def test_bad_input_is_one_sentence_and_writes_nothing(tiny, tmp_path):
    common = ["--student", str(tiny / "student"), "--output-dir", str(tmp_path / "runs")]
    cases = [
        # preference methods on a file without chosen / rejected
        (["dckd", *common, "--teacher", str(tiny / "teacher"), "--data", str(tiny / "prompts.jsonl")],
         "has no 'chosen' and 'rejected' texts"),
        (["adpa", *common, "--teacher", str(tiny / "teacher"), "--data", str(tiny / "prefs.jsonl"),
          "--set", "params.sft_model=/no/such/model"], "is not a model directory"),
        (["dpkd", *common, "--teacher", str(tiny / "teacher"), "--data", str(tiny / "prompts.jsonl"),
          "--set", "params.preference_form=kto"], "preference_form must be one of"),
        (["dckd", *common, "--teacher", str(tiny / "teacher"), "--data", str(tiny / "prefs.jsonl"),
          "--set", "params.loss_topk=0"], "loss_topk must be"),
    ]
    _assert_one_sentence_and_nothing_written(cases, tmp_path / "runs")


def test_models_with_another_tokenizer_are_one_sentence_and_write_nothing(tiny, tmp_path):
    """Needs the shared GPT-2 tokenizer (../shared) for a model with another vocabulary."""
    other = _other_tokenizer_model(tmp_path)
    common = ["--student", str(tiny / "student"), "--output-dir", str(tmp_path / "runs")]
    cases = [
        # a reference (dSFT) checkpoint with another tokenizer than the student
        (["ddpo", *common, "--teacher", str(tiny / "teacher"), "--data", str(tiny / "prompts.jsonl"),
          "--set", f"params.dsft_model={other}"], "uses another tokenizer than the student"),
        (["adpa", *common, "--teacher", str(tiny / "teacher"), "--data", str(tiny / "prefs.jsonl"),
          "--set", f"params.dpo_teacher={other}"], "uses another tokenizer than the student"),
        # online DPKD scores the student's own tokens with the teacher: one vocabulary
        (["dpkd", *common, "--teacher", str(other), "--data", str(tiny / "prompts.jsonl")], "vocabularies differ"),
        (["dckd", *common, "--teacher", str(other), "--data", str(tiny / "prefs.jsonl")], "vocabularies differ"),
    ]
    _assert_one_sentence_and_nothing_written(cases, tmp_path / "runs")


class _Interrupt(Exception):
    pass


def test_dpkd_online_interrupted_and_rerun_equals_uninterrupted(tiny, tmp_path):
    """Online pairs are seeded by (seed, step, micro-batch, process, example): a run stopped after its
    step-3 checkpoint and rerun with the same command samples the same y_s and ends with the same weights."""
    from transformers import TrainerCallback

    class StopAtStep4(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            if state.global_step == 4:
                raise _Interrupt()

    from kdbench.train import TrainConfig, train

    def config(out):
        return TrainConfig(method="dpkd", student=str(tiny / "student"), teacher=str(tiny / "teacher"),
                           data=str(tiny / "prompts.jsonl"), valid_fraction=0.2, output_dir=str(out), max_steps=6,
                           batch_size=3, learning_rate=1e-3, warmup_ratio=0.0, lr_scheduler="constant",
                           prompt_style="compact", logging_steps=1, save_steps=3, seed=3,
                           cache_dir=str(tiny / "cache"), params={"max_new_tokens": 8, "sft_settings": {"max_steps": 4}})

    reference = train(config(tmp_path / "ref"), progress=False)
    with pytest.raises(_Interrupt):
        train(config(tmp_path / "crash"), progress=False, callbacks=[StopAtStep4()])
    messages: list[str] = []
    resumed = train(config(tmp_path / "crash"), progress=False, log=messages.append)
    assert any(m.startswith("resuming from") and m.endswith("checkpoint-3") for m in messages), messages
    assert resumed.cost["resumed"]
    a, b = _params(reference.model_dir), _params(resumed.model_dir)
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-5, atol=1e-6, msg=name)
    assert [r["loss"] for r in _log(resumed)] == pytest.approx([r["loss"] for r in _log(reference)], rel=1e-5)


def test_dpkd_and_adpa_plus_from_the_cli_write_run_directories(tiny, tmp_path):
    common = ["--student", str(tiny / "student"), "--teacher", str(tiny / "teacher"), "--output-dir", str(tmp_path),
              "--set", "max_steps=2", "--set", "batch_size=4", "--set", "prompt_style=compact",
              "--set", f"cache_dir={tiny / 'cache'}", "--set", "params.max_new_tokens=8"]
    dpkd = _cli(["dpkd", *common, "--data", str(tiny / "prompts.jsonl"), "--set", "params.sft_settings.max_steps=2"])
    assert dpkd.exit_code == 0, dpkd.output
    plus = _cli(["adpa_plus", *common, "--data", str(tiny / "prefs.jsonl"),
                 "--set", "params.teacher_dpo_settings.max_steps=2", "--set", "params.dckd_settings.max_steps=2"])
    assert plus.exit_code == 0, plus.output
    for run, expected in (("dpkd-seed1", {"prepare_teacher", "sft_student", "teacher_responses", "policy_responses", "frozen_logps",
                                           "train"}),
                          ("adpa_plus-seed1", {"ref_teacher", "dpo_teacher", "dckd_student", "policy_responses", "train"})):
        folder = tmp_path / run
        assert set(json.loads((folder / "stages.json").read_text())) == expected, run
        assert (folder / "model" / "model.safetensors").is_file() and (folder / "cost.json").is_file()
        assert json.loads((folder / "run.json").read_text())["status"] == "complete"


def test_preference_runs_validate_on_held_out_pairs_and_keep_the_best(tiny, tmp_path):
    """select=best on a preference method: the held-out pairs' loss / reward accuracy / margin are logged
    at every eval step, and the kept model is the best checkpoint (its validation loss is the best one)."""
    result, _ = _train(tiny, tmp_path, "dpo", {"reference": "teacher"}, data=str(tiny / "prefs.jsonl"),
                       select="best", eval_steps=3, save_steps=3, valid_fraction=0.3, run_name="dpo-best")
    evals = [r for r in map(json.loads, open(result.run.path / "train_log.jsonl")) if "eval_reward_accuracy" in r]
    assert [r["step"] for r in evals][:4] == [3, 6, 9, 12] and all(r["eval_pairs"] == 2 for r in evals)
    cost = result.cost
    assert cost["selected"] == "best" and cost["select_metric"] == "loss"
    assert cost["best_metric"] == pytest.approx(min(r["eval_loss"] for r in evals[:4]), rel=1e-6)
    assert cost["validation"]["loss"] == pytest.approx(cost["best_metric"], rel=1e-5)  # the best model was kept
    assert set(cost["validation"]) >= {"loss", "reward_accuracy", "reward_margin", "pairs"}
    # distilled pairs: the held-out prompts get their own (cached) teacher and student responses
    ddpo, _ = _train(tiny, tmp_path, "ddpo", {"max_new_tokens": 8, "dsft_settings": {"max_steps": 4}},
                     eval_steps=6, max_steps=6, run_name="ddpo-eval")
    stages = json.loads((ddpo.run.path / "stages.json").read_text())
    assert "validation" in stages["teacher_responses"] and "validation" in stages["student_responses"]
    assert ddpo.cost["validation"]["pairs"] == 2 and ddpo.cost["selected"] == "last"


def test_selection_settings_that_do_not_apply_are_one_sentence(tiny, tmp_path):
    common = ["--student", str(tiny / "student"), "--teacher", str(tiny / "teacher"), "--output-dir", str(tmp_path)]
    cases = [(["dpo", *common, "--data", str(tiny / "prefs.jsonl"), "--set", "select=best", "--set", "select_metric=ce"],
              "is not measured on preference pairs"),
             (["kd", *common, "--data", str(tiny / "prompts.jsonl"), "--set", "select=best",
               "--set", "select_metric=reward_accuracy"], "is measured on held-out preference pairs"),
             (["dckd", *common, "--data", str(tiny / "prefs.jsonl"), "--set", "select=best"], "no validation metric yet")]
    for args, expected in cases:
        result = _cli(args)
        assert result.exit_code == 2 and expected in result.output and "Traceback" not in result.output, result.output
    assert not any(tmp_path.glob("*-seed1"))


def test_a_diverging_pair_run_stops_with_one_sentence(tiny, tmp_path):
    common = ["--student", str(tiny / "student"), "--teacher", str(tiny / "teacher"), "--data", str(tiny / "prefs.jsonl"),
              "--output-dir", str(tmp_path), "--set", "max_steps=8", "--set", "batch_size=4",
              "--set", "prompt_style=compact", "--set", f"cache_dir={tiny / 'cache'}", "--set", "learning_rate=1e8",
              "--set", "max_grad_norm=0"]
    for method in ("dpo", "dckd"):
        extra = ["--set", "params.teacher_dpo_settings.learning_rate=1e-3", "--set",
                 "params.teacher_dpo_settings.max_steps=2"] if method == "dckd" else []
        result = _cli([method, *common, *extra])
        assert result.exit_code == 2 and "The loss became nan" in result.output, (method, result.output)
        assert "Traceback" not in result.output
        assert json.loads((tmp_path / f"{method}-seed1" / "run.json").read_text())["status"] == "failed"
