"""Training and evaluation rows, and the resumable order in which the trainer visits them.

A row is a question, its verifiable answer and an optional reference solution (the teacher's
privileged context). Rows come from a JSON Lines file, a Parquet file, a Hugging Face dataset or the
embedded synthetic task. Every row is validated when it is loaded, and a bad one fails the run at
start-up with its location (file and line, or row index), the field at fault and the setting that
fixes it, rather than hours later in the middle of training.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

from rlsd_contracts.config import DataSourceSection, EmbeddedTaskSection
from rlsd_trainer.data.embedded import generate_examples
from rlsd_trainer.data.example import DataError, Example

# Rows per batch when streaming Parquet files and datasets, so a large source never turns into
# one huge list of Python dicts.
_BATCH_ROWS = 4096


def load_examples(
    source: DataSourceSection,
    embedded: EmbeddedTaskSection,
    seed: int,
    *,
    config_key: str = "data.train",
) -> list[Example]:
    """Load and validate every row of `source`; raise DataError naming the first bad one.

    `config_key` is the dotted config path of `source` (`data.train` or `data.eval`); messages use it
    to name the setting that fixes a problem. `embedded` and `seed` are used by the embedded task
    only, whose rows are generated rather than read.
    """
    if source.kind == "embedded":
        return generate_examples(embedded, source.split, seed)
    assert source.path is not None  # the config requires a path for every other kind
    if source.kind == "jsonl":
        examples = list(_jsonl_examples(Path(source.path), source, config_key))
    elif source.kind == "parquet":
        examples = list(_parquet_examples(Path(source.path), source, config_key))
    else:
        examples = list(_hf_examples(source, config_key))
    if not examples:
        where = f"hf:{source.path}" if source.kind == "hf" else source.path
        raise DataError(f"{where}: no rows; {config_key}.path must point to a non-empty {source.kind} source")
    return examples


def _jsonl_examples(path: Path, source: DataSourceSection, config_key: str) -> Iterator[Example]:
    try:
        handle = path.open("rb")
    except FileNotFoundError:
        raise DataError(f"{path}: no such file; check {config_key}.path") from None
    except OSError as exc:
        raise DataError(f"{path}: cannot be read ({exc.strerror}); check {config_key}.path") from None
    with handle:
        # Lines are decoded one by one so an encoding error still points at its line.
        for number, raw in enumerate(handle, start=1):
            location = f"{path}:{number}"
            try:
                line = raw.decode("utf-8-sig" if number == 1 else "utf-8")
            except UnicodeDecodeError:
                raise DataError(
                    f"{location}: not valid UTF-8; JSON Lines files must be UTF-8 encoded"
                ) from None
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(
                    f"{location}: not valid JSON ({exc.msg} at column {exc.colno}); "
                    "each line must hold one JSON object"
                ) from None
            if not isinstance(row, dict):
                raise DataError(
                    f"{location}: expected a JSON object, got {_json_type(row)}; each line must hold one "
                    "JSON object"
                )
            yield _example(row, location, source, config_key)


def _parquet_examples(path: Path, source: DataSourceSection, config_key: str) -> Iterator[Example]:
    import pyarrow.parquet as pq

    if not path.is_file():
        raise DataError(f"{path}: no such file; check {config_key}.path")
    try:
        parquet = pq.ParquetFile(path)
    except Exception as exc:  # pyarrow raises several types for unreadable or non-Parquet files
        raise DataError(f"{path}: not a readable Parquet file ({exc}); check {config_key}.path") from None
    with parquet:
        names = parquet.schema_arrow.names
        columns = _columns_to_read(str(path), names, source, config_key)
        batches = (
            batch.to_pylist() for batch in parquet.iter_batches(batch_size=_BATCH_ROWS, columns=columns)
        )
        for index, row in enumerate(_chain(batches)):
            yield _example(row, f"{path}[row {index}]", source, config_key)


def _hf_examples(source: DataSourceSection, config_key: str) -> Iterator[Example]:
    import datasets

    name = source.path
    assert name is not None
    if name.startswith(("/", ".", "~")) and not Path(name).expanduser().is_dir():
        # Clearly a local path: say so rather than asking the Hub for a dataset by that name.
        raise DataError(f"hf:{name}: no such directory; check {config_key}.path")
    try:
        if Path(name).expanduser().is_dir():
            loaded = datasets.load_from_disk(str(Path(name).expanduser()))
            if isinstance(loaded, datasets.DatasetDict):
                if source.split not in loaded:
                    raise DataError(
                        f"hf:{name}: no split {source.split!r}; available splits: {', '.join(loaded)}; "
                        f"set {config_key}.split to one of them"
                    )
                loaded = loaded[source.split]
        else:
            loaded = datasets.load_dataset(name, split=source.split)
    except DataError:
        raise
    except Exception as exc:  # datasets raises many types: missing files, hub errors, bad splits
        raise DataError(
            f"hf:{name}: cannot load split {source.split!r} ({type(exc).__name__}: {exc}); {config_key}.path "
            "must be a directory written by Dataset.save_to_disk or a Hugging Face dataset name"
        ) from None
    columns = _columns_to_read(f"hf:{name}", loaded.column_names, source, config_key)
    batches = (
        [dict(zip(batch, values, strict=True)) for values in zip(*batch.values(), strict=True)]
        for batch in loaded.select_columns(columns).iter(batch_size=_BATCH_ROWS)
    )
    for index, row in enumerate(_chain(batches)):
        yield _example(row, f"hf:{name}[split={source.split}, index {index}]", source, config_key)


def _chain(batches: Iterable[list[dict[str, Any]]]) -> Iterator[dict[str, Any]]:
    for batch in batches:
        yield from batch


def _columns_to_read(where: str, names: list[str], source: DataSourceSection, config_key: str) -> list[str]:
    """The columns to load; a missing question or answer column is reported once, not per row."""
    for role, column in (("question", source.question_field), ("answer", source.answer_field)):
        if column not in names:
            raise DataError(
                f"{where}: missing column {column!r}; available columns: {', '.join(names)}; "
                f"set {config_key}.{role}_field to the column that holds the {role}"
            )
    wanted = [source.question_field, source.answer_field]
    if source.reference_field in names and source.reference_field not in wanted:
        wanted.append(source.reference_field)
    return wanted


def _example(row: Mapping[str, Any], location: str, source: DataSourceSection, config_key: str) -> Example:
    question = _required(row, "question", source.question_field, location, config_key)
    answer = _required(row, "answer", source.answer_field, location, config_key)
    if not isinstance(question, str):
        raise DataError(
            f"{location}: field {source.question_field!r} must be a string, got {_json_type(question)}; "
            f"set {config_key}.question_field to the column that holds the question"
        )
    if not question.strip():
        raise DataError(f"{location}: field {source.question_field!r} is empty; every row needs a question")
    answer_text = _answer_text(answer, source.answer_field, location, config_key)
    reference = row.get(source.reference_field)
    if reference is not None and not isinstance(reference, str):
        raise DataError(
            f"{location}: field {source.reference_field!r} must be a string or null, got "
            f"{_json_type(reference)}; set {config_key}.reference_field to the column that holds the "
            "reference solution"
        )
    # A blank reference carries no privileged information; treat it like a missing one.
    if reference is not None and not reference.strip():
        reference = None
    return Example(question=question, answer=answer_text, reference=reference, location=location)


def _required(row: Mapping[str, Any], role: str, field: str, location: str, config_key: str) -> Any:
    if field not in row:
        present = ", ".join(map(repr, row)) or "none"
        raise DataError(
            f"{location}: missing field {field!r} (fields present: {present}); "
            f"set {config_key}.{role}_field to the field that holds the {role}"
        )
    value = row[field]
    if value is None:
        raise DataError(f"{location}: field {field!r} is null; every row needs a {role}")
    return value


def _answer_text(answer: Any, field: str, location: str, config_key: str) -> str:
    # bool is an int subclass, but true/false is never a meaningful numeric answer: usually a
    # wrong column.
    if isinstance(answer, bool) or not isinstance(answer, str | int | float):
        raise DataError(
            f"{location}: field {field!r} must be a string or a number, got {_json_type(answer)}; "
            f"set {config_key}.answer_field to the column that holds the answer"
        )
    if isinstance(answer, float):
        if not math.isfinite(answer):
            raise DataError(f"{location}: field {field!r} is {answer}; answers must be finite numbers")
        # Float columns often hold whole numbers (pandas turns int columns with gaps into floats);
        # "42", not "42.0", is what a model writes and what exact matching needs.
        return str(int(answer)) if answer.is_integer() else repr(answer)
    text = str(answer)
    if not text.strip():
        raise DataError(f"{location}: field {field!r} is empty; every row needs an answer")
    return text


def _json_type(value: Any) -> str:
    names = {dict: "an object", list: "an array", str: "a string", bool: "a boolean", type(None): "null"}
    if type(value) in names:
        return names[type(value)]
    if isinstance(value, int | float):
        return "a number"
    return type(value).__name__
