"""GPPO: gradient-preserving clipping (Klear-Reasoner, arXiv 2508.07629)."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from dgpo.losses.base import (
    HN,
    HP,
    LN,
    Aggregation,
    PolicyLoss,
    check_range,
    ratio_from_logp,
    regions,
    with_gradient_of,
)


class GPPOLoss(PolicyLoss):
    """PPO clipping whose clipped tokens keep a bounded gradient.

    On LN the surrogate is ``−A · β1(1−ε_l) · r/sg(r)`` and on HP ``−A · β2(1+ε_h) · r/sg(r)``:
    the forward value is PPO's clipped value, the gradient is ``β(1∓ε) ∇ log π``, i.e. a weight
    ``β(1∓ε)/π`` on ``∇π`` that diverges as π → 0. Elsewhere ``−A · r``, with dual-clip
    for ``A < 0``. GPPO is ``β1 = β2 = 1``; :class:`~dgpo.losses.CEGPPOLoss` exposes the betas.

    Args:
        clip_low: ε_l in (0, 1).
        clip_high: ε_h > 0.
        clip_ratio_c: dual-clip constant c > 1 for ``A < 0``; ``None`` turns it off.
        agg: loss aggregation.
        norm_length: Dr. GRPO normaliser length for ``agg="seq-mean-token-sum-norm"``.

    Example:
        >>> loss_fn = GPPOLoss(clip_ratio_c=10.0)
    """

    beta1: float = 1.0
    beta2: float = 1.0

    def __init__(self, clip_low: float = 0.2, clip_high: float = 0.2,
                 clip_ratio_c: float | None = 3.0, agg: Aggregation = "token-mean",
                 norm_length: int | None = None) -> None:
        super().__init__(clip_low=clip_low, clip_high=clip_high, agg=agg, norm_length=norm_length)
        check_range("clip_ratio_c", clip_ratio_c, 1.0, math.inf, allow_none=True)
        self.clip_ratio_c = clip_ratio_c

    def token_loss(self, logp: Tensor, old_logp: Tensor, advantages: Tensor) -> Tensor:
        """Region-wise gradient-preserving surrogate."""
        assert self.clip_low is not None  # required by __init__
        log_ratio, ratio = ratio_from_logp(logp, old_logp)
        code = regions(ratio.detach(), advantages, self.clip_low, self.clip_high)
        low = with_gradient_of(self.beta1 * (1.0 - self.clip_low), log_ratio)
        high = with_gradient_of(self.beta2 * (1.0 + self.clip_high), log_ratio)
        surrogate = torch.where(code == LN, low, torch.where(code == HP, high, ratio))
        loss = -advantages * surrogate
        if self.clip_ratio_c is not None:
            dual = (code == HN) & (ratio.detach() > self.clip_ratio_c)
            loss = torch.where(dual, -advantages * self.clip_ratio_c, loss)
        return loss

    def prob_weight(self, ratio: Tensor, old_prob: Tensor, advantages: Tensor) -> Tensor:
        """``1/π_old``; ``β1(1−ε_l)/π`` on LN; ``β2(1+ε_h)/π`` on HP; 0 on HN past c."""
        assert self.clip_low is not None
        code = regions(ratio, advantages, self.clip_low, self.clip_high)
        prob = ratio * old_prob
        weight = (1.0 / old_prob).expand_as(ratio)
        weight = torch.where(code == LN, self.beta1 * (1.0 - self.clip_low) / prob, weight)
        weight = torch.where(code == HP, self.beta2 * (1.0 + self.clip_high) / prob, weight)
        if self.clip_ratio_c is not None:
            dual = (code == HN) & (ratio > self.clip_ratio_c)
            weight = torch.where(dual, torch.zeros_like(weight), weight)
        return weight
