"""What a load did, table by table: the run report every ETL command ends with."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from rich.console import Console
from rich.table import Table


@dataclass
class TableCounts:
    """Rows read from the source, loaded into the CDM, quarantined, loaded with concept 0, and
    loaded under a new id because their source id was reused (``etl_rekeyed``)."""

    read: int = 0
    loaded: int = 0
    quarantined: int = 0
    unmapped: int = 0
    rekeyed: int = 0


def _cells(counts: TableCounts) -> list[str]:
    """The summary table's cells of one row: read, loaded, quarantined, unmapped."""
    return [f"{n:,}" for n in (counts.read, counts.loaded, counts.quarantined, counts.unmapped)]


@dataclass
class LoadReport:
    """Counts per CDM table (or source file) plus quarantine counts per (table, reason)."""

    db_path: Path
    source: str
    tables: dict[str, TableCounts] = field(default_factory=dict)
    quarantine: dict[tuple[str, str], int] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def table(self, name: str) -> TableCounts:
        """The counts of ``name``, created empty on first use."""
        return self.tables.setdefault(name, TableCounts())

    def add_table(self, name: str, counts: TableCounts, per_reason: dict[str, int]) -> None:
        """Record one table's counts and its quarantined rows per reason."""
        self.tables[name] = counts
        for reason, n in per_reason.items():
            if not n:
                continue
            key = (name, str(reason))
            self.quarantine[key] = self.quarantine.get(key, 0) + n

    def add_quarantine(self, table: str, per_reason: dict[str, int]) -> None:
        """Record rows of ``table`` quarantined per reason (adds to the table's count too)."""
        for reason, n in per_reason.items():
            key = (table, str(reason))
            self.quarantine[key] = self.quarantine.get(key, 0) + n
            self.table(table).quarantined += n

    @property
    def totals(self) -> TableCounts:
        """The counts summed over every table (read, loaded, quarantined, unmapped, rekeyed)."""
        return TableCounts(
            **{
                name: sum(getattr(t, name) for t in self.tables.values())
                for name in TableCounts.__dataclass_fields__
            }
        )

    def quarantine_by_reason(self) -> dict[str, int]:
        """Quarantined rows per reason over all tables."""
        totals: Counter[str] = Counter()
        for (_, reason), n in self.quarantine.items():
            totals[reason] += n
        return dict(sorted(totals.items()))

    def summary_table(self) -> Table:
        """Rich table: one row per table with read / loaded / quarantined / unmapped, and totals."""
        table = Table(title=f"{self.source} -> {self.db_path.name} ({self.seconds:.1f} s)")
        table.add_column("table")
        for name in ("read", "loaded", "quarantined", "unmapped"):
            table.add_column(name, justify="right")
        for name, c in self.tables.items():
            style = "yellow" if c.quarantined else None
            table.add_row(name, *_cells(c), style=style)
        table.add_section()
        table.add_row("total", *_cells(self.totals), style="bold")
        return table

    def reasons_table(self) -> Table:
        """Rich table of quarantined rows per (table, reason)."""
        table = Table(title="quarantine (etl_quarantine)")
        table.add_column("table")
        table.add_column("reason")
        table.add_column("rows", justify="right")
        for (name, reason), n in self.quarantine.items():
            table.add_row(name, reason, f"{n:,}")
        return table

    def print(self, console: Console | None = None) -> None:
        """Print the summary, the quarantine counts per reason and any notes."""
        console = console or Console()
        console.print(self.summary_table())
        if self.quarantine:
            console.print(self.reasons_table())
        for note in self.notes:
            console.print(f"[yellow]note:[/] {note}")
