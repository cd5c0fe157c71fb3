"""Every key of a task or judge file is read: editing a documented key changes behaviour (one test per file
kind), and an unknown key fails with one sentence naming the file and the key. Edited copies live in a
temporary registry folder (KDBENCH_REGISTRY_PATH), where a file overrides the built-in one of the same name."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from kdbench import registry
from kdbench.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(__file__).resolve().parents[2] / "shared"


@pytest.fixture()
def user_registry(tmp_path, monkeypatch):
    """edit(kind, name, change) writes an edited copy of a built-in file into a user registry folder."""
    monkeypatch.setenv("KDBENCH_REGISTRY_PATH", str(tmp_path / "reg"))

    def edit(kind: str, name: str, change) -> Path:
        body = yaml.safe_load((REPO / kind / f"{name}.yaml").read_text())
        change(body)
        path = tmp_path / "reg" / kind / f"{name}.yaml"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(yaml.safe_dump(body, sort_keys=False, allow_unicode=True))
        return path

    return edit


FILE_KINDS = [("tasks", "dolly"), ("tasks", "oll"), ("judges", "mt_bench"), ("judges", "mt_bench_pairwise"),
              ("judges", "pairwise"), ("judges", "offline"), ("judges", "alpaca_eval_2"),
              ("judges", "mt_bench_answers"), ("trainers", "kd"), ("trainers", "dpkd"), ("trainers", "adpa_plus")]


@pytest.mark.parametrize("kind,name", FILE_KINDS, ids=[f"{k}/{n}" for k, n in FILE_KINDS])
def test_unknown_key_is_one_sentence_naming_file_and_key(user_registry, kind, name):
    path = user_registry(kind, name, lambda body: body.update(temperture=0.5))
    with pytest.raises(ConfigError) as caught:
        registry.names(kind)
    message = str(caught.value)
    assert str(path) in message and "'temperture'" in message and message.count(".") >= 1
    assert len(message.splitlines()) == 1


def test_unknown_nested_key_and_bad_value_are_named(user_registry):
    path = user_registry("judges", "mt_bench_answers", lambda b: b["templates"]["one_shot"].update(sep3="x"))
    with pytest.raises(ConfigError, match=re.escape(f"{path}: unknown key 'templates.one_shot.sep3'")):
        registry.names("judges")
    user_registry("judges", "mt_bench_answers", lambda b: b["templates"]["one_shot"].pop("sep3", None))
    path = user_registry("tasks", "dolly", lambda b: b.update(metrics=["rouge_l", "bleu"]))
    with pytest.raises(ConfigError, match=re.escape(f"{path}: key 'metrics' has the unknown value 'bleu'")):
        registry.names("tasks")


def test_unknown_key_through_the_cli_is_exit_2(user_registry):
    from kdbench.cli import app

    path = user_registry("judges", "offline", lambda body: body["modes"]["rouge"].update(margin=0.1))
    result = CliRunner().invoke(app, ["list", "judges"])
    assert result.exit_code == 2 and f"{path}: unknown key 'modes.rouge.margin'" in result.output
    assert len(result.output.strip().splitlines()) == 1


def test_every_shipped_file_validates():
    for kind in ("tasks", "judges", "trainers"):
        assert registry.names(kind)


def test_recipe_params_are_exactly_the_declared_pieces_parameters(user_registry):
    """A trainers/ file's params may hold only what its objective, forms, stages and sampling form declare:
    a parameter of a stage the recipe does not declare is unknown (one sentence listing the valid ones)."""
    path = user_registry("trainers", "sft", lambda body: body["params"].update(max_new_tokens=8) if body.get("params")
                         else body.update(params={"max_new_tokens": 8}))
    with pytest.raises(ConfigError) as caught:
        registry.names("trainers")
    message = str(caught.value)
    assert str(path) in message and "'params.max_new_tokens'" in message and len(message.splitlines()) == 1
    # declaring the stage that generates makes the same key valid
    user_registry("trainers", "sft", lambda body: body.update(stages=["teacher_responses", "train"], data="prompts",
                                                              params={"max_new_tokens": 8}))
    assert "sft" in registry.names("trainers")


def test_recipe_file_keys_change_what_the_recipe_is(user_registry):
    """Each top-level key of a trainers/ file is read: data (what the demo gives the recipe), stages, sampling,
    lm (the LM term's default weight), params."""
    from kdbench.synthetic.arms import arm_for
    from kdbench.train.recipes import resolve_recipe

    before = resolve_recipe("dpkd")
    assert before.lm.weight == 0.5 and before.sampling_active and arm_for("dpkd").data == "student_train"

    def edit(body):
        body["lm"]["weight"] = 0.25
        body["params"]["pairs"] = "preference_data"
        body["stages"] = ["frozen_logps", "train"]
        body["params"]["beta"] = 0.3
        for key in ("init", "sft_model", "sft_settings", "teacher_init", "teacher_sft_settings"):
            body["params"].pop(key)

    user_registry("trainers", "dpkd", edit)
    after = resolve_recipe("dpkd")
    assert after.lm.weight == 0.25 and after.stages == ("frozen_logps", "train")
    assert not after.sampling_active and after.form_params.beta == 0.3
    assert arm_for("dpkd").data == "preferences"  # the demo asks the recipe which data it needs
    # without the sampling form, its parameter (pairs) is no longer a valid key (each edit starts from the shipped file)
    path = user_registry("trainers", "dpkd", lambda body: body.update(sampling=None))
    with pytest.raises(ConfigError, match=re.escape(f"{path}: unknown key 'params.pairs'")):
        resolve_recipe("dpkd")
    user_registry("trainers", "dpkd", lambda body: (body.update(sampling=None), body["params"].pop("pairs")))
    assert resolve_recipe("dpkd").sampling is None and not resolve_recipe("dpkd").sampling_active


# --- each documented key does something ----------------------------------------------------------


def test_task_file_metrics_choose_what_is_scored(user_registry, tmp_path):
    """tasks/*.yaml (type reference): `metrics` selects the metric records an evaluation writes."""
    from kdbench.evaluate import EvalConfig, evaluate
    from kdbench.generate import DecodingConfig
    from tiny_models import build_tiny

    corpus, _ = build_tiny(tmp_path / "tiny")

    def run(name: str):
        config = EvalConfig(suite="synthetic", model=str(tmp_path / "tiny" / "student"), data_path=str(corpus),
                            greedy=True, limit=4, output_dir=str(tmp_path / "runs"), run_name=name,
                            decoding=DecodingConfig(max_new_tokens=4, greedy=True))
        return {r["metric"] for r in evaluate(config, progress=False).records}

    assert run("default") == {"rougeL", "exact_match"}
    user_registry("tasks", "synthetic", lambda body: body.update(metrics=["exact_match"]))
    assert run("edited") == {"exact_match"}


def test_lm_eval_task_file_keys_reach_the_harness(user_registry, tmp_path):
    """tasks/*.yaml (type lm_eval): shot counts, metrics and the local task folder come from the file."""
    from kdbench import harness

    assert harness.load_harness_suite("oll").tasks[0].num_fewshot == 25
    user_registry("tasks", "oll", lambda body: body["tasks"][0].update(num_fewshot=3, metric="acc"))
    edited = harness.load_harness_suite("oll").tasks[0]
    assert (edited.num_fewshot, edited.metrics) == (3, ("acc",))


def test_mt_bench_file_sets_prompts_params_and_rating_patterns(user_registry):
    """judges/mt_bench.yaml: judge_params and rating_patterns are what the grading uses."""
    from kdbench.judging import mt_bench as mtb
    from kdbench.judging.client import JudgeReply
    from kdbench.judging.data import load_judge_prompts, load_questions

    mt = SHARED / "data" / "mt_bench"
    questions = load_questions(mt / "question.jsonl")[:1]
    prompts = load_judge_prompts(mt / "judge_prompts.jsonl")
    answers = {questions[0]["question_id"]: ["a", "b"]}
    assert mtb.single_judge_calls(questions, answers, prompts, {}, model="m")[0][1].param_dict() == \
        {"temperature": 0, "max_tokens": 2048}
    user_registry("judges", "mt_bench", lambda b: b.update(judge_params={"temperature": 0, "max_tokens": 99},
                                                           rating_patterns=[r"Score: (\d+)"]))
    items = mtb.single_judge_calls(questions, answers, prompts, {}, model="m")
    assert items[0][1].param_dict() == {"temperature": 0, "max_tokens": 99}
    reply = JudgeReply(key="k", ok=True, content="Rating: [[3]] ... Score: 7")
    assert [r["score"] for r in mtb.single_records(items[:1], [reply], "j")] == [7.0]


def test_mt_bench_pairwise_file_sets_orders_and_verdicts(user_registry):
    from kdbench.judging import mt_bench as mtb
    from kdbench.judging.data import load_judge_prompts, load_questions

    mt = SHARED / "data" / "mt_bench"
    questions = load_questions(mt / "question.jsonl")[:2]
    prompts = load_judge_prompts(mt / "judge_prompts.jsonl")
    answers = {q["question_id"]: ["x", "y"] for q in questions}
    assert len(mtb.pairwise_judge_calls(questions, answers, answers, prompts, {})) == 8  # 2 x 2 turns x 2 orders
    user_registry("judges", "mt_bench_pairwise", lambda b: b.update(both_orders=False,
                                                                    verdicts={"<A>": "A", "<B>": "B", "<T>": "tie"}))
    assert len(mtb.pairwise_judge_calls(questions, answers, answers, prompts, {})) == 4
    assert mtb.parse_pair_verdict("I pick <B> over [[A]]", registry.get("judges", "mt_bench_pairwise").body["verdicts"]) == "B"


def test_pairwise_file_sets_orders_and_params(user_registry):
    from kdbench.judging import pairwise as pw

    prompt = {"system_prompt": "s", "prompt_template": "{question} {answer_a} {answer_b}"}
    pairs = [{"id": "1", "question": "q", "student": "a", "teacher": "b", "references": None}]
    assert [c.param_dict() for _, c in pw.judge_calls(pairs, prompt)] == [{"temperature": 0, "max_tokens": 2048}] * 2
    user_registry("judges", "pairwise", lambda b: b.update(judge_params={"temperature": 0.5, "max_tokens": 10}))
    assert [c.param_dict() for _, c in pw.judge_calls(pairs, prompt)][0] == {"temperature": 0.5, "max_tokens": 10}


def test_offline_file_sets_labels_and_tie_margin(user_registry):
    from kdbench.judging.offline import OfflineJudge

    answers = ("the baker lives in rome", "the baker lives in paris", ["the baker lives in rome"])
    assert OfflineJudge("rouge").compare("q", *answers) == "A"
    user_registry("judges", "offline", lambda b: b["modes"]["rouge"].update(tie_margin=0.5, label="proxy, not LLM"))
    judge = OfflineJudge("rouge")
    assert judge.tie_margin == 0.5 and judge.compare("q", *answers) == "tie" and judge.label == "proxy, not LLM"


def test_alpaca_eval_file_sets_the_default_judge_and_the_order_switch(user_registry, tmp_path, monkeypatch):
    """judges/alpaca_eval_*.yaml: default_judge_model and randomize_order.seed drive `kdbench judge alpaca-eval`."""
    import json

    from judge_server import FakeJudgeServer
    from kdbench.cli import app
    from kdbench.store import read_jsonl

    ae_data = SHARED / "data" / "alpaca_eval"
    monkeypatch.setenv("KDBENCH_JUDGE_API_KEY", "sk-schema")
    monkeypatch.setenv("KDBENCH_CACHE", str(tmp_path / "cache"))

    def run(out: str):
        with FakeJudgeServer(api_key="sk-schema") as server:
            result = CliRunner().invoke(app, [
                "judge", "alpaca-eval", "--outputs", str(ae_data / "results/alpaca-7b/model_outputs.json"),
                "--reference", str(ae_data / "results/text_davinci_003/model_outputs.json"), "--version", "1",
                "--templates-dir", str(ae_data / "evaluators_configs"), "--limit", "12", "--base-url", server.url,
                "--out", str(tmp_path / out), "--max-retries", "1"])
        assert result.exit_code == 0, result.output
        judge = json.loads((tmp_path / out / "run.json").read_text())["judge"]
        return judge, [r["is_switched_outputs"] for r in read_jsonl(tmp_path / out / "judgments.jsonl")]

    judge, switched = run("default")
    assert judge == "gpt-4"
    user_registry("judges", "alpaca_eval_1", lambda b: b.update(default_judge_model="my-judge",
                                                                randomize_order={"seed": 7}))
    judge_edited, switched_edited = run("edited")
    assert judge_edited == "my-judge" and switched_edited != switched


def test_mt_bench_answers_file_sets_temperatures_and_templates(user_registry):
    from kdbench.judging import answers
    from kdbench.judging.fastchat_templates import conversation_template

    class Model:
        generation_config = None

    plan = answers.plan_answers(Model(), None, model_id="vicuna-7b", protocol="fastchat")
    assert answers.sampling(plan, "writing")["temperature"] == 0.7
    assert conversation_template("vicuna_v1.1").prompt(["Hi"], []).endswith("USER: Hi ASSISTANT:")

    def change(body):
        body["temperature"]["writing"] = 0.0
        body["templates"]["vicuna_v1.1"]["roles"] = ["HUMAN", "BOT"]

    user_registry("judges", "mt_bench_answers", change)
    plan = answers.plan_answers(Model(), None, model_id="vicuna-7b", protocol="fastchat")
    assert answers.sampling(plan, "writing") == {"greedy": True, "temperature": 0.0}
    assert conversation_template("vicuna_v1.1").prompt(["Hi"], []).endswith("HUMAN: Hi BOT:")
