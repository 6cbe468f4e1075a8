"""The validation and test hooks of a LightningModule that samples answers to math benchmarks.

Mixed into :class:`~dgpo.module.RLVRModule`; every hook delegates to its ``evaluator`` (an
:class:`~dgpo.evaluation.evaluator.Evaluator`), which samples ``evaluation.k`` answers per
problem with the module's rollout engine and logs Avg@k, Pass@k and Maj@k.
"""

from __future__ import annotations

from typing import Any

from dgpo.data.benchmarks import BenchmarkBatch


class EvaluationHooks:
    """Lightning's validation and test hooks, run by ``self.evaluator`` (set in ``__init__``)."""

    evaluator: Any
    trainer: Any

    def on_validation_epoch_start(self) -> None:
        """Reset the benchmark metrics and push the policy's weights into the engine."""
        self.evaluator.start(self, self.trainer.val_dataloaders)

    def validation_step(self, batch: BenchmarkBatch, batch_idx: int,
                        dataloader_idx: int = 0) -> None:
        """Sample ``evaluation.k`` answers per problem of one benchmark batch and score them."""
        self.evaluator.step(batch, batch_idx)

    def on_validation_epoch_end(self) -> None:
        """Log ``val/<benchmark>/<metric>``; after ``validate``, write the results table."""
        self.evaluator.end(self, "val")

    def on_test_epoch_start(self) -> None:
        """Reset the benchmark metrics and push the policy's weights into the engine."""
        self.evaluator.start(self, self.trainer.test_dataloaders)

    def test_step(self, batch: BenchmarkBatch, batch_idx: int, dataloader_idx: int = 0) -> None:
        """Sample ``evaluation.k`` answers per problem of one benchmark batch and score them."""
        self.evaluator.step(batch, batch_idx)

    def on_test_epoch_end(self) -> None:
        """Log ``test/<benchmark>/<metric>`` and write ``results.json``/``results.md``."""
        self.evaluator.end(self, "test")

    def teardown(self, stage: str) -> None:
        """Stop the evaluation reward's worker processes."""
        self.evaluator.close()
