"""The KL estimators k1, k2, k3 and low_var_kl: values by hand, and what each is unbiased for."""

import math

import pytest
import torch

from dgpo.losses import KL_ESTIMATORS, k3_kl, kl_penalty

DT = torch.float64


def test_kl_penalty_by_hand():
    # π = 0.5, π_ref = 0.25 (δ = log π_ref − log π = −log 2) and π = 0.1, π_ref = 0.4 (δ = log 4)
    logp = torch.log(torch.tensor([0.5, 0.1], dtype=DT))
    ref = torch.log(torch.tensor([0.25, 0.4], dtype=DT))
    log2, log4 = math.log(2), math.log(4)
    expected = {
        "k1": [log2, -log4],
        "k2": [0.5 * log2**2, 0.5 * log4**2],
        "k3": [0.5 + log2 - 1, 4 - log4 - 1],
        "low_var_kl": [0.5 + log2 - 1, 4 - log4 - 1],
    }
    for name, values in expected.items():
        torch.testing.assert_close(kl_penalty(logp, ref, name), torch.tensor(values, dtype=DT))


def test_low_var_kl_clamps_k3_at_ten_as_verl():
    logp = torch.tensor([-16.0, -1.0], dtype=DT)  # δ = 15: k3 = e^15 − 16 ≈ 3.3e6
    ref = torch.tensor([-1.0, -1.0], dtype=DT)
    torch.testing.assert_close(kl_penalty(logp, ref, "k3"),
                               torch.tensor([math.exp(15) - 16, 0.0], dtype=DT))
    torch.testing.assert_close(kl_penalty(logp, ref, "low_var_kl"),
                               torch.tensor([10.0, 0.0], dtype=DT))


def test_k3_estimator_is_the_existing_k3_kl():
    g = torch.Generator().manual_seed(0)
    logp, ref = torch.randn(4, 5, generator=g), torch.randn(4, 5, generator=g)
    torch.testing.assert_close(kl_penalty(logp, ref, "k3"), k3_kl(logp, ref))
    assert torch.isfinite(kl_penalty(torch.tensor([0.0]), torch.tensor([-1e4]), "k3")).all()


def exact_expectations(estimator):
    """E_{x∼π}[k(x)] and E_{x∼π}[∇_θ k(x)] over a small vocabulary (sampling not differentiated)."""
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(3, 7, generator=g, dtype=DT).requires_grad_(True)
    ref = torch.log_softmax(torch.randn(3, 7, generator=g, dtype=DT), -1)
    prob = torch.softmax(logits, -1).detach()
    value = (prob * kl_penalty(torch.log_softmax(logits, -1), ref, estimator)).sum(-1)
    (grad,) = torch.autograd.grad(value.sum(), logits)
    logp = torch.log_softmax(logits, -1)
    forward_kl = (logp.exp() * (logp - ref)).sum(-1)
    (forward_grad,) = torch.autograd.grad(forward_kl.sum(), logits)
    reverse_kl = (ref.exp() * (ref - torch.log_softmax(logits, -1))).sum(-1)
    (reverse_grad,) = torch.autograd.grad(reverse_kl.sum(), logits)
    return value.detach(), grad, forward_kl.detach(), forward_grad, reverse_grad


@pytest.mark.parametrize("estimator", ["k1", "k3"])
def test_k1_and_k3_are_unbiased_for_the_kl_value(estimator):
    value, _, forward_kl, _, _ = exact_expectations(estimator)
    torch.testing.assert_close(value, forward_kl)


def test_k2_is_biased_for_the_value_but_unbiased_for_the_gradient():
    value, grad, forward_kl, forward_grad, _ = exact_expectations("k2")
    assert not torch.allclose(value, forward_kl)
    torch.testing.assert_close(grad, forward_grad)


def test_k1_gradient_is_zero_and_k3_gradient_is_the_reverse_kls():
    _, k1_grad, _, forward_grad, reverse_grad = exact_expectations("k1")
    torch.testing.assert_close(k1_grad, torch.zeros_like(k1_grad))
    _, k3_grad, _, _, _ = exact_expectations("k3")
    torch.testing.assert_close(k3_grad, reverse_grad)
    assert not torch.allclose(k3_grad, forward_grad)


def test_kl_penalty_unknown_estimator_lists_the_valid_ones():
    assert KL_ESTIMATORS == ("k1", "k2", "k3", "low_var_kl")
    with pytest.raises(ValueError, match=r"estimator must be one of \('k1', 'k2', 'k3', "
                                         r"'low_var_kl'\), got 'k4'"):
        kl_penalty(torch.zeros(1), torch.zeros(1), "k4")
