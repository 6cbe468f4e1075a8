"""DGPO: decoupled gradient policy optimisation (Fu et al. 2026, arXiv 2603.14389)."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from dgpo.losses.base import HP, LN, Aggregation, PolicyLoss, check_range, ratio_from_logp, regions


class DGPOLoss(PolicyLoss):
    """Bilateral decoupled decay of the probability-gradient weight at both trust-region boundaries.

    Past the left boundary with ``A < 0`` (LN) the weight on ``∇π`` decays to 0 as ``C_left · π^n``
    instead of diverging like ``1/π`` (CISPO, GPPO); past the right boundary with ``A > 0`` (HP) it
    decays gently as ``C_right · π^(−1/m)``. The constants make the weight continuous (``1/π_old``)
    at both boundaries. Inside, and on the lagging regions (LP, HN), the surrogate is ``−A · r``,
    with no min/max and no dual-clip. This is the official surrogate, token by token:

    - LN: ``−A · exp(log π + n·sg(log π) − (n+1)·log π_old) / (1−ε_l)^n``
    - HP: ``−A · exp(log π + log(1+ε_h)/m − log π_old·(m−1)/m − sg(log π)/m)``

    The authors suggest ``n, m ∈ {1, 2, 3}``: ``(2, 2)`` for 1.5B models, ``(1, 2)`` for 7B and up.

    Args:
        clip_low: ε_l in (0, 1).
        clip_high: ε_h > 0.
        n: decay exponent on the left boundary, ≥ 1.
        m: decay root on the right boundary, ≥ 1.
        agg: loss aggregation.
        norm_length: Dr. GRPO normaliser length for ``agg="seq-mean-token-sum-norm"``.

    Raises:
        ValueError: when n or m is below 1 or a shared hyper-parameter is out of range.

    Example:
        >>> loss_fn = DGPOLoss(n=2, m=2)
    """

    def __init__(self, clip_low: float = 0.2, clip_high: float = 0.2, n: float = 1.0,
                 m: float = 2.0, agg: Aggregation = "token-mean",
                 norm_length: int | None = None) -> None:
        super().__init__(clip_low=clip_low, clip_high=clip_high, agg=agg, norm_length=norm_length)
        check_range("n", n, 1.0, math.inf, low_open=False)
        check_range("m", m, 1.0, math.inf, low_open=False)
        self.n = n
        self.m = m

    def token_loss(self, logp: Tensor, old_logp: Tensor, advantages: Tensor) -> Tensor:
        """The official DGPO surrogate (see the class docstring)."""
        assert self.clip_low is not None  # required by __init__
        log_ratio, ratio = ratio_from_logp(logp, old_logp)
        code = regions(ratio.detach(), advantages, self.clip_low, self.clip_high)
        # Evaluate each branch only on its own tokens, so an overflow elsewhere cannot leak a NaN
        # gradient through torch.where.
        left_lr = torch.where(code == LN, log_ratio, torch.zeros_like(log_ratio))
        right_lr = torch.where(code == HP, log_ratio, torch.zeros_like(log_ratio))
        left = torch.exp(left_lr + self.n * left_lr.detach()) / (1.0 - self.clip_low) ** self.n
        right = torch.exp(math.log1p(self.clip_high) / self.m + right_lr
                          - right_lr.detach() / self.m)
        surrogate = torch.where(code == LN, left, torch.where(code == HP, right, ratio))
        return -advantages * surrogate

    def prob_weight(self, ratio: Tensor, old_prob: Tensor, advantages: Tensor) -> Tensor:
        """``1/π_old``; ``C_left · π^n`` on LN; ``C_right · π^(−1/m)`` on HP."""
        assert self.clip_low is not None
        code = regions(ratio, advantages, self.clip_low, self.clip_high)
        # C_left·π^n = (r/(1−ε_l))^n / π_old and C_right·π^(−1/m) = ((1+ε_h)/r)^(1/m) / π_old:
        # the same numbers, without π_old^(−(n+1)) overflowing for rare tokens.
        left = (ratio / (1.0 - self.clip_low)) ** self.n / old_prob
        right = ((1.0 + self.clip_high) / ratio) ** (1.0 / self.m) / old_prob
        weight = (1.0 / old_prob).expand_as(ratio)
        weight = torch.where(code == LN, left, weight)
        return torch.where(code == HP, right, weight)
