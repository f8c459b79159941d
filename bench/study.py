"""Benchmark a study at scale: one CDM file of N persons versus the same persons over K node files.

The study (``STUDY``) has a cohort of NSAID new users described by ``characterization`` and a
logistic ``glm`` of GI bleeding over everyone observed (age, sex, NSAID use). It runs in-process
through ``studies.runner`` (``prepare_cdm`` per node, ``drive`` with the analyses' ``combine``),
first on the single file, then on the K node files one node after another. Printed JSON: seconds
per phase (cohort materialisation, characterization local + combine, GLM rounds), for single and
split, the ratio split/single, and the GLM coefficients of both (they must agree: exact pooling).

Data: the Synthea generator + loader need ~20 minutes for 1M persons on 2 cores, so the CDM
tables are built here with set-based DuckDB SQL: ``range()`` over person ids and values drawn
from ``hash(person_id, tag, record, seed)``. A person's records depend only on their id and the
seed, so the single file and the node files (contiguous person-id ranges) hold the same persons.
Concepts come from the shipped vocabulary, so the study's concept sets resolve as on a real node.
Data build time is reported on its own and is not part of the ratio.

    .venv/bin/python bench/study.py                       # 1M persons, 10 nodes
    .venv/bin/python bench/study.py --quick               # 50k persons smoke run
    .venv/bin/python bench/study.py --workdir /tmp/bench  # keep (and reuse) the built files
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import duckdb
import polars as pl

#: Bump when the generated data changes, so --workdir rebuilds instead of reusing stale files.
DATA_VERSION = 1
TYPE_EHR = 32817
NSAID_PRODUCTS = (1118088, 40162359, 19078461)  # celecoxib, diclofenac, ibuprofen products
GI_BLEED = 192671

STUDY: dict[str, Any] = {
    "schema_version": 1,
    "name": "bench_nsaid_gi_bleed",
    "concept_sets": [
        {"name": "nsaids", "concepts": list(NSAID_PRODUCTS)},
        {"name": "gi_bleed", "concepts": [GI_BLEED], "include_descendants": True},
    ],
    "cohorts": [
        {
            "name": "nsaid_users",
            "entry": {"domain": "drug", "concept_set": "nsaids"},
            "inclusion": {"prior_observation_days": 365},
        },
        {"name": "observed", "entry": {"domain": "observation_period"}},
        {
            "name": "gi_bleed",
            "entry": {"domain": "condition", "concept_set": "gi_bleed", "events": "all"},
            "exit": {"type": "fixed_offset", "anchor": "end"},
        },
    ],
    "analyses": [
        {
            "id": "baseline",
            "kind": "characterization",
            "cohorts": ["nsaid_users"],
            "window": {"start": -365, "end": -1},
            "domains": ["condition", "drug", "procedure", "measurement"],
            "top_n": 10,
        },
        {
            "id": "bleed_risk",
            "kind": "glm",
            "family": "binomial",
            "cohort": "observed",
            "outcome": "gi_bleed",
            "outcome_window": {"start": 0, "end": 3650},
            "covariates": [
                {"type": "age", "center": 50, "scale": 10},
                {"type": "sex"},
                {"type": "cohort", "cohort": "nsaid_users", "window": {"start": 0, "end": 3650}},
            ],
        },
    ],
}


# ---------------------------------------------------------------- data build


@dataclass(frozen=True)
class EventTable:
    """A CDM event table filled with ``0..2*mean`` random records per person (uniform count),
    concepts drawn (skewed towards the first) from the vocabulary's standard concepts of
    ``domain``, dates uniform within the person's observation period."""

    table: str
    domain: str
    mean: int
    id: str
    concept: str
    date: str
    type: str
    extra: str = ""  # more columns, over ``event_date`` and a uniform ``v``


EVENT_TABLES = (
    EventTable(
        "condition_occurrence", "Condition", 10, "condition_occurrence_id",
        "condition_concept_id", "condition_start_date", "condition_type_concept_id",
        ", event_date + 1 + CAST(floor(v * 30) AS INTEGER) AS condition_end_date",
    ),
    EventTable(
        "drug_exposure", "Drug", 8, "drug_exposure_id", "drug_concept_id",
        "drug_exposure_start_date", "drug_type_concept_id",
        ", event_date + CAST(floor(v * 60) AS INTEGER) AS drug_exposure_end_date",
    ),
    EventTable(
        "procedure_occurrence", "Procedure", 6, "procedure_occurrence_id",
        "procedure_concept_id", "procedure_date", "procedure_type_concept_id",
    ),
    EventTable(
        "measurement", "Measurement", 12, "measurement_id", "measurement_concept_id",
        "measurement_date", "measurement_type_concept_id",
        ", round(v * 200, 1) AS value_as_number",
    ),
)  # fmt: skip

#: Record numbers (``j``) of the planted NSAID exposures; random records use 0..2*mean < 40.
NSAID_RECORD = 40


def _persons_sql(first: int, stop: int) -> str:
    """Persons ``first..stop-1``: sex, birth, one observation period (2005-2024), NSAID use
    (25 %) and GI bleed risk rising with age, male sex and NSAID use."""
    return f"""
        CREATE TEMP TABLE bench_person AS
        WITH base AS (
            SELECT person_id,
                   CASE WHEN u(person_id, 1, 0) < 0.5 THEN 8507 ELSE 8532 END AS gender_concept_id,
                   1925 + CAST(floor(u(person_id, 2, 0) * 80) AS INTEGER) AS year_of_birth,
                   1 + CAST(floor(u(person_id, 2, 1) * 12) AS INTEGER) AS month_of_birth,
                   1 + CAST(floor(u(person_id, 2, 2) * 28) AS INTEGER) AS day_of_birth,
                   DATE '2005-01-01' + CAST(floor(u(person_id, 3, 0) * 3650) AS INTEGER)
                       AS obs_start,
                   365 + CAST(floor(u(person_id, 3, 1) * 3650) AS INTEGER) AS obs_length,
                   u(person_id, 4, 0) < 0.25 AS nsaid_user
            FROM range({int(first)}, {int(stop)}) r(person_id)
        )
        SELECT *,
               CAST(least(obs_start + obs_length, DATE '2024-12-31') - obs_start AS INTEGER)
                   AS obs_days,
               u(person_id, 5, 0) < 1 / (1 + exp(-(-3.5 + 0.035 * (2015 - year_of_birth - 50)
                   + CASE WHEN gender_concept_id = 8507 THEN 0.3 ELSE 0 END
                   + CASE WHEN nsaid_user THEN 0.9 ELSE 0 END))) AS gi_bleed
        FROM base
    """


def _event_sql(spec: EventTable, tag: int) -> str:
    """INSERT of one event table's random records for every person in ``bench_person``."""
    return f"""
        INSERT INTO {spec.table} BY NAME
        WITH records AS (
            SELECT person_id, obs_start, obs_days,
                   unnest(range(CAST(floor(u(person_id, {tag}, 0) * {2 * spec.mean + 1})
                                AS BIGINT))) AS j
            FROM bench_person
        ),
        drawn AS (
            SELECT person_id, j,
                   obs_start + CAST(floor(u(person_id, {tag}, j + 1) * (obs_days + 1)) AS INTEGER)
                       AS event_date,
                   CAST(floor(pow(u(person_id, {tag + 1}, j), 2) * n) AS BIGINT) AS k,
                   u(person_id, {tag + 2}, j) AS v
            FROM records, (SELECT count(*) AS n FROM bench_pool WHERE domain_id = '{spec.domain}')
        )
        SELECT person_id * 64 + j AS {spec.id}, person_id, pool.concept_id AS {spec.concept},
               event_date AS {spec.date}, {TYPE_EHR} AS {spec.type} {spec.extra}
        FROM drawn JOIN bench_pool pool ON pool.domain_id = '{spec.domain}' AND pool.k = drawn.k
    """


PLANTED_SQL = f"""
    INSERT INTO person BY NAME
    SELECT person_id, gender_concept_id, year_of_birth, month_of_birth, day_of_birth,
           0 AS race_concept_id, 0 AS ethnicity_concept_id
    FROM bench_person;
    INSERT INTO observation_period BY NAME
    SELECT person_id AS observation_period_id, person_id,
           obs_start AS observation_period_start_date,
           obs_start + obs_days AS observation_period_end_date,
           {TYPE_EHR} AS period_type_concept_id
    FROM bench_person;
    INSERT INTO drug_exposure BY NAME
    WITH exposures AS (
        SELECT person_id, obs_start, obs_days,
               {NSAID_RECORD} + unnest(range(1 + CAST(floor(u(person_id, 6, 0) * 4) AS BIGINT)))
                   AS j
        FROM bench_person WHERE nsaid_user
    )
    SELECT person_id * 64 + j AS drug_exposure_id, person_id,
           list_extract({list(NSAID_PRODUCTS)},
                        1 + CAST(floor(u(person_id, 6, 1) * {len(NSAID_PRODUCTS)}) AS INTEGER))
               AS drug_concept_id,
           obs_start + CAST(floor(u(person_id, 6, j) * (obs_days + 1)) AS INTEGER)
               AS drug_exposure_start_date,
           drug_exposure_start_date + 30 AS drug_exposure_end_date,
           {TYPE_EHR} AS drug_type_concept_id
    FROM exposures;
    INSERT INTO condition_occurrence BY NAME
    SELECT person_id * 64 + 63 AS condition_occurrence_id, person_id,
           {GI_BLEED} AS condition_concept_id,
           obs_start + CAST(floor(u(person_id, 7, 0) * (obs_days + 1)) AS INTEGER)
               AS condition_start_date,
           {TYPE_EHR} AS condition_type_concept_id
    FROM bench_person WHERE gi_bleed;
"""


def build_vocabulary(path: Path) -> None:
    """The shipped vocabulary in a DuckDB file that each CDM file copies from."""
    from omop_etl.build import atomic_build
    from omop_etl.schema import create_cdm_schema
    from omop_etl.vocab import default_vocabulary_dir, load_vocabulary

    with atomic_build(path) as con:
        create_cdm_schema(con, indexes=False)
        load_vocabulary(con, default_vocabulary_dir())


def build_cdm(path: Path, vocabulary: Path, first: int, stop: int, seed: int) -> None:
    """A CDM file holding persons ``first..stop-1`` (same records whichever file holds them)."""
    from omop_etl.build import atomic_build
    from omop_etl.schema import create_cdm_indexes, create_cdm_schema, vocabulary_tables

    with atomic_build(path) as con:
        create_cdm_schema(con, indexes=False)
        con.execute(f"ATTACH '{vocabulary}' AS vocab (READ_ONLY)")
        for table in vocabulary_tables():
            con.execute(f"INSERT INTO {table} SELECT * FROM vocab.{table}")
        con.execute("DETACH vocab")
        con.execute(
            "CREATE TEMP MACRO u(a, b, c) AS "
            f"CAST(hash(a, b, c, {int(seed)}) >> 11 AS DOUBLE) / 9007199254740992.0"
        )
        excluded = [*NSAID_PRODUCTS, GI_BLEED]
        con.execute(
            "CREATE TEMP TABLE bench_pool AS SELECT domain_id, concept_id, "
            "row_number() OVER (PARTITION BY domain_id ORDER BY concept_id) - 1 AS k "
            "FROM concept WHERE standard_concept = 'S' AND NOT list_contains(?, concept_id)",
            [excluded],
        )
        con.execute(_persons_sql(first, stop))
        con.execute(PLANTED_SQL)
        for i, spec in enumerate(EVENT_TABLES):
            con.execute(_event_sql(spec, 10 * (i + 1)))
        create_cdm_indexes(con)


def node_ranges(persons: int, nodes: int) -> list[tuple[int, int]]:
    """Contiguous person-id ranges ``[first, stop)`` of ids 1..persons, one per node."""
    cuts = [1 + persons * k // nodes for k in range(nodes + 1)]
    return list(zip(cuts, cuts[1:], strict=False))


def build(workdir: Path, persons: int, nodes: int, seed: int, say: Callable[[str], None]) -> dict:
    """Build (or reuse) single.duckdb and node_01..K.duckdb in ``workdir``; seconds per part."""
    manifest = workdir / "manifest.json"
    wanted = {"data_version": DATA_VERSION, "persons": persons, "nodes": nodes, "seed": seed}
    if manifest.is_file() and json.loads(manifest.read_text()) == wanted:
        return {"reused": True}
    workdir.mkdir(parents=True, exist_ok=True)
    manifest.unlink(missing_ok=True)
    seconds: dict[str, Any] = {"reused": False}
    vocabulary = workdir / "vocabulary.duckdb"
    started = time.perf_counter()
    build_vocabulary(vocabulary)
    seconds["vocabulary"] = time.perf_counter() - started
    say(f"building single.duckdb ({persons:,} persons)")
    started = time.perf_counter()
    build_cdm(workdir / "single.duckdb", vocabulary, 1, persons + 1, seed)
    seconds["single"] = time.perf_counter() - started
    started = time.perf_counter()
    for k, (first, stop) in enumerate(node_ranges(persons, nodes), start=1):
        say(f"building node_{k:02d}.duckdb (persons {first:,} to {stop - 1:,})")
        build_cdm(workdir / f"node_{k:02d}.duckdb", vocabulary, first, stop, seed)
    seconds["split"] = time.perf_counter() - started
    manifest.write_text(json.dumps(wanted))
    return seconds


# ---------------------------------------------------------------- study run


class Clocked:
    """An analysis whose ``combine`` time is added up (``drive`` calls it once per round)."""

    def __init__(self, analysis: Any) -> None:
        self.analysis = analysis
        self.seconds = 0.0

    def profile(self, spec: Any) -> Any:
        """The wrapped analysis's declared rounds (``drive`` reads them)."""
        from studies.analysis import release_profile

        return release_profile(self.analysis, spec)

    def combine(self, *args: Any) -> Any:
        started = time.perf_counter()
        try:
            return self.analysis.combine(*args)
        finally:
            self.seconds += time.perf_counter() - started


def run_study(paths: list[Path], study: Any) -> tuple[dict, dict[str, pl.DataFrame]]:
    """Run every analysis of ``study`` with each file as a node; seconds per phase and results.

    Nodes run one after another in this process; ``*_slowest_node`` is what the phase would
    take if the nodes computed in parallel, as they do in a federation. ``cpu_seconds`` (all
    DuckDB threads of this process) shows the work apart from waiting on a shared machine.
    """
    from omop_etl.cdm import connect
    from studies.runner import prepare_cdm

    timings: dict[str, Any] = {}
    cpu: dict[str, float] = {}
    results: dict[str, pl.DataFrame] = {}
    with ExitStack() as stack:
        cdms, cohort_seconds = {}, []
        cpu_started = time.process_time()
        for path in paths:
            con = stack.enter_context(connect(path))
            started = time.perf_counter()
            cdms[path.stem] = prepare_cdm(con, study, path.stem)
            cohort_seconds.append(time.perf_counter() - started)
        cpu["cohorts"] = time.process_time() - cpu_started
        timings["cohorts"] = sum(cohort_seconds)
        timings["cohorts_slowest_node"] = max(cohort_seconds)
        for spec in study.analyses:
            cpu_started = time.process_time()
            results[spec.kind], timings[spec.kind] = _run_analysis(cdms, study, spec)
            cpu[spec.kind] = time.process_time() - cpu_started
        timings["cohort_rows"] = _cohort_rows(cdms, study)
    timings["cohorts_plus_characterization"] = (
        timings["cohorts"] + timings["characterization"]["total"]
    )
    timings["cpu_seconds"] = cpu | {
        "cohorts_plus_characterization": cpu["cohorts"] + cpu["characterization"]
    }
    return timings, results


def _run_analysis(cdms: dict[str, Any], study: Any, spec: Any) -> tuple[pl.DataFrame, dict]:
    """One analysis through ``drive`` over the nodes' contexts; its result and seconds."""
    from studies.analyses import REGISTRY
    from studies.runner import drive, run_analysis_local

    node_seconds = dict.fromkeys(cdms, 0.0)
    rounds = 0

    def ask(state: dict | None, _round: int) -> dict[str, pl.DataFrame]:
        nonlocal rounds
        rounds += 1
        released = {}
        for name, cdm in cdms.items():
            started = time.perf_counter()
            released[name] = run_analysis_local(cdm, study, spec.id, state)
            node_seconds[name] += time.perf_counter() - started
        return released

    analysis = Clocked(REGISTRY[spec.kind]())
    started = time.perf_counter()
    result = drive(analysis, spec, ask)
    total = time.perf_counter() - started
    timings = {
        "local": sum(node_seconds.values()),
        "local_slowest_node": max(node_seconds.values()),
        "combine": analysis.seconds,
        "total": total,
    }
    if rounds > 1:
        timings |= {"rounds": rounds, "seconds_per_round": total / rounds}
    return result, timings


def repeated(times: int, paths: list[Path], study: Any) -> tuple[dict, dict[str, pl.DataFrame]]:
    """``run_study`` ``times`` times (fresh connections each time, as a node opens its file per
    request); the median of each timing, the results of the last run."""
    runs = [run_study(paths, study) for _ in range(times)]
    return _median([timings for timings, _ in runs]), runs[-1][1]


def _median(runs: list[Any]) -> Any:
    """Per-key median of equally shaped nested dicts of numbers (counts stay integers)."""
    if isinstance(runs[0], dict):
        return {key: _median([run[key] for run in runs]) for key in runs[0]}
    if all(isinstance(value, int) for value in runs):
        return statistics.median_low(runs)
    return statistics.median(runs)


def _cohort_rows(cdms: dict[str, Any], study: Any) -> dict[str, int]:
    """Entries per cohort, summed over the nodes."""
    rows = dict.fromkeys((cohort.name for cohort in study.cohorts), 0)
    for cdm in cdms.values():
        for name, cohort_id in cdm.cohort_ids.items():
            rows[name] += cdm.con.execute(
                "SELECT count(*) FROM cohort WHERE cohort_definition_id = ?", [cohort_id]
            ).fetchone()[0]
    return rows


def glm_coefficients(result: pl.DataFrame) -> dict[str, float]:
    """Term -> fitted coefficient from the glm summarised_result (values round-trip)."""
    rows = result.filter(pl.col("estimate_name") == "coefficient")
    return {r["variable_name"]: float(r["estimate_value"]) for r in rows.iter_rows(named=True)}


def integer_estimates(result: pl.DataFrame) -> pl.DataFrame:
    """The count estimates of a result, sorted: equal single vs split when pooling is exact."""
    return (
        result.filter(pl.col("estimate_type") == "integer")
        .drop("cdm_name", strict=False)
        .sort(pl.all())
    )


def _rounded(value: Any) -> Any:
    if isinstance(value, float):
        return round(value, 4)
    if isinstance(value, dict):
        return {k: _rounded(v) for k, v in value.items()}
    return value


def _ratios(single: dict, split: dict) -> dict[str, float]:
    pairs = {
        "cohorts": (single["cohorts"], split["cohorts"]),
        "characterization": (
            single["characterization"]["total"],
            split["characterization"]["total"],
        ),
        "cohorts_plus_characterization": (
            single["cohorts_plus_characterization"],
            split["cohorts_plus_characterization"],
        ),
        "glm": (single["glm"]["total"], split["glm"]["total"]),
    }
    return {name: b / a for name, (a, b) in pairs.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--persons", type=int, help="default 1,000,000 (50,000 with --quick)")
    parser.add_argument("--nodes", type=int, default=10)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--workdir", type=Path, help="keep the built files here and reuse them")
    parser.add_argument("--quick", action="store_true", help="smoke run: 50,000 persons")
    parser.add_argument("--repeat", type=int, default=3, help="runs per layout; medians reported")
    args = parser.parse_args()
    persons = args.persons or (50_000 if args.quick else 1_000_000)
    if args.repeat < 1:
        parser.error("--repeat must be at least 1")
    if persons < args.nodes or args.nodes < 1:
        parser.error(f"need at least one person per node ({persons} persons, {args.nodes} nodes)")

    from rich.console import Console

    from omop_etl.cdm import connect
    from studies.loading import study_from_data

    console = Console(stderr=True)
    study = study_from_data(STUDY)
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="fedomop-bench-study-"))
    try:
        built = build(workdir, persons, args.nodes, args.seed, console.log)
        duckdb.sql("SELECT 1").pl()  # load the Arrow bridge once: an import, not a study cost
        console.log(f"running the study on single.duckdb ({args.repeat} times)")
        single, single_results = repeated(args.repeat, [workdir / "single.duckdb"], study)
        console.log(f"running the study on {args.nodes} node files ({args.repeat} times)")
        nodes = [workdir / f"node_{k:02d}.duckdb" for k in range(1, args.nodes + 1)]
        split, split_results = repeated(args.repeat, nodes, study)
        with connect(workdir / "single.duckdb") as con:
            threads = con.execute("SELECT current_setting('threads')").fetchone()[0]
            rows = {
                table: con.execute(f"SELECT count(*) FROM {table}").fetchone()[0]
                for table in ("person", *(spec.table for spec in EVENT_TABLES))
            }
    finally:
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)
    single_beta = glm_coefficients(single_results["glm"])
    split_beta = glm_coefficients(split_results["glm"])
    report = {
        "persons": persons,
        "nodes": args.nodes,
        "seed": args.seed,
        "repeat": args.repeat,
        "cpus": len(os.sched_getaffinity(0)),
        "duckdb_threads": threads,
        "load_average_1min": round(os.getloadavg()[0], 2),
        "cdm_rows": rows,
        "cohort_rows": single["cohort_rows"],
        "cohort_rows_equal": single.pop("cohort_rows") == split.pop("cohort_rows"),
        "build_seconds": _rounded(built),
        "single": _rounded(single),
        "split": _rounded(split),
        "ratio_split_over_single": _rounded(_ratios(single, split)),
        "target_cohorts_plus_characterization_under_2s": single["cohorts_plus_characterization"]
        < 2.0,
        "glm_coefficients": {"single": single_beta, "split": split_beta},
        "glm_max_abs_difference": max(abs(single_beta[t] - split_beta[t]) for t in single_beta),
        "characterization_counts_equal": integer_estimates(
            single_results["characterization"]
        ).equals(integer_estimates(split_results["characterization"])),
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
