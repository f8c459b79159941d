"""The simulated node as arrays: patients (ages, sexes, chronic conditions, observation
windows, deaths), their routine encounters, and the catalogues of conditions and drugs.

Every step is a numpy operation over all patients at once, drawn from the one generator
``synth.generate`` seeds, in a fixed order.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date

import numpy as np

from omop_etl import profiles as P
from omop_etl.profiles import Profile

SECONDS_PER_DAY = 86_400
DAYS_PER_YEAR = 365.25


def _day(year: int, month: int = 1, day: int = 1) -> int:
    """Days since 1970-01-01 (the generator's date unit)."""
    return (date(year, month, day) - date(1970, 1, 1)).days


def norm(weights) -> np.ndarray:
    w = np.asarray(weights, dtype=float)
    return w / w.sum()


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def choose_within(rng: np.random.Generator, offset: np.ndarray, count: np.ndarray) -> np.ndarray:
    """For each (offset, count) one uniformly chosen index in [offset, offset + count)."""
    return offset + np.floor(rng.random(len(offset)) * count).astype(np.int64)


def expand(counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Repeat each parent index ``counts`` times; also return the rank within the parent."""
    parent = np.repeat(np.arange(len(counts)), counts)
    starts = np.cumsum(counts) - counts
    rank = np.arange(len(parent)) - np.repeat(starts, counts)
    return parent, rank


@dataclass
class Population:
    """One array per patient attribute (index = patient number)."""

    birth: np.ndarray
    female: np.ndarray
    obs_start: np.ndarray
    end: np.ndarray
    dead: np.ndarray
    age0: np.ndarray
    has: np.ndarray  # (n, len(CHRONIC)) bool


@dataclass
class Encounters:
    """Routine encounters sorted by patient then time; events are appended later."""

    patient: np.ndarray
    start: np.ndarray  # seconds since epoch
    stop: np.ndarray
    klass: np.ndarray  # index into ENCOUNTER_CLASSES
    offset: np.ndarray  # per patient: first routine encounter index
    count: np.ndarray  # per patient: number of routine encounters
    reason: np.ndarray  # index into condition catalogue, -1 = none


def population(rng: np.random.Generator, prof: Profile, n: int) -> Population:
    """Ages, sexes, chronic conditions, observation windows and deaths."""
    window_start, window_end = _day(prof.first_year), _day(prof.last_year, 12, 31)
    band = rng.choice(len(P.AGE_BANDS), size=n, p=norm(prof.age_band_weights))
    low = np.array([b[0] for b in P.AGE_BANDS])[band]
    high = np.array([b[1] for b in P.AGE_BANDS])[band]
    age_end = low + rng.random(n) * (high - low)
    birth = window_end - np.floor(age_end * DAYS_PER_YEAR).astype(np.int64)
    female = rng.random(n) < prof.female_fraction
    obs_start = np.maximum(birth, window_start + rng.integers(0, 730, n))
    age0 = (obs_start - birth) / DAYS_PER_YEAR

    chronic = P.CHRONIC
    logit = (
        np.array([c.intercept for c in chronic])
        + np.outer((age_end - 50) / 10, [c.age_slope for c in chronic])
        + np.outer(female, [c.female_shift for c in chronic])
        + np.log([prof.condition_odds.get(c.key, 1.0) for c in chronic])
    )
    has = rng.random(logit.shape) < _sigmoid(logit)

    key = P.CHRONIC_KEYS.index
    hazard = (
        0.02
        * prof.mortality_multiplier
        * np.exp(0.085 * (age0 - 70))
        * np.where(female, 1.0, 1.35)
        * np.where(has[:, key("atrial_fibrillation")], 1.6, 1.0)
        * np.where(has[:, key("coronary_arteriosclerosis")], 1.5, 1.0)
        * np.where(has[:, key("alzheimers")], 2.5, 1.0)
    )
    death = obs_start + 1 + np.floor(rng.exponential(1.0 / hazard) * DAYS_PER_YEAR).astype(np.int64)
    dead = death <= window_end
    end = np.where(dead, death, window_end)
    return Population(birth, female, obs_start, end, dead, age0, has)


ENCOUNTER_MINUTES = np.array(
    [(15, 45), (15, 60), (20, 90), (30, 150), (60, 480), (1440, 14400)], dtype=float
)


def routine_encounters(rng: np.random.Generator, prof: Profile, pop: Population) -> Encounters:
    """Visits spread over each patient's window; first is a wellness visit, the dead's last is the
    admission they die in (so the observation period ends at death)."""
    n = len(pop.birth)
    span = pop.end - pop.obs_start + 1
    activity = rng.gamma(2.0, 0.5, n) * (1.0 + np.maximum(pop.age0 - 40, 0) / 40)
    count = 1 + rng.poisson(prof.visits_per_year * span / DAYS_PER_YEAR * activity)
    offset = np.cumsum(count) - count
    patient = np.repeat(np.arange(n), count)
    day = pop.obs_start[patient] + np.floor(rng.random(len(patient)) * span[patient]).astype(
        np.int64
    )
    day = day[np.lexsort((day, patient))]
    day[offset] = pop.obs_start
    last = offset + count - 1
    dying = pop.dead & (count > 1)
    day[last[dying]] = pop.end[dying]

    klass = rng.choice(
        len(P.ENCOUNTER_CLASSES), size=len(day), p=norm(prof.encounter_class_weights)
    )
    klass[offset] = P.ENCOUNTER_CLASSES.index("wellness")
    klass[last[dying]] = P.ENCOUNTER_CLASSES.index("inpatient")
    start = day * SECONDS_PER_DAY + rng.integers(7 * 3600, 19 * 3600, len(day))
    low, high = ENCOUNTER_MINUTES[klass, 0], ENCOUNTER_MINUTES[klass, 1]
    stop = start + np.floor((low + rng.random(len(day)) * (high - low)) * 60).astype(np.int64)
    stop = np.minimum(stop, pop.end[patient] * SECONDS_PER_DAY + SECONDS_PER_DAY - 1)
    return Encounters(patient, start, stop, klass, offset, count, np.full(len(day), -1))


class Rows:
    """Column arrays of one output file, accumulated block by block then concatenated."""

    def __init__(self) -> None:
        self.blocks: list[dict[str, np.ndarray]] = []

    def add(self, **cols: np.ndarray) -> None:
        self.blocks.append(cols)

    def cat(self, name: str) -> np.ndarray:
        return np.concatenate([b[name] for b in self.blocks])


def condition_catalogue(rare: tuple[str, str]) -> list[tuple[str, str]]:
    return (
        [(c.code, c.description) for c in P.CHRONIC]
        + [(a.code, a.description) for a in P.ACUTE]
        + [P.GI_BLEED, P.MYOCARDIAL_INFARCTION, P.HISTORY_OF_APPENDECTOMY, rare]
    )


def drug_catalogue() -> list[P.Drug]:
    drugs = [d for c in P.CHRONIC for d in c.drugs] + [d for a in P.ACUTE for d in a.drugs]
    drugs += [*P.NSAIDS, P.WARFARIN]
    return list(dict.fromkeys(drugs))


def add_courses(
    rng: np.random.Generator,
    rows: Rows,
    pop: Population,
    enc: Encounters,
    start_enc: np.ndarray,
    drug: np.ndarray,
    reason: np.ndarray,
    *,
    refills: float,
    interval_days: int,
    pat: np.ndarray,
) -> None:
    """Medication courses as Synthea writes them: one row per prescription, starting at its
    encounter, lasting 1 + Poisson(refills) fills of ``interval_days`` (DISPENSES), cut at the
    end of the patient's observation (death)."""
    fills = (
        1 + rng.poisson(refills, len(start_enc)) if refills > 0 else np.ones(len(start_enc), int)
    )
    start = enc.start[start_enc]
    stop = start + (fills * interval_days - rng.integers(0, 3, len(start))) * SECONDS_PER_DAY
    stop = np.minimum(stop, pop.end[pat] * SECONDS_PER_DAY + SECONDS_PER_DAY - 1)
    rows.add(
        enc=start_enc, start=start, stop=np.maximum(stop, start), drug=drug, reason=reason,
        fills=fills, patient=pat,
    )  # fmt: skip
