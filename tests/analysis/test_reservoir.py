import numpy as np
import pytest

from dgpo.analysis import Reservoir


def test_reservoir_keeps_everything_until_full():
    reservoir = Reservoir(10, np.random.default_rng(0))
    reservoir.add({"x": np.arange(4)})
    reservoir.add({"x": np.arange(4, 7)})
    assert len(reservoir) == 7 and reservoir.seen == 7
    np.testing.assert_array_equal(reservoir.columns()["x"], np.arange(7))


def test_reservoir_never_exceeds_capacity_and_keeps_rows_whole():
    reservoir = Reservoir(50, np.random.default_rng(0))
    for start in range(0, 1000, 37):
        values = np.arange(start, start + 37)
        reservoir.add({"x": values, "y": -values.astype(np.float32)})
    columns = reservoir.columns()
    assert len(reservoir) == 50 and reservoir.seen == 1000 - 1000 % 37 + 37
    np.testing.assert_array_equal(columns["y"], -columns["x"].astype(np.float32))
    assert len(np.unique(columns["x"])) == 50


def test_reservoir_sample_is_uniform_over_the_stream():
    counts = np.zeros(200)
    for seed in range(400):
        reservoir = Reservoir(20, np.random.default_rng(seed))
        for start in range(0, 200, 25):
            reservoir.add({"x": np.arange(start, start + 25)})
        counts[reservoir.columns()["x"]] += 1
    inclusion = counts / 400  # each row should be kept with probability 20 / 200
    early, late = inclusion[:100].mean(), inclusion[100:].mean()
    assert abs(early - 0.1) < 0.01 and abs(late - 0.1) < 0.01
    assert inclusion.min() > 0.03 and inclusion.max() < 0.2


def test_reservoir_is_reproducible_from_its_generator():
    def sample(seed):
        reservoir = Reservoir(5, np.random.default_rng(seed))
        reservoir.add({"x": np.arange(100)})
        return reservoir.columns()["x"]

    np.testing.assert_array_equal(sample(3), sample(3))
    assert not np.array_equal(sample(3), sample(4))


def test_reservoir_rejects_bad_input():
    with pytest.raises(ValueError, match="capacity must be an integer >= 1"):
        Reservoir(0, np.random.default_rng(0))
    reservoir = Reservoir(3, np.random.default_rng(0))
    with pytest.raises(ValueError, match="one length"):
        reservoir.add({"x": np.arange(3), "y": np.arange(2)})
    reservoir.add({"x": np.arange(3)})
    with pytest.raises(ValueError, match="differ from the first batch"):
        reservoir.add({"z": np.arange(3)})
