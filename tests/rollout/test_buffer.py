import pytest
import torch

from dgpo.rollout.buffer import RolloutBuffer, RolloutSample, collate_samples


def sample(prompt, response, advantage=1.0, logp=None):
    return RolloutSample(prompt_ids=prompt, response_ids=response, advantage=advantage,
                         old_logp=None if logp is None else torch.tensor(logp))


def test_collate_samples_aligns_response_mask_and_logprobs_with_targets():
    batch = collate_samples([sample([5, 6], [7, 8, 9], 0.5, [-1.0, -2.0, -3.0]),
                             sample([5], [7], -1.0, [-4.0])], pad_token_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8, 9], [5, 7, 0, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1, 1], [1, 1, 0, 0, 0]]
    # targets are input_ids[:, 1:]: row 0 -> [6, 7, 8, 9], response tokens are 7, 8, 9
    assert batch["response_mask"].tolist() == [[False, True, True, True],
                                               [True, False, False, False]]
    assert batch["old_logp"].tolist() == [[0.0, -1.0, -2.0, -3.0], [-4.0, 0.0, 0.0, 0.0]]
    assert batch["advantages"].tolist() == [0.5, -1.0]


def test_rollout_buffer_serves_ppo_epochs_of_shuffled_mini_batches():
    buffer = RolloutBuffer()
    buffer.configure(num_sequences=8, mini_batch_size=4, ppo_epochs=2, seed=1)
    buffer.fill([sample([1], [2 + i], float(i)) for i in range(8)], epoch=0)
    batches = list(buffer.dataloader())
    assert len(batches) == buffer.steps_per_epoch == 4
    first_pass = sorted(torch.cat([b["advantages"] for b in batches[:2]]).tolist())
    second_pass = sorted(torch.cat([b["advantages"] for b in batches[2:]]).tolist())
    assert first_pass == second_pass == [float(i) for i in range(8)]
    again = list(buffer.dataloader())
    assert all(torch.equal(a["advantages"], b["advantages"])
               for a, b in zip(batches, again, strict=True))
    buffer.fill(buffer.samples, epoch=1)
    other = list(buffer.dataloader())
    assert not all(torch.equal(a["advantages"], b["advantages"])
                   for a, b in zip(batches, other, strict=True))


def test_rollout_buffer_rejects_sizes_that_do_not_divide():
    with pytest.raises(ValueError, match="mini_batch_size=3 must divide the rollout batch of 8"):
        RolloutBuffer().configure(num_sequences=8, mini_batch_size=3)
    buffer = RolloutBuffer()
    buffer.configure(num_sequences=4, mini_batch_size=2)
    with pytest.raises(ValueError, match="expected 4 samples, got 3"):
        buffer.fill([sample([1], [2])] * 3, epoch=0)
