"""Sequence-level preference pipelines (dSFT, dDPO, rDPO, daDPO; DPO and SimPO on a preference file):
the daDPO identities at pipeline level, per-stage artifact reuse, losses that fall when overfitting,
frozen models left alone, a teacher with another tokenizer, and bad input as one sentence."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from kdbench.cli import app
from kdbench.synthetic.corpus import FILES, CorpusConfig, build_corpus

runner = CliRunner()
SHARED = Path(__file__).resolve().parents[2] / "shared"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from transformers import AutoTokenizer

    from kdbench.models import make_model

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models on a shared CPU
    root = tmp_path_factory.mktemp("pipeline")
    corpus = root / "corpus"
    corpus.mkdir()
    build_corpus(CorpusConfig(n_people=16, n_cities=4), corpus)
    tokenizer = AutoTokenizer.from_pretrained(str(corpus / "tokenizer"))
    for name, size, seed in (("teacher", "gpt2-micro", 0), ("student", "gpt2-nano", 0)):
        make_model(size, tokenizer, seed=seed, max_positions=256).save_pretrained(str(root / name))
        tokenizer.save_pretrained(str(root / name))
    rows = [json.loads(line) for line in open(corpus / FILES["student_train"])][:8]
    (root / "prompts.jsonl").write_text("".join(json.dumps({k: r[k] for k in ("instruction", "input", "output")}) + "\n"
                                                for r in rows))
    yield root, corpus
    torch.set_num_threads(threads)


def _train(root, out, method, params=None, teacher=None, data=None, **settings):
    from kdbench.train import TrainConfig, train

    messages: list[str] = []
    values = dict(method=method, student=str(root / "student"), teacher=str(teacher or root / "teacher"),
                  data=str(data or root / "prompts.jsonl"), valid_fraction=0.2, output_dir=str(out), max_steps=12,
                  batch_size=8, learning_rate=1e-3, warmup_ratio=0.0, lr_scheduler="constant", prompt_style="compact",
                  logging_steps=1, save_steps=100, generation_batch_size=64, seed=3,
                  cache_dir=str(Path(out) / "cache"),
                  params={**({} if method in ("dpo", "simpo") else {"max_new_tokens": 8}), **(params or {})})
    values.update(settings)
    started = time.time()
    result = train(TrainConfig(**values), log=messages.append, progress=False)
    return result, messages, time.time() - started


def _losses(result) -> list[float]:
    return [r["loss"] for r in map(json.loads, open(result.run.path / "train_log.jsonl")) if "loss" in r]


def _params(model_dir: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(Path(model_dir) / "model.safetensors"))


def _assert_same_parameters(a: Path, b: Path) -> None:
    pa, pb = _params(a), _params(b)
    assert pa.keys() == pb.keys()
    for name in pa:
        torch.testing.assert_close(pa[name], pb[name], rtol=0, atol=1e-6, msg=name)


def _assert_falls(losses: list[float], method: str) -> None:
    assert len(losses) >= 10, method
    assert sum(losses[-3:]) / 3 < 0.8 * losses[0], (method, losses)


def test_dadpo_identities_reuse_and_frozen_models(tiny, tmp_path):
    from kdbench.store import hash_tree

    root, _ = tiny
    teacher_hash = hash_tree(root / "teacher")
    first, first_log, first_seconds = _train(root, tmp_path, "dadpo", {"beta2": 0.0}, run_name="dadpo-b2-0")
    ddpo, ddpo_log, ddpo_seconds = _train(root, tmp_path, "ddpo", {"beta": 0.1}, run_name="ddpo")
    # the second method reuses every stage the first built
    for kind in ("teacher-generations", "student-generations", "dsft-model", "sequence-logprobs"):
        assert any(m.startswith(f"reusing cached {kind} artifact") for m in ddpo_log), kind
        assert any(m.startswith(f"building {kind} artifact") for m in first_log), kind
    assert not any(m.startswith("building") for m in ddpo_log)
    assert ddpo.cost["dsft_reused"] and ddpo.cost["generation_reused"] and ddpo.cost["logprobs_reused"]
    assert ddpo_seconds < first_seconds
    # dadpo(β1, 0) = ddpo(β1): the same parameters after the same steps on the same data and seed
    _assert_same_parameters(first.model_dir, ddpo.model_dir)
    # dadpo(0, β2) = rdpo(β = β2)
    rdpo, _, _ = _train(root, tmp_path, "rdpo", {"beta": 0.3}, run_name="rdpo")
    second, _, _ = _train(root, tmp_path, "dadpo", {"beta1": 0.0, "beta2": 0.3}, run_name="dadpo-b1-0")
    _assert_same_parameters(rdpo.model_dir, second.model_dir)
    # the policy starts at the frozen dSFT model: the first dDPO loss is −log σ(0) = log 2
    assert _losses(ddpo)[0] == pytest.approx(0.6931, abs=1e-3)
    full, _, _ = _train(root, tmp_path, "dadpo", run_name="dadpo")
    for result, method in ((ddpo, "ddpo"), (rdpo, "rdpo"), (full, "dadpo")):
        _assert_falls(_losses(result), method)
    # frozen models unchanged: the teacher's files and the cached dSFT checkpoint
    assert hash_tree(root / "teacher") == teacher_hash
    dsft_dir = Path(json.loads((ddpo.run.path / "stages.json").read_text())["dsft_model"]["path"]) / "model"
    dsft_hash = hash_tree(dsft_dir)
    _train(root, tmp_path, "dadpo", run_name="dadpo-again", seed=4)
    assert hash_tree(dsft_dir) == dsft_hash
    before, after = _params(dsft_dir), _params(full.model_dir)
    assert any(not before[name].equal(after[name]) for name in before)  # the policy did move


def test_given_dsft_model_and_dsft_recipe_from_the_cli(tiny, tmp_path):
    root, _ = tiny
    common = ["--student", str(root / "student"), "--teacher", str(root / "teacher"),
              "--data", str(root / "prompts.jsonl"), "--output-dir", str(tmp_path), "--set", "max_steps=3",
              "--set", "batch_size=4", "--set", "prompt_style=compact", "--set", f"cache_dir={tmp_path / 'cache'}",
              "--set", "params.max_new_tokens=8", "--set", "valid_fraction=0.2"]
    dsft = runner.invoke(app, ["train", "dsft", *common])
    assert dsft.exit_code == 0, dsft.output
    dsft_model = tmp_path / "dsft-seed1" / "model"
    result = runner.invoke(app, ["train", "dadpo", *common, "--set", f"params.dsft_model={dsft_model}"])
    assert result.exit_code == 0, result.output
    assert "reusing cached teacher-generations" in result.output  # the dsft run generated y_t
    stages = json.loads((tmp_path / "dadpo-seed1" / "stages.json").read_text())
    assert stages["dsft_model"] == {"given": str(dsft_model)}
    assert set(stages) == {"dsft_model", "teacher_responses", "student_responses", "frozen_logps", "train"}
    cost = json.loads((tmp_path / "dadpo-seed1" / "cost.json").read_text())
    assert cost["optimizer_steps"] == 3 and cost["train_pairs"] == 6 and cost["generated_tokens"] > 0


def test_dpo_and_simpo_on_a_preference_file(tiny, tmp_path):
    root, corpus = tiny
    rows = [json.loads(line) for line in open(corpus / FILES["preferences"])][:8]
    data = tmp_path / "prefs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    for method in ("dpo", "simpo"):
        result, messages, _ = _train(root, tmp_path, method, {}, data=data, teacher="")
        losses = _losses(result)
        _assert_falls(losses, method)
        if method == "dpo":
            assert losses[0] == pytest.approx(0.6931, abs=1e-3)  # policy = frozen initial student
        assert result.cost["train_pairs"] == 6


def test_preference_file_without_pairs_is_one_sentence(tiny, tmp_path):
    root, corpus = tiny
    result = runner.invoke(app, ["train", "dpo", "--student", str(root / "student"),
                                 "--data", str(corpus / FILES["student_train"]), "--output-dir", str(tmp_path)])
    assert result.exit_code == 2
    assert "has no 'chosen' and 'rejected' texts" in result.output and "Traceback" not in result.output
    assert not (tmp_path / "dpo-seed1").exists()
    bad = runner.invoke(app, ["train", "dadpo", "--student", str(root / "student"), "--teacher", str(root / "teacher"),
                              "--data", str(root / "prompts.jsonl"), "--output-dir", str(tmp_path),
                              "--set", "params.beta1=0", "--set", "params.beta2=0"])
    assert bad.exit_code == 2 and "cannot both be 0" in bad.output


def test_dadpo_with_a_teacher_of_another_tokenizer(tiny, tmp_path):
    """The teacher (random tiny GPT-2 with the real GPT-2 tokenizer) and the student (synthetic tokenizer)
    share no vocabulary: each scores the response text with its own tokenizer."""
    if not (SHARED / "models" / "gpt2-tokenizer").is_dir():
        pytest.skip(f"{SHARED / 'models' / 'gpt2-tokenizer'} is absent")
    from transformers import AutoTokenizer

    from kdbench.models import make_model

    root, _ = tiny
    gpt2 = AutoTokenizer.from_pretrained(str(SHARED / "models" / "gpt2-tokenizer"))
    teacher = tmp_path / "gpt2-teacher"
    make_model("gpt2-micro", gpt2, seed=0, max_positions=256).save_pretrained(str(teacher))
    gpt2.save_pretrained(str(teacher))
    result, messages, _ = _train(root, tmp_path, "dadpo", teacher=teacher, max_steps=15)
    _assert_falls(_losses(result), "dadpo cross-tokenizer")
    stages = json.loads((result.run.path / "stages.json").read_text())
    assert set(stages["frozen_logps"]) == {"ref", "teacher"}
    # each model's cached log-probs are its own scoring of the pair texts with its own tokenizer (computed
    # here independently): the GPT-2-tokenizer teacher and the synthetic-tokenizer dSFT reference
    from kdbench.data import load_examples
    from kdbench.train.settings import split_validation

    prompts = split_validation(load_examples(root / "prompts.jsonl"), 0.2, 3)[0]
    texts = {side: [json.loads(line) for line in open(Path(stages[f"{side}_responses"]["path"]) / "generations.jsonl")]
             for side in ("teacher", "student")}
    scorers = {"teacher": teacher, "ref": Path(stages["dsft_model"]["path"]) / "model"}
    for name, model_dir in scorers.items():
        cached = json.loads((Path(stages["frozen_logps"][name]["path"]) / "logps.json").read_text())
        expected = _independent_logps(model_dir, prompts, texts["teacher"], texts["student"])
        assert cached["chosen"] == pytest.approx(expected["chosen"], rel=1e-5), name
        assert cached["rejected"] == pytest.approx(expected["rejected"], rel=1e-5), name


def _independent_logps(model_dir: Path, prompts, chosen: list[dict], rejected: list[dict]) -> dict:
    """Σ log π(response | prompt) with the model's own tokenizer (plain transformers, float64); a stored
    generation that did not end carries no EOS (issue 14), one without the field counts as ended."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from kdbench.data import tokenize_example

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), torch_dtype=torch.float64).eval()
    out = {}
    for side, rows in (("chosen", chosen), ("rejected", rejected)):
        values = []
        for example, row in zip(prompts, rows):
            item = tokenize_example(example, tokenizer, style="compact", max_prompt_length=256, max_length=512,
                                    response=row["text"])
            ids = item.input_ids if row.get("finished", True) else item.input_ids[:-1]
            with torch.no_grad():
                log_probs = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0, :-1], -1)
            positions = range(item.prompt_length - 1, len(ids) - 1)
            values.append(float(sum(log_probs[t, ids[t + 1]] for t in positions)))
        out[side] = values
    return out
