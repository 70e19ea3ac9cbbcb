"""The CRD and the trainer's schema agree: every spec field the operator renders lands on a trainer
field of the same type, with the same enum values and the same maxima (and minima no looser), so
what the API server accepts the trainer accepts, and a maximum is never kept in one place only."""

from __future__ import annotations

import types
import typing
from typing import Any

import annotated_types
import pytest
import yaml
from pydantic import BaseModel

from rlsd_contracts.config import RunConfig
from rlsd_operator import names
from rlsd_operator.trainer_config import OPERATOR_FIELDS, trainer_path

SPEC = yaml.safe_load(names.CRD_PATH.read_text())["spec"]["versions"][0]["schema"]["openAPIV3Schema"][
    "properties"
]["spec"]
CRD_TYPES = {"integer": int, "number": float, "string": str, "boolean": bool}


def crd_leaves(schema: dict[str, Any], prefix: str = "") -> list[tuple[str, dict[str, Any]]]:
    found = []
    for key, sub in (schema.get("properties") or {}).items():
        path = f"{prefix}{key}"
        if any(path == f or path.startswith(f + ".") for f in OPERATOR_FIELDS):
            continue
        found += crd_leaves(sub, path + ".") if "properties" in sub else [(path, sub)]
    return found


def _unwrap(annotation: Any) -> tuple[Any, list[Any]]:
    """(base type, constraint metadata) of a field annotation, through Optional and Annotated."""
    metadata: list[Any] = []
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        annotation = next(a for a in typing.get_args(annotation) if a is not type(None))
    if typing.get_origin(annotation) is typing.Annotated:
        annotation, *extra = typing.get_args(annotation)
        for item in extra:
            metadata += getattr(item, "metadata", [item])
    return annotation, metadata


def trainer_field(path: str) -> tuple[Any, dict[str, Any]]:
    """(type, {ge, gt, le, lt, max_length}) of the trainer config field at dotted `path`."""
    model: Any = RunConfig
    *sections, leaf = path.split(".")
    for part in sections:
        assert part in model.model_fields, f"{path}: no section {part!r} in {model.__name__}"
        model, _ = _unwrap(model.model_fields[part].annotation)
        assert issubclass(model, BaseModel), path
    assert leaf in model.model_fields, f"{path}: the trainer has no such field"
    info = model.model_fields[leaf]
    annotation, metadata = _unwrap(info.annotation)
    bounds: dict[str, Any] = {}
    for item in [*info.metadata, *metadata]:
        for kind in ("ge", "gt", "le", "lt", "max_length"):
            if hasattr(item, kind) and isinstance(item, annotated_types.BaseMetadata):
                bounds[kind] = getattr(item, kind)
    return annotation, bounds


LEAVES = [leaf for leaf in crd_leaves(SPEC) if "type" in leaf[1]]


def test_every_rendered_field_is_listed() -> None:
    assert len(LEAVES) >= 40
    assert "optim.lr" in {path for path, _ in LEAVES}


@pytest.mark.parametrize(("path", "schema"), LEAVES, ids=[path for path, _ in LEAVES])
def test_a_spec_field_and_its_trainer_field_agree(path: str, schema: dict[str, Any]) -> None:
    annotation, bounds = trainer_field(trainer_path(path))
    if "enum" in schema:
        assert set(schema["enum"]) == set(typing.get_args(annotation)), path
        return
    expected = CRD_TYPES[schema["type"]]
    assert annotation is expected or (expected is int and annotation is float), (path, annotation)
    if "maximum" in schema or "le" in bounds or "lt" in bounds:
        kind = "lt" if schema.get("exclusiveMaximum") else "le"
        assert bounds.get(kind) == schema.get("maximum"), (path, bounds, schema)
    if "minimum" in schema:
        strict = schema.get("exclusiveMinimum", False)
        if "gt" in bounds:
            assert schema["minimum"] > bounds["gt"] or (strict and schema["minimum"] == bounds["gt"]), path
        elif "ge" in bounds:
            assert schema["minimum"] >= bounds["ge"], path
    if "max_length" in bounds or "maxLength" in schema:
        assert bounds.get("max_length") == schema.get("maxLength"), (path, bounds, schema)


def test_replica_and_rank_maxima_fit_the_names() -> None:
    """Derived names have room for the largest index the CRD allows (names.MAX_INDEX)."""
    for section, field in (("learner", "nodes"), ("rollout", "replicas"), ("teacher", "replicas")):
        assert SPEC["properties"][section]["properties"][field]["maximum"] == names.MAX_INDEX + 1
