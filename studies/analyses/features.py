"""Features of a prediction model, in the spirit of OHDSI FeatureExtraction: what ``dp_sgd`` may
use beyond the glm kind's covariates (age, sex, cohort and concept-set flags).

The covariate vocabulary is agreed in the study (concept-set names, windows, bands), never taken
from data. Each feature is one model term, a SQL expression over a cohort-entry row ``e``:

- ``{type: age_group, low: 40, high: 64}``: 1 when the age at index is in ``[low, high]``;
- ``{type: index_year, center: 2015, scale: 5}``: (calendar year of index - center) / scale;
- ``{type: concept_count, concept_set: S, domain: drug, window: {start: -365, end: -1},
  cap: 10}``: the number of ``domain`` records of ``S`` starting in the window, capped at
  ``cap`` (a bounded contribution; DP-SGD clips each person's gradient anyway).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Field, model_validator

from studies.analyses.glm import (
    AgeCovariate,
    CohortCovariate,
    ConceptSetCovariate,
    ConceptSetRecords,
    SexCovariate,
    _Covariate,
    covariate_columns,
    records_in_window,
)
from studies.analysis import CdmContext
from studies.fields import check_ordered


class AgeGroupCovariate(_Covariate):
    """1 when the age at index (completed years) is within ``[low, high]``."""

    type: Literal["age_group"]
    low: int = Field(ge=0, le=150)
    high: int = Field(ge=0, le=150)

    @model_validator(mode="after")
    def _ordered(self) -> AgeGroupCovariate:
        check_ordered("age_group", self.low, self.high, ("low", "high"), "is above")
        return self

    @property
    def term(self) -> str:
        return f"age_{self.low}_{self.high}"


class IndexYearCovariate(_Covariate):
    """The calendar year of index, as (year - center) / scale."""

    type: Literal["index_year"]
    center: int = Field(default=2015, ge=1900, le=2100)
    scale: float = Field(default=1.0, gt=0, le=100)

    @property
    def term(self) -> str:
        return "index_year"


class ConceptCountCovariate(ConceptSetRecords):
    """How many ``domain`` records of ``concept_set`` start within ``window`` days of index,
    capped at ``cap``."""

    type: Literal["concept_count"]
    cap: int = Field(default=10, ge=1, le=1000)

    @property
    def term(self) -> str:
        return f"count_{self.concept_set}"


Feature = Annotated[
    AgeCovariate
    | SexCovariate
    | CohortCovariate
    | ConceptSetCovariate
    | AgeGroupCovariate
    | IndexYearCovariate
    | ConceptCountCovariate,
    Field(discriminator="type"),
]


def feature_columns(cdm: CdmContext, features: list[Any]) -> tuple[list[str], dict[str, Any]]:
    """SQL expressions (over entry row ``e``) and parameters of ``features``, in their order;
    parameter names are generated from positions, never taken from a study."""
    columns: list[str] = []
    params: dict[str, Any] = {}
    for i, feature in enumerate(features):
        if isinstance(feature, AgeGroupCovariate):
            params |= {f"low{i}": feature.low, f"high{i}": feature.high}
            columns.append(f"CASE WHEN e.age BETWEEN $low{i} AND $high{i} THEN 1.0 ELSE 0.0 END")
        elif isinstance(feature, IndexYearCovariate):
            params |= {f"year{i}": feature.center, f"yscale{i}": feature.scale}
            columns.append(f"(year(e.cohort_start_date) - $year{i}) / $yscale{i}")
        elif isinstance(feature, ConceptCountCovariate):
            records, more = records_in_window(cdm, feature, i)
            params |= more | {f"cap{i}": feature.cap}
            columns.append(f"CAST(least((SELECT count(*) {records}), $cap{i}) AS DOUBLE)")
        else:  # the glm kind's covariates, at this position
            sql, more, _ = covariate_columns(cdm, [feature], first=i)
            columns += sql
            params |= more
    return columns, params
