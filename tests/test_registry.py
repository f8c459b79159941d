"""The analysis registry refuses a second class under a kind already taken."""

from __future__ import annotations

import pytest

from studies.analyses import REGISTRY
from studies.registry import register


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
        REGISTRY.pop("test_only_fresh_kind")


def test_register_refuses_a_class_without_kind() -> None:
    class Nameless:
        pass

    with pytest.raises(ValueError, match="Nameless has no 'kind'"):
        register(Nameless)
