"""Every token-level recipe on tiny models: it overfits one batch (the loss falls by a set factor), the
teacher's parameters do not change and get no gradient, every student parameter gets one, and the
optimizer holds the student's parameters only."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import TrainerCallback

from kdbench.synthetic.corpus import FILES
from tiny_models import build_tiny

RECIPES = ["sft", "kd", "rkl", "fkl_rkl", "jsd", "tvd", "skl", "srkl", "akl", "akl_r", "seqkd", "gkd"]
FACTOR = 0.5  # the mean loss of the last 3 steps must be below FACTOR × that of the first 3


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A student, and a teacher fine-tuned on the batch (so that every divergence has something to match)."""
    from kdbench.train import TrainConfig, train

    root = tmp_path_factory.mktemp("recipes")
    corpus, tokenizer = build_tiny(root, teacher_name="teacher-init")
    rows = [json.loads(line) for line in open(corpus / FILES["student_train"])][:4]
    (root / "batch.jsonl").write_text("".join(json.dumps({k: r[k] for k in ("instruction", "input", "output")}) + "\n"
                                              for r in rows))
    teacher = train(TrainConfig(method="sft", student=str(root / "teacher-init"), data=str(root / "batch.jsonl"),
                                valid_data=str(root / "batch.jsonl"), output_dir=str(root / "runs"), run_name="teacher",
                                max_steps=40, batch_size=4, learning_rate=1e-2, warmup_ratio=0.0, prompt_style="compact",
                                lr_scheduler="constant", save_steps=1000, logging_steps=10), progress=False)
    (root / "teacher").symlink_to(teacher.model_dir)
    return root


class GradientCheck(TrainerCallback):
    """Before each optimizer step: every student parameter has a finite gradient, and the optimizer
    updates exactly the student's parameters."""

    def __init__(self):
        self.checked = 0

    def on_pre_optimizer_step(self, args, state, control, model=None, optimizer=None, **kwargs):
        student = {id(p) for p in model.parameters()}
        in_optimizer = {id(p) for group in optimizer.param_groups for p in group["params"]}
        assert in_optimizer == student
        for name, param in model.named_parameters():
            assert param.grad is not None and torch.isfinite(param.grad).all(), name
        self.checked += 1
        return control


@pytest.mark.parametrize("method", RECIPES)
def test_recipe_overfits_one_batch_and_leaves_the_teacher_alone(tiny, tmp_path, method):
    from safetensors.torch import load_file

    from kdbench.train import TrainConfig, train

    check = GradientCheck()
    steps = 60 if method == "gkd" else 24  # JSD saturates near log 2 when the two models disagree: slower start
    params = {"max_new_tokens": 24} if method in ("seqkd", "gkd") else {}
    if method == "gkd":
        # On the student's own samples there is no fixed batch to overfit (and a teacher fitted to 4 examples is
        # erratic off them): the overfit criterion runs GKD's loss on the gold batch (λ = 0); the on-policy path
        # is checked by test_on_policy_batch_is_the_students_sample and the CLI test.
        params["on_policy_fraction"] = 0.0
    result = train(TrainConfig(method=method, student=str(tiny / "student"), teacher=str(tiny / "teacher"),
                               data=str(tiny / "batch.jsonl"), valid_data=str(tiny / "batch.jsonl"),
                               output_dir=str(tmp_path), max_steps=steps, batch_size=4, learning_rate=1e-2,
                               warmup_ratio=0.0, lr_scheduler="constant", prompt_style="compact", save_steps=1000,
                               logging_steps=1, params=params, cache_dir=str(tmp_path / "cache")),
                   progress=False, callbacks=[check])
    assert check.checked == steps
    log = [json.loads(line) for line in open(result.run.path / "train_log.jsonl")]
    losses = [r["loss"] for r in log if "loss" in r]
    assert len(losses) == steps and all(torch.isfinite(torch.tensor(losses)))
    first, last = sum(losses[:3]) / 3, sum(losses[-3:]) / 3
    if method == "gkd":  # the first step's loss is the JSD of the untrained student, computed independently
        assert losses[0] == pytest.approx(_initial_jsd(tiny), rel=1e-4)
    assert last < FACTOR * first, f"{method}: loss {first:.4f} -> {last:.4f}"

    teacher = result.teacher
    assert (teacher is None) == (method == "sft")  # sft never loads the teacher
    if teacher is not None:
        on_disk = load_file(str(tiny / "teacher" / "model.safetensors"))
        for name, param in teacher.named_parameters():
            assert not param.requires_grad and param.grad is None, name
            if name in on_disk:
                assert torch.equal(param.detach(), on_disk[name]), name
    cost = result.cost
    if method == "sft":
        assert cost["teacher_forward_tokens"] == 0 and cost["generated_tokens"] == 0
    elif method == "seqkd":
        assert cost["generated_tokens"] > 0 and cost["teacher_forward_tokens"] == 0
    elif method == "gkd":
        assert cost["generated_tokens"] == 0 and cost["on_policy_batches"] == 0  # λ = 0 here
        assert cost["teacher_forward_tokens"] == cost["tokens_processed"]
    else:
        assert cost["teacher_forward_tokens"] == cost["tokens_processed"] > 0


def _initial_jsd(tiny) -> float:
    """JSD(β = 0.5) of the untrained student to the teacher, token mean over the batch's responses."""
    from transformers import AutoModelForCausalLM

    from kdbench.data import PadCollator, build_dataset, load_examples
    from kdbench.losses import jsd
    from kdbench.models import load_tokenizer

    tokenizer = load_tokenizer(tiny / "student")
    dataset = build_dataset(load_examples(tiny / "batch.jsonl"), tokenizer, style="compact", max_prompt_length=256,
                            max_length=512)
    batch = PadCollator(tokenizer.pad_token_id)([dataset[i] for i in range(len(dataset))])
    with torch.no_grad():
        logits = [AutoModelForCausalLM.from_pretrained(str(tiny / name))(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
            for name in ("student", "teacher")]
    return float(jsd(logits[0], logits[1], batch["labels"][:, 1:] != -100, beta=0.5))


def test_on_policy_batch_is_the_students_sample(tiny, tmp_path):
    """GKD with λ = 1: every micro-batch's responses are the current student's samples (the same tokens
    HFBackend draws from the student with the batch's seed), the prompt is kept and masked, the sampled
    tokens (and EOS when sampled) are the labels, and the token count is of the sampled responses."""
    from kdbench.generate import HFBackend, example_seed
    from kdbench.train import TrainConfig, train
    from kdbench.train.data_sources import TrainCollator

    result = train(TrainConfig(method="gkd", student=str(tiny / "student"), teacher=str(tiny / "teacher"),
                               data=str(tiny / "batch.jsonl"), valid_data=str(tiny / "batch.jsonl"),
                               output_dir=str(tmp_path), max_steps=2, batch_size=4, prompt_style="compact",
                               save_steps=1000, logging_steps=1, params={"max_new_tokens": 12, "on_policy_fraction": 1.0},
                               cache_dir=str(tmp_path / "cache")),
                   progress=False)
    assert result.cost["on_policy_batches"] == 2 and result.cost["generated_tokens"] > 0
    trainer = result.trainer
    dataset = trainer.train_dataset
    batch = TrainCollator(trainer.gen_tokenizer.pad_token_id)([dataset[i] for i in range(len(dataset))])
    out = trainer.sampling.transform(trainer, dict(batch), 0)
    backend = HFBackend(trainer.model, trainer.gen_tokenizer)
    key = f"{trainer.sampling.seed}/{trainer.state.global_step}/0/0"
    prompts = [batch["input_ids"][r, :int(batch["prompt_length"][r])].tolist() for r in range(4)]
    expected = backend.generate_ids(prompts, [f"{i}@{trainer.state.global_step}" for i in range(4)],
                                    trainer.sampling.decoding, seed=example_seed(trainer.sampling.seed, key) % 2**31)
    for row, (prompt, generated) in enumerate(zip(prompts, expected)):
        response = generated.with_eos()  # the sampled tokens and the EOS id the student emitted, if it ended
        n = len(prompt) + len(response)
        assert out["input_ids"][row, :n].tolist() == prompt + response
        assert out["labels"][row, :n].tolist() == [-100] * len(prompt) + response
        assert (out["labels"][row, n:] == -100).all() and out["attention_mask"][row].sum() == n
