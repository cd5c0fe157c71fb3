"""Issue 15, "a method = one loss + one recipe": the walkthrough of ``docs/design.md`` ("Add a method"),
done from outside the package. Each test registers its loss from here and writes its recipe into a
temporary registry folder (``KDBENCH_REGISTRY_PATH``) — no kdbench file is touched — then trains it a few
steps on the tiny models:

* a new token divergence (squared Hellinger) in a ``token_kd`` recipe;
* a new preference form (SLiC's hinge on the log-ratio margin) in a recipe on a preference file;
* a new pipeline recipe: declared stages (the teacher's and the student's responses, frozen log-probs) around
  the new form, so its pairs are generated;
* a new token objective (a loss function registered from the test) on the teacher's responses.
"""

from __future__ import annotations

import json
import math
import textwrap
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from tiny_models import build_tiny, write_tiny_data


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("add_a_method")
    corpus, _ = build_tiny(root)
    write_tiny_data(root, corpus, n=8, n_pairs=8)
    return root


@pytest.fixture
def registry_folder(tmp_path, monkeypatch):
    """A registry folder of the user's own (``trainers/`` under it), on KDBENCH_REGISTRY_PATH."""
    folder = tmp_path / "my_registry"
    (folder / "trainers").mkdir(parents=True)
    monkeypatch.setenv("KDBENCH_REGISTRY_PATH", str(folder))
    return folder


def _recipe(folder: Path, name: str, body: str) -> None:
    (folder / "trainers" / f"{name}.yaml").write_text(textwrap.dedent(body).lstrip())


def _train(root: Path, out: Path, method: str, data: str = "prompts.jsonl", **settings):
    from kdbench.train import TrainConfig, train

    values = dict(method=method, student=str(root / "student"), teacher=str(root / "teacher"), data=str(root / data),
                  valid_fraction=0.25, output_dir=str(out), max_steps=3, batch_size=4, learning_rate=1e-3,
                  warmup_ratio=0.0, lr_scheduler="constant", prompt_style="compact", logging_steps=1, save_steps=100,
                  seed=3, cache_dir=str(out / "cache"))
    values.update(settings)
    return train(TrainConfig(**values), progress=False)


def _log(result) -> list[dict]:
    return [r for r in map(json.loads, open(result.run.path / "train_log.jsonl")) if "loss" in r]


def _moved(result, root: Path) -> bool:
    from safetensors.torch import load_file

    before = load_file(str(root / "student" / "model.safetensors"))
    after = load_file(str(result.model_dir / "model.safetensors"))
    return any(not torch.equal(before[k], after[k]) for k in before)


# ------------------------------------------------------------------------------------------ a divergence
def _hellinger_rows(log_p, log_q, params, rest_last):
    """Squared Hellinger distance per row: 1 − Σ_v sqrt(p_v q_v) (a rest bin is one more outcome)."""
    return 1.0 - torch.exp(0.5 * (log_p + log_q)).sum(-1)


@pytest.fixture
def hellinger():
    from kdbench.losses import Divergence, register_divergence, unregister_divergence

    register_divergence(Divergence("hellinger_sq", _hellinger_rows, help="Squared Hellinger distance."))
    yield "hellinger_sq"
    unregister_divergence("hellinger_sq")


def test_a_new_divergence_trains_in_a_recipe_from_the_users_registry(tiny, tmp_path, registry_folder, hellinger):
    from kdbench.losses import DIVERGENCES

    student, teacher = torch.randn(2, 3, 11), torch.randn(2, 3, 11)
    expected = (1 - (student.softmax(-1) * teacher.softmax(-1)).sqrt().sum(-1)).mean()
    assert float(DIVERGENCES[hellinger](student, teacher)) == pytest.approx(float(expected), rel=1e-5)

    _recipe(registry_folder, "hellinger_kd", f"""
        name: hellinger_kd
        description: Token-level KD with the squared Hellinger distance (a user's divergence).
        citation: "tests/test_add_a_method.py"
        objective: token_kd
        data: responses
        stages: [train]
        params:
          divergence: {hellinger}
          kd_ratio: 1.0
        """)
    result = _train(tiny, tmp_path, "hellinger_kd")
    log = _log(result)
    assert len(log) == 3 and all(math.isfinite(r["loss"]) for r in log)
    # kd_ratio 1: the loss is the divergence alone, logged under its name
    assert log[0]["loss"] == pytest.approx(log[0][f"{hellinger}_per_token"], rel=1e-4)
    assert log[-1][f"{hellinger}_per_token"] < log[0][f"{hellinger}_per_token"]
    assert _moved(result, tiny)
    assert result.run.config()["params"]["divergence"] == hellinger


def test_an_unknown_recipe_key_in_the_users_registry_is_one_sentence(tiny, tmp_path, registry_folder):
    from kdbench.errors import ConfigError

    _recipe(registry_folder, "typo_kd", """
        name: typo_kd
        description: A recipe with a misspelt parameter.
        objective: token_kd
        data: responses
        stages: [train]
        params:
          kd_ration: 1.0
        """)
    with pytest.raises(ConfigError, match=r"unknown key 'params.kd_ration'; valid keys here are .*kd_ratio"):
        _train(tiny, tmp_path, "typo_kd")
    assert not (tmp_path / "typo_kd-seed3").exists()


# ------------------------------------------------------------------------------------------ a preference form
@dataclass
class HingeParams:
    """SLiC-HF's calibration hinge (Zhao et al. 2023, Eq. 1) on the log-ratio margin to a frozen reference."""

    delta: float = 1.0
    beta: float = 1.0

    def __post_init__(self):
        from kdbench.errors import ConfigError

        if not self.delta > 0:
            raise ConfigError(f"Parameter delta must be greater than 0 (got {self.delta}).")


def _hinge_rewards(pairs, p: HingeParams):
    return p.beta * (pairs.policy_chosen - pairs.ref_chosen), p.beta * (pairs.policy_rejected - pairs.ref_rejected)


def _hinge_loss(pairs, p: HingeParams):
    chosen, rejected = _hinge_rewards(pairs, p)
    return torch.clamp(p.delta - (chosen - rejected), min=0.0)  # [P]


@pytest.fixture
def hinge():
    from kdbench.train.preference_forms import PREFERENCE_FORMS, PreferenceForm, register_preference_form

    register_preference_form(PreferenceForm("slic_hinge", HingeParams, _hinge_loss, _hinge_rewards,
                                            frozen=lambda p: {"ref": "student"}, help="SLiC's hinge."))
    yield "slic_hinge"
    PREFERENCE_FORMS.pop("slic_hinge", None)


def test_a_new_preference_form_trains_on_a_preference_file(tiny, tmp_path, registry_folder, hinge):
    _recipe(registry_folder, "slic", f"""
        name: slic
        description: SLiC's hinge on (chosen, rejected) pairs of a preference file (a user's form).
        objective: preference
        data: pairs
        stages: [frozen_logps, train]
        params:
          preference_form: {hinge}
          delta: 2.0
        """)
    result = _train(tiny, tmp_path, "slic", data="prefs.jsonl", teacher="")
    log = _log(result)
    # the policy starts at its frozen reference (the original student, dropout off): margin 0, loss = delta
    assert log[0]["loss_per_pair"] == pytest.approx(2.0, abs=1e-5)
    assert log[0]["reward_margin_per_pair"] == pytest.approx(0.0, abs=1e-5)
    assert log[-1]["reward_margin_per_pair"] > 0  # it learns to prefer the chosen responses
    stages = json.loads((result.run.path / "stages.json").read_text())
    assert set(stages["frozen_logps"]) == {"ref"}  # exactly the slot the form declares
    assert _moved(result, tiny)


def test_a_new_pipeline_recipe_generates_its_pairs_for_the_new_form(tiny, tmp_path, registry_folder, hinge):
    _recipe(registry_folder, "slic_distilled", f"""
        name: slic_distilled
        description: Distilled pairs (teacher response chosen, student response rejected) under SLiC's hinge.
        objective: preference
        data: prompts
        stages: [teacher_responses, student_responses, frozen_logps, train]
        params:
          preference_form: {hinge}
          max_new_tokens: 8
        """)
    from kdbench.train.recipes import recipe_data

    assert recipe_data("slic_distilled") == "prompts"  # what the demo asks the recipe
    result = _train(tiny, tmp_path, "slic_distilled")
    stages = json.loads((result.run.path / "stages.json").read_text())
    assert set(stages) == {"teacher_responses", "student_responses", "frozen_logps", "train"}
    assert stages["teacher_responses"]["generated_tokens"] > 0 and stages["student_responses"]["generated_tokens"] > 0
    log = _log(result)
    assert log[0]["loss_per_pair"] == pytest.approx(1.0, abs=1e-5)  # delta's default, margin 0 at the start
    assert result.cost["train_pairs"] == 6 and _moved(result, tiny)


# ------------------------------------------------------------------------------------------ a token objective
@dataclass
class FloorParams:
    floor: float = 0.5


def _ce_with_teacher_floor(batch, params: FloorParams) -> dict:
    """CE on the responses plus a hinge keeping the student's log-prob of each target within ``floor`` of the
    teacher's (summed over counted tokens, as every token objective)."""
    from kdbench.losses.sequence import cross_entropy_sum

    ce = cross_entropy_sum(batch.student_logits, batch.targets)
    targets = batch.targets.clamp(min=0).unsqueeze(-1)
    student = batch.student_logits.float().log_softmax(-1).gather(-1, targets).squeeze(-1)
    teacher = batch.teacher_logits.float().log_softmax(-1).gather(-1, targets).squeeze(-1)
    gap = (torch.clamp(teacher - student - params.floor, min=0.0) * batch.mask).sum()
    return {"loss": ce + gap, "ce": ce, "gap": gap}


@pytest.fixture
def floor_objective():
    from kdbench.train.objectives import OBJECTIVES, Objective, register_objective

    register_objective(Objective("ce_teacher_floor", "token", _ce_with_teacher_floor, (FloorParams,),
                                 needs_teacher=True, help="CE + a floor on the teacher log-prob gap."))
    yield "ce_teacher_floor"
    OBJECTIVES.pop("ce_teacher_floor", None)


def test_a_loss_registered_from_the_test_trains_on_the_teachers_responses(tiny, tmp_path, registry_folder,
                                                                        floor_objective):
    _recipe(registry_folder, "floor_seqkd", f"""
        name: floor_seqkd
        description: The teacher's responses (a generation stage), trained with a user's token objective.
        objective: {floor_objective}
        data: prompts
        stages: [teacher_responses, train]
        params:
          floor: 0.25
          max_new_tokens: 8
        """)
    result = _train(tiny, tmp_path, "floor_seqkd")
    stages = json.loads((result.run.path / "stages.json").read_text())
    assert set(stages) == {"teacher_responses", "train"}
    log = _log(result)
    assert len(log) == 3 and {"ce_per_token", "gap_per_token"} <= set(log[0])
    assert log[0]["loss"] == pytest.approx(log[0]["ce_per_token"] + log[0]["gap_per_token"], rel=1e-4)
    assert _moved(result, tiny)
    from kdbench.train.recipes import resolve_recipe

    assert resolve_recipe("floor_seqkd").objective_params == FloorParams(floor=0.25)


# ------------------------------------------------------------------------------------------ a sampling form
class _ReplayProbe:
    """A sampling form with state (a replay buffer's bookkeeping): it records every example it served."""

    counter = "probe_batches"

    def __init__(self):
        self.served: list[int] = []

    def transform(self, trainer, batch, micro):
        self.served += [int(i) for i in batch["example_index"]]
        trainer.counters[self.counter] += 1
        return batch

    def on_evaluate(self, trainer, metrics):
        pass

    def state_dict(self):
        return {"served": list(self.served)}

    def load_state_dict(self, state):
        self.served = list(state["served"])


@pytest.fixture
def replay_probe():
    from kdbench.train.sampling import SAMPLING_FORMS, SamplingSpec, register_sampling_form

    built: list[_ReplayProbe] = []

    def build(recipe, config, decoding, tokenizer):
        built.append(_ReplayProbe())
        return built[-1]

    register_sampling_form(SamplingSpec("replay_probe", build, kinds=("token",), generates=False))
    yield built
    SAMPLING_FORMS.pop("replay_probe", None)


def test_a_sampling_forms_state_is_saved_in_checkpoints_and_restored_on_resume(tiny, tmp_path, registry_folder,
                                                                               replay_probe):
    from transformers import TrainerCallback

    _recipe(registry_folder, "sft_probe", """
        name: sft_probe
        description: SFT with a stateful sampling form (what a replay buffer needs from the engine).
        objective: sft
        data: responses
        stages: [train]
        sampling: replay_probe
        """)

    class StopAt(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 3:
                raise KeyboardInterrupt

    from kdbench.train import TrainConfig, train

    def run(out, callbacks=None):
        config = TrainConfig(method="sft_probe", student=str(tiny / "student"), data=str(tiny / "prompts.jsonl"),
                             output_dir=str(out), max_steps=4, save_steps=2, batch_size=2, prompt_style="compact",
                             logging_steps=1, seed=3, cache_dir=str(out / "cache"))
        return train(config, progress=False, callbacks=callbacks)

    uninterrupted = run(tmp_path / "a")
    assert uninterrupted.cost["probe_batches"] == 4
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "b", [StopAt()])
    saved = json.loads(next((tmp_path / "b").glob("*/checkpoints/checkpoint-2/kdbench_sampling-0.json")).read_text())
    assert saved == {"served": replay_probe[0].served[:4]}  # two steps of two examples, as served
    resumed = run(tmp_path / "b")
    assert resumed.cost["resumed"] and resumed.cost["probe_batches"] == 4
    assert replay_probe[-1].served == replay_probe[0].served  # the restored buffer went on as if never stopped
