"""Loading and validating rows from JSON Lines, Parquet and Hugging Face sources; the resumable sampler."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from rlsd_contracts.config import DataSourceSection, EmbeddedTaskSection
from rlsd_trainer.data.example import DataError, Example
from rlsd_trainer.data.sampler import ResumableSampler
from rlsd_trainer.data.sources import load_examples

CUSTOM_FIELDS = {"question_field": "prompt", "answer_field": "solution", "reference_field": "worked"}


def _load(kind: str, path: Path | str, config_key: str = "data.train", **fields: str) -> list[Example]:
    source = DataSourceSection(kind=kind, path=str(path), **{**CUSTOM_FIELDS, **fields})  # type: ignore[arg-type]
    return load_examples(source, EmbeddedTaskSection(), seed=0, config_key=config_key)


def _write_jsonl(path: Path, lines: list[Any]) -> Path:
    path.write_text("\n".join(line if isinstance(line, str) else json.dumps(line) for line in lines) + "\n")
    return path


def test_jsonl_with_custom_fields(tmp_path: Path) -> None:
    path = _write_jsonl(
        tmp_path / "train.jsonl",
        [
            {"prompt": "What is 2+2?", "solution": "4", "worked": "2+2=4"},
            "",
            {"prompt": "What is 6*7?", "solution": 42},
            {"prompt": "Halve 7.", "solution": 3.5, "worked": None},
            {"prompt": "Three?", "solution": 3.0, "worked": "  "},
        ],
    )
    assert _load("jsonl", path) == [
        Example("What is 2+2?", "4", "2+2=4", f"{path}:1"),
        Example("What is 6*7?", "42", None, f"{path}:3"),
        Example("Halve 7.", "3.5", None, f"{path}:4"),
        Example("Three?", "3", None, f"{path}:5"),
    ]


def test_jsonl_malformed_line_names_file_and_line(tmp_path: Path) -> None:
    path = _write_jsonl(
        tmp_path / "bad.jsonl", [{"prompt": "q", "solution": "a"}, '{"prompt": "q", "solution":']
    )
    with pytest.raises(DataError, match=rf"^{path}:2: not valid JSON"):
        _load("jsonl", path)


def test_jsonl_line_that_is_not_an_object(tmp_path: Path) -> None:
    path = _write_jsonl(tmp_path / "bad.jsonl", [[1, 2]])
    with pytest.raises(DataError, match=rf"^{path}:1: expected a JSON object, got an array"):
        _load("jsonl", path)


def test_jsonl_invalid_utf8_names_the_line(tmp_path: Path) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_bytes(b'{"prompt": "q", "solution": "a"}\n{"prompt": "\xff"}\n')
    with pytest.raises(DataError, match=rf"^{path}:2: not valid UTF-8"):
        _load("jsonl", path)


@pytest.mark.parametrize("config_key", ["data.train", "data.eval"])
def test_missing_field_names_the_field_and_the_setting(tmp_path: Path, config_key: str) -> None:
    path = _write_jsonl(
        tmp_path / "rows.jsonl", [{"prompt": "q", "solution": "a"}, {"question": "q", "solution": "a"}]
    )
    with pytest.raises(DataError) as error:
        _load("jsonl", path, config_key=config_key)
    message = str(error.value)
    assert message.startswith(f"{path}:2: missing field 'prompt'")
    assert f"set {config_key}.question_field to the field that holds the question" in message
    assert "'question'" in message  # the fields the row does have


@pytest.mark.parametrize(
    ("row", "expected"),
    [
        ({"prompt": 7, "solution": "a"}, r"field 'prompt' must be a string, got a number"),
        ({"prompt": "q", "solution": True}, r"field 'solution' must be a string or a number, got a boolean"),
        ({"prompt": "q", "solution": [1]}, r"field 'solution' must be a string or a number, got an array"),
        ({"prompt": "q", "solution": "a", "worked": 5}, r"field 'worked' must be a string or null"),
        ({"prompt": "q", "solution": None}, r"field 'solution' is null"),
        ({"prompt": " ", "solution": "a"}, r"field 'prompt' is empty"),
        ({"prompt": "q", "solution": ""}, r"field 'solution' is empty"),
    ],
)
def test_jsonl_wrong_types(tmp_path: Path, row: dict[str, Any], expected: str) -> None:
    path = _write_jsonl(tmp_path / "rows.jsonl", [row])
    with pytest.raises(DataError, match=rf"^{path}:1: {expected}"):
        _load("jsonl", path)


def test_empty_jsonl_file(tmp_path: Path) -> None:
    path = tmp_path / "empty.jsonl"
    path.write_text("\n  \n")
    with pytest.raises(DataError, match=rf"^{path}: no rows"):
        _load("jsonl", path)


@pytest.mark.parametrize("kind", ["jsonl", "parquet"])
def test_missing_file(tmp_path: Path, kind: str) -> None:
    path = tmp_path / f"absent.{kind}"
    with pytest.raises(DataError, match=rf"^{path}: no such file; check data.train.path"):
        _load(kind, path)


def test_missing_hf_directory(tmp_path: Path) -> None:
    path = tmp_path / "absent"
    with pytest.raises(DataError, match=rf"^hf:{path}: no such directory; check data.train.path"):
        _load("hf", path)


def test_reference_field_absent_everywhere_gives_none(tmp_path: Path) -> None:
    path = _write_jsonl(tmp_path / "rows.jsonl", [{"question": "q", "answer": "a"}])
    source = DataSourceSection(kind="jsonl", path=str(path))
    assert load_examples(source, EmbeddedTaskSection(), seed=0) == [Example("q", "a", None, f"{path}:1")]


def test_parquet_with_custom_columns(tmp_path: Path) -> None:
    path = tmp_path / "train.parquet"
    table = pa.table(
        {"prompt": ["q0", "q1"], "solution": [1.0, 2.5], "worked": ["r0", None], "extra": [1, 2]}
    )
    pq.write_table(table, path)
    assert _load("parquet", path) == [
        Example("q0", "1", "r0", f"{path}[row 0]"),
        Example("q1", "2.5", None, f"{path}[row 1]"),
    ]


def test_parquet_without_reference_column(tmp_path: Path) -> None:
    path = tmp_path / "train.parquet"
    pq.write_table(pa.table({"prompt": ["q"], "solution": ["a"]}), path)
    assert _load("parquet", path) == [Example("q", "a", None, f"{path}[row 0]")]


def test_parquet_missing_column_is_reported_once_with_the_available_columns(tmp_path: Path) -> None:
    path = tmp_path / "train.parquet"
    pq.write_table(pa.table({"prompt": ["q"], "answer": ["a"]}), path)
    with pytest.raises(DataError) as error:
        _load("parquet", path)
    assert str(error.value) == (
        f"{path}: missing column 'solution'; available columns: prompt, answer; "
        "set data.train.answer_field to the column that holds the answer"
    )


def test_parquet_wrong_type_names_the_row(tmp_path: Path) -> None:
    path = tmp_path / "train.parquet"
    pq.write_table(pa.table({"prompt": ["q", "r"], "solution": [[1], [2]]}), path)
    with pytest.raises(DataError, match=rf"^{path}\[row 0\]: field 'solution' must be a string or a number"):
        _load("parquet", path)


def test_parquet_that_is_not_parquet(tmp_path: Path) -> None:
    path = tmp_path / "train.parquet"
    path.write_text("not parquet")
    with pytest.raises(DataError, match=rf"^{path}: not a readable Parquet file"):
        _load("parquet", path)


def test_empty_parquet(tmp_path: Path) -> None:
    path = tmp_path / "train.parquet"
    pq.write_table(
        pa.table({"prompt": pa.array([], pa.string()), "solution": pa.array([], pa.string())}), path
    )
    with pytest.raises(DataError, match=rf"^{path}: no rows"):
        _load("parquet", path)


def test_hf_dataset_saved_to_disk(tmp_path: Path) -> None:
    directory = tmp_path / "ds"
    datasets.Dataset.from_dict(
        {"prompt": ["q0", "q1"], "solution": ["a0", "a1"], "worked": ["r0", None]}
    ).save_to_disk(str(directory))
    assert _load("hf", directory) == [
        Example("q0", "a0", "r0", f"hf:{directory}[split=train, index 0]"),
        Example("q1", "a1", None, f"hf:{directory}[split=train, index 1]"),
    ]


def test_hf_dataset_dict_picks_the_split(tmp_path: Path) -> None:
    directory = tmp_path / "dd"
    datasets.DatasetDict(
        {
            "train": datasets.Dataset.from_dict({"prompt": ["q0"], "solution": ["a0"]}),
            "test": datasets.Dataset.from_dict({"prompt": ["t0", "t1"], "solution": [3, 4]}),
        }
    ).save_to_disk(str(directory))
    source = DataSourceSection(
        kind="hf", path=str(directory), split="test", question_field="prompt", answer_field="solution"
    )
    rows = load_examples(source, EmbeddedTaskSection(), seed=0, config_key="data.eval")
    assert [(row.question, row.answer, row.location) for row in rows] == [
        ("t0", "3", f"hf:{directory}[split=test, index 0]"),
        ("t1", "4", f"hf:{directory}[split=test, index 1]"),
    ]
    bad_split = DataSourceSection(kind="hf", path=str(directory), split="validation")
    with pytest.raises(
        DataError, match=rf"^hf:{directory}: no split 'validation'; available splits: train, test"
    ):
        load_examples(bad_split, EmbeddedTaskSection(), seed=0)


def test_hf_missing_column_and_bad_row(tmp_path: Path) -> None:
    directory = tmp_path / "ds"
    datasets.Dataset.from_dict({"prompt": ["q0", ""], "solution": ["a0", "a1"]}).save_to_disk(str(directory))
    with pytest.raises(
        DataError, match=rf"^hf:{directory}: missing column 'question'; available columns: prompt"
    ):
        _load("hf", directory, question_field="question")
    with pytest.raises(DataError, match=rf"^hf:{directory}\[split=train, index 1\]: field 'prompt' is empty"):
        _load("hf", directory)


def test_sampler_is_deterministic_per_seed() -> None:
    first = ResumableSampler(50, seed=3).next_indices(120)
    assert ResumableSampler(50, seed=3).next_indices(120) == first
    assert ResumableSampler(50, seed=4).next_indices(120) != first


def test_sampler_covers_every_index_once_per_epoch() -> None:
    sampler = ResumableSampler(10, seed=1)
    drawn = sampler.next_indices(7) + sampler.next_indices(7) + sampler.next_indices(16)
    assert sampler.epoch == 3
    epochs = [drawn[0:10], drawn[10:20], drawn[20:30]]
    for epoch in epochs:
        assert sorted(epoch) == list(range(10))
    assert epochs[0] != epochs[1]  # each epoch is shuffled afresh
    assert sampler.next_indices(0) == []


def test_sampler_state_round_trip_continues_the_exact_sequence() -> None:
    uninterrupted = ResumableSampler(13, seed=7)
    uninterrupted.next_indices(5)
    uninterrupted.next_indices(11)
    expected = uninterrupted.next_indices(40)

    interrupted = ResumableSampler(13, seed=7)
    interrupted.next_indices(5)
    interrupted.next_indices(11)
    state = json.loads(json.dumps(interrupted.state_dict()))  # as a checkpoint stores it
    assert state == {"epoch": 1, "position": 3, "seed": 7, "num_examples": 13}
    resumed = ResumableSampler(13, seed=7)
    resumed.load_state_dict(state)
    assert resumed.epoch == 1
    assert resumed.next_indices(40) == expected


def test_sampler_rejects_state_from_another_dataset_or_seed() -> None:
    state = ResumableSampler(13, seed=7).state_dict()
    with pytest.raises(ValueError, match="13 examples but the dataset now has 14"):
        ResumableSampler(14, seed=7).load_state_dict(state)
    with pytest.raises(ValueError, match="seed 7 but this run uses seed 8"):
        ResumableSampler(13, seed=8).load_state_dict(state)
    with pytest.raises(ValueError, match="malformed"):
        ResumableSampler(13, seed=7).load_state_dict({"epoch": 0})
    with pytest.raises(ValueError, match="out of range"):
        ResumableSampler(13, seed=7).load_state_dict({**state, "position": 13})
    with pytest.raises(ValueError, match="num_examples must be >= 1"):
        ResumableSampler(0, seed=7)
