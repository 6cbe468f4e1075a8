"""One run seed for every random choice of a run, and independent streams derived from it.

``seed_everything`` (LightningCLI's top-level key) seeds the global RNGs and records the seed in
the environment variable ``PL_GLOBAL_SEED``; :func:`run_seed` reads it back, so components that
keep RNG streams of their own (prompt order, sampling, mini-batch shuffles, synthetic tasks) follow
the run seed unless they were given an explicit seed. :func:`derive_seed` turns the run seed and a
tuple of keys (epoch, prompt, sample, ...) into a 63-bit seed with NumPy's ``SeedSequence``, whose
spawn keys give statistically independent streams: no two (run seed, keys) share a stream, unlike
``seed + epoch + index`` arithmetic, which reuses streams across epochs and runs.
"""

from __future__ import annotations

import os

import numpy as np

#: The environment variable that ``lightning.seed_everything`` sets.
SEED_VARIABLE = "PL_GLOBAL_SEED"


def run_seed(explicit: int | None = None) -> int:
    """The seed a component uses: ``explicit`` when given, else the run's ``seed_everything``.

    Args:
        explicit: a component's own ``seed`` argument (``None``: follow the run seed).

    Returns:
        ``explicit``, else the seed recorded by ``seed_everything`` (0 when none was set).

    Raises:
        ValueError: for a negative or non-integer seed.
    """
    seed = explicit if explicit is not None else int(os.environ.get(SEED_VARIABLE, "0"))
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"a seed must be an integer >= 0 or None, got {seed!r}")
    return seed


def derive_seed(seed: int, *keys: int) -> int:
    """A 63-bit seed for the stream ``keys`` (e.g. ``(epoch, prompt, sample)``) of run ``seed``.

    Example:
        >>> derive_seed(0, 1, 2) == derive_seed(0, 1, 2) != derive_seed(0, 2, 1)
        True
    """
    state = np.random.SeedSequence(seed, spawn_key=tuple(int(k) for k in keys))
    high, low = state.generate_state(2, dtype=np.uint32).tolist()
    return ((high << 32) | low) >> 1
