"""Statistics across seeds with scipy: confidence intervals, paired differences, P(improvement).

A sweep has few seeds per method (typically 3 to 5). The default interval is Student's t
interval of the mean (``scipy.stats.ttest_1samp(...).confidence_interval``), which is exact for
normal noise and honest at small n; a percentile bootstrap (``scipy.stats.bootstrap``) is the
alternative (``--ci bootstrap``), but with 3 seeds it has only 10 distinct resamples and its
intervals are too narrow. The probability of improvement is the one of rliable
(Agarwal et al., 2021): P(X > Y) + ½ P(X = Y) over all pairs of runs, i.e. the Mann–Whitney U
statistic divided by n·m (``scipy.stats.mannwhitneyu``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
from scipy import stats

CIMethod = Literal["t", "bootstrap"]
CI_METHODS: tuple[str, ...] = ("t", "bootstrap")


@dataclass(frozen=True)
class Estimate:
    """A mean across seeds with its spread and confidence interval.

    Attributes:
        n: the number of values (seeds).
        mean: their mean.
        std: their sample standard deviation (ddof 1; NaN for one value).
        low: the interval's lower end (NaN for one value).
        high: the interval's upper end (NaN for one value).
    """

    n: int
    mean: float
    std: float
    low: float
    high: float

    @property
    def excludes_zero(self) -> bool:
        """Whether the interval lies entirely above or below 0."""
        return bool(self.low > 0 or self.high < 0)


def mean_ci(values: np.ndarray | list[float], level: float = 0.95, method: CIMethod = "t",
            seed: int = 0, n_resamples: int = 9999) -> Estimate:
    """The mean of ``values`` with its ``level`` confidence interval.

    Args:
        values: one number per seed.
        level: the confidence level, in (0, 1).
        method: ``"t"`` (Student's t interval) or ``"bootstrap"`` (percentile bootstrap).
        seed: the bootstrap's random generator seed (the interval is reproducible).
        n_resamples: the bootstrap's number of resamples.

    Raises:
        ValueError: for no values, a level outside (0, 1) or an unknown method.
    """
    x = np.asarray(values, dtype=float)
    if x.ndim != 1 or len(x) == 0:
        raise ValueError(f"values {values!r}: expected a non-empty list of numbers")
    if not 0 < level < 1:
        raise ValueError(f"level {level}: expected a confidence level in (0, 1)")
    if method not in CI_METHODS:
        raise ValueError(f"method {method!r}: expected one of {CI_METHODS}")
    mean = float(x.mean())
    if len(x) == 1:
        return Estimate(1, mean, float("nan"), float("nan"), float("nan"))
    std = float(x.std(ddof=1))
    if std <= 1e-12 * max(1.0, abs(mean)):  # equal up to rounding: scipy would warn and divide
        std = 0.0
        return Estimate(len(x), mean, 0.0, mean, mean)
    if method == "t":
        interval = stats.ttest_1samp(x, 0.0).confidence_interval(level)
    else:
        interval = stats.bootstrap((x,), np.mean, confidence_level=level, method="percentile",
                                   n_resamples=n_resamples,
                                   rng=np.random.default_rng(seed)).confidence_interval
    return Estimate(len(x), mean, std, float(interval.low), float(interval.high))


def shared_seeds(x: dict[int, float], y: dict[int, float]) -> list[int]:
    """The seeds both methods ran, in increasing order."""
    return sorted(set(x) & set(y))


def paired_difference(x: dict[int, float], y: dict[int, float], level: float = 0.95,
                      method: CIMethod = "t", seed: int = 0) -> Estimate:
    """The mean of ``x[s] − y[s]`` over the seeds ``s`` both share, with its interval.

    Args:
        x: a method's value per seed.
        y: the baseline's value per seed.
        level: the confidence level.
        method: see :func:`mean_ci`.
        seed: see :func:`mean_ci`.

    Raises:
        ValueError: when the two share no seed.
    """
    seeds = shared_seeds(x, y)
    if not seeds:
        raise ValueError(f"seeds {sorted(x)} and {sorted(y)}: no seed in common to pair")
    return mean_ci([x[s] - y[s] for s in seeds], level, method, seed)


def probability_of_improvement(x: list[float] | np.ndarray, y: list[float] | np.ndarray) -> float:
    """P(X > Y) + ½ P(X = Y) for a run X of one method and a run Y of the other.

    Over all ``len(x) · len(y)`` pairs: the Mann–Whitney U statistic of ``x`` over the number
    of pairs (rliable's ``probability_of_improvement`` for one task).

    Raises:
        ValueError: when either sample is empty.
    """
    if len(x) == 0 or len(y) == 0:
        raise ValueError(f"samples of sizes {len(x)} and {len(y)}: both need a value")
    u = stats.mannwhitneyu(np.asarray(x, dtype=float), np.asarray(y, dtype=float)).statistic
    return float(u) / (len(x) * len(y))
