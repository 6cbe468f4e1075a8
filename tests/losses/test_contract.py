"""The loss contract: aggregation, robustness, validation, metrics and user-defined losses."""

import math

import pytest
import torch
from jsonargparse import ArgumentParser
from torch import Tensor

from dgpo.losses import AGGREGATIONS, LOSSES, PolicyLoss, aggregate, build_loss
from tests.losses.cases import make_loss, region_batch


def random_batch(batch=6, length=9, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    old_logp = torch.log(torch.rand(batch, length, generator=g, dtype=dtype) * 0.5 + 0.01)
    logp = old_logp + 0.6 * torch.randn(batch, length, generator=g, dtype=dtype)
    logp = torch.clamp(logp, max=-1e-3)
    advantages = torch.randn(batch, generator=g, dtype=dtype)
    lengths = torch.randint(1, length + 1, (batch,), generator=g)
    mask = torch.arange(length)[None, :] < lengths[:, None]
    return logp, old_logp, advantages, mask


@pytest.mark.parametrize("agg", AGGREGATIONS)
def test_loss_micro_batches_give_the_same_gradient(loss_case, agg):
    loss_fn = make_loss(loss_case)
    loss_fn.agg = agg
    logp, old_logp, advantages, mask = random_batch()
    whole = logp.clone().requires_grad_(True)
    loss_fn(whole, old_logp, advantages, mask).loss.backward()

    split = logp.clone().requires_grad_(True)
    total = mask.sum()
    for rows in (slice(0, 2), slice(2, 3), slice(3, 6)):
        out = loss_fn(split[rows], old_logp[rows], advantages[rows], mask[rows],
                      num_tokens=total, num_sequences=mask.shape[0])
        out.loss.backward()
    torch.testing.assert_close(split.grad, whole.grad, rtol=1e-10, atol=1e-12)


def test_aggregate_modes_by_hand():
    token_loss = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    assert aggregate(token_loss, mask, "token-mean").item() == pytest.approx(18 / 5)
    assert aggregate(token_loss, mask, "token-mean", num_tokens=10).item() == pytest.approx(1.8)
    assert aggregate(token_loss, mask, "seq-mean-token-mean").item() == pytest.approx((1.5 + 5) / 2)
    assert aggregate(token_loss, mask, "seq-mean-token-sum-norm").item() == pytest.approx(
        (3 / 3 + 15 / 3) / 2)
    assert aggregate(token_loss, mask, "seq-mean-token-sum-norm",
                     norm_length=5).item() == pytest.approx((3 / 5 + 15 / 5) / 2)
    with pytest.raises(ValueError, match="agg must be one of"):
        aggregate(token_loss, mask, "sum")


def test_loss_masked_tokens_do_not_affect_loss(loss_case):
    loss_fn = make_loss(loss_case)
    logp, old_logp, advantages, mask = random_batch()
    garbage = torch.where(mask, logp, torch.full_like(logp, -3.0))
    reference = loss_fn(logp, old_logp, advantages, mask)
    other = loss_fn(garbage, old_logp, advantages, mask)
    torch.testing.assert_close(reference.loss, other.loss)


@pytest.mark.parametrize("log_ratio", [50.0, -50.0])
def test_loss_is_finite_for_extreme_log_ratios(loss_case, log_ratio):
    loss_fn = make_loss(loss_case)
    old_logp = torch.full((2, 4), -60.0)
    logp = (old_logp + log_ratio).clamp(max=0.0).requires_grad_(True)
    logp.retain_grad()
    advantages = torch.tensor([1.0, -1.0])
    out = loss_fn(logp, old_logp, advantages, torch.ones(2, 4))
    out.loss.backward()
    assert torch.isfinite(out.loss)
    assert torch.isfinite(logp.grad).all()
    assert all(torch.isfinite(torch.as_tensor(value)).all() for value in out.metrics.values())


def test_loss_fully_masked_rows_and_batches_are_finite(loss_case):
    loss_fn = make_loss(loss_case)
    logp, old_logp, advantages, mask = random_batch()
    mask[1] = False
    logp.requires_grad_(True)
    out = loss_fn(logp, old_logp, advantages, mask)
    out.loss.backward()
    assert torch.isfinite(out.loss) and torch.isfinite(logp.grad).all()
    assert torch.all(logp.grad[1] == 0)
    empty = loss_fn(logp, old_logp, advantages, torch.zeros_like(mask))
    assert empty.loss.item() == 0.0
    assert all(torch.isfinite(torch.as_tensor(value)).all() for value in empty.metrics.values())


def test_loss_zero_advantages_give_zero_gradient(loss_case):
    loss_fn = make_loss(loss_case)
    logp, old_logp, _, mask = random_batch()
    logp.requires_grad_(True)
    loss_fn(logp, old_logp, torch.zeros(logp.shape[0], dtype=logp.dtype), mask).loss.backward()
    assert torch.all(logp.grad == 0)


def test_loss_accepts_bf16_inputs(loss_case):
    loss_fn = make_loss(loss_case)
    logp, old_logp, advantages, mask = random_batch(dtype=torch.float32)
    logp = logp.to(torch.bfloat16).requires_grad_(True)
    out = loss_fn(logp, old_logp.to(torch.bfloat16), advantages.to(torch.bfloat16), mask)
    out.loss.backward()
    assert out.loss.dtype == torch.float32
    assert logp.grad.dtype == torch.bfloat16 and torch.isfinite(logp.grad.float()).all()


def test_loss_metrics_report_region_fractions(loss_case):
    loss_fn = make_loss(loss_case)
    logp, old_logp, advantages = region_batch(per_region=4)
    metrics = loss_fn(logp, old_logp, advantages, torch.ones_like(logp)).metrics
    fractions = [metrics[f"region/{name}"] for name in ("IN", "LN", "LP", "HN", "HP")]
    assert sum(fractions).item() == pytest.approx(1.0)
    if loss_fn.clip_low is not None and type(loss_fn).region_codes is PolicyLoss.region_codes:
        assert metrics["region/IN"].item() == pytest.approx(2 / 12)
        assert metrics["region/LN"].item() == pytest.approx(2 / 12)
        assert metrics["region/HP"].item() == pytest.approx(3 / 12)
    ratio = torch.exp(logp - old_logp)
    assert metrics["ratio/mean"].item() == pytest.approx(ratio.mean().item())
    assert "grad_weight/mean" in metrics


def test_loss_rejects_mismatched_shapes():
    loss_fn = build_loss("grpo")
    with pytest.raises(ValueError, match="one shape"):
        loss_fn(torch.zeros(2, 3), torch.zeros(2, 4), torch.zeros(2), torch.ones(2, 3))
    with pytest.raises(ValueError, match="advantages must have shape"):
        loss_fn(torch.zeros(2, 3), torch.zeros(2, 3), torch.zeros(3), torch.ones(2, 3))


@pytest.mark.parametrize("name,kwargs,message", [
    ("grpo", {"clip_low": 1.0}, r"clip_low must be in \(0.0, 1.0\)"),
    ("grpo", {"clip_low": 0.0}, r"clip_low must be in \(0.0, 1.0\)"),
    ("dgpo", {"clip_low": -0.1}, "clip_low"),
    ("grpo", {"clip_low": None}, "clip_low must be a number"),
    ("gppo", {"clip_high": -0.2}, r"clip_high must be in \(0.0, inf\)"),
    ("grpo", {"clip_ratio_c": 1.0}, r"clip_ratio_c must be in \(1.0, inf\)"),
    ("aspo", {"clip_ratio_c": 0.5}, "clip_ratio_c"),
    ("ce_gppo", {"clip_ratio_c": 1.0}, "clip_ratio_c"),
    ("dgpo", {"n": 0.5}, r"n must be in \[1.0, inf\)"),
    ("dgpo", {"m": 0}, r"m must be in \[1.0, inf\)"),
    ("ce_gppo", {"beta1": -1.0}, "beta1"),
    ("pg", {"agg": "sum"}, "agg must be one of"),
    ("dgpo", {"norm_length": 0}, "norm_length"),
])
def test_loss_invalid_hyperparameters_raise(name, kwargs, message):
    with pytest.raises(ValueError, match=message):
        build_loss(name, **kwargs)


def test_build_loss_unknown_name_lists_known_ones():
    known = "pg, grpo, cispo, gppo, ce_gppo, aspo, dgpo, sapo, gspo, gmpo"
    with pytest.raises(ValueError, match=f"known losses: {known}"):
        build_loss("ppo")


def test_build_loss_defaults_follow_the_paper():
    dgpo = build_loss("dgpo")
    assert (dgpo.n, dgpo.m, dgpo.clip_low, dgpo.clip_high, dgpo.agg) == (1, 2, 0.2, 0.2,
                                                                         "token-mean")
    assert build_loss("grpo").clip_ratio_c == 3.0
    ce = build_loss("ce_gppo")
    assert (ce.beta1, ce.beta2, ce.clip_ratio_c) == (0.5, 1.0, 10.0)
    assert all(isinstance(build_loss(name), PolicyLoss) for name in LOSSES)


class ScaledPGLoss(PolicyLoss):
    """A user's loss: PG scaled by a constant, defined outside dgpo."""

    def __init__(self, scale: float = 2.0, clip_low: float = 0.2, clip_high: float = 0.2) -> None:
        super().__init__(clip_low=clip_low, clip_high=clip_high)
        self.scale = scale

    def token_loss(self, logp: Tensor, old_logp: Tensor, advantages: Tensor) -> Tensor:
        return -self.scale * advantages * torch.exp(logp - old_logp)

    def prob_weight(self, ratio: Tensor, old_prob: Tensor, advantages: Tensor) -> Tensor:
        return self.scale / old_prob.expand_as(ratio)


class UnstatedWeightLoss(PolicyLoss):
    """A user's loss that implements only the surrogate."""

    def token_loss(self, logp: Tensor, old_logp: Tensor, advantages: Tensor) -> Tensor:
        return -advantages * logp


def test_user_loss_is_built_through_class_path():
    parser = ArgumentParser()
    parser.add_argument("--loss", type=PolicyLoss)
    config = parser.parse_object({"loss": {
        "class_path": "tests.losses.test_contract.ScaledPGLoss", "init_args": {"scale": 3.0}}})
    loss_fn = parser.instantiate_classes(config).loss
    assert type(loss_fn).__name__ == "ScaledPGLoss" and loss_fn.scale == 3.0
    logp, old_logp, advantages = region_batch()
    logp.requires_grad_(True)
    out = loss_fn(logp, old_logp, advantages, torch.ones_like(logp))
    out.loss.backward()
    expected = advantages * loss_fn.prob_weight(out.ratio, old_logp.exp(), advantages) * logp.exp()
    torch.testing.assert_close(-logp.grad * logp.numel(), expected)


def test_builtin_loss_is_built_through_class_path():
    parser = ArgumentParser()
    parser.add_argument("--loss", type=PolicyLoss)
    config = parser.parse_object({"loss": {"class_path": "dgpo.losses.DGPOLoss",
                                           "init_args": {"n": 2, "m": 3}}})
    loss_fn = parser.instantiate_classes(config).loss
    assert (loss_fn.n, loss_fn.m) == (2, 3)


def test_user_loss_without_prob_weight_still_trains():
    loss_fn = UnstatedWeightLoss()
    logp, old_logp, advantages, mask = random_batch()
    logp.requires_grad_(True)
    out = loss_fn(logp, old_logp, advantages, mask)
    out.loss.backward()
    assert out.prob_weight is None and "grad_weight/mean" not in out.metrics
    assert math.isfinite(out.loss.item())
    with pytest.raises(NotImplementedError):
        loss_fn.prob_weight(out.ratio, old_logp.exp(), advantages[:, None])


def test_loss_weights_scale_each_tokens_gradient(loss_case):
    """Rollout-correction weights multiply each token's loss: its gradient scales by its weight."""
    loss_fn = make_loss(loss_case)
    logp, old_logp, advantages, mask = random_batch()
    g = torch.Generator().manual_seed(5)
    weights = torch.rand(logp.shape, generator=g, dtype=logp.dtype) * 2
    if loss_fn.sequence_level:  # one weight per response (the sequence_* correction modes)
        weights = weights[:, :1].expand_as(weights)
    weights = torch.where(mask, weights, torch.full_like(weights, math.nan))  # padding: garbage
    plain = logp.clone().requires_grad_(True)
    loss_fn(plain, old_logp, advantages, mask).loss.backward()
    weighted = logp.clone().requires_grad_(True)
    out = loss_fn(weighted, old_logp, advantages, mask, weights=weights)
    out.loss.backward()
    assert torch.isfinite(out.loss)
    torch.testing.assert_close(weighted.grad, torch.where(mask, weights, 0.0) * plain.grad)
    constant = loss_fn(logp, old_logp, advantages, mask, weights=torch.full_like(logp, 0.25))
    torch.testing.assert_close(constant.loss, 0.25 * loss_fn(logp, old_logp, advantages, mask).loss)


def test_user_loss_written_against_the_old_contract_takes_weights():
    loss_fn = UnstatedWeightLoss()
    logp, old_logp, advantages, mask = random_batch()
    weights = torch.zeros_like(logp)
    weights[0, 0] = 3.0
    logp.requires_grad_(True)
    loss_fn(logp, old_logp, advantages, mask, weights=weights).loss.backward()
    expected = torch.zeros_like(logp)
    expected[0, 0] = -3.0 * advantages[0] / mask.sum()
    torch.testing.assert_close(logp.grad, expected)
    with pytest.raises(ValueError, match=r"weights must have the shape \(B, T\) = \(6, 9\)"):
        loss_fn(logp, old_logp, advantages, mask, weights=torch.ones(6))
