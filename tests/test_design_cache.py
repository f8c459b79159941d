"""Design rows of GLM and Cox are built once per connection and cohorts, and never go stale.

``studies.analyses.node_sql.design_table`` keeps the rows (covariates, outcome, offset or time)
of a multi-round analysis in a temp table named from hex digests. These tests check that later
rounds reuse it, that its answers equal a fresh connection's, that re-materialised cohorts (for
another study on the same connection) rebuild it and drop the stale one, and that the gate's
reopened connection (after the CDM file is replaced) starts without it.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import duckdb
import polars as pl
import pytest
from conftest import ANALYSIS_COHORT_SQL
from test_analyses_cox import SPEC as COX_SPEC
from test_analyses_glm import LOGISTIC as GLM
from test_gate import STUDY, ask, build_cdm, permit, write_policy

from node.gate import Gate
from node.policy import load_policy
from node.transcript import signed_release, transcript_json
from studies.analyses import REGISTRY
from studies.analyses.node_sql import DESIGN_PREFIX
from studies.analysis import CdmContext
from studies.loading import study_from_data
from studies.permit import generate_keypair, load_private_key
from studies.rounds import next_state
from studies.statistics import from_ipc

COX = {**COX_SPEC, "time_bin_days": 30}
#: The test cohorts with exposed (1) and comparator (2) swapped: what another study gives.
SWAPPED_COHORTS = """
CREATE OR REPLACE TEMP TABLE swapped AS
SELECT CASE cohort_definition_id WHEN 1 THEN 2 WHEN 2 THEN 1 ELSE cohort_definition_id END
         AS cohort_definition_id, subject_id, cohort_start_date, cohort_end_date FROM cohort;
CREATE OR REPLACE TEMP TABLE cohort AS SELECT * FROM swapped;
DROP TABLE swapped;
"""


def design_tables(con: duckdb.DuckDBPyConnection) -> dict[str, int]:
    """Design table name -> catalog id on this connection."""
    rows = con.execute(
        "SELECT table_name, table_oid FROM duckdb_tables() WHERE temporary "
        "AND starts_with(table_name, ?)",
        [DESIGN_PREFIX],
    ).fetchall()
    return dict(rows)


def local(cdm: CdmContext, spec: dict[str, Any], state: dict | None) -> pl.DataFrame:
    analysis = REGISTRY[spec["kind"]]()
    return analysis.local(cdm, analysis.Spec.model_validate(spec), state)


def records(frame: pl.DataFrame) -> float:
    return frame.filter(pl.col("variable_name") == "records")["value"].item()


def fresh(path: Path, spec: dict[str, Any], state: dict | None, swap: bool = False) -> pl.DataFrame:
    """``local`` on a new connection: no design table to reuse."""
    with duckdb.connect(str(path), read_only=True) as con:
        con.execute(ANALYSIS_COHORT_SQL)
        if swap:
            con.execute(SWAPPED_COHORTS)
        cdm = CdmContext(con=con, cohort_ids={"exposed": 1, "comparator": 2, "outcome": 3})
        return local(cdm, spec, state)


def test_rounds_reuse_one_design_table_and_agree_with_a_fresh_connection(
    analysis_node_dbs, open_analysis_cdm
):
    path = analysis_node_dbs["nodes"][0]
    cdm = open_analysis_cdm(path)
    glm_state = {"beta": [-1.0, 0.1, 0.2, -0.3]}

    first = local(cdm, GLM, None)
    tables = design_tables(cdm.con)
    assert len(tables) == 1
    (name,) = tables
    assert re.fullmatch(DESIGN_PREFIX + r"[0-9a-f]{16}_[0-9a-f]{32}", name)
    second = local(cdm, GLM, glm_state)
    assert design_tables(cdm.con) == tables  # same table, same catalog id: not rebuilt
    assert first.equals(fresh(path, GLM, None))
    assert second.equals(fresh(path, GLM, glm_state))  # fsum sums: bit for bit

    events = local(cdm, COX, None)
    segments = events.filter(pl.col("variable_name") == "time")["variable_level"]
    grid = sorted({int(t) for t in segments})  # the node's own segment ends: a grid it answers
    cox_state = {"grid": grid, "events": [1] * len(grid), "beta": [0.1, 0.2, -0.3]}
    risk = local(cdm, COX, cox_state)
    assert len(design_tables(cdm.con)) == 2  # one per analysis, both kept
    assert events.equals(fresh(path, COX, None))
    assert risk.equals(fresh(path, COX, cox_state))


def test_rematerialised_cohorts_rebuild_the_design_and_drop_the_stale_one(
    analysis_node_dbs, open_analysis_cdm
):
    path = analysis_node_dbs["nodes"][1]
    cdm = open_analysis_cdm(path)
    before = local(cdm, GLM, None)
    local(cdm, COX, None)
    stale = design_tables(cdm.con)

    cdm.con.execute(SWAPPED_COHORTS)  # same cohort ids and spec, other rows
    after = local(cdm, GLM, None)
    rebuilt = design_tables(cdm.con)
    assert len(rebuilt) == 1 and not set(rebuilt) & set(stale)
    swapped = fresh(path, GLM, None, swap=True)
    assert after.equals(swapped)
    assert records(after) != records(before)
    assert records(after) == swapped.filter(pl.col("variable_name") == "records")["value"].item()


def test_gate_reopens_a_replaced_cdm_without_the_old_design(tmp_path: Path) -> None:
    """The gate keeps one connection (and its design tables) while the file is unchanged; a
    replaced file is reopened, and the GLM reads the new persons, not the old design rows."""
    assert any(a["id"] == "risk" and a["kind"] == "glm" for a in STUDY["analyses"])
    private, public, _ = generate_keypair(tmp_path / "keys", "permit_body")
    secrets = {"node-a": os.urandom(32), "node-b": os.urandom(32)}
    world = {"key": load_private_key(private), "pub": public, "secrets": secrets}
    cdm = build_cdm(tmp_path / "cdm.duckdb", 60, 50)
    gate = Gate(load_policy(write_policy(tmp_path / "node", world, cdm=cdm)))
    document = permit(world)
    spec = study_from_data(STUDY).analysis("risk")

    def glm_round(round_: int, state: Any = None, transcript: Any = None) -> Any:
        return ask(gate, document, "risk", state=state, round=round_, transcript=transcript)

    def count(frame: pl.DataFrame, variable: str, level: str) -> float:
        rows = frame.filter(
            (pl.col("variable_name") == variable) & (pl.col("variable_level") == level)
        )
        return rows["value"].item()

    first = glm_round(0)
    assert count(from_ipc(first.statistics), "records", "") == 110.0
    con = gate._cdm[1]
    tables = design_tables(con)
    assert len(tables) == 1
    state = next_state(spec, {"node-a": from_ipc(first.statistics)}, None)
    second = glm_round(1, state, transcript_json(None, [signed_release(first)]))
    assert second.released, second.reason
    assert design_tables(con) == tables  # reused across rounds

    # 30 more persons, 10 more bleeds: no cohort moves by fewer than 10 (overlap control)
    os.replace(build_cdm(tmp_path / "rebuilt.duckdb", 90, 50), cdm)  # as atomic_build does
    following = next_state(spec, {"node-a": from_ipc(second.statistics)}, state)
    refused = glm_round(2, following, transcript_json(state, [signed_release(second)]))
    assert not refused.released and "CDM changed since round 1" in refused.reason
    document = permit(world)  # the study starts again on the rebuilt CDM
    rebuilt = from_ipc(glm_round(0).statistics)
    assert count(rebuilt, "records", "") == 140.0
    assert count(rebuilt, "sex_male", "0") == 90.0
    assert gate._cdm[1] is not con
    assert len(design_tables(gate._cdm[1])) == 1
    with pytest.raises(duckdb.ConnectionException):
        con.execute("SELECT 1")
