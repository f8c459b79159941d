"""Every analysis kind's ``Spec``: the pydantic model a study's analysis entry is validated by.

Why apart from the analyses: ``fedomop study validate`` (and every node reading a study) needs
only these, and the modules that compute a kind (``local``/``combine``) import polars, DuckDB and
numpy; this module loads nothing but pydantic, so validating a study imports no compute library.
``studies.registry`` maps each kind to its Spec here and to its analysis class, which it imports
when the kind first runs. A Spec's ``kind`` literal is its registry key.
"""

from __future__ import annotations

import datetime as dt
from typing import Annotated, Any, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from studies.analyses.covariates import (
    CohortCovariate,
    ConceptSetCovariate,
    Covariate,
    CovariatesSpec,
    Feature,
)
from studies.analyses.spec_fields import (
    AgeGroups,
    Confidence,
    FollowUpDays,
    MaxIterations,
    OutcomeWashout,
    PersonStrata,
    SpecBase,
    Strata,
    TimeBinDays,
    Tolerance,
    Window,
    normalise_strata,
)
from studies.fields import Name, check_ordered

#: The domains a characterization describes, with their labels in its result.
Domain = Literal["condition", "drug", "procedure", "measurement"]
DOMAIN_LABELS = {
    "condition": "Conditions",
    "drug": "Drugs",
    "procedure": "Procedures",
    "measurement": "Measurements",
}


class CharacterizationSpec(SpecBase):
    """Cohorts to describe, the concept window and domains, top N, an optional comparison."""

    kind: Literal["characterization"]
    cohorts: list[Name] = Field(min_length=1)
    window: Window = Window(start=-365, end=-1)
    domains: list[Domain] = Field(default_factory=lambda: list(DOMAIN_LABELS))
    top_n: int = Field(default=10, ge=1, le=500)
    comparison: list[Name] | None = None
    age_groups: AgeGroups

    @model_validator(mode="after")
    def _comparison(self) -> CharacterizationSpec:
        if self.comparison is not None:
            if len(self.comparison) != 2 or self.comparison[0] == self.comparison[1]:
                raise ValueError("comparison names exactly two different cohorts")
            missing = set(self.comparison) - set(self.cohorts)
            if missing:
                raise ValueError(f"comparison cohorts {sorted(missing)} are not in 'cohorts'")
        return self


class CountsSpec(SpecBase):
    """Which cohorts to count and by which strata."""

    kind: Literal["counts"]
    cohorts: list[Name] = Field(min_length=1)
    strata: Strata
    age_groups: AgeGroups


class CoxSpec(CovariatesSpec):
    """A proportional hazards model for time from cohort entry to an outcome."""

    kind: Literal["cox"]
    cohort: Name
    outcome: Name
    covariates: list[Covariate] = Field(min_length=1)
    outcome_washout: OutcomeWashout
    follow_up_days: FollowUpDays
    time_bin_days: TimeBinDays
    max_iterations: MaxIterations
    tolerance: Tolerance
    confidence: Confidence


#: The state's phases: training rounds, then one evaluation round.
TRAIN, EVALUATE = "train", "evaluate"

#: Predicted-risk bin edges of the evaluation round, by default (risks of rare outcomes).
DEFAULT_EDGES = (0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5)


class DpSgdSpec(CovariatesSpec):
    """A model of ``outcome`` after entry into ``cohort``, trained by federated DP-SGD."""

    kind: Literal["dp_sgd"]
    cohort: Name
    outcome: Name
    outcome_window: Window = Window(start=1, end=365)
    covariates: list[Feature] = Field(min_length=1)
    hidden: int = Field(default=0, ge=0, le=64, description="0: logistic regression")
    # Defaults measured on the example (bench/dpsgd_accuracy.py, README): 300 steps of batches of
    # a fifth of the rows, clip 5 and rate 2 train; the former 60 steps at clip 1 did not (AUC
    # 0.41 against 0.60 for the exact GLM). The noise multiplier is the node's: the smallest
    # whose planned rounds fit the grant's epsilon at the node's delta (``privacy.dpsgd``).
    rounds: int = Field(default=3, ge=1, le=50)
    epochs: int = Field(default=20, ge=1, le=50)
    sample_rate: float = Field(default=0.2, gt=0.0, le=1.0)
    noise_multiplier: float | None = Field(
        default=None,
        ge=0.3,
        le=100.0,
        description="None: each node fixes it from the permit's grant and the planned rounds",
    )
    max_grad_norm: float = Field(default=5.0, gt=0.0, le=100.0)
    learning_rate: float = Field(default=2.0, gt=0.0, le=10.0)
    holdout: float = Field(default=0.2, ge=0.05, le=0.5)
    seed: int = Field(default=0, ge=0, lt=2**31)
    min_persons: int = Field(default=100, ge=10, description="fewer training rows: no part")
    size_rho: float = Field(default=0.001, gt=0.0, le=1.0, description="zCDP rho, sizes")
    evaluation_rho: float = Field(default=0.005, gt=0.0, le=1.0, description="zCDP rho, bins")
    trace: bool = Field(
        default=False,
        description="every training round also evaluates its incoming weights on the hold-out "
        "(a loss trace), its counts charged at evaluation_rho instead of size_rho",
    )
    evaluation_edges: list[float] = Field(default=list(DEFAULT_EDGES), min_length=1, max_length=50)

    @field_validator("evaluation_edges")
    @classmethod
    def _increasing_risks(cls, edges: list[float]) -> list[float]:
        if any(not 0.0 < e < 1.0 for e in edges) or sorted(set(edges)) != edges:
            raise ValueError("evaluation_edges must be increasing risks strictly between 0 and 1")
        return edges

    def training(self, noise_multiplier: float | None = None) -> Any:
        """The ``privacy.dpsgd.TrainingConfig`` of one round at ``noise_multiplier`` (the
        node's) or the study's stated one; ``ValueError`` when there is neither."""
        from privacy.dpsgd import TrainingConfig

        sigma = noise_multiplier if noise_multiplier is not None else self.noise_multiplier
        if sigma is None:
            raise ValueError(
                f"dp_sgd {self.id!r} states no noise_multiplier: a node's gate fixes it from "
                "the permit's grant; state one to train without a gate"
            )
        return TrainingConfig(
            hidden=self.hidden,
            noise_multiplier=sigma,
            max_grad_norm=self.max_grad_norm,
            sample_rate=self.sample_rate,
            epochs=self.epochs,
            learning_rate=self.learning_rate,
        )

    def accountant_step(
        self, state: dict[str, Any] | None, noise_multiplier: float | None = None
    ) -> Any:
        """What a node's request at ``state`` adds to its RDP accountant by training at
        ``noise_multiplier`` (default: the study's): one round's steps, or None when it only
        evaluates (the gate charges from this)."""
        if phase(state) == EVALUATE:
            return None
        return self.training(noise_multiplier).accountant_step()

    def planned_history(self, noise_multiplier: float) -> list[Any]:
        """The RDP history of the whole planned run at ``noise_multiplier``: every training
        round's steps and noisy counts, then the evaluation round's counts; a node fixes its
        noise multiplier so that this fits the grant (``privacy.dpsgd``)."""
        from privacy.dpsgd import compose, count_steps

        history: list[Any] = []
        train, evaluate = {"phase": TRAIN}, {"phase": EVALUATE}
        for _ in range(self.rounds):
            steps = [self.accountant_step(train, noise_multiplier)]
            history = compose(history, steps + count_steps(self.counts_rho(train)))
        return compose(history, count_steps(self.counts_rho(evaluate)))

    def counts_rho(self, state: dict[str, Any] | None) -> float:
        """The zCDP rho of the noisy counts a release at ``state`` carries (charged too). A
        traced training round counts training persons (size) and hold-out persons (bins):
        disjoint persons, one row each, so one noise level covers both."""
        evaluates = phase(state) == EVALUATE or self.trace
        return self.evaluation_rho if evaluates else self.size_rho


def phase(state: dict[str, Any] | None) -> str:
    """The phase a state asks for (training when absent); an unknown phase is an error."""
    asked = (state or {}).get("phase", TRAIN)
    if asked not in (TRAIN, EVALUATE):
        raise ValueError(f"unknown dp_sgd phase {asked!r}; expected {TRAIN!r} or {EVALUATE!r}")
    return asked


class GlmSpec(CovariatesSpec):
    """A logistic or Poisson model over one cohort's entries."""

    kind: Literal["glm"]
    family: Literal["binomial", "poisson"]
    cohort: Name
    outcome: Name
    outcome_window: Window = Window(start=1, end=365)
    covariates: list[Covariate] = Field(default_factory=list)
    intercept: bool = True
    offset: bool = False
    max_iterations: MaxIterations
    tolerance: Tolerance
    confidence: Confidence

    @model_validator(mode="after")
    def _consistent(self) -> GlmSpec:
        if not self.terms:
            raise ValueError("a model needs an intercept or at least one covariate")
        if self.offset and self.family != "poisson":
            raise ValueError("offset is only for family 'poisson'")
        return self

    @property
    def terms(self) -> list[str]:
        return (["(Intercept)"] if self.intercept else []) + super().terms


class PooledGlmSpec(GlmSpec):
    """``glm``'s model, its score and information sums pooled under secure aggregation."""

    kind: Literal["pooled_glm"]  # type: ignore[assignment]
    threshold: int | None = Field(default=None, ge=2)
    """Fewest nodes whose masked vectors complete each sum (as ``pooled_counts``)."""
    colluders: int | None = Field(default=None, ge=0)
    """Colluding nodes each sum must withstand (as ``pooled_counts``)."""


class IncidenceSpec(SpecBase):
    """Denominator and outcome cohorts, washout and strata."""

    kind: Literal["incidence"]
    denominator_cohort: Name
    outcome: Name
    outcome_washout: OutcomeWashout
    strata: Strata
    age_groups: AgeGroups
    confidence: Confidence


class MetaSpec(SpecBase):
    """The measure each node estimates and the cohorts it is estimated on."""

    kind: Literal["meta"]
    measure: Literal["log_odds_ratio", "log_incidence_rate"]
    target: Name
    comparator: Name | None = None
    outcome: Name
    window: Window = Window(start=1, end=365)
    outcome_washout: OutcomeWashout
    confidence: Confidence

    @model_validator(mode="after")
    def _cohorts(self) -> MetaSpec:
        if self.measure == "log_odds_ratio" and self.comparator is None:
            raise ValueError("measure 'log_odds_ratio' needs a 'comparator' cohort")
        if self.comparator is not None and self.comparator == self.target:
            raise ValueError("'comparator' must differ from 'target'")
        if self.measure == "log_incidence_rate" and self.comparator is not None:
            raise ValueError("measure 'log_incidence_rate' takes no 'comparator'")
        return self


MAX_YEARS = 100
"""Most calendar years of diagnosis one pooled analysis may name (the vector's length)."""


class PooledCountsSpec(SpecBase):
    """Which cohorts to count and by which strata (sex, age group, calendar year of the first
    entry: the year of diagnosis, for the years the study names)."""

    kind: Literal["pooled_counts"]
    cohorts: list[Name] = Field(min_length=1)
    strata: Strata
    age_groups: AgeGroups
    characteristics: list[
        Annotated[ConceptSetCovariate | CohortCovariate, Field(discriminator="type")]
    ] = Field(default_factory=list, max_length=50)
    """Persons per cohort with each characteristic (a concept set's record, or another
    cohort's entry, within a window of the first entry; the GLM's binary covariates): only
    what the study names, so every node's vector has the same rows."""
    years: tuple[int, int] | None = None
    """First and last calendar year of the ``calendar_year`` stratum: its levels must be known
    before any data is read, so every node's vector has the same rows. Other years: not shown."""
    threshold: int | None = Field(default=None, ge=2)
    """Fewest nodes whose masked vectors complete the sum (Shamir threshold t): up to n - t
    nodes may drop after sharing their seeds. None: every node of round 0. Each node refuses a
    threshold too weak for its ``min_honest_nodes`` (``privacy.secagg_plus.check_threshold``)."""
    colluders: int | None = Field(default=None, ge=0)
    """Colluding nodes the sum must withstand (c): noise shares and the threshold are sized for
    n - c honest nodes; a node whose policy fears more (n - c > its ``min_honest_nodes``) refuses.
    None: each node sizes for its own policy."""

    @model_validator(mode="after")
    def _years_name_the_calendar_levels(self) -> PooledCountsSpec:
        uses_year = any("calendar_year" in combo for combo in normalise_strata(self.strata))
        if uses_year and self.years is None:
            raise ValueError("stratum calendar_year needs years: [FIRST, LAST] (the levels shown)")
        if self.years is not None:
            first, last = self.years
            if not 1900 <= first <= last <= 2100 or last - first + 1 > MAX_YEARS:
                raise ValueError(
                    f"years {list(self.years)}: FIRST <= LAST within 1900-2100, at most "
                    f"{MAX_YEARS} years"
                )
        return self


class Period(BaseModel):
    """A closed date interval."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    start: dt.date
    end: dt.date

    @model_validator(mode="after")
    def _ordered(self) -> Period:
        check_ordered("period", self.start, self.end)
        return self


class PrevalenceSpec(SpecBase):
    """Point dates or periods, denominator and outcome cohorts, strata."""

    kind: Literal["prevalence"]
    type: Literal["point", "period"]
    denominator_cohort: Name
    outcome: Name
    dates: list[dt.date] = Field(default_factory=list, max_length=1000)
    periods: list[Period] = Field(default_factory=list, max_length=1000)
    full_contribution: bool = False
    strata: PersonStrata
    age_groups: AgeGroups
    confidence: Confidence

    @model_validator(mode="after")
    def _times(self) -> PrevalenceSpec:
        if self.type == "point" and (not self.dates or self.periods):
            raise ValueError("point prevalence needs 'dates' (and no 'periods')")
        if self.type == "period" and (not self.periods or self.dates):
            raise ValueError("period prevalence needs 'periods' (and no 'dates')")
        return self

    @property
    def intervals(self) -> list[Period]:
        if self.type == "point":
            return [Period(start=d, end=d) for d in self.dates]
        return list(self.periods)


class SurvivalSpec(SpecBase):
    """Target cohorts, one outcome cohort, follow-up rules and time resolution."""

    kind: Literal["survival"]
    target_cohorts: list[Name] = Field(min_length=1)
    outcome: Name
    outcome_washout: OutcomeWashout
    follow_up_days: FollowUpDays
    time_bin_days: TimeBinDays
    strata: Strata
    age_groups: AgeGroups
    confidence: Confidence


class PooledSurvivalSpec(SpecBase):
    """Target cohorts, one outcome, a declared follow-up and bin width (the vector's rows)."""

    kind: Literal["pooled_survival"]
    target_cohorts: list[Name] = Field(min_length=1, max_length=10)
    outcome: Name
    outcome_washout: OutcomeWashout
    follow_up_days: int = Field(ge=1, le=36600)
    time_bin_days: TimeBinDays
    confidence: Confidence
    threshold: int | None = Field(default=None, ge=2)
    """As ``pooled_counts``: fewest nodes whose masked vectors complete the sum."""
    colluders: int | None = Field(default=None, ge=0)
    """As ``pooled_counts``: colluding nodes the sum must withstand."""

    @property
    def bins(self) -> list[int]:
        """The declared bin ends: 0, w, 2w, ... up to follow-up rounded up to a bin."""
        w = self.time_bin_days
        return [i * w for i in range(-(-self.follow_up_days // w) + 1)]


#: Every shipped kind's Spec by its ``kind`` literal (what ``studies.registry`` looks up).
SPECS: dict[str, type[SpecBase]] = {
    get_args(spec.model_fields["kind"].annotation)[0]: spec
    for spec in (
        CharacterizationSpec,
        CountsSpec,
        CoxSpec,
        DpSgdSpec,
        GlmSpec,
        IncidenceSpec,
        MetaSpec,
        PooledCountsSpec,
        PooledGlmSpec,
        PooledSurvivalSpec,
        PrevalenceSpec,
        SurvivalSpec,
    )
}
