"""Load (problem, answer) rows for RL training from JSON Lines, JSON or Parquet files."""

import decimal
import json
import math
import numbers
import os
from pathlib import Path
from typing import Any

import pyarrow
import pyarrow.parquet as pq
from lightning.pytorch.utilities import rank_zero_warn

SUPPORTED_SUFFIXES = (".jsonl", ".json", ".parquet")


def _read_json_rows(path: Path) -> list[dict[str, Any]]:
    """Read a JSON Lines file, or a ``.json`` file holding one array of objects.

    Args:
        path: The file.

    Returns:
        One dict per row.

    Raises:
        ValueError: If the file is not UTF-8 text, a line is not valid JSON or a row is not a
            JSON object.

    """
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(f"{path} is not UTF-8 text ({err}); problem files are JSON") from err
    if path.suffix == ".json" and text.lstrip().startswith("["):
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path} is not valid JSON: {err}") from err
        numbered = list(enumerate(rows, start=1))
    else:
        numbered = []
        # split on "\n" only: str.splitlines() also splits on U+2028 and others, which JSON
        # strings may hold unescaped
        for line_number, line in enumerate(text.split("\n"), start=1):
            if not line.strip():
                continue
            try:
                numbered.append((line_number, json.loads(line)))
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}, line {line_number}: not valid JSON ({err})") from err
    for number, row in numbered:
        if not isinstance(row, dict):
            raise ValueError(f"{path}, row {number}: expected a JSON object, got {type(row)}")
    return [row for _, row in numbered]


def _read_parquet(path: Path, fields: tuple[str, str]) -> list[dict[str, Any]]:
    """Read a Parquet file, checking from its schema that ``fields`` exist before reading rows.

    Args:
        path: The file.
        fields: Columns that must exist.

    Returns:
        One dict per row.

    Raises:
        ValueError: If the file is not Parquet (or is damaged), or a field is not a column of it.

    """
    try:
        columns = pq.read_schema(path).names
        _check_fields(path, fields, columns)
        return pq.read_table(path).to_pylist()
    except (pyarrow.ArrowException, OSError) as err:
        raise ValueError(f"{path} is not a readable Parquet file: {err}") from err


def _check_fields(path: Path, fields: tuple[str, str], available: list[str]) -> None:
    """Raise if a field name is not among the file's fields.

    Args:
        path: The file (for the message).
        fields: The problem and answer field names.
        available: The fields that exist in the file.

    Raises:
        ValueError: Naming the missing field and listing the available ones.

    """
    for field in fields:
        if field not in available:
            raise ValueError(
                f"field {field!r} is not in {path}; fields that exist: {sorted(available)}"
            )


def load_problems(
    path: str | os.PathLike[str],
    problem_field: str = "problem",
    answer_field: str = "answer",
) -> list[dict[str, Any]]:
    """Load problems with reference answers from a ``.jsonl``, ``.json`` or ``.parquet`` file.

    Rows whose answer (or problem) is missing or empty after stripping whitespace are dropped, and
    the count is reported with a warning (MATH's train split has 2 such rows).

    Args:
        path: The file. ``.jsonl``: one JSON object a line; ``.json``: a JSON array of objects
            (or JSON lines); ``.parquet``: one row a problem.
        problem_field: The field holding the problem statement (a string).
        answer_field: The field holding the final answer: a string, or a number (converted to a
            string); a missing answer (null, or NaN as pandas writes it) drops the row.

    Returns:
        One dict per kept row: every column of the file, plus ``"problem"`` and ``"answer"`` (str,
        stripped) taken from ``problem_field`` and ``answer_field``.

    Raises:
        ValueError: If the suffix is not supported, the path is a directory, the file is not of
            its suffix's format, the file has no rows, a field is not in the file, a problem is
            not a string, an answer is neither a string nor a number (e.g. a list or a dict), or
            no row has both a problem and an answer.
        FileNotFoundError: If the file does not exist.

    Example:
        >>> rows = load_problems("data/gsm8k_train.jsonl")  # doctest: +SKIP
        >>> rows[0]["problem"], rows[0]["answer"]  # doctest: +SKIP

    """
    path = Path(path)
    if path.suffix not in SUPPORTED_SUFFIXES:
        raise ValueError(
            f"unsupported problem file {str(path)!r}: suffix {path.suffix!r} is not one of "
            f"{list(SUPPORTED_SUFFIXES)}"
        )
    if path.is_dir():
        raise ValueError(f"problem file {str(path)!r} is a directory; give a .jsonl, .json or "
                         ".parquet file")
    if not path.is_file():
        raise FileNotFoundError(f"problem file not found: {str(path)!r}")
    fields = (problem_field, answer_field)
    if path.suffix == ".parquet":
        rows = _read_parquet(path, fields)
    else:
        rows = _read_json_rows(path)
    if not rows:
        raise ValueError(f"problem file {str(path)!r} has no rows")
    if path.suffix != ".parquet":
        _check_fields(path, fields, sorted({key for row in rows for key in row}))

    kept = []
    for number, row in enumerate(rows, start=1):
        problem, answer = row.get(problem_field), row.get(answer_field)
        if problem is not None and not isinstance(problem, str):
            raise ValueError(
                f"{path}, row {number}: field {problem_field!r} must be a string, "
                f"got {type(problem).__name__}"
            )
        problem = (problem or "").strip()
        answer = "" if _missing(answer) else _answer_text(answer, path, number, answer_field)
        if problem and answer:
            kept.append({**row, "problem": problem, "answer": answer})
    num_dropped = len(rows) - len(kept)
    if not kept:
        raise ValueError(
            f"problem file {str(path)!r} has no row with a non-empty {problem_field!r} and "
            f"{answer_field!r} ({len(rows)} rows read)"
        )
    if num_dropped:
        rank_zero_warn(
            f"dropped {num_dropped} of {len(rows)} rows of {str(path)!r} with an empty "
            f"{problem_field!r} or {answer_field!r}"
        )
    return kept


def _missing(answer: Any) -> bool:
    """Whether an answer is absent: null, or NaN (how pandas stores a missing number)."""
    return answer is None or (isinstance(answer, float) and math.isnan(answer))


def _answer_text(answer: Any, path: Path, number: int, field: str) -> str:
    """The answer as a stripped string; strings and numbers only.

    Raises:
        ValueError: Naming the file, the row and the value, for any other type (a list, a dict,
            a bool): stringifying it would make an answer no completion can match.

    """
    if isinstance(answer, str):
        return answer.strip()
    if isinstance(answer, (numbers.Real, decimal.Decimal)) and not isinstance(answer, bool):
        return str(answer).strip()
    shown = repr(answer) if len(repr(answer)) <= 80 else repr(answer)[:80] + "..."
    raise ValueError(f"{path}, row {number}: field {field!r} must be a string or a number, got "
                     f"{type(answer).__name__} {shown}")
