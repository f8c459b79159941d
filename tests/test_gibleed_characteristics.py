"""GiBleed injury cohorts: our characterization reproduces DARWIN EU CohortCharacteristics' table.

The reference is the published `summariseCharacteristics` output for four concept cohorts
(`generateConceptCohortSet(limit = "all", end = "event_end_date")`) in
../shared/data/eunomia/expected_results, printed rounded: counts exact, percentages and
means/SDs to their two printed decimals.
"""

from __future__ import annotations

import csv
import re
from pathlib import Path

import polars as pl
import pytest
import yaml

from studies.runner import run_local
from tests.conftest import EXPECTED

COHORTS = {
    "ankle_sprain": 81151,
    "ankle_fracture": 4059173,
    "forearm_fracture": 4278672,
    "hip_fracture": 4230399,
}
STUDY = {
    "schema_version": 1,
    "name": "injuries_characteristics",
    "concept_sets": [{"name": name, "concepts": [cid]} for name, cid in COHORTS.items()],
    "cohorts": [
        {
            "name": name,
            "entry": {"domain": "condition", "concept_set": name, "events": "all"},
            "exit": {"type": "fixed_offset", "anchor": "end"},
        }
        for name in COHORTS
    ],
    "analyses": [
        {
            "id": "chars",
            "kind": "characterization",
            "cohorts": list(COHORTS),
            "window": {"start": -365, "end": -1},
            "domains": ["condition"],
            "top_n": 5,
            "age_groups": [[0, 49], [50, 150]],
        }
    ],
}
# Published variable names -> ours; published age-group levels -> ours.
VARIABLES = {
    "Number records": "Number records",
    "Number subjects": "Number subjects",
    "Age": "Age",
    "Age group": "Age group",
    "Sex": "Sex",
    "Prior observation": "Prior observation",
    "Future observation": "Future observation",
}
LEVELS = {"0 to 49": "0 to 49", "50 or above": "50 to 150"}


def _number(text: str) -> float:
    return float(text.replace(",", ""))


def _published() -> dict[tuple[str, str, str, str], tuple[float, int]]:
    """(cohort, variable, level, estimate) -> (value, decimals printed) from the reference CSV."""
    path = EXPECTED / "CohortCharacteristics_summariseCharacteristics_injuries_GiBleed.csv"
    expected: dict[tuple[str, str, str, str], tuple[float, int]] = {}
    with path.open(newline="") as handle:
        for row in csv.DictReader(handle):
            variable = VARIABLES.get(row["variable_name"])
            if variable is None:
                continue
            level = LEVELS.get(row["variable_level"], row["variable_level"])
            for cohort in COHORTS:
                cell = row[cohort]
                if row["estimate_name"] == "N":
                    expected[(cohort, variable, level, "count")] = (_number(cell), 0)
                elif row["estimate_name"] == "N (%)":
                    n, pct = re.fullmatch(r"([\d,]+) \(([\d.]+)%\)", cell).groups()
                    expected[(cohort, variable, level, "count")] = (_number(n), 0)
                    expected[(cohort, variable, level, "percentage")] = (_number(pct), 2)
                elif row["estimate_name"] == "Mean (SD)":
                    mean, sd = re.fullmatch(r"([\d,.]+) \(([\d,.]+)\)", cell).groups()
                    expected[(cohort, variable, level, "mean")] = (_number(mean), 2)
                    expected[(cohort, variable, level, "sd")] = (_number(sd), 2)
    return expected


@pytest.fixture(scope="module")
def ours(gibleed_db: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    folder = tmp_path_factory.mktemp("injuries")
    study = folder / "study.yaml"
    study.write_text(yaml.safe_dump(STUDY))
    result, _ = run_local(study, [gibleed_db], folder / "out")
    rows = result.select(
        "group_level", "variable_name", "variable_level", "estimate_name", "estimate_value"
    ).filter(pl.col("variable_name").is_in(list(VARIABLES.values())))
    return {tuple(r[:4]): float(r[4]) for r in rows.iter_rows()}


def test_injury_cohort_characteristics_match_cohortcharacteristics(ours: dict) -> None:
    expected = _published()
    assert len(expected) == 4 * 16  # 2 counts, 2 age groups x 2, 2 sexes x 2, 3 x (mean, sd)
    for key, (value, decimals) in expected.items():
        assert key in ours, key
        assert round(ours[key], decimals) == pytest.approx(value, abs=1e-9), key
