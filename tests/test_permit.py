"""Permits: canonical signing, verification against trusted keys, revocation, and the CLI."""

from __future__ import annotations

import base64
import json
from datetime import date, timedelta
from pathlib import Path

import pytest
from typer.testing import CliRunner

from fedomop.cli import app
from studies.canonical import study_hash
from studies.loading import load_study
from studies.permit import (
    PermitAnalysis,
    PermitBody,
    PermitError,
    canonical_json,
    generate_keypair,
    key_id,
    load_private_key,
    load_public_key,
    now_utc,
    revoke,
    sign,
    verify_permit,
    verify_revocations,
)

STUDY = {
    "name": "permit_test",
    "concept_sets": [{"name": "gi_bleed", "concepts": [192671]}],
    "cohorts": [{"name": "bleed", "entry": {"domain": "condition", "concept_set": "gi_bleed"}}],
    "analyses": [
        {"id": "n", "kind": "counts", "cohorts": ["bleed"], "strata": ["sex"]},
        {"id": "n2", "kind": "counts", "cohorts": ["bleed"]},
    ],
}
runner = CliRunner()
EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


@pytest.fixture
def keys(tmp_path: Path) -> dict:
    private, public, kid = generate_keypair(tmp_path / "keys")
    return {"dir": tmp_path / "keys", "private": private, "public": public, "id": kid}


def body(kid: str, **overrides) -> PermitBody:
    fields = {
        "permit_id": "pmt-1",
        "issuer_key_id": kid,
        "study_hash": "a" * 64,
        "nodes": ["node-a"],
        "analyses": [PermitAnalysis(id="n")],
        "epsilon": 1.0,
        "valid_from": date(2026, 1, 1),
        "valid_until": date(2026, 12, 31),
        "issued_at": now_utc(),
    }
    return PermitBody(**(fields | overrides))


def test_keygen_writes_owner_only_private_key_and_short_key_id(keys) -> None:
    assert keys["private"].stat().st_mode & 0o777 == 0o600
    public = load_public_key(keys["public"])
    assert key_id(public) == keys["id"] and len(keys["id"]) == 16
    with pytest.raises(PermitError, match="refusing to overwrite"):
        generate_keypair(keys["dir"])


def test_sign_verify_roundtrip_and_canonical_bytes(keys) -> None:
    private = load_private_key(keys["private"])
    granted = body(keys["id"])
    document = sign(granted, private)
    assert set(document) == {"body", "signature"}
    trusted = {keys["id"]: private.public_key()}
    assert verify_permit(document, trusted) == granted
    # layout does not matter, content does: key order and spacing are canonicalised
    shuffled = json.loads(json.dumps(document, indent=4, sort_keys=False))
    assert verify_permit(shuffled, trusted).permit_id == "pmt-1"
    assert canonical_json({"b": 1, "a": [1, "é"]}) == '{"a":[1,"é"],"b":1}'.encode()


@pytest.mark.parametrize(
    ("tamper", "message"),
    [
        (lambda d: d["body"].update(epsilon=10.0), "signature does not verify"),
        (lambda d: d["body"].update(nodes=["node-a", "node-z"]), "signature does not verify"),
        (lambda d: d["body"].update(extra="x"), "Extra inputs are not permitted"),
        (lambda d: d["signature"].update(key_id="0" * 16), "unknown issuer key"),
        (lambda d: d["signature"].update(value="!!"), "signature does not verify"),
        (lambda d: d.update(note="x"), "exactly the keys"),
    ],
)
def test_tampered_permits_are_refused(keys, tamper, message) -> None:
    private = load_private_key(keys["private"])
    document = sign(body(keys["id"]), private)
    tamper(document)
    with pytest.raises(PermitError, match=message):
        verify_permit(document, {keys["id"]: private.public_key()})


POOLING_A, POOLING_B = "ab" * 32, "cd" * 32


def test_node_keys_are_signed_and_validated(keys) -> None:
    private = load_private_key(keys["private"])
    trusted = {keys["id"]: private.public_key()}
    bound = body(keys["id"], nodes=["node-a", "node-b"], node_keys={"node-a": POOLING_A})
    document = sign(bound, private)
    assert document["body"]["node_keys"] == {"node-a": POOLING_A}
    assert verify_permit(document, trusted).node_keys == {"node-a": POOLING_A}
    for tampered in ({"node-a": POOLING_B}, {"node-a": POOLING_A, "node-b": POOLING_B}, {}):
        forged = json.loads(json.dumps(document))
        forged["body"]["node_keys"] = tampered
        with pytest.raises(PermitError, match="signature does not verify"):
            verify_permit(forged, trusted)
    with pytest.raises(ValueError, match="node_keys names nodes the permit does not"):
        body(keys["id"], node_keys={"node-z": POOLING_A})
    with pytest.raises(ValueError, match="should match pattern"):
        body(keys["id"], node_keys={"node-a": "ab" * 31})


def test_permit_signed_before_node_keys_still_verifies(keys) -> None:
    """A body without ``node_keys``, signed over exactly its own canonical bytes (as permits were
    before the field existed), verifies; a new permit without keys has the same canonical form."""
    private = load_private_key(keys["private"])
    old_body = {
        "version": 1, "permit_id": "pmt-old", "issuer_key_id": keys["id"],
        "study_hash": "a" * 64, "study_name": "", "nodes": ["node-a"],
        "analyses": [{"id": "n", "mechanism": "none", "cost": 0.0, "max_rows_per_person": None,
                      "resolution": 1.0, "max_releases": None}],
        "epsilon": 1.0, "delta": 1e-6, "min_cell_count": 10, "valid_from": "2026-01-01",
        "valid_until": "2026-12-31", "purpose": "", "issued_at": "2026-01-01T00:00:00Z",
    }  # fmt: skip
    value = base64.b64encode(private.sign(canonical_json(old_body))).decode("ascii")
    document = {
        "body": old_body,
        "signature": {"algorithm": "Ed25519", "key_id": keys["id"], "value": value},
    }
    assert verify_permit(document, {keys["id"]: private.public_key()}).node_keys == {}
    assert "node_keys" not in sign(body(keys["id"]), private)["body"]


def test_body_naming_another_issuer_is_refused(keys, tmp_path: Path) -> None:
    private = load_private_key(keys["private"])
    other = generate_keypair(tmp_path / "other")[2]
    document = sign(body(other), private)  # signed by keys, claims to be from other
    with pytest.raises(PermitError, match="does not match the signing key"):
        verify_permit(document, {keys["id"]: private.public_key()})


def test_permit_limits_are_validated(keys) -> None:
    with pytest.raises(ValueError, match="greater than or equal to 10"):
        body(keys["id"], min_cell_count=5)
    with pytest.raises(ValueError, match="valid_until is before valid_from"):
        body(keys["id"], valid_until=date(2025, 1, 1))
    with pytest.raises(ValueError, match="needs cost > 0"):
        PermitAnalysis(id="n", mechanism="gaussian")
    assert PermitAnalysis(id="n", mechanism="laplace", cost=0.5).cost_rho() == 0.125


def test_revocation_list_is_signed_and_cumulative(keys) -> None:
    private = load_private_key(keys["private"])
    first = revoke(None, "pmt-1", private, "consent withdrawn")
    second = revoke(first, "pmt-2", private)
    trusted = {keys["id"]: private.public_key()}
    assert verify_revocations(second, trusted).revoked_ids() == {"pmt-1", "pmt-2"}
    second["body"]["revoked"].pop()  # un-revoking by editing the file breaks the signature
    with pytest.raises(PermitError, match="signature does not verify"):
        verify_revocations(second, trusted)


def _invoke(*args: str) -> tuple[int, str]:
    result = runner.invoke(app, [str(a) for a in args])
    return result.exit_code, result.output


def test_cli_keygen_issue_verify_revoke(tmp_path: Path) -> None:
    study_file = tmp_path / "study.json"
    study_file.write_text(json.dumps(STUDY))
    code, out = _invoke("permit", "keygen", "--out", tmp_path / "k")
    assert code == 0 and "key id" in out
    until = (date.today() + timedelta(days=90)).isoformat()
    code, out = _invoke(
        "permit", "issue", study_file, "--key", tmp_path / "k/permit_body.key",
        "--nodes", "node-a,node-b", "--budget", "1.0", "--min-cell-count", "20",
        "--valid-until", until, "--analyses", "n", "--dp", "n:gaussian:0.01:4",
        "--purpose", "GI bleed feasibility", "--max-releases", "50", "--out", tmp_path / "permit.json",
    )  # fmt: skip
    assert code == 0, out
    document = json.loads((tmp_path / "permit.json").read_text())
    permit = document["body"]
    assert permit["study_hash"] == study_hash(load_study(study_file))
    assert permit["nodes"] == ["node-a", "node-b"] and permit["min_cell_count"] == 20
    assert permit["delta"] == 1e-6 and permit["valid_until"] == until
    assert permit["analyses"] == [
        {"id": "n", "mechanism": "gaussian", "cost": 0.01, "max_rows_per_person": 4,
         "resolution": 1.0, "max_releases": 50}
    ]  # fmt: skip

    pub = tmp_path / "k/permit_body.pub"
    code, out = _invoke("permit", "verify", tmp_path / "permit.json", "--study", study_file,
                        "--pubkey", pub)  # fmt: skip
    assert code == 0 and "valid signature" in out and permit["permit_id"] in out

    changed = tmp_path / "changed.json"
    changed.write_text(json.dumps(STUDY | {"name": "other_study"}))
    code, out = _invoke("permit", "verify", tmp_path / "permit.json", "--study", changed,
                        "--pubkey", pub)  # fmt: skip
    assert code == 1 and "hashes to" in out

    document["body"]["epsilon"] = 5.0
    (tmp_path / "forged.json").write_text(json.dumps(document))
    code, out = _invoke("permit", "verify", tmp_path / "forged.json", "--study", study_file,
                        "--pubkey", pub)  # fmt: skip
    assert code == 1 and "signature does not verify" in out

    code, out = _invoke("permit", "revoke", permit["permit_id"], "--key",
                        tmp_path / "k/permit_body.key", "--list", tmp_path / "rev.json")  # fmt: skip
    assert code == 0
    revoked = json.loads((tmp_path / "rev.json").read_text())["body"]["revoked"]
    assert [r["permit_id"] for r in revoked] == [permit["permit_id"]]


def _issue_args(tmp_path: Path, nodes: str) -> tuple[Path, list]:
    """A study file and key pair in ``tmp_path``, and the ``permit issue`` arguments for them."""
    study_file = tmp_path / "study.json"
    study_file.write_text(json.dumps(STUDY))
    generate_keypair(tmp_path / "k")
    return study_file, ["permit", "issue", study_file, "--key", tmp_path / "k/permit_body.key",
                        "--nodes", nodes, "--budget", "1", "--valid-until", "2099-01-01",
                        "--out", tmp_path / "p.json"]  # fmt: skip


def test_cli_issue_binds_node_keys_and_verify_prints_them(tmp_path: Path) -> None:
    study_file, common = _issue_args(tmp_path, "node-a,node-b")
    code, out = _invoke(*common, "--node-key", f"node-a={POOLING_A}",
                        "--node-key", f"node-b={POOLING_B.upper()}")  # fmt: skip
    assert code == 0, out
    permit = json.loads((tmp_path / "p.json").read_text())["body"]
    assert permit["node_keys"] == {"node-a": POOLING_A, "node-b": POOLING_B}
    verify_args = ["permit", "verify", tmp_path / "p.json", "--study", study_file,
                   "--pubkey", tmp_path / "k/permit_body.pub"]  # fmt: skip
    code, out = _invoke(*verify_args)
    assert code == 0, out
    assert f"pooling identity of node-a: {POOLING_A}" in out
    assert f"pooling identity of node-b: {POOLING_B}" in out
    (tmp_path / "p.json").unlink()
    code, out = _invoke(*common, "--node-key", f"node-z={POOLING_A}")
    assert code == 1 and "node 'node-z' is not in --nodes" in out
    code, out = _invoke(*common, "--node-key", "node-a=xyz")
    assert code == 1 and "expected NAME=HEX with the 64 hex digits" in out
    code, out = _invoke(*common, "--node-key", f"node-a={POOLING_A}",
                        "--node-key", f"node-a={POOLING_B}")  # fmt: skip
    assert code == 1 and "given twice" in out
    assert not (tmp_path / "p.json").exists()
    code, out = _invoke(*common)
    assert code == 0 and "node_keys" not in json.loads((tmp_path / "p.json").read_text())["body"]
    code, out = _invoke(*verify_args)
    assert code == 0 and "no node keys bound" in out


def test_cli_issue_refuses_bad_input(tmp_path: Path) -> None:
    study_file, common = _issue_args(tmp_path, "a")
    code, out = _invoke(*common, "--analyses", "nope")
    assert code == 1 and "not in study" in out
    code, out = _invoke(*common, "--min-cell-count", "5")
    assert code == 1 and "--min-cell-count 5: should be greater than or equal to 10" in out
    code, out = _invoke(*common, "--dp", "n:gaussian:5")
    assert code == 1 and "costs more than the budget" in out
    code, out = _invoke(*common, "--dp", "n:dp_sgd:3")
    assert code == 1 and "costs more than the budget" in out
    code, out = _invoke(*common, "--dp", "n:sql")
    assert code == 1 and "mechanism must be one of gaussian, laplace, dp_sgd" in out
    assert not (tmp_path / "p.json").exists()


def test_cli_issue_names_the_option_of_each_problem_in_one_plain_sentence(tmp_path: Path) -> None:
    """No raw pydantic text ("validation error for", "type=", URLs): each problem is one
    ``error:`` line that names the option."""
    _study_file, common = _issue_args(tmp_path, "a")
    for args, line in [
        (["--budget", "-1"], "error: --budget -1.0: should be greater than or equal to 0"),
        (["--min-cell-count", "3"], "error: --min-cell-count 3: should be greater than or equal "
         "to 10 (a permit may raise the minimum cell count, never lower it)"),
        (["--delta", "2"], "error: --delta 2.0: should be less than 1"),
        (["--max-releases", "-2"], "error: --max-releases -2: should be greater than or equal to 1"),
        (["--valid-until", "next week"], "error: --valid-until 'next week' is not a date"),
    ]:  # fmt: skip
        code, out = _invoke(*common, *args)
        assert code == 1, out
        assert line in out
        assert "validation error" not in out and "type=" not in out and "Traceback" not in out
    code, out = _invoke(*common, "--budget", "-1", "--min-cell-count", "3")
    assert code == 1 and out.count("error: ") == 2, out
    assert not (tmp_path / "p.json").exists()


def test_cli_refuses_to_issue_an_expired_permit_and_verify_reports_expiry(tmp_path: Path) -> None:
    study_file, common = _issue_args(tmp_path, "a")
    yesterday = (now_utc().date() - timedelta(days=1)).isoformat()
    code, out = _invoke(*common, "--valid-from", "2020-01-01", "--valid-until", yesterday)
    assert code == 1
    assert f"error: --valid-until {yesterday} has passed: the permit would be expired" in out
    assert not (tmp_path / "p.json").exists()
    # a permit that has expired since it was issued: the signature holds, the permit does not
    expired = body(
        key_id(load_private_key(tmp_path / "k/permit_body.key").public_key()),
        study_hash=study_hash(load_study(study_file)),
        valid_from=date(2020, 1, 1),
        valid_until=date.fromisoformat(yesterday),
    )
    (tmp_path / "old.json").write_text(
        json.dumps(sign(expired, load_private_key(tmp_path / "k/permit_body.key")))
    )
    code, out = _invoke("permit", "verify", tmp_path / "old.json", "--study", study_file,
                        "--pubkey", tmp_path / "k/permit_body.pub")  # fmt: skip
    assert code == 1
    assert f"expired on {yesterday}" in out and "valid signature" not in out


def test_cli_issues_a_dp_sgd_grant_capped_by_the_budget(tmp_path: Path) -> None:
    study_file = EXAMPLES / "gibleed_dp_training" / "study.yaml"
    generate_keypair(tmp_path / "k")
    code, out = _invoke("permit", "issue", study_file, "--key", tmp_path / "k/permit_body.key",
                        "--nodes", "a", "--budget", "1", "--valid-until", "2099-01-01",
                        "--dp", "bleed_model:dp_sgd", "--out", tmp_path / "p.json")  # fmt: skip
    assert code == 1 and "bind each node's identity with --node-key" in out
    assert "missing for ['a']" in out and not (tmp_path / "p.json").exists()
    code, out = _invoke("permit", "issue", study_file, "--key", tmp_path / "k/permit_body.key",
                        "--nodes", "a", "--budget", "1", "--valid-until", "2099-01-01",
                        "--dp", "bleed_model:dp_sgd", "--node-key", f"a={POOLING_A}",
                        "--out", tmp_path / "p.json")  # fmt: skip
    assert code == 0, out
    grants = json.loads((tmp_path / "p.json").read_text())["body"]["analyses"]
    assert [(g["id"], g["mechanism"], g["cost"]) for g in grants] == [
        ("bleed_model", "dp_sgd", 1.0)
    ]


def test_cli_review_lists_what_each_analysis_releases(tmp_path: Path) -> None:
    study_file = tmp_path / "study.json"
    study_file.write_text(json.dumps(STUDY))
    code, out = _invoke("permit", "review", study_file)
    assert code == 0, out
    assert study_hash(load_study(study_file)) in out
    assert "counts" in out and "n2" in out


def test_cli_review_says_pooled_mode_needs_a_gaussian_grant() -> None:
    study = EXAMPLES / "rare_disease" / "study.yaml"
    result = runner.invoke(app, ["permit", "review", str(study)], env={"COLUMNS": "400"})
    assert result.exit_code == 0, result.output
    row = next(line for line in result.output.splitlines() if line.startswith("│ cf_pooled"))
    assert "not available: pooled mode needs a gaussian grant" in row
    assert "each node adds its noise share" in row
