"""Reliability under faults (issue 15): each scenario runs a study over three real nodes and
prints what was expected, what happened, and three numbers that must be 0.

The coordinator is ``coordinator.study_runner.run_study`` (the one Flower's ServerApp runs);
the nodes are real gates on real CDM files, ledgers and audit logs, answering in this process
or, where the fault needs a process of its own (a file-size limit standing in for a full disk,
a clock set a day off with libfaketime, a SIGKILL between charge and release), in a child
process per request. The SuperLink restart and the deployed memory run over real Flower
processes (a SuperLink, three ``fedomop node start``, the ``fedomop run`` command itself);
killed SuperNodes and nodes past the timeout there are ``tests/test_e2e_deployment.py``'s.

Per scenario:
- ``data_lost``: result rows of the exact analyses (counts, GLM) that differ from, or are
  missing against, the centralised reference on the nodes that contributed (``run_local``);
- ``budget_drift``: rho a ledger holds without an audited release of that request, plus any
  difference between a ledger row's rho and the rho its audit entry names;
- ``audit_gaps``: breaks in the nodes' hash chains (``AuditLog.verify``).

The harness (nodes, permits, the three measures) is ``_reliability_harness.py``, the fault
scenarios ``_reliability_faults.py``, the load scenarios and memory ``_reliability_load.py``;
this script runs them and prints the table.

    .venv/bin/python bench/reliability.py [--only NAME ...]   # JSON on stdout, table on stderr
    .venv/bin/python bench/reliability.py --only big_node --big-node   # the 1M-person node
    .venv/bin/python bench/reliability.py --only big_node --big-node-memory-limits 512MB 1GB 2GB
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from contextlib import redirect_stdout
from dataclasses import asdict
from functools import partial
from pathlib import Path

import _reliability_big_node as big
import _reliability_faults as faults
import _reliability_load as load
from _reliability_harness import Row, World, make_world

SCENARIOS: dict[str, Callable[[World, Path], Row]] = {
    "baseline": faults.baseline,
    "truncated_cdm": faults.truncated_cdm,
    "overwritten_cdm": faults.overwritten_cdm,
    "rebuilt_cdm": faults.rebuilt_cdm,
    "disk_full_ledger": faults.disk_full_ledger,
    "disk_full_audit": faults.disk_full_audit,
    "killed_after_charge": faults.killed_after_charge,
    "clock_ahead": faults.clock_ahead,
    "clock_behind": faults.clock_behind,
    "coordinator_killed": faults.coordinator_killed,
    "superlink_restarted": faults.superlink_restarted,
    "three_studies_at_once": load.three_studies_at_once,
    "many_nodes": load.many_nodes,
    "deployed_memory": load.deployed_memory,
}
COVERED_BY_TESTS = {
    "SuperNode killed mid-study": "tests/test_e2e_deployment.py::test_node_killed_mid_study_the_rest_finish",
    "node past the timeout": "tests/test_e2e_deployment.py::test_node_killed_mid_study_the_rest_finish (timeout status)",
    "SIGKILL between charge and release (gate)": "tests/test_gate.py::test_sigkill_between_charge_and_release_loses_no_charge",
    "interrupted run (SIGINT/SIGTERM)": "tests/test_processes.py",
}
NOT_YET: list[str] = []
#: Scenarios over real Flower processes (a SuperLink and SuperNodes), which ``--no-deployment``
#: leaves out.
DEPLOYED = ("superlink_restarted", "deployed_memory")


def table(rows: list[Row]) -> str:
    head = f"{'scenario':46} {'ok':3} {'lost':>4} {'drift':>6} {'gaps':>4} {'wall s':>6}  observed"
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(
            f"{r.scenario:46} {'yes' if r.ok else 'NO':3} {r.data_lost:>4} "
            f"{r.budget_drift:>6.3g} {r.audit_gaps:>4} {r.wall_s:>6.1f}  {r.observed}"
        )
    return "\n".join(lines)


def run_scenario(name: str, world: World, work: Path) -> Row:
    """One scenario's row; a scenario that raises is a row that is not ok and names the error
    (its traceback on stderr), so the table and the JSON of the others still come out."""
    try:
        with redirect_stdout(sys.stderr):  # Flower's clients print; stdout is the JSON
            return SCENARIOS[name](world, work)
    except Exception as error:  # noqa: BLE001 - any error is this scenario's finding
        traceback.print_exc(file=sys.stderr)
        return Row(name, "the scenario runs to its end", f"raised {type(error).__name__}: {error}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--only", nargs="*", choices=sorted([*SCENARIOS, "big_node"]), default=None)
    parser.add_argument("--nodes", type=int, default=30, help="nodes of the many_nodes scenario")
    parser.add_argument(
        "--no-deployment", action="store_true", help=f"leave out {', '.join(DEPLOYED)}"
    )
    parser.add_argument(
        "--big-node",
        type=int,
        nargs="?",
        const=1_000_000,
        default=0,
        metavar="PERSONS",
        help="add the big node: PERSONS (default 1M) answering 100 requests (long: see README)",
    )
    parser.add_argument("--big-node-requests", type=int, default=100)
    parser.add_argument(
        "--big-node-memory-limits",
        nargs="*",
        default=[],
        metavar="LIMIT",
        help="also one study pass on the big node per DuckDB memory limit (e.g. 512MB 1GB 2GB)",
    )
    args = parser.parse_args()
    SCENARIOS["many_nodes"] = partial(load.many_nodes, count=args.nodes)
    if "big_node" in (args.only or []):
        args.big_node = args.big_node or 1_000_000
    if args.big_node:
        SCENARIOS["big_node"] = partial(
            big.big_node,
            persons=args.big_node,
            requests=args.big_node_requests,
            limits=tuple(args.big_node_memory_limits),
        )
    if args.no_deployment:
        for name in DEPLOYED:
            SCENARIOS.pop(name)
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")
    root = Path(tempfile.mkdtemp(prefix="bench_reliability_"))
    try:
        world = make_world(root)
        rows = []
        for name in args.only or list(SCENARIOS):
            work = root / name
            work.mkdir()
            tic = time.perf_counter()
            row = run_scenario(name, world, work)
            row.wall_s = round(time.perf_counter() - tic, 2)
            rows.append(row)
            print(f"{name}: {'ok' if row.ok else 'NOT OK'} ({row.wall_s} s)", file=sys.stderr)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print(table(rows), file=sys.stderr)
    report = {
        "scenarios": [asdict(r) for r in rows],
        "memory_per_process_mb": load.import_footprint(),
        "covered_by_tests": COVERED_BY_TESTS,
        "not_yet": NOT_YET,
    }
    print(json.dumps(report, indent=2))
    if not all(r.ok for r in rows):
        sys.exit(1)


if __name__ == "__main__":
    signal.signal(signal.SIGINT, signal.default_int_handler)
    main()
