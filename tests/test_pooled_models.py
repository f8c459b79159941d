"""Pooled GLM and pooled Kaplan–Meier through real gates on three ETL-built synthetic nodes.

The pooled GLM first sums its guard counts (persons per level) with noise shares, then its sums
pass the exact secure sum every Newton step (fixed point, 128-bit ring): it equals the plain
federated GLM through the same gates within 1e-8 and statsmodels on the union's design rows,
and only the guard sum is charged. A small pooled guard level stops it after the guard sum, no
score summed; a coordinator that skips, forges or reorders the guard sum is refused. The pooled
Kaplan–Meier table's combine, on the nodes' exact
tables, equals lifelines on the union's times coarsened to its segments; through the gates it
takes noisy grants only (an exact one would show the coordinator small per-bin totals), and its
noisy curve keeps segments of 0 or at least k. The attacks on the new analyses are refused: a forged
masked vector, a roster below the minimum, a node asked to unmask a node that did send; and the
coordinator's view of a pooled GLM round holds uniform masked vectors only."""

from __future__ import annotations

import base64
import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import duckdb
import numpy as np
import polars as pl
import pytest
import statsmodels.api as sm
from _helpers import signed_permit, write_node_policy
from lifelines import KaplanMeierFitter
from test_pooled import NODES, asker, pooling_keys
from typer.testing import CliRunner

from coordinator.rare_disease import in_process_asker
from fedomop.cli import app
from node.gate import Gate
from node.messages import GateRequest
from node.policy import load_policy
from node.pooled import PooledNode, pooled_release
from node.transcript import signed_release, transcript_json
from privacy.accounting import epsilon_to_rho
from privacy.fixed_point import RING_BITS, encode
from privacy.ledger import Ledger
from privacy.secagg import SecAggError, pooled_charge
from studies.analyses import REGISTRY
from studies.analyses.glm import _design, guard_person_counts
from studies.analyses.node_sql import ENTRIES_CTE, entries_params, query
from studies.analyses.pooled_glm import guard_layout, vector_rows
from studies.analyses.secure_sum import SumPlan, advance, next_sum
from studies.analyses.survival import TIME_TO_EVENT_CTE, time_to_event_params
from studies.analysis import CombineInput
from studies.canonical import study_hash
from studies.loading import study_from_data
from studies.permit import PermitAnalysis, generate_keypair, load_private_key
from studies.runner import drive, local_step, prepare_cdm
from studies.statistics import from_ipc, to_ipc

MODEL = {
    "family": "binomial",
    "cohort": "amoxicillin",
    "outcome": "pneumonia",
    "outcome_window": {"start": 1, "end": 3650},
    "covariates": [
        {"type": "age", "center": 40, "scale": 10},
        {"type": "sex"},
        {"type": "cohort", "cohort": "bronchitis", "window": {"start": -3650, "end": -1}},
    ],
}
STUDY = {
    "name": "pooled_models",
    "concept_sets": [
        {"name": "amoxicillin", "concepts": [1713332], "include_descendants": True},
        {"name": "pneumonia", "concepts": [255848], "include_descendants": True},
        {"name": "bronchitis", "concepts": [260139], "include_descendants": True},
    ],
    "cohorts": [
        {"name": "amoxicillin", "entry": {"domain": "drug", "concept_set": "amoxicillin"}},
        {
            "name": "pneumonia",
            "entry": {"domain": "condition", "concept_set": "pneumonia", "events": "all"},
        },
        {
            "name": "bronchitis",
            "entry": {"domain": "condition", "concept_set": "bronchitis", "events": "all"},
        },
    ],
    "analyses": [
        {"id": "logit", "kind": "glm", **MODEL},
        {"id": "pooled_logit", "kind": "pooled_glm", **MODEL},
        {
            "id": "pooled_km",
            "kind": "pooled_survival",
            "target_cohorts": ["amoxicillin"],
            "outcome": "pneumonia",
            "time_bin_days": 365,
            "follow_up_days": 3650,
        },
    ],
}


KM_RHO = 0.5
"""The pooled Kaplan–Meier grant's rho on the total."""
GUARD_RHO = 1.0
"""The pooled GLM grant's rho: its noisy guard sum's, on the total (the Newton sums are exact)."""


@pytest.fixture(scope="module")
def study() -> Any:
    return study_from_data(STUDY)


@pytest.fixture()
def federation(synthetic_node_dbs, study, tmp_path) -> tuple[dict[str, Gate], dict, dict]:
    """Three gates, a permit granting the plain GLM without noise, the pooled ones gaussian,
    binding every node's identity; returns (gates, study document, permit document)."""
    private, public, _ = generate_keypair(tmp_path / "keys", "body")
    gates = {}
    for name, db in zip(NODES, synthetic_node_dbs, strict=True):
        policy = write_node_policy(
            tmp_path / name, name=name, cdm=db, permit_body_key=public,
            privacy={"max_epsilon_per_permit": 100.0, "max_epsilon_per_year": 1000.0},
            allowed=["glm", "pooled_glm", "pooled_survival"],
        )  # fmt: skip
        gates[name] = Gate(load_policy(policy))
    document = signed_permit(
        load_private_key(private),
        study_hash=study_hash(study),
        study_name=study.name,
        nodes=NODES,
        analyses=[
            PermitAnalysis(id="logit"),
            PermitAnalysis(id="pooled_logit", mechanism="gaussian", cost=GUARD_RHO),
            PermitAnalysis(id="pooled_km", mechanism="gaussian", cost=KM_RHO),
        ],
        epsilon=60.0,
        node_keys=pooling_keys(tmp_path),
    )
    return gates, study.model_dump(mode="json", exclude_none=True), document


def coefficients(result: pl.DataFrame, estimate: str) -> dict[str, float]:
    rows = result.filter(pl.col("estimate_name") == estimate)
    return {r["variable_name"]: float(r["estimate_value"]) for r in rows.iter_rows(named=True)}


def union_design(dbs: list[Path], study: Any) -> tuple[np.ndarray, np.ndarray]:
    """The union's design rows: each node's, read back from the table its GLM round uses."""
    xs, ys = [], []
    spec = study.analysis("logit")
    for db in dbs:
        with duckdb.connect(str(db), read_only=True) as con:
            cdm = prepare_cdm(con, study)
            table, _ = _design(cdm, spec)
            frame = query(cdm.con, f"SELECT * FROM {table}", {})
        xs.append(frame.select(f"x{i}" for i in range(len(spec.terms))).to_numpy())
        ys.append(frame["y"].to_numpy())
    return np.vstack(xs), np.concatenate(ys)


def test_pooled_glm_equals_the_plain_federated_glm_and_statsmodels(
    synthetic_node_dbs, study, federation
) -> None:
    gates, doc, document = federation
    plain = drive(
        REGISTRY["glm"](), study.analysis("logit"), asker(gates, doc, document, "logit", [])
    )
    replies: list = []
    ask = asker(gates, doc, document, "pooled_logit", replies)
    pooled = drive(REGISTRY["pooled_glm"](), study.analysis("pooled_logit"), ask)
    for estimate in ("coefficient", "standard_error"):
        a, b = coefficients(plain, estimate), coefficients(pooled, estimate)
        assert a.keys() == b.keys() and len(a) == 4
        assert all(abs(a[k] - b[k]) < 1e-8 for k in a), (a, b)
    x, y = union_design(synthetic_node_dbs, study)
    reference = sm.GLM(y, x, family=sm.families.Binomial()).fit(tol=1e-12)
    beta = coefficients(pooled, "coefficient")
    assert np.allclose(list(beta.values()), reference.params, atol=1e-8)
    assert np.allclose(
        list(coefficients(pooled, "standard_error").values()), reference.bse, atol=1e-8
    )
    # five rounds for the guard sum and per Newton step, every node in each; only the guard
    # sum's masked round (2) charged, the same rho at every node; the Newton sums are exact
    rounds = sorted({r for r, _ in replies})
    assert rounds == list(range(len(rounds))) and len(rounds) % 5 == 0 and len(rounds) >= 20
    charged = {reply.settings["rho_charged"] for q, reply in replies if q == 2}
    rows = len(guard_layout(study.analysis("pooled_logit")))  # 7: records, 2 outcome, 2 x 2
    preview = pooled_charge(GUARD_RHO, rows, rows, len(NODES), 2).rho_booked  # permit review's
    assert rows == 7 and len(charged) == 1 and charged.pop() == pytest.approx(preview, rel=1e-9)
    assert all(reply.settings["rho_charged"] == 0.0 for q, reply in replies if q != 2)
    permit_id = document["body"]["permit_id"]
    spent = {Ledger(g.policy.ledger_path).spent(permit_id) for g in gates.values()}
    assert len(spent) == 1 and spent.pop() > 0
    # each sum has fresh keys: the rosters of the guard sum and of two Newton steps share none
    keys = [
        from_ipc(r.statistics) for q, r in replies if q in (0, 5, 10) and r.node_name == NODES[0]
    ]
    guard, first, second = (
        set(k.filter(pl.col("estimate_name") == "mask_key")["variable_level"]) for k in keys
    )
    assert guard and first and not (guard & first or first & second or guard & second)


def test_permit_review_shows_the_pooled_glms_guard_sum_charge(tmp_path) -> None:
    """``permit review`` says the pooled GLM's grant is its guard sum's, the guard rows per
    person (3 + 2 per binary covariate) and the charge per node the gates book."""
    path = tmp_path / "study.json"
    path.write_text(json.dumps(STUDY))
    result = CliRunner().invoke(
        app, ["permit", "review", str(path), "--budget", "6"], env={"COLUMNS": "400"}
    )
    assert result.exit_code == 0, result.output
    head = "pooled_logit (pooled, gaussian"
    line = next(x for x in result.output.splitlines() if x.startswith(head))
    assert "its guard sum only, before any score or information is summed" in line
    assert "7 rows/person" in line
    rho = epsilon_to_rho(6.0, 1e-6) / len(STUDY["analyses"])
    tables = result.output.split(head)[1].split("pooled_km (pooled, gaussian")[0]
    for n in (3, 8, 20, 50):
        row = next(x for x in tables.splitlines() if x.strip("│ ").startswith(f"{n} "))
        assert f"{pooled_charge(rho, 7, 7, n, 2).rho_booked:.6g}" in row, row


def test_the_coordinators_view_of_a_pooled_glm_round_holds_masked_vectors_only(
    synthetic_node_dbs, study, federation
) -> None:
    """What the coordinator holds of a masked round: one uniform hex row per node, never the
    node's own score and information (which its plain GLM release would show), and whose
    top bits are balanced as uniform ring elements; their sum minus the revealed masks is the
    total, which is all it learns."""
    gates, doc, document = federation
    replies: list = []
    spec = study.analysis("pooled_logit")
    drive(REGISTRY["pooled_glm"](), spec, asker(gates, doc, document, "pooled_logit", replies))
    masked = [r for q, r in replies if q == 7]  # the first Newton step's masked round
    width = RING_BITS // 8
    length = len(vector_rows(spec)) + 1
    tops = []
    for reply, db in zip(masked, synthetic_node_dbs, strict=True):
        table = from_ipc(reply.statistics)
        assert table.height == 1 and table["estimate_name"].item() == "masked_vector"
        assert set(table["value"].to_list()) == {0.0}
        blob = bytes.fromhex(table["variable_level"].item())
        assert len(blob) == length * width
        values = [int.from_bytes(blob[i : i + width], "big") for i in range(0, len(blob), width)]
        own = local_step(db, study, "pooled_logit").sort(
            ["cohort", "strata_name", "strata_level", "variable_name", "variable_level",
             "estimate_name"]
        )  # fmt: skip
        mine = encode(own["value"].to_list())
        assert not set(values) & {v % (1 << RING_BITS) for v in mine}
        assert not any(abs(v) < 2**100 for v in values)  # no small (unmasked) entry
        tops += [v >> (RING_BITS - 1) for v in values]
    assert 0.2 < sum(tops) / len(tops) < 0.8  # 3 x 15 bits, balanced as uniform


def tamper(transcript: dict, node_index: int, change) -> dict:
    """The transcript with one node's signed release payload replaced (its signature kept)."""
    releases = [dict(r) for r in transcript["releases"]]
    table = from_ipc(base64.b64decode(releases[node_index]["statistics"]))
    releases[node_index]["statistics"] = base64.b64encode(to_ipc(change(table))).decode()
    return {**transcript, "releases": releases}


def run_rounds(gates, doc, document, analysis_id, spec, upto: int):
    """Rounds 0..upto-1 through the gates; the state and transcript of round ``upto``."""
    replies: list = []
    ask = asker(gates, doc, document, analysis_id, replies)
    state, analysis = None, REGISTRY[spec.kind]()
    for round_ in range(upto):
        released = ask(state, round_)
        state = analysis.combine(
            CombineInput(list(released.values()), list(released)), spec, state
        ).state
    last = [signed_release(r) for q, r in replies if q == upto - 1]
    return state, transcript_json(_previous(replies, spec, upto), last), replies


def _previous(replies, spec, upto):
    state, analysis = None, REGISTRY[spec.kind]()
    for round_ in range(upto - 1):
        released = {r.node_name: from_ipc(r.statistics) for q, r in replies if q == round_}
        names = sorted(released)
        inputs = CombineInput([released[n] for n in names], names)
        state = analysis.combine(inputs, spec, state).state
    return state


@pytest.mark.parametrize("analysis_id", ["pooled_logit", "pooled_km"])
def test_attacks_on_the_new_pooled_analyses_are_refused(study, federation, analysis_id) -> None:
    gates, doc, document = federation
    spec = study.analysis(analysis_id)
    permit_id = document["body"]["permit_id"]
    # a forged masked vector: rare-b's masked release altered in the transcript of round 3
    state, transcript, _ = run_rounds(gates, doc, document, analysis_id, spec, 3)
    forged = tamper(
        transcript, 1,
        lambda t: t.with_columns(
            variable_level=pl.col("variable_level").str.replace(r"^.", "f"),
            value=pl.col("value") + 1,
        ),
    )  # fmt: skip
    reply = gates["rare-a"].handle(GateRequest(doc, document, analysis_id, state, 3, forged))
    assert not reply.released and "does not match its claimed payload hash" in reply.reason
    # the state's copy of a masked vector altered: not the state the transcript gives
    changed = {**state["masked"], "rare-b": list(reversed(state["masked"]["rare-b"]))}
    bad = GateRequest(doc, document, analysis_id, state | {"masked": changed}, 3, transcript)
    reply = gates["rare-a"].handle(bad)
    assert not reply.released and "not the one its transcript gives" in reply.reason
    # unmasking a node that did send: U2 without rare-c although its vector arrived
    honest = gates["rare-a"].handle(GateRequest(doc, document, analysis_id, state, 3, transcript))
    assert honest.released, honest.reason
    without_c = {k: v for k, v in state["masked"].items() if k != "rare-c"}
    fake = state | {"survivors": ["rare-a", "rare-b"], "masked": without_c}
    ledger = Ledger(gates["rare-a"].policy.ledger_path)
    spent = ledger.spent(permit_id)  # the honest rounds' charge: the noisy (guard) sum's
    assert spent > 0
    reply = gates["rare-a"].handle(GateRequest(doc, document, analysis_id, fake, 3, transcript))
    assert not reply.released, "a second U2 for one round must be refused"
    assert ledger.spent(permit_id) == spent
    # a roster below the minimum: two nodes' keys are refused by the node and by combine
    keys_state, _, first = run_rounds(gates, doc, document, analysis_id, spec, 1)
    body = document["body"]
    node = PooledNode(
        name="rare-a", secret=gates["rare-a"].policy.secret_path.read_bytes(),
        context=f"{permit_id}|{body['study_hash']}|{analysis_id}", analysis_id=analysis_id,
        min_cell_count=10, permitted=NODES, identities=body["node_keys"], min_honest=2,
        exact_allowed=True,
    )  # fmt: skip
    two = {n: k for n, k in keys_state["roster"].items() if n != "rare-c"}
    grant = PermitAnalysis(id=analysis_id, mechanism="gaussian", cost=1.0)
    with pytest.raises(SecAggError, match="a pooled sum needs at least 3 nodes"):
        pooled_release(lambda: pytest.fail("no data"), keys_state | {"roster": two}, grant, node)
    pair = [r for _, r in first if r.node_name != "rare-c"]
    inputs = CombineInput([from_ipc(r.statistics) for r in pair], [r.node_name for r in pair])
    with pytest.raises(SecAggError, match="needs 3 nodes, has 2"):
        advance(inputs, None, SumPlan(spec.id, None, None, lambda name, frame: []))


def guard_union(dbs: list[Path], study: Any) -> dict[tuple[str, str], int]:
    """The exact pooled persons of each guard level (each node's own, summed here)."""
    spec = study.analysis("pooled_logit")
    total: dict[tuple[str, str], int] = {}
    for db in dbs:
        with duckdb.connect(str(db), read_only=True) as con:
            rows = guard_person_counts(prepare_cdm(con, study), spec)
        for row in rows.iter_rows(named=True):
            key = (row["variable_name"], row["variable_level"])
            total[key] = total.get(key, 0) + int(row["value"])
    return total


def strict_permit(document: dict, tmp_path: Path, min_cell_count: int) -> dict:
    """The federation's permit again, with a larger minimum cell count (a new permit id)."""
    body = document["body"]
    return signed_permit(
        load_private_key(tmp_path / "keys" / "body.key"),
        study_hash=body["study_hash"], study_name=body["study_name"], nodes=NODES,
        analyses=[PermitAnalysis.model_validate(a) for a in body["analyses"]], epsilon=60.0,
        node_keys=body["node_keys"], min_cell_count=min_cell_count,
    )  # fmt: skip


def test_a_small_noisy_guard_total_stops_the_pooled_glm_before_any_score_is_summed(
    synthetic_node_dbs, study, federation, tmp_path
) -> None:
    """The smallest pooled guard level far below k: the guard sum (noisy, charged) is the last
    thing released; no node ever sends a score or information, even when the coordinator goes
    on with forged guard totals, and each node charged the guard sum only."""
    gates, doc, document = federation
    spec = study.analysis("pooled_logit")
    exact = guard_union(synthetic_node_dbs, study)
    (name, level), smallest = min(exact.items(), key=lambda kv: kv[1])
    k = smallest + 40  # noise sd ~1.9 on the total: a z of 20 keeps it below k
    permit = strict_permit(document, tmp_path, k)
    replies: list = []
    ask = in_process_asker(gates, doc, permit, "pooled_logit", replies)
    with pytest.raises(SecAggError, match="noisy pooled guard counts below") as err:
        drive(REGISTRY["pooled_glm"](), spec, ask)
    assert (f"{name}={level}" if level else name) in str(err.value)
    assert {q for q, _ in replies} == set(range(5)) and all(r.released for _, r in replies)
    assert not any(
        (from_ipc(r.statistics)["estimate_name"] == "masked_vector").any() for _, r in replies
    )
    permit_id = permit["body"]["permit_id"]
    spent = {Ledger(g.policy.ledger_path).spent(permit_id) for g in gates.values()}
    assert len(spent) == 1 and next(iter(spent)) > 0
    # the coordinator goes on: the first Newton sum's keys round, with guard totals of its own
    reveal_state = _previous(replies, spec, 5)  # round 4's state, as every node derived it
    forged = next_sum(reveal_state, guards=[k] * len(exact))
    transcript = transcript_json(reveal_state, [signed_release(r) for q, r in replies if q == 4])
    for gate in gates.values():
        reply = gate.handle(GateRequest(doc, permit, "pooled_logit", forged, 5, transcript))
        assert not reply.released and "noisy pooled guard counts below" in reply.reason
    assert {Ledger(g.policy.ledger_path).spent(permit_id) for g in gates.values()} == spent


def test_a_coordinator_that_skips_forges_or_reorders_the_guard_sum_gets_no_score(
    study, federation
) -> None:
    """Each node derives that the guard sum happened and passed from the signed transcript (the
    state it computes on), then reads the guard totals itself against its own k: a state that
    skips the guard sum, forges its totals or puts a Newton sum in its place is refused, by the
    transcript rule at the gate and by the node's own check (``check_guard_sum``), before the
    node computes anything."""
    gates, doc, document = federation
    spec = study.analysis("pooled_logit")
    node = gates["rare-a"]
    # the honest run up to the first Newton sum's masked round (7): the guards passed
    newton, transcript, _ = run_rounds(gates, doc, document, "pooled_logit", spec, 7)
    assert (
        newton["phase"] == "masked"
        and newton["epoch"] == 1
        and all(t >= 10 for t in newton["guards"])
    )
    skipped = {k: v for k, v in newton.items() if k != "guards"}
    forged = newton | {"guards": [10**6] * len(newton["guards"])}
    for state in (skipped, forged):
        reply = node.handle(GateRequest(doc, document, "pooled_logit", state, 7, transcript))
        assert not reply.released and "not the one its transcript gives" in reply.reason
    # reordered: the guard sum's masked round (2) asked as if the guards had passed
    guard, guard_transcript, _ = run_rounds(gates, doc, document, "pooled_logit", spec, 2)
    assert guard["phase"] == "masked" and "guards" not in guard and guard.get("epoch", 0) == 0
    early = guard | {"guards": newton["guards"], "epoch": 1}
    reply = node.handle(GateRequest(doc, document, "pooled_logit", early, 2, guard_transcript))
    assert not reply.released and "not the one its transcript gives" in reply.reason
    # the node's own reading of the state, whatever derived it: no compute without a passed
    # guard sum, with its own k (here above the noisy totals), never in the guard sum's epoch
    body = document["body"]
    pooled = PooledNode(
        name="rare-a", secret=node.policy.secret_path.read_bytes(),
        context=f"{body['permit_id']}|{body['study_hash']}|pooled_logit",
        analysis_id="pooled_logit", min_cell_count=10, permitted=NODES,
        identities=body["node_keys"], min_honest=2, exact_allowed=True,
    )  # fmt: skip
    grant = PermitAnalysis(id="pooled_logit", mechanism="gaussian", cost=GUARD_RHO)
    strict = replace(pooled, min_cell_count=max(newton["guards"]) + 1)
    for state, who, why in (
        (skipped, pooled, "a sum after the first carries no guard totals"),
        (newton | {"guards": "passed"}, pooled, "not a list of whole numbers"),
        (newton, strict, "below this node's minimum cell count"),
        (guard | {"guards": newton["guards"]}, pooled, "in the guard sum's own epoch"),
    ):
        with pytest.raises(SecAggError, match=why):
            pooled_release(lambda: pytest.fail("computed on a bad state"), state, grant, who)
    # and model sums are never sent in the guard sum's place (its epoch, no guards)
    sums = local_step_at(node, study, newton)
    with pytest.raises(SecAggError, match="only after it"):
        pooled_release(lambda: sums, guard, grant, pooled)
    # the honest masked rounds pass the same checks
    for state in (guard, newton):
        released, _ = pooled_release(
            lambda s=state: local_step_at(node, study, s), state, grant, pooled
        )
        assert released.height >= 1


def local_step_at(gate: Gate, study: Any, state: dict) -> pl.DataFrame:
    """``pooled_logit``'s statistics on a gate's CDM at ``state`` (what its compute returns)."""
    with duckdb.connect(str(gate.policy.cdm_path), read_only=True) as con:
        return REGISTRY["pooled_glm"]().local(
            prepare_cdm(con, study), study.analysis("pooled_logit"), state
        )


def union_times(dbs: list[Path], study: Any) -> pl.DataFrame:
    """Per person (first amoxicillin entry): the binned time and event flag, from each node."""
    spec = study.analysis("pooled_km")
    out = []
    for db in dbs:
        with duckdb.connect(str(db), read_only=True) as con:
            cdm = prepare_cdm(con, study)
            sql = f"""WITH {ENTRIES_CTE}, {TIME_TO_EVENT_CTE}
                SELECT t, event FROM binned QUALIFY row_number() OVER (
                    PARTITION BY cohort_name, subject_id ORDER BY cohort_start_date) = 1"""
            params = entries_params(cdm, spec.target_cohorts) | time_to_event_params(
                cdm, spec.outcome, spec.outcome_washout, spec.follow_up_days, spec.time_bin_days
            )
            out.append(query(cdm.con, sql, params))
    return pl.concat(out)


def _km_curve(result: pl.DataFrame) -> pl.DataFrame:
    curve = result.filter(pl.col("additional_name") == "time")
    return curve.pivot(on="estimate_name", index="additional_level", values="estimate_value")


def test_pooled_kaplan_meier_equals_lifelines_on_the_union(
    synthetic_node_dbs, study, federation
) -> None:
    """The exact reference: combine on each node's own table (no gate, no masks) equals
    lifelines; through the gates the noisy curve keeps segments of 0 or at least k."""
    spec = study.analysis("pooled_km")
    tables = {
        f"n{i}": local_step(db, study, "pooled_km") for i, db in enumerate(synthetic_node_dbs)
    }
    wide = _km_curve(drive(REGISTRY["pooled_survival"](), spec, lambda state, round_: tables))
    grid = sorted(int(t) for t in wide["additional_level"])
    assert len(grid) >= 3
    times = union_times(synthetic_node_dbs, study)
    coarse = [grid[np.searchsorted(grid, t)] for t in times["t"].to_list()]
    fitter = KaplanMeierFitter().fit(coarse, times["event"].to_list())
    table = fitter.event_table
    for row in wide.iter_rows(named=True):
        t = int(row["additional_level"])
        assert float(row["estimate"]) == pytest.approx(
            float(fitter.survival_function_at_times(t).iloc[0]), abs=1e-10
        )
        if t in table.index and t > 0:
            assert int(row["n_risk"]) == int(table.loc[t, "at_risk"])
            assert int(row["n_event"]) == int(table.loc[t, "observed"])
            assert int(row["n_censor"]) == int(table.loc[t, "censored"])
    # every segment's pooled events and censorings are 0 or at least the cell count
    counts = wide.select(pl.col("n_event", "n_censor").cast(pl.Int64))
    assert all(v == 0 or v >= 10 for v in counts.to_numpy().ravel())
    # through the gates (noisy grant): a survival curve on segments of 0 or >= k, each node
    # charged the same positive rho (the noise scale itself: test_secagg's statistical test)
    gates, doc, document = federation
    noisy = _km_curve(
        drive(REGISTRY["pooled_survival"](), spec, asker(gates, doc, document, "pooled_km", []))
    )
    estimate = noisy.sort(pl.col("additional_level").cast(pl.Int64))["estimate"].cast(pl.Float64)
    assert len(estimate) >= 2 and estimate[0] <= 1.0 and (estimate.diff().drop_nulls() <= 0).all()
    released = noisy.select(pl.col("n_event", "n_censor").cast(pl.Int64)).to_numpy().ravel()
    assert all(v == 0 or v >= 10 for v in released)
    permit_id = document["body"]["permit_id"]
    charged = {Ledger(g.policy.ledger_path).spent(permit_id) for g in gates.values()}
    assert len(charged) == 1 and charged.pop() > 0


@pytest.mark.parametrize("analysis_id", ["pooled_km", "pooled_logit"])
def test_an_exact_pooled_grant_is_refused(study, federation, tmp_path, analysis_id) -> None:
    """A permit granting pooled survival without noise: the coordinator would unmask exact
    per-bin totals (a bin with one event is one person's event time); the pooled GLM without
    noise: its guard sum would have no noise to be released with. Every node refuses."""
    gates, doc, document = federation
    body = dict(document["body"])
    analyses = [a for a in body["analyses"] if a["id"] != analysis_id] + [{"id": analysis_id}]
    private = load_private_key(tmp_path / "keys" / "body.key")
    exact = signed_permit(
        private,
        study_hash=body["study_hash"],
        study_name=body["study_name"],
        nodes=NODES,
        analyses=[PermitAnalysis.model_validate(a) for a in analyses],
        epsilon=60.0,
        node_keys=body["node_keys"],
    )
    for name, gate in gates.items():
        reply = gate.handle(GateRequest(doc, exact, analysis_id, None, 0, None))
        assert not reply.released, name
        assert "must grant it mechanism 'gaussian'" in reply.reason
        assert Ledger(gate.policy.ledger_path).spent(exact["body"]["permit_id"]) == 0


def test_a_node_that_requires_dp_takes_no_part_in_the_pooled_glm(
    synthetic_node_dbs, federation, tmp_path
) -> None:
    """``require_dp``: the pooled GLM's gaussian grant covers its guard sum only; its Newton
    sums are exact, so such a node refuses it (and still answers the noisy pooled survival)."""
    gates, doc, document = federation
    policy = write_node_policy(
        tmp_path / "rare-a", name="rare-a", cdm=synthetic_node_dbs[0],
        permit_body_key=tmp_path / "keys" / "body.pub",
        privacy={"max_epsilon_per_permit": 100.0, "max_epsilon_per_year": 1000.0,
                 "require_dp": True},
        allowed=["glm", "pooled_glm", "pooled_survival"],
    )  # fmt: skip
    strict = Gate(load_policy(policy))
    reply = strict.handle(GateRequest(doc, document, "pooled_logit", None, 0, None))
    assert not reply.released
    assert "policy require_dp" in reply.reason and "exact model statistics" in reply.reason
    assert strict.handle(GateRequest(doc, document, "pooled_km", None, 0, None)).released
