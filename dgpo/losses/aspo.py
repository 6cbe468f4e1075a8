"""ASPO: asymmetric importance-sampling policy optimisation (Archer2.0, arXiv 2510.06062)."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from dgpo.losses.base import Aggregation, PolicyLoss, check_range, ratio_from_logp


class ASPOLoss(PolicyLoss):
    """Flips the IS ratio of positive-advantage tokens and soft dual-clips both sides.

    For ``A < 0`` the surrogate is PPO's (hard clip on LN: no gradient below ``1−ε_l``) with a soft
    dual-clip above ``c`` (``−A · sg(c) · log π``: gradient ``c ∇ log π``). For ``A > 0`` the ratio
    is flipped: forward value ``1/r`` with gradient ``(1/r) ∇ log π`` (weight ``π_old/π²`` on
    ``∇π``), hard clipped on HP (no gradient above ``1+ε_h``) and soft dual-clipped once
    ``1/r > c``.

    Args:
        clip_low: ε_l in (0, 1).
        clip_high: ε_h > 0.
        clip_ratio_c: soft dual-clip constant c > 1; ``None`` turns it off.
        agg: loss aggregation.
        norm_length: Dr. GRPO normaliser length for ``agg="seq-mean-token-sum-norm"``.

    Example:
        >>> loss_fn = ASPOLoss(clip_ratio_c=3.0)
    """

    def __init__(self, clip_low: float = 0.2, clip_high: float = 0.2,
                 clip_ratio_c: float | None = 3.0, agg: Aggregation = "token-mean",
                 norm_length: int | None = None) -> None:
        super().__init__(clip_low=clip_low, clip_high=clip_high, agg=agg, norm_length=norm_length)
        check_range("clip_ratio_c", clip_ratio_c, 1.0, math.inf, allow_none=True)
        self.clip_ratio_c = clip_ratio_c

    def token_loss(self, logp: Tensor, old_logp: Tensor, advantages: Tensor) -> Tensor:
        """Asymmetric surrogate: PPO-like for ``A < 0``, flipped ratio for ``A ≥ 0``."""
        assert self.clip_low is not None  # required by __init__
        log_ratio, ratio = ratio_from_logp(logp, old_logp)
        fixed = ratio.detach()
        c = math.inf if self.clip_ratio_c is None else self.clip_ratio_c

        negative = torch.where(fixed < 1.0 - self.clip_low,
                               torch.full_like(ratio, 1.0 - self.clip_low), ratio)
        negative = torch.where(fixed > c, c * logp, negative)

        flipped = torch.exp(log_ratio - 2.0 * log_ratio.detach())  # value 1/r, gradient (1/r)∇log π
        positive = torch.where(fixed > 1.0 + self.clip_high,
                               torch.full_like(ratio, 1.0 / (1.0 + self.clip_high)), flipped)
        positive = torch.where(fixed < 1.0 / c, c * logp, positive)

        return -advantages * torch.where(advantages < 0, negative, positive)

    def prob_weight(self, ratio: Tensor, old_prob: Tensor, advantages: Tensor) -> Tensor:
        """``A<0``: 1/π_old, 0 on LN, c/π past c. ``A≥0``: π_old/π², 0 on HP, c/π once r < 1/c."""
        assert self.clip_low is not None
        c = math.inf if self.clip_ratio_c is None else self.clip_ratio_c
        prob = ratio * old_prob
        zero = torch.zeros_like(prob)
        negative = torch.where(ratio < 1.0 - self.clip_low, zero, (1.0 / old_prob).expand_as(prob))
        negative = torch.where(ratio > c, c / prob, negative)
        positive = torch.where(ratio > 1.0 + self.clip_high, zero, old_prob / prob**2)
        positive = torch.where(ratio < 1.0 / c, c / prob, positive)
        return torch.where(advantages < 0, negative, positive)
