"""Data-quality checks: GiBleed's documented quirks fail with their counts, planted violations in a
small hand-made CDM fail with exact counts, a synthetic node passes, and `fedomop dq` behaves."""

from __future__ import annotations

import json
import re
from pathlib import Path

import duckdb
import pytest
from typer.testing import CliRunner

from fedomop.cli import app
from omop_etl.dq import DqReport, run_checks
from omop_etl.dq_checks import VOCABULARY_TABLES
from omop_etl.quarantine import Reason, create_quarantine_table
from omop_etl.schema import create_cdm_schema

# --- GiBleed ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def gibleed_report(gibleed_db: Path) -> DqReport:
    return run_checks(gibleed_db)


def test_at_least_40_checks_run_across_categories_and_levels(gibleed_report: DqReport) -> None:
    applicable = [r for r in gibleed_report.results if r.status != "not_applicable"]
    assert len(applicable) >= 40
    for category in ("Conformance", "Completeness", "Plausibility"):
        assert sum(r.category == category for r in applicable) >= 10, category
    assert {r.level for r in gibleed_report.results} == {"table", "field", "concept"}
    assert {r.level for r in applicable} >= {"table", "field"}
    assert len({r.id for r in gibleed_report.results}) == len(gibleed_report.results)


def test_gibleed_quirks_fail_with_documented_counts(gibleed_report: DqReport) -> None:
    expected = {
        # check id: (violated, of which quarantined at load, denominator)
        "isForeignKey.observation_period.person_id": (2649, 2649, 5343),
        "isPrimaryKey.drug_exposure.drug_exposure_id": (4384, 0, 67707),  # re-keyed at load
        "isPrimaryKey.measurement.measurement_id": (2183, 0, 44053),
        "isPrimaryKey.observation.observation_id": (6, 0, 1477),
        "isForeignKey.condition_occurrence.visit_occurrence_id": (64717, 0, 65332),
        "plausibleDuringObservation.condition_occurrence.condition_start_date": (85, 0, 65332),
    }
    for check_id, (violated, quarantined, denominator) in expected.items():
        r = gibleed_report.result(check_id)
        assert (r.num_violated, r.num_quarantined, r.denominator) == (
            violated,
            quarantined,
            denominator,
        ), check_id
        assert r.status == "fail", check_id
        assert r.pct == pytest.approx(100 * violated / denominator, abs=1e-3)
    # the load-time rejections of each table are also summed per table
    assert gibleed_report.result("loadQuarantine.observation_period").num_violated == 2649
    assert gibleed_report.quarantined["observation_period"][Reason.UNKNOWN_PERSON] == 2649


def test_gibleed_clean_parts_pass(gibleed_report: DqReport) -> None:
    assert gibleed_report.table_rows["person"] == 2694
    for check_id in (
        "measurePersonCompleteness.observation_period",  # every person has one period
        "isPrimaryKey.person.person_id",
        "isForeignKey.condition_occurrence.person_id",
        "plausibleStartBeforeEnd.observation_period.observation_period_start_date",
        "plausibleAfterBirth.condition_occurrence.condition_start_date",
        "plausibleAge.person.year_of_birth",
        "cdmTable.person",
        "cdmField.drug_exposure.drug_exposure_start_date",
    ):
        r = gibleed_report.result(check_id)
        assert (r.status, r.num_violated) == ("pass", 0), check_id


def test_status_follows_threshold_and_examples_are_ids_only(gibleed_report: DqReport) -> None:
    for r in gibleed_report.results:
        if r.denominator == 0:
            assert r.status == "not_applicable"
        else:
            assert r.status == ("fail" if r.pct > r.threshold else "pass"), r.id
        assert len(r.example_ids) <= min(5, r.num_violated)
        # never a patient row: no dates, no separators of a serialised row
        assert not any(re.search(r"\d{4}-\d{2}-\d{2}|[,{]", e) for e in r.example_ids), r.id
    dup = gibleed_report.result("isPrimaryKey.drug_exposure.drug_exposure_id")
    assert len(dup.example_ids) == 5
    assert all(re.fullmatch(r"\d+", e) for e in dup.example_ids)  # the re-keyed rows' new ids


def test_dangling_visit_examples_are_offending_rows(
    gibleed_db: Path, gibleed_report: DqReport
) -> None:
    r = gibleed_report.result("isForeignKey.condition_occurrence.visit_occurrence_id")
    ids = [int(e) for e in r.example_ids]
    con = duckdb.connect(str(gibleed_db), read_only=True)
    dangling = con.execute(
        "SELECT count(*) FROM condition_occurrence c WHERE c.condition_occurrence_id IN "
        "(SELECT unnest(?)) AND c.visit_occurrence_id NOT IN "
        "(SELECT visit_occurrence_id FROM visit_occurrence)",
        [ids],
    ).fetchone()
    con.close()
    assert len(ids) == 5 and dangling == (5,)


# --- planted violations in a hand-made CDM ------------------------------------------------------


@pytest.fixture(scope="module")
def planted_report(tmp_path_factory: pytest.TempPathFactory) -> DqReport:
    """Five persons; each planted fault is in exactly one place so counts are exact."""
    path = tmp_path_factory.mktemp("dq") / "planted.duckdb"
    con = duckdb.connect(str(path))
    create_cdm_schema(con)
    create_quarantine_table(con)
    con.execute(
        """
        INSERT INTO person (person_id, gender_concept_id, year_of_birth, race_concept_id,
            ethnicity_concept_id) VALUES
            (1, 8507, 1950, 0, 0), (2, 8532, 1960, 0, 0), (3, 8507, 1970, 0, 0),
            (4, 8532, 1880, 0, 0), (5, 8507, 2150, 0, 0);
        INSERT INTO observation_period VALUES
            (1, 1, DATE '2000-01-01', DATE '2020-12-31', 32817),
            (2, 2, DATE '2000-01-01', DATE '2020-12-31', 32817),
            (3, 3, DATE '2000-01-01', DATE '2020-12-31', 32817),
            (4, 4, DATE '2010-01-01', DATE '2020-12-31', 32817),
            (5, 5, DATE '2015-01-01', DATE '2010-12-31', 32817);
        INSERT INTO condition_occurrence (condition_occurrence_id, person_id,
            condition_concept_id, condition_start_date, condition_end_date,
            condition_type_concept_id) VALUES
            (10, 1, 192671, DATE '2005-01-01', DATE '2005-01-10', 32020),
            (11, 1, 192671, DATE '1940-01-01', NULL, 32020),
            (12, 2, 192671, DATE '2099-06-01', NULL, 32020),
            (13, 2, 192671, DATE '2006-01-01', DATE '2005-01-01', 32020),
            (14, 3, 192671, DATE '1800-01-01', NULL, 32020),
            (15, 3, 192671, DATE '2007-01-01', NULL, 32020);
        INSERT INTO death (person_id, death_date) VALUES (2, DATE '2019-01-01');
        INSERT INTO measurement (measurement_id, person_id, measurement_concept_id,
            measurement_date, measurement_type_concept_id, value_as_number) VALUES
            (20, 1, 3006322, DATE '2005-01-01', 32817, 37.0),
            (21, 1, 3006322, DATE '2005-01-02', 32817, 98.6),
            (22, 2, 3000963, DATE '2005-01-01', 32817, 14.0);
        INSERT INTO etl_quarantine VALUES
            ('conditions.csv', 7, 'condition_occurrence', 'missing required field',
             '{"PERSON_ID": "3", "CONDITION_CONCEPT_ID": "", "CONDITION_START_DATE": "2001-01-01"}'),
            ('conditions.csv', 9, 'condition_occurrence', 'unknown person',
             '{"PERSON_ID": "99", "CONDITION_CONCEPT_ID": "192671"}');
        """
    )
    con.close()
    return run_checks(path)


@pytest.mark.parametrize(
    ("check_id", "violated", "denominator", "examples"),
    [
        ("plausibleAfterBirth.condition_occurrence.condition_start_date", 2, 6, ["11", "14"]),
        ("plausibleDateRange.condition_occurrence.condition_start_date", 2, 6, ["12", "14"]),
        ("plausibleBeforeDeath.condition_occurrence.condition_start_date", 1, 6, ["12"]),
        ("plausibleStartBeforeEnd.condition_occurrence.condition_start_date", 1, 2, ["13"]),
        ("plausibleStartBeforeEnd.observation_period.observation_period_start_date", 1, 5, ["5"]),
        # 11, 12 and 14 lie outside their person's observation period
        ("plausibleDuringObservation.condition_occurrence.condition_start_date", 3, 6, None),
        ("plausibleAge.person.year_of_birth", 2, 5, ["4", "5"]),
        ("plausibleValueHigh.person.year_of_birth", 1, 5, ["5"]),
        ("plausibleValueHigh.measurement.3006322", 1, 2, ["21"]),
        ("isRequired.condition_occurrence.condition_concept_id", 1, 7, ["conditions.csv:7"]),
        ("isForeignKey.condition_occurrence.person_id", 1, 7, ["conditions.csv:9"]),
        ("loadQuarantine.condition_occurrence", 2, 8, None),
        ("measurePersonCompleteness.condition_occurrence", 2, 5, ["4", "5"]),
    ],
)
def test_planted_violations_are_counted_exactly(
    planted_report: DqReport,
    check_id: str,
    violated: int,
    denominator: int,
    examples: list[str] | None,
) -> None:
    r = planted_report.result(check_id)
    assert (r.num_violated, r.denominator) == (violated, denominator)
    if examples is not None:
        assert r.example_ids == examples
    assert r.status == ("fail" if 100 * violated / denominator > r.threshold else "pass")


def test_planted_clean_checks_pass(planted_report: DqReport) -> None:
    for check_id in (
        "isRequired.condition_occurrence.person_id",  # the missing field was the concept
        "plausibleValueLow.measurement.3006322",
        "plausibleValueHigh.measurement.3000963",
        "isPrimaryKey.condition_occurrence.condition_occurrence_id",
    ):
        assert planted_report.result(check_id).num_violated == 0, check_id
    assert planted_report.result("plausibleValueLow.measurement.3009542").status == (
        "not_applicable"
    )


def test_missing_column_makes_dependent_checks_not_applicable(tmp_path: Path) -> None:
    path = tmp_path / "partial.duckdb"
    con = duckdb.connect(str(path))
    create_cdm_schema(con, indexes=False)
    con.execute("DROP TABLE death; ALTER TABLE person DROP COLUMN birth_datetime")
    con.close()
    report = run_checks(path)
    death = report.result("cdmTable.death")
    assert (death.status, death.num_violated) == ("fail", 1)
    assert report.result("cdmField.person.birth_datetime").num_violated == 1
    after_birth = report.result(
        "plausibleAfterBirth.observation_period.observation_period_end_date"
    )
    assert (after_birth.status, after_birth.note) == (
        "not_applicable",
        "column person.birth_datetime missing",
    )


# --- synthetic node ---------------------------------------------------------------------------


def test_synthetic_node_passes_most_checks(synthetic_node_dbs: list[Path]) -> None:
    report = run_checks(synthetic_node_dbs[0])
    applicable = [r for r in report.results if r.status != "not_applicable"]
    failed = report.failed()
    assert len(applicable) >= 200
    assert len(failed) <= 0.05 * len(applicable), [r.id for r in failed]
    # the generator records lab values, so the concept-level value checks run and pass
    concept_level = [r for r in applicable if r.level == "concept"]
    assert len(concept_level) >= 10 and all(r.status == "pass" for r in concept_level)
    for check_id in (
        "measurePersonCompleteness.observation_period",
        "isPrimaryKey.condition_occurrence.condition_occurrence_id",
        "isForeignKey.condition_occurrence.person_id",
        "plausibleDuringObservation.condition_occurrence.condition_start_date",
        "plausibleAfterBirth.condition_occurrence.condition_start_date",
        "plausibleAge.person.year_of_birth",
    ):
        assert report.result(check_id).status == "pass", check_id
    # what fails is real: Synthea's race "other" has no standard concept
    assert {r.id for r in failed} == {
        "sourceValueCompleteness.person.race_source_value",
        "standardConceptRecordCompleteness.person.race_concept_id",
    }


def test_vocabulary_tables_checked_only_on_request(synthetic_node_dbs: list[Path]) -> None:
    """As DataQualityDashboard's default ``tablesToExclude``: the shipped vocabulary is a reduced
    Athena export whose own foreign keys point at metadata concepts it leaves out."""
    default = {r.table for r in run_checks(synthetic_node_dbs[0]).results}
    assert not default & VOCABULARY_TABLES and "person" in default
    report = run_checks(synthetic_node_dbs[0], vocabulary=True)
    assert {r.table for r in report.results} >= VOCABULARY_TABLES
    assert report.result("isForeignKey.concept_synonym.language_concept_id").status == "fail"


# --- command line -----------------------------------------------------------------------------


def test_cli_writes_json_and_html(synthetic_node_dbs: list[Path], tmp_path: Path) -> None:
    out = tmp_path / "dq"
    result = CliRunner().invoke(app, ["dq", str(synthetic_node_dbs[1]), "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "Conformance" in result.output and "Plausibility" in result.output
    data = json.loads((out / "dq.json").read_text())
    assert len(data["results"]) >= 40
    assert data["table_rows"]["person"] > 0 and data["seconds"] > 0 and data["cdm_source_name"]
    total = next(s for s in data["summary"] if s["category"] == "Total")
    assert total["passed"] + total["failed"] + total["not_applicable"] == len(data["results"])
    page = (out / "dq.html").read_text()
    assert page.startswith("<!DOCTYPE html>") and "Summary per category" in page
    assert "<script" not in page and "http" not in page  # self-contained


def test_cli_rejects_missing_and_non_cdm_files(tmp_path: Path) -> None:
    runner = CliRunner()
    missing = runner.invoke(app, ["dq", str(tmp_path / "nope.duckdb"), "--out", str(tmp_path)])
    assert missing.exit_code == 1 and "not found" in missing.output
    garbage = tmp_path / "garbage.duckdb"
    garbage.write_text("not a database")
    bad = runner.invoke(app, ["dq", str(garbage), "--out", str(tmp_path)])
    assert bad.exit_code == 1 and "not a readable DuckDB file" in bad.output
    other = tmp_path / "other.duckdb"
    duckdb.connect(str(other)).execute("CREATE TABLE t (x INTEGER)").close()
    not_cdm = runner.invoke(app, ["dq", str(other), "--out", str(tmp_path / "o")])
    assert not_cdm.exit_code == 1 and "not an OMOP CDM" in not_cdm.output
    assert not (tmp_path / "o" / "dq.json").exists()
