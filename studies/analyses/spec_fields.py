"""Spec fields several analysis kinds share: one definition each, so bounds, defaults and
strata cannot drift apart between kinds.

Why apart from the SQL and the pooling: a study is validated (``fedomop study validate``) with
these alone, so this module imports pydantic only, never a compute library.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Annotated, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    model_validator,
)

from studies.fields import Name, check_ordered

#: Strata every analysis understands; each is a column of the cohort-entry table.
Stratum = Literal["sex", "age_group", "calendar_year"]
STRATA: tuple[str, ...] = ("sex", "age_group", "calendar_year")
#: Bounds of one person's contribution to sums (ages in years, observation in days).
MAX_AGE = 150
MAX_DAYS = 366 * MAX_AGE
#: ``upper`` of a count row that counts records (cohort entries, events) rather than persons:
#: one person may add any number of them, so DP cannot bound their change (see
#: ``studies.statistics``); exact releases are unaffected.
RECORDS_PER_PERSON = math.inf
#: Float64 adds integers exactly, in any order, while every partial sum stays below 2^53.
EXACT_INTEGERS = 2.0**53


class SpecBase(BaseModel):
    """Every analysis entry: an ``id`` unique within the study; unknown fields are errors."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    id: Name

    def cohort_references(self) -> list[tuple[str, str]]:
        """(field path, cohort name) for every cohort this analysis names, nested ones included.

        Fields naming cohorts follow one convention: the name contains ``cohort`` or starts
        with ``outcome``/``target``/``comparator``/``denominator``, or is ``comparison``;
        the study model checks each against its cohorts.
        """
        return _references(self, "", _names_cohort)

    def concept_set_references(self) -> list[tuple[str, str]]:
        """(field path, concept set name) for every ``concept_set`` field (e.g. a covariate's);
        the study model checks each against its concept sets."""
        return _references(self, "", lambda field: field == "concept_set")


COHORT_FIELD_PREFIXES = ("outcome", "target", "comparator", "denominator", "comparison")


def _names_cohort(field: str) -> bool:
    return "cohort" in field or field.startswith(COHORT_FIELD_PREFIXES)


def _references(
    model: BaseModel, prefix: str, names_reference: Callable[[str], bool]
) -> list[tuple[str, str]]:
    """(path, value) of the string fields, through nested models and lists, that
    ``names_reference(field name)`` says name something of the study."""
    refs: list[tuple[str, str]] = []
    for field, value in model:
        path = f"{prefix}{field}"
        values = value if isinstance(value, list | tuple) else [value]
        for i, item in enumerate(values):
            where = f"{path}.{i}" if isinstance(value, list | tuple) else path
            if isinstance(item, BaseModel):
                refs += _references(item, where + ".", names_reference)
            elif isinstance(item, str) and names_reference(field):
                refs.append((where, item))
    return refs


class Window(BaseModel):
    """Days relative to cohort entry (index = day 0); both ends included."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    start: int = Field(ge=-36600, le=36600)
    end: int = Field(ge=-36600, le=36600)

    @model_validator(mode="after")
    def _ordered(self) -> Window:
        check_ordered("window", self.start, self.end)
        return self

    @property
    def label(self) -> str:
        return f"{self.start} to {self.end}"


AgeBand = tuple[Annotated[int, Field(ge=0, le=MAX_AGE)], Annotated[int, Field(ge=0, le=MAX_AGE)]]
DEFAULT_AGE_GROUPS: list[tuple[int, int]] = [(0, 17), (18, 64), (65, MAX_AGE)]


def check_age_groups(groups: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Age bands must be ordered pairs that do not overlap (a person falls in at most one)."""
    ordered = sorted(groups)
    for lo, hi in ordered:
        if lo > hi:
            raise ValueError(f"age group [{lo}, {hi}]: lower bound above upper bound")
    for (_, hi), (lo, _) in zip(ordered, ordered[1:], strict=False):
        if lo <= hi:
            raise ValueError(f"age groups overlap at age {lo}")
    return ordered


# Spec fields several analysis kinds share: one definition each, so their bounds and defaults
# cannot drift apart between kinds.
#: ``age_groups``: ordered, non-overlapping bands (``check_age_groups``), 0-17, 18-64, 65+ unless set.
AgeGroups = Annotated[
    list[AgeBand],
    AfterValidator(check_age_groups),
    Field(default_factory=lambda: list(DEFAULT_AGE_GROUPS)),
]
#: ``strata``: each a stratum or a combination of strata; none (overall only) unless set.
Strata = Annotated[list[Stratum | list[Stratum]], Field(default_factory=list)]
#: Strata fixed per person rather than per entry (no calendar year).
PersonStratum = Literal["sex", "age_group"]
PersonStrata = Annotated[list[PersonStratum | list[PersonStratum]], Field(default_factory=list)]
#: ``confidence``: level of the reported intervals.
Confidence = Annotated[float, Field(default=0.95, gt=0.5, lt=1)]
#: ``outcome_washout``: days before entry in which an outcome drops the entry (null: any time).
OutcomeWashout = Annotated[int | None, Field(default=None, ge=0, le=36600)]
#: ``follow_up_days``: censoring this many days after entry (null: no limit but the data's).
FollowUpDays = Annotated[int | None, Field(default=None, ge=1, le=36600)]
#: ``time_bin_days``: event and censoring times rounded up to the end of bins this wide (the
#: study declares them; a node refuses bins under its policy's ``min_time_bin_days``, 30 by
#: default, which is also the default width; see ``studies.analyses.time_axis``).
TimeBinDays = Annotated[int, Field(default=30, ge=1, le=3660)]
#: ``max_iterations`` and ``tolerance`` of a federated Newton–Raphson fit (GLM, Cox).
MaxIterations = Annotated[int, Field(default=50, ge=1, le=500)]
Tolerance = Annotated[float, Field(default=1e-10, gt=0, le=1e-4)]


def age_label(band: tuple[int, int]) -> str:
    """``"18 to 64"`` as omopgenerics writes age groups."""
    return f"{band[0]} to {band[1]}"


def normalise_strata(strata: list[Stratum | list[Stratum]]) -> list[tuple[str, ...]]:
    """``["sex", ["sex", "age_group"]]`` -> ``[("sex",), ("sex", "age_group")]``; no repeats."""
    out: list[tuple[str, ...]] = []
    for item in strata:
        combo = (item,) if isinstance(item, str) else tuple(item)
        if len(set(combo)) != len(combo):
            raise ValueError(f"stratum {list(combo)} names a column twice")
        if not combo:
            raise ValueError("a stratum combination must name at least one of " + str(STRATA))
        if combo not in out:
            out.append(combo)
    return out


def strata_rows_per_person(
    strata: list[Stratum | list[Stratum]],
    age_groups: list[tuple[int, int]],
    *,
    per_entry: bool,
) -> int | None:
    """Stratum rows (overall included) one person can fall in, per cohort: the bound behind an
    analysis's ``rows_per_person`` declaration (``studies.analysis.ReleaseProfile``).

    Sex is fixed per person. With ``per_entry`` (strata taken at each cohort entry, as counts
    and incidence do), a person's entries may fall in every age band (and ``None``) and in any
    number of calendar years (None: no bound from the spec); otherwise every stratum is taken
    once per person and each combination gives one row.
    """
    levels = {"sex": 1, "age_group": len(age_groups) + 1 if per_entry else 1}
    total = 1
    for combo in normalise_strata(strata):
        if per_entry and "calendar_year" in combo:
            return None
        total += math.prod(levels.get(stratum, 1) for stratum in combo)
    return total
