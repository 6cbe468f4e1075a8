"""The weight-sync check: after a weight push, the engine and the policy must agree.

The engine's raw log-probs of a few sequences it just sampled (computed with the weights just
pushed) are compared with the policy's; a gap means the push did not arrive (or the weights are
not finite), which would make every importance ratio wrong without any other sign.
"""

from __future__ import annotations

from typing import Any

import torch

from dgpo.rollout.buffer import RolloutSample
from dgpo.rollout.engine import Completion, RolloutEngine


def sync_gap(engine: RolloutEngine, policy: Any, samples: list[RolloutSample],
             completions: list[Completion]) -> dict[str, float]:
    """``max``, ``sum`` and ``count`` of ``|engine log p − policy log p|`` over the samples' tokens.

    The engine's side is what it reported while sampling; an engine that reports none is asked
    to score the sequences. ``policy`` is a :class:`~dgpo.rollout.policy.RolloutPolicy`.
    """
    reported = [c.logprobs for c in completions]
    if all(r is not None and len(r) == len(s.response_ids)
           for r, s in zip(reported, samples, strict=True)):
        engine_logp = [list(r) for r in reported]
    else:
        engine_logp = [row[len(s.prompt_ids) - 1:] for s, row in zip(
            samples, engine.score([s.prompt_ids + s.response_ids for s in samples]),
            strict=True)]
    policy_logp = policy.score_samples(samples, temperature=1.0)
    diffs = [(torch.tensor(engine_row, dtype=torch.float32) - policy_row).abs()
             for engine_row, policy_row in zip(engine_logp, policy_logp, strict=True)]
    diff = torch.cat(diffs) if diffs else torch.zeros(1)
    return {"max": float(diff.max()), "sum": float(diff.sum()), "count": diff.numel()}


def check_sync(sync: dict[str, float], tolerance: float) -> None:
    """Stop the run (on every rank alike) when the mean gap exceeds ``tolerance`` or is NaN.

    Raises:
        RuntimeError: naming the gap and the tolerance.
    """
    if not sync["mean"] <= tolerance:  # NaN fails too
        raise RuntimeError(
            f"rollout engine and policy disagree after the weight push: mean |Δ log p| = "
            f"{sync['mean']:.4g} > sync_tolerance={tolerance} (max {sync['max']:.4g}); the "
            "engine's weights were not updated, or are not finite")
