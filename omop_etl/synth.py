"""Synthetic Synthea-format node data: a seeded, vectorised population simulation.

Demos, tests and benchmarks need several nodes whose data look like a real Synthea export (same
files, columns and formats, so the Synthea loader is exercised for real), differ per node (see
``omop_etl.profiles``) and carry signal: GI haemorrhage risk rises with age, NSAID and warfarin
exposure; myocardial infarction with age, male sex and coronary disease; mortality with age and
comorbidity. Every step is a numpy array operation over all patients at once (no Python loop per
patient), drawn from one ``np.random.default_rng(seed)`` so one seed gives byte-identical files.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import date
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa

from omop_etl import profiles as P
from omop_etl.profiles import Profile, get_profile

SECONDS_PER_DAY = 86_400
DAYS_PER_YEAR = 365.25
DATETIME_FORMAT = "%Y-%m-%dT%H:%M:%SZ"
#: Synthea's files this generator writes, in the order it writes them.
FILES = (
    "patients",
    "encounters",
    "conditions",
    "medications",
    "observations",
    "procedures",
    "immunizations",
    "allergies",
)


def _day(year: int, month: int = 1, day: int = 1) -> int:
    """Days since 1970-01-01 (the generator's date unit)."""
    return (date(year, month, day) - date(1970, 1, 1)).days


def _norm(weights) -> np.ndarray:
    w = np.asarray(weights, dtype=float)
    return w / w.sum()


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def _uuids(rng: np.random.Generator, n: int) -> pl.Series:
    """``n`` random version-4 UUID strings, formatted without a Python loop."""
    raw = rng.integers(0, 256, size=(n, 16), dtype=np.uint8)
    raw[:, 6] = (raw[:, 6] & 0x0F) | 0x40
    raw[:, 8] = (raw[:, 8] & 0x3F) | 0x80
    arr = pa.FixedSizeBinaryArray.from_buffers(pa.binary(16), n, [None, pa.py_buffer(raw)])
    hexs = pl.Series(pl.from_arrow(arr)).cast(pl.Binary).bin.encode("hex")
    parts = [hexs.str.slice(a, b - a) for a, b in ((0, 8), (8, 12), (12, 16), (16, 20), (20, 32))]
    return pl.select(pl.concat_str(parts, separator="-")).to_series()


def _pick(strings: list[str] | tuple[str, ...], index: np.ndarray) -> pl.Series:
    """Gather strings from a small catalogue by integer index (vectorised)."""
    return pl.Series(list(strings), dtype=pl.String).gather(index)


def _dates(days: np.ndarray, missing: np.ndarray | None = None) -> pl.Series:
    s = pl.Series(days.astype(np.int32)).cast(pl.Date)
    if missing is None:
        return s
    return pl.select(pl.when(pl.Series(~missing)).then(s)).to_series()


def _datetimes(seconds: np.ndarray, missing: np.ndarray | None = None) -> pl.Series:
    s = pl.from_epoch(pl.Series(seconds.astype(np.int64)), time_unit="s")
    if missing is None:
        return s
    return pl.select(pl.when(pl.Series(~missing)).then(s)).to_series()


def _choose_within(rng: np.random.Generator, offset: np.ndarray, count: np.ndarray) -> np.ndarray:
    """For each (offset, count) one uniformly chosen index in [offset, offset + count)."""
    return offset + np.floor(rng.random(len(offset)) * count).astype(np.int64)


def _expand(counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Repeat each parent index ``counts`` times; also return the rank within the parent."""
    parent = np.repeat(np.arange(len(counts)), counts)
    starts = np.cumsum(counts) - counts
    rank = np.arange(len(parent)) - np.repeat(starts, counts)
    return parent, rank


@dataclass
class _Population:
    """One array per patient attribute (index = patient number)."""

    birth: np.ndarray
    female: np.ndarray
    obs_start: np.ndarray
    end: np.ndarray
    dead: np.ndarray
    age0: np.ndarray
    has: np.ndarray  # (n, len(CHRONIC)) bool


@dataclass
class _Encounters:
    """Routine encounters sorted by patient then time; events are appended later."""

    patient: np.ndarray
    start: np.ndarray  # seconds since epoch
    stop: np.ndarray
    klass: np.ndarray  # index into ENCOUNTER_CLASSES
    offset: np.ndarray  # per patient: first routine encounter index
    count: np.ndarray  # per patient: number of routine encounters
    reason: np.ndarray  # index into condition catalogue, -1 = none


def _population(rng: np.random.Generator, prof: Profile, n: int) -> _Population:
    """Ages, sexes, chronic conditions, observation windows and deaths."""
    window_start, window_end = _day(prof.first_year), _day(prof.last_year, 12, 31)
    band = rng.choice(len(P.AGE_BANDS), size=n, p=_norm(prof.age_band_weights))
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
    return _Population(birth, female, obs_start, end, dead, age0, has)


ENCOUNTER_MINUTES = np.array(
    [(15, 45), (15, 60), (20, 90), (30, 150), (60, 480), (1440, 14400)], dtype=float
)


def _routine_encounters(rng: np.random.Generator, prof: Profile, pop: _Population) -> _Encounters:
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
        len(P.ENCOUNTER_CLASSES), size=len(day), p=_norm(prof.encounter_class_weights)
    )
    klass[offset] = P.ENCOUNTER_CLASSES.index("wellness")
    klass[last[dying]] = P.ENCOUNTER_CLASSES.index("inpatient")
    start = day * SECONDS_PER_DAY + rng.integers(7 * 3600, 19 * 3600, len(day))
    low, high = ENCOUNTER_MINUTES[klass, 0], ENCOUNTER_MINUTES[klass, 1]
    stop = start + np.floor((low + rng.random(len(day)) * (high - low)) * 60).astype(np.int64)
    stop = np.minimum(stop, pop.end[patient] * SECONDS_PER_DAY + SECONDS_PER_DAY - 1)
    return _Encounters(patient, start, stop, klass, offset, count, np.full(len(day), -1))


class _Rows:
    """Column arrays of one output file, accumulated block by block then concatenated."""

    def __init__(self) -> None:
        self.blocks: list[dict[str, np.ndarray]] = []

    def add(self, **cols: np.ndarray) -> None:
        self.blocks.append(cols)

    def cat(self, name: str) -> np.ndarray:
        return np.concatenate([b[name] for b in self.blocks])


def _condition_catalogue(rare: tuple[str, str]) -> list[tuple[str, str]]:
    return (
        [(c.code, c.description) for c in P.CHRONIC]
        + [(a.code, a.description) for a in P.ACUTE]
        + [P.GI_BLEED, P.MYOCARDIAL_INFARCTION, P.HISTORY_OF_APPENDECTOMY, rare]
    )


def _drug_catalogue() -> list[P.Drug]:
    drugs = [d for c in P.CHRONIC for d in c.drugs] + [d for a in P.ACUTE for d in a.drugs]
    drugs += [*P.NSAIDS, P.WARFARIN]
    return list(dict.fromkeys(drugs))


def _simulate(
    rng: np.random.Generator, prof: Profile, n: int, rare: tuple[str, str]
) -> dict[str, Callable[[], pl.DataFrame]]:
    """The whole node: population and encounters now, each Synthea file's frame on demand."""
    pop = _population(rng, prof, n)
    enc = _routine_encounters(rng, prof, pop)
    cond_cat = _condition_catalogue(rare)
    n_chronic, n_acute = len(P.CHRONIC), len(P.ACUTE)
    gi_idx, mi_idx, hist_idx, rare_idx = (n_chronic + n_acute + i for i in range(4))
    drug_cat = _drug_catalogue()
    drug_idx = {d: i for i, d in enumerate(drug_cat)}
    key = P.CHRONIC_KEYS.index
    conditions, medications = _Rows(), _Rows()

    # chronic conditions, diagnosed at a random visit of the patient
    onset = _choose_within(
        rng, np.repeat(enc.offset, n_chronic), np.repeat(enc.count, n_chronic)
    ).reshape(n, n_chronic)
    pat_k, k = np.nonzero(pop.has)
    onset_enc = onset[pat_k, k]
    conditions.add(
        enc=onset_enc,
        day=enc.start[onset_enc] // SECONDS_PER_DAY,
        stop=np.full(len(k), -1),
        cond=k,
    )
    treated = rng.random(len(k)) < 0.75
    ndrugs = np.array([len(P.CHRONIC[j].drugs) for j in range(n_chronic)])
    sel = treated & (ndrugs[k] > 0)
    choice = np.floor(rng.random(sel.sum()) * ndrugs[k[sel]]).astype(int)
    drug_table = np.full((n_chronic, max(ndrugs)), -1)
    for j, c in enumerate(P.CHRONIC):
        drug_table[j, : len(c.drugs)] = [drug_idx[d] for d in c.drugs]
    _add_courses(
        rng,
        medications,
        pop,
        enc,
        onset_enc[sel],
        drug_table[k[sel], choice],
        k[sel],
        refills=2.0,
        interval_days=90,
        pat=pat_k[sel],
    )

    # NSAID courses (osteoarthritis treatment, or pain) and warfarin for atrial fibrillation
    oa = pop.has[:, key("osteoarthritis")]
    p_nsaid = np.clip(prof.nsaid_rate * np.exp(0.03 * (pop.age0 - 50)) + 0.55 * oa, 0, 0.95)
    nsaid = rng.random(n) < p_nsaid
    random_enc = _choose_within(rng, enc.offset, enc.count)
    nsaid_enc = np.where(oa, onset[:, key("osteoarthritis")], random_enc)
    nsaid_kind = rng.choice(len(P.NSAIDS), size=n, p=_norm(prof.nsaid_mix))
    users = np.nonzero(nsaid)[0]
    _add_courses(
        rng,
        medications,
        pop,
        enc,
        nsaid_enc[users],
        np.array([drug_idx[d] for d in P.NSAIDS])[nsaid_kind[users]],
        np.where(oa[users], key("osteoarthritis"), -1),
        refills=1.5,
        interval_days=30,
        pat=users,
    )
    af = pop.has[:, key("atrial_fibrillation")]
    warfarin = af & (rng.random(n) < 0.6)
    wusers = np.nonzero(warfarin)[0]
    _add_courses(
        rng,
        medications,
        pop,
        enc,
        onset[wusers, key("atrial_fibrillation")],
        np.full(len(wusers), drug_idx[P.WARFARIN]),
        np.full(len(wusers), key("atrial_fibrillation")),
        refills=3.0,
        interval_days=90,
        pat=wusers,
    )

    # acute conditions at symptom visits, with a short treatment
    acute_visit = np.isin(enc.klass, [1, 3, 4]) & (rng.random(len(enc.klass)) < 0.5)
    a_enc = np.nonzero(acute_visit)[0]
    child = (enc.start[a_enc] // SECONDS_PER_DAY - pop.birth[enc.patient[a_enc]]) < 18 * 365
    a_kind = np.where(
        child,
        rng.choice(n_acute, len(a_enc), p=_norm([a.weight_child for a in P.ACUTE])),
        rng.choice(n_acute, len(a_enc), p=_norm([a.weight_adult for a in P.ACUTE])),
    )
    a_day = enc.start[a_enc] // SECONDS_PER_DAY
    a_stop = a_day + rng.integers(7, 29, len(a_enc))
    a_stop[rng.random(len(a_enc)) < prof.empty_stop_rate] = -1
    conditions.add(enc=a_enc, day=a_day, stop=a_stop, cond=n_chronic + a_kind)
    enc.reason[a_enc] = n_chronic + a_kind
    a_ndrugs = np.array([len(a.drugs) for a in P.ACUTE])
    a_sel = (a_ndrugs[a_kind] > 0) & (rng.random(len(a_enc)) < 0.7)
    a_table = np.full((n_acute, max(a_ndrugs)), -1)
    for j, a in enumerate(P.ACUTE):
        a_table[j, : len(a.drugs)] = [drug_idx[d] for d in a.drugs]
    a_choice = np.floor(rng.random(a_sel.sum()) * a_ndrugs[a_kind[a_sel]]).astype(int)
    _add_courses(
        rng,
        medications,
        pop,
        enc,
        a_enc[a_sel],
        a_table[a_kind[a_sel], a_choice],
        n_chronic + a_kind[a_sel],
        refills=0.0,
        interval_days=10,
        pat=enc.patient[a_enc[a_sel]],
    )

    # outcome events: GI haemorrhage (age, NSAID, warfarin) and myocardial infarction
    gi_rate = 0.003 * prof.gi_bleed_multiplier * np.exp(0.04 * (pop.age0 - 50))
    gi_rate *= np.where(warfarin, 2.0, 1.0)
    celecoxib = nsaid_kind == P.NSAIDS.index(P.CELECOXIB)
    gi_hr = np.where(nsaid, np.where(celecoxib, 2.5, 4.0), 1.0)
    gi_from = np.where(nsaid, enc.start[nsaid_enc] // SECONDS_PER_DAY, pop.obs_start)
    gi_day = (
        gi_from + 1 + np.floor(rng.exponential(1.0 / (gi_rate * gi_hr)) * 365.25).astype(np.int64)
    )
    mi_rate = (
        0.002
        * np.exp(0.06 * (pop.age0 - 50))
        * np.where(pop.female, 1.0, 1.6)
        * np.where(pop.has[:, key("coronary_arteriosclerosis")], 3.0, 1.0)
    )
    mi_day = pop.obs_start + 1 + np.floor(rng.exponential(1.0 / mi_rate) * 365.25).astype(np.int64)
    gi_pat = np.nonzero(gi_day <= pop.end)[0]
    mi_pat = np.nonzero(mi_day <= pop.end)[0]
    ev_pat = np.concatenate([gi_pat, mi_pat])
    ev_day = np.concatenate([gi_day[gi_pat], mi_day[mi_pat]])
    ev_cond = np.concatenate([np.full(len(gi_pat), gi_idx), np.full(len(mi_pat), mi_idx)])
    ev_class = np.concatenate(
        [np.full(len(gi_pat), 4), np.full(len(mi_pat), 5)]  # emergency, inpatient
    )
    ev_start = ev_day * SECONDS_PER_DAY + rng.integers(0, SECONDS_PER_DAY - 4 * 3600, len(ev_day))
    low, high = ENCOUNTER_MINUTES[ev_class, 0], ENCOUNTER_MINUTES[ev_class, 1]
    ev_stop = ev_start + np.floor((low + rng.random(len(ev_day)) * (high - low)) * 60).astype(
        np.int64
    )
    ev_stop = np.minimum(ev_stop, pop.end[ev_pat] * SECONDS_PER_DAY + SECONDS_PER_DAY - 1)
    n_routine = len(enc.patient)
    ev_enc = n_routine + np.arange(len(ev_pat))
    ev_cstop = np.where(ev_cond == gi_idx, ev_day + rng.integers(5, 21, len(ev_day)), -1)
    conditions.add(enc=ev_enc, day=ev_day, stop=ev_cstop, cond=ev_cond)

    # "history of" rows (Observation domain) and the rare condition in a few patients
    hist_pat = np.nonzero(rng.random(n) < 0.02)[0]
    hist_enc = _choose_within(rng, enc.offset[hist_pat], enc.count[hist_pat])
    rare_pat = np.sort(rng.choice(n, size=min(prof.rare_condition_patients, n), replace=False))
    rare_enc = _choose_within(rng, enc.offset[rare_pat], enc.count[rare_pat])
    for e, c in ((hist_enc, hist_idx), (rare_enc, rare_idx)):
        conditions.add(
            enc=e,
            day=enc.start[e] // SECONDS_PER_DAY,
            stop=np.full(len(e), -1),
            cond=np.full(len(e), c),
        )

    all_patient = np.concatenate([enc.patient, ev_pat])
    all_start = np.concatenate([enc.start, ev_start])
    all_stop = np.concatenate([enc.stop, ev_stop])
    all_class = np.concatenate([enc.klass, ev_class])
    all_reason = np.concatenate([enc.reason, ev_cond])
    patient_ids = _uuids(rng, n)
    encounter_ids = _uuids(rng, len(all_patient))
    org, payer = _uuids(rng, 1)[0], _uuids(rng, 1)[0]
    providers = _uuids(rng, 25)

    def ref(pat: np.ndarray, e: np.ndarray) -> dict[str, pl.Series]:
        return {"PATIENT": patient_ids.gather(pat), "ENCOUNTER": encounter_ids.gather(e)}

    # Builders run one at a time in FILES order (fixed rng order), so only one file's frame
    # is in memory at once.
    return {
        "patients": lambda: _patients_frame(rng, prof, pop, patient_ids),
        "encounters": lambda: _encounters_frame(
            rng, all_patient, all_start, all_stop, all_class, all_reason, cond_cat, patient_ids,
            encounter_ids, org, payer, providers,
        ),
        "conditions": lambda: _conditions_frame(conditions, all_patient, cond_cat, ref),
        "medications": lambda: _medications_frame(
            rng, prof, medications, drug_cat, cond_cat, payer, ref
        ),
        "observations": lambda: _observations_frame(
            rng, prof, pop, enc, all_patient, all_start, gi_pat, n_routine, ref
        ),
        "procedures": lambda: _procedures_frame(
            rng, prof, enc, all_patient, all_start, ev_cond, gi_idx, n_routine, ref
        ),
        "immunizations": lambda: _immunizations_frame(rng, pop, enc, ref),
        "allergies": lambda: _allergies_frame(rng, prof, enc, ref),
    }  # fmt: skip


def _add_courses(
    rng: np.random.Generator,
    rows: _Rows,
    pop: _Population,
    enc: _Encounters,
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


def _patients_frame(
    rng: np.random.Generator, prof: Profile, pop: _Population, ids: pl.Series
) -> pl.DataFrame:
    n = len(pop.birth)
    first_f = ("Maria", "Anna", "Sofia", "Emma", "Olivia", "Lena", "Mia", "Clara", "Julia", "Ida")
    first_m = ("Jose", "Lukas", "Noah", "Liam", "Jakob", "Elias", "Ben", "Paul", "Leon", "Finn")
    last = ("Smith", "Müller", "García", "Rossi", "Novak", "Jansen", "Nowak", "Silva", "Dubois")
    adult = (pop.end - pop.birth) >= 18 * 365
    name_i = rng.integers(0, 10, n)
    digits = rng.integers(100, 1000, (n, 2))
    frame = pl.DataFrame(
        {
            "Id": ids,
            "BIRTHDATE": _dates(pop.birth),
            "DEATHDATE": _dates(pop.end, missing=~pop.dead),
            "SSN": pl.Series(rng.integers(10_000_000, 99_999_999, n)),
            "adult": adult,
            "female": pop.female,
            "first": pl.select(
                pl.when(pl.Series(pop.female))
                .then(_pick(first_f, name_i))
                .otherwise(_pick(first_m, name_i))
            ).to_series(),
            "d1": digits[:, 0],
            "d2": digits[:, 1],
            "last": _pick(last, rng.integers(0, len(last), n)),
            "RACE": _pick(P.RACES, rng.choice(len(P.RACES), n, p=_norm(prof.race_weights))),
            "ETHNICITY": _pick(
                ("hispanic", "nonhispanic"), (rng.random(n) >= prof.hispanic_fraction).astype(int)
            ),
            "house": rng.integers(1, 999, n),
            "LAT": np.round(42.0 + rng.random(n), 6),
            "LON": np.round(-71.5 + rng.random(n), 6),
            "HEALTHCARE_EXPENSES": np.round(rng.gamma(2.0, 40_000, n), 2),
            "HEALTHCARE_COVERAGE": np.round(rng.gamma(2.0, 5_000, n), 2),
            "INCOME": rng.integers(15_000, 150_000, n),
        }
    )
    adult_str = pl.when(pl.col("adult"))
    return frame.select(
        "Id",
        "BIRTHDATE",
        "DEATHDATE",
        pl.format("999-{}", pl.col("SSN").cast(pl.String)).alias("SSN"),
        adult_str.then(pl.format("S99{}", pl.col("SSN").cast(pl.String))).alias("DRIVERS"),
        adult_str.then(pl.format("X{}X", pl.col("SSN").cast(pl.String))).alias("PASSPORT"),
        adult_str.then(
            pl.when(pl.col("female")).then(pl.lit("Ms.")).otherwise(pl.lit("Mr."))
        ).alias("PREFIX"),
        pl.format("{}{}", "first", "d1").alias("FIRST"),
        pl.lit(None, pl.String).alias("MIDDLE"),
        pl.format("{}{}", "last", "d2").alias("LAST"),
        pl.lit(None, pl.String).alias("SUFFIX"),
        pl.lit(None, pl.String).alias("MAIDEN"),
        adult_str.then(pl.lit("M")).alias("MARITAL"),
        "RACE",
        "ETHNICITY",
        pl.when(pl.col("female")).then(pl.lit("F")).otherwise(pl.lit("M")).alias("GENDER"),
        pl.lit(f"{prof.city}  Massachusetts  US").alias("BIRTHPLACE"),
        pl.format("{} Main Street", "house").alias("ADDRESS"),
        pl.lit(prof.city).alias("CITY"),
        pl.lit("Massachusetts").alias("STATE"),
        pl.lit("Middlesex County").alias("COUNTY"),
        pl.lit(None, pl.String).alias("FIPS"),
        pl.lit("01001").alias("ZIP"),
        "LAT",
        "LON",
        "HEALTHCARE_EXPENSES",
        "HEALTHCARE_COVERAGE",
        "INCOME",
    )


def _encounters_frame(
    rng,
    patient,
    start,
    stop,
    klass,
    reason,
    cond_cat,
    patient_ids,
    encounter_ids,
    org,
    payer,
    providers,
) -> pl.DataFrame:
    n = len(patient)
    codes = [P.ENCOUNTER_CODES[c][0] for c in P.ENCOUNTER_CLASSES]
    descs = [P.ENCOUNTER_CODES[c][1] for c in P.ENCOUNTER_CLASSES]
    has_reason = reason >= 0
    reason_i = np.maximum(reason, 0)
    cost = np.round(rng.gamma(2.0, 60.0, n), 2)
    return pl.DataFrame(
        {
            "Id": encounter_ids,
            "START": _datetimes(start),
            "STOP": _datetimes(stop),
            "PATIENT": patient_ids.gather(patient),
            "ORGANIZATION": pl.Series([org] * 1).gather(np.zeros(n, dtype=np.int64)),
            "PROVIDER": providers.gather(rng.integers(0, len(providers), n)),
            "PAYER": pl.Series([payer]).gather(np.zeros(n, dtype=np.int64)),
            "ENCOUNTERCLASS": _pick(P.ENCOUNTER_CLASSES, klass),
            "CODE": _pick(codes, klass),
            "DESCRIPTION": _pick(descs, klass),
            "BASE_ENCOUNTER_COST": cost,
            "TOTAL_CLAIM_COST": cost,
            "PAYER_COVERAGE": np.round(cost * 0.8, 2),
            "REASONCODE": _masked(_pick([c for c, _ in cond_cat], reason_i), ~has_reason),
            "REASONDESCRIPTION": _masked(_pick([d for _, d in cond_cat], reason_i), ~has_reason),
        }
    )


def _masked(s: pl.Series, missing: np.ndarray) -> pl.Series:
    return pl.select(pl.when(pl.Series(~missing)).then(s)).to_series()


def _conditions_frame(rows: _Rows, all_patient, cond_cat, ref) -> pl.DataFrame:
    e, cond, stop = rows.cat("enc"), rows.cat("cond"), rows.cat("stop")
    return pl.DataFrame(
        {
            "START": _dates(rows.cat("day")),
            "STOP": _dates(np.maximum(stop, 0), missing=stop < 0),
            **ref(all_patient[e], e),
            "CODE": _pick([c for c, _ in cond_cat], cond),
            "DESCRIPTION": _pick([d for _, d in cond_cat], cond),
        }
    )


def _medications_frame(rng, prof, rows: _Rows, drug_cat, cond_cat, payer, ref) -> pl.DataFrame:
    e, drug, reason = rows.cat("enc"), rows.cat("drug"), rows.cat("reason")
    start, stop = rows.cat("start"), rows.cat("stop")
    n = len(e)
    patient = rows.cat("patient")
    local = rng.random(n) < prof.local_drug_code_rate
    code = _pick([d.code for d in drug_cat], drug)
    cost = np.round(rng.gamma(2.0, 20.0, n), 2)
    has_reason = reason >= 0
    return pl.DataFrame(
        {
            "START": _datetimes(start),
            "STOP": _datetimes(stop, missing=rng.random(n) < prof.empty_stop_rate),
            **ref(patient, e),
            "PAYER": pl.Series([payer]).gather(np.zeros(n, dtype=np.int64)),
            "CODE": pl.select(
                pl.when(pl.Series(local)).then(pl.lit(P.LOCAL_CODE_PREFIX) + code).otherwise(code)
            ).to_series(),
            "DESCRIPTION": _pick([d.description for d in drug_cat], drug),
            "BASE_COST": cost,
            "PAYER_COVERAGE": np.round(cost * 0.7, 2),
            "DISPENSES": rows.cat("fills"),
            "TOTALCOST": np.round(cost * rows.cat("fills"), 2),
            "REASONCODE": _masked(
                _pick([c for c, _ in cond_cat], np.maximum(reason, 0)), ~has_reason
            ),
            "REASONDESCRIPTION": _masked(
                _pick([d for _, d in cond_cat], np.maximum(reason, 0)), ~has_reason
            ),
        }
    ).select(
        "START",
        "STOP",
        "PATIENT",
        "PAYER",
        "ENCOUNTER",
        "CODE",
        "DESCRIPTION",
        "BASE_COST",
        "PAYER_COVERAGE",
        "DISPENSES",
        "TOTALCOST",
        "REASONCODE",
        "REASONDESCRIPTION",
    )


def _observations_frame(
    rng, prof, pop: _Population, enc: _Encounters, all_patient, all_start, gi_pat, n_routine, ref
) -> pl.DataFrame:
    """Labs, vitals and survey answers at routine visits; a low haemoglobin at each GI bleed."""
    labs = P.LABS
    wellness = enc.klass == P.ENCOUNTER_CLASSES.index("wellness")
    per_visit = rng.poisson(prof.observations_per_visit + 2.0 * wellness)
    e, _ = _expand(per_visit)
    lab = rng.choice(len(labs), size=len(e), p=_norm([lab.weight for lab in labs]))
    bleed_enc = n_routine + np.arange(len(gi_pat))
    e = np.concatenate([e, bleed_enc])
    lab = np.concatenate([lab, np.full(len(bleed_enc), P.LAB_HEMOGLOBIN)])
    patient = all_patient[e]
    age = (all_start[e] // SECONDS_PER_DAY - pop.birth[patient]) / DAYS_PER_YEAR
    mean = np.array([lab.mean for lab in labs])[lab]
    sd = np.array([lab.sd for lab in labs])[lab]
    is_hb = lab == P.LAB_HEMOGLOBIN
    mean = mean - 1.3 * (is_hb & pop.female[patient])
    mean[len(e) - len(bleed_enc) :] = 8.8
    mean = np.where(lab == P.LAB_CREATININE, mean * (1 + 0.008 * np.maximum(age - 40, 0)), mean)
    value = np.maximum(mean + sd * rng.standard_normal(len(e)), 0.2 * mean)
    text_values = [v for lab in labs for v in lab.values]
    text_n = np.array([len(lab.values) for lab in labs])
    text_off = np.cumsum(text_n) - text_n
    is_text = text_n[lab] > 0
    text_i = text_off[lab] + np.floor(rng.random(len(e)) ** 3 * np.maximum(text_n[lab], 1))
    decimals = np.array([lab.decimals for lab in labs])[lab]
    for d in np.unique(decimals):  # a handful of precisions, not one loop per row
        value[decimals == d] = np.round(value[decimals == d], d)
    value_str = pl.select(
        pl.when(pl.Series(is_text))
        .then(_pick(text_values, np.minimum(text_i, len(text_values) - 1).astype(int)))
        .otherwise(pl.Series(value).cast(pl.String))
    ).to_series()
    return pl.DataFrame(
        {
            "DATE": _datetimes(all_start[e]),
            **ref(patient, e),
            "CATEGORY": _pick([lab.category for lab in labs], lab),
            "CODE": _pick([lab.code for lab in labs], lab),
            "DESCRIPTION": _pick([lab.description for lab in labs], lab),
            "VALUE": value_str,
            "UNITS": _masked(_pick([lab.units for lab in labs], lab), is_text),
            "TYPE": _pick(("numeric", "text"), is_text.astype(int)),
        }
    )


def _procedures_frame(
    rng, prof, enc: _Encounters, all_patient, all_start, ev_cond, gi_idx, n_routine, ref
) -> pl.DataFrame:
    """Routine procedures (some in the Measurement domain), transfusions after GI bleeds,
    ECG and PCI at myocardial infarctions."""
    catalogue = [*P.PROCEDURES, (*P.TRANSFUSION, 0.0), (*P.PCI, 0.0)]
    transfusion, pci = len(P.PROCEDURES), len(P.PROCEDURES) + 1
    ecg = [c for c, _, _ in P.PROCEDURES].index(P.ECG[0])
    m = len(enc.klass)
    count = (rng.random(m) < prof.procedure_rate).astype(int) + (
        rng.random(m) < prof.procedure_rate / 4
    )
    e, _ = _expand(count)
    kind = rng.choice(len(P.PROCEDURES), size=len(e), p=_norm([w for _, _, w in P.PROCEDURES]))
    ev_enc = n_routine + np.arange(len(ev_cond))
    gi = ev_cond == gi_idx
    tx = ev_enc[gi & (rng.random(len(ev_cond)) < 0.5)]
    mi_ecg = ev_enc[~gi]
    mi_pci = ev_enc[~gi & (rng.random(len(ev_cond)) < 0.6)]
    e = np.concatenate([e, tx, mi_ecg, mi_pci])
    kind = np.concatenate(
        [kind, np.full(len(tx), transfusion), np.full(len(mi_ecg), ecg), np.full(len(mi_pci), pci)]
    )
    start = all_start[e] + rng.integers(0, 1800, len(e))
    stop = start + rng.integers(15, 61, len(e)) * 60
    return pl.DataFrame(
        {
            "START": _datetimes(start),
            "STOP": _datetimes(stop),
            **ref(all_patient[e], e),
            "CODE": _pick([c for c, _, _ in catalogue], kind),
            "DESCRIPTION": _pick([d for _, d, _ in catalogue], kind),
            "BASE_COST": np.round(rng.gamma(2.0, 200.0, len(e)), 2),
            "REASONCODE": pl.Series([None] * len(e), dtype=pl.String),
            "REASONDESCRIPTION": pl.Series([None] * len(e), dtype=pl.String),
        }
    )


def _immunizations_frame(rng, pop: _Population, enc: _Encounters, ref) -> pl.DataFrame:
    """Age-appropriate CVX vaccines at wellness visits."""
    well = np.nonzero(enc.klass == P.ENCOUNTER_CLASSES.index("wellness"))[0]
    age = (enc.start[well] // SECONDS_PER_DAY - pop.birth[enc.patient[well]]) / DAYS_PER_YEAR
    child = age < 18
    count = np.where(child, 1 + rng.poisson(0.8, len(well)), rng.random(len(well)) < 0.6)
    parent, _ = _expand(count.astype(int))
    e, age = well[parent], age[parent]
    group = np.digitize(age, [2, 18, 60])
    u = rng.random(len(e))
    cvx = np.zeros(len(e), dtype=int)
    for g in range(4):  # four age groups, not one iteration per patient
        cum = np.cumsum(_norm([w[g] for _, _, w in P.VACCINES]))
        sel = group == g
        cvx[sel] = np.minimum(np.searchsorted(cum, u[sel], side="right"), len(cum) - 1)
    return pl.DataFrame(
        {
            "DATE": _datetimes(enc.start[e]),
            **ref(enc.patient[e], e),
            "CODE": _pick([c for c, _, _ in P.VACCINES], cvx),
            "DESCRIPTION": _pick([d for _, d, _ in P.VACCINES], cvx),
            "BASE_COST": np.full(len(e), 140.52),
        }
    )


def _allergies_frame(rng, prof, enc: _Encounters, ref) -> pl.DataFrame:
    """SNOMED allergies (Observation domain) recorded at a random visit, never resolved."""
    n = len(enc.offset)
    pat = np.nonzero(rng.random(n) < prof.allergy_rate)[0]
    parent, _ = _expand(1 + (rng.random(len(pat)) < 0.3))
    pat = pat[parent]
    e = _choose_within(rng, enc.offset[pat], enc.count[pat])
    kind = rng.integers(0, len(P.ALLERGIES), len(e))
    empty = pl.Series([None] * len(e), dtype=pl.String)
    return pl.DataFrame(
        {
            "START": _dates(enc.start[e] // SECONDS_PER_DAY),
            "STOP": _dates(np.zeros(len(e), dtype=np.int64), missing=np.ones(len(e), bool)),
            **ref(pat, e),
            "CODE": _pick([c for c, _, _ in P.ALLERGIES], kind),
            "SYSTEM": pl.Series(["SNOMED-CT"]).gather(np.zeros(len(e), dtype=np.int64)),
            "DESCRIPTION": _pick([d for _, d, _ in P.ALLERGIES], kind),
            "TYPE": pl.Series(["allergy"]).gather(np.zeros(len(e), dtype=np.int64)),
            "CATEGORY": _pick([c for _, _, c in P.ALLERGIES], kind),
            **{
                col: empty
                for col in (
                    "REACTION1",
                    "DESCRIPTION1",
                    "SEVERITY1",
                    "REACTION2",
                    "DESCRIPTION2",
                    "SEVERITY2",
                )
            },
        }
    )


def rare_condition_code(code: str | None) -> tuple[str, str]:
    """The (SNOMED code, name) of the rare condition; a ValueError unless the shipped vocabulary
    has ``code`` as a SNOMED concept in the Condition domain (so it maps on load)."""
    if code is None:
        return P.DEFAULT_RARE_CONDITION
    from omop_etl.vocab import default_vocabulary_dir

    concept = pl.read_csv(
        default_vocabulary_dir() / "CONCEPT.csv",
        separator="\t",
        quote_char=None,
        infer_schema=False,
    ).filter(
        (pl.col("vocabulary_id") == "SNOMED")
        & (pl.col("domain_id") == "Condition")
        & (pl.col("concept_code") == str(code))
    )
    if concept.height == 0:
        raise ValueError(
            f"rare condition {code!r} is not a SNOMED Condition code in the shipped vocabulary"
        )
    return str(code), concept["concept_name"][0]


def generate(
    out_dir: str | Path,
    *,
    patients: int,
    seed: int,
    profile: str | Profile,
    rare_condition: str | None = None,
) -> Path:
    """Write one node's Synthea-format CSVs (patients.csv, encounters.csv, ...) into ``out_dir``.

    Same arguments -> byte-identical files. ``rare_condition`` is a SNOMED condition code placed
    in the profile's few rare-disease patients (default: cystic fibrosis).
    """
    if patients < 1:
        raise ValueError(f"patients must be at least 1, got {patients}")
    prof = get_profile(profile)
    rare = rare_condition_code(rare_condition)
    frames = _simulate(np.random.default_rng(seed), prof, patients, rare)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for name in FILES:
        frames[name]().write_csv(out / f"{name}.csv", datetime_format=DATETIME_FORMAT)
    return out
