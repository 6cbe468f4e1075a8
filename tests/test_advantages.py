import math
from typing import get_args

import pytest
import torch
from jsonargparse import ArgumentParser
from torch import Tensor
from torch.testing import assert_close

from dgpo.advantages import (
    ESTIMATORS,
    AdvantageEstimator,
    DrGRPOAdvantage,
    EstimatorName,
    GRPOAdvantage,
    ReinforcePlusPlusBaseline,
    RLOOAdvantage,
    compute_advantages,
    dr_grpo_advantages,
    group_stats,
    grpo_advantages,
    resolve_advantage,
    rloo_advantages,
)

NAMES = ["grpo", "dr_grpo", "rloo", "reinforce_plus_plus_baseline"]


def test_grpo_advantages_hand_computed() -> None:
    # mean 0.25; unbiased std sqrt((0.75^2 + 3 * 0.25^2) / 3) = 0.5
    rewards = torch.tensor([[1.0, 0.0, 0.0, 0.0]])
    assert_close(grpo_advantages(rewards, eps=0.0), torch.tensor([[1.5, -0.5, -0.5, -0.5]]))
    expected = torch.tensor([[0.75, -0.25, -0.25, -0.25]]) / (0.5 + 1e-6)
    assert_close(grpo_advantages(rewards), expected)


def test_grpo_advantages_two_samples() -> None:
    # n = 2: mean 0.5, unbiased std sqrt(0.25 + 0.25) = 1 / sqrt(2)
    rewards = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    half = 1 / math.sqrt(2)
    expected = torch.tensor([[half, -half], [-half, half]])
    assert_close(grpo_advantages(rewards, eps=0.0), expected)


def test_grpo_advantages_unbiased_std_matches_torch() -> None:
    rewards = torch.rand(5, 7, generator=torch.Generator().manual_seed(0))
    mean = rewards.mean(dim=1, keepdim=True)
    std = rewards.std(dim=1, unbiased=True, keepdim=True)
    assert_close(grpo_advantages(rewards, eps=1e-6), (rewards - mean) / (std + 1e-6))


def test_grpo_advantages_single_sample_groups_are_zero() -> None:
    advantages = grpo_advantages(torch.tensor([[1.0], [0.0]]))
    assert torch.equal(advantages, torch.zeros(2, 1))


def test_dr_grpo_advantages_hand_computed() -> None:
    rewards = torch.tensor([[1.0, 0.0, 0.0, 0.0], [2.0, 1.0, 0.0, 1.0]])
    expected = torch.tensor([[0.75, -0.25, -0.25, -0.25], [1.0, 0.0, -1.0, 0.0]])
    assert_close(dr_grpo_advantages(rewards), expected)


def test_rloo_advantages_hand_computed() -> None:
    # r_i minus the mean of the other three: 1 - 0 = 1 and 0 - 1/3
    rewards = torch.tensor([[1.0, 0.0, 0.0, 0.0]])
    third = 1 / 3
    assert_close(rloo_advantages(rewards), torch.tensor([[1.0, -third, -third, -third]]))
    # n = 2: each sample's baseline is the other sample
    assert_close(rloo_advantages(torch.tensor([[1.0, 0.25]])), torch.tensor([[0.75, -0.75]]))


def test_rloo_advantages_leave_one_out_formula() -> None:
    rewards = torch.rand(4, 5, generator=torch.Generator().manual_seed(1))
    expected = torch.empty_like(rewards)
    for g in range(4):
        for i in range(5):
            others = torch.cat([rewards[g, :i], rewards[g, i + 1 :]])
            expected[g, i] = rewards[g, i] - others.mean()
    assert_close(rloo_advantages(rewards), expected)
    centred = rewards - rewards.mean(dim=1, keepdim=True)
    assert_close(rloo_advantages(rewards), 5 / 4 * centred)


@pytest.mark.parametrize("estimator", NAMES)
@pytest.mark.parametrize("eps", [0.0, 1e-6])
def test_compute_advantages_constant_groups_exactly_zero(estimator: str, eps: float) -> None:
    # 0.1 * 3 / 3 != 0.1 in floating point: constant groups must still give exact zeros.
    rewards = torch.tensor([[1.0, 1.0, 1.0], [0.0, 0.0, 0.0], [0.1, 0.1, 0.1], [1.0, 0.0, 0.0]])
    advantages = compute_advantages(rewards, estimator, eps=eps)
    assert torch.isfinite(advantages).all()
    assert torch.equal(advantages[:3], torch.zeros(3, 3))
    assert (advantages[3] != 0).all()


@pytest.mark.parametrize("estimator", NAMES)
def test_compute_advantages_matches_estimator_functions(estimator: str) -> None:
    rewards = torch.rand(3, 4, generator=torch.Generator().manual_seed(2))
    functions = {
        "grpo": lambda r: grpo_advantages(r, eps=1e-3),
        "dr_grpo": dr_grpo_advantages,
        "rloo": rloo_advantages,
        "reinforce_plus_plus_baseline": ReinforcePlusPlusBaseline(eps=1e-3),
    }
    assert_close(compute_advantages(rewards, estimator, eps=1e-3), functions[estimator](rewards))


@pytest.mark.parametrize("estimator", NAMES)
def test_compute_advantages_shape_and_dtype(estimator: str) -> None:
    rewards = torch.rand(6, 3, dtype=torch.float64)
    advantages = compute_advantages(rewards, estimator)
    assert advantages.shape == (6, 3)
    assert advantages.dtype == torch.float64
    ints = compute_advantages(torch.tensor([[1, 0], [1, 1]]), estimator)
    assert ints.dtype == torch.get_default_dtype()


@pytest.mark.parametrize("estimator", NAMES)
def test_compute_advantages_zero_mean_per_group(estimator: str) -> None:
    rewards = torch.rand(8, 6, generator=torch.Generator().manual_seed(3))
    advantages = compute_advantages(rewards, estimator)
    assert_close(advantages.sum(dim=1), torch.zeros(8), atol=1e-5, rtol=0)


def test_compute_advantages_unknown_estimator_lists_valid() -> None:
    valid = r"\['dr_grpo', 'grpo', 'reinforce_plus_plus_baseline', 'rloo'\]"
    with pytest.raises(ValueError, match=r"'ppo'.*" + valid):
        compute_advantages(torch.zeros(2, 2), "ppo")  # type: ignore[arg-type]  # bad on purpose


@pytest.mark.parametrize("estimator", NAMES)
@pytest.mark.parametrize(
    ("rewards", "match"),
    [
        (torch.zeros(4), r"shape \(num_groups, n\), got \(4,\)"),
        (torch.zeros(2, 2, 2), r"got \(2, 2, 2\)"),
        (torch.zeros(0, 4), "at least one group"),
        (torch.zeros(3, 0), "n=0"),
        (torch.tensor([[1.0, float("nan")]]), "finite"),
        (torch.tensor([[1.0, float("inf")]]), "finite"),
        ([[1.0, 0.0]], "torch.Tensor"),
    ],
)
def test_compute_advantages_bad_rewards(estimator: str, rewards: object, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        compute_advantages(rewards, estimator)  # type: ignore[arg-type]  # bad on purpose


def test_rloo_advantages_single_sample_raises() -> None:
    with pytest.raises(ValueError, match=r"at least 2 samples per group, got n=1"):
        rloo_advantages(torch.zeros(3, 1))


def test_grpo_advantages_negative_eps_raises() -> None:
    with pytest.raises(ValueError, match="eps must be >= 0, got -1"):
        grpo_advantages(torch.zeros(2, 2), eps=-1.0)


def test_group_stats_hand_computed() -> None:
    correct = torch.tensor([[True, True], [False, True], [False, False], [True, False]])
    assert group_stats(correct) == {"solve_all": 0.25, "solve_none": 0.25, "zero_variance": 0.5}


def test_group_stats_zero_variance_from_rewards() -> None:
    correct = torch.tensor([[True, True], [True, True], [False, False], [True, False]])
    # group 1 is all correct but a format bonus differs: it still has reward variance
    rewards = torch.tensor([[1.1, 1.1], [1.1, 1.0], [0.0, 0.0], [1.0, 0.0]])
    stats = group_stats(correct, rewards)
    assert stats == {"solve_all": 0.5, "solve_none": 0.25, "zero_variance": 0.5}


def test_group_stats_bad_input() -> None:
    with pytest.raises(ValueError, match=r"torch.bool.*got torch.float32"):
        group_stats(torch.ones(2, 2))
    with pytest.raises(ValueError, match=r"shape \(num_groups, n\), got \(4,\)"):
        group_stats(torch.ones(4, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"shape of correct \(2, 2\), got \(2, 3\)"):
        group_stats(torch.ones(2, 2, dtype=torch.bool), torch.zeros(2, 3))


def test_estimators_mapping_matches_literal_and_is_read_only() -> None:
    assert sorted(ESTIMATORS) == sorted(get_args(EstimatorName))
    with pytest.raises(TypeError):
        ESTIMATORS["mine"] = rloo_advantages  # type: ignore[index]  # read-only on purpose


def test_reinforce_plus_plus_baseline_hand_computed() -> None:
    # centred [[.75, -.25, -.25, -.25], [.5, .5, -.5, -.5]]; batch variance 1.75 / 7 → std 0.5
    rewards = torch.tensor([[1.0, 0.0, 0.0, 0.0], [1.0, 1.0, 0.0, 0.0]])
    expected = torch.tensor([[1.5, -0.5, -0.5, -0.5], [1.0, 1.0, -1.0, -1.0]])
    assert_close(ReinforcePlusPlusBaseline(eps=0.0)(rewards), expected)
    assert_close(ReinforcePlusPlusBaseline()(rewards), expected * 0.5 / (0.5 + 1e-6))


def test_reinforce_plus_plus_baseline_normalises_over_the_batch_not_the_group() -> None:
    # the same group with a different neighbour gets a different scale (GRPO's would not change)
    group = [1.0, 0.0, 0.0, 0.0]
    quiet = ReinforcePlusPlusBaseline(eps=0.0)(torch.tensor([group, [0.1, 0.0, 0.0, 0.0]]))
    loud = ReinforcePlusPlusBaseline(eps=0.0)(torch.tensor([group, [5.0, 0.0, 0.0, 0.0]]))
    assert not torch.allclose(quiet[0], loud[0])
    centred = torch.tensor([group, [5.0, 0.0, 0.0, 0.0]])
    centred = centred - centred.mean(dim=1, keepdim=True)
    assert_close(loud, centred / centred.flatten().std())


def test_reinforce_plus_plus_baseline_single_samples_use_the_batch_mean() -> None:
    # n = 1 (verl: no group baseline): (r − 0.5) / unbiased std sqrt(1/3)
    rewards = torch.tensor([[1.0], [0.0], [0.0], [1.0]])
    expected = torch.tensor([[0.5], [-0.5], [-0.5], [0.5]]) * math.sqrt(3)
    assert_close(ReinforcePlusPlusBaseline(eps=0.0)(rewards), expected)
    assert torch.equal(ReinforcePlusPlusBaseline()(torch.full((5, 1), 0.1)), torch.zeros(5, 1))
    assert torch.equal(ReinforcePlusPlusBaseline()(torch.tensor([[0.3]])), torch.zeros(1, 1))


def test_estimator_classes_match_the_functions_and_state_their_group_size() -> None:
    rewards = torch.rand(4, 5, generator=torch.Generator().manual_seed(4))
    assert_close(GRPOAdvantage(eps=1e-3)(rewards), grpo_advantages(rewards, eps=1e-3))
    assert_close(DrGRPOAdvantage()(rewards), dr_grpo_advantages(rewards))
    assert_close(RLOOAdvantage()(rewards), rloo_advantages(rewards))
    sizes = {name: cls.min_group_size for name, cls in ESTIMATORS.items()}
    assert sizes == {"grpo": 2, "dr_grpo": 2, "rloo": 2, "reinforce_plus_plus_baseline": 1}
    with pytest.raises(ValueError, match="eps must be >= 0, got -1"):
        GRPOAdvantage(eps=-1.0)
    with pytest.raises(ValueError, match="eps must be >= 0, got -0.5"):
        ReinforcePlusPlusBaseline(eps=-0.5)


class MedianBaseline(AdvantageEstimator):
    """A user's estimator: the reward minus the group median, scaled."""

    min_group_size = 3

    def __init__(self, scale: float = 1.0) -> None:
        self.scale = scale

    def __call__(self, rewards: Tensor) -> Tensor:
        return self.scale * (rewards - rewards.median(dim=1, keepdim=True).values)


def test_resolve_advantage_names_instances_and_errors() -> None:
    assert type(resolve_advantage("rloo")) is RLOOAdvantage
    assert type(resolve_advantage("reinforce_plus_plus_baseline")) is ReinforcePlusPlusBaseline
    mine = MedianBaseline(scale=2.0)
    assert resolve_advantage(mine) is mine
    with pytest.raises(ValueError, match=r"unknown advantage estimator 'ppo'; valid estimators: "
                                         r"\['dr_grpo', 'grpo', "):
        resolve_advantage("ppo")
    with pytest.raises(ValueError, match="'my.Estimator' is not a dgpo.advantages.AdvantageEst"):
        resolve_advantage("my.Estimator")
    with pytest.raises(ValueError, match="got int"):
        resolve_advantage(3)  # type: ignore[arg-type]  # bad on purpose
    assert_close(compute_advantages(torch.tensor([[3.0, 1.0, 0.0]]), mine),
                 torch.tensor([[4.0, 0.0, -2.0]]))


def test_user_estimator_is_selected_by_class_path() -> None:
    parser = ArgumentParser()
    parser.add_argument("--advantage", type=AdvantageEstimator | str, default="grpo")
    config = parser.parse_args(["--advantage", "rloo"])
    assert config.advantage == "rloo"
    assert type(resolve_advantage(parser.instantiate_classes(config).advantage)) is RLOOAdvantage
    config = parser.parse_object({"advantage": {
        "class_path": "tests.test_advantages.MedianBaseline", "init_args": {"scale": 0.5}}})
    estimator = resolve_advantage(parser.instantiate_classes(config).advantage)
    assert type(estimator).__name__ == "MedianBaseline" and estimator.scale == 0.5
    assert estimator.min_group_size == 3
    assert_close(estimator(torch.tensor([[3.0, 1.0, 0.0]])), torch.tensor([[1.0, 0.0, -0.5]]))
    builtin = parser.parse_object({"advantage": {
        "class_path": "dgpo.advantages.GRPOAdvantage", "init_args": {"eps": 0.01}}})
    assert resolve_advantage(parser.instantiate_classes(builtin).advantage).eps == 0.01
