"""Run a study in Flower's simulation runtime: every node of a NODES.toml as a virtual SuperNode.

A NODES.toml lists the nodes that the simulation stands in for, each by its own policy file (the
policy names the node's CDM, ledger and audit log); relative paths are relative to the NODES.toml::

    [[node]]
    policy = "north/node.toml"

The simulated node with partition id ``i`` answers with the ``i``-th policy, through the same
``node.client_app`` ClientApp (and so the same gate) as a deployed node.
"""

from __future__ import annotations

import logging
import os
import tomllib
from pathlib import Path

from flwr.clientapp import ClientApp

from coordinator.server_app import make_server_app
from coordinator.study_runner import Progress, StudyOutcome, StudyPlan
from node.client_app import make_client_app
from node.flower_runtime import use_flower_env

PARTITION_KEY = "partition-id"


def load_nodes(nodes_toml: Path) -> list[Path]:
    """The policy files listed in a NODES.toml; ``ValueError`` naming what is wrong."""
    try:
        doc = tomllib.loads(nodes_toml.read_text())
    except (OSError, tomllib.TOMLDecodeError) as err:
        raise ValueError(f"cannot read nodes file {nodes_toml}: {err}") from err
    entries = doc.get("node")
    if not isinstance(entries, list) or not entries:
        raise ValueError(f"{nodes_toml}: no [[node]] entries")
    policies = []
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict) or not isinstance(entry.get("policy"), str):
            raise ValueError(f'{nodes_toml}: [[node]] #{i + 1} needs policy = "path/to/node.toml"')
        path = (nodes_toml.parent / entry["policy"]).resolve()
        if not path.is_file():
            raise ValueError(f"{nodes_toml}: [[node]] #{i + 1}: policy file {path} not found")
        policies.append(path)
    return policies


def write_nodes_toml(path: Path, policies: list[Path]) -> Path:
    """Write a NODES.toml listing ``policies`` (relative to its folder where possible)."""
    lines = ["# Nodes of a simulated federation: one [[node]] per node, by its policy file.", ""]
    for policy in policies:
        try:
            shown = policy.resolve().relative_to(path.parent.resolve())
        except ValueError:
            shown = policy.resolve()
        lines += ["[[node]]", f'policy = "{shown.as_posix()}"', ""]
    path.write_text("\n".join(lines))
    return path


def simulation_client_app(policies: list[Path]) -> ClientApp:
    """The node's ClientApp (``node.client_app``) whose virtual node ``i`` answers through the
    gate of ``policies[i]``, with the warm-up reply the simulation times apart."""
    paths = [str(p) for p in policies]
    return make_client_app(
        lambda context: paths[int(context.node_config[PARTITION_KEY])], warm_up=True
    )


def run_simulated(
    plan: StudyPlan, policies: list[Path], progress: Progress | None = None
) -> StudyOutcome:
    """Run ``plan`` with one simulated SuperNode per policy; return the runner's outcome."""
    from flwr.simulation import run_simulation

    use_flower_env(override=False)
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    # Ray's driver would replace fedomop's SIGTERM handler with one that aborts (exit -6,
    # Ray's processes left behind) instead of ending the run cleanly (fedomop.lifecycle)
    os.environ.setdefault("RAY_DISABLE_FAILURE_SIGNAL_HANDLER", "1")
    outcomes: list[StudyOutcome] = []
    server = make_server_app(
        plan, expected_nodes=len(policies), sink=outcomes.append, progress=progress, warm_up=True
    )
    cpus = max(1, min(len(policies), os.cpu_count() or 1))
    flwr_logger = logging.getLogger("flwr")
    level = flwr_logger.level
    flwr_logger.setLevel(logging.ERROR)  # not run_simulation's deprecation note
    try:
        run_simulation(
            server_app=server,
            client_app=simulation_client_app(policies),
            num_supernodes=len(policies),
            backend_config={
                "client_resources": {"num_cpus": 1, "num_gpus": 0},
                "init_args": {"num_cpus": cpus, "logging_level": "error", "log_to_driver": False},
            },
        )
    finally:
        flwr_logger.setLevel(level)
    if not outcomes:
        raise RuntimeError("the simulated study did not finish: see the Flower log above")
    return outcomes[0]
