"""The rollout callback: one RL iteration's generation, scoring and bookkeeping per epoch."""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from typing import Any, Literal

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from typing_extensions import override

from dgpo.advantages import ESTIMATORS, compute_advantages, group_stats
from dgpo.data.prompt import PromptSample
from dgpo.distributed import all_gather_objects, reduce_reward_metrics, shard_bounds
from dgpo.rewards import MathVerifyReward, RewardFunction
from dgpo.rollout.buffer import RolloutSample
from dgpo.rollout.engine import Completion, RolloutEngine, SamplingConfig
from dgpo.rollout.policy import check_rollout_policy
from dgpo.seeding import run_seed


@dataclass
class RolloutRecord:
    """The last rollout, for callbacks that report on it (e.g. the completions table).

    Attributes:
        epoch: the epoch it was generated for.
        prompts: the rollout's prompts.
        completions: ``n`` completions per prompt, prompt-major.
        rewards: one reward per completion.
        advantages: one advantage per completion.
        details: the reward's per-completion details (``parsed_answer``, ``status``), if any.
    """

    epoch: int
    prompts: list[PromptSample]
    completions: list[Completion]
    rewards: list[float]
    advantages: list[float]
    details: list[dict[str, Any]] = field(default_factory=list)


#: Advantage estimators that divide by the group's spread and so need n ≥ 2 to carry any signal.
GROUP_NORMALISED = ("grpo", "dr_grpo", "rloo")


class RolloutCallback(Callback):
    """Generates, scores and buffers one rollout batch at the start of every training epoch.

    Each epoch: push the policy's weights into the engine and check they arrived (the engine's
    log-probs of a few sequences must match the policy's), draw ``rollout_batch_size`` prompts
    from the data module, sample ``n`` responses each, score them with ``reward``, compute group
    advantages and the behaviour (and reference) log-probs, and fill the data module's buffer,
    which the epoch then trains on in ``ppo_epochs`` passes of ``mini_batch_size`` sequences.

    On several ranks (DDP, FSDP) every rank has its own engine (a ``VLLMEngine`` with
    ``tensor_parallel_size`` > 1 on GPUs spans that many ranks), and each engine generates for
    its ``rollout_batch_size / engines`` prompts, whole groups, seeded by their index in the whole
    batch. One all-gather then gives every rank the whole rollout, from which the advantages, the
    metrics and the buffer are computed as on one rank; each rank trains on its
    ``mini_batch_size / ranks`` sequences of every mini-batch.

    Args:
        engine: the rollout engine (``VLLMEngine`` or ``TransformersEngine``); its model defaults
            to the policy's.
        reward: reward function(s); defaults to ``MathVerifyReward()``.
        n: samples per prompt (the group size).
        rollout_batch_size: prompts per rollout (all ranks); a multiple of the number of engines.
        mini_batch_size: sequences per optimiser step (all ranks); must divide
            ``rollout_batch_size · n`` and be a multiple of the number of ranks.
        ppo_epochs: passes over the rollout buffer per epoch.
        temperature: sampling temperature (the training log-probs use the same).
        top_p: nucleus sampling threshold.
        max_new_tokens: maximum response length.
        advantage: ``"grpo"`` (group mean/std), ``"dr_grpo"`` (no std) or ``"rloo"``.
        seed: seed of sampling and of the mini-batch order; ``None`` (the default) follows the
            run's ``seed_everything``. Sample ``k`` of prompt ``i`` in epoch ``e`` draws from the
            stream ``(seed, e, i)`` (:func:`dgpo.seeding.derive_seed`), so no stream repeats
            across epochs or runs, and the samples do not depend on the number of engines.
        sync_tolerance: largest mean absolute difference (nats) allowed between the engine's and
            the policy's log-probs after a weight push; a larger one raises ``RuntimeError``.
        sync_check_sequences: how many sequences the sync check scores.
        behaviour_logprobs: where π_old comes from: ``"policy"`` (a forward pass of the trainer's
            policy over the rollout: exact, r = 1 on the first mini-batch, whose π_old is taken
            from its own training forward pass when ``ppo_epochs`` is 1) or ``"engine"`` (the
            log-probs the engine returned while sampling: no extra forward pass, but r carries the
            engine/trainer mismatch; only at temperature 1, where they are the same distribution).
        ignore_eos: sample every response to ``max_new_tokens`` tokens, past end-of-sequence
            (fixed work per iteration, for benchmarks; not for training).

    Raises:
        ValueError: for sizes that cannot work (checked before any model is loaded).

    Example:
        >>> callback = RolloutCallback(TransformersEngine(), n=8, rollout_batch_size=16,
        ...                            mini_batch_size=32, ppo_epochs=1)  # doctest: +SKIP
    """

    def __init__(self, engine: RolloutEngine, reward: RewardFunction | None = None, n: int = 8,
                 rollout_batch_size: int = 16, mini_batch_size: int = 32, ppo_epochs: int = 1,
                 temperature: float = 1.0, top_p: float = 1.0, max_new_tokens: int = 256,
                 advantage: Literal["grpo", "dr_grpo", "rloo"] = "grpo", seed: int | None = None,
                 sync_tolerance: float = 0.05, sync_check_sequences: int = 2,
                 behaviour_logprobs: Literal["policy", "engine"] = "policy",
                 ignore_eos: bool = False) -> None:
        super().__init__()
        for name, value in (("n", n), ("rollout_batch_size", rollout_batch_size),
                            ("mini_batch_size", mini_batch_size), ("ppo_epochs", ppo_epochs),
                            ("sync_check_sequences", sync_check_sequences)):
            if isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        if advantage not in ESTIMATORS:
            raise ValueError(f"advantage must be one of {list(ESTIMATORS)}, got {advantage!r}")
        if advantage in GROUP_NORMALISED and n < 2:
            raise ValueError(f"n={n} samples per prompt give the group-relative advantage "
                             f"{advantage!r} no signal (every advantage is 0); use n >= 2")
        if (rollout_batch_size * n) % mini_batch_size:
            raise ValueError(f"mini_batch_size={mini_batch_size} must divide the rollout batch "
                             f"rollout_batch_size × n = {rollout_batch_size} × {n} = "
                             f"{rollout_batch_size * n} sequences")
        if behaviour_logprobs not in ("policy", "engine"):
            raise ValueError(f"behaviour_logprobs must be 'policy' or 'engine', got "
                             f"{behaviour_logprobs!r}")
        if behaviour_logprobs == "engine" and temperature != 1.0:
            raise ValueError(f"behaviour_logprobs='engine' needs temperature=1.0 (the engine "
                             f"returns the raw model's log-probs), got temperature={temperature}")
        self.behaviour_logprobs = behaviour_logprobs
        self.engine = engine
        self.reward = reward if reward is not None else MathVerifyReward()
        self.n = n
        self.rollout_batch_size = rollout_batch_size
        self.mini_batch_size = mini_batch_size
        self.ppo_epochs = ppo_epochs
        if seed is not None:
            run_seed(seed)  # validates it
        self.sampling = SamplingConfig(n=n, temperature=temperature, top_p=top_p,
                                       max_new_tokens=max_new_tokens, seed=seed,
                                       ignore_eos=ignore_eos)
        self.advantage = advantage
        self.seed = seed
        self.sync_tolerance = sync_tolerance
        self.sync_check_sequences = sync_check_sequences
        self._train_started = 0.0
        self._ranks_per_engine = 1
        self._prompt_range = (0, rollout_batch_size)
        self.last_rollout: RolloutRecord | None = None
        #: seconds per phase of the last rollout on this rank (weight_sync, generation, ...)
        self.last_timings: dict[str, float] = {}

    # ----------------------------------------------------------------------------------- hooks
    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        policy = check_rollout_policy(pl_module)
        if policy.sampling_temperature != self.sampling.temperature:
            raise ValueError(
                f"rollout temperature={self.sampling.temperature} differs from the module's "
                f"temperature={policy.sampling_temperature}, with which the training log-probs "
                "are computed; give both the same value (the CLI links model.temperature to "
                "rollout.temperature)")
        datamodule = trainer.datamodule
        if datamodule is None or not hasattr(datamodule, "next_prompts"):
            raise ValueError("RolloutCallback needs a data module with next_prompts() and a "
                             "buffer, such as dgpo.data.RLVRDataModule")
        # the run seed is known now (LightningCLI seeds before it instantiates the classes)
        self.sampling = replace(self.sampling, seed=run_seed(self.seed))
        self._shard_prompts(trainer.global_rank, trainer.world_size)
        datamodule.buffer.configure(self.rollout_batch_size * self.n, self.mini_batch_size,
                                    self.ppo_epochs, pad_token_id=policy.tokenizer.pad_token_id,
                                    seed=self.sampling.seed, rank=trainer.global_rank,
                                    world_size=trainer.world_size)

    def _shard_prompts(self, rank: int, world_size: int) -> None:
        """Choose this rank's prompts: engine ``rank // ranks_per_engine`` of the engines."""
        per_engine = self.engine.ranks_per_engine(world_size)
        if world_size % per_engine:
            raise ValueError(f"{world_size} ranks cannot be split into rollout engines of "
                             f"{per_engine} ranks (the engine's tensor_parallel_size)")
        engines = world_size // per_engine
        if self.rollout_batch_size % engines:
            raise ValueError(f"rollout_batch_size={self.rollout_batch_size} prompts cannot be "
                             f"split evenly over {engines} rollout engines ({world_size} ranks, "
                             f"{per_engine} per engine); make it a multiple of {engines}")
        self._ranks_per_engine = per_engine
        self._prompt_range = shard_bounds(self.rollout_batch_size, engines, rank // per_engine)

    @override
    def on_train_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._rollout(trainer, pl_module)
        self._train_started = time.perf_counter()

    @override
    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        pl_module.log("time/train_seconds", time.perf_counter() - self._train_started,
                      sync_dist=True, reduce_fx="max")

    @override
    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self.engine.close()
        close = getattr(self.reward, "close", None)
        if callable(close):
            close()

    # -------------------------------------------------------------------------------- rollout
    def _rollout(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """One RL iteration's rollout; with several ranks each engine serves its prompt shard.

        Every rank draws the same prompts; the ranks of engine ``e`` generate, score and compute
        the behaviour log-probs of shard ``e`` (whole groups, so a group's ``n`` samples stay on
        one engine). One all-gather then gives every rank the whole rollout, from which the group
        advantages, the metrics and the buffer are computed exactly as on one rank.
        """
        epoch = trainer.current_epoch
        timings: dict[str, float] = {}
        start = time.perf_counter()
        self.engine.attach(pl_module.policy_for_engine(), pl_module.model_path)  # None: a copy
        self.engine.wake_up()
        self.engine.load_weights(pl_module.named_weights_for_engine())
        timings["weight_sync"] = time.perf_counter() - start

        prompts = trainer.datamodule.next_prompts(self.rollout_batch_size)
        first, stop = self._prompt_range
        # one stream per (run seed, epoch, global prompt index): independent of the sharding
        sampling = replace(self.sampling, stream=(epoch,), prompt_offset=first)
        start = time.perf_counter()
        completions = self.engine.generate([p.prompt_ids for p in prompts[first:stop]], sampling)
        if first:
            completions = [replace(c, prompt_index=c.prompt_index + first) for c in completions]
        timings["generation"] = time.perf_counter() - start
        samples = [RolloutSample(prompt_ids=prompts[c.prompt_index].prompt_ids,
                                 response_ids=list(c.token_ids), advantage=0.0,
                                 group=c.prompt_index) for c in completions]
        start = time.perf_counter()
        sync = self._check_sync(pl_module, samples, completions)
        timings["sync_check"] = time.perf_counter() - start
        self.engine.sleep()

        start = time.perf_counter()
        answers = [prompts[c.prompt_index].answer for c in completions]
        columns = _columns([prompts[c.prompt_index].columns for c in completions])
        rewards = torch.tensor(self.reward([c.text for c in completions], answers, **columns),
                               dtype=torch.float32)
        timings["scoring"] = time.perf_counter() - start
        for sample, reward in zip(samples, rewards, strict=True):
            sample.reward = float(reward)
        start = time.perf_counter()
        deferrable = self._deferrable(trainer, pl_module, epoch, offset=first * self.n)
        self._behaviour_logprobs(pl_module, samples, completions, deferrable)
        timings["logprobs"] = time.perf_counter() - start
        self.last_timings = timings

        shard = _Shard(samples, completions, rewards.tolist(),
                       getattr(self.reward, "details", list)(),
                       getattr(self.reward, "metrics", dict)(), sync, timings)
        whole = self._gather(shard, trainer.world_size)
        self._raise_on_bad_sync(whole.sync)
        advantages = compute_advantages(torch.tensor(whole.rewards, dtype=torch.float32)
                                        .view(len(prompts), self.n), self.advantage).flatten()
        for sample, advantage in zip(whole.samples, advantages, strict=True):
            sample.advantage = float(advantage)
        trainer.datamodule.buffer.fill(whole.samples, epoch)
        details = whole.details if len(whole.details) == len(whole.completions) else []
        self.last_rollout = RolloutRecord(epoch, prompts, whole.completions, whole.rewards,
                                          advantages.tolist(), details)
        self._log(pl_module, whole)

    def _deferrable(self, trainer: Trainer, pl_module: LightningModule, epoch: int,
                    offset: int) -> set[int]:
        """This shard's samples whose π_old can come from their training pass (no scoring).

        The epoch's first mini-batch is trained on before any update, so its training log-probs
        are exactly the policy's behaviour log-probs — when the module says so
        (``can_defer_old_logp``: no dropout), and with one pass over the buffer (later passes
        would need the first pass's values again).
        """
        if (self.behaviour_logprobs != "policy" or self.ppo_epochs > 1
                or not pl_module.can_defer_old_logp):
            return set()
        return {index - offset for index in trainer.datamodule.buffer.first_mini_batch(epoch)}

    def _behaviour_logprobs(self, pl_module: LightningModule, samples: list[RolloutSample],
                            completions: list[Completion], deferrable: set[int]) -> None:
        """Fill each sample's π_old (and reference) log-probs; mark the deferred ones."""
        if self.behaviour_logprobs == "engine":
            behaviour = [torch.tensor(c.logprobs, dtype=torch.float32) for c in completions]
        else:
            scored = [i for i in range(len(samples)) if i not in deferrable]
            behaviour = [None] * len(samples)
            for index, logp in zip(scored, pl_module.score_samples([samples[i] for i in scored]),
                                   strict=True):
                behaviour[index] = logp
        for sample, logp in zip(samples, behaviour, strict=True):
            sample.old_logp = logp
            sample.defer_old_logp = logp is None
        if pl_module.has_reference:
            for sample, logp in zip(samples, pl_module.score_samples(samples, reference=True),
                                    strict=True):
                sample.ref_logp = logp

    def _gather(self, shard: _Shard, world_size: int) -> _Shard:
        """The whole rollout from every engine's shard (the shard itself on one rank)."""
        if world_size == 1:
            return shard
        shard.completions = [replace(c, logprobs=None) for c in shard.completions]  # not needed
        parts = all_gather_objects(shard, world_size)[::self._ranks_per_engine]  # one per engine
        diffs = [part.sync for part in parts]
        count = sum(d["count"] for d in diffs)
        return _Shard(
            samples=[s for part in parts for s in part.samples],
            completions=[c for part in parts for c in part.completions],
            rewards=[r for part in parts for r in part.rewards],
            details=[d for part in parts for d in part.details],
            reward_metrics=reduce_reward_metrics([(part.reward_metrics, len(part.rewards))
                                                  for part in parts]),
            sync={"max": max(d["max"] for d in diffs), "sum": sum(d["sum"] for d in diffs),
                  "count": count, "mean": sum(d["sum"] for d in diffs) / max(count, 1)},
            timings={key: max(part.timings[key] for part in parts) for key in shard.timings})

    def _check_sync(self, pl_module: LightningModule, samples: list[RolloutSample],
                    completions: list[Completion]) -> dict:
        """Compare the engine's and the policy's log-probs on a few sampled sequences.

        The engine's side is the raw log-probs it reported while sampling them (computed with the
        weights just pushed), so the check costs one small policy forward pass; an engine that
        reports none is asked to score the sequences.
        """
        picked = samples[:self.sync_check_sequences]
        reported = [c.logprobs for c in completions[:len(picked)]]
        if all(r is not None and len(r) == len(s.response_ids)
               for r, s in zip(reported, picked, strict=True)):
            engine_logp = [list(r) for r in reported]
        else:
            engine_logp = [row[len(s.prompt_ids) - 1:] for s, row in zip(
                picked, self.engine.score([s.prompt_ids + s.response_ids for s in picked]),
                strict=True)]
        policy_logp = pl_module.score_samples(picked, temperature=1.0)
        diffs = []
        for engine_row, policy_row in zip(engine_logp, policy_logp, strict=True):
            response = torch.tensor(engine_row, dtype=torch.float32)
            diffs.append((response - policy_row).abs())
        diff = torch.cat(diffs) if diffs else torch.zeros(1)
        return {"max": float(diff.max()), "mean": float(diff.mean()), "sum": float(diff.sum()),
                "count": diff.numel()}

    def _raise_on_bad_sync(self, sync: dict[str, float]) -> None:
        """Stop the run (on every rank alike) when the engine's weights did not arrive."""
        if not sync["mean"] <= self.sync_tolerance:  # NaN fails too
            raise RuntimeError(
                f"rollout engine and policy disagree after the weight push: mean |Δ log p| = "
                f"{sync['mean']:.4g} > sync_tolerance={self.sync_tolerance} (max "
                f"{sync['max']:.4g}); the engine's weights were probably not updated")

    def _log(self, pl_module: LightningModule, whole: _Shard) -> None:
        completions, timings = whole.completions, whole.timings
        rewards = torch.tensor(whole.rewards, dtype=torch.float32)
        lengths = torch.tensor([len(c.token_ids) for c in completions], dtype=torch.float32)
        truncated = torch.tensor([c.finish_reason == "length" for c in completions],
                                 dtype=torch.float32)
        correct = _correctness(whole.details, rewards).view(-1, self.n)
        metrics = {
            "rollout/reward_mean": rewards.mean(),
            "rollout/reward_std": rewards.std() if rewards.numel() > 1 else torch.tensor(0.0),
            "rollout/response_length_mean": lengths.mean(),
            "rollout/response_length_max": lengths.max(),
            "rollout/truncated_fraction": truncated.mean(),
            "rollout/sync_logp_diff_max": torch.tensor(whole.sync["max"]),
            "rollout/sync_logp_diff_mean": torch.tensor(whole.sync["mean"]),
            "rollout/tokens_per_second": lengths.sum() / max(timings["generation"], 1e-9),
        }
        metrics.update({f"rollout/{k}": torch.tensor(float(v))
                        for k, v in group_stats(correct).items()})
        metrics.update({f"rollout/reward/{k}": torch.tensor(float(v))
                        for k, v in whole.reward_metrics.items()})
        metrics.update({f"time/{k}_seconds": torch.tensor(v) for k, v in timings.items()})
        for name, value in metrics.items():
            # The values are already global (the same on every rank): syncing them is a no-op
            # that keeps Lightning from warning about unsynced epoch metrics.
            pl_module.log(name, value, on_epoch=True, on_step=False, sync_dist=True,
                          prog_bar=name == "rollout/reward_mean")


@dataclass
class _Shard:
    """One engine's part of a rollout (or, after :meth:`RolloutCallback._gather`, the whole)."""

    samples: list[RolloutSample]
    completions: list[Completion]
    rewards: list[float]
    details: list[dict[str, Any]]
    reward_metrics: dict[str, float]
    sync: dict[str, float]
    timings: dict[str, float]


def _correctness(details: list[dict[str, Any]], rewards: torch.Tensor) -> torch.Tensor:
    """Per-sample correctness: the reward's own ``details()`` statuses, else ``reward > 0``."""
    statuses = [d.get("status") for d in details]
    if len(statuses) == rewards.numel():
        return torch.tensor([status == "correct" for status in statuses])
    return rewards > 0


def _columns(rows: list[dict[str, Any]]) -> dict[str, list[Any]]:
    keys = set().union(*(row.keys() for row in rows)) if rows else set()
    return {key: [row.get(key) for row in rows] for key in sorted(keys)}
