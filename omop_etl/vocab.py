"""OMOP vocabularies: loading an Athena export, and the small vocabulary the package ships.

Athena (athena.ohdsi.org) delivers the vocabulary as tab-separated files with upper-case names,
quotes that are ordinary characters and dates written ``YYYYMMDD``; ``load_vocabulary`` reads
exactly that. The shipped vocabulary in ``omop_etl/vocabulary`` is in the same format, derived
from the Eunomia GiBleed subset by ``derive_vocabulary`` (see the README there).
"""

from __future__ import annotations

import time
from pathlib import Path

import duckdb

from omop_etl.ancestry import ancestry_notes, derive_concept_ancestor
from omop_etl.build import atomic_build
from omop_etl.cdm import connect
from omop_etl.quarantine import MARKERS_TABLE, QUARANTINE_TABLE
from omop_etl.report import LoadReport, TableCounts
from omop_etl.schema import cdm_tables, create_cdm_schema, vocabulary_tables
from omop_etl.sources import ATHENA, OMOP_CSV, EtlInputError, find_table_file
from omop_etl.sql import quote
from omop_etl.staging import load_csv_table

VOCABULARY_DIR = Path(__file__).resolve().parent / "vocabulary"

# Standard concepts a Synthea mapping needs that the GiBleed subset lacks, as Athena has them:
# (concept_id, name, domain, vocabulary, class, standard, code, valid_start, valid_end).
ADDED_CONCEPTS: tuple[tuple[int, str, str, str, str, str, str, str, str], ...] = (
    (32817, "EHR", "Type Concept", "Type Concept", "Type Concept", "S", "OMOP4976890", "20200820", "20991231"),
    (756265, "OMOP CDM Version 5.4.0", "Metadata", "CDM", "CDM", "S", "CDM v5.4.0", "20210925", "20991231"),
    (8515, "Asian", "Race", "Race", "Race", "S", "2", "19700101", "20991231"),
    (8516, "Black or African American", "Race", "Race", "Race", "S", "3", "19700101", "20991231"),
    (8527, "White", "Race", "Race", "Race", "S", "5", "19700101", "20991231"),
    (8557, "Native Hawaiian or Other Pacific Islander", "Race", "Race", "Race", "S", "4", "19700101", "20991231"),
    (8657, "American Indian or Alaska Native", "Race", "Race", "Race", "S", "1", "19700101", "20991231"),
    (38003563, "Hispanic or Latino", "Ethnicity", "Ethnicity", "Ethnicity", "S", "Hispanic", "19700101", "20991231"),
    (38003564, "Not Hispanic or Latino", "Ethnicity", "Ethnicity", "Ethnicity", "S", "Not Hispanic", "19700101", "20991231"),
    (8582, "centimeter", "Unit", "UCUM", "Unit", "S", "cm", "19700101", "20991231"),
    (8840, "milligram per deciliter", "Unit", "UCUM", "Unit", "S", "mg/dL", "19700101", "20991231"),
    (8876, "millimeter mercury column", "Unit", "UCUM", "Unit", "S", "mm[Hg]", "19700101", "20991231"),
    (9529, "kilogram", "Unit", "UCUM", "Unit", "S", "kg", "19700101", "20991231"),
    (9531, "kilogram per square meter", "Unit", "UCUM", "Unit", "S", "kg/m2", "19700101", "20991231"),
)  # fmt: skip
# Ingredient ancestors of two drugs the GiBleed subset holds without them (its DRUG_ERA was built
# with the full vocabulary, so GiBleed itself does not need them; a node that derives drug eras
# from drug_exposure does): (ancestor, descendant, min_levels, max_levels), levels as the subset
# has them for its other clinical and branded drugs.
ADDED_ANCESTORS: tuple[tuple[int, int, int, int], ...] = (
    (1118084, 1118088, 2, 3),  # celecoxib <- celecoxib 200 MG Oral Capsule [Celebrex]
    (1124300, 40162359, 2, 3),  # diclofenac <- Diclofenac Sodium 75 MG Delayed Release Oral Tablet
)
ADDED_VOCABULARIES = (("Type Concept", "OMOP Type Concept", "OMOP generated", None, 0),)


def default_vocabulary_dir() -> Path:
    """The vocabulary shipped with the package (Athena format, derived from GiBleed)."""
    return VOCABULARY_DIR


def load_vocabulary(
    con: duckdb.DuckDBPyConnection,
    vocab_dir: str | Path,
    *,
    report: LoadReport | None = None,
    tables: tuple[str, ...] | None = None,
) -> None:
    """Load the Athena export in ``vocab_dir`` into the (empty) vocabulary tables of ``con``.

    The CDM tables must exist (``create_cdm_schema``). ``tables`` limits the load to some
    vocabulary tables. CONCEPT.csv is required; another missing file leaves its table empty and
    adds a note to ``report``. Rows that cannot load go to the quarantine.
    """
    folder = Path(vocab_dir)
    if not folder.is_dir():
        raise EtlInputError(f"vocabulary folder not found: {folder}")
    for name in tables or vocabulary_tables():
        path = find_table_file(folder, name)
        if path is None:
            if name == "concept":
                raise EtlInputError(f"{folder}: CONCEPT.csv is missing (not an Athena export?)")
            if report:
                report.notes.append(f"{folder}: no {name.upper()}.csv, table {name} left empty")
            continue
        counts, per_reason, _ = load_csv_table(con, cdm_tables()[name], path, ATHENA)
        if report:
            report.add_table(name, counts, per_reason)


def replace_vocabulary(
    db_path: Path, vocab_dir: Path | None, *, derive_ancestors: bool = False
) -> LoadReport:
    """Load ``vocab_dir`` into ``db_path`` (created if absent), replacing its vocabulary, and with
    ``derive_ancestors`` rebuild concept_ancestor from the relationships (``omop_etl.ancestry``);
    ``vocab_dir`` None keeps the file's vocabulary (only the rebuild).

    The clinical tables of an existing CDM file are kept; the swap is atomic like every build.
    """
    started = time.perf_counter()
    if vocab_dir is None and not db_path.is_file():
        raise EtlInputError(f"no CDM file at {db_path} to derive concept_ancestor in")
    source = f"vocab {vocab_dir.name}" if vocab_dir else "concept_ancestor derived"
    report = LoadReport(db_path=db_path, source=source)
    with atomic_build(db_path, copy_existing=True) as con:
        has_cdm = con.execute(
            "SELECT count(*) FROM duckdb_tables() WHERE table_name = 'concept'"
        ).fetchone()[0]
        if not has_cdm and vocab_dir is None:
            raise EtlInputError(f"{db_path}: not a CDM file (no concept table)")
        if not has_cdm:
            create_cdm_schema(con)
        # The file is no longer the copy that a PostgreSQL load's markers describe.
        con.execute(f"DROP TABLE IF EXISTS {MARKERS_TABLE}")
        if vocab_dir is not None:
            for name in vocabulary_tables():
                con.execute(f"DELETE FROM {quote(name)}")
            con.execute(
                f"DELETE FROM {QUARANTINE_TABLE} WHERE target_table IN "
                f"({', '.join('?' for _ in vocabulary_tables())})",
                list(vocabulary_tables()),
            )
            load_vocabulary(con, vocab_dir, report=report)
        if derive_ancestors:
            rows = derive_concept_ancestor(con)
            report.add_table("concept_ancestor (derived)", TableCounts(loaded=rows), {})
        report.notes.extend(ancestry_notes(con))
    report.seconds = time.perf_counter() - started
    return report


def _add_athena_defaults(con: duckdb.DuckDBPyConnection) -> None:
    """Add the rows every Athena export has but the GiBleed subset lacks (README step 2-3)."""
    con.executemany(
        "INSERT INTO concept SELECT ?, ?, ?, ?, ?, ?, ?, strptime(?, '%Y%m%d'), "
        "strptime(?, '%Y%m%d'), NULL WHERE NOT EXISTS "
        "(SELECT 1 FROM concept c WHERE c.concept_id = ?)",
        [[*row, row[0]] for row in ADDED_CONCEPTS],
    )
    con.executemany(
        "INSERT INTO vocabulary SELECT ?, ?, ?, ?, ? WHERE NOT EXISTS "
        "(SELECT 1 FROM vocabulary v WHERE v.vocabulary_id = ?)",
        [[*row, row[0]] for row in ADDED_VOCABULARIES],
    )
    con.execute(
        """INSERT INTO concept_relationship
           SELECT c.concept_id, c.concept_id, r.relationship_id, DATE '1970-01-01',
                  DATE '2099-12-31', NULL
           FROM concept c CROSS JOIN (VALUES ('Maps to'), ('Mapped from')) r(relationship_id)
           WHERE c.standard_concept = 'S' AND NOT EXISTS (
               SELECT 1 FROM concept_relationship x WHERE x.concept_id_1 = c.concept_id
               AND x.concept_id_2 = c.concept_id AND x.relationship_id = r.relationship_id)"""
    )
    con.execute(
        """INSERT INTO concept_ancestor
           SELECT concept_id, concept_id, 0, 0 FROM concept c
           WHERE standard_concept = 'S' AND NOT EXISTS (SELECT 1 FROM concept_ancestor a
               WHERE a.ancestor_concept_id = c.concept_id
               AND a.descendant_concept_id = c.concept_id)"""
    )
    con.executemany(
        "INSERT INTO concept_ancestor SELECT ?, ?, ?, ? WHERE NOT EXISTS (SELECT 1 FROM "
        "concept_ancestor a WHERE a.ancestor_concept_id = ? AND a.descendant_concept_id = ?)",
        [[*row, *row[:2]] for row in ADDED_ANCESTORS],
    )
    con.execute(
        """INSERT INTO concept_class SELECT DISTINCT concept_class_id, concept_class_id, 0
           FROM concept WHERE concept_class_id NOT IN (SELECT concept_class_id FROM concept_class)"""
    )


def export_athena(con: duckdb.DuckDBPyConnection, out_dir: Path) -> None:
    """Write the vocabulary tables of ``con`` as an Athena export, rows sorted by all columns."""
    out_dir.mkdir(parents=True, exist_ok=True)
    for name in vocabulary_tables():
        table = cdm_tables()[name]
        columns = ", ".join(
            f"strftime({quote(f.name)}, '%Y%m%d') AS {quote(f.name)}"
            if f.kind == "date"
            else quote(f.name)
            for f in table.fields
        )
        target = out_dir / f"{name.upper()}.csv"
        con.execute(
            f"COPY (SELECT {columns} FROM {quote(name)} ORDER BY ALL) TO '{target}' "
            "(DELIMITER '\t', QUOTE '', HEADER)"
        )


def derive_vocabulary(gibleed_dir: str | Path, out_dir: str | Path) -> None:
    """Rebuild the shipped vocabulary from the GiBleed CSV folder (see vocabulary/README.md)."""
    con = connect(read_only=False)
    create_cdm_schema(con, indexes=False)
    for name in vocabulary_tables():
        path = find_table_file(Path(gibleed_dir), name)
        if path is None:
            raise EtlInputError(f"{gibleed_dir}: {name.upper()}.csv is missing")
        load_csv_table(con, cdm_tables()[name], path, OMOP_CSV)
    _add_athena_defaults(con)
    export_athena(con, Path(out_dir))
    con.close()
