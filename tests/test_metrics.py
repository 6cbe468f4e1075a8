"""Avg@k, unbiased Pass@k and Maj@k against exact arithmetic, hand-computed values and 2 ranks."""

import math
import random
from fractions import Fraction

import pytest
import torch

from dgpo.metrics import AvgAtK, MajAtK, PassAtK, answer_ids, pass_at_k, pass_at_k_per_problem


def exact_pass_at_k(n: int, c: int, k: int) -> Fraction:
    return 1 - Fraction(math.comb(n - c, k), math.comb(n, k))


def correctness(n: int, c: int, generator: random.Random) -> list[bool]:
    row = [True] * c + [False] * (n - c)
    generator.shuffle(row)
    return row


def cases() -> list[tuple[int, int, int]]:
    generator = random.Random(0)
    found = []
    for _ in range(300):
        n = generator.randint(1, 64)
        found.append((n, generator.randint(0, n), generator.randint(1, n)))
    # the edges: no correct sample, all correct, n - c < k, k = n, k = 1, large n
    found += [(8, 0, 3), (8, 8, 3), (8, 6, 3), (8, 5, 3), (32, 1, 32), (32, 0, 32), (1, 1, 1),
              (1, 0, 1), (512, 3, 256), (1024, 1, 1), (1024, 1000, 30)]
    return found


@pytest.mark.parametrize(("n", "c", "k"), cases())
def test_pass_at_k_matches_exact_combinatorics(n: int, c: int, k: int) -> None:
    exact = exact_pass_at_k(n, c, k)
    assert pass_at_k(n, c, k) == pytest.approx(float(exact), rel=1e-12, abs=1e-14)
    if n - c < k:
        assert pass_at_k(n, c, k) == 1.0
    if c == 0:
        assert pass_at_k(n, c, k) == 0.0


def test_pass_at_k_metric_matches_exact_mean_over_problems() -> None:
    generator = random.Random(1)
    for n in (1, 2, 5, 16, 33, 64):
        rows = [correctness(n, generator.randint(0, n), generator) for _ in range(40)]
        rows += [[False] * n, [True] * n]  # c = 0 and c = n
        correct = torch.tensor(rows)
        for k in sorted({1, (n + 1) // 2, n}):
            exact = sum(exact_pass_at_k(n, sum(row), k) for row in rows) / len(rows)
            per_problem = pass_at_k_per_problem(correct, k)
            assert per_problem.dtype == torch.float64
            for row, value in zip(rows, per_problem.tolist(), strict=True):
                assert value == pytest.approx(float(exact_pass_at_k(n, sum(row), k)), abs=1e-13)
            metric = PassAtK(k)
            metric.update(correct[:10])
            metric.update(correct[10:])
            assert metric.compute().item() == pytest.approx(float(exact), abs=1e-13)


def test_pass_at_k_more_than_n_samples_is_an_error() -> None:
    with pytest.raises(ValueError, match=r"k <= n .* got k=5 > n=4"):
        pass_at_k(4, 1, 5)
    with pytest.raises(ValueError, match=r"got k=5 > n=4"):
        PassAtK(5).update(torch.zeros(3, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="k must be an integer >= 1, got 0"):
        PassAtK(0)
    with pytest.raises(ValueError, match=r"c must be in \[0, n=4\], got c=5"):
        pass_at_k(4, 5, 1)
    with pytest.raises(ValueError, match=r"shape \(problems, samples\)"):
        PassAtK(1).update(torch.zeros(4, dtype=torch.bool))


def test_avg_at_k_hand_computed() -> None:
    metric = AvgAtK()
    metric.update(torch.tensor([[1, 0, 0, 0], [1, 1, 1, 1]], dtype=torch.bool))  # 0.25, 1
    metric.update(torch.tensor([[0, 0, 1, 1]], dtype=torch.bool))  # 0.5
    assert metric.compute().item() == pytest.approx((0.25 + 1.0 + 0.5) / 3)
    partial = AvgAtK()(torch.tensor([[0.5, 1.0], [0.0, 0.0]]))  # partial credit is averaged
    assert partial.item() == pytest.approx(0.375)


def test_maj_at_k_hand_computed() -> None:
    correct = torch.tensor([
        [True, True, False, False, False],  # "a" ×2 correct, "b" ×2, "c": tie a/b → 0.5
        [False, False, False, True, False],  # "x" ×3 wrong, "y" right → 0
        [False, False, True, False, False],  # None ×4 and one right answer → 1
        [False, False, False, False, False],  # no answer at all → 0
        [True, False, False, True, True],  # "7" ×3 right, "8", "9" → 1
    ])
    answers = answer_ids([
        ["a", "a", "b", "b", "c"],
        ["x", "x", "x", "y", " x "],
        [None, None, "4", None, None],
        [None] * 5,
        ["7", "8", "9", "7", "7"],
    ])
    assert answers[1].tolist() == [0, 0, 0, 1, 0]  # whitespace does not split an answer
    metric = MajAtK()
    metric.update(correct, answers)
    assert metric.compute().item() == pytest.approx((0.5 + 0 + 1 + 0 + 1) / 5)
    # the order of the samples does not matter
    order = torch.tensor([4, 2, 0, 3, 1])
    assert MajAtK()(correct[:, order], answers[:, order]).item() == pytest.approx(2.5 / 5)


def test_maj_at_k_bad_answer_ids() -> None:
    with pytest.raises(ValueError, match="answers must have the shape"):
        MajAtK().update(torch.zeros(2, 3, dtype=torch.bool), torch.zeros(2, 2, dtype=torch.long))
    with pytest.raises(ValueError, match=r"answer ids must be in \[-1, 3\)"):
        MajAtK().update(torch.zeros(1, 3, dtype=torch.bool), torch.tensor([[0, 1, 3]]))


def simulated_ranks(make, world_size: int = 2) -> list:
    """Metrics of ``world_size`` ranks whose sync gathers the states of all of them."""
    ranks: list = []

    def gather(tensor: torch.Tensor, group=None) -> list[torch.Tensor]:
        owner = next(m for m in ranks if any(tensor is getattr(m, name) for name in m._defaults))
        name = next(name for name in owner._defaults if getattr(owner, name) is tensor)
        return [getattr(m, name).clone() for m in ranks]

    ranks += [make(dist_sync_fn=gather, distributed_available_fn=lambda: True)
              for _ in range(world_size)]
    return ranks


@pytest.mark.parametrize("name", ["avg", "pass@1", "pass@3", "maj"])
def test_metrics_two_ranks_equal_one_rank(name: str) -> None:
    generator = torch.Generator().manual_seed(0)
    correct = torch.rand(9, 6, generator=generator) < 0.3
    answers = torch.randint(-1, 3, (9, 6), generator=generator)
    correct &= answers == 0  # answer 0 is the right one
    if name == "avg":
        make = AvgAtK
    elif name == "maj":
        make = MajAtK
    else:
        k = int(name.split("@")[1])

        def make(**kwargs):
            return PassAtK(k, **kwargs)

    args = (correct, answers) if name == "maj" else (correct,)
    single = make()
    single.update(*args)
    ranks = simulated_ranks(make)
    ranks[0].update(*(a[:4] for a in args))  # unequal shards, as UnrepeatedDistributedSampler
    ranks[1].update(*(a[4:] for a in args))
    assert ranks[0].compute().item() == pytest.approx(single.compute().item(), abs=1e-12)
    assert ranks[0].problems.item() == 4, "the local state is restored after the sync"
