"""Shared fixtures: paths to ../shared data and session-scoped DuckDB CDMs built once per run."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

pytest_plugins = ["tests.pg_server"]  # the PostgreSQL server fixtures

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")
# Rich wraps CLI output at the console width (80 without a terminal), so where a message breaks
# depended on the length of pytest's temporary paths; tests read messages whole.
os.environ["COLUMNS"] = "400"

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
GIBLEED_CSV = SHARED / "data" / "eunomia" / "GiBleed" / "csv"
EXPECTED = SHARED / "data" / "eunomia" / "expected_results"
COHORTS = SHARED / "data" / "eunomia" / "cohorts"


@pytest.fixture(scope="module")
def fuzz_counts():
    """A fuzz module's example counts, merged into ``test-artifacts/fuzz.json`` when it ends."""
    from _fuzz import write_counts

    yield
    write_counts()


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    """The ../shared folder beside the checkout (CI lays it there)."""
    if not GIBLEED_CSV.is_dir():
        pytest.fail(f"shared data not found at {SHARED}: clone the project beside ../shared")
    return SHARED


# --- analysis test nodes (helper ANALYSES): three small seeded CDM DuckDBs and their union ------

ANALYSIS_CDM_DDL = """
CREATE TABLE person (person_id BIGINT, gender_concept_id INTEGER, year_of_birth INTEGER,
    month_of_birth INTEGER, day_of_birth INTEGER, birth_datetime TIMESTAMP);
CREATE TABLE observation_period (observation_period_id BIGINT, person_id BIGINT,
    observation_period_start_date DATE, observation_period_end_date DATE,
    period_type_concept_id INTEGER);
CREATE TABLE condition_occurrence (condition_occurrence_id BIGINT, person_id BIGINT,
    condition_concept_id INTEGER, condition_start_date DATE, condition_end_date DATE);
CREATE TABLE drug_exposure (drug_exposure_id BIGINT, person_id BIGINT, drug_concept_id INTEGER,
    drug_exposure_start_date DATE, drug_exposure_end_date DATE);
CREATE TABLE procedure_occurrence (procedure_occurrence_id BIGINT, person_id BIGINT,
    procedure_concept_id INTEGER, procedure_date DATE);
CREATE TABLE measurement (measurement_id BIGINT, person_id BIGINT,
    measurement_concept_id INTEGER, measurement_date DATE, value_as_number DOUBLE);
CREATE TABLE concept (concept_id INTEGER, concept_name VARCHAR, domain_id VARCHAR,
    vocabulary_id VARCHAR, concept_class_id VARCHAR, standard_concept VARCHAR,
    concept_code VARCHAR);
"""
#: Test cohorts built by plain SQL on each node (name -> id): drug 1001 and 1002 new users,
#: condition 2001 occurrences (the outcome), and everyone from observation start.
ANALYSIS_COHORTS = {"exposed": 1, "comparator": 2, "outcome": 3, "population": 4}
ANALYSIS_COHORT_SQL = """
CREATE OR REPLACE TEMP TABLE cohort AS
WITH first_drug AS (
    SELECT person_id, drug_concept_id, min(drug_exposure_start_date) AS d
    FROM drug_exposure WHERE drug_concept_id IN (1001, 1002) GROUP BY ALL
)
SELECT CASE f.drug_concept_id WHEN 1001 THEN 1 ELSE 2 END AS cohort_definition_id,
       f.person_id AS subject_id, f.d AS cohort_start_date,
       op.observation_period_end_date AS cohort_end_date
FROM first_drug f JOIN observation_period op ON op.person_id = f.person_id
UNION ALL
SELECT 3, person_id, condition_start_date, condition_start_date
FROM condition_occurrence WHERE condition_concept_id = 2001
UNION ALL
SELECT 4, person_id, observation_period_start_date, observation_period_end_date
FROM observation_period
"""


def _analysis_node_frames(seed: int, persons: int, first_id: int) -> dict[str, object]:
    """Seeded random CDM rows for one node; outcome risk depends on age, sex and drug."""
    import numpy as np
    import polars as pl

    rng = np.random.default_rng(seed)
    pid = np.arange(first_id, first_id + persons)
    male = rng.random(persons) < 0.45 + 0.05 * (seed % 3)
    yob = rng.integers(1930, 2005, persons)
    mob, dob = rng.integers(1, 13, persons), rng.integers(1, 29, persons)
    obs_start = np.datetime64("2005-01-01") + rng.integers(0, 3650, persons).astype(
        "timedelta64[D]"
    )
    obs_len = rng.integers(200, 3650, persons)
    obs_end = obs_start + obs_len.astype("timedelta64[D]")
    person = pl.DataFrame(
        {
            "person_id": pid,
            "gender_concept_id": np.where(male, 8507, 8532),
            "year_of_birth": yob,
            "month_of_birth": mob,
            "day_of_birth": dob,
            "birth_datetime": [None] * persons,
        },
        schema_overrides={"birth_datetime": pl.Datetime},
    )
    obs = pl.DataFrame(
        {
            "observation_period_id": pid,
            "person_id": pid,
            "observation_period_start_date": obs_start,
            "observation_period_end_date": obs_end,
            "period_type_concept_id": np.full(persons, 32817),
        }
    )

    def events(rate: float, concepts: list[int], weights: np.ndarray) -> tuple:
        n = rng.poisson(rate, persons)
        who = np.repeat(np.arange(persons), n)
        day = (rng.random(who.size) * obs_len[who]).astype("int64")
        date = obs_start[who] + day.astype("timedelta64[D]")
        concept = rng.choice(concepts, who.size, p=weights / weights.sum())
        return pid[who], concept, date, who

    base = np.arange(1, 31, dtype=float)[::-1]
    c_pid, c_concept, c_date, _ = events(4.0, list(range(3001, 3031)), base)
    d_pid, d_concept, d_date, _ = events(
        1.2, [1001, 1002, *range(1003, 1021)], np.r_[8.0, 6.0, np.ones(18)]
    )
    # outcome 2001: hazard rises with age and male sex, more after drug 1001
    age = 2012 - yob
    risk = 1 / (1 + np.exp(-(-0.5 + 0.03 * (age - 50) + 0.5 * male)))
    has = rng.random(persons) < risk
    o_who = np.flatnonzero(has)
    o_day = (rng.random(o_who.size) * obs_len[o_who]).astype("int64")
    extra = np.flatnonzero(rng.random(persons) < 0.3)
    o_who = np.r_[o_who, extra]
    o_day = np.r_[o_day, (rng.random(extra.size) * obs_len[extra]).astype("int64")]
    cond = pl.DataFrame(
        {
            "person_id": np.r_[c_pid, pid[o_who]],
            "condition_concept_id": np.r_[c_concept, np.full(o_who.size, 2001)],
            "condition_start_date": np.r_[
                c_date, obs_start[o_who] + o_day.astype("timedelta64[D]")
            ],
        }
    )
    cond = cond.with_columns(
        (pl.int_range(pl.len()) + first_id * 100).alias("condition_occurrence_id"),
        pl.col("condition_start_date").alias("condition_end_date"),
    )
    drug = pl.DataFrame(
        {
            "drug_exposure_id": np.arange(d_pid.size) + first_id * 100,
            "person_id": d_pid,
            "drug_concept_id": d_concept,
            "drug_exposure_start_date": d_date,
            "drug_exposure_end_date": d_date + np.timedelta64(30, "D"),
        }
    )
    p_pid, p_concept, p_date, _ = events(1.5, list(range(4001, 4011)), np.arange(10, 0, -1.0))
    proc = pl.DataFrame(
        {
            "procedure_occurrence_id": np.arange(p_pid.size) + first_id * 100,
            "person_id": p_pid,
            "procedure_concept_id": p_concept,
            "procedure_date": p_date,
        }
    )
    m_pid, m_concept, m_date, _ = events(2.0, list(range(5001, 5011)), np.ones(10))
    meas = pl.DataFrame(
        {
            "measurement_id": np.arange(m_pid.size) + first_id * 100,
            "person_id": m_pid,
            "measurement_concept_id": m_concept,
            "measurement_date": m_date,
            "value_as_number": rng.normal(5, 2, m_pid.size),
        }
    )
    return {
        "person": person,
        "observation_period": obs,
        "condition_occurrence": cond,
        "drug_exposure": drug,
        "procedure_occurrence": proc,
        "measurement": meas,
    }


def _analysis_concepts() -> object:
    import polars as pl

    ids = [
        1001,
        *range(1002, 1021),
        2001,
        *range(3001, 3031),
        *range(4001, 4011),
        *range(5001, 5011),
    ]
    domain = {1: "Drug", 2: "Condition", 3: "Condition", 4: "Procedure", 5: "Measurement"}
    return pl.DataFrame(
        {
            "concept_id": ids,
            "concept_name": [f"concept {i}" for i in ids],
            "domain_id": [domain[i // 1000] for i in ids],
            "vocabulary_id": ["Test"] * len(ids),
            "concept_class_id": ["Test"] * len(ids),
            "standard_concept": ["S"] * len(ids),
            "concept_code": [str(i) for i in ids],
        }
    )


def _write_analysis_cdm(path: Path, frames: dict[str, object]) -> Path:
    import duckdb

    con = duckdb.connect(str(path))
    con.execute(ANALYSIS_CDM_DDL)
    for table, frame in frames.items():
        con.register("frame_in", frame)
        con.execute(f"INSERT INTO {table} BY NAME SELECT * FROM frame_in")
        con.unregister("frame_in")
    con.close()
    return path


@pytest.fixture(scope="session")
def analysis_node_dbs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    """Three seeded node CDMs (different sizes and sex mix) and the union of their rows.

    Returns {"nodes": [Path, Path, Path], "union": Path}. Person ids do not overlap, so the
    union is the pooled data set the federated results must reproduce.
    """
    import polars as pl

    folder = tmp_path_factory.mktemp("analysis_nodes")
    parts = [
        _analysis_node_frames(seed, n, first)
        for seed, n, first in ((11, 700, 1), (12, 500, 100_001), (13, 900, 200_001))
    ]
    concepts = _analysis_concepts()
    nodes = [
        _write_analysis_cdm(folder / f"node{i}.duckdb", {**p, "concept": concepts})
        for i, p in enumerate(parts)
    ]
    union = {t: pl.concat([p[t] for p in parts], how="vertical") for t in parts[0]}
    return {
        "nodes": nodes,
        "union": _write_analysis_cdm(folder / "union.duckdb", {**union, "concept": concepts}),
    }


@pytest.fixture
def open_analysis_cdm():
    """Open a test CDM read-only with the test cohorts in a temp ``cohort`` table."""
    import duckdb

    from studies.analysis import CdmContext

    opened = []

    def _open(path: Path, name: str | None = None) -> CdmContext:
        con = duckdb.connect(str(path), read_only=True)
        con.execute(ANALYSIS_COHORT_SQL)
        opened.append(con)
        return CdmContext(con=con, cohort_ids=dict(ANALYSIS_COHORTS), cdm_name=name or path.stem)

    yield _open
    for con in opened:
        con.close()


@pytest.fixture
def run_analysis(open_analysis_cdm):
    """Run one analysis in-process over CDM files as separate nodes, looping NextRound.

    ``run(spec_dict, paths) -> (summarised_result, rounds)``.
    """
    from studies.analyses import REGISTRY
    from studies.analysis import CombineInput, Finished

    def _run(spec: dict, paths: list[Path], max_rounds: int = 100):
        analysis = REGISTRY[spec["kind"]]()
        parsed = analysis.Spec.model_validate(spec)
        cdms = [open_analysis_cdm(p) for p in paths]
        state = None
        for rounds in range(1, max_rounds + 1):
            stats = [analysis.local(cdm, parsed, state) for cdm in cdms]
            outcome = analysis.combine(
                CombineInput(stats, [c.cdm_name for c in cdms]), parsed, state
            )
            if isinstance(outcome, Finished):
                return outcome.result, rounds
            state = outcome.state
        raise AssertionError(f"analysis {spec['id']} did not finish in {max_rounds} rounds")

    return _run


@pytest.fixture(scope="session")
def gibleed_db(tmp_path_factory: pytest.TempPathFactory, shared_dir: Path) -> Path:
    """A CDM 5.4 DuckDB file built once from ../shared GiBleed CSV by ``load_omop_csv``."""
    from omop_etl.load import load_omop_csv

    path = tmp_path_factory.mktemp("gibleed") / "gibleed.duckdb"
    load_omop_csv(GIBLEED_CSV, path, progress=False)
    return path


@pytest.fixture(scope="module")
def gibleed(gibleed_db: Path):
    """A read-only connection to ``gibleed_db`` per test module (its temp tables, such as the
    materialised ``cohort``, stay within the module)."""
    import duckdb

    con = duckdb.connect(str(gibleed_db), read_only=True)
    yield con
    con.close()


# --- synthetic Synthea-format nodes (helper SYNTH) ---------------------------------------------

#: (profile, seed, patients) of the three synthetic test nodes.
SYNTHETIC_NODES = (
    ("urban_hospital", 101, 2000),
    ("rural_clinic", 202, 2000),
    ("elderly_care", 303, 2000),
)


@pytest.fixture(scope="session")
def synthea_node_dirs(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Three Synthea-format CSV folders made by ``omop_etl.synth.generate`` (profiles and seeds
    in ``SYNTHETIC_NODES``), generated once per session."""
    from omop_etl.synth import generate

    root = tmp_path_factory.mktemp("synthea_nodes")
    return [
        generate(root / profile, patients=n, seed=seed, profile=profile)
        for profile, seed, n in SYNTHETIC_NODES
    ]


@pytest.fixture(scope="session")
def synthetic_node_dbs(
    tmp_path_factory: pytest.TempPathFactory, synthea_node_dirs: list[Path]
) -> list[Path]:
    """Three CDM DuckDB files (urban_hospital, rural_clinic, elderly_care; ~2,000 patients each)
    loaded from ``synthea_node_dirs`` by ``load_synthea`` once per session. Read-only use only."""
    from omop_etl.synthea import load_synthea

    root = tmp_path_factory.mktemp("synthetic_cdm")
    paths = []
    for src in synthea_node_dirs:
        path = root / f"{src.name}.duckdb"
        load_synthea(src, path, progress=False)
        paths.append(path)
    return paths
