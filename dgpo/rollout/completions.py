"""A table of sampled completions, written to the run directory (and to wandb) every k epochs."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from lightning.pytorch import Trainer
from lightning.pytorch.loggers import WandbLogger

from dgpo.rollout.groups import RolloutRecord

#: The table's columns, in order.
COLUMNS = ("epoch", "prompt", "completion", "answer", "parsed_answer", "reward", "advantage",
           "length", "truncated", "status")


class CompletionsTable:
    """Appends a rollout's completions to ``<run dir>/completions.jsonl`` every k epochs.

    The rollout callback owns it (``rollout.completions``) and hands it each rollout it trains
    on, so the table sees exactly what the rollout returned.

    One JSON object per completion with the keys in :data:`COLUMNS`: the epoch, the prompt text,
    the completion, the gold answer, the answer the reward parsed (``None`` when it found none),
    the reward and advantage, the length in tokens, whether it hit ``max_new_tokens``, and the
    reward's status (``correct``/``wrong``/``unparsed``/``timeout``/``crashed``). With a
    ``WandbLogger`` the same rows are logged as the table ``rollout/completions``.

    Args:
        every_n_epochs: write every this many epochs (≥ 1).
        max_prompts: groups (prompts) per write, all ``n`` completions of each; ``None`` for all.
        filename: name of the file in the run directory.

    Raises:
        ValueError: for ``every_n_epochs`` or ``max_prompts`` below 1.
    """

    def __init__(self, every_n_epochs: int = 1, max_prompts: int | None = 4,
                 filename: str = "completions.jsonl") -> None:
        if every_n_epochs < 1:
            raise ValueError(f"every_n_epochs must be >= 1, got {every_n_epochs}")
        if max_prompts is not None and max_prompts < 1:
            raise ValueError(f"max_prompts must be >= 1 or None, got {max_prompts}")
        self.every_n_epochs = every_n_epochs
        self.max_prompts = max_prompts
        self.filename = filename

    def write(self, trainer: Trainer, record: RolloutRecord) -> None:
        """Append ``record`` when its epoch is one of every ``every_n_epochs`` (all ranks call)."""
        if (record.epoch + 1) % self.every_n_epochs:
            return
        directory = Path(trainer.log_dir or trainer.default_root_dir)  # a collective: all ranks
        if trainer.is_global_zero:
            self._write(trainer, directory, self.rows(record))

    def rows(self, record: RolloutRecord) -> list[dict[str, Any]]:
        """The table rows of one rollout (the first ``max_prompts`` groups)."""
        rows = []
        for index, completion in enumerate(record.completions):
            if self.max_prompts is not None and completion.prompt_index >= self.max_prompts:
                continue
            prompt = record.prompts[completion.prompt_index]
            detail = record.details[index] if record.details else {}
            rows.append({
                "epoch": record.epoch,
                "prompt": prompt.text,
                "completion": completion.text,
                "answer": prompt.answer,
                "parsed_answer": detail.get("parsed_answer"),
                "reward": record.rewards[index],
                "advantage": record.advantages[index],
                "length": len(completion.token_ids),
                "truncated": completion.finish_reason == "length",
                "status": detail.get("status"),
            })
        return rows

    def _write(self, trainer: Trainer, directory: Path, rows: list[dict[str, Any]]) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        with open(directory / self.filename, "a", encoding="utf-8") as file:
            for row in rows:
                file.write(json.dumps(row, ensure_ascii=False) + "\n")
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                logger.log_table(key="rollout/completions", columns=list(COLUMNS),
                                 data=[[row[column] for column in COLUMNS] for row in rows],
                                 step=trainer.global_step)
