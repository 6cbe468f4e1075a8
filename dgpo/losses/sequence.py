"""The contract of sequence-level losses: a token's surrogate depends on its whole response.

GSPO and GMPO compute one ratio per response from all its valid tokens, so they need the mask
where token-level losses do not. They implement :meth:`SequencePolicyLoss.masked_token_loss` and
:meth:`SequencePolicyLoss.masked_prob_weight`; the module calls them exactly like any other loss,
``loss(logp, old_logp, advantages, mask, num_tokens=..., num_sequences=...)``.
"""

from __future__ import annotations

import math
from abc import abstractmethod
from typing import ClassVar

import torch
from torch import Tensor

from dgpo.losses.base import LOG_RATIO_CLAMP, PolicyLoss, ratio_from_logp, sequence_mean


def sequence_log_ratio(logp: Tensor, old_logp: Tensor, mask: Tensor) -> Tensor:
    """``log s_i = mean_t log(π/π_old)`` over each response's valid tokens, detached, ``(B,)``.

    Each token's log-ratio is clamped to ``[−20, 20]`` first (as :func:`ratio_from_logp` does), and
    so is the mean: ``exp`` of it is finite even in float32, however far the policy has moved.
    """
    log_ratio = ratio_from_logp(logp.detach(), old_logp.detach())[0]
    return torch.clamp(sequence_mean(log_ratio, mask), -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)


class SequencePolicyLoss(PolicyLoss):
    """Base class of losses whose per-token surrogate needs the whole response (the mask).

    Subclasses implement :meth:`masked_token_loss` and :meth:`masked_prob_weight`. The token-only
    methods :meth:`token_loss` and :meth:`prob_weight` treat the last dimension of their inputs as
    one complete response with every token valid (for a ``(B, T)`` input: B full responses).

    The gradient weight of a sequence-level loss is well defined per token, but it depends on the
    other tokens of the response (through the sequence ratio), not on the token's own ratio alone:
    such losses are left out of Figure 2 and of the recorder's per-method comparison columns; the
    weight the trained loss applied is still returned per token (``LossOutput.prob_weight``).

    Metrics add ``seq_ratio/mean``, ``seq_ratio/min`` and ``seq_ratio/max``: the ratio the loss
    clips (:meth:`sequence_ratio`), the mean taken over valid tokens (each carries its response's).
    """

    sequence_level: ClassVar[bool] = True

    @abstractmethod
    def masked_token_loss(self, logp: Tensor, old_logp: Tensor, advantages: Tensor,
                          mask: Tensor) -> Tensor:
        """Per-token surrogate, ``(B, T)``; the per-sequence reductions use ``mask``."""

    @abstractmethod
    def masked_prob_weight(self, ratio: Tensor, old_prob: Tensor, advantages: Tensor,
                           mask: Tensor) -> Tensor:
        """W per token given the other tokens of its response, ``(B, T)``."""

    @abstractmethod
    def sequence_ratio(self, ratio: Tensor, advantages: Tensor, mask: Tensor) -> Tensor:
        """The per-response ratio the loss uses, broadcast to ``(B, T)`` (detached)."""

    def token_loss(self, logp: Tensor, old_logp: Tensor, advantages: Tensor) -> Tensor:
        """:meth:`masked_token_loss` with every token valid (each row one whole response)."""
        return self.masked_token_loss(logp, old_logp, advantages, _all_valid(logp))

    def prob_weight(self, ratio: Tensor, old_prob: Tensor, advantages: Tensor) -> Tensor:
        """:meth:`masked_prob_weight` with every token valid (each row one whole response)."""
        return self.masked_prob_weight(ratio, old_prob, advantages, _all_valid(ratio))

    def metrics(self, ratio: Tensor, prob: Tensor, advantages: Tensor, mask: Tensor,
                weight: Tensor | None) -> dict[str, Tensor]:
        """The base metrics plus the sequence ratio's mean, min and max over valid tokens."""
        out = super().metrics(ratio, prob, advantages, mask, weight)
        seq = self.sequence_ratio(ratio, advantages, mask)
        count = torch.clamp(mask.sum(), min=1).to(seq.dtype)
        out["seq_ratio/mean"] = torch.where(mask, seq, torch.zeros_like(seq)).sum() / count
        out["seq_ratio/max"] = torch.where(mask, seq, torch.full_like(seq, -math.inf)).max()
        out["seq_ratio/min"] = torch.where(mask, seq, torch.full_like(seq, math.inf)).min()
        if not mask.any():
            out["seq_ratio/max"] = out["seq_ratio/min"] = torch.ones((), dtype=seq.dtype)
        return out


def _all_valid(reference: Tensor) -> Tensor:
    return torch.ones(reference.shape, dtype=torch.bool, device=reference.device)
