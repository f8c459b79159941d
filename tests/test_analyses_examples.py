"""examples/ANALYSES.md: every kind has an example entry, and every example validates."""

from __future__ import annotations

import re

import yaml
from conftest import REPO

from studies.analyses import REGISTRY


def test_every_kind_has_a_valid_example():
    text = (REPO / "examples" / "ANALYSES.md").read_text()
    entries = [
        e for block in re.findall(r"```yaml\n(.*?)```", text, re.S) for e in yaml.safe_load(block)
    ]
    for entry in entries:
        REGISTRY[entry["kind"]].Spec.model_validate(entry)
    assert {e["kind"] for e in entries} == set(REGISTRY)
    assert set(REGISTRY) == {
        "counts",
        "characterization",
        "incidence",
        "prevalence",
        "survival",
        "glm",
        "cox",
        "meta",
        "dp_sgd",
        "pooled_counts",
        "pooled_survival",
        "pooled_glm",
    }
