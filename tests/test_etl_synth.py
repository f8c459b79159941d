"""The synthetic Synthea-format generator: format, determinism, vocabulary, profiles, signal."""

from __future__ import annotations

import hashlib
from pathlib import Path

import polars as pl
import pytest

from omop_etl.profiles import LOCAL_CODE_PREFIX, PROFILES, get_profile
from omop_etl.synth import FILES, generate
from omop_etl.vocab import default_vocabulary_dir

SYNTHEA_HEADERS = {
    "patients": "Id,BIRTHDATE,DEATHDATE,SSN,DRIVERS,PASSPORT,PREFIX,FIRST,MIDDLE,LAST,SUFFIX,"
    "MAIDEN,MARITAL,RACE,ETHNICITY,GENDER,BIRTHPLACE,ADDRESS,CITY,STATE,COUNTY,FIPS,ZIP,LAT,LON,"
    "HEALTHCARE_EXPENSES,HEALTHCARE_COVERAGE,INCOME",
    "encounters": "Id,START,STOP,PATIENT,ORGANIZATION,PROVIDER,PAYER,ENCOUNTERCLASS,CODE,"
    "DESCRIPTION,BASE_ENCOUNTER_COST,TOTAL_CLAIM_COST,PAYER_COVERAGE,REASONCODE,REASONDESCRIPTION",
    "conditions": "START,STOP,PATIENT,ENCOUNTER,CODE,DESCRIPTION",
    "medications": "START,STOP,PATIENT,PAYER,ENCOUNTER,CODE,DESCRIPTION,BASE_COST,PAYER_COVERAGE,"
    "DISPENSES,TOTALCOST,REASONCODE,REASONDESCRIPTION",
    "observations": "DATE,PATIENT,ENCOUNTER,CATEGORY,CODE,DESCRIPTION,VALUE,UNITS,TYPE",
    "procedures": "START,STOP,PATIENT,ENCOUNTER,CODE,DESCRIPTION,BASE_COST,REASONCODE,"
    "REASONDESCRIPTION",
    "immunizations": "DATE,PATIENT,ENCOUNTER,CODE,DESCRIPTION,BASE_COST",
    "allergies": "START,STOP,PATIENT,ENCOUNTER,CODE,SYSTEM,DESCRIPTION,TYPE,CATEGORY,REACTION1,"
    "DESCRIPTION1,SEVERITY1,REACTION2,DESCRIPTION2,SEVERITY2",
}
VOCABULARY_OF = {
    "conditions": "SNOMED",
    "medications": "RxNorm",
    "observations": "LOINC",
    "procedures": "SNOMED",
    "immunizations": "CVX",
    "allergies": "SNOMED",
}


def _read(folder: Path, name: str) -> pl.DataFrame:
    return pl.read_csv(folder / f"{name}.csv", infer_schema=False)


def _digests(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


@pytest.fixture(scope="module")
def nodes(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One 3,000-patient node per profile."""
    root = tmp_path_factory.mktemp("synth")
    return {name: generate(root / name, patients=3000, seed=7, profile=name) for name in PROFILES}


def test_files_have_synthea_headers(nodes: dict[str, Path]) -> None:
    for folder in nodes.values():
        assert sorted(p.stem for p in folder.iterdir()) == sorted(FILES)
        for name, header in SYNTHEA_HEADERS.items():
            first = (folder / f"{name}.csv").open().readline().rstrip("\n")
            assert first == header, name


def test_same_seed_same_bytes_other_seed_other_bytes(tmp_path: Path) -> None:
    a = generate(tmp_path / "a", patients=500, seed=3, profile="rural_clinic")
    b = generate(tmp_path / "b", patients=500, seed=3, profile="rural_clinic")
    c = generate(tmp_path / "c", patients=500, seed=4, profile="rural_clinic")
    assert _digests(a) == _digests(b)
    assert _digests(a)["patients.csv"] != _digests(c)["patients.csv"]


def test_every_code_is_in_the_shipped_vocabulary(nodes: dict[str, Path]) -> None:
    concept = pl.read_csv(
        default_vocabulary_dir() / "CONCEPT.csv", separator="\t", quote_char=None,
        infer_schema=False,
    )  # fmt: skip
    known = set(zip(concept["vocabulary_id"], concept["concept_code"], strict=True))
    for folder in nodes.values():
        for name, vocabulary in VOCABULARY_OF.items():
            codes = set(_read(folder, name)["CODE"].unique())
            codes = {c for c in codes if not c.startswith(LOCAL_CODE_PREFIX)}
            missing = {c for c in codes if (vocabulary, c) not in known}
            assert not missing, (folder.name, name, missing)


def test_patient_and_encounter_references_resolve(nodes: dict[str, Path]) -> None:
    folder = nodes["urban_hospital"]
    patients = set(_read(folder, "patients")["Id"])
    encounters = _read(folder, "encounters")
    assert len(patients) == 3000
    assert encounters["Id"].n_unique() == encounters.height
    assert set(encounters["PATIENT"]) <= patients
    for name in VOCABULARY_OF:
        frame = _read(folder, name)
        assert set(frame["PATIENT"]) <= patients, name
        assert set(frame["ENCOUNTER"]) <= set(encounters["Id"]), name


def _ages(folder: Path) -> pl.Series:
    return _read(folder, "patients").select(
        age=(pl.date(2020, 1, 1) - pl.col("BIRTHDATE").str.to_date()).dt.total_days() / 365.25
    )["age"]


def test_profiles_differ_in_age_sex_and_coding_habits(nodes: dict[str, Path]) -> None:
    mean_age = {name: float(_ages(folder).mean()) for name, folder in nodes.items()}
    assert mean_age["paediatric"] < 12 < mean_age["urban_hospital"] < mean_age["elderly_care"]
    female = {
        name: float((_read(folder, "patients")["GENDER"] == "F").mean())
        for name, folder in nodes.items()
    }
    assert female["elderly_care"] > 0.55 > female["rural_clinic"]
    local = {
        name: int(_read(folder, "medications")["CODE"].str.starts_with(LOCAL_CODE_PREFIX).sum())
        for name, folder in nodes.items()
    }
    meds_rural = _read(nodes["rural_clinic"], "medications")
    assert local["rural_clinic"] == pytest.approx(0.04 * meds_rural.height, rel=0.3)
    assert local["urban_hospital"] == local["elderly_care"] == local["paediatric"] == 0
    empty_stop = meds_rural["STOP"].is_null().mean()
    assert 0.2 < empty_stop < 0.4
    assert _read(nodes["urban_hospital"], "medications")["STOP"].null_count() == 0


def test_rare_condition_in_a_few_patients(tmp_path: Path, nodes: dict[str, Path]) -> None:
    for name, folder in nodes.items():
        rare = _read(folder, "conditions").filter(pl.col("CODE") == "190905008")
        assert rare["PATIENT"].n_unique() == get_profile(name).rare_condition_patients
    custom = generate(
        tmp_path / "r", patients=400, seed=1, profile="urban_hospital", rare_condition="427089005"
    )
    rare = _read(custom, "conditions").filter(pl.col("CODE") == "427089005")
    assert rare["PATIENT"].n_unique() == get_profile("urban_hospital").rare_condition_patients
    assert rare["DESCRIPTION"][0] == "Diabetes mellitus due to cystic fibrosis"
    with pytest.raises(ValueError, match="not a SNOMED Condition code"):
        generate(tmp_path / "x", patients=10, seed=1, profile="urban_hospital", rare_condition="1")
    with pytest.raises(ValueError, match="unknown profile"):
        generate(tmp_path / "y", patients=10, seed=1, profile="mars_base")


def test_outcomes_depend_on_covariates(tmp_path: Path) -> None:
    """GI bleeding is more common with NSAIDs and age; deaths happen, more often when old."""
    folder = generate(tmp_path / "big", patients=20_000, seed=11, profile="urban_hospital")
    patients = _read(folder, "patients").with_columns(
        age=(pl.date(2020, 12, 31) - pl.col("BIRTHDATE").str.to_date()).dt.total_days() / 365.25
    )
    nsaid_codes = ["213469", "855926", "198014", "310965"]
    users = set(_read(folder, "medications").filter(pl.col("CODE").is_in(nsaid_codes))["PATIENT"])
    bleeders = set(_read(folder, "conditions").filter(pl.col("CODE") == "74474003")["PATIENT"])
    flags = patients.select(
        "age",
        pl.col("DEATHDATE").is_not_null().alias("dead"),
        pl.col("Id").is_in(list(users)).alias("nsaid"),
        pl.col("Id").is_in(list(bleeders)).alias("bleed"),
    )
    rate = flags.group_by("nsaid").agg(pl.col("bleed").mean()).sort("nsaid")["bleed"]
    assert rate[1] > 2 * rate[0]
    old = flags.filter(pl.col("age") >= 65)
    young = flags.filter(pl.col("age") < 45)
    assert old["bleed"].mean() > 1.5 * young["bleed"].mean()
    assert old["dead"].mean() > 5 * young["dead"].mean()
    assert flags["dead"].sum() > 200
