"""SAPO: its gate by hand, its smooth weight, and the temperature chosen by the advantage's sign."""

import math

import pytest
import torch

from dgpo.losses import SAPOLoss, build_loss

DT = torch.float64


def sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def test_sapo_values_and_gradient_by_hand():
    loss_fn = build_loss("sapo", tau_pos=1.0, tau_neg=2.0, agg="token-mean")
    old_logp = torch.log(torch.tensor([[0.2, 0.5, 0.1]], dtype=DT))
    ratio = torch.tensor([[1.0, 1.5, 0.5]], dtype=DT)
    advantages = torch.tensor([[1.0, 2.0, -1.0]], dtype=DT)
    logp = (old_logp + ratio.log()).requires_grad_(True)
    out = loss_fn(logp, old_logp, advantages, torch.ones(1, 3))
    out.loss.backward()
    # gate f(r) = σ(τ(r−1))·4/τ: f(1) = 2 (τ = 1), f(1.5) = 4σ(0.5) (τ = 1), f(0.5) = 2σ(−1) (τ = 2)
    values = [-1.0 * 2.0, -2.0 * 4 * sigmoid(0.5), 1.0 * 2 * sigmoid(-1.0)]
    assert out.loss.item() == pytest.approx(sum(values) / 3)
    # ∂(−f(r)·A)/∂log π = −A·4σ(1−σ)·r, over 3 tokens
    grads = [-1.0 * 1.0 * 1.0, -2.0 * 4 * sigmoid(0.5) * sigmoid(-0.5) * 1.5,
             1.0 * 4 * sigmoid(-1.0) * sigmoid(1.0) * 0.5]
    torch.testing.assert_close(logp.grad, torch.tensor([grads], dtype=DT) / 3)
    weight = out.prob_weight
    torch.testing.assert_close(weight[0, 0], torch.tensor(1 / 0.2, dtype=DT))  # r = 1: PG's


def test_sapo_weight_is_a_smooth_bump_around_one():
    loss_fn = SAPOLoss()
    ratio = torch.linspace(0.01, 5.0, 2000, dtype=DT)
    old_prob = torch.full_like(ratio, 0.25)
    for sign, tau in ((1.0, 1.0), (-1.0, 1.05)):
        weight = loss_fn.prob_weight(ratio, old_prob, torch.full_like(ratio, sign)) * 0.25
        peak = ratio[weight.argmax()]
        assert abs(peak.item() - 1.0) < 5e-3  # maximal (= PG's weight) at r = 1
        assert weight.max().item() == pytest.approx(1.0, abs=1e-5)
        assert torch.all(weight > 0)  # never exactly zero: no hard clip
        assert torch.all(torch.diff(weight)[ratio[1:] > 1.01] < 0)  # decays past r = 1
        # closed form 4σ(τ(r−1))σ(−τ(r−1)) on ∇π, relative to 1/π_old
        x = tau * (ratio - 1)
        torch.testing.assert_close(weight, 4 * torch.sigmoid(x) * torch.sigmoid(-x))


def test_sapo_uses_tau_neg_for_zero_and_negative_advantages():
    loss_fn = SAPOLoss(tau_pos=1.0, tau_neg=3.0)
    ratio = torch.tensor([1.4, 1.4, 1.4], dtype=DT)
    weight = loss_fn.prob_weight(ratio, torch.ones(3, dtype=DT), torch.tensor([1.0, 0.0, -1.0]))
    x_pos, x_neg = 0.4, 3.0 * 0.4
    expected = [4 * sigmoid(x_pos) * sigmoid(-x_pos)] + [4 * sigmoid(x_neg) * sigmoid(-x_neg)] * 2
    torch.testing.assert_close(weight, torch.tensor(expected, dtype=DT))


@pytest.mark.parametrize("kwargs,message", [
    ({"tau_pos": 0.0}, r"tau_pos must be in \(0.0, inf\)"),
    ({"tau_neg": -1.0}, r"tau_neg must be in \(0.0, inf\)"),
])
def test_sapo_invalid_temperatures_raise(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SAPOLoss(**kwargs)


def test_sapo_defaults_follow_the_paper():
    loss_fn = build_loss("sapo")
    assert (loss_fn.tau_pos, loss_fn.tau_neg, loss_fn.agg) == (1.0, 1.05, "seq-mean-token-mean")
