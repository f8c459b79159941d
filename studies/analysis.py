"""The analysis pair: ``local`` on a node, ``combine`` on the coordinator.

Every analysis is written once as a class with these two methods and registered by its ``kind``
(the ``kind`` field of an analysis in a study definition). The same pair runs in-process over
several DuckDB files (the reference the tests compare against), in Flower simulation and in
Flower deployment: the transport never knows what an analysis computes.

- ``local(cdm, spec, state) -> statistics table`` (see ``studies.statistics``): aggregates only.
- ``combine(statistics, spec, state) -> Finished | NextRound``: the per-node tables, in node order,
  with the node names in ``CombineInput.node_names``. Multi-round analyses (GLM Newton–Raphson)
  return ``NextRound(state)`` until they converge, then ``Finished``.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field, replace
from typing import Any, ClassVar, Protocol

import duckdb
import polars as pl

from studies.permit import DEFAULT_MIN_CELL_COUNT


@dataclass
class CdmContext:
    """What ``local`` may touch on a node: the CDM connection with the study's cohorts materialised.

    ``con`` holds the OMOP CDM tables plus a temporary table ``cohort`` (cohort_definition_id,
    subject_id, cohort_start_date, cohort_end_date) with every cohort of the study, and
    ``cohort_ids`` maps the study's cohort names to their cohort_definition_id there.
    ``concept_sets`` maps the study's concept set names to their ``codeset_id`` in the temporary
    table ``study_codeset(codeset_id, concept_id)`` of concept ids resolved on this node
    (``studies.concepts``), so an analysis can name a concept set (e.g. a GLM covariate) and
    reach its concepts as table rows, never as SQL text. Empty when the caller resolved none.
    ``min_cell_count`` is the gate's effective minimum cell count (policy and permit): an
    analysis whose released keys follow the data (the time axis of survival and Cox,
    ``studies.analyses.time_axis``) shapes them so each count is 0 or at least this; the
    gate still suppresses every count itself. Without a gate (``run_local``) it is the default.
    """

    con: duckdb.DuckDBPyConnection
    cohort_ids: dict[str, int]
    cdm_name: str = "cdm"
    concept_sets: dict[str, int] = field(default_factory=dict)
    min_cell_count: int = DEFAULT_MIN_CELL_COUNT
    noise_multiplier: float | None = None
    """DP-SGD's noise multiplier as the gate fixed it from the permit's budget
    (``privacy.dpsgd.fixed_noise_multiplier``); None without a gate."""


@dataclass
class Finished:
    """The analysis is done: ``result`` is a summarised_result table (``studies.results``)."""

    result: pl.DataFrame


@dataclass
class NextRound:
    """Run ``local`` again on every node with this state (e.g. the current GLM coefficients)."""

    state: dict[str, Any]


@dataclass
class CombineInput:
    """Per-node statistics tables handed to ``combine``, aligned with the node names."""

    statistics: list[pl.DataFrame]
    node_names: list[str] = field(default_factory=list)


EPOCH = dt.date(1970, 1, 1)


@dataclass(frozen=True)
class Granularity:
    """The finest cuts an analysis makes, for the node's policy to compare with its minimums:
    the narrowest age band (years), time bin (days) and calendar window (days); None where the
    analysis makes no such cut."""

    age_band_years: int | None = None
    time_bin_days: int | None = None
    calendar_window_days: int | None = None


@dataclass(frozen=True)
class ReleaseProfile:
    """What the gate needs to know about an analysis's releases, declared by the analysis itself.

    As an OpenDP measurement carries its own privacy map, an analysis states its release limits
    here instead of the gate inferring them from kind strings: ``max_rounds`` bounds the rounds a
    node answers (round ``max_rounds`` and later are refused; the permit may lower it), and
    ``rows_per_person`` how many count or sum rows with a finite per-person bound (the rows a DP
    release noises; rows bounded by ``inf`` are withheld) one person can touch in one release,
    computed from the spec alone (None: every row, the safe bound when the analysis cannot say);
    a permit may raise it, never lower it (``privacy.dp.rows_per_person``). ``data_keyed`` names
    the ``variable_name`` values whose levels come from the data in round 0 (concept ids; later
    rounds answer for keys the transcript's state lists), and
    ``data_keyed_strata`` the strata whose levels do (calendar years): such a row is released
    only when it passes disclosure control, never as a withheld mark (its key alone says
    someone is there), and under DP never (presence is not noised).
    """

    max_rounds: int = 1
    rows_per_person: int | None = None
    data_keyed: frozenset[str] = frozenset()
    data_keyed_strata: frozenset[str] = frozenset({"calendar_year"})
    granularity: Granularity = field(default_factory=lambda: Granularity())
    pooled: bool = False
    """Released in pooled mode (``node.pooled``): masked noise shares for a secure sum."""
    pooled_exact: bool = False
    """A pooled analysis that sums model statistics exactly once its noisy guard sum passed
    (``pooled_glm``; its grant is ``gaussian``, for the guard sum): only the exact total of the
    study's declared rows is learnt, never a node's own (``node.pooled.check_guard_sum``)."""

    @property
    def multi_round(self) -> bool:
        """Whether rounds after the first exist: their states then come from a transcript."""
        return self.max_rounds > 1


def granularity_of(spec: Any) -> Granularity:
    """Read the cuts from the spec's own fields (``age_groups``, ``time_bin_days``,
    ``periods``), so every analysis kind declares them the same way."""
    bands = getattr(spec, "age_groups", None) or []
    periods = getattr(spec, "periods", None) or []
    return Granularity(
        age_band_years=min((hi - lo + 1 for lo, hi in bands), default=None),
        time_bin_days=getattr(spec, "time_bin_days", None),
        calendar_window_days=min(_windows(periods), default=None),
    )


def _windows(periods: list[Any]) -> list[int]:
    """Days of each period and of each non-empty difference of two overlapping ones: nested
    periods ([1900-01-01, D] for every day D) cut one-day windows by subtraction."""
    spans = [((p.start - EPOCH).days, (p.end - EPOCH).days + 1) for p in periods]
    days = [end - start for start, end in spans]
    for i, (a0, a1) in enumerate(spans):
        for b0, b1 in spans[i + 1 :]:
            if a0 < b1 and b0 < a1:  # overlapping: a \ b and b \ a are windows too
                days += [n for n in (abs(a0 - b0), abs(a1 - b1)) if n > 0]
    return days


def release_profile(analysis: Any, spec: Any) -> ReleaseProfile:
    """The analysis's declared profile for this spec (single-round, rows unbounded by default),
    with the spec's granularity."""
    declare = getattr(analysis, "profile", None)
    profile = declare(spec) if declare is not None else ReleaseProfile()
    return replace(profile, granularity=granularity_of(spec))


class Analysis(Protocol):
    """One analysis kind; ``spec`` is the validated analysis entry from the study definition."""

    kind: ClassVar[str]

    def local(self, cdm: CdmContext, spec: Any, state: dict[str, Any] | None) -> pl.DataFrame:
        """Compute this node's aggregate statistics (never row-level data)."""
        ...

    def combine(
        self, inputs: CombineInput, spec: Any, state: dict[str, Any] | None
    ) -> Finished | NextRound:
        """Pool the nodes' statistics into a result, or ask for another round."""
        ...
