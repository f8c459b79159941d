"""Pooled mode on three synthetic nodes that each hold fewer than ten cystic fibrosis patients.

Plain counts through the gate are suppressed at every node; ``pooled_counts`` through the same
gates gives a noisy total near the true one (secure sum of noise shares), each node charged in
its own ledger; the gateless reference equals the union's count exactly.
"""

from __future__ import annotations

import base64
import json
import math
import os
from pathlib import Path
from typing import Any

import duckdb
import polars as pl
import pytest
from _helpers import signed_permit, write_node_policy
from typer.testing import CliRunner

from fedomop.cli import app
from node.gate import Gate
from node.messages import GateRequest
from node.policy import load_policy
from node.pooled import PooledNode, pooled_release
from node.transcript import signed_release, transcript_json
from privacy.accounting import epsilon_to_rho
from privacy.ledger import Ledger
from privacy.secagg import SecAggError, distributed_gaussian_rho, pooled_charge
from privacy.secagg_plus import NodeKeys, sign_keys
from studies.analyses import REGISTRY
from studies.analyses.pooled import grid, suppress_small_totals
from studies.analysis import CombineInput, NextRound
from studies.canonical import study_hash
from studies.loading import load_study, study_from_data
from studies.model import StudyError
from studies.permit import PermitAnalysis, generate_keypair, load_private_key
from studies.runner import drive, local_step, run_local
from studies.statistics import from_ipc, make_statistics, to_ipc

REPO = Path(__file__).resolve().parents[1]
STUDY_PATH = REPO / "examples" / "rare_disease" / "study.yaml"
NODES = ["rare-a", "rare-b", "rare-c"]
CF = 441267  # Cystic fibrosis (SNOMED 190905008), the generator's default rare condition
COST = 2.0  # rho; a test-sized budget: the noisy total (sd ~1.06) of 13 stays above 10 (z 3.8)


@pytest.fixture(scope="module")
def study() -> Any:
    return load_study(STUDY_PATH)


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, Path]:
    private, public, _ = generate_keypair(tmp_path_factory.mktemp("pooled_keys"), "body")
    return load_private_key(private), public


def gates(root: Path, dbs: list[Path], public: Path) -> dict[str, Gate]:
    """One gate per node, each with its own policy, ledger, audit log and secagg secret."""
    out = {}
    for name, db in zip(NODES, dbs, strict=True):
        policy = write_node_policy(
            root / name,
            name=name,
            cdm=db,
            permit_body_key=public,
            privacy={"max_epsilon_per_permit": 100.0, "max_epsilon_per_year": 1000.0},
            allowed=["counts", "pooled_counts"],
        )
        out[name] = Gate(load_policy(policy))
    return out


def permit(
    study: Any, key: Any, pooled: PermitAnalysis, node_keys: dict[str, str]
) -> dict[str, Any]:
    return signed_permit(
        key,
        study_hash=study_hash(study),
        study_name=study.name,
        nodes=NODES,
        analyses=[PermitAnalysis(id="cf_feasibility"), pooled],
        epsilon=60.0,
        node_keys=node_keys,
    )


def asker(
    gates_: dict[str, Gate], study_doc: dict, document: dict, analysis_id: str, replies,
    lost: tuple[str, ...] = (), lost_from: int = 0,
):  # fmt: skip
    """``drive``'s ask_nodes through the real gates, as a coordinator asks (round t+1 carries
    round t's signed releases); keeps every reply for the checks. ``lost`` nodes are not asked
    from round ``lost_from`` on (gone)."""

    sent: dict[str, Any] = {"transcript": None}

    def ask(state: dict | None, round_: int) -> dict[str, pl.DataFrame]:
        request = GateRequest(study_doc, document, analysis_id, state, round_, sent["transcript"])
        out, signed = {}, []
        for name, gate in gates_.items():
            if name in lost and round_ >= lost_from:
                continue
            reply = gate.handle(request)
            replies.append((round_, reply))
            assert reply.released, reply.reason
            out[name] = from_ipc(reply.statistics)
            signed.append(signed_release(reply))
        sent["transcript"] = transcript_json(state, signed)
        return dict(sorted(out.items()))

    return ask


def first_round(gates_: dict[str, Gate], study_doc: dict, document: dict):
    """Round 0 of ``cf_pooled`` at every gate: the next state and its transcript."""
    replies = {
        name: gate.handle(GateRequest(study_doc, document, "cf_pooled", None, 0))
        for name, gate in gates_.items()
    }
    assert all(r.released for r in replies.values()), [r.reason for r in replies.values()]
    tables = [from_ipc(replies[n].statistics) for n in sorted(replies)]
    spec = study_from_data(study_doc).analysis("cf_pooled")
    state = REGISTRY["pooled_counts"]().combine(CombineInput(tables, sorted(replies)), spec, None)
    transcript = transcript_json(None, [signed_release(r) for r in replies.values()])
    return state.state, transcript


def true_counts(dbs: list[Path], study: Any) -> pl.DataFrame:
    """Each node's exact first-entry person counts (the pooled analysis's local, no gate)."""
    return pl.concat(
        local_step(db, study, "cf_pooled").with_columns(pl.lit(i).alias("node"))
        for i, db in enumerate(dbs)
    )


def test_rare_cohort_is_below_the_cell_count_at_every_node(synthetic_node_dbs, study) -> None:
    per_node = true_counts(synthetic_node_dbs, study).filter(pl.col("strata_name") == "overall")
    assert per_node.height == 3
    assert all(1 <= v < 10 for v in per_node["value"])
    for db in synthetic_node_dbs:  # the cohort is the condition's persons, checked in DuckDB
        with duckdb.connect(str(db), read_only=True) as con:
            n = con.execute(
                "SELECT count(DISTINCT person_id) FROM condition_occurrence "
                "WHERE condition_concept_id = ?",
                [CF],
            ).fetchone()[0]
        assert n in per_node["value"].to_list()


def test_plain_counts_suppressed_everywhere_pooled_total_released(
    synthetic_node_dbs, study, keys, tmp_path
) -> None:
    key, public = keys
    nodes = gates(tmp_path, synthetic_node_dbs, public)
    grant = PermitAnalysis(id="cf_pooled", mechanism="gaussian", cost=COST, max_rows_per_person=3)
    document = permit(study, key, grant, pooling_keys(tmp_path))
    doc = study.model_dump(mode="json", exclude_none=True)
    spec = study.analysis("cf_pooled")

    plain = {
        name: from_ipc(
            gate.handle(GateRequest(doc, document, "cf_feasibility", None, 0)).statistics
        )
        for name, gate in nodes.items()
    }
    for name, stats in plain.items():
        subjects = stats.filter(pl.col("variable_name") == "Number subjects")
        assert subjects.height >= 1
        assert subjects["value"].is_nan().all(), name  # every rare count below 10: suppressed

    replies: list = []
    result = drive(
        REGISTRY["pooled_counts"](), spec, asker(nodes, doc, document, "cf_pooled", replies)
    )
    truth = (
        true_counts(synthetic_node_dbs, study)
        .group_by("strata_name", "strata_level")
        .agg(pl.col("value").sum())
    )
    total = truth.filter(pl.col("strata_name") == "overall")["value"].item()
    assert 10 <= total < 30
    overall = result.filter(pl.col("strata_name") == "overall")["estimate_value"].item()
    assert abs(int(overall) - total) <= 8  # noise sd ~ 1.06: over seven sd
    # small strata totals are suppressed by the coordinator (at the total, not per node)
    small = truth.filter((pl.col("value") < 5) & (pl.col("strata_name") != "overall"))
    shown = result.join(small, on=["strata_name", "strata_level"])
    assert shown.height == small.height and (shown["estimate_value"] == "NA").all()

    # keys, shares, masked vectors, consistency, reveal; only the masked round is charged
    assert [r for r, _ in replies] == [r for r in range(5) for _ in NODES]
    by_round = {r: [reply for q, reply in replies if q == r] for r in range(5)}
    for r in (0, 1, 3, 4):
        assert all(reply.settings["rho_charged"] == 0.0 for reply in by_round[r])
    for reply in by_round[0]:
        stats = from_ipc(reply.statistics)
        assert set(stats["estimate_name"]) == {
            "channel_key", "mask_key", "key_signature", "min_cell_count"
        }  # fmt: skip
    masked_values = []
    for reply in by_round[2]:
        assert reply.settings["pooled"] and reply.settings["parties"] == 3
        # Kairouz et al.'s bound for h = 2 honest shares of scale s, 3 rows per person, 6 rows
        assert reply.settings["min_honest_nodes"] == 2  # the policy's default
        share_scale = reply.settings["noise_scale"]
        assert share_scale == pytest.approx(math.sqrt(3 / (2 * COST * 2)))
        bound = distributed_gaussian_rho(share_scale, 2, math.sqrt(3), 6)
        assert reply.settings["rho_charged"] == pytest.approx(bound)
        assert COST < bound < COST * 1.3  # small shares: the tau term adds ~25 %
        assert reply.settings["suppressed_cells"] == 0
        masked_values += from_ipc(reply.statistics)["value"].to_list()
    assert all(v >= 1000 for v in masked_values)  # ring elements, not counts (P(fail) ~ 1e-10)
    # the coordinator's combine fails loudly on an altered vector, never a wrong total
    analysis = REGISTRY["pooled_counts"]()
    state = None
    for r in range(4):
        state = analysis.combine(
            CombineInput([from_ipc(x.statistics) for x in by_round[r]], NODES), spec, state
        ).state
    reveal = CombineInput([from_ipc(x.statistics) for x in by_round[4]], NODES)
    assert analysis.combine(reveal, spec, state).result.equals(result)
    vectors = {n: list(v) for n, v in state["masked"].items()}
    vectors["rare-b"][2] += 1
    with pytest.raises(SecAggError, match="does not check"):
        analysis.combine(reveal, spec, state | {"masked": vectors})
    charges = {reply.node_name: reply.settings["rho_charged"] for reply in by_round[2]}
    for name, gate in nodes.items():  # each node's own ledger holds its own charge
        spent = Ledger(gate.policy.ledger_path).spent(document["body"]["permit_id"])
        assert spent == pytest.approx(charges[name], rel=1e-12)


def test_pooled_mode_refused_without_a_gaussian_grant(
    synthetic_node_dbs, study, keys, tmp_path
) -> None:
    key, public = keys
    nodes = gates(tmp_path, synthetic_node_dbs, public)
    node_keys = pooling_keys(tmp_path)
    document = permit(study, key, PermitAnalysis(id="cf_pooled"), node_keys)
    doc = study.model_dump(mode="json", exclude_none=True)
    reply = nodes["rare-a"].handle(GateRequest(doc, document, "cf_pooled", None, 0))
    assert not reply.released
    assert "mechanism 'gaussian'" in reply.reason
    # with a pooled grant: a roster that forges this node's key or invents a node is refused
    grant = PermitAnalysis(id="cf_pooled", mechanism="gaussian", cost=1.0)
    document = permit(study, key, grant, node_keys)
    state, transcript = first_round(nodes, doc, document)
    roster = state["roster"]
    for change in (
        {**roster, "rare-a": roster["rare-b"]},  # another node's keys for this one
        {**roster, "rare-z": roster["rare-b"]},  # an invented node
    ):
        request = GateRequest(doc, document, "cf_pooled", state | {"roster": change}, 1, transcript)
        reply = nodes["rare-a"].handle(request)
        assert not reply.released and "not the one its transcript gives" in reply.reason
    assert Ledger(nodes["rare-a"].policy.ledger_path).spent(document["body"]["permit_id"]) == 0


def pooling_key(policy: Path) -> str:
    """What ``fedomop node pooling-key`` prints for a node: its pooling identity, 64 hex."""
    result = CliRunner().invoke(app, ["node", "pooling-key", "--policy", str(policy)])
    assert result.exit_code == 0, result.output
    return result.output.strip()


def pooling_keys(root: Path) -> dict[str, str]:
    """Every node's pooling identity, as its operator hands it to the permit body."""
    return {name: pooling_key(root / name / "node.toml") for name in NODES}


def test_pooled_mode_refused_under_a_permit_without_every_node_key(
    synthetic_node_dbs, study, keys, tmp_path
) -> None:
    """Issue 9's attack needed keys the permit did not bind (the coordinator's own, under the
    other nodes' names): such a permit is refused in every round, naming the unbound nodes,
    with nothing published, released or charged."""
    key, public = keys
    nodes = gates(tmp_path, synthetic_node_dbs, public)
    doc = study.model_dump(mode="json", exclude_none=True)
    grant = PermitAnalysis(id="cf_pooled", mechanism="gaussian", cost=COST, max_rows_per_person=3)
    some = {n: k for n, k in pooling_keys(tmp_path).items() if n != "rare-c"}
    for bound, unbound in (({}, NODES), (some, ["rare-c"])):
        document = permit(study, key, grant, bound)
        for gate in nodes.values():
            reply = gate.handle(GateRequest(doc, document, "cf_pooled", None, 0))
            assert not reply.released and reply.statistics == b""
            assert "binds no identity key" in reply.reason
            assert str(unbound) in reply.reason, reply.reason
            assert Ledger(gate.policy.ledger_path).spent(document["body"]["permit_id"]) == 0
    # and the release policy itself refuses such a permit (below the gate's own check)
    bare = PooledNode(
        name="rare-a", secret=os.urandom(32), context="ctx", analysis_id="cf_pooled",
        min_cell_count=10, permitted=NODES, identities=some, min_honest=2,
    )  # fmt: skip
    with pytest.raises(SecAggError, match="bind every node's pooling identity"):
        pooled_release(lambda: pytest.fail("no data"), None, grant, bare)


def test_permit_bound_node_keys_authenticate_the_roster(
    synthetic_node_dbs, study, keys, tmp_path
) -> None:
    """A permit binding every node's pooling identity: a coordinator's key swap is refused by
    every honest node, naming the swapped node, with nothing released or charged; the honest
    run completes and totals as without keys."""
    key, public = keys
    nodes = gates(tmp_path, synthetic_node_dbs, public)
    node_keys = pooling_keys(tmp_path)
    assert all(len(k) == 64 and int(k, 16) >= 0 for k in node_keys.values())
    assert pooling_key(tmp_path / "rare-a" / "node.toml") == node_keys["rare-a"]  # stable
    assert len(set(node_keys.values())) == 3
    grant = PermitAnalysis(id="cf_pooled", mechanism="gaussian", cost=COST, max_rows_per_person=3)
    document = permit(study, key, grant, node_keys)
    permit_id = document["body"]["permit_id"]
    doc = study.model_dump(mode="json", exclude_none=True)
    spec = study.analysis("cf_pooled")
    analysis = REGISTRY["pooled_counts"]()

    state, transcript = first_round(nodes, doc, document)
    assert sorted(state["signatures"]) == NODES
    context = f"{permit_id}|{document['body']['study_hash']}|cf_pooled"
    mine = NodeKeys.derive(b"\x07" * 32, context).public()  # the coordinator's own, for rare-b
    swapped = {**state["roster"], "rare-b": mine}
    forged = {**state["signatures"], "rare-b": sign_keys(b"\x07" * 32, context, mine)}
    # rare-b's round-0 release swapped for one carrying the coordinator's keys
    releases = [dict(r) for r in transcript["releases"]]
    assert releases[1]["claim"]["node"] == "rare-b"
    fake = from_ipc(base64.b64decode(releases[1]["statistics"])).with_columns(
        variable_level=pl.when(pl.col("estimate_name") == "mask_key")
        .then(pl.lit(mine["mask"]))
        .otherwise("variable_level")
    )
    releases[1]["statistics"] = base64.b64encode(to_ipc(fake)).decode()
    attacks = [
        (state | {"roster": swapped}, transcript, "not the one its transcript gives"),
        (state | {"roster": swapped, "signatures": forged}, transcript,
         "not the one its transcript gives"),
        (state, {**transcript, "releases": releases},
         "release of 'rare-b' does not match its claimed payload hash"),
    ]  # fmt: skip
    for request_state, request_transcript, why in attacks:
        for name in ("rare-a", "rare-c"):
            request = GateRequest(doc, document, "cf_pooled", request_state, 1, request_transcript)
            reply = nodes[name].handle(request)
            assert not reply.released and why in reply.reason, reply.reason
            assert reply.statistics == b""
    # below the transcript, the release policy checks the keys' signatures itself
    node = PooledNode(
        name="rare-a", secret=(tmp_path / "rare-a" / "ledger.secagg.key").read_bytes(),
        context=context, analysis_id="cf_pooled", min_cell_count=10, permitted=NODES,
        identities=node_keys, min_honest=2,
    )  # fmt: skip
    for change in ({"roster": swapped}, {"roster": swapped, "signatures": forged}):
        with pytest.raises(SecAggError, match="keys for 'rare-b' are not signed by its identity"):
            pooled_release(lambda: pytest.fail("no data"), state | change, grant, node)
    for gate in nodes.values():
        assert Ledger(gate.policy.ledger_path).spent(permit_id) == 0

    replies: list = []
    result = drive(analysis, spec, asker(nodes, doc, document, "cf_pooled", replies))
    assert [r for r, _ in replies] == [r for r in range(5) for _ in NODES]
    truth = true_counts(synthetic_node_dbs, study).filter(pl.col("strata_name") == "overall")
    overall = result.filter(pl.col("strata_name") == "overall")["estimate_value"].item()
    assert abs(int(overall) - truth["value"].sum()) <= 8  # noise sd ~ 1.06: over seven sd
    for gate in nodes.values():
        assert Ledger(gate.policy.ledger_path).spent(permit_id) > COST


def test_reference_without_gates_is_the_exact_union_count(synthetic_node_dbs, tmp_path) -> None:
    """run_local (no gates, no noise, no masks) equals DuckDB on the union of the nodes."""
    result, settings = run_local(STUDY_PATH, synthetic_node_dbs, tmp_path / "out", node_names=NODES)
    pooled_id = settings.filter(pl.col("analysis_id") == "cf_pooled")["result_id"].item()
    pooled = result.filter(pl.col("result_id") == pooled_id)
    truth = {("overall", "overall"): 0}
    for db in synthetic_node_dbs:
        with duckdb.connect(str(db), read_only=True) as con:
            rows = con.execute(
                """SELECT CASE p.gender_concept_id WHEN 8507 THEN 'Male'
                          WHEN 8532 THEN 'Female' ELSE 'None' END AS sex, count(*) AS n
                   FROM person p WHERE p.person_id IN (
                       SELECT person_id FROM condition_occurrence WHERE condition_concept_id = ?)
                   GROUP BY ALL""",
                [CF],
            ).fetchall()
        for sex, n in rows:
            truth[("sex", sex)] = truth.get(("sex", sex), 0) + n
            truth[("overall", "overall")] += n
    shown = {
        (r["strata_name"], r["strata_level"]): int(r["estimate_value"])
        for r in pooled.filter(pl.col("strata_name").is_in(["overall", "sex"])).iter_rows(
            named=True
        )
    }
    assert truth[("overall", "overall")] >= 10
    assert {k: v for k, v in shown.items() if v} == truth
    ages = pooled.filter(pl.col("strata_name") == "age_group")["estimate_value"].cast(pl.Int64)
    assert ages.sum() == truth[("overall", "overall")]


def test_calendar_year_of_diagnosis_is_a_stratum_of_the_years_the_study_names(
    synthetic_node_dbs, study, tmp_path
) -> None:
    """Persons by calendar year of their first diagnosis (the reference run, no gates), equal
    to DuckDB on the union; a year stratum without named years is refused."""
    years = {}
    for db in synthetic_node_dbs:
        with duckdb.connect(str(db), read_only=True) as con:
            rows = con.execute(
                """SELECT year(min(condition_start_date)) AS y FROM condition_occurrence
                   WHERE condition_concept_id = ? GROUP BY person_id""",
                [CF],
            ).fetchall()
        for (year,) in rows:
            years[str(year)] = years.get(str(year), 0) + 1
    first, last = min(map(int, years)), max(map(int, years))
    data = study.model_dump(mode="json", exclude_none=True)
    data["analyses"] = [
        {"id": "cf_years", "kind": "pooled_counts", "cohorts": ["cystic_fibrosis"],
         "strata": ["calendar_year"], "years": [first, min(last, first + 99)]}
    ]  # fmt: skip
    path = tmp_path / "years.json"
    path.write_text(json.dumps(data))
    result, _ = run_local(path, synthetic_node_dbs, tmp_path / "out", node_names=NODES)
    shown = result.filter(pl.col("strata_name") == "calendar_year")
    counts = dict(zip(shown["strata_level"], shown["estimate_value"].cast(pl.Int64), strict=True))
    assert {y: n for y, n in counts.items() if n} == {
        y: n for y, n in years.items() if int(y) <= first + 99
    }
    assert len(counts) == min(last, first + 99) - first + 1  # every named year, zeros too
    data["analyses"][0].pop("years")
    with pytest.raises(StudyError, match="calendar_year needs years"):
        study_from_data(data)


def test_characteristics_count_the_persons_with_a_named_concept_set(
    synthetic_node_dbs, study, tmp_path
) -> None:
    """Pooled characterization (the reference run, no gates): persons with a record of the
    study's concept set around their first diagnosis, equal to DuckDB on the union; the
    declared rows per person grow by one per characteristic."""
    find = """SELECT co.condition_concept_id FROM condition_occurrence co
              WHERE co.person_id IN (SELECT person_id FROM condition_occurrence
                                     WHERE condition_concept_id = ?)
                AND co.condition_concept_id <> ?
              GROUP BY 1 ORDER BY count(DISTINCT co.person_id) DESC, 1 LIMIT 1"""
    with duckdb.connect(str(synthetic_node_dbs[0]), read_only=True) as con:
        concept = con.execute(find, [CF, CF]).fetchone()[0]
    truth = 0
    for db in synthetic_node_dbs:
        with duckdb.connect(str(db), read_only=True) as con:
            truth += con.execute(
                """SELECT count(DISTINCT person_id) FROM condition_occurrence
                   WHERE condition_concept_id = ? AND person_id IN (
                       SELECT person_id FROM condition_occurrence WHERE condition_concept_id = ?)""",
                [concept, CF],
            ).fetchone()[0]
    data = study.model_dump(mode="json", exclude_none=True)
    data["concept_sets"].append(
        {"name": "comorbidity", "concepts": [concept], "include_descendants": False}
    )
    data["analyses"] = [
        {"id": "cf_chars", "kind": "pooled_counts", "cohorts": ["cystic_fibrosis"],
         "strata": ["sex"], "characteristics": [
             {"type": "concept_set", "concept_set": "comorbidity", "domain": "condition",
              "window": {"start": -36600, "end": 36600}}]}
    ]  # fmt: skip
    path = tmp_path / "chars.json"
    path.write_text(json.dumps(data))
    result, _ = run_local(path, synthetic_node_dbs, tmp_path / "out", node_names=NODES)
    row = result.filter(pl.col("variable_level") == "concept_set_comorbidity")
    assert row.height == 1 and row["strata_name"].item() == "overall"
    assert int(row["estimate_value"].item()) == truth > 0
    spec = study_from_data(data).analysis("cf_chars")
    assert REGISTRY["pooled_counts"]().profile(spec).rows_per_person == 3  # overall, sex, 1


def protocol_run(spec: Any, tables: dict[str, pl.DataFrame], grant: PermitAnalysis):
    """The pooled rounds over ``pooled_release`` (each gate's release policy) and ``combine``,
    every node's pooling identity bound: the coordinator's result from the nodes' tables."""
    from node.pooled import PooledNode, pooled_release
    from privacy.secagg import identity_public_hex

    secrets = {name: os.urandom(32) for name in tables}
    identities = {name: identity_public_hex(s) for name, s in secrets.items()}
    nodes = {
        name: PooledNode(
            name=name, secret=s, context="ctx", analysis_id=spec.id, min_cell_count=10,
            permitted=sorted(tables), identities=identities, min_honest=2,
            declared_rows=REGISTRY["pooled_counts"]().profile(spec).rows_per_person,
        )
        for name, s in secrets.items()
    }  # fmt: skip
    analysis, names = REGISTRY["pooled_counts"](), sorted(tables)
    state, charged = None, []
    while True:
        released = [pooled_release(lambda n=n: tables[n], state, grant, nodes[n]) for n in names]
        charged += [r[1] for r in released if r[1]["rho_charged"] > 0]
        step = analysis.combine(CombineInput([r[0] for r in released], names), spec, state)
        if not isinstance(step, NextRound):
            return step.result, charged
        state = step.state


def test_unnamed_levels_are_not_released_and_suppression_never_hides_a_large_total() -> None:
    """Issue 11: a near-zero ``None`` level (and one small real level) forced complementary
    suppression on totals of 10 and more. Now levels the study does not name are neither in
    any node's vector nor released, and only noisy totals below the minimum cell count go."""
    spec = REGISTRY["pooled_counts"].Spec(
        id="cf", kind="pooled_counts", cohorts=["cf"], strata=["sex", "age_group"],
        age_groups=[[0, 17], [18, 39], [40, 150]],
    )  # fmt: skip
    cells = grid(spec)
    assert "None" not in cells["strata_level"].to_list()
    assert cells.height == 6  # overall, 2 sexes, 3 age groups
    per_node = {"overall": 10, "Female": 9, "Male": 1, "0 to 17": 1, "18 to 39": 1, "40 to 150": 8}
    table = make_statistics(
        cells.with_columns(
            variable_name=pl.lit("Number subjects"),
            estimate_name=pl.lit("count"),
            release_class=pl.lit("count"),
            value=pl.col("strata_level").replace_strict(per_node, return_dtype=pl.Float64),
        )
    )
    grant = PermitAnalysis(id="cf", mechanism="gaussian", cost=COST, max_rows_per_person=3)
    result, settings = protocol_run(spec, {f"n{i}": table for i in range(3)}, grant)
    shown = dict(zip(result["strata_level"], result["estimate_value"], strict=True))
    assert set(shown) == {"overall", "Female", "Male", "0 to 17", "18 to 39", "40 to 150"}
    # true totals 30, 27 and 24 (noise sd ~1.06): shown; 3, 3 and 3: suppressed
    for level, true in (("overall", 30), ("Female", 27), ("40 to 150", 24)):
        assert abs(int(shown[level]) - true) <= 8, (level, shown[level])
    assert [shown[level] for level in ("Male", "0 to 17", "18 to 39")] == ["NA"] * 3
    assert all(s["min_honest_nodes"] == 2 and s["parties"] == 3 for s in settings)


def test_suppression_keeps_every_noisy_total_of_at_least_the_cell_count() -> None:
    total = pl.DataFrame({"value": [10.0, 9.0, 0.0, -3.0, 250.0, 9.999]})
    kept = suppress_small_totals(total, 10)["value"].to_list()
    assert kept == [10.0, None, None, None, 250.0, None]


def test_permit_review_shows_the_charge_a_gate_books(study) -> None:
    """``permit review``'s per-node figure for pooled mode is flat in n and is what the
    preview (``pooled_charge``) computes, which a gate's booking equals (``test_secagg``)."""
    result = CliRunner().invoke(
        app, ["permit", "review", str(STUDY_PATH), "--budget", "6"], env={"COLUMNS": "400"}
    )
    assert result.exit_code == 0, result.output
    rho = epsilon_to_rho(6.0, 1e-6) / len(study.analyses)
    expected = pooled_charge(rho, 3, 6, 8, 2).rho_booked
    assert "h = 2 honest nodes assumed" in result.output
    assert "n sigma^2/h" in result.output
    for n in (3, 8, 20, 50):
        row = next(
            line for line in result.output.splitlines() if line.strip("│ ").startswith(f"{n} ")
        )
        assert f"{expected:.6g}" in row, row
    # a grant so large that shares fall below scale 1/2: shown as refused, no traceback
    big = CliRunner().invoke(
        app, ["permit", "review", str(STUDY_PATH), "--budget", "200", "--min-honest", "4"],
        env={"COLUMNS": "400"},
    )  # fmt: skip
    assert big.exit_code == 0, big.output
    assert "refused: noise share scale" in big.output


def dropout_study(study: Any, threshold: int) -> Any:
    """The example study with a dropout threshold on its pooled analysis (a new study hash)."""
    data = study.model_dump(mode="json", exclude_none=True)
    for analysis in data["analyses"]:
        if analysis["id"] == "cf_pooled":
            analysis["threshold"] = threshold
    return study_from_data(data)


def tolerant_permit(study: Any, key: Any, names: list[str], node_keys: dict[str, str]):
    """The threshold-3 study, its pooled grant and a permit for it at ``names``."""
    tolerant = dropout_study(study, 3)
    grant = PermitAnalysis(id="cf_pooled", mechanism="gaussian", cost=COST, max_rows_per_person=3)
    document = signed_permit(
        key, study_hash=study_hash(tolerant), study_name=tolerant.name, nodes=names,
        analyses=[grant], epsilon=60.0, node_keys=node_keys,
    )  # fmt: skip
    return tolerant, grant, document


def four_gates(root: Path, dbs: list[Path], public: Path):
    """Four gates (the fourth on the first node's CDM) whose policies assume 3 honest nodes:
    their names, the gates and their pooling identities."""
    names = [*NODES, "rare-d"]
    nodes = {}
    for name, db in zip(names, [*dbs, dbs[0]], strict=True):
        policy = write_node_policy(
            root / name, name=name, cdm=db, permit_body_key=public,
            privacy={"max_epsilon_per_permit": 100.0, "max_epsilon_per_year": 1000.0,
                     "min_honest_nodes": 3},
            allowed=["counts", "pooled_counts"],
        )  # fmt: skip
        nodes[name] = Gate(load_policy(policy))
    return names, nodes, {name: pooling_key(root / name / "node.toml") for name in names}


def test_a_node_whose_vector_arrived_is_never_unmasked_through_the_gates(
    synthetic_node_dbs, study, keys, tmp_path
) -> None:
    """The attack on double masking: after every node signed U2 = all four, the coordinator
    asks rare-a to sign again for a U2 without rare-d (whose vector it holds), to collect
    rare-d's mask-key shares next to its seed shares. Each gate answers a round once, so the
    second consistency request is refused; a reveal needs t signatures over one U2, which only
    the true U2 has."""
    key, public = keys
    names, nodes, node_keys = four_gates(tmp_path, synthetic_node_dbs, public)
    tolerant, grant, document = tolerant_permit(study, key, names, node_keys)
    doc = tolerant.model_dump(mode="json", exclude_none=True)
    spec = tolerant.analysis("cf_pooled")
    replies: list = []
    ask = asker(nodes, doc, document, "cf_pooled", replies)
    state = None
    for round_ in range(4):  # keys, shares, masked, consistency: everyone signs U2 = all four
        released = ask(state, round_)
        state = (
            REGISTRY["pooled_counts"]()
            .combine(CombineInput(list(released.values()), list(released)), spec, state)
            .state
        )
    masked_replies = {reply.node_name: reply for r, reply in replies if r == 2}
    masked_state = _state_of_round(replies, spec, 3)  # the masked round's state
    without_d = [signed_release(masked_replies[n]) for n in NODES]
    transcript = transcript_json(masked_state, without_d)
    tables = {n: from_ipc(masked_replies[n].statistics) for n in NODES}
    fake_u2 = (
        REGISTRY["pooled_counts"]()
        .combine(CombineInput([tables[n] for n in NODES], NODES), spec, masked_state)
        .state
    )
    assert fake_u2["survivors"] == NODES  # rare-d left out although its vector arrived
    reply = nodes["rare-a"].handle(GateRequest(doc, document, "cf_pooled", fake_u2, 3, transcript))
    assert not reply.released and "a round is answered once" in reply.reason, reply.reason


def _state_of_round(replies: list, spec: Any, upto: int) -> dict:
    """The state of round ``upto - 1``, derived from the honest replies of the rounds before."""
    state = None
    for round_ in range(upto - 1):
        released = {r.node_name: from_ipc(r.statistics) for q, r in replies if q == round_}
        names = sorted(released)
        state = (
            REGISTRY["pooled_counts"]()
            .combine(CombineInput([released[n] for n in names], names), spec, state)
            .state
        )
    return state


def test_a_node_lost_after_key_sharing_leaves_the_sum_of_the_rest(
    synthetic_node_dbs, study, keys, tmp_path
) -> None:
    """Four gates (the fourth on rare-a's CDM), threshold 3, policies assuming 3 honest nodes:
    rare-d shares its seeds, then is gone. The others' total comes out (its dangling masks
    rebuilt from shares), each charged once; with two lost the study fails, naming why, and
    nothing more is charged. A node whose policy assumes 2 honest nodes refuses threshold 3."""
    key, public = keys
    names, nodes, node_keys = four_gates(tmp_path, synthetic_node_dbs, public)
    tolerant, grant, document = tolerant_permit(study, key, names, node_keys)
    doc = tolerant.model_dump(mode="json", exclude_none=True)
    spec = tolerant.analysis("cf_pooled")

    def ask_all_but(lost: list[str], replies: list):  # gone after the share round
        return asker(nodes, doc, document, "cf_pooled", replies, tuple(lost), lost_from=2)

    replies: list = []
    result = drive(REGISTRY["pooled_counts"](), spec, ask_all_but(["rare-d"], replies))
    truth = true_counts(synthetic_node_dbs, study).filter(pl.col("strata_name") == "overall")
    overall = result.filter(pl.col("strata_name") == "overall")["estimate_value"].item()
    # three survivors' shares of variance sigma^2 / 3: total sd ~0.75
    assert abs(int(overall) - truth["value"].sum()) <= 6
    permit_id = document["body"]["permit_id"]
    spent = {name: Ledger(gate.policy.ledger_path).spent(permit_id) for name, gate in nodes.items()}
    assert spent["rare-d"] == 0 and all(spent[n] > COST for n in NODES)
    masked = [reply for r, reply in replies if r == 2]
    assert {r.node_name for r in masked} == set(NODES)
    assert all(r.settings["threshold"] == 3 and r.settings["parties"] == 4 for r in masked)

    _, _, fresh = tolerant_permit(study, key, names, node_keys)
    document = fresh
    again: list = []
    with pytest.raises(SecAggError, match="only 2 masked vectors arrived, the threshold is 3"):
        drive(REGISTRY["pooled_counts"](), spec, ask_all_but(["rare-c", "rare-d"], again))
    for name, gate in nodes.items():  # charged once for the masked round, never twice
        charge = Ledger(gate.policy.ledger_path).spent(fresh["body"]["permit_id"])
        assert (charge > COST) == (name in ("rare-a", "rare-b")), (name, charge)

    # rare-a's operator lowers its assumption to 2 honest nodes: threshold 3 of 4 is too weak
    weak = write_node_policy(
        tmp_path / "rare-a", name="rare-a", cdm=synthetic_node_dbs[0], permit_body_key=public,
        privacy={"max_epsilon_per_permit": 100.0, "max_epsilon_per_year": 1000.0},
        allowed=["pooled_counts"],
    )  # fmt: skip
    _, _, third = tolerant_permit(study, key, names, node_keys)
    nodes["rare-a"] = Gate(load_policy(weak))
    state, transcript = first_round(nodes, doc, third)
    reply = nodes["rare-a"].handle(GateRequest(doc, third, "cf_pooled", state, 1, transcript))
    assert not reply.released and "threshold 3 of 4 nodes is too weak" in reply.reason


@pytest.mark.slow
def test_pooled_counts_in_flower_simulation(synthetic_node_dbs, study, keys, tmp_path) -> None:
    """The same rounds over real Flower (simulation runtime), with the nodes' pooling identities
    bound in the permit: signed keys, masked shares, noisy total."""
    from coordinator.simulation import run_simulated
    from coordinator.study_runner import StudyPlan
    from studies.canonical import canonical_data

    key, public = keys
    gates(tmp_path, synthetic_node_dbs, public)
    grant = PermitAnalysis(id="cf_pooled", mechanism="gaussian", cost=COST, max_rows_per_person=3)
    document = permit(study, key, grant, pooling_keys(tmp_path))
    plan = StudyPlan(canonical_data(study), document, str(tmp_path / "out"), 3)
    outcome = run_simulated(plan, [tmp_path / name / "node.toml" for name in NODES])
    status = {a.analysis_id: (a.status, a.rounds) for a in outcome.analyses}
    permitted = {k: status[k] for k in ("cf_feasibility", "cf_pooled")}
    assert permitted == {"cf_feasibility": ("finished", 1), "cf_pooled": ("finished", 5)}
    assert all(status[k][0] == "failed" for k in set(status) - set(permitted))  # not permitted
    results = pl.read_csv(tmp_path / "out" / "results.csv", infer_schema=False)
    settings = pl.read_csv(tmp_path / "out" / "settings.csv", infer_schema=False)
    pooled_id = settings.filter(pl.col("analysis_id") == "cf_pooled")["result_id"].item()
    overall = results.filter(pl.col("result_id") == pooled_id, pl.col("strata_name") == "overall")[
        "estimate_value"
    ].item()
    truth = true_counts(synthetic_node_dbs, study).filter(pl.col("strata_name") == "overall")
    assert abs(int(overall) - truth["value"].sum()) <= 8
    plain = results.filter(
        pl.col("result_id") != pooled_id,
        pl.col("strata_name") == "overall",
        pl.col("variable_name") == "Number subjects",
    )
    counts = dict(zip(plain["estimate_name"], plain["estimate_value"], strict=True))
    assert counts["count"] == "NA" and counts["nodes_contributing"] == "0"  # withheld everywhere
