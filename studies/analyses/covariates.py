"""The covariates and features a model analysis may name: what a study writes, checked by
pydantic alone.

Why a module of their own: validating a study needs these classes, and the modules that turn them
into SQL and fit models (``glm``, ``features``, ``cox``, ``dp_sgd``) import polars, DuckDB and
numpy; here they load nothing but pydantic. ``Covariate`` is the glm and cox vocabulary (age,
sex, cohort and concept-set flags); ``Feature`` adds what ``dp_sgd`` may use beyond it, in the
spirit of OHDSI FeatureExtraction (``studies.analyses.features`` compiles them).
"""

from __future__ import annotations

from typing import Annotated, ClassVar, Literal, Self

from pydantic import BaseModel, ConfigDict, Field, model_validator

from studies.analyses.spec_fields import SpecBase, Window
from studies.fields import Name, check_ordered


class _Covariate(BaseModel):
    """One model term; ``TERM`` names it from the covariate's own fields (``cohort_{cohort}``),
    so a term's name is written once per covariate and two covariates naming the same term
    can be refused (``CovariatesSpec``)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    TERM: ClassVar[str]

    @property
    def term(self) -> str:
        """The model term's name (a coefficient's ``variable_name``)."""
        return self.TERM.format_map(dict(self))


class AgeCovariate(_Covariate):
    """Age in years at index, as (age − center) / scale."""

    type: Literal["age"]
    TERM = "age"
    center: float = Field(default=0.0, ge=0, le=150)
    scale: float = Field(default=1.0, gt=0, le=150)


class SexCovariate(_Covariate):
    """1 for male, 0 otherwise."""

    type: Literal["sex"]
    TERM = "sex_male"


class _WindowedCovariate(_Covariate):
    """A covariate about records starting within ``window`` days of index (a year before unless
    set): one definition of the window field for every such covariate."""

    window: Window = Window(start=-365, end=-1)


class CohortCovariate(_WindowedCovariate):
    """1 when an entry of ``cohort`` starts within ``window`` days of index."""

    type: Literal["cohort"]
    TERM = "cohort_{cohort}"
    cohort: Name


EventDomain = Literal[
    "condition", "drug", "drug_era", "measurement", "procedure", "observation", "visit", "death"
]


class ConceptSetRecords(_WindowedCovariate):
    """Records of a concept in ``concept_set`` (resolved on the node, descendants and excludes
    applied) in ``domain``, starting within ``window`` days of index: what a concept-set
    covariate and a concept-count feature look at."""

    concept_set: Name
    domain: EventDomain


class ConceptSetCovariate(ConceptSetRecords):
    """1 when the person has a ``domain`` record of a concept in ``concept_set`` (resolved on the
    node, descendants and excludes applied) starting within ``window`` days of index."""

    type: Literal["concept_set"]
    TERM = "concept_set_{concept_set}"


Covariate = Annotated[
    AgeCovariate | SexCovariate | CohortCovariate | ConceptSetCovariate,
    Field(discriminator="type"),
]


class AgeGroupCovariate(_Covariate):
    """1 when the age at index (completed years) is within ``[low, high]``."""

    type: Literal["age_group"]
    TERM = "age_{low}_{high}"
    low: int = Field(ge=0, le=150)
    high: int = Field(ge=0, le=150)

    @model_validator(mode="after")
    def _ordered(self) -> AgeGroupCovariate:
        check_ordered("age_group", self.low, self.high, ("low", "high"), "is above")
        return self


class IndexYearCovariate(_Covariate):
    """The calendar year of index, as (year - center) / scale."""

    type: Literal["index_year"]
    TERM = "index_year"
    center: int = Field(default=2015, ge=1900, le=2100)
    scale: float = Field(default=1.0, gt=0, le=100)


class ConceptCountCovariate(ConceptSetRecords):
    """How many ``domain`` records of ``concept_set`` start within ``window`` days of index,
    capped at ``cap``."""

    type: Literal["concept_count"]
    TERM = "count_{concept_set}"
    cap: int = Field(default=10, ge=1, le=1000)


Feature = Annotated[
    AgeCovariate
    | SexCovariate
    | CohortCovariate
    | ConceptSetCovariate
    | AgeGroupCovariate
    | IndexYearCovariate
    | ConceptCountCovariate,
    Field(discriminator="type"),
]


class CovariatesSpec(SpecBase):
    """An analysis whose ``covariates`` each add one model term; no term may appear twice."""

    @property
    def terms(self) -> list[str]:
        return [c.term for c in self.covariates]

    @model_validator(mode="after")
    def _distinct_terms(self) -> Self:
        if len(set(self.terms)) != len(self.terms):
            raise ValueError(f"covariates repeat a term: {self.terms}")
        return self
