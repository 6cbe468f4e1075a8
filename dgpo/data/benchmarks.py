r"""Evaluation benchmarks: where each one's problems come from and how they reach the model.

A :class:`Benchmark` names one problem set, read from a local ``.jsonl``/``.json``/``.parquet``
file (``path``), from the Hugging Face hub (``hf_id``, needs ``pip install datasets`` and a
network) or from the synthetic arithmetic task (``synthetic``, e.g. its held-out split).
:func:`load_benchmark` returns its rows; :func:`benchmark_prompts` formats and tokenises them
like the training prompts; :func:`benchmark_dataloader` serves them in batches of
:class:`BenchmarkBatch`, one data loader per benchmark.

Example:
    >>> aime = Benchmark("aime24", path="data/eval/aime24.jsonl")  # doctest: +SKIP
    >>> math500 = Benchmark("math500", hf_id="HuggingFaceH4/MATH-500", split="test")
    >>> rows = load_benchmark(aime)  # doctest: +SKIP
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSampler
from lightning.pytorch.utilities import rank_zero_warn
from torch.utils.data import DataLoader, Dataset

from dgpo.data.problems import load_problems
from dgpo.data.prompt import PromptSample
from dgpo.data.synthetic import ArithmeticTask, as_arithmetic_task
from dgpo.data.templates import format_prompt
from dgpo.settings import check_known_keys

#: The answer alternatives of a row are kept under this column (a list of strings).
ALTERNATIVES = "answer_alternatives"
_NAME = re.compile(r"^[A-Za-z0-9_-]+$")
RESERVED_NAMES = ("mean",)


@dataclass
class Benchmark:
    """One evaluation problem set.

    Raises:
        ValueError: If the name is not a plain identifier or is reserved, not exactly one of
            ``path``, ``hf_id`` and ``synthetic`` is given, or ``limit < 1``.

    Example:
        >>> Benchmark("math500", hf_id="HuggingFaceH4/MATH-500", split="test").source
        'hf://HuggingFaceH4/MATH-500 (split test)'

    """

    name: str
    """Short name used in metric names (``val/<name>/avg@k``): letters, digits, ``_`` and ``-``."""
    path: str | None = None
    """Local ``.jsonl``, ``.json`` or ``.parquet`` file; or give ``hf_id`` or ``synthetic``."""
    hf_id: str | None = None
    """Hugging Face hub data set id (e.g. ``HuggingFaceH4/MATH-500``)."""
    hf_subset: str | None = None
    """Configuration (subset) name of the hub data set, if it has several."""
    split: str = "test"
    """Split of the hub data set."""
    problem_field: str = "problem"
    """Field holding the problem statement."""
    answer_field: str = "answer"
    """Field holding the gold answer (a list-valued field gives its first entry)."""
    alternatives_field: str | None = None
    """Optional field listing other accepted answers (e.g. Minerva's ``answer_alternatives``)."""
    limit: int | None = None
    """Keep only the first ``limit`` problems (None: all)."""
    synthetic: ArithmeticTask | None = None
    """A synthetic arithmetic task (a dict of its fields is accepted), e.g. the held-out split of
    the training task: ``{split: held_out, held_out_fraction: 0.1, ...}``."""

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not _NAME.match(self.name):
            raise ValueError(f"benchmark name must be made of letters, digits, '_' and '-', got "
                             f"{self.name!r}")
        if self.name in RESERVED_NAMES:
            raise ValueError(f"benchmark name {self.name!r} is reserved for the mean over "
                             f"benchmarks; reserved names: {list(RESERVED_NAMES)}")
        if isinstance(self.synthetic, Mapping):
            self.synthetic = as_arithmetic_task(self.synthetic)
        sources = (self.path, self.hf_id, self.synthetic)
        if sum(source is not None for source in sources) != 1:
            raise ValueError(f"benchmark {self.name!r}: give exactly one of path, hf_id and "
                             f"synthetic, got path={self.path!r}, hf_id={self.hf_id!r} and "
                             f"synthetic={self.synthetic!r}")
        if self.limit is not None and (isinstance(self.limit, bool) or self.limit < 1):
            raise ValueError(f"benchmark {self.name!r}: limit must be None or an integer >= 1, "
                             f"got {self.limit!r}")

    @property
    def source(self) -> str:
        """Where the problems come from, for messages and the results table."""
        if self.path is not None:
            return self.path
        if self.synthetic is not None:
            return f"synthetic ({self.synthetic.split} split)"
        subset = f", subset {self.hf_subset}" if self.hf_subset else ""
        return f"hf://{self.hf_id} (split {self.split}{subset})"


def as_benchmark(value: Benchmark | Mapping[str, Any]) -> Benchmark:
    """Return ``value`` as a :class:`Benchmark` (a dict of its fields is accepted).

    Raises:
        ValueError: On an unknown field or a bad value.

    """
    if isinstance(value, Benchmark):
        return value
    check_known_keys(Benchmark, value, "benchmark", noun="fields")
    return Benchmark(**value)


def load_benchmark(benchmark: Benchmark, limit: int | None = None) -> list[dict[str, Any]]:
    """Load a benchmark's rows.

    Args:
        benchmark: The benchmark.
        limit: Keep at most this many problems (the smaller of it and ``benchmark.limit``).

    Returns:
        One dict per problem: every column, plus ``problem`` and ``answer`` (stripped strings)
        and, when ``alternatives_field`` is set, ``answer_alternatives`` (a list of strings).

    Raises:
        FileNotFoundError: If ``path`` does not exist.
        ValueError: If the source has no usable row or lacks a field.
        ImportError: For a hub benchmark without the ``datasets`` package.

    """
    fields = (benchmark.problem_field, benchmark.answer_field)
    if benchmark.path is not None:
        rows = load_problems(benchmark.path, *fields)
    elif benchmark.synthetic is not None:
        rows = benchmark.synthetic.problems()
    else:
        rows = _problem_rows(_hub_records(benchmark), benchmark)
    limits = [n for n in (benchmark.limit, limit) if n is not None]
    rows = rows[: min(limits)] if limits else rows
    if benchmark.alternatives_field is not None:
        for row in rows:
            row[ALTERNATIVES] = _alternatives(row.get(benchmark.alternatives_field))
    return rows


def _hub_records(benchmark: Benchmark) -> list[dict[str, Any]]:
    """Download the benchmark's split from the Hugging Face hub (cached by ``datasets``)."""
    try:
        from datasets import load_dataset
    except ImportError as error:
        raise ImportError(f"benchmark {benchmark.name!r} reads {benchmark.source}, which needs "
                          "the `datasets` package (pip install datasets); or save it to a local "
                          "file and give `path` instead") from error
    data = load_dataset(benchmark.hf_id, benchmark.hf_subset, split=benchmark.split)
    return [dict(record) for record in data]


def _problem_rows(records: list[dict[str, Any]], benchmark: Benchmark) -> list[dict[str, Any]]:
    """Check the fields of hub records and normalise problem and answer as ``load_problems``."""
    if not records:
        raise ValueError(f"benchmark {benchmark.name!r} ({benchmark.source}) has no rows")
    available = sorted(records[0])
    for field in (benchmark.problem_field, benchmark.answer_field):
        if field not in available:
            raise ValueError(f"field {field!r} is not in {benchmark.source}; fields that exist: "
                             f"{available}")
    rows = []
    for record in records:
        problem = str(record.get(benchmark.problem_field) or "").strip()
        answer = record.get(benchmark.answer_field)
        if isinstance(answer, (list, tuple)):  # e.g. OlympiadBench's final_answer: ["$3$"]
            answer = answer[0] if answer else None
        answer = "" if answer is None else str(answer).strip()
        if problem and answer:
            rows.append({**record, "problem": problem, "answer": answer})
    if len(rows) < len(records):
        rank_zero_warn(f"dropped {len(records) - len(rows)} of {len(records)} rows of "
                       f"{benchmark.source} with an empty problem or answer")
    if not rows:
        raise ValueError(f"benchmark {benchmark.name!r} ({benchmark.source}) has no row with a "
                         "problem and an answer")
    return rows


def _alternatives(value: Any) -> list[str]:
    if value is None:
        return []
    values = value if isinstance(value, (list, tuple)) else [value]
    return [str(v).strip() for v in values if v is not None and str(v).strip()]


def benchmark_prompts(rows: Iterable[Mapping[str, Any]], tokenizer: Any, template: str | None,
                      use_chat_template: bool, system_prompt: str | None) -> list[PromptSample]:
    """Format and tokenise benchmark problems as :class:`~dgpo.data.RLVRDataModule` does.

    No prompt is dropped for its length: an evaluation must see every problem.

    Args:
        rows: Rows from :func:`load_benchmark`.
        tokenizer: A Hugging Face tokenizer.
        template: ``str.format`` template with a ``{problem}`` field (None: the default).
        use_chat_template: Wrap the user message in the tokenizer's chat template.
        system_prompt: Optional system message.

    Returns:
        One prompt per row, in order.

    """
    rows = list(rows)
    texts = [format_prompt(row["problem"], tokenizer, template, use_chat_template, system_prompt)
             for row in rows]
    ids = tokenizer(texts, add_special_tokens=not use_chat_template)["input_ids"] if texts else []
    return [PromptSample(text=text, prompt_ids=list(x), answer=row["answer"], columns=dict(row))
            for text, x, row in zip(texts, ids, rows, strict=True)]


class BenchmarkBatch:
    """A batch of one benchmark's prompts (a plain object: Lightning moves no tensor in it).

    Attributes:
        benchmark: The benchmark's name.
        prompts: Its prompts.

    """

    def __init__(self, benchmark: str, prompts: list[PromptSample]) -> None:
        self.benchmark = benchmark
        self.prompts = prompts

    def __len__(self) -> int:
        return len(self.prompts)

    def __repr__(self) -> str:
        return f"BenchmarkBatch(benchmark={self.benchmark!r}, prompts={len(self.prompts)})"


class BenchmarkDataset(Dataset):
    """The prompts of one benchmark; ``name`` tells the evaluation which benchmark it is.

    Args:
        name: The benchmark's name.
        prompts: Its tokenised prompts.

    """

    def __init__(self, name: str, prompts: list[PromptSample]) -> None:
        self.name = name
        self.prompts = prompts

    def __len__(self) -> int:
        return len(self.prompts)

    def __getitem__(self, index: int) -> PromptSample:
        return self.prompts[index]

    def collate(self, prompts: list[PromptSample]) -> BenchmarkBatch:
        """Turn a list of prompts into a :class:`BenchmarkBatch`."""
        return BenchmarkBatch(self.name, prompts)


def evaluation_shard(trainer: Any,
                     ranks_per_engine: Callable[[int], int] | None = None) -> tuple[int, int]:
    """Which share of the problems this rank evaluates: ``(number of shards, this shard)``.

    One shard per rollout engine: the ranks that one engine spans (``tensor_parallel_size`` GPU
    ranks of a ``VLLMEngine``, see :meth:`~dgpo.rollout.RolloutEngine.ranks_per_engine`) all get
    the same problems, since they generate together.

    Args:
        trainer: The Lightning trainer (or None: one shard).
        ranks_per_engine: How many of ``world_size`` ranks one engine spans (None: one).

    """
    if trainer is None or trainer.world_size == 1:
        return 1, 0
    per_engine = 1 if ranks_per_engine is None else ranks_per_engine(trainer.world_size)
    return trainer.world_size // per_engine, trainer.global_rank // per_engine


def benchmark_dataloader(dataset: BenchmarkDataset, batch_size: int, shards: int = 1,
                         shard: int = 0) -> DataLoader:
    """A data loader of ``batch_size`` problems per batch, in file order.

    With several shards (see :func:`evaluation_shard`), shard ``i`` gets every ``shards``-th
    problem from the ``i``-th on and no problem is repeated (Lightning's distributed sampler
    would pad the last batch with repeats and bias the metrics).

    Args:
        dataset: The benchmark's prompts.
        batch_size: Problems per batch (>= 1).
        shards: Number of shards.
        shard: This rank's shard.

    Returns:
        The data loader.

    """
    sampler = None
    if shards > 1:
        sampler = UnrepeatedDistributedSampler(dataset, num_replicas=shards, rank=shard,
                                               shuffle=False)
    return DataLoader(dataset, batch_size=batch_size, shuffle=False, sampler=sampler,
                      collate_fn=dataset.collate)
