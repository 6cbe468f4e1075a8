"""Gradient-weight conventions shared by the recorder and the figures.

A loss's :meth:`~dgpo.losses.PolicyLoss.prob_weight` is ``W``, the weight on ``∇π``
(``∇ objective = A · W · ∇π``). The figures can show it three ways (``kind``):

- ``"relative"`` (the default): ``W · π_old``, W in units of the plain policy gradient's
  ``1/π_old``. It is 1 inside the trust region for every method and depends only on the IS ratio
  and the sign of the advantage: GRPO 0 past the boundaries, GPPO ``(1−ε_l)/r`` on LN (→ ∞ as
  π → 0) and ``(1+ε_h)/r`` on HP, DGPO ``(r/(1−ε_l))^n`` on LN (→ 0) and
  ``((1+ε_h)/r)^(1/m)`` on HP.
- ``"prob"``: ``W`` itself (∝ ``1/π_old``, so it spans decades across tokens).
- ``"logprob"``: ``g = W · π``, the weight on ``∇ log π`` (``r`` for the plain policy gradient).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import numpy as np
import torch

from dgpo.losses import LOSSES, PolicyLoss

WeightKind = Literal["relative", "prob", "logprob"]
WEIGHT_KINDS: tuple[str, ...] = ("relative", "prob", "logprob")
WEIGHT_LABELS: dict[str, str] = {
    "relative": r"grad weight $W\cdot\pi_{old}$ (PG = 1)",
    "prob": r"grad weight $W$ on $\nabla\pi$",
    "logprob": r"grad weight $g = W\cdot\pi$ on $\nabla\log\pi$",
}
#: Display names of the built-in methods.
METHOD_LABELS: dict[str, str] = {"pg": "PG", "grpo": "GRPO", "cispo": "CISPO", "gppo": "GPPO",
                                 "ce_gppo": "CE-GPPO", "aspo": "ASPO", "dgpo": "DGPO",
                                 "sapo": "SAPO", "gspo": "GSPO", "gmpo": "GMPO"}
#: The built-in methods whose weight is a function of the token alone (its ratio, π_old and A):
#: the ones Figure 2 can draw and the recorder can evaluate on sampled tokens. GSPO's and GMPO's
#: weights depend on the whole response (``PolicyLoss.sequence_level``).
TOKEN_LEVEL_METHODS: tuple[str, ...] = tuple(name for name, cls in LOSSES.items()
                                             if not cls.sequence_level)


def check_token_level(methods: Sequence[str]) -> None:
    """Raise a ``ValueError`` unless every name is a built-in token-level method.

    Raises:
        ValueError: for an unknown name, or a sequence-level method (GSPO, GMPO).
    """
    unknown = [name for name in methods if name not in LOSSES]
    if unknown:
        raise ValueError(f"unknown methods {unknown}; known: {', '.join(LOSSES)}")
    sequence = [name for name in methods if LOSSES[name].sequence_level]
    if sequence:
        raise ValueError(
            f"methods {sequence} are sequence-level: a token's weight depends on its whole "
            f"response, not on the token alone; token-level methods: "
            f"{', '.join(TOKEN_LEVEL_METHODS)}")


def check_kind(kind: str) -> None:
    """Raise a ``ValueError`` unless ``kind`` is one of :data:`WEIGHT_KINDS`."""
    if kind not in WEIGHT_KINDS:
        raise ValueError(f"weight kind must be one of {WEIGHT_KINDS}, got {kind!r}")


def convert_weight(prob_weight: np.ndarray, prob: np.ndarray, old_prob: np.ndarray,
                   kind: WeightKind = "relative") -> np.ndarray:
    """Express the weights ``W`` on ``∇π`` as ``kind`` (see the module docstring).

    Args:
        prob_weight: W per token.
        prob: π per token.
        old_prob: π_old per token.
        kind: ``"relative"`` (``W·π_old``), ``"prob"`` (``W``) or ``"logprob"`` (``W·π``).

    Raises:
        ValueError: for an unknown kind.
    """
    check_kind(kind)
    weight = np.asarray(prob_weight, dtype=np.float64)
    if kind == "relative":
        return weight * np.asarray(old_prob, dtype=np.float64)
    if kind == "logprob":
        return weight * np.asarray(prob, dtype=np.float64)
    return weight


def method_name(loss: PolicyLoss) -> str:
    """The built-in name of a loss's class (``"dgpo"``, ...), else its lower-case class name."""
    for name, cls in LOSSES.items():
        if type(loss) is cls:
            return name
    return type(loss).__name__.lower()


def comparison_losses(active: PolicyLoss | None = None,
                      methods: Sequence[str] | None = None) -> dict[str, PolicyLoss]:
    """One loss per built-in method, to evaluate every method's weight on the same tokens.

    Each is built with its defaults except the trust-region widths, taken from ``active`` so that
    every method sees the same regions (unless ``active`` is sequence-level: its widths bound
    another quantity). The method of ``active``'s own class is ``active`` itself (its ``n``,
    ``m``, betas, ... included).

    Args:
        active: the loss being trained, or ``None`` for the defaults.
        methods: built-in names; defaults to :data:`TOKEN_LEVEL_METHODS`.

    Raises:
        ValueError: for an unknown or a sequence-level method name.
    """
    methods = list(TOKEN_LEVEL_METHODS) if methods is None else list(methods)
    check_token_level(methods)
    widths: dict[str, float] = {}
    if active is not None and not active.sequence_level:
        widths["clip_high"] = active.clip_high
        if active.clip_low is not None:
            widths["clip_low"] = active.clip_low
    out: dict[str, PolicyLoss] = {}
    for name in methods:
        cls = LOSSES[name]
        out[name] = active if active is not None and type(active) is cls else cls(**widths)
    return out


def weight_curve(loss: PolicyLoss, prob: np.ndarray, old_prob: float, advantage: float,
                 kind: WeightKind = "prob") -> np.ndarray:
    """A loss's analytic weight along a grid of π at fixed π_old and advantage (Figure 2).

    Args:
        loss: a loss that states :meth:`~dgpo.losses.PolicyLoss.prob_weight`.
        prob: the grid of π values, in (0, 1].
        old_prob: π_old, in (0, 1].
        advantage: the advantage (only its sign matters for the built-in losses).
        kind: how to express the weight (see the module docstring).

    Returns:
        The weight at each grid point, float64.

    Raises:
        ValueError: for a sequence-level loss (its weight is not a function of the token alone).
    """
    if loss.sequence_level:
        raise ValueError(f"{type(loss).__name__} is sequence-level: a token's weight depends on "
                         "its whole response, so it has no curve against the token's π")
    prob_t = torch.as_tensor(np.asarray(prob, dtype=np.float64))
    old = torch.full_like(prob_t, float(old_prob))
    weight = loss.prob_weight(prob_t / old, old, torch.full_like(prob_t, float(advantage)))
    return convert_weight(weight.numpy(), prob_t.numpy(), old.numpy(), kind)
