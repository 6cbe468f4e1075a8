"""Train–inference mismatch correction: importance weights from the engine's to the trainer's π_old.

The rollout engine (vLLM, often in bf16) samples with probabilities ``π_rollout`` that differ from
the trainer's ``π_old`` for the same weights. The policy losses are written for samples from
``π_old``; multiplying each token's loss by ``w = π_old/π_rollout`` (truncated or masked so that
rare tokens cannot blow up the gradient) corrects for it. The four modes are TRL's
``vllm_importance_sampling_mode`` (verl's rollout correction and OpenRLHF's ``is_correction_type``
are the same ideas):

- ``token_truncate``: ``w_t = clamp(π_old,t / π_rollout,t, low, cap)`` (truncated IS, "TIS");
- ``token_mask``: ``w_t = π_old,t / π_rollout,t`` inside ``[low, cap]``, 0 outside ("MIS");
- ``sequence_truncate`` / ``sequence_mask``: the same applied to the response's ratio
  ``exp(Σ_t log(π_old,t / π_rollout,t))`` over its valid tokens, shared by all of them.

``low=None`` means no lower bound. The weights are 0 on padding.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import Tensor

from dgpo.losses.kl import k3_kl

CorrectionMode = Literal["token_truncate", "token_mask", "sequence_truncate", "sequence_mask"]
CORRECTION_MODES: tuple[str, ...] = ("token_truncate", "token_mask", "sequence_truncate",
                                     "sequence_mask")


def check_correction(mode: str, cap: float, low: float | None = None) -> None:
    """Validate a correction's settings (call it where they are configured, before any rollout).

    Raises:
        ValueError: for an unknown mode, a cap that is not > 0, or a low bound outside [0, cap).
    """
    if mode not in CORRECTION_MODES:
        raise ValueError(f"mode must be one of {CORRECTION_MODES}, got {mode!r}")
    if isinstance(cap, bool) or not isinstance(cap, (int, float)) or not cap > 0:
        raise ValueError(f"cap must be a number > 0 (math.inf for no upper bound), got {cap!r}")
    if low is not None and (isinstance(low, bool) or not isinstance(low, (int, float))
                            or not 0 <= low < cap):
        raise ValueError(f"low must be None or a number in [0, cap={cap!r}), got {low!r}")


def _log_ratio(old_logp: Tensor, rollout_logp: Tensor, mask: Tensor, mode: str) -> Tensor:
    """``log(π_old/π_rollout)`` per token, or per response broadcast to its tokens; 0 on padding."""
    if old_logp.shape != rollout_logp.shape or old_logp.shape != mask.shape:
        raise ValueError(
            f"old_logp, rollout_logp and mask must have one shape (B, T), got "
            f"{tuple(old_logp.shape)}, {tuple(rollout_logp.shape)} and {tuple(mask.shape)}")
    dtype = torch.promote_types(old_logp.dtype, torch.float32)
    delta = old_logp.detach().to(dtype) - rollout_logp.detach().to(dtype)
    delta = torch.where(mask.bool(), delta, torch.zeros_like(delta))
    if mode.startswith("sequence"):
        delta = delta.sum(-1, keepdim=True).expand_as(delta)
    return delta


def _bounds(cap: float, low: float | None) -> tuple[float, float]:
    """The bounds in log space: ``(log low, log cap)`` with ``−inf`` for no lower bound."""
    return (math.log(low) if low else -math.inf), math.log(cap)


def rollout_correction(old_logp: Tensor, rollout_logp: Tensor, mask: Tensor,
                       mode: CorrectionMode, cap: float, low: float | None = None) -> Tensor:
    """Per-token weights ``(B, T)`` that correct for the engine's sampling distribution.

    Args:
        old_logp: the trainer's log π_old of the sampled tokens, ``(B, T)``.
        rollout_logp: the engine's log-probs of the same tokens, ``(B, T)``.
        mask: 1/True for valid response tokens, ``(B, T)``.
        mode: ``"token_truncate"``, ``"token_mask"``, ``"sequence_truncate"`` or
            ``"sequence_mask"`` (see the module docstring).
        cap: the upper bound of the ratio, > 0 (TRL's default is 3, verl's 2).
        low: the lower bound, in [0, cap), or ``None`` for none.

    Returns:
        Detached weights, float32 or wider, 0 on padding; pass them to the loss as ``weights=``.

    Raises:
        ValueError: for a bad mode, cap or low, or mismatched shapes.

    Example:
        >>> old = torch.log(torch.tensor([[0.5, 0.2]]))
        >>> engine = torch.log(torch.tensor([[0.25, 0.4]]))
        >>> rollout_correction(old, engine, torch.ones(1, 2), "token_truncate", cap=1.5)
        tensor([[1.5000, 0.5000]])
    """
    check_correction(mode, cap, low)
    log_ratio = _log_ratio(old_logp, rollout_logp, mask, mode)
    log_low, log_cap = _bounds(cap, low)
    if mode.endswith("truncate"):
        weights = torch.exp(torch.clamp(log_ratio, min=log_low, max=log_cap))
    else:
        keep = (log_ratio >= log_low) & (log_ratio <= log_cap)
        weights = torch.where(keep, torch.exp(torch.clamp(log_ratio, max=log_cap)),
                              torch.zeros_like(log_ratio))
    return torch.where(mask.bool(), weights, torch.zeros_like(weights))


def rollout_correction_metrics(old_logp: Tensor, rollout_logp: Tensor, mask: Tensor,
                               mode: CorrectionMode, cap: float,
                               low: float | None = None) -> dict[str, Tensor]:
    """Detached scalar metrics of the mismatch and of the correction (log them under a prefix).

    Args:
        old_logp: the trainer's log π_old, ``(B, T)``.
        rollout_logp: the engine's log-probs, ``(B, T)``.
        mask: valid response tokens, ``(B, T)``.
        mode: as :func:`rollout_correction`.
        cap: as :func:`rollout_correction`.
        low: as :func:`rollout_correction`.

    Returns:
        ``kl``: the k3 estimate of KL(π_rollout‖π_old) per valid token (the tokens are sampled
        from π_rollout); ``truncated_fraction`` (truncate modes) or ``masked_fraction`` (mask
        modes): the share of valid tokens whose ratio (their response's in the sequence modes)
        lies outside ``[low, cap]``; ``weights/min``, ``weights/mean``, ``weights/max`` over valid
        tokens. All 0 without valid tokens.

    Raises:
        ValueError: as :func:`rollout_correction`.
    """
    weights = rollout_correction(old_logp, rollout_logp, mask, mode, cap, low)
    log_ratio = _log_ratio(old_logp, rollout_logp, mask, mode)
    log_low, log_cap = _bounds(cap, low)
    valid = mask.bool()
    count = torch.clamp(valid.sum(), min=1).to(weights.dtype)
    zero = torch.zeros((), dtype=weights.dtype, device=weights.device)

    def mean(values: Tensor) -> Tensor:
        return torch.where(valid, values.to(weights.dtype), torch.zeros_like(weights)).sum() / count

    outside = (log_ratio < log_low) | (log_ratio > log_cap)
    kl = k3_kl(rollout_logp.detach().to(weights.dtype), old_logp.detach().to(weights.dtype))
    share = "truncated_fraction" if mode.endswith("truncate") else "masked_fraction"
    any_valid = valid.any()  # no host synchronisation
    smallest = torch.where(valid, weights, torch.full_like(weights, math.inf)).min()
    largest = torch.where(valid, weights, torch.full_like(weights, -math.inf)).max()
    return {
        "kl": mean(kl),
        share: mean(outside),
        "weights/min": torch.where(any_valid, smallest, zero),
        "weights/mean": mean(weights),
        "weights/max": torch.where(any_valid, largest, zero),
    }
