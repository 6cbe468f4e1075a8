"""Group selection (dynamic sampling), overlong shaping and correctness, by hand."""

import pytest
import torch

from dgpo.rollout.buffer import RolloutSample, collate_samples
from dgpo.rollout.groups import correctness, has_signal, overlong_penalties, select_groups


def test_overlong_penalties_are_linear_in_the_buffer():
    # L = 20, buffer 0.25 -> the last 5 tokens: 15 -> 0, 16 -> -0.2·2, 20 -> -2
    got = overlong_penalties([3, 15, 16, 18, 20], max_new_tokens=20, buffer=0.25, penalty=2.0)
    assert got == pytest.approx([0.0, 0.0, -0.4, -1.2, -2.0])


def test_has_signal_is_false_only_for_groups_of_equal_rewards():
    scores = torch.tensor([[0.05, 0.06], [1.0, 1.0], [0.0, 0.0], [0.0, 1.0]])
    assert has_signal(scores).tolist() == [True, False, False, True]


def test_select_groups_keeps_signal_in_draw_order_then_fills():
    assert select_groups([True, False, True, True], wanted=2) == ([0, 2], 0)
    assert select_groups([False, True, False, False], wanted=3) == ([1, 0, 2], 2)
    with pytest.raises(ValueError, match="2 generated groups cannot fill a batch of 3"):
        select_groups([True, False], wanted=3)


def test_correctness_comes_from_the_reward_not_from_scores():
    scores = torch.tensor([[0.057, 0.05], [0.06, 0.07]])  # a dense reward: all > 0
    assert correctness(None, scores) is None  # no notion of correctness: no solve_all
    got = correctness([True, False, False, False], scores)
    assert got.tolist() == [[True, False], [False, False]]


def test_a_sample_out_of_the_loss_has_no_response_tokens_but_keeps_its_place():
    kept = RolloutSample(prompt_ids=[1, 2], response_ids=[3, 4], advantage=1.0)
    masked = RolloutSample(prompt_ids=[1, 2], response_ids=[5, 6], advantage=1.0, in_loss=False,
                           rollout_logp=torch.tensor([-0.5, -0.25]))
    batch = collate_samples([kept, masked])
    assert batch["response_mask"].tolist() == [[False, True, True], [False, False, False]]
    assert batch["input_ids"][1].tolist() == [1, 2, 5, 6]
    assert batch["rollout_logp"][1].tolist() == [0.0, -0.5, -0.25]
