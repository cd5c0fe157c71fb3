"""Independent references for the wiring tests (tests/test_wiring_*.py, tests/test_invariance.py).

Every recipe's loss is recomputed here from its definition (../shared/spec/METHODS.md) with plain
torch / transformers on the frozen models and the batch, in float64, never through ``kdbench.losses``
or ``kdbench.train``. Only the batch's token ids come from ``kdbench.data.tokenize_example`` (the prompt
template is not what these tests pin). A recipe's settings (β, divergence, weights, temperature,
normalisation) are read from its resolved parameters, never hard-coded, so the references follow the
recipe files as they change.

The world: a small synthetic corpus; a teacher fine-tuned on it (it answers and ends with EOS); a
student fine-tuned briefly (it answers too, differently); an SFT student, a dSFT model and a DPO teacher
that each differ from every other model, so that swapping any two roles changes the loss or the
gradient.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from kdbench.synthetic.corpus import FILES
from tiny_models import build_tiny

STEP_LR = 1.0  # one plain SGD step: the update is exactly -STEP_LR × the gradient of the first-step loss
N_ROWS = 4
MAX_NEW_TOKENS = 24


@dataclass
class World:
    root: Path
    tokenizer: object
    batch: Path  # N_ROWS (instruction, input, output) rows
    prefs: Path  # N_ROWS (instruction, input, chosen, rejected) rows
    teacher: Path
    student: Path
    student_sft: Path
    dsft: Path
    dpo_teacher: Path


def _write(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _sft(root: Path, start: str, data: Path, name: str, steps: int, seed: int) -> Path:
    from kdbench.train import TrainConfig, train

    result = train(TrainConfig(method="sft", student=str(root / start), data=str(data), valid_data=str(data),
                               output_dir=str(root / "runs"), run_name=name, max_steps=steps, batch_size=8,
                               learning_rate=1e-2, warmup_ratio=0.0, lr_scheduler="constant", prompt_style="compact",
                               save_steps=1000, logging_steps=100, seed=seed, cache_dir=str(root / "cache")),
                   progress=False)
    return result.model_dir


def _perturbed(source: Path, target: Path, seed: int, scale: float) -> Path:
    """A copy of ``source`` with seeded Gaussian noise on every weight (a distinct, still sharp model)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(source))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn(param.shape, generator=generator) * scale * param.detach().abs().mean())
    model.save_pretrained(str(target))
    AutoTokenizer.from_pretrained(str(source)).save_pretrained(str(target))
    return target


def build_world(root: Path) -> World:
    corpus, tokenizer = build_tiny(root, teacher_name="teacher-init", student_name="student-init")
    labelled = [json.loads(line) for line in open(corpus / FILES["student_train"])]
    rows, others = labelled[:N_ROWS], labelled[N_ROWS:3 * N_ROWS]
    prefs = [json.loads(line) for line in open(corpus / FILES["preferences"])][:N_ROWS]
    batch = _write(root / "batch.jsonl", [{k: r[k] for k in ("instruction", "input", "output")} for r in rows])
    prefs_file = _write(root / "prefs.jsonl", [{k: r[k] for k in ("instruction", "input", "chosen", "rejected")}
                                               for r in prefs])
    # the models learn the task on other prompts: on the batch's prompts they answer in their own words
    sft_file = _write(root / "sft.jsonl", [{k: r[k] for k in ("instruction", "input", "output")} for r in others]
                      + [{"instruction": r["instruction"], "input": r["input"], "output": r["chosen"]} for r in prefs])
    teacher = _sft(root, "teacher-init", sft_file, "teacher", steps=30, seed=1)
    student = _sft(root, "student-init", sft_file, "student", steps=20, seed=1)
    student_sft = _perturbed(student, root / "student-sft", seed=11, scale=0.05)
    dsft = _perturbed(student, root / "dsft", seed=12, scale=0.3)
    dpo_teacher = _perturbed(teacher, root / "dpo-teacher", seed=13, scale=0.3)
    return World(root, tokenizer, batch, prefs_file, teacher, student, student_sft, dsft, dpo_teacher)


# ------------------------------------------------------------------------------------------ runs
def run(world: World, out: Path, method: str, data: Path, params: dict | None = None, **settings):
    """``kdbench.train.train`` as the CLI calls it: by default one plain SGD step (lr STEP_LR, no clipping,
    no warmup) on the whole file as one batch."""
    from kdbench.train import TrainConfig, train

    values = dict(method=method, student=str(world.student), teacher=str(world.teacher), data=str(data),
                  valid_data=str(data), output_dir=str(out), max_steps=1, batch_size=N_ROWS, optim="sgd",
                  learning_rate=STEP_LR, max_grad_norm=0.0, warmup_ratio=0.0, lr_scheduler="constant",
                  prompt_style="compact", logging_steps=1, save_steps=1000, seed=3, generation_batch_size=64,
                  cache_dir=str(Path(out) / "cache"), params=dict(params or {}))
    values.update(settings)
    return train(TrainConfig(**values), progress=False)


def logged(result, step: int = 1) -> dict:
    rows = [json.loads(line) for line in open(result.run.path / "train_log.jsonl")]
    return next(r for r in rows if r.get("step") == step and "loss" in r)


def resolved(method: str, overrides: dict | None = None) -> dict:
    """The recipe's parameters with the overrides, as the trainer resolves them."""
    from kdbench.train.recipes import resolve_recipe

    return resolve_recipe(method, dict(overrides or {})).params


def lm_weight(method: str, settings: dict | None = None) -> float:
    """The LM term's weight of a run: its ``lm_weight`` setting, else the recipe's ``lm.weight``."""
    from kdbench.train.recipes import resolve_recipe

    given = (settings or {}).get("lm_weight")
    return float(resolve_recipe(method).lm.weight if given is None else given)


def load64(path) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(path), torch_dtype=torch.float64)
    model.eval()
    return model


def saved_parameters(path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(Path(path) / "model.safetensors"))


def assert_one_sgd_step(start, trained, model64, loss64, lr: float = STEP_LR) -> None:
    """The trained checkpoint is ``start`` − lr × ∇``loss64`` (``loss64`` computed on ``model64``, a float64
    copy of ``start``): the trainer's gradient is the reference's, not only its loss."""
    before, after = saved_parameters(start), saved_parameters(trained)
    named = dict(model64.named_parameters())
    names = [n for n in after if n in named and named[n].requires_grad]
    grads = torch.autograd.grad(loss64, [named[n] for n in names], allow_unused=True)
    scale = max(float(g.abs().max()) for g in grads if g is not None)
    assert scale > 0
    for name, grad in zip(names, grads):
        expected = torch.zeros_like(named[name]) if grad is None else grad
        implied = (before[name].double() - after[name].double()) / lr
        torch.testing.assert_close(implied, expected, atol=2e-4 * scale, rtol=2e-3, msg=lambda m: f"{name}: {m}")


# ------------------------------------------------------------------------------------------ batches
def example(row: dict):
    from kdbench.data import Example

    return Example(instruction=row["instruction"], input=row.get("input", ""), output=row.get("output", ""))


def rows_of(path: Path) -> list[dict]:
    return [json.loads(line) for line in open(path) if line.strip()]


def tokenized(tokenizer, row: dict, response: str, finished: bool = True) -> tuple[list[int], list[int]]:
    """(ids, labels) of prompt + response (+ EOS when the response ended with one, METHODS.md / issue 14:
    a response cut at max_new_tokens carries none)."""
    from kdbench.data import tokenize_example

    item = tokenize_example(example(row), tokenizer, style="compact", max_prompt_length=256, max_length=512,
                            response=response)
    ids, labels = list(item.input_ids), list(item.labels)
    if not finished:  # tokenize_example always appends EOS
        ids, labels = ids[:-1], labels[:-1]
    return ids, labels


def pad(rows: list[tuple[list[int], list[int]]], pad_id: int) -> dict:
    longest = max(len(ids) for ids, _ in rows)
    input_ids = torch.full((len(rows), longest), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), longest), -100, dtype=torch.long)
    attention = torch.zeros((len(rows), longest), dtype=torch.long)
    for i, (ids, lab) in enumerate(rows):
        input_ids[i, :len(ids)] = torch.tensor(ids)
        labels[i, :len(lab)] = torch.tensor(lab)
        attention[i, :len(ids)] = 1
    return {"input_ids": input_ids, "labels": labels, "attention_mask": attention}


def shifted_logits(model, batch: dict, vocab: int) -> torch.Tensor:
    """[B, L-1, vocab] float64 logits; position t predicts token t+1."""
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return out[:, :-1, :vocab].to(torch.float64)


def targets_mask(batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    targets = batch["labels"][:, 1:]
    return targets, (targets != -100)


def gathered(log_probs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return log_probs.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)


def sequence_logps(logits: torch.Tensor, batch: dict) -> torch.Tensor:
    """[B] summed log-probs of the labelled tokens."""
    targets, mask = targets_mask(batch)
    return (gathered(torch.log_softmax(logits, -1), targets) * mask).sum(-1)


def response_lengths(batch: dict) -> torch.Tensor:
    return targets_mask(batch)[1].sum(-1).to(torch.float64)


def greedy_responses(model_dir, tokenizer, rows: list[dict], max_new_tokens: int) -> list[tuple[str, bool]]:
    """(text, finished) per row: transformers' own greedy ``generate`` from the row's prompt (one row at a
    time, no padding), decoded without special tokens."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_dir))
    model.eval()
    eos = tokenizer.eos_token_id
    out = []
    for row in rows:
        from kdbench.data import tokenize_example

        item = tokenize_example(example(row), tokenizer, style="compact", max_prompt_length=256, max_length=512,
                                response="")
        prompt = list(item.input_ids[:item.prompt_length])
        room = min(max_new_tokens, model.config.n_positions - len(prompt))
        with torch.no_grad():
            generated = model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                                       max_new_tokens=room, do_sample=False, eos_token_id=eos,
                                       pad_token_id=tokenizer.pad_token_id)
        new = generated[0, len(prompt):].tolist()
        finished = eos in new
        if finished:
            new = new[:new.index(eos)]
        out.append((tokenizer.decode(new, skip_special_tokens=True).strip(), finished))
    return out


# ------------------------------------------------------------------------------------------ divergences
def kl(log_a: torch.Tensor, log_b: torch.Tensor) -> torch.Tensor:
    """Σ_v a (log a − log b) per row; a = 0 contributes 0."""
    a = log_a.exp()
    return torch.where(a > 0, a * (log_a - log_b), torch.zeros_like(a)).sum(-1)


def log_mix(log_a, log_b, weight_a: float):
    """log(w·a + (1−w)·b), in log space."""
    return torch.logaddexp(log_a + math.log(weight_a), log_b + math.log(1 - weight_a))


def divergence_rows(name: str, log_p: torch.Tensor, log_q: torch.Tensor, extra: dict) -> torch.Tensor:
    """Per-position divergence of the student q from the teacher p (METHODS.md, "Token-level divergences")."""
    p, q = log_p.exp(), log_q.exp()
    if name == "fkl":
        return kl(log_p, log_q)
    if name == "rkl":
        return kl(log_q, log_p)
    if name == "fkl_rkl":
        w = float(extra.get("weight", 0.5))
        return w * kl(log_p, log_q) + (1 - w) * kl(log_q, log_p)
    if name == "jsd":
        beta = float(extra.get("beta", 0.5))
        if beta == 0:
            return kl(log_p, log_q)
        if beta == 1:
            return kl(log_q, log_p)
        log_m = log_mix(log_p, log_q, beta)
        return beta * kl(log_p, log_m) + (1 - beta) * kl(log_q, log_m)
    if name == "tvd":
        return 0.5 * (p - q).abs().sum(-1)
    if name == "skl":
        alpha = float(extra.get("alpha", 0.1))
        return kl(log_p, log_mix(log_p, log_q, alpha))
    if name == "srkl":
        alpha = float(extra.get("alpha", 0.1))
        return kl(log_q, log_mix(log_p, log_q, 1 - alpha))
    if name in ("akl", "akl_r"):
        mu = float(extra.get("mu", 0.5))
        assert extra.get("head_rule", "paper") == "paper", "the reference implements the paper's head rule"
        order = p.argsort(-1, descending=True)
        sorted_p = p.gather(-1, order)
        before = sorted_p.cumsum(-1) - sorted_p  # mass strictly before each token in the sorted order
        head_sorted = before < mu  # the smallest prefix whose cumulative mass reaches mu (Eq. 12)
        head = torch.zeros_like(head_sorted).scatter(-1, order, head_sorted)
        gap = (p - q.detach()).abs()
        g_head = (gap * head).sum(-1)
        g_tail = (gap * ~head).sum(-1)
        w_head = g_head / (g_head + g_tail + 1e-12)
        w_fkl = w_head if name == "akl" else 1 - w_head  # AKL-r swaps the weights (Eq. 16)
        return w_fkl * kl(log_p, log_q) + (1 - w_fkl) * kl(log_q, log_p)
    raise AssertionError(f"no reference for divergence {name!r}")


def divergence_of(params: dict) -> str:
    return str(params["divergence"])


def token_kd_loss(params: dict, student_logits, teacher_logits, targets, mask) -> torch.Tensor:
    """(1−r)·CE + r·D (``kd_weighting: mix``) or CE + r·D (``additive``), token mean over the batch; τ divides
    both models' logits in D (τ² optional); CE is on the untempered student."""
    tau = float(params.get("temperature", 1.0))
    ce = -gathered(torch.log_softmax(student_logits, -1), targets)
    div = divergence_rows(divergence_of(params), torch.log_softmax(teacher_logits / tau, -1),
                          torch.log_softmax(student_logits / tau, -1), params.get("divergence_params") or {})
    if params.get("temperature_squared"):
        div = div * tau ** 2
    ratio = float(params["kd_ratio"])
    per_token = (1 - ratio) * ce + ratio * div if params["kd_weighting"] == "mix" else ce + ratio * div
    return (per_token * mask).sum() / mask.sum()


def ce_mean(student_logits, targets, mask) -> torch.Tensor:
    return (-gathered(torch.log_softmax(student_logits, -1), targets) * mask).sum() / mask.sum()


def log_sigmoid(x):
    return torch.nn.functional.logsigmoid(x)
