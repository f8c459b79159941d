"""What a node process holds: the modules its gate loads while answering, and the DuckDB bound
its policy sets (``[compute]``).

A deployed node (``fedomop node start``) is one long-lived process: the pinned runner and the
gate. Every module it imports stays resident for its lifetime, so the node path must not load
what only other commands need: torch and opacus (DP-SGD only), scikit-learn, SciPy, pandas,
matplotlib, and pyarrow (``DuckDB``'s ``.pl()`` imported it, about 40 MB; frames now come
through the Arrow C stream). ``bench/reliability.py`` measures the resident memory itself.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import polars as pl
import pytest
from _helpers import (
    RA_BLEED_COUNTS,
    RA_BLEED_RISK,
    ra_bleed_study,
    signed_permit,
    write_node_policy,
    write_ra_bleed_cdm,
)

from node.gate import Gate
from node.policy import PolicyError, load_policy
from studies.canonical import study_hash
from studies.loading import study_from_data
from studies.permit import PermitAnalysis, generate_keypair, load_private_key
from tests.conftest import REPO

#: What the node path must never load (each is tens to hundreds of MB resident).
NOT_FOR_A_NODE = ("torch", "opacus", "sklearn", "scipy", "pandas", "matplotlib", "pyarrow",
                  "statsmodels", "lifelines")  # fmt: skip
STUDY = ra_bleed_study(
    "node_memory",
    [
        RA_BLEED_COUNTS,
        {"id": "km", "kind": "survival", "target_cohorts": ["population"], "outcome": "bleed",
         "time_bin_days": 3650},
        {"id": "base", "kind": "characterization", "cohorts": ["population"],
         "window": {"start": -365, "end": -1}},
        RA_BLEED_RISK,
    ],
)  # fmt: skip

#: A node process as ``fedomop node start`` runs it: the runner's imports, then each request
#: as a Flower message into the ClientApp's ``answer``; prints what it released and loaded.
CHILD = """
import json, sys
import node.runner
from _helpers import gate_message
from node.client_app import answer
from node.messages import GateRequest, content_to_reply, request_to_content

policy, study, permit = sys.argv[1], json.loads(sys.argv[2]), json.loads(sys.argv[3])
released = {}
for analysis in [a["id"] for a in study["analyses"]]:
    request = GateRequest(study, permit, analysis, None, 0, None)
    reply = content_to_reply(answer(gate_message(request_to_content(request)), policy).content)
    released[analysis] = [reply.released, reply.reason]
print(json.dumps({"released": released, "modules": sorted({m.split(".")[0] for m in sys.modules})}))
"""


@pytest.fixture
def policy(tmp_path: Path) -> tuple[Path, dict]:
    """A node over 120 persons and a permit of every analysis of ``STUDY`` for it."""
    people = pl.DataFrame({"person_id": range(1, 121)}).with_columns(
        gender_concept_id=pl.when(pl.col("person_id") % 2 == 0).then(8532).otherwise(8507),
        year_of_birth=1940 + pl.col("person_id") % 50,
        bleed=pl.col("person_id") % 3 == 0,
    )
    cdm = write_ra_bleed_cdm(tmp_path / "cdm.duckdb", people)
    private, public, _ = generate_keypair(tmp_path / "keys")
    path = write_node_policy(tmp_path / "node", name="node-a", cdm=cdm, permit_body_key=public,
                             privacy={"min_nodes": 1}, allowed=["*"])  # fmt: skip
    permit = signed_permit(
        load_private_key(private),
        nodes=["node-a"],
        node_keys={"node-a": load_policy(path).identity_hex()},
        analyses=[PermitAnalysis(id=a["id"]) for a in STUDY["analyses"]],
        study_hash=study_hash(study_from_data(STUDY)),
        epsilon=1.0,
    )
    return path, permit


def test_answering_every_kind_loads_no_heavy_module(policy: tuple[Path, dict]) -> None:
    path, permit = policy
    done = subprocess.run(
        [sys.executable, "-c", CHILD, str(path), json.dumps(STUDY), json.dumps(permit)],
        capture_output=True, text=True, cwd=REPO, check=True,
        env={"PYTHONPATH": f"{REPO}:{REPO / 'tests'}", "FLWR_TELEMETRY_ENABLED": "0",
             "FLWR_DISABLE_UPDATE_CHECK": "1"},
    )  # fmt: skip
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert all(ok for ok, _ in out["released"].values()), out["released"]  # the probe answered
    assert {"duckdb", "polars", "flwr"} <= set(out["modules"])
    assert sorted(set(out["modules"]) & set(NOT_FOR_A_NODE)) == []


def test_the_policy_bounds_duckdb(policy: tuple[Path, dict], tmp_path: Path) -> None:
    """The gate's connection takes the policy's memory limit and threads: by default 1 GB and
    2 threads (DuckDB's own: 80 % of the machine, a thread per core); a policy may set them."""
    path, _ = policy
    gate = Gate(load_policy(path))
    con = gate._connection()
    settings = dict(con.execute(
        "SELECT name, value FROM duckdb_settings() WHERE name IN ('memory_limit', 'threads', 'enable_progress_bar')"
    ).fetchall())  # fmt: skip
    assert settings == {  # 1 GB = 10^9 bytes; no progress bar on the node's stdout
        "memory_limit": "953.6 MiB", "threads": "2", "enable_progress_bar": "false"
    }  # fmt: skip
    text = path.read_text() + '\n[compute]\nmemory_limit = "256MB"\nthreads = 1\n'
    path.write_text(text)
    con = Gate(load_policy(path))._connection()
    settings = dict(con.execute(
        "SELECT name, value FROM duckdb_settings() WHERE name IN ('memory_limit', 'threads')"
    ).fetchall())  # fmt: skip
    assert settings == {"memory_limit": "244.1 MiB", "threads": "1"}


@pytest.mark.parametrize(
    "compute", ['memory_limit = "lots"', "threads = 0", 'memory_limit = "1GB; SET x=1"']
)
def test_a_bad_compute_setting_is_refused_naming_the_field(
    policy: tuple[Path, dict], compute: str
) -> None:
    path, _ = policy
    path.write_text(path.read_text() + f"\n[compute]\n{compute}\n")
    field = compute.split(" ")[0]
    with pytest.raises(PolicyError, match=f"compute.{field}"):
        load_policy(path)
