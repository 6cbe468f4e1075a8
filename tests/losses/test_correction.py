"""Train–inference mismatch correction: weights and metrics by hand, padding, overflow, errors."""

import math

import pytest
import torch

from dgpo.losses import CORRECTION_MODES, rollout_correction, rollout_correction_metrics

DT = torch.float64


def batch():
    """Ratios π_old/π_rollout: [[2, 0.5, 4], [1.25, 0.1, pad]]."""
    rollout = torch.log(torch.tensor([[0.1, 0.4, 0.05], [0.4, 0.5, 0.3]], dtype=DT))
    ratios = torch.tensor([[2.0, 0.5, 4.0], [1.25, 0.1, 99.0]], dtype=DT)
    mask = torch.tensor([[True, True, True], [True, True, False]])
    return rollout + ratios.log(), rollout, mask


@pytest.mark.parametrize("mode,cap,low,expected", [
    ("token_truncate", 3.0, None, [[2.0, 0.5, 3.0], [1.25, 0.1, 0.0]]),
    ("token_truncate", 3.0, 0.2, [[2.0, 0.5, 3.0], [1.25, 0.2, 0.0]]),
    ("token_mask", 3.0, None, [[2.0, 0.5, 0.0], [1.25, 0.1, 0.0]]),
    ("token_mask", 3.0, 0.2, [[2.0, 0.5, 0.0], [1.25, 0.0, 0.0]]),
    # responses: 2 · 0.5 · 4 = 4 and 1.25 · 0.1 = 0.125
    ("sequence_truncate", 3.0, None, [[3.0] * 3, [0.125, 0.125, 0.0]]),
    ("sequence_truncate", 5.0, 0.5, [[4.0] * 3, [0.5, 0.5, 0.0]]),
    ("sequence_mask", 3.0, None, [[0.0] * 3, [0.125, 0.125, 0.0]]),
    ("sequence_mask", 5.0, 0.2, [[4.0] * 3, [0.0, 0.0, 0.0]]),
])
def test_rollout_correction_by_hand(mode, cap, low, expected):
    old_logp, rollout_logp, mask = batch()
    weights = rollout_correction(old_logp, rollout_logp, mask, mode, cap, low)
    torch.testing.assert_close(weights, torch.tensor(expected, dtype=DT))


@pytest.mark.parametrize("mode", CORRECTION_MODES)
def test_rollout_correction_ignores_padding(mode):
    old_logp, rollout_logp, mask = batch()
    reference = rollout_correction(old_logp, rollout_logp, mask, mode, 3.0)
    garbage_old = torch.where(mask, old_logp, torch.full_like(old_logp, math.nan))
    garbage_rollout = torch.where(mask, rollout_logp, torch.full_like(old_logp, -math.inf))
    torch.testing.assert_close(
        rollout_correction(garbage_old, garbage_rollout, mask, mode, 3.0), reference)


@pytest.mark.parametrize("mode", CORRECTION_MODES)
def test_rollout_correction_long_responses_do_not_overflow(mode):
    """A sequence ratio of exp(±2000) is bounded by the cap, or masked, never inf or NaN."""
    rollout_logp = torch.full((2, 1000), -3.0)
    old_logp = rollout_logp + torch.tensor([[2.0], [-2.0]])
    weights = rollout_correction(old_logp, rollout_logp, torch.ones(2, 1000), mode, 2.0, 0.5)
    assert torch.isfinite(weights).all()
    assert weights.min() >= 0.0 and weights.max() <= 2.0


def test_rollout_correction_is_one_when_engine_and_trainer_agree():
    logp = torch.log(torch.rand(3, 5, generator=torch.Generator().manual_seed(0)))
    for mode in CORRECTION_MODES:
        weights = rollout_correction(logp, logp.clone(), torch.ones(3, 5), mode, 2.0, 0.5)
        torch.testing.assert_close(weights, torch.ones(3, 5))


def test_rollout_correction_metrics_by_hand():
    old_logp, rollout_logp, mask = batch()
    metrics = rollout_correction_metrics(old_logp, rollout_logp, mask, "token_truncate", 3.0, 0.2)
    # k3 of KL(π_rollout‖π_old) from the engine's samples: ρ − log ρ − 1 with ρ = π_old/π_rollout
    ratios = [2.0, 0.5, 4.0, 1.25, 0.1]
    kl = sum(r - math.log(r) - 1 for r in ratios) / 5
    assert metrics["kl"].item() == pytest.approx(kl)
    assert metrics["truncated_fraction"].item() == pytest.approx(2 / 5)  # 4 > 3 and 0.1 < 0.2
    assert metrics["weights/min"].item() == pytest.approx(0.2)
    assert metrics["weights/max"].item() == pytest.approx(3.0)
    assert metrics["weights/mean"].item() == pytest.approx((2 + 0.5 + 3 + 1.25 + 0.2) / 5)
    sequence = rollout_correction_metrics(old_logp, rollout_logp, mask, "sequence_mask", 3.0)
    assert sequence["masked_fraction"].item() == pytest.approx(3 / 5)  # response 1: ratio 4 > 3
    assert sequence["weights/min"].item() == 0.0
    assert sequence["weights/max"].item() == pytest.approx(0.125)
    assert "truncated_fraction" not in sequence


def test_rollout_correction_metrics_without_valid_tokens_are_zero():
    old_logp, rollout_logp, mask = batch()
    metrics = rollout_correction_metrics(old_logp, rollout_logp, torch.zeros_like(mask),
                                         "token_mask", 3.0)
    assert all(value.item() == 0.0 for value in metrics.values())


@pytest.mark.parametrize("mode,cap,low,message", [
    ("token", 3.0, None, r"mode must be one of \('token_truncate', 'token_mask', "),
    ("token_mask", 0.0, None, r"cap must be a number > 0 \(math.inf for no upper bound\), got 0.0"),
    ("token_mask", -2, None, "cap must be a number > 0"),
    ("token_mask", None, None, "cap must be a number > 0"),
    ("token_truncate", 2.0, 2.0, r"low must be None or a number in \[0, cap=2.0\), got 2.0"),
    ("sequence_mask", 2.0, -0.1, r"low must be None or a number in \[0, cap=2.0\), got -0.1"),
])
def test_rollout_correction_invalid_settings_raise(mode, cap, low, message):
    old_logp, rollout_logp, mask = batch()
    with pytest.raises(ValueError, match=message):
        rollout_correction(old_logp, rollout_logp, mask, mode, cap, low)


def test_rollout_correction_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="must have one shape"):
        rollout_correction(torch.zeros(2, 3), torch.zeros(2, 4), torch.ones(2, 3), "token_mask",
                           2.0)


def test_rollout_correction_only_lower_bound_with_infinite_cap():
    old_logp, rollout_logp, mask = batch()
    weights = rollout_correction(old_logp, rollout_logp, mask, "token_mask", math.inf, 0.2)
    torch.testing.assert_close(weights, torch.tensor([[2.0, 0.5, 4.0], [1.25, 0.0, 0.0]],
                                                     dtype=DT))
