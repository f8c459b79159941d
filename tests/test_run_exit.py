"""``fedomop run`` is honest in its exit status: a permit no node would accept stops it before
any Flower process starts (exit 1), and a study with an analysis left without a result exits 3
naming the nodes that refused and why."""

from __future__ import annotations

import json
from datetime import date, timedelta
from pathlib import Path

import pytest
from typer.testing import CliRunner

from coordinator.demo import (
    DEMO_STUDY,
    issue_permit,
    make_permit_body,
    node_identities,
    write_policy,
)
from coordinator.simulation import write_nodes_toml
from fedomop.cli import app
from studies.canonical import study_hash
from studies.loading import load_study
from studies.permit import PermitAnalysis, PermitBody, key_id, load_private_key, now_utc, sign

REPO = Path(__file__).resolve().parents[1]
OTHER_STUDY = REPO / "examples" / "gibleed_glm" / "study.yaml"
NAMES = ["urban", "rural", "elderly"]
runner = CliRunner()


def _run(permit: Path, out: Path, *extra: str) -> tuple[int, str]:
    args = ["run", str(DEMO_STUDY), "--permit", str(permit), "--out", str(out), *extra]
    result = runner.invoke(app, [*args, "--simulation", str(out.parent / "nodes.toml")])
    return result.exit_code, result.output


def _expired_permit(private_key: Path, path: Path) -> Path:
    key = load_private_key(private_key)
    study = load_study(DEMO_STUDY)
    body = PermitBody(
        permit_id="pmt-old", issuer_key_id=key_id(key.public_key()),
        study_hash=study_hash(study), nodes=NAMES,
        analyses=[PermitAnalysis(id=spec.id) for spec in study.analyses], epsilon=1.0,
        valid_from=date(2020, 1, 1), valid_until=date.today() - timedelta(days=3),
        issued_at=now_utc(),
    )  # fmt: skip
    path.write_text(json.dumps(sign(body, key)))
    return path


def test_run_checks_the_permit_before_starting_anything(tmp_path: Path) -> None:
    keys = make_permit_body(tmp_path / "body")
    other_keys = make_permit_body(tmp_path / "other_body")
    out = tmp_path / "results"
    good = tmp_path / "permit.json"
    issue_permit(load_study(DEMO_STUDY), NAMES, keys.private, good)
    other_study = tmp_path / "other_study.json"
    issue_permit(load_study(OTHER_STUDY), NAMES, keys.private, other_study)
    expired = _expired_permit(keys.private, tmp_path / "expired.json")
    tampered = tmp_path / "tampered.json"
    document = json.loads(good.read_text())
    document["body"]["epsilon"] = 50.0
    tampered.write_text(json.dumps(document))
    pub = ["--pubkey", str(keys.public)]
    for permit, extra, problem in [
        (other_study, [], "this study hashes to"),
        (expired, pub, f"expired on {date.today() - timedelta(days=3)}"),
        (tampered, pub, "signature does not verify"),
        (good, ["--pubkey", str(other_keys.public)], "signed by unknown issuer key"),
        (good, pub, "binds no identity key for nodes ['elderly', 'rural', 'urban']"),
    ]:
        code, output = _run(permit, out, *extra)
        assert code == 1, output
        lines = [line for line in output.splitlines() if line.strip()]
        assert lines == [f"error: permit {permit}: {' '.join(lines[0].split()[3:])}"], output
        assert problem in output and "nothing was started" in output
        assert not out.exists()  # the study runner never ran


@pytest.mark.slow
def test_run_exits_3_and_names_the_refusals_when_an_analysis_has_no_result(
    synthetic_node_dbs, tmp_path: Path
) -> None:
    """Nodes whose policy allows only counts refuse the other analyses: those have no result,
    so the run exits 3 and says which node refused which analysis and why."""
    keys = make_permit_body(tmp_path / "permit_body")
    policies = []
    for name, cdm in zip(NAMES, synthetic_node_dbs, strict=True):
        policy = write_policy(tmp_path / name, name, cdm, keys.public)
        text = policy.read_text()
        start = text.index("allowed = [")
        policy.write_text(text[:start] + 'allowed = ["counts"]\n')
        policies.append(policy)
    write_nodes_toml(tmp_path / "nodes.toml", policies)
    identities = node_identities(policies)  # the glm's rounds need them bound
    permit = tmp_path / "permit.json"
    issue_permit(load_study(DEMO_STUDY), NAMES, keys.private, permit, node_keys=identities)
    code, output = _run(
        tmp_path / "permit.json", tmp_path / "results", "--pubkey", str(keys.public)
    )
    assert code == 3, output
    said = " ".join(output.split())
    assert "error: 4 of 5 analyses have no result" in said
    record = json.loads((tmp_path / "results" / "federation.json").read_text())
    failed = [a["analysis_id"] for a in record["analyses"] if a["status"] != "finished"]
    assert len(failed) == 4
    for aid in failed:
        assert f"error: analysis {aid!r} has no result" in said
    refused = [n for n in record["nodes"] if n["status"] == "refused"]
    assert {n["node"] for n in refused} == set(NAMES)
    assert f"urban refused ({refused[0]['reason']})" in said or refused[0]["reason"] in said
