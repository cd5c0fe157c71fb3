"""Issue 19's second-tier preference methods as recipes: WPO, PLaD, DDPO-RM and dKTO.

Each trains from the same call the CLI makes on the tiny models and must overfit one batch (the loss falls) in
the direction its loss points (the implicit reward margin — or, for DDPO-RM, the distance to the reward
model's margin — moves the right way, so a sign-flipped loss fails here); frozen models stay unchanged. dKTO's
reference point z0 is a statistic of the whole optimizer step; DDPO-RM's rewards come from the data or from a
reward model; bad input is one sentence."""

from __future__ import annotations

import json
import math

import pytest
import torch
from typer.testing import CliRunner

from kdbench.cli import app
from tiny_models import build_tiny, loss_log, train_tiny, write_tiny_data

runner = CliRunner()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("second_tier")
    corpus, _ = build_tiny(root)
    write_tiny_data(root, corpus, n=8, n_pairs=8)
    return root




STAGE = {"max_steps": 4}
CASES = {
    "wpo": ("wpo", {}, "prefs"),
    "wpo-in-ddpo": ("ddpo", {"preference_form": "wpo", "max_new_tokens": 8, "dsft_settings": STAGE}, "prompts"),
    "plad": ("plad", {"max_new_tokens": 8, "sft_settings": STAGE}, "prompts"),
    "plad-preference-data": ("plad", {"pairs": "preference_data", "sft_settings": STAGE}, "prefs"),
    "ddpo_rm": ("ddpo_rm", {}, "prefs"),
    "dkto": ("dkto", {"max_new_tokens": 8, "dsft_settings": STAGE}, "prompts"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_each_recipe_overfits_one_batch_in_its_direction_and_leaves_frozen_models_alone(tiny, tmp_path, case):
    from kdbench.store import hash_tree

    method, params, data = CASES[case]
    hashes = {name: hash_tree(tiny / name) for name in ("teacher", "student")}
    evaluation = {"eval_steps": 6, "save_steps": 12} if method == "dkto" else {}  # z0 on held-out pairs too
    result = train_tiny(tiny, tmp_path, method, params, data=str(tiny / f"{data}.jsonl"), **evaluation)
    log = loss_log(result)
    losses = [r["loss"] for r in log]
    assert len(losses) == 12 and all(math.isfinite(v) for v in losses), (case, losses)
    assert sum(losses[-3:]) / 3 < 0.85 * losses[0], (case, losses)
    if method == "ddpo_rm":  # the policy's implicit reward margin moves to the reward model's (0 < margin < 1 here)
        target = result.run.path / "stages.json"
        facts = json.loads(target.read_text())["reward_scores"]["reward"]
        assert facts["mean_margin"] > 0.1
        assert log[0]["reward_margin_per_pair"] == pytest.approx(0.0, abs=1e-4)  # policy = reference at the start
        assert log[-1]["reward_margin_per_pair"] > 0.5 * facts["mean_margin"], case
    else:  # the chosen (teacher / preferred) response gains on the rejected one
        assert log[-1]["reward_margin_per_pair"] > log[0]["reward_margin_per_pair"] + 0.05, (case, log[-1])
    assert result.run.complete and (result.model_dir / "model.safetensors").is_file()
    assert {name: hash_tree(tiny / name) for name in hashes} == hashes
    if method == "dkto":
        assert "kto_z0_per_pair" in log[0] and all(r["kto_z0_per_pair"] >= 0 for r in log)
        stages = json.loads((result.run.path / "stages.json").read_text())
        assert {"ref", "ref_mismatched", "valid_ref", "valid_ref_mismatched"} <= set(stages["frozen_logps"])
        evaluations = [r for r in map(json.loads, open(result.run.path / "train_log.jsonl")) if "eval_loss" in r]
        assert len(evaluations) >= 2 and all(math.isfinite(r["eval_loss"]) for r in evaluations)


def test_wpo_weights_are_one_on_the_policys_own_argmax_and_wpo_then_equals_dpo(tiny, tmp_path):
    """Responses the policy puts all its mass on have w(y) = 0 (weight 1), and the wpo form's loss is then the
    dpo form's on the same pairs (the identity WPO = DPO with unit weights, through the registered forms)."""
    from kdbench.train.preference_forms import PairBatch, get_preference_form
    from kdbench.train.recipes import resolve_recipe

    recipe = resolve_recipe("wpo")
    form = get_preference_form("wpo")
    logits = torch.full((2, 3, 5), -1e4)
    targets = torch.tensor([[1, 2, 3], [4, 0, -100]])
    logits.scatter_(-1, targets.clamp(min=0).unsqueeze(-1), 0.0)
    stats = form.policy_stats(logits, targets, recipe.form_params)["wpo_log_weight"]
    assert torch.allclose(stats, torch.zeros(2), atol=1e-6)
    pairs = PairBatch(torch.tensor([-1.0]), torch.tensor([-3.0]), torch.tensor([3]), torch.tensor([2]),
                      ref_chosen=torch.tensor([-2.0]), ref_rejected=torch.tensor([-2.5]),
                      extras={"wpo_log_weight_chosen": stats[:1], "wpo_log_weight_rejected": stats[1:]})
    dpo = get_preference_form("dpo")
    assert float(form.loss(pairs, recipe.form_params)) == pytest.approx(
        float(dpo.loss(pairs, resolve_recipe("dpo").form_params)), rel=1e-6)


class _Accelerator:
    num_processes = 1


def test_dkto_reference_point_is_over_the_whole_step_not_each_micro_batch(tiny):
    """z0 from two micro-batches equals z0 from the same rows as one batch (the mean over every mismatched row of
    the step, then clamped), which differs from the mean of per-micro-batch clamped estimates."""
    from types import SimpleNamespace

    from kdbench.losses.sequence import sequence_logps
    from kdbench.models import load_model
    from kdbench.train.pairs import PairCollator, load_preference_pairs, mismatched_pairs, tokenize_pairs
    from kdbench.train.second_tier_forms import DKTOParams, kto_step_reference
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(tiny / "student"))
    model = load_model(str(tiny / "student"))
    pairs = load_preference_pairs(tiny / "prefs.jsonl")[:4]
    rows = tokenize_pairs(mismatched_pairs(pairs), tokenizer, style="compact", max_prompt_length=128, max_length=256)
    collate = PairCollator(tokenizer.pad_token_id)
    features = [{"chosen": r["chosen"], "rejected": r["rejected"], "example_index": i, "mismatched": r}
                for i, r in enumerate(rows)]
    whole = collate(features)
    with torch.no_grad():
        logits = model(input_ids=whole["mismatched_input_ids"], attention_mask=whole["mismatched_attention_mask"]).logits
        policy = sequence_logps(logits[:, :-1], whole["mismatched_labels"][:, 1:])  # [8]: 4 chosen, then 4 rejected
    # a reference that makes the first two pairs' KL estimate large and the last two's negative
    offsets = torch.tensor([-3.0, -3.0, 5.0, 5.0])
    ref = {"chosen": (policy[:4] + offsets).tolist(), "rejected": (policy[4:] + offsets).tolist()}
    for i, feature in enumerate(features):
        feature["ref_mismatched_chosen"], feature["ref_mismatched_rejected"] = ref["chosen"][i], ref["rejected"][i]
    trainer = SimpleNamespace(model=model, args=SimpleNamespace(device=torch.device("cpu")), logit_rows=None,
                              accelerator=_Accelerator(), counters={"tokens_processed": 0})
    params = DKTOParams(reference="dsft")
    one = kto_step_reference(trainer, [collate(features)], params, True)["kto_z0"]
    two = kto_step_reference(trainer, [collate(features[:2]), collate(features[2:])], params, True)["kto_z0"]
    expected = max(0.0, float(-offsets.mean()))  # mean of log π − log ref over the 8 rows
    assert float(one) == pytest.approx(expected, abs=1e-4) and float(two) == pytest.approx(expected, abs=1e-4)
    per_micro = [max(0.0, float(-offsets[:2].mean())), max(0.0, float(-offsets[2:].mean()))]
    assert abs(sum(per_micro) / 2 - expected) > 0.5  # what a per-micro-batch z0 would have given instead
    zero = kto_step_reference(trainer, [collate(features)], DKTOParams(kto_reference_point="zero"), True)["kto_z0"]
    assert float(zero) == 0.0


def test_ddpo_rm_scores_pairs_with_a_given_reward_model(tiny, tmp_path):
    from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

    config = AutoConfig.from_pretrained(str(tiny / "student"), num_labels=1)
    tokenizer = AutoTokenizer.from_pretrained(str(tiny / "student"))
    config.pad_token_id = tokenizer.pad_token_id
    torch.manual_seed(0)
    reward_model = tmp_path / "reward_model"
    AutoModelForSequenceClassification.from_config(config).save_pretrained(str(reward_model))
    tokenizer.save_pretrained(str(reward_model))
    unscored = tmp_path / "unscored.jsonl"
    unscored.write_text("".join(json.dumps({k: v for k, v in json.loads(line).items() if not k.startswith("score_")})
                                + "\n" for line in open(tiny / "prefs.jsonl")))
    result = train_tiny(tiny, tmp_path / "runs", "ddpo_rm", {"reward_model": str(reward_model)}, data=str(unscored),
                    max_steps=2)
    facts = json.loads((result.run.path / "stages.json").read_text())["reward_scores"]
    assert facts["reward"]["source"] == str(reward_model) and facts["reward"]["forward_tokens"] > 0
    assert result.run.complete

    # without scores and without a reward model: one sentence, nothing written
    out = tmp_path / "bad"
    cli = runner.invoke(app, ["train", "ddpo_rm", "--student", str(tiny / "student"), "--data", str(unscored),
                              "--output-dir", str(out), "--set", "max_steps=1"])
    assert cli.exit_code == 2 and "score_chosen" in cli.output and "reward_model" in cli.output, cli.output
    assert not any(out.glob("ddpo_rm-*"))


def test_second_tier_recipes_train_from_the_cli(tiny, tmp_path):
    for method, data, extra in (("wpo", "prefs", []), ("ddpo_rm", "prefs", []),
                                ("plad", "prefs", ["--set", "params.pairs=preference_data", "--set", "params.init=student"])):
        result = runner.invoke(app, ["train", method, "--student", str(tiny / "student"), "--teacher",
                                     str(tiny / "teacher"), "--data", str(tiny / f"{data}.jsonl"), "--output-dir",
                                     str(tmp_path), "--set", "max_steps=2", "--set", "batch_size=4", "--set",
                                     "prompt_style=compact", "--set", f"cache_dir={tmp_path / 'cache'}", *extra])
        assert result.exit_code == 0, f"{method}: {result.output}"
        assert json.loads((tmp_path / f"{method}-seed1" / "run.json").read_text())["status"] == "complete"


def test_the_paper_comparison_maps_the_adpa_baselines_to_their_recipes():
    """ADPA's Table 1 rows for WPO, PLaD, ATKD and Fisch et al.'s DDPO sit beside kdbench's wpo, plad, atkd and
    ddpo_rm — and ADPA's "DDPO" is not shown beside kdbench's ddpo (the daDPO paper's dDPO)."""
    from kdbench.report.papers import paper_tables

    def methods(labels):
        tables, _ = paper_tables(labels, ["mt_bench"])
        return {(t.title.split(" ")[0], row[0].text)
                for t in tables for row in t.rows}

    shown = methods(["wpo", "plad", "ddpo_rm", "atkd"])
    assert {m for paper, m in shown if paper == "ADPA"} >= {"WPO", "PLaD", "DDPO", "ATKD"}
    assert not any(paper == "ADPA" and m == "DDPO" for paper, m in methods(["ddpo"]))


def test_dkto_refuses_pairs_sampled_in_every_step(tiny, tmp_path):
    """dKTO's mismatched rows pair each prompt with another pair's fixed responses: with DPKD's online pairs there
    are none, which is one sentence before anything is written."""
    result = runner.invoke(app, ["train", "dpkd", "--student", str(tiny / "student"), "--teacher", str(tiny / "teacher"),
                                 "--data", str(tiny / "prompts.jsonl"), "--output-dir", str(tmp_path), "--set",
                                 "params.preference_form=dkto", "--set", "params.init=student"])
    assert result.exit_code == 2 and "params.pairs=offline" in result.output, result.output
    assert not any(tmp_path.glob("dpkd-*"))
