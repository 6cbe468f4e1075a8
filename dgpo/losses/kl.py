"""The KL penalty to the frozen reference model (``kl_coef`` of the RLVR module)."""

from __future__ import annotations

import torch
from torch import Tensor


def k3_kl(logp: Tensor, ref_logp: Tensor) -> Tensor:
    """Schulman's k3 estimator of KL(π‖π_ref) per token: exp(ref − logp) − (ref − logp) − 1.

    Non-negative, and unbiased for the KL when the tokens are sampled from π. The log-ratio is
    clamped to [−20, 20] so that a token the reference model finds impossible cannot overflow.

    Example:
        >>> float(k3_kl(torch.tensor([0.0]), torch.tensor([0.0])))
        0.0
    """
    delta = torch.clamp(ref_logp - logp, -20.0, 20.0)
    return torch.exp(delta) - delta - 1.0
