"""A tiny autoregressive policy whose sequence distribution can be enumerated exactly (tests of the
policy-gradient estimators of MiniLLM and DPPO against the exact sequence-level objective).

Vocabulary V, fixed response length T (no EOS), one row of next-token logits per prefix (a table), so every
sequence probability and every exact gradient is a finite sum over the V^T sequences.
"""

from __future__ import annotations

import itertools

import torch


class TablePolicy:
    """Next-token logits indexed by prefix: ``table`` [n_prefixes, V]."""

    def __init__(self, vocab_size: int, length: int):
        self.vocab_size, self.length = vocab_size, length
        self.n_prefixes = sum(vocab_size ** t for t in range(length))
        self.sequences = torch.tensor(list(itertools.product(range(vocab_size), repeat=length)))

    def prefix_index(self, sequences):
        """[B, T] tokens → [B, T] index of the prefix y_<t that position t conditions on."""
        V = self.vocab_size
        index = torch.zeros_like(sequences)
        code = torch.zeros(sequences.shape[0], dtype=torch.long)
        for t in range(self.length):
            start = sum(V ** k for k in range(t))
            index[:, t] = start + code
            code = code * V + sequences[:, t]
        return index

    def logits(self, table, sequences):
        """[B, T, V] next-token logits of ``table`` along ``sequences``."""
        return table[self.prefix_index(sequences)]

    def sequence_logps(self, table, sequences):
        logits = self.logits(table, sequences)
        return torch.log_softmax(logits, -1).gather(-1, sequences.unsqueeze(-1)).squeeze(-1).sum(-1)

    def sample(self, table, n: int, generator):
        """n sequences drawn ancestrally from ``table`` (no gradient)."""
        with torch.no_grad():
            sequences = torch.zeros(n, self.length, dtype=torch.long)
            for t in range(self.length):
                logits = self.logits(table, sequences)[:, t]
                sequences[:, t] = torch.multinomial(torch.softmax(logits, -1), 1, generator=generator).squeeze(1)
            return sequences

    def random_table(self, seed: int, scale: float = 2.0):
        g = torch.Generator().manual_seed(seed)
        return torch.randn(self.n_prefixes, self.vocab_size, generator=g, dtype=torch.float64) * scale


def batched_gradient_estimates(estimate_fn, table, n_batches: int):
    """Gradient of ``estimate_fn(table, batch_index)`` w.r.t. ``table`` for each batch: [n_batches, *table]."""
    grads = []
    for k in range(n_batches):
        theta = table.detach().clone().requires_grad_()
        (grad,) = torch.autograd.grad(estimate_fn(theta, k), theta)
        grads.append(grad)
    return torch.stack(grads)


def assert_within_monte_carlo_error(estimates, exact, *, sigmas: float = 4.5):
    """Every component of the mean of ``estimates`` [K, ...] lies within ``sigmas`` standard errors of
    ``exact`` (plus a tiny absolute slack for components with no variance)."""
    mean = estimates.mean(0)
    standard_error = estimates.std(0) / estimates.shape[0] ** 0.5
    gap = (mean - exact).abs()
    worst = (gap / (sigmas * standard_error + 1e-9)).max()
    assert bool((gap <= sigmas * standard_error + 1e-9).all()), (
        f"estimator gradient is off the exact gradient by up to {float(worst):.1f}×{sigmas} standard errors")
