"""A bounded, uniform sample of rows from a stream of column batches (reservoir sampling)."""

from __future__ import annotations

import numpy as np


class Reservoir:
    """Keeps at most ``capacity`` rows, a uniform random sample of every row ever added.

    Rows arrive as batches of equal-length NumPy columns. Until ``capacity`` rows have been seen
    every row is kept; after that, the ``i``-th row seen (0-based) replaces a random kept row with
    probability ``capacity / (i + 1)`` (Vitter's Algorithm R), so at any time the kept rows are a
    uniform sample of all rows seen. Memory is ``capacity`` rows, whatever the stream's length.
    The random draws come from the generator passed in, never from global state.

    Args:
        capacity: the largest number of rows kept, ≥ 1.
        rng: the NumPy generator of the replacement draws.

    Attributes:
        seen: how many rows were added in total.

    Raises:
        ValueError: for a capacity below 1, or a batch whose columns differ from the first's.

    Example:
        >>> reservoir = Reservoir(3, np.random.default_rng(0))
        >>> reservoir.add({"x": np.arange(10)})
        >>> len(reservoir), reservoir.seen
        (3, 10)
    """

    def __init__(self, capacity: int, rng: np.random.Generator) -> None:
        if isinstance(capacity, bool) or not isinstance(capacity, int) or capacity < 1:
            raise ValueError(f"capacity must be an integer >= 1, got {capacity!r}")
        self.capacity = capacity
        self.seen = 0
        self._rng = rng
        self._columns: dict[str, np.ndarray] = {}
        self._size = 0

    def __len__(self) -> int:
        return self._size

    def add(self, batch: dict[str, np.ndarray]) -> None:
        """Offer a batch of rows (a dict of equal-length 1-D arrays) to the sample."""
        lengths = {len(column) for column in batch.values()}
        if len(lengths) != 1:
            raise ValueError(f"the columns of a batch must have one length, got {sorted(lengths)}")
        (count,) = lengths
        if not self._columns:
            self._columns = {name: np.empty(self.capacity, dtype=column.dtype)
                             for name, column in batch.items()}
        elif batch.keys() != self._columns.keys():
            raise ValueError(f"batch columns {sorted(batch)} differ from the first batch's "
                             f"{sorted(self._columns)}")
        fill = min(self.capacity - self._size, count)
        for name, column in batch.items():
            self._columns[name][self._size:self._size + fill] = column[:fill]
        self._size += fill
        self.seen += fill
        rest = count - fill
        if rest == 0:
            return
        index = self.seen + np.arange(rest)  # 0-based stream index of each remaining row
        slots = np.floor(self._rng.random(rest) * (index + 1)).astype(np.int64)
        chosen = np.flatnonzero(slots < self.capacity)
        # Two rows drawing one slot: the later row wins, as in the sequential algorithm.
        _, last = np.unique(slots[chosen][::-1], return_index=True)
        chosen = chosen[::-1][last]
        for name, column in batch.items():
            self._columns[name][slots[chosen]] = column[fill:][chosen]
        self.seen += rest

    def columns(self) -> dict[str, np.ndarray]:
        """The kept rows (copies), in slot order."""
        return {name: column[:self._size].copy() for name, column in self._columns.items()}
