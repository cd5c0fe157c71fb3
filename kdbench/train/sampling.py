"""Sampling forms: what is sampled from whom *during* training (a recipe's ``sampling:`` key).

A cached stage generates once before training (SeqKD's teacher responses, ADPA's ŷ); a sampling form
generates inside the optimizer step, from the model being trained. Two forms exist:

* ``on_policy_mix`` (GKD, TRL's ``GKDTrainer``): with probability λ = ``on_policy_fraction`` per
  micro-batch, the gold responses are replaced by the current student's samples;
* ``online_rejected`` (DPKD Alg. 1): every micro-batch's rejected responses y_s are sampled from the current
  policy and both sides are scored by the teacher in the same step (``pairs: online``; ``offline`` and
  ``preference_data`` turn it off and take y_s from a stage or from the data).

**Adding a form** (MiniLLM's rollouts, DistiLLM's replay buffer, ...) is a :class:`SamplingForm` subclass and
one :func:`register_sampling_form` call. The hooks:

* :meth:`SamplingForm.transform` gets each micro-batch of an optimizer step *before* the step's token / pair
  counts are taken, so the loss is normalised over what is actually trained on; it may replace responses,
  add tensors the trainer's loss reads, or serve rows from a buffer (a rollout buffer reused for several PPO
  inner epochs is a buffer refilled every K steps);
* :meth:`SamplingForm.on_evaluate` sees every validation result (DistiLLM's adaptive scheduler raises its
  student-sample probability when the validation loss rises);
* :meth:`SamplingForm.state_dict` / :meth:`SamplingForm.load_state_dict`: the form's state (buffers, schedule
  position) as JSON-serializable data, saved per process in every checkpoint and restored on resume, so a
  killed run continues with the same buffer.

Every draw must be a pure function of (seed, step, micro-batch, process, example) and the saved state, so a
resumed run samples what an uninterrupted one would (:func:`kdbench.generate.example_seed`).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Callable, Literal

from kdbench.config import option
from kdbench.errors import ConfigError
from kdbench.train.params import GenerationParams, unit_interval


def sample_responses(model, tokenizer, prompts: list[list[int]], ids: list[str], decoding, seed: int):
    """Responses of ``model`` (the *unwrapped* model: generation never goes through DDP) to token-id
    prompts: per prompt the new tokens plus the EOS id the model emitted when it stopped (one of its
    EOS ids, kept as produced); a response cut at ``max_new_tokens`` has no EOS. Also returns the
    number of tokens generated. Each row's sampling seed derives from ``seed`` and its id
    (:mod:`kdbench.generate`)."""
    from kdbench.generate import HFBackend

    generated = HFBackend(model, tokenizer).generate_ids(prompts, ids, decoding, seed=seed)
    return [row.with_eos() for row in generated], sum(len(row.tokens) for row in generated)


class SamplingForm:
    """A sampling form's runtime object, built once per run (see the module docstring for the hooks).

    ``counter``: the cost key counting the micro-batches it sampled (``cost.json``).
    """

    counter = "sampled_batches"
    #: it may run the policy in :meth:`transform`: with a sharded student every rank then gathers the
    #: student's full weights for the step's transforms (kdbench.train.sharded); False skips the gather
    generates = True

    def transform(self, trainer, batch: dict, micro: int) -> dict:
        """Micro-batch ``micro`` of the optimizer step, as the step trains on it."""
        return batch

    def on_evaluate(self, trainer, metrics: dict) -> None:
        """Called with every validation result (``eval_*`` metrics)."""

    def attach(self, **models) -> None:
        """Frozen models the recipe's kind hands the form before training (DPPO's reward models)."""

    def cost_facts(self) -> dict:
        """What the form adds to the run's ``cost.json`` (e.g. how many steps used which source)."""
        return {}

    def state_dict(self) -> dict:
        """The form's state (JSON-serializable), saved per process with every checkpoint."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        """Restore :meth:`state_dict`'s output (on resume)."""


def step_key(trainer, seed: int, micro: int) -> str:
    """The draw key of micro-batch ``micro`` of the current step on this process."""
    return f"{seed}/{trainer.state.global_step}/{micro}/{trainer.accelerator.process_index}"


def batch_prompts(batch: dict) -> list[list[int]]:
    """The prompt token ids of every row of a right-padded batch (``prompt_length`` per row)."""
    return [batch["input_ids"][row, :int(batch["prompt_length"][row])].tolist()
            for row in range(batch["input_ids"].shape[0])]


# ------------------------------------------------------------------------------------------ GKD
@dataclass
class OnPolicyMixParams:
    on_policy_fraction: float = option(0.5, "lambda: the probability that a micro-batch trains on the student's "
                                            "own samples instead of the gold responses.")

    def __post_init__(self):
        unit_interval("on_policy_fraction", self.on_policy_fraction)


class OnPolicyMix(SamplingForm):
    """GKD's on-policy mixing: with probability ``fraction`` (λ) a micro-batch's responses are sampled from
    the current student with ``decoding``; the coin and each example's sampling seed derive from (seed,
    step, micro-batch, process, example), so a resumed run draws the same samples as an uninterrupted one."""

    counter = "on_policy_batches"

    def __init__(self, fraction: float, decoding, seed: int, pad_token_id: int):
        self.fraction, self.decoding, self.seed, self.pad_token_id = fraction, decoding, seed, pad_token_id

    def transform(self, trainer, batch: dict, micro: int) -> dict:
        """Replace the batch's responses by the student's samples with probability λ (TRL decides per
        micro-batch). Keeps the prompt tokens; labels cover the sampled tokens and the EOS if sampled."""
        import torch

        from kdbench.generate import example_seed

        key = step_key(trainer, self.seed, micro)
        coin = random.Random(example_seed(self.seed, key)).random()
        if coin >= self.fraction:
            return batch
        prompts = batch_prompts(batch)
        ids = [f"{int(e)}@{trainer.state.global_step}" for e in batch["example_index"]]
        responses, generated_tokens = sample_responses(trainer.accelerator.unwrap_model(trainer.model),
                                                       trainer.gen_tokenizer, prompts, ids, self.decoding,
                                                       example_seed(self.seed, key) % (2**31))
        rows = [prompt + response for prompt, response in zip(prompts, responses)]
        labels = [[-100] * len(prompt) + response for prompt, response in zip(prompts, responses)]
        trainer.counters["generated_tokens"] += generated_tokens
        trainer.counters[self.counter] += 1
        longest = max(len(r) for r in rows)
        device = batch["input_ids"].device
        out = dict(batch)
        out["input_ids"] = torch.tensor([r + [self.pad_token_id] * (longest - len(r)) for r in rows], device=device)
        out["labels"] = torch.tensor([r + [-100] * (longest - len(r)) for r in labels], device=device)
        out["attention_mask"] = torch.tensor([[1] * len(r) + [0] * (longest - len(r)) for r in rows], device=device)
        out["on_policy"] = True
        return out


# ------------------------------------------------------------------------------------------ DPKD
@dataclass
class OnlineRejectedParams:
    pairs: Literal["online", "offline", "preference_data"] = option(
        "online", "online: y_s sampled from the current policy every batch (DPKD Alg. 1); offline: y_s generated "
                  "once by the starting policy (a stage); preference_data: --data's (chosen, rejected).")


class OnlineRejected(SamplingForm):
    """DPKD's online pairs: every micro-batch's rejected responses are sampled from the current policy (on the
    unwrapped model) with ``decoding``; each row's seed derives from (seed, step, micro-batch, process,
    example), so a resumed run samples what an uninterrupted one would. The teacher scores both sides in the
    step: ``teacher_chosen`` / ``teacher_rejected`` (summed log-probs) and ``teacher_first_logp`` (the
    teacher's log-distribution at the first response token, for DPKD's Table 3 diagnostic)."""

    counter = "online_batches"

    def __init__(self, decoding, seed: int):
        self.decoding, self.seed = decoding, seed

    def transform(self, trainer, batch: dict, micro: int) -> dict:
        import torch

        from kdbench.generate import example_seed
        from kdbench.losses.sequence import sequence_logps
        from kdbench.train.pairs import pad_rows, rows_of

        n = batch["example_index"].numel()
        chosen = rows_of(batch, 0, n)
        prompts = [ids[:int(batch["prompt_length"][row])] for row, (ids, _) in enumerate(chosen)]
        key = step_key(trainer, self.seed, micro)
        ids = [f"{int(e)}@{trainer.state.global_step}" for e in batch["example_index"]]
        # y_s as sampled: its tokens and the EOS id the student emitted (none when cut at max_new_tokens)
        responses, generated = sample_responses(trainer.accelerator.unwrap_model(trainer.model), trainer.gen_tokenizer,
                                                prompts, ids, self.decoding, example_seed(self.seed, key) % (2**31))
        rejected = [(p + r, [-100] * len(p) + r) for p, r in zip(prompts, responses)]
        device = batch["input_ids"].device
        out = {k: v for k, v in batch.items() if k not in ("input_ids", "labels", "attention_mask")}
        out.update({k: v.to(device) for k, v in pad_rows(chosen + rejected, trainer.gen_tokenizer.pad_token_id).items()})
        with torch.no_grad():
            logits = trainer.teacher(input_ids=out["input_ids"], attention_mask=out["attention_mask"]).logits
            vocab = trainer.logit_rows
            logps = sequence_logps(logits[:, :-1, :vocab], out["labels"][:, 1:])
            first = logits[torch.arange(n, device=device), out["prompt_length"].to(device) - 1, :vocab]
        out["teacher_chosen"], out["teacher_rejected"] = logps[:n].float(), logps[n:].float()
        out["teacher_first_logp"] = torch.log_softmax(first.float(), dim=-1)
        trainer.counters["generated_tokens"] += generated
        trainer.counters["teacher_forward_tokens"] += int(out["attention_mask"].sum())
        trainer.counters[self.counter] += 1
        return out


# ------------------------------------------------------------------------------------------ the registry
@dataclass(frozen=True)
class SamplingSpec:
    """A registered sampling form.

    ``build(recipe, config, decoding, tokenizer) -> SamplingForm``: the runtime object of a run (``recipe``:
    the resolved :class:`~kdbench.train.recipes.Recipe`, whose ``typed(Group)`` gives its parameters;
    ``decoding``: the recipe's :class:`~kdbench.generate.DecodingConfig`). ``params``: its typed groups.
    ``kinds``: the trainer families it works with. ``enabled(params)``: whether the recipe's parameters turn it
    on. ``computes``: frozen log-prob slots it fills in the step (no stage computes them for training pairs).
    ``samples_rejected``: it samples the pairs' rejected responses in the step (no stage generates them for the
    training prompts).
    ``needs_teacher``: the teacher must be kept for the step. ``generates``: responses come from the policy
    (a top-k teacher cache cannot cover them). ``check(recipe, config)``: settings the form cannot run with, one
    sentence each, raised before the run directory is written.
    """

    name: str
    build: Callable[..., SamplingForm]
    params: tuple[type, ...] = ()
    kinds: tuple[str, ...] = ("token",)
    enabled: Callable[[dict], bool] = lambda params: True
    computes: frozenset = frozenset()
    samples_rejected: bool = False
    needs_teacher: bool = False
    generates: bool = True
    help: str = ""
    check: Callable[..., None] | None = None


SAMPLING_FORMS: dict[str, SamplingSpec] = {}


def register_sampling_form(spec: SamplingSpec, *, replace: bool = False) -> SamplingSpec:
    """Add ``spec`` under its name (``replace=True`` redefines one); returns it."""
    if spec.name in SAMPLING_FORMS and not replace:
        raise ConfigError(f"A sampling form named {spec.name!r} is already registered; pick another name.")
    SAMPLING_FORMS[spec.name] = spec
    return spec


def get_sampling_form(name: str) -> SamplingSpec:
    if name not in SAMPLING_FORMS:
        raise ConfigError(f"Recipe names unknown sampling form {name!r}; known: {', '.join(SAMPLING_FORMS)}.")
    return SAMPLING_FORMS[name]


def _on_policy_mix(recipe, config, decoding, tokenizer) -> SamplingForm:
    return OnPolicyMix(recipe.typed(OnPolicyMixParams).on_policy_fraction, decoding, config.seed,
                       tokenizer.pad_token_id)


def _online_rejected(recipe, config, decoding, tokenizer) -> SamplingForm:
    return OnlineRejected(decoding, config.seed)


register_sampling_form(SamplingSpec("on_policy_mix", _on_policy_mix, (OnPolicyMixParams, GenerationParams),
                                    kinds=("token",), help="GKD: the student's samples replace the gold responses "
                                                           "with probability on_policy_fraction."))
register_sampling_form(SamplingSpec("online_rejected", _online_rejected, (OnlineRejectedParams, GenerationParams),
                                    kinds=("preference",), enabled=lambda params: params.get("pairs") == "online",
                                    computes=frozenset({"teacher"}), samples_rejected=True, needs_teacher=True,
                                    help="DPKD: rejected responses sampled from the current policy every batch, "
                                         "scored by the teacher in the step."))

__all__ = ["SamplingForm", "SamplingSpec", "SAMPLING_FORMS", "register_sampling_form", "get_sampling_form",
           "sample_responses", "OnPolicyMix", "OnlineRejected", "OnPolicyMixParams", "OnlineRejectedParams"]
