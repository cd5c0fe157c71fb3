"""DPPO (the PPO baseline of the ADPA paper, adpa_dckd.md §4.4 and Appendix C) on the guided trainer: the
``dppo`` guided form (1 × CE on y_w + PPO's clipped policy loss on the policy's own responses) and the
``dppo_rollouts`` sampling form (rounds of rollouts rewarded by the DPO teacher). Definitions, defaults and
decisions: ``docs/methods.md`` ("DPPO"); the loss pieces are :mod:`kdbench.losses.dppo`.

A round is the prompts of one micro-batch: the current policy samples one response per prompt; π_dpo, π_ref
(``--teacher`` / the ``ref_teacher`` stage), the policy itself and the SFT student π_S-ref (where the policy
started) score it once (no gradient); the reward is the DPO teacher's implicit reward β·log(π_dpo/π_ref) at the
last token (``reward_level: sequence``) or per token (``token``) minus β_KL·log(π_θ/π_S-ref) per token. The
round is trained on for ``ppo_epochs`` passes (one minibatch per micro-batch, as MiniLLM's rounds), each
minibatch the pairs' y_w rows (for the CE term) and the rollouts.

**Decision — critic** (the paper: "the overall loss also includes the policy loss and critic loss, as is
standard in PPO training", Appendix C): ``advantage: gae`` keeps a value head — a linear layer on the policy's
last hidden state at rollout time (detached) — whose values give GAE advantages (γ = 1, λ = 0.95); the head is
fitted on the round's returns with PPO's clipped value loss for ``ppo_epochs`` passes by its own Adam (the
policy's features are not trained by the value loss: the head is a probe on them, which keeps the critic out of
the saved model). Its weights and optimizer state are saved in every checkpoint with the rollout buffer.
``advantage: critic_free`` uses reward-to-go minus a leave-one-out baseline instead.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from kdbench.config import option
from kdbench.errors import ConfigError
from kdbench.losses.sequence import cross_entropy_sum
from kdbench.train.guided_forms import GuidedBatch, GuidedForm, GuidedParams, register_guided_form
from kdbench.train.params import DPOTeacherParams, GenerationParams, not_negative, positive, unit_interval
from kdbench.train.sampling import SamplingForm, SamplingSpec, register_sampling_form, sample_responses, step_key


# ------------------------------------------------------------------------------------------ the guided form
@dataclass
class DPPOLossParams:
    clip_range: float = option(0.2, "PPO's ratio clip epsilon.")
    sft_weight: float = option(1.0, "Weight of the token-mean CE on y_w (METHODS.md: 1).")

    def __post_init__(self):
        positive("clip_range", self.clip_range)
        not_negative("sft_weight", self.sft_weight)


def _dppo(batch: GuidedBatch, p: DPPOLossParams, family: GuidedParams) -> dict:
    """sft_weight·CE(y_w) per chosen token + PPO's clipped policy loss per rollout token."""
    import torch

    from kdbench.losses.dppo import dppo
    from kdbench.losses.sequence import token_logps

    ce = cross_entropy_sum(batch.chosen_logits, batch.chosen_targets)
    mask = batch.other_mask > 0
    if "advantages" not in batch.extras:
        raise ConfigError("The dppo form trains on rollouts; its recipe must declare sampling: dppo_rollouts.")
    targets = torch.where(mask, batch.other_targets, torch.zeros_like(batch.other_targets))
    logps = token_logps(batch.other_logits, targets, mask)
    policy = dppo(logps, batch.extras["old_logps"], batch.extras["advantages"], mask, clip_range=p.clip_range,
                  reduction="sum")
    loss = p.sft_weight * ce / batch.chosen_tokens + policy / batch.other_tokens
    return {"loss": loss, "ce": ce, "ppo": policy.detach()}


register_guided_form(GuidedForm("dppo", DPPOLossParams, (), _dppo, {"ce": "chosen", "ppo": "other"},
                                "DPPO: CE on y_w + PPO on the policy's responses rewarded by the DPO teacher."))


# ------------------------------------------------------------------------------------------ rollouts
@dataclass
class DPPORolloutParams:
    reward_level: Literal["sequence", "token"] = option(
        "sequence", "sequence: beta log(pi_dpo(y)/pi_ref(y)) at the last token (Eq. 26); token: per token (Eq. 28).")
    kl_coef: float | None = option(None, "beta_KL of the KL penalty to the SFT student; null = the DPO teacher's "
                                         "beta (the paper writes one symbol).")
    advantage: Literal["gae", "critic_free"] = option(
        "gae", "gae: a value head and GAE (the paper's critic, Appendix C); critic_free: reward-to-go minus a "
               "leave-one-out baseline.")
    gamma: float = option(1.0, "Discount.")
    gae_lambda: float = option(0.95, "GAE's lambda.")
    ppo_epochs: int = option(4, "PPO inner epochs over each round of rollouts.")
    value_clip_range: float = option(0.2, "The value loss's clip (TRL's default).")
    value_lr: float = option(1.0e-3, "Learning rate of the value head's Adam.")

    def __post_init__(self):
        unit_interval("gamma", self.gamma)
        unit_interval("gae_lambda", self.gae_lambda)
        positive("value_clip_range", self.value_clip_range)
        positive("value_lr", self.value_lr)
        if self.kl_coef is not None:
            not_negative("kl_coef", self.kl_coef)
        if self.ppo_epochs < 1:
            raise ConfigError(f"Parameter ppo_epochs must be a whole number of at least 1 (got {self.ppo_epochs}).")


def dppo_rewards(policy_logps, dpo_logps, ref_logps, start_logps, mask, *, beta: float, kl_coef: float, level: str):
    """Per-token rewards [B, T] of sampled responses from the log-probs [B, T] of their tokens under the policy
    (at rollout time), π_dpo, π_ref and the SFT student: β·log(π_dpo/π_ref) (at the last token, or per token)
    − β_KL·log(π_θ/π_S-ref) per token (adpa_dckd.md Eqs. 26-29). No gradient."""
    from kdbench.losses.dppo import dpo_implicit_rewards, kl_penalized_rewards

    rewards = dpo_implicit_rewards(dpo_logps, ref_logps, mask, beta=beta, level=level)
    return kl_penalized_rewards(rewards, policy_logps, start_logps, mask, kl_coef=kl_coef)


class DPPORollouts(SamplingForm):
    """DPPO's rounds of rollouts (module docstring). The kind hands it the frozen models with :meth:`attach`."""

    counter = "rollout_rounds"

    def __init__(self, params: DPPORolloutParams, beta: float, decoding, seed: int, batch_size: int, pad_token_id: int):
        from kdbench.train.rollouts import RolloutBuffer

        self.params, self.beta, self.decoding, self.seed, self.pad_token_id = params, beta, decoding, seed, pad_token_id
        self.kl_coef = beta if params.kl_coef is None else params.kl_coef
        self.buffer = RolloutBuffer(ppo_epochs=params.ppo_epochs, minibatch_size=batch_size, seed=seed,
                                    pad_values={"chosen_ids": pad_token_id, "rollout_ids": pad_token_id,
                                                "chosen_labels": -100, "rollout_labels": -100})
        self.models: dict = {}
        self.critic = None
        self.critic_optimizer = None
        self._critic_state = None
        self.value_loss = 0.0

    def attach(self, **models) -> None:
        """``dpo``, ``ref``: the DPO teacher and its reference; ``start``: the SFT student π_S-ref."""
        self.models.update(models)

    # -------------------------------------------------------------------- the critic
    def _ensure_critic(self, hidden_size: int) -> None:
        import torch

        if self.critic is not None:
            return
        generator = torch.Generator().manual_seed(self.seed)
        self.critic = torch.nn.Linear(hidden_size, 1)
        with torch.no_grad():
            self.critic.weight.copy_(torch.randn(1, hidden_size, generator=generator) * hidden_size ** -0.5 * 0.1)
            self.critic.bias.zero_()
        self.critic_optimizer = torch.optim.Adam(self.critic.parameters(), lr=self.params.value_lr)
        if self._critic_state is not None:
            from kdbench.train.state_codec import decode

            state = decode(self._critic_state)
            self.critic.load_state_dict(state["weights"])
            optimizer = state["optimizer"]
            optimizer["state"] = {int(k): v for k, v in optimizer["state"].items()}
            self.critic_optimizer.load_state_dict(optimizer)
            self._critic_state = None

    def _fit_critic(self, features, old_values, returns, mask) -> None:
        """``ppo_epochs`` Adam steps of PPO's clipped value loss on the round (features fixed)."""
        from kdbench.losses.dppo import clipped_value_loss

        for _ in range(self.params.ppo_epochs):
            values = self.critic(features).squeeze(-1)
            loss = clipped_value_loss(values, old_values, returns, mask, clip_range=self.params.value_clip_range)
            self.critic_optimizer.zero_grad()
            loss.backward()
            self.critic_optimizer.step()
            self.value_loss = float(loss)

    # -------------------------------------------------------------------- a round
    def transform(self, trainer, batch: dict, micro: int) -> dict:
        import torch

        from kdbench.train.pairs import pad_rows

        if self.buffer.needs_rollouts:
            self.buffer.add(self.rollouts(trainer, batch, micro))
            trainer.counters[self.counter] += 1
        mini = self.buffer.next_minibatch()
        n = mini["example_index"].numel()
        chosen = [(mini["chosen_ids"][i, :int(mini["chosen_length"][i])].tolist(),
                   mini["chosen_labels"][i, :int(mini["chosen_length"][i])].tolist()) for i in range(n)]
        rollouts = [(mini["rollout_ids"][i, :int(mini["rollout_length"][i])].tolist(),
                     mini["rollout_labels"][i, :int(mini["rollout_length"][i])].tolist()) for i in range(n)]
        device = batch["input_ids"].device
        out = {key: value.to(device) for key, value in pad_rows(chosen + rollouts, self.pad_token_id).items()}
        length = out["input_ids"].shape[1]
        for name in ("old_logps", "advantages"):
            full = torch.zeros(2 * n, length, dtype=torch.float32)
            width = min(length, mini[name].shape[1])
            full[n:, :width] = mini[name][:, :width]
            out[f"rollout_{name}"] = full.to(device)
        out["example_index"], out["prompt_length"] = mini["example_index"].to(device), mini["prompt_length"].to(device)
        return out

    def rollouts(self, trainer, batch: dict, micro: int) -> dict:
        """A round: one response per pair's prompt from the current policy, rewarded and valued."""
        import torch

        from kdbench.generate import example_seed
        from kdbench.losses.dppo import critic_free_advantages, gae_advantages
        from kdbench.losses.sequence import token_logps
        from kdbench.train.pairs import pad_rows, rows_of

        n = batch["example_index"].numel()
        chosen = rows_of(batch, 0, n)
        prompts = [ids[:int(batch["prompt_length"][row])] for row, (ids, _) in enumerate(chosen)]
        ids = [f"{int(e)}@{trainer.state.global_step}" for e in batch["example_index"]]
        model = trainer.accelerator.unwrap_model(trainer.model)
        responses, generated = sample_responses(model, trainer.gen_tokenizer, prompts, ids, self.decoding,
                                                example_seed(self.seed, step_key(trainer, self.seed, micro)) % (2**31))
        rows = [(p + r, [-100] * len(p) + r) for p, r in zip(prompts, responses)]
        padded = pad_rows(rows, self.pad_token_id)
        device = next(model.parameters()).device
        input_ids, attention = padded["input_ids"].to(device), padded["attention_mask"].to(device)
        targets = padded["labels"][:, 1:].to(device)
        mask = targets != -100
        vocab = trainer.logit_rows

        def logps_of(frozen, hidden: bool = False):
            with torch.no_grad():
                out = frozen(input_ids=input_ids, attention_mask=attention, output_hidden_states=hidden)
            return token_logps(out.logits[:, :-1, :vocab].float(), targets, mask), out

        was_training = model.training
        model.eval()
        policy_logps, policy_out = logps_of(model, hidden=self.params.advantage == "gae")
        model.train(was_training)
        dpo_logps, _ = logps_of(self.models["dpo"])
        ref_logps, _ = logps_of(self.models["ref"])
        start_logps, _ = logps_of(self.models["start"])
        trainer.counters["teacher_forward_tokens"] += 3 * int(attention.sum())
        trainer.counters["generated_tokens"] += generated
        rewards = dppo_rewards(policy_logps, dpo_logps, ref_logps, start_logps, mask, beta=self.beta,
                               kl_coef=self.kl_coef, level=self.params.reward_level)
        if self.params.advantage == "gae":
            features = policy_out.hidden_states[-1][:, :-1].detach().float().cpu()
            self._ensure_critic(features.shape[-1])
            with torch.no_grad():
                values = self.critic(features).squeeze(-1)
            advantages, returns = gae_advantages(rewards.cpu(), values, mask.cpu(), gamma=self.params.gamma,
                                                 gae_lambda=self.params.gae_lambda)
            self._fit_critic(features, values, returns, mask.cpu())
        else:
            advantages = critic_free_advantages(rewards, mask, gamma=self.params.gamma)
        self.last_reward = float((rewards.sum(-1)).mean())

        def full(values):  # position j holds token j's value (the trainer's rollout_* slicing)
            return torch.cat([torch.zeros_like(values[:, :1]), values], dim=1).float().cpu()

        rollout_lengths = padded["attention_mask"].sum(-1)
        chosen_padded = pad_rows(chosen, self.pad_token_id)
        return {"chosen_ids": chosen_padded["input_ids"], "chosen_labels": chosen_padded["labels"],
                "chosen_length": chosen_padded["attention_mask"].sum(-1),
                "rollout_ids": padded["input_ids"], "rollout_labels": padded["labels"],
                "rollout_length": rollout_lengths,
                "old_logps": full(policy_logps), "advantages": full(advantages),
                "example_index": batch["example_index"].cpu(), "prompt_length": batch["prompt_length"][:n].cpu()}

    # -------------------------------------------------------------------- state
    def cost_facts(self) -> dict:
        return {"value_loss": self.value_loss} if self.params.advantage == "gae" else {}

    def state_dict(self) -> dict:
        from kdbench.train.state_codec import encode

        state = {"buffer": encode(self.buffer.state_dict()), "value_loss": self.value_loss}
        if self.critic is not None:
            state["critic"] = encode({"weights": self.critic.state_dict(),
                                      "optimizer": self.critic_optimizer.state_dict()})
        elif self._critic_state is not None:
            state["critic"] = self._critic_state
        return state

    def load_state_dict(self, state: dict) -> None:
        from kdbench.train.state_codec import decode

        self.buffer.load_state_dict(decode(state["buffer"]))
        self.value_loss = float(state.get("value_loss", 0.0))
        self.critic = self.critic_optimizer = None
        self._critic_state = state.get("critic")  # restored when the hidden size is known (first round)


def _check(recipe, config) -> None:
    from kdbench.train.minillm import check_rounds

    check_rounds(recipe.typed(DPPORolloutParams).ppo_epochs, config)


def _build(recipe, config, decoding, tokenizer) -> SamplingForm:
    return DPPORollouts(recipe.typed(DPPORolloutParams), recipe.typed(DPOTeacherParams).teacher_dpo_beta, decoding,
                        config.seed, config.batch_size, tokenizer.pad_token_id)


register_sampling_form(SamplingSpec("dppo_rollouts", _build, (DPPORolloutParams, GenerationParams), kinds=("guided",),
                                    needs_teacher=True, check=_check,
                                    help="DPPO: rounds of the policy's responses rewarded by the DPO teacher's "
                                         "implicit reward minus a KL penalty to the SFT student."))

__all__ = ["DPPOLossParams", "DPPORolloutParams", "DPPORollouts", "dppo_rewards"]
