"""CISPO: clipped IS-weight policy optimisation (MiniMax-M1, arXiv 2506.13585)."""

from __future__ import annotations

import torch
from torch import Tensor

from dgpo.losses.base import Aggregation, PolicyLoss, ratio_from_logp


class CISPOLoss(PolicyLoss):
    """REINFORCE weighted by a clipped, stop-gradient IS ratio.

    The surrogate is ``−sg(clip(r, 1−ε_l, 1+ε_h)) · A · log π``.

    Every token keeps a gradient; outside the trust region its weight on ``∇π`` is
    ``(1−ε_l)/π`` or ``(1+ε_h)/π``, which diverges as π → 0. MiniMax-M1 effectively has no lower
    bound (``clip_low=None``); the DGPO paper analyses the two-sided form, the default here.

    Args:
        clip_low: ε_l in (0, 1), or ``None`` for no lower bound.
        clip_high: ε_h > 0.
        agg: loss aggregation.
        norm_length: Dr. GRPO normaliser length for ``agg="seq-mean-token-sum-norm"``.

    Example:
        >>> loss_fn = CISPOLoss(clip_low=None, clip_high=0.28)
    """

    allows_no_clip_low = True

    def __init__(self, clip_low: float | None = 0.2, clip_high: float = 0.2,
                 agg: Aggregation = "token-mean", norm_length: int | None = None) -> None:
        super().__init__(clip_low=clip_low, clip_high=clip_high, agg=agg, norm_length=norm_length)

    def _clipped(self, ratio: Tensor) -> Tensor:
        low = None if self.clip_low is None else 1.0 - self.clip_low
        return torch.clamp(ratio, min=low, max=1.0 + self.clip_high)

    def token_loss(self, logp: Tensor, old_logp: Tensor, advantages: Tensor) -> Tensor:
        """``−sg(clip(r)) · A · log π``."""
        ratio = ratio_from_logp(logp, old_logp)[1]
        return -self._clipped(ratio).detach() * advantages * logp

    def prob_weight(self, ratio: Tensor, old_prob: Tensor, advantages: Tensor) -> Tensor:
        """``clip(r) / π``: ``1/π_old`` inside, ``(1∓ε)/π`` outside."""
        return self._clipped(ratio) / (ratio * old_prob)
