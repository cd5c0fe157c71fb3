"""The training engine: exact token normalization under gradient accumulation (against an independent
full-batch reference), accumulation invariance, bad input as one clear sentence, the run directory's
cost figures and model card."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from kdbench.cli import app
from kdbench.synthetic.corpus import FILES
from tiny_models import build_tiny

runner = CliRunner()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A small corpus, a teacher and a student sharing its tokenizer, and data files of different lengths."""
    root = tmp_path_factory.mktemp("engine")
    corpus, tokenizer = build_tiny(root)
    rows = [json.loads(line) for line in open(corpus / FILES["student_train"])]
    rows.sort(key=lambda r: len(r["output"]))
    # responses of clearly different lengths: per-micro-batch averaging would weight them differently
    picked = [rows[0], rows[-1], rows[len(rows) // 2], rows[1], rows[-2], rows[len(rows) // 3]] * 2
    _write(root / "train12.jsonl", picked)
    _write(root / "train4.jsonl", [rows[0], rows[-1], rows[1], rows[-2]])
    _write(root / "valid.jsonl", rows[2:4])
    return root


def _write(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps({k: r[k] for k in ("instruction", "input", "output")}) + "\n" for r in rows))


def _train(tiny, out, **settings):
    from kdbench.train import TrainConfig, train

    values = dict(student=str(tiny / "student"), teacher=str(tiny / "teacher"), data=str(tiny / "train12.jsonl"),
                  valid_data=str(tiny / "valid.jsonl"), output_dir=str(out), prompt_style="compact", save_steps=100,
                  logging_steps=1, warmup_ratio=0.0, lr_scheduler="constant", seed=3, cache_dir=str(Path(out) / "cache"))
    values.update(settings)
    return train(TrainConfig(**values), progress=False)


def _params(model_dir: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(model_dir / "model.safetensors"))


def test_one_accumulated_step_equals_the_full_batch_token_mean(tiny, tmp_path):
    """SGD, one optimizer step of 2 micro-batches × 2 examples: the update is −lr × the gradient of the
    token mean over all 4 examples ((1−r)·CE + r·FKL, computed here independently with plain torch)."""
    from transformers import AutoModelForCausalLM

    from kdbench.data import PadCollator, build_dataset, load_examples
    from kdbench.models import load_tokenizer

    lr, ratio = 0.5, 0.5
    result = _train(tiny, tmp_path, method="kd", data=str(tiny / "train4.jsonl"), optim="sgd", learning_rate=lr,
                    max_steps=1, batch_size=2, grad_accum=2, max_grad_norm=0.0)
    trained = _params(result.model_dir)

    tokenizer = load_tokenizer(tiny / "student")
    dataset = build_dataset(load_examples(tiny / "train4.jsonl"), tokenizer, style="compact", max_prompt_length=256,
                            max_length=512)
    lengths = [sum(1 for t in item.labels if t != -100) for item in dataset.items]
    assert len(set(lengths)) > 1, "the test needs responses of different lengths"
    student = AutoModelForCausalLM.from_pretrained(str(tiny / "student"))
    teacher = AutoModelForCausalLM.from_pretrained(str(tiny / "teacher"))
    batch = PadCollator(tokenizer.pad_token_id)([dataset[i] for i in range(len(dataset))])

    def token_losses(rows):
        logits = student(input_ids=batch["input_ids"][rows], attention_mask=batch["attention_mask"][rows]).logits[:, :-1]
        with torch.no_grad():
            teacher_logits = teacher(input_ids=batch["input_ids"][rows],
                                     attention_mask=batch["attention_mask"][rows]).logits[:, :-1]
        targets = batch["labels"][rows][:, 1:]
        mask = targets != -100
        log_q = torch.log_softmax(logits.float(), -1)
        log_p = torch.log_softmax(teacher_logits.float(), -1)
        ce = -log_q.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
        fkl = (log_p.exp() * (log_p - log_q)).sum(-1)
        return (((1 - ratio) * ce + ratio * fkl) * mask).sum(), mask.sum()

    total, count = token_losses(list(range(4)))
    grads = torch.autograd.grad(total / count, list(student.parameters()))
    names = [n for n, _ in student.named_parameters()]
    for name, param, grad in zip(names, student.parameters(), grads):
        expected = param.detach() - lr * grad
        assert torch.allclose(trained[name], expected, atol=2e-6, rtol=1e-5), name

    # the reference discriminates: averaging per micro-batch (the MiniLLM/DPKD code) gives another update
    per_micro = []
    for rows in ([0, 2], [1, 3]):  # the two short responses, the two long ones
        s, c = token_losses(rows)
        per_micro.append(s / c / 2)
    grads_micro = torch.autograd.grad(sum(per_micro), list(student.parameters()))
    gap = max(float((a - b).abs().max()) for a, b in zip(grads, grads_micro))
    assert gap > 1e-4


def test_accumulation_invariance_with_adamw(tiny, tmp_path):
    """Micro-batch 1 × accumulation 4 ends with the same parameters as micro-batch 4 × 1 (3 AdamW steps,
    sequences of different lengths)."""
    a = _train(tiny, tmp_path / "a", method="kd", batch_size=4, grad_accum=1, max_steps=3, learning_rate=3e-3)
    b = _train(tiny, tmp_path / "b", method="kd", batch_size=1, grad_accum=4, max_steps=3, learning_rate=3e-3)
    pa, pb = _params(a.model_dir), _params(b.model_dir)
    initial = _params(tiny / "student")
    moved = max(float((pa[k] - initial[k]).abs().max()) for k in pa)
    assert moved > 1e-3  # training did move the parameters
    for key in pa:
        assert torch.allclose(pa[key], pb[key], atol=1e-5, rtol=1e-4), key
    la = [json.loads(line) for line in open(a.run.path / "train_log.jsonl") if '"loss"' in line]
    lb = [json.loads(line) for line in open(b.run.path / "train_log.jsonl") if '"loss"' in line]
    assert [r["loss"] for r in la] == pytest.approx([r["loss"] for r in lb], rel=1e-5)
    assert [r["response_tokens"] for r in la] == [r["response_tokens"] for r in lb]


def test_run_directory_has_cost_card_and_diagnostics(tiny, tmp_path):
    # lr 3e-2 overshoots after step 2: the best checkpoint is not the last one, so keeping the last fails here
    result = _train(tiny, tmp_path, method="akl", batch_size=4, max_steps=4, save_steps=2, select="best",
                    learning_rate=3e-2)
    cost = json.loads((result.run.path / "cost.json").read_text())
    for key in ("wall_seconds", "tokens_processed", "teacher_forward_tokens", "generated_tokens", "peak_rss_mb"):
        assert key in cost
    assert cost["teacher_forward_tokens"] == cost["tokens_processed"] > 0
    assert cost["selected"] == "best" and cost["selected_checkpoint"].endswith(("checkpoint-2", "checkpoint-4"))
    assert set(cost["validation"]) >= {"loss", "ce", "token_accuracy"}
    card = (result.model_dir / "README.md").read_text()
    for needle in ("akl", str(tiny / "teacher"), "train12.jsonl", "learning_rate", "validation loss", "kd_ratio"):
        assert needle in card
    log = [json.loads(line) for line in open(result.run.path / "train_log.jsonl")]
    steps = [r for r in log if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2, 3, 4]
    for record in steps:
        assert 0.0 <= record["akl_fkl_weight"] <= 1.0
        mixed = 0.5 * record["ce_per_token"] + 0.5 * record["akl_per_token"]
        assert record["loss_per_token"] == pytest.approx(mixed, rel=1e-5)
        assert record["loss"] == pytest.approx(record["loss_per_token"], rel=1e-5)  # logging every step
    evals: dict = {}
    for record in log:  # the in-training evaluations (the final one, of the kept model, is logged at step 4 too)
        if "eval_loss" in record:
            evals.setdefault(record["step"], record)
    assert sorted(evals) == [2, 4]
    best = min(evals, key=lambda step: evals[step]["eval_loss"])
    assert best == 2 and evals[2]["eval_loss"] < evals[4]["eval_loss"]
    assert cost["selected_checkpoint"].endswith(f"checkpoint-{best}")
    assert cost["validation"]["loss"] == pytest.approx(evals[best]["eval_loss"], rel=1e-6)
    # the saved model is that checkpoint: its gold CE on the validation set, computed here, is the one logged there
    assert _validation_ce(result.model_dir, tiny / "valid.jsonl") == pytest.approx(evals[best]["eval_ce"], rel=1e-5)
    assert evals[2]["eval_ce"] != pytest.approx(evals[4]["eval_ce"], rel=1e-3)
    stages = json.loads((result.run.path / "stages.json").read_text())
    assert "train" in stages


def _validation_ce(model_dir: Path, data: Path) -> float:
    """Token-mean gold cross-entropy of a saved model on a data file (plain transformers, float64)."""
    from transformers import AutoModelForCausalLM

    from kdbench.data import load_examples, tokenize_example
    from kdbench.models import load_tokenizer

    tokenizer = load_tokenizer(model_dir)
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), torch_dtype=torch.float64).eval()
    total, count = 0.0, 0
    for example in load_examples(data):
        item = tokenize_example(example, tokenizer, style="compact", max_prompt_length=256, max_length=512)
        with torch.no_grad():
            log_probs = torch.log_softmax(model(input_ids=torch.tensor([item.input_ids])).logits[0, :-1], -1)
        for t in range(item.prompt_length - 1, len(item.input_ids) - 1):
            total -= float(log_probs[t, item.input_ids[t + 1]])
            count += 1
    return total / count


def _invoke(*args):
    result = runner.invoke(app, list(args))
    return result, result.output


@pytest.mark.parametrize("case, expected", [
    ("param_out_of_range", "kd_ratio must be between 0 and 1"),
    ("divergence_param_out_of_range", "beta must be between 0 and 1"),
    ("setting_out_of_range", "batch_size must be at least 1"),
    ("unknown_method", "Unknown method 'kdd'"),
    ("missing_fields", "has no 'output'"),
    ("hub_without_revision", "no pinned revision"),
    ("topk_too_large", "teacher_topk"),
])
def test_bad_input_is_one_clear_sentence(tiny, tmp_path, case, expected):
    method, data, extra = "kd", str(tiny / "train4.jsonl"), []
    if case == "param_out_of_range":
        extra = ["--set", "params.kd_ratio=7"]
    elif case == "divergence_param_out_of_range":
        method, extra = "jsd", ["--set", "params.divergence_params.beta=1.5"]
    elif case == "setting_out_of_range":
        extra = ["--set", "batch_size=0"]
    elif case == "unknown_method":
        method = "kdd"
    elif case == "missing_fields":
        bad = tmp_path / "bad.jsonl"
        bad.write_text(json.dumps({"instruction": "name a city .", "input": ""}) + "\n")
        data = str(bad)
    elif case == "hub_without_revision":
        data = "hf://someone/some-data"
    elif case == "topk_too_large":
        extra = ["--set", "teacher_signal=topk", "--set", "teacher_topk=100000"]
    result, out = _invoke("train", method, "--student", str(tiny / "student"), "--teacher", str(tiny / "teacher"),
                          "--data", data, "--output-dir", str(tmp_path / "runs"), *extra)
    assert result.exit_code == 2, out
    assert expected in out
    assert "Traceback" not in out
    assert len([line for line in out.strip().splitlines() if line.strip()]) == 1
    assert not (tmp_path / "runs").exists()  # nothing half-written


def test_nan_loss_stops_with_the_step_and_last_good_checkpoint(tiny, tmp_path):
    result, out = _invoke("train", "sft", "--student", str(tiny / "student"), "--data", str(tiny / "train4.jsonl"),
                          "--output-dir", str(tmp_path), "--set", "learning_rate=1e30", "--set", "batch_size=4",
                          "--set", "save_steps=1", "--set", "max_steps=6", "--set", "prompt_style=compact",
                          "--set", "warmup_ratio=0", "--set", "max_grad_norm=0")
    assert result.exit_code == 2, out
    assert "The loss became" in out and "at step " in out and "Traceback" not in out
    step = int(out.split("at step ")[1].split(" ")[0])
    assert step >= 2
    # nothing was logged before the loss overflowed, so no checkpoint is known to be sound: a fresh run
    assert "no checkpoint before the divergence was kept" in out
    assert "--run-name sft-seed1-lr1e+29 --set learning_rate=1e+29" in out
    assert json.loads((tmp_path / "sft-seed1" / "run.json").read_text())["status"] == "failed"


def test_hub_spec_parsing():
    from kdbench.errors import ConfigError
    from kdbench.train.data_sources import parse_hub_spec

    spec = parse_hub_spec("hf://org/data@0123abcd:validation")
    assert (spec.repo, spec.revision, spec.split) == ("org/data", "0123abcd", "validation")
    assert parse_hub_spec("hf://org/data@v1.0").split == "train"
    with pytest.raises(ConfigError):
        parse_hub_spec("hf://org@v1")


def test_plain_text_corpus_blocks(tiny, tmp_path):
    from kdbench.models import load_tokenizer
    from kdbench.train.data_sources import load_text_corpus

    tokenizer = load_tokenizer(tiny / "student")
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("bako lives in elmel .\n\ntatemi lives in elmel .\n\n")
    blocks = load_text_corpus(corpus, tokenizer, block_size=4)
    stream = [t for b in blocks for t in b]
    expected = (tokenizer("bako lives in elmel .", add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
                + tokenizer("tatemi lives in elmel .", add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id])
    assert stream == expected and all(len(b) <= 4 for b in blocks)


def test_lm_term_is_weighted_token_mean(tiny, tmp_path):
    """sft + lm_weight × LM loss: the logged components add up to the logged loss."""
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": f"person {i} lives in elmel ."}) + "\n" for i in range(9)))
    result = _train(tiny, tmp_path / "runs", method="sft", lm_data=str(corpus), lm_weight=0.25, batch_size=2,
                    grad_accum=2, max_steps=2, learning_rate=1e-3)
    log = [json.loads(line) for line in open(result.run.path / "train_log.jsonl") if '"loss"' in line]
    for record in log:
        assert record["loss"] == pytest.approx(record["loss_per_token"] + 0.25 * record["lm_ce_per_token"], rel=1e-5)
    assert result.cost["lm_tokens"] > 0


def test_lm_term_gradient_is_the_weighted_lm_token_mean(tiny, tmp_path):
    """One SGD step of sft + lm_weight × LM: the update is −lr × ∇[CE token mean on the gold batch + w × CE
    token mean over the LM corpus's tokens] (computed here with plain torch; the corpus is one block, which
    every row of the step's LM batch repeats)."""
    from transformers import AutoModelForCausalLM

    from kdbench.data import load_examples, tokenize_example
    from kdbench.models import load_tokenizer

    lr, weight = 0.5, 0.25
    docs = [f"person {i} lives in elmel ." for i in range(5)]
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    result = _train(tiny, tmp_path / "runs", method="sft", data=str(tiny / "train4.jsonl"), lm_data=str(corpus),
                    lm_weight=weight, optim="sgd", learning_rate=lr, batch_size=4, max_steps=1, max_grad_norm=0.0)
    tokenizer = load_tokenizer(tiny / "student")
    student = AutoModelForCausalLM.from_pretrained(str(tiny / "student"), torch_dtype=torch.float64)

    def ce_sum_and_count(ids: list[int], first: int) -> tuple[torch.Tensor, int]:
        log_probs = torch.log_softmax(student(input_ids=torch.tensor([ids])).logits[0, :-1], -1)
        positions = list(range(first, len(ids) - 1))
        return -sum(log_probs[t, ids[t + 1]] for t in positions), len(positions)

    gold_sum, gold_count = torch.zeros((), dtype=torch.float64), 0
    for example in load_examples(tiny / "train4.jsonl"):
        item = tokenize_example(example, tokenizer, style="compact", max_prompt_length=256, max_length=512)
        s, c = ce_sum_and_count(item.input_ids, item.prompt_length - 1)
        gold_sum, gold_count = gold_sum + s, gold_count + c
    block = [t for d in docs for t in tokenizer(d, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]]
    lm_sum, lm_count = ce_sum_and_count(block, 0)
    loss = gold_sum / gold_count + weight * lm_sum / lm_count
    step = [json.loads(line) for line in open(result.run.path / "train_log.jsonl") if '"loss"' in line][0]
    assert step["loss"] == pytest.approx(float(loss.detach()), rel=1e-5)
    trained = _params(result.model_dir)
    names = [n for n, _ in student.named_parameters() if n in trained]
    grads = torch.autograd.grad(loss, [dict(student.named_parameters())[n] for n in names])
    initial = _params(tiny / "student")
    for name, grad in zip(names, grads):
        implied = (initial[name].double() - trained[name].double()) / lr
        torch.testing.assert_close(implied, grad, atol=2e-4 * float(grad.abs().max()) + 1e-7, rtol=2e-3)
