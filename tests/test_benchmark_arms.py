"""The embedded benchmark's arms and controls: fair starts, data-scaled budgets, meaningless teachers."""

from __future__ import annotations

import pytest

from kdbench.errors import ConfigError
from kdbench.store import ArtifactStore
from kdbench.synthetic.arms import arm_for, budget_steps, control_arm, plan_arms
from kdbench.synthetic.controls import control_teacher, permutation
from tiny_models import build_tiny


def test_fair_starts_order_and_data():
    arms = plan_arms(["kd", "dpo", "dsft", "dadpo"], ["dpo_swapped", "sft_all", "kd_permuted"])
    labels = [a.label for a in arms]
    # DPO starts from the SFT student of the same seed, which the plan adds and trains first; daDPO gets the
    # dSFT arm's model instead of building its own
    assert labels.index("sft") < labels.index("dpo") and labels.index("sft") < labels.index("dpo_swapped")
    assert labels.index("dsft") < labels.index("dadpo")
    by_label = {a.label: a for a in arms}
    assert by_label["dpo"].start == "sft" and by_label["dpo"].stage == "preference"
    assert by_label["dpo_swapped"].data == "preferences_swapped"
    assert by_label["dpo_swapped"].valid == "validation_preferences_swapped"
    assert by_label["kd"].start == "init" and by_label["kd"].data == "student_train"
    assert by_label["dsft"].data == "student_unlabelled" and by_label["sft_all"].data == "student_all"
    assert by_label["kd_permuted"].teacher == "permuted" and by_label["kd_permuted"].method == "kd"
    assert by_label["dadpo"].params == {"dsft_model": "@dsft"} and by_label["dadpo"].start == "init"
    assert arm_for("dpkd").params == {"sft_model": "@sft"}


def test_unknown_control_and_duplicates_are_clear_errors():
    with pytest.raises(ConfigError, match="Unknown control"):
        control_arm("kd_backwards")
    with pytest.raises(ConfigError, match="once"):
        plan_arms(["sft", "sft"], [])


def test_budget_is_scaled_to_the_data_in_whole_checkpoint_intervals():
    assert budget_steps(256, 32, 80, 8) == (640, 80)
    assert budget_steps(598, 32, 80, 8) == (1496, 187)  # 1,495.0 steps rounded up to 8 equal intervals
    steps, save = budget_steps(10, 32, 1, 4)
    assert steps == 4 and save == 1  # never fewer steps than checkpoints


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("controls")
    build_tiny(root)
    return root


def test_permuted_teacher_moves_predictions_not_reading(tiny):
    import torch

    from kdbench.models import load_model, load_tokenizer

    store = ArtifactStore(tiny / "cache")
    path = control_teacher("permuted", tiny / "teacher", size="gpt2-micro", store=store)
    tokenizer = load_tokenizer(str(tiny / "teacher"))
    original, permuted = load_model(str(tiny / "teacher")), load_model(str(path))
    ids = tokenizer("instruction : name three people . response :", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        before, after = original(ids).logits[0], permuted(ids).logits[0]
    mapping = torch.tensor(permutation(before.shape[-1], set(tokenizer.all_special_ids), 0))
    torch.testing.assert_close(after, before[:, mapping])  # logit of v = trained logit of pi(v), every position
    assert not torch.equal(after, before)
    assert all(mapping[i] == i for i in tokenizer.all_special_ids)  # responses still end
    assert sorted(mapping.tolist()) == list(range(before.shape[-1]))
    # the entropy of every prediction is the trained teacher's: only the meaning is gone
    entropy = lambda logits: -(logits.softmax(-1) * logits.log_softmax(-1)).sum(-1)
    torch.testing.assert_close(entropy(after), entropy(before))
    assert control_teacher("permuted", tiny / "teacher", size="gpt2-micro", store=store) == path  # cached


def test_untrained_teacher_is_a_fresh_model_of_the_teachers_size(tiny):
    from kdbench.models import count_parameters, load_model

    store = ArtifactStore(tiny / "cache")
    path = control_teacher("untrained", tiny / "teacher", size="gpt2-micro", store=store)
    fresh, trained = load_model(str(path)), load_model(str(tiny / "teacher"))
    assert count_parameters(fresh) == count_parameters(trained)
    with pytest.raises(ConfigError, match="Unknown teacher control"):
        control_teacher("reversed", tiny / "teacher", size="gpt2-micro", store=store)


def test_teacher_forced_readings_match_a_one_example_computation(tiny):
    """Batched readings (padding, several lengths) equal a plain per-example forward pass."""
    import torch

    from kdbench.models import load_model, load_tokenizer
    from kdbench.synthetic.corpus import load_corpus_rows
    from kdbench.synthetic.likelihood import reference_readings

    rows = load_corpus_rows(tiny / "corpus", "test")[:12]
    readings = reference_readings(tiny / "teacher", rows)
    model, tokenizer = load_model(str(tiny / "teacher")), load_tokenizer(str(tiny / "teacher"))
    model.eval()

    def reading(row, response):
        prompt = tokenizer(f"instruction : {row['instruction']}" + (f" input : {row['input']}" if row["input"] else "")
                           + " response :", add_special_tokens=False)["input_ids"]
        answer = tokenizer(" " + response, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        ids = torch.tensor([prompt + answer])
        with torch.no_grad():
            logps = model(ids).logits[0, len(prompt) - 1:-1].log_softmax(-1)
        target = torch.tensor(answer)
        accuracy = (100.0 * (logps.argmax(-1) == target).float().mean()).item()
        return accuracy, logps[range(len(answer)), target].sum().item()

    for i, row in enumerate(rows):
        accuracy, right = reading(row, row["output"][0])
        _, wrong = reading(row, row["rejected"])
        assert readings["token_accuracy"][i] == pytest.approx(accuracy, abs=1e-3)
        assert readings["pair_accuracy"][i] == (100.0 if right > wrong else 0.0)
