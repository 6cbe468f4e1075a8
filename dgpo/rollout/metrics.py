"""The metrics of one rollout (``rollout/*`` and ``time/*``), as the callback logs them."""

from __future__ import annotations

import torch

from dgpo.advantages import group_stats
from dgpo.distributed import concat_reward_outputs
from dgpo.rollout.groups import Batch, Draw, correctness, has_signal


def rollout_metrics(batch: Batch, draws: list[Draw], scores: torch.Tensor,
                    filter_metrics: dict[str, float], timings: dict[str, float], *,
                    mask_truncated: bool = False, shaped: bool = False,
                    dynamic_sampling: bool = False) -> dict[str, torch.Tensor]:
    """The epoch's rollout metrics, by logged name (every value is global: the same on all ranks).

    Args:
        batch: the trained batch (its completions and reward).
        draws: every draw of the epoch (several with dynamic sampling).
        scores: the batch's rewards as trained, ``(prompts, n)`` (after any overlong shaping).
        filter_metrics: dynamic sampling's counts (logged under ``rollout/filter/``).
        timings: seconds per phase (logged as ``time/<phase>_seconds``).
        mask_truncated: log how many truncated samples were masked.
        shaped: the rewards were shaped (log the unshaped mean too).
        dynamic_sampling: log ``filter_metrics``.
    """
    completions = batch.completions
    lengths = torch.tensor([len(c.token_ids) for c in completions], dtype=torch.float32)
    truncated = torch.tensor([c.finish_reason == "length" for c in completions],
                             dtype=torch.float32)
    rewards = scores.flatten()
    sync = draws[0].sync
    metrics = {
        "rollout/reward_mean": rewards.mean(),
        "rollout/reward_std": rewards.std() if rewards.numel() > 1 else torch.tensor(0.0),
        "rollout/response_length_mean": lengths.mean(),
        "rollout/response_length_max": lengths.max(),
        "rollout/truncated_fraction": truncated.mean(),
        "rollout/sync_logp_diff_max": torch.tensor(sync["max"]),
        "rollout/sync_logp_diff_mean": torch.tensor(sync["mean"]),
        # every generated token (all draws) over the time spent generating them
        "rollout/tokens_per_second": torch.tensor(
            sum(len(c.token_ids) for d in draws for c in d.completions)
            / max(timings["generation"], 1e-9)),
    }
    if mask_truncated:
        metrics["rollout/masked_truncated"] = truncated.sum()
    if shaped:
        metrics["rollout/reward_unshaped_mean"] = torch.tensor(batch.reward.scores).mean()
    correct = correctness(batch.reward.correct, scores)
    stats = group_stats(correct, scores) if correct is not None else {
        "zero_variance": float((~has_signal(scores)).float().mean())}
    metrics.update({f"rollout/{k}": torch.tensor(float(v)) for k, v in stats.items()})
    if dynamic_sampling:
        metrics.update({f"rollout/filter/{k}": torch.tensor(float(v))
                        for k, v in filter_metrics.items()})
    # the reward's own metrics cover every scored sample of the epoch (all draws)
    reward = concat_reward_outputs([d.reward for d in draws])
    metrics.update({f"rollout/reward/{k}": torch.tensor(float(v))
                    for k, v in reward.metrics.items()})
    metrics.update({f"time/{k}_seconds": torch.tensor(v) for k, v in timings.items()})
    return metrics
