"""GSPO and GMPO: hand-computed values and gradients, the paper formulas, padding and numerics."""

import math

import pytest
import torch

from dgpo.losses import GMPOLoss, GSPOLoss, build_loss

DT = torch.float64


def padded_batch():
    """Two responses: three valid tokens, and two valid tokens plus one pad (garbage log-probs)."""
    old_logp = torch.log(torch.tensor([[0.5, 0.4, 0.2], [0.3, 0.6, 0.9]], dtype=DT))
    log_ratio = torch.tensor([[0.1, -0.2, 0.4], [0.0, -0.3, 7.0]], dtype=DT)
    mask = torch.tensor([[True, True, True], [True, True, False]])
    return old_logp + log_ratio, old_logp, mask


def grad_of(loss_fn, logp, old_logp, advantages, mask, **kwargs):
    logp = logp.clone().requires_grad_(True)
    out = loss_fn(logp, old_logp, advantages, mask, **kwargs)
    (grad,) = torch.autograd.grad(out.loss, logp)
    return out, grad


def test_gspo_by_hand():
    logp, old_logp, mask = padded_batch()
    loss_fn = GSPOLoss(clip_low=0.2, clip_high=0.2)
    out, grad = grad_of(loss_fn, logp, old_logp, torch.tensor([1.0, -1.0], dtype=DT), mask)
    s1, s2 = math.exp(0.1), math.exp(-0.15)  # geometric means over the valid tokens; both inside
    assert out.loss.item() == pytest.approx((-s1 + s2) / 2)  # mean over responses
    # each token's gradient: (1/B)(1/|y_i|) · (−A_i) · s_i
    expected = torch.tensor([[-s1 / 6] * 3, [s2 / 4, s2 / 4, 0.0]], dtype=DT)
    torch.testing.assert_close(grad, expected)
    assert out.metrics["seq_ratio/mean"].item() == pytest.approx((3 * s1 + 2 * s2) / 5)


def test_gspo_clipped_sequence_has_no_gradient():
    logp, old_logp, mask = padded_batch()
    loss_fn = GSPOLoss(clip_low=0.1, clip_high=0.05)  # s1 = e^0.1 > 1.05; s2 = e^-0.15 < 0.9
    out, grad = grad_of(loss_fn, logp, old_logp, torch.tensor([1.0, -1.0], dtype=DT), mask)
    assert out.loss.item() == pytest.approx((-1.05 + 0.9) / 2)
    assert torch.all(grad == 0)
    assert out.metrics["region/HP"].item() == pytest.approx(3 / 5)
    assert out.metrics["region/LN"].item() == pytest.approx(2 / 5)
    # the other signs are not clipped (no dual-clip): full gradient s_i
    out, grad = grad_of(loss_fn, logp, old_logp, torch.tensor([-1.0, 1.0], dtype=DT), mask)
    torch.testing.assert_close(grad[0], torch.full((3,), math.exp(0.1) / 6, dtype=DT))


@pytest.mark.parametrize("widths", [(3e-4, 4e-4), (0.2, 0.2), (0.05, 0.1)])
def test_gspo_matches_the_sequence_level_objective(widths):
    """GSPO-token with per-sequence advantages = the paper's GSPO, differentiated directly."""
    g = torch.Generator().manual_seed(0)
    old_logp = torch.log(torch.rand(6, 9, generator=g, dtype=DT) * 0.8 + 0.1)
    logp = old_logp + 0.15 * torch.randn(6, 9, generator=g, dtype=DT)
    mask = torch.arange(9)[None, :] < torch.tensor([9, 4, 1, 7, 9, 2])[:, None]
    advantages = torch.randn(6, generator=g, dtype=DT)
    loss_fn = GSPOLoss(*widths)
    out, grad = grad_of(loss_fn, logp, old_logp, advantages, mask)

    direct = logp.clone().requires_grad_(True)
    s = torch.exp(((direct - old_logp) * mask).sum(-1) / mask.sum(-1))
    low, high = 1 - widths[0], 1 + widths[1]
    objective = torch.minimum(s * advantages, torch.clamp(s, low, high) * advantages).mean()
    (expected,) = torch.autograd.grad(-objective, direct)
    torch.testing.assert_close(out.loss, -objective.detach())
    torch.testing.assert_close(grad, expected)


@pytest.mark.parametrize("cls", [GSPOLoss, GMPOLoss])
def test_sequence_loss_gradient_equals_stated_weight_with_padding(cls):
    """−B·|y_i|·∂loss/∂logp_t = A·W_t·π_t on every valid token (seq-mean-token-mean)."""
    g = torch.Generator().manual_seed(1)
    old_logp = torch.log(torch.rand(8, 6, generator=g, dtype=DT) * 0.8 + 0.1)
    logp = old_logp + 0.5 * torch.randn(8, 6, generator=g, dtype=DT)
    lengths = torch.tensor([6, 3, 1, 5, 6, 2, 4, 6])
    mask = torch.arange(6)[None, :] < lengths[:, None]
    advantages = torch.tensor([1.0, -1.0, 0.5, -2.0, 0.3, 1.5, -0.7, -0.1], dtype=DT)
    loss_fn = cls(clip_low=0.2, clip_high=0.2)
    out, grad = grad_of(loss_fn, logp, old_logp, advantages, mask)
    measured = -grad * 8 * lengths[:, None]
    expected = advantages[:, None] * out.prob_weight * logp.exp()
    torch.testing.assert_close(torch.where(mask, measured, 0.0), torch.where(mask, expected, 0.0))
    assert torch.all(grad[~mask] == 0)
    assert (out.prob_weight[mask] == 0).any() and (out.prob_weight[mask] > 0).any()


def test_gmpo_by_hand():
    log_ratio = torch.tensor([[0.1, 0.6, -0.5], [-0.6, 0.3, 9.0]], dtype=DT)
    old_logp = torch.log(torch.tensor([[0.5, 0.4, 0.2], [0.3, 0.6, 0.9]], dtype=DT))
    mask = torch.tensor([[True, True, True], [True, True, False]])
    loss_fn = GMPOLoss(clip_low=0.4, clip_high=0.4)
    out, grad = grad_of(loss_fn, old_logp + log_ratio, old_logp,
                        torch.tensor([1.0, -1.0], dtype=DT), mask)
    # A > 0: log-ratios clipped from above only: [0.1, 0.4, -0.5] → mean 0 → s̃ = 1
    # A < 0: clipped from below only: [-0.4, 0.3] → mean -0.05
    s2 = math.exp(-0.05)
    assert out.loss.item() == pytest.approx((-1.0 + s2) / 2)
    # gradient (1/B)(1/|y_i|)(−A_i) s̃_i on the tokens the clip lets through
    expected = torch.tensor([[-1 / 6, 0.0, -1 / 6], [0.0, s2 / 4, 0.0]], dtype=DT)
    torch.testing.assert_close(grad, expected)
    assert out.metrics["region/HP"].item() == pytest.approx(1 / 5)
    assert out.metrics["region/LN"].item() == pytest.approx(1 / 5)
    assert out.metrics["region/LP"].item() == pytest.approx(1 / 5)  # r = e^-0.5 with A > 0


def test_gmpo_matches_the_papers_sign_aware_formula():
    """verl's geo_mean form: sgn(A)·min(sgn(A)·log r, sgn(A)·clip(log r)), mean over responses."""
    g = torch.Generator().manual_seed(2)
    old_logp = torch.log(torch.rand(5, 8, generator=g, dtype=DT) * 0.8 + 0.1)
    logp = old_logp + 0.6 * torch.randn(5, 8, generator=g, dtype=DT)
    mask = torch.arange(8)[None, :] < torch.tensor([8, 5, 2, 8, 3])[:, None]
    advantages = torch.tensor([1.0, -0.5, 2.0, -1.5, 0.7], dtype=DT)
    out, grad = grad_of(GMPOLoss(clip_low=0.3, clip_high=0.4), logp, old_logp, advantages, mask)

    direct = logp.clone().requires_grad_(True)
    log_ratio = direct - old_logp
    sign = torch.sign(advantages)[:, None]
    clipped = sign * torch.minimum(sign * log_ratio, sign * torch.clamp(log_ratio, -0.3, 0.4))
    s = torch.exp((clipped * mask).sum(-1) / mask.sum(-1))
    objective = (advantages * s).mean()
    (expected,) = torch.autograd.grad(-objective, direct)
    torch.testing.assert_close(out.loss, -objective.detach())
    torch.testing.assert_close(grad, expected)


@pytest.mark.parametrize("name", ["gspo", "gmpo"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sequence_loss_huge_log_ratios_stay_finite(name, dtype):
    """A long response far off-policy: exp of the sequence log-ratio must not overflow."""
    old_logp = torch.full((4, 512), -80.0, dtype=dtype)
    shift = torch.tensor([500.0, -500.0, 79.0, -1000.0], dtype=dtype)[:, None]
    logp = (old_logp + shift).clamp(max=0.0).requires_grad_(True)
    advantages = torch.tensor([1.0, 1.0, -1.0, -1.0], dtype=dtype)
    out = build_loss(name)(logp, old_logp, advantages, torch.ones(4, 512, dtype=torch.bool))
    out.loss.backward()
    assert torch.isfinite(out.loss)
    assert torch.isfinite(logp.grad.float()).all()
    assert all(torch.isfinite(value).all() for value in out.metrics.values())
    assert torch.isfinite(out.prob_weight).all()


def test_gspo_and_gmpo_defaults_follow_the_papers():
    gspo, gmpo = build_loss("gspo"), build_loss("gmpo")
    assert (gspo.clip_low, gspo.clip_high, gspo.agg) == (3e-4, 4e-4, "seq-mean-token-mean")
    assert (gmpo.clip_low, gmpo.clip_high, gmpo.agg) == (0.4, 0.4, "seq-mean-token-mean")
    assert gspo.sequence_level and gmpo.sequence_level and not build_loss("sapo").sequence_level
