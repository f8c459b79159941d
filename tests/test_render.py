"""What a permit body reads: every field that changes the result is in the rendering.

Two studies that differ by one person (a calendar window, an age limit, an exit) must not
render alike; a Circe concept set whose name hides its concept shows the concept's own name; a
pair of cohorts that differ in one field is flagged.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from studies.canonical import study_hash
from studies.loading import study_from_data
from studies.render import near_twins, render_study

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
BASE = yaml.safe_load((EXAMPLES / "gibleed_glm" / "study.yaml").read_text())


def _variant(path: list[Any], value: Any) -> dict[str, Any]:
    data = copy.deepcopy(BASE)
    target = data
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    return data


VARIANTS = {
    "calendar window": (["cohorts", 0, "calendar"], {"start": "2010-01-01"}),
    "calendar end": (["cohorts", 0, "calendar"], {"end": "2019-12-31"}),
    "exit offset": (
        ["cohorts", 1, "exit"],
        {"type": "fixed_offset", "anchor": "end", "offset_days": 1},
    ),
    "inclusion age": (["cohorts", 0, "inclusion"], {"age": {"max": 84}}),
    "collapse gap": (["cohorts", 2, "collapse_days"], 1),
    "outcome window": (["analyses", 0, "outcome_window"], {"start": 1, "end": 364}),
    "covariate scale": (["analyses", 0, "covariates", 0, "scale"], 11),
    "descendants": (["concept_sets", 2, "include_descendants"], False),
}


@pytest.mark.parametrize("name", list(VARIANTS))
def test_studies_with_different_hashes_render_differently(name: str) -> None:
    base = study_from_data(BASE)
    variant = study_from_data(_variant(*VARIANTS[name]))
    assert study_hash(base) != study_hash(variant)
    assert render_study(base) != render_study(variant)


def test_every_pair_of_variants_renders_apart() -> None:
    """All variants and the base: as many distinct renderings as distinct hashes."""
    studies = [study_from_data(BASE)] + [study_from_data(_variant(*v)) for v in VARIANTS.values()]
    assert len({study_hash(s) for s in studies}) == len({render_study(s) for s in studies}) == 9


def test_calendar_is_in_words() -> None:
    text = render_study(study_from_data(_variant(*VARIANTS["calendar window"])))
    assert "Calendar: periods are cut to from 2010-01-01 to any date" in text


def test_a_circe_concept_set_shows_the_vocabulary_name_of_its_concept() -> None:
    """A set named "Gastrointestinal hemorrhage" holding cystic fibrosis (441267)."""
    circe = json.loads((EXAMPLES / "gibleed_circe" / "cohorts" / "celecoxib.json").read_text())
    forged = copy.deepcopy(circe)
    item = forged["ConceptSets"][0]["expression"]["items"][0]["concept"]
    forged["ConceptSets"][0]["name"] = "Gastrointestinal hemorrhage"
    item["CONCEPT_ID"], item["CONCEPT_NAME"] = 441267, "Gastrointestinal hemorrhage"
    study = study_from_data(
        {
            "name": "forged",
            "cohorts": [{"name": "target", "circe": forged}],
            "analyses": [{"id": "n", "kind": "counts", "cohorts": ["target"]}],
        }
    )
    text = render_study(study)
    assert "441267 Cystic fibrosis" in text
    assert (
        "the definition calls it 'Gastrointestinal hemorrhage', the vocabulary 'Cystic fibrosis'"
        in text
    )


def test_cohorts_one_field_apart_are_flagged() -> None:
    """Men up to 84 and men up to 83: one person apart, perhaps; the review says so."""
    data = copy.deepcopy(BASE)
    first = {
        **data["cohorts"][0],
        "name": "to_84",
        "inclusion": {"age": {"max": 84}, "sex": ["male"]},
    }
    second = {**first, "name": "to_83", "inclusion": {"age": {"max": 83}, "sex": ["male"]}}
    data["cohorts"] += [first, second]
    study = study_from_data(data)
    flags = near_twins(study)
    assert any("to_84 and to_83 differ only in inclusion.age.max: 84 vs 83" in f for f in flags)
    assert "Cohorts that differ only slightly" in render_study(study)
