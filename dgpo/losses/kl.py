"""Per-token estimators of the KL penalty to the frozen reference model (``kl_coef`` of the module).

Schulman's estimators (http://joschu.net/blog/kl-approx.html) of ``KL(π‖π_ref)`` from tokens
sampled from π, with ``δ = log π_ref − log π`` per token:

===============  ===============================  ====================  ==========================
estimator        value                            unbiased for the KL   its gradient (on-policy)
===============  ===============================  ====================  ==========================
``k1``           ``−δ = log π − log π_ref``       yes                   0 in expectation: biased
``k2``           ``δ²/2``                         no (biased, ≥ 0)      unbiased for ∇KL(π‖π_ref)
``k3``           ``e^δ − δ − 1``                  yes (and ≥ 0)         ∇KL(π_ref‖π): biased
``low_var_kl``   k3 clamped to ``[−10, 10]``      no where it clamps    as k3, 0 past the clamp
===============  ===============================  ====================  ==========================

"Gradient" is the expectation over tokens drawn from the current π of the estimator's autograd
gradient, with the sampling itself not differentiated (how a loss term uses it): k2's is exactly
``E_π[(log π − log π_ref) ∇ log π] = ∇ KL(π‖π_ref)``; k3's is ``E_π[(1 − π_ref/π) ∇ log π] =
∇ KL(π_ref‖π)``, the reverse KL's; k1's is ``E_π[∇ log π] = 0``. Off-policy (π ≠ π_old after the
first mini-batch) none of these statements is exact. ``low_var_kl`` is verl's name for its clamped
k3. ``δ`` is clamped to ``[−20, 20]`` in k3 and ``low_var_kl`` so that ``e^δ`` cannot overflow.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

KLEstimator = Literal["k1", "k2", "k3", "low_var_kl"]
KL_ESTIMATORS: tuple[str, ...] = ("k1", "k2", "k3", "low_var_kl")

#: ``log π_ref − log π`` is clamped to this range before ``exp`` (k3, low_var_kl).
_DELTA_CLAMP = 20.0
#: verl's bound on its low-variance k3.
LOW_VAR_KL_CLAMP = 10.0


def k3_kl(logp: Tensor, ref_logp: Tensor) -> Tensor:
    """Schulman's k3 estimator of KL(π‖π_ref) per token: exp(ref − logp) − (ref − logp) − 1.

    Non-negative, and unbiased for the KL when the tokens are sampled from π. The log-ratio is
    clamped to [−20, 20] so that a token the reference model finds impossible cannot overflow.

    Example:
        >>> float(k3_kl(torch.tensor([0.0]), torch.tensor([0.0])))
        0.0
    """
    delta = torch.clamp(ref_logp - logp, -_DELTA_CLAMP, _DELTA_CLAMP)
    return torch.exp(delta) - delta - 1.0


def kl_penalty(logp: Tensor, ref_logp: Tensor, estimator: KLEstimator = "k3") -> Tensor:
    """Per-token KL penalty ``(B, T)`` with the chosen estimator (see the module docstring).

    Args:
        logp: log π_θ of the sampled tokens, differentiable, ``(B, T)``.
        ref_logp: log π_ref of the same tokens, ``(B, T)``.
        estimator: ``"k1"``, ``"k2"``, ``"k3"`` or ``"low_var_kl"``.

    Returns:
        The per-token estimate; mask and reduce it as the policy loss is reduced.

    Raises:
        ValueError: for an unknown estimator.

    Example:
        >>> kl_penalty(torch.tensor([-1.0]), torch.tensor([-2.0]), "k2")
        tensor([0.5000])
    """
    if estimator == "k1":
        return logp - ref_logp
    if estimator == "k2":
        return 0.5 * (logp - ref_logp).square()
    if estimator == "k3":
        return k3_kl(logp, ref_logp)
    if estimator == "low_var_kl":
        return torch.clamp(k3_kl(logp, ref_logp), -LOW_VAR_KL_CLAMP, LOW_VAR_KL_CLAMP)
    raise ValueError(f"estimator must be one of {KL_ESTIMATORS}, got {estimator!r}")
