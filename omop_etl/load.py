"""Loading an existing OMOP CDM (CDM 5.3 or 5.4) into DuckDB: one CSV or Parquet file per table
(a folder or a zip), or one table per source table of a database (``load_sources``).

The folder may use upper- or lower-case file and column names in any order. A 5.3 export is
upgraded on the way in: the columns that CDM 5.4 renamed (found by comparing the packaged 5.3 and
5.4 field specifications) are renamed, and the columns 5.4 made required are filled. Vocabulary
tables come from the folder when it has them, otherwise from ``vocab_dir`` or the shipped
vocabulary. Every source row ends either in its CDM table or in ``etl_quarantine``.
"""

from __future__ import annotations

import shutil
import time
import zipfile
from collections.abc import Collection, Mapping
from pathlib import Path, PurePosixPath

import duckdb
from rich.progress import Progress

from omop_etl.ancestry import ancestry_notes
from omop_etl.build import atomic_build
from omop_etl.quarantine import Reason
from omop_etl.report import LoadReport, TableCounts
from omop_etl.schema import (
    cdm_tables,
    create_cdm_indexes,
    create_cdm_schema,
    spec_fields,
    vocabulary_tables,
)
from omop_etl.sources import OMOP_CSV, EtlInputError, TableSource, file_source
from omop_etl.staging import load_table, quarantine_source
from omop_etl.vocab import default_vocabulary_dir, load_vocabulary

REQUIRED_FILES = ("person", "observation_period")

# CDM 5.3 column -> CDM 5.4 column, per table (the 5.4 release notes' renames).
RENAMED_IN_54: dict[str, dict[str, str]] = {
    table: {
        "admitting_source_concept_id": "admitted_from_concept_id",
        "admitting_source_value": "admitted_from_source_value",
        "discharge_to_concept_id": "discharged_to_concept_id",
        "discharge_to_source_value": "discharged_to_source_value",
    }
    for table in ("visit_occurrence", "visit_detail")
}
RENAMED_IN_54["visit_detail"]["visit_detail_parent_id"] = "parent_visit_detail_id"

CDM_54_CONCEPT_ID = "756265"  # OMOP CDM Version 5.4.0

# SQL expressions for columns CDM 5.4 requires that a 5.3 file does not have.
FILLED_IN_54: dict[str, dict[str, str]] = {
    "cdm_source": {"cdm_version_concept_id": f"'{CDM_54_CONCEPT_ID}'"},
    "metadata": {"metadata_id": "CAST(_line - 1 AS VARCHAR)"},
}


def upgrade_gaps() -> dict[str, list[str]]:
    """Per table, the 5.3 columns with no 5.4 counterpart and the new required 5.4 columns
    that nothing fills; both must be empty for the upgrade to lose nothing (tests check it)."""
    old, new = spec_fields("5.3"), spec_fields("5.4")
    gaps: dict[str, list[str]] = {}
    for table in old.keys() & new.keys():
        renames = RENAMED_IN_54.get(table, {})
        new_names = {f.name for f in new[table]}
        old_names = {renames.get(f.name, f.name) for f in old[table]}
        missing = [f"5.3 {c}" for c in sorted(old_names - new_names)]
        missing += [
            f"5.4 {f.name}"
            for f in new[table]
            if f.required and f.name not in old_names and f.name not in FILLED_IN_54.get(table, {})
        ]
        if missing:
            gaps[table] = missing
    return gaps


DATA_SUFFIXES = (".csv", ".parquet")


def _source_files(src_dir: Path) -> dict[str, Path]:
    """Lower-case table name -> CSV or Parquet file of ``src_dir``; two files for one table
    (``PERSON.csv`` and ``person.parquet``) is an error."""
    files: dict[str, Path] = {}
    for path in sorted(src_dir.iterdir()):
        if path.is_file() and path.suffix.lower() in DATA_SUFFIXES:
            name = path.stem.lower()
            if name in files:
                raise EtlInputError(f"{src_dir}: both {files[name].name} and {path.name}")
            files[name] = path
    return files


def _build_folder(con: duckdb.DuckDBPyConnection) -> Path:
    """The private folder ``atomic_build`` builds the file of ``con`` in (removed afterwards)."""
    (path,) = con.execute(
        "SELECT path FROM duckdb_databases() WHERE database_name = current_database()"
    ).fetchone()
    return Path(path).parent


def _unzip(archive_path: Path, into: Path) -> Path:
    """Unpack the CSV and Parquet files of a zip into ``into`` by their base names (folders in
    the archive are ignored, and so no member can be written outside ``into``); return it."""
    into.mkdir()
    seen: dict[str, str] = {}
    try:
        with zipfile.ZipFile(archive_path) as archive:
            for info in archive.infolist():
                name = PurePosixPath(info.filename).name
                if (
                    info.is_dir()
                    or name.startswith(".")
                    or not name.lower().endswith(DATA_SUFFIXES)
                ):
                    continue
                if name.lower() in seen:
                    raise EtlInputError(
                        f"{archive_path}: both {seen[name.lower()]} and {info.filename}"
                    )
                seen[name.lower()] = info.filename
                with archive.open(info) as member, (into / name).open("wb") as out:
                    shutil.copyfileobj(member, out)
    except (zipfile.BadZipFile, zipfile.LargeZipFile) as error:
        raise EtlInputError(
            f"{archive_path}: not a folder or a readable zip file ({error})"
        ) from error
    if not seen:
        raise EtlInputError(f"{archive_path}: the zip holds no CSV or Parquet file")
    return into


def _upgrade_options(name: str, source: TableSource, report: LoadReport) -> dict:
    """Renames, fills and overrides that bring a 5.3 source of table ``name`` to 5.4."""
    options: dict = {"renames": RENAMED_IN_54.get(name), "fills": FILLED_IN_54.get(name)}
    if name == "cdm_source" and "cdm_version_concept_id" not in {
        h.lower() for h in source.header()
    }:
        # The rows now conform to 5.4; tools read the version from cdm_version.
        options["overrides"] = {"cdm_version": "'5.4'"}
        report.notes.append("cdm_source: CDM 5.3 upgraded to 5.4 (cdm_version '5.4', 756265)")
    return options


def _load_source(
    con: duckdb.DuckDBPyConnection,
    name: str,
    source: TableSource,
    report: LoadReport,
    rekey: bool,
) -> None:
    counts, per_reason, extra = load_table(
        con,
        cdm_tables()[name],
        source,
        rekey_duplicates=rekey,
        **_upgrade_options(name, source, report),
    )
    report.add_table(name, counts, per_reason)
    if counts.rekeyed:
        report.notes.append(
            f"{source.name}: {counts.rekeyed:,} rows reusing an earlier id loaded under new ids "
            "(etl_rekeyed)"
        )
    if extra:
        report.notes.append(f"{source.name}: columns not in CDM 5.4 ignored: {', '.join(extra)}")


def load_sources(
    con: duckdb.DuckDBPyConnection,
    sources: Mapping[str, TableSource],
    vocab_dir: Path,
    report: LoadReport,
    *,
    progress: bool,
    rekey: bool,
    only: Collection[str] | None = None,
) -> None:
    """Load an existing CDM given as one source per table (lower-case table name -> source)
    into the empty CDM tables of ``con``: CDM tables in the specification's order (person
    first, as the others check persons), vocabulary tables the sources lack from
    ``vocab_dir``, and every row of a source that is no CDM 5.4 table into the quarantine.

    ``only`` limits the load to those names (an incremental load's changed tables, emptied by
    the caller), so one code path serves every OMOP source and every kind of load. The report
    then notes where the file's concept_ancestor falls short for its data (``ancestry_notes``).
    """
    tables = cdm_tables()
    wanted = set(sources) | set(vocabulary_tables()) if only is None else set(only)
    absent_vocab = tuple(t for t in vocabulary_tables() if t not in sources and t in wanted)
    cdm = [t for t in tables if t in sources and t in wanted]
    others = sorted(t for t in sources if t not in tables and t in wanted)
    with Progress(disable=not progress, transient=True) as bar:
        task = bar.add_task("loading", total=len(cdm) + len(others) + bool(absent_vocab))
        if absent_vocab:
            bar.update(task, description=f"vocabulary from {vocab_dir}")
            load_vocabulary(con, vocab_dir, report=report, tables=absent_vocab)
            report.notes.append(f"vocabulary tables {', '.join(absent_vocab)} from {vocab_dir}")
            bar.advance(task)
        for name in cdm:
            bar.update(task, description=f"{name} ({sources[name].name})")
            _load_source(con, name, sources[name], report, rekey)
            bar.advance(task)
        for name in others:
            bar.update(task, description=f"{sources[name].name} (no CDM 5.4 table)")
            n = quarantine_source(con, sources[name], name, Reason.NO_CDM_TABLE)
            report.add_table(name, TableCounts(read=n, quarantined=n), {Reason.NO_CDM_TABLE: n})
            bar.advance(task)
        bar.update(task, description="indexes")
        create_cdm_indexes(con)
    report.notes.extend(ancestry_notes(con))


def load_omop_csv(
    src_dir: str | Path,
    db_path: str | Path,
    *,
    vocab_dir: str | Path | None = None,
    progress: bool = True,
    rekey_duplicates: bool = True,
) -> LoadReport:
    """Build the CDM file ``db_path`` from ``src_dir``: a folder of one CSV or Parquet file per
    CDM table, or a zip file of them (unpacked into the build's own folder, so nothing is left
    behind whatever happens).

    A row whose primary key repeats an earlier row's is loaded under a new id and logged in
    ``etl_rekeyed`` (the default: GiBleed reuses drug_exposure / measurement / observation ids
    across persons for distinct records, and dropping them would lose data and change published
    cohort counts), or with ``rekey_duplicates=False`` quarantined.
    Builds into a new file and swaps it in only when everything loaded; on any error
    (``EtlInputError`` for a missing file or column) the previous ``db_path`` is untouched.
    """
    started = time.perf_counter()
    src_dir, db_path = Path(src_dir), Path(db_path)
    if not src_dir.is_dir() and not src_dir.is_file():
        raise EtlInputError(f"source not found: {src_dir} (a folder or a zip of CSV or Parquet)")
    report = LoadReport(db_path=db_path, source=f"omop-csv {src_dir.name}")
    with atomic_build(db_path) as con:
        create_cdm_schema(con, indexes=False)
        vocab = Path(vocab_dir or default_vocabulary_dir())
        folder = src_dir if src_dir.is_dir() else _unzip(src_dir, _build_folder(con) / "source")
        files = _source_files(folder)
        for name in REQUIRED_FILES:
            if name not in files:
                raise EtlInputError(f"{src_dir}: required file {name.upper()}.csv is missing")
        sources = {name: file_source(path, OMOP_CSV) for name, path in files.items()}
        load_sources(con, sources, vocab, report, progress=progress, rekey=rekey_duplicates)
    report.seconds = time.perf_counter() - started
    return report
