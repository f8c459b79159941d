"""The study schema: valid studies load, invalid ones are refused naming the field; stable hash."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from fedomop.cli import app
from studies.canonical import canonical_data, study_hash
from studies.loading import load_study, study_from_data
from studies.model import Study, StudyError

STUDY = {
    "schema_version": 1,
    "name": "gi_bleed_feasibility",
    "description": "GI bleed after NSAIDs",
    "concept_sets": [
        {"name": "gi_bleed", "concepts": [192671], "include_descendants": True},
        {"name": "nsaids", "concepts": [1118084, 1124300], "include_descendants": True},
    ],
    "cohorts": [
        {
            "name": "nsaid_users",
            "entry": {"domain": "drug", "concept_set": "nsaids"},
            "inclusion": {"age": {"min": 18}, "prior_observation_days": 365},
        },
        {
            "name": "gi_bleed",
            "entry": {"domain": "condition", "concept_set": "gi_bleed", "events": "all"},
            "exit": {"type": "fixed_offset", "offset_days": 30},
        },
    ],
    "analyses": [
        {"id": "feasibility", "kind": "counts", "cohorts": ["nsaid_users", "gi_bleed"]},
    ],
}


def problems(raw: dict) -> dict[str, str]:
    with pytest.raises(StudyError) as err:
        study_from_data(raw)
    return dict(err.value.problems)


def edited(path: str, value: object) -> dict:
    """STUDY with the value at dotted ``path`` replaced (list indices as numbers)."""
    raw = copy.deepcopy(STUDY)
    *parents, last = [int(p) if p.isdigit() else p for p in path.split(".")]
    node = raw
    for part in parents:
        node = node[part]
    node[last] = value
    return raw


def test_valid_study_loads_with_defaults():
    study = study_from_data(STUDY)
    cohort = study.cohort("gi_bleed")
    assert cohort.entry.within_observation is True
    assert cohort.exit.anchor == "start"
    assert study.analysis("feasibility").kind == "counts"
    with pytest.raises(KeyError, match="feasibility"):
        study.analysis("missing")


@pytest.mark.parametrize(
    ("path", "value", "field", "reason"),
    [
        ("concept_sets.0.concepts", ["abc"], "concept_sets[gi_bleed].concepts.0", "valid integer"),
        ("concept_sets.0.concepts", [], "concept_sets[gi_bleed].concepts", "at least 1"),
        ("concept_sets.0.concepts", [-5], "concept_sets[gi_bleed].concepts.0", "greater than 0"),
        ("cohorts.0.entry.domain", "genome", "cohorts[nsaid_users].entry.domain", "'condition'"),
        (
            "cohorts.0.entry.concept_set",
            "nope",
            "cohorts[nsaid_users].entry.concept_set",
            "unknown concept",
        ),
        (
            "cohorts.0.inclusion.age",
            {"min": 60, "max": 18},
            "cohorts[nsaid_users].inclusion.age",
            "greater",
        ),
        (
            "cohorts.1.exit.offset_days",
            "soon",
            "cohorts[gi_bleed].exit.offset_days",
            "valid integer",
        ),
        (
            "cohorts.0.entry.domian",
            "drug",
            "cohorts[nsaid_users].entry.domian",
            "did you mean 'domain'",
        ),
        ("cohorts.0.name", "a b", "cohorts.0.name", "not a valid name"),
        ("cohorts.0.name", "x'; DROP TABLE person;--", "cohorts.0.name", "not a valid name"),
        ("cohorts.1.name", "nsaid_users", "cohorts.1", "duplicate name"),
        ("concept_sets.1.name", "<script>", "concept_sets.1.name", "not a valid name"),
        ("name", "robert'); DROP TABLE students;--", "name", "not a valid name"),
        ("analyses.0.kind", "sql", "analyses[feasibility].kind", "unknown analysis kind 'sql'"),
        ("analyses.0.id", "1; DELETE", "analyses.0.id", "not a valid name"),
        (
            "analyses.0.cohorts",
            ["ghost"],
            "analyses[feasibility].cohorts.0",
            "unknown cohort 'ghost'",
        ),
        ("analyses.0.cohorts", [], "analyses[feasibility].cohorts", "at least 1"),
        ("schema_version", 2, "schema_version", "Input should be 1"),
        ("cohorts", [], "cohorts", "at least 1"),
    ],
)
def test_invalid_studies_name_the_field(path, value, field, reason):
    found = problems(edited(path, value))
    assert field in found, found
    assert reason in found[field]


def test_unknown_kind_lists_the_known_ones():
    found = problems(edited("analyses.0.kind", "sql"))
    assert "'counts'" in found["analyses[feasibility].kind"]


def test_cohort_rules_are_checked():
    # drug_era_end needs a drug entry
    raw = edited("cohorts.1.exit", {"type": "drug_era_end"})
    assert "drug_era_end exit needs a drug entry" in problems(raw)["cohorts[gi_bleed]"]
    # end of observation needs entry events inside an observation period
    raw = edited("cohorts.0.entry.within_observation", False)
    assert "within_observation" in problems(raw)["cohorts[nsaid_users]"]
    # a value range only where values exist
    raw = edited("cohorts.1.entry.value", {"min": 1})
    assert "value range applies" in problems(raw)["cohorts[gi_bleed].entry"]
    # count bounds in order; max_count 0 alone means absence
    rule = {"domain": "condition", "concept_set": "gi_bleed", "min_count": 3, "max_count": 1}
    raw = edited("cohorts.0.inclusion.events", [rule])
    assert "min_count 3" in problems(raw)["cohorts[nsaid_users].inclusion.events.0"]
    absent = {"domain": "condition", "concept_set": "gi_bleed", "max_count": 0}
    study = study_from_data(edited("cohorts.0.inclusion.events", [absent]))
    assert study.cohorts[0].inclusion.events[0].min_count == 0


def test_cohort_names_inside_analysis_specs_are_checked():
    """Cohort references are found by field name, also inside nested parts of a spec."""
    raw = copy.deepcopy(STUDY)
    raw["analyses"].append(
        {
            "id": "risk",
            "kind": "glm",
            "family": "binomial",
            "cohort": "nsaid_users",
            "outcome": "gi_bleed",
            "covariates": [{"type": "cohort", "cohort": "phantom"}],
        }
    )
    found = problems(raw)
    assert "unknown cohort 'phantom'" in found["analyses[risk].covariates.0.cohort"]
    raw["analyses"][1]["covariates"][0]["cohort"] = "gi_bleed"
    assert study_from_data(raw).analysis("risk").kind == "glm"
    raw["analyses"][1]["covariates"].append(
        {"type": "concept_set", "concept_set": "ghost_drugs", "domain": "drug"}
    )
    found = problems(raw)
    assert "unknown concept set 'ghost_drugs'" in found["analyses[risk].covariates.1.concept_set"]


def test_every_problem_is_reported_at_once():
    raw = edited("name", "bad name")
    raw["analyses"][0]["kind"] = "nope"
    raw["cohorts"][0]["entry"]["domain"] = "genome"
    assert {"name", "analyses[feasibility].kind", "cohorts[nsaid_users].entry.domain"} <= set(
        problems(raw)
    )


def test_errors_name_analyses_by_id_and_suggest_the_nearest_field_or_kind():
    """``analyses[bleed_risk]``, not ``analyses.1``; a typo gets the closest valid word."""
    raw = copy.deepcopy(STUDY)
    raw["analyses"].append({"id": "bleed_risk", "kind": "glmm", "cohort": "nsaid_users"})
    raw["analyses"].append(
        {"id": "risk2", "kind": "glm", "family": "binomail", "cohort": "nsaid_users",
         "outcome": "gi_bleed", "covariats": []}
    )  # fmt: skip
    raw["cohorts"][1]["entry"]["events"] = "alll"
    found = problems(raw)
    assert not any(".1." in where or ".2." in where for where in found), found
    assert found["analyses[bleed_risk].kind"].endswith("did you mean 'glm'?")
    assert found["analyses[risk2].family"].endswith("did you mean 'binomial'?")
    assert (
        found["analyses[risk2].covariats"]
        == "unknown field 'covariats'; did you mean 'covariates'?"
    )
    assert found["cohorts[gi_bleed].entry.events"].endswith("did you mean 'all'?")
    # a cross reference: the nearest defined cohort
    raw = copy.deepcopy(STUDY)
    raw["analyses"][0]["cohorts"] = ["nsaid_user"]
    assert problems(raw)["analyses[feasibility].cohorts.0"].endswith("did you mean 'nsaid_users'?")
    # an entry without a usable id keeps its position
    raw = edited("analyses.0.id", "1; DELETE")
    assert "analyses.0.id" in problems(raw)


def write(path: Path, data: dict, as_json: bool) -> Path:
    path.write_text(json.dumps(data, indent=3) if as_json else yaml.safe_dump(data))
    return path


def test_hash_is_stable_across_formats_order_and_defaults(tmp_path):
    as_yaml = load_study(write(tmp_path / "s.yaml", STUDY, as_json=False))
    as_json = load_study(write(tmp_path / "s.json", STUDY, as_json=True))
    reordered = dict(reversed(list(copy.deepcopy(STUDY).items())))
    reordered["cohorts"][0] = dict(reversed(list(reordered["cohorts"][0].items())))
    explicit = edited("cohorts.0.entry.within_observation", True)
    explicit["concept_sets"][0]["excludes"] = []
    explicit["cohorts"][0]["inclusion"]["age"]["min"] = 18.0
    digest = study_hash(as_yaml)
    assert len(digest) == 64 and int(digest, 16) >= 0
    assert study_hash(as_json) == digest
    assert study_hash(study_from_data(reordered)) == digest
    assert study_hash(study_from_data(explicit)) == digest
    # the document a node receives validates to the same study and the same hash
    assert study_hash(Study.model_validate(canonical_data(as_yaml))) == digest
    # any change of substance changes it
    for path, value in [
        ("cohorts.1.exit.offset_days", 31),
        ("concept_sets.0.include_descendants", False),
        ("analyses.0.cohorts", ["gi_bleed"]),
        ("description", "another purpose"),
    ]:
        assert study_hash(study_from_data(edited(path, value))) != digest, path


def test_cli_validate_hash_render(tmp_path):
    runner = CliRunner()
    good = write(tmp_path / "good.yaml", STUDY, as_json=False)
    result = runner.invoke(app, ["study", "validate", str(good)])
    assert result.exit_code == 0, result.output
    assert "valid" in result.output
    result = runner.invoke(app, ["study", "hash", str(good)])
    assert result.output.strip() == study_hash(load_study(good))
    result = runner.invoke(app, ["study", "render", str(good)])
    assert result.exit_code == 0
    for words in (
        "the first drug exposure of concept set 'nsaids' inside an observation period",
        "aged at least 18 years at index",
        "at least 365 days of observation before index",
        "30 days after the entry event's start date",
        "Analysis feasibility (counts)",
        study_hash(load_study(good)),
    ):
        assert words in result.output
    bad = write(tmp_path / "bad.yaml", edited("analyses.0.kind", "sql"), as_json=False)
    result = runner.invoke(app, ["study", "validate", str(bad)])
    assert result.exit_code == 1
    assert (
        "analyses[feasibility].kind" in result.output and "unknown analysis kind" in result.output
    )
    result = runner.invoke(app, ["study", "validate", str(tmp_path / "missing.yaml")])
    assert result.exit_code == 1 and "cannot read" in result.output
