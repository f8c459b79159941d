"""Features of a DP-SGD prediction model (``studies.analyses.features``) on a real CDM file.

Persons enter ``population`` on 2012-01-01 (an RA diagnosis) and, for every third, have a GI
bleed on 2015-06-01 (``_helpers.write_ra_bleed_cdm``); ages at index follow from the years of
birth, so every feature value is known.
"""

from __future__ import annotations

import duckdb
import numpy as np
import polars as pl
import pytest
from _helpers import RA_BLEED_COHORTS, RA_BLEED_CONCEPT_SETS, write_ra_bleed_cdm

from studies.analyses.dpsgd import _rows
from studies.loading import study_from_data
from studies.model import StudyError
from studies.runner import prepare_cdm

FEATURES = [
    {"type": "age_group", "low": 40, "high": 64},
    {"type": "index_year", "center": 2010, "scale": 2},
    {"type": "concept_count", "concept_set": "ra", "domain": "condition",
     "window": {"start": 0, "end": 0}},
    {"type": "concept_count", "concept_set": "gi_bleed", "domain": "condition",
     "window": {"start": -5000, "end": 5000}, "cap": 1},
    {"type": "sex"},
]  # fmt: skip


def _study(features: list) -> dict:
    model = {
        "id": "model", "kind": "dp_sgd", "cohort": "population", "outcome": "bleed",
        "outcome_window": {"start": 1, "end": 3650}, "covariates": features,
    }  # fmt: skip
    return {
        "name": "features_test",
        "concept_sets": RA_BLEED_CONCEPT_SETS,
        "cohorts": RA_BLEED_COHORTS,
        "analyses": [model],
    }


def test_features_have_the_values_the_data_give(tmp_path) -> None:
    years = np.array([1950 + (i % 40) for i in range(60)])
    people = pl.DataFrame(
        {
            "person_id": np.arange(1, 61),
            "gender_concept_id": [8507, 8532] * 30,
            "year_of_birth": years,
            "bleed": [i % 3 == 0 for i in range(60)],
        }
    )
    cdm = write_ra_bleed_cdm(tmp_path / "cdm.duckdb", people)
    study = study_from_data(_study(FEATURES))
    spec = study.analysis("model")
    assert spec.terms == ["age_40_64", "index_year", "count_ra", "count_gi_bleed", "sex_male"]
    with duckdb.connect(str(cdm), read_only=True) as con:
        ids, x, y = _rows(prepare_cdm(con, study), spec)
    assert ids.tolist() == list(range(1, 61))
    age = 2012 - years  # index on 2012-01-01: completed years
    assert (x[:, 0] == ((age >= 40) & (age <= 64))).all()
    assert (x[:, 1] == 1.0).all()  # (2012 - 2010) / 2
    assert (x[:, 2] == 1.0).all()  # the RA record on the index day
    assert (x[:, 3] == y).all()  # the bleed, capped at one
    assert (x[:, 4] == [1.0, 0.0] * 30).all()


def test_bad_features_are_refused_naming_the_field() -> None:
    with pytest.raises(StudyError, match="low 65 is above its high 40"):
        study_from_data(_study([{"type": "age_group", "low": 65, "high": 40}]))
    with pytest.raises(StudyError, match="cap"):
        study_from_data(
            _study([{"type": "concept_count", "concept_set": "ra", "domain": "condition",
                     "cap": 0}])
        )  # fmt: skip
