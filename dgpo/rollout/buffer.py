"""The rollout buffer: one epoch's generated sequences, served as shuffled mini-batches."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Sampler


@dataclass
class RolloutSample:
    """One generated response and what training needs of it.

    Attributes:
        prompt_ids: the prompt's token ids.
        response_ids: the generated token ids (including the end-of-sequence token if sampled).
        advantage: the response's advantage (broadcast to its tokens).
        reward: the response's reward (for diagnostics).
        group: index of its prompt within the rollout batch.
        old_logp: behaviour log-probs of ``response_ids`` (filled before training).
        ref_logp: reference-model log-probs of ``response_ids`` (when a KL penalty is on).
        defer_old_logp: the behaviour log-probs are this sample's log-probs in its training
            forward pass: it is in the epoch's first mini-batch, which the policy that sampled it
            trains on before any update, so a separate scoring pass would compute the same numbers.
        rollout_logp: the engine's raw log-probs of ``response_ids`` while sampling (for the
            train–inference mismatch correction), when the engine reports them.
        in_loss: False leaves the sample out of the loss (e.g. a truncated response with
            ``mask_truncated``): its response mask is all False.
    """

    prompt_ids: list[int]
    response_ids: list[int]
    advantage: float
    reward: float = 0.0
    group: int = 0
    old_logp: Tensor | None = None
    ref_logp: Tensor | None = None
    defer_old_logp: bool = False
    rollout_logp: Tensor | None = None
    in_loss: bool = True


def collate_samples(samples: Sequence[RolloutSample], pad_token_id: int = 0) -> dict[str, Tensor]:
    """Right-pad samples into a training batch.

    Returns a dict with ``input_ids`` and ``attention_mask`` ``(B, L)``, ``response_mask``,
    ``old_logp``, ``ref_logp`` and ``rollout_logp`` ``(B, L−1)`` aligned with the targets
    ``input_ids[:, 1:]``,
    ``advantages``, ``defer_old_logp`` and ``group`` ``(B,)`` (see :class:`RolloutSample`).
    Missing log-probs are zeros.
    """
    lengths = [len(s.prompt_ids) + len(s.response_ids) for s in samples]
    batch, length = len(samples), max(lengths, default=1)
    input_ids = torch.full((batch, length), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((batch, length), dtype=torch.long)
    response_mask = torch.zeros((batch, max(length - 1, 0)), dtype=torch.bool)
    old_logp = torch.zeros((batch, max(length - 1, 0)), dtype=torch.float32)
    ref_logp = torch.zeros_like(old_logp)
    rollout_logp = torch.zeros_like(old_logp)
    for row, sample in enumerate(samples):
        prompt, response = len(sample.prompt_ids), len(sample.response_ids)
        input_ids[row, :prompt + response] = torch.tensor(sample.prompt_ids + sample.response_ids)
        attention_mask[row, :prompt + response] = 1
        targets = slice(prompt - 1, prompt - 1 + response)
        response_mask[row, targets] = sample.in_loss
        if sample.old_logp is not None:
            old_logp[row, targets] = sample.old_logp
        if sample.ref_logp is not None:
            ref_logp[row, targets] = sample.ref_logp
        if sample.rollout_logp is not None:
            rollout_logp[row, targets] = sample.rollout_logp
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "response_mask": response_mask,
        "old_logp": old_logp,
        "ref_logp": ref_logp,
        "rollout_logp": rollout_logp,
        "advantages": torch.tensor([s.advantage for s in samples], dtype=torch.float32),
        "defer_old_logp": torch.tensor([s.defer_old_logp for s in samples], dtype=torch.bool),
        "group": torch.tensor([s.group for s in samples], dtype=torch.long),
    }


class MiniBatchSampler(Sampler[list[int]]):
    """Yields ``passes`` shuffled passes over the buffer in mini-batches of fixed size.

    The order depends only on ``(seed, buffer.epoch, pass)``, so a resumed run sees the same
    mini-batches as an uninterrupted one. With several ranks the buffer holds the whole
    rollout on every rank and each rank gets its contiguous ``1 / world_size`` part of every
    global mini-batch (:meth:`global_batches` lists the global ones), so the ranks together
    train on exactly the mini-batches of a single-process run.
    """

    def __init__(self, buffer: RolloutBuffer) -> None:
        self.buffer = buffer

    def __len__(self) -> int:
        return self.buffer.steps_per_epoch

    def global_batches(self, epoch: int | None = None) -> Iterator[list[int]]:
        """The mini-batches over all ranks (buffer indices) of ``epoch`` (default: the buffer's)."""
        epoch = self.buffer.epoch if epoch is None else epoch
        size = self.buffer.mini_batch_size
        count = len(self.buffer)
        for ppo_pass in range(self.buffer.ppo_epochs):
            seed = (self.buffer.seed * 1_000_003 + epoch) * 1_009 + ppo_pass
            generator = torch.Generator().manual_seed(seed % (2**63))
            order = torch.randperm(count, generator=generator).tolist()
            for start in range(0, count - size + 1, size):
                yield order[start:start + size]

    def __iter__(self) -> Iterator[list[int]]:
        part = self.buffer.mini_batch_size // self.buffer.world_size
        first = self.buffer.rank * part
        for batch in self.global_batches():
            yield batch[first:first + part]


class RolloutBuffer(Dataset):
    """Holds the current rollout's samples and serves them as the epoch's training batches.

    The rollout callback calls :meth:`configure` once (sizes) and :meth:`fill` at the start of
    every epoch; the data module's ``train_dataloader`` returns :meth:`dataloader`. Its length is
    fixed by the configuration, so Lightning knows the number of steps per epoch up front.
    """

    def __init__(self) -> None:
        self.samples: list[RolloutSample] = []
        self.num_sequences = 0
        self.mini_batch_size = 1
        self.ppo_epochs = 1
        self.pad_token_id = 0
        self.seed = 0
        self.epoch = 0
        self.rank = 0
        self.world_size = 1

    def configure(self, num_sequences: int, mini_batch_size: int, ppo_epochs: int = 1,
                  pad_token_id: int = 0, seed: int = 0, rank: int = 0,
                  world_size: int = 1) -> None:
        """Set the sizes: ``num_sequences`` per rollout, in mini-batches, ``ppo_epochs`` passes.

        ``num_sequences`` and ``mini_batch_size`` are global (all ranks together); this rank
        (``rank`` of ``world_size``) trains on its ``mini_batch_size / world_size`` part of each
        mini-batch.

        Raises:
            ValueError: when ``mini_batch_size`` does not divide ``num_sequences``, or
                ``world_size`` does not divide ``mini_batch_size``, or a size is < 1.
        """
        for name, value in (("num_sequences", num_sequences), ("mini_batch_size", mini_batch_size),
                            ("ppo_epochs", ppo_epochs), ("world_size", world_size)):
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        if num_sequences % mini_batch_size:
            raise ValueError(
                f"mini_batch_size={mini_batch_size} must divide the rollout batch of "
                f"{num_sequences} sequences (prompts × n)")
        if mini_batch_size % world_size:
            raise ValueError(
                f"mini_batch_size={mini_batch_size} sequences cannot be split evenly over "
                f"{world_size} ranks; make it a multiple of the number of ranks")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, {world_size}), got {rank}")
        self.rank = rank
        self.world_size = world_size
        self.num_sequences = num_sequences
        self.mini_batch_size = mini_batch_size
        self.ppo_epochs = ppo_epochs
        self.pad_token_id = pad_token_id
        self.seed = seed

    def first_mini_batch(self, epoch: int) -> list[int]:
        """Buffer indices of ``epoch``'s first global mini-batch (trained on before any update)."""
        return next(MiniBatchSampler(self).global_batches(epoch))

    @property
    def steps_per_epoch(self) -> int:
        """Optimiser steps per epoch (= per rollout)."""
        return self.ppo_epochs * (self.num_sequences // self.mini_batch_size)

    def fill(self, samples: list[RolloutSample], epoch: int) -> None:
        """Replace the contents with one rollout's samples.

        Raises:
            ValueError: when the number of samples differs from the configured ``num_sequences``.
        """
        if len(samples) != self.num_sequences:
            raise ValueError(f"expected {self.num_sequences} samples, got {len(samples)}")
        self.samples = samples
        self.epoch = epoch

    def __len__(self) -> int:
        return self.num_sequences

    def __getitem__(self, index: int) -> RolloutSample:
        return self.samples[index]

    def collate(self, samples: Sequence[RolloutSample]) -> dict[str, Tensor]:
        """Right-pad a list of samples (see :func:`collate_samples`)."""
        return collate_samples(samples, self.pad_token_id)

    def dataloader(self) -> DataLoader:
        """The epoch's training batches: ``steps_per_epoch`` mini-batches."""
        return DataLoader(self, batch_sampler=MiniBatchSampler(self), collate_fn=self.collate)
