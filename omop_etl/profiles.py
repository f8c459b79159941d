"""Per-node profiles for the synthetic Synthea-format generator, and the clinical world they share.

A federated study is only interesting when nodes differ: a city hospital sees a different case mix,
age structure and coding habits than a rural clinic or a nursing home. A ``Profile`` fixes those
differences; the code catalogues below fix what every node has in common (which SNOMED, RxNorm,
LOINC and CVX codes exist, how risk of disease rises with age). Every code here exists in the
vocabulary shipped with the package (derived from Eunomia GiBleed), so a generated node maps fully
except where a profile's coding habit deliberately uses local codes.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field
from pathlib import Path

#: Age bands (years, [low, high)) that ``Profile.age_band_weights`` weighs.
AGE_BANDS: tuple[tuple[int, int], ...] = ((0, 5), (5, 18), (18, 40), (40, 65), (65, 80), (80, 100))

ENCOUNTER_CLASSES: tuple[str, ...] = (
    "wellness",
    "ambulatory",
    "outpatient",
    "urgentcare",
    "emergency",
    "inpatient",
)
#: Synthea's SNOMED encounter code and description per encounter class.
ENCOUNTER_CODES: dict[str, tuple[str, str]] = {
    "wellness": ("162673000", "General examination of patient (procedure)"),
    "ambulatory": ("185345009", "Encounter for symptom (procedure)"),
    "outpatient": ("185349003", "Encounter for check up (procedure)"),
    "urgentcare": ("702927004", "Urgent care clinic (environment)"),
    "emergency": ("50849002", "Emergency room admission (procedure)"),
    "inpatient": ("32485007", "Hospital admission (procedure)"),
}


@dataclass(frozen=True)
class Coded:
    """A code and its description, the pair every Synthea record file writes (CODE,
    DESCRIPTION); the catalogues below add what the simulation needs of each kind."""

    code: str
    description: str


@dataclass(frozen=True)
class Drug(Coded):
    """An RxNorm clinical drug as Synthea writes it in medications.csv."""


@dataclass(frozen=True)
class Chronic:
    """A chronic condition: prevalence by a logistic model on age and sex, and its treatments.

    logit(p) = intercept + age_slope * (age - 50) / 10 + female_shift; a profile multiplies the
    odds by its own factor. ``drugs`` are the treatments one of which a treated patient receives.
    """

    key: str
    code: str
    description: str
    intercept: float
    age_slope: float
    female_shift: float = 0.0
    drugs: tuple[Drug, ...] = ()


@dataclass(frozen=True)
class Acute(Coded):
    """An acute condition diagnosed at a visit, with its usual short treatments."""

    weight_child: float
    weight_adult: float
    drugs: tuple[Drug, ...] = ()


@dataclass(frozen=True)
class Lab(Coded):
    """A LOINC observation: numeric (mean, sd, units) or text (one of ``values``)."""

    category: str
    weight: float
    mean: float = 0.0
    sd: float = 0.0
    units: str = ""
    values: tuple[str, ...] = ()
    decimals: int = 1


CELECOXIB = Drug("213469", "celecoxib 200 MG Oral Capsule [Celebrex]")
DICLOFENAC = Drug("855926", "Diclofenac Sodium 75 MG Delayed Release Oral Tablet")
NAPROXEN = Drug("198014", "Naproxen 500 MG Oral Tablet")
IBUPROFEN = Drug("310965", "Ibuprofen 200 MG Oral Tablet")
WARFARIN = Drug("855332", "Warfarin Sodium 5 MG Oral Tablet")
AMOXICILLIN = Drug("308192", "Amoxicillin 500 MG Oral Tablet")
AMOXICILLIN_CHILD = Drug("308182", "Amoxicillin 250 MG Oral Capsule")
AMOX_CLAV = Drug("562251", "Amoxicillin 250 MG / Clavulanate 125 MG Oral Tablet")
PENICILLIN_V = Drug("834061", "Penicillin V Potassium 250 MG Oral Tablet")
ACETAMINOPHEN = Drug("313782", "Acetaminophen 325 MG Oral Tablet")
NITROFURANTOIN = Drug("311995", "NITROFURANTOIN, MACROCRYSTALS 50 MG Oral Capsule")
#: NSAIDs whose exposure raises the risk of gastrointestinal haemorrhage in the generator.
NSAIDS: tuple[Drug, ...] = (CELECOXIB, DICLOFENAC, NAPROXEN, IBUPROFEN)

CHRONIC: tuple[Chronic, ...] = (
    Chronic("osteoarthritis", "396275006", "Osteoarthritis", -2.2, 0.75, 0.3),
    Chronic(
        "atrial_fibrillation",
        "49436004",
        "Atrial fibrillation",
        -4.6,
        0.9,
        -0.4,
        (Drug("197604", "Digoxin 0.125 MG Oral Tablet"),),
    ),
    Chronic(
        "coronary_arteriosclerosis",
        "53741008",
        "Coronary arteriosclerosis",
        -3.6,
        0.8,
        -0.6,
        (
            Drug("309362", "clopidogrel 75 MG Oral Tablet"),
            Drug("312961", "Simvastatin 20 MG Oral Tablet"),
            Drug("705129", "Nitroglycerin 0.4 MG/ACTUAT Mucosal Spray"),
        ),
    ),
    Chronic(
        "asthma",
        "195967001",
        "Asthma",
        -2.6,
        -0.15,
        0.0,
        (
            Drug("745679", "200 ACTUAT Albuterol 0.09 MG/ACTUAT Metered Dose Inhaler"),
            Drug(
                "895994",
                "120 ACTUAT Fluticasone propionate 0.044 MG/ACTUAT Metered Dose Inhaler",
            ),
        ),
    ),
    Chronic(
        "hypothyroidism",
        "40930008",
        "Hypothyroidism",
        -3.4,
        0.3,
        1.2,
        (Drug("966222", "Levothyroxine Sodium 0.075 MG Oral Tablet"),),
    ),
    Chronic(
        "osteoporosis",
        "64859006",
        "Osteoporosis",
        -4.4,
        0.8,
        1.3,
        (Drug("904419", "Alendronic acid 10 MG Oral Tablet"),),
    ),
    Chronic(
        "rheumatoid_arthritis",
        "69896004",
        "Rheumatoid arthritis",
        -4.3,
        0.3,
        0.9,
        (Drug("105586", "Methotrexate 10 MG Oral Tablet"),),
    ),
    Chronic(
        "alzheimers",
        "26929004",
        "Alzheimer's disease",
        -7.2,
        1.3,
        0.3,
        (
            Drug("997223", "Donepezil hydrochloride 10 MG Oral Tablet"),
            Drug("996740", "Memantine hydrochloride 2 MG/ML Oral Solution"),
        ),
    ),
    Chronic(
        "anemia",
        "271737000",
        "Anemia",
        -3.4,
        0.25,
        0.6,
        (Drug("310325", "ferrous sulfate 325 MG Oral Tablet"),),
    ),
    Chronic("atopic_dermatitis", "24079001", "Atopic dermatitis", -3.6, -0.35, 0.1),
    Chronic(
        "adhd",
        "192127007",
        "Child attention deficit disorder",
        -4.0,
        -0.9,
        -0.7,
        (Drug("1091392", "Methylphenidate Hydrochloride 20 MG Oral Tablet"),),
    ),
    Chronic(
        "epilepsy",
        "84757009",
        "Epilepsy",
        -4.6,
        0.0,
        0.0,
        (Drug("308971", "Carbamazepine 20 MG/ML Oral Suspension [Tegretol]"),),
    ),
)
CHRONIC_KEYS: tuple[str, ...] = tuple(c.key for c in CHRONIC)

ACUTE: tuple[Acute, ...] = (
    Acute("444814009", "Viral sinusitis (disorder)", 1.0, 3.0, (AMOXICILLIN,)),
    Acute("10509002", "Acute bronchitis (disorder)", 1.0, 2.0, (AMOXICILLIN,)),
    Acute("195662009", "Acute viral pharyngitis (disorder)", 3.0, 1.5, (ACETAMINOPHEN,)),
    Acute("43878008", "Streptococcal sore throat (disorder)", 2.0, 0.5, (PENICILLIN_V,)),
    Acute("65363002", "Otitis media", 4.0, 0.2, (AMOXICILLIN_CHILD, AMOX_CLAV)),
    Acute("44465007", "Sprain of ankle", 0.8, 1.0, (IBUPROFEN, ACETAMINOPHEN)),
    Acute("38822007", "Cystitis", 0.2, 1.0, (NITROFURANTOIN,)),
    Acute("233604007", "Pneumonia", 0.4, 0.5, (AMOX_CLAV,)),
    Acute("284549007", "Laceration of hand", 0.5, 0.6, ()),
    Acute("62106007", "Concussion with no loss of consciousness", 0.6, 0.3, ()),
)

GI_BLEED = ("74474003", "Gastrointestinal hemorrhage")
MYOCARDIAL_INFARCTION = ("22298006", "Myocardial infarction")
#: A SNOMED "history of" code whose standard concept lies in the Observation domain: tests that
#: the loader routes by the concept's domain, not by the file the row came from.
HISTORY_OF_APPENDECTOMY = ("428251008", "History of appendectomy")
DEFAULT_RARE_CONDITION = ("190905008", "Cystic fibrosis")

LABS: tuple[Lab, ...] = (
    Lab("8331-1", "Oral temperature", "vital-signs", 3.0, 36.9, 0.4, "Cel"),
    Lab("718-7", "Hemoglobin [Mass/volume] in Blood", "laboratory", 2.0, 14.3, 1.2, "g/dL"),
    Lab("2345-7", "Glucose [Mass/volume] in Serum or Plasma", "laboratory", 2.0, 92, 14, "mg/dL"),
    Lab(
        "2160-0",
        "Creatinine [Mass/volume] in Serum or Plasma",
        "laboratory",
        1.5,
        0.9,
        0.2,
        "mg/dL",
        decimals=2,
    ),
    Lab(
        "26515-7",
        "Platelets [#/volume] in Blood by Automated count",
        "laboratory",
        1.0,
        260,
        55,
        "10*3/uL",
        decimals=0,
    ),
    Lab(
        "2951-2", "Sodium [Moles/volume] in Serum or Plasma", "laboratory", 1.0, 140, 2.5, "mmol/L"
    ),
    Lab(
        "2823-3",
        "Potassium [Moles/volume] in Serum or Plasma",
        "laboratory",
        1.0,
        4.2,
        0.35,
        "mmol/L",
    ),
    Lab(
        "76690-7",
        "Sexual orientation",
        "social-history",
        0.5,
        values=("Heterosexual", "Homosexual", "Bisexual"),
    ),
    Lab(
        "63513-6",
        "Are you covered by health insurance or some other kind of health care plan",
        "survey",
        0.5,
        values=("Yes", "No"),
    ),
)
LAB_HEMOGLOBIN = 1
LAB_CREATININE = 3

PROCEDURES: tuple[tuple[str, str, float], ...] = (
    ("430193006", "Medication Reconciliation (procedure)", 4.0),
    ("82078001", "Collection of blood specimen for laboratory (procedure)", 3.0),
    ("162676008", "Brief general examination (procedure)", 2.0),
    ("399208008", "Plain chest X-ray (procedure)", 1.0),
    ("29303009", "Electrocardiographic procedure", 1.0),
    ("127783003", "Spirometry (procedure)", 0.6),
    ("117015009", "Throat culture (procedure)", 0.6),
    ("312681000", "Bone density scan (procedure)", 0.4),
    ("76601001", "Intramuscular injection", 0.5),
    ("288086009", "Suture open wound", 0.3),
)
TRANSFUSION = ("180207008", "Intravenous blood transfusion of packed cells (procedure)")
PCI = ("415070008", "Percutaneous coronary intervention (procedure)")
ECG = ("29303009", "Electrocardiographic procedure")

#: CVX vaccines with a weight per age group (under 2, 2-17, 18-59, 60 and over).
VACCINES: tuple[tuple[str, str, tuple[float, float, float, float]], ...] = (
    ("140", "Influenza, seasonal, injectable, preservative free", (1.0, 3.0, 6.0, 6.0)),
    ("20", "DTaP", (3.0, 0.5, 0.0, 0.0)),
    ("10", "IPV", (3.0, 0.5, 0.0, 0.0)),
    ("49", "Hib (PRP-OMP)", (3.0, 0.0, 0.0, 0.0)),
    ("119", "rotavirus, monovalent", (2.0, 0.0, 0.0, 0.0)),
    ("133", "Pneumococcal conjugate PCV 13", (3.0, 0.0, 0.0, 0.0)),
    ("83", "Hep A, ped/adol, 2 dose", (1.0, 0.5, 0.0, 0.0)),
    ("21", "varicella", (0.5, 1.0, 0.0, 0.0)),
    ("62", "HPV, quadrivalent", (0.0, 1.0, 0.1, 0.0)),
    ("115", "Tdap", (0.0, 1.0, 0.5, 0.3)),
    ("113", "Td (adult) preservative free", (0.0, 0.0, 1.0, 1.0)),
    ("43", "Hep B, adult", (0.0, 0.0, 0.5, 0.2)),
    ("121", "zoster", (0.0, 0.0, 0.1, 1.5)),
    ("33", "pneumococcal polysaccharide vaccine, 23 valent", (0.0, 0.0, 0.1, 1.5)),
)

ALLERGIES: tuple[tuple[str, str, str], ...] = (
    ("91935009", "Allergy to peanuts", "food"),
    ("91934008", "Allergy to nut", "food"),
    ("91930004", "Allergy to eggs", "food"),
    ("417532002", "Allergy to fish", "food"),
    ("300913006", "Shellfish allergy", "food"),
    ("425525006", "Allergy to dairy product", "food"),
    ("714035009", "Allergy to soy", "food"),
    ("420174000", "Allergy to wheat", "food"),
    ("419263009", "Allergy to tree pollen", "environment"),
    ("418689008", "Allergy to grass pollen", "environment"),
    ("232350006", "Allergy to house dust mite", "environment"),
    ("232347008", "Allergy to animal dander", "environment"),
    ("419474003", "Allergy to mold", "environment"),
    ("424213003", "Allergy to bee venom", "environment"),
    ("300916003", "Latex allergy", "environment"),
)

#: Prefix of the site-local drug codes that no vocabulary knows (a coding habit of some nodes).
LOCAL_CODE_PREFIX = "LOCAL-"


@dataclass(frozen=True)
class Profile:
    """How one node's population and record keeping differ from another's."""

    name: str
    description: str
    age_band_weights: tuple[float, ...]
    female_fraction: float
    first_year: int
    last_year: int
    visits_per_year: float
    #: weights over ENCOUNTER_CLASSES for routine (non-event) encounters
    encounter_class_weights: tuple[float, ...]
    #: odds multipliers per chronic condition key (missing key: 1.0)
    condition_odds: dict[str, float] = field(default_factory=dict)
    #: probability of an NSAID course for a patient without osteoarthritis at age 50
    nsaid_rate: float = 0.08
    #: share of celecoxib, diclofenac, naproxen, ibuprofen among NSAID courses
    nsaid_mix: tuple[float, float, float, float] = (0.35, 0.25, 0.2, 0.2)
    #: fraction of medication rows coded with a site-local (unmappable) code
    local_drug_code_rate: float = 0.0
    #: fraction of acute condition / medication stop dates left empty
    empty_stop_rate: float = 0.0
    mortality_multiplier: float = 1.0
    gi_bleed_multiplier: float = 1.0
    observations_per_visit: float = 1.5
    procedure_rate: float = 0.3
    allergy_rate: float = 0.08
    rare_condition_patients: int = 5
    race_weights: tuple[float, ...] = (0.7, 0.12, 0.08, 0.02, 0.08)
    hispanic_fraction: float = 0.12
    city: str = "Springfield"


RACES: tuple[str, ...] = ("white", "black", "asian", "native", "other")

#: The shipped profiles, as data (``spec/profiles.toml``): a field a profile leaves out takes
#: the ``Profile`` default, and TOML's arrays become the tuples the fields declare.
PROFILES_FILE = Path(__file__).resolve().parent / "spec" / "profiles.toml"


def _load_profiles(path: Path) -> dict[str, Profile]:
    with path.open("rb") as handle:
        entries = tomllib.load(handle)["profile"]
    profiles = (
        Profile(**{k: tuple(v) if isinstance(v, list) else v for k, v in entry.items()})
        for entry in entries
    )
    return {p.name: p for p in profiles}


PROFILES: dict[str, Profile] = _load_profiles(PROFILES_FILE)


def get_profile(name: str | Profile) -> Profile:
    """The profile called ``name`` (a ``Profile`` passes through), or a ValueError naming the
    known profiles."""
    if isinstance(name, Profile):
        return name
    try:
        return PROFILES[name]
    except KeyError:
        known = ", ".join(sorted(PROFILES))
        raise ValueError(f"unknown profile {name!r}; known profiles: {known}") from None
