import json
from collections.abc import Callable
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from dgpo.data import load_problems
from tests.data.conftest import SHARED_DATA

ROWS = [
    {"id": "a", "problem": "What is 1 + 1?", "answer": "2", "level": 1},
    {"id": "b", "problem": "What is 2 + 2?", "answer": "4", "level": 2},
]


def test_load_problems_jsonl(write_jsonl: Callable[..., Path]) -> None:
    rows = load_problems(write_jsonl(ROWS))
    assert rows == ROWS


def test_load_problems_parquet(tmp_path: Path) -> None:
    path = tmp_path / "problems.parquet"
    pq.write_table(pa.Table.from_pylist(ROWS), path)
    assert load_problems(str(path)) == ROWS


def test_load_problems_json_array(tmp_path: Path) -> None:
    path = tmp_path / "problems.json"
    path.write_text(json.dumps(ROWS))
    assert load_problems(path) == ROWS


def test_load_problems_custom_fields(write_jsonl: Callable[..., Path]) -> None:
    path = write_jsonl([{"question": " What is 3 + 4? ", "final": 7}])
    rows = load_problems(path, problem_field="question", answer_field="final")
    # the canonical keys are added, numbers become strings, whitespace is stripped
    assert rows == [
        {"question": " What is 3 + 4? ", "final": 7, "problem": "What is 3 + 4?", "answer": "7"}
    ]


def test_load_problems_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "missing.jsonl"
    with pytest.raises(FileNotFoundError, match="missing.jsonl"):
        load_problems(path)


def test_load_problems_unsupported_suffix_lists_supported(tmp_path: Path) -> None:
    with pytest.raises(
        ValueError, match=r"'\.csv' is not one of \['\.jsonl', '\.json', '\.parquet'\]"
    ):
        load_problems(tmp_path / "problems.csv")


def test_load_problems_empty_file(tmp_path: Path) -> None:
    path = tmp_path / "empty.jsonl"
    path.write_text("\n\n")
    with pytest.raises(ValueError, match="has no rows"):
        load_problems(path)


def test_load_problems_empty_parquet(tmp_path: Path) -> None:
    path = tmp_path / "empty.parquet"
    schema = pa.schema([("problem", pa.string()), ("answer", pa.string())])
    pq.write_table(schema.empty_table(), path)
    with pytest.raises(ValueError, match="has no rows"):
        load_problems(path)


def test_load_problems_missing_field_lists_fields(write_jsonl: Callable[..., Path]) -> None:
    path = write_jsonl(ROWS)
    with pytest.raises(
        ValueError, match=r"'question' is not in .*\['answer', 'id', 'level', 'problem'\]"
    ):
        load_problems(path, problem_field="question")
    with pytest.raises(ValueError, match=r"field 'solution' is not in"):
        load_problems(path, answer_field="solution")


def test_load_problems_parquet_missing_field_lists_fields(tmp_path: Path) -> None:
    path = tmp_path / "problems.parquet"
    pq.write_table(pa.Table.from_pylist(ROWS), path)
    with pytest.raises(
        ValueError, match=r"'final' is not in .*\['answer', 'id', 'level', 'problem'\]"
    ):
        load_problems(path, answer_field="final")


def test_load_problems_drops_empty_answers_with_count(write_jsonl: Callable[..., Path]) -> None:
    rows = [
        *ROWS,
        {"problem": "x", "answer": ""},
        {"problem": "y", "answer": None},
        {"problem": "z"},
    ]
    with pytest.warns(UserWarning, match=r"dropped 3 of 5 rows"):
        kept = load_problems(write_jsonl(rows))
    assert kept == ROWS


def test_load_problems_all_answers_empty(write_jsonl: Callable[..., Path]) -> None:
    with pytest.raises(ValueError, match="no row with a non-empty 'problem' and 'answer'"):
        load_problems(write_jsonl([{"problem": "x", "answer": " "}]))


def test_load_problems_bad_json_line_names_line(tmp_path: Path) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(ROWS[0]) + "\n{not json\n")
    with pytest.raises(ValueError, match="line 2: not valid JSON"):
        load_problems(path)


def test_load_problems_non_string_problem(write_jsonl: Callable[..., Path]) -> None:
    path = write_jsonl([{"prompt": [{"role": "user", "content": "hi"}], "answer": "1"}])
    with pytest.raises(ValueError, match="field 'prompt' must be a string, got list"):
        load_problems(path, problem_field="prompt")


def test_load_problems_directory_is_reported_as_directory(tmp_path: Path) -> None:
    (tmp_path / "x.jsonl").mkdir()
    with pytest.raises(ValueError, match=r"problem file '.*x\.jsonl' is a directory"):
        load_problems(tmp_path / "x.jsonl")


def test_load_problems_not_parquet_names_file(tmp_path: Path) -> None:
    path = tmp_path / "problems.parquet"
    path.write_text(json.dumps(ROWS[0]))  # JSON under a .parquet name
    with pytest.raises(ValueError, match=r"problems\.parquet is not a readable Parquet file"):
        load_problems(path)


def test_load_problems_not_utf8_names_file(tmp_path: Path) -> None:
    path = tmp_path / "latin1.jsonl"
    path.write_bytes('{"problem": "caf\u00e9", "answer": "1"}'.encode("latin-1"))
    with pytest.raises(ValueError, match=r"latin1\.jsonl is not UTF-8 text"):
        load_problems(path)


@pytest.mark.parametrize(
    ("answer", "shown"),
    [([3], r"list \[3\]"), ({"value": 3}, r"dict \{'value': 3\}"), (True, "bool True")],
)
def test_load_problems_non_scalar_answer_names_row_and_file(
    write_jsonl: Callable[..., Path], answer: object, shown: str
) -> None:
    path = write_jsonl([ROWS[0], {"problem": "p", "answer": answer}])
    with pytest.raises(ValueError, match=rf"{path.name}, row 2: field 'answer' must be a string "
                                         rf"or a number, got {shown}"):
        load_problems(path)


def test_load_problems_nan_answer_is_missing(tmp_path: Path) -> None:
    # pandas writes a missing number as NaN: the row is dropped like a null answer, not "nan"
    path = tmp_path / "problems.parquet"
    rows = [{"problem": "a", "answer": 2.5}, {"problem": "b", "answer": float("nan")}]
    pq.write_table(pa.Table.from_pylist(rows), path)
    with pytest.warns(UserWarning, match=r"dropped 1 of 2 rows"):
        kept = load_problems(path)
    assert [row["answer"] for row in kept] == ["2.5"]


@pytest.mark.skipif(not SHARED_DATA.is_dir(), reason="shared data folder absent")
def test_load_problems_math_train_drops_two_empty_answers() -> None:
    with pytest.warns(UserWarning, match="dropped 2 of 7500 rows"):
        rows = load_problems(SHARED_DATA / "math_train.jsonl")
    assert len(rows) == 7498
    assert all(row["answer"] for row in rows)
    assert {"id", "solution", "subject", "level"} <= set(rows[0])


@pytest.mark.skipif(not SHARED_DATA.is_dir(), reason="shared data folder absent")
def test_load_problems_gsm8k_train() -> None:
    rows = load_problems(SHARED_DATA / "gsm8k_train.jsonl")
    assert len(rows) == 7473
    assert rows[0]["answer"] == "72"
