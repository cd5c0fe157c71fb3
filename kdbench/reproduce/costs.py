"""Compute estimates of a reproduction plan: tokens and FLOPs per stage, converted to hours.

* **Measured**: ``measured_costs.json`` holds what ``benchmarks/reproduce_costs.py`` measured on this
  repository's CPU (GPT-2 base, a training step and sampled generation): achieved FLOP/s for training and for
  generation. CPU-hours = a stage's FLOPs / those.
* **Stated device conversion** (not measured here, there is no GPU): :data:`DEVICE`, an NVIDIA A100-SXM4-80GB
  at its bf16 dense peak of 312 TFLOP/s, assumed to reach 40% of peak in training (a typical model-FLOPs
  utilisation for transformers' Trainer at these sizes) and 5% in generation (batched decoding with the KV
  cache is memory-bound). GPU-hours = FLOPs / (peak x utilisation).
* FLOP counts: 6 N per trained token (forward + backward), 2 N per token of a teacher forward pass, of a scored
  (lm-eval) token, and of a generated token (N = the model's parameters).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from importlib import resources

DEVICE = {"name": "NVIDIA A100-SXM4-80GB", "peak_flops": 312e12, "train_utilisation": 0.40,
          "generate_utilisation": 0.05}


def measured() -> dict:
    """The CPU figures committed by benchmarks/reproduce_costs.py."""
    text = resources.files("kdbench.reproduce").joinpath("measured_costs.json").read_text(encoding="utf-8")
    return json.loads(text)


@dataclass
class Compute:
    """FLOPs of a stage split by kind (training-like and generation-like), and its token count."""

    tokens: float = 0.0
    train_flops: float = 0.0
    generate_flops: float = 0.0

    def add(self, other: "Compute") -> "Compute":
        return Compute(self.tokens + other.tokens, self.train_flops + other.train_flops,
                       self.generate_flops + other.generate_flops)

    def cpu_hours(self, figures: dict) -> float:
        return (self.train_flops / figures["train_flops_per_second"]
                + self.generate_flops / figures["generate_flops_per_second"]) / 3600

    def gpu_hours(self) -> float:
        peak = DEVICE["peak_flops"]
        return (self.train_flops / (peak * DEVICE["train_utilisation"])
                + self.generate_flops / (peak * DEVICE["generate_utilisation"])) / 3600


def training(params_b: float, tokens: float) -> Compute:
    """Forward + backward of a ``params_b``-billion model over ``tokens`` tokens."""
    return Compute(tokens, 6 * params_b * 1e9 * tokens, 0.0)


def forward(params_b: float, tokens: float) -> Compute:
    """A forward pass (teacher logits, log-probs, lm-eval scoring): counted at the training rate."""
    return Compute(tokens, 2 * params_b * 1e9 * tokens, 0.0)


def generation(params_b: float, tokens: float) -> Compute:
    """Generating ``tokens`` new tokens (the prompt's prefill is small beside it and not counted)."""
    return Compute(tokens, 0.0, 2 * params_b * 1e9 * tokens)


def conversion_note(figures: dict) -> str:
    """The plain statement of where the hours come from, printed under every plan."""
    return (f"CPU-hours from measured throughput on {figures['device']} ({figures['model']}: "
            f"{figures['train_tokens_per_second']:.2f} trained tokens/s = {figures['train_flops_per_second'] / 1e9:.1f} "
            f"GFLOP/s, {figures['generate_tokens_per_second']:.2f} generated tokens/s = "
            f"{figures['generate_flops_per_second'] / 1e9:.2f} GFLOP/s; benchmarks/reproduce_costs.py). GPU-hours on "
            f"one {DEVICE['name']} are NOT measured: they assume {DEVICE['peak_flops'] / 1e12:.0f} TFLOP/s bf16 peak at "
            f"{DEVICE['train_utilisation']:.0%} utilisation in training and {DEVICE['generate_utilisation']:.0%} in "
            "generation, with 6N FLOPs per trained token and 2N per forward or generated token.")


__all__ = ["DEVICE", "Compute", "measured", "training", "forward", "generation", "conversion_note"]
