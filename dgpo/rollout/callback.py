"""The rollout callback: one RL iteration's generation, scoring and bookkeeping per epoch."""

from __future__ import annotations

import time
from dataclasses import replace
from typing import Any, Literal

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_warn
from typing_extensions import override

from dgpo.advantages import AdvantageEstimator, resolve_advantage
from dgpo.data.prompt import PromptSample
from dgpo.distributed import all_gather_objects, shard_bounds
from dgpo.rewards import (
    DEFAULT_REWARD_TIMEOUT_S,
    MathVerifyReward,
    RewardFunction,
    call_reward,
    close_reward,
    start_reward,
)
from dgpo.rollout.buffer import RolloutSample
from dgpo.rollout.completions import CompletionsTable
from dgpo.rollout.engine import Completion, RolloutEngine, SamplingConfig
from dgpo.rollout.groups import (
    Batch,
    Draw,
    RolloutRecord,
    has_signal,
    overlong_penalties,
    select_groups,
)
from dgpo.rollout.metrics import rollout_metrics
from dgpo.rollout.policy import check_rollout_policy
from dgpo.rollout.sync import check_sync, sync_gap
from dgpo.seeding import run_seed


class RolloutCallback(Callback):
    """Generates, scores and buffers one rollout batch at the start of every training epoch.

    Each epoch: push the policy's weights into the engine and check they arrived (the engine's
    log-probs of a few sequences must match the policy's), draw ``rollout_batch_size`` prompts
    from the data module, sample ``n`` responses each, score them with ``reward``, compute group
    advantages and the behaviour (and reference) log-probs, and fill the data module's buffer,
    which the epoch then trains on in ``ppo_epochs`` passes of ``mini_batch_size`` sequences.

    On several ranks (DDP, FSDP) every rank has its own engine (a ``VLLMEngine`` with
    ``tensor_parallel_size`` > 1 spans that many ranks), which generates its share of the prompts
    (whole groups); all-gathers give every rank the whole rollout (see :meth:`_rollout`), and
    each rank trains on its ``mini_batch_size / ranks`` sequences of every mini-batch.

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
        advantage: the advantage estimator: a built-in name (``"grpo"``, ``"dr_grpo"``,
            ``"rloo"``, ``"reinforce_plus_plus_baseline"``) or an
            :class:`~dgpo.advantages.AdvantageEstimator` (``class_path`` in YAML).
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
        reward_timeout_s: seconds one reward call may take before the run stops with an error
            naming the reward (``None``: no limit, the reward runs in the training thread).
        dynamic_sampling: DAPO's dynamic sampling: groups whose rewards are all equal (no
            learning signal) are dropped, and more prompts are drawn and generated until
            ``rollout_batch_size`` groups with signal are kept or ``max_draws`` draws are done;
            a batch still short is filled with groups without signal (zero advantages), with a
            warning. The ``rollout/*`` metrics describe the trained batch; ``rollout/filter/*``
            the filter.
        max_draws: the most generation rounds per rollout with ``dynamic_sampling``.
        mask_truncated: responses cut off at ``max_new_tokens`` are left out of the loss
            (``rollout/masked_truncated`` counts them).
        overlong_buffer: DAPO's soft overlong punishment: the last ``overlong_buffer`` share of
            ``max_new_tokens`` is penalised linearly down to ``-overlong_penalty`` at the limit
            (see :func:`~dgpo.rollout.groups.overlong_penalties`); ``None``: off. The reward's own
            metrics (``rollout/reward/accuracy``) stay unshaped.
        overlong_penalty: the penalty at ``max_new_tokens``.
        completions: a :class:`~dgpo.rollout.completions.CompletionsTable` that writes the
            trained rollouts' completions to ``completions.jsonl`` (``None``: none).

    Raises:
        ValueError: for sizes that cannot work (checked before any model is loaded).

    Example:
        >>> callback = RolloutCallback(TransformersEngine(), n=8, rollout_batch_size=16,
        ...                            mini_batch_size=32, ppo_epochs=1)  # doctest: +SKIP
    """

    def __init__(self, engine: RolloutEngine, reward: RewardFunction | None = None, n: int = 8,
                 rollout_batch_size: int = 16, mini_batch_size: int = 32, ppo_epochs: int = 1,
                 temperature: float = 1.0, top_p: float = 1.0, max_new_tokens: int = 256,
                 advantage: AdvantageEstimator | str = "grpo", seed: int | None = None,
                 sync_tolerance: float = 0.05, sync_check_sequences: int = 2,
                 behaviour_logprobs: Literal["policy", "engine"] = "policy",
                 ignore_eos: bool = False,
                 reward_timeout_s: float | None = DEFAULT_REWARD_TIMEOUT_S,
                 dynamic_sampling: bool = False, max_draws: int = 4,
                 mask_truncated: bool = False, overlong_buffer: float | None = None,
                 overlong_penalty: float = 1.0,
                 completions: CompletionsTable | None = None) -> None:
        super().__init__()
        for name, value in (("n", n), ("rollout_batch_size", rollout_batch_size),
                            ("mini_batch_size", mini_batch_size), ("ppo_epochs", ppo_epochs),
                            ("sync_check_sequences", sync_check_sequences),
                            ("max_draws", max_draws)):
            if isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        estimator = resolve_advantage(advantage)
        if n < estimator.min_group_size:
            raise ValueError(f"n={n} samples per prompt give the advantage estimator "
                             f"{type(estimator).__name__} no signal (it needs n >= "
                             f"{estimator.min_group_size}); use n >= {estimator.min_group_size}")
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
        if overlong_buffer is not None and not 0 < overlong_buffer <= 1:
            raise ValueError(f"overlong_buffer must be a share of max_new_tokens in (0, 1] or "
                             f"None, got {overlong_buffer!r}")
        if not overlong_penalty >= 0:
            raise ValueError(f"overlong_penalty must be >= 0, got {overlong_penalty!r}")
        if seed is not None:
            run_seed(seed)  # validates it
        self.behaviour_logprobs = behaviour_logprobs
        self.engine = engine
        self.reward = reward if reward is not None else MathVerifyReward()
        self.reward_timeout_s = reward_timeout_s
        self.n = n
        self.rollout_batch_size = rollout_batch_size
        self.mini_batch_size = mini_batch_size
        self.ppo_epochs = ppo_epochs
        self.sampling = SamplingConfig(n=n, temperature=temperature, top_p=top_p,
                                       max_new_tokens=max_new_tokens, seed=seed,
                                       ignore_eos=ignore_eos)
        self.advantage = estimator
        self.seed = seed
        self.sync_tolerance = sync_tolerance
        self.sync_check_sequences = sync_check_sequences
        self.dynamic_sampling = dynamic_sampling
        self.max_draws = max_draws if dynamic_sampling else 1
        self.mask_truncated = mask_truncated
        self.overlong_buffer = overlong_buffer
        self.overlong_penalty = overlong_penalty
        self.completions = completions
        self._train_started = 0.0
        self._ranks_per_engine = 1
        self._engines = 1
        self._engine_index = 0
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
        start_reward(self.reward)  # a scorer that cannot score stops the run here
        # the run seed is known now (LightningCLI seeds before it instantiates the classes)
        self.sampling = replace(self.sampling, seed=run_seed(self.seed))
        self._shard_prompts(trainer.global_rank, trainer.world_size)
        datamodule.buffer.configure(self.rollout_batch_size * self.n, self.mini_batch_size,
                                    self.ppo_epochs, pad_token_id=policy.tokenizer.pad_token_id,
                                    seed=self.sampling.seed, rank=trainer.global_rank,
                                    world_size=trainer.world_size)

    def _shard_prompts(self, rank: int, world_size: int) -> None:
        """Choose this rank's engine: ``rank // ranks_per_engine`` of the engines."""
        per_engine = self.engine.ranks_per_engine(world_size)
        if world_size % per_engine:
            raise ValueError(f"{world_size} ranks cannot be split into rollout engines of "
                             f"{per_engine} ranks (the engine's tensor_parallel_size)")
        engines = world_size // per_engine
        if self.rollout_batch_size % engines:
            raise ValueError(f"rollout_batch_size={self.rollout_batch_size} prompts cannot be "
                             f"split evenly over {engines} rollout engines ({world_size} ranks, "
                             f"{per_engine} per engine); make it a multiple of {engines}")
        self._ranks_per_engine, self._engines = per_engine, engines
        self._engine_index = rank // per_engine

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
        close_reward(self.reward)

    # -------------------------------------------------------------------------------- rollout
    def _rollout(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """One RL iteration: generate and score, select groups, behaviour log-probs, buffer.

        Every rank draws the same prompts; engine ``e`` generates and scores shard ``e`` of each
        draw (whole groups). An all-gather gives every rank the whole draw, so the selection of
        groups (dynamic sampling), the advantages and the metrics are computed as on one rank;
        each engine's ranks then compute the behaviour log-probs of their share of the selected
        groups, gathered once more into the buffer.
        """
        epoch, timings = trainer.current_epoch, {}
        start = time.perf_counter()
        self.engine.attach(pl_module.policy_for_engine(), pl_module.model_path)  # None: a copy
        self.engine.wake_up()
        self.engine.load_weights(pl_module.named_weights_for_engine())
        timings["weight_sync"] = time.perf_counter() - start
        draws: list[Draw] = []
        for draw in range(self.max_draws):
            prompts = trainer.datamodule.next_prompts(self.rollout_batch_size)
            draws.append(self._generate(trainer, pl_module, prompts, epoch, draw, timings))
            signal = torch.cat([has_signal(d.scores()) for d in draws])
            if int(signal.sum()) >= self.rollout_batch_size:
                break
        self.engine.sleep()
        groups, filled = select_groups(signal.tolist(), self.rollout_batch_size)
        if self.dynamic_sampling and filled:
            rank_zero_warn(f"dynamic sampling kept {self.rollout_batch_size - filled} groups with "
                           f"signal of {len(signal)} generated in {len(draws)} draws "
                           f"(max_draws={self.max_draws}); {filled} groups without signal "
                           "(zero advantages) fill the batch")
        batch = Batch.select(draws, groups if self.dynamic_sampling else None, self.n)
        start = time.perf_counter()
        self._behaviour_logprobs(trainer, pl_module, batch.samples, batch.completions, epoch)
        timings["logprobs"] = time.perf_counter() - start
        self.last_timings = timings
        scores = torch.tensor([s.reward for s in batch.samples]).view(-1, self.n)
        advantages = self.advantage(scores).flatten()
        for sample, advantage in zip(batch.samples, advantages.tolist(), strict=True):
            sample.advantage = advantage
        trainer.datamodule.buffer.fill(batch.samples, epoch)
        self.last_rollout = RolloutRecord(epoch, batch.prompts, batch.completions,
                                          scores.flatten().tolist(), advantages.tolist(),
                                          batch.reward.details)
        if self.completions is not None:
            self.completions.write(trainer, self.last_rollout)
        filter_metrics = {"draws": len(draws), "groups_generated": len(signal),
                          "groups_kept": int(signal.sum().clamp(max=self.rollout_batch_size)),
                          "kept_fraction": float(signal.float().mean()), "filled_groups": filled}
        self._log(pl_module, batch, draws, scores, filter_metrics, timings)

    def _generate(self, trainer: Trainer, pl_module: LightningModule,
                  prompts: list[PromptSample], epoch: int, draw: int,
                  timings: dict[str, float]) -> Draw:
        """Generate and score this engine's shard of one draw; return the whole (gathered) draw."""
        first, stop = shard_bounds(len(prompts), self._engines, self._engine_index)
        # one stream per (run seed, epoch[, draw], global prompt index): independent of sharding
        stream = (epoch,) if draw == 0 else (epoch, draw)
        sampling = replace(self.sampling, stream=stream, prompt_offset=first)
        start = time.perf_counter()
        completions = self.engine.generate([p.prompt_ids for p in prompts[first:stop]], sampling)
        completions = [replace(c, prompt_index=c.prompt_index + first) for c in completions]
        timings["generation"] = timings.get("generation", 0.0) + time.perf_counter() - start
        samples = [RolloutSample(
            prompt_ids=prompts[c.prompt_index].prompt_ids, response_ids=list(c.token_ids),
            advantage=0.0, group=c.prompt_index, in_loss=not (self.mask_truncated and
                                                              c.finish_reason == "length"),
            rollout_logp=None if c.logprobs is None else torch.tensor(c.logprobs))
            for c in completions]
        sync = None
        if draw == 0:
            start = time.perf_counter()
            sync = sync_gap(self.engine, pl_module, samples[:self.sync_check_sequences],
                            completions[:self.sync_check_sequences])
            timings["sync_check"] = time.perf_counter() - start
        start = time.perf_counter()
        reward = call_reward(self.reward, [c.text for c in completions],
                             [prompts[c.prompt_index].answer for c in completions],
                             _columns([prompts[c.prompt_index].columns for c in completions]),
                             timeout_s=self.reward_timeout_s)
        timings["scoring"] = timings.get("scoring", 0.0) + time.perf_counter() - start
        shaped = reward.scores
        if self.overlong_buffer is not None:
            penalties = overlong_penalties([len(c.token_ids) for c in completions],
                                           self.sampling.max_new_tokens, self.overlong_buffer,
                                           self.overlong_penalty)
            shaped = [score + penalty for score, penalty in zip(shaped, penalties, strict=True)]
        for sample, score in zip(samples, shaped, strict=True):
            sample.reward = score
        shard = Draw(prompts, samples, [replace(c, logprobs=None) for c in completions],
                      reward.scores, reward, sync)
        parts = all_gather_objects(shard, trainer.world_size)[::self._ranks_per_engine]
        whole = Draw.concat(parts)
        if draw == 0:
            check_sync(whole.sync, self.sync_tolerance)
        return whole

    def _deferrable(self, trainer: Trainer, pl_module: LightningModule, epoch: int) -> set[int]:
        """Batch indices whose π_old can come from their training pass (no scoring).

        The epoch's first mini-batch is trained on before any update — with one pass over the
        buffer, and when the module can (``can_defer_old_logp``: no dropout).
        """
        if (self.behaviour_logprobs != "policy" or self.ppo_epochs > 1
                or not pl_module.can_defer_old_logp):
            return set()
        return set(trainer.datamodule.buffer.first_mini_batch(epoch))

    def _behaviour_logprobs(self, trainer: Trainer, pl_module: LightningModule,
                            samples: list[RolloutSample], completions: list[Completion],
                            epoch: int) -> None:
        """Fill each sample's π_old (and reference) log-probs; mark the deferred ones.

        Each engine's ranks score their share of the batch's groups (under FSDP every rank
        takes part in every forward pass); one all-gather puts the results together.
        """
        first, stop = (bound * self.n for bound in shard_bounds(
            len(samples) // self.n, self._engines, self._engine_index))
        deferrable = self._deferrable(trainer, pl_module, epoch)
        if self.behaviour_logprobs == "engine":
            behaviour = [s.rollout_logp for s in samples[first:stop]]
        else:
            scored = [i for i in range(first, stop) if i not in deferrable]
            behaviour = [None] * (stop - first)
            for index, logp in zip(scored, pl_module.score_samples([samples[i] for i in scored]),
                                   strict=True):
                behaviour[index - first] = logp
        reference = (pl_module.score_samples(samples[first:stop], reference=True)
                     if pl_module.has_reference else [None] * (stop - first))
        parts = all_gather_objects((behaviour, reference), trainer.world_size)
        parts = parts[::self._ranks_per_engine]
        behaviour = [logp for part in parts for logp in part[0]]
        reference = [logp for part in parts for logp in part[1]]
        for sample, old, ref in zip(samples, behaviour, reference, strict=True):
            sample.old_logp, sample.defer_old_logp, sample.ref_logp = old, old is None, ref

    def _log(self, pl_module: LightningModule, batch: Batch, draws: list[Draw],
             scores: torch.Tensor, filter_metrics: dict[str, float],
             timings: dict[str, float]) -> None:
        metrics = rollout_metrics(batch, draws, scores, filter_metrics, timings,
                                  mask_truncated=self.mask_truncated,
                                  shaped=self.overlong_buffer is not None,
                                  dynamic_sampling=self.dynamic_sampling)
        for name, value in metrics.items():
            # The values are already global (the same on every rank): syncing them is a no-op
            # that keeps Lightning from warning about unsynced epoch metrics.
            pl_module.log(name, value, on_epoch=True, on_step=False, sync_dist=True,
                          prog_bar=name == "rollout/reward_mean")


def _columns(rows: list[dict[str, Any]]) -> dict[str, list[Any]]:
    keys = set().union(*(row.keys() for row in rows)) if rows else set()
    return {key: [row.get(key) for row in rows] for key in sorted(keys)}
