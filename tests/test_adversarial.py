"""The attack table: every attack on a node's releases that issues 9 and 10 describe, run against
real gates on generated CDMs, with what each must end in and what it did.

Each row: attack, analysis, expected (``refused`` or ``answered safely``), observed, and persons
exposed (the number of persons whose value the attacker can derive from what was released: must
be 0). The table is printed and written as JSON to ``test-artifacts/adversarial.json``; the test
fails on any row whose outcome differs from the expected one or that exposes anyone. Each attack
also has its own focused test beside the code it exercises (``test_gate``, ``test_transcript``,
``test_privacy_disclosure``, ``test_render``).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import polars as pl
import pytest
from test_gate import (
    FINE,
    KEYED,
    STUDY,
    _aged,
    _counts_study,
    ask,
    build_cdm,
    permit,
    world,  # noqa: F401 - a fixture
    write_policy,
)

from node.gate import Gate
from node.policy import load_policy
from node.transcript import signed_release, transcript_json
from privacy.accounting import epsilon_to_rho
from privacy.disclosure import protect
from studies.analyses.pooling import pool
from studies.analysis import CombineInput
from studies.canonical import study_hash
from studies.loading import study_from_data
from studies.permit import PermitAnalysis
from studies.render import render_study
from studies.rounds import next_state
from studies.statistics import WITHHELD_KEYS, from_ipc, make_statistics

ARTIFACTS = Path(__file__).resolve().parents[1] / "test-artifacts"
Row = dict[str, Any]


def _row(attack: str, analysis: str, expected: str, observed: str, exposed: int) -> Row:
    return {
        "attack": attack,
        "analysis": analysis,
        "expected": expected,
        "observed": observed,
        "persons_exposed": exposed,
    }


def _gate(root: Path, w: dict[str, Any], name: str = "node-a", **privacy: Any) -> Gate:
    return Gate(load_policy(write_policy(root / name, w, name=name, **privacy)))


def _permit_for(w: dict[str, Any], study: dict[str, Any], **grants: Any) -> dict[str, Any]:
    digest = study_hash(study_from_data(study))
    analyses = [PermitAnalysis(id=a["id"], **grants) for a in study["analyses"]]
    return permit(w, study_hash=digest, analyses=analyses)


def chosen_glm_coefficients(root: Path, w: dict[str, Any]) -> Row:
    """Issue 9: a coordinator sends its own beta with a genuine round-0 transcript."""
    gate, document = _gate(root, w), permit(w)
    first = ask(gate, document, "risk")
    state = next_state(
        study_from_data(STUDY).analysis("risk"), {"node-a": from_ipc(first.statistics)}, None
    )
    chosen = state | {"beta": [-40.0, 40.0]}
    transcript = transcript_json(None, [signed_release(first)])
    reply = ask(gate, document, "risk", state=chosen, round=1, transcript=transcript)
    return _row("coordinator-chosen GLM coefficients", "glm", "refused",
                "answered" if reply.released else "refused", int(reply.released))  # fmt: skip


def chosen_cox_grid(root: Path, w: dict[str, Any]) -> Row:
    """Issue 9: a round-1 Cox state with a grid of one chosen event day and chosen beta."""
    gate, document = _gate(root, w), permit(w)
    first = ask(gate, document, "hazard")
    transcript = transcript_json(None, [signed_release(first)])
    chosen = {"grid": [1247], "events": [1.0], "beta": [3.0], "iteration": 0}
    reply = ask(gate, document, "hazard", state=chosen, round=1, transcript=transcript)
    return _row("coordinator-chosen Cox grid and beta", "cox", "refused",
                "answered" if reply.released else "refused", int(reply.released))  # fmt: skip


def forked_round(root: Path, w: dict[str, Any]) -> Row:
    """Issue 9: the same round asked again on another roster, to see a second matrix."""
    gates = {n: _gate(root, w, n, min_nodes=1) for n in ("node-a", "node-b")}
    document = permit(w)
    spec = study_from_data(STUDY).analysis("risk")
    firsts = {n: ask(g, document, "risk") for n, g in gates.items()}
    both = transcript_json(None, [signed_release(r) for r in firsts.values()])
    state = next_state(spec, {n: from_ipc(r.statistics) for n, r in firsts.items()}, None)
    assert ask(gates["node-a"], document, "risk", state=state, round=1, transcript=both).released
    alone = transcript_json(None, [signed_release(firsts["node-a"])])
    fork = next_state(spec, {"node-a": from_ipc(firsts["node-a"].statistics)}, None)
    reply = ask(gates["node-a"], document, "risk", state=fork, round=1, transcript=alone)
    return _row("a released round asked again on another transcript", "glm", "refused",
                "answered" if reply.released else "refused", int(reply.released))  # fmt: skip


def rounds_beyond_declared(root: Path, w: dict[str, Any]) -> Row:
    """Issue 9: more rounds than the analysis declares (here the permit lowers them to 1)."""
    gate = _gate(root, w)
    document = permit(w, analyses=[PermitAnalysis(id="risk", max_rounds=1)])
    first = ask(gate, document, "risk")
    state = next_state(
        study_from_data(STUDY).analysis("risk"), {"node-a": from_ipc(first.statistics)}, None
    )
    transcript = transcript_json(None, [signed_release(first)])
    reply = ask(gate, document, "risk", state=state, round=1, transcript=transcript)
    return _row("a round beyond the declared maximum", "glm", "refused",
                "answered" if reply.released else "refused", int(reply.released))  # fmt: skip


def one_year_age_band(root: Path, w: dict[str, Any]) -> Row:
    """Issue 10: the only 85-year-old man's own age band."""
    reply = ask(_gate(root, w), _permit_for(w, FINE), "one_year_band", study=FINE)
    return _row("a one-year age band around one person", "counts", "refused",
                "answered" if reply.released else "refused", int(reply.released))  # fmt: skip


def daily_nested_periods(root: Path, w: dict[str, Any]) -> Row:
    """Issue 10: periods [1900-01-01, D] and [1900-01-01, D+1]: their difference is one day."""
    study = {
        **FINE,
        "analyses": [
            {**FINE["analyses"][2], "periods": [
                {"start": "1900-01-01", "end": "2015-05-31"},
                {"start": "1900-01-01", "end": "2015-06-01"},
            ]},
        ],
    }  # fmt: skip
    reply = ask(_gate(root, w), _permit_for(w, study), "daily_periods", study=study)
    return _row("nested prevalence periods one day apart", "prevalence", "refused",
                "answered" if reply.released else "refused", int(reply.released))  # fmt: skip


def zero_beside_a_suppressed_cell() -> Row:
    """Issue 10: n_event 0 beside n_censor 1 would say the lone man had no event."""
    frame = make_statistics(
        pl.DataFrame(
            {
                "cohort": "km",
                "strata_name": "sex",
                "strata_level": "Male",
                "variable_name": "time",
                "variable_level": "1655",
                "estimate_name": ["n_risk", "n_event", "n_censor"],
                "release_class": "count",
                "value": [1.0, 0.0, 1.0],
            }
        )
    )
    out, _ = protect(frame, 10)
    exposed = int(out["value"].is_finite().any())
    return _row("an exact zero beside a suppressed count", "survival", "answered safely",
                "answered safely" if not exposed else "leaked", exposed)  # fmt: skip


def complement_of_two_large_counts() -> Row:
    """Issue 10: records 1242 and events 1241 give one person without the event."""
    frame = make_statistics(
        pl.DataFrame(
            {
                "cohort": "cf",
                "variable_name": "log_odds_ratio",
                "estimate_name": ["target_records", "target_events"],
                "release_class": "count",
                "value": [1242.0, 1241.0],
            }
        )
    )
    out, _ = protect(frame, 10)
    exposed = int(out["value"].is_finite().all())
    return _row("two large counts one person apart", "meta", "answered safely",
                "answered safely" if not exposed else "leaked", exposed)  # fmt: skip


def keys_of_withheld_rows(root: Path, w: dict[str, Any]) -> Row:
    """Issue 10: a withheld concept row still naming the concept (one person's bleed)."""
    cdm = build_cdm(root / "five.duckdb", 3, 2)
    gate = Gate(load_policy(write_policy(root / "keys", w, cdm=cdm)))
    reply = ask(gate, _permit_for(w, KEYED), "later", study=KEYED)
    released = from_ipc(reply.statistics)
    exposed = int(released["variable_level"].str.contains("192671").sum())
    observed = "answered safely" if reply.released and not exposed else "leaked"
    return _row("the key of a withheld concept row", "characterization", "answered safely",
                observed, exposed)  # fmt: skip


def presence_of_dp_strata(root: Path, w: dict[str, Any]) -> Row:
    """Issue 10: DP counts by calendar year show which years exist, at no privacy cost."""
    cdm = build_cdm(root / "five_dp.duckdb", 3, 2)
    gate = Gate(load_policy(write_policy(root / "dp", w, cdm=cdm)))
    rho = epsilon_to_rho(1.0, 1e-6)
    document = _permit_for(w, KEYED, mechanism="gaussian", cost=rho / 2)  # years: every row
    reply = ask(gate, document, "years", study=KEYED)
    years = from_ipc(reply.statistics).filter(
        pl.col("strata_name").str.contains("calendar_year")
        & (pl.col("variable_level") != WITHHELD_KEYS)
    )
    exposed = years.height
    observed = "answered safely" if reply.released and not exposed else "leaked"
    return _row("calendar years revealed by presence under DP", "counts", "answered safely",
                observed, exposed)  # fmt: skip


def cohorts_one_person_apart(root: Path, w: dict[str, Any]) -> Row:
    """Issue 10: two cohorts a few persons apart in one study, then across two studies."""
    gate = _gate(root, w)
    nested = _counts_study("nested", [_aged("to_61", 61), _aged("to_60", 60)])
    inside = ask(gate, _permit_for(w, nested), "n", study=nested)
    first = _counts_study("first", [_aged("to_61", 61)])
    second = _counts_study("second", [_aged("to_60", 60)])
    assert ask(gate, _permit_for(w, first), "n", study=first).released
    across = ask(gate, _permit_for(w, second), "n", study=second)
    released = inside.released or across.released
    return _row("two cohorts a few persons apart (in one study, across studies)", "counts",
                "refused", "answered" if released else "refused", int(released))  # fmt: skip


def partial_pool() -> Row:
    """Issue 10: a cell one node withheld, pooled over the others, understates it."""

    def node(value: float) -> pl.DataFrame:
        return make_statistics(
            pl.DataFrame({"cohort": "c", "estimate_name": "count", "release_class": "count",
                          "variable_name": "Number subjects", "value": [value]})
        )  # fmt: skip

    pooled = pool(CombineInput([node(40.0), node(math.nan), node(35.0)], ["a", "b", "c"]))
    partial = pooled["value"].is_not_null().any()
    return _row("a pooled cell missing one node's part", "counts", "answered safely",
                "leaked" if partial else "answered safely", 0)  # fmt: skip


def review_hides_a_forged_concept() -> Row:
    """Issue 10: a Circe set named "Gastrointestinal hemorrhage" holding cystic fibrosis."""
    path = Path(__file__).resolve().parents[1] / "examples/gibleed_circe/cohorts/celecoxib.json"
    circe = json.loads(path.read_text())
    item = circe["ConceptSets"][0]["expression"]["items"][0]["concept"]
    item["CONCEPT_ID"], item["CONCEPT_NAME"] = 441267, "Gastrointestinal hemorrhage"
    study = study_from_data(
        {
            "name": "forged",
            "cohorts": [{"name": "target", "circe": circe}],
            "analyses": [{"id": "n", "kind": "counts", "cohorts": ["target"]}],
        }
    )
    shown = "441267 Cystic fibrosis" in render_study(study)
    return _row("a forged concept set name in review", "render", "answered safely",
                "answered safely" if shown else "hidden", 0)  # fmt: skip


def rows_per_person_under_stated(root: Path, w: dict[str, Any]) -> Row:
    """Issue 9: a permit's rows per person below the analysis's declaration under-noises."""
    grant = PermitAnalysis(id="n", mechanism="gaussian", cost=0.01, max_rows_per_person=1)
    reply = ask(_gate(root, w), permit(w, analyses=[grant]))
    return _row("a permit's rows per person below the declaration", "counts", "refused",
                "released" if reply.released else "refused", 0)  # fmt: skip


def permit_delta_near_one(root: Path, w: dict[str, Any]) -> Row:
    """Issue 9: at the permit's delta 0.5, epsilon 1 would buy 10x the node's rho budget."""
    grant = PermitAnalysis(
        id="n", mechanism="gaussian", cost=1.5 * epsilon_to_rho(1.0, 1e-6), max_rows_per_person=4
    )
    reply = ask(
        _gate(root, w, max_epsilon_per_permit=100.0), permit(w, analyses=[grant], delta=0.5)
    )
    return _row("a permit's delta near 1 inflating the budget", "counts", "refused",
                "released" if reply.released else "refused", 0)  # fmt: skip


def oversized_key_id(root: Path, w: dict[str, Any]) -> Row:
    """Issue 9: an unsigned permit with a 20 MB key id, once echoed in the reply and audit."""
    gate = _gate(root, w)
    document = permit(w)
    document["signature"]["key_id"] = "k" * 20_000_000
    reply = ask(gate, document)
    audit = gate.policy.audit_path.stat().st_size
    bounded = not reply.released and len(reply.reason) <= 500 and audit < 2_000
    return _row("a 20 MB key id echoed in the refusal", "counts", "refused",
                "refused" if bounded else "echoed", 0)  # fmt: skip


NODE_ATTACKS: list[Callable[[Path, dict[str, Any]], Row]] = [
    chosen_glm_coefficients,
    chosen_cox_grid,
    forked_round,
    rounds_beyond_declared,
    one_year_age_band,
    daily_nested_periods,
    keys_of_withheld_rows,
    presence_of_dp_strata,
    cohorts_one_person_apart,
    rows_per_person_under_stated,
    permit_delta_near_one,
    oversized_key_id,
]
TABLE_ATTACKS: list[Callable[[], Row]] = [
    zero_beside_a_suppressed_cell,
    complement_of_two_large_counts,
    partial_pool,
    review_hides_a_forged_concept,
]


@pytest.mark.slow
def test_the_attack_table_exposes_no_one(tmp_path: Path, world) -> None:  # noqa: F811
    rows = []
    for attack in NODE_ATTACKS:
        (tmp_path / attack.__name__).mkdir()
        rows.append(attack(tmp_path / attack.__name__, world))
    rows += [attack() for attack in TABLE_ATTACKS]
    ARTIFACTS.mkdir(exist_ok=True)
    (ARTIFACTS / "adversarial.json").write_text(json.dumps(rows, indent=2))
    width = max(len(r["attack"]) for r in rows)
    for r in rows:
        print(f"{r['attack']:<{width}}  {r['analysis']:<16} {r['expected']:<16} "
              f"{r['observed']:<16} {r['persons_exposed']}")  # fmt: skip
    wrong = [r for r in rows if r["observed"] != r["expected"] or r["persons_exposed"]]
    assert not wrong, wrong
    assert len(rows) == len(NODE_ATTACKS) + len(TABLE_ATTACKS)
