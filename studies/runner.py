"""Running a study without federation: one node's step, the round loop, and in-process federation.

- ``local_step``: what a node does for one analysis and round (the gate calls it): open the CDM
  read-only, compile and materialise the study's cohorts, run the analysis's ``local``.
- ``drive``: the coordinator's round loop for one analysis, independent of transport: ask the
  nodes, ``combine`` (``studies.rounds.step``), repeat while the analysis asks for ``NextRound``
  and its declared rounds allow.
- ``run_local``: every analysis of a study over several DuckDB files, each file a separate node,
  results written with ``studies.results.write_results``. It is the centralised reference that
  the Flower runs must agree with.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import duckdb
import polars as pl

from omop_etl.cdm import connect
from studies.analysis import CdmContext, Finished, release_profile
from studies.canonical import study_hash
from studies.cohorts import cohort_ids, materialise_cohorts
from studies.concepts import codeset_ids, expansion_warnings
from studies.loading import load_study
from studies.model import Study
from studies.permit import DEFAULT_MIN_CELL_COUNT
from studies.results import bind_results, write_results
from studies.rounds import step

_MARK = "fedomop_materialised_study"
LOG = logging.getLogger("fedomop.studies.runner")

#: ``ask_nodes(state, round) -> {node name: statistics table}`` (see ``drive``).
AskNodes = Callable[[dict[str, Any] | None, int], Mapping[str, pl.DataFrame]]


def prepare_cdm(
    con: duckdb.DuckDBPyConnection,
    study: Study,
    cdm_name: str = "cdm",
    min_cell_count: int = DEFAULT_MIN_CELL_COUNT,
    noise_multiplier: float | None = None,
) -> CdmContext:
    """Materialise the study's cohorts on ``con`` once (re-used across rounds) as a CdmContext.

    A temp marker holds the hash of the study whose cohorts are in ``cohort``, so later rounds of
    a multi-round analysis on the same connection skip the cohort compilation. The concept sets
    resolved with them stay in ``study_codeset``; the context names their codeset ids.
    Concept sets whose descendant expansion is incomplete on this CDM are logged as warnings
    (the operator's log, never a reply: they name concepts of the node's data).
    """
    digest = study_hash(study)
    if _materialised_hash(con) != digest:
        materialise_cohorts(con, study)
        for warning in expansion_warnings(con, study.concept_sets):
            LOG.warning("%s: study %s: %s", cdm_name, study.name, warning)
        con.execute(f"CREATE OR REPLACE TEMP TABLE {_MARK} AS SELECT ? AS study_hash", [digest])
    return CdmContext(
        con=con,
        cohort_ids=cohort_ids(study),
        cdm_name=cdm_name,
        concept_sets=codeset_ids(study.concept_sets),
        min_cell_count=min_cell_count,
        noise_multiplier=noise_multiplier,
    )


def _materialised_hash(con: duckdb.DuckDBPyConnection) -> str | None:
    """The hash in the marker table, if any (results fetched in full: duckdb 2 keeps a
    half-read result open and refuses the next statement on the connection)."""
    found = con.execute(
        "SELECT count(*) FROM duckdb_tables() WHERE temporary AND table_name = ?", [_MARK]
    ).fetchall()
    if not found[0][0]:
        return None
    rows = con.execute(f"SELECT study_hash FROM {_MARK}").fetchall()
    return rows[0][0] if rows else None


def run_analysis_local(cdm: CdmContext, study: Study, analysis_id: str, state: Any) -> pl.DataFrame:
    """``REGISTRY[kind]().local`` for the analysis with this id."""
    from studies.analyses import REGISTRY

    spec = study.analysis(analysis_id)
    return REGISTRY[spec.kind]().local(cdm, spec, state)


def local_step(
    db_or_con: str | Path | duckdb.DuckDBPyConnection,
    study: Study | dict[str, Any],
    analysis_id: str,
    state: dict[str, Any] | None = None,
    cdm_name: str | None = None,
    min_cell_count: int = DEFAULT_MIN_CELL_COUNT,
    noise_multiplier: float | None = None,
) -> pl.DataFrame:
    """One node's statistics table for one analysis and round.

    ``db_or_con``: a CDM file path (opened read-only, closed afterwards) or an open connection
    (cohorts are materialised on it once per study). ``study``: a Study, or the study document
    (dict with Circe expressions inlined) as it arrives at a node. ``cdm_name`` defaults to the
    file's stem. ``min_cell_count``: the gate's effective one (``CdmContext.min_cell_count``);
    ``noise_multiplier``: the gate's for DP-SGD (``CdmContext.noise_multiplier``).
    """
    context = {"min_cell_count": min_cell_count, "noise_multiplier": noise_multiplier}
    if not isinstance(study, Study):
        study = Study.model_validate(study)
    if isinstance(db_or_con, duckdb.DuckDBPyConnection):
        cdm = prepare_cdm(db_or_con, study, cdm_name or "cdm", **context)
        return run_analysis_local(cdm, study, analysis_id, state)
    path = Path(db_or_con)
    with connect(path) as con:
        cdm = prepare_cdm(con, study, cdm_name or path.stem, **context)
        return run_analysis_local(cdm, study, analysis_id, state)


def drive(
    analysis: Any, spec: Any, ask_nodes: AskNodes, max_rounds: int | None = None
) -> pl.DataFrame:
    """Run one analysis to its result: the round loop shared by every transport.

    Round ``r`` (0, 1, ...) calls ``ask_nodes(state, r)`` (``state`` is ``None`` in round 0, then
    what ``combine`` returned in ``NextRound``); it must return the released statistics tables
    keyed by node name. ``studies.rounds.step`` pools them with the analysis's ``combine`` (the
    same step every node runs to check the next state); ``Finished`` ends the loop with its
    summarised_result, ``NextRound`` starts the next round. At most the analysis's declared
    rounds (``max_rounds`` lowers them). Raises ``RuntimeError`` when no node answers or the
    rounds run out.
    """
    limit = release_profile(analysis, spec).max_rounds
    limit = min(limit, max_rounds) if max_rounds is not None else limit
    state: dict[str, Any] | None = None
    for round_ in range(limit):
        released = ask_nodes(state, round_)
        if not released:
            raise RuntimeError(f"analysis {spec.id!r} round {round_}: no node released statistics")
        outcome = step(analysis, spec, released, state)
        if isinstance(outcome, Finished):
            return outcome.result
        state = outcome.state
    raise RuntimeError(f"analysis {spec.id!r} did not finish within {limit} rounds")


def settings_row(study: Study, spec: Any, cdm_names: list[str]) -> dict[str, Any]:
    """What produced an analysis's results, for the settings table (no permit in a local run)."""
    from importlib.metadata import (
        version,
    )  # the installed distribution, not the shell package above

    return {
        "result_type": spec.kind,
        "analysis_id": spec.id,
        "package_name": "fedomop",
        "package_version": version("fedomop"),
        "study_name": study.name,
        "study_hash": study_hash(study),
        "permit_id": None,
        "min_cell_count": None,
        "epsilon_spent": None,
        "cdm_names": ";".join(cdm_names),
        "covariate_units": covariate_units(spec),
    }


def covariate_units(spec: Any) -> str | None:
    """What one unit of each scaled covariate of a model is (``age: per 10 years, centred at
    50``), for the settings table and the report's forest plot; None for other analyses."""
    units = [
        f"{cov.term}: per {cov.scale:g} years"
        + (f", centred at {cov.center:g}" if cov.center else "")
        for cov in getattr(spec, "covariates", None) or []
        if getattr(cov, "scale", 1.0) != 1.0 or getattr(cov, "center", 0.0)
    ]
    return "; ".join(units) or None


def run_local(
    study_path: str | Path,
    db_paths: list[str | Path],
    out_dir: str | Path,
    node_names: list[str] | None = None,
    progress: Callable[[str], None] | None = None,
) -> tuple[pl.DataFrame, pl.DataFrame]:
    """Run every analysis of a study with each CDM file as a separate node; write the results.

    No privacy gate runs here (this is the exact, centralised reference): results hold the
    unsuppressed pooled estimates. Returns (summarised_result, settings) as written to
    ``out_dir`` (results.csv, settings.csv and Parquet twins).
    """
    from studies.analyses import REGISTRY

    study = load_study(study_path)
    paths = [Path(p) for p in db_paths]
    names = node_names or [p.stem for p in paths]
    if len(names) != len(paths) or len(set(names)) != len(names):
        raise ValueError(f"need one distinct node name per database, got {names} for {paths}")
    say = progress or (lambda _text: None)
    parts = []
    with ExitStack() as stack:
        cdms = {}
        for name, path in zip(names, paths, strict=True):
            con = stack.enter_context(connect(path))  # a missing file: FileNotFoundError
            say(f"node {name}: materialising cohorts")
            cdms[name] = prepare_cdm(con, study, name)
        for spec in study.analyses:
            say(f"analysis {spec.id} ({spec.kind})")

            def ask(state: dict[str, Any] | None, _round: int, spec: Any = spec) -> dict:
                return {
                    name: run_analysis_local(cdm, study, spec.id, state)
                    for name, cdm in cdms.items()
                }

            result = drive(REGISTRY[spec.kind](), spec, ask)
            parts.append((result, settings_row(study, spec, names)))
    result, settings = bind_results(parts)
    write_results(out_dir, result, settings)
    return result, settings
