import itertools
import math

import numpy as np
import pytest

from dgpo.sweep.stats import mean_ci, paired_difference, probability_of_improvement

T_975_DF2 = 4.302652729749462  # Student t 97.5% quantile, 2 degrees of freedom (tables: 4.303)


def test_mean_ci_t_interval_by_hand():
    est = mean_ci([1.0, 2.0, 4.0])
    mean, sd = 7 / 3, math.sqrt(7 / 3)  # sum of squared deviations 42/9, over n-1 = 2
    half = T_975_DF2 * sd / math.sqrt(3)
    assert est.n == 3
    assert est.mean == pytest.approx(mean)
    assert est.std == pytest.approx(sd)
    assert (est.low, est.high) == pytest.approx((mean - half, mean + half))
    assert (est.low, est.high) == pytest.approx((-1.46125, 6.12792), abs=1e-5)


def test_mean_ci_bootstrap_matches_exact_bootstrap_distribution():
    # The 27 equally likely resamples of [1, 2, 4] put mass 1/27 > 2.5% on the means 1 and 4,
    # so the exact percentile bootstrap's 95% interval is [1, 4].
    means = sorted(np.mean(s) for s in itertools.product([1.0, 2.0, 4.0], repeat=3))
    assert means[0] == 1.0 and means[-1] == 4.0 and 1 / 27 > 0.025
    est = mean_ci([1.0, 2.0, 4.0], method="bootstrap", seed=0)
    assert (est.low, est.high) == (1.0, 4.0)


def test_mean_ci_bootstrap_matches_numpy_resampling():
    x = np.random.default_rng(1).normal(size=20)
    rng = np.random.default_rng(2)
    resampled = x[rng.integers(0, len(x), size=(40000, len(x)))].mean(axis=1)
    expected = np.percentile(resampled, [2.5, 97.5])
    est = mean_ci(x, method="bootstrap", seed=0)
    assert (est.low, est.high) == pytest.approx(tuple(expected), abs=0.03)


def test_mean_ci_bootstrap_is_reproducible():
    x = [0.3, 0.1, 0.5, 0.45, 0.2]
    assert mean_ci(x, method="bootstrap", seed=3) == mean_ci(x, method="bootstrap", seed=3)


def test_mean_ci_degenerate_samples():
    one = mean_ci([0.7])
    assert one.mean == 0.7 and all(math.isnan(v) for v in (one.std, one.low, one.high))
    same = mean_ci([0.5, 0.5, 0.5])
    assert (same.std, same.low, same.high) == (0.0, 0.5, 0.5)


def test_mean_ci_rejects_bad_input():
    with pytest.raises(ValueError, match="non-empty"):
        mean_ci([])
    with pytest.raises(ValueError, match=r"level 1\.5"):
        mean_ci([1.0, 2.0], level=1.5)
    with pytest.raises(ValueError, match="'jackknife'"):
        mean_ci([1.0, 2.0], method="jackknife")  # type: ignore[arg-type]  (the bad value)


def test_paired_difference_by_hand():
    x = {0: 0.5, 1: 0.7, 2: 0.6, 3: 0.9}  # seed 3 has no baseline run: not paired
    y = {0: 0.4, 1: 0.5, 2: 0.7}
    est = paired_difference(x, y)
    # differences 0.1, 0.2, -0.1: mean 0.2/3; squared deviations 1/900 + 16/900 + 25/900
    mean, sd = 0.2 / 3, math.sqrt(42 / 900 / 2)
    half = T_975_DF2 * sd / math.sqrt(3)
    assert est.n == 3
    assert est.mean == pytest.approx(mean)
    assert (est.low, est.high) == pytest.approx((mean - half, mean + half))
    assert not est.excludes_zero


def test_paired_difference_needs_a_shared_seed():
    with pytest.raises(ValueError, match=r"seeds \[0\] and \[1\]"):
        paired_difference({0: 1.0}, {1: 1.0})


def test_probability_of_improvement_hand_cases():
    # pairs (1,2) (1,2) lose, (3,2) (3,2) win
    assert probability_of_improvement([1.0, 3.0], [2.0, 2.0]) == 0.5
    # (2,2) tie: 1/2; (2,1) (3,2) (3,1) win: 3.5 / 4
    assert probability_of_improvement([2.0, 3.0], [2.0, 1.0]) == 0.875
    assert probability_of_improvement([5.0, 6.0, 7.0], [1.0, 2.0, 3.0]) == 1.0
    with pytest.raises(ValueError, match="sizes 0 and 1"):
        probability_of_improvement([], [1.0])
