"""The released time axis of Cox and Kaplan–Meier (``studies.analyses.time_axis``), attacked.

A generated node (a real OMOP CDM through the real gate) holds one man whose GI bleed is the
only event on its day. The attacks of issue 9 (a coordinator's grid ``[t]`` or ``[t, t+1]`` and a
chosen beta) and of issue 10 (time points as data, one leaver between two released times) are
tests that fail if a released value depends on his day beyond its declared bin, or if any node
shows 1..k-1 events, censorings or leavers between two released times. The honest path: the
in-process reference and Flower simulation give the same numbers.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import duckdb
import numpy as np
import polars as pl
import pytest
from _helpers import (
    RA_BLEED_COHORTS,
    RA_BLEED_CONCEPT_SETS,
    gated_rounds,
    signed_permit,
    write_node_policy,
    write_node_setup,
)
from _helpers import write_ra_bleed_cdm as write_cdm

from node.gate import Gate
from node.messages import GateRequest
from node.policy import load_policy
from privacy.secagg import identity_public_hex
from studies.analyses import REGISTRY
from studies.analyses.time_axis import TIME_VARIABLE, merged_grid, segment_ends, to_grid
from studies.analysis import CdmContext, CombineInput, NextRound
from studies.canonical import study_hash
from studies.loading import study_from_data
from studies.permit import PermitAnalysis, generate_keypair, load_private_key
from studies.results import ESTIMATE_KEYS
from studies.runner import drive, local_step

K = 10
#: Days after entry (2012-01-01) of the one man's bleed: two days in the declared bin (1980, 2010].
HIS_DAYS = (1983, 1997)
STUDY: dict[str, Any] = {
    "name": "time_axis_attack",
    "concept_sets": RA_BLEED_CONCEPT_SETS,
    "cohorts": RA_BLEED_COHORTS,
    "analyses": [
        {
            "id": "hazard",
            "kind": "cox",
            "cohort": "population",
            "outcome": "bleed",
            "time_bin_days": 30,
            "covariates": [{"type": "age", "center": 50, "scale": 10}, {"type": "sex"}],
        },
        {
            "id": "km",
            "kind": "survival",
            "target_cohorts": ["population"],
            "outcome": "bleed",
            "time_bin_days": 30,
            "strata": ["sex"],
        },
    ],
}


def attack_cdm(path: Path, his_day: int, persons: int = 400, first: int = 1) -> Path:
    """A node: everyone enters on 2012-01-01; 40 % bleed on days 1..1500 spread by id, the
    others are censored at observation ends spread over 2013-2020; person ``first`` (a man
    born 1931) bleeds on ``his_day``, a day no one else has."""
    ids = range(first, first + persons)
    people = pl.DataFrame({"person_id": list(ids)}).with_columns(
        gender_concept_id=pl.when(pl.col("person_id") % 2 == 1).then(8507).otherwise(8532),
        year_of_birth=1930 + (pl.col("person_id") * 7) % 60,
        bleed=pl.col("person_id") % 5 < 2,
    )
    people = people.with_columns(
        year_of_birth=pl.when(pl.col("person_id") == first).then(1931).otherwise("year_of_birth"),
        bleed=pl.col("bleed") | (pl.col("person_id") == first),
    )
    write_cdm(path, people)
    con = duckdb.connect(str(path))
    con.execute(
        "UPDATE condition_occurrence SET condition_start_date = "
        "DATE '2012-01-01' + CAST((person_id * 37) % 1500 + 1 AS INTEGER) "
        "WHERE condition_concept_id = 192671"
    )
    con.execute(
        "UPDATE observation_period SET observation_period_end_date = "
        "DATE '2013-01-01' + CAST((person_id * 53) % 2900 AS INTEGER)"
    )
    con.execute(
        "UPDATE condition_occurrence SET condition_start_date = DATE '2012-01-01' + $day "
        "WHERE condition_concept_id = 192671 AND person_id = $first",
        {"day": his_day, "first": first},
    )
    con.execute(
        "UPDATE observation_period SET observation_period_end_date = DATE '2020-12-31' "
        "WHERE person_id = $first",
        {"first": first},
    )
    con.close()
    return path


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A permit body, and the node's CDM with his bleed on each of the two days."""
    root = tmp_path_factory.mktemp("time_axis")
    private, public, _ = generate_keypair(root / "keys", "permit_body")
    cdms = {day: attack_cdm(root / f"day{day}.duckdb", day) for day in HIS_DAYS}
    secrets = {"node-a": bytes(range(32)), "node-b": bytes(range(1, 33))}
    return {
        "root": root,
        "key": load_private_key(private),
        "pub": public,
        "cdms": cdms,
        "secrets": secrets,
    }


def gate_for(world: dict[str, Any], folder: str, cdm: Path, **privacy: Any) -> Gate:
    """Node-a's gate on ``cdm`` (a lone node: rounds may build on its own release)."""
    settings = {
        "min_cell_count": K,
        "max_epsilon_per_permit": 5.0,
        "max_epsilon_per_year": 50.0,
        "min_nodes": 1,
    }
    policy = write_node_setup(world["root"] / folder, world, cdm=cdm, privacy=settings | privacy)
    return Gate(load_policy(policy))


def permit(world: dict[str, Any], study: dict[str, Any] = STUDY) -> dict[str, Any]:
    return signed_permit(
        world["key"],
        study_hash=study_hash(study_from_data(study)),
        study_name=study["name"],
        nodes=["node-a", "node-b"],
        analyses=[PermitAnalysis(id=a["id"]) for a in study["analyses"]],
        epsilon=1.0,
        purpose="attacking the time axis",
        node_keys={name: identity_public_hex(key) for name, key in world["secrets"].items()},
    )


def released_rounds(gate: Gate, document: dict, analysis_id: str) -> tuple[list, pl.DataFrame]:
    """Every released table of the honest run over this one node (transcripts as a
    coordinator sends them), and the result."""
    spec = study_from_data(STUDY).analysis(analysis_id)
    ask = gated_rounds({"node-a": gate}, STUDY, document, analysis_id)
    tables: list[pl.DataFrame] = []

    def keep(state: dict | None, round_: int) -> dict[str, pl.DataFrame]:
        released = ask(state, round_)
        tables.append(released["node-a"])
        return released

    return tables, drive(REGISTRY[spec.kind](), spec, keep)


def assert_no_small_leavers(table: pl.DataFrame, k: int = K) -> None:
    """Every released per-time count 0 or >= k, and so is every difference of numbers at risk
    between two released times (the persons who left the risk set in between)."""
    time = table.filter(pl.col("variable_name") == TIME_VARIABLE)
    counts = time.filter(pl.col("release_class") == "count")["value"].to_numpy()
    assert np.all((counts == 0) | (counts >= k)), counts
    risk = time.filter(pl.col("estimate_name") == "n_risk")
    if risk.height:
        by_time = risk.sort(pl.col("variable_level").cast(pl.Int64))["value"].to_numpy()
        records = table.filter(pl.col("variable_name") == "records")["value"].item()
        leavers = -np.diff(np.r_[records, by_time, 0.0])
        assert np.all((leavers == 0) | (leavers >= k)), leavers


@pytest.mark.parametrize("analysis_id", ["hazard", "km"])
def test_one_event_day_moves_no_released_value(world, analysis_id) -> None:
    """His bleed on day 1983 or 1997 (one declared bin): every release of the honest run, every
    round, and the result are identical, and none shows 1..9 leavers between two times."""
    document = permit(world)
    runs = [
        released_rounds(gate_for(world, f"{analysis_id}{d}", cdm), document, analysis_id)
        for d, cdm in world["cdms"].items()
    ]
    (tables_a, result_a), (tables_b, result_b) = runs
    assert len(tables_a) == len(tables_b) >= 1
    for a, b in zip(tables_a, tables_b, strict=True):
        assert a.equals(b)
        assert_no_small_leavers(a)
    assert result_a.equals(result_b)
    for table in tables_a:  # no time key of a withheld (small) cell: nothing was suppressed
        time = table.filter(pl.col("variable_name") == TIME_VARIABLE)
        assert time.height and not time["value"].is_nan().any()
        assert all(int(t) % 30 == 0 for t in time["variable_level"])  # declared bin ends only


HOSTILE_GRIDS = [[2010], [1980, 2010], [2010, 2040], [1983, 1984], [30 * j for j in range(1, 200)]]


@pytest.mark.parametrize("grid", HOSTILE_GRIDS)
def test_coordinator_grid_and_beta_are_refused(world, grid) -> None:
    """Issue 9's attack: a round-1 state with a grid around his bin and a chosen beta. Through
    the gate it is refused (the state is not the one the transcript gives, nothing leaves); and
    the analysis itself refuses it on the node's own segments, whatever the transcript says."""
    cdm = world["cdms"][HIS_DAYS[0]]
    gate = gate_for(world, "hostile", cdm)
    document = permit(world)
    assert gate.handle(GateRequest(STUDY, document, "hazard", None, 0)).released
    state = {"grid": grid, "events": [1.0] * len(grid), "beta": [30.0, 5.0], "iteration": 0}
    reply = gate.handle(GateRequest(STUDY, document, "hazard", state, 1))
    assert not reply.released and not reply.statistics
    with pytest.raises(ValueError, match="state grid"):
        local_step(cdm, study_from_data(STUDY), "hazard", state)


def test_honest_grid_is_the_nodes_own_segments_and_answers(world) -> None:
    """The grid combine derives from round 0 is one the node answers on; a grid that merges
    its segments further is answered too (merging keeps 0 or >= k), one splitting them not."""
    study = study_from_data(STUDY)
    cdm = world["cdms"][HIS_DAYS[0]]
    first = local_step(cdm, study, "hazard")
    step = REGISTRY["cox"]().combine(
        CombineInput([first], ["node-a"]), study.analysis("hazard"), None
    )
    assert isinstance(step, NextRound)
    grid = step.state["grid"]
    assert len(grid) >= 3
    for honest in (grid, grid[1:]):
        state = step.state | {"grid": honest, "events": [1.0] * len(honest)}
        assert_no_small_leavers(local_step(cdm, study, "hazard", state))
    inside = next(t for t in range(grid[0] + 30, grid[1], 30))  # inside his node's segment
    with pytest.raises(ValueError, match="cuts 1 of this node's released segments"):
        local_step(cdm, study, "hazard", step.state | {"grid": sorted([inside, *grid])})


def test_policy_refuses_bins_narrower_than_its_minimum(world) -> None:
    """Daily bins are refused by the default policy (30 days), naming both widths; a node
    that allows 7-day bins answers 7-day bins."""
    study = {
        **STUDY,
        "analyses": [{**a, "time_bin_days": 7} for a in STUDY["analyses"]],
    }
    document = permit(world, study)
    gate = gate_for(world, "strict", world["cdms"][HIS_DAYS[0]])
    for analysis_id in ("hazard", "km"):
        reply = gate.handle(GateRequest(study, document, analysis_id, None, 0))
        assert not reply.released
        assert "cuts a time bin of 7 day(s); this node's policy allows no less than 30" in (
            reply.reason
        )
    lenient = gate_for(world, "lenient", world["cdms"][HIS_DAYS[0]], min_time_bin_days=7)
    assert lenient.handle(GateRequest(study, document, "km", None, 0)).released


# --- the rule itself: random nodes, every merged bin 0 or >= k at every node ------------------


def random_bins(rng: np.random.Generator, series: int, size: int) -> pl.DataFrame:
    days = rng.integers(0, 1500, size)
    return pl.DataFrame(
        {
            "series": rng.integers(0, series, size),
            "t": np.ceil(days / 30).astype(int) * 30,
            "n_event": rng.integers(0, 2, size),
            "n_censor": rng.integers(0, 2, size),
        }
    ).filter((pl.col("n_event") + pl.col("n_censor")) > 0)
    # (the released pair is n_event and n_leave; their difference is n_censor)


@pytest.mark.parametrize("k", [10, 25])
def test_every_node_has_zero_or_k_per_merged_bin(k) -> None:
    """Random nodes of different sizes and policies' k: the merged grid keeps every node's
    events and censorings per series and merged bin at 0 or >= its k; same input, same grid."""
    rng = np.random.default_rng(20261206)
    for _ in range(30):
        nodes = [
            random_bins(rng, int(rng.integers(1, 4)), int(rng.integers(20, 900))) for _ in "abc"
        ]
        ks = [k, K, k]
        ends = [segment_ends(b, kk, 30) for b, kk in zip(nodes, ks, strict=True)]
        grid = merged_grid(ends)
        assert grid == merged_grid([list(reversed(e)) for e in ends])  # order-free rule
        for bins, kk in zip(nodes, ks, strict=True):
            position = np.searchsorted(grid, bins["t"].to_numpy(), side="left")
            per_bin = (
                bins.with_columns(pl.Series("g", np.asarray(grid)[position]))
                .group_by("series", "g")
                .agg(pl.col("n_event").sum(), pl.col("n_censor").sum())
            )
            whole_axis = len(segment_ends(bins, kk, 30)) == 1
            values = np.r_[per_bin["n_event"].to_numpy(), per_bin["n_censor"].to_numpy()]
            assert whole_axis or np.all((values == 0) | (values >= kk)), values


def test_to_grid_sums_segments_and_keeps_withheld_ones_withheld() -> None:
    rows = pl.DataFrame(
        {
            "variable_name": [TIME_VARIABLE] * 3,
            "variable_level": ["30", "60", "90"],
            "estimate_name": ["n_event"] * 3,
            "value": [10.0, 12.0, math.nan],
        }
    )
    merged = to_grid(rows, [60, 90]).sort("variable_level")
    assert merged["variable_level"].to_list() == ["60", "90"]
    assert merged["value"][0] == 22.0 and math.isnan(merged["value"][1])


def test_stricter_node_releases_coarser_segments(analysis_node_dbs, open_analysis_cdm) -> None:
    """A node whose gate has k = 25 shapes its segments for 25: no count 1..24 leaves it."""
    analysis = REGISTRY["survival"]()
    spec = analysis.Spec.model_validate(
        {"id": "km", "kind": "survival", "target_cohorts": ["population"], "outcome": "outcome"}
    )
    opened = open_analysis_cdm(analysis_node_dbs["nodes"][2])
    strict = CdmContext(con=opened.con, cohort_ids=opened.cohort_ids, min_cell_count=25)
    table = analysis.local(strict, spec, None)
    assert_no_small_leavers(table, k=25)
    assert table.filter(pl.col("variable_name") == TIME_VARIABLE).height >= 4


# --- the honest path: the in-process reference and Flower simulation agree --------------------


@pytest.mark.slow
def test_run_local_and_flower_simulation_give_the_same_numbers(tmp_path: Path) -> None:
    """Three generated nodes (different sizes, each with its own one-day man): Cox and KM over
    Flower simulation through the real gates equal ``run_local``'s, to the last digit."""
    import yaml
    from typer.testing import CliRunner

    from coordinator.demo import issue_permit, make_permit_body, node_identities
    from coordinator.simulation import write_nodes_toml
    from fedomop.cli import app
    from studies.loading import load_study
    from studies.runner import run_local

    names = ["north", "south", "east"]
    sizes = [(400, 1, 1983), (300, 10_001, 1200), (500, 20_001, 2500)]
    cdms = [
        attack_cdm(tmp_path / f"{n}.duckdb", day, persons, first)
        for n, (persons, first, day) in zip(names, sizes, strict=True)
    ]
    study_path = tmp_path / "study.yaml"
    study_path.write_text(yaml.safe_dump(STUDY, sort_keys=False))
    keys = make_permit_body(tmp_path / "permit_body")
    policies = [
        write_node_policy(
            tmp_path / n, name=n, cdm=cdm, permit_body_key=keys.public, privacy={}, allowed=["*"]
        )
        for n, cdm in zip(names, cdms, strict=True)
    ]
    identities = node_identities(policies)
    issue_permit(
        load_study(study_path), names, keys.private, tmp_path / "permit.json", node_keys=identities
    )
    nodes = write_nodes_toml(tmp_path / "nodes.toml", policies)
    out = tmp_path / "fed"
    run = CliRunner().invoke(
        app,
        ["run", str(study_path), "--permit", str(tmp_path / "permit.json"),
         "--simulation", str(nodes), "--out", str(out)],
    )  # fmt: skip
    assert run.exit_code == 0, run.output
    reference, _ = run_local(study_path, cdms, tmp_path / "ref", node_names=names)
    fed = pl.read_csv(out / "results.csv", infer_schema=False)
    ref = reference.with_columns(pl.col("result_id").cast(pl.String))
    joined = fed.filter(pl.col("cdm_name") == "federated").join(
        ref.filter(pl.col("cdm_name") == "federated"), on=ESTIMATE_KEYS, suffix="_ref"
    )
    coefficients = joined.filter(pl.col("estimate_name") == "coefficient")
    curve = joined.filter(pl.col("estimate_name") == "estimate")
    assert coefficients.height == 2 and curve.height >= 6
    for got, want in zip(joined["estimate_value"], joined["estimate_value_ref"], strict=True):
        if got == want:
            continue
        assert math.isclose(float(got), float(want), rel_tol=1e-12, abs_tol=1e-12)
    times = curve["additional_level"].cast(pl.Int64)
    assert set(times.to_list()) - {0} and all(t % 30 == 0 for t in times)


def test_a_node_that_withheld_its_segments_withholds_the_curve_not_the_grid(
    analysis_node_dbs, open_analysis_cdm
) -> None:
    """One node's gate withheld its time axis (a stratum too small anywhere): the grid is the
    other nodes' (his node does not coarsen it), and with no partial pools the curve of that
    series is withheld whole, named to his node, with no summary claiming zero records."""
    from studies.analyses.time_axis import tables_on_grid

    analysis = REGISTRY["survival"]()
    spec = analysis.Spec.model_validate(
        {"id": "km", "kind": "survival", "target_cohorts": ["population"], "outcome": "outcome"}
    )
    names = ["a", "b", "c"]
    tables = [analysis.local(open_analysis_cdm(p), spec, None) for p in analysis_node_dbs["nodes"]]
    ends = [sorted({int(t) for t in t_["variable_level"]}) for t_ in tables]
    hidden = tables[1].with_columns(pl.lit(float("nan")).alias("value"))
    grid, _ = tables_on_grid([tables[0], hidden, tables[2]])
    assert grid == merged_grid([ends[0], ends[2]]) and len(grid) > 1
    result = analysis.combine(CombineInput([tables[0], hidden, tables[2]], names), spec, None)
    rows = result.result
    assert rows.filter(pl.col("additional_name") == "time")[
        "estimate_name"
    ].unique().sort().to_list() == [
        "nodes_contributing",
        "nodes_withheld",
    ]
    flags = rows.filter(pl.col("estimate_name") == "nodes_withheld")
    assert flags.height == len(grid) and set(flags["estimate_value"]) == {"b"}
    assert rows.filter(pl.col("estimate_name") == "number_records").is_empty()


def test_policy_min_time_bin_days_is_validated_and_shown(world, tmp_path: Path) -> None:
    """``[privacy] min_time_bin_days`` defaults to 30, is refused below 1 naming the field, and
    ``node check-policy`` prints it."""
    from typer.testing import CliRunner

    from fedomop.cli import app
    from node.policy import PolicyError

    cdm = world["cdms"][HIS_DAYS[0]]
    folder = tmp_path / "p"
    policy = write_node_policy(
        folder, name="n", cdm=cdm, permit_body_key=world["pub"], privacy={}, allowed=["*"]
    )
    assert load_policy(policy).privacy.min_time_bin_days == 30
    command = ["node", "check-policy", "--policy", str(policy)]
    out = CliRunner().invoke(app, command, env={"COLUMNS": "400"})
    assert out.exit_code == 0 and "time bins >= 30 days" in out.output
    bad = write_node_policy(
        tmp_path / "bad",
        name="n",
        cdm=cdm,
        permit_body_key=world["pub"],
        privacy={"min_time_bin_days": 0},
        allowed=["*"],
    )
    with pytest.raises(PolicyError, match="privacy.min_time_bin_days"):
        load_policy(bad)
