"""A small federation's ingredients, for tests, benchmarks and trials: a real OMOP CDM file of
given persons (each with rheumatoid arthritis, some with a GI bleed), the study of counts and a
bleed-risk GLM over it, a node policy with its own ledger and audit log, and a signed permit.

Here, not under ``tests/``, because the reliability bench (``bench/reliability.py``) builds its
nodes from the same definitions as the gate, pooled and fault tests: one definition each, and
bench code never imports the test suite. ``coordinator.local_federation`` runs such nodes as
real Flower processes.
"""

from __future__ import annotations

import copy
import json
import textwrap
from datetime import date, timedelta
from pathlib import Path
from typing import Any

import polars as pl

from omop_etl.cdm import connect
from studies.permit import PermitBody, issuer_fields, sign

#: Concept sets and cohorts of a study over ``write_ra_bleed_cdm``'s CDM.
RA_BLEED_CONCEPT_SETS = [
    {"name": "ra", "concepts": [80809]},
    {"name": "gi_bleed", "concepts": [192671]},
]
RA_BLEED_COHORTS = [
    {"name": "population", "entry": {"domain": "condition", "concept_set": "ra"}},
    {"name": "bleed", "entry": {"domain": "condition", "concept_set": "gi_bleed"}},
]
#: The RA cohort by sex and its GI bleeds counted, and the bleed's risk by sex (a binomial GLM):
#: the exact analyses most node tests ask of ``write_ra_bleed_cdm``'s file.
RA_BLEED_COUNTS = {
    "id": "n",
    "kind": "counts",
    "cohorts": ["population", "bleed"],
    "strata": ["sex"],
}
RA_BLEED_RISK = {
    "id": "risk",
    "kind": "glm",
    "family": "binomial",
    "cohort": "population",
    "outcome": "bleed",
    "outcome_window": {"start": 1, "end": 3650},
    "covariates": [{"type": "sex"}],
}


def ra_bleed_study(name: str, analyses: list[dict[str, Any]]) -> dict[str, Any]:
    """A study of ``analyses`` over the RA and GI-bleed cohorts (a copy: tests may change it)."""
    return copy.deepcopy(
        {
            "name": name,
            "concept_sets": RA_BLEED_CONCEPT_SETS,
            "cohorts": RA_BLEED_COHORTS,
            "analyses": analyses,
        }
    )


def write_ra_bleed_cdm(path: Path, people: pl.DataFrame) -> Path:
    """A real OMOP CDM file (``omop_etl.schema``) of ``people`` (``person_id``,
    ``gender_concept_id``, ``year_of_birth``, ``bleed``): everyone is observed 2010-2020 and has
    a rheumatoid-arthritis diagnosis on 2012-01-01; those with ``bleed`` a GI bleed on
    2015-06-01."""
    from omop_etl.schema import create_cdm_schema

    con = connect(path, read_only=False)
    create_cdm_schema(con, indexes=False)
    con.register("people", people)
    con.execute(
        """
        INSERT INTO person BY NAME
        SELECT person_id, gender_concept_id, year_of_birth, 0 AS race_concept_id,
               0 AS ethnicity_concept_id FROM people;
        INSERT INTO observation_period BY NAME
        SELECT person_id AS observation_period_id, person_id,
               DATE '2010-01-01' AS observation_period_start_date,
               DATE '2020-12-31' AS observation_period_end_date,
               44814724 AS period_type_concept_id FROM people;
        INSERT INTO condition_occurrence BY NAME
        SELECT person_id AS condition_occurrence_id, person_id, 80809 AS condition_concept_id,
               DATE '2012-01-01' AS condition_start_date, 32020 AS condition_type_concept_id
        FROM people
        UNION ALL
        SELECT 100000 + person_id, person_id, 192671, DATE '2015-06-01', 32020
        FROM people WHERE bleed;
        INSERT INTO concept BY NAME
        SELECT * FROM (VALUES (80809, 'Rheumatoid arthritis'), (192671, 'GI bleed'))
               v(concept_id, concept_name)
        CROSS JOIN (SELECT 'Condition' AS domain_id, 'SNOMED' AS vocabulary_id,
               'Clinical Finding' AS concept_class_id, 'S' AS standard_concept, 'x' AS concept_code,
               DATE '1970-01-01' AS valid_start_date, DATE '2099-12-31' AS valid_end_date);
        """
    )
    con.close()
    return path


def write_node_policy(
    folder: Path,
    *,
    name: str,
    cdm: Path,
    permit_body_key: Path,
    privacy: dict[str, Any],
    allowed: list[str],
    revocation_lists: list[str] | None = None,
) -> Path:
    """``folder/node.toml`` for node ``name`` trusting ``permit_body_key``, with its own ledger
    and audit log in ``folder``; ``privacy`` values are written as TOML numbers."""
    folder.mkdir(parents=True, exist_ok=True)
    revocations = (
        f"revocation_lists = {json.dumps(revocation_lists)}" if revocation_lists is not None else ""
    )
    policy = folder / "node.toml"
    policy.write_text(
        textwrap.dedent(
            f"""
            [node]
            name = "{name}"
            cdm = "{cdm}"
            ledger = "ledger.sqlite"
            audit = "audit.jsonl"
            [trust]
            permit_body_keys = ["{permit_body_key}"]
            {revocations}
            [privacy]
            {chr(10).join(f"{k} = {_toml(v)}" for k, v in privacy.items())}
            [analyses]
            allowed = {json.dumps(allowed)}
            """
        )
    )
    return policy


def _toml(value: Any) -> str:
    """A TOML literal for a policy number or flag."""
    return json.dumps(value) if isinstance(value, bool) else repr(value)


def signed_permit(key: Any, **fields: Any) -> dict[str, Any]:
    """A permit signed by ``key``, valid from yesterday for 30 days and issued now; ``fields``
    give (or replace) the body's fields (``study_hash``, ``nodes``, ``analyses``, ``epsilon``...).
    """
    today = date.today()
    body = (
        issuer_fields(key)
        | {"valid_from": today - timedelta(days=1), "valid_until": today + timedelta(days=30)}
        | fields
    )
    return sign(PermitBody(**body), key)
