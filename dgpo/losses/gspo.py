"""GSPO: group sequence policy optimisation (Zheng et al. 2025, Qwen team, arXiv 2507.18071)."""

from __future__ import annotations

import torch
from torch import Tensor

from dgpo.losses.base import HP, LN, LOG_RATIO_CLAMP, Aggregation, regions, sequence_mean
from dgpo.losses.sequence import SequencePolicyLoss, sequence_log_ratio


class GSPOLoss(SequencePolicyLoss):
    """PPO's clip applied to the sequence ratio, the geometric mean of the token ratios.

    ``s_i = exp(mean_t log(π_t/π_old,t))`` over the valid tokens of response i. Every token carries
    it as ``s_i,t = sg(s_i) · π_t/sg(π_t)`` (GSPO-token, which allows per-token advantages; the
    paper's GSPO when the advantage is per sequence) and the surrogate is
    ``max(−A·s_i,t, −A·clip(s_i,t, 1−ε_l, 1+ε_h))``, without dual-clip (TRL
    ``importance_sampling_level="sequence"``, verl ``gspo``).

    Gradient weight, per token t of response i: ``W_t = s_i · χ_i / π_t``, i.e. ``g = W·π = s_i``
    on ``∇ log π_t``, where ``χ_i = 0`` when the *sequence* is clipped in the direction the
    advantage pushes (``A < 0`` and ``s_i < 1−ε_l``, or ``A > 0`` and ``s_i > 1+ε_h``), else 1.
    Every token of a response gets the same ``g``; it depends on all of them through ``s_i``,
    so it is not a curve in the token's own π (no Figure 2 curve). The regions in the metrics
    are those of ``s_i``. ``log s_i`` is clamped to ``[−20, 20]`` before ``exp``: no overflow,
    however long or far off-policy the response.

    Args:
        clip_low: ε_l of the sequence ratio, in (0, 1); the paper's ``3e-4``.
        clip_high: ε_h of the sequence ratio, > 0; the paper's ``4e-4``.
        agg: loss aggregation; the paper's ``"seq-mean-token-mean"`` by default.
        norm_length: Dr. GRPO normaliser length for ``agg="seq-mean-token-sum-norm"``.

    Example:
        >>> loss_fn = GSPOLoss(clip_low=3e-4, clip_high=4e-4)
    """

    def __init__(self, clip_low: float = 3e-4, clip_high: float = 4e-4,
                 agg: Aggregation = "seq-mean-token-mean",
                 norm_length: int | None = None) -> None:
        super().__init__(clip_low=clip_low, clip_high=clip_high, agg=agg, norm_length=norm_length)

    def masked_token_loss(self, logp: Tensor, old_logp: Tensor, advantages: Tensor,
                          mask: Tensor) -> Tensor:
        """The clipped surrogate of ``s_i,t = sg(s_i) · π_t/sg(π_t)``."""
        assert self.clip_low is not None  # required by __init__
        log_s = sequence_log_ratio(logp, old_logp, mask)[..., None]  # (B, 1)
        ratio = torch.exp(log_s + logp - logp.detach())  # value s_i, gradient s_i ∇ log π_t
        clipped = torch.clamp(ratio, 1.0 - self.clip_low, 1.0 + self.clip_high)
        return torch.maximum(-advantages * ratio, -advantages * clipped)

    def sequence_ratio(self, ratio: Tensor, advantages: Tensor, mask: Tensor) -> Tensor:
        """``s_i`` broadcast to every token of response i."""
        log_s = torch.clamp(sequence_mean(torch.log(ratio), mask), -LOG_RATIO_CLAMP,
                            LOG_RATIO_CLAMP)
        return torch.exp(log_s)[..., None].expand_as(ratio)

    def masked_prob_weight(self, ratio: Tensor, old_prob: Tensor, advantages: Tensor,
                           mask: Tensor) -> Tensor:
        """``s_i / π_t``, 0 where the sequence is clipped (LN or HP of ``s_i``)."""
        seq = self.sequence_ratio(ratio, advantages, mask)
        code = regions(seq, advantages, self.clip_low, self.clip_high)
        weight = seq / (ratio * old_prob)
        return torch.where((code == LN) | (code == HP), torch.zeros_like(weight), weight)

    def region_codes(self, ratio: Tensor, advantages: Tensor, mask: Tensor) -> Tensor:
        """The regions of the sequence ratio ``s_i`` (what GSPO clips)."""
        return regions(self.sequence_ratio(ratio, advantages, mask), advantages, self.clip_low,
                       self.clip_high)
