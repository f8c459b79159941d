"""The node policy file and the operator commands: check-policy, budget, audit verify."""

from __future__ import annotations

import json
import shutil
from datetime import UTC, datetime
from pathlib import Path

import pytest
from typer.testing import CliRunner

from fedomop.cli import app
from node.audit import AuditLog
from node.policy import PolicyError, load_policy
from privacy.accounting import epsilon_to_rho
from privacy.ledger import Budget, Ledger, Release
from studies.permit import generate_keypair, load_private_key, revoke, write_json

REPO = Path(__file__).resolve().parents[1]
runner = CliRunner()


@pytest.fixture
def node_dir(tmp_path: Path) -> Path:
    """The example policy next to a CDM file, a permit-body key and a revocation list."""
    shutil.copy(REPO / "examples" / "node.toml", tmp_path / "node.toml")
    (tmp_path / "cdm.duckdb").write_bytes(b"")
    private, _, _ = generate_keypair(tmp_path / "keys", "permit_body")
    write_json(tmp_path / "revocations.json", revoke(None, "pmt-x", load_private_key(private)))
    return tmp_path


def _invoke(*args: object) -> tuple[int, str]:
    result = runner.invoke(app, [str(a) for a in args])
    return result.exit_code, result.output


def test_example_policy_loads_with_paths_beside_it(node_dir: Path) -> None:
    policy = load_policy(node_dir / "node.toml")
    assert policy.node_name == "node-a"
    assert policy.cdm_path == node_dir / "cdm.duckdb"
    assert policy.ledger_path == node_dir / "cdm.duckdb.ledger.sqlite"
    assert policy.audit_path == node_dir / "cdm.duckdb.audit.jsonl"
    assert policy.min_cell_count == 10 and len(policy.keys) == 1
    assert policy.allows("counts") and policy.allows("dp_sgd")
    assert not policy.allows("pooled_counts") and not policy.allows("cox")
    assert policy.rho_per_permit() == pytest.approx(epsilon_to_rho(1.0, 1e-6))
    code, out = _invoke("node", "check-policy", "--policy", node_dir / "node.toml")
    assert code == 0 and "policy ok" in out


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (("min_cell_count = 10", "min_cell_count = 5"), "greater than or equal to 10"),
        (('name = "node-a"', 'name = "node-a"\ncolour = "red"'), "Extra inputs"),
        (("max_epsilon_per_year = 5.0", "max_epsilon_per_year = 0.5"), "below max_epsilon"),
        (("[analyses]", "[analyses"), "cannot read policy"),
    ],
)
def test_invalid_policies_are_refused_naming_the_problem(node_dir: Path, edit, message) -> None:
    policy = node_dir / "node.toml"
    policy.write_text(policy.read_text().replace(*edit))
    with pytest.raises(PolicyError, match=message):
        load_policy(policy)
    code, out = _invoke("node", "check-policy", "--policy", policy)
    assert code == 1 and message.split()[0] in out


def test_check_policy_reports_missing_files(node_dir: Path) -> None:
    (node_dir / "keys" / "permit_body.pub").unlink()
    (node_dir / "cdm.duckdb").unlink()
    code, out = _invoke("node", "check-policy", "--policy", node_dir / "node.toml")
    assert code == 1
    assert "CDM file" in out and "permit-body key" in out


def test_budget_command_shows_spent_and_left(node_dir: Path) -> None:
    policy = load_policy(node_dir / "node.toml")
    rho = epsilon_to_rho(1.0, 1e-6)
    release = Release(
        request_id="r1",
        permit_id="pmt-abc",
        analysis_id="n",
        rho=rho / 4,
        charged_at=datetime.now(UTC).isoformat(),
        payload=b"x",
        payload_hash="h",
        settings={},
    )
    Ledger(policy.ledger_path).charge(release, Budget(rho, 1.0), (1.0, 1e-6, "2030-01-01"))
    code, out = _invoke("node", "budget", "--policy", node_dir / "node.toml")
    assert code == 0, out
    row = next(line for line in out.splitlines() if "pmt-abc" in line)
    cells = [c.strip() for c in row.split("│") if c.strip()]
    assert cells[1] == "1"  # releases
    assert float(cells[3]) == pytest.approx(1.0, rel=1e-3)  # epsilon budget
    assert float(cells[4]) == pytest.approx(rho / 4, rel=1e-3)
    assert float(cells[5]) == pytest.approx(3 * rho / 4, rel=1e-3)


def test_audit_verify_command(node_dir: Path) -> None:
    policy = load_policy(node_dir / "node.toml")
    log = AuditLog(policy.audit_path)
    for i in range(3):
        log.append({"verdict": "released", "analysis_id": f"a{i}"})
    code, out = _invoke("node", "audit", "verify", "--policy", node_dir / "node.toml")
    assert code == 0 and "3 entries" in out
    lines = log.path.read_text().splitlines()
    entry = json.loads(lines[0]) | {"analysis_id": "other"}
    log.path.write_text("\n".join([json.dumps(entry), *lines[1:]]) + "\n")
    code, out = _invoke("node", "audit", "verify", "--policy", node_dir / "node.toml")
    assert code == 1 and "audit line 1" in out
