"""Shared inputs of the loss tests: loss settings and token batches covering every region."""

import math

import torch

from dgpo.losses import LOSSES, build_loss

torch.set_default_dtype(torch.float32)

#: (region, sign of A, ratio interval) covering all five regions, away from every boundary
#: (1 ± 0.2, dual-clip c = 3 and 10, ASPO's 1/c).
REGION_SAMPLES = [
    ("IN", -1, (0.82, 1.18)), ("IN", 1, (0.82, 1.18)),
    ("LN", -1, (0.05, 0.31)), ("LN", -1, (0.35, 0.78)),
    ("LP", 1, (0.05, 0.31)), ("LP", 1, (0.35, 0.78)),
    ("HN", -1, (1.22, 2.9)), ("HN", -1, (3.1, 9.5)), ("HN", -1, (10.5, 30.0)),
    ("HP", 1, (1.22, 2.9)), ("HP", 1, (3.1, 9.5)), ("HP", 1, (10.5, 30.0)),
]

#: Every built-in loss with the settings the tests cover (defaults plus variants).
LOSS_CASES = {
    "pg": {},
    "grpo": {},
    "grpo-no-dual": {"clip_ratio_c": None},
    "grpo-dapo": {"clip_high": 0.28, "clip_ratio_c": 10.0},
    "cispo": {},
    "cispo-no-low": {"clip_low": None},
    "gppo": {},
    "ce_gppo": {"beta1": 0.5, "beta2": 1.0},
    "aspo": {},
    "dgpo": {},
    "dgpo-n2m2": {"n": 2, "m": 2},
    "dgpo-n3m3": {"n": 3, "m": 3},
    "sapo": {},
    "sapo-sharp": {"tau_pos": 2.0, "tau_neg": 4.0, "agg": "token-mean"},
    "gspo": {},
    "gspo-wide": {"clip_low": 0.2, "clip_high": 0.2, "agg": "token-mean"},
    "gmpo": {},
    "gmpo-narrow": {"clip_low": 0.1, "clip_high": 0.2},
}


def make_loss(case: str):
    return build_loss(case.split("-")[0], **LOSS_CASES[case])


def region_batch(per_region: int = 8, seed: int = 0, dtype=torch.float64):
    """Tokens whose ratios cover every region.

    Returns:
        logp, old_logp, advantages (B, T) and labels.
    """
    g = torch.Generator().manual_seed(seed)
    ratios, signs = [], []
    for _, sign, (low, high) in REGION_SAMPLES:
        ratios.append(low + (high - low) * torch.rand(per_region, generator=g, dtype=dtype))
        signs.append(torch.full((per_region,), float(sign), dtype=dtype))
    ratio = torch.cat(ratios)
    sign = torch.cat(signs)
    # π_old small enough that π = r·π_old stays a probability (< 0.9).
    old_prob = torch.exp(math.log(1e-3) + (math.log(0.9 / 31) - math.log(1e-3))
                         * torch.rand(ratio.shape, generator=g, dtype=dtype))
    magnitude = 0.1 + torch.rand(ratio.shape, generator=g, dtype=dtype)
    old_logp = old_prob.log()
    logp = old_logp + ratio.log()
    return logp[None, :], old_logp[None, :], (sign * magnitude)[None, :]


ALL_CASES = list(LOSS_CASES)
assert set(c.split("-")[0] for c in ALL_CASES) == set(LOSSES)

