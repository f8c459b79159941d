"""Features of a prediction model, in the spirit of OHDSI FeatureExtraction: what ``dp_sgd`` may
use beyond the glm kind's covariates (age, sex, cohort and concept-set flags).

The covariate vocabulary is agreed in the study (concept-set names, windows, bands), never taken
from data. Each feature is one model term, a SQL expression over a cohort-entry row ``e``:

- ``{type: age_group, low: 40, high: 64}``: 1 when the age at index is in ``[low, high]``;
- ``{type: index_year, center: 2015, scale: 5}``: (calendar year of index - center) / scale;
- ``{type: concept_count, concept_set: S, domain: drug, window: {start: -365, end: -1},
  cap: 10}``: the number of ``domain`` records of ``S`` starting in the window, capped at
  ``cap`` (a bounded contribution; DP-SGD clips each person's gradient anyway).

The feature classes (what a study writes) are in ``studies.analyses.covariates``; this module
compiles them into SQL on the node.
"""

from __future__ import annotations

from typing import Any

from studies.analyses.covariates import (
    AgeCovariate,
    AgeGroupCovariate,
    ConceptCountCovariate,
    IndexYearCovariate,
)
from studies.analyses.glm import (
    covariate_columns,
    records_in_window,
)
from studies.analysis import CdmContext


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


def level_features(features: list[Any]) -> list[int]:
    """Positions of the features whose present and absent levels the regression guards count:
    every one but the continuous age and index year (which the GLM's guards do not count
    either). A flag (sex, age group, cohort, concept set) is a binary covariate as in the GLM;
    a capped record count is present when above 0: a count held by one person names them as
    surely as a flag does."""
    continuous = (AgeCovariate, IndexYearCovariate)
    return [i for i, feature in enumerate(features) if not isinstance(feature, continuous)]
