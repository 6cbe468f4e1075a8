"""The unclipped importance-sampled policy gradient: the reference every method is compared with."""

from __future__ import annotations

from torch import Tensor

from dgpo.losses.base import PolicyLoss, ratio_from_logp


class PGLoss(PolicyLoss):
    """Importance-sampled policy gradient without any clipping: ``−A · r`` on every token.

    Its weight on ``∇π`` is the constant ``W = 1/π_old`` (``g = r`` on ``∇ log π``). ``clip_low``
    and ``clip_high`` only define the regions reported in the metrics.

    Example:
        >>> loss_fn = PGLoss()
    """

    def token_loss(self, logp: Tensor, old_logp: Tensor, advantages: Tensor) -> Tensor:
        """``−A · r``."""
        return -advantages * ratio_from_logp(logp, old_logp)[1]

    def prob_weight(self, ratio: Tensor, old_prob: Tensor, advantages: Tensor) -> Tensor:
        """``1/π_old`` everywhere."""
        return (1.0 / old_prob).expand_as(ratio).clone()
