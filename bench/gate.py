"""Benchmark: what the gate costs per request on GiBleed (exact and DP releases, refusals).

Builds GiBleed into a DuckDB CDM, a permit body, a node policy and permits, then times
``Gate.handle`` for the CohortGenerator celecoxib cohort counted by sex. Prints JSON.

    .venv/bin/python bench/gate.py [--requests 30]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data" / "eunomia"


def _timed(call, count: int) -> dict[str, float]:
    seconds = []
    for i in range(count):
        start = time.perf_counter()
        call(i)
        seconds.append(time.perf_counter() - start)
    return {
        "requests": count,
        "median_ms": round(1000 * statistics.median(seconds), 2),
        "max_ms": round(1000 * max(seconds), 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--requests", type=int, default=30)
    args = parser.parse_args()

    from coordinator.demo import issue_permit, make_permit_body, write_policy
    from node.gate import Gate
    from node.messages import GateRequest
    from node.policy import load_policy
    from omop_etl.load import load_omop_csv
    from privacy.accounting import epsilon_to_rho
    from studies.canonical import canonical_data
    from studies.loading import study_from_data
    from studies.permit import PermitAnalysis, PermitBody, load_private_key, sign

    work = Path(tempfile.mkdtemp(prefix="bench_gate_"))
    cdm = work / "node" / "cdm.duckdb"
    cdm.parent.mkdir()
    load_omop_csv(SHARED / "GiBleed" / "csv", cdm, progress=False)
    circe = json.loads((SHARED / "cohorts" / "CohortGenerator" / "celecoxib.json").read_text())
    study = study_from_data(
        {
            "name": "bench_gate",
            "cohorts": [{"name": "celecoxib", "circe": circe}],
            "analyses": [
                {"id": "n", "kind": "counts", "cohorts": ["celecoxib"], "strata": ["sex"]}
            ],
        }
    )
    keys = make_permit_body(work / "permit_body")
    gate = Gate(load_policy(write_policy(cdm.parent, "node-a", cdm, keys.public)))
    exact = issue_permit(study, ["node-a"], keys.private, work / "exact.json")
    body = PermitBody.model_validate(exact["body"]).model_copy(
        update={
            "permit_id": "pmt-bench-dp",
            "analyses": [
                PermitAnalysis(
                    id="n",
                    mechanism="gaussian",
                    cost=epsilon_to_rho(1.0, 1e-6) / (args.requests + 1),
                    max_rows_per_person=4,
                )
            ],
        }
    )
    dp = sign(body, load_private_key(keys.private))
    wire = canonical_data(study)

    def ask(document, round_):
        return gate.handle(GateRequest(study=wire, permit=document, analysis_id="n", round=round_))

    report = {
        "cdm": "GiBleed (2,694 persons)",
        "exact_release": _timed(lambda i: ask(exact, i), args.requests),
        "replayed_release": _timed(lambda i: ask(exact, 0), args.requests),
        "dp_release": _timed(lambda i: ask(dp, i), args.requests),
        "refusal_forged_permit": _timed(
            lambda i: ask(exact | {"body": exact["body"] | {"nodes": ["x"]}}, i), args.requests
        ),
    }
    assert ask(exact, 0).released and ask(dp, 0).released
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
