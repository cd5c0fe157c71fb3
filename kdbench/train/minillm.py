"""MiniLLM (Gu et al., ICLR 2024) on the token trainer: the ``minillm`` objective and the ``minillm_rollouts``
sampling form. Definitions, defaults and decisions: ``docs/methods.md`` ("MiniLLM"); the loss pieces are
:mod:`kdbench.losses.policy_gradient`.

A round of rollouts is the prompts of one micro-batch: each response is sampled token by token from the
teacher-mixed distribution p̃ = α·p + (1 − α)·q_θ (Eq. 6, α = ``teacher_mix_alpha``), then the student and the
teacher score it once (no gradient) and the round stores, per sampled token, the student's log-prob at rollout
time (PPO's old log-prob), the length-normalised future reward (the advantage, Eqs. 5 and 7) and the importance
weight q_θ/p̃. The round is then trained on for ``ppo_epochs`` passes (shuffled minibatches of the micro-batch
size) — one pass per micro-batch, so the data loader's prompts of the following ``ppo_epochs − 1`` micro-batches
are not used: a run sees ``1/ppo_epochs`` of its prompts per epoch (MiniLLM's trainer likewise samples a fixed
number of rollouts per round and runs its PPO epochs over them). The buffer (:class:`~kdbench.train.rollouts.
RolloutBuffer`) is saved in every checkpoint, so a killed run resumes inside the same round.

The LM loss on a plain-text corpus (MiniLLM's L_PT) is the engine's LM term: ``--lm-data`` with the recipe's
``lm.weight`` (1). The policy trains without dropout (the PPO ratio is exactly 1 on a round's first pass).
"""

from __future__ import annotations

from dataclasses import dataclass

from kdbench.config import option
from kdbench.errors import ConfigError
from kdbench.train.objectives import Batch, Objective, register_objective
from kdbench.train.params import GenerationParams, positive, unit_interval
from kdbench.train.sampling import SamplingForm, SamplingSpec, batch_prompts, register_sampling_form, step_key


# ------------------------------------------------------------------------------------------ the objective
@dataclass
class MiniLLMLossParams:
    """MiniLLM's loss on a minibatch of rollouts (:func:`kdbench.losses.policy_gradient.minillm`)."""

    clip_range: float = option(0.2, "PPO's ratio clip epsilon (METHODS.md; the authors' --cliprange 0.2).")
    single_step: bool = option(True, "Add the single-step term: the exact per-position reverse KL (Eq. 5).")
    weight_single_step: bool = option(True, "Weight the single-step term by the importance weight w_t (the paper, "
                                            "Eq. 6); false = the authors' code, unweighted.")
    temperature: float = option(1.0, "Divides student and teacher logits in the loss.")

    def __post_init__(self):
        positive("clip_range", self.clip_range)
        positive("temperature", self.temperature)


def minillm_objective(batch: Batch, params: MiniLLMLossParams) -> dict:
    """The summed MiniLLM loss over the micro-batch's counted tokens (the trainer divides by the step's count).

    On rollouts (``batch.extras`` holds ``old_logps``, ``advantages``, ``weights``): PPO's clipped long-term term
    plus the single-step reverse KL. Without rollouts (validation on gold responses) only the single-step term:
    the exact per-position reverse KL, whose value is meaningful (a surrogate's is not)."""
    import torch

    from kdbench.losses.policy_gradient import minillm
    from kdbench.losses.token import rkl

    mask = batch.mask > 0
    with torch.no_grad():
        reverse_kl = rkl(batch.student_logits, batch.teacher_logits, mask, temperature=params.temperature,
                         reduction="sum")
    extras = batch.extras
    if "advantages" not in extras:
        value = rkl(batch.student_logits, batch.teacher_logits, mask, temperature=params.temperature, reduction="sum")
        return {"loss": value, "rkl": reverse_kl}
    loss = minillm(batch.student_logits, batch.teacher_logits, batch.targets, mask, old_logps=extras["old_logps"],
                   advantages=extras["advantages"], importance_weights=extras["weights"],
                   clip_range=params.clip_range, single_step=params.single_step,
                   weight_single_step=params.weight_single_step, temperature=params.temperature, reduction="sum")
    advantage = (extras["advantages"] * batch.mask).sum()
    return {"loss": loss, "rkl": reverse_kl, "advantage": advantage}


register_objective(Objective("minillm", "token", minillm_objective, (MiniLLMLossParams,), needs_teacher=True,
                             help="MiniLLM: PPO on the sequence-level reverse KL + the single-step reverse KL."))


# ------------------------------------------------------------------------------------------ rollouts
@dataclass
class MiniLLMRolloutParams:
    """How MiniLLM samples and scores its rollouts (docs/methods.md, "MiniLLM")."""

    teacher_mix_alpha: float = option(0.2, "alpha: the teacher's share of the sampling distribution (Eq. 6).")
    ppo_epochs: int = option(4, "PPO inner epochs over each round of rollouts.")
    gamma: float = option(1.0, "Discount of the future reward (the paper: 1; the authors' code: 0.95).")
    length_normalize: bool = option(True, "Divide the future reward by the number of future tokens (Eq. 7).")
    include_current_reward: bool = option(False, "Start the return at t (the authors' code); false = R_{t+1}, "
                                                 "the paper's long-term term.")
    whiten_advantages: bool = option(False, "Whiten the advantages over the round (the authors' code).")

    def __post_init__(self):
        unit_interval("teacher_mix_alpha", self.teacher_mix_alpha)
        unit_interval("gamma", self.gamma)
        if self.ppo_epochs < 1:
            raise ConfigError(f"Parameter ppo_epochs must be a whole number of at least 1 (got {self.ppo_epochs}).")


def sample_mixed(student, teacher, prompt: list[int], *, alpha: float, max_new_tokens: int, eos_ids, vocab: int,
                 generator) -> list[int]:
    """One response to ``prompt`` sampled token by token from p̃ = α·p + (1 − α)·q (both models with their KV
    caches, no gradient): the new tokens, ending with the EOS id drawn (none when cut at ``max_new_tokens`` or
    at the last position a model with learned position embeddings has, as ``kdbench.generate`` cuts).
    ``generator``: a CPU ``torch.Generator`` (the row's own seed)."""
    import torch

    from kdbench.losses.policy_gradient import teacher_mixed_logprobs

    from kdbench.generate import model_max_positions

    device = next(student.parameters()).device
    ids = torch.tensor([prompt], device=device)
    response: list[int] = []
    limits = [n for n in (model_max_positions(student), model_max_positions(teacher)) if n is not None]
    if limits:  # learned position embeddings: the response stops where either model runs out of positions
        max_new_tokens = max(0, min(max_new_tokens, min(limits) - len(prompt)))
    with torch.no_grad():
        s_out = student(input_ids=ids, use_cache=True)
        t_out = teacher(input_ids=ids, use_cache=True)
        for _ in range(max_new_tokens):
            log_mix = teacher_mixed_logprobs(s_out.logits[0, -1, :vocab].float(), t_out.logits[0, -1, :vocab].float(),
                                             alpha=alpha)
            token = int(torch.multinomial(log_mix.double().exp().cpu(), 1, generator=generator))
            response.append(token)
            if token in eos_ids:
                break
            step = torch.tensor([[token]], device=device)
            s_out = student(input_ids=step, past_key_values=s_out.past_key_values, use_cache=True)
            t_out = teacher(input_ids=step, past_key_values=t_out.past_key_values, use_cache=True)
    return response


def rollout_tensors(student_logps, teacher_logps, mask, params: MiniLLMRolloutParams):
    """What a round stores per sampled token, from the log-probs [B, T] of the sampled tokens under the student
    (at rollout time) and the teacher: (advantages [B, T], importance weights q/p̃ [B, T]), no gradient.
    The reward is r_t = log p − log q (Eq. 3), the advantage its (length-normalised) future sum (Eqs. 5, 7)."""
    from kdbench.losses.policy_gradient import minillm_advantages, minillm_rewards, mixed_importance_weights

    rewards = minillm_rewards(teacher_logps, student_logps, mask)
    advantages = minillm_advantages(rewards, mask, gamma=params.gamma, length_normalize=params.length_normalize,
                                    include_current_reward=params.include_current_reward,
                                    whiten_advantages=params.whiten_advantages)
    weights = mixed_importance_weights(student_logps, teacher_logps, mask, alpha=params.teacher_mix_alpha)
    return advantages, weights


class MiniLLMRollouts(SamplingForm):
    """MiniLLM's rounds of rollouts (module docstring). ``params``: :class:`MiniLLMRolloutParams`; ``seed``: the
    run's seed (each row's sampling seed derives from it, the step, the micro-batch, the process and the
    example, so a resumed run samples what an uninterrupted one would)."""

    counter = "rollout_rounds"

    def __init__(self, params: MiniLLMRolloutParams, max_new_tokens: int, seed: int, batch_size: int,
                 pad_token_id: int):
        from kdbench.train.rollouts import RolloutBuffer

        self.params, self.max_new_tokens, self.seed = params, max_new_tokens, seed
        self.pad_token_id = pad_token_id
        self.buffer = RolloutBuffer(ppo_epochs=params.ppo_epochs, minibatch_size=batch_size, seed=seed,
                                    pad_values={"input_ids": pad_token_id})
        self._dropout_off = False

    def transform(self, trainer, batch: dict, micro: int) -> dict:
        if not self._dropout_off:
            from kdbench.train.policy import disable_dropout

            disable_dropout(trainer.model)
            self._dropout_off = True
        if self.buffer.needs_rollouts:
            self.buffer.add(self.rollouts(trainer, batch, micro))
            trainer.counters[self.counter] += 1
        out = self.buffer.next_minibatch()
        device = batch["input_ids"].device
        out = {key: value.to(device) for key, value in out.items()}
        out["on_policy"] = True
        return out

    def rollouts(self, trainer, batch: dict, micro: int) -> dict:
        """A round: the micro-batch's prompts, one response each from p̃, scored by student and teacher."""
        import torch

        from kdbench.generate import example_seed
        from kdbench.losses.sequence import token_logps

        model = trainer.accelerator.unwrap_model(trainer.model)
        was_training = model.training
        model.eval()
        vocab = trainer.logit_rows or model.config.vocab_size
        tokenizer = trainer.gen_tokenizer
        eos_ids = {tokenizer.eos_token_id} | set(_as_list(getattr(model.generation_config, "eos_token_id", None)))
        key = step_key(trainer, self.seed, micro)
        rows, labels, generated = [], [], 0
        for prompt, example in zip(batch_prompts(batch), batch["example_index"].tolist()):
            generator = torch.Generator().manual_seed(example_seed(self.seed, f"{key}/{example}") % (2**63))
            response = sample_mixed(model, trainer.teacher, prompt, alpha=self.params.teacher_mix_alpha,
                                    max_new_tokens=self.max_new_tokens, eos_ids=eos_ids - {None}, vocab=vocab,
                                    generator=generator)
            rows.append(prompt + response)
            labels.append([-100] * len(prompt) + response)
            generated += len(response)
        longest = max(len(r) for r in rows)
        device = batch["input_ids"].device
        input_ids = torch.tensor([r + [self.pad_token_id] * (longest - len(r)) for r in rows], device=device)
        label_ids = torch.tensor([r + [-100] * (longest - len(r)) for r in labels], device=device)
        attention = torch.tensor([[1] * len(r) + [0] * (longest - len(r)) for r in rows], device=device)
        targets = label_ids[:, 1:]
        mask = targets != -100
        with torch.no_grad():
            student_logps = token_logps(model(input_ids=input_ids, attention_mask=attention).logits[:, :-1, :vocab],
                                        targets, mask)
            teacher_logps = token_logps(trainer.teacher_logits(trainer.teacher, input_ids, attention, vocab), targets,
                                        mask)
        model.train(was_training)
        advantages, weights = rollout_tensors(student_logps, teacher_logps, mask, self.params)
        trainer.counters["generated_tokens"] += generated
        trainer.counters["teacher_forward_tokens"] += generated  # the teacher's share of p̃ while sampling

        def full(values):  # position j holds token j's value (what the trainer's rollout_* slicing expects)
            return torch.cat([torch.zeros_like(values[:, :1]), values], dim=1).float()

        return {"input_ids": input_ids, "labels": label_ids, "attention_mask": attention,
                "example_index": batch["example_index"], "prompt_length": batch["prompt_length"],
                "rollout_old_logps": full(student_logps), "rollout_advantages": full(advantages),
                "rollout_weights": full(weights)}

    def state_dict(self) -> dict:
        from kdbench.train.state_codec import encode

        return {"buffer": encode(self.buffer.state_dict())}

    def load_state_dict(self, state: dict) -> None:
        from kdbench.train.state_codec import decode

        self.buffer.load_state_dict(decode(state["buffer"]))


def _as_list(value) -> list:
    if value is None:
        return []
    return list(value) if isinstance(value, (list, tuple)) else [value]


def check_rounds(ppo_epochs: int, config) -> None:
    """A round's PPO passes are consecutive optimizer steps (one micro-batch each): with gradient accumulation
    they would fall into one step, which is not PPO's inner loop."""
    if ppo_epochs > 1 and config.grad_accum > 1:
        raise ConfigError(f"Method {config.method} runs its PPO epochs as consecutive optimizer steps, so it needs "
                          f"grad_accum=1 (got {config.grad_accum}); raise batch_size instead.")


def _check(recipe, config) -> None:
    check_rounds(recipe.typed(MiniLLMRolloutParams).ppo_epochs, config)
    generation = recipe.typed(GenerationParams)
    if generation.greedy or generation.generation_temperature != 1.0 or generation.top_p != 1.0 or generation.top_k:
        raise ConfigError("MiniLLM samples its rollouts from the teacher-mixed distribution at temperature 1 (its "
                          "importance weights assume it); leave greedy, generation_temperature, top_p and top_k at "
                          "their defaults.")


def _build(recipe, config, decoding, tokenizer) -> SamplingForm:
    generation = recipe.typed(GenerationParams)
    _check(recipe, config)
    return MiniLLMRollouts(recipe.typed(MiniLLMRolloutParams), generation.max_new_tokens, config.seed,
                           config.batch_size, tokenizer.pad_token_id)


register_sampling_form(SamplingSpec("minillm_rollouts", _build, (MiniLLMRolloutParams, GenerationParams),
                                    kinds=("token",), needs_teacher=True, check=_check,
                                    help="MiniLLM: rounds of responses sampled from the teacher-mixed distribution, "
                                         "trained on for ppo_epochs passes."))

__all__ = ["MiniLLMLossParams", "MiniLLMRolloutParams", "MiniLLMRollouts", "check_rounds", "minillm_objective",
           "rollout_tensors", "sample_mixed"]
