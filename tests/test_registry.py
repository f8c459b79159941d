"""The analysis registry refuses a second class under a kind already taken."""

from __future__ import annotations

import sys
import textwrap

import pytest
import yaml

from studies.analyses import REGISTRY
from studies.registry import SHIPPED, register


def test_register_refuses_a_duplicate_kind() -> None:
    original = REGISTRY["counts"]

    class Impostor:
        kind = "counts"

    with pytest.raises(ValueError, match=r"'counts' is already registered by .*\.Counts;"):
        register(Impostor)
    assert REGISTRY["counts"] is original


def test_register_accepts_the_same_class_again_and_a_new_kind() -> None:
    original = REGISTRY["counts"]
    assert register(original) is original

    class Fresh:
        kind = "test_only_fresh_kind"

    try:
        assert register(Fresh) is Fresh
        assert REGISTRY["test_only_fresh_kind"] is Fresh
    finally:
        REGISTRY.discard("test_only_fresh_kind")


def test_register_refuses_a_class_without_kind() -> None:
    class Nameless:
        pass

    with pytest.raises(ValueError, match="Nameless has no 'kind'"):
        register(Nameless)


def test_every_shipped_kind_resolves_to_its_analysis_and_the_same_spec() -> None:
    """The lazy table and the classes agree: the Spec validation uses without importing the
    analysis is the one the analysis runs with, under the kind its literal names."""
    from typing import get_args

    assert len(SHIPPED) == 12 and sorted(REGISTRY) == sorted(SHIPPED)
    for kind in SHIPPED:
        spec = REGISTRY.spec(kind)
        assert get_args(spec.model_fields["kind"].annotation) == (kind,)
        assert REGISTRY[kind].kind == kind
        assert REGISTRY[kind].Spec is spec


def test_register_refuses_a_shipped_kind_from_another_module() -> None:
    class Survival:
        kind = "survival"

    with pytest.raises(
        ValueError, match=r"'survival' is already registered by studies\.analyses\.survival"
    ):
        register(Survival)


@pytest.mark.parametrize("kind", sorted(SHIPPED))
def test_each_kinds_documented_study_entry_validates(kind: str) -> None:
    """The ``Study entry::`` example in a kind's module docstring (what ``permit review`` and
    readers copy) is a valid entry of that kind."""
    doc = sys.modules[REGISTRY[kind].__module__].__doc__ or ""
    _, found, after = doc.partition("Study entry::\n\n")
    assert found, f"{kind}: no 'Study entry::' example"
    entries = yaml.safe_load(textwrap.dedent(after.split("\n\n", 1)[0]))
    assert [entry["kind"] for entry in entries] == [kind]
    assert REGISTRY.spec(kind).model_validate(entries[0]).kind == kind
