"""The rollout metrics of one epoch, against numbers worked by hand."""

import math

import pytest
import torch

from dgpo.rewards import RewardOutput
from dgpo.rollout.engine import Completion
from dgpo.rollout.groups import Batch, Draw
from dgpo.rollout.metrics import rollout_metrics


def _completion(index: int, length: int, finish: str) -> Completion:
    return Completion(prompt_index=index, token_ids=list(range(length)), text="x",
                      finish_reason=finish, logprobs=None)


def test_rollout_metrics_by_hand():
    # 2 prompts x 2 samples: lengths 2, 4 | 6, 8; the 8-token one was cut at max_new_tokens
    completions = [_completion(0, 2, "stop"), _completion(0, 4, "stop"),
                   _completion(1, 6, "stop"), _completion(1, 8, "length")]
    reward = RewardOutput([1.0, 0.0, 0.0, 0.0], metrics={"accuracy": 0.25},
                          correct=[True, False, False, False])
    draw = Draw(prompts=[], samples=[], completions=completions,
                reward_scores=[1.0, 0.0, 0.0, 0.0], reward=reward,
                sync={"max": 0.01, "mean": 0.002})
    batch = Batch(prompts=[], samples=[], completions=completions, reward=reward)
    scores = torch.tensor([[1.0, 0.0], [0.0, -0.5]])  # shaped: the truncated one lost 0.5
    metrics = rollout_metrics(batch, [draw], scores, {"kept": 2.0},
                              {"generation": 2.0, "train": 3.0},
                              mask_truncated=True, shaped=True, dynamic_sampling=True)
    values = {name: float(value) for name, value in metrics.items()}
    assert values["rollout/reward_mean"] == pytest.approx(0.125)  # (1 + 0 + 0 - 0.5) / 4
    # sample std (n - 1): deviations 0.875, -0.125, -0.125, -0.625 -> squares sum 1.1875 / 3
    assert values["rollout/reward_std"] == pytest.approx(math.sqrt(1.1875 / 3))
    assert values["rollout/response_length_mean"] == 5.0
    assert values["rollout/response_length_max"] == 8.0
    assert values["rollout/truncated_fraction"] == 0.25
    assert values["rollout/masked_truncated"] == 1.0
    assert values["rollout/reward_unshaped_mean"] == 0.25  # the reward's own scores
    assert values["rollout/sync_logp_diff_max"] == pytest.approx(0.01)
    assert values["rollout/tokens_per_second"] == 10.0  # 20 tokens in 2 s
    # group 0 solved by one of two, group 1 by none: its shaped rewards still differ
    assert values["rollout/solve_all"] == 0.0
    assert values["rollout/solve_none"] == 0.5
    assert values["rollout/zero_variance"] == 0.0
    assert values["rollout/filter/kept"] == 2.0
    assert values["rollout/reward/accuracy"] == 0.25
    assert values["time/generation_seconds"] == 2.0 and values["time/train_seconds"] == 3.0


def test_rollout_metrics_without_correctness_or_options():
    completions = [_completion(0, 3, "stop"), _completion(0, 3, "stop")]
    reward = RewardOutput([0.5, 0.5])
    draw = Draw([], [], completions, [0.5, 0.5], reward, {"max": 0.0, "mean": 0.0})
    batch = Batch([], [], completions, reward)
    metrics = rollout_metrics(batch, [draw], torch.tensor([[0.5, 0.5]]), {}, {"generation": 1.0})
    assert float(metrics["rollout/zero_variance"]) == 1.0  # equal rewards: no signal
    assert "rollout/solve_all" not in metrics and "rollout/masked_truncated" not in metrics
    assert "rollout/reward_unshaped_mean" not in metrics
