"""One node's step, the round loop, and in-process federation over real DuckDB node files."""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar, Literal

import duckdb
import polars as pl
import pytest
from pydantic import BaseModel
from typer.testing import CliRunner

from fedomop import __version__
from fedomop.cli import app
from studies.analysis import CombineInput, Finished, NextRound, ReleaseProfile
from studies.canonical import canonical_data, study_hash
from studies.loading import load_study
from studies.results import read_results
from studies.runner import drive, local_step, run_local
from studies.statistics import make_statistics

REPO = Path(__file__).resolve().parents[1]

SYNTHETIC_STUDY = REPO / "tests" / "studies" / "nsaid_gi_bleed.yaml"


def pooled_counts(result: pl.DataFrame) -> dict[tuple[str, str, str], int]:
    rows = result.filter(pl.col("estimate_name") == "count")
    return {
        (r["group_level"], r["strata_level"], r["variable_name"]): int(r["estimate_value"])
        for r in rows.iter_rows(named=True)
    }


def direct_counts(db: Path) -> dict[tuple[str, str, str], int]:
    """The same numbers straight from the CDM, by SQL written independently of the compiler."""
    with duckdb.connect(str(db), read_only=True) as con:
        rows = con.execute(
            """
            WITH nsaid AS (
                SELECT x.person_id, min(x.drug_exposure_start_date) AS d
                FROM drug_exposure x JOIN observation_period op ON op.person_id = x.person_id
                  AND x.drug_exposure_start_date BETWEEN op.observation_period_start_date
                                                     AND op.observation_period_end_date
                WHERE x.drug_concept_id IN (1118088, 40162359, 19078461) GROUP BY x.person_id),
            bleed AS (
                SELECT c.person_id FROM condition_occurrence c
                JOIN observation_period op ON op.person_id = c.person_id
                  AND c.condition_start_date BETWEEN op.observation_period_start_date
                                                 AND op.observation_period_end_date
                WHERE c.condition_concept_id IN (SELECT descendant_concept_id FROM
                      concept_ancestor WHERE ancestor_concept_id = 192671))
            SELECT 'nsaid_users', count(*), count(DISTINCT person_id) FROM nsaid
            UNION ALL SELECT 'gi_bleed', count(*), count(DISTINCT person_id) FROM bleed
            """
        ).fetchall()
    out = {}
    for cohort, records, subjects in rows:
        out[(cohort, "overall", "Number records")] = records
        out[(cohort, "overall", "Number subjects")] = subjects
    return out


@pytest.mark.slow
def test_run_local_over_synthetic_nodes(synthetic_node_dbs, tmp_path):
    """Every node a separate file; pooled counts equal the per-node sums of direct SQL counts."""
    out = tmp_path / "results"
    result, settings = run_local(SYNTHETIC_STUDY, synthetic_node_dbs, out)
    assert {p.name for p in out.iterdir()} >= {
        "results.csv",
        "settings.csv",
        "results.parquet",
        "settings.parquet",
    }
    written, written_settings = read_results(out)
    assert written.height == result.height > 0
    expected: dict[tuple[str, str, str], int] = {}
    for db in synthetic_node_dbs:
        for key, value in direct_counts(db).items():
            expected[key] = expected.get(key, 0) + value
    got = pooled_counts(result)
    assert {k: got[k] for k in expected} == expected
    assert all(v > 0 for v in expected.values())
    # sex strata add up to the overall count
    for cohort in ("nsaid_users", "gi_bleed"):
        by_sex = sum(
            v
            for (c, s, var), v in got.items()
            if c == cohort and s != "overall" and "records" in var
        )
        assert by_sex == expected[(cohort, "overall", "Number records")]
    row = written_settings.row(0, named=True)
    assert row["study_hash"] == study_hash(load_study(SYNTHETIC_STUDY))
    assert row["package_version"] == __version__
    assert row["analysis_id"] == "feasibility" and row["result_type"] == "counts"
    assert row["cdm_names"] == ";".join(p.stem for p in synthetic_node_dbs)


def test_local_step_on_a_path_and_on_a_connection(gibleed_db, tmp_path):
    """The gate's call: a study document (Circe inlined) and a CDM; statistics come back."""
    study = load_study(REPO / "examples" / "gibleed_circe" / "study.yaml")
    document = canonical_data(study)
    by_path = local_step(gibleed_db, document, "feasibility")
    counts = by_path.filter(
        (pl.col("cohort") == "celecoxib")
        & (pl.col("strata_name") == "overall")
        & (pl.col("estimate_name") == "count")
    )
    assert set(counts["value"].to_list()) == {1800.0}
    with duckdb.connect(str(gibleed_db), read_only=True) as con:
        first = local_step(con, study, "feasibility")
        second = local_step(con, study, "feasibility")  # cohorts materialised once, reused
    assert first.equals(by_path) and second.equals(by_path)
    with pytest.raises(KeyError, match="no analysis 'nope'"):
        local_step(gibleed_db, study, "nope")


class _HalvingSpec(BaseModel):
    id: str = "halve"
    kind: Literal["halving"] = "halving"


class _Halving:
    """A three-round analysis: each round the nodes report their value, combine halves it."""

    kind: ClassVar[str] = "halving"

    def profile(self, spec: Any) -> ReleaseProfile:
        return ReleaseProfile(max_rounds=5)

    def combine(self, inputs: CombineInput, spec: Any, state: dict | None) -> Any:
        total = sum(float(s["value"].sum()) for s in inputs.statistics)
        rounds = (state or {}).get("rounds", 0) + 1
        if rounds == 3:
            return Finished(
                pl.DataFrame({"total": [total], "nodes": [",".join(inputs.node_names)]})
            )
        return NextRound({"rounds": rounds, "value": total / 2})


def test_drive_loops_rounds_until_finished():
    asked = []

    def ask(state: dict | None, round_: int) -> dict[str, pl.DataFrame]:
        asked.append((round_, state))
        value = 8.0 if state is None else state["value"]
        stats = make_statistics(
            pl.DataFrame({"estimate_name": ["v"], "release_class": ["value"], "value": [value]})
        )
        return {"a": stats, "b": stats}

    result = drive(_Halving(), _HalvingSpec(), ask)
    assert [r for r, _ in asked] == [0, 1, 2]
    assert asked[0][1] is None and asked[1][1] == {"rounds": 1, "value": 8.0}
    assert result.row(0) == (16.0, "a,b")
    with pytest.raises(RuntimeError, match="did not finish within 2 rounds"):
        drive(_Halving(), _HalvingSpec(), ask, max_rounds=2)
    with pytest.raises(RuntimeError, match="no node released"):
        drive(_Halving(), _HalvingSpec(), lambda state, round_: {})


def test_cli_run_local(gibleed_db, tmp_path):
    runner = CliRunner()
    study = REPO / "examples" / "gibleed_circe" / "study.yaml"
    out = tmp_path / "out"
    args = ["study", "run-local", str(study), "--db", str(gibleed_db), "--out", str(out)]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    written, settings = read_results(out)
    counts = pooled_counts(written)
    assert counts[("celecoxib", "overall", "Number subjects")] == 1800
    assert counts[("celecoxib_age40_male", "overall", "Number subjects")] == 266
    assert settings["cdm_names"].to_list() == ["gibleed"]
    missing = runner.invoke(
        app, ["study", "run-local", str(study), "--db", str(tmp_path / "no.duckdb"), "--out", "x"]
    )
    assert missing.exit_code == 1 and "no CDM database" in missing.output


def test_example_studies_validate():
    """Every examples/<name>/study.yaml is a valid study (its Circe files inlined)."""
    examples = sorted((REPO / "examples").glob("*/study.yaml"))
    assert len(examples) >= 7
    kinds = {spec.kind for path in examples for spec in load_study(path).analyses}
    assert kinds >= {"counts", "characterization", "incidence", "prevalence", "survival", "glm"}
    assert kinds >= {"meta"}


@pytest.mark.slow
@pytest.mark.parametrize(
    "example", sorted(p.parent.name for p in REPO.glob("examples/gibleed_*/study.yaml"))
)
def test_gibleed_examples_run(gibleed_db, tmp_path, example):
    """Each GiBleed example runs end to end on two nodes and reports every analysis."""
    study = REPO / "examples" / example / "study.yaml"
    result, settings = run_local(study, [gibleed_db, gibleed_db], tmp_path, ["a", "b"])
    assert result.height > 0
    assert settings["analysis_id"].to_list() == [s.id for s in load_study(study).analyses]


def test_cli_run_local_names_a_bad_db_not_the_study(tmp_path):
    """A CSV given as --db is reported as that --db path; the study file is not blamed."""
    study = REPO / "examples" / "gibleed_circe" / "study.yaml"
    csv = tmp_path / "patients.csv"
    csv.write_text("Id,BIRTHDATE\n1,2000-01-01\n")
    result = CliRunner().invoke(
        app, ["study", "run-local", str(study), "--db", str(csv), "--out", str(tmp_path / "o")]
    )
    assert result.exit_code == 1
    assert f"error: --db {csv}: not a CDM DuckDB database" in result.output
    assert str(study) not in result.output
    assert "Traceback" not in result.output
