"""Training-batch helpers: micro-batch splitting, deferred behaviour log-probs, dropout checks."""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import Tensor


def micro_batches(batch: dict[str, Tensor], size: int,
                  by_group: bool = False) -> Iterator[tuple[Tensor, dict[str, Tensor]]]:
    """Split a mini-batch into micro-batches of ``size`` rows, each trimmed to its longest row.

    Rows are sorted by length (longest first) to limit padding. With ``by_group`` (and a
    ``group`` entry in ``batch``) the rows of one group stay together, groups ordered by their
    longest row, so that a micro-batch holds few distinct prompts (see ``share_prompts`` in
    :func:`dgpo.logprobs.sequence_logprobs`).

    Yields:
        ``(rows, micro)``: the rows' indices in ``batch`` and the micro-batch.
    """
    lengths = batch["attention_mask"].sum(-1)
    groups = batch.get("group")
    if by_group and groups is not None:
        longest: dict[int, int] = {}
        for group, length in zip(groups.tolist(), lengths.tolist(), strict=True):
            longest[group] = max(longest.get(group, 0), length)
        keys = [(-longest[g], g, -n) for g, n in zip(groups.tolist(), lengths.tolist(),
                                                      strict=True)]
        order = torch.tensor(sorted(range(len(keys)), key=keys.__getitem__), dtype=torch.long,
                             device=lengths.device)
    else:
        order = torch.argsort(lengths, descending=True)
    for start in range(0, order.numel(), size):
        rows = order[start:start + size]
        width = int(lengths[rows].max())
        widths = {key: max(width - 1, 0) for key in _TARGET_ALIGNED}
        yield rows, {key: (value[rows] if value.dim() == 1
                           else value[rows, :widths.get(key, width)])
                     for key, value in batch.items()}


#: Batch entries aligned with the targets ``input_ids[:, 1:]`` (one column fewer).
_TARGET_ALIGNED = ("response_mask", "old_logp", "ref_logp", "rollout_logp")


def resolve_old_logp(old_logp: Tensor, logp: Tensor, deferred: Tensor | None) -> Tensor:
    """π_old per token: the buffer's, or this forward pass's for rows that defer it.

    A row defers (``RolloutSample.defer_old_logp``) when it is trained on before any update of
    the policy that sampled it, so its training log-probs are its behaviour log-probs.
    """
    if deferred is None or not bool(deferred.any()):
        return old_logp
    return torch.where(deferred[:, None], logp.detach(), old_logp)


def has_dropout(model: torch.nn.Module) -> bool:
    """Whether a train-mode forward pass can differ from an eval-mode one (active dropout)."""
    if any(isinstance(m, torch.nn.modules.dropout._DropoutNd) and m.p > 0
           for m in model.modules()):
        return True
    config = getattr(model, "config", None)
    values = vars(config).items() if config is not None else ()
    return any("dropout" in key and isinstance(value, float) and value > 0
               for key, value in values)

