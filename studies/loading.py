"""Reading a study file: YAML or JSON, Circe files inlined, validated, errors for people.

Why apart from the schema (``studies.model``): the schema is what a study may say, and every
node and analysis needs it; reading a file, inlining what it names and wording pydantic's errors
(entries by id, the nearest valid word) is what the commands and the coordinator need on top.
``load_study`` reads a path; ``study_from_data`` validates data already read (a study off the
wire, a test's dict).
"""

from __future__ import annotations

import json
import re
import typing
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from studies.fields import NAME_RE
from studies.model import Study, StudyError, nearest
from studies.registry import REGISTRY


def read_document(path: Path) -> Any:
    """A YAML or JSON file as plain data (JSON is YAML, but JSON errors read better from json)."""
    text = path.read_text(encoding="utf-8")
    if path.suffix.lower() == ".json":
        return json.loads(text)
    return yaml.safe_load(text)


def inline_circe(raw: Any, base_dir: Path) -> Any:
    """Replace each ``circe: <path>`` by that file's JSON content (path relative to base_dir)."""
    if not isinstance(raw, dict) or not isinstance(raw.get("cohorts"), list):
        return raw
    problems = []
    for i, cohort in enumerate(raw["cohorts"]):
        if isinstance(cohort, dict) and isinstance(cohort.get("circe"), str):
            source = base_dir / cohort["circe"]
            try:
                cohort["circe"] = json.loads(source.read_text(encoding="utf-8"))
            except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
                where = _where(("cohorts", i, "circe"), raw)
                problems.append((where, f"cannot read Circe JSON {source}: {exc}"))
    if problems:
        raise StudyError(problems)
    return raw


#: The key that names an entry of each named list, so errors say ``analyses[bleed_risk]``.
LABEL_KEYS = {"analyses": "id", "cohorts": "name", "concept_sets": "name"}


def _where(loc: tuple[Any, ...], raw: Any) -> str:
    """A field path for people: list entries by their id or name where it is a unique valid
    name (``analyses[bleed_risk].kind``), by position otherwise (``analyses.3``)."""
    parts = [str(p) for p in loc]
    if len(loc) >= 2 and loc[0] in LABEL_KEYS and isinstance(loc[1], int):
        entries = raw.get(loc[0]) if isinstance(raw, dict) else None
        key = LABEL_KEYS[str(loc[0])]
        labels = [e.get(key) if isinstance(e, dict) else None for e in entries or []]
        label = labels[loc[1]] if loc[1] < len(labels) else None
        if isinstance(label, str) and NAME_RE.fullmatch(label) and labels.count(label) == 1:
            parts[:2] = [f"{loc[0]}[{label}]"]
    return ".".join(parts) or "(study)"


def _model_at(loc: tuple[Any, ...], raw: Any) -> list[type[BaseModel]]:
    """The study models that the field at ``loc`` is validated with (several for unions)."""
    models: list[type[BaseModel]] = [Study]
    data = raw
    for part in loc:
        data = data[part] if isinstance(data, dict | list) and _has(data, part) else None
        if isinstance(part, int):
            continue
        found: list[type[BaseModel]] = []
        for model in models:
            info = model.model_fields.get(part)
            if info is not None:
                found += _models_in(info.annotation)
        if models == [Study] and part == "analyses":
            kind = None
            for index in loc[1:2]:
                entry = data[index] if isinstance(data, list) and _has(data, index) else None
                kind = entry.get("kind") if isinstance(entry, dict) else None
            found = [REGISTRY.spec(kind)] if kind in REGISTRY else []
        models = found
    return models


def _has(data: dict | list, part: Any) -> bool:
    if isinstance(data, dict):
        return part in data
    return isinstance(part, int) and 0 <= part < len(data)


def _models_in(annotation: Any) -> list[type[BaseModel]]:
    """The BaseModel classes inside an annotation (through lists, unions and Annotated)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return [m for arg in typing.get_args(annotation) for m in _models_in(arg)]


def _suggestion(err: Any, raw: Any) -> str:
    """The nearest valid field name (unknown key) or choice (literal) for one pydantic error."""
    loc = tuple(err["loc"])
    if err["type"] == "extra_forbidden" and loc:
        fields = [f for m in _model_at(loc[:-1], raw) for f in m.model_fields]
        return nearest(loc[-1], fields)
    if err["type"] == "literal_error":
        return nearest(err.get("input"), re.findall(r"'([^']*)'", err["msg"]))
    return ""


def _reason(err: Any) -> str:
    if err["type"] == "extra_forbidden" and err["loc"]:
        return f"unknown field {err['loc'][-1]!r}"
    return err["msg"]


def study_from_data(raw: Any) -> Study:
    """Validate plain data as a Study, turning pydantic errors into a ``StudyError`` whose
    paths name list entries by id and whose reasons suggest the nearest valid word."""
    try:
        return Study.model_validate(raw)
    except ValidationError as exc:
        raise StudyError(
            [
                (_where(tuple(err["loc"]), raw), _reason(err) + _suggestion(err, raw))
                for err in exc.errors(include_url=False)
            ]
        ) from None


def load_study(path: str | Path) -> Study:
    """Read a study file (YAML or JSON), inline the Circe files it names, and validate it."""
    path = Path(path)
    try:
        raw = read_document(path)
    except (OSError, UnicodeDecodeError, yaml.YAMLError, json.JSONDecodeError) as exc:
        raise StudyError([("(file)", f"cannot read {path}: {exc}")]) from None
    if not isinstance(raw, dict):
        raise StudyError([("(study)", f"{path} must hold a mapping, not {type(raw).__name__}")])
    return study_from_data(inline_circe(raw, path.parent))
