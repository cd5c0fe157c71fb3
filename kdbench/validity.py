"""How well a benchmark run can tell methods apart: paired contrasts over examples and training seeds,
their variance components, and the minimum detectable effect (MDE).

Scores come as ``{training seed: [score per example]}`` for each arm, the examples in the same order
for every arm (one test set). For two arms A and B the per-example differences are
``d[s, i] = A[s, i] − B[s, i]`` (training seed s, example i). The variance model is two-way random
effects, examples × training seeds::

    d[s, i] = δ + a[i] + u[s] + e[s, i]

``a`` is the example's lasting difference (the same item is easier for A in every seed), ``u`` a whole
seed's shift (one training run luckier than another), ``e`` the rest. With n examples and S seeds the
estimate ``d̄`` (mean over both) has variance ``σ²_a/n + σ²_u/S + σ²_e/(nS)``; the components are
estimated from the runs (σ²_a from the covariance of one example's difference across seeds, σ²_u from
the spread of the seeds' means beyond what σ²_e explains). The MDE at power 1 − β and two-sided level α
is ``(z(1 − α/2) + z(1 − β)) · SE`` — the smallest true difference the design detects 80% of the time.
An arm trained once (a teacher) pairs its one run with every seed of the other arm.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from statistics import NormalDist
from typing import Sequence

ALPHA = 0.05
POWER = 0.8


@dataclass
class SeedEffect:
    """A contrast within one training seed: mean difference, its bootstrap 95% CI over examples, the
    paired bootstrap p-value, and (filled by :func:`holm_by_seed`) the Holm-adjusted p."""

    seed: int
    effect: float
    ci: tuple[float, float]
    p: float
    p_holm: float = math.nan


@dataclass
class Contrast:
    """A − B over examples and seeds (``effect`` = mean over seeds of the per-seed mean difference)."""

    a: str
    b: str
    n: int
    seeds: list[int]
    effect: float
    ci: tuple[float, float]        # bootstrap over examples of the seed-averaged differences
    p: float                       # paired bootstrap on the seed-averaged differences
    per_seed: list[SeedEffect]
    var_example: float             # σ²_a
    var_seed: float                # σ²_u (nan with one seed)
    var_residual: float            # σ²_e (nan with one seed: then σ²_a holds the whole example variance)
    p_holm: float = math.nan

    @property
    def same_sign_in_every_seed(self) -> bool:
        signs = {math.copysign(1.0, s.effect) for s in self.per_seed if s.effect != 0}
        return len(signs) == 1 and all(s.effect != 0 for s in self.per_seed)

    def standard_error(self, n: int | None = None, seeds: int | None = None) -> float:
        """SE of the contrast for a design of ``n`` examples × ``seeds`` training seeds (default: this one)."""
        n = n or self.n
        seeds = seeds or len(self.seeds)
        if math.isnan(self.var_seed):  # one seed: no seed component can be estimated
            return math.sqrt(self.var_example / n)
        return math.sqrt(self.var_example / n + self.var_seed / seeds + self.var_residual / (n * seeds))

    def mde(self, n: int | None = None, seeds: int | None = None, *, alpha: float = ALPHA,
            power: float = POWER) -> float:
        """Minimum detectable effect (two-sided ``alpha``, ``power``) for ``n`` examples × ``seeds`` seeds."""
        return minimum_detectable_effect(self.standard_error(n, seeds), alpha=alpha, power=power)

    def significant(self, alpha: float = ALPHA) -> bool:
        p = self.p if math.isnan(self.p_holm) else self.p_holm
        return p < alpha


def minimum_detectable_effect(standard_error: float, *, alpha: float = ALPHA, power: float = POWER) -> float:
    """``(z(1 − α/2) + z(power)) · SE``: 2.80 · SE at α = 0.05 and 80% power."""
    z = NormalDist().inv_cdf
    return (z(1 - alpha / 2) + z(power)) * standard_error


def variance_components(diffs: Sequence[Sequence[float]]) -> tuple[float, float, float]:
    """(σ²_a, σ²_u, σ²_e) of the model in the module docstring from ``diffs`` [S seeds][n examples].

    σ²_a is the mean covariance across pairs of seeds of the per-example differences (clipped to
    [0, within-seed variance]); σ²_e the within-seed variance left; σ²_u = max(0, var over seeds of the
    seed means − σ²_e / n). With one seed σ²_a is the whole within-seed variance and the others are nan.
    """
    import numpy as np

    d = np.asarray(diffs, dtype=float)
    if d.ndim != 2 or d.shape[1] < 2:
        raise ValueError(f"variance_components needs [seeds][examples] with at least 2 examples, got {d.shape}")
    seeds, n = d.shape
    within = float(np.mean(np.var(d, axis=1, ddof=1)))
    if seeds == 1:
        return within, math.nan, math.nan
    centred = d - d.mean(axis=1, keepdims=True)
    covariances = [float(centred[s] @ centred[t]) / (n - 1) for s in range(seeds) for t in range(s + 1, seeds)]
    var_example = min(max(0.0, float(np.mean(covariances))), within)
    var_residual = within - var_example
    var_seed = max(0.0, float(np.var(d.mean(axis=1), ddof=1)) - var_residual / n)
    return var_example, var_seed, var_residual


def contrast(a_label: str, a: dict[int, Sequence[float]], b_label: str, b: dict[int, Sequence[float]], *,
             n_resamples: int = 10_000, seed: int = 0) -> Contrast:
    """A − B from per-seed per-example scores; an arm with one run is paired with every seed of the other."""
    import numpy as np

    from kdbench.metrics import bootstrap_ci, paired_test

    seeds = sorted(set(a) & set(b)) if len(a) > 1 and len(b) > 1 else sorted(a if len(a) > 1 else b)
    if not seeds:
        raise ValueError(f"{a_label} and {b_label} share no training seed")

    def scores(arm: dict[int, Sequence[float]], s: int) -> np.ndarray:
        return np.asarray(arm[s] if len(arm) > 1 else next(iter(arm.values())), dtype=float)

    lengths = {len(scores(arm, s)) for arm in (a, b) for s in seeds}
    if len(lengths) != 1:
        raise ValueError(f"{a_label} and {b_label} were scored on different numbers of examples: {sorted(lengths)}")
    diffs = np.stack([scores(a, s) - scores(b, s) for s in seeds])
    per_seed = []
    for row, s in zip(diffs, seeds):
        per_seed.append(SeedEffect(s, float(row.mean()), bootstrap_ci(row, seed=seed),
                                   paired_test(row, np.zeros_like(row), n_resamples=n_resamples, seed=seed)))
    averaged = diffs.mean(axis=0)
    var_example, var_seed, var_residual = variance_components(diffs)
    return Contrast(a_label, b_label, int(diffs.shape[1]), list(seeds), float(averaged.mean()),
                    bootstrap_ci(averaged, seed=seed),
                    paired_test(averaged, np.zeros_like(averaged), n_resamples=n_resamples, seed=seed),
                    per_seed, var_example, var_seed, var_residual)


def holm_adjust(contrasts: list[Contrast]) -> list[Contrast]:
    """Holm-adjust the pooled p-values across ``contrasts`` (in place) and, within each training seed, the
    per-seed p-values across the contrasts that have that seed; returns ``contrasts``."""
    from kdbench.report import holm

    for c, adjusted in zip(contrasts, holm([c.p for c in contrasts])):
        c.p_holm = adjusted
    by_seed: dict[int, list[SeedEffect]] = {}
    for c in contrasts:
        for effect in c.per_seed:
            by_seed.setdefault(effect.seed, []).append(effect)
    for effects in by_seed.values():
        for effect, adjusted in zip(effects, holm([e.p for e in effects])):
            effect.p_holm = adjusted
    return contrasts


@dataclass
class ControlVerdict:
    """A validity control: the contrast, what it must show, and whether it did."""

    name: str
    kind: str          # "positive": A must beat B significantly, in every seed; "negative": A must not beat B
    contrast: Contrast
    passed: bool = field(init=False)

    def __post_init__(self):
        c = self.contrast
        if self.kind == "positive":
            self.passed = c.effect > 0 and c.significant() and c.same_sign_in_every_seed
        else:  # not significantly better than B
            self.passed = not (c.effect > 0 and c.significant())


def fmt_p(p: float) -> str:
    if math.isnan(p):
        return "-"
    return "< 0.001" if p < 0.001 else f"{p:.3f}"


__all__ = ["Contrast", "SeedEffect", "ControlVerdict", "contrast", "holm_adjust", "minimum_detectable_effect",
           "variance_components", "ALPHA", "POWER"]
