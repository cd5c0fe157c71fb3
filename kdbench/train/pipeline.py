"""Sequence-level preference pipelines: dDPO, rDPO, daDPO (dadpo.md Alg. 1) and DPO / SimPO on a file.

``kdbench train ddpo|rdpo|dadpo`` runs these stages, each an artifact of the store (keyed by its
inputs) and recorded in the run's ``stages.json``, so a rerun — or another method on the same
data — resumes or reuses stage by stage ("reusing cached ... artifact" in the log):

1. ``generate``: y_t = the teacher's greedy output on every training prompt (the same artifact as
   the ``dsft`` / ``seqkd`` generation stage) and y_s = the *original* student's greedy output
   (``student-generations``). One pair (chosen y_t, rejected y_s) per prompt.
2. ``dsft``: the student fine-tuned on (x, y_t) with the ``dsft`` recipe (``dsft-model``
   artifact), unless ``params.dsft_model`` names a ready checkpoint. It is the policy's
   starting point and the frozen reference.
3. ``logprobs``: summed log-probs of chosen and rejected under the frozen reference and/or the
   teacher, computed once (``sequence-logprobs`` artifact, one per model and tokenized pair set).
   Each model scores the response *text* with its own tokenizer and prompt template, so the teacher
   may have another vocabulary than the student.
4. ``train``: :class:`PreferenceTrainer` — the policy's log-probs in the step
   (:func:`kdbench.losses.sequence.sequence_logps`), the recipe's preference loss
   (:mod:`kdbench.train.objectives`, ``preference``), mean over all pairs of the optimizer step.

``pairs: file`` recipes (``dpo``, ``simpo``) read (prompt, chosen, rejected) from ``--data``
(fields ``instruction`` or ``prompt``, optional ``input``, ``chosen``, ``rejected``); DPO's
reference is the frozen initial student.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from kdbench.config import to_dict
from kdbench.errors import ConfigError, DataError
from kdbench.store import RunDir, atomic_write_json, atomic_write_text, hash_obj
from kdbench.train.engine import DistillTrainer, take_batches
from kdbench.train.objectives import PairBatch, preference_reference

#: TrainConfig fields that do not change what a dSFT stage produces (left out of its artifact key).
_NOT_IN_DSFT_KEY = ("output_dir", "run_name", "cache_dir", "report_to", "method", "params")


@dataclass
class Pair:
    """One preference pair: the prompt's example (``output`` unused), chosen and rejected texts."""

    example: object  # kdbench.data.Example
    chosen: str
    rejected: str


def load_preference_pairs(path: str | Path) -> list[Pair]:
    """(prompt, chosen, rejected) rows of a JSONL / JSON / Parquet preference file."""
    from kdbench.data import Example, read_rows

    rows = read_rows(path)
    if not rows:
        raise DataError(f"{path} holds no records; give a preference file with at least one pair.")
    pairs = []
    for number, row in enumerate(rows, start=1):
        instruction = row.get("instruction", row.get("prompt"))
        chosen, rejected = row.get("chosen"), row.get("rejected")
        if not isinstance(instruction, str) or not instruction.strip():
            raise DataError(f"{path}, record {number} has no 'instruction' (or 'prompt') text; every pair needs one.")
        if not (isinstance(chosen, str) and chosen.strip() and isinstance(rejected, str) and rejected.strip()):
            raise DataError(f"{path}, record {number} has no 'chosen' and 'rejected' texts; preference methods need "
                            "a file with chosen and rejected responses for every prompt.")
        input_text = row.get("input") or ""
        if not isinstance(input_text, str):
            raise DataError(f"{path}, record {number} has a non-text 'input'; it must be a string.")
        example = Example(instruction=instruction, input=input_text, output="", id=str(row.get("id", row.get("key", number - 1))))
        pairs.append(Pair(example, chosen, rejected))
    return pairs


# ------------------------------------------------------------------------------------------ tokenized pairs
def tokenize_pairs(pairs: list[Pair], tokenizer, *, style: str, max_prompt_length: int, max_length: int) -> list[dict]:
    """Per pair: chosen and rejected as prompt + response + EOS with ``tokenizer`` (labels −100 on the prompt)."""
    from kdbench.data import tokenize_example

    out = []
    for pair in pairs:
        row = {}
        for side in ("chosen", "rejected"):
            item = tokenize_example(pair.example, tokenizer, style=style, max_prompt_length=max_prompt_length,
                                    max_length=max_length, response=getattr(pair, side))
            row[side] = (item.input_ids, item.labels)
        out.append(row)
    return out


def _pad(sequences: list[tuple[list[int], list[int]]], pad_token_id: int) -> dict:
    from kdbench.data import PadCollator

    return PadCollator(pad_token_id)([{"input_ids": ids, "labels": labels} for ids, labels in sequences])


def frozen_sequence_logps(model, tokenized: list[dict], pad_token_id: int, batch_size: int) -> dict:
    """Summed log-probs of every chosen and rejected response under a frozen ``model``: {"chosen": [P],
    "rejected": [P]} lists of floats (float32 math, eval mode, no gradient)."""
    from kdbench.losses.sequence import sequence_logps

    was_training = model.training
    model.eval()
    out = {"chosen": [], "rejected": []}
    device = next(model.parameters()).device
    try:
        with torch.no_grad():
            for side in ("chosen", "rejected"):
                for start in range(0, len(tokenized), batch_size):
                    batch = _pad([row[side] for row in tokenized[start:start + batch_size]], pad_token_id)
                    logits = model(input_ids=batch["input_ids"].to(device),
                                   attention_mask=batch["attention_mask"].to(device)).logits
                    logps = sequence_logps(logits[:, :-1], batch["labels"][:, 1:].to(device))
                    out[side].extend(float(v) for v in logps)
    finally:
        model.train(was_training)
    return out


def cached_logps(store, kind_label: str, model_name: str, model_loader: Callable, tokenizer, pairs: list[Pair],
                 config, say) -> tuple[dict, dict]:
    """:func:`frozen_sequence_logps` of ``model_name`` on ``pairs`` through the artifact store (its own
    tokenizer and prompt template). Returns (logps, facts)."""
    from kdbench.teacher_cache import model_fingerprint

    tokenized = tokenize_pairs(pairs, tokenizer, style=config.prompt_style, max_prompt_length=config.max_prompt_length,
                               max_length=config.max_length)
    inputs = {"model": model_fingerprint(model_name), "sequences": hash_obj(tokenized)}

    def build(tmp: Path) -> dict:
        logps = frozen_sequence_logps(model_loader(), tokenized, tokenizer.pad_token_id, config.generation_batch_size)
        atomic_write_json(tmp / "logps.json", logps)
        return {"pairs": len(pairs), "forward_tokens": sum(len(r[s][0]) for r in tokenized for s in ("chosen", "rejected"))}

    say(f"{kind_label} sequence log-probs of {len(pairs)} pairs")
    artifact = store.get_or_build("sequence-logprobs", inputs, build, log=say)
    logps = json.loads((artifact.path / "logps.json").read_text())
    return logps, {"reused": artifact.reused, "path": str(artifact.path),
                   "build_seconds": artifact.meta.get("build_seconds", 0.0),
                   "forward_tokens": int(artifact.meta.get("forward_tokens", 0))}


# ------------------------------------------------------------------------------------------ the trainer
class PairDataset:
    """Tokenized pairs (student tokenizer) with their frozen log-probs; item i is pair i."""

    def __init__(self, tokenized: list[dict], frozen: dict[str, dict]):
        self.tokenized = tokenized
        self.frozen = frozen  # {"ref": {"chosen": [...], "rejected": [...]}, "teacher": {...}}

    def __len__(self) -> int:
        return len(self.tokenized)

    def __getitem__(self, index: int) -> dict:
        item = {"chosen": self.tokenized[index]["chosen"], "rejected": self.tokenized[index]["rejected"],
                "example_index": index}
        for name, logps in self.frozen.items():
            item[f"{name}_chosen"] = logps["chosen"][index]
            item[f"{name}_rejected"] = logps["rejected"][index]
        return item


class PairCollator:
    """P pairs → ``input_ids`` / ``labels`` / ``attention_mask`` [2P, L] (chosen rows first, then
    rejected), ``example_index`` [P] and the frozen log-prob columns [P] (float32)."""

    def __init__(self, pad_token_id: int):
        self.pad_token_id = pad_token_id

    def __call__(self, features: list[dict]) -> dict:
        batch = _pad([f["chosen"] for f in features] + [f["rejected"] for f in features], self.pad_token_id)
        batch["example_index"] = torch.tensor([f["example_index"] for f in features], dtype=torch.long)
        for key in features[0]:
            if key.endswith(("_chosen", "_rejected")):
                batch[key] = torch.tensor([f[key] for f in features], dtype=torch.float32)
        return batch


class PreferenceTrainer(DistillTrainer):
    """:class:`DistillTrainer` on preference pairs: the loss of a step is the mean over every pair of the
    optimizer step (all micro-batches and processes), like the token count of the token objectives."""

    def get_batch_samples(self, epoch_iterator, num_batches: int, device):
        batch_samples = take_batches(epoch_iterator, num_batches)
        if not batch_samples:
            return batch_samples, None
        total = torch.tensor([float(sum(b["example_index"].numel() for b in batch_samples))], dtype=torch.float64,
                             device=device)
        if self.accelerator.num_processes > 1:
            total = self.accelerator.reduce(total, reduction="sum")
        return batch_samples, total[0].to(torch.float32)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        from kdbench.errors import TrainingError
        from kdbench.losses.sequence import sequence_logps
        from kdbench.train.engine import complete_checkpoints

        n_pairs = inputs["example_index"].numel()
        outputs = model(input_ids=inputs["input_ids"], attention_mask=inputs.get("attention_mask"))
        targets = inputs["labels"][:, 1:]
        logps = sequence_logps(outputs.logits[:, :-1], targets)  # [2P]
        lengths = (targets != -100).sum(-1)
        pairs = PairBatch(logps[:n_pairs], logps[n_pairs:], lengths[:n_pairs], lengths[n_pairs:],
                          ref_chosen=inputs.get("ref_chosen"), ref_rejected=inputs.get("ref_rejected"),
                          teacher_chosen=inputs.get("teacher_chosen"), teacher_rejected=inputs.get("teacher_rejected"))
        parts = self.objective.fn(pairs, self.params)
        if num_items_in_batch is None:
            denominator = torch.tensor(float(n_pairs), device=logps.device)
        else:
            denominator = torch.as_tensor(num_items_in_batch, dtype=torch.float32, device=logps.device).clamp(min=1)
        loss = parts["loss"] / denominator
        if not torch.isfinite(loss.detach()):
            checkpoints = complete_checkpoints(self.args.output_dir)
            last = str(checkpoints[-1]) if checkpoints else "none (no checkpoint was saved yet)"
            raise TrainingError(f"The loss became {loss.item()} at step {self.state.global_step + 1}; the last good "
                                f"checkpoint is {last}. Lower the learning rate or check the data, then rerun the same "
                                "command to resume.")
        if model.training:
            for name, value in parts.items():
                self._window[name] = self._window.get(name, 0.0) + float(value.detach())
            self._window["_pairs"] = self._window.get("_pairs", 0.0) + n_pairs
            self.counters["tokens_processed"] += int(inputs["attention_mask"].sum())
            self.counters["response_tokens"] += int(lengths.sum())
        if num_items_in_batch is not None and self.accelerator.num_processes > 1:
            loss = loss * self.accelerator.num_processes  # DDP averages gradients; the denominator counts all pairs
        return (loss, outputs) if return_outputs else loss

    def log(self, logs: dict, start_time: float | None = None) -> None:
        if "loss" in logs and self._window:
            window = self._reduced_window()
            n_pairs = max(window.pop("_pairs", 0.0), 1.0)
            for name, total in window.items():
                logs[f"{name}_per_pair"] = total / n_pairs
            logs["pairs"] = int(n_pairs)
            self._window = {}
        super(DistillTrainer, self).log(logs, start_time)


# ------------------------------------------------------------------------------------------ stages
def _dsft_stage(config, params: dict, store, run: RunDir, say) -> tuple[Path, dict]:
    """The dSFT checkpoint: ``params.dsft_model`` if given, else the ``dsft`` recipe trained once per
    (student, teacher, data, settings) in the artifact store (its run lives under the run's
    ``stages/`` folder while it trains, so a killed dSFT resumes from its checkpoints)."""
    import dataclasses

    from kdbench.store import hash_file
    from kdbench.teacher_cache import model_fingerprint
    from kdbench.train.api import TrainConfig, train

    if params.get("dsft_model"):
        path = Path(str(params["dsft_model"]))
        if not (path / "config.json").is_file():
            raise ConfigError(f"params.dsft_model {path} is not a model directory; give a dSFT checkpoint folder "
                              "(with config.json) or leave it empty to train one.")
        say(f"using the given dSFT model {path}")
        return path, {"given": str(path)}
    generation = {k: params[k] for k in ("greedy", "generation_temperature", "top_p", "top_k", "max_new_tokens",
                                          "generation_seed")}
    settings = {f.name: getattr(config, f.name) for f in dataclasses.fields(config)}
    settings.update(dict(params.get("dsft_settings") or {}))
    unknown = sorted(set(params.get("dsft_settings") or {}) - set(settings))
    if unknown:
        raise ConfigError(f"params.dsft_settings has {unknown[0]!r}, which is not a training setting.")
    settings.update(method="dsft", params=generation, output_dir=str(run.path / "stages"), run_name="dsft",
                    select="last")
    dsft_config = TrainConfig(**settings)
    data_path = Path(config.data)
    inputs = {"student": model_fingerprint(config.student), "teacher": model_fingerprint(config.teacher),
              "data": hash_file(data_path) if data_path.is_file() else config.data,
              "valid_data": (hash_file(config.valid_data) if config.valid_data and Path(config.valid_data).is_file()
                             else config.valid_data),
              "settings": {k: v for k, v in to_dict(dsft_config).items() if k not in _NOT_IN_DSFT_KEY},
              "params": generation}

    def build(tmp: Path) -> dict:
        result = train(dsft_config, log=say, progress=False)
        shutil.copytree(result.model_dir, tmp / "model")
        shutil.rmtree(run.path / "stages" / "dsft", ignore_errors=True)
        return {"optimizer_steps": result.cost.get("optimizer_steps"), "final_train_loss": result.final_train_loss}

    say("dSFT stage (the dsft recipe on the teacher's greedy outputs)")
    artifact = store.get_or_build("dsft-model", inputs, build, log=say)
    return artifact.path / "model", {"reused": artifact.reused, "path": str(artifact.path),
                                     "build_seconds": artifact.meta.get("build_seconds", 0.0)}


def train_preference(config, entry, params: dict, *, log: Callable[[str], None] | None = None,
                     command: list[str] | None = None, progress: bool = True, callbacks: list | None = None):
    """Run a ``objective: preference`` recipe end to end (module docstring); returns a
    :class:`kdbench.train.api.TrainResult`."""
    from kdbench.data import load_examples
    from kdbench.models import count_parameters, load_model, load_tokenizer
    from kdbench.store import ArtifactStore
    from kdbench.train.api import (Stages, TrainResult, _decoding, _model_card, finished_result, require_inputs,
                                   _save_model_atomically,
                                   _split_validation, _teacher_generations, training_arguments)
    from kdbench.train.data_sources import resolve_data_path
    from kdbench.train.engine import RichProgressCallback, RunLogCallback, Stopwatch, peak_memory_mb, train_resuming
    from kdbench.train.objectives import get_objective

    say = log or (lambda message: None)
    clock = Stopwatch()
    source = entry.body.get("pairs")
    if source not in ("distill", "file"):
        raise ConfigError(f"Recipe {entry.path.name} has pairs {source!r}; use distill or file.")
    reference = preference_reference(params)
    if source == "file" and reference == "dsft":
        raise ConfigError(f"Method {config.method} reads pairs from a file, so its reference cannot be the dSFT model; "
                          "use params.reference=student or teacher.")
    needs_teacher = source == "distill" or reference == "teacher"
    require_inputs(config, needs_teacher)
    if config.select != "last":
        raise ConfigError(f"Method {config.method} has no validation metric yet; use select=last.")
    objective = get_objective("preference")
    store = ArtifactStore(config.cache_dir)

    data_path = resolve_data_path(config.data, store=store, log=say)
    if source == "file":
        pairs = load_preference_pairs(data_path)
        prompts = [p.example for p in pairs]
    else:
        prompts = load_examples(data_path, require_output=False)
    if not config.valid_data:  # the same split as train() makes for the dSFT stage: the same training prompts
        kept = {id(e) for e in _split_validation(prompts, config.valid_fraction, config.seed)[0]}
        prompts = [e for e in prompts if id(e) in kept]
        if source == "file":
            pairs = [p for p in pairs if id(p.example) in kept]
    tokenizer = load_tokenizer(config.student)
    teacher_tokenizer = load_tokenizer(config.teacher) if needs_teacher else None
    decoding = _decoding(config, params, "teacher") if source == "distill" else None

    run = RunDir.create(config.output_dir, config.run_name or f"{config.method}-seed{config.seed}", kind="train",
                        config={**to_dict(config), "params": params, "recipe": entry.name,
                                "recipe_file": entry.path.name, "objective": "preference", "pairs": source},
                        command=command or sys.argv)
    model_dir = run.path / "model"
    if (finished := finished_result(run, say)) is not None:
        return finished
    stages = Stages(run)
    extra_cost: dict = {"generated_tokens": 0, "frozen_forward_tokens": 0}
    teacher_holder: dict = {}

    def teacher_model():
        if "model" not in teacher_holder:
            teacher_holder["model"] = load_model(config.teacher, trainable=False, dtype=config.teacher_dtype)
        return teacher_holder["model"]

    if source == "distill":
        # Stage: generations (y_t: teacher, y_s: the original student), each cached
        teacher_outputs, t_facts = _teacher_generations(config, params, decoding, _Lazy(teacher_model),
                                                        teacher_tokenizer, prompts, run, store, say)
        student_outputs, s_facts = _teacher_generations(config, params, decoding, _Lazy(lambda: load_model(
            config.student, trainable=False)), tokenizer, prompts, run, store, say, model_name=config.student,
            kind="student-generations")
        pairs = [Pair(e, t.output, s.output) for e, t, s in zip(prompts, teacher_outputs, student_outputs)]
        stages.mark("generate", {"teacher": t_facts, "student": s_facts})
        extra_cost["generated_tokens"] = t_facts["generated_tokens"] + s_facts["generated_tokens"]
        extra_cost["generation_reused"] = t_facts["reused"] and s_facts["reused"]
        # Stage: dSFT
        dsft_dir, d_facts = _dsft_stage(config, params, store, run, say)
        stages.mark("dsft", d_facts)
        extra_cost["dsft_reused"] = bool(d_facts.get("reused", True))
        policy_source = str(dsft_dir)
    else:
        policy_source = config.student

    # Stage: frozen sequence log-probs
    frozen: dict[str, dict] = {}
    facts: dict[str, dict] = {}
    uses_ref = params["loss"] == "dadpo" or (params["loss"] == "dpo" and reference in ("dsft", "student"))
    uses_teacher = params["loss"] == "dadpo" or reference == "teacher"
    if uses_ref:
        frozen["ref"], facts["ref"] = cached_logps(store, "reference (dSFT model)" if source == "distill" else "reference (initial student)", policy_source,
                                                   lambda: load_model(policy_source, trainable=False), tokenizer,
                                                   pairs, config, say)
    if uses_teacher:
        frozen["teacher"], facts["teacher"] = cached_logps(store, "teacher", config.teacher, teacher_model,
                                                           teacher_tokenizer, pairs, config, say)
    stages.mark("logprobs", facts)
    extra_cost["frozen_forward_tokens"] = sum(f["forward_tokens"] for f in facts.values())
    extra_cost["logprobs_reused"] = all(f["reused"] for f in facts.values())
    teacher_holder.clear()  # training never runs the teacher

    # Stage: preference training
    tokenized = tokenize_pairs(pairs, tokenizer, style=config.prompt_style, max_prompt_length=config.max_prompt_length,
                               max_length=config.max_length)
    run.log(f"method={config.method} pairs={len(pairs)} source={source} reference={reference}")
    checkpoints_dir = run.path / "checkpoints"
    # pairs have no single ``input_ids`` length to group by: the length-grouped sampler does not apply
    pair_config = dataclasses.replace(config, group_by_length=False) if config.group_by_length else config
    args = training_arguments(pair_config, checkpoints_dir, evaluate=False, eval_steps=config.save_steps)
    train_callbacks = [RunLogCallback(run.path / "train_log.jsonl")] + list(callbacks or [])
    if progress:
        train_callbacks.append(RichProgressCallback(f"train {config.method}"))
    trainer = PreferenceTrainer(model=load_model(policy_source), args=args,
                                train_dataset=PairDataset(tokenized, frozen), data_collator=PairCollator(tokenizer.pad_token_id),
                                callbacks=train_callbacks, objective=objective, params=params, tokenizer=tokenizer)
    output, resumed = train_resuming(trainer, run, checkpoints_dir, say)
    final_loss = output.training_loss if output is not None else None
    trainer.model.config.kdbench_prompt_style = config.prompt_style
    counters = trainer.cost_counters()
    cost = {
        "wall_seconds": clock.seconds, "train_seconds": counters["train_seconds"],
        "optimizer_steps": trainer.state.global_step, "tokens_processed": counters["tokens_processed"],
        "response_tokens_trained": counters["response_tokens"], "teacher_forward_tokens": 0,
        "train_pairs": len(pairs), **peak_memory_mb(), "student_parameters": count_parameters(trainer.model),
        "processes": trainer.accelerator.num_processes, "final_train_loss": final_loss, "selected": "last",
        "select_metric": None, "selected_checkpoint": None, "validation": None, "resumed": resumed,
        **extra_cost,
    }
    if trainer.is_world_process_zero():
        _save_model_atomically(trainer.model, tokenizer, model_dir)
        atomic_write_json(run.path / "cost.json", cost)
        atomic_write_text(model_dir / "README.md", _model_card(config, entry, params, cost))
        stages.mark("train", {"optimizer_steps": trainer.state.global_step})
    trainer.accelerator.wait_for_everyone()
    if trainer.is_world_process_zero():
        shutil.rmtree(checkpoints_dir, ignore_errors=True)
        run.finish("complete", model_dir=str(model_dir))
    say(f"trained {config.method} in {cost['wall_seconds']:.1f}s ({cost['optimizer_steps']} steps); model at {model_dir}")
    return TrainResult(run, model_dir, cost, final_loss, None, trainer=trainer)


class _Lazy:
    """A model loaded on first attribute access: a reused generation artifact never loads it."""

    def __init__(self, load: Callable[[], object]):
        self._load = load
        self._model = None

    def __getattr__(self, name):
        if self._model is None:
            self._model = self._load()
        return getattr(self._model, name)

    def __call__(self, *args, **kwargs):
        if self._model is None:
            self._model = self._load()
        return self._model(*args, **kwargs)
