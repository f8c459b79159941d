"""``fedomop demo --rare-disease``: the rare-disease example over 8 generated nodes.

Eight synthetic nodes (``omop_etl.synth``, the demo's profiles) each hold 1 to 6 patients with
cystic fibrosis. ``examples/rare_disease/study.yaml`` asks for the per-node counts every peer
network releases (each suppressed below 10 at every node: nothing) beside the pooled ones:
cases by sex and age-at-diagnosis band and by calendar year (``pooled_counts``), survival after
diagnosis (``pooled_survival``) and a logistic model of the diagnosis by age and sex
(``pooled_glm``). Every node is a real ``Gate`` with its own policy, ledger and audit log on its
own DuckDB CDM; the coordinator's transport is in-process (each round's request carries the
previous round's signed releases, as over Flower: ``coordinator.server_app``), which keeps the
example to a minute on a laptop. ``report.md`` and ``rare_disease.json`` say what was pooled,
what per-node suppression would have released, what each node revealed in each round and the
epsilon each spent.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import polars as pl

EXAMPLE_DIR = Path(__file__).resolve().parents[1] / "examples" / "rare_disease"
STUDY_PATH = EXAMPLE_DIR / "study.yaml"
RARE_PATIENTS = [3, 1, 5, 2, 6, 4, 2, 3]
"""Persons with the rare condition at each of the 8 nodes: 26 in all, at most 6 anywhere."""
NODE_PATIENTS = 800
KINDS = ["counts", "pooled_counts", "pooled_survival", "pooled_glm"]
GRANTS = {
    "cf_pooled": (0.5, 3),
    "cf_by_year_pooled": (0.5, 2),
    "cf_survival_pooled": (0.5, 1),
    "cf_model_pooled": (1.0, 5),
}
"""(rho on the total, rows per person as the analysis declares) of each noisy pooled release;
the model's is its noisy guard sum (records, both outcome levels, both sex levels: 5 rows per
person), before its exact Newton sums: rho 1.0 puts the 26 cases 5 noise sd above 10."""
MAX_EPSILON = 20.0
"""Each node's policy: epsilon per permit (three rho-0.5 releases are epsilon ~16 at 1e-6)."""
ROUND_CONTENT = {
    0: "two public keys signed by its identity",
    1: "Shamir shares of its mask seeds, encrypted to each peer",
    2: "its masked vector (counts plus its noise share, or fixed-point model sums once the "
    "model's noisy guard counts passed)",
    3: "its signature over the nodes whose vectors arrived",
    4: "one share per peer (of the self-mask seed, or of a dropped peer's mask key)",
}


def in_process_asker(
    gates: dict[str, Any],
    study_doc: dict,
    permit: dict,
    analysis_id: str,
    replies: list | None = None,
    lost: tuple[str, ...] = (),
    lost_from: int = 0,
) -> Callable[[dict | None, int], dict[str, pl.DataFrame]]:
    """``studies.runner.drive``'s ask_nodes over in-process gates: round t+1 carries round t's
    state and signed releases; refusals are left out (``lost`` nodes are not asked from round
    ``lost_from`` on: gone); every reply is appended to ``replies`` as (round, reply)."""
    from node.messages import GateRequest
    from node.transcript import signed_release, transcript_json
    from studies.statistics import from_ipc

    sent: dict[str, Any] = {"transcript": None}
    kept = replies if replies is not None else []

    def ask(state: dict | None, round_: int) -> dict[str, pl.DataFrame]:
        request = GateRequest(study_doc, permit, analysis_id, state, round_, sent["transcript"])
        out, signed = {}, []
        for name, gate in sorted(gates.items()):
            if name in lost and round_ >= lost_from:
                continue
            reply = gate.handle(request)
            kept.append((round_, reply))
            if reply.released:
                out[name] = from_ipc(reply.statistics)
                signed.append(signed_release(reply))
        sent["transcript"] = transcript_json(state, signed)
        return out

    return ask


@dataclass
class RareOutcome:
    """What the example released: per analysis its result (or why none), per node its view."""

    results: dict[str, pl.DataFrame] = field(default_factory=dict)
    failures: dict[str, str] = field(default_factory=dict)
    per_node_released: dict[str, int] = field(default_factory=dict)
    truth: dict[str, int] = field(default_factory=dict)
    nodes: dict[str, dict[str, Any]] = field(default_factory=dict)
    noise_sd: dict[str, float] = field(default_factory=dict)

    def pooled_count(self, analysis_id: str, strata: str = "overall", level: str = "overall"):
        table = self.results[analysis_id]
        row = table.filter((pl.col("strata_name") == strata) & (pl.col("strata_level") == level))
        value = row["estimate_value"].item() if row.height else "NA"
        return None if value == "NA" else int(value)


def run_rare_disease(
    out: Path, progress: Callable[[str], None] | None = None, patients: int = NODE_PATIENTS
) -> RareOutcome:
    """Build the nodes (reused when present), permit the study, run it through the gates."""
    from coordinator.demo import (
        build_demo_nodes,
        issue_permit,
        make_permit_body,
        node_identities,
        write_policy,
    )
    from node.gate import Gate
    from node.policy import load_policy
    from studies.loading import load_study
    from studies.permit import PermitAnalysis

    say = progress or (lambda _text: None)
    out = out.resolve()
    nodes = build_demo_nodes(out / "nodes", len(RARE_PATIENTS), say, patients, RARE_PATIENTS)
    keys = make_permit_body(out / "permit_body")
    policies = [
        write_policy(cdm.parent, name, cdm, keys.public, kinds=KINDS, max_epsilon=MAX_EPSILON)
        for name, cdm in nodes
    ]
    study = load_study(STUDY_PATH)
    grants = [
        PermitAnalysis(id=a, mechanism="gaussian", cost=rho, max_rows_per_person=rows)
        for a, (rho, rows) in GRANTS.items()
    ]
    permit = issue_permit(
        study, [name for name, _ in nodes], keys.private, out / "permit.json",
        epsilon=MAX_EPSILON, node_keys=node_identities(policies), grants=grants,
    )  # fmt: skip
    gates = {policy.node_name: Gate(policy) for policy in map(load_policy, policies)}
    outcome = RareOutcome(truth=_truth(nodes, study))
    _run_analyses(study, permit, gates, outcome, say)
    _node_views(permit, gates, outcome)
    write_report(out, outcome)
    say(f"report: {out / 'report.md'}")
    return outcome


def _run_analyses(study, permit, gates, outcome: RareOutcome, say) -> None:
    from studies.analyses import REGISTRY
    from studies.runner import drive

    doc = study.model_dump(mode="json", exclude_none=True)
    for spec in study.analyses:
        say(f"{spec.id} ({spec.kind}) through {len(gates)} gates")
        replies: list = []
        ask = in_process_asker(gates, doc, permit, spec.id, replies)
        try:
            outcome.results[spec.id] = drive(REGISTRY[spec.kind](), spec, ask)
        except (ValueError, RuntimeError) as err:
            outcome.failures[spec.id] = str(err)
        if spec.kind == "counts":  # what per-node reporting released: values not withheld
            first = [from_reply(r) for q, r in replies if q == 0 and r.released]
            outcome.per_node_released[spec.id] = sum(
                int(t.filter(pl.col("release_class") == "count")["value"].is_not_nan().sum())
                for t in first
            )
        for round_, reply in replies:
            node = outcome.nodes.setdefault(reply.node_name, {"rounds": {}, "epsilon": 0.0})
            node["rounds"].setdefault(spec.id, []).append(round_)
            if reply.settings.get("total_noise_sd"):
                outcome.noise_sd[spec.id] = float(reply.settings["total_noise_sd"])


def from_reply(reply: Any) -> pl.DataFrame:
    from studies.statistics import from_ipc

    return from_ipc(reply.statistics)


def _node_views(permit: dict, gates: dict, outcome: RareOutcome) -> None:
    """Each node's charge from its own ledger, in epsilon at its policy's delta."""
    from privacy.accounting import rho_to_epsilon
    from privacy.ledger import Ledger

    permit_id = permit["body"]["permit_id"]
    for name, gate in gates.items():
        rho = Ledger(gate.policy.ledger_path).spent(permit_id)
        view = outcome.nodes.setdefault(name, {"rounds": {}})
        view["rho"] = rho
        view["epsilon"] = rho_to_epsilon(rho, gate.policy.privacy.delta) if rho else 0.0


def _truth(nodes: list[tuple[str, Path]], study: Any) -> dict[str, int]:
    """Each node's true number of cases (its own exact count, never released): for the report's
    comparison only, as an operator could check on their own node."""
    from studies.runner import local_step

    truth = {}
    for name, cdm in nodes:
        table = local_step(cdm, study, "cf_pooled")
        truth[name] = int(table.filter(pl.col("strata_name") == "overall")["value"].item())
    return truth


def write_report(out: Path, outcome: RareOutcome) -> Path:
    """``report.md`` (pooled beside per-node numbers, what each node revealed, epsilon) and
    ``rare_disease.json`` (the same numbers)."""
    lines = ["# Rare-disease pooling: cystic fibrosis over 8 nodes", ""]
    lines += [
        "| | per-node reporting (suppressed below 10) | pooled (secure sum, noisy total) |",
        "|---|---|---|",
    ]
    cf = outcome.results.get("cf_pooled")
    per_node = outcome.per_node_released.get("cf_feasibility", 0)
    rows = cf.filter(pl.col("variable_name") == "Number subjects") if cf is not None else None
    for row in rows.iter_rows(named=True) if rows is not None else []:
        label = "overall" if row["strata_name"] == "overall" else row["strata_level"]
        lines.append(f"| cases, {label} | nothing ({per_node} values released) | "
                     f"{row['estimate_value']} |")  # fmt: skip
    years = outcome.results.get("cf_by_year_pooled")
    for row in years.iter_rows(named=True) if years is not None else []:
        if row["strata_name"] == "calendar_year":
            lines.append(
                f"| diagnosed in {row['strata_level']} | nothing | {row['estimate_value']} |"
            )
    lines += [
        "",
        f"True total (each node's own count, never released): {sum(outcome.truth.values())}",
    ]
    lines += ["; noise sd of the pooled total: "
              + ", ".join(f"{k} {v:.2f}" for k, v in sorted(outcome.noise_sd.items())), ""]  # fmt: skip
    lines += _model_lines(outcome) + _survival_lines(outcome)
    lines += ["", "## What each node revealed", "",
              "In each pooled sum's five rounds a node released: "
              + "; ".join(f"({r}) {text}" for r, text in ROUND_CONTENT.items())
              + ". Its counts and model sums never left it unmasked.", "",
              "| node | cases (own, not released) | revealed | rounds answered | epsilon spent |",
              "|---|---|---|---|---|"]  # fmt: skip
    for name, view in sorted(outcome.nodes.items()):
        answered = sum(len(r) for r in view.get("rounds", {}).values())
        lines.append(
            f"| {name} | {outcome.truth.get(name, '')} | nothing but its masked, noisy share "
            f"| {answered} | {view.get('epsilon', 0.0):.3f} |"
        )
    for analysis, why in sorted(outcome.failures.items()):
        lines.append(f"\n`{analysis}`: nothing released: {why}")
    path = out / "report.md"
    path.write_text("\n".join(lines) + "\n")
    (out / "rare_disease.json").write_text(json.dumps(summary(outcome), indent=2))
    return path


def _model_lines(outcome: RareOutcome) -> list[str]:
    model = outcome.results.get("cf_model_pooled")
    if model is None:
        return []
    odds = model.filter(pl.col("estimate_name").is_in(["odds_ratio", "coefficient"]))
    out = ["", "Pooled logistic model of the diagnosis (per-node: every node's score and",
           "information would be withheld, its outcome count below 10):", "",
           "| term | coefficient | odds ratio |", "|---|---|---|"]  # fmt: skip
    wide = odds.pivot(on="estimate_name", index="variable_name", values="estimate_value")
    for row in wide.iter_rows(named=True):
        out.append(f"| {row['variable_name']} | {float(row['coefficient']):.4f} | "
                   f"{float(row['odds_ratio']):.4f} |")  # fmt: skip
    return out


def _survival_lines(outcome: RareOutcome) -> list[str]:
    curve = outcome.results.get("cf_survival_pooled")
    if curve is None:
        return []
    rows = curve.filter(pl.col("estimate_name").is_in(["estimate", "n_risk", "n_event"]))
    if rows.height == 0:
        return ["", "Survival after diagnosis: the pooled deaths cannot be cut into segments of "
                "0 or at least 10: no curve (per node: nothing either)."]  # fmt: skip
    wide = rows.pivot(on="estimate_name", index="additional_level", values="estimate_value")
    out = ["", "Survival after diagnosis (pooled, noisy counts):", "",
           "| day | at risk | deaths | survival |", "|---|---|---|---|"]  # fmt: skip
    for row in wide.iter_rows(named=True):
        out.append(f"| {row['additional_level']} | {row['n_risk']} | {row['n_event']} | "
                   f"{float(row['estimate']):.3f} |")  # fmt: skip
    return out


def summary(outcome: RareOutcome) -> dict[str, Any]:
    """The example's numbers as JSON: pooled totals, truth, per-node releases, epsilon."""
    return {
        "pooled_overall": outcome.pooled_count("cf_pooled")
        if "cf_pooled" in outcome.results
        else None,
        "true_overall": sum(outcome.truth.values()),
        "true_per_node": outcome.truth,
        "per_node_values_released": outcome.per_node_released,
        "noise_sd": outcome.noise_sd,
        "epsilon_per_node": {n: v.get("epsilon", 0.0) for n, v in sorted(outcome.nodes.items())},
        "failures": outcome.failures,
        "model_fitted": "cf_model_pooled" in outcome.results,
        "max_noise_sd_ok": all(math.isfinite(v) for v in outcome.noise_sd.values()),
    }
