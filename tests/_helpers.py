"""Set-up several tests share: a small real CDM with its study cohorts, a node policy, a signed
permit, and the reference time-to-event rows the survival and Cox tests compare against.

One definition each, so the gate, DP-SGD and pooled-count tests build their nodes the same way,
and the Kaplan–Meier and Cox references read the same independently written follow-up. The CDM,
study, policy and permit builders the reliability bench needs too live in
``coordinator.fixtures`` (bench code does not import tests); they are named here as well.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import polars as pl

from coordinator.fixtures import RA_BLEED_COHORTS as RA_BLEED_COHORTS
from coordinator.fixtures import RA_BLEED_CONCEPT_SETS as RA_BLEED_CONCEPT_SETS
from coordinator.fixtures import RA_BLEED_COUNTS as RA_BLEED_COUNTS
from coordinator.fixtures import RA_BLEED_RISK as RA_BLEED_RISK
from coordinator.fixtures import ra_bleed_study as ra_bleed_study
from coordinator.fixtures import signed_permit as signed_permit
from coordinator.fixtures import write_node_policy as write_node_policy
from coordinator.fixtures import write_ra_bleed_cdm as write_ra_bleed_cdm


def write_node_setup(
    folder: Path,
    world: dict[str, Any],
    *,
    cdm: Path,
    privacy: dict[str, Any],
    name: str = "node-a",
    allowed: list[str] | None = None,
    revocation_lists: list[str] | None = None,
) -> Path:
    """Node ``name``'s secret (``world["secrets"]``) and policy in ``folder``, trusting the
    permit key ``world["pub"]``: the setup of a node a gate test drives; the policy's path."""
    write_node_secret(folder, world["secrets"][name])
    return write_node_policy(
        folder,
        name=name,
        cdm=cdm,
        permit_body_key=world["pub"],
        privacy=privacy,
        allowed=allowed if allowed is not None else ["*"],
        revocation_lists=revocation_lists,
    )


#: Covariates of the test models (GLM, Cox) over the analysis test cohorts (``conftest``).
MODEL_COVARIATES = [
    {"type": "age", "center": 50, "scale": 10},
    {"type": "sex"},
    {"type": "cohort", "cohort": "comparator", "window": {"start": -3650, "end": 0}},
]
#: SELECT columns, per cohort entry ``t`` of person ``p``: ``MODEL_COVARIATES`` (age at entry
#: centred at 50 per 10 years, male, a comparator-cohort (2) entry within 3650 days before),
#: written independently of the analyses' SQL.
MODEL_COVARIATES_AT_ENTRY = """
       (year(t.cohort_start_date) - p.year_of_birth
        - CASE WHEN (month(t.cohort_start_date), day(t.cohort_start_date))
                    < (p.month_of_birth, p.day_of_birth) THEN 1 ELSE 0 END - 50) / 10.0
         AS age,
       CAST(p.gender_concept_id = 8507 AS DOUBLE) AS sex_male,
       CAST(EXISTS (SELECT 1 FROM cohort c WHERE c.cohort_definition_id = 2
            AND c.subject_id = t.subject_id
            AND c.cohort_start_date BETWEEN t.cohort_start_date - 3650
                                        AND t.cohort_start_date) AS DOUBLE)
         AS cohort_comparator
"""

#: SELECT columns, per cohort entry ``t``: the first start of outcome cohort 3 on or after entry
#: (``first_after``), the last before it (``last_before``), the entry's ``start`` and ``stop``;
#: a reference written independently of the analyses' SQL.
OUTCOME_AROUND_ENTRY = """
       (SELECT min(o.cohort_start_date) FROM cohort o WHERE o.cohort_definition_id = 3
          AND o.subject_id = t.subject_id AND o.cohort_start_date >= t.cohort_start_date)
         AS first_after,
       (SELECT max(o.cohort_start_date) FROM cohort o WHERE o.cohort_definition_id = 3
          AND o.subject_id = t.subject_id AND o.cohort_start_date < t.cohort_start_date)
         AS last_before,
       t.cohort_start_date AS start, t.cohort_end_date AS stop
"""


def time_to_event(
    frame: pl.DataFrame, bin_days: int, washout: int | None = None, *, name: str = "time"
) -> pl.DataFrame:
    """From ``OUTCOME_AROUND_ENTRY``'s columns: ``event`` (first outcome by the entry's end),
    ``days`` to it or to the end, and ``name``, the days rounded up to the end of their
    ``bin_days`` bin; entries with an outcome before entry left out (any time before, or with
    ``washout`` only those within ``washout`` days before)."""
    event = frame["first_after"].is_not_null() & (frame["first_after"] <= frame["stop"])
    end = pl.when(event).then(pl.col("first_after")).otherwise(pl.col("stop"))
    keep = pl.col("last_before").is_null()
    if washout is not None:
        keep = keep | ((pl.col("start") - pl.col("last_before")).dt.total_days() > washout)
    return (
        frame.with_columns(
            event.alias("event"), (end - pl.col("start")).dt.total_days().alias("days")
        )
        .filter(keep)
        .with_columns(((pl.col("days") / bin_days).ceil() * bin_days).alias(name))
    )


def gated_rounds(
    gates: dict[str, Any], study: dict[str, Any], permit: dict[str, Any], analysis_id: str
) -> Any:
    """``ask_nodes`` for ``studies.runner.drive`` through real gates, as a coordinator asks:
    round t+1's request carries round t's state and signed releases (``node.transcript``).
    A refusal fails the test with the gate's reason."""
    from node.messages import GateRequest
    from node.transcript import signed_release, transcript_json
    from studies.statistics import from_ipc

    sent: dict[str, Any] = {"transcript": None}

    def ask(state: dict[str, Any] | None, round_: int) -> dict[str, Any]:
        request = GateRequest(study, permit, analysis_id, state, round_, sent["transcript"])
        replies = {name: gate.handle(request) for name, gate in gates.items()}
        refused = {name: r.reason for name, r in replies.items() if not r.released}
        assert not refused, refused
        sent["transcript"] = transcript_json(state, [signed_release(r) for r in replies.values()])
        return {name: from_ipc(r.statistics) for name, r in sorted(replies.items())}

    return ask


def write_node_secret(folder: Path, secret: bytes) -> None:
    """The node secret its identity derives from (``Policy.secret_path`` for ``write_node_policy``'s
    ledger), so a test can bind the identity in a permit before the node first runs."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "ledger.secagg.key").write_bytes(secret)
    (folder / "ledger.secagg.key").chmod(0o600)


def gate_message(content: Any) -> Any:
    """A Flower ``query.gate`` message carrying ``content`` (a ``RecordDict``), as a
    SuperNode hands it to the node's ClientApp."""
    import time

    from flwr.app import Message, Metadata

    metadata = Metadata(
        run_id=1,
        message_id="m1",
        src_node_id=0,
        dst_node_id=1,
        reply_to_message_id="",
        group_id="",
        created_at=time.time(),
        ttl=600.0,
        message_type="query.gate",
    )
    return Message(content, metadata=metadata)


def period_prevalence(
    analysis_id: str, periods: list[tuple[str, str]], strata: list[Any]
) -> dict[str, Any]:
    """A period-prevalence analysis of the analysis fixtures' cohorts (``population``
    denominator, ``outcome``) over ``periods`` of (start, end) dates."""
    return {
        "id": analysis_id,
        "kind": "prevalence",
        "type": "period",
        "denominator_cohort": "population",
        "outcome": "outcome",
        "periods": [{"start": start, "end": end} for start, end in periods],
        "strata": strata,
    }


def odds_ratio_meta(window_end: int) -> dict[str, Any]:
    """The meta-analysis of the exposed-vs-comparator odds ratio of ``outcome`` within days
    1..``window_end`` of entry."""
    return {
        "id": "or_meta",
        "kind": "meta",
        "measure": "log_odds_ratio",
        "target": "exposed",
        "comparator": "comparator",
        "outcome": "outcome",
        "window": {"start": 1, "end": window_end},
    }


def count_statistics(
    rows: list[tuple[str, str, float]],
    keys: tuple[str, str] = ("variable_name", "variable_level"),
    **columns: Any,
) -> pl.DataFrame:
    """A statistics table of cohort "c" from (name, level, value) rows: ``keys`` names the two
    columns the rows fill (a variable, or a stratum); count rows unless ``columns`` (constants
    or one value per row) says otherwise."""
    from studies.statistics import make_statistics

    return make_statistics(
        pl.DataFrame(
            {
                "cohort": "c",
                keys[0]: [r[0] for r in rows],
                keys[1]: [r[1] for r in rows],
                "estimate_name": "count",
                "release_class": "count",
                **columns,
                "value": [r[2] for r in rows],
            }
        )
    )


def simulated_demo_nodes(folder: Path, cdms: list[Path]) -> tuple[Path, Path]:
    """Two simulated nodes (``urban``, ``rural``) on the first two ``cdms`` and a permit for
    the demo study binding their identities (so the study runs rather than being refused):
    the NODES.toml and the permit a ``fedomop run --simulation`` takes."""
    from coordinator.demo import (
        DEMO_STUDY,
        issue_permit,
        make_permit_body,
        node_identities,
        write_policy,
    )
    from coordinator.simulation import write_nodes_toml
    from studies.loading import load_study

    keys = make_permit_body(folder / "body")
    names = ["urban", "rural"]
    policies = [write_policy(folder / n, n, cdm, keys.public)
                for n, cdm in zip(names, cdms, strict=False)]  # fmt: skip
    nodes = write_nodes_toml(folder / "nodes.toml", policies)
    permit = folder / "permit.json"
    issue_permit(
        load_study(DEMO_STUDY), names, keys.private, permit, node_keys=node_identities(policies)
    )
    return nodes, permit
