"""GMPO: geometric-mean policy optimisation (Zhao et al. 2025, arXiv 2507.20673)."""

from __future__ import annotations

import torch
from torch import Tensor

from dgpo.losses.base import HP, LN, Aggregation, ratio_from_logp, regions, sequence_mean
from dgpo.losses.sequence import SequencePolicyLoss


class GMPOLoss(SequencePolicyLoss):
    """One surrogate per response: the advantage times the geometric mean of its clipped ratios.

    Each token's log-ratio is clipped in log space, sign-aware as in the GMPO paper (verl
    ``geo_mean``): for ``A ≥ 0`` only from above, ``min(log r, ε_h)``; for ``A < 0`` only from
    below, ``max(log r, −ε_l)``, i.e. the trust region is ``e^(−ε_l) ≤ r ≤ e^(ε_h)``. With
    ``s̃_i = exp(mean_t clipped log r_t)`` over the valid tokens, the surrogate of response i is
    ``−A_i · s̃_i``, averaged over responses (``agg="seq-mean-token-mean"``: every valid token
    carries its response's value). ``A_i`` is the response's advantage (the mean over its valid
    tokens when ``(B, T)`` advantages are given; dgpo's rollout gives one per response).

    Gradient weight, per token t of response i: ``W_t = s̃_i · χ_t / π_t`` (``g = W·π = s̃_i`` on
    ``∇ log π_t``), with ``χ_t = 0`` for a token clipped in the direction the advantage pushes
    (``A < 0`` and ``r_t < e^(−ε_l)``, or ``A > 0`` and ``r_t > e^(ε_h)``) and 1 otherwise. Unlike
    PPO's, one token's weight depends on every other token of its response through ``s̃_i``, so
    GMPO has no Figure 2 curve. The regions in the metrics are those of the log-space clip.

    Args:
        clip_low: ε_l of the log-ratio, in (0, 1); the paper's ``0.4`` (``r ≥ e^(−0.4) ≈ 0.67``).
        clip_high: ε_h of the log-ratio, > 0; the paper's ``0.4`` (``r ≤ e^0.4 ≈ 1.49``).
        agg: loss aggregation; ``"seq-mean-token-mean"`` (the mean over responses) by default.
        norm_length: Dr. GRPO normaliser length for ``agg="seq-mean-token-sum-norm"``.

    Example:
        >>> loss_fn = GMPOLoss(clip_low=0.4, clip_high=0.4)
    """

    def __init__(self, clip_low: float = 0.4, clip_high: float = 0.4,
                 agg: Aggregation = "seq-mean-token-mean",
                 norm_length: int | None = None) -> None:
        super().__init__(clip_low=clip_low, clip_high=clip_high, agg=agg, norm_length=norm_length)

    def _clipped_log_ratio(self, log_ratio: Tensor, negative: Tensor) -> Tensor:
        assert self.clip_low is not None  # required by __init__
        upper = torch.clamp(log_ratio, max=self.clip_high)  # A ≥ 0: clipped from above only
        lower = torch.clamp(log_ratio, min=-self.clip_low)  # A < 0: clipped from below only
        return torch.where(negative, lower, upper)

    def _sequence_advantage(self, advantages: Tensor, mask: Tensor) -> Tensor:
        return sequence_mean(advantages, mask)[..., None].expand_as(advantages)

    def masked_token_loss(self, logp: Tensor, old_logp: Tensor, advantages: Tensor,
                          mask: Tensor) -> Tensor:
        """``−A_i · s̃_i`` on every token of response i."""
        seq_advantage = self._sequence_advantage(advantages, mask)
        clipped = self._clipped_log_ratio(ratio_from_logp(logp, old_logp)[0], seq_advantage < 0)
        geometric_mean = torch.exp(sequence_mean(clipped, mask))[..., None]  # (B, 1)
        return -seq_advantage * geometric_mean

    def sequence_ratio(self, ratio: Tensor, advantages: Tensor, mask: Tensor) -> Tensor:
        """``s̃_i``, the geometric mean of the clipped ratios, broadcast to response i."""
        negative = self._sequence_advantage(advantages, mask) < 0
        clipped = self._clipped_log_ratio(torch.log(ratio), negative)
        return torch.exp(sequence_mean(clipped, mask))[..., None].expand_as(ratio)

    def masked_prob_weight(self, ratio: Tensor, old_prob: Tensor, advantages: Tensor,
                           mask: Tensor) -> Tensor:
        """``s̃_i / π_t``, 0 on the tokens the log-space clip stops."""
        code = self.region_codes(ratio, advantages, mask)
        weight = self.sequence_ratio(ratio, advantages, mask) / (ratio * old_prob)
        stopped = (code == LN) | (code == HP)
        return torch.where(stopped, torch.zeros_like(weight), weight)

    def region_codes(self, ratio: Tensor, advantages: Tensor, mask: Tensor) -> Tensor:
        """Regions of the log-space clip: ``log r < −ε_l`` is low, ``log r > ε_h`` is high.

        ``1 + log r`` compared with ``1 − ε_l`` and ``1 + ε_h`` (what :func:`regions` does) is
        exactly that comparison.
        """
        return regions(1.0 + torch.log(ratio), self._sequence_advantage(advantages, mask),
                       self.clip_low, self.clip_high)
