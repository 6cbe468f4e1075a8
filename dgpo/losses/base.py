"""The policy-loss contract: per-token surrogates, trust-region regions and loss aggregation.

A policy loss maps per-token log-probabilities under the current policy (``logp``) and the
behaviour policy (``old_logp``), the advantages and a mask of valid response tokens to one scalar
whose autograd gradient is the method's policy gradient. It also states that gradient analytically
(:meth:`PolicyLoss.prob_weight`), which the tests hold autograd against and the figures are drawn
from. See ``docs``/README for the table of weights.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import Tensor

Aggregation = Literal["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"]
AGGREGATIONS: tuple[str, ...] = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm")

#: Region codes of a token relative to the trust region (dgpo-math.md "Regions").
IN, LN, LP, HN, HP = 0, 1, 2, 3, 4
REGION_NAMES: tuple[str, ...] = ("IN", "LN", "LP", "HN", "HP")

#: Log-ratios are clamped to this range before ``exp`` (as the official code does).
LOG_RATIO_CLAMP = 20.0


@dataclass
class LossOutput:
    """What a policy loss returns.

    Attributes:
        loss: scalar to minimise (float32 or wider).
        metrics: detached scalars: region fractions ``region/<name>``, ``ratio/mean``,
            ``grad_weight/mean`` and whatever the method adds.
        ratio: detached importance-sampling ratio per token, ``(B, T)``.
        prob_weight: detached gradient weight W on ``∇π`` per token, ``(B, T)``, or ``None`` for a
            loss that does not state it.
    """

    loss: Tensor
    metrics: dict[str, Tensor] = field(default_factory=dict)
    ratio: Tensor | None = None
    prob_weight: Tensor | None = None


def check_range(name: str, value: float | None, low: float, high: float, *,
                low_open: bool = True, high_open: bool = True, allow_none: bool = False) -> None:
    """Raise a ``ValueError`` naming ``name`` unless ``value`` lies in the given interval."""
    if value is None and allow_none:
        return
    left, right = ("(" if low_open else "["), (")" if high_open else "]")
    allowed = f"{left}{low}, {'inf' if math.isinf(high) else high}{right}"
    if value is None or isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name} must be a number in {allowed}, got {value!r}")
    below = value <= low if low_open else value < low
    above = value >= high if high_open else value > high
    if below or above or math.isnan(value):
        raise ValueError(f"{name} must be in {allowed}, got {value!r}")


def regions(ratio: Tensor, advantages: Tensor, clip_low: float | None, clip_high: float) -> Tensor:
    """Classify every token into IN, LN, LP, HN or HP (integer codes, same shape as ``ratio``).

    Tokens with ``A ≥ 0`` outside the trust region count as positive (LP/HP); their gradient is
    zero when ``A = 0`` whatever the region. ``clip_low=None`` means no lower boundary.
    """
    negative = advantages < 0
    below = ratio < (1.0 - clip_low) if clip_low is not None else torch.zeros_like(negative)
    above = ratio > 1.0 + clip_high
    code = torch.full_like(ratio, IN, dtype=torch.long)
    code = torch.where(below & negative, LN, code)
    code = torch.where(below & ~negative, LP, code)
    code = torch.where(above & negative, HN, code)
    return torch.where(above & ~negative, HP, code)


def aggregate(token_loss: Tensor, mask: Tensor, agg: str, num_tokens: int | Tensor | None = None,
              num_sequences: int | Tensor | None = None, norm_length: int | None = None) -> Tensor:
    """Reduce a ``(B, T)`` per-token loss to a scalar.

    Args:
        token_loss: per-token surrogate loss, ``(B, T)``.
        mask: 1 for valid response tokens, ``(B, T)``.
        agg: ``"token-mean"`` (sum over the valid tokens of the global batch / their count),
            ``"seq-mean-token-mean"`` (mean over sequences of their token mean) or
            ``"seq-mean-token-sum-norm"`` (Dr. GRPO: token sum / ``norm_length``, mean over
            sequences).
        num_tokens: global number of valid tokens (token-mean); defaults to ``mask.sum()``.
            Pass it when a batch is split into micro-batches or ranks so the result does not
            depend on the split.
        num_sequences: global number of sequences (seq-mean modes); defaults to ``B``.
        norm_length: the constant length of Dr. GRPO's normaliser; defaults to ``T``.

    Raises:
        ValueError: for an unknown ``agg``.
    """
    mask = mask.to(token_loss.dtype)
    masked = token_loss * mask
    if agg == "token-mean":
        denominator = mask.sum() if num_tokens is None else num_tokens
        return masked.sum() / torch.clamp(torch.as_tensor(denominator, dtype=masked.dtype), min=1.0)
    sequences = token_loss.shape[0] if num_sequences is None else num_sequences
    sequences = torch.clamp(torch.as_tensor(sequences, dtype=masked.dtype), min=1.0)
    if agg == "seq-mean-token-mean":
        per_sequence = masked.sum(-1) / torch.clamp(mask.sum(-1), min=1.0)
        return per_sequence.sum() / sequences
    if agg == "seq-mean-token-sum-norm":
        length = token_loss.shape[-1] if norm_length is None else norm_length
        return (masked.sum(-1) / max(length, 1)).sum() / sequences
    raise ValueError(f"agg must be one of {AGGREGATIONS}, got {agg!r}")


def ratio_from_logp(logp: Tensor, old_logp: Tensor) -> tuple[Tensor, Tensor]:
    """Return the clamped log-ratio and the ratio ``r = π / π_old`` (differentiable in ``logp``)."""
    log_ratio = torch.clamp(logp - old_logp, -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    return log_ratio, torch.exp(log_ratio)


def with_gradient_of(value: Tensor | float, log_ratio: Tensor) -> Tensor:
    """``value · r / sg(r)``: forward value ``value``, gradient ``value · ∇ log π``.

    This is GPPO's trick.
    """
    return value * torch.exp(log_ratio - log_ratio.detach())


class PolicyLoss(ABC):
    """Base class of every policy loss: shared hyper-parameters, regions, aggregation, metrics.

    Subclasses implement :meth:`token_loss` (the per-token surrogate to minimise) and, to take part
    in the tests and the figures, :meth:`prob_weight`. Calling the loss does the rest.

    Args:
        clip_low: ε_l, the lower trust-region width: the boundary is ``r = 1 − ε_l``; in (0, 1).
        clip_high: ε_h, the upper width: the boundary is ``r = 1 + ε_h``; > 0.
        agg: how per-token losses become one scalar (see :func:`aggregate`).
        norm_length: constant length for ``agg="seq-mean-token-sum-norm"`` (e.g. the maximum
            response length); ``None`` uses the padded length of the batch.

    Raises:
        ValueError: when a hyper-parameter is outside its range.

    Example:
        >>> loss_fn = DGPOLoss(n=2, m=2)  # doctest: +SKIP
        >>> out = loss_fn(logp, old_logp, advantages, mask,
        ...               num_tokens=global_count)  # doctest: +SKIP
        >>> out.loss.backward()  # doctest: +SKIP
    """

    #: Whether ``clip_low=None`` (no lower boundary) is allowed.
    allows_no_clip_low: bool = False

    def __init__(self, clip_low: float | None = 0.2, clip_high: float = 0.2,
                 agg: Aggregation = "token-mean", norm_length: int | None = None) -> None:
        check_range("clip_low", clip_low, 0.0, 1.0, allow_none=self.allows_no_clip_low)
        check_range("clip_high", clip_high, 0.0, math.inf)
        if agg not in AGGREGATIONS:
            raise ValueError(f"agg must be one of {AGGREGATIONS}, got {agg!r}")
        if norm_length is not None and (isinstance(norm_length, bool) or norm_length < 1):
            raise ValueError(f"norm_length must be a positive integer or None, got {norm_length!r}")
        self.clip_low = clip_low
        self.clip_high = clip_high
        self.agg = agg
        self.norm_length = norm_length

    @abstractmethod
    def token_loss(self, logp: Tensor, old_logp: Tensor, advantages: Tensor) -> Tensor:
        """Per-token surrogate to minimise, ``(B, T)``; ``advantages`` is already ``(B, T)``."""

    def prob_weight(self, ratio: Tensor, old_prob: Tensor, advantages: Tensor) -> Tensor:
        """Analytic weight W on ``∇π`` per token: ``∇ objective = A · W · ∇π``.

        It has the same shape as ``ratio``.

        Raises:
            NotImplementedError: for a loss that does not state its weight (it still trains).
        """
        raise NotImplementedError(f"{type(self).__name__} does not define prob_weight")

    @property
    def states_prob_weight(self) -> bool:
        """Whether this loss implements :meth:`prob_weight`."""
        return type(self).prob_weight is not PolicyLoss.prob_weight

    def __call__(self, logp: Tensor, old_logp: Tensor, advantages: Tensor, mask: Tensor,
                 num_tokens: int | Tensor | None = None,
                 num_sequences: int | Tensor | None = None) -> LossOutput:
        """Compute the loss and its metrics.

        Args:
            logp: log π_θ of the response tokens, ``(B, T)``, differentiable.
            old_logp: log π_old of the same tokens (behaviour policy), ``(B, T)``.
            advantages: ``(B, T)`` per token or ``(B,)`` per sequence.
            mask: 1/True for valid response tokens, ``(B, T)``.
            num_tokens: global count of valid tokens for token-mean (see :func:`aggregate`).
            num_sequences: global count of sequences for the seq-mean modes.

        Returns:
            The scalar loss, detached metrics, and the per-token ratio and weight.
        """
        if logp.shape != old_logp.shape or logp.shape != mask.shape:
            raise ValueError(
                f"logp, old_logp and mask must have one shape (B, T), got {tuple(logp.shape)}, "
                f"{tuple(old_logp.shape)} and {tuple(mask.shape)}"
            )
        dtype = torch.promote_types(logp.dtype, torch.float32)
        logp, old_logp = logp.to(dtype), old_logp.detach().to(dtype)
        advantages = _broadcast_advantages(advantages.detach().to(dtype), logp.shape)
        token_loss = self.token_loss(logp, old_logp, advantages)
        loss = aggregate(token_loss, mask, self.agg, num_tokens, num_sequences, self.norm_length)
        with torch.no_grad():
            ratio = ratio_from_logp(logp, old_logp)[1]
            weight = (self.prob_weight(ratio, old_logp.exp(), advantages)
                      if self.states_prob_weight else None)
            metrics = self.metrics(ratio, logp.exp(), advantages, mask.bool(), weight)
        return LossOutput(loss=loss, metrics=metrics, ratio=ratio, prob_weight=weight)

    def metrics(self, ratio: Tensor, prob: Tensor, advantages: Tensor, mask: Tensor,
                weight: Tensor | None) -> dict[str, Tensor]:
        """Region fractions, ratio statistics and the mean gradient weight over valid tokens.

        ``grad_weight/mean`` is the mean of ``g = W · π``, the weight on ``∇ log π`` (1 for every
        method while ``π = π_old``), which stays finite where W itself (∝ 1/π_old) does not.
        """
        count = torch.clamp(mask.sum(), min=1).to(ratio.dtype)
        code = regions(ratio, advantages, self.clip_low, self.clip_high)
        out = {f"region/{name}": ((code == index) & mask).sum() / count
               for index, name in enumerate(REGION_NAMES)}
        valid_ratio = torch.where(mask, ratio, torch.zeros_like(ratio))
        out["ratio/mean"] = valid_ratio.sum() / count
        out["ratio/max"] = torch.where(mask, ratio, torch.full_like(ratio, -math.inf)).max()
        out["ratio/min"] = torch.where(mask, ratio, torch.full_like(ratio, math.inf)).min()
        if not mask.any():
            out["ratio/max"] = out["ratio/min"] = torch.ones((), dtype=ratio.dtype)
        if weight is not None:
            grad_weight = torch.where(mask, weight * prob, torch.zeros_like(weight))
            out["grad_weight/mean"] = grad_weight.sum() / count
        return out

    def __repr__(self) -> str:
        params = ", ".join(f"{key}={value!r}" for key, value in vars(self).items())
        return f"{type(self).__name__}({params})"


def _broadcast_advantages(advantages: Tensor, shape: torch.Size) -> Tensor:
    if advantages.dim() == 1 and advantages.shape[0] == shape[0]:
        return advantages[:, None].expand(shape)
    if advantages.shape == shape:
        return advantages
    raise ValueError(
        f"advantages must have shape (B,) = ({shape[0]},) or (B, T) = {tuple(shape)}, "
        f"got {tuple(advantages.shape)}"
    )
