"""The sensitivity statistics: variance components of a paired contrast over examples × training seeds,
the minimum detectable effect, Holm within seeds, and the control verdicts."""

from __future__ import annotations

import math

import numpy as np
import pytest

from kdbench.validity import ControlVerdict, contrast, holm_adjust, minimum_detectable_effect, variance_components


def _simulated(delta, sd_example, sd_seed, sd_residual, n, seeds, rng):
    """Scores of two arms whose differences follow d[s, i] = delta + a[i] + u[s] + e[s, i]."""
    a = rng.normal(0, sd_example, n)
    base = rng.normal(50, 10, (seeds, n))
    diffs = delta + a[None, :] + rng.normal(0, sd_seed, (seeds, 1)) + rng.normal(0, sd_residual, (seeds, n))
    first = {s + 1: list(base[s] + diffs[s]) for s in range(seeds)}
    second = {s + 1: list(base[s]) for s in range(seeds)}
    return first, second


def test_variance_components_recover_the_simulated_ones():
    rng = np.random.default_rng(0)
    estimates = []
    for _ in range(40):
        a, b = _simulated(1.0, 6.0, 2.0, 8.0, n=400, seeds=5, rng=rng)
        diffs = [np.subtract(a[s], b[s]) for s in sorted(a)]
        estimates.append(variance_components(diffs))
    var_example, var_seed, var_residual = np.mean(estimates, axis=0)
    assert var_example == pytest.approx(36.0, rel=0.1)
    assert var_residual == pytest.approx(64.0, rel=0.05)
    assert var_seed == pytest.approx(4.0, rel=0.35)  # 5 seeds per draw: the noisiest component


def test_mde_is_2_8_standard_errors_and_shrinks_with_the_design():
    assert minimum_detectable_effect(1.0) == pytest.approx(1.959964 + 0.841621, rel=1e-5)
    rng = np.random.default_rng(1)
    a, b = _simulated(0.0, 6.0, 1.0, 8.0, n=300, seeds=3, rng=rng)
    c = contrast("a", a, "b", b, n_resamples=2000)
    se = math.sqrt(c.var_example / 300 + c.var_seed / 3 + c.var_residual / (300 * 3))
    assert c.standard_error() == pytest.approx(se)
    assert c.mde() == pytest.approx(minimum_detectable_effect(se))
    assert c.mde(n=1200) < c.mde() and c.mde(seeds=10) < c.mde()
    # with a seed component, more examples alone cannot push the MDE below the seeds' floor
    assert c.mde(n=10**9) == pytest.approx(minimum_detectable_effect(math.sqrt(c.var_seed / 3)), rel=1e-3)


def test_a_real_effect_is_detected_in_every_seed_and_a_null_one_is_not():
    rng = np.random.default_rng(2)
    a, b = _simulated(4.0, 5.0, 0.5, 6.0, n=300, seeds=3, rng=rng)
    real = contrast("a", a, "b", b, n_resamples=2000)
    a0, b0 = _simulated(0.0, 5.0, 0.5, 6.0, n=300, seeds=3, rng=rng)
    null = contrast("a0", a0, "b0", b0, n_resamples=2000)
    holm_adjust([real, null])
    assert real.effect == pytest.approx(4.0, abs=1.0) and real.p_holm < 0.01 and real.same_sign_in_every_seed
    assert all(e.p_holm < 0.05 and e.ci[0] > 0 for e in real.per_seed)
    assert not null.significant()
    assert ControlVerdict("a beats b", "positive", real).passed
    assert not ControlVerdict("a0 beats b0", "positive", null).passed
    assert ControlVerdict("a0 does not beat b0", "negative", null).passed
    assert not ControlVerdict("a does not beat b", "negative", real).passed


def test_one_run_arm_pairs_with_every_seed_and_mismatched_sets_are_refused():
    teacher = {0: [90.0, 80.0, 70.0, 60.0]}
    student = {1: [50.0, 50.0, 50.0, 50.0], 2: [40.0, 60.0, 50.0, 50.0]}
    c = contrast("teacher", teacher, "student", student, n_resamples=500)
    assert c.seeds == [1, 2] and [e.effect for e in c.per_seed] == [25.0, 25.0]
    with pytest.raises(ValueError, match="different numbers of examples"):
        contrast("teacher", {0: [1.0, 2.0]}, "student", student)
