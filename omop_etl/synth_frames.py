"""The simulated node written as Synthea's files: one polars frame per CSV, with Synthea's
columns and formats (UUID ids, ISO dates, missing values where Synthea leaves them).
"""

from __future__ import annotations

import numpy as np
import polars as pl
import pyarrow as pa

from omop_etl import profiles as P
from omop_etl.profiles import Profile
from omop_etl.synth_population import (
    DAYS_PER_YEAR,
    SECONDS_PER_DAY,
    Encounters,
    Population,
    Rows,
    choose_within,
    expand,
    norm,
)

DATETIME_FORMAT = "%Y-%m-%dT%H:%M:%SZ"


def uuids(rng: np.random.Generator, n: int) -> pl.Series:
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


def patients_frame(
    rng: np.random.Generator, prof: Profile, pop: Population, ids: pl.Series
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
            "RACE": _pick(P.RACES, rng.choice(len(P.RACES), n, p=norm(prof.race_weights))),
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


def encounters_frame(
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


def conditions_frame(rows: Rows, all_patient, cond_cat, ref) -> pl.DataFrame:
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


def medications_frame(rng, prof, rows: Rows, drug_cat, cond_cat, payer, ref) -> pl.DataFrame:
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


def observations_frame(
    rng, prof, pop: Population, enc: Encounters, all_patient, all_start, gi_pat, n_routine, ref
) -> pl.DataFrame:
    """Labs, vitals and survey answers at routine visits; a low haemoglobin at each GI bleed."""
    labs = P.LABS
    wellness = enc.klass == P.ENCOUNTER_CLASSES.index("wellness")
    per_visit = rng.poisson(prof.observations_per_visit + 2.0 * wellness)
    e, _ = expand(per_visit)
    lab = rng.choice(len(labs), size=len(e), p=norm([lab.weight for lab in labs]))
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


def procedures_frame(
    rng, prof, enc: Encounters, all_patient, all_start, ev_cond, gi_idx, n_routine, ref
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
    e, _ = expand(count)
    kind = rng.choice(len(P.PROCEDURES), size=len(e), p=norm([w for _, _, w in P.PROCEDURES]))
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


def immunizations_frame(rng, pop: Population, enc: Encounters, ref) -> pl.DataFrame:
    """Age-appropriate CVX vaccines at wellness visits."""
    well = np.nonzero(enc.klass == P.ENCOUNTER_CLASSES.index("wellness"))[0]
    age = (enc.start[well] // SECONDS_PER_DAY - pop.birth[enc.patient[well]]) / DAYS_PER_YEAR
    child = age < 18
    count = np.where(child, 1 + rng.poisson(0.8, len(well)), rng.random(len(well)) < 0.6)
    parent, _ = expand(count.astype(int))
    e, age = well[parent], age[parent]
    group = np.digitize(age, [2, 18, 60])
    u = rng.random(len(e))
    cvx = np.zeros(len(e), dtype=int)
    for g in range(4):  # four age groups, not one iteration per patient
        cum = np.cumsum(norm([w[g] for _, _, w in P.VACCINES]))
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


def allergies_frame(rng, prof, enc: Encounters, ref) -> pl.DataFrame:
    """SNOMED allergies (Observation domain) recorded at a random visit, never resolved."""
    n = len(enc.offset)
    pat = np.nonzero(rng.random(n) < prof.allergy_rate)[0]
    parent, _ = expand(1 + (rng.random(len(pat)) < 0.3))
    pat = pat[parent]
    e = choose_within(rng, enc.offset[pat], enc.count[pat])
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
