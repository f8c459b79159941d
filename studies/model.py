"""The study definition: a versioned, declarative document that a node compiles itself.

A study names concept sets, cohorts (in fedomop's own declarative form, or as an OHDSI ATLAS/Circe
JSON expression) and analyses. It carries no SQL and no code: every name is a plain identifier,
every value is a number, a date or a choice from a fixed list, and the node turns it into
parameterised SQL (``studies.cohorts``, ``studies.circe``).

Two forms of the same document exist:
- on disk (YAML or JSON), a Circe cohort may name its file: ``circe: cohorts/celecoxib.json``,
  relative to the study file;
- in memory and on the wire, ``studies.loading.load_study`` has inlined that file's content, so
  the expression travels inside the study, is covered by its hash, and a node never opens a path
  a study names.
"""

from __future__ import annotations

import datetime as dt
import difflib
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    NonNegativeInt,
    PositiveInt,
    Tag,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_core import InitErrorDetails, PydanticCustomError

from studies.fields import Name, check_name, check_ordered
from studies.registry import REGISTRY

SCHEMA_VERSION = 1

Domain = Literal[
    "condition",
    "drug",
    "drug_era",
    "measurement",
    "procedure",
    "observation",
    "visit",
    "death",
    "observation_period",
]
VALUE_DOMAINS = frozenset({"measurement", "observation"})
DRUG_DOMAINS = frozenset({"drug", "drug_era"})
#: Domains whose events need no concept set (any death; any observation period: a denominator).
CONCEPT_OPTIONAL = frozenset({"death", "observation_period"})
SEX_CONCEPTS = {"female": 8532, "male": 8507}


class StudyError(ValueError):
    """A study that cannot be used; ``problems`` holds ``(field path, reason)`` pairs."""

    def __init__(self, problems: list[tuple[str, str]]):
        self.problems = problems
        super().__init__("\n".join(f"{path}: {reason}" for path, reason in problems))


class Strict(BaseModel):
    """Base for every study part: unknown keys are errors (a typo must not silently vanish)."""

    model_config = ConfigDict(extra="forbid")


class ConceptSet(Strict):
    """Standard concept ids; with ``include_descendants`` also their descendants (concept_ancestor).

    ``excludes`` are removed afterwards, with their descendants too when ``include_descendants``.
    """

    name: Name
    concepts: Annotated[list[PositiveInt], Field(min_length=1)]
    include_descendants: bool = False
    excludes: list[PositiveInt] = []


class Range(Strict):
    """Inclusive bounds; a missing bound is open."""

    min: float | None = None
    max: float | None = None

    @model_validator(mode="after")
    def _ordered(self) -> Range:
        check_ordered("range", self.min, self.max, ("min", "max"), "is greater than")
        return self


class AgeRange(Range):
    """Age in years at the index date (year of index minus year of birth, as Circe computes it)."""

    min: NonNegativeInt | None = None
    max: NonNegativeInt | None = None


class Events(Strict):
    """Records of one domain whose concept is in a concept set (optional for ``death`` and
    ``observation_period``, whose concept is the cause of death and the period type)."""

    domain: Domain
    concept_set: Name | None = None
    value: Range | None = Field(
        default=None, description="bounds on value_as_number (measurement, observation)"
    )

    @model_validator(mode="after")
    def _fits_domain(self) -> Events:
        if self.concept_set is None and self.domain not in CONCEPT_OPTIONAL:
            raise ValueError(f"domain {self.domain!r} needs a concept_set")
        if self.value is not None and self.domain not in VALUE_DOMAINS:
            raise ValueError(
                f"a value range applies to {sorted(VALUE_DOMAINS)} only, not {self.domain!r}"
            )
        return self


class Entry(Events):
    """The events that put a person into the cohort; their start date is the index date."""

    events: Literal["first", "all"] = "first"
    within_observation: bool = Field(
        default=True, description="only events inside an observation period qualify"
    )


class CriterionWindow(Strict):
    """Days relative to the index date in which a cohort criterion's event must start; a
    missing bound is open (unlike an analysis's closed ``studies.analyses.spec_fields.Window``)."""

    start: int | None = None
    end: int | None = None

    @model_validator(mode="after")
    def _ordered(self) -> CriterionWindow:
        check_ordered("window", self.start, self.end)
        return self


class EventCriterion(Events):
    """Presence or absence of events in a window around index, with count bounds.

    ``max_count: 0`` alone means absence (``min_count`` then defaults to 0).
    """

    window: CriterionWindow = CriterionWindow()
    min_count: NonNegativeInt = 1
    max_count: NonNegativeInt | None = None
    within_observation: bool = Field(
        default=True, description="count only events inside the index's observation period"
    )

    @model_validator(mode="after")
    def _counts(self) -> EventCriterion:
        if self.max_count == 0 and "min_count" not in self.model_fields_set:
            self.min_count = 0
        if self.max_count is not None and self.min_count > self.max_count:
            raise ValueError(
                f"min_count {self.min_count} is greater than max_count {self.max_count}"
            )
        return self


class Inclusion(Strict):
    """Criteria every entry event must meet (all of them)."""

    age: AgeRange | None = None
    sex: list[Literal["female", "male"]] | None = Field(default=None, min_length=1)
    prior_observation_days: NonNegativeInt = 0
    post_observation_days: NonNegativeInt = 0
    events: list[EventCriterion] = []


class Exit(Strict):
    """When a person leaves the cohort; the earliest censoring event after index ends it sooner.

    - ``end_of_observation``: end of the observation period holding the index date;
    - ``fixed_offset``: ``offset_days`` after the entry event's start or end (``anchor``);
    - ``drug_era_end``: end of the era built from the entry drug's records allowing ``gap_days``
      between them, plus ``offset_days``.
    Exits never pass the end of the observation period when the entry requires one.
    """

    type: Literal["end_of_observation", "fixed_offset", "drug_era_end"] = "end_of_observation"
    anchor: Literal["start", "end"] = "start"
    offset_days: int = 0
    gap_days: NonNegativeInt = 30
    censor: list[Events] = []


class Calendar(Strict):
    """Dates every cohort period is cut to, as Circe's censor window: a period starting before
    ``start`` starts there, one ending after ``end`` ends there, and one left empty is dropped
    (after periods are merged). A missing bound is open."""

    start: dt.date | None = None
    end: dt.date | None = None

    @model_validator(mode="after")
    def _ordered(self) -> Calendar:
        check_ordered("calendar", self.start, self.end)
        return self


class Cohort(Strict):
    """A cohort in fedomop's declarative form; periods closer than ``collapse_days`` are merged."""

    name: Name
    description: str = Field(default="", max_length=2000)
    entry: Entry
    inclusion: Inclusion = Inclusion()
    exit: Exit = Exit()
    collapse_days: NonNegativeInt = 0
    calendar: Calendar = Calendar()

    @model_validator(mode="after")
    def _consistent(self) -> Cohort:
        needs_period = (
            self.exit.type == "end_of_observation"
            or self.inclusion.prior_observation_days > 0
            or self.inclusion.post_observation_days > 0
        )
        if needs_period and not self.entry.within_observation:
            raise ValueError(
                "end_of_observation exit and prior/post observation need "
                "entry.within_observation: true"
            )
        if not self.entry.within_observation and any(
            rule.within_observation for rule in self.inclusion.events
        ):
            raise ValueError(
                "inclusion events counted within_observation need entry.within_observation: true"
            )
        if self.exit.type == "drug_era_end" and self.entry.domain not in DRUG_DOMAINS:
            raise ValueError(f"drug_era_end exit needs a drug entry, not {self.entry.domain!r}")
        return self


class CirceCohort(Strict):
    """A cohort given as an OHDSI ATLAS/Circe JSON expression (inlined by ``load_study``)."""

    name: Name
    description: str = Field(default="", max_length=2000)
    circe: dict[str, Any]

    @field_validator("circe", mode="before")
    @classmethod
    def _inlined(cls, value: Any) -> Any:
        if isinstance(value, str):
            raise ValueError(
                "must hold the Circe JSON expression itself; load_study inlines the file a "
                "study names, and a node never reads a path from a study"
            )
        return value

    @field_validator("circe")
    @classmethod
    def _safe(cls, value: dict[str, Any]) -> dict[str, Any]:
        from studies.circe import check_expression

        check_expression(value)
        return value


def _cohort_form(value: Any) -> str:
    has_circe = isinstance(value, CirceCohort) or (isinstance(value, dict) and "circe" in value)
    return "circe" if has_circe else "own"


AnyCohort = Annotated[
    Annotated[Cohort, Tag("own")] | Annotated[CirceCohort, Tag("circe")],
    Discriminator(_cohort_form),
]


class Study(Strict):
    """A study definition; ``analyses`` hold each kind's validated ``Spec`` (``REGISTRY.spec``)."""

    schema_version: Literal[1] = SCHEMA_VERSION
    name: Name
    description: str = Field(default="", max_length=20000)
    concept_sets: list[ConceptSet] = []
    cohorts: Annotated[list[AnyCohort], Field(min_length=1)]
    analyses: Annotated[list[Any], Field(min_length=1)]

    @model_validator(mode="wrap")
    @classmethod
    def _validate_whole(cls, data: Any, handler: Any) -> Study:
        """Validate fields, analyses (through their registered Spec) and cross references,
        and report every problem at once with its field path."""
        if isinstance(data, Study):
            return data
        errors: list[InitErrorDetails] = []
        study: Study | None = None
        try:
            study = handler(data)
        except ValidationError as exc:
            errors.extend(_details(exc, ()))
        raw_analyses = data.get("analyses") if isinstance(data, dict) else None
        specs = _validate_analyses(raw_analyses, errors) if isinstance(raw_analyses, list) else []
        if study is not None:
            study.analyses = specs
            errors.extend(_cross_references(study))
        if errors:
            raise ValidationError.from_exception_data(cls.__name__, errors)
        assert study is not None
        return study

    def cohort(self, name: str) -> Cohort | CirceCohort:
        """The cohort called ``name`` (``KeyError`` if absent)."""
        for cohort in self.cohorts:
            if cohort.name == name:
                return cohort
        raise KeyError(name)

    def analysis(self, analysis_id: str) -> Any:
        """The analysis spec with this id (``KeyError`` naming the known ids if absent)."""
        for spec in self.analyses:
            if spec.id == analysis_id:
                return spec
        known = [spec.id for spec in self.analyses]
        raise KeyError(f"study {self.name!r} has no analysis {analysis_id!r}; it has {known}")


def _custom(loc: tuple[str | int, ...], kind: str, message: str, value: Any) -> InitErrorDetails:
    return InitErrorDetails(type=PydanticCustomError(kind, message), loc=loc, input=value)  # type: ignore[typeddict-item]


def _details(exc: ValidationError, prefix: tuple[str | int, ...]) -> list[InitErrorDetails]:
    """Re-home a ValidationError's errors under ``prefix``, keeping their messages, without
    pydantic's union tags (``cohorts.0.own.name`` reads ``cohorts.0.name``)."""
    return [
        _custom(
            prefix + _untagged(tuple(err["loc"])),
            err["type"],
            err["msg"].removeprefix("Value error, "),
            err.get("input"),
        )
        for err in exc.errors(include_url=False)
    ]


def _untagged(loc: tuple[str | int, ...]) -> tuple[str | int, ...]:
    """Drop union-member tags: our cohort forms and pydantic's ``list[...]``/``literal[...]``."""
    if len(loc) > 2 and loc[0] == "cohorts" and loc[2] in ("own", "circe"):
        loc = loc[:2] + loc[3:]
    return tuple(part for part in loc if not (isinstance(part, str) and "[" in part))


def _validate_analyses(raw: list[Any], errors: list[InitErrorDetails]) -> list[Any]:
    """Each analysis entry through ``REGISTRY.spec(kind)``; unknown kinds name the known ones."""
    specs = []
    for i, entry in enumerate(raw):
        loc: tuple[str | int, ...] = ("analyses", i)
        kind = entry.get("kind") if isinstance(entry, dict) else getattr(entry, "kind", None)
        if kind not in REGISTRY:
            message = f"unknown analysis kind {kind!r}; known kinds: {sorted(REGISTRY)}"
            message += nearest(kind, REGISTRY)
            errors.append(_custom((*loc, "kind"), "unknown_analysis", message, kind))
            continue
        try:
            spec = REGISTRY.spec(kind).model_validate(
                entry.model_dump() if isinstance(entry, BaseModel) else entry
            )
        except ValidationError as exc:
            errors.extend(_details(exc, loc))
            continue
        try:
            check_name(spec.id)
        except ValueError as exc:
            errors.append(_custom((*loc, "id"), "name", str(exc), spec.id))
            continue
        specs.append(spec)
    return specs


def _cross_references(study: Study) -> list[InitErrorDetails]:
    """Unique names, concept sets and cohorts referred to by name exist."""
    errors: list[InitErrorDetails] = []
    for field, names in (
        ("concept_sets", [c.name for c in study.concept_sets]),
        ("cohorts", [c.name for c in study.cohorts]),
        ("analyses", [a.id for a in study.analyses]),
    ):
        for i, name in enumerate(names):
            if name in names[:i]:
                errors.append(_custom((field, i), "duplicate", f"duplicate name {name!r}", name))
    sets = {c.name for c in study.concept_sets}
    for i, cohort in enumerate(study.cohorts):
        if isinstance(cohort, Cohort):
            for loc, name in _concept_set_uses(cohort):
                if name not in sets:
                    message = f"unknown concept set {name!r}; defined: {sorted(sets)}"
                    message += nearest(name, sets)
                    errors.append(_custom(("cohorts", i, *loc), "unknown_name", message, name))
    cohorts = {c.name for c in study.cohorts}
    for i, spec in enumerate(study.analyses):
        for what, defined, refs in (
            ("cohort", cohorts, spec.cohort_references()),
            ("concept set", sets, spec.concept_set_references()),
        ):
            for path, name in refs:
                if name not in defined:
                    loc = tuple(int(p) if p.isdigit() else p for p in path.split("."))
                    message = f"unknown {what} {name!r}; defined: {sorted(defined)}"
                    message += nearest(name, defined)
                    errors.append(_custom(("analyses", i, *loc), "unknown_name", message, name))
    return errors


def _concept_set_uses(cohort: Cohort) -> list[tuple[tuple[str | int, ...], str]]:
    uses: list[tuple[tuple[str | int, ...], Events]] = [(("entry",), cohort.entry)]
    uses += [(("inclusion", "events", j), e) for j, e in enumerate(cohort.inclusion.events)]
    uses += [(("exit", "censor", j), e) for j, e in enumerate(cohort.exit.censor)]
    return [((*loc, "concept_set"), e.concept_set) for loc, e in uses if e.concept_set]


def nearest(word: Any, choices: Any) -> str:
    """``; did you mean 'x'?`` for the closest of ``choices`` to a mistyped ``word``, or ''."""
    if not isinstance(word, str):
        return ""
    close = difflib.get_close_matches(word, [str(c) for c in choices], n=1, cutoff=0.6)
    return f"; did you mean {close[0]!r}?" if close else ""
