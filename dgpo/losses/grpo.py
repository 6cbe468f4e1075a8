"""GRPO / PPO clipped surrogate with dual-clip.

Shao et al. 2024, arXiv 2402.03300; Ye et al. 2020.
"""

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
)


class GRPOLoss(PolicyLoss):
    """PPO's clipped surrogate as GRPO/verl compute it, with dual-clip for negative advantages.

    ``max(−A·r, −A·clip(r, 1−ε_l, 1+ε_h))``, then for ``A < 0`` ``min(·, −A·c)``. Tokens past the
    boundary in the direction the advantage pushes (LN, HP) get no gradient; with dual-clip, neither
    do HN tokens with ``r > c``. DAPO's "clip-higher" is ``clip_high=0.28, clip_ratio_c=10``.

    Args:
        clip_low: ε_l in (0, 1).
        clip_high: ε_h > 0.
        clip_ratio_c: dual-clip constant c > 1; ``None`` turns dual-clip off.
        agg: loss aggregation (see :func:`dgpo.losses.base.aggregate`).
        norm_length: Dr. GRPO normaliser length for ``agg="seq-mean-token-sum-norm"``.

    Example:
        >>> loss_fn = GRPOLoss(clip_high=0.28, clip_ratio_c=10.0)
    """

    def __init__(self, clip_low: float = 0.2, clip_high: float = 0.2,
                 clip_ratio_c: float | None = 3.0, agg: Aggregation = "token-mean",
                 norm_length: int | None = None) -> None:
        super().__init__(clip_low=clip_low, clip_high=clip_high, agg=agg, norm_length=norm_length)
        check_range("clip_ratio_c", clip_ratio_c, 1.0, math.inf, allow_none=True)
        self.clip_ratio_c = clip_ratio_c

    def token_loss(self, logp: Tensor, old_logp: Tensor, advantages: Tensor) -> Tensor:
        """The clipped (and dual-clipped) surrogate."""
        assert self.clip_low is not None  # always set for GRPO (validated in __init__)
        ratio = ratio_from_logp(logp, old_logp)[1]
        unclipped = -advantages * ratio
        clipped = -advantages * torch.clamp(ratio, 1.0 - self.clip_low, 1.0 + self.clip_high)
        loss = torch.maximum(unclipped, clipped)
        if self.clip_ratio_c is not None:
            dual = torch.minimum(loss, -advantages * self.clip_ratio_c)
            loss = torch.where(advantages < 0, dual, loss)
        return loss

    def prob_weight(self, ratio: Tensor, old_prob: Tensor, advantages: Tensor) -> Tensor:
        """``1/π_old``, except 0 on LN, HP and (dual-clip) HN with ``r > c``."""
        code = regions(ratio, advantages, self.clip_low, self.clip_high)
        weight = (1.0 / old_prob).expand_as(ratio).clone()
        zero = (code == LN) | (code == HP)
        if self.clip_ratio_c is not None:
            zero |= (code == HN) & (ratio > self.clip_ratio_c)
        return torch.where(zero, torch.zeros_like(weight), weight)
