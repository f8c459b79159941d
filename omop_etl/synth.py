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
from pathlib import Path

import numpy as np
import polars as pl

from omop_etl import profiles as P
from omop_etl.profiles import Profile, get_profile
from omop_etl.synth_frames import (
    DATETIME_FORMAT,
    allergies_frame,
    conditions_frame,
    encounters_frame,
    immunizations_frame,
    medications_frame,
    observations_frame,
    patients_frame,
    procedures_frame,
    uuids,
)
from omop_etl.synth_population import (
    ENCOUNTER_MINUTES,
    SECONDS_PER_DAY,
    Rows,
    add_courses,
    choose_within,
    condition_catalogue,
    drug_catalogue,
    norm,
    population,
    routine_encounters,
)

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


def _simulate(
    rng: np.random.Generator, prof: Profile, n: int, rare: tuple[str, str]
) -> dict[str, Callable[[], pl.DataFrame]]:
    """The whole node: population and encounters now, each Synthea file's frame on demand."""
    pop = population(rng, prof, n)
    enc = routine_encounters(rng, prof, pop)
    cond_cat = condition_catalogue(rare)
    n_chronic, n_acute = len(P.CHRONIC), len(P.ACUTE)
    gi_idx, mi_idx, hist_idx, rare_idx = (n_chronic + n_acute + i for i in range(4))
    drug_cat = drug_catalogue()
    drug_idx = {d: i for i, d in enumerate(drug_cat)}
    key = P.CHRONIC_KEYS.index
    conditions, medications = Rows(), Rows()

    # chronic conditions, diagnosed at a random visit of the patient
    onset = choose_within(
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
    add_courses(
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
    random_enc = choose_within(rng, enc.offset, enc.count)
    nsaid_enc = np.where(oa, onset[:, key("osteoarthritis")], random_enc)
    nsaid_kind = rng.choice(len(P.NSAIDS), size=n, p=norm(prof.nsaid_mix))
    users = np.nonzero(nsaid)[0]
    add_courses(
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
    add_courses(
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
        rng.choice(n_acute, len(a_enc), p=norm([a.weight_child for a in P.ACUTE])),
        rng.choice(n_acute, len(a_enc), p=norm([a.weight_adult for a in P.ACUTE])),
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
    add_courses(
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
    hist_enc = choose_within(rng, enc.offset[hist_pat], enc.count[hist_pat])
    rare_pat = np.sort(rng.choice(n, size=min(prof.rare_condition_patients, n), replace=False))
    rare_enc = choose_within(rng, enc.offset[rare_pat], enc.count[rare_pat])
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
    patient_ids = uuids(rng, n)
    encounter_ids = uuids(rng, len(all_patient))
    org, payer = uuids(rng, 1)[0], uuids(rng, 1)[0]
    providers = uuids(rng, 25)

    def ref(pat: np.ndarray, e: np.ndarray) -> dict[str, pl.Series]:
        return {"PATIENT": patient_ids.gather(pat), "ENCOUNTER": encounter_ids.gather(e)}

    # Builders run one at a time in FILES order (fixed rng order), so only one file's frame
    # is in memory at once.
    return {
        "patients": lambda: patients_frame(rng, prof, pop, patient_ids),
        "encounters": lambda: encounters_frame(
            rng, all_patient, all_start, all_stop, all_class, all_reason, cond_cat, patient_ids,
            encounter_ids, org, payer, providers,
        ),
        "conditions": lambda: conditions_frame(conditions, all_patient, cond_cat, ref),
        "medications": lambda: medications_frame(
            rng, prof, medications, drug_cat, cond_cat, payer, ref
        ),
        "observations": lambda: observations_frame(
            rng, prof, pop, enc, all_patient, all_start, gi_pat, n_routine, ref
        ),
        "procedures": lambda: procedures_frame(
            rng, prof, enc, all_patient, all_start, ev_cond, gi_idx, n_routine, ref
        ),
        "immunizations": lambda: immunizations_frame(rng, pop, enc, ref),
        "allergies": lambda: allergies_frame(rng, prof, enc, ref),
    }  # fmt: skip


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
