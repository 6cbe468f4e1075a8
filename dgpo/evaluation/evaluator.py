"""Validation and test: sample ``k`` answers per benchmark problem, score them, report metrics."""

from __future__ import annotations

import math
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import LightningModule
from lightning.pytorch.utilities import rank_zero_info
from torchmetrics import MeanMetric, SumMetric

from dgpo.data.benchmarks import ALTERNATIVES, BenchmarkBatch
from dgpo.data.prompt import PromptSample
from dgpo.evaluation.config import EvalConfig
from dgpo.evaluation.results import MEAN, results_record, write_results
from dgpo.metrics import AvgAtK, MajAtK, PassAtK, answer_ids
from dgpo.rewards import MathVerifyReward, call_reward
from dgpo.rollout.engine import Completion, RolloutEngine, SamplingConfig
from dgpo.rollout.transformers_engine import TransformersEngine

LENGTH, TRUNCATED, PROBLEMS = "response_length", "truncated", "problems"
#: Seed offset between batches: more samples than any batch holds, so no two share a seed.
SEED_STRIDE = 2**24


class Evaluator(torch.nn.Module):
    """Generates ``k`` samples per problem, scores them with math-verify and keeps the metrics.

    The module that owns it calls :meth:`start` at the start of a validation or test epoch,
    :meth:`step` on every batch and :meth:`end` at the end. Per benchmark it keeps Avg@k, Pass@k
    (for each ``pass_k``), Maj@k, the mean response length (tokens) and the truncated fraction as
    torchmetrics (summed over ranks), and logs them as ``<stage>/<benchmark>/<metric>`` with
    ``<stage>/mean/<metric>``, the unweighted mean over benchmarks (the paper's "Avg." column).

    A sample is correct when math-verify accepts its answer for the gold answer or, failing
    that, for one of the row's ``answer_alternatives`` (see
    :class:`~dgpo.evaluation.Benchmark`). Maj@k votes with the extracted answers.

    Generation goes through ``engine`` (the config's top-level ``engine:``, which training
    rollouts use too), which gets the policy's current weights first; without one it samples
    with a :class:`~dgpo.rollout.TransformersEngine` on the policy.

    Args:
        config: Sampling and scoring settings.
        engine: The rollout engine to sample with, or None.

    """

    def __init__(self, config: EvalConfig, engine: RolloutEngine | None = None) -> None:
        super().__init__()
        self.config = config
        self.engine = engine
        self.benchmarks = torch.nn.ModuleDict()
        self.problems: dict[str, int] = {}
        self._names: list[str] = []
        self._engine: RolloutEngine | None = None
        self._fallback: RolloutEngine | None = None
        self._counts = True
        self._reward: MathVerifyReward | None = None

    @property
    def reward(self) -> MathVerifyReward:
        """The math-verify reward that decides correctness (its worker pool starts on first use)."""
        if self._reward is None:
            self._reward = MathVerifyReward(timeout_s=self.config.reward_timeout_s,
                                            num_workers=self.config.reward_workers,
                                            extraction=self.config.extraction)
        return self._reward

    # ------------------------------------------------------------------------------ the loop
    def start(self, module: LightningModule, dataloaders: Any) -> None:
        """Reset the metrics of the benchmarks served by ``dataloaders`` and sync the engine.

        Args:
            module: The LightningModule, a :class:`~dgpo.rollout.policy.RolloutPolicy`.
            dataloaders: The evaluation data loader(s); each dataset has a ``name``.

        """
        loaders = dataloaders if isinstance(dataloaders, (list, tuple)) else [dataloaders]
        self._names = [loader.dataset.name for loader in loaders if loader is not None]
        self.problems = dict.fromkeys(self._names, 0)
        for name in self._names:
            if name not in self.benchmarks:
                self.benchmarks[name] = self._metrics().to(module.device)
            for metric in self.benchmarks[name].values():
                metric.reset()
        self._engine = self._engine_for(module)
        self._engine.attach(module.policy_for_engine(), module.model_path)  # None: its own copy
        self._engine.wake_up()
        self._engine.load_weights(module.named_weights_for_engine())  # all ranks (FSDP gathers)
        # the ranks of one engine evaluate the same problems; the first of them counts them
        trainer = getattr(module, "trainer", None)
        world = 1 if trainer is None else trainer.world_size
        self._counts = world == 1 or trainer.global_rank % self._engine.ranks_per_engine(world) == 0
        if self._counts:  # a broken scorer fails here, before any sampling
            self.reward.start()

    def step(self, batch: BenchmarkBatch, batch_idx: int) -> list[Completion]:
        """Sample, score and count one batch of one benchmark's problems.

        Returns:
            The batch's ``k`` completions per problem, prompt-major.

        """
        assert self._engine is not None, "start() has not run"
        cfg = self.config
        prompts = batch.prompts
        sampling = SamplingConfig(n=cfg.k, temperature=cfg.temperature, top_p=cfg.top_p,
                                  max_new_tokens=cfg.max_new_tokens,
                                  seed=cfg.seed + batch_idx * SEED_STRIDE)
        completions = self._engine.generate([p.prompt_ids for p in prompts], sampling)
        if not self._counts:
            return completions
        correct, answers = self.score([prompts[c.prompt_index] for c in completions],
                                      [c.text for c in completions])
        metrics = self.benchmarks[batch.benchmark]
        device = next(iter(metrics.values())).device
        correct = correct.view(len(prompts), cfg.k).to(device)
        metrics["avg"].update(correct)
        for k in cfg.pass_ks:
            metrics[f"pass@{k}"].update(correct)
        metrics["maj"].update(correct, answer_ids([answers[i * cfg.k:(i + 1) * cfg.k]
                                                   for i in range(len(prompts))]))
        metrics[LENGTH].update(torch.tensor([float(len(c.token_ids)) for c in completions],
                                            device=device))
        metrics[TRUNCATED].update(torch.tensor([float(c.finish_reason == "length")
                                                for c in completions], device=device))
        metrics[PROBLEMS].update(torch.tensor(float(len(prompts)), device=device))
        return completions

    def end(self, module: LightningModule, stage: str) -> dict[str, dict[str, float]]:
        """Compute and log the metrics; write the results table after ``validate``/``test``.

        Args:
            module: The LightningModule (its ``log`` and ``trainer`` are used).
            stage: The metric prefix, ``"val"`` or ``"test"``.

        Returns:
            ``{benchmark: {metric: value}}`` plus the mean over benchmarks under ``"mean"``.

        """
        scores = self.compute()
        headline = self.config.metric_names[0]
        for name, values in scores.items():
            for metric, value in values.items():
                # every rank holds the same synced value: sync_dist only averages equal numbers
                module.log(f"{stage}/{name}/{metric}", value, sync_dist=True,
                           prog_bar=name == MEAN and metric == headline)
        if self._engine is not None:
            self._engine.sleep()
        trainer = module.trainer
        if trainer.state.fn in ("validate", "test") and not trainer.sanity_checking:
            self._write(module, scores)
        return scores

    def compute(self) -> dict[str, dict[str, float]]:
        """Return every benchmark's metrics and their unweighted mean (all ranks take part)."""
        names = self.config.metric_names
        keys = ["avg", *[f"pass@{k}" for k in self.config.pass_ks], "maj", LENGTH, TRUNCATED]
        labels = [*names, LENGTH, TRUNCATED]
        scores: dict[str, dict[str, float]] = {}
        for name in self._names:
            metrics = self.benchmarks[name]
            scores[name] = {label: float(metrics[key].compute())
                            for key, label in zip(keys, labels, strict=True)}
            self.problems[name] = int(metrics[PROBLEMS].compute())
        if self._names:
            scores[MEAN] = {label: _nanmean([scores[n][label] for n in self._names])
                            for label in labels}
        return scores

    def close(self) -> None:
        """Stop the reward's worker processes."""
        if self._reward is not None:
            self._reward.close()

    # ------------------------------------------------------------------------------- helpers
    def _metrics(self) -> torch.nn.ModuleDict:
        metrics: dict[str, torch.nn.Module] = {"avg": AvgAtK(), "maj": MajAtK()}
        metrics.update({f"pass@{k}": PassAtK(k) for k in self.config.pass_ks})
        metrics.update({LENGTH: MeanMetric(), TRUNCATED: MeanMetric(), PROBLEMS: SumMetric()})
        return torch.nn.ModuleDict(metrics)

    def _engine_for(self, module: LightningModule) -> RolloutEngine:
        if self.engine is not None:
            return self.engine
        if self._fallback is None:
            self._fallback = TransformersEngine(tokenizer=module.tokenizer)  # attach(): policy
        return self._fallback

    def score(self, prompts: list[PromptSample],
              texts: list[str]) -> tuple[torch.Tensor, list[str | None]]:
        """Decide which responses are correct.

        Args:
            prompts: The prompt of each response (its ``answer`` and optional
                ``answer_alternatives`` column).
            texts: The responses.

        Returns:
            ``(N,)`` bool correctness (the gold answer or any alternative accepted) and the
            extracted answer of each response (None where there is none).

        """
        # math-verify bounds each sample's time itself (its workers are killed past
        # reward_timeout_s), so the call needs no overall limit and runs in this thread
        output = call_reward(self.reward, texts, [p.answer for p in prompts], timeout_s=None)
        correct = list(output.correct or [])
        answers = [d["parsed_answer"] for d in output.details]
        alternatives = [p.columns.get(ALTERNATIVES) or [] for p in prompts]
        for j in range(max((len(a) for a in alternatives), default=0)):
            rows = [i for i, a in enumerate(alternatives)
                    if not correct[i] and answers[i] is not None and len(a) > j]
            if rows:
                retry = call_reward(self.reward, [texts[i] for i in rows],
                                    [alternatives[i][j] for i in rows], timeout_s=None)
                for i, ok in zip(rows, retry.correct or [], strict=True):
                    correct[i] = ok
        return torch.tensor(correct, dtype=torch.bool), answers

    def _write(self, module: LightningModule, scores: dict[str, dict[str, float]]) -> None:
        trainer = module.trainer
        if not trainer.is_global_zero:
            return
        model = trainer.ckpt_path or getattr(module, "model_name_or_path", type(module).__name__)
        settings = {key: value for key, value in asdict(self.config).items()
                    if key not in ("reward_workers", "reward_timeout_s")}
        record = results_record(str(model), scores, settings, self.problems)
        pass_k = f"pass@{max(self.config.pass_ks)}"
        directory = Path(trainer.log_dir or trainer.default_root_dir)
        path = write_results(directory, record, [self.config.metric_names[0], pass_k])
        rank_zero_info(f"results table: {path}\n{path.read_text()}")


def _nanmean(values: list[float]) -> float:
    kept = [v for v in values if not math.isnan(v)]
    return sum(kept) / len(kept) if kept else math.nan
