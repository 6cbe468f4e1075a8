"""Autograd against the analytic gradient weight, for every method, region and sign of A."""

import math

import pytest
import torch

from dgpo.losses import REGION_NAMES, build_loss, regions
from tests.losses.cases import make_loss, region_batch


def autograd_weight_times_prob(loss_fn, logp, old_logp, advantages):
    """Return −N · ∂loss/∂logp, which equals A · W · π under token-mean."""
    logp = logp.clone().requires_grad_(True)
    mask = torch.ones_like(logp, dtype=torch.bool)
    out = loss_fn(logp, old_logp, advantages, mask)
    (grad,) = torch.autograd.grad(out.loss, logp)
    return -grad * mask.sum(), out


def test_loss_gradient_equals_analytic_weight_in_every_region(loss_case):
    loss_fn = make_loss(loss_case)
    logp, old_logp, advantages = region_batch(per_region=16)
    if loss_fn.sequence_level:  # one-token responses: each token's own ratio is its sequence's
        logp, old_logp, advantages = logp.T, old_logp.T, advantages.T
    measured, _ = autograd_weight_times_prob(loss_fn, logp, old_logp, advantages)
    ratio = torch.exp(logp - old_logp)
    expected = advantages * loss_fn.prob_weight(ratio, old_logp.exp(), advantages) * logp.exp()
    torch.testing.assert_close(measured, expected, rtol=1e-10, atol=1e-12)


def test_loss_batch_covers_all_five_regions():
    logp, old_logp, advantages = region_batch()
    code = regions(torch.exp(logp - old_logp), advantages, 0.2, 0.2)
    assert set(code.unique().tolist()) == set(range(len(REGION_NAMES)))


def test_loss_output_reports_per_token_weight_and_ratio(loss_case):
    loss_fn = make_loss(loss_case)
    logp, old_logp, advantages = region_batch()
    out = loss_fn(logp, old_logp, advantages, torch.ones_like(logp))
    torch.testing.assert_close(out.ratio, torch.exp(logp - old_logp))
    torch.testing.assert_close(
        out.prob_weight, loss_fn.prob_weight(out.ratio, old_logp.exp(), advantages))


@pytest.mark.parametrize("name", ["pg", "grpo", "cispo", "gppo", "ce_gppo", "aspo", "dgpo", "sapo",
                                  "gspo", "gmpo"])
def test_loss_on_policy_equals_policy_gradient(name):
    """With π = π_old (one optimiser step per rollout) every method's gradient is PG's: −A/N."""
    loss_fn = build_loss(name)
    old_logp = torch.log(torch.rand(3, 7, dtype=torch.float64) * 0.9 + 0.05)
    advantages = torch.randn(3, dtype=torch.float64)
    measured, out = autograd_weight_times_prob(loss_fn, old_logp.clone(), old_logp, advantages)
    torch.testing.assert_close(measured, advantages[:, None].expand(3, 7))
    assert out.metrics["region/IN"] == 1.0


def test_grpo_zeroes_boundary_gradients_and_applies_dual_clip():
    loss_fn = build_loss("grpo", clip_ratio_c=3.0)
    old_prob = torch.full((4,), 0.01, dtype=torch.float64)
    ratio = torch.tensor([0.5, 1.5, 2.5, 4.0], dtype=torch.float64)
    advantages = torch.tensor([-1.0, 1.0, -1.0, -1.0], dtype=torch.float64)  # LN, HP, HN<c, HN>c
    weight = loss_fn.prob_weight(ratio, old_prob, advantages)
    torch.testing.assert_close(weight, torch.tensor([0.0, 0.0, 100.0, 0.0], dtype=torch.float64))


def test_dgpo_has_no_dual_clip():
    loss_fn = build_loss("dgpo")
    weight = loss_fn.prob_weight(torch.tensor([50.0]), torch.tensor([0.01]), torch.tensor([-1.0]))
    torch.testing.assert_close(weight, torch.tensor([100.0]))


@pytest.mark.parametrize("n,m", [(1, 2), (2, 2), (1, 3), (3, 1), (1.5, 2.5)])
def test_dgpo_weight_is_continuous_at_both_boundaries(n, m):
    loss_fn = build_loss("dgpo", n=n, m=m, clip_low=0.2, clip_high=0.28)
    old_prob = torch.tensor([0.3, 0.05, 1e-4], dtype=torch.float64)
    delta = 1e-9
    for boundary, sign in ((0.8, -1.0), (1.28, 1.0)):
        inside = loss_fn.prob_weight(torch.full((3,), boundary * (1 + sign * -delta),
                                                dtype=torch.float64), old_prob,
                                     torch.full((3,), sign, dtype=torch.float64))
        outside = loss_fn.prob_weight(torch.full((3,), boundary * (1 + sign * delta),
                                                 dtype=torch.float64), old_prob,
                                      torch.full((3,), sign, dtype=torch.float64))
        torch.testing.assert_close(inside, 1 / old_prob, rtol=1e-7, atol=0)
        torch.testing.assert_close(outside, 1 / old_prob, rtol=1e-7, atol=0)


@pytest.mark.parametrize("n", [1, 2, 3])
def test_dgpo_left_weight_decays_as_pi_to_the_n(n):
    loss_fn = build_loss("dgpo", n=n)
    old_prob = torch.tensor(0.2, dtype=torch.float64)
    ratio = torch.logspace(-1, -8, 8, dtype=torch.float64)  # π → 0 on LN
    weight = loss_fn.prob_weight(ratio, old_prob, -torch.ones_like(ratio))
    torch.testing.assert_close(weight[1:] / weight[:-1], torch.full((7,), 10.0 ** -n,
                                                                    dtype=torch.float64))
    assert weight[-1] < 1e-6 * weight[0]


@pytest.mark.parametrize("name", ["cispo", "gppo", "ce_gppo"])
def test_soft_clip_baselines_left_weight_diverges_as_one_over_pi(name):
    loss_fn = build_loss(name)
    ratio = torch.logspace(-1, -8, 8, dtype=torch.float64)
    weight = loss_fn.prob_weight(ratio, torch.tensor(0.2, dtype=torch.float64),
                                 -torch.ones_like(ratio))
    torch.testing.assert_close(weight[1:] / weight[:-1], torch.full((7,), 10.0,
                                                                    dtype=torch.float64))


@pytest.mark.parametrize("m", [1, 2, 3])
def test_dgpo_right_weight_decays_as_pi_to_minus_one_over_m(m):
    loss_fn = build_loss("dgpo", m=m)
    old_prob = torch.tensor(1e-4, dtype=torch.float64)
    ratio = torch.tensor([2.0, 4.0, 8.0, 16.0], dtype=torch.float64)
    weight = loss_fn.prob_weight(ratio, old_prob, torch.ones_like(ratio))
    torch.testing.assert_close(weight[1:] / weight[:-1],
                               torch.full((3,), 2.0 ** (-1.0 / m), dtype=torch.float64))
    gppo = build_loss("gppo").prob_weight(ratio, old_prob, torch.ones_like(ratio))
    if m == 1:  # m = 1 is GPPO's 1/π on HP
        torch.testing.assert_close(weight, gppo)
    else:
        assert torch.all(weight[1:] > gppo[1:]), "DGPO decays more gently than GPPO's 1/π on HP"


@pytest.mark.parametrize("n,m", [(1, 2), (2, 2), (3, 3)])
def test_dgpo_token_loss_matches_official_surrogate(n, m):
    """The official verl-fork formulas, written with log π and log π_old."""
    eps_low, eps_high = 0.2, 0.2
    logp, old_logp, advantages = region_batch(seed=3)
    loss_fn = build_loss("dgpo", n=n, m=m)
    values = loss_fn.token_loss(logp, old_logp, advantages)
    ratio = torch.exp(logp - old_logp)
    left = torch.exp(logp + n * logp - (n + 1) * old_logp) / (1 - eps_low) ** n
    right = torch.exp(logp + math.log(1 + eps_high) / m - old_logp * (m - 1) / m - logp / m)
    left_region = (ratio < 1 - eps_low) & (advantages < 0)
    right_region = (ratio > 1 + eps_high) & (advantages > 0)
    official = -advantages * torch.where(left_region, left, torch.where(right_region, right, ratio))
    torch.testing.assert_close(values, official, rtol=1e-12, atol=1e-12)
    # Forward values: r^(n+1)/(1−ε_l)^n on LN and (1+ε_h)^(1/m)·r^(1−1/m) on HP.
    torch.testing.assert_close(
        torch.where(left_region, -values / advantages, torch.zeros_like(values)),
        torch.where(left_region, ratio ** (n + 1) / (1 - eps_low) ** n, torch.zeros_like(values)))
    torch.testing.assert_close(
        torch.where(right_region, -values / advantages, torch.zeros_like(values)),
        torch.where(right_region, (1 + eps_high) ** (1 / m) * ratio ** (1 - 1 / m),
                    torch.zeros_like(values)))


def test_ce_gppo_scales_boundary_gradients_by_betas():
    old_prob = torch.tensor([0.01, 0.01], dtype=torch.float64)
    ratio = torch.tensor([0.5, 1.5], dtype=torch.float64)
    advantages = torch.tensor([-1.0, 1.0], dtype=torch.float64)
    gppo = build_loss("gppo").prob_weight(ratio, old_prob, advantages)
    ce = build_loss("ce_gppo", beta1=0.5, beta2=0.25).prob_weight(ratio, old_prob, advantages)
    torch.testing.assert_close(ce, gppo * torch.tensor([0.5, 0.25], dtype=torch.float64))
    torch.testing.assert_close(gppo, torch.tensor([0.8 / 0.005, 1.2 / 0.015], dtype=torch.float64))


def test_cispo_without_lower_bound_keeps_pg_weight_below():
    loss_fn = build_loss("cispo", clip_low=None)
    weight = loss_fn.prob_weight(torch.tensor([0.1, 5.0]), torch.tensor([0.1, 0.1]),
                                 torch.tensor([-1.0, 1.0]))
    torch.testing.assert_close(weight, torch.tensor([10.0, 1.2 / 0.5]))
