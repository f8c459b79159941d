"""Fuzzed documents (issue 15): study definitions (data, YAML and JSON text), Circe JSON,
permits, node policies and revocation lists, each mutated from a valid one by hypothesis.

Every input either parses into the project's model or is refused with the project's own error
type (``StudyError``, ``CirceError`` inside it, ``PermitError``, ``PolicyError``); through the
CLI the refusal is an ``error:`` line and exit 1, never a traceback. A Circe expression that
is accepted compiles to SQL that carries none of the text the fuzzing put into it.
"""

from __future__ import annotations

import json
import tomllib
from contextlib import suppress
from datetime import date
from pathlib import Path
from typing import Any

import pytest
import yaml
from _fuzz import JSON_VALUES, NASTY_TEXT, documents, fuzzed, mutated, outcome
from conftest import REPO
from hypothesis import example
from hypothesis import strategies as st
from typer.testing import CliRunner

from fedomop.cli import app
from node.policy import Policy, PolicyError, load_policy
from studies.circe import compile_circe
from studies.loading import load_study, study_from_data
from studies.model import Study, StudyError
from studies.permit import (
    PermitBody,
    PermitError,
    RevocationList,
    generate_keypair,
    load_private_key,
    revoke,
    sign,
    verify_permit,
    verify_revocations,
)

STUDY_FILE = REPO / "examples" / "gibleed_glm" / "study.yaml"
CIRCE_FILE = REPO / "examples" / "gibleed_circe" / "cohorts" / "celecoxib.json"
POLICY_FILE = REPO / "examples" / "node.toml"
BASE_STUDY = yaml.safe_load(STUDY_FILE.read_text())
CIRCE = json.loads(CIRCE_FILE.read_text())
#: Pieces of the fuzzed text (``_fuzz.NASTY_TEXT``) that must never reach SQL text.
MARKERS = ("DROP TABLE person", "SELECT 1;", "7*7", "passwd", "\u202e", "1e309")


pytestmark = pytest.mark.usefixtures("fuzz_counts")  # tests/conftest.py


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("fuzz_keys")
    private, public, _ = generate_keypair(root)
    return {"key": load_private_key(private), "pub": public, "root": root}


def _cli(*args: str) -> Any:
    """``fedomop ARGS`` in process; an exception escaping the command fails the test."""
    result = CliRunner().invoke(app, list(args))
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result


def _assert_cli_refusal(result: Any) -> None:
    assert result.exit_code == 1, result.output
    assert "error:" in result.output and "Traceback" not in result.output


# --- study definitions -------------------------------------------------------------------------

N_STUDY = 120


@st.composite
def _with_text(draw: st.DrawFn) -> dict[str, Any]:
    """The example study with fuzzed text where text is allowed (descriptions) or not (names)."""
    raw = json.loads(json.dumps(BASE_STUDY))
    text = NASTY_TEXT | st.text(max_size=40)
    raw["description"] = draw(text)
    cohort = draw(st.sampled_from(raw["cohorts"]))
    cohort[draw(st.sampled_from(["description", "name"]))] = draw(text)
    return raw


@fuzzed(
    "study definition (data)",
    N_STUDY,
    raw=mutated(BASE_STUDY, JSON_VALUES | NASTY_TEXT) | _with_text(),
)
@example(raw={**BASE_STUDY, "analyses": [{**BASE_STUDY["analyses"][0], "kind": [[]]}]})  # found
def test_a_mutated_study_validates_or_is_refused_by_field(raw: Any) -> None:
    try:
        study = study_from_data(raw)
    except StudyError as err:
        assert err.problems and all(path and reason for path, reason in err.problems)
        outcome("study definition (data)", "refused")
        return
    outcome("study definition (data)", "accepted")
    assert isinstance(study, Study)
    from studies.canonical import study_hash

    assert len(study_hash(study)) == 64
    assert not [m for m in MARKERS if m in _cohort_sql(study)]  # free text never becomes SQL


def _cohort_sql(study: Study) -> str:
    """The SQL text of the study's own-form cohorts (values travel as parameters)."""
    from studies.cohorts import cohort_ids, cohort_sql
    from studies.concepts import codeset_ids

    codesets, ids = codeset_ids(study.concept_sets), cohort_ids(study)
    own = [c for c in study.cohorts if not hasattr(c, "circe")]
    return "\n".join(cohort_sql(c, ids[c.name], codesets).text for c in own)


N_STUDY_TEXT = 40


@st.composite
def _study_text(draw: st.DrawFn) -> tuple[str, bytes]:
    """A study file's bytes: the example truncated, garbled, re-encoded, or a mutated study
    written as YAML or JSON."""
    text = STUDY_FILE.read_bytes()
    how = draw(st.sampled_from(["truncate", "insert", "utf16", "json", "yaml", "nul", "tabs"]))
    if how == "truncate":
        return ".yaml", text[: draw(st.integers(0, len(text) - 1))]
    if how == "insert":
        at = draw(st.integers(0, len(text)))
        return ".yaml", text[:at] + draw(st.binary(min_size=1, max_size=20)) + text[at:]
    if how == "utf16":
        return ".yaml", text.decode().encode("utf-16")
    if how == "nul":
        return ".yaml", text.replace(b"\n", b"\n\x00", draw(st.integers(1, 5)))
    if how == "tabs":
        return ".yaml", text.replace(b"  ", b"\t")
    raw = draw(mutated(BASE_STUDY))
    if how == "json":
        return ".json", json.dumps(raw, default=str).encode()
    return ".yaml", yaml.safe_dump(raw).encode()


@fuzzed("study file (YAML/JSON text) via `study validate`", N_STUDY_TEXT, document=_study_text())
@example(document=(".yaml", STUDY_FILE.read_text().encode("utf-16")))  # found: not UTF-8
def test_a_broken_study_file_gets_an_error_line_and_exit_1(tmp_path_factory, document) -> None:
    suffix, data = document
    path = tmp_path_factory.mktemp("study") / f"study{suffix}"
    path.write_bytes(data)
    try:
        load_study(path)
    except StudyError:
        _assert_cli_refusal(_cli("study", "validate", str(path)))
    else:
        assert _cli("study", "validate", str(path)).exit_code == 0


# --- Circe JSON ----------------------------------------------------------------------------------

N_CIRCE = 60


def _circe_study(expression: Any) -> dict[str, Any]:
    return {
        "name": "circe_fuzz",
        "concept_sets": [{"name": "x", "concepts": [1]}],
        "cohorts": [{"name": "celecoxib", "circe": expression}],
        "analyses": [{"id": "n", "kind": "counts", "cohorts": ["celecoxib"]}],
    }


@fuzzed("Circe JSON", N_CIRCE, expression=mutated(CIRCE, JSON_VALUES | NASTY_TEXT))
@example(expression={**CIRCE, "ConceptSets": [{"id": 0, "name": "x"}]})  # found: compile failed
def test_a_mutated_circe_expression_is_refused_or_compiles_without_its_text(
    expression: Any,
) -> None:
    try:
        study = study_from_data(_circe_study(expression))
    except StudyError as err:
        assert err.problems
        outcome("Circe JSON", "refused")
        return
    outcome("Circe JSON", "accepted")
    sql = "\n".join(compile_circe(study.cohorts[0].circe, 1))
    assert not [m for m in MARKERS if m in sql]


# --- permits ---------------------------------------------------------------------------------------


def _permit(keys: dict[str, Any]) -> dict[str, Any]:
    from _helpers import signed_permit

    from studies.canonical import study_hash
    from studies.permit import PermitAnalysis

    study = load_study(STUDY_FILE)
    return signed_permit(
        keys["key"],
        study_hash=study_hash(study),
        nodes=["node-a"],
        analyses=[PermitAnalysis(id=a.id) for a in study.analyses],
        epsilon=1.0,
    )


def _verified(verify: Any, document: Any, original: dict[str, Any], key: Any) -> Any | None:
    """``verify(document)`` trusting the key that signed ``original``; None when it refuses,
    which it must do with a message."""
    trusted = {original["signature"]["key_id"]: key.public_key()}
    try:
        return verify(document, trusted)
    except PermitError as err:
        assert str(err)
        return None


@fuzzed("permit document", 100, data=st.data())
def test_a_mutated_permit_is_refused_unless_its_body_still_verifies(keys, data) -> None:
    original = _permit(keys)
    document = data.draw(mutated(original))
    body = _verified(verify_permit, document, original, keys["key"])
    if body is None:
        return
    assert isinstance(body, PermitBody)  # only a change the canonical body does not see
    assert body.model_dump(mode="json") == PermitBody.model_validate(original["body"]).model_dump(
        mode="json"
    )


# --- revocation lists ----------------------------------------------------------------------------


@fuzzed("revocation list", 80, data=st.data())
def test_a_mutated_revocation_list_is_refused_unless_it_still_verifies(keys, data) -> None:
    original = revoke(None, "pmt-0123", keys["key"], reason="fuzz")
    document = data.draw(mutated(original))
    resigned = data.draw(st.booleans())
    if resigned and isinstance(document.get("body"), dict):
        with suppress(ValueError):  # a trusted issuer signing a strange list: it must parse
            document = sign(RevocationList.model_validate(document["body"]), keys["key"])
    listed = _verified(verify_revocations, document, original, keys["key"])
    if listed is None:
        return
    assert isinstance(listed.revoked_ids(), set)


# --- node policies -------------------------------------------------------------------------------

N_POLICY = 80
TOML_SCALARS = (
    st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**63 - 1)
    | st.floats(allow_nan=True)
    | st.text(max_size=12)
    | NASTY_TEXT
)
TOML_VALUES = documents(TOML_SCALARS, size=3, key_size=6, leaves=6)


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return {"nan": "nan", "inf": "inf", "-inf": "-inf"}.get(repr(value), repr(value))
    if isinstance(value, int):
        return str(value)
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, date):
        return value.isoformat()
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    return "{" + ", ".join(f"{json.dumps(k)} = {_toml_value(v)}" for k, v in value.items()) + "}"


def _toml(document: dict[str, Any]) -> str:
    """TOML text of a policy-shaped document: top-level tables of values (inline below)."""
    lines = []
    for section, values in document.items():
        if not isinstance(values, dict):
            lines.append(f"{json.dumps(section)} = {_toml_value(values)}")
            continue
        lines.append(f"[{json.dumps(section)}]")
        lines += [f"{json.dumps(k)} = {_toml_value(v)}" for k, v in values.items()]
    return "\n".join(lines) + "\n"


@st.composite
def _policy_text(draw: st.DrawFn) -> bytes:
    text = POLICY_FILE.read_bytes()
    how = draw(st.sampled_from(["mutate", "mutate", "truncate", "insert", "latin1"]))
    if how == "truncate":
        return text[: draw(st.integers(0, len(text) - 1))]
    if how == "insert":
        at = draw(st.integers(0, len(text)))
        return text[:at] + draw(st.binary(min_size=1, max_size=12)) + text[at:]
    if how == "latin1":
        return text.replace(b'"', "\u00ab".encode("latin-1"), 1)
    return _toml(draw(mutated(tomllib.loads(text.decode()), TOML_VALUES))).encode()


@fuzzed("node policy (TOML)", N_POLICY, text=_policy_text())
@example(text=POLICY_FILE.read_bytes().replace(b'"cdm.duckdb"', b'"' + b"x" * 300 + b'"'))  # found
@example(text=POLICY_FILE.read_bytes().replace(b'"', b"\xab", 1))  # found: not UTF-8
def test_a_broken_policy_is_refused_naming_the_file(tmp_path_factory, text: bytes) -> None:
    path = tmp_path_factory.mktemp("policy") / "node.toml"
    path.write_bytes(text)
    try:
        policy = load_policy(path)
    except PolicyError as err:
        assert str(path) in str(err)
        _assert_cli_refusal(_cli("node", "check-policy", "--policy", str(path)))
        return
    assert isinstance(policy, Policy)
    assert _cli("node", "check-policy", "--policy", str(path)).exit_code in (0, 1)


def test_the_fuzzed_documents_start_from_valid_ones(keys) -> None:
    """The bases the mutations start from are accepted, so a refusal is the mutation's."""
    assert study_from_data(BASE_STUDY)
    assert study_from_data(_circe_study(CIRCE))
    permit = _permit(keys)
    assert verify_permit(permit, {permit["signature"]["key_id"]: keys["key"].public_key()})
    assert isinstance(load_policy(POLICY_FILE), Policy)
    assert isinstance(Path(STUDY_FILE), Path)
