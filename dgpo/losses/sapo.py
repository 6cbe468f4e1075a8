"""SAPO: soft adaptive policy optimisation (Gao et al. 2025, Qwen team, arXiv 2511.20347)."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from dgpo.losses.base import Aggregation, PolicyLoss, check_range, ratio_from_logp


class SAPOLoss(PolicyLoss):
    """A smooth gate of the ratio in place of PPO's hard clip.

    The surrogate is ``−f(r) · A`` with the gate ``f(r) = σ(τ(r − 1)) · 4/τ``, ``τ = tau_pos`` where
    ``A > 0`` and ``tau_neg`` elsewhere (TRL ``loss_type="sapo"``, verl ``sapo``). Its gradient
    weight on ``∇π`` is the smooth bump ``W = 4 σ(1 − σ) / π_old`` with ``σ = σ(τ(r − 1))``: exactly
    the policy gradient's ``1/π_old`` at ``r = 1``, decaying like ``exp(−τ|r − 1|)`` on both sides
    and never exactly zero. A larger τ narrows the bump (``tau_neg > tau_pos``: negative tokens are
    damped faster, as the paper recommends). ``clip_low``/``clip_high`` only define the regions
    reported in the metrics.

    Args:
        tau_pos: temperature τ for tokens with ``A > 0``; > 0.
        tau_neg: temperature τ for tokens with ``A ≤ 0``; > 0.
        clip_low: ε_l of the reported regions, in (0, 1).
        clip_high: ε_h of the reported regions, > 0.
        agg: loss aggregation; the paper's (and TRL's, verl's) ``"seq-mean-token-mean"`` by default.
        norm_length: Dr. GRPO normaliser length for ``agg="seq-mean-token-sum-norm"``.

    Raises:
        ValueError: when a temperature is not positive or a shared hyper-parameter is out of range.

    Example:
        >>> loss_fn = SAPOLoss(tau_pos=1.0, tau_neg=1.05)
    """

    def __init__(self, tau_pos: float = 1.0, tau_neg: float = 1.05, clip_low: float = 0.2,
                 clip_high: float = 0.2, agg: Aggregation = "seq-mean-token-mean",
                 norm_length: int | None = None) -> None:
        super().__init__(clip_low=clip_low, clip_high=clip_high, agg=agg, norm_length=norm_length)
        check_range("tau_pos", tau_pos, 0.0, math.inf)
        check_range("tau_neg", tau_neg, 0.0, math.inf)
        self.tau_pos = tau_pos
        self.tau_neg = tau_neg

    def _tau(self, advantages: Tensor) -> Tensor:
        positive = torch.full_like(advantages, self.tau_pos)
        return torch.where(advantages > 0, positive, torch.full_like(advantages, self.tau_neg))

    def token_loss(self, logp: Tensor, old_logp: Tensor, advantages: Tensor) -> Tensor:
        """``−σ(τ(r − 1)) · 4/τ · A``."""
        ratio = ratio_from_logp(logp, old_logp)[1]
        tau = self._tau(advantages)
        return -torch.sigmoid(tau * (ratio - 1.0)) * (4.0 / tau) * advantages

    def prob_weight(self, ratio: Tensor, old_prob: Tensor, advantages: Tensor) -> Tensor:
        """``4 σ(τ(r−1)) σ(−τ(r−1)) / π_old`` (``σ(−x) = 1 − σ(x)``, accurate in the tails)."""
        x = self._tau(advantages) * (ratio - 1.0)
        return 4.0 * torch.sigmoid(x) * torch.sigmoid(-x) / old_prob
