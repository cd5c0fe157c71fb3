"""DistiLLM (Ko et al., ICML 2024) on the token trainer: the ``adaptive_sgo`` sampling form — the adaptive
off-policy use of student-generated outputs (SGO) with a replay buffer. The loss is a ``token_kd`` divergence
(skew KL ``skl`` / skew reverse KL ``srkl``, α = 0.1). Definitions, defaults and their sources:
``docs/methods.md`` ("DistiLLM"); the state is :mod:`kdbench.train.replay`.

Per optimizer step the scheduler draws once (at the step's first micro-batch) whether the whole step trains on
the gold responses, on fresh student samples (generated now, stored in the buffer, trained on) or on a batch
replayed from the buffer; every validation feeds the scheduler, whose probability φ of using SGO rises by
``sgo_step`` when the validation loss rose by at least ``loss_eps``. Scheduler and buffer are saved in every
checkpoint (JSON, :mod:`kdbench.train.state_codec`), so a killed run resumes with the same buffer and draws.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from kdbench.config import option
from kdbench.errors import ConfigError
from kdbench.train.params import GenerationParams, positive, unit_interval
from kdbench.train.sampling import (SamplingForm, SamplingSpec, batch_prompts, register_sampling_form,
                                    sample_responses, step_key)


@dataclass
class AdaptiveSGOParams:
    """DistiLLM's adaptive SGO scheduler and replay buffer (authors' scripts/gpt2/distillm/*.sh, arguments.py)."""

    init_threshold: float = option(0.0, "phi_0: the starting probability of training on student outputs "
                                        "(--init-threshold 0.0).")
    sgo_step: float = option(0.1, "delta: how much phi rises when the validation loss rose.")
    loss_eps: float = option(0.1, "epsilon: the rise of the validation loss that raises phi (--loss-eps 0.1).")
    replay_ratio: Literal["decreasing", "increasing", "constant"] = option(
        "decreasing", "Schedule s(step) of fresh generation among SGO steps once the buffer is full: 1 - step/total "
                      "(the authors' default), step/total, or 1/2.")
    capacity: int = option(1000, "Replay buffer capacity in responses (--capacity 1000).")

    def __post_init__(self):
        unit_interval("init_threshold", self.init_threshold)
        positive("sgo_step", self.sgo_step)
        positive("loss_eps", self.loss_eps)
        if self.capacity < 1:
            raise ConfigError(f"Parameter capacity must be a whole number of at least 1 (got {self.capacity}).")


#: The rows a replayed response keeps (what the token trainer reads of a micro-batch).
STORED_KEYS = ("input_ids", "labels", "attention_mask", "example_index", "prompt_length")


class AdaptiveSGO(SamplingForm):
    """DistiLLM's adaptive off-policy sampling (module docstring)."""

    counter = "sgo_batches"

    def __init__(self, params: AdaptiveSGOParams, decoding, seed: int, pad_token_id: int, batch_size: int):
        from kdbench.train.replay import AdaptiveSGOScheduler, ReplayBuffer

        if params.capacity < batch_size:
            raise ConfigError(f"Parameter capacity ({params.capacity}) must hold at least one batch "
                              f"(batch_size {batch_size}).")
        self.decoding, self.seed, self.pad_token_id = decoding, seed, pad_token_id
        self.buffer = ReplayBuffer(params.capacity, seed=seed, pad_values={"input_ids": pad_token_id})
        self.scheduler = AdaptiveSGOScheduler(initial_probability=params.init_threshold, step_size=params.sgo_step,
                                              loss_tolerance=params.loss_eps, replay_ratio=params.replay_ratio,
                                              seed=seed)
        self.sources = {source: 0 for source in ("gold", "fresh", "replay")}
        self._step: int | None = None
        self._choice = "gold"

    def choice(self, trainer) -> str:
        """The step's source, drawn once per optimizer step."""
        step = trainer.state.global_step
        if self._step != step:
            total = max(int(trainer.state.max_steps), step + 1)
            self._choice = self.scheduler.choose(step, total, self.buffer.full)
            self._step = step
            self.sources[self._choice] += 1
        return self._choice

    def transform(self, trainer, batch: dict, micro: int) -> dict:
        choice = self.choice(trainer)
        if choice == "gold":
            return batch
        device = batch["input_ids"].device
        n = batch["input_ids"].shape[0]
        if choice == "replay" and len(self.buffer) >= n:
            out = {key: value.to(device) for key, value in self.buffer.sample(n).items()}
        else:
            out = self.fresh(trainer, batch, micro)
            self.buffer.add({key: out[key] for key in STORED_KEYS})
        trainer.counters[self.counter] += 1
        out["on_policy"] = True
        return out

    def fresh(self, trainer, batch: dict, micro: int) -> dict:
        """The micro-batch's prompts with the current student's sampled responses (labels on the response and
        the EOS it emitted)."""
        import torch

        from kdbench.generate import example_seed

        key = step_key(trainer, self.seed, micro)
        prompts = batch_prompts(batch)
        ids = [f"{int(e)}@{trainer.state.global_step}" for e in batch["example_index"]]
        responses, generated = sample_responses(trainer.accelerator.unwrap_model(trainer.model), trainer.gen_tokenizer,
                                                prompts, ids, self.decoding, example_seed(self.seed, key) % (2**31))
        trainer.counters["generated_tokens"] += generated
        rows = [p + r for p, r in zip(prompts, responses)]
        labels = [[-100] * len(p) + r for p, r in zip(prompts, responses)]
        longest = max(len(r) for r in rows)
        device = batch["input_ids"].device
        return {"input_ids": torch.tensor([r + [self.pad_token_id] * (longest - len(r)) for r in rows], device=device),
                "labels": torch.tensor([r + [-100] * (longest - len(r)) for r in labels], device=device),
                "attention_mask": torch.tensor([[1] * len(r) + [0] * (longest - len(r)) for r in rows], device=device),
                "example_index": batch["example_index"], "prompt_length": batch["prompt_length"]}

    def on_evaluate(self, trainer, metrics: dict) -> None:
        loss = metrics.get("eval_loss")
        if loss is not None and self.scheduler.update(loss):
            trainer.log({"sgo_probability": self.scheduler.probability})

    def cost_facts(self) -> dict:
        """Steps per source (gold / fresh / replay), the final SGO probability and the buffer's fill."""
        return {"sgo_steps": dict(self.sources), "sgo_probability": self.scheduler.probability,
                "replay_buffer_size": len(self.buffer)}

    def state_dict(self) -> dict:
        from kdbench.train.state_codec import encode

        return {"buffer": encode(self.buffer.state_dict()), "scheduler": encode(self.scheduler.state_dict()),
                "sources": dict(self.sources), "step": self._step, "choice": self._choice}

    def load_state_dict(self, state: dict) -> None:
        from kdbench.train.state_codec import decode

        self.buffer.load_state_dict(decode(state["buffer"]))
        self.scheduler.load_state_dict(decode(state["scheduler"]))
        self.sources = dict(state["sources"])
        self._step, self._choice = state["step"], state["choice"]


def _check(recipe, config) -> None:
    capacity = recipe.typed(AdaptiveSGOParams).capacity
    if capacity < config.batch_size:
        raise ConfigError(f"Parameter capacity ({capacity}) must hold at least one batch (batch_size "
                          f"{config.batch_size}).")


def _build(recipe, config, decoding, tokenizer) -> SamplingForm:
    return AdaptiveSGO(recipe.typed(AdaptiveSGOParams), decoding, config.seed, tokenizer.pad_token_id,
                       config.batch_size)


register_sampling_form(SamplingSpec("adaptive_sgo", _build, (AdaptiveSGOParams, GenerationParams), kinds=("token",),
                                    check=_check,
                                    help="DistiLLM: student outputs with an adaptive probability (raised when the "
                                         "validation loss rises), reused from a replay buffer."))

__all__ = ["AdaptiveSGO", "AdaptiveSGOParams"]
