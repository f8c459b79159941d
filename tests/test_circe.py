"""ATLAS/Circe cohorts through ohdsi-circepy on GiBleed, and the free-text guard in front of it."""

from __future__ import annotations

import copy
import json

import pytest
from conftest import COHORTS, EXPECTED

from studies.circe import CirceError, check_expression, compile_circe
from studies.cohorts import materialise_cohorts
from studies.concepts import ConceptSetError
from studies.loading import load_study, study_from_data
from studies.model import StudyError

# CDMConnector's Circe files carry no published count; its README gives what circepy and
# duckcdm both compute (and the concept-cohort equality the CDMConnector tests assert).
CDMCONNECTOR = {
    "GiBleed_default": (479, 479),
    "GiBleed_default_with_descendants": (479, 479),
    "GiBleed_all": (479, 479),
    "gibleed_end_10": (479, 479),
    "GIBleed_male": (237, 237),
    "viral_sinusitus": (1315, 1315),
}
INJECTION = "x'); DROP TABLE person; -- @cdm_database_schema"


def published_cohortgenerator() -> dict[str, tuple[int, int]]:
    entries = json.loads((EXPECTED / "gibleed_expected_results.json").read_text())["expected"]
    counts = next(e["value"] for e in entries if e["id"] == "cohortgenerator_counts")
    return {key.split("_", 1)[1]: tuple(value) for key, value in counts.items() if "_" in key}


def circe_file(folder: str, name: str) -> dict:
    return json.loads((COHORTS / folder / f"{name}.json").read_text())


def study_with(circe: dict[str, dict]) -> dict:
    return {
        "name": "circe_study",
        "cohorts": [{"name": name, "circe": body} for name, body in circe.items()],
        "analyses": [{"id": "n", "kind": "counts", "cohorts": list(circe)}],
    }


def test_published_counts(gibleed):
    """CohortGenerator's published 1800/569/266/1750 and CDMConnector's 479/237/1315."""
    expected = {f"CohortGenerator/{k}": v for k, v in published_cohortgenerator().items()}
    expected |= {f"CDMConnector/{k}": v for k, v in CDMCONNECTOR.items()}
    assert expected["CohortGenerator/celecoxibCensored"] == (1750, 1750)
    names = {key: key.split("/")[1].replace("GiBleed", "gib").replace("_", "") for key in expected}
    study = study_from_data(
        study_with({names[key]: circe_file(*key.split("/")) for key in expected})
    )
    ids = materialise_cohorts(gibleed, study)
    rows = gibleed.execute(
        "SELECT cohort_definition_id, count(*), count(DISTINCT subject_id) FROM cohort GROUP BY 1"
    ).fetchall()
    got = {cid: (n, persons) for cid, n, persons in rows}
    assert {key: got.get(ids[names[key]]) for key in expected} == expected


def test_display_text_never_reaches_sql():
    """Names, titles and concept captions are dropped before circepy builds the SQL."""
    expression = circe_file("CohortGenerator", "celecoxibAge40Male")
    expression["title"] = INJECTION
    expression["ConceptSets"][0]["name"] = INJECTION
    expression["ConceptSets"][0]["expression"]["items"][0]["concept"]["CONCEPT_NAME"] = INJECTION
    expression["InclusionRules"][0]["name"] = INJECTION
    expression["InclusionRules"][0]["description"] = INJECTION
    check_expression(expression)
    statements = compile_circe(expression, 7)
    assert statements
    assert not any("DROP TABLE person" in s or "@" in s for s in statements)


@pytest.mark.parametrize(
    ("edit", "path"),
    [
        # a text filter: Circe pastes its text into a LIKE literal
        (
            lambda e: e["PrimaryCriteria"]["CriteriaList"][0]["ConditionOccurrence"].update(
                StopReason={"Text": INJECTION, "Op": "contains"}
            ),
            "StopReason",
        ),
        # a string where a number belongs
        (
            lambda e: e["ConceptSets"][0]["expression"]["items"][0]["concept"].update(
                CONCEPT_ID="192671) OR (1=1"
            ),
            "CONCEPT_ID",
        ),
        # an operator outside Circe's list
        (
            lambda e: e["PrimaryCriteria"]["CriteriaList"][0]["ConditionOccurrence"].update(
                Age={"Value": 18, "Op": "gt; DROP TABLE person"}
            ),
            "Age.Op",
        ),
        # a date that is not an ISO date
        (
            lambda e: e.update(CensorWindow={"StartDate": "2000-01-01'); DROP TABLE person; --"}),
            "CensorWindow.StartDate",
        ),
    ],
)
def test_free_text_is_refused(edit, path):
    expression = circe_file("CDMConnector", "GiBleed_default")
    edit(expression)
    with pytest.raises(CirceError, match=path):
        check_expression(expression)
    with pytest.raises(StudyError, match=r"cohorts\[bad\]\.circe"):
        study_from_data(study_with({"bad": copy.deepcopy(expression)}))


def test_node_refuses_a_circe_path():
    """On the wire the expression is inlined; a path would make the node read a file."""
    with pytest.raises(StudyError, match=r"cohorts\[c\]\.circe: must hold the Circe JSON"):
        study_from_data(study_with({"c": "cohorts/celecoxib.json"}))  # type: ignore[dict-item]


def test_load_study_inlines_the_file_and_the_hash_covers_it(tmp_path):
    from studies.canonical import study_hash

    expression = circe_file("CohortGenerator", "celecoxib")
    (tmp_path / "cohorts").mkdir()
    (tmp_path / "cohorts" / "celecoxib.json").write_text(json.dumps(expression))
    (tmp_path / "study.yaml").write_text(
        "name: s\ncohorts:\n  - name: celecoxib\n    circe: cohorts/celecoxib.json\n"
        "analyses:\n  - {id: n, kind: counts, cohorts: [celecoxib]}\n"
    )
    study = load_study(tmp_path / "study.yaml")
    assert study.cohorts[0].circe == expression
    before = study_hash(study)
    expression["PrimaryCriteria"]["PrimaryCriteriaLimit"]["Type"] = "All"
    (tmp_path / "cohorts" / "celecoxib.json").write_text(json.dumps(expression))
    assert study_hash(load_study(tmp_path / "study.yaml")) != before
    (tmp_path / "cohorts" / "celecoxib.json").unlink()
    with pytest.raises(StudyError, match=r"cohorts\[celecoxib\]\.circe: cannot read Circe JSON"):
        load_study(tmp_path / "study.yaml")


def test_unknown_concept_in_circe_set_names_the_set(gibleed):
    expression = circe_file("CDMConnector", "GiBleed_default")
    expression["ConceptSets"][0]["expression"]["items"][0]["concept"]["CONCEPT_ID"] = 987654321
    study = study_from_data(study_with({"c": expression}))
    with pytest.raises(ConceptSetError, match="987654321"):
        materialise_cohorts(gibleed, study)


def test_rerun_after_a_half_run(gibleed):
    """A Circe run that stopped half-way leaves scratch tables; the next run still works."""
    from studies.circe import materialise_circe
    from studies.cohorts import COHORT_TABLE_DDL

    expression = circe_file("CohortGenerator", "celecoxib")
    gibleed.execute(COHORT_TABLE_DDL)
    for statement in compile_circe(expression, 9)[:4]:
        gibleed.execute(statement)
    materialise_circe(gibleed, expression, 9)
    count = gibleed.execute("SELECT count(*) FROM cohort WHERE cohort_definition_id = 9")
    assert count.fetchall()[0][0] == 1800


def test_materialise_from_a_file_or_a_dict_with_base_dir(gibleed):
    """Outside a node a study may still name Circe files: by study path, or dict + base_dir."""
    from pathlib import Path

    example = Path(__file__).resolve().parents[1] / "examples" / "gibleed_circe"
    ids = materialise_cohorts(gibleed, example / "study.yaml")
    celecoxib = gibleed.execute(
        "SELECT count(*) FROM cohort WHERE cohort_definition_id = ?", [ids["celecoxib"]]
    ).fetchall()[0][0]
    assert celecoxib == 1800
    raw = study_with({"c": "cohorts/celecoxibAge40Male.json"})  # type: ignore[dict-item]
    ids = materialise_cohorts(gibleed, copy.deepcopy(raw), base_dir=example)
    assert gibleed.execute("SELECT count(*) FROM cohort").fetchall()[0][0] == 266
    with pytest.raises(StudyError, match="must hold the Circe JSON"):
        materialise_cohorts(gibleed, raw)


def test_render_describes_circe_cohorts_in_words():
    from pathlib import Path

    from studies.render import render_study

    example = Path(__file__).resolve().parents[1] / "examples" / "gibleed_circe" / "study.yaml"
    text = render_study(load_study(example))
    assert "ATLAS/Circe cohort definition" in text
    assert "drug eras of 'Celecoxib'" in text
    assert "who are male" in text
    assert "Analysis feasibility (counts)" in text and "strata: overall, sex, age_group" in text
