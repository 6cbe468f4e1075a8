"""CE-GPPO: coordinating entropy via gradient-preserving clipping (Kuaishou, arXiv 2509.20712)."""

from __future__ import annotations

from dgpo.losses.base import Aggregation, check_range
from dgpo.losses.gppo import GPPOLoss


class CEGPPOLoss(GPPOLoss):
    """GPPO with the clipped tokens' gradients scaled by ``beta1`` (LN) and ``beta2`` (HP).

    ``beta1 < 1`` damps the push-down of low-probability negative tokens (less entropy growth);
    ``beta2`` scales the push-up of high-ratio positive ones. Official settings: ``beta1 = 0.5``
    (1.5B) or ``0.75`` (7B), ``beta2 = 1``, ``clip_ratio_c = 10``.

    Args:
        clip_low: ε_l in (0, 1).
        clip_high: ε_h > 0.
        beta1: scale of the LN gradient, ≥ 0.
        beta2: scale of the HP gradient, ≥ 0.
        clip_ratio_c: dual-clip constant c > 1 for ``A < 0``; ``None`` turns it off.
        agg: loss aggregation.
        norm_length: Dr. GRPO normaliser length for ``agg="seq-mean-token-sum-norm"``.

    Raises:
        ValueError: for a negative beta or any out-of-range shared hyper-parameter.

    Example:
        >>> loss_fn = CEGPPOLoss(beta1=0.75, beta2=1.0, clip_ratio_c=10.0)
    """

    def __init__(self, clip_low: float = 0.2, clip_high: float = 0.2, beta1: float = 0.5,
                 beta2: float = 1.0, clip_ratio_c: float | None = 10.0,
                 agg: Aggregation = "token-mean", norm_length: int | None = None) -> None:
        super().__init__(clip_low=clip_low, clip_high=clip_high, clip_ratio_c=clip_ratio_c,
                         agg=agg, norm_length=norm_length)
        check_range("beta1", beta1, 0.0, float("inf"), low_open=False)
        check_range("beta2", beta2, 0.0, float("inf"), low_open=False)
        self.beta1 = beta1
        self.beta2 = beta2
