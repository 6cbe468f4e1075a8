"""The prompt datamodule: tokenised prompts drawn in a seeded, resumable order."""

import random
from collections.abc import Callable, Mapping
from dataclasses import asdict
from typing import Any, Literal, get_args

from lightning.pytorch import LightningDataModule
from lightning.pytorch.utilities import rank_zero_warn
from torch.utils.data import DataLoader
from typing_extensions import override

from dgpo.data.benchmarks import (
    Benchmark,
    BenchmarkDataset,
    as_benchmark,
    benchmark_dataloader,
    benchmark_prompts,
    evaluation_shard,
    load_benchmark,
)
from dgpo.data.problems import load_problems
from dgpo.data.prompt import PromptSample
from dgpo.data.synthetic import ArithmeticTask, as_arithmetic_task
from dgpo.data.templates import check_chat_template, format_prompt, validate_template
from dgpo.rollout.buffer import RolloutBuffer
from dgpo.seeding import run_seed

LongPromptPolicy = Literal["filter", "error"]


class RLVRDataModule(LightningDataModule):
    r"""Prompts for RL from a problem file or a synthetic arithmetic task.

    The problems are loaded and checked in ``__init__`` so that a bad configuration fails before
    any model is loaded. ``setup("fit")`` formats and tokenises them with the tokenizer found in
    ``self.tokenizer`` (set it from outside) or else in ``trainer.lightning_module.tokenizer``
    (which must exist when the datamodule's ``setup`` runs, i.e. before the module's ``setup``).
    The rollout callback then draws prompts with :meth:`next_prompts`. The draw position is part
    of :meth:`state_dict`, which Lightning saves in checkpoints, so a resumed run continues with
    exactly the prompts the uninterrupted run would have drawn. Every rank draws the same prompts;
    shard them in the caller if each rank should generate for different ones.

    Args:
        train_file: A ``.jsonl``, ``.json`` or ``.parquet`` problem file (see
            :func:`~dgpo.data.problems.load_problems`). Give exactly one of ``train_file`` and
            ``synthetic``.
        synthetic: Settings of the synthetic arithmetic task (a dict of its fields is accepted).
        problem_field: The file's field holding the problem.
        answer_field: The file's field holding the reference answer.
        template: ``str.format`` template for the user message with a ``{problem}`` field and
            literal braces doubled; ``None`` means
            :data:`~dgpo.data.templates.DEFAULT_TEMPLATE` (asks for a ``\boxed{}`` answer).
        use_chat_template: Wrap the user message in the tokenizer's chat template.
        system_prompt: Optional system message.
        max_prompt_length: Longest prompt, in tokens.
        on_long_prompt: ``"filter"`` drops longer prompts (the count is warned about and kept in
            ``num_filtered``); ``"error"`` raises.
        seed: Seed of the prompt order (each pass over the data is shuffled anew); ``None``
            follows the run's ``seed_everything``.
        benchmarks: Evaluation benchmarks (see :class:`~dgpo.evaluation.Benchmark`): one
            validation and test data loader each, formatted like the training prompts and never
            length-filtered. With benchmarks, ``train_file`` and ``synthetic`` may both be left
            out to only ``validate``/``test``.
        eval_batch_size: Benchmark problems per validation/test batch (one generation call).
        eval_limit: Evaluate at most this many problems of each benchmark (None: all).
        tokenizer: The policy's tokenizer, handed over explicitly (the CLI passes the model's);
            it can also be set as the ``tokenizer`` attribute before ``setup``.
        ranks_per_engine: How many of ``world_size`` ranks one rollout engine spans (the CLI
            passes the engine's :meth:`~dgpo.rollout.RolloutEngine.ranks_per_engine`); each
            engine evaluates an equal share of the benchmark problems. ``None``: one rank each.

    Attributes:
        rows: The loaded problems.
        tokenizer: The tokenizer used by ``setup``.
        num_filtered: How many prompts ``setup`` dropped for being too long.
        buffer: The rollout buffer whose data loader is the training data.
        benchmark_rows: The loaded rows of each benchmark, by name.

    Raises:
        ValueError: On a bad argument, or a problem file that is empty or lacks a field.
        FileNotFoundError: If ``train_file`` does not exist.

    Example:
        >>> dm = RLVRDataModule(synthetic={"num_problems": 8})  # doctest: +SKIP
        >>> dm.tokenizer = tokenizer  # doctest: +SKIP
        >>> dm.setup("fit")  # doctest: +SKIP
        >>> [p.answer for p in dm.next_prompts(3)]  # doctest: +SKIP

    """

    def __init__(
        self,
        train_file: str | None = None,
        synthetic: ArithmeticTask | None = None,
        problem_field: str = "problem",
        answer_field: str = "answer",
        template: str | None = None,
        use_chat_template: bool = True,
        system_prompt: str | None = None,
        max_prompt_length: int = 512,
        on_long_prompt: LongPromptPolicy = "filter",
        seed: int | None = None,
        benchmarks: list[Benchmark] | None = None,
        eval_batch_size: int = 16,
        eval_limit: int | None = None,
        tokenizer: Any = None,
        ranks_per_engine: Callable[[int], int] | None = None,
    ) -> None:
        super().__init__()
        benchmarks = [as_benchmark(b) for b in benchmarks or []]
        both = train_file is not None and synthetic is not None
        if both or (train_file is None and synthetic is None and not benchmarks):
            raise ValueError(
                "give exactly one of train_file and synthetic (or neither, with benchmarks, to "
                f"only evaluate), got train_file={train_file!r} and synthetic={synthetic!r}"
            )
        for name, value in (("eval_batch_size", eval_batch_size), ("eval_limit", eval_limit)):
            if value is not None and (isinstance(value, bool) or value < 1):
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        names = [b.name for b in benchmarks]
        if len(set(names)) < len(names):
            raise ValueError(f"benchmark names must be unique, got {names}")
        if on_long_prompt not in get_args(LongPromptPolicy):
            raise ValueError(
                f"on_long_prompt must be one of {list(get_args(LongPromptPolicy))}, "
                f"got {on_long_prompt!r}"
            )
        if isinstance(max_prompt_length, bool) or not isinstance(max_prompt_length, int):
            raise ValueError(f"max_prompt_length must be an int >= 1, got {max_prompt_length!r}")
        if max_prompt_length < 1:
            raise ValueError(f"max_prompt_length must be an int >= 1, got {max_prompt_length!r}")
        if template is not None:
            validate_template(template)
        if isinstance(synthetic, Mapping):
            synthetic = as_arithmetic_task(synthetic)
        # Keep only plain values in the hyper-parameters: checkpoints are loaded with
        # torch.load(weights_only=True), which refuses custom classes.
        self.save_hyperparameters(ignore=["synthetic", "benchmarks", "tokenizer",
                                          "ranks_per_engine"])
        self.hparams["seed"] = run_seed(seed)  # the run seed is set before instantiation
        self.hparams["synthetic"] = None if synthetic is None else asdict(synthetic)
        self.hparams["benchmarks"] = [asdict(b) for b in benchmarks]

        if train_file is not None:
            self.rows = load_problems(train_file, problem_field, answer_field)
        else:
            self.rows = [] if synthetic is None else synthetic.problems()
        self.benchmarks = benchmarks
        self.benchmark_rows = {b.name: load_benchmark(b, eval_limit) for b in benchmarks}
        self._benchmark_sets: list[BenchmarkDataset] | None = None
        if benchmarks:  # Lightning runs the validation and test loops only when these exist
            self.val_dataloader = self.test_dataloader = self.benchmark_dataloaders
        self.tokenizer: Any = tokenizer
        self._ranks_per_engine = ranks_per_engine
        self.num_filtered = 0
        self._prompts: list[PromptSample] | None = None
        self._pass_index = 0
        self._offset = 0
        self._order: tuple[int, list[int]] | None = None  # (pass index, permutation) cache

        self.buffer = RolloutBuffer()

    @override
    def setup(self, stage: str) -> None:
        """Format and tokenise the prompts (once, for the ``"fit"`` stage).

        Args:
            stage: The trainer stage; other stages than ``"fit"`` need no prompts.

        Raises:
            RuntimeError: If no tokenizer can be found.
            ValueError: If the chat template is missing, or prompts are too long and
                ``on_long_prompt="error"``, or no prompt fits ``max_prompt_length``, or
                ``"fit"`` has no training problems.

        """
        if stage == "fit" and self._prompts is None:
            if not self.rows:
                raise ValueError("fit needs training problems: give data.train_file or "
                                 "data.synthetic (benchmarks alone serve validate and test)")
            self._prompts = self._build_prompts(self._find_tokenizer())
        if self.benchmarks and self._benchmark_sets is None:  # every stage may evaluate
            hp, tokenizer = self.hparams, self._find_tokenizer()
            self._benchmark_sets = [
                BenchmarkDataset(name, benchmark_prompts(rows, tokenizer, hp["template"],
                                                         hp["use_chat_template"],
                                                         hp["system_prompt"]))
                for name, rows in self.benchmark_rows.items()
            ]

    @override
    def train_dataloader(self) -> DataLoader:
        """Return the data loader over the current rollout buffer's mini-batches."""
        return self.buffer.dataloader()

    def benchmark_dataloaders(self) -> list[DataLoader]:
        """Return one data loader per benchmark: the validation and test data.

        Without benchmarks the data module has no ``val_dataloader``/``test_dataloader``, so
        Lightning skips validation and ``test`` reports that there is nothing to test.
        """
        # one share of the problems per engine
        shards, shard = evaluation_shard(self.trainer, self._ranks_per_engine)
        return [benchmark_dataloader(dataset, self.hparams["eval_batch_size"], shards, shard)
                for dataset in self._benchmark_sets or []]

    @property
    def prompts(self) -> list[PromptSample]:
        """The tokenised prompts kept by ``setup``, in file order.

        Raises:
            RuntimeError: If ``setup("fit")`` has not run.

        """
        if self._prompts is None:
            raise RuntimeError("RLVRDataModule has no prompts yet: call setup('fit') first")
        return self._prompts

    def next_prompts(self, k: int) -> list[PromptSample]:
        """Draw the next ``k`` prompts of the seeded order.

        Each pass visits every prompt once, in an order shuffled with a seed derived from
        ``seed`` and the pass index; a draw that reaches the end of a pass continues into the
        next one, so every call returns exactly ``k`` prompts (``k`` may exceed the data set).

        Args:
            k: How many prompts to draw (``>= 1``).

        Returns:
            ``k`` prompts.

        Raises:
            ValueError: If ``k < 1``.
            RuntimeError: If ``setup("fit")`` has not run.

        """
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"k must be an int >= 1, got {k!r}")
        prompts = self.prompts
        drawn: list[PromptSample] = []
        while len(drawn) < k:
            order = self._pass_order(self._pass_index, len(prompts))
            if self._offset >= len(order):  # only after a resume on a smaller data set
                self._pass_index, self._offset = self._pass_index + 1, 0
                continue
            take = min(k - len(drawn), len(order) - self._offset)
            drawn.extend(prompts[i] for i in order[self._offset : self._offset + take])
            self._offset += take
            if self._offset == len(order):
                self._pass_index, self._offset = self._pass_index + 1, 0
        return drawn

    @override
    def state_dict(self) -> dict[str, Any]:
        """Return the draw position: pass index, offset in the pass, and number of prompts."""
        num_prompts = None if self._prompts is None else len(self._prompts)
        return {"pass_index": self._pass_index, "offset": self._offset, "num_prompts": num_prompts}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the draw position saved by :meth:`state_dict`.

        Args:
            state_dict: The saved state.

        Raises:
            ValueError: If a key is missing.

        """
        missing = [key for key in ("pass_index", "offset") if key not in state_dict]
        if missing:
            raise ValueError(
                f"RLVRDataModule state is missing {missing}; expected keys "
                f"['pass_index', 'offset', 'num_prompts'], got {sorted(state_dict)}"
            )
        saved, current = state_dict.get("num_prompts"), self._prompts
        if saved is not None and current is not None and saved != len(current):
            rank_zero_warn(
                f"the checkpoint drew from {saved} prompts but there are now {len(current)}; "
                "the prompt order after resuming differs from the original run's"
            )
        self._pass_index = int(state_dict["pass_index"])
        self._offset = int(state_dict["offset"])

    def _pass_order(self, pass_index: int, num_prompts: int) -> list[int]:
        """Return the permutation of prompt indices for one pass (cached for the current pass)."""
        if (
            self._order is None
            or self._order[0] != pass_index
            or len(self._order[1]) != num_prompts
        ):
            order = list(range(num_prompts))
            # Seeding with a string is stable across processes and Python versions (SHA-512).
            random.Random(f"dgpo-prompts:{self.hparams['seed']}:{pass_index}").shuffle(order)
            self._order = (pass_index, order)
        return self._order[1]

    def _find_tokenizer(self) -> Any:
        """The tokenizer handed over in ``__init__`` (or set as an attribute)."""
        if self.tokenizer is None:
            raise RuntimeError(
                "RLVRDataModule needs the policy's tokenizer: pass tokenizer=... (the dgpo CLI "
                "hands it the model's) or set datamodule.tokenizer before setup()")
        return self.tokenizer

    def _build_prompts(self, tokenizer: Any) -> list[PromptSample]:
        """Format, tokenise and length-filter every row.

        Args:
            tokenizer: A Hugging Face tokenizer.

        Returns:
            The prompts that fit ``max_prompt_length``.

        Raises:
            ValueError: See :meth:`setup`.

        """
        hp = self.hparams
        if hp["use_chat_template"]:
            check_chat_template(tokenizer)
        texts = [
            format_prompt(
                row["problem"],
                tokenizer,
                hp["template"],
                hp["use_chat_template"],
                hp["system_prompt"],
            )
            for row in self.rows
        ]
        # A chat template writes BOS and the other special tokens itself: adding them again
        # would duplicate BOS (e.g. Llama 3). A plain template relies on the tokenizer for them.
        ids = tokenizer(texts, add_special_tokens=not hp["use_chat_template"])["input_ids"]
        limit = hp["max_prompt_length"]
        too_long = [len(x) for x in ids if len(x) > limit]
        if too_long and hp["on_long_prompt"] == "error":
            raise ValueError(
                f"{len(too_long)} of {len(ids)} prompts are longer than max_prompt_length={limit} "
                f"tokens (the longest has {max(too_long)}); raise max_prompt_length or set "
                "on_long_prompt='filter'"
            )
        self.num_filtered = len(too_long)
        if len(too_long) == len(ids):
            raise ValueError(
                f"all {len(ids)} prompts are longer than max_prompt_length={limit} tokens "
                f"(the shortest has {min(too_long)}); raise max_prompt_length"
            )
        if too_long:
            rank_zero_warn(
                f"filtered {len(too_long)} of {len(ids)} prompts longer than "
                f"max_prompt_length={limit} tokens (the longest has {max(too_long)})"
            )
        return [
            PromptSample(text=text, prompt_ids=list(x), answer=row["answer"], columns=row)
            for text, x, row in zip(texts, ids, self.rows, strict=True)
            if len(x) <= limit
        ]
