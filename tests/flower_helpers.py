"""Shared set-up for the federation tests: a study over the analysis test nodes, policies, permit."""

from __future__ import annotations

from pathlib import Path

import yaml

from coordinator.demo import issue_permit, make_permit_body, write_policy
from studies.model import load_study

#: Cohorts on the analysis test CDMs (tests/conftest.py): drug 1001 exposure, outcome 2001.
FEDERATION_STUDY = {
    "name": "federation_test",
    "concept_sets": [
        {"name": "drug_a", "concepts": [1001]},
        {"name": "outcome", "concepts": [2001]},
    ],
    "cohorts": [
        {"name": "exposed", "entry": {"domain": "drug", "concept_set": "drug_a"}},
        {"name": "outcome", "entry": {"domain": "condition", "concept_set": "outcome"}},
    ],
    "analyses": [
        {
            "id": "feasibility",
            "kind": "counts",
            "cohorts": ["exposed", "outcome"],
            "strata": ["sex"],
        },
        {
            "id": "km",
            "kind": "survival",
            "target_cohorts": ["exposed"],
            "outcome": "outcome",
            "follow_up_days": 1825,
            "time_bin_days": 90,
        },
        {
            "id": "risk",
            "kind": "glm",
            "family": "binomial",
            "cohort": "exposed",
            "outcome": "outcome",
            "outcome_window": {"start": 1, "end": 730},
            "covariates": [{"type": "age", "center": 50, "scale": 10}, {"type": "sex"}],
        },
    ],
}


def full_cdms(cdms: list[Path], folder: Path) -> list[Path]:
    """The analysis test CDMs (tests/conftest.py) rebuilt in the full CDM 5.4 schema, with the
    identity concept_ancestor that concept sets need, so cohorts compile as on a real node."""
    import duckdb

    from omop_etl.schema import create_cdm_schema

    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for cdm in cdms:
        path = folder / cdm.name
        with duckdb.connect(str(path)) as con:
            create_cdm_schema(con)
            con.execute("ATTACH ? AS src (READ_ONLY)", [str(cdm)])
            tables = con.execute(
                "SELECT table_name FROM duckdb_tables() WHERE database_name = 'src'"
            ).fetchall()
            for (table,) in tables:
                con.execute(f"INSERT INTO main.{table} BY NAME {_filled(con, table)}")
            con.execute(
                "INSERT INTO concept_ancestor (ancestor_concept_id, descendant_concept_id, "
                "min_levels_of_separation, max_levels_of_separation) "
                "SELECT concept_id, concept_id, 0, 0 FROM concept"
            )
            con.execute("DETACH src")
        out.append(path)
    return out


_DEFAULTS = {"DATE": "DATE '1970-01-01'", "VARCHAR": "''"}


def _filled(con, table: str) -> str:
    """SELECT from the source table with required CDM columns it lacks set to a neutral value."""
    have = {
        r[0]
        for r in con.execute(
            "SELECT column_name FROM duckdb_columns() WHERE database_name='src' AND table_name=?",
            [table],
        ).fetchall()
    }
    need = con.execute(
        "SELECT column_name, data_type FROM duckdb_columns() WHERE database_name = "
        "current_database() AND table_name = ? AND NOT is_nullable",
        [table],
    ).fetchall()
    extra = [f"{_DEFAULTS.get(t, '0')} AS {c}" for c, t in need if c not in have]
    return f"SELECT {', '.join(['*', *extra])} FROM src.main.{table}"


def set_up_federation(folder: Path, cdms: list[Path], study: dict | None = None):
    """Write the study, one policy per CDM, the permit body's keys and a permit naming the nodes.

    Returns (study_path, permit_document, policy_paths, node_names).
    """
    folder.mkdir(parents=True, exist_ok=True)
    study_path = folder / "study.yaml"
    study_path.write_text(yaml.safe_dump(study or FEDERATION_STUDY, sort_keys=False))
    keys = make_permit_body(folder / "permit_body")
    names = [f"site{i + 1}" for i in range(len(cdms))]
    policies = [
        write_policy(folder / name, name, cdm, keys.public)
        for name, cdm in zip(names, cdms, strict=True)
    ]
    permit = issue_permit(load_study(study_path), names, keys.private, folder / "permit.json")
    return study_path, permit, policies, names
